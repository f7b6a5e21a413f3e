"""The GPU suite's loader_throughput step: bench/loader_throughput.py's rows on Fashion-MNIST's test split exported as
224 px JPEGs (synthetic ImageNet-like JPEGs where no copy is found; CPU stand-in: DALI's CPU operators on 64 px
images; skipped with the reason without DALI)."""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1]
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
from common import ROOT, setup  # noqa: E402
from loader_throughput import ROWS, bench_row, print_rows, synthetic_tree  # noqa: E402

from maect.dataloading import ImageFolder  # noqa: E402
from maect.dataloading import dali as D  # noqa: E402

# Fashion-MNIST's test split: the system's copy, one under the checkout's data/ (tools/fmnist_data.py), or a
# development machine's staged copy under the git-ignored .whl/data/
FMNIST_ROOTS = ["/usr/share/datasets/fashion-mnist", str(ROOT / "data" / "fashion-mnist"),
                str(ROOT / ".whl" / "data" / "fashion-mnist")]


def fmnist_tree(root: str, per_class: int, size: int) -> str | None:
    """The first per_class test images of every Fashion-MNIST class as size x size JPEGs under root (an ImageFolder);
    None when no copy of the test split is found."""
    from maect.dataloading.datasets import fashion_mnist
    from maect.dataloading.export import export_split
    src = next((r for r in FMNIST_ROOTS if os.path.exists(os.path.join(r, "t10k-images-idx3-ubyte.gz"))), None)
    if src is None:
        return None
    export_split(fashion_mnist(src, "test"), root, limit=per_class, size=size)
    return src


def gpu_suite_step(out: dict, budget_s: float) -> None:
    """DALI's pipeline (nvJPEG decode, random-resized crop, flip, normalise) against the
    CPU twin on real images: Fashion-MNIST's test split exported as 224 px JPEGs (2560 images; synthetic
    ImageNet-like JPEGs where no copy of Fashion-MNIST is found, and the record says so). Rows in ROWS order, the
    two-view CT row first; a row that no longer fits budget_s is skipped and named. Without CUDA, the stand-in:
    the same code on DALI's CPU operators with 64 px images. Fills out["data"], out["row <name>"]; without DALI,
    out["skipped"] = the reason."""
    t0 = time.perf_counter()
    reason = D.import_error()
    if reason:
        out["skipped"] = reason
        return
    cuda = torch.cuda.is_available()
    device = setup("cuda" if cuda else "cpu", 1)
    size, per_class, n, batches, twin_batches = (224, 256, 256, 12, 4) if cuda else (64, 4, 8, 2, 2)
    threads = min(8, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        src = fmnist_tree(tmp, per_class, size)
        if src is None:
            synthetic_tree(tmp, per_class * 10, size=(500, 375) if cuda else (80, 60))
        data = ImageFolder(tmp)
        out["data"] = {"source": f"Fashion-MNIST test split from {src}, {size} px JPEG" if src else
                       "synthetic ImageNet-like JPEGs (no Fashion-MNIST found in " + ", ".join(FMNIST_ROOTS) + ")",
                       "images": len(data), "batch": n, "dali_threads": threads, "twin_torch_threads": 1,
                       "backend": "dali-gpu" if cuda else "dali-cpu (stand-in: no CUDA)",
                       "prepare_s": round(time.perf_counter() - t0, 1)}
        rows, per_row = [], None
        for row in ROWS:
            left = budget_s - (time.perf_counter() - t0)
            if per_row is not None and left < 1.3 * per_row:
                out.setdefault("skipped_rows", []).append(row[0])
                out["skipped_rows"] = out["skipped_rows"]
                continue
            t1 = time.perf_counter()
            rows.append(bench_row(data, row, n=n, img_size=size, device=device, threads=threads, batches=batches,
                                  twin_batches=twin_batches, gray=src is not None))
            rows[-1]["data"] = "fmnist" if src else "synthetic"
            out[f"row {row[0]}"] = rows[-1]
            per_row = max(per_row or 0.0, time.perf_counter() - t1)
        print_rows(rows, n, size, out["data"]["backend"])
    out["seconds"] = round(time.perf_counter() - t0, 1)
