"""WebDataset tar shards (data.name=wds): an index over local shards, random access for evaluation, and a streaming
training loader (buffer shuffle, split over ranks and loader workers, a fixed number of steps per epoch).

Shards. data.root is a folder (its train-*.tar are the training split and val-*.tar the evaluation split, sorted:
what `python -m maect.dataloading.export --format wds --out DIR` writes), one .tar, or a brace pattern such as
`shards/train-{000000..000099}.tar` (braceexpand, as webdataset expands it; a glob such as `shards/*.tar` works too,
sorted). With a file or pattern, data.labels names the evaluation shards the same way (folder: DIR/val-*.tar). Only
uncompressed tar files are read (images are compressed already), from local or mounted storage.

Samples follow the WebDataset convention (webdataset.tariterators.base_plus_ext): a member `dir/key.ext` belongs to
sample `dir/key` (the name up to its first dot), and consecutive members with the same key form one sample. The
image is the member whose extension is one of jpg, jpeg, png, bmp, webp, tif, tiff (the first of that list if a
sample has several); it decodes by images.decode_image, the rule image folders use. The label is the integer in the
sample's `cls` member when it has one, else -1 (unlabelled). Members whose name has no dot, or starts with '.', are
ignored. A sample without an image is reported like a bad image file (the loaders stop naming it, or leave it out
with data.skip_corrupt=true); a key that reappears later in the same shard, a `cls` that is not an integer, a member
that runs past the end of the file (a truncated shard) or a file that is not a tar file are errors naming the shard.

Sample ids. Shards are indexed once when the data are opened (their tar headers and `cls` members are read; every
rank reads the same index): sample id = position in the listed shard order, then in tar order within the shard. The
ids are what the NN queue's self-exclusion and the per-sample crop seeds use, as for image files.

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

import glob
import io
import logging
import os
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from maect.dataloading import augment as A
from maect.dataloading.datasets import IMAGENET_MEAN, IMAGENET_STD, ImageFiles, NoLabels
from maect.dataloading.images import DataError, check_image_file, decode_image
from maect.dataloading.shared import bad_file_mask, epoch_order, substitute

log = logging.getLogger("maect.data")
IMAGE_EXTS = ("jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff")     # images.IMAGE_EXTENSIONS, as WebDataset keys
PIP = "pip install webdataset"


# ------------------------------------------------------------------------------------------------ shard lists
def expand(spec: str) -> list[str]:
    """The shard paths of a brace pattern, a glob, a comma-free single path; DataError names a missing shard."""
    try:
        from braceexpand import braceexpand
    except ImportError:
        raise DataError(f"data.name=wds needs the webdataset package: {PIP}") from None
    paths = []
    for p in braceexpand(spec):
        if any(c in p for c in "*?["):
            found = sorted(glob.glob(p))
            if not found:
                raise DataError(f"no shard matches {p!r}")
            paths += found
        else:
            paths.append(p)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} of {len(paths)} shards of {spec!r} do not exist (first: {missing[0]!r})")
    return paths


def shard_paths(root: str, split: str, labels: str = "") -> list[str]:
    """The shards of split 'train' (data.root) or 'test' (data.labels; with data.root=DIR: DIR/val-*.tar).
    NoLabels when no evaluation shards are named."""
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    if not root:
        raise DataError("data.name=wds needs data.root=DIR (train-*.tar, val-*.tar) or a shard pattern "
                        "(shards/train-{000000..000009}.tar)")
    if split == "test" and labels:
        return expand(labels)
    if os.path.isdir(root):
        name = "train" if split == "train" else "val"
        found = sorted(glob.glob(os.path.join(glob.escape(root), f"{name}-*.tar")))
        if not found:
            msg = (f"data.root={root!r} holds no {name}-*.tar shards (python -m maect.dataloading.export --format wds "
                   f"--out DIR writes DIR/train-000000.tar ... and DIR/val-000000.tar ...)")
            raise (NoLabels if split == "test" else DataError)(msg)
        return found
    if split == "test":
        raise NoLabels(f"data.root={root!r} names the training shards only: set data.labels=PATTERN to the "
                       f"evaluation shards (or pass a folder with train-*.tar and val-*.tar)")
    return expand(root)


# ------------------------------------------------------------------------------------------------ the index
@dataclass
class ShardIndex:
    path: str
    keys: list            # sample keys, tar order
    image_ext: list       # the image member's extension per sample ('' = none)
    offset: np.ndarray    # int64 [n] byte offset of the image member's data (-1: none)
    size: np.ndarray      # int64 [n] its size in bytes
    label: np.ndarray     # int64 [n] the cls value, -1 without one


def index_shard(path: str) -> ShardIndex:
    """Read a shard's tar headers (and its cls members) into a ShardIndex; DataError names the shard."""
    from webdataset.tariterators import base_plus_ext
    samples, order = {}, []
    try:
        end = os.path.getsize(path)
        with tarfile.open(path, "r:") as tf:
            last = None
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = base_plus_ext(m.name)
                if key is None or os.path.basename(m.name).startswith("."):
                    continue
                if m.offset_data + m.size > end:
                    raise DataError(f"shard {path!r} is truncated: member {m.name!r} runs past the end of the file")
                if key != last:
                    if key in samples:
                        raise DataError(f"shard {path!r}: sample {key!r} appears twice (member {m.name!r} is not "
                                        f"next to the sample's other members)")
                    samples[key], last = {}, key
                    order.append(key)
                ext = ext.lower()
                if ext == "cls":
                    raw = tf.extractfile(m).read()
                    try:
                        samples[key]["cls"] = int(raw.decode("utf-8").strip())
                    except ValueError:
                        raise DataError(f"shard {path!r}: {m.name!r} is not an integer class ({raw[:20]!r})") from None
                elif ext in IMAGE_EXTS:
                    samples[key].setdefault("img", []).append((ext, m.offset_data, m.size))
    except tarfile.TarError as exc:
        raise DataError(f"shard {path!r} is not a readable (uncompressed) tar file: {exc}") from None
    except OSError as exc:
        raise DataError(f"shard {path!r} cannot be read: {exc}") from None
    n = len(order)
    idx = ShardIndex(path, order, [""] * n, np.full(n, -1, np.int64), np.zeros(n, np.int64), np.full(n, -1, np.int64))
    for i, key in enumerate(order):
        s = samples[key]
        if "img" in s:
            ext, off, size = min(s["img"], key=lambda t: IMAGE_EXTS.index(t[0]))
            idx.image_ext[i], idx.offset[i], idx.size[i] = ext, off, size
        idx.label[i] = s.get("cls", -1)
    return idx


