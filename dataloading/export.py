"""Export a data set to an ImageFolder tree of image files, or to WebDataset tar shards.

    python -m maect.dataloading.export --out DIR [--data fashion_mnist] [--root SRC] [--limit N] [--format jpg|png]
                                       [--size S]
    python -m maect.dataloading.export --out DIR --format wds [--data NAME] [--root SRC] [--labels L] [--limit N]
                                       [--shard-size 10000] [--image-format jpg|png] [--size S]

writes DIR/train/<class>/<idx>.<ext> (the train split) and DIR/val/<class>/<idx>.<ext> (the test split), the tree
`data.name=imagefolder data.root=DIR` reads. Class folders are the zero-padded class index ("0".."9") and file
names the zero-padded index in the source array, so ImageFolder's sorted order keeps label = class index and, within
a class, the source order. --limit N keeps the first N images of every class per split (a small balanced tree for
tests and benchmarks). --size S resizes every image to S x S first (PIL bicubic; e.g. 224 to benchmark a decoder at
ImageNet's input size). Images keep their channel count (Fashion-MNIST: 8-bit grayscale; the loaders decode to RGB).
JPEG quality 95 (4:4:4 for RGB): close to the arrays without the size of PNG.

--format wds writes DIR/train-000000.tar, DIR/train-000001.tar, ... (the train split) and DIR/val-000000.tar, ...
(the evaluation split: the test split of an array set, val/ of an image folder, data.labels' val rows), --shard-size
samples per shard, the layout `data.name=wds data.root=DIR` reads (dataloading/shards.py). The source is any
data.name (--data, --root, --labels as the config's data.* keys): array images are encoded (--image-format, the
same encoders as the folder export), image files are stored as they are (their bytes, their extension), so a
sample decodes exactly as its file does. Sample key: the zero-padded sample index in the source (source order);
members KEY.<ext> and, for a labelled sample, KEY.cls (the class index as text). --limit N keeps the first N
samples of every class (unlabelled sources: the first N). A source without an evaluation split writes train shards
only. Each shard is written to a temporary name and renamed when complete (written with webdataset's TarWriter,
fixed member times, so an export is byte-for-byte repeatable).
"""
from __future__ import annotations

import argparse
import io
import os

import numpy as np

from maect.dataloading.datasets import ArrayData, NoLabels, load_data, load_eval_data

SPLITS = {"train": "train", "val": "test"}       # folder name -> source split


def export_split(data: ArrayData, out_dir: str, limit: int | None = None, fmt: str = "jpg", quality: int = 95,
                 size: int | None = None) -> int:
    """Write data to out_dir/<class>/<idx>.<fmt>; returns the number of files written."""
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
            with open(os.path.join(folder, f"{i:0{iw}d}.{fmt}"), "wb") as f:
                f.write(encode_array_image(images[i], fmt, quality, size))
            written += 1
    return written


def encode_array_image(arr: np.ndarray, fmt: str = "jpg", quality: int = 95, size: int | None = None) -> bytes:
    """uint8 [C, H, W] (C = 1 or 3) -> the bytes of a jpg (quality, 4:4:4) or png file, resized to size x size
    (bicubic) first when size is given."""
    from PIL import Image
    im = Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0))
    if size:
        im = im.resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    if fmt == "jpg":
        im.save(buf, format="JPEG", quality=quality, subsampling=0)
    else:
        im.save(buf, format="PNG")
    return buf.getvalue()


def select(labels: np.ndarray, limit: int | None) -> np.ndarray:
    """Source indices to export, in source order: all, or the first `limit` of every class (label -1: of all)."""
    if limit is None:
        return np.arange(len(labels))
    keep = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        keep[np.flatnonzero(labels == c)[:limit]] = True
    return np.flatnonzero(keep)


