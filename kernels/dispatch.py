"""How an op with several backends picks one: decided before training starts, a plain lookup at call time.

Every such op (queue_topk, random_masking, unshuffle, decoder_input, masked_patch_embed, and maect's attention)
registers one `Op`: its reference (the specification), an ordered list of `Backend`s whose first entry is the torch
path a user would otherwise run, the rule that compares a backend's output with the reference's, and a static
default per device type. Each backend says why it cannot run given inputs (`why_not`), as xFormers' operators do.

Call time: `lookup(op, meta, device)` -> the backend. `meta` is what the decision depends on (dtype, shape class,
whether gradients are recorded), a tuple of Python constants the op computes from its arguments. Resolution, once per
(op, device, key) and then one dict lookup:
    1. a backend asked by the call's backend= argument          -> it, or Unavailable naming why it cannot run
    2. MAECT_KERNELS=0 (maect's kernel ops; not attention)     -> the reference
    3. a backend asked for the whole process by force(op, name) (the trainer's config keys) -> it, or Unavailable
    4. the decision for the key made in this process (decide(), or rank 0's, share_from_rank0())
    5. the decision stored in the cache file $MAECT_CACHE_DIR/dispatch.json (default ~/.cache/maect/dispatch.json)
    6. the op's static default for the device type (documented in the op's file); the torch path if that cannot run
A decision whose backend cannot run here (no compiled extension, no Triton, another device) is not used: the next
rule applies. Nothing is measured at call time, so no forward or backward ever times anything.

Decisions: `decide(op, args)` runs the reference once, runs every backend that can run on the same inputs and drops
the ones that raise or that the op's rule rejects (logged as a defect with the first bad row), times the others
(forward, or forward + backward when the inputs record gradients) in interleaved rounds, and picks the earliest
backend in the op's order whose time is within MARGIN of the fastest. The torch path comes first, so a backend
replaces it only when measured more than MARGIN faster: the pick is never slower than the torch path by measurement,
and timing noise below MARGIN does not change it between runs. The decision is kept in this process and in the cache
file (one JSON object, merged and rewritten atomically under a lock). The trainer decides at start-up for the shapes its
stages will train and evaluate (maect/backends.py); `python -m maect.kernels.check` decides a preset's again.
Under torch.distributed every rank runs rank 0's decisions (share_from_rank0).
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
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

logger = logging.getLogger("maect.kernels")

MARGIN = 0.10           # a backend replaces an earlier one only when measured more than 10 % faster
BUDGET_S = 1.0          # seconds of timing per decision (all backends together)
MAX_REPS = {"cpu": 30, "cuda": 30}
CACHE_FORMAT = 2


# ------------------------------------------------------------------------------------------------------ ops
@dataclasses.dataclass(frozen=True)
class Backend:
    """One way to run an op. fn has the op's signature. why_not(device, meta) -> None where it can run inputs with
    that meta on that device, else the reason (a missing build, another device, an unsupported dtype or size)."""
    name: str
    fn: Callable
    why_not: Callable[[torch.device, tuple], str | None] = lambda device, meta: None
    cuda_timed_only: bool = False     # a Triton backend: on CPU only its interpreter runs (asked by name), never timed


@dataclasses.dataclass
class Op:
    """An op with several backends. backends[0] is the torch path (always runnable). key(meta) -> 'dtype|shape
    class' (the part of the cache key that the decision depends on besides the device). verify(args, out, ref)
    -> None or the first bad row. default: device type -> the static default's name."""
    name: str
    reference: Callable
    backends: tuple[Backend, ...]
    key: Callable[[tuple], str]
    verify: Callable[[tuple, Any, Any], str | None]
    default: dict[str, str]
    meta: Callable[..., tuple]                    # the op's arguments -> meta
    ref_name: str = "ref"                         # the reference's name when asked for by name
    kernel: bool = True                           # one of maect's kernels: MAECT_KERNELS=0 runs its reference
    prepare: Callable[[tuple], tuple] | None = None   # the caller's arguments -> the measurement's (a bounded
                                                  # slice, explicit noise so every backend masks the same patches)

    def backend(self, name: str) -> Backend:
        for b in self.backends:
            if b.name == name:
                return b
        if name == self.ref_name:
            return Backend(name, self.reference)
        raise ValueError(f"{self.name}: unknown backend {name!r}; choose one of {self.names()}")

    def names(self) -> tuple[str, ...]:
        own = tuple(b.name for b in self.backends)
        return own + ((self.ref_name,) if self.ref_name not in own else ())


