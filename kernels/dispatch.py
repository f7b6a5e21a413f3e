"""Measured dispatch: the backend of an op is the fastest one that is verified on the machine it runs on.

One mechanism for every op with several backends (queue_topk and the MAE masking ops; their candidates and rules
live in kernels/candidates.py). For each key

    key = <device name and capability> | <threads (CPU)> | torch <v> | triton <v> | <op> | <dtype> | <shape class>

the first call in a process (MAECT_DISPATCH=measure, the default) resolves it in this order:
    1. this process's decision for the key (made earlier, or received from rank 0)
    2. the cache file $MAECT_CACHE_DIR/dispatch.json (default ~/.cache/maect/dispatch.json), an entry for the key
    3. measure (decide below) on the call's own inputs, or a bounded slice of them; keep the result in 1 and 2
MAECT_DISPATCH=table never measures: 1, 2, then the committed tables (kernels/masking_table.json for the masking
ops; for queue_topk the default rule: Triton on CUDA, the compiled op on CPU). MAECT_KERNELS=0 runs every
reference and bypasses all of this; a backend asked by name (backend=, MAECT_MASKING) is never measured.

decide(problem): run the reference once; run every candidate on the same inputs and drop the ones that raise
(a Triton compile failure included) or that the op's rule rejects (logged as a defect with the first bad row);
time the survivors and the plain torch path a user would otherwise run (timer: CUDA events on GPU, perf_counter on
CPU; one warm-up call, then repetitions until the budget, at most MAX_REPS, median); pick the fastest verified
backend (the reference is one, and so is the torch path in the op's contract: kernels/candidates.py, so no backend
slower than it is picked); log one line with every candidate's time and its ratio to the torch path.
A decision taken from the cache or from rank 0 whose backend cannot run in this process (MAECT_CPP=0, a build that
did not load, Triton missing), or that was measured without a backend that can run now, is decided again (stale()).
The Triton interpreter is never a candidate (kernels/candidates.py lists Triton backends on CUDA only).
Cost: at most BUDGET_S seconds of timing per key (MAECT_DISPATCH_BUDGET_S overrides; the verification and the
warm-up calls, which include a Triton compile on GPU, come on top and are reported apart).

Distributed runs: with torch.distributed initialised and more than one rank, rank 0 decides and publishes the
decision in the process group's key-value store (key maect/dispatch/<op>|<dtype>|<shape class>); every other
rank waits for it (at most WAIT_S seconds) and runs the same backend. The store, not a collective, so that a call
only rank 0 makes (the final k-NN) cannot hang the others. A rank that times out warns and runs the table's choice.

The cache (kernels/dispatch_cache.py): one JSON file, merged and rewritten atomically under a lock, so processes and
ranks writing at once lose no entry; a corrupt, unreadable or unwritable file gives one warning and in-memory
decisions. Only measured decisions are written to it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import platform
import statistics
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch

from .dispatch_cache import CACHE_NAME, Cache, cache_dir

logger = logging.getLogger("maect.kernels")

MODES = ("measure", "table")
BUDGET_S = 1.0          # seconds of timing per key (all candidates and baselines together)
MAX_REPS = {"cpu": 9, "cuda": 20}
WAIT_S = 300.0          # a non-zero rank waits this long for rank 0's decision


def mode() -> str:
    """MAECT_DISPATCH: 'measure' (default) or 'table'; ValueError naming the variable otherwise."""
    m = os.environ.get("MAECT_DISPATCH", "measure").strip() or "measure"
    if m not in MODES:
        raise ValueError(f"MAECT_DISPATCH={m!r}: choose 'measure' (default) or 'table'")
    return m


def budget_s() -> float:
    try:
        return float(os.environ.get("MAECT_DISPATCH_BUDGET_S", BUDGET_S))
    except ValueError:
        raise ValueError(f"MAECT_DISPATCH_BUDGET_S={os.environ['MAECT_DISPATCH_BUDGET_S']!r} is not a number") from None


# ------------------------------------------------------------------------------------------------------ keys
@functools.lru_cache(maxsize=None)
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


@functools.lru_cache(maxsize=None)
def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except Exception:
        return "none"


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    p = torch.cuda.get_device_properties(index)
    return f"{p.name} sm_{p.major}{p.minor}"


def device_key(device: torch.device) -> str:
    """The device part of a key: CUDA name and capability, or the CPU model, its SIMD level and thread count."""
    if device.type == "cuda":
        return f"cuda:{_cuda_name(device.index if device.index is not None else torch.cuda.current_device())}"
    if device.type == "cpu":
        return f"cpu:{_cpu_name()} {torch.backends.cpu.get_cpu_capability()} t{torch.get_num_threads()}"
    return device.type


def make_key(device: torch.device, op: str, dtype: str, shape: str) -> str:
    return f"{device_key(device)}|torch {torch.__version__}|triton {_triton_version()}|{op}|{dtype}|{shape}"


def short_key(key: str) -> str:
    """op|dtype|shape: the part of a key every rank shares (devices may differ in name)."""
    return "|".join(key.split("|")[-3:])


# ------------------------------------------------------------------------------------------------- problems
@dataclasses.dataclass
class Candidate:
    name: str
    run: Callable[[], Any]           # forward on the measurement inputs -> outputs (verified against the reference)
    timed: Callable[[], Any] | None = None   # what is timed (forward + backward in training); default: run
    baseline: bool = False           # timed for the ratio only, never picked (need not follow the op's contract)


@dataclasses.dataclass
class Problem:
    """One op on one set of inputs: the reference, the candidates and the rule that compares them."""
    op: str
    key: str
    device: torch.device
    reference: Candidate                                  # the specification; always a candidate itself
    candidates: list[Candidate]                           # other backends that can run here
    verify: Callable[[Any, Any], str | None]             # (output, reference output) -> None or the first bad row
    baselines: list[Candidate] = dataclasses.field(default_factory=list)   # the torch path first: the ratio's base
    shape: str = ""                                       # for log lines: the measured slice
    not_run: dict[str, str] = dataclasses.field(default_factory=dict)      # backends skipped here, and why


@dataclasses.dataclass
class Decision:
    pick: str
    source: str                                           # measured | cache | table | rank 0 | fallback
    ms: dict[str, float] = dataclasses.field(default_factory=dict)         # verified backends + baselines
    torch_path: str | None = None                        # the baseline of the ratios
    dropped: dict[str, str] = dataclasses.field(default_factory=dict)      # backend -> why (raised / defect)
    defects: dict[str, str] = dataclasses.field(default_factory=dict)      # backend -> first bad row
    cost_s: float = 0.0                                   # wall time of decide (verification + timing)
    timing_s: float = 0.0                                 # of which timing
    warmup_s: dict[str, float] = dataclasses.field(default_factory=dict)   # first call per backend (Triton compile)
    shape: str = ""
    not_run: dict[str, str] = dataclasses.field(default_factory=dict)

    def ratio(self, name: str) -> float | None:
        base = self.ms.get(self.torch_path) if self.torch_path else None
        t = self.ms.get(name)
        return base / t if base and t else None

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        d["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
        return d

    @classmethod
    def from_json(cls, d: dict, source: str) -> "Decision":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and k != "source"}, source=source)


# ---------------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_timer(name: str, fn: Callable[[], Any], device: torch.device, budget: float) -> float:
    """Median milliseconds of fn(): CUDA events on GPU, perf_counter on CPU. The first call is a warm-up (on GPU it
    may compile); repetitions follow until `budget` seconds are spent (at least one, at most MAX_REPS). A first
    call that alone takes more than half the budget is the one sample (a call that long is not warm-up-bound;
    this keeps the cost of measuring a slow reference bounded)."""
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    if first > budget / 2:
        return first * 1e3
    reps, times, spent = MAX_REPS.get(device.type, 5), [], 0.0
    while len(times) < reps and (not times or spent + statistics.median(times) / 1e3 < budget):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
            spent += time.perf_counter() - t0
        else:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            times.append(dt * 1e3)
            spent += dt
    return statistics.median(times)


_timer: Callable[[str, Callable, torch.device, float], float] = default_timer


def set_timer(timer: Callable | None) -> None:
    """Replace the timer (tests inject timings: timer(name, fn, device, budget_s) -> ms); None restores it."""
    global _timer
    _timer = timer or default_timer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def decide(problem: Problem, timer: Callable | None = None, budget: float | None = None) -> Decision:
    """Verify every candidate against the reference, time the survivors and the torch path, pick the fastest
    verified backend. Never raises for a candidate's fault (that candidate is dropped and logged)."""
    timer = timer or _timer
    budget = budget_s() if budget is None else budget
    t_start = time.perf_counter()
    dev = problem.device
    d = Decision(pick=problem.reference.name, source="measured", shape=problem.shape, not_run=dict(problem.not_run))
    t0 = time.perf_counter()
    ref_out = problem.reference.run()           # the reference raising is the caller's error (bad input): re-raised
    _sync(dev)
    d.warmup_s[problem.reference.name] = round(time.perf_counter() - t0, 4)
    survivors = [problem.reference]
    for c in problem.candidates:
        t0 = time.perf_counter()
        try:
            out = c.run()
            _sync(dev)
            bad = problem.verify(out, ref_out)
        except Exception as exc:                 # fails to compile, raises, declines with an error
            d.dropped[c.name] = f"raised {_first_line(exc)}"
            logger.warning("maect: dispatch %s [%s]: backend '%s' dropped: it raised %s", problem.op,
                           short_key(problem.key), c.name, _first_line(exc))
            continue
        d.warmup_s[c.name] = round(time.perf_counter() - t0, 4)
        if bad is not None:
            d.dropped[c.name] = f"mismatch: {bad}"
            d.defects[c.name] = bad
            logger.error("maect: DEFECT: %s backend '%s' disagrees with the reference on %s [%s]: %s; it is not used",
                         problem.op, c.name, problem.shape or "these inputs", problem.key, bad)
            continue
        survivors.append(c)
    timed = survivors + list(problem.baselines)
    t_timing = time.perf_counter()
    for j, c in enumerate(timed):
        left = max(0.0, budget - (time.perf_counter() - t_timing))
        try:
            d.ms[c.name] = float(timer(c.name, c.timed or c.run, dev, left / (len(timed) - j)))
        except Exception as exc:                 # a backend that ran once but fails when timed (e.g. its backward)
            if c is problem.reference:
                raise
            d.dropped[c.name] = f"raised while timed: {_first_line(exc)}"
            logger.warning("maect: dispatch %s [%s]: backend '%s' dropped: timing it raised %s", problem.op,
                           short_key(problem.key), c.name, _first_line(exc))
    d.timing_s = round(time.perf_counter() - t_timing, 4)
    ok = [c.name for c in survivors if c.name in d.ms and math.isfinite(d.ms[c.name])]
    d.pick = min(ok, key=lambda n: d.ms[n]) if ok else problem.reference.name
    d.torch_path = problem.baselines[0].name if problem.baselines else problem.reference.name
    if d.torch_path not in d.ms:
        d.torch_path = problem.reference.name
    d.cost_s = round(time.perf_counter() - t_start, 4)
    d.ms = {k: round(v, 4) for k, v in d.ms.items()}
    return d


