"""NNCLR projector, predictor and the FIFO feature queue (SPEC "The NNCLR head and loss")."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import kernels


def projector(d: int, hidden: int = 2048, out: int = 256) -> nn.Sequential:
    """Linear(d->h, no bias)-BN-ReLU-Linear(h->h, no bias)-BN-ReLU-Linear(h->out, no bias)-BN(out)."""
    return nn.Sequential(nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out, bias=False), nn.BatchNorm1d(out))


def predictor(d: int = 256, hidden: int = 4096) -> nn.Sequential:
    """Linear(d->h, no bias)-BN-ReLU-Linear(h->d)."""
    return nn.Sequential(nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, d))


class NNCLRHead(nn.Module):
    """Online projector + predictor, and (stage 3) an EMA target projector used for queue lookups/enqueues.
    Each view goes through separately so BatchNorm statistics are per view."""

    def __init__(self, in_dim: int, proj_hidden: int = 2048, proj_dim: int = 256, pred_hidden: int = 4096):
        super().__init__()
        self.projector = projector(in_dim, proj_hidden, proj_dim)
        self.predictor = predictor(proj_dim, pred_hidden)
        self.target_projector: nn.Module | None = None
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

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
    def update_target(self, momentum: float) -> None:
        """target = m * target + (1 - m) * online for parameters; BatchNorm running stats copied likewise (EMA)."""
        for t, o in zip(self.target_projector.parameters(), self.projector.parameters()):
            t.lerp_(o.detach(), 1.0 - momentum)
        for t, o in zip(self.target_projector.buffers(), self.projector.buffers()):
            if t.dtype.is_floating_point:
                t.lerp_(o, 1.0 - momentum)
            else:
                t.copy_(o)


class FeatureQueue(nn.Module):
    """FIFO queue of L2-normalised target projections [Q, D] with each entry's sample id and label.
    State lives in buffers, so it is in every state_dict/checkpoint. Starts as random unit vectors, ids -1."""

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None):
        super().__init__()
        self.register_buffer("features", F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self._host_ptr = 0

    @property
    def size(self) -> int:
        return self.features.shape[0]

    @torch.no_grad()
    def lookup(self, z: Tensor, ids: Tensor, k: int, generator: torch.Generator | None = None):
        """Nearest neighbour of each normalised query z [B, D] among entries with a different sample id:
        top-1 when k == 1, else one of the top-k picked uniformly at random. Returns (nn [B, D], index [B]).
        No host sync: the pick is drawn on the CPU and copied asynchronously. An admissible neighbour always
        exists when queue size - (entries one sample can hold) >= k, which check_admissible verifies up front."""
        values, idx = kernels.queue_topk(z.to(self.features.dtype), self.features, k, exclude_ids=ids, queue_ids=self.ids)
        if k > 1:
            pick = torch.randint(0, k, (z.shape[0], 1), generator=generator)
            if idx.is_cuda:
                pick = pick.pin_memory()
            idx = idx.gather(1, pick.to(idx.device, non_blocking=True))
        idx = idx[:, 0]
        return self.features[idx], idx

    def check_admissible(self, k: int, dataset_size: int) -> None:
        """Each sample id occupies at most ceil(Q / N) entries (FIFO of whole epochs' worth), so Q - ceil(Q/N) >= k
        guarantees k admissible neighbours for every query."""
        per_id = -(-self.size // dataset_size)
        if self.size - per_id < k:
            raise ValueError(f"queue of {self.size} entries over a data set of {dataset_size} samples cannot always "
                             f"offer top-k={k} neighbours that are not the query itself; enlarge nnclr.queue_size")

    @torch.no_grad()
    def enqueue(self, z: Tensor, ids: Tensor, labels: Tensor) -> None:
        """Write a global batch (identical on every rank) at the pointer; advance it modulo the queue size."""
        n = z.shape[0]
        if self.size % n:
            raise ValueError(f"queue size {self.size} is not divisible by the global batch {n}")
        p = self._host_ptr  # a host mirror of the ptr buffer: no device sync per step
        self.features[p:p + n] = z.to(self.features.dtype)
        self.ids[p:p + n] = ids
        self.labels[p:p + n] = labels
        self._host_ptr = (p + n) % self.size
        self.ptr.fill_(self._host_ptr)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._host_ptr = int(self.ptr)
