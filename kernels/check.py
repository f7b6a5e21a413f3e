"""python -m maect.kernels.check: verify every backend of every op a preset trains with, time it beside the torch
path, and write the decisions to the dispatch cache (what the first training call would otherwise measure).

    python -m maect.kernels.check                                  # preset tiny, on CUDA when it is visible
    python -m maect.kernels.check --preset vit_l16 --device cuda --json bench/results/check_vit_l16.json
    python -m maect.kernels.check --preset tiny --device cpu
    python -m maect.kernels.check --static [--arch sm_90 sm_80] [--predict] [--json F]   # no GPU: kernels/static_check.py

Shapes (from the preset's config, batch per GPU = global batch / --world-size):
    queue_topk   the head and CT lookups: both views in one call, 2 x batch per GPU rows against the queue
                 (nnclr.queue_size x nnclr.proj_dim, in nnclr.queue_dtype: auto = bf16 on CUDA, fp32 on CPU), k =
                 head.topk / ct.topk, with self-id exclusion; the final k-NN: one chunk of test features (as
                 maect/eval/knn.py cuts them) against the train bank (embed_dim, fp32, k = eval.knn_k)
    masking ops  MAE's masked_patch_embed and random_masking at L patches of width embed_dim, decoder_input and
                 unshuffle at decoder_embed_dim, on mae.batch_size x mae.num_views / world samples, forward +
                 backward, under bf16 autocast on CUDA (precision auto)
Each (op, shape) is measured as the first training call would be (kernels/dispatch.py), whatever MAECT_DISPATCH
says and whatever the cache holds; the table lists every backend: verified (or why not), median ms, and the ratio
to the torch path (> 1: faster). Exit status 1 when any backend disagrees with the reference or raises, 2 when
--device cuda finds no GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch
import torch.nn.functional as F

from . import dispatch as D
from ._util import dtype_name
from .ops._measure import masking_dtype

DATASET_TRAIN = {"fashion_mnist": 60000}     # train split sizes; other sources: ImageNet-1k's (the GPU presets')
IMAGENET_TRAIN = 1281167
CPU_BANK_CAP = 262144                         # the largest queue_topk Q bucket: CPU banks beyond it are cut to it


def model_dims(cfg) -> dict:
    from maect.models.vit import ARCHS
    m = cfg.model
    base = ARCHS.get(m.arch, (m.img_size, m.patch_size, m.embed_dim, m.depth, m.num_heads, m.decoder_embed_dim,
                              m.decoder_depth, m.decoder_num_heads))
    patch = m.patch_size or base[1]
    dim = m.embed_dim or base[2]
    dec = m.decoder_embed_dim or base[5]
    return {"L": (m.img_size // patch) ** 2, "patch": patch, "img": m.img_size, "D": dim, "Ddec": dec,
            "chans": m.in_chans}


def cases(cfg, device: torch.device, world: int, bank: int | None = None) -> list[dict]:
    """The (op, label, inputs) a preset trains with; inputs are built lazily (build())."""
    dims = model_dims(cfg)
    from maect.heads import queue_dtype
    qdt = queue_dtype(cfg.nnclr.queue_dtype, device)
    out = []
    Q, Dp = cfg.nnclr.queue_size, cfg.nnclr.proj_dim
    ks = {}
    for stage in ("head", "ct"):
        ks.setdefault(getattr(cfg, stage).topk, []).append(stage)
    for k, stages in ks.items():
        B = 2 * max(1, getattr(cfg, stages[-1]).batch_size // world)
        out.append({"op": "queue_topk", "label": f"{'+'.join(stages)} lookup", "args": ("lookup", B, Q, Dp, k, qdt)})
    n_train = cfg.eval.final_train or DATASET_TRAIN.get(cfg.data.name, IMAGENET_TRAIN)
    n_train = bank or n_train
    if device.type == "cpu":
        n_train = min(n_train, CPU_BANK_CAP)
    from maect.eval.knn import SIM_BUDGET
    chunk = max(1, min(4096, SIM_BUDGET // n_train))
    out.append({"op": "queue_topk", "label": "final k-NN chunk",
                "args": ("knn", chunk, n_train, dims["D"], cfg.eval.knn_k, torch.float32)})
    N = max(1, cfg.mae.batch_size * cfg.mae.num_views // world)
    for op in ("masked_patch_embed", "random_masking", "decoder_input", "unshuffle"):
        out.append({"op": op, "label": "MAE", "args": (N, dims, cfg.mae.mask_ratio)})
    return out


def _topk_inputs(kind, B, Q, D, k, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    q = F.normalize(torch.randn(B, D, device=device, generator=g), dim=1).to(dtype)
    e = F.normalize(torch.randn(Q, D, device=device, generator=g), dim=1).to(dtype)
    if kind == "knn":
        return q, e, k, None, None
    qids = torch.randint(0, 1 << 30, (Q,), device=device, generator=g)
    ids = torch.randint(0, 1 << 30, (B,), device=device, generator=g)
    ids[: B // 2] = qids[torch.randint(0, Q, (B // 2,), device=device, generator=g)]
    return q, e, k, ids, qids


def _masking_call(op, N, dims, ratio, device):
    """(tensor for the key, L, D, inputs) of a training call of op."""
    g = torch.Generator(device=device).manual_seed(0)
    L, Dm, Dd, p = dims["L"], dims["D"], dims["Ddec"], dims["patch"]
    K = int(L * (1 - ratio))
    noise = torch.rand(N, L, device=device, generator=g)
    ids = torch.argsort(torch.argsort(noise, dim=1), dim=1)         # a permutation per row, as random_masking's
    if op == "masked_patch_embed":
        imgs = torch.randn(N, dims["chans"], dims["img"], dims["img"], device=device, generator=g)
        w = (torch.randn(Dm, dims["chans"], p, p, device=device, generator=g) * 0.02).requires_grad_()
        b = torch.zeros(Dm, device=device).requires_grad_()
        pos = torch.randn(1, L, Dm, device=device, generator=g) * 0.02
        return imgs, L, Dm, (imgs, w, b, pos, ratio, None)
    if op == "random_masking":
        x = torch.randn(N, L, Dm, device=device, generator=g).requires_grad_()
        return x, L, Dm, (x, ratio, None)
    tok = (torch.randn(1, 1, Dd, device=device, generator=g) * 0.02).requires_grad_()
    if op == "unshuffle":
        x = torch.randn(N, K, Dd, device=device, generator=g).requires_grad_()
        return x, L, Dd, (x, tok, ids)
    x = torch.randn(N, 1 + K, Dd, device=device, generator=g).requires_grad_()
    pos = torch.randn(1, 1 + L, Dd, device=device, generator=g) * 0.02
    return x, L, Dd, (x, tok, ids, pos, True)


def run(preset: str = "tiny", device: str = "cpu", world: int | None = None, bank: int | None = None,
        overrides: tuple = (), timer=None) -> dict:
    """Measure every case of the preset; returns {"rows": [...], "cost": [...], "ok": bool, ...}."""
    from maect.kernels import _route as K
    from maect.validation import load_config
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("maect.kernels.check: --device cuda, but torch sees no CUDA device")
    world = world or (torch.cuda.device_count() if dev.type == "cuda" else 1)
    cfg = load_config([f"preset={preset}", *overrides])
    if dev.type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    rows, costs, ok = [], [], True
    old = os.environ.get("MAECT_DISPATCH")
    os.environ["MAECT_DISPATCH"] = "measure"
    t_all = time.perf_counter()
    try:
        for case in cases(cfg, dev, world, bank):
            op = case["op"]
            with D.forced(timer) as made:
                if op == "queue_topk":
                    kind, B, Q, Dq, k, dt = case["args"]
                    q, e, k, ids, qids = _topk_inputs(kind, B, Q, Dq, k, dt, dev)
                    K._topk_backend(q, e, k, ids, qids, True)
                    shape = f"{case['label']}: B={B} Q={Q} D={Dq} k={k} {dtype_name(dt)}"
                else:
                    N, dims, ratio = case["args"]
                    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else \
                        contextlib.nullcontext()
                    with amp:
                        t, L, Dm, inputs = _masking_call(op, N, dims, ratio, dev)
                        K.choose(op, t, L, Dm, None, inputs, True)
                    shape = f"{case['label']}: N={N} L={L} D={Dm} {masking_dtype(t) if dev.type == 'cpu' else 'bf16 autocast'}"
            for key, d in made:
                ok &= not d.dropped
                rows += table_rows(op, shape, key, d)
                costs.append({"op": op, "shape": shape, "key": key, "cost_s": d.cost_s, "timing_s": d.timing_s,
                              "first_call_s": d.warmup_s, "measured_on": d.shape})
    finally:
        if old is None:
            os.environ.pop("MAECT_DISPATCH", None)
        else:
            os.environ["MAECT_DISPATCH"] = old
    env = {"torch": torch.__version__, "triton": D._triton_version(), "device": D.device_key(dev),
           "threads": torch.get_num_threads()}
    return {"preset": preset, "device": device, "world": world, "env": env, "rows": rows, "cost": costs, "ok": ok,
            "cache": str(D.cache().path), "wall_s": round(time.perf_counter() - t_all, 2)}


def table_rows(op, shape, key, d: D.Decision) -> list[dict]:
    rows = []
    for name, ms in d.ms.items():
        base = name == d.torch_path
        is_baseline = name.startswith(("torch ", "official "))   # "torch" alone: the verified candidate
        rows.append({"op": op, "shape": shape, "backend": name + (" *" if name == d.pick else ""),
                     "verified": "torch path" if is_baseline else ("yes (reference)" if name == "ref" else "yes"),
                     "ms": ms, "x_torch": 1.0 if base else d.ratio(name), "pick": name == d.pick})
    for name, why in d.dropped.items():
        rows.append({"op": op, "shape": shape, "backend": name, "verified": f"NO: {why}", "ms": None,
                     "x_torch": None, "pick": False})
    for name, why in d.not_run.items():
        rows.append({"op": op, "shape": shape, "backend": name, "verified": f"not run: {why}", "ms": None,
                     "x_torch": None, "pick": False})
    return rows


def format_table(res: dict) -> str:
    head = ("op", "shape", "backend", "verified", "ms", "x torch path")
    body = [(r["op"], r["shape"], r["backend"], r["verified"][:90], "-" if r["ms"] is None else f"{r['ms']:.3f}",
             "-" if r["x_torch"] is None else f"{r['x_torch']:.2f}") for r in res["rows"]]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)] if body else [len(h) for h in head]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()   # noqa: E731
    out = [f"maect.kernels.check: preset {res['preset']}, {res['env']['device']}, torch {res['env']['torch']}, "
           f"triton {res['env']['triton']}, world {res['world']} (* = chosen; x torch path > 1: faster)",
           line(head), line(["-" * w for w in widths])] + [line(b) for b in body]
    out.append("")
    out.append("cost of measuring (per op and shape class: verification + timing; first calls include any compile):")
    for c in res["cost"]:
        first = ", ".join(f"{k} {v:.3f}" for k, v in c["first_call_s"].items())
        out.append(f"  {c['op']:<18} {c['shape']:<55} {c['cost_s']:.2f} s (timing {c['timing_s']:.2f} s; "
                   f"first calls s: {first}; measured on {c['measured_on']})")
    out.append(f"decisions written to {res['cache']}; " + ("every backend verified" if res["ok"] else
                                                          "MISMATCH or ERROR: see the rows marked NO"))
    return "\n".join(out)


def check_args(a) -> str | None:
    """Why the arguments cannot describe a training run (one line), or None: the preset and overrides load and pass
    the config checks, --world-size divides every stage's global batch (mae: times mae.accum_steps), and --bank
    holds at least eval.knn_k samples."""
    from maect.config import ConfigError
    from maect.validation import load_config
    try:
        cfg = load_config([f"preset={a.preset}", *a.overrides])
    except ConfigError as exc:
        return str(exc)
    world = a.world_size if a.world_size is not None else (torch.cuda.device_count() if a.device == "cuda" else 1)
    if world < 1:
        return f"--world-size={a.world_size} must be >= 1"
    for name in ("mae", "head", "ct"):
        s = getattr(cfg, name)
        accum = s.accum_steps if name == "mae" else 1
        if s.batch_size % (world * accum):
            return (f"--world-size={world} does not divide {name}.batch_size={s.batch_size}"
                    + (f" x mae.accum_steps={accum}" if accum > 1 else "") + " (batch sizes are global)")
    if a.bank is not None and a.bank < cfg.eval.knn_k:
        return f"--bank={a.bank} is smaller than eval.knn_k={cfg.eval.knn_k}: the k-NN bank needs at least k samples"
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--static" in argv:   # compile and read the kernels for GPU targets, no GPU needed: kernels/static_check.py
        from . import static_check
        return static_check.main(argv)
    p = argparse.ArgumentParser(prog="python -m maect.kernels.check", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", help="preset name or YAML path (default tiny)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--world-size", type=int, default=None,
                   help="ranks the preset's global batch is split over (default: visible GPUs on cuda, 1 on cpu)")
    p.add_argument("--bank", type=int, default=None, help="train bank size of the final k-NN (default: the data set's)")
    p.add_argument("--json", help="write the table, the costs and the environment to this file")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. ct.batch_size=512)")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("maect.kernels.check: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    why = check_args(a)
    if why:
        print(f"maect.kernels.check: {why}", file=sys.stderr)
        return 2
    if a.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "0")
    res = run(a.preset, a.device, a.world_size, a.bank, tuple(a.overrides))
    print(format_table(res))
    if a.json:
        from maect.atomic import write_json
        write_json(a.json, res)
        print(f"wrote {a.json}")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
