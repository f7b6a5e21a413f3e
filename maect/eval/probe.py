"""Linear probe on frozen (cached) features: a sweep of learning rates trained in parallel in one pass.

Head (official MAE linear probe): BatchNorm1d(D, affine=False, eps=1e-6) -> Linear(D, C), weight trunc-normal
std 0.01, zero bias. SGD momentum 0.9, wd 0, batch 1024, 50 epochs, lr warmup for floor(10%) of the steps then
cosine to 0, per step, in the published probe's form (lr_at). lr = base_lr * batch / 256 for base_lr in LRS.

Why one pass is exact: the BN has no parameters and sees the same batches for every lr, so its output (and
running statistics) is identical for all heads and is computed once. The heads are one tensor W [n_lr, D, C];
the loss is the SUM over heads of each head's mean cross-entropy, so head l's gradient is exactly the gradient
it would get trained alone, and the SGD update is applied per head with its own lr (a [n_lr] lr vector).

Augmentation (augment=..., maect.eval --probe-aug): the published probe trains on RandomResizedCrop(S, scale
PROBE_CROP_SCALE, bicubic) + horizontal flip of the training images, so the frozen encoder runs on fresh crops every
epoch; by default the heads train on the cached centre-crop features (50x cheaper). The one-pass identity holds
either way: every head sees the same batches.

Model selection: the lr is picked on a validation split held out from the training features (val_frac, seeded);
the test accuracy reported is that head's (trained on the remaining 1 - val_frac). Test labels never influence
the choice.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from maect.optim import warmup_steps
from maect.progress import Progress
from maect.eval.features import check_finite, check_labels

LRS = (0.1, 0.05, 0.03, 0.02, 0.01)   # base lrs; the actual lr is base * batch / 256
PROBE_CROP_SCALE = (0.08, 1.0)        # the published probe's kd_random_resized_crop (yamls/probe.yaml)


def holdout_split(n: int, val_frac: float = 0.1, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Seeded random split of range(n) into (train_idx, val_idx), val = round(val_frac * n) (at least 1)."""
    if not 0 < val_frac < 1:
        raise ValueError(f"linear probe: val_frac={val_frac} must be in (0, 1): the lr is selected on it")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(val_frac * n)))
    if n - n_val < 2:
        raise ValueError(f"linear probe: {n} training features are too few for a {val_frac:.0%} validation split")
    return perm[n_val:], perm[:n_val]


def lr_at(step: int, total: int, warmup: int) -> float:
    """Schedule factor in [0, 1] at optimizer step `step` (0-based) of `total`, warmup W = `warmup` steps: the
    published probe's (yamls/probe.yaml: the legacy Linear then CosineAnnealing schedules, no exclude flags):
    step / (W - 1) for step < W (0 at the first step, 1 at step W - 1), then (1 + cos(pi (step - W) /
    (total - W - 1))) / 2 from 1 at step W to 0 at the last step. The training stages' warmup
    (maect.optim.lr_factor) has another published form: (step + 1) / (W + 1)."""
    if step < warmup:
        return step / max(1, warmup - 1)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup - 1)))


def train_heads(f: Tensor, y: Tensor, num_classes: int, lrs: Tensor, epochs: int = 50, batch_size: int = 1024,
                momentum: float = 0.9, warmup_frac: float = 0.1, seed: int = 0, progress: str = "",
                epoch_data=None):
    """Train n_lr heads on f [N, D] float32 / y [N] int64 with per-head lrs [n_lr] (already scaled).
    epoch_data: None, or a callable epoch -> (f_e [N, D], y_e [N]) giving each epoch's training features instead
    of f / y (augmented images; N the same every epoch, else ValueError). progress: a name for progress lines
    (epochs done, ETA). Returns (bn in eval mode, W [n_lr, D, C], b [n_lr, C])."""
    first = epoch_data(0) if epoch_data is not None else None
    if first is not None:
        f, y = first
    N, D = f.shape
    L, dev = lrs.numel(), f.device
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm1d(D, affine=False, eps=1e-6).to(dev)
    w0 = nn.init.trunc_normal_(torch.empty(D, num_classes), std=0.01, generator=g)  # same init for every lr
    W = w0.to(dev).unsqueeze(0).repeat(L, 1, 1).requires_grad_(True)                 # [L, D, C]
    b = torch.zeros(L, num_classes, device=dev, requires_grad=True)                   # [L, C]
    bufs = [torch.zeros_like(W), torch.zeros_like(b)]
    lrs = lrs.to(dev, torch.float32)
    # batches of a size-1 remainder are skipped: BatchNorm cannot normalise a single sample
    steps_per_epoch = N // batch_size + (N % batch_size > 1)
    total = epochs * steps_per_epoch
    warmup = warmup_steps(warmup_frac * total)                          # published: floor(0.1 total)
    step = 0
    bn.train()
    prog = Progress(progress, epochs, unit="epochs")
    for epoch in range(epochs):
        if epoch_data is not None:
            f, y = (first if epoch == 0 else epoch_data(epoch))
            f, y = f.to(dev, torch.float32), y.to(dev, torch.long)
            if f.shape != (N, D):
                raise ValueError(f"linear probe: epoch {epoch} gave features {tuple(f.shape)}, epoch 0 {(N, D)}")
        perm = torch.randperm(N, generator=g).to(dev)
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size:(s + 1) * batch_size]
            x = bn(f[idx])                                                   # [n, D], identical for all heads
            logits = torch.einsum("nd,ldc->lnc", x, W) + b[:, None, :]       # [L, n, C]
            # sum over heads of each head's mean CE: head l's gradient is its own
            loss = F.cross_entropy(logits.reshape(-1, num_classes), y[idx].repeat(L)) * L
            gW, gb = torch.autograd.grad(loss, (W, b))
            lr = lrs * lr_at(step, total, warmup)                            # [L]
            with torch.no_grad():
                for p, gp, buf, shape in ((W, gW, bufs[0], (L, 1, 1)), (b, gb, bufs[1], (L, 1))):
                    buf.mul_(momentum).add_(gp)                              # torch SGD: buf = m * buf + g (wd 0)
                    p.sub_(lr.view(shape) * buf)
            step += 1
        prog.update()
    prog.done(f"({L} lrs in one pass, {N} features)")
    bn.eval()
    return bn, W.detach(), b.detach()


