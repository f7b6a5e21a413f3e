"""Training-loader throughput on an image folder: the torch twin (TrainLoader: PIL decode in the main process, crop
per image, colour ops batched) vs DALI (DaliLoader: nvJPEG + GPU ops on CUDA, DALI's CPU operators otherwise).

Correctness first: one batch of each loader is checked against the output contract (keys, shapes, dtypes, device,
label = data.labels[idx], finite views, the two views differ) and the two loaders must read the same sample ids
(same epoch order). Then each row times `--batches` batches per loader after one warm-up batch (which includes
building DALI's pipeline; reported as "first s"). A batch is timed from the request to its tensors being ready
(torch.cuda.synchronize on CUDA); images/s = batch / median batch time (source images, each giving `views` crops).
ratio = DALI images/s / twin images/s.

  python bench/dataloading.py --data DIR                      # DIR: an ImageFolder root (or one holding train/)
  python bench/dataloading.py --synthetic 512 --device cuda  # ImageNet-like JPEGs (500 x 375) written to a temp dir
  python -m maect.dataloading.export --out /tmp/fm --limit 100 && python bench/dataloading.py --data /tmp/fm --img-size 28
gpu_suite_step(out, budget_s): the DALI GPU measurement for bench/gpu_suite.py (skips with a reason without DALI/CUDA).
Load this file by path (importlib.util.spec_from_file_location) or run it as a script: under bench/ its module name
would shadow the dataloading package.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

if __name__ == "dataloading":     # `import dataloading` with bench/ first on sys.path found this file, not the package
    raise ImportError("bench/dataloading.py shadows the dataloading package when imported by name from bench/; run it "
                      "as a script, or load it with importlib.util.spec_from_file_location('bench_dataloading', path)")

from common import ROOT, base_parser, environment, print_table, quantiles, setup, sync, write_json

from maect.dataloading import ImageFolder, TrainLoader  # noqa: E402  (common puts the repo root on sys.path)
from maect.dataloading import dali as D  # noqa: E402

ROWS = [  # (name, views, ctaug, crop scale): stage 1 (MAE), stages 2-3 (MAE-CT), MAE-CTaug
    ("mae 1 view", 1, False, (0.2, 1.0)),
    ("ct 2 views", 2, False, (0.08, 1.0)),
    ("ctaug 2 views", 2, True, (0.08, 1.0)),
]


def synthetic_tree(root: str, n: int, size=(500, 375), classes: int = 4, seed: int = 0) -> str:
    """n JPEGs (quality 90) of smooth colour fields plus noise: ImageNet-like size and file size (~60-100 KB)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = Path(root) / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        base = Image.fromarray(rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)).resize(size, Image.BICUBIC)
        arr = np.asarray(base, dtype=np.float32) + rng.normal(0, 12, (size[1], size[0], 3))
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def check_contract(b: dict, data, n: int, views: int, S: int, device: torch.device) -> None:
    assert set(b) == {"views", "idx", "label"} and len(b["views"]) == views, "keys / number of views"
    for v in b["views"]:
        assert v.shape == (n, 3, S, S) and v.dtype == torch.float32, f"view {tuple(v.shape)} {v.dtype}"
        assert v.device.type == device.type and bool(torch.isfinite(v).all()), "view device / finite"
    assert b["idx"].shape == b["label"].shape == (n,) and b["idx"].dtype == b["label"].dtype == torch.int64
    assert torch.equal(b["label"].cpu(), data.labels[b["idx"].cpu()]), "label != data.labels[idx]"
    if views == 2:
        assert not torch.equal(b["views"][0], b["views"][1]), "the two views are identical"


def time_loader(loader, batches: int, device: torch.device) -> dict:
    """First batch (pipeline build + warm-up) and then `batches` timed batches; epochs restart as needed."""
    epoch = 0
    loader.set_epoch(epoch)
    it = iter(loader)
    t0 = time.perf_counter()
    next(it)
    sync(device)
    first = time.perf_counter() - t0
    times = []
    while len(times) < batches:
        t0 = time.perf_counter()
        try:
            b = next(it)
        except StopIteration:
            epoch += 1
            loader.set_epoch(epoch)
            it = iter(loader)
            continue
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        del b
    del it
    q = quantiles(times)
    return {"first_s": first, **q, "img_per_s": loader.n / (q["median_ms"] / 1e3)}