def summary(op: str, key: str, d: Decision) -> str:
    """The one log line of a decision: every backend's time and its ratio to the torch path."""
    parts = []
    for name, ms in d.ms.items():
        r = d.ratio(name)
        tag = " (torch path)" if name == d.torch_path else ""
        parts.append(f"{name} {ms:.3f} ms" + (f" = {r:.2f}x" if r is not None and not tag else "") + tag)
    parts += [f"{name} dropped ({why})" for name, why in d.dropped.items()]
    where = f" on {d.shape}" if d.shape else ""
    extra = f"; measuring took {d.cost_s:.2f} s" if d.source == "measured" else ""
    if not parts:                                          # table mode: nothing measured
        return f"maect: {op} [{key}]: backend '{d.pick}' ({d.source}: nothing measured)"
    return (f"maect: {op} [{key}]: backend '{d.pick}' ({d.source}{where}: " + ", ".join(parts) + ")" + extra)


_cache: Cache | None = None
_decisions: dict[str, Decision] = {}
_state_lock = threading.RLock()


def cache() -> Cache:
    global _cache
    if _cache is None or _cache.path != cache_dir() / CACHE_NAME:
        _cache = Cache()
    return _cache


def clear() -> None:
    """Forget this process's decisions and the loaded cache (tests; after changing MAECT_CACHE_DIR)."""
    global _cache
    with _state_lock:
        _decisions.clear()
        _cache = None


