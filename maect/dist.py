"""Distributed helpers: init from torchrun's environment, all_gather that keeps gradients."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str = "auto") -> DistInfo:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: NCCL on GPU, gloo on CPU. One process without them."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for, but torch sees no CUDA device")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local_rank}") if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if want_cuda else "gloo"
        store = _restart_safe_store(world)
        if store is None:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)
    return DistInfo(rank, world, local_rank, dev)


def _restart_safe_store(world: int):
    """A per-attempt namespace in torchrun's shared store, or None to let torch build its own.

    Since torch 2.5 the c10d rendezvous lends its agent-hosted TCPStore to the workers
    (TORCHELASTIC_USE_AGENT_STORE=True) and keeps that one store across restarts, but the workers'
    init_process_group writes the same keys in every attempt. A restarted worker can then read a dead
    worker's gloo address or NCCL id from the previous attempt: "connectFullMesh ... Connection refused",
    or a hang (pytorch/pytorch#135712). On one node TORCHELASTIC_RESTART_COUNT is the same for every worker
    of an attempt, so it names a fresh namespace. Across nodes it is not (each agent counts its own
    restarts), so there we only warn: launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, which gives every
    attempt a new store."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) == 0:
        return None
    if int(env.get("GROUP_WORLD_SIZE", "1")) > 1:
        logging.getLogger("maect").warning(
            "torchrun --max-restarts=%s on %s nodes with the shared rendezvous store: a restarted attempt can read "
            "the previous attempt's addresses and hang (pytorch/pytorch#135712); launch torchrun with "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", env["TORCHELASTIC_MAX_RESTARTS"], env["GROUP_WORLD_SIZE"])
        return None
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False,
                          timeout=timedelta(minutes=10))
    return dist.PrefixStore(f"maect/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums every rank's gradient w.r.t. the gathered tensor and keeps this rank's
    slice (the gradient of sum over ranks of each rank's loss, as DDP's averaging expects)."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        r = dist.get_rank()
        return grad[r * n:(r + 1) * n]


def all_gather_grad(x: torch.Tensor) -> torch.Tensor:
    return _GatherWithGrad.apply(x) if is_dist() else x


@torch.no_grad()
def all_gather(x: torch.Tensor) -> torch.Tensor:
    if not is_dist():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if is_dist():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def barrier() -> None:
    if is_dist():
        dist.barrier()


class GlobalBatchNorm1d(torch.nn.BatchNorm1d):
    """BatchNorm1d whose training statistics span the global batch over all ranks, for CPU/gloo runs (torch's
    SyncBatchNorm is CUDA-only). Sums and sums of squares are all-reduced with autograd (torch.distributed.nn), so
    gradients flow through the global statistics exactly as in one process on the global batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_dist()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce as all_reduce_grad
        xf = x.float()
        n = torch.tensor([float(x.shape[0])], device=x.device)
        stats = all_reduce_grad(torch.cat([xf.sum(0), (xf * xf).sum(0), n]))
        C = x.shape[1]
        N = stats[-1]
        mean = stats[:C] / N
        var = (stats[C:2 * C] / N - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_((var * N / (N - 1).clamp_min(1)).to(self.running_var.dtype), m)
                self.num_batches_tracked += 1
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


def sync_batchnorm(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """BatchNorm over the global batch under DDP: torch's SyncBatchNorm on CUDA, GlobalBatchNorm1d on CPU."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is torch.nn.BatchNorm1d:
            new = GlobalBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats)
            if child.affine:  # the same Parameter objects: requires_grad (frozen target projector) carries over
                new.weight, new.bias = child.weight, child.bias
            if child.track_running_stats:
                new.running_mean, new.running_var = child.running_mean, child.running_var
                new.num_batches_tracked = child.num_batches_tracked
            setattr(module, name, new)
        else:
            sync_batchnorm(child, device)
    return module
