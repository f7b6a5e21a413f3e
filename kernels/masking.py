"""MAE random masking, the decoder's unshuffle, and the MAE decoder input in one pass.

random_masking(x[N, L, D], mask_ratio, noise[N, L] | None) -> (x_visible[N, K, D], mask[N, L], ids_restore[N, L])
    K = int(L * (1 - mask_ratio)) (truncation, as official MAE's len_keep). Per sample, the K positions with the
    smallest noise are kept, in ascending noise order (MAE's exact semantics: ids_shuffle = argsort(noise); keep
    ids_shuffle[:, :K]). Ties in noise: the lower position ranks first (stable sort). mask: 0 keep, 1 remove, in
    the original order, dtype of x. ids_restore: int64, the inverse permutation of ids_shuffle.
unshuffle(x[N, K, D], mask_token[D] (or [1, 1, D]), ids_restore[N, L]) -> [N, L, D]
    Append L-K copies of mask_token (cast to x's dtype) to x and put every token back at its original position:
    out[n, l] = cat(x, mask)[n, ids_restore[n, l]].
decoder_input(x[N, c+K, D], mask_token[D], ids_restore[N, L], pos_embed[c+L, D] | [1, c+L, D] | None, cls=True)
    -> [N, c+L, D], c = 1 if cls else 0: official MAE's decoder input (models_mae.py forward_decoder: append mask
    tokens, unshuffle, re-attach the cls token, add decoder_pos_embed) written in one pass:
        out[n, 0]     = x[n, 0] + pos[0]                                                  (cls only)
        out[n, c + l] = (x[n, c + r] if r < K else mask_token) + pos[c + l],   r = ids_restore[n, l]
    dtype: the promotion of x, mask_token and pos_embed (under bf16 autocast: bf16 tokens, fp32 token and fp32
    position table -> fp32, exactly what MAE's torch.cat + add give). Each element is one addition in that dtype
    (computed in fp32, or fp64 for fp64 outputs, and rounded once), so the result equals the reference exactly.
All three are differentiable (x, mask_token, and pos_embed for decoder_input; MAE's is fixed sin-cos, so unused).
K == 0 (mask_ratio 1.0) and K == L (mask_ratio 0.0) are defined. The fused kernels rely on ids_restore being a
permutation of 0..L-1 per row, which random_masking guarantees (the references' gather would also accept repeated
indices; the fused scatter in the backward does not accumulate).
"""
from __future__ import annotations

import torch
from torch import Tensor


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


def check_unshuffle(x: Tensor, mask_token: Tensor, ids_restore: Tensor, cls: int = 0, op: str = "unshuffle") -> None:
    if x.dim() != 3 or ids_restore.dim() != 2 or ids_restore.shape[0] != x.shape[0] or \
            not 0 <= x.shape[1] - cls <= ids_restore.shape[1]:
        raise ValueError(f"{op}: x must be [N, {'1+' if cls else ''}K, D] and ids_restore [N, L>=K], got "
                         f"{tuple(x.shape)} and {tuple(ids_restore.shape)}")
    if mask_token.numel() != x.shape[2]:
        raise ValueError(f"{op}: mask_token must hold D={x.shape[2]} values, got shape {tuple(mask_token.shape)}")


def check_decoder_input(x: Tensor, mask_token: Tensor, ids_restore: Tensor, pos_embed: Tensor | None,
                        cls: bool) -> None:
    check_unshuffle(x, mask_token, ids_restore, int(cls), "decoder_input")
    T, D = int(cls) + ids_restore.shape[1], x.shape[2]
    if pos_embed is not None and (pos_embed.dim() not in (2, 3) or tuple(pos_embed.shape[-2:]) != (T, D)
                                  or pos_embed.numel() != T * D):
        raise ValueError(f"decoder_input: pos_embed must be [{T}, {D}] or [1, {T}, {D}] (cls={cls}), got "
                         f"{tuple(pos_embed.shape)}")


def decoder_input_dtype(x: Tensor, mask_token: Tensor, pos_embed: Tensor | None) -> torch.dtype:
    dt = torch.promote_types(x.dtype, mask_token.dtype)
    return dt if pos_embed is None else torch.promote_types(dt, pos_embed.dtype)


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


