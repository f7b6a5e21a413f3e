"""Data sources (data.name), and the labels evaluation needs.

fashion_mnist  ArrayData: the whole data set as a uint8 tensor [N, C, H, W] in memory; batches are gathered by index
               and augmented batch-wise on the training device. Splits train / test.
imagefolder    ImageFolder: data.root/train/<class>/... and data.root/val/<class>/... (val: else test/). One
               class-to-index mapping, the sorted class folder names of the TRAINING split, labels every split:
               a val class without a train folder is an error naming both folders; a train class without a val
               folder is fine (logged). Images at any depth under a class folder.
folder         ImageFiles: every image file under data.root at any depth (by extension, images.IMAGE_EXTENSIONS),
               sorted by path; no labels.
filelist       ImageFiles: the files named in the text file data.root, one path per line (relative to the list's
               folder, or absolute), in the list's order; blank lines and lines starting with # are ignored.
wds            shards.ShardData: WebDataset tar shards, data.root a folder (train-*.tar, val-*.tar), a .tar or a
               brace pattern; with a file or pattern data.labels names the evaluation shards. Labels from each
               sample's cls member. Read by shard_loader.ShardLoader (streaming, buffer shuffle); see shards.py.
Everywhere: hidden files and folders (names starting with '.') are skipped; symlinked folders are followed once.

data.labels (folder and filelist only; MAE and contrastive tuning need no labels): a class-folder tree DIR (DIR/train
and DIR/val as for imagefolder) or a CSV file of rows `path,label[,split]` (path relative to the CSV's folder or
absolute; label a class name or an integer >= 0; split train (default) or val; the first row that is not blank or #
is a header when its cells are header names, `path,label[,split]` (read_label_csv); blank and # lines ignored;
class index = rank among the sorted distinct labels, numeric order when all are integers; UTF-8 or UTF-16 with a
BOM, any line ends (read_text); a .tsv file is tab-separated).
Evaluation and the k-NN monitors read the labelled train split as the bank and the val split as queries
(load_eval_data, which leaves unlabelled samples out and counts them); a training file gets the label of the labelled
entry with the same absolute path (no symlink resolution), else -1, and the nn_acc monitor runs only when every
training file has one.
Files decode by images.decode_image (the one rule for PIL modes; see images.py).
"""
from __future__ import annotations

import csv
import gzip
import logging
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from maect.dataloading.images import (IMAGE_EXTENSIONS, BadImage, DataError, check_image_file,  # noqa: F401
                                      decode_image)

log = logging.getLogger("maect.data")
SOURCES = ("fashion_mnist", "imagefolder", "folder", "filelist", "wds")
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                       "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class ArrayData:
    images: torch.Tensor   # uint8 [N, C, H, W]
    labels: torch.Tensor   # int64 [N]
    mean: tuple
    std: tuple
    num_classes: int

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def has_labels(self) -> bool:
        return True

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in range(self.num_classes)]

    def subset(self, idx: torch.Tensor) -> "ArrayData":
        return ArrayData(self.images[idx], self.labels[idx], self.mean, self.std, self.num_classes)


