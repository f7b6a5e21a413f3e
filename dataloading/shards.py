"""WebDataset tar shards (data.name=wds): an index over local shards and random access to their samples (evaluation;
the training loader in dataloading/shard_loader.py streams them).

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

Training (streaming, buffer shuffle, split over ranks and loader workers): dataloading/shard_loader.py.
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

from maect.dataloading.datasets import IMAGENET_MEAN, IMAGENET_STD, ImageFiles, NoLabels
from maect.dataloading.images import DataError, check_image_file, decode_image

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
