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
triton_available(), cpp_available(), cpp_why, triton_why   (the last two: dispatch's Backend.why_not)
The masking ops' shared decision parts (kernels/dispatch.py): masking_meta / masking_key (dtype under autocast,
next powers of two of tokens and width, forward or forward + backward), exact (their verification: every output
equal to the reference's), measurement_rows / clone / private_noise (their measurement inputs).
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


def cpp_why(device: torch.device, meta: tuple = ()) -> str | None:
    """None where the compiled CPU ops run on device, else why not."""
    if device.type != "cpu":
        return "the compiled ops are CPU ops"
    return None if cpp_available() else "the csrc extension did not load (its log line says why)"


def triton_why(device: torch.device, meta: tuple = ()) -> str | None:
    """None where a Triton kernel runs on device (CUDA; on CPU the interpreter, TRITON_INTERPRET=1), else why not."""
    if not triton_available():
        return "triton is not importable"
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return None
    return f"the Triton kernels run on CUDA (on {device.type} only in the interpreter: TRITON_INTERPRET=1)"


# ------------------------------------------------------------------------------------------ the masking ops
MEASUREMENT_ROWS = {"cpu": 32, "cuda": 1 << 16}


def records_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def masking_meta(t: torch.Tensor, L: int, D: int, train: bool) -> tuple:
    """(dtype the op computes in: autocast's where autocast is on for t's device, next_pow2(L), next_pow2(D),
    train)."""
    from .dispatch import concrete
    dev = t.device.type
    dt = t.dtype
    if torch.is_autocast_enabled(dev) and dt in (torch.float32, torch.bfloat16, torch.float16):
        dt = torch.get_autocast_dtype(dev)
    return dtype_name(dt), next_pow2(concrete(L)), next_pow2(concrete(D)), bool(train)


def masking_key(meta: tuple) -> str:
    dt, L, D, train = meta
    return f"{dt}|L{L}-D{D}-{'fwd+bwd' if train else 'fwd'}"


def exact(names, out, ref) -> str | None:
    """The first sample where any output differs from the reference's (every output exact; NaN equals NaN)."""
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    for name, a, b in zip(names, outs, refs):
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{name}: shape/dtype {tuple(a.shape)} {a.dtype}, expected {tuple(b.shape)} {b.dtype}"
        neq = (a != b) & ~(torch.isnan(a) & torch.isnan(b)) if a.dtype.is_floating_point else a != b
        if neq.any():
            n = int(neq.reshape(a.shape[0], -1).any(1).nonzero()[0, 0])
            return f"sample {n}: {name} differs from the reference's ({int(neq[n].sum())} entries)"
    return None


def measurement_rows(t: torch.Tensor) -> int:
    return min(t.shape[0], MEASUREMENT_ROWS["cuda" if t.device.type == "cuda" else "cpu"])


def clone(t: torch.Tensor | None, n: int | None = None) -> torch.Tensor | None:
    """A detached copy (its first n rows when n is given) that records gradients where t does."""
    if t is None:
        return None
    c = (t[:n] if n is not None else t).detach().clone()
    return c.requires_grad_(t.requires_grad and t.dtype.is_floating_point)


def private_noise(N: int, L: int, device) -> torch.Tensor:
    """Masking noise from a private generator: measuring never advances the global RNG."""
    g = torch.Generator(device=device).manual_seed(0)
    return torch.rand(N, L, device=device, generator=g)
