"""MAE masking and decoder unshuffle, forward + backward: the argsort + gather path vs maect's kernels.

Ops (same noise for both providers, so only the masking itself is timed):
  random_masking  x [N, L, D] -> x_visible [N, K, D], mask, ids_restore; backward: grad of x_visible -> grad x
  unshuffle       decoder tokens [N, K, 512] + mask token -> [N, L, 512]; backward: grad x and mask-token grad
Providers:
  MAE argsort+gather   kernels.random_masking_ref / unshuffle_ref (rand -> 2 argsorts -> gathers; baseline)
  MAE compiled         the same under torch.compile (GPU, --compile)
  maect                kernels.random_masking / kernels.unshuffle (public dispatch; backend printed)
GB/s counts the minimum bytes each op must move (reads + writes), so the providers are comparable.
On CPU this runs small shapes; unless a compiled CPU op is built, maect's dispatch runs the reference there too.

  python bench/masked_gather.py                  # GPU: ViT-B/16, L/16, H/14 shapes, N=256, ratio 0.75, bf16
  python bench/masked_gather.py --device cpu
"""
from __future__ import annotations

import sys

import torch

from common import add_ratio, base_parser, environment, gpu_peak_extra_mb, measure, print_table, setup, write_json

from maect import kernels  # noqa: E402  (common puts the repo root on sys.path)

GPU_SHAPES = [("ViT-B/16", 256, 196, 768), ("ViT-L/16", 256, 196, 1024), ("ViT-H/14", 256, 256, 1280)]
CPU_SHAPES = [("tiny", 64, 49, 96), ("small", 32, 196, 192)]
DEC_DIM = 512
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def masking_step(masking, x, noise, ratio, g):
    x_visible, mask, ids_restore = masking(x, ratio, noise)
    (gx,) = torch.autograd.grad(x_visible, x, g)
    return x_visible, mask, ids_restore, gx


def unshuffle_step(unshuffle, y, tok, ids, g):
    out = unshuffle(y, tok, ids)
    gy, gt = torch.autograd.grad(out, (y, tok), g)
    return out, gy, gt


def provider_ops(name, compile_):
    masking, unshuffle = ((kernels.random_masking_ref, kernels.unshuffle_ref) if name != "maect"
                          else (kernels.random_masking, kernels.unshuffle))
    if compile_:
        masking, unshuffle = torch.compile(masking, dynamic=False), torch.compile(unshuffle, dynamic=False)
    return masking, unshuffle


