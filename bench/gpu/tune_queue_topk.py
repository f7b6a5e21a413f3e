"""Development: tune queue_topk's Triton configs on one GPU, in one run: compile every variant, check each against the reference,
time it beside the baselines at every shape users run, write JSON, and (--write-configs) the shipped config table.

  python bench/gpu/tune_queue_topk.py --json bench/results/tune_queue_topk_<gpu>_<date>.json --write-configs
  python bench/gpu/tune_queue_topk.py --dry-run          # CPU: the whole flow on tiny shapes through the interpreter

Flow (time budget --budget-s, default 330 s, compilation included; a run that hits it writes what it has, "partial"):
  A. headline shape (B=2048, Q=65536, D=256) for bf16 and fp32 and k = 1, 20, 64: every scan config of the grid
     (block sizes, stored entries per tile M, warps, stages; fp32 also a D loop vs a resident query block), then the
     select kernel's chunk size and warps on the best scan config.
  B. every shape B in (256, 1024, 2048, 8192) x Q in (16384, 65536, 262144) x k in (1, 20, 64) x (bf16, fp32):
     the three best configs of A for that (dtype, k) and the default, against the baselines of bench/queue_lookup.py
     (bare GEMM, mm + topk, the official path; for fp32 also the official path under autocast).
Before any of it, the static check (python -m maect.kernels.check --static; kernels/static_check.py) compiles every
variant for this GPU's architecture on the CPU (no GPU time) and drops each one that spills registers, lacks tensor-
core MMA, or fits fewer programs per SM than its per_sm assumes: the search space is the configs that compile clean
(the dropped ones are listed in the JSON under "static_dropped", with the reason). --no-static-check skips it.
Compilation runs first, in parallel worker processes (one per core, at most 16) that each call the op once on a small
batch: the kernels do not specialise on B, Q or the split, so the compiled binaries they leave in Triton's cache
(TRITON_CACHE_DIR; default <repo>/.triton_cache, git-ignored) are the ones the timed calls load. Times: CUDA events
around each call after an L2 flush (bench/common.measure), medians; "scan" is the GEMM kernel alone, "select" = total -
scan. Every variant's result is checked against the fp32 reference on its first 64 rows before it is timed; a variant
that fails is recorded with the failure and never becomes a shipped config.
"""
from __future__ import annotations

import os
import sys

import torch  # noqa: E402

if "--dry-run" in sys.argv or not torch.cuda.is_available():   # before any Triton kernel is defined: on a machine
    os.environ["TRITON_INTERPRET"] = "1"                         # without CUDA the kernels run in the interpreter

import argparse  # noqa: E402
import concurrent.futures as cf  # noqa: E402
import datetime  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # bench/: common.py, queue_lookup.py
from common import ROOT, environment, measure, print_table, setup, sync, write_json  # noqa: E402
from queue_lookup import check_result, make_inputs, provider_fns  # noqa: E402

os.environ.setdefault("TRITON_CACHE_DIR", str(ROOT / ".triton_cache"))
qt = importlib.import_module("maect.kernels.ops.queue_topk")

D = 256
HEADLINE = (2048, 65536)
B_LIST, Q_LIST, K_LIST, DTYPES = (256, 1024, 2048, 8192), (16384, 65536, 262144), (1, 20, 64), ("bf16", "fp32")
TORCH_DTYPE = {"bf16": torch.bfloat16, "fp32": torch.float32}
SCAN_FIELDS = ("BLOCK_B", "BLOCK_N", "BLOCK_D", "M", "warps", "stages", "precision")
SELECT_FIELDS = ("CH", "warps2")


def scan_grid(dt: str, dry: bool) -> list[dict]:
    """Scan configs to sweep at the headline shape (the defaults with these fields replaced): kernels/ops/queue_topk.py
    tune_grid, which the static check also compiles; --dry-run: one tiny config per dtype."""
    if dry:
        return [dict(BLOCK_N=32, M=2)] if dt == "bf16" else [dict(BLOCK_N=16, M=4)]
    return qt.tune_grid(dt)


def device_arch(device: torch.device) -> str | None:
    """The static check's architecture for this GPU (sm_90 for --dry-run on CPU, the headline target); None when the
    check has no limits for it."""
    if device.type != "cuda":
        return "sm_90"
    major, minor = torch.cuda.get_device_capability(device)
    return {(9, 0): "sm_90", (8, 0): "sm_80"}.get((major, minor))