OPS: dict[str, Op] = {}


class Unavailable(ValueError):
    """A backend asked for by name cannot run the given inputs; the message names every backend's reason."""


def register(op: Op) -> Op:
    OPS[op.name] = op
    return op


def get(op: str) -> Op:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; registered: {sorted(OPS)}")
    return OPS[op]


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


def device_key(device: torch.device) -> str:
    """CUDA name and capability, or the CPU model, its SIMD level and thread count; torch and Triton versions."""
    device = torch.device(device)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device.index if device.index is not None else torch.cuda.current_device())
        dev = f"cuda:{p.name} sm_{p.major}{p.minor}"
    elif device.type == "cpu":
        dev = f"cpu:{_cpu_name()} {torch.backends.cpu.get_cpu_capability()} t{torch.get_num_threads()}"
    else:
        dev = device.type
    return f"{dev}|torch {torch.__version__}|triton {_triton_version()}"


def concrete(n) -> int:
    """A size as a Python int. Under torch.compile's dynamic shapes a size is symbolic; a binary search of
    comparisons (each a guard) turns it into a constant, so the graph is specialised on it instead of breaking."""
    if not torch.compiler.is_compiling():
        return int(n)
    lo, hi = 0, 1 << 31
    while lo < hi:
        mid = (lo + hi) // 2
        if n <= mid:
            hi = mid
        else:
            lo = mid + 1
    return lo


# ------------------------------------------------------------------------------------------------------ cache
def cache_dir() -> Path:
    return Path(os.environ.get("MAECT_CACHE_DIR") or Path.home() / ".cache" / "maect")


