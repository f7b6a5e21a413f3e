"""The process that runs one step of bench/gpu/suite.py (`suite.py --_child STEP`), and the builtin steps.

Protocol with the parent: the step fills a StepOut (step_out.py) whose file the parent reads afterwards; the
child adds "_state" (done | skipped | interrupted | error), "_timing" and, on an exception, "_error". SIGTERM at the
deadline raises BudgetExceeded wherever the step is; the file then holds what was assigned so far (and every table
printed so far, in "_tables").
"""
from __future__ import annotations

import functools
import importlib.util
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from step_out import StepOut, record_results, record_table, stream_to

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
DRY_TESTS = ["tests/test_queue_topk.py::test_empty_batch_and_bad_k",
             "tests/test_masking.py::test_noise_ties_and_generator"]
_TERMINATED = []          # set by the SIGTERM handler (pytest catches KeyboardInterrupt itself)


class BudgetExceeded(KeyboardInterrupt):
    """SIGTERM from the suite at the step's deadline. A KeyboardInterrupt, so neither a step's `except Exception`
    around one configuration nor pytest's per-test error capture swallows it."""


def _on_sigterm(signum, frame):
    _TERMINATED.append(time.time())
    raise BudgetExceeded("the suite's deadline for this step passed")


def _inside_dynamo() -> bool:
    """A Triton compile inside torch.compile's frame compilation is counted in torch_compile_s already."""
    f = sys._getframe(2)
    while f is not None:
        if "torch/_dynamo/convert_frame" in f.f_code.co_filename.replace(os.sep, "/"):
            return True
        f = f.f_back
    return False


class CompileClock:
    """Seconds spent in Triton JIT compiles (wraps triton.compiler.compile: installed before the step's kernels are
    defined, since each JITFunction keeps the compile function it saw), in the Triton autotuner's benchmarking
    (Autotuner._bench, minus the compiles inside it) and in torch.compile (dynamo's compile_inner timings)."""

    def __init__(self):
        self.triton_s = self.autotune_s = self.compile_in_autotune_s = 0.0
        self.triton_n, self._tuning = 0, False

    def install(self) -> None:
        try:
            import triton
            import triton.compiler
            from triton.runtime import autotuner
        except Exception:
            return
        orig, clock = triton.compiler.compile, self

        @functools.wraps(orig)
        def compile(*args, **kw):
            t0 = time.perf_counter()
            try:
                return orig(*args, **kw)
            finally:
                if not _inside_dynamo():
                    dt = time.perf_counter() - t0
                    clock.triton_s, clock.triton_n = clock.triton_s + dt, clock.triton_n + 1
                    clock.compile_in_autotune_s += dt if clock._tuning else 0.0
        triton.compiler.compile = compile
        if getattr(triton, "compile", None) is orig:
            triton.compile = compile
        bench = getattr(autotuner.Autotuner, "_bench", None)
        if bench is not None:
            @functools.wraps(bench)
            def timed_bench(this, *args, **kw):
                t0, clock._tuning = time.perf_counter(), True
                try:
                    return bench(this, *args, **kw)
                finally:
                    clock._tuning, clock.autotune_s = False, clock.autotune_s + time.perf_counter() - t0
            autotuner.Autotuner._bench = timed_bench

    def report(self, startup_s: float, run_s: float) -> dict:
        torch_s = 0.0
        if "torch._dynamo" in sys.modules:
            try:
                from torch._dynamo.utils import compilation_time_metrics as m
                torch_s = sum(sum(v) for k, v in m.items() if k.startswith("_compile") and k.endswith("compile_inner"))
            except Exception:
                torch_s = None
        compile_s = self.triton_s + (torch_s or 0.0)
        tune = max(0.0, self.autotune_s - self.compile_in_autotune_s)
        r = {"startup_s": startup_s, "run_s": run_s, "compile_s": compile_s, "triton_compile_s": self.triton_s,
             "triton_compiles": self.triton_n, "torch_compile_s": torch_s, "autotune_s": tune,
             "measure_s": max(0.0, run_s - compile_s - tune)}
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}


# ------------------------------------------------------------------------------------------------ builtins
def env_step(out: dict, budget_s: float, dry_run: bool, marks: dict) -> None:
    """Versions, the device, DALI's availability and where it comes from, and how warm the compile caches are."""
    import platform

    import torch
    marks["ready"] = time.time()
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        prop = torch.cuda.get_device_properties(0)
        info.update(device=prop.name, sms=prop.multi_processor_count, capability=f"{prop.major}.{prop.minor}",
                    memory_gib=round(prop.total_memory / 2 ** 30, 1))
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError as e:
        info["triton"] = f"missing: {e}"
    from maect.dataloading import dali
    reason = dali.import_error()
    if reason is None:
        import nvidia.dali
        info["dali"] = f"{nvidia.dali.__version__} from {Path(nvidia.dali.__file__).parent}"
    else:
        info["dali"] = reason
    for var in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        d = Path(os.environ.get(var, "-"))
        info[var] = {"path": str(d), "entries_at_start": len(os.listdir(d)) if d.is_dir() else 0}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True, timeout=10).stdout.strip()
    except Exception:
        pass
    out.update(info)
    print("env: " + ", ".join(f"{k} {v}" for k, v in info.items()))


