"""Attention backends side by side: forward and forward+backward time and TFLOP/s at ViT shapes, ratio to the torch
path (sdpa, torch picking its kernel per call).

Providers: every backend of the attention op (maect/models/attention.py), each asked for by name (set_backend) and
called through the public function on the ViT's packed-qkv views. A backend that cannot run a shape is listed with
its reason; the first line says whether xFormers loaded (maect.models.xformers_load) or exactly why not. Which
backend the model runs is not decided here: the trainer decides at start-up, or `python -m maect.kernels.check`;
the line under each table names the decision (or static default) for the shape.
Correctness first: each provider's output and q/k/v gradients are compared with the exact reference (fp64 math of
the same inputs) before anything is timed, with the rule
    max |provider - exact| <= 2 x max |low-precision reference - exact| + atol
where the low-precision reference is the unfused math in the input dtype (bf16: attention_naive) or in fp32 (fp32
inputs: attention_ref); atol: fp32 2e-6 (about 30 ulps at |x| ~ 1: a blocked online softmax sums in another order),
bf16 2e-3 (a quarter of a bf16 ulp at 1). A provider that fails is reported, not timed, and the run exits 1.
FLOPs: forward 4 N H T^2 Dh (two GEMMs); forward+backward 3.5 x that (backward = 2.5 x forward: the FlashAttention
benchmark convention, five GEMMs counting the recomputed scores). "fwd" runs under no_grad (the frozen lower half
of stage 3 and inference), "fwd+bwd" with gradients for q, k, v (training).

  python bench/attention.py                            # GPU: ViT-B/L/H encoder (full and MAE-visible) + decoder, bf16
  python bench/attention.py --device cpu               # CPU: tiny fp32 shape set only
  python bench/attention.py --shapes "H/14 full,H/14 visible"                  # GPU: ViT-H/14 (head dim 80) only
"""
from __future__ import annotations

import math
import sys

import torch

from common import add_ratio, backend_of, base_parser, environment, measure, print_table, setup, sync, write_json

from maect.models import attention as A  # noqa: E402  (common puts the repo root on sys.path)
from maect.models import xformers_load as X  # noqa: E402

# (name, heads, T, Dh): encoder full sequence (1 + L tokens) and MAE-visible (1 + L/4), decoder (512 dim / 16 heads)
GPU_SHAPES = [("B/16 full", 12, 197, 64), ("B/16 visible", 12, 50, 64),
              ("L/16 full", 16, 197, 64), ("L/16 visible", 16, 50, 64),
              ("H/16 full", 16, 197, 80), ("H/16 visible", 16, 50, 80),
              ("H/14 full", 16, 257, 80), ("H/14 visible", 16, 65, 80),
              ("decoder /16", 16, 197, 32), ("decoder /14", 16, 257, 32)]
CPU_SHAPES = [("tiny visible", 3, 50, 32), ("tiny H/14-like", 3, 65, 80), ("tiny full", 3, 197, 64)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATOL = {torch.float32: 2e-6, torch.bfloat16: 2e-3, torch.float16: 5e-4}
TORCH_PATH = A.OP.backends[0].name


def with_grad(fn, q, k, v, g):
    """fn's output and q/k/v gradients (fp64 for the exact reference), inputs as views of one packed leaf."""
    leaf = torch.stack([t.detach() for t in (q, k, v)], 2).permute(0, 3, 2, 1, 4).contiguous()
    leaf = leaf.double().requires_grad_(True) if fn is None else leaf.requires_grad_(True)
    q, k, v = leaf.permute(2, 0, 3, 1, 4)
    o = ((q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])).softmax(-1) @ v if fn is None else fn(q, k, v)
    o.backward(g.to(o.dtype))
    return (o.detach(), *leaf.grad.permute(2, 0, 3, 1, 4))


def errors(got, ref) -> list[float]:
    return [(a.double() - b).abs().max().item() for a, b in zip(got, ref)]


