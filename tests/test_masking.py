"""random_masking / unshuffle / decoder_input: the Triton kernels (on CPU through the Triton interpreter) and the
compiled decoder_input against the references.

Everything except the mask-token and position gradients is a copy or one rounded addition of the same operands, so
it must match exactly, in every dtype. The mask-token gradient is a sum of M = N * (L - K) rows (the position
gradient of N): in fp32 two summation orders differ by at most 2 * M * u * sum|g| (u = 2^-24); in bf16/fp16 the
reference rounds the sum to the low precision while the kernel sums in fp32, so against the float64 sum the
kernel's error must be at most 2 x the reference's own error + the fp32 bound.
"""

import pytest
import torch

from maect.kernels import _cpp
from maect.kernels.ops.decoder_input import decoder_input_cpp, decoder_input_ref, decoder_input_triton
from maect.kernels.ops.random_masking import random_masking_ref, random_masking_triton
from maect.kernels.ops.unshuffle import unshuffle_ref, unshuffle_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"     # cpu: the Triton interpreter
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(2, 7, 16), (3, 49, 40), (4, 197, 64), (1, 256, 24)]   # (N, L, D): odd L on purpose
RATIOS = [0.0, 0.75, 1.0]
MASK_RATIOS = [0.0, 0.5, 0.75, 0.9, 1.0]
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


@pytest.mark.parametrize("ratio", MASK_RATIOS)
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


def _cpp_decoder_input(*args):
    if DEVICE != "cpu" or _cpp.load() is None:
        pytest.skip("the compiled CPU ops are not built here")
    return decoder_input_cpp(*args)


DEC_IMPLS = {"triton": decoder_input_triton, "cpp": _cpp_decoder_input}
DEC_CASES = [  # (x dtype, mask-token dtype, pos dtype or None, cls)
    (torch.bfloat16, torch.float32, torch.float32, True),     # MAE under bf16 autocast: fp32 out, the token unrounded
    (torch.float32, torch.float32, torch.float32, True),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16, True),   # a bf16 model: bf16 out, rounded once after the add
    (torch.float16, torch.float32, None, False),              # no cls token, no position table
]


def _pos_grad_check(gp_k, gp_r, g):
    """Position-table gradient: a sum of g over the batch (N rows); the rule of the module docstring."""
    truth = g.double().sum(0)
    bound = 2 * g.shape[0] * U32 * g.double().abs().sum(0) + 1e-30
    err_k, err_r = (gp_k.double().reshape(truth.shape) - truth).abs(), (gp_r.double().reshape(truth.shape) - truth).abs()
    print(f"pos grad: kernel err {err_k.max().item():.3g}, reference err {err_r.max().item():.3g}")
    assert (err_k <= 2 * err_r + bound).all()


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "N{}-L{}-D{}".format(*s))
@pytest.mark.parametrize("case", DEC_CASES, ids=lambda c: f"{str(c[0])[6:]}-{str(c[1])[6:]}-{str(c[2])[6:]}-cls{c[3]}")
@pytest.mark.parametrize("impl", list(DEC_IMPLS))
def test_decoder_input_matches_reference(impl, case, shape, ratio):
    N, L, D = shape
    xdt, tdt, pdt, cls = case
    c = int(cls)
    x0, noise = inputs(N, L, D, torch.float32, seed=2)
    _, mask, ids = random_masking_ref(x0, ratio, noise)
    K = int(L * (1 - ratio))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, c + K, D, generator=g).to(DEVICE, xdt).requires_grad_()
    tok = torch.randn(1, 1, D, generator=g).to(DEVICE, tdt).requires_grad_()
    pos = None if pdt is None else torch.randn(1, c + L, D, generator=g).to(DEVICE, pdt).requires_grad_()
    ids_before = ids.clone()
    out_k, out_r = DEC_IMPLS[impl](x, tok, ids, pos, cls), decoder_input_ref(x, tok, ids, pos, cls)
    assert_same("decoder_input", out_k, out_r)
    assert torch.equal(ids, ids_before)
    gout = torch.randn(out_r.shape, generator=g).to(DEVICE, out_r.dtype)
    wrt = (x, tok) + ((pos,) if pos is not None else ())
    grads_k, grads_r = torch.autograd.grad(out_k, wrt, gout), torch.autograd.grad(out_r, wrt, gout)
    assert_same("grad x", grads_k[0], grads_r[0])
    assert grads_k[1].shape == tok.shape and grads_k[1].dtype == tok.dtype
    _token_grad_check(grads_k[1], grads_r[1], gout[:, c:], mask.bool(), out_r.dtype)
    if pos is not None:
        _pos_grad_check(grads_k[2], grads_r[2], gout)


