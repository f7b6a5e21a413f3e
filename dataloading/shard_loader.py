"""The streaming training loader of WebDataset shards (data.name=wds): ShardLoader, the output contract of
loader.TrainLoader. The shards, their sample ids and the decode rule: dataloading/shards.py.

Epoch (ShardLoader). Every rank and loader worker derives the same plan from (seed, epoch):
  1. the shard order: shared.epoch_order over the shards (a permutation from (seed, epoch));
  2. the epoch sequence: the samples of the shards in that order, each shard's in tar order, without the samples
     the member check rejected (shared.bad_file_mask); N of them;
  3. rank r of W reads the contiguous part [r*N//W, (r+1)*N//W) of the sequence, and worker k of its K loader
     workers (data.num_workers; 0: one stream in the main process) the contiguous part [k*L//K, (k+1)*L//K) of the
     rank's L samples: no sample is read twice and together they read all N, whatever the shard sizes (a shard may
     be split between ranks or workers; fewer shards than ranks is fine);
  4. each worker reads its part in order and shuffles it through a buffer of data.shuffle_buffer samples (the
     classic streaming shuffle: fill the buffer, then emit a uniformly drawn element and put the next sample in its
     place; drain at the end in random order), from a generator seeded by (seed, epoch, rank, worker);
  5. the rank's stream is its workers' streams taken round-robin, one sample each (exhausted workers left out), and
     batch s of the rank is samples [s*n, (s+1)*n) of it (n = per-rank batch).
An epoch has N // (n*W) steps, the count the array and image-folder loaders give for N samples, so the trainer's
schedule is the same; each rank uses its first steps*n samples and the fewer than n*W left over in total (the
last few of each rank's shuffled stream) are dropped, different ones each epoch. Unlike the image-file loader, the
order depends on the rank count (each rank streams its own part), as with any sharded streaming reader.
set_epoch(epoch, start_step) resumes mid-epoch exactly: the workers replay their streams and skip, without decoding,
the samples of the steps already done (exactly with the same rank and worker counts as before; with others the
rest of that epoch follows the new plan: the step count is right, a few samples of it may repeat or be missed).

Augmentation as the image-file loader (loader.TrainLoader): per-image random resized crop and flip with parameters
from a generator seeded by (seed, epoch, sample id, view), run in the loader workers, then the batch-wise MAE-CTaug
colour operations on the device. Evaluation (eval_batches, the k-NN monitors) reads members by offset (os.pread).

Memory: each worker holds up to shuffle_buffer encoded samples (the compressed bytes) in its buffer.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from maect.dataloading import augment as A
from maect.dataloading.images import DataError
from maect.dataloading.shards import ShardData
from maect.dataloading.shared import bad_file_mask, epoch_order, substitute

log = logging.getLogger("maect.data")


def split_range(lo: int, hi: int, parts: int, k: int) -> tuple[int, int]:
    """Part k of `parts` contiguous parts of [lo, hi): [lo + k*L//parts, lo + (k+1)*L//parts), L = hi - lo."""
    L = hi - lo
    return lo + k * L // parts, lo + (k + 1) * L // parts


def buffer_shuffle(items, size: int, g: torch.Generator):
    """The streaming shuffle: fill a buffer of `size` items, then for each further item emit a uniformly drawn
    buffered one and put the new item in its place; at the end emit the rest in a random order. Deterministic in g."""
    buf = []
    for it in items:
        if len(buf) < size:
            buf.append(it)
            continue
        j = int(torch.randint(size, (1,), generator=g))
        out, buf[j] = buf[j], it
        yield out
    for j in torch.randperm(len(buf), generator=g).tolist():
        yield buf[j]


def round_robin(lengths: list[int]):
    """(worker, position in its stream) of the merged stream: one item of each worker in turn, exhausted ones left
    out."""
    for j in range(max(lengths, default=0)):
        for k, L in enumerate(lengths):
            if j < L:
                yield k, j


class _EpochStream(torch.utils.data.IterableDataset):
    """One rank's epoch: worker k (of the DataLoader's workers; 0 in the main process) streams its part."""

    def __init__(self, loader: "ShardLoader", parts: list[torch.Tensor], skip: list[int]):
        self.L, self.parts, self.skip = loader, parts, skip

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        k = info.id if info is not None else 0
        L, ids = self.L, self.parts[k]
        g = torch.Generator().manual_seed(((L.seed * 1000003 + L.epoch) * 1009 + L.rank) * 1009 + k)
        reads = ((i, L.data.read(i)) for i in ids.tolist())
        try:
            for j, (i, raw) in enumerate(buffer_shuffle(reads, L.buffer, g)):
                if j < self.skip[k]:
                    continue                      # a step already done (resume): no decode
                yield k, j, i, L.views_of(i, raw)
        except DataError as exc:                  # one line in the main process, not a worker traceback
            yield k, -1, -1, str(exc)


class ShardLoader:
    """Training batches from WebDataset shards, the output contract of loader.TrainLoader (see the module
    docstring for the epoch plan). backend 'cpu-wds'."""

    def __init__(self, data: ShardData, *, img_size: int, in_chans: int, batch_size: int, rank: int = 0,
                 world: int = 1, seed: int = 0, num_views: int = 1, crop_scale=(0.2, 1.0), ctaug: bool = False,
                 device="cpu", num_workers: int = 0, skip_corrupt: bool = False, shuffle_buffer: int = 1000,
                 antialias: bool = True):
        G = batch_size * world
        if shuffle_buffer < 1:
            raise DataError(f"data.shuffle_buffer must be >= 1, got {shuffle_buffer}")
        self.skip_corrupt, self.skipped = skip_corrupt, {}
        self._drop = bad_file_mask(data, skip_corrupt, self.skipped)
        n_valid = len(data) - int(self._drop.sum())
        if n_valid < G:
            raise DataError(f"dataset has {n_valid} samples, fewer than one global batch "
                            f"({G} = {batch_size} x {world} ranks)")
        if in_chans != 3:
            raise DataError(f"shards decode to RGB: model.in_chans must be 3, got {in_chans}")
        self.data, self.img_size, self.in_chans, self.n_valid = data, img_size, in_chans, n_valid
        self.n, self.rank, self.world, self.G, self.seed = batch_size, rank, world, G, seed
        self.num_views, self.crop_scale, self.ctaug = num_views, tuple(crop_scale), ctaug
        self.antialias = antialias                   # the crop resize (augment.resample_boxes; data.antialias)
        self.device, self.num_workers, self.buffer = torch.device(device), num_workers, shuffle_buffer
        self.epoch, self.start_step = 0, 0
        self.backend = "cpu-wds"
        order = np.argsort(data.sample_shard, kind="stable")          # sample ids grouped by shard, tar order
        counts = np.bincount(data.sample_shard, minlength=len(data.shards))
        keep = (~self._drop).numpy()
        self._by_shard = [torch.from_numpy(part[keep[part]]) for part in np.split(order, np.cumsum(counts)[:-1])]

    def __len__(self) -> int:
        return self.n_valid // self.G

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def epoch_sequence(self, epoch: int) -> torch.Tensor:
        """int64 [N]: the epoch's samples, shard by shard in the epoch's shard order (steps 1-2 of the plan)."""
        order = epoch_order(len(self._by_shard), self.seed, epoch)
        return torch.cat([self._by_shard[s] for s in order.tolist()])

    def worker_parts(self, epoch: int, rank: int | None = None) -> list[torch.Tensor]:
        """The sample ids each loader worker of `rank` reads in `epoch`, in reading order (step 3)."""
        seq, r = self.epoch_sequence(epoch), self.rank if rank is None else rank
        lo, hi = split_range(0, len(seq), self.world, r)
        K = max(1, self.num_workers)
        return [seq[slice(*split_range(lo, hi, K, k))] for k in range(K)]

    def views_of(self, i: int, raw: bytes):
        """Sample i decoded and cropped: a list of num_views float [1, 3, S, S] in [0, 1], or the reason it cannot
        be decoded (with skip_corrupt; without, BadImage propagates)."""
        try:
            img = self.data.load(i, raw).float().div_(255).unsqueeze(0)
        except ValueError as exc:
            if not self.skip_corrupt:
                raise
            return str(exc.__cause__ or exc)
        out = []
        for v in range(self.num_views):
            gi = torch.Generator().manual_seed(((self.seed * 1000003 + self.epoch) * 10000019 + i) * 8 + v)
            out.append(A.random_resized_crop_flip(img, self.img_size, self.crop_scale, A.Draw(gi, 1),
                                                  antialias=self.antialias))
        return out

    def __iter__(self):
        parts = self.worker_parts(self.epoch)
        lengths = [len(p) for p in parts]
        steps, start = len(self), self.start_step
        order, skip = round_robin(lengths), [0] * len(parts)
        for _ in range(start * self.n):               # resume: each worker's share of the steps already done
            skip[next(order)[0]] += 1
        stream = torch.utils.data.DataLoader(_EpochStream(self, parts, skip), batch_size=None,
                                             num_workers=self.num_workers)
        it, pending = iter(stream), {}
        try:
            for step in range(start, steps):
                batch = []
                while len(batch) < self.n:
                    want = next(order)
                    while want not in pending:        # workers' samples arrive in any order; emit round-robin
                        k, j, i, views = next(it)
                        if j < 0:
                            raise DataError(views)
                        pending[(k, j)] = (i, views)
                    batch.append(pending.pop(want))
                yield self._collate(batch, step)
        finally:
            del it
        self.start_step = 0

    def _collate(self, batch: list, step: int) -> dict:
        ids = [i for i, _ in batch]
        good = {i: v for i, v in batch if not isinstance(v, str)}
        for i, v in batch:
            if isinstance(v, str):
                name = self.data.files[i]
                self.skipped[name] = v
                log.warning(f"data: skip_corrupt: {name} cannot be decoded ({v}); replaced in its batch "
                            f"({len(self.skipped)} skipped so far)")
        ids = substitute(ids, good.keys(), self.data.files)
        g = torch.Generator().manual_seed((self.seed * 1000003 + self.epoch) * 1000003 + step)
        sel = slice(self.rank * self.n, (self.rank + 1) * self.n)
        views = []
        for v in range(self.num_views):
            y = A.h2d(torch.cat([good[i][v] for i in ids]), self.device)
            if self.ctaug:
                y = A.ctaug_view(y, v, A.Draw(g, self.G, sel))
            views.append(A.normalize(y, self.data.mean, self.data.std))
        idx = torch.tensor(ids, dtype=torch.long)
        return {"views": views, "idx": A.h2d(idx, self.device), "label": A.h2d(self.data.labels[idx], self.device)}


# DALI's fn.readers.webdataset reads the same tar files, but not in this loader's order: it shuffles through a
# buffer seeded once per pipeline and splits the sample list into shards by its own rule, and cannot start an epoch
# at a given step; so the shards are always read by ShardLoader, and the log says why.
DALI_NOTE = ("DALI's webdataset reader cannot follow this loader's per-epoch shard order, rank/worker split and "
             "mid-epoch resume (its shuffle buffer is seeded once per pipeline); the torch loader reads the shards")


def build_shard_loader(data: ShardData, cfg_data, **kw) -> ShardLoader:
    """loader.build_loader's choice for data.name=wds: always ShardLoader (data.loader=dali or auto: logged why)."""
    choice = cfg_data.loader
    if choice not in ("auto", "cpu", "dali"):
        raise DataError(f"data.loader must be auto, cpu or dali, got {choice!r}")
    loader = ShardLoader(data, num_workers=cfg_data.num_workers, skip_corrupt=bool(cfg_data.skip_corrupt),
                         shuffle_buffer=int(getattr(cfg_data, "shuffle_buffer", 1000)), **kw)
    why = "" if choice == "cpu" else f"; not dali: {DALI_NOTE}"
    msg = f"data: loader {loader.backend} (data.loader={choice}{why})"
    (log.warning if choice == "dali" else log.info)(msg)
    return loader
