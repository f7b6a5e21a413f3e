"""Helpers shared by the ops in kernels/ops/ (each defined once, here).

next_pow2(n)        the smallest power of two >= max(1, n)
interpreting()      TRITON_INTERPRET=1: Triton kernels run in the interpreter (CPU tensors)
triton, tl          the triton modules, or None on a pure-PyTorch install (the launchers then raise)
jit, device_fn      triton.jit where triton is importable (else the function itself); device_fn is plain Python
                    under the interpreter, which re-patches triton.language on every jit-to-jit call (~5 ms, more
                    than the arithmetic the device helpers do); decided when this module is imported
on(device)          launch on the data's GPU (Triton launches on the current device); a no-op elsewhere
dtype_name(dt)      'fp32' / 'bf16' / 'fp16' / 'fp64' (else torch's name without 'torch.')
U                   fp32 unit roundoff, 2^-24
triton_available(), cpp_available()
"""
from __future__ import annotations

import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pure-PyTorch install: the references work, the Triton launchers raise
    triton = tl = None

U = 2.0 ** -24


def next_pow2(n: int) -> int:
    return 1 << max(0, (max(1, n) - 1).bit_length())


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def jit(fn=None, **kwargs):
    """triton.jit (with its keyword arguments), or the function itself without triton."""
    if fn is None:
        return lambda f: jit(f, **kwargs)
    return triton.jit(**kwargs)(fn) if triton is not None else fn


device_fn = jit if not interpreting() else (lambda fn: fn)


def on(device: torch.device):
    """Launch on the data's GPU (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def dtype_name(dt: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}.get(
        dt, str(dt).replace("torch.", ""))


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:  # a broken triton install must not break the reference path
        return False


def cpp_available() -> bool:
    try:
        from . import _cpp
    except ImportError:
        return False
    return _cpp.load() is not None
