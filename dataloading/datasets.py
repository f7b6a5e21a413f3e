"""Data sources. Two kinds:

ArrayData     the whole dataset as a uint8 tensor [N, C, H, W] in memory (Fashion-MNIST, or any array set):
              batches are gathered by index and augmented batch-wise on the training device.
ImageFolder   a directory of class folders of JPEG/PNG files, decoded per sample (PIL) in loader workers.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass

import numpy as np
import torch

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                       "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class ArrayData:
    images: torch.Tensor   # uint8 [N, C, H, W]
    labels: torch.Tensor   # int64 [N]
    mean: tuple
    std: tuple
    num_classes: int

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, idx: torch.Tensor) -> "ArrayData":
        return ArrayData(self.images[idx], self.labels[idx], self.mean, self.std, self.num_classes)


def read_idx(path: str) -> np.ndarray:
    """Read an idx file (optionally .gz): magic (0, 0, dtype, ndim), ndim big-endian int32 sizes, data."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    want = int(np.prod(dims)) + 4 + 4 * ndim
    if len(raw) != want:
        raise ValueError(f"{path} is truncated or corrupt: {len(raw)} bytes, expected {want} for shape {dims}")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(root: str | None, split: str) -> ArrayData:
    root = root or FASHION_MNIST_ROOT
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    paths = [os.path.join(root, f) for f in FASHION_MNIST_FILES[split]]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found: missing {missing}. Fix: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu, "
            f"installs to {FASHION_MNIST_ROOT}) or pass data.root=DIR holding the four idx .gz files.")
    images = torch.from_numpy(read_idx(paths[0]).copy()).unsqueeze(1)   # [N, 1, 28, 28]
    labels = torch.from_numpy(read_idx(paths[1]).astype(np.int64))
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{paths[0]} has {images.shape[0]} images but {paths[1]} has {labels.shape[0]} labels")
    return ArrayData(images, labels, FASHION_MNIST_MEAN, FASHION_MNIST_STD, 10)


class ImageFolder:
    """root/<class>/<image>. Classes sorted by name; files sorted; index i is the sample id.

    An empty class folder keeps its class index (so train and val labels agree) and is reported by validate(),
    like a file that cannot be an image: the loaders raise naming it, or skip it with skip_corrupt=True.
    """

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist")
        self.root = root
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not self.classes:
            raise ValueError(f"image folder {root!r} holds no class folders")
        self.files, labels, self.empty_classes = [], [], []
        for ci, c in enumerate(self.classes):
            names = sorted(f for f in os.listdir(os.path.join(root, c)) if f.lower().endswith(IMAGE_EXTENSIONS))
            if not names:
                self.empty_classes.append(os.path.join(root, c))
            self.files += [os.path.join(root, c, n) for n in names]
            labels += [ci] * len(names)
        if not self.files:
            raise ValueError(f"image folder {root!r}: its class folders hold no images {IMAGE_EXTENSIONS}")
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.num_classes, self.mean, self.std = len(self.classes), IMAGENET_MEAN, IMAGENET_STD
        self._problems: dict[int, str] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> torch.Tensor:
        """Decode file i to uint8 [3, H, W]; a bad file raises naming the file."""
        from PIL import Image
        path = self.files[i]
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
        except Exception as exc:
            raise ValueError(f"cannot decode image {path!r}: {exc}") from exc
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    def validate(self, workers: int = 16) -> dict[int, str]:
        """{sample id: reason} for files that cannot be images, found cheaply (size, header, end marker; a full
        decode only for files whose end marker is missing), plus {-1 - k: reason} for empty class folder k of
        empty_classes. Deterministic, so every rank finds the same set; computed once and cached."""
        if self._problems is None:
            from concurrent.futures import ThreadPoolExecutor
            chunks = [range(s, min(s + 1024, len(self.files))) for s in range(0, len(self.files), 1024)]
            with ThreadPoolExecutor(max_workers=max(1, min(workers, len(chunks)))) as ex:
                found = ex.map(lambda r: [(i, check_image_file(self.files[i])) for i in r], chunks)
                problems = {i: why for part in found for i, why in part if why}
            for k, folder in enumerate(self.empty_classes):
                problems[-1 - k] = f"class folder {folder!r} holds no images {IMAGE_EXTENSIONS}"
            self._problems = problems
        return self._problems


# file signatures: (offset, bytes); webp is RIFF....WEBP
_MAGIC = {"jpeg": [(0, b"\xff\xd8\xff")], "png": [(0, b"\x89PNG\r\n\x1a\n")], "bmp": [(0, b"BM")],
          "webp": [(0, b"RIFF"), (8, b"WEBP")]}
_PNG_END = b"IEND\xaeB`\x82"


def check_image_file(path: str) -> str | None:
    """Why `path` cannot be a decodable image, or None. Reads 16 bytes at the start and 1 KiB at the end: empty,
    unreadable, unknown signature; a JPEG without its end marker (FF D9) in the last KiB, or a PNG not ending in
    IEND, is decoded in full (PIL) to tell a truncated file from one with data appended after the image."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file (0 bytes)"
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(max(0, size - 1024))
            tail = f.read()
    except OSError as exc:
        return f"unreadable: {exc}"
    kind = next((k for k, sigs in _MAGIC.items() if all(head[o:o + len(m)] == m for o, m in sigs)), None)
    if kind is None:
        return f"not an image (unrecognised signature {head[:8].hex()})"
    if (kind == "jpeg" and b"\xff\xd9" not in tail) or (kind == "png" and not tail.endswith(_PNG_END)):
        try:
            from PIL import Image
            with Image.open(path) as im:
                im.load()
        except Exception as exc:
            return f"truncated or corrupt {kind} ({size} bytes): {exc}"
    return None


def load_data(name: str, root: str | None, split: str):
    """'fashion_mnist' -> ArrayData; 'imagefolder' -> ImageFolder(root/split)."""
    if name == "fashion_mnist":
        return fashion_mnist(root, split)
    if name == "imagefolder":
        if not root:
            raise ValueError("data.name=imagefolder needs data.root=DIR (with train/ and val/ class folders)")
        sub = os.path.join(root, "val" if split == "test" and os.path.isdir(os.path.join(root, "val")) else split)
        return ImageFolder(sub)
    raise ValueError(f"unknown data.name {name!r}; choose 'fashion_mnist' or 'imagefolder'")
