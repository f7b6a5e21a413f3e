"""MAE encoder input with the masking fused into the patch embedding: embed only the kept patches.

masked_patch_embed(imgs[N, C, H, W], weight[D, C, p, p], bias[D] | None, pos_embed[L, D] | [1, L, D] | None,
                   mask_ratio, noise[N, L] | None, generator=None) -> (x_visible[N, K, D], mask[N, L], ids_restore[N, L])
    Specification (masked_patch_embed_ref: official MAE's forward_encoder up to the cls token):
        x = conv2d(imgs, weight, bias, stride=p).flatten(2).transpose(1, 2) + pos_embed       # [N, L, D]
        x_visible, mask, ids_restore = random_masking(x, mask_ratio, noise)         # kernels/ops/random_masking.py
    L = (H/p)(W/p) patches in row-major order; K = int(L (1 - mask_ratio)) (MAE's len_keep); the kept patches in
    ascending noise order, ties: lower position first; mask 0 keep / 1 remove in x's dtype; ids_restore int64.
    Without noise, noise = torch.rand(N, L, generator=generator) on imgs' device, as the reference draws it.
    A p x p convolution with stride p is one dot product per patch with the weight flattened in (C, p, p) order:
        x_visible[n, k] = W2 @ patch(n, ids_keep[n, k]) + bias + pos_embed[ids_keep[n, k]],   W2 = weight.reshape(D, Cpp)
    so gathering the kept pixel patches first runs the GEMM, the bias and the position add on K of the L patches
    (75 % less patch-embedding work at ratio 0.75, forward and weight gradient) and never builds [N, L, D].
    ids_keep comes from one pass over the noise (no argsort pair): mask_indices below.
dtypes: the GEMM runs in the conv's dtype (the autocast dtype under autocast, else imgs' dtype, which must equal
    weight's), with fp32 accumulation; its result is rounded to that dtype (the conv's output is) before the position
    add, which runs in the promotion of that dtype and pos_embed's (bf16 autocast + fp32 table: fp32, as in MAE).
Numerics: the same products summed in another order (a GEMM, not a convolution), so the kept tokens equal the
    reference's to within dot_error_bound (derived there; tests/test_masked_embed.py and bench/masked_gather.py apply
    it). mask and ids_restore are integers / 0-1 values and equal the reference exactly.
Gradients: weight and bias (a GEMM and a column sum over the K kept rows; the reference's masked rows carry exact
    zeros), pos_embed when it requires grad (index_add over the kept positions; MAE's is fixed), imgs when it
    requires grad (scatter of the patch gradients; each kept patch of a sample is distinct: no accumulation).
Implementations: masked_patch_embed_ref (the specification), masked_patch_embed_gather (torch ops: one stable
    argsort + an inverse scatter, advanced indexing of the kept patches, F.linear, a position gather-add; any
    device), masked_patch_embed_triton (an index kernel and one gather-GEMM kernel with the bias, the rounding and
    the position add in its epilogue; backward in torch GEMMs).

This file holds the op's contract, input check, reference, the torch 'gather' path, the Triton kernels and launcher
(the rank device function _stable_rank and check_ratio are random_masking's, _round_bf16 and MAX_L unshuffle's,
imported from kernels/ops/random_masking.py and kernels/ops/unshuffle.py), its error bound and verification rule,
measurement pieces, backends and public function. There is no compiled CPU op of its own.

Backends (BACKENDS): ref (MAE's code: full conv patch embedding, then random_masking_ref), cpp / triton (MAE's order
around the standalone random_masking op of that backend), gather (embed only the kept patches, torch ops, any device),
fused (the index kernel + gather-GEMM kernel, Triton, CUDA). Which one runs: kernels/dispatch.py (static default: OP.default).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._util import interpreting, jit, next_pow2, on, tl, triton
from .. import dispatch
from .._util import (clone, cpp_why, exact, masking_meta, masking_key, measurement_rows, private_noise,
                     records_grad, triton_why)
from .random_masking import _stable_rank, check_ratio, random_masking_cpp, random_masking_ref, random_masking_triton
from .unshuffle import MAX_L, _round_bf16

BACKENDS = ("ref", "cpp", "triton", "gather", "fused")


def check_embed(imgs: Tensor, weight: Tensor, bias: Tensor | None, pos_embed: Tensor | None, mask_ratio: float,
                noise: Tensor | None) -> tuple[int, int]:
    """(L, K) for these inputs, or a one-line ValueError naming the bad shape/value."""
    if imgs.dim() != 4 or weight.dim() != 4 or weight.shape[2] != weight.shape[3] or weight.shape[1] != imgs.shape[1]:
        raise ValueError(f"masked_patch_embed: imgs must be [N, C, H, W] and weight [D, C, p, p], got "
                         f"{tuple(imgs.shape)} and {tuple(weight.shape)}")
    D, p = weight.shape[0], weight.shape[2]
    if imgs.shape[2] % p or imgs.shape[3] % p:
        raise ValueError(f"masked_patch_embed: image size {tuple(imgs.shape[2:])} is not divisible by patch size {p}")
    L = (imgs.shape[2] // p) * (imgs.shape[3] // p)
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"masked_patch_embed: bias must be [{D}], got {tuple(bias.shape)}")
    if pos_embed is not None and (pos_embed.dim() not in (2, 3) or tuple(pos_embed.shape[-2:]) != (L, D)
                                  or pos_embed.numel() != L * D):
        raise ValueError(f"masked_patch_embed: pos_embed must be [{L}, {D}] or [1, {L}, {D}] (patch rows only), "
                         f"got {tuple(pos_embed.shape)}")
    return L, check_ratio(imgs.shape[0], L, mask_ratio, noise, "masked_patch_embed")


def gemm_dtype(imgs: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype conv2d would compute in: the autocast dtype under autocast (fp64 is never autocast), else imgs'."""
    dev = imgs.device.type
    if torch.is_autocast_enabled(dev) and imgs.dtype != torch.float64:
        return torch.get_autocast_dtype(dev)
    if imgs.dtype != weight.dtype:
        raise ValueError(f"masked_patch_embed: imgs are {imgs.dtype} but the weight is {weight.dtype} (outside "
                         f"autocast they must match, as for conv2d)")
    return imgs.dtype


