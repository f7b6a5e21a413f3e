"""NNCLR queue lookup: top-k cosine neighbours of B queries in a Q x D queue, with self-id exclusion.

Providers (same inputs; the queue holds L2-normalised rows, the queries are raw projector outputs):
  matmul (floor)      q @ queueᵀ alone in the input dtype (cuBLAS on GPU, MKL/OpenBLAS on CPU; fp32 without TF32)
  bf16 matmul         the same GEMM in bf16 (fp32 inputs only): what autocast runs
  mm + topk           q @ queueᵀ then torch.topk: no normalisation, no exclusion
  official NNCLR      the published path: normalise q, re-normalise the whole queue, materialise the B x Q matrix,
                      build a B x Q self-id mask, masked_fill, topk (baseline of the ratio column for bf16 inputs)
  official autocast   the same under torch.autocast(bf16) on GPU: what the official training code runs with its fp32
                      queue (baseline of the ratio column for fp32 inputs)
  official compiled   the official path under torch.compile (GPU, --compile, k=20 only)
  maect               normalise q, then kernels.queue_topk with the decision the trainer makes at start-up
                      (kernels/dispatch.py decide: read from the cache, else measured now; printed)
Correctness first: maect's output is compared with the fp32 reference on the same inputs before anything is timed.

The training call (--training, on by default): the exact call the CT step makes, FeatureQueue.lookup on both views
(2B rows, one call, the queue in its training dtype: nnclr.queue_dtype=auto, bf16 on CUDA, fp32 on CPU) with the
random top-k pick and the neighbours' gather, against the official step's two lookups under autocast with an fp32
queue (pick and gather included) and the bare bf16 GEMM of the same shape (2B x D @ D x Q).

  python bench/queue_lookup.py                        # GPU: headline B=2048 Q=65536 D=256 k=1/20/64, fp32, sweep
  python bench/queue_lookup.py --device cpu           # CPU: fp32, k=20, B=2048 Q=65536, + the training call
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
from maect.kernels import dispatch  # noqa: E402
from maect.engine import autocast  # noqa: E402  (bf16 on CUDA, none on CPU: the trainer's precision=auto)
from maect.heads import FeatureQueue, queue_dtype  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROVIDERS = ["matmul (floor)", "bf16 matmul", "mm + topk", "official NNCLR", "official autocast", "official compiled",
             "maect"]


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
    sim = q @ e.T                                        # [B, Q] in the input dtype (bf16 under autocast)
    is_own = queue_ids[None, :] == ids[:, None]          # [B, Q] bool
    sim.masked_fill_(is_own, float("-inf"))
    return sim.topk(k, dim=1)


def maect_lookup(q, queue, ids, queue_ids, k):
    return kernels.queue_topk(F.normalize(q, dim=1), queue, k, ids, queue_ids, True)


def provider_fns(name, q, e, ids, qids, k):
    if name == "matmul (floor)":
        return lambda: q @ e.T
    if name == "bf16 matmul":
        qb, eb = q.bfloat16(), e.bfloat16()
        return lambda: qb @ eb.T
    if name == "mm + topk":
        return lambda: (q @ e.T).topk(k, dim=1)
    if name == "official NNCLR":
        return lambda: official_nnclr(q, e, ids, qids, k)
    if name == "official autocast":
        def run():
            with autocast("auto", q.device):
                return official_nnclr(q, e, ids, qids, k)
        return run
    if name == "official compiled":
        compiled = torch.compile(official_nnclr, dynamic=False)
        return lambda: compiled(q, e, ids, qids, k)
    if name == "maect":
        return lambda: maect_lookup(q, e, ids, qids, k)
    raise ValueError(name)


def check_result(qn, e, ids, qids, k, v, i) -> dict:
    """(v, i) for normalised queries qn against the fp32 reference: values within 2 (D + 8) u (both sides sum fp32
    products of the same inputs, in different orders); every returned index holds its returned value; the index
    agreement is reported (< 1 only where neighbours tie within rounding)."""
    D = qn.shape[1]
    rv, ri = kernels.queue_topk_ref(qn, e, k, ids, qids, True)
    tol = 2 * (D + 8) * 2.0 ** -24
    fin = torch.isfinite(rv)
    sim = (qn.float() @ e.float().T).masked_fill(ids[:, None] == qids[None, :], float("-inf"))
    at = sim.gather(1, i.clamp(min=0))
    res = {"rows_checked": int(qn.shape[0]), "tol": tol,
           "max_value_diff": (v[fin] - rv[fin]).abs().max().item() if fin.any() else 0.0,
           "max_index_value_diff": (at[fin] - v[fin]).abs().max().item() if fin.any() else 0.0,
           "index_agreement": (i == ri).float().mean().item()}
    res["ok"] = bool(res["max_value_diff"] <= tol and res["max_index_value_diff"] <= tol
                     and torch.equal(torch.isfinite(v), fin) and torch.equal(i[~fin], ri[~fin]))
    return res


def check(q, e, ids, qids, k, rows: int = 256) -> dict:
    """maect (public dispatch, all B rows) vs the reference on the first `rows` queries."""
    v, i = maect_lookup(q, e, ids, qids, k)
    qn = F.normalize(q, dim=1)[:rows]
    res = check_result(qn, e, ids[:rows], qids, k, v[:rows], i[:rows])
    _, oi = official_nnclr(q[:rows], e, ids[:rows], qids, k)
    ri = kernels.queue_topk_ref(qn, e, k, ids[:rows], qids, True)[1]
    res["official_top1_agreement"] = (oi[:, 0] == ri[:, 0]).float().mean().item()   # bf16 matrix on GPU
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
                (2048, 16384, 256, 20, "bf16", False), (2048, 262144, 256, 20, "bf16", False),
                (2048, 65536, 256, 128, "bf16", False), (256, 65536, 256, 20, "fp32", False)]
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


def bench_config(args, device, B, Q, D, k, dt, allow_compile, budget) -> dict:
    dtype = DTYPES[dt]
    q, e, ids, qids = make_inputs(B, Q, D, dtype, device)
    d = dispatch.decide("queue_topk", (F.normalize(q, dim=1), e, k, ids, qids, True))
    backend = d.pick
    chk = check(q, e, ids, qids, k)                    # correctness first (also compiles the kernels on GPU)
    print(f"\nB={B} Q={Q} D={D} k={k} {dt} on {device.type}: maect runs {d.brief()}; check vs reference: "
          f"{'OK' if chk['ok'] else 'FAILED'} (max value diff {chk['max_value_diff']:.2g} <= tol {chk['tol']:.2g}, "
          f"index agreement {chk['index_agreement']:.4f}, official top-1 agreement "
          f"{chk['official_top1_agreement']:.4f})")
    res = {"B": B, "Q": Q, "D": D, "k": k, "dtype": dt, "check": chk, "rows": []}
    if not chk["ok"]:
        return res
    names = [n for n in PROVIDERS if not (n == "official compiled" and not allow_compile)
             and not (n in ("bf16 matmul", "official autocast") and (dtype != torch.float32 or device.type != "cuda"))]
    for name in names:
        fn = provider_fns(name, q, e, ids, qids, k)
        row = {"provider": name, "backend": backend if name == "maect" else "torch"}
        try:
            row.update(measure(fn, device, warmup=3 if device.type == "cuda" else 1, budget_s=budget))
        except Exception as ex:  # e.g. torch.compile unavailable: report, keep going
            row["error"] = f"{type(ex).__name__}: {ex}"[:200]
            res["rows"].append(row)
            continue
        row["tflops"] = 2 * B * Q * D / (row["median_ms"] * 1e-3) / 1e12
        if not args.no_mem:
            if device.type == "cuda":
                row["peak_extra_mib"] = gpu_peak_extra_mb(fn, device)
            elif name != "official compiled":
                child = run_child(Path(__file__), ["--_mem-child", name, "--B", str(B), "--Q", str(Q), "--D", str(D),
                                                   "--k", str(k), "--dtype", dt])
                row["peak_extra_mib"] = child and child["extra_mb"]
                row["mem_method"] = child and child["method"]
        res["rows"].append(row)
        sync(device)
    base = "official autocast" if "official autocast" in names else "official NNCLR"
    add_ratio(res["rows"], base)
    floor = next((r for r in res["rows"] if r["provider"] == "matmul (floor)" and "median_ms" in r), None)
    for r in res["rows"]:
        if floor and "median_ms" in r:
            r["x_gemm"] = r["median_ms"] / floor["median_ms"]
    print_table(f"queue lookup  B={B} Q={Q} D={D} k={k} {dt}  ({device.type}; speedup = {base} / provider; "
                f"x GEMM = provider / matmul)", res["rows"],
                [("provider", "provider", ""), ("backend", "backend", ""), ("median_ms", "median ms", ".3f"),
                 ("p20_ms", "p20", ".3f"), ("p80_ms", "p80", ".3f"), ("speedup", "speedup", ".2f"),
                 ("x_gemm", "x GEMM", ".2f"), ("tflops", "TFLOP/s", ".3f"), ("peak_extra_mib", "peak extra MiB", ".1f"),
                 ("error", "error", "")])
    return res


def training_call(device, B: int, Q: int, k: int, budget: float) -> dict:
    """The CT step's lookup of both views (see the module docstring) against the official two lookups."""
    D = 256
    g = torch.Generator(device=device).manual_seed(B + k)
    z0, z1 = (F.normalize(torch.randn(B, D, device=device, generator=g), dim=1) for _ in range(2))
    ids = torch.randint(0, 1_281_167, (B,), device=device, generator=g)
    queue = FeatureQueue(Q, D, generator=torch.Generator().manual_seed(0), dtype=queue_dtype("auto", device)).to(device)
    queue.ids.copy_(torch.randint(0, 1_281_167, (Q,), device=device, generator=g))
    queue.ids[: B // 2] = ids[: B // 2]                                   # some queries meet their own id
    official_queue = queue.features.float()                              # the official code keeps an fp32 queue
    pick_gen = torch.Generator().manual_seed(1)

    def official():   # two lookups under autocast (one per view), random pick, gather
        out = []
        for z in (z0, z1):
            with autocast("auto", device):
                idx = official_nnclr(z, official_queue, ids, queue.ids, k).indices
            pick = torch.randint(0, k, (B, 1), generator=pick_gen).to(device, non_blocking=True)
            out.append(official_queue[idx.gather(1, pick)[:, 0]])
        return out

    zz, ids2 = torch.cat([z0, z1]), torch.cat([ids, ids])
    zb, eb = zz.to(queue.features.dtype), queue.features                 # bf16 on GPU (what autocast runs)
    base = "official (autocast, 2 calls)" if device.type == "cuda" else "official (fp32, 2 calls)"
    fns = {base: official,
           "maect FeatureQueue.lookup (1 call)": lambda: queue.lookup(zz, ids2, k, generator=pick_gen),
           f"bare mm {str(eb.dtype)[6:]} (2B x D @ D x Q)": lambda: zb @ eb.T}
    _, idx = queue.lookup(zz, ids2, k, generator=torch.Generator().manual_seed(2))
    ok = bool((idx >= 0).all() and not (queue.ids[idx] == ids2).any())
    rows = []
    for name, fn in fns.items():
        row = {"provider": name}
        row.update(measure(fn, device, warmup=3 if device.type == "cuda" else 1, budget_s=budget))
        rows.append(row)
    add_ratio(rows, base)
    mm = rows[-1]["median_ms"]
    for r in rows:
        r["x_mm"] = r["median_ms"] / mm
    print_table(f"training call  B={B} per view (2B={2 * B} rows), Q={Q}, D={D}, k={k}, queue {queue.features.dtype} "
                f"({device.type}; checks {'OK' if ok else 'FAILED'})", rows,
                [("provider", "provider", ""), ("median_ms", "median ms", ".3f"), ("p20_ms", "p20", ".3f"),
                 ("p80_ms", "p80", ".3f"), ("speedup", "speedup", ".2f"), ("x_mm", "x bare mm", ".2f")])
    return {"B_per_view": B, "Q": Q, "D": D, "k": k, "queue_dtype": str(queue.features.dtype), "ok": ok, "rows": rows}


def main() -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--B", type=int)
    p.add_argument("--Q", type=int)
    p.add_argument("--D", type=int)
    p.add_argument("--k", type=int)
    p.add_argument("--dtype", choices=list(DTYPES))
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                   help="GPU: also run the small sweep after the headline configs")
    p.add_argument("--training", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the training call (FeatureQueue.lookup of both views)")
    p.add_argument("--training-B", type=str, default=None, help="per-view batches, comma-separated "
                   "(default 128,256,512 on GPU, 64 on CPU)")
    p.add_argument("--compile", action="store_true", help="GPU: add torch.compile of the official path")
    p.add_argument("--no-mem", action="store_true", help="skip peak-memory measurement")
    p.add_argument("--_mem-child", dest="mem_child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mem_child:
        mem_child(args)
        return 0
    device = setup(args.device, args.threads)
    budget = args.budget if args.budget is not None else (0.5 if device.type == "cuda" else 2.0)
    payload = {"bench": "queue_lookup", "env": environment(device), "results": [], "training": []}
    failed = False
    for cfg in configs(args, device):
        res = bench_config(args, device, *cfg, budget)
        failed |= not res["check"]["ok"]
        payload["results"].append(res)
        write_json(args.json, payload)                  # after every config: a killed run keeps what it measured
    if args.training:
        Bs = [int(b) for b in (args.training_B or ("128,256,512" if device.type == "cuda" else "64")).split(",")]
        Q = args.Q or 65536
        for B in Bs:
            for k in (20, 1):
                res = training_call(device, B, Q, k, budget)
                failed |= not res["ok"]
                payload["training"].append(res)
                write_json(args.json, payload)
    if device.type == "cpu":
        print("\nCPU peak extra memory: one call in a fresh process, VmHWM after it minus VmRSS before it.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
