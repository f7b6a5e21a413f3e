"""unshuffle: the MAE decoder's unshuffle (mask tokens appended, original token order restored).

unshuffle(x[N, K, D], mask_token[D] (or [1, 1, D]), ids_restore[N, L]) -> [N, L, D]
    Append L-K copies of mask_token (cast to x's dtype) to x and put every token back at its original position:
    out[n, l] = cat(x, mask)[n, ids_restore[n, l]].
Differentiable in x and mask_token. K == 0 (mask_ratio 1.0) and K == L (mask_ratio 0.0) are defined. The Triton
kernels rely on ids_restore being a permutation of 0..L-1 per row, which random_masking guarantees (the reference's
gather would also accept repeated indices; the fused scatter in the backward does not accumulate).

This file holds the op's contract, input check, reference (unshuffle_ref), Triton kernels and launcher, the compiled
CPU op's wrapper (unshuffle_cpp; csrc/masking.cpp), its measurement pieces, backends and public function. The
unshuffle kernels (_unshuffle_fwd_kernel, _unshuffle_bwd_kernel) and their autograd Function (_DecoderInput) are
shared: kernels/ops/decoder_input.py (the same kernels with the cls row and the position add) and
kernels/ops/random_masking.py (its backward is an unshuffle with a zero token) import them from here, as do the
helpers they share (MAX_L, _blocks, _triton_declines, _round_bf16, decoder_input_dtype).

Backends (BACKENDS): ref (MAE's torch code: cat + gather), cpp (the compiled CPU op), triton (the Triton kernels,
CUDA). Which one runs: kernels/dispatch.py (static default: cpp on CPU, ref on CUDA).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._util import device_fn, interpreting, jit, next_pow2, on, tl, triton
from .. import dispatch
from .._util import (clone, cpp_why, exact, masking_key, masking_meta, measurement_rows, records_grad,
                     triton_why)

BACKENDS = ("ref", "cpp", "triton")
MAX_L = 4096        # longer sequences: the rank compare would not fit one program; the Triton paths decline


def check_unshuffle(x: Tensor, mask_token: Tensor, ids_restore: Tensor, cls: int = 0, op: str = "unshuffle") -> None:
    if x.dim() != 3 or ids_restore.dim() != 2 or ids_restore.shape[0] != x.shape[0] or \
            not 0 <= x.shape[1] - cls <= ids_restore.shape[1]:
        raise ValueError(f"{op}: x must be [N, {'1+' if cls else ''}K, D] and ids_restore [N, L>=K], got "
                         f"{tuple(x.shape)} and {tuple(ids_restore.shape)}")
    if mask_token.numel() != x.shape[2]:
        raise ValueError(f"{op}: mask_token must hold D={x.shape[2]} values, got shape {tuple(mask_token.shape)}")


def decoder_input_dtype(x: Tensor, mask_token: Tensor, pos_embed: Tensor | None) -> torch.dtype:
    dt = torch.promote_types(x.dtype, mask_token.dtype)
    return dt if pos_embed is None else torch.promote_types(dt, pos_embed.dtype)


def unshuffle_ref(x: Tensor, mask_token: Tensor, ids_restore: Tensor) -> Tensor:
    """Reference: cat(x, mask tokens) then gather by ids_restore."""
    check_unshuffle(x, mask_token, ids_restore)
    N, K, D = x.shape
    L = ids_restore.shape[1]
    filler = mask_token.reshape(1, 1, D).to(x.dtype).expand(N, L - K, D)
    full = torch.cat([x, filler], dim=1)
    return torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))


# ----------------------------------------------------------------------------------------------------------------
# Triton: one kernel per direction instead of rand -> argsort -> argsort -> gather -> gather.
#
# ids_restore[n, l] is the rank of position l in the stable ascending order of noise[n]:
#     rank(l) = #{j : noise[j] < noise[l]  or  (noise[j] == noise[l] and j < l)}
# computed by comparison counting against the whole row (L is a few hundred: a [BLOCK_I, BLOCK_L] compare per
# program). Then x_visible[n, rank(l)] = x[n, l] for rank(l) < K and mask[n, l] = rank(l) >= K: one pass writes all
# three outputs. unshuffle / decoder_input is the inverse map: out[n, c + l] = x[n, c + ids_restore[n, l]] if that
# is < K, else the mask token (+ the position row). So the masking backward is an unshuffle with a zero token, and
# the unshuffle backward is the masking scatter (grad_x[n, c + ids_restore[n, l]] = grad_out[n, c + l]) plus a
# per-program partial sum of grad_out over masked rows for the mask token (summed in torch: deterministic, no
# atomics). Noise must be NaN-free (torch.rand is). Measured on an H200 (torch 2.11+cu130, 2026-11) these standalone kernels are
# slower than torch's argsort + gather, so they are not the static default there (a measured decision may pick them).
# (random_masking's kernel: kernels/ops/random_masking.py.)
# ----------------------------------------------------------------------------------------------------------------

@device_fn
def _round_bf16(v):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32. Explicit because the interpreter truncates on
    conversion to bf16 (the GPU rounds to nearest even, like torch); finite inputs."""
    b = v.to(tl.uint32, bitcast=True)
    b = (b + (0x7FFF + ((b >> 16) & 1))) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@jit
