"""Which backend runs each op (temporary home of the routing that kernels/__init__.py held; behaviour unchanged).

The ops (kernels/ops/) call choose() (masking ops) and _topk_backend() (queue_topk); each op's file holds its
backends (BACKENDS, backend_fn / impls) and its measurement pieces, this module the rule that picks one.

The dispatch rule of every op (measured dispatch: kernels/dispatch.py, docs/dispatch.md):
    1. MAECT_KERNELS=0                                                        -> "ref" for every op
    2. asked by name: the backend= argument, else MAECT_MASKING=<name> (masking ops that have that backend; 'auto'
       or unset: no request)                                                  -> it, or a ValueError saying why not
    3. MAECT_DISPATCH=measure (the default): the decision for the key (device, versions, op, dtype, shape class)
       made in this process, else the one in the cache file ($MAECT_CACHE_DIR/dispatch.json), else measured at
       this first call: every candidate verified against the reference on the call's inputs, the verified ones
       timed beside the torch path, the fastest kept (one log line). Under torch.distributed rank 0 decides.
    4. MAECT_DISPATCH=table, and where measuring cannot run (inside torch.compile's tracing, or choose() asked
       without inputs): the cache, else the committed table
       masking ops: kernels/masking_table.json (MAECT_MASKING_TABLE overrides the path), entry
       "<device>|<op>|L<l>-D<d>" (l, d: the next powers of two of the token count L and the width D), else
       "<device>|<op>|*"                             -> its pick if it can run here (not via the interpreter), else "ref"
       queue_topk, and a masking op without any entry (backend_for): CUDA tensor and Triton importable -> "triton";
       CPU tensor and the compiled csrc extension loads -> "cpp"; otherwise -> "ref"
Backends of the masking ops (MASKING_BACKENDS):
    ref     the references: MAE's torch code (argsort + gather; cat + gather + add; full conv patch embedding)
    cpp     the compiled CPU op (csrc/) in MAE's structure    triton  the standalone Triton kernel, likewise (CUDA)
    gather  masked_patch_embed only: embed only the kept patches, torch ops (any device)
    fused   masked_patch_embed: index kernel + gather-GEMM kernel (Triton, CUDA); decoder_input: one pass (Triton
            on CUDA, the compiled op on CPU; the Triton kernel in the interpreter when that is not built)
Each choice is logged once per (op, device, shape class, request) on logging.getLogger("maect.kernels"). A backend
may still decline an input (dtype/shape) and run its fallback (the reference, or 'gather').
"""
from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

import torch
from torch import Tensor

from . import dispatch
from ._util import cpp_available, interpreting, next_pow2, triton_available
from .ops import _measure, decoder_input, masked_patch_embed, queue_topk, random_masking, unshuffle

logger = logging.getLogger("maect.kernels")
_OPS = {"random_masking": random_masking, "unshuffle": unshuffle, "masked_patch_embed": masked_patch_embed,
        "decoder_input": decoder_input}
MASKING_BACKENDS = {op: mod.BACKENDS for op, mod in _OPS.items()}     # each op's file lists its backends
TABLE_PATH = Path(os.environ.get("MAECT_MASKING_TABLE", Path(__file__).resolve().parent / "masking_table.json"))


def backend_for(t: Tensor) -> str:
    """queue_topk's default rule (rule 4; in measure mode the first call's measurement decides, see decisions()):
    'triton', 'cpp' or 'ref' for tensors on t's device."""
    if os.environ.get("MAECT_KERNELS", "1") == "0":
        return "ref"
    if t.is_cuda and triton_available():
        return "triton"
    if t.device.type == "cpu" and cpp_available():
        return "cpp"
    return "ref"


def shape_class(L: int, D: int) -> str:
    return f"L{next_pow2(L)}-D{next_pow2(D)}"