class Cache:
    """$MAECT_CACHE_DIR/dispatch.json: {"format": 2, "entries": {device key|op|key: decision}}. Read once per
    process; every new decision re-reads, merges and rewrites it atomically (temporary file, fsync, os.replace)
    under fcntl.flock, so processes writing at once lose no entry. Unreadable, corrupt or unwritable: one warning,
    decisions live in memory."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else cache_dir() / "dispatch.json"
        self._entries: dict | None = None
        self._warned = False

    def _warn(self, what: str) -> None:
        if not self._warned:
            self._warned = True
            logger.warning("maect: dispatch cache %s %s; decisions are kept in memory for this process", self.path,
                           what)

    def _read(self, warn: bool = True) -> dict:
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or \
                    not isinstance(data.get("entries"), dict):
                raise ValueError(f"not a format-{CACHE_FORMAT} decisions file")
            return data["entries"]
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            if warn:
                self._warn(f"is unreadable ({type(exc).__name__}: {exc}); it is replaced by the next decision written")
            return {}

    def get(self, key: str) -> dict | None:
        if self._entries is None:
            self._entries = self._read()
        e = self._entries.get(key)
        return e if isinstance(e, dict) and isinstance(e.get("pick"), str) else None

    def put(self, key: str, entry: dict) -> None:
        import fcntl
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_name(self.path.name + ".lock"), "a+") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                merged = {**self._read(warn=False), key: entry}
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".", suffix=".tmp")
                try:
                    with os.fdopen(fd, "w") as f:
                        json.dump({"format": CACHE_FORMAT, "entries": merged}, f, indent=1, sort_keys=True)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, self.path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
                self._entries = merged
        except OSError as exc:
            self._warn(f"cannot be written ({type(exc).__name__}: {exc})")
            if self._entries is not None:
                self._entries[key] = entry


# ------------------------------------------------------------------------------------------------- decisions
@dataclasses.dataclass
class Decision:
    pick: str
    source: str                                     # measured | cache | static default | rank 0 (<its source>)
    ms: dict[str, float] = dataclasses.field(default_factory=dict)          # verified backends' median times
    dropped: dict[str, str] = dataclasses.field(default_factory=dict)       # backend -> why (raised, defect)
    not_run: dict[str, str] = dataclasses.field(default_factory=dict)       # backend -> why it cannot run here
    torch_path: str = ""
    cost_s: float = 0.0                             # wall time of the decision (verification + timing)
    shape: str = ""

    def ratio(self) -> float | None:
        """The pick's speed over the torch path's (measured decisions only)."""
        a, b = self.ms.get(self.torch_path), self.ms.get(self.pick)
        return a / b if a and b else None

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        d["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
        return d

    @classmethod
    def from_json(cls, d: dict, source: str) -> "Decision":
        names = {f.name for f in dataclasses.fields(cls)} - {"source"}
        return cls(**{k: v for k, v in d.items() if k in names}, source=source)

    def brief(self) -> str:
        """'cpp 0.41 ms (3.20x torch)', 'sdpa 0.2 ms (torch path)', 'cpp (cache: 0.41 ms, 3.20x torch)',
        'cpp (static default)'."""
        t, r = self.ms.get(self.pick), self.ratio()
        vs = "torch path" if self.pick == self.torch_path else (f"{r:.2f}x torch" if r else "")
        if t is None:
            return f"{self.pick} ({self.source})"
        if self.source != "measured":
            return f"{self.pick} ({self.source}: {t:.3g} ms{', ' + vs if vs else ''})"
        return f"{self.pick} {t:.3g} ms" + (f" ({vs})" if vs else "")


_state = threading.RLock()
_decisions: dict[tuple, Decision] = {}      # (op, device type, key) -> decision made in or given to this process
_resolved: dict[tuple, str] = {}            # (op, device type, device index, meta, asked) -> backend name
_forced: dict[str, str] = {}                # op -> backend asked by name for the whole process
_cache: Cache | None = None
_follow_rank0 = False                       # after share_from_rank0 on a non-zero rank: the cache file is not read


def cache() -> Cache:
    global _cache
    if _cache is None or _cache.path != cache_dir() / "dispatch.json":
        _cache = Cache()
    return _cache


def clear() -> None:
    """Forget this process's decisions, resolutions, forced backends and loaded cache (tests; after changing
    MAECT_CACHE_DIR)."""
    global _cache, _follow_rank0
    with _state:
        _decisions.clear()
        _resolved.clear()
        _forced.clear()
        _cache, _follow_rank0 = None, False


def force(op: str, name: str | None) -> None:
    """Run backend `name` of op for every call in this process (None or 'auto': the decision). ValueError for a
    name the op does not have."""
    o = get(op)
    with _state:
        if name in (None, "auto"):
            _forced.pop(op, None)
        else:
            o.backend(name)
            _forced[op] = name
        _resolved.clear()


def forced() -> dict[str, str]:
    return dict(_forced)


def decisions() -> dict[tuple, Decision]:
    """(op, device type, key) -> the decision this process made or was given."""
    return dict(_decisions)


INTERPRETER = ("Triton runs on CUDA (the interpreter is a correctness tool: it runs a backend asked by name, never "
               "decided)")


def _unavailable(op: Op, name: str, device: torch.device, meta: tuple, asked: bool = False) -> str | None:
    """None where backend `name` can run inputs with meta on device, else why not. A Triton backend on CPU runs only
    asked by name (in the interpreter), never as a decision or a default."""
    if name == op.ref_name:
        return None
    try:
        b = op.backend(name)
    except ValueError as exc:
        return str(exc)
    if b.cuda_timed_only and device.type != "cuda" and not asked:
        return INTERPRETER
    return b.why_not(device, meta)


def _why_each(op: Op, device: torch.device, meta: tuple) -> str:
    names = op.names()
    w = max(map(len, names))
    return "\n".join(f"  {n:<{w}}  {'no: ' + why if (why := _unavailable(op, n, device, meta, True)) else 'can run'}"
                     for n in names)


def _cache_key(device: torch.device, op: str, key: str) -> str:
    return f"{device_key(device)}|{op}|{key}"


def _known(op: Op, device: torch.device, meta: tuple, otherwise: str) -> Decision | None:
    """This process's decision for the key, else the cache file's (kept in this process; not read after
    share_from_rank0), or None. A decision whose backend cannot run here is dropped with one log line ending in
    `otherwise` (what happens instead)."""
    key = op.key(meta)
    dkey = (op.name, device.type, key)
    d = _decisions.get(dkey)
    if d is None and not _follow_rank0:
        entry = cache().get(_cache_key(device, op.name, key))
        if entry is not None:
            d = _decisions[dkey] = Decision.from_json(entry, "cache")
    if d is not None and (why := _unavailable(op, d.pick, device, meta)) is not None:
        logger.info("maect: %s %s: the %s decision '%s' cannot run here (%s); %s", op.name, key, d.source, d.pick,
                    why, otherwise)
        return None
    return d


def _static_default(op: Op, device: torch.device, meta: tuple) -> str:
    """The op's static default for the device type, or its torch path where that cannot run here."""
    name = op.default.get(device.type, op.backends[0].name)
    return name if _unavailable(op, name, device, meta) is None else op.backends[0].name


