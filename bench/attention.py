"""Attention backends side by side: forward and forward+backward time and TFLOP/s at ViT shapes, ratio to sdpa.

Providers: every backend of maect.models.attention (xformers with its own operator dispatch, xformers_cutlass and
xformers_flash with one operator pair forced, sdpa, sdpa_flash, sdpa_efficient, sdpa_cudnn, sdpa_math, math) on the
ViT's packed-qkv views, plus 'auto' (what the measured table picks), plus the three xFormers providers on contiguous
[N, T, H, Dh] inputs ("BMHK contiguous", the layout xFormers documents; the model itself passes strided views). A
provider that cannot run a shape is listed with its reason; the first line says whether xFormers loaded (and the
CUDA runtime preload, maect.models.xformers_load) or exactly why not.
Correctness first: each provider's output and q/k/v gradients, on the layout it is timed on, are compared with an
exact reference (fp64 math of the same inputs) before anything is timed, with the rule
    max |provider - exact| <= 2 x max |low-precision reference - exact| + atol
where the low-precision reference is the unfused math in the input dtype (bf16: attention_naive) or in fp32 (fp32
inputs: attention_ref); atol: fp32 2e-6 (about 30 ulps at |x| ~ 1: a blocked online softmax sums in another order),
bf16 2e-3 (a quarter of a bf16 ulp at 1). A provider that fails is reported and not timed.
FLOPs: forward 4 N H T^2 Dh (two GEMMs); forward+backward 3.5 x that (backward = 2.5 x forward: the FlashAttention
benchmark convention, five GEMMs counting the recomputed scores). "fwd" runs under no_grad (the frozen lower half
of stage 3 and inference), "fwd+bwd" with gradients for q, k, v (training).

  python bench/attention.py                            # GPU: ViT-B/L/H encoder (full and MAE-visible) + decoder, bf16
  python bench/attention.py --device cpu               # CPU: tiny fp32 shape set only
  python bench/attention.py --write-table maect/models/attention_table.json   # GPU: the 'auto' table
  python bench/attention.py --shapes "H/14 full,H/14 visible"                  # GPU: ViT-H/14 (head dim 80) only
--write-table merges: entries for other device types / dtypes / shapes already in the file stay.
"""
from __future__ import annotations

import math
import sys
import time

import torch

from common import add_ratio, base_parser, environment, measure, print_table, setup, sync, write_json

from maect.models import attention as A  # noqa: E402  (common puts the repo root on sys.path)
from maect.models import xformers_load as X  # noqa: E402

# (name, heads, T, Dh): encoder full sequence (1 + L tokens) and MAE-visible (1 + L/4), decoder (512 dim / 16 heads)
GPU_SHAPES = [("B/16 full", 12, 197, 64), ("B/16 visible", 12, 50, 64),
              ("L/16 full", 16, 197, 64), ("L/16 visible", 16, 50, 64),
              ("H/16 full", 16, 197, 80), ("H/16 visible", 16, 50, 80),
              ("H/14 full", 16, 257, 80), ("H/14 visible", 16, 65, 80),
              ("decoder /16", 16, 197, 32), ("decoder /14", 16, 257, 32)]
CPU_SHAPES = [("tiny visible", 3, 50, 32), ("tiny H/14-like", 3, 65, 80), ("tiny full", 3, 197, 64)]
BMHK = " (BMHK contiguous)"          # provider suffix: inputs are contiguous [N, T, H, Dh] tensors
PROVIDERS = list(A.CONCRETE) + ["auto"] + [n + BMHK for n in ("xformers", "xformers_cutlass", "xformers_flash")]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATOL = {torch.float32: 2e-6, torch.bfloat16: 2e-3, torch.float16: 5e-4}


def exact(q, k, v, g):
    """fp64 output and q/k/v gradients for upstream gradient g."""
    q, k, v = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    o = s.softmax(-1) @ v
    o.backward(g.double())
    return o.detach(), q.grad, k.grad, v.grad


