"""Copy the four Fashion-MNIST idx files (30 MB) into the repository, for machines without apt (a GPU box that gets a
copy of the working tree): the copy lands in a git-ignored folder (.gitignore lists the idx file names), so it never
enters a commit, and a remote runner can carry it with the tree.

    python tools/fmnist_data.py [--src /usr/share/datasets/fashion-mnist] [--dst data/fashion-mnist]
    python bench/paper_table.py --preset fmnist_gpu --data-root data/fashion-mnist

Each file is read back with maect's idx reader (shape and size checked) before the command reports success.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from maect.dataloading.datasets import FASHION_MNIST_FILES, FASHION_MNIST_ROOT, read_idx  # noqa: E402


def copy(src: str, dst: str) -> list[str]:
    names = [n for pair in FASHION_MNIST_FILES.values() for n in pair]
    missing = [os.path.join(src, n) for n in names if not os.path.exists(os.path.join(src, n))]
    if missing:
        raise SystemExit(f"fmnist_data: missing {missing}; install the data (./setup.sh) or pass --src DIR")
    os.makedirs(dst, exist_ok=True)
    out = []
    for n in names:
        target = os.path.join(dst, n)
        if not (os.path.exists(target) and os.path.getsize(target) == os.path.getsize(os.path.join(src, n))):
            shutil.copyfile(os.path.join(src, n), target + ".tmp")
            os.replace(target + ".tmp", target)
        out.append(f"{target}: {read_idx(target).shape}")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=FASHION_MNIST_ROOT)
    ap.add_argument("--dst", default=os.path.join(ROOT, "data", "fashion-mnist"))
    a = ap.parse_args(argv)
    for line in copy(a.src, a.dst):
        print(line)
    print(f"data.root={os.path.relpath(a.dst, ROOT) if a.dst.startswith(ROOT) else a.dst}")


if __name__ == "__main__":
    main()
