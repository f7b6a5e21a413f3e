"""build_loader: batches of augmented views for training, and deterministic batches for evaluation.

Output contract (every loader, every backend):
    {"views": [Tensor [n, C, S, S] float, normalised, on `device`] * num_views,
     "idx": int64 [n] sample ids (the queue's self-exclusion key), "label": int64 [n]}
n is the per-rank batch. An epoch is a permutation of the dataset drawn from (seed, epoch); step s of the epoch
uses rows [s*G, (s+1)*G) of it (G = global batch) and rank r keeps its slice [r*n, (r+1)*n): so N ranks see
exactly what one process with the same global batch sees, and a run can resume at any step.
The last incomplete global batch is dropped.

Image files (ImageFiles: image folders, flat folders, file lists) decode by images.decode_image, the one rule for
every PIL mode. Bad files: every loader, and eval_batches, first runs data.validate(); without skip_corrupt it raises
naming the files, with it they are left out and counted (shared.py: the epoch order and bad-file handling that the
torch loader, DALI and evaluation share). Unlabelled sources give label -1.
"""
from __future__ import annotations

import logging

import torch

from maect.dataloading import augment as A
from maect.dataloading import dali, shard_loader, shards
from maect.dataloading.datasets import ArrayData, ImageFiles
from maect.dataloading.images import DataError
from maect.dataloading.shared import bad_file_mask, epoch_order, note_skipped, substitute

log = logging.getLogger("maect.data")


