"""NNCLR projector, predictor and the FIFO feature queue (SPEC "The NNCLR head and loss")."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from maect import kernels
from maect.device import h2d


def lerp_weighted(targets: list[Tensor], sources: list[Tensor], weight: float, taken: Tensor | None = None) -> None:
    """targets += weight * (sources - targets) in one foreach launch; with taken (a device bool) the weight is
    weight * taken, a device tensor, so a skipped step leaves the targets bitwise unchanged with no host sync
    (a 0-dim tensor passed as the Scalar weight would be read back with .item(): a sync)."""
    if not targets:
        return
    if taken is None:
        torch._foreach_lerp_(targets, sources, weight)
    else:
        w = taken.to(targets[0].dtype) * weight
        torch._foreach_lerp_(targets, sources, [w] * len(targets))


def projector(d: int, hidden: int = 2048, out: int = 256) -> nn.Sequential:
    """Linear(d->h, no bias)-BN-ReLU-Linear(h->h, no bias)-BN-ReLU-Linear(h->out, no bias)-BN(out)."""
    return nn.Sequential(nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out, bias=False), nn.BatchNorm1d(out))


def predictor(d: int = 256, hidden: int = 4096) -> nn.Sequential:
    """Linear(d->h, no bias)-BN-ReLU-Linear(h->d, no bias): the published MAE-CT predictor (its comment: "here should
    be a bias but it also works well without")."""
    return nn.Sequential(nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, d, bias=False))


class NNCLRHead(nn.Module):
    """Online projector + predictor, and (stage 3) an EMA target projector used for queue lookups/enqueues.
    Each view goes through separately so BatchNorm statistics are per view. Every Linear keeps PyTorch's default
    initialisation (kaiming-uniform with a=sqrt(5), i.e. U(+-1/sqrt(fan_in))), as the published head does: no
    xavier here (xavier-uniform would start the predictor's last layer ~2.3x larger for 4096 -> 256)."""

    def __init__(self, in_dim: int, proj_hidden: int = 2048, proj_dim: int = 256, pred_hidden: int = 4096):
        super().__init__()
        self.projector = projector(in_dim, proj_hidden, proj_dim)
        self.predictor = predictor(proj_dim, pred_hidden)
        self.target_projector: nn.Module | None = None

    def add_target(self) -> None:
        """Create the EMA target projector as a copy of the (stage-2 trained) projector."""
        self.target_projector = copy.deepcopy(self.projector)
        for p in self.target_projector.parameters():
            p.requires_grad_(False)

    def forward(self, f: Tensor) -> tuple[Tensor, Tensor]:
        """f [B, d] -> (p [B, proj_dim] prediction, z_t [B, proj_dim] target projection, no grad).
        Without a target projector (stage 2), z_t is the online projection, detached."""
        z = self.projector(f)
        p = self.predictor(z)
        if self.target_projector is None:
            return p, z.detach()
        with torch.no_grad():
            return p, self.target_projector(f)

    @torch.no_grad()
    def update_target(self, momentum: float, taken: Tensor | None = None) -> None:
        """target = m * target + (1 - m) * online for the parameters; the BatchNorm buffers (running statistics,
        batch counter) are copied from the online projector, as the published code does (update_ema copies buffers).
        taken: a device bool; where False (a skipped step) the target stays bitwise as it was, decided on the
        device without a host sync."""
        lerp_weighted(list(self.target_projector.parameters()), [p.detach() for p in self.projector.parameters()],
                      1.0 - momentum, taken)
        for t, o in zip(self.target_projector.buffers(), self.projector.buffers()):
            t.copy_(o if taken is None else torch.where(taken, o, t))


