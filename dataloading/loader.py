"""build_loader: batches of augmented views for training, and deterministic batches for evaluation.

Output contract (every loader, every backend):
    {"views": [Tensor [n, C, S, S] float, normalised, on `device`] * num_views,
     "idx": int64 [n] sample ids (the queue's self-exclusion key), "label": int64 [n]}
n is the per-rank batch. An epoch is a permutation of the dataset drawn from (seed, epoch); step s of the epoch
uses rows [s*G, (s+1)*G) of it (G = global batch) and rank r keeps its slice [r*n, (r+1)*n): so N ranks see
exactly what one process with the same global batch sees, and a run can resume at any step.
The last incomplete global batch is dropped.
"""
from __future__ import annotations

import torch

from dataloading import augment as A
from dataloading.datasets import ArrayData, ImageFolder


class TrainLoader:
    def __init__(self, data, *, img_size: int, in_chans: int, batch_size: int, rank: int = 0, world: int = 1,
                 seed: int = 0, num_views: int = 1, crop_scale=(0.2, 1.0), ctaug: bool = False,
                 device: str | torch.device = "cpu", num_workers: int = 0):
        G = batch_size * world
        if len(data) < G:
            raise ValueError(f"dataset has {len(data)} samples, fewer than one global batch ({G} = {batch_size} x {world} ranks)")
        self.data, self.img_size, self.in_chans = data, img_size, in_chans
        self.n, self.rank, self.world, self.G, self.seed = batch_size, rank, world, G, seed
        self.num_views, self.crop_scale, self.ctaug = num_views, tuple(crop_scale), ctaug
        self.device, self.num_workers = torch.device(device), num_workers
        self.epoch, self.start_step = 0, 0
        self.backend = "cpu-batched" if isinstance(data, ArrayData) else "cpu-pil"

    def __len__(self) -> int:
        return len(self.data) // self.G

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def _perm(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(len(self.data), generator=g)

    def _augment(self, x: torch.Tensor, step: int, sel: slice) -> list[torch.Tensor]:
        """x uint8 [n, C, H, W] (already this rank's rows) -> list of normalised views."""
        g = torch.Generator().manual_seed((self.seed * 1000003 + self.epoch) * 1000003 + step)
        x = x.to(self.device, non_blocking=True).float().div_(255)
        if x.shape[1] == 1 and self.in_chans == 3:
            x = x.expand(-1, 3, -1, -1)
        views = []
        for v in range(self.num_views):
            d = A.Draw(g, self.G, sel)
            y = A.random_resized_crop_flip(x, self.img_size, self.crop_scale, d)
            if self.ctaug:
                y = A.ctaug_view(y, v, d)
            views.append(A.normalize(y, self.data.mean * (self.in_chans // len(self.data.mean)),
                                     self.data.std * (self.in_chans // len(self.data.std))))
        return views

    def __iter__(self):
        perm = self._perm()
        sel = slice(self.rank * self.n, (self.rank + 1) * self.n)
        for step in range(self.start_step, len(self)):
            idx = perm[step * self.G:(step + 1) * self.G][sel]
            if isinstance(self.data, ArrayData):
                views = self._augment(self.data.images[idx], step, sel)
            else:
                views = self._augment_files(idx, step, sel)
            yield {"views": views, "idx": idx.to(self.device), "label": self.data.labels[idx].to(self.device)}
        self.start_step = 0

    def _augment_files(self, idx: torch.Tensor, step: int, sel: slice) -> list[torch.Tensor]:
        """Image files differ in size, so crop and flip run per image (parameters from a generator seeded by
        (seed, epoch, sample id, view): rank-independent); colour ops then run batch-wise like the array path."""
        per_view = [[] for _ in range(self.num_views)]
        for i in idx.tolist():
            img = self.data.load(i).float().div_(255).unsqueeze(0)
            for v in range(self.num_views):
                gi = torch.Generator().manual_seed(((self.seed * 1000003 + self.epoch) * 10000019 + i) * 8 + v)
                per_view[v].append(A.random_resized_crop_flip(img, self.img_size, self.crop_scale, A.Draw(gi, 1)))
        g = torch.Generator().manual_seed((self.seed * 1000003 + self.epoch) * 1000003 + step)
        views = []
        for v in range(self.num_views):
            y = torch.cat(per_view[v]).to(self.device)
            if self.ctaug:
                y = A.ctaug_view(y, v, A.Draw(g, self.G, sel))
            views.append(A.normalize(y, self.data.mean, self.data.std))
        return views


def eval_batches(data, *, img_size: int, in_chans: int, batch_size: int = 512, device="cpu", limit: int | None = None):
    """Deterministic eval images: arrays resized whole to img_size; image files resized (shorter side
    img_size/0.875, bicubic) and centre-cropped (the 256/224 protocol). Yields (x [n, C, S, S], label [n])."""
    n = len(data) if limit is None else min(limit, len(data))
    for s in range(0, n, batch_size):
        e = min(n, s + batch_size)
        if isinstance(data, ArrayData):
            x = data.images[s:e].to(device).float().div_(255)
            if x.shape[1] == 1 and in_chans == 3:
                x = x.expand(-1, 3, -1, -1)
            x = A.resize(x, img_size)
            mean, std = data.mean * (in_chans // len(data.mean)), data.std * (in_chans // len(data.std))
        else:
            x = torch.cat([_center_crop(data.load(i).float().div_(255), img_size) for i in range(s, e)]).to(device)
            mean, std = data.mean, data.std
        yield A.normalize(x, mean, std), data.labels[s:e].to(device)


def _center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    import torch.nn.functional as F
    short = int(round(size / 0.875))
    C, H, W = img.shape
    h, w = (short, max(short, round(W * short / H))) if H <= W else (max(short, round(H * short / W)), short)
    img = F.interpolate(img.unsqueeze(0), size=(h, w), mode="bicubic", align_corners=False).clamp_(0, 1)
    top, left = (h - size) // 2, (w - size) // 2
    return img[:, :, top:top + size, left:left + size]


def build_loader(data, cfg_data, *, img_size: int, in_chans: int, batch_size: int, rank: int, world: int, seed: int,
                 num_views: int, crop_scale, ctaug: bool, device) -> TrainLoader:
    """The training loader selected by data.loader (cpu|dali|auto). DALI pipelines come with the DALI work; until
    then 'auto' means the CPU/torch loader and an explicit 'dali' is an error that says so."""
    if cfg_data.loader == "dali":
        raise ValueError("data.loader=dali is not available in this build; use data.loader=cpu or auto")
    if not isinstance(data, (ArrayData, ImageFolder)):
        raise TypeError(f"unsupported dataset type {type(data).__name__}")
    return TrainLoader(data, img_size=img_size, in_chans=in_chans, batch_size=batch_size, rank=rank, world=world,
                       seed=seed, num_views=num_views, crop_scale=crop_scale, ctaug=ctaug, device=device,
                       num_workers=cfg_data.num_workers)
