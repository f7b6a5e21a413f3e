"""Training-loader throughput on an image folder: the torch twin (TrainLoader: PIL decode in the main process, crop
per image, colour ops batched) vs DALI (DaliLoader: nvJPEG + GPU ops on CUDA, DALI's CPU operators otherwise).

Correctness first: one batch of each loader is checked against the output contract (keys, shapes, dtypes, device,
label = data.labels[idx], finite views, the two views differ, values inside the normalised range of [0, 1] pixels)
and the two batches against each other: the same sample ids (same epoch order), the same normalisation (batch mean
brightness equal within 4 standard errors of the crops' spread) and, for grayscale sources without colour ops, three
equal channels. Then each row times `--batches` batches per loader after one warm-up batch (which includes building
DALI's pipeline; reported as "first s"). A batch is timed from the request to its tensors being ready
(torch.cuda.synchronize on CUDA); images/s = batch / median batch time (source images, each giving `views` crops).
ratio = DALI images/s / twin images/s.

  python bench/loader_throughput.py --data DIR                    # DIR: an ImageFolder root (or one holding train/)
  python bench/loader_throughput.py --synthetic 512 --device cuda # ImageNet-like JPEGs (500 x 375) written to a temp dir
  python -m maect.dataloading.export --out /tmp/fm --limit 256 --size 224
  python bench/loader_throughput.py --data /tmp/fm
DALI on a GPU: pip install nvidia-dali-cuda130 (docs/data-loading.md).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import base_parser, environment, print_table, quantiles, setup, sync, write_json

from maect.dataloading import ImageFolder, TrainLoader  # noqa: E402  (common puts the repo root on sys.path)
from maect.dataloading import dali as D  # noqa: E402

ROWS = [  # (name, views, ctaug, crop scale): stages 2-3 (MAE-CT; the headline), stage 1 (MAE), MAE-CTaug
    ("ct 2 views", 2, False, (0.08, 1.0)),
    ("mae 1 view", 1, False, (0.2, 1.0)),
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
    lo, hi = normalised_range(data)
    for v in b["views"]:
        assert v.shape == (n, 3, S, S) and v.dtype == torch.float32, f"view {tuple(v.shape)} {v.dtype}"
        assert v.device.type == device.type and bool(torch.isfinite(v).all()), "view device / finite"
        vmin, vmax = v.amin(dim=(0, 2, 3)).cpu(), v.amax(dim=(0, 2, 3)).cpu()
        assert bool((vmin >= lo - 1e-3).all() and (vmax <= hi + 1e-3).all()), \
            f"values {vmin.tolist()}..{vmax.tolist()} outside the normalised pixel range {lo.tolist()}..{hi.tolist()}"
    assert b["idx"].shape == b["label"].shape == (n,) and b["idx"].dtype == b["label"].dtype == torch.int64
    assert torch.equal(b["label"].cpu(), data.labels[b["idx"].cpu()]), "label != data.labels[idx]"
    if views == 2:
        assert not torch.equal(b["views"][0], b["views"][1]), "the two views are identical"


def normalised_range(data) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, where pixels 0 and 1 land after (x - mean) / std."""
    m, s = torch.tensor(data.mean), torch.tensor(data.std)
    return (0 - m) / s, (1 - m) / s


def compare(twin: dict, dali: dict, data, gray: bool) -> dict:
    """The twin's and DALI's batches of the same step agree: same ids, same normalisation, gray stays gray."""
    assert torch.equal(twin["idx"].cpu(), dali["idx"].cpu()), "DALI and the twin read different samples"
    m, s = torch.tensor(data.mean).view(1, 3, 1, 1), torch.tensor(data.std).view(1, 3, 1, 1)
    res = {}
    for v, (a, b) in enumerate(zip(twin["views"], dali["views"])):
        pa, pb = (x.float().cpu() * s + m for x in (a, b))              # back to pixels in [0, 1]
        ma, mb = pa.mean(dim=(1, 2, 3)), pb.mean(dim=(1, 2, 3))          # per-image brightness [n]
        se = ((ma.var() + mb.var()) / len(ma)).sqrt().item()
        diff, tol = abs(ma.mean().item() - mb.mean().item()), max(0.02, 4 * se)
        assert diff <= tol, f"view {v}: batch brightness twin {ma.mean():.3f} vs DALI {mb.mean():.3f} (tol {tol:.3f})"
        res[f"view{v}_brightness"] = {"twin": ma.mean().item(), "dali": mb.mean().item(), "tol": tol}
        if gray:
            spread = max((p[:, :1] - p[:, 1:]).abs().max().item() for p in (pa, pb))
            assert spread < 1e-3, f"view {v}: a grayscale source gave unequal channels (max diff {spread:.2g})"
            res["gray_channel_spread"] = spread
    res["ok"] = True
    return res


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