QUEUE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def queue_dtype(name: str, device: torch.device) -> torch.dtype:
    """nnclr.queue_dtype: 'auto' = bf16 on CUDA (what the official path's q @ queueᵀ sees under autocast, half the
    bytes each lookup reads; maect's lookup still accumulates and re-scores in fp32), fp32 on CPU (the compiled CPU op
    reads fp32 rows in place; bf16 would be converted block by block)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in QUEUE_DTYPES:
        raise ValueError(f"nnclr.queue_dtype={name!r}: choose auto, fp32 or bf16")
    return QUEUE_DTYPES[name]


class FeatureQueue(nn.Module):
    """FIFO queue of L2-normalised target projections [Q, D] (fp32 or bf16) with each entry's sample id and label.
    State lives in buffers, so it is in every state_dict/checkpoint (a checkpoint of either dtype loads into either).
    Starts as random unit vectors, ids -1."""

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_buffer("features", F.normalize(torch.randn(size, dim, generator=generator), dim=1).to(dtype))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.features.shape[0]

    @torch.no_grad()
    def lookup(self, z: Tensor, ids: Tensor, k: int, generator: torch.Generator | None = None):
        """Nearest neighbour of each normalised query z [N, D] among entries with a different sample id:
        top-1 when k == 1, else one of the top-k picked uniformly at random. Returns (nn [N, D] in the queue's dtype,
        index [N] int64). Both views of a step go through one call (N = 2B rows: the queue is read once).
        No host sync: the pick is drawn on the CPU and copied asynchronously. An admissible neighbour always exists
        for a finite query when queue size - (entries one sample can hold) >= k (check_admissible verifies it up
        front). A query with no admissible neighbour (a NaN/inf row: kernels.queue_topk returns index -1) gets index
        -1 and a NaN neighbour, so the loss is non-finite and the step is skipped by the training loop's guard;
        index -1 never selects the last queue row."""
        values, idx = kernels.queue_topk(z.to(self.features.dtype), self.features, k, exclude_ids=ids, queue_ids=self.ids)
        if k > 1:
            idx = idx.gather(1, h2d(torch.randint(0, k, (z.shape[0], 1), generator=generator), idx.device))
        idx = idx[:, 0]
        nn = self.features[idx.clamp(min=0)]
        return nn.masked_fill((idx < 0)[:, None], float("nan")), idx

    def check_admissible(self, k: int, dataset_size: int) -> None:
        """Each sample id occupies at most ceil(Q / N) entries (FIFO of whole epochs' worth), so Q - ceil(Q/N) >= k
        guarantees k admissible neighbours for every query."""
        per_id = -(-self.size // dataset_size)
        if self.size - per_id < k:
            raise ValueError(f"queue of {self.size} entries over a data set of {dataset_size} samples cannot always "
                             f"offer top-k={k} neighbours that are not the query itself; enlarge nnclr.queue_size")

    @torch.no_grad()
    def enqueue(self, z: Tensor, ids: Tensor, labels: Tensor, taken: Tensor | None = None) -> None:
        """Write a global batch (identical on every rank) at the pointer; advance it modulo the queue size.
        The pointer stays on the device (no host sync). taken: a device bool; where False (a skipped step) the
        queue, ids, labels and pointer stay bitwise as they were."""
        n = z.shape[0]
        if self.size % n:
            raise ValueError(f"queue size {self.size} is not divisible by the global batch {n}")
        if ids.shape[0] != n or labels.shape[0] != n:
            raise ValueError(f"enqueue: {n} features but {ids.shape[0]} ids and {labels.shape[0]} labels")
        # size % n == 0 and the pointer moves by n: the n slots never wrap
        pos = self.ptr + torch.arange(n, device=self.features.device)
        z, ids, labels = z.to(self.features.dtype), ids.to(self.ids.dtype), labels.to(self.labels.dtype)
        if taken is not None:
            z = torch.where(taken, z, self.features[pos])
            ids = torch.where(taken, ids, self.ids[pos])
            labels = torch.where(taken, labels, self.labels[pos])
        self.features.index_copy_(0, pos, z)
        self.ids.index_copy_(0, pos, ids)
        self.labels.index_copy_(0, pos, labels)
        step = n if taken is None else taken.long() * n
        self.ptr.copy_((self.ptr + step) % self.size)
