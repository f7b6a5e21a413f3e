"""NNCLR queue lookup: top-k cosine neighbours of B queries in a Q x D queue, with self-id exclusion.

Providers (same inputs; the queue holds L2-normalised rows, the queries are raw projector outputs):
  matmul (floor)   q @ queueᵀ alone: the GEMM every provider must do (cuBLAS on GPU, MKL/OpenBLAS on CPU)
  mm + topk        q @ queueᵀ then torch.topk: no normalisation, no exclusion
  official NNCLR   the published path: normalise q, re-normalise the whole queue, materialise the B x Q matrix,
                   build a B x Q self-id mask, masked_fill, topk (baseline of the ratio column)
  official compiled  the same under torch.compile (GPU, --compile, headline config only)
  maect            normalise q, then kernels.queue_topk (public dispatch; backend printed: triton / cpp / ref)
Correctness first: maect's output is compared with the fp32 reference on the same inputs before anything is timed.

  python bench/queue_lookup.py                        # GPU: headline B=2048 Q=65536 D=256 k=1/20/64 + sweep
  python bench/queue_lookup.py --device cpu --Q 8192  # CPU: fp32, k=20
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from common import (add_ratio, base_parser, environment, gpu_peak_extra_mb, measure, print_table,
                    rss_peak_extra_mb, run_child, setup, sync, write_json)

from maect import kernels  # noqa: E402  (common puts the repo root on sys.path)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROVIDERS = ["matmul (floor)", "mm + topk", "official NNCLR", "official compiled", "maect"]


def make_inputs(B: int, Q: int, D: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """query [B, D] raw, queue [Q, D] unit rows, sample ids from an ImageNet-sized id space; half the queries have
    their own id somewhere in the queue (the case the exclusion exists for)."""
    g = torch.Generator(device=device).manual_seed(seed)
    query = torch.randn(B, D, device=device, generator=g).to(dtype)
    queue = F.normalize(torch.randn(Q, D, device=device, generator=g), dim=1).to(dtype)
    queue_ids = torch.randint(0, 1_281_167, (Q,), device=device, generator=g)
    ids = torch.randint(0, 1_281_167, (B,), device=device, generator=g)
    hit = torch.randint(0, Q, (B // 2,), device=device, generator=g)
    ids[: B // 2] = queue_ids[hit]
    return query, queue, ids, queue_ids


def official_nnclr(q, queue, ids, queue_ids, k):
    q = F.normalize(q, dim=-1)
    e = F.normalize(queue, dim=-1)                       # the whole queue, every step
    sim = q @ e.T                                        # [B, Q] in the input dtype
    is_own = queue_ids[None, :] == ids[:, None]          # [B, Q] bool
    sim.masked_fill_(is_own, float("-inf"))
    return sim.topk(k, dim=1)


def maect_lookup(q, queue, ids, queue_ids, k):
    return kernels.queue_topk(F.normalize(q, dim=1), queue, k, ids, queue_ids, True)


def provider_fns(name, q, e, ids, qids, k):
    if name == "matmul (floor)":
        return lambda: q @ e.T
    if name == "mm + topk":
        return lambda: (q @ e.T).topk(k, dim=1)
    if name == "official NNCLR":
        return lambda: official_nnclr(q, e, ids, qids, k)
    if name == "official compiled":
        compiled = torch.compile(official_nnclr, dynamic=False)
        return lambda: compiled(q, e, ids, qids, k)
    if name == "maect":
        return lambda: maect_lookup(q, e, ids, qids, k)
    raise ValueError(name)


def check(q, e, ids, qids, k, rows: int = 256) -> dict:
    """maect vs the fp32 reference on the first `rows` queries. Values within 2 (D + 8) u (summation order only:
    both accumulate fp32 products of the same inputs); every returned index must hold its returned value; the
    index agreement with the reference is reported (it is < 1 only where neighbours tie within rounding)."""
    D = q.shape[1]
    v, i = maect_lookup(q, e, ids, qids, k)
    qn = F.normalize(q, dim=1)[:rows]
    v, i, ids_r = v[:rows], i[:rows], ids[:rows]
    rv, ri = kernels.queue_topk_ref(qn, e, k, ids_r, qids, True)
    tol = 2 * (D + 8) * 2.0 ** -24
    fin = torch.isfinite(rv)
    sim = (qn.float() @ e.float().T).masked_fill(ids_r[:, None] == qids[None, :], float("-inf"))
    at = sim.gather(1, i.clamp(min=0))
    res = {"rows_checked": int(qn.shape[0]), "tol": tol,
           "max_value_diff": (v[fin] - rv[fin]).abs().max().item() if fin.any() else 0.0,
           "max_index_value_diff": (at[fin] - v[fin]).abs().max().item() if fin.any() else 0.0,
           "index_agreement": (i == ri).float().mean().item()}
    _, oi = official_nnclr(q[:rows], e, ids_r, qids, k)
    res["official_top1_agreement"] = (oi[:, 0] == ri[:, 0]).float().mean().item()   # bf16 matrix on GPU
    res["ok"] = bool(res["max_value_diff"] <= tol and res["max_index_value_diff"] <= tol
                     and torch.equal(torch.isfinite(v), fin) and torch.equal(i[~fin], ri[~fin]))
    return res


def configs(args, device):
    """(B, Q, D, k, dtype name, allow compile) to run."""
    custom = any(getattr(args, n) is not None for n in ("B", "Q", "D", "k"))
    B, Q, D = args.B or 2048, args.Q or 65536, args.D or 256
    if device.type == "cpu":
        return [(B, Q, D, args.k or 20, args.dtype or "fp32", False)]
    if custom:
        return [(B, Q, D, args.k or 20, args.dtype or "bf16", args.compile)]
    out = [(2048, 65536, 256, k, "bf16", args.compile and k == 20) for k in (1, 20, 64)]
    out.append((2048, 65536, 256, 20, "fp32", False))
    if args.sweep:
        out += [(256, 65536, 256, 20, "bf16", False), (8192, 65536, 256, 20, "bf16", False),
                (2048, 16384, 256, 20, "bf16", False), (2048, 262144, 256, 20, "bf16", False)]
    return out


def mem_child(args) -> None:
    """--_mem-child NAME: peak extra RSS of one call of provider NAME in this fresh process (one JSON line)."""
    device = setup("cpu")
    dtype = DTYPES[args.dtype or "fp32"]
    small = make_inputs(8, 64, args.D, dtype, device)
    provider_fns(args.mem_child, *small, min(args.k, 64))()      # thread pool and allocator warm, tiny shape
    q, e, ids, qids = make_inputs(args.B, args.Q, args.D, dtype, device)
    mb, method = rss_peak_extra_mb(provider_fns(args.mem_child, q, e, ids, qids, args.k))
    print(json.dumps({"extra_mb": mb, "method": method}))


def main() -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--B", type=int)
    p.add_argument("--Q", type=int)
    p.add_argument("--D", type=int)
    p.add_argument("--k", type=int)
    p.add_argument("--dtype", choices=list(DTYPES))
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                   help="GPU: also run the small sweep after the headline configs")
    p.add_argument("--compile", action="store_true", help="GPU: add torch.compile of the official path")
    p.add_argument("--no-mem", action="store_true", help="skip peak-memory measurement")
    p.add_argument("--_mem-child", dest="mem_child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mem_child:
        mem_child(args)
        return 0
    device = setup(args.device, args.threads)
    budget = args.budget if args.budget is not None else (0.5 if device.type == "cuda" else 2.0)
    results, failed = [], False
    for B, Q, D, k, dt, allow_compile in configs(args, device):
        dtype = DTYPES[dt]
        q, e, ids, qids = make_inputs(B, Q, D, dtype, device)
        backend = kernels.backend_for(q)
        chk = check(q, e, ids, qids, k)                    # correctness first (also triggers GPU autotuning)
        print(f"\nB={B} Q={Q} D={D} k={k} {dt} on {device.type}: maect backend '{backend}'; check vs reference: "
              f"{'OK' if chk['ok'] else 'FAILED'} (max value diff {chk['max_value_diff']:.2g} <= tol {chk['tol']:.2g}, "
              f"index agreement {chk['index_agreement']:.4f}, official top-1 agreement "
              f"{chk['official_top1_agreement']:.4f})")
        if not chk["ok"]:
            failed = True
            results.append({"B": B, "Q": Q, "D": D, "k": k, "dtype": dt, "check": chk, "rows": []})
            continue
        rows = []
        for name in PROVIDERS:
            if name == "official compiled" and not allow_compile:
                continue
            fn = provider_fns(name, q, e, ids, qids, k)
            row = {"provider": name, "backend": backend if name == "maect" else "torch"}
            try:
                row.update(measure(fn, device, warmup=3 if device.type == "cuda" else 1, budget_s=budget))
            except Exception as ex:  # e.g. torch.compile unavailable: report, keep going
                row["error"] = f"{type(ex).__name__}: {ex}"[:200]
                rows.append(row)
                continue
            row["tflops"] = 2 * B * Q * D / (row["median_ms"] * 1e-3) / 1e12
            if not args.no_mem:
                if device.type == "cuda":
                    row["peak_extra_mib"] = gpu_peak_extra_mb(fn, device)
                elif name != "official compiled":
                    child = run_child(Path(__file__), ["--_mem-child", name, "--B", str(B), "--Q", str(Q),
                                                       "--D", str(D), "--k", str(k), "--dtype", dt])
                    row["peak_extra_mib"] = child and child["extra_mb"]
                    row["mem_method"] = child and child["method"]
            rows.append(row)
            sync(device)
        add_ratio(rows, "official NNCLR")
        print_table(f"queue lookup  B={B} Q={Q} D={D} k={k} {dt}  ({device.type}; speedup = official / provider)",
                    rows, [("provider", "provider", ""), ("backend", "backend", ""), ("median_ms", "median ms", ".3f"),
                           ("p20_ms", "p20", ".3f"), ("p80_ms", "p80", ".3f"), ("speedup", "speedup", ".2f"),
                           ("tflops", "TFLOP/s", ".3f"), ("peak_extra_mib", "peak extra MiB", ".1f"),
                           ("error", "error", "")])
        results.append({"B": B, "Q": Q, "D": D, "k": k, "dtype": dt, "check": chk, "rows": rows})
    if device.type == "cpu":
        print("\nCPU peak extra memory: one call in a fresh process, VmHWM after it minus VmRSS before it.")
    write_json(args.json, {"bench": "queue_lookup", "env": environment(device), "results": results})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
