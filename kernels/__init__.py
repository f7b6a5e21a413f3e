"""maect kernels: drop-in ops for SSL code (`from maect.kernels import queue_topk, random_masking, unshuffle`).
Importing this package imports nothing else of maect (only maect/__init__.py, which is a few lines).

Public ops (each with its *_ref, the specification, beside it)
    queue_topk(query, queue, k, exclude_ids=None, queue_ids=None, normalized=True) -> (values, indices)
    random_masking(x, mask_ratio, noise=None, generator=None, backend=None) -> (x_visible, mask, ids_restore)
    unshuffle(x_visible, mask_token, ids_restore, backend=None) -> x_full
    masked_patch_embed(imgs, weight, bias, pos_embed, mask_ratio, noise=None, generator=None, backend=None)
        -> (x_visible, mask, ids_restore): patch embedding + position embedding + random_masking, MAE's encoder input
    decoder_input(x, mask_token, ids_restore, pos_embed=None, cls=True, backend=None) -> [N, c+L, D]: MAE's decoder
        input (mask tokens appended, unshuffled, cls re-attached, decoder position embedding added)

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

from . import candidates as _cand
from . import dispatch
from . import masked_embed as _embed
from . import masking as _masking
from . import queue_topk as _queue_topk

__all__ = ["queue_topk", "random_masking", "unshuffle", "masked_patch_embed", "decoder_input", "backend_for", "choose",
           "queue_topk_ref", "random_masking_ref", "unshuffle_ref", "masked_patch_embed_ref", "decoder_input_ref",
           "MASKING_BACKENDS", "mae_backends", "dispatch", "decisions"]

queue_topk_ref = _queue_topk.queue_topk_ref
random_masking_ref = _masking.random_masking_ref
unshuffle_ref = _masking.unshuffle_ref
masked_patch_embed_ref = _embed.masked_patch_embed_ref
decoder_input_ref = _masking.decoder_input_ref

logger = logging.getLogger("maect.kernels")
MASKING_BACKENDS = {"random_masking": ("ref", "cpp", "triton"), "unshuffle": ("ref", "cpp", "triton"),
                    "masked_patch_embed": ("ref", "cpp", "triton", "gather", "fused"),
                    "decoder_input": ("ref", "cpp", "triton", "fused")}
TABLE_PATH = Path(os.environ.get("MAECT_MASKING_TABLE", Path(__file__).resolve().parent / "masking_table.json"))


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:  # a broken triton install must not break the reference path
        return False


def _cpp_available() -> bool:
    try:
        from . import _cpp
    except ImportError:
        return False
    return _cpp.load() is not None


def backend_for(t: Tensor) -> str:
    """queue_topk's default rule (rule 4; in measure mode the first call's measurement decides, see decisions()):
    'triton', 'cpp' or 'ref' for tensors on t's device."""
    if os.environ.get("MAECT_KERNELS", "1") == "0":
        return "ref"
    if t.is_cuda and _triton_available():
        return "triton"
    if t.device.type == "cpu" and _cpp_available():
        return "cpp"
    return "ref"


def _pow2(n: int) -> int:
    return 1 << max(0, (max(1, n) - 1).bit_length())


def shape_class(L: int, D: int) -> str:
    return f"L{_pow2(L)}-D{_pow2(D)}"


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
    if backend == "fused" and op == "decoder_input" and device == "cpu" and _cpp_available():
        return None                     # the compiled one-pass op (else: the Triton kernel, interpreter only)
    if backend == "cpp":
        if device != "cpu":
            return "the compiled ops are CPU ops"
        return None if _cpp_available() else "the csrc extension did not load (its log line says why)"
    if not _triton_available():
        return "triton is not importable"
    if device != "cuda" and not (interpreter and _masking._interpreting()):
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
    args = (op, t.device.type, shape_class(L, D), backend, env, _masking._interpreting())
    if inputs is None or backend is not None or (env != "auto" and env in MASKING_BACKENDS[op]) or \
            torch.compiler.is_compiling():
        return _choose(*args)
    table = _choose(*args, log=False)
    key = _cand.masking_key(op, t, L, D, train)
    problem = None
    if dispatch.mode() == "measure":
        def problem():
            args, shape = _cand.masking_inputs(op, inputs)
            impls = {b: _backend_fn(op, b, t.device.type) for b in MASKING_BACKENDS[op]
                     if b != "ref" and why_not(op, b, t.device.type, interpreter=False) is None}
            p = _cand.masking_problem(op, key, args, impls, _backend_fn(op, "ref", t.device.type), train, shape)
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


