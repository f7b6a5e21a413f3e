"""What kernels/dispatch.py measures for the masking ops (random_masking, unshuffle, decoder_input,
masked_patch_embed), shared by the four: the dispatch key, the measurement inputs (a bounded slice of the call's
own) and the Problem. Each op's file holds its own part: measure_inputs(args) (which inputs, cloned how) and
verify(args, out, ref) (the rule that compares a candidate with the reference).

    candidates: the backends of the op's BACKENDS that can run here without the Triton interpreter (why_not)
    torch path: 'ref', MAE's own code
    inputs: the call's first ROWS_MASKING[device] samples, fresh noise from a private generator (the global RNG
    is not advanced: measure and table runs draw the same masks); timed forward + backward when the call records
    gradients (on detached copies of the inputs), forward only otherwise
    rule: mask and ids_restore exactly equal; tokens exactly equal (they are copies, and decoder_input's single
    rounded add is exact), except masked_patch_embed's, within embed_error_bound (kernels/ops/masked_patch_embed.py)
"""
from __future__ import annotations

import importlib

import torch
from torch import Tensor

from .. import dispatch as _d
from .._util import dtype_name

ROWS_MASKING = {"cpu": 32, "cuda": 1 << 16}


def _op(op: str):
    return importlib.import_module(f"{__package__}.{op}")


def masking_dtype(t: Tensor) -> str:
    """The dtype an op computes in: the autocast dtype where autocast is on for t's device, else t's."""
    dev = t.device.type
    if torch.is_autocast_enabled(dev) and t.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return dtype_name(torch.get_autocast_dtype(dev))
    return dtype_name(t.dtype)


def masking_key(op: str, t: Tensor, L: int, D: int, train: bool) -> str:
    from .._route import shape_class
    return _d.make_key(t.device, op, masking_dtype(t), f"{shape_class(L, D)}-{'fwd+bwd' if train else 'fwd'}")


def clone(t: Tensor | None, n: int | None = None) -> Tensor | None:
    """A detached copy (its first n rows when n is given) that records gradients where t does."""
    if t is None:
        return None
    c = (t[:n] if n is not None else t).detach().clone()
    return c.requires_grad_(t.requires_grad and t.dtype.is_floating_point)


def _grad_run(fn, grad: bool):
    """fn's forward, plus the backward of its first output's sum when training (what a step times)."""
    def run():
        out = fn()
        first = out[0] if isinstance(out, tuple) else out
        if grad and first.requires_grad:
            first.float().sum().backward()
        return out
    return run


def exact(names, out, ref) -> str | None:
    """The first sample where any output differs from the reference's (every output exact)."""
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


def noise(N: int, L: int, device) -> Tensor:
    g = torch.Generator(device=device).manual_seed(0)       # private: the global RNG is not advanced
    return torch.rand(N, L, device=device, generator=g)


def masking_problem(op: str, key: str, args: tuple, impls: dict, ref_fn, train: bool, shape: str = "") -> _d.Problem:
    """args: the measurement inputs in the op's signature order (masking_inputs: a slice of the call's, cloned);
    impls: {backend name: function with the reference's signature}, the reference excluded. The rule: the op's
    verify(args, out, ref)."""
    first = args[0]
    op_verify = _op(op).verify

    def verify(out, ref):
        return op_verify(args, out, ref)

    def cand(name, fn):
        return _d.Candidate(name, run=lambda: _fwd(fn), timed=_grad_run(lambda: fn(*args), train))

    def _fwd(fn):
        with torch.no_grad():
            return fn(*args)

    return _d.Problem(op=op, key=key, device=first.device, reference=cand("ref", ref_fn),
                      candidates=[cand(n, f) for n, f in impls.items()], verify=verify,
                      shape=f"{shape} ({'forward + backward' if train else 'forward'})".strip())


def masking_inputs(op: str, args: tuple) -> tuple[tuple, str]:
    """The measurement inputs for a call with `args` (the op's signature order): its first rows_for samples,
    detached copies that record gradients where the originals do, and explicit noise (the call's slice, else a
    private draw) so that every backend masks the same patches. Returns (inputs, a shape string for log lines);
    each op's measure_inputs says which."""
    return _op(op).measure_inputs(args)


def rows_for(t: Tensor) -> int:
    return min(t.shape[0], ROWS_MASKING["cuda" if t.device.type == "cuda" else "cpu"])


def records_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)