def read_idx(path: str) -> np.ndarray:
    """Read an idx file (optionally .gz): magic (0, 0, dtype, ndim), ndim big-endian int32 sizes, data."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an idx file of unsigned bytes (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    want = int(np.prod(dims)) + 4 + 4 * ndim
    if len(raw) != want:
        raise DataError(f"{path} is truncated or corrupt: {len(raw)} bytes, expected {want} for shape {dims}")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(root: str | None, split: str) -> ArrayData:
    root = root or FASHION_MNIST_ROOT
    if split not in FASHION_MNIST_FILES:
        raise DataError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    paths = [os.path.join(root, f) for f in FASHION_MNIST_FILES[split]]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found: missing {missing}. Fix: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu, "
            f"installs to {FASHION_MNIST_ROOT}) or pass data.root=DIR holding the four idx .gz files.")
    images = torch.from_numpy(read_idx(paths[0]).copy()).unsqueeze(1)   # [N, 1, 28, 28]
    labels = torch.from_numpy(read_idx(paths[1]).astype(np.int64))
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{paths[0]} has {images.shape[0]} images but {paths[1]} has {labels.shape[0]} labels")
    return ArrayData(images, labels, FASHION_MNIST_MEAN, FASHION_MNIST_STD, 10)


class ImageFiles:
    """Image files decoded per sample (images.decode_image) by the loaders.

    files: paths; labels: int64 [N] class index per file, -1 = no label; classes: class names (index = position);
    root: where the files came from (for messages); empty_classes: class folders holding no image, reported by
    validate() like bad files (the loaders raise naming them, or skip them with skip_corrupt=True).
    """

    def __init__(self, files: list[str], labels=None, classes=(), root: str = "", empty_classes=()):
        self.files, self.classes, self.root = list(files), list(classes), root
        self.labels = (torch.full((len(self.files),), -1, dtype=torch.long) if labels is None
                       else torch.as_tensor(labels, dtype=torch.long).reshape(-1))
        if self.labels.shape[0] != len(self.files):
            raise DataError(f"{root!r}: {len(self.files)} files but {self.labels.shape[0]} labels")
        self.num_classes, self.empty_classes = len(self.classes), list(empty_classes)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self._problems: dict[bool, dict[int, str]] = {}

    def __len__(self) -> int:
        return len(self.files)

    @property
    def has_labels(self) -> bool:
        """Every file has a label (what the label monitors need)."""
        return len(self.files) > 0 and bool((self.labels >= 0).all())

    def subset(self, idx: torch.Tensor) -> "ImageFiles":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return ImageFiles([self.files[i] for i in idx.tolist()], self.labels[idx], self.classes, self.root,
                          self.empty_classes)

    def load(self, i: int) -> torch.Tensor:
        """Decode file i to uint8 [3, H, W] (images.decode_image); BadImage (a ValueError) names the file."""
        return torch.from_numpy(decode_image(self.files[i])).permute(2, 0, 1)

    def validate(self, workers: int = 16, dali: bool = False) -> dict[int, str]:
        """{sample id: reason} for files that cannot be loaded (images.check_image_file: cheap, a full decode only
        where needed; dali=True adds what DALI decodes differently), plus {-1 - k: reason} for empty class folder k
        of empty_classes. Deterministic, so every rank finds the same set; computed once per flag and cached."""
        if dali not in self._problems:
            from concurrent.futures import ThreadPoolExecutor
            chunks = [range(s, min(s + 1024, len(self.files))) for s in range(0, len(self.files), 1024)]
            with ThreadPoolExecutor(max_workers=max(1, min(workers, len(chunks)))) as ex:
                found = ex.map(lambda r: [(i, check_image_file(self.files[i], dali)) for i in r], chunks)
                problems = {i: why for part in found for i, why in part if why}
            for k, folder in enumerate(self.empty_classes):
                problems[-1 - k] = f"class folder {folder!r} holds no images {IMAGE_EXTENSIONS}"
            self._problems[dali] = problems
        return self._problems[dali]


def list_images(root: str) -> list[str]:
    """Image files (by extension) under root at any depth, sorted by path; hidden files and folders skipped;
    symlinked folders followed, each real folder once (no loops)."""
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out += [os.path.join(dirpath, f) for f in filenames
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(out)


def class_folders(root: str) -> list[str]:
    """The sorted names of root's non-hidden subfolders: the classes of an image-folder split."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    return sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))


