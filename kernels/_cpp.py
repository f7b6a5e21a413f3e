"""Compiled CPU ops (csrc/) as torch custom ops: loader, fake kernels, autograd, and the public wrappers.

load() -> the extension module or None (memoised; thread-safe)
    MAECT_CPP=0                      -> None (disabled on purpose)
    maect.kernels._maect_C importable      -> that module (ahead-of-time: MAECT_BUILD_EXT=1 pip install
                                        --no-build-isolation -e .), unless csrc/ is newer than it
    otherwise                        -> just-in-time build with torch.utils.cpp_extension.load, cached in the default
                                        torch extensions dir (~/.cache/torch_extensions/<py>_<cuda>/maect_cpu_avx2_
                                        <hash>, or under TORCH_EXTENSIONS_DIR), keyed by a hash of csrc/ and the
                                        flags: the first build takes ~1 min, later loads are instant
    any failure                      -> one log line on logging.getLogger("maect.kernels") saying why, and None
The flags are -O3 -fopenmp, plus -mavx2 -mfma only when ATen reports an AVX2-capable CPU (the extension name
records the choice and the hash, so builds for different CPUs or sources never share a cache entry).

Ops (schemas in csrc/ops.cpp; contracts in kernels/queue_topk.py and kernels/masking.py)
    torch.ops.maect.queue_topk(query, queue, k, exclude_ids, queue_ids, normalized) -> (values, indices)
    torch.ops.maect.random_masking(x, noise, len_keep) -> (x_visible, mask, ids_restore)
    torch.ops.maect.unshuffle(x, mask_token, ids_restore) -> out
    torch.ops.maect.unshuffle_backward(grad_out, ids_restore, len_keep) -> (grad_x, grad_mask_token)
    torch.ops.maect.decoder_input(x, mask_token, ids_restore, pos_embed, has_cls) -> out
    torch.ops.maect.decoder_input_backward(grad_out, ids_restore, len_keep, has_cls) -> (grad_x, grad_mask_token)
Fake kernels make them traceable by torch.compile; autograd: random_masking, unshuffle and decoder_input (exact
copies / one rounded add, as the references), queue_topk's values (recomputed for the k selected pairs only).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .masking import check_decoder_input, check_masking, check_unshuffle, decoder_input_dtype
from .queue_topk import check_inputs

__all__ = ["load", "queue_topk", "random_masking", "unshuffle", "decoder_input"]

logger = logging.getLogger("maect.kernels")
# C++ sources: csrc/ beside kernels/ in a source checkout; maect/_csrc (package data) in an installed wheel
_CSRC = next((p for p in (Path(__file__).resolve().parent.parent / d for d in ("csrc", "_csrc")) if p.is_dir()),
             Path(__file__).resolve().parent.parent / "csrc")
_UNSET = object()
_loaded = _UNSET
_lock = threading.Lock()
STALE_LOCK_S = 600  # a build lock older than this is left over from a killed build


def _build_flags() -> tuple[str, list[str]]:
    """Extension name and compiler flags. AVX2/FMA only where ATen itself would run AVX2 code (never -march=native:
    the cached binary must not use instructions another CPU lacks)."""
    simd = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    flags = ["-O3", "-fopenmp"] + (["-mavx2", "-mfma"] if simd else [])
    return ("maect_cpu_avx2" if simd else "maect_cpu"), flags


def _aot_module():
    """maect.kernels._maect_C if it was built ahead of time and is not older than csrc/, else None. Staleness is checked
    before importing: a second library registering the maect namespace (the JIT build) would be refused."""
    spec = importlib.util.find_spec(f"{__package__}._maect_C")
    if spec is None or spec.origin is None:
        return None
    sources = list(_CSRC.glob("*.cpp")) + list(_CSRC.glob("*.h"))
    if sources and max(p.stat().st_mtime for p in sources) > Path(spec.origin).stat().st_mtime:
        logger.info("maect: %s is older than csrc/; using the just-in-time build instead", spec.origin)
        return None
    return importlib.import_module(spec.name)


def _jit_module():
    # Imported lazily (it probes for compilers and CUDA); its import-time "No CUDA runtime is found" warning is
    # irrelevant to a CPU-only build, so that logger is quietened for the import only.
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        quiet.setLevel(level)

    sources = sorted(_CSRC.glob("*.cpp"))
    if not sources:
        raise FileNotFoundError(f"no C++ sources in {_CSRC}")
    name, flags = _build_flags()
    # The cache entry is keyed by the sources' content and the flags: two checkouts with different csrc/ never
    # load (or rebuild over) each other's binary, and an unchanged tree loads instantly.
    digest = hashlib.sha1(" ".join(flags).encode())
    for path in sources + sorted(_CSRC.glob("*.h")):
        digest.update(path.name.encode() + path.read_bytes())
    name = f"{name}_{digest.hexdigest()[:10]}"
    build_dir = cpp_extension._get_build_directory(name, verbose=False)  # <root>/py311_cu130/<name>, as load() uses
    so = os.path.join(build_dir, f"{name}.so")
    if os.path.exists(so):  # built before: import it directly (no build lock, no ninja check)
        try:
            spec = importlib.util.spec_from_file_location(name, so)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod
        except ImportError as exc:  # e.g. a half-written file from a killed link step: rebuild below
            logger.warning("maect: cached C++ ops %s do not import (%s); rebuilding", so, exc)
    lock = os.path.join(build_dir, "lock")
    if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > STALE_LOCK_S:
        # torch's build lock is a plain file: a build killed half-way leaves it behind and every later load would
        # wait on it forever. No build of these sources takes anywhere near STALE_LOCK_S.
        logger.warning("maect: removing a stale C++ build lock %s (%.0f min old)", lock,
                       (time.time() - os.path.getmtime(lock)) / 60)
        os.remove(lock)
    logger.info("maect: loading C++ CPU ops %s (built just in time on first use, ~1 min; cached under %s)", name,
                cpp_extension.get_default_build_root())
    return cpp_extension.load(name=name, sources=[str(p) for p in sources], extra_cflags=flags,
                              extra_ldflags=["-fopenmp"], is_python_module=True,
                              verbose=os.environ.get("MAECT_CPP_VERBOSE") == "1")


def load():
    """The loaded extension module, or None (then every CPU op uses its reference). See the module docstring."""
    global _loaded
    if _loaded is not _UNSET:
        return _loaded
    with _lock:
        if _loaded is _UNSET:
            _loaded = _load_once()
    return _loaded


def _load_once():
    if os.environ.get("MAECT_CPP", "1") == "0":
        logger.info("maect: C++ CPU ops disabled (MAECT_CPP=0); CPU ops use the reference")
        return None
    try:
        mod = _aot_module() or _jit_module()
        if not hasattr(torch.ops.maect, "queue_topk"):
            raise RuntimeError(f"{mod!r} loaded but registered no torch.ops.maect ops")
        _register_python_side()
        return mod
    except Exception as exc:  # any failure (no compiler, no ninja, build error) -> reference, with one line why
        lines = str(exc).strip().splitlines() or [""]
        why = next((ln for ln in lines if "error" in ln.lower() and ln is not lines[0]), "")  # a compiler error line
        why = (lines[0][:120] + (" ... " + why.strip()[:300] if why else "")).strip()
        logger.warning("maect: C++ CPU ops unavailable (%s: %s); CPU ops use the reference (MAECT_CPP_VERBOSE=1 "
                       "shows the build log)", type(exc).__name__, why)
        return None


# ---------------------------------------------------------------------------------------------------------------
# Fake kernels (shapes and dtypes only) and autograd formulas, registered once after the library loads.

def _register_python_side() -> None:
    lib = "maect::"

    @torch.library.register_fake(lib + "queue_topk")
    def _(query, queue, k, exclude_ids, queue_ids, normalized):
        B = query.shape[0]
        return query.new_empty(B, k, dtype=torch.float32), query.new_empty(B, k, dtype=torch.long)

    @torch.library.register_fake(lib + "random_masking")
    def _(x, noise, len_keep):
        N, L, D = x.shape
        return x.new_empty(N, len_keep, D), x.new_empty(N, L), x.new_empty(N, L, dtype=torch.long)

    @torch.library.register_fake(lib + "unshuffle")
    def _(x, mask_token, ids_restore):
        return x.new_empty(x.shape[0], ids_restore.shape[1], x.shape[2])

    @torch.library.register_fake(lib + "unshuffle_backward")
    def _(grad_out, ids_restore, len_keep):
        N, _, D = grad_out.shape
        return grad_out.new_empty(N, len_keep, D), grad_out.new_empty(D)

    @torch.library.register_fake(lib + "decoder_input")
    def _(x, mask_token, ids_restore, pos_embed, has_cls):
        N, L = ids_restore.shape
        return x.new_empty(N, int(has_cls) + L, x.shape[2], dtype=decoder_input_dtype(x, mask_token, pos_embed))

    @torch.library.register_fake(lib + "decoder_input_backward")
    def _(grad_out, ids_restore, len_keep, has_cls):
        N, _, D = grad_out.shape
        return grad_out.new_empty(N, int(has_cls) + len_keep, D), grad_out.new_empty(D)

    torch.library.register_autograd(lib + "queue_topk", _queue_topk_backward, setup_context=_queue_topk_setup)
    torch.library.register_autograd(lib + "random_masking", _masking_backward, setup_context=_masking_setup)
    torch.library.register_autograd(lib + "unshuffle", _unshuffle_backward, setup_context=_unshuffle_setup)
    torch.library.register_autograd(lib + "decoder_input", _decoder_input_backward,
                                    setup_context=_decoder_input_setup)


def _queue_topk_setup(ctx, inputs, output):
    query, queue, _, _, _, normalized = inputs
    ctx.normalized = normalized
    ctx.save_for_backward(query, queue, output[1])
    ctx.mark_non_differentiable(output[1])


def _queue_topk_backward(ctx, grad_values, _grad_indices):
    """values[b, i] = <q_b, e_idx[b,i]> (normalised as in the forward); recomputed for the B*k selected pairs only
    ([B, k, D] gathered rows) and differentiated; padded entries (index -1) get no gradient, as in the reference."""
    query, queue, indices = ctx.saved_tensors
    with torch.enable_grad():
        q = query.detach().requires_grad_(ctx.needs_input_grad[0])
        e = queue.detach().requires_grad_(ctx.needs_input_grad[1])
        qf, ef = q.float(), e.float()
        if not ctx.normalized:
            qf, ef = F.normalize(qf, dim=1, eps=1e-12), F.normalize(ef, dim=1, eps=1e-12)
        values = (qf.unsqueeze(1) * ef[indices.clamp_min(0)]).sum(-1)
        wanted = [t for t in (q, e) if t.requires_grad]
        grads = iter(torch.autograd.grad(values, wanted, grad_values * (indices >= 0)))
    return tuple(next(grads) if t.requires_grad else None for t in (q, e)) + (None, None, None, None)


def _masking_setup(ctx, inputs, output):
    _, mask, ids_restore = output
    ctx.save_for_backward(ids_restore)
    ctx.mark_non_differentiable(mask, ids_restore)


def _masking_backward(ctx, grad_visible, _grad_mask, _grad_ids):
    """d x_visible / d x: put each visible token's gradient back at its position, zeros at masked positions."""
    (ids_restore,) = ctx.saved_tensors
    if grad_visible is None or not ctx.needs_input_grad[0]:
        return None, None, None
    zeros = grad_visible.new_zeros(grad_visible.shape[2])
    return torch.ops.maect.unshuffle(grad_visible, zeros, ids_restore), None, None


