"""random_masking / unshuffle: the Triton kernels against the references (on CPU through the Triton interpreter).

Everything except the mask-token gradient is a copy, so it must match exactly, in every dtype. The mask-token
gradient is a sum of M = N * (L - K) rows: in fp32 the two summation orders differ by at most 2 * M * u * sum|g|
(u = 2^-24); in bf16/fp16 the reference rounds the sum to the low precision while the kernel sums in fp32, so
against the float64 sum the kernel's error must be at most 2 x the reference's own error + the fp32 bound.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maect.kernels.masking import random_masking_ref, random_masking_triton, unshuffle_ref, unshuffle_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"     # cpu: the Triton interpreter
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(2, 7, 16), (3, 49, 40), (4, 197, 64), (1, 256, 24)]   # (N, L, D): odd L on purpose
RATIOS = [0.0, 0.75, 1.0]
U32 = 2.0 ** -24
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def assert_same(name, a, b):
    diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    print(f"{name}: max |kernel - ref| = {diff:.3g}")
    assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), name


def inputs(N, L, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, L, D, generator=g).to(dtype).to(DEVICE)
    noise = torch.rand(N, L, generator=g).to(DEVICE)
    return x, noise


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-L{}-D{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_masking_matches_reference(dtype, shape, ratio):
    x, noise = inputs(*shape, dtype)
    x_ref = x.clone().requires_grad_()
    x_k = x.clone().requires_grad_()
    before = noise.clone()
    out_k = random_masking_triton(x_k, ratio, noise)
    out_r = random_masking_ref(x_ref, ratio, noise)
    for name, a, b in zip(("x_visible", "mask", "ids_restore"), out_k, out_r):
        assert_same(name, a, b)
    assert torch.equal(noise, before) and torch.equal(x_k.detach(), x)
    g = torch.randn_like(out_r[0])
    (gx_k,) = torch.autograd.grad(out_k[0], x_k, g)
    (gx_r,) = torch.autograd.grad(out_r[0], x_ref, g)
    assert_same("grad x", gx_k, gx_r)


def test_noise_ties_and_generator():
    """Quantised noise (many ties): the stable rule (lower position first) must hold exactly; without noise the
    op draws torch.rand with the given generator, exactly like the reference."""
    x, _ = inputs(3, 49, 16, torch.float32)
    noise = (torch.rand(3, 49, generator=torch.Generator().manual_seed(5)) * 4).floor().to(DEVICE)
    for a, b in zip(random_masking_triton(x, 0.75, noise), random_masking_ref(x, 0.75, noise)):
        assert_same("tied noise", a, b)
    gen = dict(device=DEVICE)
    out_k = random_masking_triton(x, 0.6, None, torch.Generator(**gen).manual_seed(7))
    out_r = random_masking_ref(x, 0.6, None, torch.Generator(**gen).manual_seed(7))
    for a, b in zip(out_k, out_r):
        assert_same("generator", a, b)


def test_random_masking_noncontiguous_and_float64_noise():
    x_big, _ = inputs(3, 40, 49, torch.float32)
    x = x_big.transpose(1, 2)                      # [3, 49, 40], non-contiguous
    noise = torch.rand(3, 49, dtype=torch.float64, device=DEVICE)
    for a, b in zip(random_masking_triton(x, 0.75, noise), random_masking_ref(x, 0.75, noise)):
        assert_same("non-contiguous", a, b)


def _token_grad_check(gt_k, gt_r, g, masked, dtype):
    """Mask-token gradient: see the module docstring for the bound."""
    m = masked.unsqueeze(-1).to(g.dtype)
    truth = (g.double() * m.double()).sum((0, 1))
    bound = 2 * masked.sum().item() * U32 * (g.double().abs() * m.double()).sum((0, 1)).max().item() + 1e-30
    err_k = (gt_k.double().reshape(-1) - truth).abs().max().item()
    err_r = (gt_r.double().reshape(-1) - truth).abs().max().item()
    print(f"mask-token grad: kernel err {err_k:.3g}, reference err {err_r:.3g}, fp32 bound {bound:.3g}")
    if dtype == torch.float32:
        assert err_k <= bound
    else:
        assert err_k <= 2 * err_r + bound


@pytest.mark.parametrize("tok_shape", ["D", "11D"])
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-L{}-D{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unshuffle_matches_reference(dtype, shape, ratio, tok_shape):
    N, L, D = shape
    x, noise = inputs(N, L, D, dtype, seed=1)
    x_vis, mask, ids = random_masking_ref(x, ratio, noise)
    tok = torch.randn(D if tok_shape == "D" else (1, 1, D), device=DEVICE)    # fp32 parameter, x maybe bf16
    xk, xr = x_vis.clone().requires_grad_(), x_vis.clone().requires_grad_()
    tk, tr = tok.clone().requires_grad_(), tok.clone().requires_grad_()
    ids_before = ids.clone()
    out_k, out_r = unshuffle_triton(xk, tk, ids), unshuffle_ref(xr, tr, ids)
    assert_same("unshuffle", out_k, out_r)
    assert torch.equal(ids, ids_before)
    g = torch.randn_like(out_r)
    gx_k, gt_k = torch.autograd.grad(out_k, (xk, tk), g)
    gx_r, gt_r = torch.autograd.grad(out_r, (xr, tr), g)
    assert_same("grad x", gx_k, gx_r)
    assert gt_k.shape == tok.shape and gt_k.dtype == tok.dtype
    _token_grad_check(gt_k, gt_r, g, mask.bool(), dtype)


def test_unshuffle_noncontiguous_and_partial_grads():
    x, noise = inputs(2, 49, 32, torch.float32)
    x_vis, _, ids = random_masking_ref(x, 0.75, noise)
    xt = x_vis.transpose(1, 2).contiguous().transpose(1, 2)     # same values, non-contiguous strides
    tok = torch.randn(32, device=DEVICE)
    assert_same("non-contiguous", unshuffle_triton(xt, tok, ids), unshuffle_ref(x_vis, tok, ids))
    xk = xt.clone().requires_grad_()                            # mask token without grad
    out = unshuffle_triton(xk, tok, ids)
    (gx,) = torch.autograd.grad(out, xk, torch.ones_like(out))
    assert torch.equal(gx, torch.ones_like(gx))
    tk = tok.clone().requires_grad_()                           # only the mask token needs grad
    out = unshuffle_triton(x_vis, tk, ids)
    (gt,) = torch.autograd.grad(out.sum(), tk)
    assert torch.equal(gt, torch.full_like(gt, 2 * (49 - 12)))


def test_gradcheck_float64():
    """The references and the kernels (float64 through the interpreter / GPU) against numerical gradients."""
    N, L, D = 2, 5, 3
    x = torch.randn(N, L, D, dtype=torch.float64, device=DEVICE, requires_grad=True)
    noise = torch.rand(N, L, device=DEVICE)
    tok = torch.randn(D, dtype=torch.float64, device=DEVICE, requires_grad=True)
    _, _, ids = random_masking_ref(x.detach(), 0.6, noise)
    xv = torch.randn(N, 2, D, dtype=torch.float64, device=DEVICE, requires_grad=True)
    for masking, unshuffle in ((random_masking_ref, unshuffle_ref), (random_masking_triton, unshuffle_triton)):
        assert torch.autograd.gradcheck(lambda t: masking(t, 0.6, noise)[0], (x,))
        assert torch.autograd.gradcheck(lambda a, b: unshuffle(a, b, ids), (xv, tok))


def test_empty_batch_falls_back():
    x = torch.randn(0, 7, 4, device=DEVICE)
    for a, b in zip(random_masking_triton(x, 0.5), random_masking_ref(x, 0.5)):
        assert a.shape == b.shape
    ids = torch.empty(0, 7, dtype=torch.long, device=DEVICE)
    assert unshuffle_triton(x[:, :3], torch.zeros(4, device=DEVICE), ids).shape == (0, 7, 4)


@gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(256, 196, 768), (256, 196, 1024), (256, 256, 1280)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_vit_shapes_through_dispatch(shape, dtype):
    from maect import kernels
    x, noise = inputs(*shape, dtype)
    assert kernels.backend_for(x) == "triton"
    for a, b in zip(kernels.random_masking(x, 0.75, noise), random_masking_ref(x, 0.75, noise)):
        assert_same("masking", a, b)
    x_vis, mask, ids = random_masking_ref(x, 0.75, noise)
    dec = torch.randn(shape[0], x_vis.shape[1], 512, device=DEVICE, dtype=dtype)
    tok = torch.randn(512, device=DEVICE)
    assert_same("unshuffle", kernels.unshuffle(dec, tok, ids), unshuffle_ref(dec, tok, ids))


AOT_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from maect import kernels
mk = sys.modules["maect.kernels.masking"]
dims = dict(L="i32", K="i32", D="i32")
for xd in ("bf16", "fp32"):
    cases = [(mk._random_masking_fwd_kernel, dict(noise_ptr="*fp32", x_ptr=f"*{xd}", xv_ptr=f"*{xd}", mask_ptr=f"*{xd}",
              ids_ptr="*i64", **dims, stride_xn="i32", stride_xl="i32", stride_xd="i32"),
              dict(BLOCK_I=32, BLOCK_L=256, BLOCK_D=256)),
             (mk._unshuffle_fwd_kernel, dict(x_ptr=f"*{xd}", tok_ptr=f"*{xd}", ids_ptr="*i64", out_ptr=f"*{xd}", **dims,
              stride_xn="i32", stride_xk="i32", stride_xd="i32"), dict(HAS_TOKEN=True, BLOCK_I=16, BLOCK_D=256)),
             (mk._unshuffle_bwd_kernel, dict(g_ptr=f"*{xd}", ids_ptr="*i64", gx_ptr=f"*{xd}", gtok_ptr="*fp32", **dims,
              stride_gn="i32", stride_gl="i32", stride_gd="i32"), dict(HAS_TOKEN=True, BLOCK_I=16, BLOCK_D=256))]
    for fn, s, c in cases:
        src = ASTSource(fn=fn, signature={**s, **{k: "constexpr" for k in c}}, constexprs=c)
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3))
        print("compiled", fn.__name__, xd, c)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels for real")
def test_kernels_compile_for_sm90():
    """No GPU here: compile the non-interpreted kernels ahead of time for an H100 (sm_90, through ptxas)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", AOT_SCRIPT], cwd=Path(__file__).resolve().parents[1], env=env,
                       capture_output=True, text=True, timeout=170)
    print(r.stdout, r.stderr[-3000:])
    assert r.returncode == 0