class _StreamTests:
    """pytest plugin: each test's outcome into the StepOut as it finishes (the worst of its phases; failures also as
    nested errors, which fail the step)."""
    RANK = {"passed": 0, "skipped": 1, "failed": 2}

    def __init__(self, out: dict):
        self.out, self.tests = out, {}
        out.update(passed=0, failed=0, skipped=0, tests=self.tests)

    def pytest_runtest_logreport(self, report):
        if report.when != "call" and report.outcome == "passed":
            return
        old = self.tests.get(report.nodeid, "passed").split(":")[0]
        if report.nodeid in self.tests and self.RANK[old] >= self.RANK[report.outcome]:
            return
        why = report.longrepr[2] if report.outcome == "skipped" and isinstance(report.longrepr, tuple) else ""
        self.tests[report.nodeid] = f"{report.outcome}: {why}" if why else report.outcome
        if report.outcome == "failed":
            self.out.setdefault("failures", {})[report.nodeid] = {"error": str(report.longreprtext)[-1500:]}
        outcomes = [v.split(":")[0] for v in self.tests.values()]
        self.out.update({k: outcomes.count(k) for k in self.RANK})        # rewrites the file


def pytest_step(out: dict, budget_s: float, dry_run: bool, marks: dict) -> None:
    """The GPU-marked tests of every test file that has them."""
    import pytest
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())
    args = DRY_TESTS if dry_run else files + ["-m", "gpu"]
    out.update(_selection=" ".join(args))           # not a result
    plugin = _StreamTests(out)
    marks["ready"] = time.time()
    code = int(pytest.main(["-q", "-p", "no:cacheprovider", "-rs", *args], plugins=[plugin]))
    if _TERMINATED:
        raise BudgetExceeded("pytest was interrupted at the deadline")
    out["exit_code"] = code
    print(f"kernel tests: {out['passed']} passed, {out['failed']} failed, {out['skipped']} skipped "
          f"(pytest exit {code})")
    if code not in (0, 1):                 # 1 = some failed (listed under failures)
        out["error"] = f"pytest exit code {code} (2 interrupted, 3 internal error, 4 usage error, 5 no tests)"
    elif out["passed"] == 0:
        out["error"] = "no test passed"


def check_step(out: dict, budget_s: float, dry_run: bool, marks: dict) -> None:
    """python -m maect.kernels.check: real run: vit_b16 and vit_l16 on CUDA; dry run: the tiny preset on CPU.
    A backend that disagrees with the reference or raises fails the step (nested error)."""
    from maect.kernels import check
    marks["ready"] = time.time()
    runs = [("tiny", "cpu")] if dry_run else [("vit_b16", "cuda"), ("vit_l16", "cuda")]
    for preset, device in runs:
        res = check.run(preset, device)
        print(check.format_table(res), flush=True)
        bad = [f"{d['op']} {d['shape']} {name}: {why}" for d in res["decisions"] for name, why in d["dropped"].items()]
        out[preset] = {**res, **({"error": "; ".join(bad)[:2000]} if bad else {})}


BUILTIN = {"env": env_step, "pytest": pytest_step, "check": check_step}


class _StreamCommon:
    """sys.meta_path finder: when bench/common.py is first imported (by the step's script or a module it imports),
    its print_table and write_json are wrapped to also record into the step's JSON (step_out.record_*); the scripts
    bind the wrapped ones. Common itself knows nothing of the suite, and a step that never imports it (or torch,
    which common imports) does not pay for it."""

    def find_spec(self, name, path=None, target=None):
        if name != "common":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.spec_from_file_location("common", BENCH / "common.py")
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            print_table, write_json = module.print_table, module.write_json

            def table(title, rows, columns):
                print_table(title, rows, columns)
                record_table(title, rows)

            def results(path, payload):
                record_results(payload)
                write_json(path, payload)
            module.print_table, module.write_json = table, results
        spec.loader.exec_module = exec_module
        return spec


def script_step(step, out: dict, budget_s: float, dry_run: bool, marks: dict) -> None:
    """bench/<script>.py: its gpu_suite_step(out, budget_s), else its main() with the step's cli args."""
    path = ROOT / step.target
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    if "common" not in sys.modules:
        sys.meta_path.insert(0, _StreamCommon())
    spec = importlib.util.spec_from_file_location(f"gpu_suite_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    marks["ready"] = time.time()
    if hasattr(mod, "gpu_suite_step"):
        mod.gpu_suite_step(out, budget_s)
    elif step.cli:
        sys.argv = [str(path), *(step.dry_cli if dry_run else step.cli)]
        rc = mod.main()
        if rc:
            out["error"] = f"{step.target} exited with status {rc}"
    else:
        raise RuntimeError(f"{step.target} has no gpu_suite_step(out, budget_s) and its suite step gives no cli args")


def child_main(step, json_path: Path, budget_s: float, dry_run: bool, spawned: float | None = None) -> int:
    """spawned: the parent's time.time() when it started this process (startup_s counts from it)."""
    spawned = time.time() if spawned is None else spawned
    out = StepOut(json_path)
    signal.signal(signal.SIGTERM, _on_sigterm)
    clock = CompileClock()
    clock.install()
    stream_to(out)
    marks: dict = {}
    state, rc = "error", 1
    try:
        if step.target in BUILTIN:
            BUILTIN[step.target](out, budget_s, dry_run, marks)
        else:
            script_step(step, out, budget_s, dry_run, marks)
        state, rc = ("skipped" if isinstance(out.get("skipped"), str) else "done"), 0
    except BudgetExceeded:
        state, rc = "interrupted", 124
        print(f"{step.name}: interrupted at the deadline; keeping what was measured", file=sys.stderr)
    except BaseException as e:             # SystemExit from a script's argparse/sys.exit included
        out["_error"] = f"{type(e).__name__}: {e}"[:3000]
        out["_traceback"] = traceback.format_exc()[-3000:]
        traceback.print_exc()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stream_to(None)
        now = time.time()
        ready = marks.get("ready", now)
        out["_timing"] = clock.report(startup_s=ready - spawned, run_s=now - ready)
        out["_state"] = state
    return rc