def _unshuffle_setup(ctx, inputs, output):
    x, mask_token, ids_restore = inputs
    ctx.len_keep = x.shape[1]
    ctx.token_shape, ctx.token_dtype = mask_token.shape, mask_token.dtype
    ctx.save_for_backward(ids_restore)


def _unshuffle_backward(ctx, grad_out):
    (ids_restore,) = ctx.saved_tensors
    grad_x, grad_token = torch.ops.maect.unshuffle_backward(grad_out, ids_restore, ctx.len_keep)
    grad_token = grad_token.to(ctx.token_dtype).reshape(ctx.token_shape)
    return (grad_x if ctx.needs_input_grad[0] else None, grad_token if ctx.needs_input_grad[1] else None, None)


def _decoder_input_setup(ctx, inputs, output):
    x, mask_token, ids_restore, pos_embed, has_cls = inputs
    ctx.has_cls, ctx.len_keep, ctx.x_dtype = has_cls, x.shape[1] - int(has_cls), x.dtype
    ctx.token_shape, ctx.token_dtype = mask_token.shape, mask_token.dtype
    ctx.pos_meta = None if pos_embed is None else (pos_embed.shape, pos_embed.dtype)
    ctx.save_for_backward(ids_restore)


def _decoder_input_backward(ctx, grad_out):
    """grad_x: the scatter (cast once to x's dtype, as the reference's cast backward); grad_mask_token: the masked
    rows' sum; grad_pos_embed (when it requires grad): grad_out summed over the batch."""
    (ids_restore,) = ctx.saved_tensors
    need_x, need_tok, _, need_pos, _ = ctx.needs_input_grad
    grad_x, grad_token = torch.ops.maect.decoder_input_backward(grad_out, ids_restore, ctx.len_keep, ctx.has_cls)
    grad_pos = grad_out.sum(0).to(ctx.pos_meta[1]).reshape(ctx.pos_meta[0]) if need_pos else None
    return (grad_x.to(ctx.x_dtype) if need_x else None,
            grad_token.to(ctx.token_dtype).reshape(ctx.token_shape) if need_tok else None, None, grad_pos, None)


