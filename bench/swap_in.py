"""maect.integrations against the code each adapter replaces: correctness first, then time and peak extra memory
side by side, as a ratio (baseline / adapter: > 1 means the adapter is faster or needs less).

Cases (the replaced projects' default shapes; random inputs, fixed seeds):
  lightly NNMemoryBankModule   lightly 1.6.0's own module vs maect.integrations.lightly.NNMemoryBankModule,
                               bank 2^16 x 128 (lightly's NNCLR example), forward(update=False), B = 256 and 1024
  solo-learn find_nn           (z @ queue.T).max(dim=1)[1]; queue[idx] vs nnclr_find_nn(z, queue),
                               queue 65536 x 256 (solo-learn's NNCLR defaults), B = 256 and 1024
  MAE-CT find_nn (top-20)      the published head's lines (similarity matrix, own ids set to -1, topk, uniform pick)
                               vs nnclr_find_nn(..., topk=20), queue 65536 x 256, B = 256 and 1024
  MAE random_masking           models_mae's random_masking lines vs maect.integrations.mae.random_masking,
                               x [64, 196, 1024] (mae_vit_large_patch16, batch 64 per GPU), mask ratio 0.75
The baselines are the projects' lines as a user runs them (written here from their published algorithms), fp32.

Correctness (before any timing, on the inputs that are timed): the outputs must be identical, except that a
neighbour may differ where the two picks' exact (fp64) cosine similarities are within 1e-5 (fp32 summation order;
the count of such rows is printed). MAE-CT's uniform pick uses the same seeded draws on both sides.
Time: median over --runs rounds that alternate baseline and adapter (each round's value: the median of its reps).
Memory: CPU: the first call at the shape in a fresh process (warmed by one call at the --quick shape), peak RSS
growth after the inputs exist (VmHWM - VmRSS, bench/common.py);
CUDA: torch.cuda.max_memory_allocated above the allocation before the call. The B x Q fp32 similarity matrix the
baselines allocate is printed beside it (B * Q * 4 bytes).

  python bench/swap_in.py --device cpu            # the table above (a few minutes on 2 cores)
  python bench/swap_in.py --quick                 # tiny shapes, no memory probes: a smoke test
  python bench/swap_in.py --device cuda           # GPU (bench/gpu_suite.py runs it as its swap_in step)
A case whose package is missing (lightly) is skipped with a line saying so.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from common import (backend_of, base_parser, environment, gpu_peak_extra_mb, measure, print_table,
                    rss_peak_extra_mb, run_child, setup, write_json)

CASES = ["lightly NNMemoryBankModule", "solo-learn find_nn", "MAE-CT find_nn (top-20)", "MAE random_masking"]
FULL = {"lightly NNMemoryBankModule": dict(Q=2 ** 16, D=128, B=(256, 1024)),
        "solo-learn find_nn": dict(Q=65536, D=256, B=(256, 1024)),
        "MAE-CT find_nn (top-20)": dict(Q=65536, D=256, B=(256, 1024)),
        "MAE random_masking": dict(L=196, D=1024, B=(64,))}
QUICK = {"lightly NNMemoryBankModule": dict(Q=2048, D=16, B=(8, 32)),
         "solo-learn find_nn": dict(Q=2048, D=32, B=(8, 32)),
         "MAE-CT find_nn (top-20)": dict(Q=2048, D=32, B=(8, 32)),
         "MAE random_masking": dict(L=16, D=8, B=(2,))}
TOPK = 20
SEED = 0


# ---- the replaced lines (baselines) --------------------------------------------------------------------------

def solo_find_nn(z, queue):
    idx = (z @ queue.T).max(dim=1)[1]
    return idx, queue[idx]


def maect_head_find_nn(z, queue, queue_id, ids, topk):
    sim = z @ queue.T
    sim[queue_id[None, :] == ids[:, None]] = -1.0
    cand = sim.topk(topk, dim=1)[1]
    idx = cand[torch.arange(z.shape[0]), torch.randint(size=(z.shape[0],), high=topk)]
    return idx, queue[idx]


def mae_random_masking(x, mask_ratio, noise):
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L], device=x.device)
    mask[:, :len_keep] = 0
    return x_masked, torch.gather(mask, dim=1, index=ids_restore), ids_restore


# ---- inputs and the two callables of each case -----------------------------------------------------------------

def build(case: str, shape: dict, B: int, device: torch.device):
    """(baseline fn, adapter fn, context for the check); each fn returns what the replaced code returns."""
    g = torch.Generator(device=device).manual_seed(SEED)
    if case == "lightly NNMemoryBankModule":
        from lightly.models.modules import NNMemoryBankModule as LightlyBank

        from maect.integrations.lightly import NNMemoryBankModule
        torch.manual_seed(SEED)
        base = LightlyBank(size=(shape["Q"], shape["D"])).to(device)
        ours = NNMemoryBankModule(size=(shape["Q"], shape["D"])).to(device)
        ours.bank.copy_(base.bank)
        out = torch.randn(B, shape["D"], device=device, generator=g)
        return ((lambda: base(out, update=False)), (lambda: ours(out, update=False)),
                dict(x=out, bank=base.bank, lookup=(out, base.bank, 1)))
    if case in ("solo-learn find_nn", "MAE-CT find_nn (top-20)"):
        from maect.integrations import nnclr_find_nn
        Q, D = shape["Q"], shape["D"]
        queue = F.normalize(torch.randn(Q, D, device=device, generator=g), dim=1)
        z = F.normalize(torch.randn(B, D, device=device, generator=g), dim=1)
        if case == "solo-learn find_nn":
            return ((lambda: solo_find_nn(z, queue)), (lambda: nnclr_find_nn(z, queue)),
                    dict(x=z, bank=queue, lookup=(z, queue, 1)))
        queue_id = torch.randint(0, 1_281_167, (Q,), device=device, generator=g)
        ids = torch.randint(0, 1_281_167, (B,), device=device, generator=g)
        ids[: B // 2] = queue_id[torch.randint(0, Q, (B // 2,), device=device, generator=g)]  # own entries queued

        def seeded(fn):
            def run():
                torch.manual_seed(SEED + 1)   # the pick's draws: the same on both sides
                return fn()
            return run
        return (seeded(lambda: maect_head_find_nn(z, queue, queue_id, ids, TOPK)),
                seeded(lambda: nnclr_find_nn(z, queue, queue_id, ids, topk=TOPK)),
                dict(x=z, bank=queue, lookup=(z, queue, TOPK, ids, queue_id)))
    if case == "MAE random_masking":
        from maect.integrations import mae
        x = torch.randn(B, shape["L"], shape["D"], device=device, generator=g)
        noise = torch.rand(B, shape["L"], device=device, generator=g)
        return (lambda: mae_random_masking(x, 0.75, noise)), (lambda: mae.random_masking(x, 0.75, noise)), {}
    raise ValueError(case)


def rows_of(out):
    """The neighbour rows of a lookup's output (a tensor, or (idx, rows))."""
    return out[1] if isinstance(out, tuple) else out