def unshuffle_ref(x: Tensor, mask_token: Tensor, ids_restore: Tensor) -> Tensor:
    """Reference: cat(x, mask tokens) then gather by ids_restore."""
    check_unshuffle(x, mask_token, ids_restore)
    N, K, D = x.shape
    L = ids_restore.shape[1]
    filler = mask_token.reshape(1, 1, D).to(x.dtype).expand(N, L - K, D)
    full = torch.cat([x, filler], dim=1)
    return torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))


def decoder_input_ref(x: Tensor, mask_token: Tensor, ids_restore: Tensor, pos_embed: Tensor | None = None,
                      cls: bool = True) -> Tensor:
    """Reference: official MAE's lines (cat mask tokens, gather by ids_restore, cat the cls token back, add the
    position embedding), with torch.cat's dtype promotion made explicit so it holds with and without autocast."""
    check_decoder_input(x, mask_token, ids_restore, pos_embed, cls)
    c, D = int(cls), x.shape[2]
    N, L = ids_restore.shape
    dt = decoder_input_dtype(x, mask_token, pos_embed)
    x = x.to(dt)
    filler = mask_token.reshape(1, 1, D).to(dt).expand(N, L + c - x.shape[1], D)
    x_ = torch.cat([x[:, c:, :], filler], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))
    x = torch.cat([x[:, :c, :], x_], dim=1)
    return x if pos_embed is None else x + pos_embed.reshape(1, c + L, D)


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
# slower than torch's argsort + gather, so the dispatch table (kernels/masking_table.json) does not pick them there.
# ----------------------------------------------------------------------------------------------------------------
import contextlib
import os

try:
    import triton
    import triton.language as tl
    _jit = triton.jit
except ImportError:  # pure-PyTorch install: the references above still work, the *_triton functions raise
    triton = tl = None

    def _jit(fn):
        return fn


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Device helpers are jit functions on GPU and plain Python under the interpreter (cheaper there; see queue_topk.py).
_device_fn = _jit if not _interpreting() else (lambda fn: fn)
MAX_L = 4096        # longer sequences: the rank compare would not fit one program; the Triton paths decline


@_device_fn
def _round_bf16(v):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32. Explicit because the interpreter truncates on
    conversion to bf16 (the GPU rounds to nearest even, like torch); finite inputs."""
    b = v.to(tl.uint32, bitcast=True)
    b = (b + (0x7FFF + ((b >> 16) & 1))) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@_device_fn
def _stable_rank(noise_ptr, row, i, i_ok, L, BLOCK_L: tl.constexpr):
    """Rank of positions i in the stable ascending order of noise[row, :L] (comparison counting), int32."""
    j = tl.arange(0, BLOCK_L)
    j_ok = j < L
    ni = tl.load(noise_ptr + row * L + i, mask=i_ok)
    nj = tl.load(noise_ptr + row * L + j, mask=j_ok)
    before = (nj[None, :] < ni[:, None]) | ((nj[None, :] == ni[:, None]) & (j[None, :] < i[:, None]))
    return tl.sum((before & j_ok[None, :]).to(tl.int32), 1)


@_jit
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


@_jit
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


@_jit
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


def _on(device: torch.device):
    """Launch on the data's GPU (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _pow2(n: int) -> int:
    return 1 << max(0, (max(1, n) - 1).bit_length())


def _blocks(L: int, D: int, rows_gpu: int) -> tuple[int, int]:
    """(BLOCK_I, BLOCK_D): in the interpreter one program per sample and few D trips (cost is per program and per
    loop trip); on GPU a few rows per program and 16-byte-vectorisable D chunks."""
    if _interpreting():
        return _pow2(L), min(_pow2(D), 1024)
    return min(rows_gpu, _pow2(L)), min(_pow2(D), 256)