def run_with_grad(fn, q, k, v, g, layout: str = "contiguous"):
    """fn's output and q/k/v gradients, fn called on the given layout: 'contiguous' [N, H, T, Dh] tensors, 'packed'
    views of one [N, T, 3, H, Dh] tensor (the ViT's qkv), or 'bmhk' views of contiguous [N, T, H, Dh] tensors."""
    if layout == "packed":
        leaf = torch.stack([t.detach() for t in (q, k, v)], 2).permute(0, 3, 2, 1, 4).contiguous().requires_grad_(True)
        args = leaf.permute(2, 0, 3, 1, 4)
        grads = lambda: leaf.grad.permute(2, 0, 3, 1, 4)   # noqa: E731
    elif layout == "bmhk":
        leaves = [t.detach().transpose(1, 2).contiguous().requires_grad_(True) for t in (q, k, v)]
        args = [t.transpose(1, 2) for t in leaves]
        grads = lambda: [t.grad.transpose(1, 2) for t in leaves]   # noqa: E731
    else:
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        args, grads = leaves, lambda: [t.grad for t in leaves]   # noqa: E731
    o = fn(*args)
    o.backward(g)
    return (o.detach(), *grads())


def errors(got, ref) -> list[float]:
    return [(a.double() - b).abs().max().item() for a, b in zip(got, ref)]


def check(fn, q, k, v, g, ref, low, layout: str) -> dict:
    """Output and gradient errors vs the exact reference, each within 2 x the low-precision reference's + atol."""
    err = errors(run_with_grad(fn, q, k, v, g, layout), ref)
    atol = ATOL[q.dtype]
    ok = all(e <= 2 * lo + atol for e, lo in zip(err, low))
    return {"ok": ok, "err_out": err[0], "err_grad": max(err[1:]),
            "tol_out": 2 * low[0] + atol, "tol_grad": 2 * max(low[1:]) + atol}


def bench_shape(label, N, H, T, Dh, dtype, device, budget, providers) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(N, T, 3, H, Dh, device=device, generator=g).to(dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)          # the ViT's packed layout: views, last dim contiguous
    dout = torch.randn(N, H, T, Dh, device=device, generator=g).to(dtype)
    # small batch for the correctness check (the fp64 reference at N=64 would dominate the run time)
    n = min(N, 4)
    cq, ck, cv, cg = q[:n], k[:n], v[:n], dout[:n]
    ref = exact(cq, ck, cv, cg)
    low_fn = A.attention_ref if dtype == torch.float32 else A.attention_naive
    low = errors(run_with_grad(low_fn, cq, ck, cv, cg), ref)
    fwd_flops = 4 * N * H * T * T * Dh
    rows, prev = [], A.get_backend()
    packed = (q, k, v)
    bmhk = tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in packed)   # [N,H,T,Dh] views of BMHK
    for provider in providers:
        name = provider.removesuffix(BMHK)
        q, k, v = bmhk if provider.endswith(BMHK) else packed
        A.set_backend(name)             # the public function is what is timed (its dispatch included)
        fn = A.attention
        row = {"shape": label, "N": N, "H": H, "T": T, "Dh": Dh, "dtype": str(dtype).replace("torch.", ""),
               "provider": provider}
        grad_ran, why = None, None
        try:
            grad_ran, why = A.resolve(name, q, k, v, grad=True)
            infer_ran, _ = A.resolve(name, q, k, v, grad=False)
        except A.BackendUnavailable:
            row["note"] = "n/a: " + A.why_not(name, q, k, v, True)
            rows.append(row)
            continue
        row["ran"] = grad_ran if grad_ran == infer_ran else f"{infer_ran}/{grad_ran}"
        try:
            row["check"] = check(fn, cq, ck, cv, cg, ref, low, "bmhk" if provider.endswith(BMHK) else "packed")
        except Exception as e:  # a backend that claims support but crashes: report, keep going
            row["note"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            rows.append(row)
            continue
        c = row["check"]
        row["err_ratio"] = max(c["err_out"] / c["tol_out"], c["err_grad"] / c["tol_grad"])
        if not c["ok"]:
            row["note"] = (f"WRONG: out err {c['err_out']:.2g} > {c['tol_out']:.2g} or grad err {c['err_grad']:.2g} "
                           f"> {c['tol_grad']:.2g}; not timed")
            rows.append(row)
            continue
        qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))

        def fwd():
            with torch.no_grad():
                return fn(q, k, v)

        def fwdbwd():
            o = fn(qg, kg, vg)
            return torch.autograd.grad(o, (qg, kg, vg), dout)

        f = measure(fwd, device, warmup=3, budget_s=budget)
        b = measure(fwdbwd, device, warmup=3, budget_s=budget)
        row.update(fwd_ms=f["median_ms"], fwd_p20=f["p20_ms"], fwd_p80=f["p80_ms"],
                   fwd_tflops=fwd_flops / (f["median_ms"] * 1e-3) / 1e12,
                   median_ms=b["median_ms"], bwd_p20=b["p20_ms"], bwd_p80=b["p80_ms"],
                   fwdbwd_tflops=3.5 * fwd_flops / (b["median_ms"] * 1e-3) / 1e12, note=why if name == "auto" else "")
        rows.append(row)
        sync(device)
    A.set_backend(prev)
    # ratio to sdpa: > 1 = faster than sdpa
    add_ratio(rows, "sdpa", col="x_sdpa_fwd", time_key="fwd_ms")
    add_ratio(rows, "sdpa", col="x_sdpa_fwdbwd")
    return rows


