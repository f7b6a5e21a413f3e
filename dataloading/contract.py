"""The training loader's output contract, checked on a real batch (loader.py states it; every backend keeps it):

    {"views": [Tensor [n, C, S, S] float32, normalised, on `device`] * num_views, "idx": int64 [n], "label": int64 [n]}

breach(batch, ...) returns None when a batch keeps it, else the first breach in words:
    structure   a dict with views (a list of num_views tensors), idx and label
    shapes      every view [n, C, S, S]; idx and label [n]
    dtypes      views float32; idx and label int64; every tensor on `device`
    sample ids  idx equals the ids the CPU twin reads at that step (same epoch order and rank slice)
    labels      label equals data.labels[idx]
    values      finite, and within the normalised range of pixels in [0, 1]: (0 - mean) / std .. (1 - mean) / std per
                channel (+ 1e-3 for rounding)
    normalised  the batch's mean pixel value (view 0 un-normalised with the data's mean / std) within
                max(0.05, 4 se) of the mean of the same images decoded and cropped by the twin (images.decode_image,
                augment.random_resized_crop_flip; up to BRIGHTNESS_IMAGES of them, two crops each): crops move one
                image's mean, not a batch's in expectation, while a batch left unnormalised, normalised twice or with
                another mean / std moves it by more (se: the standard error of the two means)
first_batch_breach(loader, ...) builds the loader's pipeline for epoch 0, takes its first batch and checks it: what
build_loader runs before it trusts DALI with a training run.
"""
from __future__ import annotations

import torch

BRIGHTNESS_IMAGES = 16


def breach(batch, *, n: int, num_views: int, img_size: int, in_chans: int, device, mean, std,
           expected_idx: torch.Tensor | None = None, labels: torch.Tensor | None = None,
           twin_brightness=None) -> str | None:
    """None if `batch` keeps the contract, else the first breach (see the module docstring).
    twin_brightness: a function ids -> (mean pixel value per image in [0, 1]) of the same images decoded by the twin."""
    if not isinstance(batch, dict) or not {"views", "idx", "label"} <= set(batch):
        return f"the batch is not a dict with views, idx and label (got {type(batch).__name__} " \
               f"{sorted(batch) if isinstance(batch, dict) else ''})"
    views, idx, label = batch["views"], batch["idx"], batch["label"]
    if not isinstance(views, (list, tuple)) or len(views) != num_views:
        return f"{len(views) if isinstance(views, (list, tuple)) else type(views).__name__} views, expected {num_views}"
    device = torch.device(device)
    for name, t, shape, dt in [(f"view {v}", x, (n, in_chans, img_size, img_size), torch.float32)
                               for v, x in enumerate(views)] + [("idx", idx, (n,), torch.int64),
                                                               ("label", label, (n,), torch.int64)]:
        if not isinstance(t, torch.Tensor):
            return f"{name} is a {type(t).__name__}, not a tensor"
        if tuple(t.shape) != shape:
            return f"{name} has shape {tuple(t.shape)}, expected {shape}"
        if t.dtype != dt:
            return f"{name} has dtype {t.dtype}, expected {dt}"
        if t.device.type != device.type or (device.index is not None and t.device.index != device.index):
            return f"{name} is on {t.device}, expected {device}"
    idx_c = idx.cpu()
    if expected_idx is not None and not torch.equal(idx_c, expected_idx.cpu()):
        first = int((idx_c != expected_idx.cpu()).nonzero()[0, 0])
        return (f"sample ids differ from the CPU twin's at row {first}: {idx_c[first].item()} vs "
                f"{expected_idx[first].item()} (a different order or shard)")
    if labels is not None and not torch.equal(label.cpu(), labels[idx_c].cpu()):
        return "labels are not data.labels[idx]"
    m = torch.tensor(mean, dtype=torch.float32).repeat(in_chans // len(mean)).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).repeat(in_chans // len(std)).view(1, -1, 1, 1)
    lo, hi = (0 - m) / s - 1e-3, (1 - m) / s + 1e-3
    for v, x in enumerate(views):
        xc = x.detach().float().cpu()
        if not torch.isfinite(xc).all():
            return f"view {v} holds non-finite values"
        if (xc < lo).any() or (xc > hi).any():
            c = int(((xc < lo) | (xc > hi)).any(0).any(-1).any(-1).nonzero()[0, 0])
            return (f"view {v} channel {c}: values {xc[:, c].min():.3g}..{xc[:, c].max():.3g} outside the normalised "
                    f"range of [0, 1] pixels ({lo.flatten()[c]:.3g}..{hi.flatten()[c]:.3g}): not normalised with "
                    f"mean {tuple(mean)} / std {tuple(std)}?")
    if twin_brightness is not None:
        k = min(n, BRIGHTNESS_IMAGES)
        ref = torch.as_tensor(twin_brightness(idx_c[:k].tolist()), dtype=torch.float64)
        for v, x in enumerate(views[:1]):          # view 0: MAE-CTaug's view 1 solarizes (its mean moves)
            pix = (x[:k].detach().float().cpu() * s + m).double().mean(dim=(1, 2, 3))
            se = float(((pix.var() + ref.var()) / k).sqrt()) if k > 1 else 0.0
            diff, tol = abs(float(pix.mean() - ref.mean())), max(0.05, 4 * se)
            if diff > tol:
                return (f"view {v}: mean pixel value {float(pix.mean()):.3f} vs {float(ref.mean()):.3f} for the same "
                        f"images decoded by the CPU twin (tolerance {tol:.3f}): normalised differently")
    return None


def first_batch_breach(loader, data, *, in_chans: int) -> str | None:
    """Build `loader`'s pipeline for epoch 0, take its first batch and check it (breach); the pipeline is
    released afterwards and the loader is left as it was (epoch 0, start step 0)."""
    from maect.dataloading.shared import epoch_order
    drop = getattr(loader, "_drop", None)
    order = epoch_order(len(data), loader.seed, 0, drop)
    expected = order[:loader.G][loader.rank * loader.n:(loader.rank + 1) * loader.n]    # what the twin reads

    from maect.dataloading import augment as A

    def brightness(ids):                        # the twin's decode and crop of the same images, two crops each
        out = []
        for i in ids:
            img = data.load(i).float().div_(255).unsqueeze(0)
            crops = [A.random_resized_crop_flip(img, loader.img_size, loader.crop_scale,
                                                A.Draw(torch.Generator().manual_seed(i * 2 + c), 1)) for c in (0, 1)]
            out.append(torch.cat(crops).mean().item())
        return out
    epoch, start = loader.epoch, loader.start_step
    loader.set_epoch(0)
    it = iter(loader)
    try:
        batch = next(it)
    finally:
        it.close()
        loader.set_epoch(epoch, start)
    why = breach(batch, n=loader.n, num_views=loader.num_views, img_size=loader.img_size, in_chans=in_chans,
                 device=loader.device, mean=data.mean, std=data.std, expected_idx=expected, labels=data.labels,
                 twin_brightness=brightness)
    del batch
    return why