@torch.no_grad()
def head_accuracy(bn: nn.BatchNorm1d, W: Tensor, b: Tensor, f: Tensor, y: Tensor, chunk: int = 65536) -> Tensor:
    """Top-1 accuracy (%) of every head on f [M, D] / y [M]: float [n_lr] (BN uses its running statistics)."""
    correct = torch.zeros(W.shape[0], device=W.device)
    for s in range(0, f.shape[0], chunk):
        logits = torch.einsum("nd,ldc->lnc", bn(f[s:s + chunk]), W) + b[:, None, :]
        correct += (logits.argmax(-1) == y[s:s + chunk]).sum(1)
    return 100.0 * correct / max(1, f.shape[0])


def linear_probe(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor, num_classes: int | None = None,
                 epochs: int = 50, batch_size: int = 1024, base_lrs=LRS, val_frac: float = 0.1, seed: int = 0,
                 device=None, progress: str = "", augment=None) -> dict:
    """Linear probe with lr selection on a held-out validation split.

    train_f [N, D], train_y [N], test_f [M, D], test_y [M]; runs on `device` (default train_f's device).
    augment: None (the heads train on train_f), or a callable (rows int64 [n], epoch) -> (f [n', D], y [n']): the
    features of freshly augmented images of the training rows `rows` (indices into train_f) for that epoch, n'
    the same every epoch (the published probe's augmentation; maect.eval --probe-aug). The validation and test
    features stay the unaugmented ones.
    Returns {'lr', 'base_lr', 'val_acc', 'test_acc', 'val_acc_per_base_lr', 'epochs', 'n_train', 'n_val',
    'augmented'} (accuracies in %). Raises NonFiniteFeatures (a ValueError) for NaN/inf feature rows, ValueError for
    epochs < 1 or batch_size < 2 (the BatchNorm needs two samples per batch).
    """
    check_finite("linear_probe", train=train_f, test=test_f)
    if epochs < 1 or batch_size < 2:
        raise ValueError(f"linear probe: epochs={epochs} must be >= 1 and batch_size={batch_size} >= 2 (its "
                         f"BatchNorm cannot normalise a single sample)")
    dev = torch.device(device) if device is not None else train_f.device
    C = int(num_classes) if num_classes is not None else int(max(train_y.max(), test_y.max())) + 1
    check_labels("linear_probe", C, train=train_y, test=test_y)
    f, y = train_f.to(dev).float(), train_y.to(dev).long()
    tr, va = holdout_split(f.shape[0], val_frac, seed)
    tr, va = tr.to(dev), va.to(dev)
    lrs = torch.tensor([bl * batch_size / 256 for bl in base_lrs], dtype=torch.float32)
    with torch.enable_grad():
        bn, W, b = train_heads(f[tr], y[tr], C, lrs, epochs=epochs, batch_size=batch_size, seed=seed,
                               progress=progress, epoch_data=None if augment is None else
                               (lambda e: augment(tr.cpu(), e)))
    val = head_accuracy(bn, W, b, f[va], y[va])
    best = int(val.argmax())                # ties: the first (largest) lr
    test = head_accuracy(bn, W[best:best + 1], b[best:best + 1], test_f.to(dev).float(), test_y.to(dev).long())
    return {"lr": float(lrs[best]), "base_lr": float(base_lrs[best]), "val_acc": float(val[best]),
            "test_acc": float(test[0]), "val_acc_per_base_lr": {str(bl): float(a) for bl, a in zip(base_lrs, val)},
            "epochs": epochs, "n_train": int(tr.numel()), "n_val": int(va.numel()), "augmented": augment is not None}
