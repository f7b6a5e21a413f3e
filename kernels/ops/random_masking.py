"""random_masking: MAE's per-sample random masking.

random_masking(x[N, L, D], mask_ratio, noise[N, L] | None, generator=None)
    -> (x_visible[N, K, D], mask[N, L], ids_restore[N, L])
    K = int(L * (1 - mask_ratio)) (truncation, as official MAE's len_keep). Per sample, the K positions with the
    smallest noise are kept, in ascending noise order (MAE's exact semantics: ids_shuffle = argsort(noise); keep
    ids_shuffle[:, :K]). Ties in noise: the lower position ranks first (stable sort). mask: 0 keep, 1 remove, in
    the original order, dtype of x. ids_restore: int64, the inverse permutation of ids_shuffle. Without noise,
    noise = torch.rand(N, L, generator=generator) on x's device, as the reference draws it.
Differentiable in x. K == 0 (mask_ratio 1.0) and K == L (mask_ratio 0.0) are defined.

This file holds the op's contract, input checks (check_masking, and check_ratio, which masked_patch_embed shares),
reference (random_masking_ref), Triton kernel (_random_masking_fwd_kernel, with the rank device function
_stable_rank that kernels/ops/masked_patch_embed.py imports) and launcher, the compiled CPU op's wrapper
(random_masking_cpp; csrc/masking.cpp), its measurement pieces, backends and public function. The backward (an
unshuffle with a zero token) runs the unshuffle kernel of kernels/ops/unshuffle.py (imported from there), or
torch.ops.maect.unshuffle for the compiled op. The Triton algorithm: kernels/ops/unshuffle.py's kernel section.

Backends (BACKENDS): ref (MAE's torch code: argsort + gather), cpp (the compiled CPU op), triton (the Triton kernel,
CUDA). Which one runs: kernels/dispatch.py (static default: cpp on CPU, ref on CUDA).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._util import device_fn, jit, next_pow2, on, tl, triton
from .. import dispatch
from .._util import (clone, cpp_why, exact, masking_key, masking_meta, measurement_rows, private_noise,
                     records_grad, triton_why)
from .unshuffle import _blocks, _triton_declines, _unshuffle_fwd

BACKENDS = ("ref", "cpp", "triton")


def check_masking(x: Tensor, mask_ratio: float, noise: Tensor | None) -> int:
    if x.dim() != 3:
        raise ValueError(f"random_masking: x must be [N, L, D], got shape {tuple(x.shape)}")
    return check_ratio(x.shape[0], x.shape[1], mask_ratio, noise, "random_masking")


def check_ratio(N: int, L: int, mask_ratio: float, noise: Tensor | None, op: str) -> int:
    """len_keep for L tokens; a clear error for a ratio outside [0, 1] or noise that is not [N, L]."""
    if not 0.0 <= float(mask_ratio) <= 1.0:
        raise ValueError(f"{op}: mask_ratio={mask_ratio} must be in [0, 1]")
    if noise is not None and tuple(noise.shape) != (N, L):
        raise ValueError(f"{op}: noise must be [N, L]={(N, L)}, got {tuple(noise.shape)}")
    return int(L * (1 - float(mask_ratio)))


def random_masking_ref(x: Tensor, mask_ratio: float, noise: Tensor | None = None,
                       generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Reference: rand -> two argsorts -> gathers (the official MAE path, with a stable sort for the tie rule)."""
    len_keep = check_masking(x, mask_ratio, noise)
    N, L, D = x.shape
    if noise is None:
        noise = torch.rand(N, L, device=x.device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    ids_keep = ids_shuffle[:, :len_keep]
    x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    mask = torch.ones(N, L, device=x.device, dtype=x.dtype)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_visible, mask, ids_restore


# ----------------------------------------------------------------------------------------------------------------
# Triton: ids_restore[n, l] is the rank of position l in the stable ascending order of noise[n], by comparison
# counting (_stable_rank); one pass writes x_visible, mask and ids_restore (the algorithm: kernels/ops/unshuffle.py's
# kernel section). The backward is the unshuffle kernel with a zero token.
# ----------------------------------------------------------------------------------------------------------------

@device_fn
def _stable_rank(noise_ptr, row, i, i_ok, L, BLOCK_L: tl.constexpr):
    """Rank of positions i in the stable ascending order of noise[row, :L] (comparison counting), int32."""
    j = tl.arange(0, BLOCK_L)
    j_ok = j < L
    ni = tl.load(noise_ptr + row * L + i, mask=i_ok)
    nj = tl.load(noise_ptr + row * L + j, mask=j_ok)
    before = (nj[None, :] < ni[:, None]) | ((nj[None, :] == ni[:, None]) & (j[None, :] < i[:, None]))
    return tl.sum((before & j_ok[None, :]).to(tl.int32), 1)


@jit
def _random_masking_fwd_kernel(
    noise_ptr,   # noise [N, L] float (any dtype), contiguous; read only
    x_ptr,       # x [N, L, D], strides (stride_xn, stride_xl, stride_xd); read only
    xv_ptr,      # out: x_visible [N, K, D], contiguous, dtype of x; row r written by the position of rank r < K
    mask_ptr,    # out: mask [N, L], contiguous, dtype of x; 0 keep, 1 remove
    ids_ptr,     # out: ids_restore [N, L] int64, contiguous
    L, K, D,
    stride_xn, stride_xl, stride_xd,
    BLOCK_I: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = i < L
    rank = _stable_rank(noise_ptr, n, i, i_ok, L, BLOCK_L)                       # [BLOCK_I]
    tl.store(ids_ptr + n * L + i, rank.to(tl.int64), mask=i_ok)
    # via fp32: the interpreter converts integers to bf16 bit-wise
    tl.store(mask_ptr + n * L + i, (rank >= K).to(tl.float32).to(mask_ptr.dtype.element_ty), mask=i_ok)
    keep = i_ok & (rank < K)
    dd = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + dd
        m = keep[:, None] & (d < D)[None, :]
        v = tl.load(x_ptr + n * stride_xn + i[:, None].to(tl.int64) * stride_xl + d[None, :] * stride_xd, mask=m)
        tl.store(xv_ptr + (n * K + rank[:, None].to(tl.int64)) * D + d[None, :], v, mask=m)


class _RandomMasking(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, noise: Tensor, K: int):
        N, L, D = x.shape
        x_visible = torch.empty(N, K, D, device=x.device, dtype=x.dtype)
        mask = torch.empty(N, L, device=x.device, dtype=x.dtype)
        ids_restore = torch.empty(N, L, device=x.device, dtype=torch.int64)
        bi, bd = _blocks(L, D, max(2, min(32, 8192 // next_pow2(L))))   # the rank compare is [BLOCK_I, pow2(L)]
        with on(x.device):
            _random_masking_fwd_kernel[(N, triton.cdiv(L, bi))](
                noise, x, x_visible, mask, ids_restore, L, K, D, x.stride(0), x.stride(1), x.stride(2),
                BLOCK_I=bi, BLOCK_L=next_pow2(L), BLOCK_D=bd)
        ctx.save_for_backward(ids_restore)
        ctx.mark_non_differentiable(mask, ids_restore)
        return x_visible, mask, ids_restore

    @staticmethod
    def backward(ctx, g_visible, g_mask, g_ids):
        (ids_restore,) = ctx.saved_tensors
        if g_visible is None:
            return None, None, None
        return _unshuffle_fwd(g_visible, None, ids_restore, None, 0, g_visible.dtype), None, None   # scatter back


def random_masking_triton(x: Tensor, mask_ratio: float, noise: Tensor | None = None,
                          generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Fused Triton random masking; same contract (and the same noise draw) as random_masking_ref."""
    K = check_masking(x, mask_ratio, noise)
    if triton is None:
        raise RuntimeError("random_masking_triton: triton is not installed")
    if _triton_declines(x, x.shape[1]):
        return random_masking_ref(x, mask_ratio, noise, generator)
    if noise is None:
        noise = torch.rand(x.shape[0], x.shape[1], device=x.device, generator=generator)
    return _RandomMasking.apply(x, noise.contiguous(), K)


# ----------------------------------------------------------------------------------------------------------------
# The compiled CPU op (csrc/masking.cpp; loaded by kernels/_cpp.py): wrapper, fake kernel, autograd.

def random_masking_cpp(x: Tensor, mask_ratio: float, noise: Tensor | None = None,
                       generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Compiled random_masking (the contract above); the noise is drawn exactly as the reference draws it.
    Requires kernels._cpp.load() to have succeeded."""
    len_keep = check_masking(x, mask_ratio, noise)
    if noise is None:
        noise = torch.rand(x.shape[0], x.shape[1], device=x.device, generator=generator)
    return torch.ops.maect.random_masking(x, noise, len_keep)


def _cpp_setup(ctx, inputs, output):
    _, mask, ids_restore = output
    ctx.save_for_backward(ids_restore)
    ctx.mark_non_differentiable(mask, ids_restore)


def _cpp_backward(ctx, grad_visible, _grad_mask, _grad_ids):
    """d x_visible / d x: put each visible token's gradient back at its position, zeros at masked positions."""
    (ids_restore,) = ctx.saved_tensors
    if grad_visible is None or not ctx.needs_input_grad[0]:
        return None, None, None
    zeros = grad_visible.new_zeros(grad_visible.shape[2])
    return torch.ops.maect.unshuffle(grad_visible, zeros, ids_restore), None, None


def register_cpp() -> None:
    """The fake kernel and the autograd formula of torch.ops.maect.random_masking (kernels/_cpp.py calls this once)."""
    @torch.library.register_fake("maect::random_masking")
    def _(x, noise, len_keep):
        N, L, D = x.shape
        return x.new_empty(N, len_keep, D), x.new_empty(N, L), x.new_empty(N, L, dtype=torch.long)

    torch.library.register_autograd("maect::random_masking", _cpp_backward, setup_context=_cpp_setup)


# ----------------------------------------------------------------------------------------------------------------
# Backends (kernels/dispatch.py) and the public function

def measurement_inputs(args: tuple) -> tuple:
    """The first rows of the call's inputs, with explicit noise so every backend masks the same patches."""
    x, ratio, noise = (tuple(args) + (None,))[:3]
    n = measurement_rows(x)
    nz = noise[:n] if noise is not None else private_noise(n, x.shape[1], x.device)
    return clone(x, n), ratio, nz


def verify(args, out, ref) -> str | None:
    """Every output exactly equal to the reference's (copies and integers)."""
    return exact(("x_visible", "mask", "ids_restore"), out, ref)


def _meta(x: Tensor, mask_ratio: float = 0.0, noise: Tensor | None = None, generator=None) -> tuple:
    return masking_meta(x, x.shape[-2], x.shape[-1], records_grad(x))


OP = dispatch.register(dispatch.Op(
    name="random_masking", reference=random_masking_ref, meta=_meta, key=masking_key, verify=verify,
    backends=(dispatch.Backend("ref", random_masking_ref), dispatch.Backend("cpp", random_masking_cpp, cpp_why),
              dispatch.Backend("triton", random_masking_triton, triton_why, cuda_timed_only=True)),
    default={"cpu": "cpp", "cuda": "ref"}, prepare=measurement_inputs))


def random_masking(x: Tensor, mask_ratio: float, noise: Tensor | None = None, generator=None,
                   backend: str | None = None):
    """MAE per-sample random masking; the contract is this module's docstring. backend: one by name (BACKENDS),
    else the decision for this shape class (kernels/dispatch.py)."""
    if x.dim() != 3:
        return random_masking_ref(x, mask_ratio, noise, generator)      # its error names the shape
    check_masking(x, mask_ratio, noise)
    return dispatch.lookup("random_masking", _meta(x), x.device, backend)(x, mask_ratio, noise, generator)