def static_verdicts(specs: list[dict], arch: str, workers: int) -> dict:
    """{kernels.static_check.spec_key(spec): [failures]} from compiling each spec's launches for arch (no GPU)."""
    from maect.kernels import static_check
    return static_check.run(archs=(arch,), tuner=specs, shipped=False, workers=workers)["tuner_verdicts"]


def static_filter(cands: dict, shape_of, arch: str | None, workers: int, out: dict) -> dict:
    """cands {key: [configs (overrides of the default, or full)]} -> the same with every config that fails the static
    check at shape_of(key) = (dtype, B, Q, D, k) dropped, each drop recorded in out["static_dropped"] with its
    reasons; arch None: unchanged, with a line saying so."""
    if arch is None:
        print("static check: no limits known for this GPU's architecture; configs not filtered", flush=True)
        return cands
    from maect.kernels.static_check import spec_key

    def spec(key, g):
        dt, B, Q, d, k = shape_of(key)
        return dict(dtype=dt, B=B, Q=Q, D=d, k=k, config=g)

    specs = {spec_key(spec(key, g)): spec(key, g) for key, gs in cands.items() for g in gs}
    t0 = time.perf_counter()
    verdicts = static_verdicts(list(specs.values()), arch, workers) if specs else {}
    kept = {}
    for key, gs in cands.items():
        kept[key] = []
        for g in gs:
            bad = verdicts.get(spec_key(spec(key, g)), ["no launch recorded"])
            if bad:
                out.setdefault("static_dropped", []).append({**spec(key, g), "arch": arch, "failures": bad})
            else:
                kept[key].append(g)
    n_in, n_out = sum(map(len, cands.values())), sum(map(len, kept.values()))
    print(f"static check ({arch}, no GPU time): {n_out}/{n_in} configs compile clean, {n_in - n_out} dropped, "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return kept


def full_config(dt: str, k: int, over: dict) -> dict:
    return {**qt.DEFAULT_CONFIGS[(dt, 32 if k <= 32 else 128)], **over}


# ------------------------------------------------------------------------------------------------ compilation
def _compile_job(job: tuple) -> dict:
    """Worker: one small call of the op with this config (compiles scan + select into the shared cache)."""
    dt, Q, k, cfg, d = job
    t0 = time.perf_counter()
    try:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        q, e, ids, qids = make_inputs(16, Q, d, TORCH_DTYPE[dt], device)
        qt.queue_topk_triton(F.normalize(q, dim=1), e, k, ids, qids, True, config=cfg)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return {"ok": True, "seconds": time.perf_counter() - t0}
    except Exception as ex:   # recorded; the variant is then skipped in the timing
        return {"ok": False, "seconds": time.perf_counter() - t0, "error": f"{type(ex).__name__}: {ex}"[:300]}


def compile_all(jobs: list[tuple], workers: int, deadline: float) -> dict:
    """Compile jobs in parallel processes; returns {job key: result}. Jobs left when the deadline passes are skipped."""
    keys = {job_key(*j[:4]): j for j in jobs}
    results = {}
    t0 = time.perf_counter()
    if workers <= 1:
        for key, job in keys.items():
            results[key] = _compile_job(job) if time.time() < deadline else {"ok": False, "error": "skipped: budget"}
    else:
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futs = {pool.submit(_compile_job, job): key for key, job in keys.items()}
            for fut in cf.as_completed(futs):
                results[futs[fut]] = fut.result()
    ok = sum(r["ok"] for r in results.values())
    print(f"compiled {ok}/{len(results)} variants in {time.perf_counter() - t0:.1f} s ({workers} workers)", flush=True)
    return results


def job_key(dt, Q, k, cfg) -> str:
    return json.dumps((dt, Q, k, cfg, D), sort_keys=True, default=str)


# ------------------------------------------------------------------------------------------------ timing
class Shape:
    """Inputs of one (dtype, B, Q) point, built once for all its k and variants."""

    def __init__(self, dt: str, B: int, Q: int, device: torch.device):
        self.dt, self.B, self.Q, self.device = dt, B, Q, device
        self.q, self.e, self.ids, self.qids = make_inputs(B, Q, D, TORCH_DTYPE[dt], device)
        self.qn = F.normalize(self.q, dim=1)


REPS = dict(warmup=2, min_reps=5, max_reps=50)      # --dry-run: one untimed-warmup-free rep (the interpreter is slow)


def time_variant(sh: Shape, k: int, cfg: dict, budget: float, rows: int = 64) -> dict:
    """Correctness on the first rows, then the op's time and its scan kernel's time."""
    rec = {"config": {f: cfg[f] for f in SCAN_FIELDS + SELECT_FIELDS if f in cfg}}
    try:
        v, i = qt.queue_topk_triton(sh.qn, sh.e, k, sh.ids, sh.qids, True, config=cfg)
        chk = check_result(sh.qn[:rows], sh.e, sh.ids[:rows], sh.qids, k, v[:rows], i[:rows])
        rec["check_ok"] = chk["ok"]
        if not chk["ok"]:
            rec["check"] = chk
            return rec
        total = measure(lambda: qt.queue_topk_triton(sh.qn, sh.e, k, sh.ids, sh.qids, True, config=cfg), sh.device,
                        budget_s=budget, **REPS)
        rec.update(ms=total["median_ms"], p20_ms=total["p20_ms"], p80_ms=total["p80_ms"])
        if sh.Q <= (qt.MAX_STORED // cfg["M"]) * cfg["BLOCK_N"]:      # one plan (no queue slices): time the scan
            plan = qt.TopkPlan(sh.qn, sh.e, k, sh.ids, sh.qids, True, cfg)
            rec["scan_ms"] = measure(plan.scan, sh.device, budget_s=budget / 2, **REPS)["median_ms"]
            rec["select_ms"] = rec["ms"] - rec["scan_ms"]
    except Exception as ex:   # a config that cannot run here (resources) is recorded, not fatal
        rec["check_ok"] = False
        rec["run_error"] = f"{type(ex).__name__}: {ex}"[:300]
    return rec


def baselines(sh: Shape, k: int, budget: float) -> dict:
    names = ["matmul (floor)", "mm + topk", "official NNCLR"]
    if sh.dt == "fp32" and sh.device.type == "cuda":
        names += ["official autocast", "bf16 matmul"]
    out = {}
    for name in names:
        try:
            out[name] = measure(provider_fns(name, sh.q, sh.e, sh.ids, sh.qids, k), sh.device, budget_s=budget,
                                **{**REPS, "max_reps": min(REPS["max_reps"], 30)})["median_ms"]
        except Exception as ex:   # e.g. out of memory at the largest shape: say so
            out[name] = None
            out[f"{name} error"] = f"{type(ex).__name__}: {ex}"[:200]
        if sh.device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def best_of(variants: list[dict]) -> dict | None:
    good = [v for v in variants if v.get("check_ok") and "ms" in v]
    return min(good, key=lambda v: v["ms"]) if good else None


# ------------------------------------------------------------------------------------------------ the run
def run(args) -> dict:
    device = setup(args.device, args.threads)
    dry = args.dry_run
    start = time.time()
    deadline = start + args.budget_s
    workers = args.workers or (2 if dry else max(1, min(16, (os.cpu_count() or 2))))
    budget = 0.02 if dry else 0.1
    if dry:
        REPS.update(warmup=0, min_reps=1, max_reps=1)
    shapes_b = (16,) if dry else B_LIST
    shapes_q = (512, 256) if dry else Q_LIST
    ks = (5,) if dry else K_LIST
    dtypes = DTYPES
    n_grid = None
    if args.quick:   # the GPU suite's sample: the headline at k=20, the defaults and the first grid configs, no phase B
        ks, n_grid = ((5,) if dry else (20,)), (1 if dry else 4)
        dtypes = ("bf16",) if dry else DTYPES
        workers = 1 if dry else workers
    head = (16, 512) if dry else HEADLINE
    global D
    D = 32 if dry else 256
    out = {"bench": "tune_queue_topk", "env": environment(device), "dry_run": dry, "budget_s": args.budget_s,
           "triton_cache": os.environ["TRITON_CACHE_DIR"], "headline": [], "shapes": [], "partial": False}

    # A. the headline sweep
    grids = {(dt, k): ([{}] if n_grid else []) + scan_grid(dt, dry)[:n_grid] for dt in dtypes for k in ks}
    arch = device_arch(device)
    if not args.no_static_check:
        grids = static_filter(grids, lambda key: (key[0], *head, D, key[1]), arch, workers, out)
    jobs = [(dt, head[1], k, full_config(dt, k, g), D) for dt in dtypes for k in ks for g in grids[(dt, k)]]
    t0 = time.perf_counter()
    compiled = compile_all(jobs, workers, deadline)
    out["compile_s"] = {"headline": round(time.perf_counter() - t0, 1)}
    for dt in dtypes:
        sh = Shape(dt, head[0], head[1], device)
        for k in ks:
            rec = {"dtype": dt, "B": head[0], "Q": head[1], "k": k, "variants": []}
            for g in grids[(dt, k)]:
                cfg = full_config(dt, k, g)
                c = compiled.get(job_key(dt, head[1], k, cfg), {"ok": False, "error": "not compiled"})
                if not c["ok"]:
                    rec["variants"].append({"config": g, "check_ok": False, "compile_error": c.get("error")})
                    continue
                if time.time() > deadline:
                    out["partial"] = True
                    break
                rec["variants"].append(time_variant(sh, k, cfg, budget))
            best = best_of(rec["variants"])
            if best is not None and time.time() < deadline and not args.quick:   # the select kernel's knobs
                knobs = []
                for ch, w2 in ((64, 4),) if dry else ((32, 4), (64, 4), (32, 8), (64, 8)):
                    cfg = {**full_config(dt, k, {}), **best["config"], "CH": ch, "warps2": w2}
                    if cfg["CH"] == best["config"].get("CH") and cfg["warps2"] == best["config"].get("warps2"):
                        continue
                    knobs.append(cfg)
                if not args.no_static_check:
                    knobs = static_filter({0: knobs}, lambda _: (dt, *head, D, k), arch, workers, out)[0]
                for cfg in knobs:
                    rec["variants"].append(time_variant(sh, k, cfg, budget))
                best = best_of(rec["variants"])
            rec["best"] = best
            rec["baselines"] = baselines(sh, k, budget)
            out["headline"].append(rec)
            write_json(args.json, out)
        del sh

    # B. every shape with the best few of A and the default
    top = {}
    for rec in out["headline"]:
        good = sorted((v for v in rec["variants"] if v.get("check_ok") and "ms" in v), key=lambda v: v["ms"])
        top[(rec["dtype"], rec["k"])] = [full_config(rec["dtype"], rec["k"], v["config"]) for v in good[:3]]
    points = [] if args.quick else [(dt, B, Q, k) for dt in dtypes for Q in shapes_q for B in shapes_b for k in ks
                                    if (B, Q) != head]
    cands = {}
    for dt, B, Q, k in points:
        c = top.get((dt, k), []) + [full_config(dt, k, {})]
        cands[(dt, B, Q, k)] = [dict(t) for t in {json.dumps(x, sort_keys=True): x for x in c}.values()]
    if cands and not args.no_static_check:   # the default, or a config clean at the headline, may fail elsewhere
        cands = static_filter(cands, lambda key: (key[0], key[1], key[2], D, key[3]), arch, workers, out)
    jobs = [(dt, Q, k, cfg, D) for (dt, B, Q, k), cs in cands.items() for cfg in cs]
    t0 = time.perf_counter()
    compiled = compile_all(jobs, workers, deadline) if jobs and time.time() < deadline else {}
    out["compile_s"]["shapes"] = round(time.perf_counter() - t0, 1)
    for dt in dtypes if points else ():
        for Q in shapes_q:
            for B in shapes_b:
                if (B, Q) == head:
                    continue
                if time.time() > deadline:
                    out["partial"] = True
                    break
                sh = Shape(dt, B, Q, device)
                for k in ks:
                    rec = {"dtype": dt, "B": B, "Q": Q, "k": k, "variants": []}
                    for cfg in cands[(dt, B, Q, k)]:
                        if not compiled.get(job_key(dt, Q, k, cfg), {}).get("ok") or time.time() > deadline:
                            continue
                        rec["variants"].append(time_variant(sh, k, cfg, budget))
                    rec["best"] = best_of(rec["variants"])
                    rec["baselines"] = baselines(sh, k, budget) if time.time() < deadline else {}
                    out["shapes"].append(rec)
                write_json(args.json, out)
                del sh
    out["seconds"] = round(time.time() - start, 1)
    summarize(out)
    write_json(args.json, out)
    if args.write_configs:
        write_configs(out, Path(args.write_configs))
    return out


def summarize(out: dict) -> None:
    """One row per shape: the best maect config against the baselines (ratios), and where it loses to mm + topk."""
    rows = []
    for rec in out["headline"] + out["shapes"]:
        b, bl = rec.get("best"), rec.get("baselines") or {}
        if b is None:
            rows.append({"shape": f"{rec['dtype']} B{rec['B']} Q{rec['Q']} k{rec['k']}", "note": "no passing config"})
            continue
        off = bl.get("official autocast") or bl.get("official NNCLR")
        row = {"shape": f"{rec['dtype']} B{rec['B']} Q{rec['Q']} k{rec['k']}", "maect_ms": b["ms"],
               "scan_ms": b.get("scan_ms"), "gemm_ms": bl.get("matmul (floor)"), "official_ms": off,
               "mm_topk_ms": bl.get("mm + topk")}
        if row["gemm_ms"]:
            row["x_gemm"] = b["ms"] / row["gemm_ms"]
        if off:
            row["vs_official"] = off / b["ms"]
        if row["mm_topk_ms"]:
            row["vs_mm_topk"] = row["mm_topk_ms"] / b["ms"]
            row["note"] = "SLOWER than mm+topk" if row["vs_mm_topk"] < 1 else ""
        rows.append(row)
    out["summary"] = rows
    print_table("queue_topk tuning: best config per shape (ms medians; x GEMM = maect / bare GEMM in the input dtype; "
                "vs official = official (autocast for fp32) / maect)", rows,
                [("shape", "shape", ""), ("maect_ms", "maect", ".3f"), ("scan_ms", "scan", ".3f"),
                 ("gemm_ms", "GEMM", ".3f"), ("mm_topk_ms", "mm+topk", ".3f"), ("official_ms", "official", ".3f"),
                 ("x_gemm", "x GEMM", ".2f"), ("vs_official", "vs official", ".2f"),
                 ("vs_mm_topk", "vs mm+topk", ".2f"), ("note", "note", "")])


def write_configs(out: dict, path: Path) -> None:
    """The best passing config per shape class (kernels/ops/queue_topk.py shape_class) -> the shipped table."""
    table = {}
    for rec in out["headline"] + out["shapes"]:
        b = rec.get("best")
        if b is None:
            continue
        key = qt.shape_class(TORCH_DTYPE[rec["dtype"]], rec["B"], rec["Q"], rec["k"])
        if key not in table or b["ms"] < table[key]["_ms"]:
            table[key] = {**b["config"], "_ms": b["ms"]}
    payload = {"device": out["env"].get("gpu") or out["env"].get("device"), "written": datetime.date.today().isoformat(),
               "source": "bench/gpu/tune_queue_topk.py", "partial": out["partial"],
               "table": {k: {f: v for f, v in c.items() if f != "_ms"} for k, c in sorted(table.items())}}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {len(table)} shape classes to {path}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--budget-s", type=float, default=330.0, help="wall-clock budget, compilation included")
    p.add_argument("--workers", type=int, default=None, help="compile processes (default: cores, at most 16)")
    p.add_argument("--write-configs", nargs="?", const=str(qt.CONFIG_FILE), default=None,
                   help="write the best configs per shape class (default path: kernels/ops/queue_topk_configs.json)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, the Triton interpreter")
    p.add_argument("--no-static-check", action="store_true",
                   help="time every config, also those the static check (registers, spills, occupancy, MMA) fails")
    p.add_argument("--quick", action="store_true", help="a sample: headline k=20, defaults + 4 grid configs, no "
                   "sweep over shapes (the GPU suite's step; the full tuning is a run of its own)")
    return p


def gpu_suite_step(out: dict, budget_s: float) -> None:
    """The GPU suite's step: the --quick sample within budget_s (the suite records what write_json writes). The full
    sweep (--write-configs) is a run of its own (< 6 min)."""
    args = parser().parse_args(["--quick", "--budget-s", str(max(5.0, budget_s - 5))] +
                               (["--dry-run"] if not torch.cuda.is_available() else []))
    if args.dry_run:
        args.device = "cpu"
    res = run(args)
    out["summary"] = res["summary"]
    out["partial"] = res["partial"]


def main() -> int:
    args = parser().parse_args()
    if args.dry_run:
        args.device = "cpu"
    elif args.device != "cuda":
        sys.exit("tune_queue_topk: tuning needs a GPU (--device cuda); --dry-run exercises the flow on CPU")
    out = run(args)
    n_bad = sum(1 for r in out["summary"] if r.get("note"))
    return 0 if n_bad == 0 and not out["partial"] else 1


if __name__ == "__main__":
    sys.exit(main())