# ---------------------------------------------------------------------------------------------------------------
# Public wrappers: the references' validation, then the compiled op (same signatures as the references).

def queue_topk(query: Tensor, queue: Tensor, k: int, exclude_ids: Tensor | None = None,
               queue_ids: Tensor | None = None, normalized: bool = True) -> tuple[Tensor, Tensor]:
    """Compiled queue_topk (contract: kernels/queue_topk.py). Requires load() to have succeeded."""
    check_inputs(query, queue, k, exclude_ids, queue_ids)
    return torch.ops.maect.queue_topk(query, queue, k, exclude_ids, queue_ids, normalized)


def random_masking(x: Tensor, mask_ratio: float, noise: Tensor | None = None,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Compiled random_masking (contract: kernels/masking.py); the noise is drawn exactly as the reference draws it."""
    len_keep = check_masking(x, mask_ratio, noise)
    if noise is None:
        noise = torch.rand(x.shape[0], x.shape[1], device=x.device, generator=generator)
    return torch.ops.maect.random_masking(x, noise, len_keep)


def unshuffle(x: Tensor, mask_token: Tensor, ids_restore: Tensor) -> Tensor:
    """Compiled unshuffle (contract: kernels/masking.py)."""
    check_unshuffle(x, mask_token, ids_restore)
    return torch.ops.maect.unshuffle(x, mask_token, ids_restore)


def decoder_input(x: Tensor, mask_token: Tensor, ids_restore: Tensor, pos_embed: Tensor | None = None,
                  cls: bool = True) -> Tensor:
    """Compiled decoder_input (contract: kernels/masking.py)."""
    check_decoder_input(x, mask_token, ids_restore, pos_embed, cls)
    return torch.ops.maect.decoder_input(x, mask_token, ids_restore, pos_embed, bool(cls))
