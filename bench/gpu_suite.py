"""One command for a CUDA machine: kernel correctness on CUDA, the kernel, attention, train-step and data-loading
benchmarks at their headline shapes.

Each step is (name, function, time budget in s). A step runs in a subprocess with its budget as timeout, inside
try/except, so one failure or hang does not stop the rest; the whole suite stays under TOTAL_BUDGET_S. Results of
every step go into one JSON (--out). To add a step, append to STEPS a function (ctx) -> dict; ctx holds the
dry-run flag, the remaining budget and a scratch directory; use run_step_process for anything that may hang.

  python bench/gpu_suite.py --out results/gpu_suite.json
  python bench/gpu_suite.py --dry-run --out /tmp/suite.json     # CPU, tiny shapes: exercises every step's code
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 470          # < 8 minutes including the machine-side Python start-ups


def run_step_process(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run cmd from the repo root with a timeout; returns rc and the output tails; raises if rc != 0."""
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **(env or {})})
        rc, out, err = r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired as e:
        rc = "timeout"
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    print(out[-6000:])
    if err.strip():
        print(err[-3000:], file=sys.stderr)
    res = {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.perf_counter() - t0, 1),
           "stdout_tail": out[-4000:], "stderr_tail": err[-2000:]}
    if rc != 0:
        raise RuntimeError(f"exit status {rc}: {' '.join(cmd)}\n{err[-1500:]}")
    return res


def step_env(ctx) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["sms"] = torch.cuda.get_device_properties(0).multi_processor_count
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError as e:
        info["triton"] = f"missing: {e}"
    return info


def step_kernel_tests(ctx) -> dict:
    """pytest on the kernel test files, GPU tests included (one autotune config: compile time, not speed)."""
    files = ["tests/test_queue_topk.py", "tests/test_masking.py"]
    if ctx["dry_run"]:
        sel = ["tests/test_queue_topk.py::test_empty_batch_and_bad_k",
               "tests/test_masking.py::test_noise_ties_and_generator"]
    else:
        sel = files + ["-m", "gpu or not gpu", "-k", "not dry_run"]
    return run_step_process([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *sel],
                            ctx["timeout"], env={"MAECT_AUTOTUNE": "0"})


def _bench(ctx, script: str, args: list[str], dry_args: list[str]) -> dict:
    out = Path(ctx["scratch"]) / (Path(script).stem + ".json")
    res = run_step_process([sys.executable, script, *(dry_args if ctx["dry_run"] else args), "--json", str(out)],
                           ctx["timeout"])
    res["results"] = json.loads(out.read_text())
    return res


def step_queue_lookup(ctx) -> dict:
    return _bench(ctx, "bench/queue_lookup.py", ["--device", "cuda", "--compile"],   # compiled: headline k=20 only
                  ["--device", "cpu", "--B", "64", "--Q", "1024", "--D", "32", "--k", "5", "--budget", "0.05",
                   "--no-mem"])


def step_masked_gather(ctx) -> dict:
    return _bench(ctx, "bench/masked_gather.py", ["--device", "cuda"],     # no --compile: 6 compiles > budget
                  ["--device", "cpu", "--shape", "8,49,32", "--budget", "0.05"])


def _suite_fn(ctx, script: str, budget_frac: float = 0.85) -> dict:
    """Run bench/<script>'s gpu_suite_step(out, budget_s) in a subprocess (loaded by path: bench/dataloading.py
    would shadow the dataloading package if imported by name) and return its `out` dict."""
    out = Path(ctx["scratch"]) / (Path(script).stem + "_step.json")
    code = ("import importlib.util, json, sys; sys.path.insert(0, '.'); sys.path.append('bench'); "
            f"spec = importlib.util.spec_from_file_location('suite_step', {script!r}); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); out = {}; "
            f"m.gpu_suite_step(out, {ctx['timeout'] * budget_frac:.0f}); "
            f"json.dump(out, open({str(out)!r}, 'w'), default=str)")
    res = run_step_process([sys.executable, "-c", code], ctx["timeout"])
    res["results"] = json.loads(out.read_text())
    return res


def step_attention(ctx) -> dict:
    return _suite_fn(ctx, "bench/attention.py")


def step_train_step(ctx) -> dict:
    return _suite_fn(ctx, "bench/train_step.py")


def step_dataloading(ctx) -> dict:
    return _suite_fn(ctx, "bench/dataloading.py")


def nested_errors(obj, path: str = "") -> list[str]:
    """Every 'error' entry inside a step's result (the per-config runs record their failures there)."""
    found = []
    if isinstance(obj, dict):
        if isinstance(obj.get("error"), str):
            found.append(f"{path or 'result'}: {obj['error']}")
        for k, v in obj.items():
            if k != "error":
                found += nested_errors(v, f"{path}/{k}" if path else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += nested_errors(v, f"{path}[{i}]")
    return found


STEPS = [  # (name, function, budget in seconds); append new steps here. Sum = TOTAL_BUDGET_S.
    ("env", step_env, 15),
    ("kernel tests (cuda)", step_kernel_tests, 110),
    ("bench queue_lookup", step_queue_lookup, 80),
    ("bench masked_gather", step_masked_gather, 45),
    ("bench attention", step_attention, 70),
    ("bench train_step", step_train_step, 110),
    ("bench dataloading", step_dataloading, 40),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_suite.json")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: exercise the code paths only")
    args = p.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device visible. Run it on a GPU machine, or use --dry-run to exercise the steps on "
              "CPU with tiny shapes.", file=sys.stderr)
        return 2
    start = time.perf_counter()
    steps = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, fn, budget in STEPS:
            left = TOTAL_BUDGET_S - (time.perf_counter() - start)
            rec = {"name": name, "budget_s": budget}
            if left < 10:
                rec.update(ok=False, error="skipped: suite time budget spent", seconds=0.0)
                steps.append(rec)
                continue
            print(f"\n=== {name} (budget {min(budget, left):.0f} s) ===", flush=True)
            t0 = time.perf_counter()
            try:
                rec["result"] = fn({"dry_run": args.dry_run, "timeout": min(budget, left), "scratch": scratch})
                inner = nested_errors(rec["result"])     # a config that failed inside a step fails the step
                rec["ok"] = not inner
                if inner:
                    rec["error"] = "; ".join(inner)[:3000]
                    print(f"step '{name}' failed: {rec['error'][:500]}", file=sys.stderr)
            except Exception as e:  # one failing step must not stop the others
                rec["ok"] = False
                rec["error"] = f"{type(e).__name__}: {e}"[:3000]
                rec["traceback"] = traceback.format_exc()[-3000:]
                print(f"step '{name}' failed: {rec['error'][:500]}", file=sys.stderr)
            rec["seconds"] = round(time.perf_counter() - t0, 1)
            steps.append(rec)
    summary = {"suite": "gpu_suite", "dry_run": args.dry_run, "seconds": round(time.perf_counter() - start, 1),
               "steps": steps}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print("\n=== summary ===")
    for s in steps:
        print(f"  {'OK  ' if s['ok'] else 'FAIL'} {s['name']:<24} {s['seconds']:>6.1f} s  {s.get('error', '')[:120]}")
    print(f"wrote {args.out}")
    return 0 if all(s["ok"] for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