class _Names:
    """Lazy 'shard.tar:key.ext' names (what messages and the skip records show), one per sample."""

    def __init__(self, data: "ShardData"):
        self.d = data

    def __len__(self) -> int:
        return len(self.d.sample_shard)

    def __getitem__(self, i: int) -> str:
        s, j = int(self.d.sample_shard[i]), int(self.d.sample_pos[i])
        sh = self.d.shards[s]
        return f"{sh.path}:{sh.keys[j]}.{sh.image_ext[j] or '<no image>'}"

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class _Member(io.RawIOBase):
    """A read-only, seekable window [offset, offset + size) of an open file descriptor (os.pread: thread-safe)."""

    def __init__(self, fd: int, offset: int, size: int):
        self.fd, self.base, self.n, self.pos = fd, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = max(0, {0: pos, 1: self.pos + pos, 2: self.n + pos}[whence])
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:
        k = max(0, min(len(b), self.n - self.pos))
        data = os.pread(self.fd, k, self.base + self.pos) if k else b""
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)


class _Fds:
    """Open shard file descriptors of this process (reopened after a fork)."""

    def __init__(self):
        self.pid, self.fds, self.lock = os.getpid(), {}, threading.Lock()

    def get(self, path: str) -> int:
        with self.lock:
            if self.pid != os.getpid():
                self.pid, self.fds = os.getpid(), {}
            if path not in self.fds:
                self.fds[path] = os.open(path, os.O_RDONLY)
            return self.fds[path]

    def __getstate__(self):              # a pickled copy (spawned loader workers) opens its own descriptors
        return {}

    def __setstate__(self, state):
        self.__init__()