class ImageFolder(ImageFiles):
    """root/<class>/.../<image>: label = index of the class in `classes` (default: root's own sorted class folders;
    for a val split, the training split's, named by classes_from). A class folder of root that is not in `classes`
    is an error naming it and both folders; a class of `classes` without a folder here is logged. An empty class
    folder keeps its index and is reported by validate()."""

    def __init__(self, root: str, classes: list[str] | None = None, classes_from: str | None = None):
        found = class_folders(root)
        classes = found if classes is None else list(classes)
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(f"class folder(s) {unknown} of {root!r} are not classes of the training split "
                             f"{classes_from!r} ({len(classes)} classes); labels come from the training split's "
                             f"class folders, so add them there or remove them here")
        if not found:
            raise DataError(f"image folder {root!r} holds no class folders")
        absent = [c for c in classes if c not in set(found)]
        if absent:
            log.info(f"data: {root} has no folder for {len(absent)} of the {len(classes)} classes of {classes_from} "
                     f"({', '.join(absent[:5])}{', ...' if len(absent) > 5 else ''}): no samples of them here")
        files, labels, empty = [], [], []
        for c in found:
            names = list_images(os.path.join(root, c))
            if not names:
                empty.append(os.path.join(root, c))
            files += names
            labels += [classes.index(c)] * len(names)
        if not files:
            raise DataError(f"image folder {root!r}: its class folders hold no images {IMAGE_EXTENSIONS}")
        super().__init__(files, labels, classes, root, empty)


def image_folder_split(root: str, split: str) -> ImageFolder:
    """Split 'train' (root/train) or 'test' (root/val, else root/test) of an image-folder tree, labelled by the
    training split's class folders."""
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    train = os.path.join(root, "train")
    if split == "train":
        return ImageFolder(train)
    sub = next((os.path.join(root, d) for d in ("val", "test") if os.path.isdir(os.path.join(root, d))), None)
    if sub is None:
        raise NoLabels(f"{root!r} has no val/ (or test/) folder: no labelled images to evaluate on")
    return ImageFolder(sub, class_folders(train), classes_from=train)


def read_text(path: str, what: str) -> list[str]:
    """The lines of a text file the data sources read (file lists, label files), without line ends: UTF-8, with or
    without a byte-order mark (Excel's "CSV UTF-8" writes one), or UTF-16 with its BOM (Excel's "Unicode text");
    LF, CRLF or CR line ends. A BOM never becomes part of the first line. Undecodable bytes are a DataError naming
    the file (`what`), the line and the encoding tried."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        enc = "utf-16"                                    # the BOM gives the byte order; the codec drops it
    else:
        enc = "utf-8-sig"                                 # drops a UTF-8 BOM, reads plain UTF-8 unchanged
    try:
        text = raw.decode(enc)
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise DataError(f"{what} {path!r} line {line}: byte {raw[exc.start:exc.start + 1]!r} at offset {exc.start} is "
                        f"not {enc.replace('-sig', '')} text (save it as UTF-8)") from None
    return text.splitlines()


def read_file_list(path: str) -> list[str]:
    """The paths in a file list: one per line, relative to the list's folder or absolute; blank lines and # lines
    ignored (read_text: UTF-8 or UTF-16, a BOM, any line ends); a path listed twice is an error naming both lines
    (two sample ids for one image would let a query find itself in the NN queue)."""
    base, files, line_of = os.path.dirname(os.path.abspath(path)), [], {}
    for n, line in enumerate(read_text(path, "file list"), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        p = os.path.normpath(os.path.join(base, s))
        if p in line_of:
            raise DataError(f"file list {path!r}: line {n} repeats line {line_of[p]} ({s})")
        line_of[p] = n
        files.append(p)
    if not files:
        raise DataError(f"file list {path!r} names no files")
    return files


def _sort_classes(names) -> list[str]:
    names = set(names)
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


HEADER = ({"path", "file", "filename", "image"}, {"label", "class", "target"}, {"split"})   # names a header may use


def is_header(row: list[str]) -> bool:
    """A label file's header: path,label[,split] (or file / filename / image, class / target), any case."""
    return len(row) in (2, 3) and all(c.lower() in names for c, names in zip(row, HEADER))


