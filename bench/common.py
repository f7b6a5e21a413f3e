"""Shared benchmark helpers: timing (warmup, median and p20/p80), peak extra memory, tables with a ratio column, JSON.

Timing: every repetition is timed on its own. On CUDA each rep is bracketed by CUDA events after the L2 cache has
been flushed (a 256 MiB memset outside the events, like triton.testing.do_bench), so a 32 MiB queue is read from
HBM as it would be inside a training step. On CPU each rep is a perf_counter pair.
Memory: on CUDA, torch.cuda.max_memory_allocated during one call minus the allocation before it. On CPU, one call in
a fresh subprocess: the kernel's peak-RSS mark (VmHWM) is reset through /proc/self/clear_refs after the inputs exist,
and extra = VmHWM after the call - VmRSS before it (falls back to ru_maxrss deltas where clear_refs is refused).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # the bench scripts run as `python bench/x.py` from the repo root
    sys.path.insert(0, str(ROOT))

from maect.kernels.dispatch import call_ms  # noqa: E402  (one call's ms: CUDA events, or perf_counter on CPU)

MiB = 2 ** 20


def base_parser(description: str, budget: bool = True) -> argparse.ArgumentParser:
    """--device, --json, --threads and (budget=True: for scripts that time providers with measure()) --budget."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=str, default=None, help="also write the results as JSON to this path")
    if budget:
        p.add_argument("--budget", type=float, default=None, help="seconds of timed reps per provider")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    return p


def setup(device: str, threads: int | None = None) -> torch.device:
    """Torch threads = cores unless told (the CPU baselines use all of them); TF32 off so fp32 means fp32 on GPU."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
    if device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device visible")
        torch.backends.cuda.matmul.allow_tf32 = False
    return torch.device(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()     # CPU-GPU sync: only around timed regions


def quantiles(times: list[float]) -> dict:
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    return {"p20_ms": q[0].item(), "median_ms": q[1].item(), "p80_ms": q[2].item(), "reps": len(times)}


_l2_flush: dict = {}


def measure(fn: Callable[[], object], device: torch.device, warmup: int = 3, budget_s: float = 1.0,
            min_reps: int = 5, max_reps: int = 200) -> dict:
    """Time fn() in ms: `warmup` untimed calls, then as many timed calls as fit in budget_s (min_reps..max_reps)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        if device.type == "cuda":                 # a cold L2 for every call
            if device not in _l2_flush:
                _l2_flush[device] = torch.empty(256 * MiB, dtype=torch.int8, device=device)
            _l2_flush[device].zero_()
        times.append(call_ms(fn, device))
    return quantiles(times)


def gpu_peak_extra_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak CUDA memory allocated during one call of fn, above what was allocated before it (outputs included)."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    sync(device)
    del out
    return (torch.cuda.max_memory_allocated(device) - base) / MiB


def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_peak_extra_mb(fn: Callable[[], object]) -> tuple[float, str]:
    """In a fresh process (the caller's job): peak RSS growth during one call of fn, and the method used."""
    try:
        Path("/proc/self/clear_refs").write_text("5")          # reset VmHWM to the current RSS
        rss0 = _proc_status_kb("VmRSS")
        out = fn()
        hwm = _proc_status_kb("VmHWM")
        del out
        if rss0 is not None and hwm is not None:
            return max(0, hwm - rss0) / 1024, "VmHWM-VmRSS"
    except OSError:
        pass
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss    # KiB on Linux
    out = fn()
    del out
    return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, "ru_maxrss delta (lower bound)"


def run_child(script: Path, args: list[str], timeout: float = 300) -> dict | None:
    """Run `python script args...` and parse the JSON object on its last stdout line (None on failure)."""
    try:
        r = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout,
                           cwd=ROOT)
        return json.loads(r.stdout.strip().splitlines()[-1])
    except Exception as e:  # a failed memory probe must not stop the benchmark
        print(f"  (memory probe failed: {type(e).__name__}: {e})", file=sys.stderr)
        return None


def backend_of(op: str, *args) -> str:
    """'name (where from)': the backend the public function of op (kernels/dispatch.py) runs for these arguments now:
    asked by name, this process's or the cache's decision, the static default, or the reference (MAECT_KERNELS=0)."""
    from maect.kernels import dispatch
    o = dispatch.get(op)
    meta = o.meta(*args)
    device = next(a for a in args if isinstance(a, torch.Tensor)).device
    fn = dispatch.lookup(op, meta, device)
    name = next((b.name for b in o.backends if b.fn is fn), o.ref_name)
    d = dispatch.decisions().get((op, device.type, o.key(meta)))
    src = ("MAECT_KERNELS=0" if os.environ.get("MAECT_KERNELS") == "0" else "asked" if op in dispatch.forced()
           else d.source if d and d.pick == name else "static default")
    return f"{name} ({src})"


def fmt(v, spec: str) -> str:
    if v is None:
        return "-"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def add_ratio(rows: list[dict], baseline: str, key: str = "provider", col: str = "speedup",
              time_key: str = "median_ms") -> None:
    """rows[col] = baseline time / row time (> 1: faster than the baseline), per group of rows."""
    base = next((r for r in rows if r[key] == baseline and r.get(time_key)), None)
    for r in rows:
        r[col] = base[time_key] / r[time_key] if base and r.get(time_key) else None


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]] + [[fmt(r.get(k), f) for k, _, f in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    print(f"\n{title}")
    for j, line in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if j == 0:
            print("  " + "  ".join("-" * w for w in widths))


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"}
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=ROOT, timeout=10).stdout.strip()
    except Exception:
        pass
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {path}")