def _unshuffle_fwd(x: Tensor, tok: Tensor | None, ids: Tensor, pos: Tensor | None, cls: int,
                   out_dtype: torch.dtype) -> Tensor:
    """out [N, cls + L, D]: x rows by ids_restore, the token (zeros when tok is None) elsewhere, + pos rows."""
    N, D = x.shape[0], x.shape[2]
    L = ids.shape[1]
    out = torch.empty(N, cls + L, D, device=x.device, dtype=out_dtype)
    bi, bd = _blocks(cls + L, D, 16)
    with _on(x.device):
        _unshuffle_fwd_kernel[(N, triton.cdiv(cls + L, bi))](
            x, tok if tok is not None else x, ids, pos if pos is not None else x, out, L, x.shape[1] - cls, D,
            x.stride(0), x.stride(1), x.stride(2), *(pos.stride() if pos is not None else (0, 0)),
            CLS=cls, HAS_TOKEN=tok is not None, HAS_POS=pos is not None, ACC64=out_dtype == torch.float64,
            OUT_BF16=out_dtype == torch.bfloat16, BLOCK_I=bi, BLOCK_D=bd)
    return out


class _RandomMasking(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, noise: Tensor, K: int):
        N, L, D = x.shape
        x_visible = torch.empty(N, K, D, device=x.device, dtype=x.dtype)
        mask = torch.empty(N, L, device=x.device, dtype=x.dtype)
        ids_restore = torch.empty(N, L, device=x.device, dtype=torch.int64)
        bi, bd = _blocks(L, D, max(2, min(32, 8192 // _pow2(L))))   # the rank compare is [BLOCK_I, pow2(L)]
        with _on(x.device):
            _random_masking_fwd_kernel[(N, triton.cdiv(L, bi))](
                noise, x, x_visible, mask, ids_restore, L, K, D, x.stride(0), x.stride(1), x.stride(2),
                BLOCK_I=bi, BLOCK_L=_pow2(L), BLOCK_D=bd)
        ctx.save_for_backward(ids_restore)
        ctx.mark_non_differentiable(mask, ids_restore)
        return x_visible, mask, ids_restore

    @staticmethod
    def backward(ctx, g_visible, g_mask, g_ids):
        (ids_restore,) = ctx.saved_tensors
        if g_visible is None:
            return None, None, None
        return _unshuffle_fwd(g_visible, None, ids_restore, None, 0, g_visible.dtype), None, None   # scatter back


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
        with _on(g.device):
            _unshuffle_bwd_kernel[(N, n_i)](g, ids_restore, gx, parts, ids_restore.shape[1], K, D, g.stride(0),
                                            g.stride(1), g.stride(2), CLS=cls, HAS_TOKEN=need_tok, ACC64=acc == torch.float64,
                                            GX_BF16=x_dtype == torch.bfloat16, BLOCK_I=bi, BLOCK_D=bd)
        g_tok = parts.sum(0).to(tok_dtype).reshape(tok_shape) if need_tok else None
        g_pos = g.sum(0).to(pos_meta[1]).reshape(pos_meta[0]) if need_pos else None
        return (gx if need_x else None), g_tok, None, g_pos, None


def _triton_declines(x: Tensor, L: int) -> bool:
    return not x.dtype.is_floating_point or x.shape[0] * x.shape[2] == 0 or L == 0 or L > MAX_L


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


def unshuffle_triton(x: Tensor, mask_token: Tensor, ids_restore: Tensor) -> Tensor:
    """Fused Triton unshuffle; same contract as unshuffle_ref for ids_restore from random_masking (a permutation)."""
    check_unshuffle(x, mask_token, ids_restore)
    if triton is None:
        raise RuntimeError("unshuffle_triton: triton is not installed")
    if _triton_declines(x, ids_restore.shape[1]):
        return unshuffle_ref(x, mask_token, ids_restore)
    return _DecoderInput.apply(x, mask_token.to(x.dtype), ids_restore.contiguous(), None, 0)


def decoder_input_triton(x: Tensor, mask_token: Tensor, ids_restore: Tensor, pos_embed: Tensor | None = None,
                         cls: bool = True) -> Tensor:
    """decoder_input in one Triton pass (backward: one scatter pass + the mask-token partial sums); same contract as
    decoder_input_ref for ids_restore from random_masking (a permutation)."""
    check_decoder_input(x, mask_token, ids_restore, pos_embed, cls)
    if triton is None:
        raise RuntimeError("decoder_input_triton: triton is not installed")
    if _triton_declines(x, ids_restore.shape[1]):
        return decoder_input_ref(x, mask_token, ids_restore, pos_embed, cls)
    return _DecoderInput.apply(x, mask_token, ids_restore.contiguous(), pos_embed, int(cls))