@torch.compiler.assume_constant_result
def _resolve(op_name: str, device_type: str, device_index: int | None, meta: tuple, asked: str | None) -> str:
    """Rules 1 and 3-6 of the module docstring for one key, memoised: Python constants in, a name out (a trace-time
    constant under torch.compile)."""
    rkey = (op_name, device_type, device_index, meta, asked or _forced.get(op_name))
    name = _resolved.get(rkey)
    if name is not None:
        return name
    with _state:
        op, device = OPS[op_name], torch.device(device_type, device_index)
        asked = rkey[-1]
        if asked is not None:
            why = _unavailable(op, asked, device, meta, asked=True)
            if why is not None:
                raise Unavailable(f"{op_name}: backend {asked!r} cannot run {op.key(meta)} on {device_type}: {why}\n"
                                  f"Every backend for these inputs:\n{_why_each(op, device, meta)}")
            _resolved[rkey] = asked
            return asked
        d = _known(op, device, meta, "the static default runs")
        name = d.pick if d is not None else _static_default(op, device, meta)
        _resolved[rkey] = name
        return name


def lookup(op: str, meta: tuple, device: torch.device, asked: str | None = None) -> Callable:
    """The function that runs op for inputs with this meta on device (module docstring: rules 1-6)."""
    o = OPS[op]
    if o.kernel and asked is None and os.environ.get("MAECT_KERNELS", "1") == "0":
        return o.reference
    return o.backend(_resolve(op, device.type, device.index, meta, asked)).fn


# ---------------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Milliseconds of one call of fn: CUDA events on GPU (the kernels' time, launched asynchronously), perf_counter
    on CPU."""
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b)
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def interleaved(runs: dict[str, Callable[[], Any]], device: torch.device, budget: float
                ) -> tuple[dict[str, float], dict[str, str]]:
    """Median milliseconds of each run(): one warm-up call each, then rounds that time every backend once, in turn,
    until `budget` seconds are spent (at least 1 round, at most MAX_REPS). Interleaving exposes every backend to the
    same load: a machine that gets busier halfway through slows all of them, not the last one timed. CUDA events on
    GPU, perf_counter on CPU. Returns (ms, {name: why} for a run that raised)."""
    failed: dict[str, str] = {}
    live = dict(runs)
    for name, run in list(live.items()):
        try:
            run()
            _sync(device)
        except Exception as exc:
            failed[name] = _first_line(exc)
            live.pop(name)
    times: dict[str, list[float]] = {n: [] for n in live}
    t0 = time.perf_counter()
    while live and (not times[next(iter(live))] or (time.perf_counter() - t0 < budget and
                                                        len(times[next(iter(live))]) < MAX_REPS.get(device.type, 5))):
        for name, run in list(live.items()):
            try:
                times[name].append(call_ms(run, device))
            except Exception as exc:
                failed[name] = _first_line(exc)
                live.pop(name)
                times.pop(name)
    return {n: round(statistics.median(v), 4) for n, v in times.items()}, failed


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def _records_grad(args: tuple) -> bool:
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def _timed(fn: Callable, args: tuple, grad: bool) -> Callable[[], Any]:
    """fn(*args), plus the backward of its first output's sum when the inputs record gradients (a training step)."""
    def run():
        out = fn(*args)
        first = out[0] if isinstance(out, tuple) else out
        if grad and first.requires_grad:
            first.float().sum().backward()
        return out
    return run


def _device_meta(o: Op, args: tuple, amp: torch.dtype | None) -> tuple[torch.device, tuple]:
    """The device of the first tensor argument, and the op's meta of args (under autocast to amp when given)."""
    device = next(a for a in args if isinstance(a, torch.Tensor)).device
    with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
        return device, o.meta(*args)