COLUMNS = [("provider", "provider", ""), ("ran", "runs", ""), ("err_ratio", "err/tol", ".2f"), ("fwd_ms", "fwd ms", ".3f"),
           ("fwd_p20", "p20", ".3f"), ("fwd_p80", "p80", ".3f"), ("fwd_tflops", "TFLOP/s", ".2f"), ("x_sdpa_fwd", "x sdpa", ".2f"),
           ("median_ms", "fwd+bwd ms", ".3f"), ("bwd_p20", "p20", ".3f"), ("bwd_p80", "p80", ".3f"),
           ("fwdbwd_tflops", "TFLOP/s", ".2f"), ("x_sdpa_fwdbwd", "x sdpa", ".2f"), ("note", "note", "")]


def make_table(rows: list[dict], env: dict, device_type: str = "cuda") -> dict:
    """The 'auto' table: per (device type, dtype, Dh, T bucket) the fastest correct candidate, summing medians over
    the shapes in the key; 'train' from fwd+bwd, 'infer' from fwd. Only backends measured on every shape of a key,
    on the packed views the model passes (the BMHK-contiguous rows are for reading only)."""
    measured = {k: env.get(k) for k in ("device", "torch", "commit", "xformers")} | {"date": time.strftime("%Y-%m-%d")}
    groups: dict = {}
    for r in rows:
        if r["provider"] in A.AUTO_CANDIDATES:
            key = A.table_key(device_type, getattr(torch, r["dtype"]), r["Dh"], r["T"])
            groups.setdefault(key, {}).setdefault(r["provider"], []).append(r)
    entries = {}
    for key, by in groups.items():
        n = max(len(v) for v in by.values())
        full = {p: v for p, v in by.items() if len(v) == n and all(x.get("median_ms") for x in v)}
        if not full:
            continue
        tr = {p: sum(x["median_ms"] for x in v) for p, v in full.items()}
        inf = {p: sum(x["fwd_ms"] for x in v) for p, v in full.items()}
        entries[key] = {"train": min(tr, key=tr.get), "infer": min(inf, key=inf.get),
                        "train_ms": {p: round(t, 4) for p, t in tr.items()},
                        "infer_ms": {p: round(t, 4) for p, t in inf.items()}, "measured_on": measured}
    return {"format": 1, "note": "written by bench/attention.py --write-table; see maect/models/attention.py",
            "measured_on": measured, "entries": entries}