def decisions() -> dict[str, Decision]:
    """This process's decisions so far, by key (for log lines and the check)."""
    return dict(_decisions)




# ------------------------------------------------------------------------------------------------ distributed
def _dist_info():
    """(rank, world, store) when torch.distributed runs more than one rank, else None."""
    try:
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        from torch.distributed import distributed_c10d as c10d
        return dist.get_rank(), dist.get_world_size(), c10d._get_default_store()
    except Exception:
        return None


def _publish(store, key: str, d: Decision) -> None:
    store.set("maect/dispatch/" + short_key(key), json.dumps({"pick": d.pick, "ms": d.ms, "dropped": d.dropped,
                                                             "torch_path": d.torch_path, "shape": d.shape,
                                                             "origin": d.source.split(" ")[0]}))


def _receive(store, key: str, wait_s: float) -> Decision | None:
    skey = "maect/dispatch/" + short_key(key)
    try:
        store.wait([skey], timedelta(seconds=wait_s))
        entry = json.loads(store.get(skey))
        return Decision.from_json(entry, f"rank 0 ({entry.get('origin', '?')})")
    except Exception as exc:
        logger.warning("maect: dispatch %s: no decision from rank 0 within %.0f s (%s); this rank runs the table's "
                       "choice", short_key(key), wait_s, _first_line(exc))
        return None


