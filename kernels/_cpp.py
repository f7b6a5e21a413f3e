"""The compiled CPU ops (csrc/) as torch custom ops: the shared extension loader (wrappers: kernels/ops/<op>.py).

load() -> the extension module or None (memoised; thread-safe)
    a just-in-time build with torch.utils.cpp_extension.load, cached in the default torch extensions dir
    (~/.cache/torch_extensions/<py>_<cuda>/maect_cpu_avx2_<hash>, or under TORCH_EXTENSIONS_DIR), keyed by a hash of
    csrc/ and the flags: the first build takes ~1 min, later loads import the cached .so directly
    any failure -> one log line on logging.getLogger("maect.kernels") saying why, and None (the torch paths run)
Building ahead of time (a cluster whose compute nodes have no compiler, or a job that should not spend its first
minute compiling): on a login node, in the same environment and with the same TORCH_EXTENSIONS_DIR as the jobs,
    python -c "from maect.kernels import _cpp; assert _cpp.load() is not None"
builds and caches it; the jobs then load it. The cache entry is named by the CPU's SIMD level, so build on a node
whose CPU has the compute nodes' level (AVX2 or not).
The flags are -O3 -fopenmp, plus -mavx2 -mfma only when ATen reports an AVX2-capable CPU (the extension name
records the choice and the hash, so builds for different CPUs or sources never share a cache entry).

Ops (schemas in csrc/ops.cpp; contracts, Python wrappers (<op>_cpp), fake kernels and autograd formulas in
kernels/ops/<op>.py)
    torch.ops.maect.queue_topk(query, queue, k, exclude_ids, queue_ids, normalized) -> (values, indices)
    torch.ops.maect.random_masking(x, noise, len_keep) -> (x_visible, mask, ids_restore)
    torch.ops.maect.unshuffle(x, mask_token, ids_restore) -> out
    torch.ops.maect.unshuffle_backward(grad_out, ids_restore, len_keep) -> (grad_x, grad_mask_token)
    torch.ops.maect.decoder_input(x, mask_token, ids_restore, pos_embed, has_cls) -> out
    torch.ops.maect.decoder_input_backward(grad_out, ids_restore, len_keep, has_cls) -> (grad_x, grad_mask_token)
Fake kernels make them traceable by torch.compile; autograd: random_masking, unshuffle and decoder_input (exact
copies / one rounded add, as the references), queue_topk's values (recomputed for the k selected pairs only). Each
op's file registers its own (register_cpp), called once here after the library loads.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import threading
import time
from pathlib import Path

import torch

__all__ = ["load"]

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
                              verbose=logger.isEnabledFor(logging.DEBUG))


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
    try:
        mod = _jit_module()
        if not hasattr(torch.ops.maect, "queue_topk"):
            raise RuntimeError(f"{mod!r} loaded but registered no torch.ops.maect ops")
        _register_python_side()
        return mod
    except Exception as exc:  # any failure (no compiler, no ninja, build error) -> reference, with one line why
        lines = str(exc).strip().splitlines() or [""]
        why = next((ln for ln in lines if "error" in ln.lower() and ln is not lines[0]), "")  # a compiler error line
        why = (lines[0][:120] + (" ... " + why.strip()[:300] if why else "")).strip()
        logger.warning("maect: C++ CPU ops unavailable (%s: %s); CPU ops use the reference (logging "
                       "level DEBUG on maect.kernels shows the build log)", type(exc).__name__, why)
        return None


def _register_python_side() -> None:
    """Fake kernels (shapes and dtypes only) and autograd formulas, registered once after the library loads: each
    op's file holds its own."""
    from .ops import decoder_input, queue_topk, random_masking, unshuffle
    for op in (queue_topk, random_masking, unshuffle, decoder_input):
        op.register_cpp()