def main(argv=None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="ImageFolder root (DIR/train is used when it exists)")
    p.add_argument("--synthetic", type=int, default=0, help="write this many synthetic JPEGs to a temp dir instead")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=None, help="per-loader batch (default 256 on CUDA, 32 on CPU)")
    p.add_argument("--batches", type=int, default=None, help="timed batches per loader and row (default 20 / 4)")
    p.add_argument("--dali-threads", type=int, default=None, help="DALI threads (default: CPU cores, at most 8)")
    p.set_defaults(threads=1)          # torch threads, used by the twin only (DALI has its own)
    next(x for x in p._actions if x.dest == "threads").help = (
        "torch threads, i.e. the twin's (default 1 here: its per-image ops are too small to split, and on a busy "
        "machine 2 threads made it >10x slower in our runs)")
    p.add_argument("--rows", default=",".join(r[0] for r in ROWS), help="comma-separated row names to run")
    a = p.parse_args(argv)
    device = setup(a.device, a.threads)
    cuda = device.type == "cuda"
    n, batches = a.batch or (256 if cuda else 32), a.batches or (20 if cuda else 4)
    threads = a.dali_threads or min(8, os.cpu_count() or 1)
    tmp = None
    if a.synthetic:
        tmp = tempfile.TemporaryDirectory()
        root = synthetic_tree(tmp.name, a.synthetic)
    elif a.data:
        root = os.path.join(a.data, "train") if os.path.isdir(os.path.join(a.data, "train")) else a.data
    else:
        sys.exit("give --data DIR (an ImageFolder tree, e.g. from `python -m maect.dataloading.export --out DIR`) "
                 "or --synthetic N")
    data = ImageFolder(root)
    reason = D.why_not(data, "cuda")
    env = environment(device)
    env.update(twin_torch_threads=a.threads, dali_threads=threads, data=root, images=len(data),
               dali=None if reason else __import__("nvidia.dali").dali.__version__)
    print(f"loaders on {root} ({len(data)} images), {device}, batch {n}, S {a.img_size}, DALI threads {threads}, "
          f"twin torch threads {a.threads}"
          + (f"; DALI skipped: {reason}" if reason else ""))
    rows = []
    for name, views, ctaug, scale in ROWS:
        if name not in a.rows.split(","):
            continue
        kw = dict(img_size=a.img_size, in_chans=3, batch_size=n, num_views=views, crop_scale=scale, ctaug=ctaug,
                  seed=0, device=device)
        twin = TrainLoader(data, **kw)
        dali = None if reason else D.DaliLoader(data, num_threads=threads, **kw)
        b0 = next(iter(twin))                                   # correctness first
        check_contract(b0, data, n, views, a.img_size, device)
        if dali is not None:
            b1 = next(iter(dali))
            check_contract(b1, data, n, views, a.img_size, device)
            assert torch.equal(b0["idx"].cpu(), b1["idx"].cpu()), "DALI and the twin read different samples"
            del b1
        del b0
        row = {"row": name, "views": views, "twin": time_loader(twin, batches, device)}
        row["dali"] = time_loader(dali, batches, device) if dali is not None else None
        row["ratio"] = row["dali"]["img_per_s"] / row["twin"]["img_per_s"] if dali is not None else None
        rows.append(row)
        del twin, dali
    flat = [{"row": r["row"], "views": r["views"],
             "twin": r["twin"]["img_per_s"], "twin_p": f"{r['twin']['p20_ms']:.0f}/{r['twin']['median_ms']:.0f}/"
                                                   f"{r['twin']['p80_ms']:.0f}",
             "dali": r["dali"] and r["dali"]["img_per_s"],
             "dali_p": r["dali"] and f"{r['dali']['p20_ms']:.0f}/{r['dali']['median_ms']:.0f}/{r['dali']['p80_ms']:.0f}",
             "first": r["dali"] and r["dali"]["first_s"], "ratio": r["ratio"]} for r in rows]
    backend = "dali-gpu" if cuda else "dali-cpu"
    print_table(f"images/s (batch {n}, {a.img_size}px, {batches} timed batches; ms per batch p20/median/p80)", flat,
                [("row", "row", ""), ("views", "views", "d"), ("twin", "twin cpu-pil img/s", ".0f"),
                 ("twin_p", "twin ms", ""), ("dali", f"{backend} img/s", ".0f"), ("dali_p", "dali ms", ""),
                 ("first", "dali first s", ".2f"), ("ratio", "ratio dali/twin", ".2f")])
    result = {"bench": "dataloading", "env": env, "batch": n, "img_size": a.img_size, "rows": rows,
              "dali_skipped": reason}
    write_json(a.json, result)
    if tmp is not None:
        tmp.cleanup()
    return result


def gpu_suite_step(out: dict, budget_s: float) -> dict:
    """For bench/gpu_suite.py: DALI GPU vs the twin on 1024 synthetic ImageNet-like JPEGs at 224 px, in a
    subprocess limited to budget_s. Fills out["dataloading"] with the results, or with {"skipped": reason} when
    DALI or CUDA is missing; returns out."""
    reason = D.import_error()
    if reason is None and not torch.cuda.is_available():
        reason = "no CUDA device visible"
    if reason:
        out["dataloading"] = {"skipped": reason}
        return out
    with tempfile.TemporaryDirectory() as tmp:
        js = os.path.join(tmp, "dataloading.json")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--device", "cuda", "--synthetic", "1024",
               "--batch", "128", "--batches", "12", "--json", js]
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget_s)
            print(r.stdout[-4000:])
            if r.returncode != 0:
                out["dataloading"] = {"error": f"exit {r.returncode}", "stderr_tail": r.stderr[-3000:]}
            else:
                import json
                out["dataloading"] = json.loads(Path(js).read_text())
        except subprocess.TimeoutExpired:
            out["dataloading"] = {"error": f"timed out after {budget_s:.0f} s"}
        out["dataloading"]["seconds"] = round(time.perf_counter() - t0, 1)
    return out


if __name__ == "__main__":
    main()