def _impl(module, op: str, backend: str):
    """The backend's function for op, or None (-> reference). Triton functions live next to their reference
    (module.<op>_triton); compiled CPU ops live in kernels/_cpp.py (_cpp.<op>)."""
    if backend == "triton":
        return getattr(module, f"{op}_triton", None)
    if backend == "cpp":
        from . import _cpp
        return getattr(_cpp, op, None)
    return None


def _topk_impls(device: str) -> dict:
    """queue_topk's candidates besides the reference on this device (never the Triton interpreter): the torch path
    in the op's contract everywhere, the Triton kernel on CUDA, the compiled op on CPU."""
    impls = {"torch": _cand.queue_topk_torch}
    if device == "cuda" and _triton_available():
        impls["triton"] = _queue_topk.queue_topk_triton
    if device == "cpu" and _cpp_available():
        from . import _cpp
        impls["cpp"] = _cpp.queue_topk
    return impls


def _topk_why_not(device: str) -> dict[str, str | None]:
    """queue_topk's backends -> None where one can run on device, else why not (dispatch.stale's input)."""
    return {"ref": None, "torch": None,
            "triton": ("Triton runs on CUDA (the interpreter is a correctness tool, never timed)" if device != "cuda"
                       else None if _triton_available() else "triton is not importable"),
            "cpp": ("the compiled ops are CPU ops" if device != "cpu" else None if _cpp_available() else
                    "the csrc extension did not load (MAECT_CPP=0, or its log line says why)")}


def _topk_backend(query, queue, k, exclude_ids, queue_ids, normalized) -> str:
    default = backend_for(query)
    if default == "ref" and os.environ.get("MAECT_KERNELS", "1") == "0" or torch.compiler.is_compiling():
        return default
    _queue_topk.check_inputs(query, queue, k, exclude_ids, queue_ids)     # bad input: its error, before measuring
    key = _cand.topk_key(query, queue, k, exclude_ids)
    problem = None
    if dispatch.mode() == "measure":
        def problem():
            p = _cand.topk_problem(query, queue, k, exclude_ids, queue_ids, normalized,
                                   _topk_impls(query.device.type), key)
            p.not_run = {b: why for b, why in _topk_why_not(query.device.type).items() if why is not None}
            return p
    return dispatch.choose(key, problem, default, backends=lambda: _topk_why_not(query.device.type)).pick


def queue_topk(query: Tensor, queue: Tensor, k: int, exclude_ids: Tensor | None = None,
               queue_ids: Tensor | None = None, normalized: bool = True):
    """Top-k cosine neighbours of each query row in the queue; see kernels/queue_topk.py for the contract and
    kernels/dispatch.py for how the backend is chosen. k: any integer operator.index takes (numpy, 0-d tensor)."""
    if queue.dim() == 2:
        k = _queue_topk.as_k(k, queue.shape[0])
    backend = _topk_backend(query, queue, k, exclude_ids, queue_ids, normalized)
    impl = _cand.queue_topk_torch if backend == "torch" else _impl(_queue_topk, "queue_topk", backend)
    if impl is None:
        return _queue_topk.queue_topk_ref(query, queue, k, exclude_ids, queue_ids, normalized)
    return impl(query, queue, k, exclude_ids, queue_ids, normalized)


def _backend_fn(op: str, b: str, device: str):
    """The function that runs backend b of a masking op, with the reference's signature."""
    if op == "random_masking":
        return _impl(_masking, op, b) or _masking.random_masking_ref
    if op == "unshuffle":
        return _impl(_masking, op, b) or _masking.unshuffle_ref
    if op == "masked_patch_embed":
        if b in ("cpp", "triton"):          # MAE's order around the standalone masking op
            masking = _impl(_masking, "random_masking", b)
            return lambda imgs, w, bias, pos, ratio, noise=None, generator=None: _embed.mae_order(
                imgs, w, bias, pos, ratio, noise, generator, masking)
        return {"gather": _embed.masked_patch_embed_gather, "fused": _embed.masked_patch_embed_triton}.get(
            b, _embed.masked_patch_embed_ref)
    if b == "fused":                        # one pass: the compiled op on CPU (when built), else the Triton kernel
        return _impl(_masking, "decoder_input", "cpp" if device == "cpu" and _cpp_available() else "triton")
    if b in ("cpp", "triton"):
        unshuffle_op = _impl(_masking, "unshuffle", b)
        return lambda x, tok, ids, pos=None, cls=True: _decoder_input_standalone(unshuffle_op, x, tok, ids, pos, cls)
    return _masking.decoder_input_ref


