"""One command for a CUDA machine: the GPU-marked kernel tests and every GPU benchmark, within one time budget.

Each step runs in its own process with a time budget. It writes its results to a JSON file as it goes (a StepOut:
every top-level assignment rewrites the file, and every print_table is copied into it), so a step killed at its
budget (SIGTERM, then SIGKILL after GRACE_S) leaves what it had measured and is reported "partial", not lost. The
suite JSON (--out) is rewritten after every step. Each step records its own time split: startup_s (interpreter,
imports), compile_s (Triton JIT compiles + torch.compile), autotune_s (Triton autotuner benchmarking, compiles
excluded) and measure_s (the rest: inputs, correctness checks, warm-up and timed repetitions).
Triton's and inductor's caches live in .triton_cache/ and .inductor_cache/ of the working tree (git-ignored), so
every step and a second call on a warm machine reuse what an earlier one compiled. The first step is
`python -m maect.kernels.check` (every kernel verified and timed at the GPU presets' shapes); its dispatch
decisions go to .maect_cache/ (MAECT_CACHE_DIR), which the later steps read. A git-ignored .whl/site/ folder (a
development machine's staged wheels, e.g. DALI) goes on the steps' PYTHONPATH when present.

This folder is development machinery: the benchmark scripts in bench/ do not import it. A step process puts bench/ on
sys.path and wraps bench/common.py's print_table and write_json so they also record into the step's JSON.

Adding a step is one line in STEPS: a script with gpu_suite_step(out: dict, budget_s: float) that fills `out`
(assign each finished configuration as it completes; a string out["skipped"] marks the step skipped with that
reason; any nested {"error": str} fails it). A script without that entry point runs its main() with `cli` args.

  python bench/gpu_suite.py --out bench/results/gpu_suite_h200.json
  python bench/gpu_suite.py --out F.json --merge --only failed     # second call: re-run what failed or overran
  python bench/gpu_suite.py --only kernel_tests,queue_lookup         # --skip NAME,... likewise
  python bench/gpu_suite.py --dry-run --out /tmp/suite.json          # CPU, tiny shapes, stand-ins: every code path
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(HERE) not in sys.path:          # run as bench/gpu_suite.py (runpy) or imported by the tests
    sys.path.insert(0, str(HERE))
from report import closing_table, has_content, nested_errors  # noqa: E402,F401

TOTAL_BUDGET_S = 495     # the steps' budgets below sum to this; + the suite's own start-up: < 9 min
GRACE_S = 8              # after SIGTERM at the budget: time to write the partial JSON before SIGKILL
DRY_BUDGET_SCALE = 0.25  # --dry-run: the budget_s handed to a step (it sizes its work to it) ...
DRY_KILL_SCALE = 3.0     # ... and the kill deadline (a loaded 2-core CPU is slow)
SITE = ROOT / ".whl" / "site"
CACHES = {"TRITON_CACHE_DIR": ROOT / ".triton_cache", "TORCHINDUCTOR_CACHE_DIR": ROOT / ".inductor_cache",
          "MAECT_CACHE_DIR": ROOT / ".maect_cache"}       # the dispatch decisions kernels_check writes


@dataclass(frozen=True)
class Step:
    name: str                    # for --only / --skip
    target: str                  # bench/<script>.py (its gpu_suite_step), or a builtin: check, env, pytest
    budget_s: float
    source: str                  # where the budget comes from
    cli: tuple = ()              # argv for the script's main() when it has no gpu_suite_step
    dry_cli: tuple = ()


# Budgets, from an H200 (torch 2.11+cu130, Triton 3.6, 16 cores, 2026-11) with budgets 15/110/80/45/70/110/40 s:
# the two kernel test files were killed at 110 s after 54 passing tests (this step runs only the GPU-marked ones),
# queue_lookup ran 80 s and printed every table; masked_gather, attention and train_step finished inside 45, 70 and
# 110 s. A step that finishes early hands its time to the later ones (its kill deadline is what is left minus the
# later steps' budgets), so these are floors, not shares.
STEPS = [
    Step("kernels_check", "check", 30, "python -m maect.kernels.check for vit_b16 and vit_l16: ~1 s per op and "
         "shape class plus Triton compiles (unmeasured on GPU)"),
    Step("env", "env", 15, "interpreter + torch + CUDA init: a few s"),
    Step("kernel_tests", "pytest", 75, "54 whole-file tests ran in 110 s; GPU-marked subset, shared Triton cache"),
    Step("tune_queue_topk", "bench/gpu/tune_queue_topk.py", 45, "its full sweep is a run of its own"),
    Step("queue_lookup", "bench/queue_lookup.py", 90, "overran 80 s after printing every table",
         cli=("--device", "cuda", "--compile"),
         dry_cli=("--device", "cpu", "--B", "64", "--Q", "1024", "--D", "32", "--k", "5", "--budget", "0.05",
                  "--no-mem")),
    Step("masked_gather", "bench/masked_gather.py", 40, "finished inside 45 s", cli=("--device", "cuda"),
         dry_cli=("--device", "cpu", "--shape", "8,49,32", "--budget", "0.05")),
    Step("attention", "bench/attention.py", 45, "finished inside 70 s (9 backends x 10 shapes x 2 passes x 0.1 s)",
         cli=("--device", "cuda", "--budget", "0.1"),
         dry_cli=("--device", "cpu", "--shapes", "tiny visible,tiny H/14-like", "--budget", "0.02")),
    Step("train_step", "bench/gpu/train_step_suite.py", 80, "finished inside 110 s; skips configs that do not fit"),
    Step("loader_throughput", "bench/gpu/loader_step.py", 45, "DALI GPU vs CPU twin, sized to the budget"),
    Step("swap_in", "bench/swap_in.py", 30, "7 shapes x 2 providers, 0.3 s each, one round",
         cli=("--device", "cuda", "--budget", "0.3", "--runs", "1"), dry_cli=("--quick",)),
]
STEP_NAMES = [s.name for s in STEPS]


# ----------------------------------------------------------------------------------------- parent: run a step
def child_env(dry_run: bool, cuda: bool) -> dict:
    """The steps' environment: repo (and staged site) on PYTHONPATH, the shared compile caches; dry run: the Triton
    interpreter where no GPU is."""
    env = dict(os.environ)
    path = [str(ROOT)] + ([str(SITE)] if SITE.is_dir() else []) + [p for p in [env.get("PYTHONPATH")] if p]
    env["PYTHONPATH"] = os.pathsep.join(path)
    for k, v in CACHES.items():
        env.setdefault(k, str(v))
    if dry_run and not cuda:
        env.setdefault("TRITON_INTERPRET", "1")
    return env


def package_problem(env: dict, flags: tuple = ()) -> str | None:
    """None when the steps' interpreter imports maect.kernels / maect.dataloading from this checkout; else what it
    found, with the one-time install that fixes it (setup.py's package_dir maps kernels/ and dataloading/ to those
    names; a checkout that is not installed has only `maect`). flags: extra interpreter flags (tests: -S)."""
    code = ("import importlib.util as u\nfor n in ('maect.kernels', 'maect.dataloading'):\n"
            "    s = u.find_spec(n)\n    print(s.origin if s else 'not found')")
    r = subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    got = r.stdout.splitlines() if r.returncode == 0 else [r.stderr.strip()[-300:]]
    want = [str(ROOT / "kernels" / "__init__.py"), str(ROOT / "dataloading" / "__init__.py")]
    if got == want:
        return None
    return (f"maect.kernels / maect.dataloading do not import from {ROOT} (found: {', '.join(got)}); install this "
            f"checkout once on this machine: python3 -m pip install -q --no-deps --no-build-isolation --no-index -e .")


def run_child(step: Step, json_path: Path, budget_s: float, grant_s: float, dry_run: bool, env: dict) -> dict:
    """Run one step in a fresh process group; SIGTERM at grant_s, SIGKILL GRACE_S later. Echoes its output."""
    cmd = [sys.executable, "-u", str(Path(__file__).resolve()), "--_child", json.dumps(step.__dict__), "--_json",
           str(json_path), "--_budget", repr(budget_s), "--_spawned", repr(time.time())] + \
        (["--dry-run"] if dry_run else [])
    tail: collections.deque = collections.deque(maxlen=120)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, errors="replace", start_new_session=True)

    def pump():
        for line in proc.stdout:
            sys.stdout.write(line)
            tail.append(line)
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    killed = None
    try:
        proc.wait(timeout=grant_s)
    except subprocess.TimeoutExpired:
        killed = "SIGTERM"
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            killed = "SIGKILL"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)    # the step's own subprocesses (memory probes, compile workers)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        reader.join(timeout=5)
    return {"rc": proc.returncode, "killed": killed, "wall_s": round(time.perf_counter() - t0, 1),
            "output_tail": "".join(tail)[-6000:]}


def run_step(step: Step, grant_s: float, dry_run: bool, env: dict, scratch: Path) -> dict:
    rec = {"name": step.name, "budget_s": step.budget_s, "granted_s": round(grant_s, 1), "budget_source": step.source,
           "call": time.strftime("%Y-%m-%d %H:%M:%S")}
    if step.target.endswith(".py") and not (ROOT / step.target).exists():        # e.g. a script not merged yet
        return {**rec, "status": "skipped", "reason": f"{step.target} not present"}
    budget = step.budget_s * (DRY_BUDGET_SCALE if dry_run else 1.0)
    path = scratch / f"{step.name}.json"
    run = run_child(step, path, budget, grant_s, dry_run, env)
    rec.update(wall_s=run["wall_s"], rc=run["rc"], output_tail=run["output_tail"])
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        res = {"_state": "no result file", "_error": f"{type(e).__name__}: {e}"}
    state, timing, err = res.pop("_state", "?"), res.pop("_timing", {}), res.pop("_error", None)
    if "_traceback" in res:
        rec["traceback"] = res.pop("_traceback")
    rec.update(timing=timing, result=res)
    if run["killed"] or state == "interrupted":
        what = f"killed at its {grant_s:.0f} s deadline ({run['killed'] or 'SIGTERM'})"
        if has_content(res):
            rec.update(status="partial", reason=f"{what}; the JSON holds what it measured until then")
        else:
            rec.update(status="failed", reason=f"{what} with nothing measured")
    elif state == "skipped":
        rec.update(status="skipped", reason=str(res.get("skipped")))
    elif run["rc"] != 0 or state != "done":
        rec.update(status="failed", reason=err or f"exit status {run['rc']} (state {state})")
    else:
        inner = nested_errors(res)          # a configuration that failed inside a step fails the step
        rec.update(status="failed", reason="; ".join(inner)[:3000]) if inner else rec.update(status="ok")
    return rec


def deadline_s(selected: list[Step], left: float, idx: int, kill_scale: float) -> float:
    """Kill deadline of selected[idx]: what is left minus the later steps' budgets, at least its own budget."""
    later = sum(s.budget_s for s in selected[idx + 1:]) * kill_scale
    return min(left, max(selected[idx].budget_s * kill_scale, left - later))