# ----------------------------------------------------------------------------------------------------- choose
_forcing: list | None = None
_forcing_timer: Callable | None = None


@contextlib.contextmanager
def forced(timer: Callable | None = None):
    """Inside: every choose() measures, even where a decision is known (python -m maect.kernels.check); yields
    the list of (key, Decision) made inside."""
    global _forcing, _forcing_timer
    prev = _forcing, _forcing_timer
    _forcing, _forcing_timer = [], timer
    try:
        yield _forcing
    finally:
        _forcing, _forcing_timer = prev


def stale(d: Decision, backends: dict[str, str | None]) -> str | None:
    """Why a decision made elsewhere (the cache file, rank 0) does not hold in this process, else None.
    backends: every backend of the op -> None where it can run here, else why not (a switch such as MAECT_CPP=0, a
    missing build, another device). Stale: its pick cannot run here, or it was measured without a backend that can
    run here now (switched off then, or added since)."""
    why = backends.get(d.pick, "not a backend of this op")
    if why is not None:
        return f"its backend '{d.pick}' cannot run here ({why})"
    if d.ms:
        unmeasured = [b for b, w in backends.items() if w is None and b not in d.ms and b not in d.dropped]
        if unmeasured:
            return f"it was measured without {', '.join(repr(b) for b in unmeasured)}, which can run here now"
    return None


def backends_missing(d: Decision, backends: dict[str, str | None]) -> str | None:
    """Why d's pick cannot run here (rank 0's decision on a rank whose backends differ), else None."""
    why = backends.get(d.pick, "not a backend of this op")
    return None if why is None else f"its backend '{d.pick}' cannot run here ({why})"


def choose(key: str, problem: Callable[[], Problem] | None, fallback: str, *, force: bool = False,
           timer: Callable | None = None, backends: Callable[[], dict[str, str | None]] | None = None) -> Decision:
    """The decision for key (module docstring order). problem: builds the measurement (called only when one runs;
    None: table mode, never measure); fallback: the table's pick (table mode without a cached decision, or a rank
    that waited for rank 0 in vain; it can always run here). force: measure even if a decision is known (python -m
    maect.kernels.check). backends: the op's backends -> None or why one cannot run here (see stale): a cached or
    received decision that is stale is decided again (one log line), so a backend switched off (MAECT_CPP=0) or
    unavailable never runs whatever the cache holds.
    Distributed: rank 0 resolves the key and publishes the decision; every other rank runs what rank 0 chose."""
    made = _forcing
    if made is not None:
        force, timer = True, timer or _forcing_timer
    with _state_lock:
        if not force and key in _decisions:
            return _decisions[key]
        op = key.split("|")[-3]
        info = _dist_info()
        avail = backends() if backends is not None else None
        if info is not None and info[0] != 0 and not force:
            d = _receive(info[2], key, WAIT_S) or Decision(pick=fallback, source="table (rank 0 silent)")
            if avail is not None and (why := backends_missing(d, avail)) is not None:
                logger.info("maect: dispatch %s [%s]: rank 0's decision is not used: %s; this rank runs the table's "
                            "choice '%s'", op, short_key(key), why, fallback)
                d = Decision(pick=fallback, source="table (rank 0's pick cannot run here)")
        else:
            d = None
            if not force:
                entry = cache().get(key)
                d = Decision.from_json(entry, f"cache {cache().path}") if entry is not None else None
                if d is not None and avail is not None and (why := stale(d, avail)) is not None:
                    logger.info("maect: dispatch %s [%s]: the cached decision is not used: %s; deciding again", op,
                                short_key(key), why)
                    d = None
            if d is None:
                d = decide(problem(), timer=timer) if problem is not None else \
                    Decision(pick=fallback, source="table (MAECT_DISPATCH=table)")
            if info is not None:
                with contextlib.suppress(Exception):
                    _publish(info[2], key, d)
        _decisions[key] = d
        if d.source in ("measured", "rank 0 (measured)"):     # only measurements go into the cache
            cache().put(key, d.to_json())
        log = logger.error if d.defects else logger.info
        log(summary(op, key, d))
        if made is not None:
            made.append((key, d))
        return d