def random_masking(x: Tensor, mask_ratio: float, noise: Tensor | None = None, generator=None,
                   backend: str | None = None):
    """MAE per-sample random masking; see kernels/masking.py for the contract."""
    if x.dim() == 3:
        _masking.check_masking(x, mask_ratio, noise)
    b = choose("random_masking", x, x.shape[-2] if x.dim() == 3 else 0, x.shape[-1], backend,
               (x, mask_ratio, noise) if x.dim() == 3 else None, _cand.records_grad(x))
    return _backend_fn("random_masking", b, x.device.type)(x, mask_ratio, noise, generator)


def unshuffle(x: Tensor, mask_token: Tensor, ids_restore: Tensor, backend: str | None = None) -> Tensor:
    """Insert mask tokens and restore the original token order; see kernels/masking.py."""
    ok = x.dim() == 3 and ids_restore.dim() == 2
    if ok:
        _masking.check_unshuffle(x, mask_token, ids_restore)
    b = choose("unshuffle", x, ids_restore.shape[-1], x.shape[-1], backend, (x, mask_token, ids_restore) if ok else None,
               _cand.records_grad(x, mask_token))
    return _backend_fn("unshuffle", b, x.device.type)(x, mask_token, ids_restore)


def masked_patch_embed(imgs: Tensor, weight: Tensor, bias: Tensor | None, pos_embed: Tensor | None,
                       mask_ratio: float, noise: Tensor | None = None, generator=None, backend: str | None = None):
    """MAE's encoder input: patch embedding (weight [D, C, p, p], a Conv2d's) + pos_embed + random masking; see
    kernels/masked_embed.py for the contract and the backends."""
    p = weight.shape[-1]
    L = (imgs.shape[-2] // p) * (imgs.shape[-1] // p) if imgs.dim() == 4 and p else 0
    ok = L > 0
    if ok:                                  # bad input: its error, before anything is measured
        _embed.check_embed(imgs, weight, bias, pos_embed, mask_ratio, noise)
    b = choose("masked_patch_embed", imgs, L, weight.shape[0], backend,
               (imgs, weight, bias, pos_embed, mask_ratio, noise) if ok else None,
               _cand.records_grad(imgs, weight, bias, pos_embed))
    return _backend_fn("masked_patch_embed", b, imgs.device.type)(imgs, weight, bias, pos_embed, mask_ratio, noise,
                                                                  generator)


def _decoder_input_standalone(unshuffle_op, x, mask_token, ids_restore, pos_embed, cls):
    """MAE's structure around a standalone unshuffle op: cat the cls token back, add the positions. x is promoted
    first, so the mask token is not rounded to x's dtype (as in MAE's torch.cat): equal to the reference."""
    _masking.check_decoder_input(x, mask_token, ids_restore, pos_embed, cls)
    c = int(cls)
    x = x.to(_masking.decoder_input_dtype(x, mask_token, pos_embed))
    out = torch.cat([x[:, :c], unshuffle_op(x[:, c:], mask_token, ids_restore)], dim=1)
    return out if pos_embed is None else out + pos_embed.reshape(1, out.shape[1], out.shape[2])


def decoder_input(x: Tensor, mask_token: Tensor, ids_restore: Tensor, pos_embed: Tensor | None = None,
                  cls: bool = True, backend: str | None = None) -> Tensor:
    """MAE's decoder input in one pass; see kernels/masking.py for the contract."""
    ok = x.dim() == 3 and ids_restore.dim() == 2
    if ok:
        _masking.check_decoder_input(x, mask_token, ids_restore, pos_embed, cls)
    b = choose("decoder_input", x, ids_restore.shape[-1], x.shape[-1], backend,
               (x, mask_token, ids_restore, pos_embed, cls) if ok else None,
               _cand.records_grad(x, mask_token, pos_embed))
    return _backend_fn("decoder_input", b, x.device.type)(x, mask_token, ids_restore, pos_embed, cls)