def _unshuffle_fwd_kernel(
    x_ptr,       # x [N, CLS + K, D], strides (stride_xn, stride_xk, stride_xd); read only
    tok_ptr,     # mask_token [D], contiguous, any float dtype; read only when HAS_TOKEN (else masked rows get 0)
    ids_ptr,     # ids_restore [N, L] integer, contiguous; a permutation of 0..L-1 per row
    pos_ptr,     # pos_embed [CLS + L, D], strides (stride_pl, stride_pd); read only when HAS_POS
    out_ptr,     # out [N, CLS + L, D], contiguous, the promoted dtype; every row written once
    L, K, D,
    stride_xn, stride_xk, stride_xd, stride_pl, stride_pd,
    CLS: tl.constexpr, HAS_TOKEN: tl.constexpr, HAS_POS: tl.constexpr, ACC64: tl.constexpr,
    OUT_BF16: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)        # output row
    t_ok = t < CLS + L
    is_cls = t < CLS
    r = tl.load(ids_ptr + n * L + (t - CLS), mask=t_ok & ~is_cls, other=0).to(tl.int64)
    src = t_ok & (is_cls | (r < K))                                # rows copied from x (else the mask token)
    xrow = tl.where(is_cls, 0, CLS + r)
    dd = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + dd
        d_ok = d < D
        v = tl.load(x_ptr + n * stride_xn + xrow[:, None] * stride_xk + d[None, :] * stride_xd,
                    mask=src[:, None] & d_ok[None, :], other=0.0)
        v = v.to(tl.float64) if ACC64 else v.to(tl.float32)      # exact: the compute type holds every input
        if HAS_TOKEN:
            tk = tl.load(tok_ptr + d, mask=d_ok, other=0.0)
            tk = tk.to(tl.float64) if ACC64 else tk.to(tl.float32)
            v = tl.where(src[:, None], v, tk[None, :])
        if HAS_POS:
            p = tl.load(pos_ptr + t[:, None].to(tl.int64) * stride_pl + d[None, :] * stride_pd,
                        mask=t_ok[:, None] & d_ok[None, :], other=0.0)
            v = v + (p.to(tl.float64) if ACC64 else p.to(tl.float32))  # the one rounding: torch's add
        if OUT_BF16:
            v = _round_bf16(v)
        tl.store(out_ptr + (n * (CLS + L) + t[:, None].to(tl.int64)) * D + d[None, :], v,
                 mask=t_ok[:, None] & d_ok[None, :])