def select(only: str | None, skip: str | None, previous: dict | None, steps: list[Step]) -> list[Step]:
    """The steps to run, in table order. `only` may say 'failed': the previous call's failed/partial steps."""
    known = [s.name for s in steps]

    def names(arg: str) -> set[str]:
        got = {n.strip() for n in arg.split(",") if n.strip()}
        if "failed" in got:
            got.discard("failed")
            got |= {s["name"] for s in (previous or {}).get("steps", []) if s["name"] in known and (
                    s.get("status") in ("failed", "partial") or "suite time" in str(s.get("reason", "")))}
        bad = sorted(got - set(known))
        if bad:
            raise SystemExit(f"gpu_suite: unknown step {', '.join(bad)}; steps: {', '.join(known)} (and 'failed' "
                             "with --merge)")
        return got
    keep = names(only) if only else set(known)
    drop = names(skip) if skip else set()
    return [s for s in steps if s.name in keep and s.name not in drop]


def write_summary(path: Path, summary: dict) -> None:
    from maect.atomic import write_json
    write_json(str(path), summary)


def main(argv=None, steps: list[Step] | None = None) -> int:
    """steps: the table to run (default STEPS; tests pass their own)."""
    steps = STEPS if steps is None else steps
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/gpu_suite.json", help="suite JSON (rewritten after every step)")
    p.add_argument("--only", help=f"comma-separated steps to run ({', '.join(STEP_NAMES)}; 'failed': those that "
                                  "failed or were partial in --out, with --merge)")
    p.add_argument("--skip", help="comma-separated steps not to run")
    p.add_argument("--merge", action="store_true", help="keep the records of steps not run now from --out")
    p.add_argument("--total-budget", type=float, default=TOTAL_BUDGET_S, help="seconds for all steps")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, stand-ins: exercise every code path")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_json", help=argparse.SUPPRESS)
    p.add_argument("--_budget", type=float, help=argparse.SUPPRESS)
    p.add_argument("--_spawned", type=float, help=argparse.SUPPRESS)     # the parent's time.time() at the spawn
    a = p.parse_args(argv)
    if a._child:
        from child import child_main
        return child_main(Step(**json.loads(a._child)), Path(a._json), a._budget, a.dry_run, a._spawned)
    import torch
    cuda = torch.cuda.is_available()
    if not a.dry_run and not cuda:
        print("gpu_suite: no CUDA device visible. Run it on a GPU machine, or use --dry-run to exercise the steps on "
              "CPU with tiny shapes.", file=sys.stderr)
        return 2
    problem = package_problem(child_env(a.dry_run, cuda))
    if problem:
        print(f"gpu_suite: {problem}", file=sys.stderr)
        return 2
    out = Path(a.out)
    previous = json.loads(out.read_text()) if a.merge and out.exists() else None
    if a.merge and previous is None:
        print(f"gpu_suite: --merge: {out} does not exist yet; starting a new one")
    if previous is not None and bool(previous.get("dry_run")) != a.dry_run:
        raise SystemExit(f"gpu_suite: --merge: {out} is from a {'dry' if previous.get('dry_run') else 'real'} run; "
                         "do not mix dry-run and GPU records")
    selected = select(a.only, a.skip, previous, steps)
    kill_scale = DRY_KILL_SCALE if a.dry_run else 1.0
    total = a.total_budget * kill_scale
    print(f"gpu_suite: {len(selected)} steps ({', '.join(s.name for s in selected)}), {total:.0f} s in all; "
          f"caches {child_env(a.dry_run, cuda)['TRITON_CACHE_DIR']}", flush=True)
    records = {s["name"]: s for s in (previous or {}).get("steps", [])}
    start = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="gpu_suite_"))     # the steps' streamed JSON files
    order = [s.name for s in steps] + [n for n in records if n not in {s.name for s in steps}]
    call = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "ran": [s.name for s in selected], "seconds": 0.0}
    summary = {"suite": "gpu_suite", "dry_run": a.dry_run, "total_budget_s": total,
               "calls": (previous or {}).get("calls", []) + [call],
               "steps": [records[n] for n in order if n in records]}
    for i, step in enumerate(selected):
        left = total - (time.perf_counter() - start)
        grant = deadline_s(selected, left, i, kill_scale)
        if grant < min(10.0, step.budget_s):
            records[step.name] = {"name": step.name, "status": "skipped", "budget_s": step.budget_s,
                                  "reason": f"suite time budget spent ({left:.0f} s left)"}
        else:
            print(f"\n=== {step.name} (budget {step.budget_s:.0f} s, deadline {grant:.0f} s) ===", flush=True)
            env = child_env(a.dry_run, cuda)          
            records[step.name] = run_step(step, grant, a.dry_run, env, scratch)
            r = records[step.name]
            print(f"=== {step.name}: {r['status']} in {r.get('wall_s', 0):.1f} s"
                  + (f": {r['reason'][:300]}" if r.get("reason") else ""), flush=True)
        call["seconds"] = round(time.perf_counter() - start, 1)
        summary["steps"] = [records[n] for n in order if n in records]
        write_summary(out, summary)
    shutil.rmtree(scratch, ignore_errors=True)
    print(closing_table(summary["steps"]))
    print(f"wrote {out} ({call['seconds']:.0f} s)")
    return 0 if all(r["status"] == "ok" or (r["status"] == "skipped" and "suite time" not in r.get("reason", ""))
                    for r in summary["steps"]) else 1


if __name__ == "__main__":
    if str(ROOT) not in sys.path:      # maect comes from this tree
        sys.path.insert(1, str(ROOT))
    sys.exit(main())
