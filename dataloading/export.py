"""Export an in-memory array data set (Fashion-MNIST, any ArrayData) to an ImageFolder tree of image files.

    python -m maect.dataloading.export --out DIR [--data fashion_mnist] [--root SRC] [--limit N] [--format jpg|png]
                                       [--size S]

writes DIR/train/<class>/<idx>.<ext> (the train split) and DIR/val/<class>/<idx>.<ext> (the test split), the tree
`data.name=imagefolder data.root=DIR` reads. Class folders are the zero-padded class index ("0".."9") and file
names the zero-padded index in the source array, so ImageFolder's sorted order keeps label = class index and, within
a class, the source order. --limit N keeps the first N images of every class per split (a small balanced tree for
tests and benchmarks). --size S resizes every image to S x S first (PIL bicubic; e.g. 224 to benchmark a decoder at
ImageNet's input size). Images keep their channel count (Fashion-MNIST: 8-bit grayscale; the loaders decode to RGB).
JPEG quality 95 (4:4:4 for RGB): close to the arrays without the size of PNG.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from maect.dataloading.datasets import ArrayData, load_data

SPLITS = {"train": "train", "val": "test"}       # folder name -> source split


def export_split(data: ArrayData, out_dir: str, limit: int | None = None, fmt: str = "jpg", quality: int = 95,
                 size: int | None = None) -> int:
    """Write data to out_dir/<class>/<idx>.<fmt>; returns the number of files written."""
    from PIL import Image
    if fmt not in ("jpg", "png"):
        raise ValueError(f"--format must be jpg or png, got {fmt!r}")
    images = data.images.numpy()                  # uint8 [N, C, H, W]
    labels = data.labels.numpy()
    if images.shape[1] not in (1, 3):
        raise ValueError(f"only 1- or 3-channel images can be written as {fmt}, got {images.shape[1]} channels")
    cw, iw = len(str(max(data.num_classes - 1, 0))), len(str(max(len(labels) - 1, 0)))
    written = 0
    for c in range(data.num_classes):
        sel = np.flatnonzero(labels == c)
        if limit is not None:
            sel = sel[:limit]
        if not len(sel):              # no empty class folder (the file check reports those); labels stay the index
            continue
        folder = os.path.join(out_dir, f"{c:0{cw}d}")
        os.makedirs(folder, exist_ok=True)
        for i in sel.tolist():
            arr = images[i]
            im = Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0))
            if size:
                im = im.resize((size, size), Image.BICUBIC)
            path = os.path.join(folder, f"{i:0{iw}d}.{fmt}")
            if fmt == "jpg":
                im.save(path, quality=quality, subsampling=0)
            else:
                im.save(path)
            written += 1
    return written


def export(out: str, data: str = "fashion_mnist", root: str | None = None, limit: int | None = None,
           fmt: str = "jpg", size: int | None = None) -> dict:
    """Both splits of data set `data` to out/{train,val}; returns {folder: files written}."""
    counts = {}
    for folder, split in SPLITS.items():
        counts[folder] = export_split(load_data(data, root, split), os.path.join(out, folder), limit, fmt, size=size)
    return counts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="root of the ImageFolder tree to write")
    p.add_argument("--data", default="fashion_mnist", help="source data set (an array data set of load_data)")
    p.add_argument("--root", default=None, help="source data folder (default: the data set's own)")
    p.add_argument("--limit", type=int, default=None, help="first N images of every class per split")
    p.add_argument("--format", default="jpg", choices=["jpg", "png"])
    p.add_argument("--size", type=int, default=None, help="resize every image to SIZE x SIZE (bicubic)")
    a = p.parse_args(argv)
    if a.size is not None and a.size < 1:
        p.error(f"--size must be >= 1, got {a.size}")
    counts = export(a.out, a.data, a.root, a.limit, a.format, a.size)
    print(f"export: wrote {counts} images ({a.format}) under {a.out}")


if __name__ == "__main__":
    main()
