"""One epoch of each stage and the steps it runs (FAIR MAE's engine_pretrain.py; maect.train sets a stage up).

    mae_one_epoch / nnclr_one_epoch     the loops, read top to bottom; every host read goes through the Tracker
    mae_noise, mae_step                 stage 1: the masking noise of one micro-batch, forward + backward
    nnclr_step, nnclr_update            stages 2/3: forward, both views' queue lookup, loss, backward; after the
                                        optimizer: enqueue, target-projector and encoder EMAs, nn-acc sums
    optimizer_step                      the optimizer step behind the non-finite guard (no host sync on the device)
bench/train_step.py times these functions as they are: its maect rows are this code.

No step reads a device value on the host: the non-finite flag `bad` is a device bool that gates the optimizer
(found_inf), the queue write, the EMAs and the BatchNorm running statistics; maect.steplog.Tracker reads it back.
"""
from __future__ import annotations

import contextlib
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from maect.dataloading.augment import h2d
from maect.heads import lerp_weighted
from maect.losses import nnclr_loss
from maect.models.vit import pool
from maect.optim import lr_factor, set_lr
from maect.steplog import Tracker


# ------------------------------------------------------------------------------------------------ shared pieces
def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether a run autocasts to bf16: precision=bf16, or auto on CUDA."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(precision: str, device: torch.device):
    """bf16 autocast for precision=bf16, or auto on CUDA (uses_bf16); else a no-op context."""
    bf16 = uses_bf16(precision, device)
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    """A CPU generator for per-step randomness (mask noise, NN pick) that does not depend on the rank count."""
    return torch.Generator().manual_seed((seed * 1000003 + zlib.crc32(stage.encode())) * 1000003 + step)


def mark_step(compile_mode: str | None) -> None:
    """torch.compile mode reduce-overhead (CUDA graph trees): say where an iteration starts, so that no graph
    output of the last step is read after being overwritten by a replay. A no-op in every other mode."""
    if compile_mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()