def mae_order(imgs, weight, bias, pos_embed, mask_ratio, noise=None, generator=None, masking=random_masking_ref):
    """MAE's order: embed all L patches, add the positions, then mask with `masking` (a random_masking op)."""
    check_embed(imgs, weight, bias, pos_embed, mask_ratio, noise)
    x = F.conv2d(imgs, weight, bias, stride=weight.shape[2]).flatten(2).transpose(1, 2)
    if pos_embed is not None:
        x = x + pos_embed.reshape(1, x.shape[1], x.shape[2])
    return masking(x, mask_ratio, noise, generator)


def masked_patch_embed_ref(imgs: Tensor, weight: Tensor, bias: Tensor | None, pos_embed: Tensor | None,
                           mask_ratio: float, noise: Tensor | None = None,
                           generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Reference: conv patch embedding of all patches + pos_embed, then random_masking_ref (official MAE)."""
    return mae_order(imgs, weight, bias, pos_embed, mask_ratio, noise, generator, random_masking_ref)


def mask_indices_ref(noise: Tensor, len_keep: int) -> tuple[Tensor, Tensor, Tensor]:
    """(ids_keep [N, K], removed [N, L] bool, ids_restore [N, L]) by MAE's two stable argsorts (the specification)."""
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    return ids_shuffle[:, :len_keep], ids_restore >= len_keep, ids_restore


def mask_indices_torch(noise: Tensor, len_keep: int) -> tuple[Tensor, Tensor, Tensor]:
    """mask_indices_ref with one argsort: the inverse permutation is a scatter of 0..L-1 (no second sort)."""
    N, L = noise.shape
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.empty_like(ids_shuffle).scatter_(
        1, ids_shuffle, torch.arange(L, device=noise.device).expand(N, L))
    return ids_shuffle[:, :len_keep], ids_restore >= len_keep, ids_restore


def patch_view(imgs: Tensor, p: int) -> Tensor:
    """[N, C, H, W] -> [N, H/p, W/p, C, p, p], a view (splitting dimensions never copies)."""
    return imgs.unflatten(3, (imgs.shape[3] // p, p)).unflatten(2, (imgs.shape[2] // p, p)).permute(0, 2, 4, 1, 3, 5)


def gather_patches(imgs: Tensor, ids_keep: Tensor, p: int) -> Tensor:
    """The kept pixel patches [N, K, C p p] (flattened in the conv weight's (C, p, p) order), read from imgs."""
    gw = imgs.shape[3] // p
    n = torch.arange(imgs.shape[0], device=imgs.device)[:, None]
    return patch_view(imgs, p)[n, ids_keep // gw, ids_keep % gw].flatten(2)


def masked_patch_embed_gather(imgs: Tensor, weight: Tensor, bias: Tensor | None, pos_embed: Tensor | None,
                              mask_ratio: float, noise: Tensor | None = None,
                              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Embed only the kept patches, in torch ops (autograd by torch); same contract as masked_patch_embed_ref."""
    L, K = check_embed(imgs, weight, bias, pos_embed, mask_ratio, noise)
    gemm_dtype(imgs, weight)                                    # the dtype check, before F.linear's own error
    N, D, p = imgs.shape[0], weight.shape[0], weight.shape[2]
    if noise is None:
        noise = torch.rand(N, L, device=imgs.device, generator=generator)
    ids_keep, removed, ids_restore = mask_indices_torch(noise, K)
    x = F.linear(gather_patches(imgs, ids_keep, p), weight.reshape(D, -1), bias)
    if pos_embed is not None:
        x = x + pos_embed.reshape(L, D)[ids_keep]
    return x, removed.to(x.dtype), ids_restore


# ----------------------------------------------------------------------------------------------------------------
# Triton. Two launches: (1) ranks by comparison counting (random_masking's _stable_rank), writing ids_restore, mask and
# ids_keep[n, rank] = l; (2) a GEMM whose A-operand rows are the kept patches loaded straight from the image
# (row m = (n, k) -> patch ids_keep[n, k] -> its top-left pixel; column kk = (c, i, j) -> pixel offset), B the
# weight as [Cpp, D], epilogue + bias, rounding to the GEMM dtype (the conv's output), + pos_embed[ids_keep], store.
# The split keeps the GEMM a plain tile loop (the ranks need the whole noise row of a sample; a GEMM row tile spans
# parts of several samples). Backward in torch: grad W = G^T A (A regathered: K/L of the image), grad bias = sum G.
# ----------------------------------------------------------------------------------------------------------------


@jit
def _mask_indices_kernel(
    noise_ptr,   # noise [N, L] float, contiguous; read only
    keep_ptr,    # out: ids_keep [N, K] int64, contiguous; ids_keep[n, rank(l)] = l for rank(l) < K
    mask_ptr,    # out: mask [N, L], contiguous, the output dtype; 0 keep, 1 remove
    ids_ptr,     # out: ids_restore [N, L] int64, contiguous
    L, K,
    BLOCK_I: tl.constexpr, BLOCK_L: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = i < L
    rank = _stable_rank(noise_ptr, n, i, i_ok, L, BLOCK_L)
    tl.store(ids_ptr + n * L + i, rank.to(tl.int64), mask=i_ok)
    tl.store(mask_ptr + n * L + i, (rank >= K).to(tl.float32).to(mask_ptr.dtype.element_ty), mask=i_ok)
    tl.store(keep_ptr + n * K + rank, i.to(tl.int64), mask=i_ok & (rank < K))


@jit
def _masked_embed_fwd_kernel(
    img_ptr,     # imgs [N, C, H, W], strides (s_in, s_ic, s_ih, s_iw), any float dtype (cast per A_CAST); read only
    keep_ptr,    # ids_keep [N, K] int64, contiguous (row m of the output = flat index m)
    w_ptr,       # weight as [D, Cpp]: row stride s_wd, unit column stride, GEMM dtype; read only
    b_ptr,       # bias [D], GEMM dtype; read when HAS_BIAS
    pos_ptr,     # pos_embed [L, D], strides (s_pl, s_pd), any float dtype; read when HAS_POS
    out_ptr,     # out: x_visible [M = N*K, D], contiguous, the output dtype
    M, K, D, CPP, GW,
    s_in, s_ic, s_ih, s_iw, s_wd, s_pl, s_pd,
    P: tl.constexpr,             # patch size (constexpr: the pixel offsets' divisions become shifts for p = 16)
    HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, A_CAST: tl.constexpr, ROUND: tl.constexpr,
    OUT_BF16: tl.constexpr, UPCAST: tl.constexpr, ACC64: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    OFF32: tl.constexpr = False,  # imgs has < 2^31 elements: pixel offsets in 32 bits (half the address registers;
                                  # the launcher sets it for images without unit pixel stride, gathered per pixel)
):
    pid_n = tl.program_id(0)                     # fastest: neighbouring programs share the A rows (L2 reuse)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    l = tl.load(keep_ptr + rows, mask=row_ok, other=0)                       # kept patch position, int64
    n = (rows // K).to(tl.int64)
    row_off = n * s_in + (l // GW) * P * s_ih + (l % GW) * P * s_iw           # the patch's top-left pixel
    if OFF32:
        row_off = row_off.to(tl.int32)
    kk0 = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if ACC64 else tl.float32)
    for k0 in range(0, CPP, BLOCK_K):
        kk = k0 + kk0
        k_ok = kk < CPP
        c = kk // (P * P)
        ij = kk % (P * P)
        col_off = c * s_ic + (ij // P) * s_ih + (ij % P) * s_iw
        a = tl.load(img_ptr + row_off[:, None] + col_off[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + cols[None, :].to(tl.int64) * s_wd + kk[:, None], mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)
        if A_CAST == 1:                          # fp32 images under bf16 autocast: cast the kept pixels only
            a = _round_bf16(a.to(tl.float32)) if UPCAST else a.to(tl.bfloat16)
        elif A_CAST == 2:
            a = a.to(tl.float16)
        if UPCAST:  # the interpreter's tl.dot mishandles bf16/fp16; their products are exact in fp32
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(acc.dtype)[None, :]
    if ROUND == 1:                                # to the conv's output dtype before the position add, as MAE
        acc = _round_bf16(acc)
    elif ROUND == 2:
        acc = acc.to(tl.float16).to(tl.float32)
    if HAS_POS:
        acc += tl.load(pos_ptr + l[:, None] * s_pl + cols[None, :] * s_pd, mask=row_ok[:, None] & col_ok[None, :],
                       other=0.0).to(acc.dtype)
    if OUT_BF16:
        acc = _round_bf16(acc)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


def mask_indices_triton(noise: Tensor, len_keep: int, mask_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(ids_keep [N, K], mask [N, L] in mask_dtype, ids_restore [N, L]) in one launch; noise contiguous, L <= MAX_L."""
    N, L = noise.shape
    keep = torch.empty(N, len_keep, device=noise.device, dtype=torch.int64)
    mask = torch.empty(N, L, device=noise.device, dtype=mask_dtype)
    ids = torch.empty(N, L, device=noise.device, dtype=torch.int64)
    bi = next_pow2(L) if interpreting() else max(2, min(32, 8192 // next_pow2(L)))   # the compare is [BLOCK_I, pow2(L)]
    with on(noise.device):
        _mask_indices_kernel[(N, triton.cdiv(L, bi))](noise, keep, mask, ids, L, len_keep, BLOCK_I=bi,
                                                      BLOCK_L=next_pow2(L))
    return keep, mask, ids


def _gemm_config(M: int, D: int, CPP: int, unit_pixels: bool = True, p: int = 16, fma: bool = False,
                 cast: bool = False) -> dict:
    """Tiles: in the interpreter few big programs (its cost is per program and per loop trip); on GPU 128 x 128
    output tiles (64 wide when D is small) and 64-deep K steps, 8 warps, 3 stages (unmeasured on GPU;
    bench/masked_gather.py times the result). Sized so that every shipped launch compiles without spills on sm_90
    and sm_80 (python -m maect.kernels.check --static):
    - fma (an fp32 "ieee" dot: FMA units, no tensor cores; both operand tiles and the accumulator in registers):
      64 x 64 tiles, 16-deep K steps, 4 warps (128 x 128 x 64 at 8 warps spills 16-492 B on sm_90, 9-11 KB on sm_80;
      64 x 64 x 32 still 24 B on sm_90 at p = 14);
    - the A gather loads vectors only along a patch row: 64-deep K steps when p is a multiple of 16 and the pixels
      have unit stride, else 32 (p = 14 / 4 at 64: 48-616 B of spills, the per-element addresses; channels_last
      images gather pixel by pixel: 124 B on sm_80 at 64); 16 when, in addition, the images are cast in the kernel
      (cast: fp32 images, 16-bit GEMM; p = 14 at 32: 96 B on sm_80)."""
    if interpreting():
        return dict(BLOCK_M=min(128, next_pow2(M)), BLOCK_N=min(256, next_pow2(D)), BLOCK_K=min(256, next_pow2(CPP)),
                    num_warps=4, num_stages=1)
    if fma:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=3)
    block_k = 64 if unit_pixels and p % 16 == 0 else (16 if cast and p % 16 else 32)
    return dict(BLOCK_M=128, BLOCK_N=128 if D >= 128 else 64, BLOCK_K=block_k, num_warps=8, num_stages=3)


class _MaskedPatchEmbed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, imgs: Tensor, weight: Tensor, bias: Tensor | None, pos: Tensor | None, ids_keep: Tensor,
                out_dtype: torch.dtype):
        # weight and bias in the GEMM dtype; imgs (cast in the kernel: only the kept pixels) and pos [.., L, D] in
        # their own dtypes; ids_keep [N, K] contiguous
        N, C, H, W = imgs.shape
        D, p = weight.shape[0], weight.shape[2]
        K, L, CPP = ids_keep.shape[1], (H // p) * (W // p), C * p * p
        w2 = weight.reshape(D, CPP)
        if w2.stride(1) != 1:                      # e.g. a channels_last weight: the kernel wants unit columns
            w2 = w2.contiguous()
        pos2 = pos.reshape(L, D) if pos is not None else None
        out = torch.empty(N, K, D, device=imgs.device, dtype=out_dtype)
        M, mm = N * K, weight.dtype
        prec = "tf32" if mm == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
        a_cast = {torch.bfloat16: 1, torch.float16: 2}.get(mm, 0) if imgs.dtype != mm else 0
        cfg = _gemm_config(M, D, CPP, imgs.stride(3) == 1, p, fma=mm == torch.float32 and prec == "ieee",
                           cast=a_cast > 0)
        grid = (triton.cdiv(D, cfg["BLOCK_N"]), triton.cdiv(M, cfg["BLOCK_M"]))
        with on(imgs.device):
            _masked_embed_fwd_kernel[grid](
                imgs, ids_keep, w2, bias if bias is not None else w2, pos2 if pos2 is not None else w2, out,
                M, K, D, CPP, W // p, *imgs.stride(), w2.stride(0), *(pos2.stride() if pos2 is not None else (0, 0)),
                P=p, HAS_BIAS=bias is not None, HAS_POS=pos is not None,
                A_CAST=a_cast,
                ROUND={torch.bfloat16: 1, torch.float16: 2}.get(mm, 0) if pos is not None else 0,
                OUT_BF16=out_dtype == torch.bfloat16, UPCAST=interpreting() and mm in (torch.bfloat16, torch.float16),
                ACC64=mm == torch.float64,
                PREC=prec,
                OFF32=imgs.stride(3) != 1 and imgs.numel() < 2 ** 31, **cfg)
        ctx.save_for_backward(imgs, weight, ids_keep)
        ctx.pos_meta = None if pos is None else (pos.shape, pos.dtype, L)
        return out

    @staticmethod
    def backward(ctx, g):
        imgs, weight, ids_keep = ctx.saved_tensors
        need_img, need_w, need_b, need_pos = ctx.needs_input_grad[:4]
        N, K, D = g.shape
        p = weight.shape[2]
        with torch.autocast(g.device.type, enabled=False):       # dtypes are explicit below
            G = g.reshape(N * K, D)
            Gm = G.to(weight.dtype)                               # the conv output's grad: in the GEMM dtype
            gw = gb = gimg = gpos = None
            if need_w:
                A = gather_patches(imgs, ids_keep, p).flatten(0, 1).to(weight.dtype)
                gw = (Gm.t() @ A).reshape(weight.shape)
            if need_b:
                gb = Gm.sum(0)
            if need_pos:
                shape, dtype, L = ctx.pos_meta
                gpos = torch.zeros(L, D, device=g.device, dtype=dtype).index_add_(0, ids_keep.reshape(-1),
                                                                                  G.to(dtype)).reshape(shape)
            if need_img:
                gimg = torch.zeros_like(imgs)
                gw_ = imgs.shape[3] // p
                n = torch.arange(N, device=g.device)[:, None]
                patch_view(gimg, p)[n, ids_keep // gw_, ids_keep % gw_] = \
                    (Gm @ weight.reshape(D, -1)).reshape(N, K, *weight.shape[1:]).to(imgs.dtype)
        return gimg, gw, gb, gpos, None, None


def masked_patch_embed_triton(imgs: Tensor, weight: Tensor, bias: Tensor | None, pos_embed: Tensor | None,
                              mask_ratio: float, noise: Tensor | None = None,
                              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Index kernel + gather-GEMM kernel; same contract as masked_patch_embed_ref. Declines (-> the torch gather
    path) what it does not cover: fp64 on GPU, L > MAX_L, empty batches, non-float images."""
    L, K = check_embed(imgs, weight, bias, pos_embed, mask_ratio, noise)
    if triton is None:
        raise RuntimeError("masked_patch_embed_triton: triton is not installed")
    mm = gemm_dtype(imgs, weight)
    N = imgs.shape[0]
    if (not imgs.dtype.is_floating_point or L > MAX_L or N * K == 0 or weight.shape[0] == 0
            or (mm == torch.float64 and not interpreting())):
        return masked_patch_embed_gather(imgs, weight, bias, pos_embed, mask_ratio, noise, generator)
    if noise is None:
        noise = torch.rand(N, L, device=imgs.device, generator=generator)
    out_dtype = mm if pos_embed is None else torch.promote_types(mm, pos_embed.dtype)
    ids_keep, mask, ids_restore = mask_indices_triton(noise.contiguous(), K, out_dtype)
    b = bias.to(mm) if bias is not None else None
    x = _MaskedPatchEmbed.apply(imgs, weight.to(mm), b, pos_embed, ids_keep, out_dtype)
    return x, mask, ids_restore


def dot_error_bound(S: Tensor, y: Tensor, n: int, acc_dtype: torch.dtype, out_dtype: torch.dtype) -> Tensor:
    """Largest |a - b| between two computations of the same sums y = sum of n terms (sum of |terms| = S), each
    accumulated in acc_dtype in any order and rounded once to out_dtype (float64 tensors in, float64 out):
        |fl(sum) - sum| <= n u_acc S for any order (Higham, Accuracy and Stability, eq. 3.5 with gamma_n ~ n u),
        the rounding to out_dtype adds u_out (|y| + n u_acc S) on each side; two computations: twice both.
    u is the unit roundoff (2^-24 fp32, 2^-8 bf16, 2^-11 fp16, 2^-53 fp64); u_out = 0 when out_dtype is no
    narrower than acc_dtype (no rounding beyond the accumulation's)."""
    u_acc = torch.finfo(acc_dtype).eps / 2
    u_out = torch.finfo(out_dtype).eps / 2 if torch.finfo(out_dtype).bits < torch.finfo(acc_dtype).bits else 0.0
    e_acc = n * u_acc * S
    return 2 * e_acc + 2 * u_out * (y.abs() + e_acc)


def embed_error_bound(imgs: Tensor, weight: Tensor, bias: Tensor | None, pos_embed: Tensor | None, ids_keep: Tensor,
                      mm: torch.dtype, out_dtype: torch.dtype) -> Tensor:
    """Per element of x_visible [N, K, D]: the largest |fused - reference| two correct computations may differ by.
    The embedding is a dot product of Cpp + 1 terms (with the bias) accumulated in fp32 (fp64 for fp64 inputs) and
    rounded to the GEMM dtype mm (dot_error_bound), then the position add rounds once more to out_dtype on each
    side: + 2 u_out (|y| + |pos| + the first part). Inputs are the values the GEMM sees (already in mm)."""
    p, D = weight.shape[2], weight.shape[0]
    A = gather_patches(imgs.to(mm), ids_keep, p).double()                                  # [N, K, Cpp]
    W = weight.to(mm).reshape(D, -1).double()
    b = bias.to(mm).double() if bias is not None else torch.zeros(D, dtype=torch.float64, device=imgs.device)
    y = A @ W.t() + b
    S = A.abs() @ W.abs().t() + b.abs()
    acc = torch.float64 if mm == torch.float64 else torch.float32
    e = dot_error_bound(S, y, A.shape[-1] + 1, acc, mm)
    if pos_embed is None:
        return e
    pos = pos_embed.reshape(-1, D).double()[ids_keep]
    return e + 2 * torch.finfo(out_dtype).eps / 2 * (y.abs() + pos.abs() + e)


# ----------------------------------------------------------------------------------------------------------------
# Verification, backends (kernels/dispatch.py) and the public function

def verify(args, out, ref) -> str | None:
    """mask and ids_restore exactly equal; x_visible within embed_error_bound of the reference's (a GEMM instead of a
    convolution: the same products summed in another order)."""
    bad = exact(("mask", "ids_restore"), out[1:], ref[1:])
    if bad:
        return bad
    x, rx = out[0].detach(), ref[0].detach()
    if x.shape != rx.shape or x.dtype != rx.dtype:
        return f"x_visible: shape/dtype {tuple(x.shape)} {x.dtype}, expected {tuple(rx.shape)} {rx.dtype}"
    imgs, w, b, pos = (t.detach() if t is not None else None for t in args[:4])
    K = x.shape[1]
    ids_keep = torch.argsort(ref[2], dim=1)[:, :K]
    mm = gemm_dtype(imgs, w)
    bound = embed_error_bound(imgs, w, b, pos, ids_keep, mm, rx.dtype)
    over = ((x.double() - rx.double()).abs() > bound) | (torch.isnan(x) != torch.isnan(rx))
    if over.any():
        n = int(over.reshape(x.shape[0], -1).any(1).nonzero()[0, 0])
        worst = float(((x.double() - rx.double()).abs() - bound)[n].max())
        return f"sample {n}: x_visible beyond the derived error bound (by {worst:.3g}; {int(over[n].sum())} entries)"
    return None


def measurement_inputs(args: tuple) -> tuple:
    """The first rows of the call's inputs, with explicit noise so every backend masks the same patches."""
    imgs, w, b, pos, ratio, noise = (tuple(args) + (None,))[:6]
    n = measurement_rows(imgs)
    L = (imgs.shape[2] // w.shape[2]) * (imgs.shape[3] // w.shape[3])
    nz = noise[:n] if noise is not None else private_noise(n, L, imgs.device)
    return clone(imgs, n), clone(w), clone(b), clone(pos), ratio, nz


def _mae_order(masking):
    def run(imgs, w, bias, pos, ratio, noise=None, generator=None):
        return mae_order(imgs, w, bias, pos, ratio, noise, generator, masking)
    return run


def _meta(imgs: Tensor, weight: Tensor, bias: Tensor | None = None, pos_embed: Tensor | None = None,
          mask_ratio: float = 0.0, noise: Tensor | None = None, generator=None) -> tuple:
    p = weight.shape[-1]
    return masking_meta(imgs, (imgs.shape[-2] // p) * (imgs.shape[-1] // p), weight.shape[0],
                        records_grad(imgs, weight, bias, pos_embed))


OP = dispatch.register(dispatch.Op(
    name="masked_patch_embed", reference=masked_patch_embed_ref, meta=_meta, key=masking_key, verify=verify,
    backends=(dispatch.Backend("ref", masked_patch_embed_ref),
              dispatch.Backend("gather", masked_patch_embed_gather),
              dispatch.Backend("cpp", _mae_order(random_masking_cpp), cpp_why),
              dispatch.Backend("fused", masked_patch_embed_triton, triton_why, cuda_timed_only=True),
              dispatch.Backend("triton", _mae_order(random_masking_triton), triton_why, cuda_timed_only=True)),
    default={"cpu": "gather", "cuda": "ref"}, prepare=measurement_inputs))


def masked_patch_embed(imgs: Tensor, weight: Tensor, bias: Tensor | None, pos_embed: Tensor | None,
                       mask_ratio: float, noise: Tensor | None = None, generator=None, backend: str | None = None):
    """MAE's encoder input: patch embedding (weight [D, C, p, p], a Conv2d's) + pos_embed + random masking; see
    this module's docstring for the contract and the backends. backend: one by name (BACKENDS), else the decision
    for this shape class (kernels/dispatch.py)."""
    p = weight.shape[-1]
    if imgs.dim() != 4 or not p or (imgs.shape[-2] // p) * (imgs.shape[-1] // p) == 0:
        return masked_patch_embed_ref(imgs, weight, bias, pos_embed, mask_ratio, noise, generator)
    check_embed(imgs, weight, bias, pos_embed, mask_ratio, noise)
    fn = dispatch.lookup("masked_patch_embed", _meta(imgs, weight, bias, pos_embed), imgs.device, backend)
    return fn(imgs, weight, bias, pos_embed, mask_ratio, noise, generator)
