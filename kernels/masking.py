"""MAE random masking and the decoder's unshuffle.

random_masking(x[N, L, D], mask_ratio, noise[N, L] | None) -> (x_visible[N, K, D], mask[N, L], ids_restore[N, L])
    K = int(L * (1 - mask_ratio)). Per sample, the K positions with the smallest noise are kept, in ascending
    noise order (MAE's exact semantics: ids_shuffle = argsort(noise); keep ids_shuffle[:, :K]).
    Ties in noise: the lower position ranks first (stable sort). mask: 0 keep, 1 remove, in the original order,
    dtype of x. ids_restore: int64, the inverse permutation of ids_shuffle.
unshuffle(x[N, K, D], mask_token[D] (or [1, 1, D]), ids_restore[N, L]) -> [N, L, D]
    Append L-K copies of mask_token to x and put every token back at its original position:
    out[n, l] = cat(x, mask)[n, ids_restore[n, l]].
Both are differentiable (x and mask_token). K == 0 (mask_ratio 1.0) and K == L (mask_ratio 0.0) are defined.
"""
from __future__ import annotations

import torch
from torch import Tensor


def check_masking(x: Tensor, mask_ratio: float, noise: Tensor | None) -> int:
    if x.dim() != 3:
        raise ValueError(f"random_masking: x must be [N, L, D], got shape {tuple(x.shape)}")
    if not 0.0 <= float(mask_ratio) <= 1.0:
        raise ValueError(f"random_masking: mask_ratio={mask_ratio} must be in [0, 1]")
    if noise is not None and noise.shape != x.shape[:2]:
        raise ValueError(f"random_masking: noise must be [N, L]={tuple(x.shape[:2])}, got {tuple(noise.shape)}")
    return int(x.shape[1] * (1 - float(mask_ratio)))


def check_unshuffle(x: Tensor, mask_token: Tensor, ids_restore: Tensor) -> None:
    if x.dim() != 3 or ids_restore.dim() != 2 or ids_restore.shape[0] != x.shape[0] or ids_restore.shape[1] < x.shape[1]:
        raise ValueError(f"unshuffle: x must be [N, K, D] and ids_restore [N, L>=K], got {tuple(x.shape)} and "
                         f"{tuple(ids_restore.shape)}")
    if mask_token.numel() != x.shape[2]:
        raise ValueError(f"unshuffle: mask_token must hold D={x.shape[2]} values, got shape {tuple(mask_token.shape)}")


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


# ----------------------------------------------------------------------------------------------------------------
# Triton: one kernel per direction instead of rand -> argsort -> argsort -> gather -> gather.
#
# ids_restore[n, l] is the rank of position l in the stable ascending order of noise[n]:
#     rank(l) = #{j : noise[j] < noise[l]  or  (noise[j] == noise[l] and j < l)}
# computed by comparison counting against the whole row (L is a few hundred: a [BLOCK_I, BLOCK_L] compare per
# program). Then x_visible[n, rank(l)] = x[n, l] for rank(l) < K and mask[n, l] = rank(l) >= K: one pass writes all
# three outputs. unshuffle is the inverse map: out[n, l] = x[n, ids_restore[n, l]] if that is < K, else the mask
# token. So the masking backward is an unshuffle with a zero token, and the unshuffle backward is the masking
# scatter (grad_x[n, ids_restore[n, l]] = grad_out[n, l]) plus a per-program partial sum of grad_out over masked
# rows for the mask token (summed in torch: deterministic, no atomics). The kernels rely on ids_restore being a
# permutation of 0..L-1 per row, which random_masking guarantees (the reference's gather would also accept
# repeated indices; the fused scatter does not accumulate). Noise must be NaN-free (torch.rand is).
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

MAX_L = 4096        # longer sequences: the rank compare would not fit one program; random_masking_triton declines


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
    j = tl.arange(0, BLOCK_L)
    j_ok = j < L
    ni = tl.load(noise_ptr + n * L + i, mask=i_ok)
    nj = tl.load(noise_ptr + n * L + j, mask=j_ok)
    before = (nj[None, :] < ni[:, None]) | ((nj[None, :] == ni[:, None]) & (j[None, :] < i[:, None]))
    rank = tl.sum((before & j_ok[None, :]).to(tl.int32), 1)                       # [BLOCK_I]
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
    x_ptr,       # x [N, K, D], strides (stride_xn, stride_xk, stride_xd); read only
    tok_ptr,     # mask_token [D], contiguous, dtype of x; read only when HAS_TOKEN (else masked rows get zeros)
    ids_ptr,     # ids_restore [N, L] integer, contiguous; a permutation of 0..L-1 per row
    out_ptr,     # out [N, L, D], contiguous, dtype of x
    L, K, D,
    stride_xn, stride_xk, stride_xd,
    HAS_TOKEN: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = i < L
    r = tl.load(ids_ptr + n * L + i, mask=i_ok, other=0).to(tl.int64)
    src = i_ok & (r < K)
    dd = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + dd
        d_ok = d < D
        v = tl.load(x_ptr + n * stride_xn + r[:, None] * stride_xk + d[None, :] * stride_xd,
                    mask=src[:, None] & d_ok[None, :], other=0.0)
        if HAS_TOKEN:
            t = tl.load(tok_ptr + d, mask=d_ok, other=0.0)
            v = tl.where(src[:, None], v, t[None, :])
        tl.store(out_ptr + (n * L + i[:, None].to(tl.int64)) * D + d[None, :], v, mask=i_ok[:, None] & d_ok[None, :])


