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

The one dispatch rule, choose(op, tensor, L, D, backend):
    1. MAECT_KERNELS=0                                                        -> "ref" for every op
    2. asked by name: the backend= argument, else MAECT_MASKING=<name> (masking ops that have that backend; 'auto'
       or unset: no request)                                                  -> it, or a ValueError saying why not
    3. masking ops: the measured table kernels/masking_table.json (MAECT_MASKING_TABLE overrides the path), entry
       "<device>|<op>|L<l>-D<d>" (l, d: the next powers of two of the token count L and the width D), else
       "<device>|<op>|*"                             -> its pick if it can run here (not via the interpreter), else "ref"
    4. queue_topk, and a masking op without any entry (backend_for): CUDA tensor and Triton importable -> "triton";
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

from . import masked_embed as _embed
from . import masking as _masking
from . import queue_topk as _queue_topk

__all__ = ["queue_topk", "random_masking", "unshuffle", "masked_patch_embed", "decoder_input", "backend_for", "choose",
           "queue_topk_ref", "random_masking_ref", "unshuffle_ref", "masked_patch_embed_ref", "decoder_input_ref",
           "MASKING_BACKENDS", "mae_backends"]

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
    """Rule 4 (queue_topk's dispatch): 'triton', 'cpp' or 'ref' for tensors on t's device."""
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
def _choose(op: str, device: str, cls: str, asked: str | None, env: str, interpreting: bool) -> str:
    key = (op, device, cls, asked, env, interpreting)
    if key not in _chosen:
        name, why = _resolve(op, device, cls, asked, env)
        logger.info("maect: %s on %s (%s): backend '%s' (%s)", op, device, cls, name, why)
        _chosen[key] = name
    return _chosen[key]


def choose(op: str, t: Tensor, L: int, D: int, backend: str | None = None) -> str:
    """The backend that runs `op` for tensors on t's device with L tokens of width D (rules 1-3 above)."""
    if os.environ.get("MAECT_KERNELS", "1") == "0":
        return "ref"
    return _choose(op, t.device.type, shape_class(L, D), backend, os.environ.get("MAECT_MASKING", "auto") or "auto",
                   _masking._interpreting())


def mae_backends(model, device) -> str:
    """'encoder <backend>, decoder <backend>' for an MAE model (maect.models.vit or the same attribute names) on
    device: what its forward_encoder / forward_decoder run (for log lines)."""
    t, L = torch.empty(0, device=device), model.patch_embed.num_patches
    enc = choose("masked_patch_embed", t, L, model.patch_embed.proj.out_channels)
    dec = choose("decoder_input", t, L, model.decoder_embed.out_features) if hasattr(model, "decoder_embed") else "-"
    return f"encoder {enc}, decoder {dec}"


def clear_cache() -> None:
    """Forget the logged choices and the loaded table (after rewriting the table or changing the environment)."""
    _chosen.clear()
    load_table.cache_clear()


def _impl(module, op: str, backend: str):
    """The backend's function for op, or None (-> reference). Triton functions live next to their reference
    (module.<op>_triton); compiled CPU ops live in kernels/_cpp.py (_cpp.<op>)."""
    if backend == "triton":
        return getattr(module, f"{op}_triton", None)
    if backend == "cpp":
        from . import _cpp
        return getattr(_cpp, op, None)
    return None


def queue_topk(query: Tensor, queue: Tensor, k: int, exclude_ids: Tensor | None = None,
               queue_ids: Tensor | None = None, normalized: bool = True):
    """Top-k cosine neighbours of each query row in the queue; see kernels/queue_topk.py for the contract."""
    backend = backend_for(query)
    impl = _impl(_queue_topk, "queue_topk", backend)
    if impl is None:
        return _queue_topk.queue_topk_ref(query, queue, k, exclude_ids, queue_ids, normalized)
    return impl(query, queue, k, exclude_ids, queue_ids, normalized)


def random_masking(x: Tensor, mask_ratio: float, noise: Tensor | None = None, generator=None,
                   backend: str | None = None):
    """MAE per-sample random masking; see kernels/masking.py for the contract."""
    impl = _impl(_masking, "random_masking", choose("random_masking", x, x.shape[-2] if x.dim() == 3 else 0,
                                                    x.shape[-1], backend))
    return (impl or _masking.random_masking_ref)(x, mask_ratio, noise, generator)


def unshuffle(x: Tensor, mask_token: Tensor, ids_restore: Tensor, backend: str | None = None) -> Tensor:
    """Insert mask tokens and restore the original token order; see kernels/masking.py."""
    impl = _impl(_masking, "unshuffle", choose("unshuffle", x, ids_restore.shape[-1], x.shape[-1], backend))
    return (impl or _masking.unshuffle_ref)(x, mask_token, ids_restore)


def masked_patch_embed(imgs: Tensor, weight: Tensor, bias: Tensor | None, pos_embed: Tensor | None,
                       mask_ratio: float, noise: Tensor | None = None, generator=None, backend: str | None = None):
    """MAE's encoder input: patch embedding (weight [D, C, p, p], a Conv2d's) + pos_embed + random masking; see
    kernels/masked_embed.py for the contract and the backends."""
    p = weight.shape[-1]
    L = (imgs.shape[-2] // p) * (imgs.shape[-1] // p) if imgs.dim() == 4 and p else 0
    b = choose("masked_patch_embed", imgs, L, weight.shape[0], backend)
    if b in ("cpp", "triton"):          # MAE's order around the standalone masking op
        return _embed.mae_order(imgs, weight, bias, pos_embed, mask_ratio, noise, generator,
                                _impl(_masking, "random_masking", b))
    fn = {"gather": _embed.masked_patch_embed_gather, "fused": _embed.masked_patch_embed_triton}.get(
        b, _embed.masked_patch_embed_ref)
    return fn(imgs, weight, bias, pos_embed, mask_ratio, noise, generator)


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
    b = choose("decoder_input", x, ids_restore.shape[-1], x.shape[-1], backend)
    if b == "fused":                    # one pass: the compiled op on CPU (when built), else the Triton kernel
        fn = _impl(_masking, "decoder_input", "cpp" if x.device.type == "cpu" and _cpp_available() else "triton")
        return fn(x, mask_token, ids_restore, pos_embed, cls)
    if b in ("cpp", "triton"):
        return _decoder_input_standalone(_impl(_masking, "unshuffle", b), x, mask_token, ids_restore, pos_embed, cls)
    return _masking.decoder_input_ref(x, mask_token, ids_restore, pos_embed, cls)