def write_shards(data, out_dir: str, prefix: str, shard_size: int = 10000, image_format: str = "jpg",
                 size: int | None = None, limit: int | None = None, quality: int = 95) -> list[str]:
    """data (ArrayData or ImageFiles) -> out_dir/{prefix}-000000.tar, ... of shard_size samples each (see the module
    docstring); returns the shard paths."""
    try:
        import webdataset as wds
    except ImportError:
        raise SystemExit("export --format wds needs the webdataset package: pip install webdataset") from None
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    if isinstance(data, ArrayData) and data.images.shape[1] not in (1, 3):
        raise ValueError(f"only 1- or 3-channel images can be written as {image_format}, got {data.images.shape[1]}")
    labels = data.labels.numpy()
    ids = select(labels, limit)
    kw = max(6, len(str(max(len(labels) - 1, 0))))
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for s, lo in enumerate(range(0, len(ids), shard_size)):
        path = os.path.join(out_dir, f"{prefix}-{s:06d}.tar")
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            w = wds.TarWriter(f, encoder=False, mtime=0.0)
            for i in ids[lo:lo + shard_size].tolist():
                if isinstance(data, ArrayData):
                    ext, raw = image_format, encode_array_image(data.images[i].numpy(), image_format, quality, size)
                else:
                    name = data.files[i]
                    ext = os.path.splitext(name)[1].lstrip(".").lower()
                    if size:
                        raise ValueError("--size applies to array sources; image files are stored as they are")
                    if hasattr(data, "read"):             # shards: the image member's bytes
                        raw = data.read(i)
                    else:
                        with open(name, "rb") as g:
                            raw = g.read()
                sample = {"__key__": f"{i:0{kw}d}", ext: raw}
                if labels[i] >= 0:
                    sample["cls"] = str(int(labels[i])).encode()
                w.write(sample)
            w.close()
        os.replace(tmp, path)
        paths.append(path)
    return paths


def export_wds(out: str, data: str = "fashion_mnist", root: str | None = None, labels: str = "",
               limit: int | None = None, shard_size: int = 10000, image_format: str = "jpg",
               size: int | None = None) -> dict:
    """Both splits of source `data` to out/train-*.tar and out/val-*.tar; returns {split: [shard paths]}."""
    out_paths = {"train": write_shards(load_data(data, root, "train", labels), out, "train", shard_size,
                                       image_format, size, limit)}
    try:
        # shards -> shards keeps the val samples without cls (evaluation leaves them out, an export copies them)
        val = (load_data if data == "wds" else load_eval_data)(data, root, "test", labels)
    except NoLabels as e:
        print(f"export: no evaluation split ({e}); train shards only")
        return out_paths
    out_paths["val"] = write_shards(val, out, "val", shard_size, image_format, size, limit)
    return out_paths


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
    p.add_argument("--data", default="fashion_mnist",
                   help="source data set (a data.name; the folder export: an array data set)")
    p.add_argument("--root", default=None, help="source data folder (default: the data set's own)")
    p.add_argument("--labels", default="", help="the source's data.labels (folder / filelist / wds sources)")
    p.add_argument("--limit", type=int, default=None, help="first N images of every class per split")
    p.add_argument("--format", default="jpg", choices=["jpg", "png", "wds"],
                   help="jpg / png: an ImageFolder tree of such files; wds: WebDataset tar shards")
    p.add_argument("--image-format", default="jpg", choices=["jpg", "png"], help="wds: encoding of array images")
    p.add_argument("--shard-size", type=int, default=10000, help="wds: samples per shard")
    p.add_argument("--size", type=int, default=None, help="resize every image to SIZE x SIZE (bicubic)")
    a = p.parse_args(argv)
    if a.size is not None and a.size < 1:
        p.error(f"--size must be >= 1, got {a.size}")
    if a.format == "wds":
        if a.shard_size < 1:
            p.error(f"--shard-size must be >= 1, got {a.shard_size}")
        paths = export_wds(a.out, a.data, a.root, a.labels, a.limit, a.shard_size, a.image_format, a.size)
        print("export: wrote " + ", ".join(f"{len(v)} {k} shard(s)" for k, v in paths.items()) + f" under {a.out}")
        return
    counts = export(a.out, a.data, a.root, a.limit, a.format, a.size)
    print(f"export: wrote {counts} images ({a.format}) under {a.out}")


if __name__ == "__main__":
    main()
