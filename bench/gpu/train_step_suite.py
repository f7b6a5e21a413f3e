"""The GPU suite's train_step step: bench/train_step.py's rows over a prepared set of configurations within a time
budget (MAE ViT-L/16, MAE ViT-H/14, CT ViT-L/16, MAE ViT-L/16 at batch 256; the CPU dry run: the tiny preset).
  python bench/gpu_suite.py --only train_step
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1]
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
import train_step as ts  # noqa: E402  (bench/train_step.py)

EAGER3, COMPILED3 = ["reference", "maect", "reference-math"], ["maect+compile", "reference+compile", "maect+cudagraphs"]
SUITE_CONFIGS = {  # (arguments, phase-1 eager rows, phase-2 compiled rows); phase 2 runs row-major over configs
    True: [(["--model", "vit_l16", "--stage", "mae"], EAGER3, COMPILED3),
           (["--model", "vit_h14", "--stage", "mae"], EAGER3, COMPILED3),
           (["--model", "vit_l16", "--stage", "ct"], EAGER3, COMPILED3),
           (["--model", "vit_l16", "--stage", "mae", "--batch", "256"], EAGER3[:2], ["maect+cudagraphs"])],
    False: [(["--preset", "tiny", "--stage", "mae", "--batch", "8"], EAGER3, COMPILED3),
            (["--preset", "tiny", "--stage", "ct", "--batch", "8"], EAGER3, COMPILED3)]}
FIRST_COMPILE_S = {True: 60.0, False: 20.0}   # scheduling guess before any compiled row has run (not a measurement)


def _child_row(cfg_args: list[str], row: str, common: list[str], timeout: float) -> dict:
    """One compiled row in a fresh process with a hard timeout (a compile that runs long costs that row only)."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "row.json"
        cmd = [sys.executable, str(Path(ts.__file__).resolve()), *cfg_args, *common, "--rows", row, "--json", str(out)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"provider": row, "skipped": f"did not finish within {timeout:.0f} s (compilation included)"}
        if r.returncode != 0 and not out.exists():
            return {"provider": row, "error": f"exit {r.returncode}: {(r.stderr or r.stdout)[-1500:]}"}
        print(r.stdout[-4000:])
        return json.loads(out.read_text())["rows"][0]


def _skip(out: dict, what: str) -> None:
    out["skipped_rows"] = out.get("skipped_rows", []) + [what]     # a top-level assignment: StepOut writes it now


def gpu_suite_step(out: dict, budget_s: float) -> None:
    """The suite's entry: MAE ViT-L/16, MAE ViT-H/14, CT ViT-L/16 (+ MAE ViT-L/16 at batch 256) within
    budget_s (CPU dry run: the tiny preset, reference and maect rows only). See suite()."""
    suite(out, budget_s, full=torch.cuda.is_available())


def suite(out: dict, budget_s: float, full: bool = True) -> None:
    """The prepared GPU run (CPU: the tiny preset). Phase 1, every configuration of SUITE_CONFIGS: its
    eager rows (reference, maect, reference-math), with a torch.profiler table of the maect MAE steps. Phase 2, while
    budget_s lasts: the compiled rows (maect+compile, reference+compile, maect+cudagraphs), each in a child process
    whose timeout is the budget left (a compilation that runs long costs that row only; CPU: backend aot_eager,
    tracing only). full=False (the CPU dry run): two eager rows per configuration, no phase 2. Fills out[config]
    with each configuration's result as it completes (the suite's StepOut writes it at once); rows that did
    not fit the budget are named in out['skipped_rows'] (out['skipped'], a string, would mark the whole step
    skipped)."""
    t0 = time.perf_counter()
    cuda = torch.cuda.is_available()
    common = ["--device", "cuda" if cuda else "cpu"]
    common += ["--steps", "5", "--warmup", "2"] if cuda else ["--steps", "1", "--warmup", "0", "--compile-backend",
                                                             "aot_eager"]
    ctxs, rows, plan, not_run = {}, {}, [], []
    cfg_costs: list[float] = []
    for cfg_args, eager, compiled in SUITE_CONFIGS[cuda]:
        key = " ".join(cfg_args)
        eager = eager if full else eager[:2]
        left = budget_s - (time.perf_counter() - t0) - 5
        if full and cfg_costs and left < 1.2 * max(cfg_costs):     # the CPU dry run runs every code path
            _skip(out, f"{key}: {', '.join(eager + compiled)} ({left:.0f} s left)")
            continue
        t1 = time.perf_counter()
        try:
            args = ts.finish_args(ts.parser().parse_args(cfg_args + common))
            ctxs[key] = ts.prepare(args)
            rows[key] = [ts.run_row(ctxs[key], r, profile=r == "maect" and args.stage == "mae") for r in eager]
            out[key] = ts.summarize(ctxs[key], rows[key])
            plan += [(i, row, key) for i, row in enumerate(compiled)]
        except Exception as e:  # one failing config must not lose the others
            out[key] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        cfg_costs.append(time.perf_counter() - t1)
        if cuda:
            torch.cuda.empty_cache()
    plan = [(row, key) for _, row, key in sorted(plan, key=lambda p: p[0])]    # row-major: every config's first
    if not full:      # the CPU dry run: phase 1 only (tests/test_train_step.py runs a compiled row in a child)
        plan, not_run = [], [f"{k}: {r}" for r, k in plan]
    costs: list[float] = []
    added: dict[str, None] = {}
    for row, key in plan:
        left = budget_s - (time.perf_counter() - t0) - 5
        need = 1.3 * max(costs) if costs else FIRST_COMPILE_S[cuda]
        if left < need:
            _skip(out, f"{key}: {row} ({left:.0f} s left, needs ~{need:.0f} s)")
            continue
        t1 = time.perf_counter()
        r = _child_row(key.split(), row, common, left)
        costs.append(time.perf_counter() - t1)
        if "skipped" in r:
            _skip(out, f"{key}: {row}: {r.pop('skipped')}")
            continue
        rows[key].append(r)
        out[key] = ts.summarize(ctxs[key], rows[key], quiet=True)
        added[key] = None
    for key in added:                                  # the final tables, phase 2 rows included
        out[key] = ts.summarize(ctxs[key], rows[key])
    if not_run:
        out["not_run"] = not_run
    out["seconds"] = round(time.perf_counter() - t0, 1)