def measure(op: str, args: tuple, timer: Callable | None = None, budget_s: float = BUDGET_S,
            amp: torch.dtype | None = None) -> Decision:
    """Verify every backend that can run args against the reference, time the verified ones (interleaved; timer:
    an injected timer(name, fn, device, budget_s) -> ms instead, tests), pick (module docstring). Never raises for
    a backend's fault; the reference raising (bad input) propagates. amp: run under torch.autocast with this dtype
    (the training step's precision)."""
    o, t_start = get(op), time.perf_counter()
    device, meta = _device_meta(o, args, amp)   # the caller's shape class (the decision's key), not the slice's
    ctx = (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else contextlib.nullcontext
    args = o.prepare(args) if o.prepare is not None else args
    d = Decision(o.backends[0].name, "measured", torch_path=o.backends[0].name, shape=o.key(meta))
    grad = _records_grad(args)
    with ctx(), torch.no_grad():
        ref = o.reference(*args)
    _sync(device)
    ok = []
    for b in o.backends:
        why = _unavailable(o, b.name, device, meta)
        if why is not None:
            d.not_run[b.name] = why
            continue
        try:
            with ctx(), torch.no_grad():
                out = b.fn(*args)
            _sync(device)
            bad = o.verify(args, out, ref)
        except Exception as exc:
            d.dropped[b.name] = f"raised {_first_line(exc)}"
            logger.warning("maect: %s %s: backend '%s' dropped: it raised %s", op, d.shape, b.name, _first_line(exc))
            continue
        if bad is not None:
            d.dropped[b.name] = f"disagrees with the reference: {bad}"
            logger.error("maect: DEFECT: %s backend '%s' disagrees with the reference on %s: %s; it is not used",
                         op, b.name, d.shape, bad)
            continue
        ok.append(b)
    runs = {b.name: _timed(b.fn, args, grad) for b in ok}
    with ctx():
        if timer is not None:                    # injected (tests): one backend at a time
            t0 = time.perf_counter()
            for j, (name, run) in enumerate(runs.items()):
                left = max(0.0, budget_s - (time.perf_counter() - t0)) / (len(runs) - j)
                try:
                    d.ms[name] = round(float(timer(name, run, device, left)), 4)
                except Exception as exc:         # ran once, fails when timed (its backward)
                    d.dropped[name] = f"raised while timed: {_first_line(exc)}"
        else:
            d.ms, failed = interleaved(runs, device, budget_s)
            d.dropped.update({n: f"raised while timed: {why}" for n, why in failed.items()})
    for name in set(runs) - set(d.ms):
        logger.warning("maect: %s %s: backend '%s' dropped: %s", op, d.shape, name, d.dropped.get(name, ""))
    timed = [b.name for b in ok if b.name in d.ms and math.isfinite(d.ms[b.name])]
    if timed:
        best = min(d.ms[n] for n in timed)
        d.pick = next(n for n in timed if d.ms[n] <= best * (1 + MARGIN))
    d.cost_s = round(time.perf_counter() - t_start, 4)
    return d


def decide(op: str, args: tuple, *, measure_missing: bool = True, timer: Callable | None = None,
           budget_s: float = BUDGET_S, amp: torch.dtype | None = None, again: bool = False) -> Decision:
    """The decision for op on inputs like args, made now if this process and the cache have none (measure_missing;
    else the static default), or always when again=True (python -m maect.kernels.check). A decision from the cache
    whose backend cannot run here is made again. Kept in this process and (measured ones) in the cache file."""
    o = get(op)
    device, meta = _device_meta(o, args, amp)
    key = o.key(meta)
    with _state:
        d = None if again else _known(o, device, meta, "deciding again")
        if d is None and (measure_missing or again):
            d = measure(op, args, timer=timer, budget_s=budget_s, amp=amp)
            cache().put(_cache_key(device, op, key), d.to_json())
        if d is None:
            d = Decision(_static_default(o, device, meta), "static default")
        _decisions[(op, device.type, key)] = d
        _resolved.clear()
        return d


# ------------------------------------------------------------------------------------------------ distributed
def share_from_rank0() -> None:
    """Under torch.distributed with more than one rank: every rank adopts rank 0's decisions (made or read from its
    cache at start-up) and no rank reads its cache file afterwards (a key not decided at start-up runs the static
    default everywhere), so all ranks run the same backends. A collective:
    every rank calls it, at the same point (the trainer's start-up)."""
    global _follow_rank0
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    with _state:
        mine = [{"|".join(k): v.to_json() | {"source": v.source} for k, v in _decisions.items()}]
    dist.broadcast_object_list(mine, src=0)
    _follow_rank0 = True                    # every rank: what was not decided at start-up runs the static default
    if dist.get_rank() != 0:
        with _state:
            _decisions.clear()
            for k, v in mine[0].items():
                op, dev, key = k.split("|", 2)
                _decisions[(op, dev, key)] = Decision.from_json(v, f"rank 0 ({v.get('source', '?')})")
            _resolved.clear()


def summary(made: list[tuple[str, Decision]]) -> str:
    """One line: op key -> backend (its time against the torch path) for each decision."""
    return "kernels: " + "; ".join(f"{op} {d.shape} -> {d.brief()}" for op, d in made)
