"""NVIDIA DALI loader for image files (image folders, flat folders, file lists): the same output contract as
loader.TrainLoader (its CPU twin).

    {"views": [Tensor [n, 3, S, S] float32 normalised, on `device`] * num_views, "idx": int64 [n], "label": int64 [n]}

Pipeline (one per epoch; GPU ops when a CUDA device is used, DALI's CPU operators with device_id=None otherwise):
    fn.readers.file(files, labels = sample ids, shard_id=rank, num_shards=world)
    -> fn.decoders.image  device='mixed' (nvJPEG, hw_decoder_load) | 'cpu'           -> uint8 HWC RGB
    -> per view: fn.random_resized_crop(S, random_area=crop_scale, random_aspect_ratio=(3/4, 4/3), bicubic)
       [-> MAE-CTaug colour ops] -> fn.crop_mirror_normalize(mirror=coin_flip(0.5), ImageNet mean/std, CHW float)
The reader's labels are the sample ids (the queue's self-exclusion key); class labels come from data.labels[idx]
(-1 for unlabelled sources).

Decoding. The torch loader decodes by images.decode_image; DALI's decoder was measured against it (DALI 2.4, CPU
decoder; tests/test_image_modes.py::test_dali_decodes_every_mode_like_the_torch_loader): identical for 1, L, LA, P
(with or without transparency), RGB, RGBA and CMYK files (alpha dropped by both), for 16-bit grey (both
round(v / 257)) and float grey in [0, 1]; both apply EXIF orientation. 16-bit colour PNGs differ by at most one
level (PIL floors them while decoding). The files decode_image rejects (mode I, floats outside [0, 1]) are rejected
by the shared file check before DALI sees them, and so are the TIFF modes DALI decodes differently
(images.check_image_file with dali=True). The GPU decoder (nvJPEG) is unmeasured here.

Order, sharding, epochs and resume. DALI's own shuffle (random_shuffle) fills a buffer of `initial_fill` samples
from a list shuffled once with a fixed seed: not a fresh permutation per epoch, and not resumable mid-epoch. So the
order is ours: each epoch the loader builds a pipeline over the list of shared.epoch_order(N, seed, epoch) (the
twin's permutation, without the files validate() rejected), laid out rank-major — for rank r, the rows
[s*G + r*n, s*G + (r+1)*n) of every step s >= start_step — so DALI's contiguous shard r (shard_id=rank,
num_shards=world) is exactly what rank r of the twin reads, step by step: no overlap between ranks, every file once
per epoch, the last incomplete global batch dropped. set_epoch(epoch, start_step) resumes mid-epoch by listing only
the steps from start_step on. Building a pipeline costs well under a second; it happens once per epoch.

Randomness: augmentation parameters come from DALI's generators, seeded per (seed, epoch, rank, start_step). They are
reproducible but differ from the twin's draws (and a resumed epoch draws afresh from start_step on); the sample
order is identical.

MAE-CTaug (SPEC; probabilities as augment.ctaug_view): colour jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2,
Gaussian blur sigma ~ U(0.1, 2) (p=1 for view 0, 0.1 for view 1; window = augment.blur_kernel_size(S)), solarize
at 128 p=0.2 (view 1). Differences from the twin, all small: the jitter ops run in one fixed order (contrast about
the image's mean luma, brightness, then saturation and hue) instead of torchvision's random order; hue rotates in
YIQ space (fn.hsv) rather than shifting HSV hue; grayscale is fn.hsv's saturation 0 (Y = 0.299 R + 0.587 G +
0.114 B, torchvision's weights); values are clamped after brightness/contrast and after hsv. The crop resize is
DALI's antialiased bicubic (like PIL's, which torchvision's RandomResizedCrop uses), as the twin's by default;
data.antialias=false turns antialiasing off in both.

Bad files: the loader runs data.validate(dali=True) first (shared.bad_file_mask), so a zero-byte, truncated or
non-image file, a rejected mode or an empty class folder is reported by name (or skipped with skip_corrupt) before
DALI sees it. A file that passes
the check and still makes DALI fail is found again by name (DALI's message, else a PIL decode of the files the
pipeline was working on) and raised, or with skip_corrupt replaced in its batch and the pipeline rebuilt from the
current step. A DALI error therefore never leaves the iterator waiting.
"""
from __future__ import annotations

import logging

import torch

from maect.dataloading import augment as A
from maect.dataloading.datasets import ArrayData, ImageFiles
from maect.dataloading.images import DataError
from maect.dataloading.shared import bad_file_mask, epoch_order, note_skipped, substitute