def read_label_csv(path: str) -> tuple[list[str], dict[str, list]]:
    """(classes, {'train': [(abs path, class index)], 'test': [...]}) from a label file of rows path,label[,split]:
    comma-separated (a .tsv file: tab-separated), read by read_text (UTF-8 / UTF-16, a BOM, any line ends). The
    first row that is not blank or # is a header when its cells are header names (is_header), else data. A label
    that is a negative integer is an error naming the line (an unlabelled file is left out of the label file)."""
    base, rows, line_of, first = os.path.dirname(os.path.abspath(path)), [], {}, True
    delim = "\t" if path.lower().endswith(".tsv") else ","
    for n, row in enumerate(csv.reader(read_text(path, "label file"), delimiter=delim), 1):
        row = [c.strip() for c in row]
        if not row or not any(row) or row[0].startswith("#"):
            continue
        if first and is_header(row):
            first = False
            continue
        first = False
        if len(row) not in (2, 3) or not row[0] or not row[1]:
            sep = "tab" if delim == "\t" else "comma"
            raise DataError(f"label file {path!r} line {n}: expected path,label[,split] ({sep}-separated), got {row}")
        if re.fullmatch(r"-\d+", row[1]):
            raise DataError(f"label file {path!r} line {n}: label {row[1]} is negative; a class is a name or an "
                            f"integer >= 0 (leave unlabelled files out of the label file)")
        split = (row[2] if len(row) == 3 else "train").lower()
        if split not in ("train", "val", "test"):
            raise DataError(f"label file {path!r} line {n}: split must be train or val, got {row[2]!r}")
        p = os.path.normpath(os.path.join(base, row[0]))
        if p in line_of:
            raise DataError(f"label file {path!r}: line {n} repeats the path of line {line_of[p]} ({row[0]})")
        line_of[p] = n
        rows.append((p, row[1], "train" if split == "train" else "test"))
    classes = _sort_classes(r[1] for r in rows)
    if not classes:
        raise DataError(f"label file {path!r} has no rows (path,label[,split])")
    index = {c: i for i, c in enumerate(classes)}
    out = {"train": [], "test": []}
    for p, c, split in rows:
        out[split].append((p, index[c]))
    return classes, out


def labelled_split(labels: str, split: str) -> ImageFiles:
    """The labelled `split` ('train' or 'test') of data.labels (a class-folder tree or a CSV)."""
    if os.path.isdir(labels):
        return image_folder_split(labels, split)
    classes, rows = read_label_csv(labels)
    if not rows[split]:
        raise NoLabels(f"data.labels={labels} has no {'val' if split == 'test' else 'train'} rows "
                       f"(path,label,{'val' if split == 'test' else 'train'})")
    return ImageFiles([p for p, _ in rows[split]], [y for _, y in rows[split]], classes, labels)


class NoLabels(DataError):
    """Evaluation or a label monitor asked for labels the data source does not have."""


def attach_labels(data: ImageFiles, labels: str) -> ImageFiles:
    """Give data's files the labels of data.labels' entries with the same absolute path (both splits); -1 else."""
    if not labels:
        return data
    known, classes = {}, None
    for split in ("train", "test"):
        try:
            part = labelled_split(labels, split)
        except NoLabels:
            continue
        classes = part.classes
        known.update(zip(map(os.path.abspath, part.files), part.labels.tolist()))
    y = [known.get(os.path.abspath(f), -1) for f in data.files]
    return ImageFiles(data.files, y, classes or [], data.root, data.empty_classes)


def check_source(name: str, root: str, labels: str = "", keys=("data.name", "data.root", "data.labels")) -> str | None:
    """Why (name, root, labels) cannot be read, in one line naming the key and path; None when they can."""
    kn, kr, kl = keys
    if name not in SOURCES:
        return f"{kn}={name!r}: choose one of {', '.join(SOURCES)}"
    if name == "wds":
        from maect.dataloading.shards import shard_paths
        try:
            shard_paths(root, "train")
            if labels:
                shard_paths(root, "test", labels)
        except DataError as e:
            return f"{kn}=wds {kr}={root!r}" + (f" {kl}={labels!r}" if labels else "") + f": {e}"
        return None
    need = {"imagefolder": "a folder with train/ and val/ class folders", "folder": "a folder of images",
            "filelist": "a text file of image paths, one per line"}.get(name)
    if need and not root:
        return f"{kn}={name} needs {kr}=PATH ({need})"
    if name in ("imagefolder", "folder") and not os.path.isdir(root):
        return f"{kr}={root!r}: no such folder ({kn}={name} reads {need})"
    if name == "imagefolder" and not os.path.isdir(os.path.join(root, "train")):
        return f"{kr}={root!r} has no train/ folder ({kn}=imagefolder reads {kr}/train/<class>/...)"
    if name == "filelist" and not os.path.isfile(root):
        return f"{kr}={root!r}: no such file ({kn}=filelist reads {need})"
    if labels and name not in ("folder", "filelist"):
        return f"{kl}={labels!r} is for {kn}=folder|filelist ({name} has its own labels)"
    if labels and not (os.path.isfile(labels) or os.path.isdir(os.path.join(labels, "train"))):
        return f"{kl}={labels!r}: neither a CSV file (path,label[,split]) nor a folder with train/ class folders"
    return None