@functools.lru_cache(maxsize=None)
def load_table(path: str | None = None) -> dict:
    """The measured masking table ({} entries when the file is missing or unreadable: every op then runs 'ref')."""
    path = Path(path or TABLE_PATH)
    try:
        table = json.loads(path.read_text())
        if not isinstance(table.get("entries"), dict):
            raise ValueError("no 'entries' object")
        return table
    except (OSError, ValueError) as exc:
        logger.warning("maect: masking table %s unreadable (%s); masking ops use their references", path, exc)
        return {"entries": {}}


def why_not(op: str, backend: str, device: str, interpreter: bool = True) -> str | None:
    """None if `backend` of `op` can run on `device`, else the reason. interpreter=False: Triton on a CPU tensor
    (the interpreter, TRITON_INTERPRET=1) does not count (the table's picks were timed compiled)."""
    if backend in ("ref", "gather"):
        return None
    if backend == "fused" and op == "decoder_input" and device == "cpu" and cpp_available():
        return None                     # the compiled one-pass op (else: the Triton kernel, interpreter only)
    if backend == "cpp":
        if device != "cpu":
            return "the compiled ops are CPU ops"
        return None if cpp_available() else "the csrc extension did not load (its log line says why)"
    if not triton_available():
        return "triton is not importable"
    if device != "cuda" and not (interpreter and interpreting()):
        return (f"the Triton kernels run on CUDA (or, asked by name, in the interpreter: TRITON_INTERPRET=1), not on "
                f"{device}")
    return None


def _resolve(op: str, device: str, cls: str, asked: str | None, env: str) -> tuple[str, str]:
    valid = MASKING_BACKENDS[op]
    if asked is not None:
        if asked not in valid:
            raise ValueError(f"{op}: unknown backend {asked!r}; choose one of {valid}")
        if (why := why_not(op, asked, device)) is not None:
            raise ValueError(f"{op}: backend {asked!r} cannot run on {device}: {why}")
        return asked, "asked by argument"
    if env != "auto":
        known = sorted(set().union(*MASKING_BACKENDS.values()))
        if env not in known:
            raise ValueError(f"MAECT_MASKING={env!r}: choose 'auto' or one of {known}")
        if env in valid:
            if (why := why_not(op, env, device)) is not None:
                raise ValueError(f"MAECT_MASKING={env}: {op} backend {env!r} cannot run on {device}: {why}")
            return env, "asked by MAECT_MASKING"
    entries = load_table()["entries"]
    key = next((k for k in (f"{device}|{op}|{cls}", f"{device}|{op}|*") if k in entries), None)
    if key is None:
        fallback = {"cuda": "triton", "cpu": "cpp"}.get(device, "ref")
        name = fallback if why_not(op, fallback, device, interpreter=False) is None else "ref"
        return name, f"no entry for {device}|{op} in {TABLE_PATH.name}: the default rule"
    pick = entries[key].get("pick")
    if pick not in valid or (why := why_not(op, pick, device, interpreter=False)) is not None:
        return "ref", f"table pick {pick!r} for {key} cannot run here ({why if pick in valid else 'unknown backend'})"
    return pick, f"table entry {key}: {entries[key].get('why', '')}".rstrip(": ")


_chosen: dict[tuple, str] = {}


@torch.compiler.assume_constant_result
def _choose(op: str, device: str, cls: str, asked: str | None, env: str, interpreting: bool, log: bool = True) -> str:
    """The table rule (rules 1, 2, 4), memoised; logged once where it is the one that decides (log=True)."""
    key = (op, device, cls, asked, env, interpreting)
    if key not in _chosen:
        _chosen[key] = _resolve(op, device, cls, asked, env)
    name, why = _chosen[key]
    if log and key + ("logged",) not in _chosen:
        _chosen[key + ("logged",)] = name
        logger.info("maect: %s on %s (%s): backend '%s' (%s)", op, device, cls, name, why)
    return name