def optimizer_step(opt, params: list, on_device: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The optimizer step behind the non-finite guard: (gradient norm, bad: a device bool, whether opt.step ran).
    on_device (torch's fused AdamW, optim.can_skip_on_device): bad becomes the optimizer's found_inf and its kernel
    leaves parameters and moments as they were (GradScaler's hook), with no host sync. Otherwise bad is read on the
    host (one sync) and opt.step is not called when it is set. Gradients are zeroed either way."""
    gnorm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    bad = ~torch.isfinite(gnorm)    # under DDP the gradient is all-reduced: every rank computes the same flag
    if on_device:
        opt.found_inf = bad.float()
    ran = on_device or not bool(bad)
    if ran:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return gnorm, bad, ran


def running_stats(module: nn.Module) -> list[torch.Tensor]:
    """The BatchNorm running mean / var / batch counters a forward pass updates (restored on a skipped step)."""
    return [t for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for t in (m.running_mean, m.running_var, m.num_batches_tracked) if t is not None]


def bn_snapshot(bn: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of the running statistics before a step (a skipped step puts them back: bn_restore)."""
    return [x.clone() for x in bn]


def bn_restore(bn: list[torch.Tensor], saved: list[torch.Tensor], bad: torch.Tensor) -> None:
    """Where bad (device bool) is set, the running statistics as they were before the step; no host sync."""
    for x, x0 in zip(bn, saved):
        x.copy_(torch.where(bad, x0, x))


def ema_pairs(ema: nn.Module, model: nn.Module) -> tuple[list, list]:
    """The (EMA, online) parameter lists of the trained parameters, built once."""
    pairs = [(e, p) for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad]
    return [e for e, _ in pairs], [p for _, p in pairs]


@torch.no_grad()
def ema_update(pairs: tuple[list, list], m: float, taken: torch.Tensor | None = None) -> None:
    """EMA of the trained parameters in one foreach launch; taken (device bool) False leaves it unchanged."""
    lerp_weighted(pairs[0], pairs[1], 1.0 - m, taken)


# ------------------------------------------------------------------------------------------------ stage 1
def mae_noise(gen: torch.Generator, micro: int, world: int, rank: int, L: int, views: int, device) -> torch.Tensor:
    """[views x micro, L] uniform masking noise: this rank's rows of the global micro-batch's noise, per view, drawn
    on the CPU from gen (the same noise whatever the rank count), copied to the device without a sync."""
    sel = slice(rank * micro, (rank + 1) * micro)
    return h2d(torch.cat([torch.rand(micro * world, L, generator=gen)[sel] for _ in range(views)]), device)


def mae_step(ddp: nn.Module, views: list, noise: torch.Tensor, *, mask_ratio: float, norm_pix: bool, accum: int,
             sync: bool, amp) -> torch.Tensor:
    """Forward + backward of one micro-batch: loss / accum backpropagated (the window's mean gradient); sync False
    inside an accumulation window (DDP's no_sync: the all-reduce runs with the window's last micro-batch).
    views: [B, C, H, W] tensors; amp: the autocast context. Returns the detached loss (not divided)."""
    x = torch.cat(views)
    no_sync = ddp.no_sync() if not sync and hasattr(ddp, "no_sync") else contextlib.nullcontext()
    with no_sync, amp:
        loss, _, _ = ddp(x, mask_ratio, norm_pix, noise)
    (loss / accum).backward()
    return loss.detach()


def mae_one_epoch(ddp: nn.Module, opt, loader, t: Tracker, *, lr: float, cfg, L: int) -> bool:
    """Stage 1 from micro-batch t.in_epoch of epoch t.epoch. Gradient accumulation (mae.accum_steps = a): each
    optimizer step averages exactly a micro-batches; the epoch's last len(loader) mod a micro-batches cannot fill
    a window and are dropped before any forward or backward (as drop_last drops a partial batch). Returns True
    when the epoch ran to its end, False when the loop stops inside it (the last step, or a stop request)."""
    s, di, a = cfg.mae, t.di, cfg.mae.accum_steps
    usable = len(loader) // a * a
    micro_n = s.batch_size // (di.world * a)
    amp = autocast(cfg.precision, di.device)
    for b in loader:
        micro = t.in_epoch % a
        t.in_epoch += 1
        if t.in_epoch > usable:
            continue                                      # a partial window at the epoch end: dropped
        mark_step(cfg.model.compile_mode if cfg.model.compile else None)
        gen = step_generator(cfg.seed, "mae", t.step * a + micro)
        noise = mae_noise(gen, micro_n, di.world, di.rank, L, len(b["views"]), di.device)
        loss = mae_step(ddp, b["views"], noise, mask_ratio=s.mask_ratio, norm_pix=s.norm_pix_loss, accum=a,
                        sync=micro == a - 1, amp=amp)
        if micro < a - 1:
            continue
        set_lr(opt, lr, lr_factor(t.step, t.total, t.warm))
        gnorm, bad, ran = optimizer_step(opt, t.params, t.on_device)
        if t.end_step(bad, ran, loss, gnorm):
            return False
    return True


# ------------------------------------------------------------------------------------------------ stages 2, 3
class NNCLRNet(nn.Module):
    """encoder (upper blocks from grad_from) + head; one forward for both views so DDP sees one graph."""

    def __init__(self, encoder, head, grad_from: int, pool_mode: str, encoder_frozen: bool):
        super().__init__()
        self.encoder, self.head, self.grad_from, self.pool_mode = encoder, head, grad_from, pool_mode
        self.encoder_frozen = encoder_frozen

    def forward(self, x0, x1):
        """x0, x1: [B, C, H, W] the two views -> p0, p1 (predictor outputs), z0, z1 (projector outputs), [B, d]."""
        n = x0.shape[0]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoder_frozen):
            f = pool(self.encoder.forward_features(torch.cat([x0, x1]), grad_from_block=self.grad_from), self.pool_mode)
        f0, f1 = f[:n].float(), f[n:].float()
        p0, z0 = self.head(f0)      # separate calls: BatchNorm statistics per view
        p1, z1 = self.head(f1)
        return p0, p1, z0, z1


def nnclr_step(ddp: nn.Module, queue, x0, x1, idx, label, gen, *, topk: int, tau: float, amp, labelled: bool,
               loss_autocast: bool = False):
    """Forward of both views, one queue lookup for both (the queue is read once; the same picks as two calls: one
    CPU stream of gen), NNCLR loss (maect.losses.nnclr_loss), backward. idx, label: [B] sample ids / labels.
    Returns (detached loss, z0 [B, d] fp32 normalised: what the queue stores, nn_acc: a device scalar, the share of
    view 0's picked neighbours with the query's label, the published metric; None when not labelled).
    loss_autocast (nnclr.loss_autocast): the logits under amp too (bf16 where amp is; the published code), else fp32."""
    with amp:
        p0, p1, z0, z1 = ddp(x0, x1)
    z0, z1 = F.normalize(z0.float(), dim=1), F.normalize(z1.float(), dim=1)
    n = z0.shape[0]
    nn_, i = queue.lookup(torch.cat([z0, z1]), torch.cat([idx, idx]), topk, generator=gen)
    nn0, nn1, i0 = nn_[:n], nn_[n:], i[:n]
    # index -1: no admissible neighbour, never a match
    nn_acc = ((queue.labels[i0.clamp(min=0)] == label) & (i0 >= 0)).float().mean() if labelled else None
    loss = nnclr_loss(nn0.float(), nn1.float(), p0, p1, tau, amp=amp if loss_autocast else None)
    loss.backward()
    return loss.detach(), z0, nn_acc


def nnclr_update(queue, z0, idx, label, taken: torch.Tensor, *, gather, head=None, target_ema: float = 0.0,
                 ema_params=None, encoder_ema: float = 0.0, nn_acc=None, nn_sum: torch.Tensor | None = None) -> None:
    """After the optimizer step, every write gated by taken (device bool; False: a skipped step leaves all as it
    was): nn_sum += (nn_acc, 1); enqueue the global batch's z0 (gather: dist.all_gather, or the identity);
    stage 3: the target projector's EMA (head, target_ema) and the encoder's (ema_params, encoder_ema)."""
    if nn_acc is not None and nn_sum is not None:
        nn_sum.add_(torch.where(taken, torch.stack([nn_acc, torch.ones_like(nn_acc)]), 0.0))
    queue.enqueue(gather(z0), gather(idx), gather(label), taken)
    if head is not None:
        head.update_target(target_ema, taken)
        ema_update(ema_params, encoder_ema, taken)


def nnclr_one_epoch(ddp, head, queue, opt, loader, t: Tracker, *, lrs: dict, s, cfg, bn: list, nn_sum,
                    ema_params=None, gather=lambda x: x) -> bool:
    """Stage 2 (s = cfg.head) or 3 (s = cfg.ct; ema_params set) from micro-batch t.in_epoch of epoch t.epoch.
    bn: the head's BatchNorm running statistics (a skipped step puts them back). Returns as mae_one_epoch."""
    di, ct = t.di, ema_params is not None
    amp = autocast(cfg.precision, di.device)
    for b in loader:
        t.in_epoch += 1
        saved = bn_snapshot(bn)
        mark_step(cfg.model.compile_mode if cfg.model.compile else None)
        gen = step_generator(cfg.seed, t.stage, t.step)
        loss, z0, nn_acc = nnclr_step(ddp, queue, *b["views"], b["idx"], b["label"], gen, topk=s.topk, tau=s.tau,
                                      amp=amp, labelled=t.nn_acc,
                                      loss_autocast=cfg.nnclr.loss_autocast)
        set_lr(opt, lrs, lr_factor(t.step, t.total, t.warm))
        gnorm, bad, ran = optimizer_step(opt, t.params, t.on_device)
        nnclr_update(queue, z0, b["idx"], b["label"], ~bad, gather=gather, head=head if ct else None,
                     target_ema=cfg.ct.target_ema, ema_params=ema_params, encoder_ema=cfg.ct.encoder_ema,
                     nn_acc=nn_acc, nn_sum=nn_sum)
        bn_restore(bn, saved, bad)
        if t.end_step(bad, ran, loss, gnorm, nn_acc):
            return False
    return True
