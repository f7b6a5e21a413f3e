"""Batched image augmentations on tensors (CPU or GPU), one random draw per sample.

Every op takes x [n, C, H, W] float in [0, 1] (before normalisation) and a Draw: random parameters are drawn on
the CPU for the whole global batch from one generator and each rank keeps its own slice, so a run is
reproducible whatever the device, and N ranks see exactly the augmentations one process would.

random_resized_crop: torchvision's sampling rule (10 tries of area-scale ~ U(scale), log-ratio ~ U(log ratio),
    accept if the box fits; else a centre crop clamped to the ratio range). The box has whole-pixel edges; by default
    (antialias=True, config data.antialias) it is cut out and resized by F.interpolate(bicubic, antialias=True), the
    resampling PIL's Image.resize(BICUBIC) does (kernel a=-0.5, support widened by the downscale factor), which the
    published code runs through torchvision's RandomResizedCrop on PIL images; the flip follows. antialias=False: the
    former path, one affine resample (grid_sample, bicubic a=-0.75, align_corners=False, no low-pass filter) with
    the flip folded into the affine; it aliases when the crop is downscaled.
MAE-CTaug ops (SPEC): colour jitter (brightness, contrast, saturation, hue, in a random order per sample),
    grayscale, Gaussian blur (sigma ~ U(0.1, 2.0); kernel size is open in SPEC: we use the odd size nearest
    10% of the image side, at least 3, as BYOL's 23 px at 224), solarize (threshold 0.5 = 128/255).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from maect.device import h2d  # noqa: F401  (A.h2d: the loaders' copies)


class Draw:
    """Random numbers for a global batch of n_global samples; returns the rows [sel] of this rank."""

    def __init__(self, g: torch.Generator, n_global: int, sel: slice | None = None):
        self.g, self.n, self.sel = g, n_global, sel if sel is not None else slice(0, n_global)

    def rand(self, *shape: int, dtype=torch.float32) -> Tensor:
        return torch.rand(self.n, *shape, generator=self.g, dtype=dtype)[self.sel]

    def uniform(self, lo: float, hi: float, *shape: int, dtype=torch.float32) -> Tensor:
        return self.rand(*shape, dtype=dtype) * (hi - lo) + lo


def rrc_boxes(d: Draw, height: int, width: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Tensor:
    """Crop boxes [n, 4] = (top, left, h, w) in pixels, torchvision's RandomResizedCrop rule, vectorised."""
    area = height * width
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    tries = 10
    target = area * d.uniform(scale[0], scale[1], tries, dtype=torch.float64)
    ar = torch.exp(d.uniform(log_r[0], log_r[1], tries, dtype=torch.float64))
    n = target.shape[0]
    w = torch.round(torch.sqrt(target * ar))
    h = torch.round(torch.sqrt(target / ar))
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    # fallback: centre crop with the ratio clamped into range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fh, fw = height, round(height * ratio[1])
    else:
        fw, fh = width, height
    pick = first.clamp_min(0).view(n, 1)
    hh = torch.where(first >= 0, h.gather(1, pick).squeeze(1), torch.full((n,), float(fh), dtype=torch.float64))
    ww = torch.where(first >= 0, w.gather(1, pick).squeeze(1), torch.full((n,), float(fw), dtype=torch.float64))
    top = torch.floor(d.rand(dtype=torch.float64) * (height - hh + 1))
    left = torch.floor(d.rand(dtype=torch.float64) * (width - ww + 1))
    top = torch.where(first >= 0, top, torch.full((n,), float((height - fh) // 2), dtype=torch.float64))
    left = torch.where(first >= 0, left, torch.full((n,), float((width - fw) // 2), dtype=torch.float64))
    return torch.stack([top, left, hh, ww], dim=1)


def _cubic_aa(t: Tensor) -> Tensor:
    """The bicubic kernel of antialiased resampling (PIL's and torch's antialias=True): a = -0.5, support 2."""
    a, t = -0.5, t.abs()
    inner = ((a + 2) * t - (a + 3)) * t * t + 1
    outer = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return torch.where(t <= 1, inner, outer * (t < 2))


def aa_weights(start: Tensor, length: Tensor, size_in: int, out_size: int) -> Tensor:
    """Resampling weights float32 [N, out_size, size_in] of antialiased bicubic along one axis: output pixel i of
    sample n reads the crop [start[n], start[n] + length[n]) (whole pixels) of an axis of size_in pixels, as
    F.interpolate(bicubic, antialias=True) and PIL do it: scale s = length / out_size, centre s (i + 0.5) in crop
    coordinates, kernel _cubic_aa((j - centre + 0.5) / max(s, 1)) over the crop's pixels j, weights normalised to
    sum 1 (the kernel's support is 2 max(s, 1) pixels, so pixels outside it get 0, as in the reference's window).
    fp32 positions, as torch's."""
    start, length = start.to(torch.float32), length.to(torch.float32)
    scale = length / out_size                                                             # [N]
    centre = scale[:, None] * (torch.arange(out_size, dtype=torch.float32) + 0.5)         # [N, S]
    j = torch.arange(size_in, dtype=torch.float32)[None, None, :] - start[:, None, None]  # [N, 1, size_in]
    w = _cubic_aa((j + 0.5 - centre[..., None]) / scale.clamp(min=1)[:, None, None])
    w = w * ((j >= 0) & (j < length[:, None, None]))
    return w / w.sum(-1, keepdim=True)


def resample_boxes(x: Tensor, boxes: Tensor, out_size: int, flip: Tensor | None = None, mode: str = "bicubic",
                   antialias: bool = True) -> Tensor:
    """Crop boxes [N, 4] (top, left, h, w; whole pixels) of x [N, C, H, W] float resized to out_size², optionally
    flipped (flip: bool [N]); clamped to [0, 1]. antialias=True (bicubic): PIL's resampling. One image: the box cut
    out and resized by F.interpolate(bicubic, antialias=True) (its cost follows the kernel's support); a batch: the
    same weights (aa_weights) applied as two batched matrix products, one call for the whole batch on any device
    (tests/test_fidelity.py checks both against each other and against PIL). antialias=False: one batched
    grid_sample without antialiasing (mode bicubic a = -0.75, or bilinear; the former path)."""
    if antialias and mode != "bicubic":
        raise ValueError(f"resample_boxes: antialias=True resamples bicubic (PIL's), got mode={mode!r}")
    if antialias and x.shape[0] == 1:
        top, left, h, w = boxes[0].round().long().tolist()
        out = F.interpolate(x[:, :, top:top + h, left:left + w], size=(out_size, out_size), mode="bicubic",
                            align_corners=False, antialias=True)
        if flip is not None:
            out = torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)
        return out.clamp_(0, 1)
    if antialias:
        b = boxes.round()
        wy = h2d(aa_weights(b[:, 0], b[:, 2], x.shape[2], out_size).to(x.dtype), x.device)   # [N, S, H]
        wx = h2d(aa_weights(b[:, 1], b[:, 3], x.shape[3], out_size).to(x.dtype), x.device)   # [N, S, W]
        if flip is not None:                                                                  # output columns reversed
            wx = torch.where(flip.to(x.device).view(-1, 1, 1), wx.flip(1), wx)
        return torch.einsum("nsh,nchw,ntw->ncst", wy, x, wx).clamp_(0, 1)
    N, _, H, W = x.shape
    top, left, h, w = (boxes[:, i].to(torch.float32) for i in range(4))
    # normalised coordinates (align_corners=False): pixel edge 0 -> -1, edge W -> +1
    cx = (left + w / 2) / W * 2 - 1
    cy = (top + h / 2) / H * 2 - 1
    sx, sy = w / W, h / H
    if flip is not None:
        sx = torch.where(flip, -sx, sx)
    theta = torch.zeros(N, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, sy, cy
    grid = F.affine_grid(h2d(theta, x.device), [N, x.shape[1], out_size, out_size], align_corners=False)
    out = F.grid_sample(x, grid.to(x.dtype), mode=mode, padding_mode="border", align_corners=False)
    return out.clamp_(0, 1)


def random_resized_crop_flip(x: Tensor, out_size: int, scale, d: Draw, flip_p: float = 0.5,
                             antialias: bool = True) -> Tensor:
    """x [n, C, H, W] float in [0, 1] -> [n, C, out_size, out_size]: a RandomResizedCrop box (rrc_boxes) per sample,
    bicubic resize (antialiased unless antialias=False), horizontal flip with probability flip_p."""
    boxes = rrc_boxes(d, x.shape[2], x.shape[3], scale=scale)
    flip = d.rand() < flip_p
    return resample_boxes(x, boxes, out_size, h2d(flip, x.device), antialias=antialias)


def resize(x: Tensor, out_size: int, antialias: bool = True) -> Tensor:
    """Deterministic eval transform for small images: the whole image x [n, C, H, W] resized to out_size² (bicubic;
    antialiased as PIL's unless antialias=False)."""
    if x.shape[-1] == out_size and x.shape[-2] == out_size:
        return x
    return F.interpolate(x, size=(out_size, out_size), mode="bicubic", align_corners=False,
                         antialias=antialias).clamp_(0, 1)


# ------------------------------------------------------------------------------------------ colour ops
def _gray(x: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(a: Tensor, b: Tensor, f: Tensor) -> Tensor:  # f [N] -> a*f + b*(1-f), clamped
    f = f.view(-1, 1, 1, 1).to(a)
    return (a * f + b * (1 - f)).clamp_(0, 1)


def _rgb_to_hsv(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    dc = delta.clamp_min(1e-12)
    h = torch.where(maxc == r, (g - b) / dc, torch.where(maxc == g, 2.0 + (b - r) / dc, 4.0 + (r - g) / dc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], 1)


def _hsv_to_rgb(x: Tensor) -> Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r = torch.stack([v, q, p, p, t, v], 1).gather(1, i.unsqueeze(1)).squeeze(1)
    g = torch.stack([t, v, v, q, p, p], 1).gather(1, i.unsqueeze(1)).squeeze(1)
    b = torch.stack([p, p, t, v, v, q], 1).gather(1, i.unsqueeze(1)).squeeze(1)
    return torch.stack([r, g, b], 1)


def color_jitter(x: Tensor, brightness: float, contrast: float, saturation: float, hue: float, p: float,
                 d: Draw) -> Tensor:
    """torchvision ColorJitter semantics per sample (factors ~ U(1-a, 1+a), hue shift ~ U(-h, h), random op
    order per sample), applied to a random subset with probability p."""
    apply = h2d(d.rand() < p, x.device)
    fb, fc, fs = (d.uniform(max(0, 1 - a), 1 + a) for a in (brightness, contrast, saturation))
    fh = d.uniform(-hue, hue)
    order = h2d(torch.argsort(d.rand(4), dim=1), x.device)
    fb, fc, fs, fh = (h2d(t, x.device) for t in (fb, fc, fs, fh))
    out = x
    for slot in range(4):
        op = order[:, slot]
        y = out
        y = torch.where((op == 0).view(-1, 1, 1, 1), _blend(out, torch.zeros_like(out), fb), y)
        mean = _gray(out).mean(dim=(1, 2, 3), keepdim=True)
        y = torch.where((op == 1).view(-1, 1, 1, 1), _blend(out, mean.expand_as(out), fc), y)
        if x.shape[1] == 3:
            y = torch.where((op == 2).view(-1, 1, 1, 1), _blend(out, _gray(out).expand_as(out), fs), y)
            hsv = _rgb_to_hsv(out)
            hsv = torch.stack([(hsv[:, 0] + fh.view(-1, 1, 1)) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
            y = torch.where((op == 3).view(-1, 1, 1, 1), _hsv_to_rgb(hsv), y)
        out = y
    return torch.where(apply.view(-1, 1, 1, 1), out, x)


def random_grayscale(x: Tensor, p: float, d: Draw) -> Tensor:
    apply = h2d(d.rand() < p, x.device).view(-1, 1, 1, 1)
    return torch.where(apply, _gray(x).expand_as(x), x)


def blur_kernel_size(img_size: int) -> int:
    k = max(3, int(round(img_size * 0.1)))
    return k if k % 2 else k + 1


def gaussian_blur(x: Tensor, p: float, d: Draw, sigma=(0.1, 2.0)) -> Tensor:
    """Separable Gaussian blur with a per-sample sigma ~ U(sigma), applied with probability p (reflect padding)."""
    N, C, H, W = x.shape
    apply = h2d(d.rand() < p, x.device).view(-1, 1, 1, 1)
    s = h2d(d.uniform(sigma[0], sigma[1]), x.device)
    k = blur_kernel_size(H)
    r = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    w = torch.exp(-(r.view(1, -1) ** 2) / (2 * s.view(-1, 1) ** 2))
    w = (w / w.sum(1, keepdim=True)).repeat_interleave(C, 0)  # [N*C, k]
    y = F.pad(x.reshape(1, N * C, H, W), (k // 2, k // 2, k // 2, k // 2), mode="reflect")
    y = F.conv2d(y, w.view(N * C, 1, 1, k), groups=N * C)
    y = F.conv2d(y, w.view(N * C, 1, k, 1), groups=N * C).view(N, C, H, W)
    return torch.where(apply, y, x)


def solarize(x: Tensor, p: float, d: Draw, threshold: float = 128 / 255) -> Tensor:
    apply = h2d(d.rand() < p, x.device).view(-1, 1, 1, 1)
    return torch.where(apply & (x >= threshold), 1.0 - x, x)


def ctaug_view(x: Tensor, view: int, d: Draw) -> Tensor:
    """SPEC's asymmetric MAE-CTaug colour pipeline for view 0 or 1 (after crop and flip)."""
    x = color_jitter(x, 0.4, 0.4, 0.2, 0.1, p=0.8, d=d)
    x = random_grayscale(x, 0.2, d)
    x = gaussian_blur(x, 1.0 if view == 0 else 0.1, d)
    if view == 1:
        x = solarize(x, 0.2, d)
    return x


def normalize(x: Tensor, mean, std) -> Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s