def choose(op: str, t: Tensor, L: int, D: int, backend: str | None = None, inputs: tuple | None = None,
           train: bool = False) -> str:
    """The backend that runs `op` for tensors on t's device with L tokens of width D (rules 1-4 above).
    inputs: the call's arguments in the op's signature order (the public ops pass them: rule 3 measures on them
    and the cache applies); without them rules 1, 2 and the committed table decide. train: the call records
    gradients (timed forward + backward)."""
    if os.environ.get("MAECT_KERNELS", "1") == "0":
        return "ref"
    env = os.environ.get("MAECT_MASKING", "auto") or "auto"
    args = (op, t.device.type, shape_class(L, D), backend, env, interpreting())
    if inputs is None or backend is not None or (env != "auto" and env in MASKING_BACKENDS[op]) or \
            torch.compiler.is_compiling():
        return _choose(*args)
    table = _choose(*args, log=False)
    key = _measure.masking_key(op, t, L, D, train)
    problem = None
    if dispatch.mode() == "measure":
        def problem():
            args, shape = _measure.masking_inputs(op, inputs)
            impls = {b: _OPS[op].backend_fn(b, t.device.type) for b in MASKING_BACKENDS[op]
                     if b != "ref" and why_not(op, b, t.device.type, interpreter=False) is None}
            p = _measure.masking_problem(op, key, args, impls, _OPS[op].backend_fn("ref", t.device.type), train, shape)
            triton_cpu = "Triton runs on CUDA (the interpreter is a correctness tool, never timed)"
            p.not_run = {b: triton_cpu if t.device.type != "cuda" and b in ("triton", "fused") else
                         why_not(op, b, t.device.type, interpreter=False) for b in MASKING_BACKENDS[op]
                         if b != "ref" and b not in impls}
            return p
    dev = t.device.type
    return dispatch.choose(key, problem, table, backends=lambda: {
        b: why_not(op, b, dev, interpreter=False) for b in MASKING_BACKENDS[op]}).pick


def decisions() -> dict[str, str]:
    """{dispatch key: backend} decided so far in this process (measured, cached, table, or rank 0's)."""
    return {k: d.pick for k, d in dispatch.decisions().items()}


def mae_backends(model, device) -> str:
    """'encoder <backend>, decoder <backend>' for an MAE model (maect.models.vit or the same attribute names) on
    device: what its forward_encoder / forward_decoder run (for log lines). In measure mode these are the table's
    picks until the first call measures (the measured choice is logged then)."""
    t, L = torch.empty(0, device=device), model.patch_embed.num_patches
    enc = choose("masked_patch_embed", t, L, model.patch_embed.proj.out_channels)
    dec = choose("decoder_input", t, L, model.decoder_embed.out_features) if hasattr(model, "decoder_embed") else "-"
    measured = os.environ.get("MAECT_KERNELS", "1") != "0" and dispatch.mode() == "measure" and \
        (os.environ.get("MAECT_MASKING", "auto") or "auto") == "auto"
    return f"encoder {enc}, decoder {dec}" + (" (table; measured at the first call)" if measured else "")


def clear_cache() -> None:
    """Forget the logged choices, the loaded table and this process's dispatch decisions (after rewriting the table
    or the cache, or changing the environment)."""
    _chosen.clear()
    load_table.cache_clear()
    dispatch.clear()


def _topk_backend(query, queue, k, exclude_ids, queue_ids, normalized) -> str:
    default = backend_for(query)
    if default == "ref" and os.environ.get("MAECT_KERNELS", "1") == "0" or torch.compiler.is_compiling():
        return default
    queue_topk.check_inputs(query, queue, k, exclude_ids, queue_ids)     # bad input: its error, before measuring
    key = queue_topk.topk_key(query, queue, k, exclude_ids)
    problem = None
    if dispatch.mode() == "measure":
        def problem():
            p = queue_topk.topk_problem(query, queue, k, exclude_ids, queue_ids, normalized,
                                        queue_topk.impls(query.device.type), key)
            p.not_run = {b: why for b, why in queue_topk.why_not(query.device.type).items() if why is not None}
            return p
    return dispatch.choose(key, problem, default, backends=lambda: queue_topk.why_not(query.device.type)).pick