def bench_shape(label, N, H, T, Dh, dtype, device, budget) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(N, T, 3, H, Dh, device=device, generator=g).to(dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)          # the ViT's packed layout: views, last dim contiguous
    dout = torch.randn(N, H, T, Dh, device=device, generator=g).to(dtype)
    n = min(N, 4)                                 # the check's batch (an fp64 reference at N=64 would dominate)
    check_args = (q[:n], k[:n], v[:n], dout[:n])
    ref = with_grad(None, *check_args)
    low = errors(with_grad(A.attention_ref if dtype == torch.float32 else A.attention_naive, *check_args), ref)
    tol = [2 * lo + ATOL[dtype] for lo in low]
    fwd_flops = 4 * N * H * T * T * Dh
    rows, prev = [], A.get_backend()
    qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
    for name in A.OP.names():
        row = {"shape": label, "N": N, "H": H, "T": T, "Dh": Dh, "dtype": str(dtype).replace("torch.", ""),
               "provider": name}
        rows.append(row)
        why = A.why_not(name, q, k, v, grad=True)
        if why is not None:
            row["note"] = "n/a: " + why
            continue
        A.set_backend(name)                       # the public function is what is timed (its lookup included)
        try:
            err = errors(with_grad(A.attention, *check_args), ref)
        except Exception as e:                    # a backend that claims support but crashes: report, keep going
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            continue
        row["err_ratio"] = max(e / t for e, t in zip(err, tol))
        if row["err_ratio"] > 1:
            row["error"] = f"WRONG: errors out/dq/dk/dv {[f'{e:.2g}' for e in err]} > {[f'{t:.2g}' for t in tol]}"
            continue

        def fwd():
            with torch.no_grad():
                return A.attention(q, k, v)

        def fwdbwd():
            return torch.autograd.grad(A.attention(qg, kg, vg), (qg, kg, vg), dout)

        f, b = measure(fwd, device, budget_s=budget), measure(fwdbwd, device, budget_s=budget)
        row.update(fwd_ms=f["median_ms"], fwd_tflops=fwd_flops / (f["median_ms"] * 1e-3) / 1e12,
                   median_ms=b["median_ms"], fwdbwd_tflops=3.5 * fwd_flops / (b["median_ms"] * 1e-3) / 1e12)
        sync(device)
    A.set_backend(prev)
    add_ratio(rows, TORCH_PATH, col="x_fwd", time_key="fwd_ms")      # > 1: faster than the torch path
    add_ratio(rows, TORCH_PATH, col="x_fwdbwd")
    return rows


COLUMNS = [("provider", "provider", ""), ("err_ratio", "err/tol", ".2f"), ("fwd_ms", "fwd ms", ".3f"),
           ("fwd_tflops", "TFLOP/s", ".2f"), ("x_fwd", f"x {TORCH_PATH}", ".2f"), ("median_ms", "fwd+bwd ms", ".3f"),
           ("fwdbwd_tflops", "TFLOP/s", ".2f"), ("x_fwdbwd", f"x {TORCH_PATH}", ".2f"), ("error", "error", ""),
           ("note", "note", "")]


def main() -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None, help="N (default: 64 on GPU, 2 on CPU)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--shapes", help="comma-separated shape labels to run (default: all of the device's set)")
    args = p.parse_args()
    device = setup(args.device, args.threads)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    batch = args.batch or (64 if device.type == "cuda" else 2)
    budget = args.budget if args.budget is not None else (0.3 if device.type == "cuda" else 0.2)
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    if args.shapes:
        want = [w.strip() for w in args.shapes.split(",")]
        if bad := [w for w in want if w not in {s[0] for s in shapes}]:
            sys.exit(f"--shapes: unknown label(s) {bad}; choose from {[s[0] for s in shapes]}")
        shapes = [s for s in shapes if s[0] in want]
    env = environment(device)
    xf = X.load_xformers()
    env["xformers"] = xf.version if xf.ok else f"unavailable: {xf.reason}"
    print(f"xformers: {'loaded ' + str(xf.version) if xf.ok else 'unavailable: ' + str(xf.reason)}"
          + (f" ({'; '.join(xf.notes)})" if xf.notes else ""))
    rows = []
    for label, H, T, Dh in shapes:
        r = bench_shape(label, batch, H, T, Dh, dtype, device, budget)
        print_table(f"{label}: N={batch} H={H} T={T} Dh={Dh} {str(dtype).replace('torch.', '')} on {env['device']} "
                    f"(x {TORCH_PATH} = {TORCH_PATH} time / provider time)", r, COLUMNS)
        q = torch.empty(1, H, T, Dh, dtype=dtype, device=device, requires_grad=True)
        print(f"  the model runs: train {backend_of('attention', q, q, q)}; "
              f"infer {backend_of('attention', *(q.detach(),) * 3)}")
        rows += r
    failed = [f"{r['shape']}/{r['provider']}: {r['error']}" for r in rows if r.get("error")]
    print("\ncorrectness: " + ("FAILED:\n  " + "\n  ".join(failed) if failed else
                               f"ok ({sum('err_ratio' in r for r in rows)} provider x shape checks within tolerance)"))
    write_json(args.json, {"bench": "attention", "env": env, "rows": rows, "failed": failed})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