log = logging.getLogger("maect.data")
READER = "reader"
PIP = "pip install nvidia-dali-cuda130"     # the CUDA 13 wheel; it also runs CPU-only pipelines on machines without a GPU
PREFETCH = 2                                # DALI's prefetch_queue_depth: batches in flight ahead of the consumer


def import_error() -> str | None:
    """Why nvidia-dali cannot be used here (None: it imports)."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as exc:      # ImportError, or a broken install (missing CUDA libraries)
        return f"nvidia-dali is not importable ({type(exc).__name__}: {exc}); install it with `{PIP}`"
    return None


def why_not(data, device) -> str | None:
    """Why DaliLoader cannot run the GPU path for these inputs (None: it can). Reasons in the order: DALI
    missing, data not an image folder, device not CUDA (the last one still allows DALI's CPU-only mode)."""
    reason = import_error()
    if reason:
        return reason
    if isinstance(data, ArrayData):
        return ("the data are in-memory arrays (the torch loader augments them on the device); for DALI export them "
                "with `python -m maect.dataloading.export --out DIR` and use data.name=imagefolder data.root=DIR")
    if not isinstance(data, ImageFiles):
        return f"unsupported dataset type {type(data).__name__}"
    if torch.device(device).type != "cuda":
        return "device is not CUDA (DALI then runs on the CPU only)"
    return None


def build_pipeline(files: list[str], ids: list[int], *, batch_size: int, shard_id: int, num_shards: int, seed: int,
                   img_size: int, crop_scale, num_views: int, ctaug: bool, mean, std, device_id: int | None,
                   num_threads: int, hw_decoder_load: float = 0.65, antialias: bool = True):
    """A built DALI pipeline: outputs view_0 .. view_{num_views-1} (float CHW, normalised) and the sample ids
    (int32 [1] per sample). files/ids: the whole list; this pipeline reads contiguous shard shard_id of num_shards.
    device_id None: CPU operators only."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    S = img_size

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=PREFETCH, enable_conditionals=ctaug)
    def pipe():
        raw, sid = fn.readers.file(files=files, labels=ids, shard_id=shard_id, num_shards=num_shards,
                                   random_shuffle=False, name=READER)
        img = decode(raw, gpu, hw_decoder_load)
        views = []
        for v in range(num_views):
            y = fn.random_resized_crop(img, size=[S, S], random_area=list(crop_scale),
                                       random_aspect_ratio=[3 / 4, 4 / 3], interp_type=types.INTERP_CUBIC,
                                       antialias=antialias)
            if ctaug:
                y = _ctaug(y, v, S)
            views.append(fn.crop_mirror_normalize(
                y, mirror=fn.random.coin_flip(probability=0.5), dtype=types.FLOAT, output_layout="CHW",
                mean=[255 * m for m in mean], std=[255 * s for s in std]))
        return (*views, sid)

    p = pipe()
    p.build()
    return p


def decode(raw, gpu: bool, hw_decoder_load: float = 0.65):
    """DALI's decode of encoded files to uint8 HWC RGB, as every pipeline here runs it (EXIF orientation applied,
    DALI's default, like images.decode_image)."""
    from nvidia.dali import fn, types
    if gpu:   # paddings as in DALI's ImageNet examples: fewer reallocations as image sizes vary
        return fn.decoders.image(raw, device="mixed", output_type=types.RGB, hw_decoder_load=hw_decoder_load,
                                 device_memory_padding=211025920, host_memory_padding=140544512)
    return fn.decoders.image(raw, device="cpu", output_type=types.RGB)


def decode_files(files: list[str], device_id: int | None = None) -> list:
    """Each file decoded by DALI alone (decode, no augmentation) -> numpy uint8 [H, W, 3]: to compare DALI's
    decoder with images.decode_image. One pipeline per file, so a file DALI cannot decode raises naming it."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def
    out = []
    for f in files:
        @pipeline_def(batch_size=1, num_threads=1, device_id=device_id)
        def pipe():
            raw, _ = fn.readers.file(files=[f], labels=[0])
            return decode(raw, device_id is not None)
        try:
            p = pipe()
            p.build()
            img = p.run()[0]
            out.append(np.array((img.as_cpu() if device_id is not None else img)[0]))
        except Exception as exc:
            raise DataError(f"DALI could not decode {f!r}: {_dali_reason(str(exc))}") from exc
    return out


def _ctaug(y, view: int, S: int):
    """SPEC's MAE-CTaug colour ops for one view on uint8 HWC -> float HWC in [0, 255]. Random choices with
    probability p are parameters that fall back to identity (jitter, grayscale, solarize), or a per-sample
    conditional where the op is costly (blur with p < 1)."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    def factor(a: float, p_apply):            # U(1-a, 1+a) where applied, 1 elsewhere
        return (fn.random.uniform(range=[max(0.0, 1 - a), 1 + a]) - 1.0) * p_apply + 1.0

    jitter = fn.random.coin_flip(probability=0.8)
    fb, fc, fs = factor(0.4, jitter), factor(0.4, jitter), factor(0.2, jitter)
    hue_deg = fn.random.uniform(range=[-0.1 * 360, 0.1 * 360]) * jitter
    gray = fn.random.coin_flip(probability=0.2)
    m = fn.reductions.mean(y, axes=[0, 1], dtype=types.FLOAT)          # [3] per sample
    centre = m[0] * 0.299 + m[1] * 0.587 + m[2] * 0.114                   # mean luma: torchvision's contrast centre
    y = dmath.clamp(((y - centre) * fc + centre) * fb, 0.0, 255.0)
    y = dmath.clamp(fn.hsv(y, hue=hue_deg, saturation=fs * (1 - gray)), 0.0, 255.0)
    k = A.blur_kernel_size(S)
    if view == 0:
        y = fn.gaussian_blur(y, sigma=fn.random.uniform(range=[0.1, 2.0]), window_size=k)
    else:
        if fn.random.coin_flip(probability=0.1):
            y = fn.gaussian_blur(y, sigma=fn.random.uniform(range=[0.1, 2.0]), window_size=k)
        else:
            y = y
        solar = fn.random.coin_flip(probability=0.2)
        y = y + solar * (y >= 128.0) * (255.0 - 2.0 * y)                    # x -> 255 - x where x >= 128
    return y


class DaliLoader:
    """Training batches of image files (ImageFiles) from a DALI pipeline; see the module docstring. backend 'dali-gpu' when
    `device` is CUDA (decode and augment on that GPU), 'dali-cpu' otherwise (tests, machines without a GPU)."""

    def __init__(self, data: ImageFiles, *, img_size: int, in_chans: int, batch_size: int, rank: int = 0,
                 world: int = 1, seed: int = 0, num_views: int = 1, crop_scale=(0.2, 1.0), ctaug: bool = False,
                 device: str | torch.device = "cpu", num_threads: int = 0, skip_corrupt: bool = False,
                 hw_decoder_load: float = 0.65, antialias: bool = True):
        reason = why_not(data, "cuda")
        if reason:
            raise DataError(f"DaliLoader: {reason}")
        if in_chans != 3:
            raise DataError(f"image folders decode to RGB: model.in_chans must be 3, got {in_chans}")
        self.data, self.img_size, self.n, self.rank, self.world, self.seed = data, img_size, batch_size, rank, world, seed
        self.G, self.num_views, self.crop_scale, self.ctaug = batch_size * world, num_views, tuple(crop_scale), ctaug
        self.device, self.antialias = torch.device(device), antialias
        self.device_id = None
        if self.device.type == "cuda":
            self.device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.backend = "dali-gpu" if self.device_id is not None else "dali-cpu"
        self.num_threads = num_threads if num_threads > 0 else 4
        self.hw_decoder_load, self.skip_corrupt, self.skipped = hw_decoder_load, skip_corrupt, {}
        self._drop = bad_file_mask(data, skip_corrupt, self.skipped, dali=True)
        self.n_valid = len(data) - int(self._drop.sum())
        if self.n_valid < self.G:
            raise DataError(f"dataset has {self.n_valid} samples, fewer than one global batch ({self.G} = "
                             f"{batch_size} x {world} ranks)")
        self.epoch, self.start_step = 0, 0

    def __len__(self) -> int:
        return self.n_valid // self.G

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def _rank_major(self, order: torch.Tensor, start: int) -> torch.Tensor:
        """[world * K * n] ids: for each rank r, its rows of steps start..len-1, so DALI's shard r is rank r's."""
        steps = order[:len(self) * self.G].view(len(self), self.world, self.n)[start:]   # [K, world, n]
        return steps.transpose(0, 1).reshape(-1)

    def _build(self, ids: torch.Tensor, start: int):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
        seed = hash((self.seed, self.epoch, self.rank, start, len(self.skipped))) & 0x7FFFFFFF
        ids_list = ids.tolist()
        p = build_pipeline([self.data.files[i] for i in ids_list], ids_list, batch_size=self.n, shard_id=self.rank,
                           num_shards=self.world, seed=seed, img_size=self.img_size, crop_scale=self.crop_scale,
                           num_views=self.num_views, ctaug=self.ctaug, mean=self.data.mean, std=self.data.std,
                           device_id=self.device_id, num_threads=self.num_threads,
                           hw_decoder_load=self.hw_decoder_load, antialias=self.antialias)
        names = [f"view_{v}" for v in range(self.num_views)] + ["idx"]
        return p, DALIGenericIterator(p, names, reader_name=READER, last_batch_policy=LastBatchPolicy.DROP,
                                      auto_reset=False)

    def __iter__(self):
        order = epoch_order(len(self.data), self.seed, self.epoch, self._drop)
        ids = self._rank_major(order, self.start_step)        # the whole list; this rank reads its shard
        step, K = self.start_step, len(self) - self.start_step
        mine = ids.view(self.world, K * self.n)[self.rank] if K > 0 else ids[:0]
        pipe = it = None
        try:
            while step < len(self):
                try:
                    if it is None:                         # the iterator runs the first batch while it is built
                        pipe, it = self._build(ids, step)
                    out = next(it)[0]
                except StopIteration:
                    break
                except Exception as exc:                   # a DALI pipeline error: name the file, or skip it
                    pos = (step - self.start_step) * self.n
                    reason = _dali_reason(str(exc))
                    bad = self._culprits(str(exc), mine[pos:].tolist(), (PREFETCH + 2) * self.n)
                    where = f"rank {self.rank}, epoch {self.epoch}, step {step}"
                    if not bad:
                        raise RuntimeError(f"DALI pipeline failed ({where}) and no file of the batches in flight "
                                           f"fails to decode with PIL: {reason}") from exc
                    if not self.skip_corrupt:
                        named = "; ".join(f"{self.data.files[i]!r} ({why})" for i, why in bad.items())
                        raise DataError(f"DALI could not decode {named} ({where}); set data.skip_corrupt=true "
                                         f"to skip such files") from exc
                    for i, why in bad.items():
                        note_skipped(self.skipped, self.data.files[i], why)
                    del it, pipe
                    pipe = it = None
                    ids, mine = self._replace(ids, mine, step)
                    continue
                idx = out["idx"].view(-1).to(torch.long)   # CPU: the reader's labels never leave the host
                batch = {"views": [out[f"view_{v}"].to(self.device, non_blocking=True) for v in range(self.num_views)],
                         "idx": idx.to(self.device, non_blocking=True),
                         "label": self.data.labels[idx].to(self.device, non_blocking=True)}
                step += 1
                yield batch
        finally:
            del it, pipe
        self.start_step = 0

    def _replace(self, ids: torch.Tensor, mine: torch.Tensor, step: int):
        """The rest of the epoch from `step` with files in self.skipped replaced inside their batches."""
        bad = {i for i, f in enumerate(self.data.files) if f in self.skipped}
        rows = ids.view(self.world, -1, self.n)[:, step - self.start_step:]          # [world, K', n]
        rows = torch.tensor([[substitute(b, [i for i in b if i not in bad], self.data.files) for b in r]
                             for r in rows.tolist()], dtype=torch.long)
        self.start_step, ids = step, rows.reshape(-1)
        return ids, ids.view(self.world, -1)[self.rank]

    def _culprits(self, message: str, rest: list[int], in_flight: int) -> dict[int, str]:
        """{sample id: reason} for the files behind a DALI error: the files of this rank's rest of the epoch that
        the message names, else those of the first `in_flight` (the batches DALI was working on) that PIL cannot
        decode."""
        named = {i: _dali_reason(message) for i in rest if self.data.files[i] in message}
        if named:
            return named
        found = {}
        for i in rest[:in_flight]:
            try:
                self.data.load(i)
            except ValueError as exc:
                found[i] = str(exc.__cause__ or exc)
        return found


def _dali_reason(message: str) -> str:
    """The informative line of a DALI error: the one after 'encountered:', else the last that is not boilerplate."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for k, ln in enumerate(lines[:-1]):
        if ln.startswith("encountered"):
            return lines[k + 1]
    rest = [ln for ln in lines if "no longer valid" not in ln]
    return rest[-1] if rest else message.strip()
