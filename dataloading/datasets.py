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
    """root/<class>/<image>. Classes sorted by name; files sorted; index i is the sample id."""

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist")
        self.root = root
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not self.classes:
            raise ValueError(f"image folder {root!r} holds no class folders")
        self.files, labels = [], []
        for ci, c in enumerate(self.classes):
            names = sorted(f for f in os.listdir(os.path.join(root, c)) if f.lower().endswith(IMAGE_EXTENSIONS))
            if not names:
                raise ValueError(f"class folder {os.path.join(root, c)!r} holds no images {IMAGE_EXTENSIONS}")
            self.files += [os.path.join(root, c, n) for n in names]
            labels += [ci] * len(names)
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.num_classes, self.mean, self.std = len(self.classes), IMAGENET_MEAN, IMAGENET_STD

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
