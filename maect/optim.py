"""Parameter groups (weight-decay exclusions, layer-wise lr decay), optimizer construction, lr schedule."""
from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn

log = logging.getLogger("maect")


def no_decay(name: str, p: torch.Tensor) -> bool:
    """SPEC: no weight decay on biases and 1-D parameters (norms)."""
    return p.ndim <= 1 or name.endswith(".bias")


def param_groups(named_params, weight_decay: float, lr_scale_fn=None, tag: str = "") -> list[dict]:
    """Split trainable parameters into groups by (lr scale, decay or not). lr_scale_fn(name) -> float."""
    groups: dict = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        scale = lr_scale_fn(name) if lr_scale_fn else 1.0
        wd = 0.0 if no_decay(name, p) else weight_decay
        key = (scale, wd)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "lr_scale": scale, "weight_decay": wd, "tag": tag}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())


def llrd_scale(name: str, depth: int, decay: float) -> float:
    """Layer-wise lr decay (SPEC): block j of L gets decay^(L - j); the stem (patch embed, cls, pos embed)
    decay^(L + 1); the final norm (and anything after the blocks) 1.0."""
    if name.startswith("blocks."):
        j = int(name.split(".")[1])
        return decay ** (depth - j)
    if name.startswith(("patch_embed", "cls_token", "pos_embed")):
        return decay ** (depth + 1)
    return 1.0


def build_optimizer(groups: list[dict], lr: float, betas=(0.9, 0.95), fused: str = "auto", device=None):
    """AdamW. fused: 'apex' (FusedAdam if installed, CUDA), 'torch' (torch's fused AdamW), 'auto' (apex on CUDA when
    installed, else torch's fused), 'off' (foreach on CUDA, single-tensor on CPU).
    Returns (optimizer, backend name for the log)."""
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    on_cuda = device is not None and torch.device(device).type == "cuda"
    if fused in ("apex", "auto") and on_cuda:
        try:
            from apex.optimizers import FusedAdam  # NVIDIA apex, optional
            return FusedAdam(groups, lr=lr, betas=betas, adam_w_mode=True), "apex.FusedAdam"
        except ImportError:
            if fused == "apex":
                raise RuntimeError("fused_optimizer=apex but NVIDIA apex is not installed") from None
    if fused in ("torch", "auto"):   # torch's fused AdamW runs on CUDA and (torch >= 2.4) on the CPU
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True), "torch.AdamW(fused)"
    return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=on_cuda), "torch.AdamW"


def can_skip_on_device(opt: torch.optim.Optimizer) -> bool:
    """torch's fused Adam/AdamW honour opt.found_inf (a device tensor; 1 = leave parameters, moments and the step
    count unchanged), the hook GradScaler uses: a non-finite step can be skipped without a host sync."""
    return isinstance(opt, torch.optim.Adam) and bool(opt.defaults.get("fused"))


def warmup_steps(steps: float) -> int:
    """The warmup length in optimizer steps, floored as the published code does (its Checkpoint.scale(floor=True)
    for a share of training, whole epochs x updates per epoch for stage 1): steps = warmup_frac x total, or
    warmup_epochs x steps per epoch. int [0, ...); ValueError for a negative or non-finite value."""
    if not (math.isfinite(steps) and steps >= 0):
        raise ValueError(f"warmup of {steps} steps: must be a finite number >= 0")
    return int(steps)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """The published MAE-CT schedule factor at optimizer step `step` (0-based) of `total`, warmup W = `warmup`
    steps (warmup_steps): linear warmup (step + 1) / (W + 1) for step < W (the first step trains at 1 / (W + 1),
    never at 0; the published LinearIncreasing with exclude_first and exclude_last), then a half cosine
    (1 + cos(pi (step - W) / (total - W))) / 2 from 1 at step W towards 0 (CosineDecreasing with exclude_last:
    the last step's factor is small but not 0). Used by stages 1-3."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if total <= warmup:
        return 1.0
    t = (step - warmup) / (total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def set_lr(opt: torch.optim.Optimizer, base_lr: dict | float, factor: float) -> None:
    """base_lr: one float, or {tag: lr} for groups tagged by build site (encoder/head)."""
    for g in opt.param_groups:
        b = base_lr[g.get("tag", "")] if isinstance(base_lr, dict) else base_lr
        g["lr"] = b * g["lr_scale"] * factor


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)