class TrainLoader:
    def __init__(self, data, *, img_size: int, in_chans: int, batch_size: int, rank: int = 0, world: int = 1,
                 seed: int = 0, num_views: int = 1, crop_scale=(0.2, 1.0), ctaug: bool = False,
                 device: str | torch.device = "cpu", num_workers: int = 0, skip_corrupt: bool = False,
                 antialias: bool = True):
        G = batch_size * world
        self.skip_corrupt, self.skipped = skip_corrupt, {}           # skipped: {path: reason}
        self._drop = None if isinstance(data, ArrayData) else bad_file_mask(data, skip_corrupt, self.skipped)
        n_valid = len(data) - (0 if self._drop is None else int(self._drop.sum()))
        if n_valid < G:
            raise DataError(f"dataset has {n_valid} samples, fewer than one global batch ({G} = {batch_size} x {world} ranks)")
        if isinstance(data, ImageFiles) and in_chans != 3:
            raise DataError(f"image folders decode to RGB: model.in_chans must be 3, got {in_chans}")
        self.data, self.img_size, self.in_chans, self.n_valid = data, img_size, in_chans, n_valid
        self.n, self.rank, self.world, self.G, self.seed = batch_size, rank, world, G, seed
        self.num_views, self.crop_scale, self.ctaug = num_views, tuple(crop_scale), ctaug
        self.antialias = antialias                   # the crop resize (augment.resample_boxes; data.antialias)
        self.device, self.num_workers = torch.device(device), num_workers
        self.epoch, self.start_step = 0, 0
        self.backend = "cpu-batched" if isinstance(data, ArrayData) else "cpu-pil"

    def __len__(self) -> int:
        return self.n_valid // self.G

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def _perm(self) -> torch.Tensor:
        return epoch_order(len(self.data), self.seed, self.epoch, self._drop)

    def _augment(self, x: torch.Tensor, step: int, sel: slice) -> list[torch.Tensor]:
        """x uint8 [n, C, H, W] (already this rank's rows) -> list of normalised views."""
        g = torch.Generator().manual_seed((self.seed * 1000003 + self.epoch) * 1000003 + step)
        x = A.h2d(x, self.device).float().div_(255)
        if x.shape[1] == 1 and self.in_chans == 3:
            x = x.expand(-1, 3, -1, -1)
        views = []
        for v in range(self.num_views):
            d = A.Draw(g, self.G, sel)
            y = A.random_resized_crop_flip(x, self.img_size, self.crop_scale, d, antialias=self.antialias)
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
                views, idx = self._augment_files(idx, step, sel)
            yield {"views": views, "idx": A.h2d(idx, self.device), "label": A.h2d(self.data.labels[idx], self.device)}
        self.start_step = 0

    def _augment_files(self, idx: torch.Tensor, step: int, sel: slice) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Image files differ in size, so crop and flip run per image (parameters from a generator seeded by
        (seed, epoch, sample id, view): rank-independent); colour ops then run batch-wise like the array path.
        Returns (views, idx): idx differs from the input only where skip_corrupt replaced an undecodable file."""
        images = {}
        for i in idx.tolist():
            path = self.data.files[i]
            if path in self.skipped:
                continue
            try:
                images[i] = self.data.load(i)
            except ValueError as exc:                          # load() names the file (images.BadImage)
                if not self.skip_corrupt:
                    raise
                note_skipped(self.skipped, path, str(exc.__cause__ or exc))
        idx = torch.tensor(substitute(idx.tolist(), images.keys(), self.data.files), dtype=torch.long)
        per_view = [[] for _ in range(self.num_views)]
        for i in idx.tolist():
            img = images[i].float().div_(255).unsqueeze(0)
            for v in range(self.num_views):
                gi = torch.Generator().manual_seed(((self.seed * 1000003 + self.epoch) * 10000019 + i) * 8 + v)
                per_view[v].append(A.random_resized_crop_flip(img, self.img_size, self.crop_scale, A.Draw(gi, 1),
                                                              antialias=self.antialias))
        g = torch.Generator().manual_seed((self.seed * 1000003 + self.epoch) * 1000003 + step)
        views = []
        for v in range(self.num_views):
            y = A.h2d(torch.cat(per_view[v]), self.device)
            if self.ctaug:
                y = A.ctaug_view(y, v, A.Draw(g, self.G, sel))
            views.append(A.normalize(y, self.data.mean, self.data.std))
        return views, idx


def eval_batches(data, *, img_size: int, in_chans: int, batch_size: int = 512, device="cpu", limit: int | None = None,
                 skip_corrupt: bool = False, antialias: bool = True):
    """Deterministic eval images: arrays resized whole to img_size; image files resized (shorter side
    round(img_size/0.875), the longer one floored as torchvision's Resize does; bicubic) and centre-cropped (the
    published 256/224 protocol). antialias (data.antialias): the resize antialiased as PIL's bicubic (the published
    torchvision-on-PIL transform), or the former unfiltered bicubic. An iterator of (x [n, C, S, S], label [n]).
    Image files pass the training loader's checks first (shared.bad_file_mask): bad files and empty class folders
    raise naming them before any image is encoded, or with skip_corrupt are left out and logged; a file that passes
    the check but fails to decode raises naming it, or with skip_corrupt is left out of its batch. limit: the
    first `limit` usable samples."""
    if isinstance(data, ArrayData):
        return _array_batches(data, img_size, in_chans, batch_size, device, limit, antialias)
    if in_chans != 3:
        raise DataError(f"image files decode to RGB: model.in_chans must be 3, got {in_chans}")
    ids = torch.nonzero(~bad_file_mask(data, skip_corrupt, {})).flatten()[:limit]   # raises here, before encoding
    return _file_batches(data, ids, img_size, batch_size, device, skip_corrupt, antialias)


def _array_batches(data, img_size, in_chans, batch_size, device, limit, antialias):
    n = len(data) if limit is None else min(limit, len(data))
    mean, std = data.mean * (in_chans // len(data.mean)), data.std * (in_chans // len(data.std))
    for s in range(0, n, batch_size):
        e = min(n, s + batch_size)
        x = data.images[s:e].to(device).float().div_(255)
        if x.shape[1] == 1 and in_chans == 3:
            x = x.expand(-1, 3, -1, -1)
        yield A.normalize(A.resize(x, img_size, antialias), mean, std), data.labels[s:e].to(device)


def _file_batches(data, ids, img_size, batch_size, device, skip_corrupt, antialias):
    for chunk in ids.split(batch_size):
        imgs, keep = [], []
        for i in chunk.tolist():
            try:
                imgs.append(_center_crop(data.load(i).float().div_(255), img_size, antialias))
            except ValueError as exc:                          # load() names the file (images.BadImage)
                if not skip_corrupt:
                    raise
                log.warning(f"data: skip_corrupt: evaluation leaves out {exc}")
                continue
            keep.append(i)
        if keep:
            yield A.normalize(torch.cat(imgs).to(device), data.mean, data.std), data.labels[keep].to(device)


def _center_crop(img: torch.Tensor, size: int, antialias: bool = True) -> torch.Tensor:
    """img [C, H, W] in [0, 1] -> [1, C, size, size]: torchvision's Resize(round(size / 0.875)) (shorter side to
    that, the longer one int(short x long / shorter), bicubic) then CenterCrop(size) (offsets int(round(d / 2)))."""
    import torch.nn.functional as F
    short = int(round(size / 0.875))
    C, H, W = img.shape
    h, w = (short, max(short, int(short * W / H))) if H <= W else (max(short, int(short * H / W)), short)
    img = F.interpolate(img.unsqueeze(0), size=(h, w), mode="bicubic", align_corners=False,
                        antialias=antialias).clamp_(0, 1)
    top, left = int(round((h - size) / 2)), int(round((w - size) / 2))
    return img[:, :, top:top + size, left:left + size]


def build_loader(data, cfg_data, *, img_size: int, in_chans: int, batch_size: int, rank: int, world: int, seed: int,
                 num_views: int, crop_scale, ctaug: bool, device):
    """The training loader selected by data.loader: 'cpu' (TrainLoader, the torch twin), 'dali' (DaliLoader: GPU
    decode with nvJPEG on a CUDA device, DALI's CPU operators otherwise), or 'auto' = DALI when it is installed, the
    device is CUDA and the data are image files, else cpu. Logs which one runs and why the other does not.
    DALI is used only after its pipeline is built and its first batch passes the contract check
    (contract.first_batch_breach: shapes, dtypes, device, sample ids, labels, value range, normalisation); when it
    does not, 'auto' falls back to the CPU twin with one warning saying why, and 'dali' raises DataError with it.
    Optional config keys (read with defaults until config.py has them): data.skip_corrupt (bool, False),
    data.dali_hw_decoder_load (float, 0.65: the share of JPEGs for the hardware decoder where the GPU has one),
    data.antialias (bool, True: the crop resize antialiased as PIL's bicubic; False: the former unfiltered resample,
    in every backend)."""
    if isinstance(data, shards.ShardData):     # WebDataset shards: the streaming loader (shard_loader.py)
        return shard_loader.build_shard_loader(data, cfg_data, img_size=img_size, in_chans=in_chans,
                                               batch_size=batch_size, rank=rank, world=world, seed=seed,
                                               num_views=num_views, crop_scale=crop_scale, ctaug=ctaug, device=device,
                                               antialias=bool(getattr(cfg_data, "antialias", True)))
    if not isinstance(data, (ArrayData, ImageFiles)):
        raise TypeError(f"unsupported dataset type {type(data).__name__}")
    choice = cfg_data.loader
    if choice not in ("auto", "cpu", "dali"):
        raise DataError(f"data.loader must be auto, cpu or dali, got {choice!r}")
    device = torch.device(device)
    skip_corrupt = bool(getattr(cfg_data, "skip_corrupt", False))
    why_not = dali.why_not(data, device)
    if choice == "dali" and why_not and not why_not.startswith("device"):
        raise DataError(f"data.loader=dali: {why_not}")
    kw = dict(img_size=img_size, in_chans=in_chans, batch_size=batch_size, rank=rank, world=world, seed=seed,
              num_views=num_views, crop_scale=crop_scale, ctaug=ctaug, device=device, skip_corrupt=skip_corrupt,
              antialias=bool(getattr(cfg_data, "antialias", True)))
    if choice == "dali" or (choice == "auto" and why_not is None):
        loader, failed = _checked_dali(data, cfg_data, kw)
        if loader is not None:
            log.info(f"data: loader {loader.backend} (data.loader={choice}; first batch checked against the contract)")
            return loader
        if choice == "dali":
            raise DataError(f"data.loader=dali: {failed}")
        loader = TrainLoader(data, num_workers=cfg_data.num_workers, **kw)
        log.warning(f"data: loader {loader.backend} (data.loader=auto): DALI failed its first-batch check ({failed}); "
                    f"falling back to the CPU twin")
        return loader
    loader = TrainLoader(data, num_workers=cfg_data.num_workers, **kw)
    log.info(f"data: loader {loader.backend} (data.loader={choice}" + (f"; not dali: {why_not})" if why_not else ")"))
    return loader


def _checked_dali(data, cfg_data, kw):
    """(DaliLoader, None) when its pipeline builds and its first batch keeps the contract (contract.py), else
    (None, why). The data's own errors (bad files, too few samples) are raised: the twin would meet them too."""
    from maect.dataloading import contract
    loader = dali.DaliLoader(data, num_threads=cfg_data.num_workers,
                             hw_decoder_load=float(getattr(cfg_data, "dali_hw_decoder_load", 0.65)), **kw)
    try:
        why = contract.first_batch_breach(loader, data, in_chans=kw["in_chans"])
    except Exception as exc:          # the pipeline does not build or run here (a DALI, CUDA or driver problem)
        lines = str(exc).strip().splitlines()
        why = f"the pipeline failed: {type(exc).__name__}: {dali._dali_reason(str(exc)) if lines else ''}"[:500]
    return (loader, None) if why is None else (None, why)
