"""Nearest-neighbour lookup in a feature queue: top-k cosine similarity with self-id exclusion.

Math
    s[b, j] = <q_b, e_j>                      (q, e L2-normalised; normalised on the fly if normalized=False)
    s[b, j] = -inf   where queue_ids[j] == exclude_ids[b]
    values[b], indices[b] = the k largest s[b, :], in descending order

Shapes and dtypes
    query   [B, D]  fp32 / bf16 / fp16
    queue   [Q, D]  same dtype as query
    exclude_ids [B] int (optional), queue_ids [Q] int (optional; both or neither)
    returns values [B, k] fp32, indices [B, k] int64

Rules every backend follows (the reference below is the specification)
    * Similarities accumulate in fp32; inputs are not upcast first in the kernels (bf16 x bf16 products are exact
      in fp32, so only the summation order differs from the reference).
    * Ties: among equal similarities the lower queue index ranks first.
    * Excluded entries never come back. A row with fewer than k admissible entries is padded at the end with
      value -inf and index -1 (so an all-excluded row is all -1).
    * k must satisfy 1 <= k <= Q; otherwise ValueError. B == 0 returns empty [0, k] tensors.
    * normalized=False L2-normalises query and queue rows (eps 1e-12) inside the op; the inputs are not modified.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def check_inputs(query: Tensor, queue: Tensor, k: int, exclude_ids: Tensor | None, queue_ids: Tensor | None) -> None:
    """Validate arguments shared by every backend; raises ValueError naming the bad value."""
    if query.dim() != 2 or queue.dim() != 2:
        raise ValueError(f"queue_topk: query must be [B, D] and queue [Q, D], got {tuple(query.shape)} and {tuple(queue.shape)}")
    if query.shape[1] != queue.shape[1]:
        raise ValueError(f"queue_topk: feature dims differ: query D={query.shape[1]}, queue D={queue.shape[1]}")
    if query.dtype not in (torch.float32, torch.bfloat16, torch.float16) or queue.dtype != query.dtype:
        raise ValueError(f"queue_topk: query and queue must share a float dtype (fp32/bf16/fp16), got {query.dtype} and {queue.dtype}")
    if query.device != queue.device:
        raise ValueError(f"queue_topk: query on {query.device}, queue on {queue.device}")
    if not isinstance(k, int) or k < 1 or k > queue.shape[0]:
        raise ValueError(f"queue_topk: k={k} must satisfy 1 <= k <= queue size Q={queue.shape[0]}")
    if (exclude_ids is None) != (queue_ids is None):
        raise ValueError("queue_topk: pass both exclude_ids and queue_ids, or neither")
    if exclude_ids is not None:
        if exclude_ids.shape != (query.shape[0],) or queue_ids.shape != (queue.shape[0],):
            raise ValueError(f"queue_topk: exclude_ids must be [B={query.shape[0]}] and queue_ids [Q={queue.shape[0]}], "
                             f"got {tuple(exclude_ids.shape)} and {tuple(queue_ids.shape)}")
        if exclude_ids.dtype.is_floating_point or queue_ids.dtype.is_floating_point:
            raise ValueError(f"queue_topk: ids must be integer tensors, got {exclude_ids.dtype} and {queue_ids.dtype}")


def similarity_ref(query: Tensor, queue: Tensor, exclude_ids: Tensor | None, queue_ids: Tensor | None,
                   normalized: bool = True) -> Tensor:
    """The full [B, Q] fp32 similarity matrix with excluded entries set to -inf (reference helper)."""
    q, e = query.float(), queue.float()
    if not normalized:
        q, e = F.normalize(q, dim=1, eps=1e-12), F.normalize(e, dim=1, eps=1e-12)
    sim = q @ e.t()
    if exclude_ids is not None:
        sim = sim.masked_fill(exclude_ids.view(-1, 1).long() == queue_ids.view(1, -1).long(), float("-inf"))
    return sim


def select_topk_ref(sim: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row of sim [B, Q] with the tie rule (lower index first) and -inf/-1 padding."""
    B, Q = sim.shape
    if B == 0:
        return sim.new_empty(0, k), torch.empty(0, k, dtype=torch.long, device=sim.device)
    thr = sim.topk(k, dim=1).values[:, -1:]                       # k-th largest value per row
    above = sim > thr
    at = sim == thr
    room = k - above.sum(1, keepdim=True)                          # slots left for entries equal to the threshold
    keep = above | (at & (at.cumsum(1) <= room))                   # exactly k per row; ties -> lowest indices
    idx = keep.nonzero()[:, 1].view(B, k)                          # ascending index order
    val = sim.gather(1, idx)
    val, order = val.sort(dim=1, descending=True, stable=True)    # stable: equal values keep ascending index
    idx = idx.gather(1, order)
    idx = idx.masked_fill(val == float("-inf"), -1)
    return val, idx


def queue_topk_ref(query: Tensor, queue: Tensor, k: int, exclude_ids: Tensor | None = None,
                   queue_ids: Tensor | None = None, normalized: bool = True) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch reference: materialises the [B, Q] fp32 similarity matrix. See the module docstring."""
    check_inputs(query, queue, k, exclude_ids, queue_ids)
    return select_topk_ref(similarity_ref(query, queue, exclude_ids, queue_ids, normalized), k)