def bench_row(data, row, *, n: int, img_size: int, device: torch.device, threads: int, batches: int,
              twin_batches: int | None = None, dali_ok: bool = True, gray: bool = False) -> dict:
    """One row: contract checks of both loaders' first batch, then each loader timed."""
    name, views, ctaug, scale = row
    kw = dict(img_size=img_size, in_chans=3, batch_size=n, num_views=views, crop_scale=scale, ctaug=ctaug, seed=0,
              device=device)
    twin = TrainLoader(data, **kw)
    dali = D.DaliLoader(data, num_threads=threads, **kw) if dali_ok else None
    b0 = next(iter(twin))                                   # correctness first
    check_contract(b0, data, n, views, img_size, device)
    res = {"row": name, "views": views}
    if dali is not None:
        b1 = next(iter(dali))
        check_contract(b1, data, n, views, img_size, device)
        res["check"] = compare(b0, b1, data, gray and not ctaug)
        del b1
    del b0
    res["twin"] = time_loader(twin, twin_batches or batches, device)
    res["dali"] = time_loader(dali, batches, device) if dali is not None else None
    res["ratio"] = res["dali"]["img_per_s"] / res["twin"]["img_per_s"] if dali is not None else None
    return res


def print_rows(rows: list[dict], n: int, img_size: int, backend: str) -> None:
    fmt = lambda t: t and f"{t['p20_ms']:.0f}/{t['median_ms']:.0f}/{t['p80_ms']:.0f}"   # noqa: E731
    flat = [{"row": r["row"], "views": r["views"], "twin": r["twin"]["img_per_s"], "twin_p": fmt(r["twin"]),
             "dali": r["dali"] and r["dali"]["img_per_s"], "dali_p": fmt(r["dali"]),
             "first": r["dali"] and r["dali"]["first_s"], "ratio": r["ratio"],
             "check": "ok" if r.get("check", {}).get("ok") else "twin contract ok"} for r in rows]
    print_table(f"images/s (batch {n}, {img_size}px; ms per batch p20/median/p80)", flat,
                [("row", "row", ""), ("views", "views", "d"), ("twin", "twin cpu-pil img/s", ".0f"),
                 ("twin_p", "twin ms", ""), ("dali", f"{backend} img/s", ".0f"), ("dali_p", "dali ms", ""),
                 ("first", "dali first s", ".2f"), ("ratio", "ratio dali/twin", ".2f"), ("check", "check", "")])


def main(argv=None) -> dict:
    p = base_parser(__doc__.splitlines()[0], budget=False)
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
        sys.exit("give --data DIR (an ImageFolder tree, e.g. from `python -m maect.dataloading.export --out DIR "
                 "--size 224`) or --synthetic N")
    data = ImageFolder(root)
    reason = D.why_not(data, "cuda")
    env = environment(device)
    env.update(twin_torch_threads=a.threads, dali_threads=threads, data=root, images=len(data),
               dali=None if reason else __import__("nvidia.dali").dali.__version__)
    print(f"loaders on {root} ({len(data)} images), {device}, batch {n}, S {a.img_size}, DALI threads {threads}, "
          f"twin torch threads {a.threads}" + (f"; DALI skipped: {reason}" if reason else ""))
    rows = [bench_row(data, row, n=n, img_size=a.img_size, device=device, threads=threads, batches=batches,
                      dali_ok=reason is None) for row in ROWS if row[0] in a.rows.split(",")]
    print_rows(rows, n, a.img_size, "dali-gpu" if cuda else "dali-cpu")
    result = {"bench": "loader_throughput", "env": env, "batch": n, "img_size": a.img_size, "rows": rows,
              "dali_skipped": reason}
    write_json(a.json, result)
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
