"""NNCLR's queue lookup on maect.kernels.queue_topk, in the contract of the code it replaces.

Replaces (the similarity matrix, then max / topk, then the gather):
    solo-learn, solo/methods/nnclr.py `NNCLR.find_nn` (the same lines in nnbyol.py, nnsiam.py):
        idx = (z @ self.queue.T).max(dim=1)[1]
        nn = self.queue[idx]
      ->  idx, nn = nnclr_find_nn(z, self.queue)
    MAE-CT, models/contrastive_heads/base/contrastive_head_base.py `ContrastiveHeadBase.find_nn` with
    `get_queue_similarity_matrix` (similarity matrix, own ids set to -1, max or topk + torch.randint, queue[idx]):
      ->  idx, nn = nnclr_find_nn(normed_projected, self.queue, self.queue_id if self.exclude_self_from_queue
                                  else None, ids if self.exclude_self_from_queue else None, max(topk, 1))
docs/swap-in.md shows both edits in place.
"""
from __future__ import annotations

import torch
from torch import Tensor

from maect.kernels import queue_topk

__all__ = ["nnclr_find_nn", "search_dtype"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def search_dtype(a: Tensor, b: Tensor, who: str) -> torch.dtype:
    """The dtype both operands are searched in: theirs when they share it, else fp64 when either is fp64, else fp32
    (both convert to it exactly). A ValueError names a non-float operand."""
    for name, t in (("query", a), ("bank", b)):
        if t.dtype not in _FLOATS:
            raise ValueError(f"{who}: {name} must be a float tensor (fp32, bf16, fp16 or fp64), got {t.dtype}")
    if a.dtype == b.dtype:
        return a.dtype
    return torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32


def replaced_rows(query: Tensor, bank: Tensor, dt: torch.dtype) -> Tensor | None:
    """The query rows that the replaced code's own lines must answer (a bool [B] mask), or None: every row when
    the search runs in fp64 (queue_topk has no fp64 path) or the bank holds a non-finite value (the replaced max /
    argmax then returns the first NaN or +inf entry for every row), else the rows of query holding one (an all-NaN
    similarity row: the replaced code returns its first index). A row sum that overflows counts as non-finite: it
    only costs the fast path."""
    if dt == torch.float64 or not bool(torch.isfinite(bank.sum(dim=1, dtype=torch.float32)).all()):
        return torch.ones(query.shape[0], dtype=torch.bool, device=query.device)
    rows = ~torch.isfinite(query.sum(dim=1, dtype=torch.float32))
    return rows if bool(rows.any()) else None


def nnclr_find_nn(z: Tensor, queue: Tensor, queue_ids: Tensor | None = None, ids: Tensor | None = None,
                  topk: int = 1, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Nearest neighbour of each row of z in the queue, never materialising the [B, Q] similarity matrix.

    Args:
        z: [B, D] float (fp32 / bf16 / fp16 / fp64), the (normalised) projections, as the replaced code receives
            them.
        queue: [Q, D] float, the queue (any of those dtypes; Q >= topk).
        queue_ids, ids: [Q] and [B] integer sample ids, both or neither: queue entries whose id equals the row's id
            are excluded (MAE-CT's exclude_self_from_queue).
        topk: 1 = the most similar entry (solo-learn; MAE-CT's topk=0). topk > 1: one of the topk most similar
            entries picked uniformly at random (MAE-CT's topk).
        generator: the torch.Generator of the pick (topk > 1). None: the global CPU generator, drawing exactly
            what MAE-CT's `torch.randint(size=(B,), high=topk)` draws, so a seeded run picks the same positions.

    Returns:
        idx [B] int64 on queue's device, and nn = queue[idx] [B, D] (queue's dtype and device: the stored rows).

    Contract:
        * Rank: the dot product z_b . queue_j (both projects pass L2-normalised rows, so this is their cosine
          similarity; nothing is re-normalised, as in the replaced lines), products and sums in fp32: exact for
          bf16 / fp16 inputs up to summation order. The replaced code ranks the matmul in its dtype (bf16 under
          autocast), so where two entries are within that rounding of each other the two may pick differently;
          this one picks the entry with the larger fp32 similarity. Autocast does not change the search.
          On CUDA the Triton kernel's exactness holds for rows of norm <= 1 + 2^-4 (kernels/ops/queue_topk.py).
        * Ties: among equal similarities the lower queue index ranks first (torch.max's pick on CPU; torch.topk
          leaves the order of ties unspecified). The top-k candidates are in descending similarity, so a pick
          position means the same entry as in MAE-CT's sorted torch.topk list when there are no ties.
        * Self exclusion: excluded entries are never returned. MAE-CT sets them to similarity -1 instead, so it
          could return one only when every other entry has similarity <= -1.
        * Mixed dtypes (e.g. bf16 z, fp32 queue): both are searched in fp32 (an exact conversion); the replaced
          `z @ queue.T` raises outside autocast.
        * topk=1 draws no random numbers (MAE-CT's topk=1 draws B numbers and ignores them; its topk=0 draws none).
        * Non-finite values, too few admissible entries, fp64: rows that queue_topk cannot rank as the replaced
          code does run the replaced code's own lines (the similarity row, own ids set to -1 as MAE-CT does, max
          or topk), so they return what it returns: a row of z holding a NaN / inf gets the replaced max of its
          all-NaN row (index 0); a queue holding one makes every row run those lines (the first NaN entry wins
          there); a row whose entries are all excluded by id picks among them as MAE-CT does. fp64 inputs run
          those lines in fp64 for every row (queue_topk has no fp64 path; the [B, Q] matrix is then allocated).
        * Errors: ValueError naming the bad shape, dtype or k.
        * Not covered: MAE-CT's NnclrHead(local_scaling_knn > 0) rescales the similarity matrix first; keep its
          own find_nn for that option.
    """
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        raise ValueError(f"nnclr_find_nn: topk={topk!r} must be an int >= 1 (MAE-CT's topk=0 is topk=1 here)")
    dt = search_dtype(z, queue, "nnclr_find_nn")
    if (ids is None) != (queue_ids is None):
        raise ValueError("nnclr_find_nn: pass both queue_ids and ids, or neither")
    if ids is not None and ids.device != z.device:
        ids = ids.to(z.device)
    qids = None if queue_ids is None else queue_ids.to(z.device)
    bank = queue if queue.device == z.device else queue.to(z.device)
    if z.dim() != 2 or bank.dim() != 2 or z.shape[1] != bank.shape[1] or not 1 <= topk <= bank.shape[0]:
        raise ValueError(f"nnclr_find_nn: z must be [B, D] and the queue [Q, D] with Q >= topk={topk}, got "
                         f"{tuple(z.shape)} and {tuple(queue.shape)}")
    with torch.no_grad(), torch.autocast(z.device.type, enabled=False):
        zs, bs = z.detach().to(dt), bank.detach().to(dt)
        redo = replaced_rows(zs, bs, dt)
        if redo is not None and bool(redo.all()):
            cand = None
        else:
            _, cand = queue_topk(zs, bs, topk, exclude_ids=ids, queue_ids=qids)
            short = (cand < 0).any(dim=1)           # fewer than topk admissible entries (all excluded by id)
            redo = short if redo is None else redo | short
        if redo is not None and bool(redo.any()):   # the replaced lines for these rows: their picks, exactly
            rows = redo.nonzero()[:, 0]
            sim = zs[rows] @ bs.T
            if ids is not None:
                sim.masked_fill_(qids[None, :] == ids[rows][:, None], -1.0)      # MAE-CT's value for its own id
            mine = sim.max(dim=1)[1][:, None] if topk == 1 else sim.topk(topk, dim=1)[1]
            if cand is None:
                cand = torch.empty(z.shape[0], topk, dtype=torch.long, device=z.device)
            cand[rows] = mine
    if topk == 1:
        idx = cand[:, 0]
    else:
        dev = generator.device if generator is not None else torch.device("cpu")
        dice = torch.randint(topk, (z.shape[0],), generator=generator, device=dev)
        idx = cand.gather(1, dice.to(cand.device).view(-1, 1))[:, 0]
    idx = idx.to(queue.device)
    return idx, queue[idx]