def inputs(N, L, D, ratio, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    K = int(L * (1 - ratio))
    x = torch.randn(N, L, D, device=device, generator=g).to(dtype).requires_grad_()
    noise = torch.rand(N, L, device=device, generator=g)
    g_vis = torch.randn(N, K, D, device=device, generator=g).to(dtype)
    y = torch.randn(N, K, DEC_DIM, device=device, generator=g).to(dtype).requires_grad_()
    tok = (0.02 * torch.randn(DEC_DIM, device=device, generator=g)).requires_grad_()     # fp32 parameter
    g_full = torch.randn(N, L, DEC_DIM, device=device, generator=g).to(dtype)
    return x, noise, g_vis, y, tok, g_full


def check(x, noise, ratio, g_vis, y, tok, g_full) -> dict:
    """maect vs the reference: everything but the mask-token grad is a copy and must be bit-identical; the token
    grad (a sum over N * (L - K) rows) is compared relative to the float64 sum of |g|."""
    ref_m, ker_m = provider_ops("MAE argsort+gather", False)[0], provider_ops("maect", False)[0]
    a, b = masking_step(ref_m, x, noise, ratio, g_vis), masking_step(ker_m, x, noise, ratio, g_vis)
    exact = all(torch.equal(u, v) for u, v in zip(a, b))
    ids = a[2]
    ra, ka = provider_ops("MAE argsort+gather", False)[1], provider_ops("maect", False)[1]
    c, d = unshuffle_step(ra, y, tok, ids, g_full), unshuffle_step(ka, y, tok, ids, g_full)
    exact = exact and torch.equal(c[0], d[0]) and torch.equal(c[1], d[1])
    scale = g_full.double().abs().sum((0, 1)).max().item()
    tok_err = (c[2].double() - d[2].double()).abs().max().item() / max(scale, 1e-30)
    # bf16 reference rounds the sum to bf16 (relative 2^-8); fp32 summation-order bound is M * 2^-24 relative
    tol = 2.0 ** -7 if g_full.dtype != torch.float32 else 2 * g_full.shape[0] * g_full.shape[1] * 2.0 ** -24
    return {"exact_copies": exact, "mask_token_grad_rel_diff": tok_err, "tol": tol, "ok": exact and tok_err <= tol}


def main() -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--ratio", type=float, default=0.75)
    p.add_argument("--dtype", choices=list(DTYPES))
    p.add_argument("--shape", type=str, default=None, help="N,L,D to run one custom shape")
    p.add_argument("--compile", action="store_true", help="add torch.compile of the reference (GPU)")
    p.add_argument("--no-mem", action="store_true")
    args = p.parse_args()
    device = setup(args.device, args.threads)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    budget = args.budget if args.budget is not None else (0.5 if device.type == "cuda" else 1.0)
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    if args.shape:
        shapes = [("custom", *map(int, args.shape.split(",")))]
    providers = ["MAE argsort+gather"] + (["MAE compiled"] if args.compile else []) + ["maect"]
    es = torch.finfo(dtype).bits // 8
    results, failed = [], False
    for label, N, L, D in shapes:
        K = int(L * (1 - args.ratio))
        x, noise, g_vis, y, tok, g_full = inputs(N, L, D, args.ratio, dtype, device)
        backend = kernels.backend_for(x)
        chk = check(x, noise, args.ratio, g_vis, y, tok, g_full)
        print(f"\n{label} N={N} L={L} D={D} (decoder {DEC_DIM}) ratio={args.ratio} {dtype} on {device.type}: maect "
              f"backend '{backend}'; check vs reference: {'OK' if chk['ok'] else 'FAILED'} {chk}")
        if not chk["ok"]:
            failed = True
            results.append({"shape": label, "N": N, "L": L, "D": D, "check": chk, "rows": []})
            continue
        ids_restore = kernels.random_masking_ref(x.detach(), args.ratio, noise)[2]
        # minimum traffic: noise, kept rows in and out, mask, ids | grad of kept rows in, full grad out
        bytes_mask = N * L * 4 + 2 * N * K * D * es + N * L * (es + 8) + N * K * D * es + N * L * D * es
        # x and ids in, full output | full grad in, grad x out, ids
        bytes_unsh = N * K * DEC_DIM * es + N * L * 8 + N * L * DEC_DIM * es + N * L * DEC_DIM * es \
            + N * K * DEC_DIM * es + N * L * 8
        rows = []
        for name in providers:
            masking, unshuffle = provider_ops(name, name == "MAE compiled")
            ops = [("random_masking", bytes_mask, lambda: masking_step(masking, x, noise, args.ratio, g_vis)),
                   ("unshuffle", bytes_unsh, lambda: unshuffle_step(unshuffle, y, tok, ids_restore, g_full))]
            for op, nbytes, fn in ops:
                row = {"op": op, "provider": name, "backend": backend if name == "maect" else "torch"}
                try:
                    row.update(measure(fn, device, warmup=3 if device.type == "cuda" else 1, budget_s=budget))
                    row["gbps"] = nbytes / (row["median_ms"] * 1e-3) / 1e9
                    if device.type == "cuda" and not args.no_mem:
                        row["peak_extra_mib"] = gpu_peak_extra_mb(fn, device)
                except Exception as ex:
                    row["error"] = f"{type(ex).__name__}: {ex}"[:200]
                rows.append(row)
        for op in ("random_masking", "unshuffle"):
            add_ratio([r for r in rows if r["op"] == op], "MAE argsort+gather")
        rows.sort(key=lambda r: r["op"])
        print_table(f"{label} N={N} L={L} D={D} ratio={args.ratio} {dtype}, forward+backward "
                    f"({device.type}; speedup = MAE / provider)", rows,
                    [("op", "op", ""), ("provider", "provider", ""), ("backend", "backend", ""),
                     ("median_ms", "median ms", ".3f"), ("p20_ms", "p20", ".3f"), ("p80_ms", "p80", ".3f"),
                     ("speedup", "speedup", ".2f"), ("gbps", "GB/s", ".1f"),
                     ("peak_extra_mib", "peak extra MiB", ".1f"),
                     ("error", "error", "")])
        results.append({"shape": label, "N": N, "L": L, "D": D, "ratio": args.ratio, "dtype": str(dtype),
                        "check": chk, "rows": rows})
    write_json(args.json, {"bench": "masked_gather", "env": environment(device), "results": results})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