def check(case: str, base_fn, ours_fn, ctx) -> dict:
    a, b = base_fn(), ours_fn()
    if case == "MAE random_masking":
        same = all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))
        return {"ok": same, "identical_rows": None, "near_tie_rows": 0}
    ra, rb = rows_of(a), rows_of(b)
    same = (ra == rb).all(dim=1)
    res = {"identical_rows": int(same.sum()), "rows": int(same.numel()), "near_tie_rows": 0}
    bad = (~same).nonzero()[:, 0]
    ok = True
    if bad.numel():      # differing picks: both within 1e-5 (exact cosine) of each other and of the best
        x = F.normalize(ctx["x"][bad].double(), dim=1)
        e = F.normalize(ctx["bank"].double(), dim=1)
        ca = (x * F.normalize(ra[bad].double(), dim=1)).sum(1)
        cb = (x * F.normalize(rb[bad].double(), dim=1)).sum(1)
        ok = bool(((ca - cb).abs() <= 1e-5).all())
        if case != "MAE-CT find_nn (top-20)":
            ok = ok and bool((cb >= (x @ e.T).max(1).values - 1e-5).all())
        res["near_tie_rows"] = int(bad.numel())
    if isinstance(a, tuple) and bad.numel() == 0:
        ok = ok and torch.equal(a[0], b[0])
    res["ok"] = ok
    return res


def mem_child(args) -> None:
    """--_mem-child CASE|B|WHICH: peak extra RSS of the first call at the shape, in this fresh process."""
    case, B, which = args.mem_child.split("|")
    device = setup("cpu", args.threads)
    shapes = QUICK if args.quick else FULL
    tiny = build(case, QUICK[case], QUICK[case]["B"][0], device)
    tiny[0 if which == "baseline" else 1]()   # libraries, extension and thread pool warm; allocator not grown
    fns = build(case, shapes[case], int(B), device)
    mb, method = rss_peak_extra_mb(fns[0] if which == "baseline" else fns[1])
    print(json.dumps({"extra_mb": mb, "method": method}))