@pytest.mark.parametrize("impl", list(DEC_IMPLS))
def test_decoder_input_noncontiguous_and_errors(impl):
    x, noise = inputs(2, 49, 32, torch.float32)
    _, _, ids = random_masking_ref(x, 0.75, noise)
    xt = torch.randn(2, 32, 13, device=DEVICE).transpose(1, 2)             # [2, 1 + 12, 32], non-contiguous
    tok = torch.randn(32, device=DEVICE)
    pos = torch.randn(32, 50, device=DEVICE).t()                              # [50, 32], non-contiguous
    assert_same("non-contiguous", DEC_IMPLS[impl](xt, tok, ids, pos, True), decoder_input_ref(xt, tok, ids, pos, True))
    with pytest.raises(ValueError, match=r"pos_embed must be \[50, 32\]"):
        DEC_IMPLS[impl](xt, tok, ids, pos[1:], True)
    with pytest.raises(ValueError, match="mask_token must hold D=32"):
        DEC_IMPLS[impl](xt, tok[1:], ids, pos, True)


def test_gradcheck_float64():
    """The references and the kernels (float64 through the interpreter / GPU) against numerical gradients."""
    N, L, D = 2, 5, 3
    x = torch.randn(N, L, D, dtype=torch.float64, device=DEVICE, requires_grad=True)
    noise = torch.rand(N, L, device=DEVICE)
    tok = torch.randn(D, dtype=torch.float64, device=DEVICE, requires_grad=True)
    _, _, ids = random_masking_ref(x.detach(), 0.6, noise)
    xv = torch.randn(N, 2, D, dtype=torch.float64, device=DEVICE, requires_grad=True)
    xc = torch.randn(N, 3, D, dtype=torch.float64, device=DEVICE, requires_grad=True)    # cls + 2 kept tokens
    pos = torch.randn(1, 1 + L, D, dtype=torch.float64, device=DEVICE, requires_grad=True)
    decoders = [decoder_input_ref, decoder_input_triton] + ([decoder_input_cpp] if DEVICE == "cpu" and _cpp.load() else [])
    for masking, unshuffle in ((random_masking_ref, unshuffle_ref), (random_masking_triton, unshuffle_triton)):
        assert torch.autograd.gradcheck(lambda t: masking(t, 0.6, noise)[0], (x,))
        assert torch.autograd.gradcheck(lambda a, b: unshuffle(a, b, ids), (xv, tok))
    for dec in decoders:
        assert torch.autograd.gradcheck(lambda a, b, c: dec(a, b, ids, c, True), (xc, tok, pos), fast_mode=True)


def test_decoder_input_cpp_opcheck():
    """Schema, fake kernel and autograd registration of the compiled decoder_input are consistent."""
    if DEVICE != "cpu" or _cpp.load() is None:
        pytest.skip("the compiled CPU ops are not built here")
    x, noise = inputs(3, 10, 8, torch.float32)
    _, _, ids = random_masking_ref(x, 0.6, noise)
    xb = torch.randn(3, 5, 8, dtype=torch.bfloat16, requires_grad=True)
    for pos, cls in ((torch.randn(1, 11, 8, requires_grad=True), True), (None, True), (torch.randn(10, 8), False)):
        xin = xb if cls else xb[:, 1:].detach().requires_grad_()
        torch.library.opcheck(torch.ops.maect.decoder_input, (xin, torch.randn(8, requires_grad=True), ids, pos, cls))
    torch.library.opcheck(torch.ops.maect.decoder_input_backward, (torch.randn(3, 11, 8), ids, 4, True))


def test_empty_batch_falls_back():
    x = torch.randn(0, 7, 4, device=DEVICE)
    for a, b in zip(random_masking_triton(x, 0.5), random_masking_ref(x, 0.5)):
        assert a.shape == b.shape
    ids = torch.empty(0, 7, dtype=torch.long, device=DEVICE)
    assert unshuffle_triton(x[:, :3], torch.zeros(4, device=DEVICE), ids).shape == (0, 7, 4)
    assert decoder_input_triton(x[:, :4], torch.zeros(4, device=DEVICE), ids, torch.zeros(8, 4, device=DEVICE)).shape \
        == (0, 8, 4)


@gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(256, 196, 768), (256, 196, 1024), (256, 256, 1280)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_vit_shapes(shape, dtype):
    """The Triton kernels at the ViT shapes, called directly (the dispatch table picks torch's path on the GPU until
    bench/masked_gather.py measures otherwise): exact against the references."""
    x, noise = inputs(*shape, dtype)
    for a, b in zip(random_masking_triton(x, 0.75, noise), random_masking_ref(x, 0.75, noise)):
        assert_same("masking", a, b)
    x_vis, mask, ids = random_masking_ref(x, 0.75, noise)
    dec = torch.randn(shape[0], 1 + x_vis.shape[1], 512, device=DEVICE, dtype=dtype)
    tok = torch.randn(512, device=DEVICE)
    pos = torch.randn(1, 1 + shape[1], 512, device=DEVICE)
    assert_same("unshuffle", unshuffle_triton(dec[:, 1:], tok, ids), unshuffle_ref(dec[:, 1:], tok, ids))
    assert_same("decoder_input", decoder_input_triton(dec, tok, ids, pos), decoder_input_ref(dec, tok, ids, pos))