def run(device: torch.device, dtype: torch.dtype, batch: int, budget: float, shapes=None) -> dict:
    shapes = shapes or (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    env = environment(device)
    xf = X.load_xformers()
    env["xformers"] = xf.version if xf.ok else f"unavailable: {xf.reason}"
    print(f"xformers: {'loaded ' + str(xf.version) if xf.ok else 'unavailable: ' + str(xf.reason)}"
          + (f" ({'; '.join(xf.notes)})" if xf.notes else ""))
    rows = []
    for label, H, T, Dh in shapes:
        r = bench_shape(label, batch, H, T, Dh, dtype, device, budget, PROVIDERS)
        print_table(f"{label}: N={batch} H={H} T={T} Dh={Dh} {str(dtype).replace('torch.', '')} on {env['device']} "
                    f"(x sdpa = sdpa time / provider time)", r, COLUMNS)
        rows += r
    return {"bench": "attention", "env": env, "rows": rows, "xformers": vars(xf),
            "failed": [f"{r['shape']}/{r['provider']}" for r in rows if r.get("check") and not r["check"]["ok"]]}


def gpu_suite_step(out: dict, budget_s: float) -> None:
    """For bench/gpu_suite.py: the GPU shape set in bf16 at batch 64 within about budget_s (CPU: the tiny set);
    fills out with the rows and the 'auto' table these measurements give (to be saved as
    maect/models/attention_table.json after a look)."""
    t0 = time.perf_counter()
    device = setup("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    shapes = GPU_SHAPES if cuda else CPU_SHAPES[:2]      # CPU dry run: a small and a head-dim-80 shape
    # per measurement: 2 passes x providers x shapes, plus warm-up/check overhead (~40% of the budget)
    per = max(0.02, 0.6 * budget_s / (2 * len(PROVIDERS) * len(shapes))) if cuda else 0.02   # CPU: code paths only
    res = run(device, torch.bfloat16 if cuda else torch.float32, 64 if cuda else 2, per, shapes)
    out.update(res)
    if cuda:   # save with A.save_table(A.TABLE_PATH, out["table"]) after a look, or run --write-table
        out["table"] = make_table(res["rows"], res["env"])
    out["seconds"] = round(time.perf_counter() - t0, 1)


def main() -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None, help="N (default: 64 on GPU, 2 on CPU)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--write-table", metavar="PATH", help="write (merge) the measured 'auto' picks into PATH "
                                                          "(maect/models/attention_table.json: the one auto reads)")
    p.add_argument("--shapes", help="comma-separated shape labels to run (default: all of the device's set)")
    args = p.parse_args()
    device = setup(args.device, args.threads)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    batch = args.batch or (64 if device.type == "cuda" else 2)
    budget = args.budget if args.budget is not None else (0.3 if device.type == "cuda" else 0.2)
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    if args.shapes:
        want = [w.strip() for w in args.shapes.split(",")]
        bad = [w for w in want if w not in {s[0] for s in shapes}]
        if bad:
            sys.exit(f"--shapes: unknown label(s) {bad}; choose from {[s[0] for s in shapes]}")
        shapes = [s for s in shapes if s[0] in want]
    res = run(device, dtype, batch, budget, shapes)
    if args.write_table:
        table = make_table(res["rows"], res["env"], device.type)
        A.save_table(args.write_table, table)
        A.clear_cache()
        print(f"\nauto table {args.write_table}: wrote {len(table['entries'])} entries: " +
              ", ".join(f"{k} train={e['train']} infer={e['infer']}" for k, e in table["entries"].items()))
    if res["failed"]:
        print(f"\nFAILED correctness: {res['failed']}")
    write_json(args.json, res)
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