def main(argv=None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, one run, no memory probes (a smoke test)")
    p.add_argument("--runs", type=int, default=3, help="alternating timing rounds per case (median reported)")
    p.add_argument("--cases", nargs="*", default=CASES, choices=CASES, metavar="CASE")
    p.add_argument("--_mem-child", dest="mem_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mem_child:
        mem_child(args)
        return 0
    device = setup(args.device, args.threads)
    shapes = QUICK if args.quick else FULL
    runs = 1 if args.quick else args.runs
    budget = args.budget if args.budget is not None else (0.05 if args.quick else 2.0)
    print(f"swap_in: {environment(device)}")
    rows, all_ok = [], True
    for case in args.cases:
        shape = shapes[case]
        if case.startswith("lightly"):
            try:
                import lightly  # noqa: F401
            except ImportError as exc:      # e.g. a device machine without it: the other cases still run
                print(f"{case}: skipped: lightly is not importable ({exc}; pip install lightly==1.6.0)")
                continue
        for B in shape["B"]:
            base_fn, ours_fn, ctx = build(case, shape, B, device)
            res = check(case, base_fn, ours_fn, ctx)
            all_ok &= res["ok"]
            label = f"{case} B={B}"
            print(f"{label}: correctness: {'ok' if res['ok'] else 'FAILED'}"
                  + (f" ({res['identical_rows']}/{res['rows']} rows identical, {res['near_tie_rows']} picks within "
                     f"1e-5 of each other)" if res.get("identical_rows") is not None else " (outputs identical)")
                  + (f"; queue_topk runs {backend_of('queue_topk', *ctx['lookup'])}" if "lookup" in ctx else ""))
            if not res["ok"]:
                continue
            t = {"baseline": [], "adapter": []}
            for _ in range(runs):
                for which, fn in (("baseline", base_fn), ("adapter", ours_fn)):
                    t[which].append(measure(fn, device, warmup=1 if args.quick else 2, budget_s=budget,
                                            min_reps=3 if args.quick else 5)["median_ms"])
            mem = {}
            for which, fn in (("baseline", base_fn), ("adapter", ours_fn)):
                if device.type == "cuda":
                    mem[which] = gpu_peak_extra_mb(fn, device)
                elif not args.quick:
                    child = run_child(Path(__file__), ["--_mem-child", f"{case}|{B}|{which}", "--device", "cpu"]
                                      + (["--threads", str(args.threads)] if args.threads else []), timeout=600)
                    mem[which] = child and child["extra_mb"]
            bq = B * shape["Q"] * 4 / 2 ** 20 if "Q" in shape else None
            row = {"case": label, "base_ms": statistics.median(t["baseline"]), "ours_ms": statistics.median(t["adapter"]),
                   "runs": runs, "base_mib": mem.get("baseline"), "ours_mib": mem.get("adapter"), "bq_mib": bq,
                   "base_spread": f"{min(t['baseline']):.1f}-{max(t['baseline']):.1f}",
                   "ours_spread": f"{min(t['adapter']):.1f}-{max(t['adapter']):.1f}"}
            row["speedup"] = row["base_ms"] / row["ours_ms"]
            row["mem_ratio"] = (row["base_mib"] / row["ours_mib"] if row["base_mib"] is not None
                                and row["ours_mib"] not in (None, 0) else None)
            rows.append(row)
    print_table(f"swap-in adapters vs the code they replace ({device.type}, fp32, median of {runs} run(s); "
                f"memory: {'max_memory_allocated' if device.type == 'cuda' else 'peak RSS growth'} of one call)",
                rows, [("case", "case", ""), ("base_ms", "baseline ms", ".2f"), ("ours_ms", "maect ms", ".2f"),
                       ("speedup", "speedup", ".2f"), ("base_spread", "baseline runs", ""),
                       ("ours_spread", "maect runs", ""), ("base_mib", "baseline MiB", ".1f"),
                       ("ours_mib", "maect MiB", ".1f"), ("mem_ratio", "memory ratio", ".1f"),
                       ("bq_mib", "B x Q fp32 MiB", ".1f")])
    write_json(args.json, {"environment": environment(device), "quick": args.quick, "rows": rows, "ok": all_ok})
    print(f"\ncorrectness: {'ok' if all_ok else 'FAILED'}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