@_jit
def _unshuffle_bwd_kernel(
    g_ptr,       # grad_out [N, L, D], strides (stride_gn, stride_gl, stride_gd); read only
    ids_ptr,     # ids_restore [N, L] integer, contiguous; a permutation of 0..L-1 per row
    gx_ptr,      # out: grad_x [N, K, D], contiguous; row ids_restore[n, l] < K gets grad_out[n, l] (each row once)
    gtok_ptr,    # out: [N * cdiv(L, BLOCK_I), D] fp32 partial sums of grad_out over masked rows (when HAS_TOKEN)
    L, K, D,
    stride_gn, stride_gl, stride_gd,
    HAS_TOKEN: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1)
    i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = i < L
    r = tl.load(ids_ptr + n * L + i, mask=i_ok, other=0).to(tl.int64)
    dst = i_ok & (r < K)
    masked = i_ok & (r >= K)
    part_row = n * tl.num_programs(1) + pid_i
    dd = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + dd
        d_ok = d < D
        g = tl.load(g_ptr + n * stride_gn + i[:, None].to(tl.int64) * stride_gl + d[None, :] * stride_gd,
                    mask=i_ok[:, None] & d_ok[None, :], other=0.0)
        tl.store(gx_ptr + (n * K + r[:, None]) * D + d[None, :], g, mask=dst[:, None] & d_ok[None, :])
        if HAS_TOKEN:
            part = tl.sum(tl.where(masked[:, None], g.to(tl.float32), 0.0), 0)
            tl.store(gtok_ptr + part_row * D + d, part, mask=d_ok)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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


def _unshuffle_fwd(x: Tensor, tok: Tensor | None, ids: Tensor, L: int) -> Tensor:
    """out [N, L, D] = x rows by ids_restore, the token (or zeros when tok is None) elsewhere."""
    N, K, D = x.shape
    out = torch.empty(N, L, D, device=x.device, dtype=x.dtype)
    bi, bd = _blocks(L, D, 16)
    with _on(x.device):
        _unshuffle_fwd_kernel[(N, triton.cdiv(L, bi))](
            x, tok if tok is not None else ids, ids, out, L, K, D, x.stride(0), x.stride(1), x.stride(2),
            HAS_TOKEN=tok is not None, BLOCK_I=bi, BLOCK_D=bd)
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
        return _unshuffle_fwd(g_visible, None, ids_restore, ids_restore.shape[1]), None, None   # scatter back


class _Unshuffle(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, mask_token: Tensor, ids_restore: Tensor):
        ctx.save_for_backward(ids_restore)
        ctx.k, ctx.tok_shape, ctx.tok_dtype = x.shape[1], mask_token.shape, mask_token.dtype
        tok = mask_token.reshape(-1).to(x.dtype).contiguous()     # the reference's cast (round to nearest even)
        return _unshuffle_fwd(x, tok, ids_restore, ids_restore.shape[1])

    @staticmethod
    def backward(ctx, g):
        (ids_restore,) = ctx.saved_tensors
        N, L, D = g.shape
        K = ctx.k
        need_tok = ctx.needs_input_grad[1]
        gx = torch.empty(N, K, D, device=g.device, dtype=g.dtype)
        bi, bd = _blocks(L, D, 16)
        n_i = triton.cdiv(L, bi)
        parts = torch.empty(N * n_i, D, device=g.device, dtype=torch.float32) if need_tok else gx
        with _on(g.device):
            _unshuffle_bwd_kernel[(N, n_i)](g, ids_restore, gx, parts, L, K, D, g.stride(0), g.stride(1),
                                            g.stride(2), HAS_TOKEN=need_tok, BLOCK_I=bi, BLOCK_D=bd)
        g_tok = parts.sum(0).to(ctx.tok_dtype).reshape(ctx.tok_shape) if need_tok else None
        return (gx if ctx.needs_input_grad[0] else None), g_tok, None


def random_masking_triton(x: Tensor, mask_ratio: float, noise: Tensor | None = None,
                          generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Fused Triton random masking; same contract (and the same noise draw) as random_masking_ref."""
    K = check_masking(x, mask_ratio, noise)
    if triton is None:
        raise RuntimeError("random_masking_triton: triton is not installed")
    N, L, D = x.shape
    if x.numel() == 0 or L > MAX_L:
        return random_masking_ref(x, mask_ratio, noise, generator)
    if noise is None:
        noise = torch.rand(N, L, device=x.device, generator=generator)
    return _RandomMasking.apply(x, noise.contiguous(), K)


def unshuffle_triton(x: Tensor, mask_token: Tensor, ids_restore: Tensor) -> Tensor:
    """Fused Triton unshuffle; same contract as unshuffle_ref for ids_restore from random_masking (a permutation)."""
    check_unshuffle(x, mask_token, ids_restore)
    if triton is None:
        raise RuntimeError("unshuffle_triton: triton is not installed")
    N, K, D = x.shape
    if N * D == 0 or ids_restore.shape[1] == 0:
        return unshuffle_ref(x, mask_token, ids_restore)
    return _Unshuffle.apply(x, mask_token, ids_restore.contiguous())