def load_data(name: str, root: str | None, split: str, labels: str = ""):
    """The training source (split 'train'), or a split of a labelled source: 'fashion_mnist' -> ArrayData;
    'imagefolder' -> ImageFolder (root/train, or root/val for 'test', labelled by train's classes); 'folder' /
    'filelist' -> ImageFiles ('train' only; labels attached from data.labels where it names the files)."""
    if name == "fashion_mnist":
        return fashion_mnist(root, split)
    why = check_source(name, root or "", labels)
    if why:
        raise DataError(why)
    if name == "wds":
        from maect.dataloading.shards import open_shards
        return open_shards(root, split, labels)
    if name == "imagefolder":
        return image_folder_split(root, split)
    if split != "train":
        raise NoLabels(f"data.name={name} has one split of training images; evaluation reads data.labels")
    files = list_images(root) if name == "folder" else read_file_list(root)
    if not files:
        raise DataError(f"data.root={root!r} holds no image files {IMAGE_EXTENSIONS} (hidden ones are skipped)")
    return attach_labels(ImageFiles(files, root=root), labels)


def load_eval_data(name: str, root: str | None, split: str, labels: str = ""):
    """The labelled split ('train': the k-NN bank / probe training set, 'test': the queries) that evaluation and
    the k-NN monitors read: the source itself for fashion_mnist / imagefolder, data.labels for folder / filelist,
    for wds the val-*.tar shards of a data.root folder or the shards data.labels names. Only its labelled samples
    (labelled_only: unlabelled ones are left out and counted, never scored as wrong answers).
    NoLabels (a ValueError) says why there are none."""
    if name in ("folder", "filelist"):
        why = check_source(name, root or "", labels)
        if why:
            raise DataError(why)
        if not labels:
            raise NoLabels(f"data.name={name} has no labels (set data.labels=DIR with train/ and val/ class "
                           f"folders, or a CSV of path,label[,split])")
        return labelled_only(labelled_split(labels, split), split, name)
    return labelled_only(load_data(name, root, split, labels if name == "wds" else ""), split, name)


def labelled_only(data, split: str, name: str = ""):
    """data without its unlabelled samples (label -1: a WebDataset sample without a cls member, a file data.labels
    does not name), with data.unlabelled = how many were left out; the count and the first such sample are logged.
    Every protocol (k-NN, probe, low-shot, k-means, the monitors and the pipeline's closing table) reads labelled
    samples only: an unlabelled query scored as a wrong answer would lower the accuracy without a word.
    NoLabels names the split when none of its samples has a label."""
    bad = data.labels < 0
    n = int(bad.sum())
    what = f"the {'val' if split == 'test' else split} split" + (f" of data.name={name}" if name else "") + \
        (f" ({data.root})" if getattr(data, "root", "") else "")
    how = " (no cls member)" if name == "wds" else ""
    if n and n == len(data):
        raise NoLabels(f"none of the {n} samples of {what} has a label{how}: nothing to evaluate on")
    if n:
        first = data.files[int(bad.nonzero()[0, 0])] if hasattr(data, "files") else int(bad.nonzero()[0, 0])
        log.warning(f"data: {n} of {len(data)} samples of {what} have no label{how} (first: {first}): left out of "
                    f"evaluation, which reads the {len(data) - n} labelled ones")
        data = data.subset((~bad).nonzero()[:, 0])
    data.unlabelled = n
    return data