class ShardData(ImageFiles):
    """The samples of a list of shards (an ImageFiles, so evaluation, the file checks and the monitors read it as
    they read image files). files: 'shard:key.ext' names; labels int64 [N] (cls, -1 without); classes '0'..'C-1'
    (C = the largest cls + 1); shards: the ShardIndex list; sample_shard / sample_pos int64 [N]: each sample's shard
    and position in it."""

    def __init__(self, shards: list[ShardIndex], root: str, sample_shard=None, sample_pos=None, num_classes=None):
        self.shards, self.root = shards, root
        if sample_shard is None:
            sample_shard = np.concatenate([np.full(len(s.keys), k, np.int64) for k, s in enumerate(shards)] or
                                          [np.zeros(0, np.int64)])
            sample_pos = np.concatenate([np.arange(len(s.keys), dtype=np.int64) for s in shards] or
                                        [np.zeros(0, np.int64)])
        self.sample_shard, self.sample_pos = np.asarray(sample_shard), np.asarray(sample_pos)
        self.files = _Names(self)
        start = np.cumsum([0] + [len(s.keys) for s in shards])[:-1].astype(np.int64)
        every = np.concatenate([s.label for s in shards] or [np.zeros(0, np.int64)])
        lab = every[start[self.sample_shard] + self.sample_pos] if len(self.sample_shard) else np.zeros(0, np.int64)
        self.labels = torch.from_numpy(np.ascontiguousarray(lab, dtype=np.int64))
        if num_classes is None:
            num_classes = int(lab.max()) + 1 if len(lab) and lab.max() >= 0 else 0
        self.classes = [str(c) for c in range(num_classes)]
        self.num_classes, self.empty_classes = num_classes, []
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self._problems, self._fds = {}, _Fds()

    def __len__(self) -> int:
        return len(self.sample_shard)

    def subset(self, idx) -> "ShardData":
        idx = torch.as_tensor(idx, dtype=torch.long).numpy()
        return ShardData(self.shards, self.root, self.sample_shard[idx], self.sample_pos[idx], self.num_classes)

    def member(self, i: int) -> tuple[str, int, int]:
        """(shard path, byte offset, size) of sample i's image member (offset -1: the sample has none)."""
        sh = self.shards[int(self.sample_shard[i])]
        j = int(self.sample_pos[i])
        return sh.path, int(sh.offset[j]), int(sh.size[j])

    def read(self, i: int) -> bytes:
        """The encoded image bytes of sample i."""
        path, off, size = self.member(i)
        if off < 0:
            raise DataError(f"{self.files[i]}: the sample has no image member ({', '.join(IMAGE_EXTS)})")
        data = os.pread(self._fds.get(path), size, off)
        if len(data) != size:
            raise DataError(f"{self.files[i]}: {len(data)} of {size} bytes read (the shard changed or is truncated)")
        return data

    def load(self, i: int, raw: bytes | None = None) -> torch.Tensor:
        """Decode sample i (or its bytes `raw`) to uint8 [3, H, W] by images.decode_image; BadImage names it."""
        raw = self.read(i) if raw is None else raw
        return torch.from_numpy(decode_image(self.files[i], lambda: io.BytesIO(raw))).permute(2, 0, 1)

    def validate(self, workers: int = 16, dali: bool = False) -> dict[int, str]:
        """{sample id: reason} for samples without an image member or whose member fails images.check_image_file
        (16 bytes at its start, 1 KiB at its end; a full decode only where that cannot decide). Cached."""
        if dali not in self._problems:
            def check(r):
                out = []
                for i in r:
                    path, off, size = self.member(i)
                    if off < 0:
                        out.append((i, f"no image member ({', '.join(IMAGE_EXTS)}) in the sample"))
                        continue
                    fd = self._fds.get(path)
                    out.append((i, check_image_file(self.files[i], dali, lambda: _Member(fd, off, size))))
                return out
            n = len(self)
            chunks = [range(s, min(s + 1024, n)) for s in range(0, n, 1024)]
            with ThreadPoolExecutor(max_workers=max(1, min(workers, len(chunks)))) as ex:
                self._problems[dali] = {i: why for part in ex.map(check, chunks) for i, why in part if why}
        return self._problems[dali]


def open_shards(root: str, split: str, labels: str = "", workers: int = 16) -> ShardData:
    """The ShardData of split 'train' or 'test' (shard_paths); shards indexed in parallel threads."""
    paths = shard_paths(root, split, labels)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(paths)))) as ex:
        shards = list(ex.map(index_shard, paths))
    data = ShardData(shards, labels if (split == "test" and labels) else root)
    if not len(data):
        raise DataError(f"the shards of {data.root!r} hold no samples (members named key.ext, WebDataset layout)")
    log.info(f"data: {len(data)} samples in {len(paths)} shard(s) of {data.root}" +
             ("" if data.has_labels else f" ({int((data.labels < 0).sum())} without a cls label)"))
    return data


# ------------------------------------------------------------------------------------------------ training
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
                 device="cpu", num_workers: int = 0, skip_corrupt: bool = False, shuffle_buffer: int = 1000):
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
            out.append(A.random_resized_crop_flip(img, self.img_size, self.crop_scale, A.Draw(gi, 1)))
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
