"""k-NN on raw pixels: the floor a learned encoder's features should beat.

    python bench/raw_pixels.py [--data fashion_mnist] [--data-root DIR]

The same k-NN code (maect.eval.knn.knn_accuracy: cosine, votes exp(sim / 0.07)) and the same deterministic eval
transform as the monitor and maect.eval, on the flattened normalised images instead of encoder features; full splits
and SPEC's 20k/5k calibration subset (a seeded 20k of the train split, the first 5k test images), with and without
per-dimension standardisation. Fashion-MNIST, 2 CPU cores: about 20 s.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from maect.dataloading import eval_batches, load_eval_data  # noqa: E402
from maect.eval.knn import knn_accuracy  # noqa: E402


def pixels(name: str, root: str, split: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(images flattened [N, C*S*S] fp32, labels [N], number of classes) through the eval transform."""
    data = load_eval_data(name, root, split)
    xs, ys = zip(*eval_batches(data, img_size=28, in_chans=1, batch_size=5000))
    return torch.cat(xs).flatten(1), torch.cat(ys), int(data.num_classes)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="fashion_mnist")
    p.add_argument("--data-root", default="")
    args = p.parse_args(argv)
    t = time.perf_counter()
    xtr, ytr, C = pixels(args.data, args.data_root, "train")
    xte, yte, _ = pixels(args.data, args.data_root, "test")
    for ntr, nte in ((len(xtr), len(xte)), (20000, 5000)):
        g = torch.Generator().manual_seed(1234)
        sel = torch.randperm(len(xtr), generator=g)[:ntr] if ntr < len(xtr) else torch.arange(len(xtr))
        for std in (False, True):
            acc = knn_accuracy(xtr[sel], ytr[sel], xte[:nte], yte[:nte], k=[10, 20], T=0.07, num_classes=C,
                               standardize=std)
            print(f"raw pixels, {ntr} train / {min(nte, len(xte))} test, standardize={std}: "
                  + ", ".join(f"k={k} {v:.2f}%" for k, v in acc.items()), flush=True)
    print(f"{time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