@jit
def _unshuffle_bwd_kernel(
    g_ptr,       # grad_out [N, CLS + L, D], strides (stride_gn, stride_gl, stride_gd); read only
    ids_ptr,     # ids_restore [N, L] integer, contiguous; a permutation of 0..L-1 per row
    gx_ptr,      # out: grad_x [N, CLS + K, D], contiguous, dtype of x; each row written once (cls, kept rows)
    gtok_ptr,    # out: [N * cdiv(CLS + L, BLOCK_I), D] fp32 (fp64 if ACC64) partial sums over masked rows
    L, K, D,
    stride_gn, stride_gl, stride_gd,
    CLS: tl.constexpr, HAS_TOKEN: tl.constexpr, ACC64: tl.constexpr, GX_BF16: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1)
    t = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    t_ok = t < CLS + L
    is_cls = t < CLS
    r = tl.load(ids_ptr + n * L + (t - CLS), mask=t_ok & ~is_cls, other=0).to(tl.int64)
    dst = t_ok & (is_cls | (r < K))
    masked = t_ok & ~is_cls & (r >= K)
    xrow = tl.where(is_cls, 0, CLS + r)
    part_row = n * tl.num_programs(1) + pid_i
    dd = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + dd
        d_ok = d < D
        g = tl.load(g_ptr + n * stride_gn + t[:, None].to(tl.int64) * stride_gl + d[None, :] * stride_gd,
                    mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        gx = _round_bf16(g.to(tl.float32)) if GX_BF16 else g        # the cast back to x's dtype, rounded once
        tl.store(gx_ptr + (n * (CLS + K) + xrow[:, None]) * D + d[None, :], gx, mask=dst[:, None] & d_ok[None, :])
        if HAS_TOKEN:
            ga = g.to(tl.float64) if ACC64 else g.to(tl.float32)
            tl.store(gtok_ptr + part_row * D + d, tl.sum(tl.where(masked[:, None], ga, 0.0), 0), mask=d_ok)


def _blocks(L: int, D: int, rows_gpu: int) -> tuple[int, int]:
    """(BLOCK_I, BLOCK_D): in the interpreter one program per sample and few D trips (cost is per program and per
    loop trip); on GPU a few rows per program and 16-byte-vectorisable D chunks."""
    if interpreting():
        return next_pow2(L), min(next_pow2(D), 1024)
    return min(rows_gpu, next_pow2(L)), min(next_pow2(D), 256)


def _unshuffle_fwd(x: Tensor, tok: Tensor | None, ids: Tensor, pos: Tensor | None, cls: int,
                   out_dtype: torch.dtype) -> Tensor:
    """out [N, cls + L, D]: x rows by ids_restore, the token (zeros when tok is None) elsewhere, + pos rows."""
    N, D = x.shape[0], x.shape[2]
    L = ids.shape[1]
    out = torch.empty(N, cls + L, D, device=x.device, dtype=out_dtype)
    bi, bd = _blocks(cls + L, D, 16)
    with on(x.device):
        _unshuffle_fwd_kernel[(N, triton.cdiv(cls + L, bi))](
            x, tok if tok is not None else x, ids, pos if pos is not None else x, out, L, x.shape[1] - cls, D,
            x.stride(0), x.stride(1), x.stride(2), *(pos.stride() if pos is not None else (0, 0)),
            CLS=cls, HAS_TOKEN=tok is not None, HAS_POS=pos is not None, ACC64=out_dtype == torch.float64,
            OUT_BF16=out_dtype == torch.bfloat16, BLOCK_I=bi, BLOCK_D=bd)
    return out


class _DecoderInput(torch.autograd.Function):
    """unshuffle (cls=0, no pos, token already in x's dtype) and decoder_input share this Function."""

    @staticmethod
    def forward(ctx, x: Tensor, mask_token: Tensor, ids_restore: Tensor, pos: Tensor | None, cls: int):
        L, D = ids_restore.shape[1], x.shape[2]
        out_dtype = decoder_input_dtype(x, mask_token, pos)
        pos2 = pos.reshape(cls + L, D) if pos is not None else None
        out = _unshuffle_fwd(x, mask_token.reshape(-1).contiguous(), ids_restore, pos2, cls, out_dtype)
        ctx.save_for_backward(ids_restore)
        ctx.meta = (x.shape[1] - cls, cls, x.dtype, mask_token.shape, mask_token.dtype,
                    None if pos is None else (pos.shape, pos.dtype))
        return out

    @staticmethod
    def backward(ctx, g):
        (ids_restore,) = ctx.saved_tensors
        K, cls, x_dtype, tok_shape, tok_dtype, pos_meta = ctx.meta
        N, T, D = g.shape
        need_x, need_tok, _, need_pos, _ = ctx.needs_input_grad
        acc = torch.float64 if g.dtype == torch.float64 else torch.float32
        gx = torch.empty(N, cls + K, D, device=g.device, dtype=x_dtype)
        bi, bd = _blocks(T, D, 16)
        n_i = triton.cdiv(T, bi)
        parts = torch.empty(N * n_i, D, device=g.device, dtype=acc) if need_tok else gx
        with on(g.device):
            _unshuffle_bwd_kernel[(N, n_i)](g, ids_restore, gx, parts, ids_restore.shape[1], K, D, g.stride(0),
                                            g.stride(1), g.stride(2), CLS=cls, HAS_TOKEN=need_tok, ACC64=acc == torch.float64,
                                            GX_BF16=x_dtype == torch.bfloat16, BLOCK_I=bi, BLOCK_D=bd)
        g_tok = parts.sum(0).to(tok_dtype).reshape(tok_shape) if need_tok else None
        g_pos = g.sum(0).to(pos_meta[1]).reshape(pos_meta[0]) if need_pos else None
        return (gx if need_x else None), g_tok, None, g_pos, None


def _triton_declines(x: Tensor, L: int) -> bool:
    return not x.dtype.is_floating_point or x.shape[0] * x.shape[2] == 0 or L == 0 or L > MAX_L


def unshuffle_triton(x: Tensor, mask_token: Tensor, ids_restore: Tensor) -> Tensor:
    """Fused Triton unshuffle; same contract as unshuffle_ref for ids_restore from random_masking (a permutation)."""
    check_unshuffle(x, mask_token, ids_restore)
    if triton is None:
        raise RuntimeError("unshuffle_triton: triton is not installed")
    if _triton_declines(x, ids_restore.shape[1]):
        return unshuffle_ref(x, mask_token, ids_restore)
    return _DecoderInput.apply(x, mask_token.to(x.dtype), ids_restore.contiguous(), None, 0)


# ----------------------------------------------------------------------------------------------------------------
# The compiled CPU op (csrc/masking.cpp; loaded by kernels/_cpp.py): wrapper, fake kernels, autograd.

def unshuffle_cpp(x: Tensor, mask_token: Tensor, ids_restore: Tensor) -> Tensor:
    """Compiled unshuffle (the contract above). Requires kernels._cpp.load() to have succeeded."""
    check_unshuffle(x, mask_token, ids_restore)
    return torch.ops.maect.unshuffle(x, mask_token, ids_restore)


def _cpp_setup(ctx, inputs, output):
    x, mask_token, ids_restore = inputs
    ctx.len_keep = x.shape[1]
    ctx.token_shape, ctx.token_dtype = mask_token.shape, mask_token.dtype
    ctx.save_for_backward(ids_restore)


def _cpp_backward(ctx, grad_out):
    (ids_restore,) = ctx.saved_tensors
    grad_x, grad_token = torch.ops.maect.unshuffle_backward(grad_out, ids_restore, ctx.len_keep)
    grad_token = grad_token.to(ctx.token_dtype).reshape(ctx.token_shape)
    return (grad_x if ctx.needs_input_grad[0] else None, grad_token if ctx.needs_input_grad[1] else None, None)


def register_cpp() -> None:
    """Fake kernels of torch.ops.maect.unshuffle / unshuffle_backward and unshuffle's autograd formula (kernels/_cpp.py
    calls this once)."""
    @torch.library.register_fake("maect::unshuffle")
    def _(x, mask_token, ids_restore):
        return x.new_empty(x.shape[0], ids_restore.shape[1], x.shape[2])

    @torch.library.register_fake("maect::unshuffle_backward")
    def _(grad_out, ids_restore, len_keep):
        N, _, D = grad_out.shape
        return grad_out.new_empty(N, len_keep, D), grad_out.new_empty(D)

    torch.library.register_autograd("maect::unshuffle", _cpp_backward, setup_context=_cpp_setup)


# ----------------------------------------------------------------------------------------------------------------
# Backends (kernels/dispatch.py) and the public function

def measurement_inputs(args: tuple) -> tuple:
    x, tok, ids = args
    n = measurement_rows(x)
    return clone(x, n), clone(tok), ids[:n]


def verify(args, out, ref) -> str | None:
    """Every output exactly equal to the reference's (copies)."""
    return exact(("out",), out, ref)


def _meta(x: Tensor, mask_token: Tensor, ids_restore: Tensor) -> tuple:
    return masking_meta(x, ids_restore.shape[-1], x.shape[-1], records_grad(x, mask_token))


OP = dispatch.register(dispatch.Op(
    name="unshuffle", reference=unshuffle_ref, meta=_meta, key=masking_key, verify=verify,
    backends=(dispatch.Backend("ref", unshuffle_ref), dispatch.Backend("cpp", unshuffle_cpp, cpp_why),
              dispatch.Backend("triton", unshuffle_triton, triton_why, cuda_timed_only=True)),
    default={"cpu": "cpp", "cuda": "ref"}, prepare=measurement_inputs))


def unshuffle(x: Tensor, mask_token: Tensor, ids_restore: Tensor, backend: str | None = None) -> Tensor:
    """Insert mask tokens and restore the original token order; the contract is this module's docstring. backend:
    one by name (BACKENDS), else the decision for this shape class (kernels/dispatch.py)."""
    if x.dim() != 3 or ids_restore.dim() != 2:
        return unshuffle_ref(x, mask_token, ids_restore)                # its error names the shape
    check_unshuffle(x, mask_token, ids_restore)
    return dispatch.lookup("unshuffle", _meta(x, mask_token, ids_restore), x.device, backend)(x, mask_token,
                                                                                              ids_restore)
