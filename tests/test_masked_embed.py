"""masked_patch_embed (kernels/ops/masked_patch_embed.py), the masking ops' dispatch (kernels/dispatch.py) and the
MAE
model's use.

Tolerances (derived, not tuned). mask and ids_restore are integers / 0-1 values and must equal the reference
exactly. The kept tokens are the reference's convolution outputs computed as a GEMM of the kept patches: the same
products summed in another order, so the two may differ by embed_error_bound (kernels/ops/masked_patch_embed.py: 2 n u S for
n = Cpp + 1 terms accumulated in fp32 with sum of |terms| S, plus each side's rounding to the GEMM dtype and its
position add). The weight and bias gradients are sums over rows: the reference sums N L rows (its masked rows add
exact zeros), the fused paths N K; against the fp64 truth of the same rounded operands each must be within
2 x the reference's own error + its own bound (one side of dot_error_bound with n = N L, rounded to the GEMM dtype):
the flash-attention rule, because the reference's low-precision kernels need not accumulate in fp32 throughout (the
CPU fp16 convolution's weight gradient does not). The MAE loss on a fixed batch: see test_mae_loss_unchanged.
"""
import json

import pytest
import torch

from maect import kernels
from maect.kernels import dispatch as D
from maect.kernels._util import masking_key
from maect.kernels.ops import masked_patch_embed as ME
from maect.kernels.ops.masked_patch_embed import (masked_patch_embed_gather, masked_patch_embed_ref,
                                                  masked_patch_embed_triton, mask_indices_ref, mask_indices_torch,
                                                  mask_indices_triton)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"     # cpu: the Triton interpreter (tests/conftest.py)
IMPLS = {"gather": masked_patch_embed_gather, "fused": masked_patch_embed_triton}
SHAPES = [  # (N, C, H, W, p, D): B/16-, L/16- (non-square) and H/14-like patch sizes at small widths; odd L
    (2, 3, 48, 48, 16, 64),     # L = 9
    (2, 3, 48, 80, 16, 96),     # L = 15
    (2, 3, 70, 70, 14, 40),     # L = 25, Cpp = 588: not a multiple of the GEMM's K block
    (3, 1, 28, 28, 4, 24),      # L = 49, one channel (Fashion-MNIST-like)
]
RATIOS = [0.0, 0.5, 0.75, 0.9, 1.0]


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 means fp32: cuDNN's convolution (the reference) would otherwise run in TF32 on a GPU."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


def make(N, C, H, W, p, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = (H // p) * (W // p)
    imgs = torch.randn(N, C, H, W, generator=g)
    w = torch.randn(D, C, p, p, generator=g) * (6 / (D + C * p * p)) ** 0.5
    b = 0.1 * torch.randn(D, generator=g)
    pos = torch.randn(1, 1 + L, D, generator=g)[:, 1:]           # the model passes pos_embed[:, 1:]: a view
    noise = torch.rand(N, L, generator=g)
    to = dict(device=DEVICE)
    return (imgs.to(dtype).to(**to), w.to(dtype).to(**to).requires_grad_(), b.to(dtype).to(**to).requires_grad_(),
            pos.to(**to), noise.to(**to))


def run(fn, imgs, w, b, pos, ratio, noise, g_seed=1, autocast=False):
    with torch.autocast(imgs.device.type, dtype=torch.bfloat16, enabled=autocast):
        x, mask, ids = fn(imgs, w, b, pos, ratio, noise)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(g_seed)).to(x)
    gw, gb = torch.autograd.grad(x, (w, b), g, allow_unused=True) if x.numel() else (torch.zeros_like(w), None)
    return x, mask, ids, gw if gw is not None else torch.zeros_like(w), gb if gb is not None else torch.zeros_like(b), g


def compare(got, ref, imgs, w, b, pos, noise, ratio, mm):
    x, mask, ids, gw, gb, g = got
    rx, rmask, rids, rgw, rgb, _ = ref
    assert torch.equal(mask, rmask) and torch.equal(ids, rids) and mask.dtype == x.dtype == rx.dtype
    assert x.shape == rx.shape and gw.dtype == w.dtype and gb.dtype == b.dtype
    N, K = x.shape[:2]
    ids_keep = torch.argsort(noise, dim=1, stable=True)[:, :K]
    e_x = ME.embed_error_bound(imgs, w, b, pos, ids_keep, mm, x.dtype)
    G = g.reshape(-1, x.shape[-1]).to(mm).double()
    A = ME.gather_patches(imgs.to(mm), ids_keep, w.shape[-1]).flatten(0, 1).double()
    d = (x.double() - rx.double()).abs()
    print(f"x_visible: max |impl - ref| = {d.max().item() if d.numel() else 0:.3g}, "
          f"max diff/bound = {(d / e_x.clamp_min(1e-300)).max().item() if d.numel() else 0:.3g}")
    assert (d <= e_x).all(), "x_visible"
    # gradients: the reference's low-precision weight-gradient kernels may round partial sums (the CPU fp16 conv
    # does), so against the fp64 truth of the same rounded operands: |impl - truth| <= 2 |ref - truth| + impl's own
    # bound (one side of dot_error_bound)
    nl = N * mask.shape[1]
    tw, tb = G.t() @ A, G.sum(0)
    e_w = ME.dot_error_bound(G.abs().t() @ A.abs(), tw, nl, torch.float32, mm) / 2
    e_b = ME.dot_error_bound(G.abs().sum(0), tb, nl, torch.float32, mm) / 2
    for name, a, r, t, e in (("grad weight", gw, rgw, tw, e_w), ("grad bias", gb, rgb, tb, e_b)):
        err, err_ref = (a.double().reshape(t.shape) - t).abs(), (r.double().reshape(t.shape) - t).abs()
        print(f"{name}: max err {err.max().item():.3g}, reference's {err_ref.max().item():.3g}")
        assert (err <= 2 * err_ref + e).all(), name


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-C{}-{}x{}-p{}-D{}".format(*s))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_matches_reference(impl, shape, ratio):
    imgs, w, b, pos, noise = make(*shape)
    before = imgs.clone(), noise.clone()
    ref = run(masked_patch_embed_ref, imgs, w, b, pos, ratio, noise)
    got = run(IMPLS[impl], imgs, w, b, pos, ratio, noise)
    assert torch.equal(imgs, before[0]) and torch.equal(noise, before[1])
    compare(got, ref, imgs, w, b, pos, noise, ratio, torch.float32)


@pytest.mark.parametrize("regime", ["bf16", "fp16", "autocast-bf16", "fp64"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_dtypes(impl, regime):
    """bf16 / fp16 parameters and images (fp32 position table: fp32 output, as in MAE), fp32 parameters under bf16
    autocast (the training step: the GEMM in bf16, images cast in the kernel), fp64 (interpreter / gather only)."""
    if regime == "fp64" and impl == "fused" and DEVICE == "cuda":
        pytest.skip("fp64 on the GPU: the Triton path declines to the gather path")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}.get(regime, torch.float32)
    imgs, w, b, pos, noise = make(2, 3, 70, 70, 14, 40, dtype)
    pos = pos.double() if regime == "fp64" else pos
    autocast = regime == "autocast-bf16"
    ref = run(masked_patch_embed_ref, imgs, w, b, pos, 0.75, noise, autocast=autocast)
    got = run(IMPLS[impl], imgs, w, b, pos, 0.75, noise, autocast=autocast)
    assert got[0].dtype == (torch.float64 if regime == "fp64" else torch.float32)
    compare(got, ref, imgs, w, b, pos, noise, 0.75, torch.bfloat16 if autocast else dtype)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_all_bf16_and_noncontiguous(impl):
    """A bf16 position table (bf16 output, rounded once after the add) and non-contiguous everything: a strided
    window of a channels-last image batch, a channels-last weight, a transposed position table."""
    imgs, w, b, pos, noise = make(2, 3, 48, 80, 16, 96)
    big = torch.randn(2, 3, 50, 90, device=DEVICE).contiguous(memory_format=torch.channels_last)
    big[:, :, 1:49, 5:85] = imgs
    imgs_nc = big[:, :, 1:49, 5:85]
    w_nc = w.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    pos_nc = pos.transpose(1, 2).contiguous().transpose(1, 2)
    assert not imgs_nc.is_contiguous() and not w_nc.is_contiguous() and not pos_nc.is_contiguous()
    ref = run(masked_patch_embed_ref, imgs, w, b, pos, 0.75, noise)
    got = run(IMPLS[impl], imgs_nc, w_nc, b, pos_nc, 0.75, noise)
    compare(got, ref, imgs, w, b, pos, noise, 0.75, torch.float32)
    bf = [t.detach().bfloat16().requires_grad_(t.requires_grad) for t in (imgs, w, b, pos)]
    ref = run(masked_patch_embed_ref, *bf, 0.75, noise)
    got = run(IMPLS[impl], *bf, 0.75, noise)
    assert got[0].dtype == torch.bfloat16
    compare(got, ref, *bf, noise, 0.75, torch.bfloat16)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_gradcheck_float64(impl):
    """Every input's gradient (images, weight, bias, a learnable position table) against numerical gradients, and
    the reference's on the same inputs; no bias and no position table as well."""
    g = torch.Generator().manual_seed(3)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()  # noqa: E731
    imgs, w, b, pos = mk(2, 2, 4, 8), mk(3, 2, 4, 4), mk(3), mk(2, 3)
    noise = torch.rand(2, 2, generator=g).to(DEVICE)
    fn = IMPLS[impl]
    if DEVICE == "cuda" and impl == "fused":
        pytest.skip("fp64 on the GPU: the Triton path declines to the gather path")
    # fast_mode: a few random directions instead of one column per input element (interpreter calls are slow)
    assert torch.autograd.gradcheck(lambda *a: fn(*a, 0.5, noise)[0], (imgs, w, b, pos), fast_mode=True)
    assert torch.autograd.gradcheck(lambda i, ww: fn(i, ww, None, None, 0.5, noise)[0], (imgs, w), fast_mode=True)
    got = torch.autograd.grad(fn(imgs, w, b, pos, 0.5, noise)[0].sum(), (imgs, w, b, pos))
    want = torch.autograd.grad(masked_patch_embed_ref(imgs, w, b, pos, 0.5, noise)[0].sum(), (imgs, w, b, pos))
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("L", [7, 49, 197])
def test_mask_indices_ties_and_generator(L):
    """The index kernel and the one-argsort path equal MAE's two argsorts, also with many ties (the stable rule:
    lower position first); without noise every path draws torch.rand with the given generator like the reference."""
    g = torch.Generator().manual_seed(L)
    for noise in (torch.rand(3, L, generator=g), (torch.rand(3, L, generator=g) * 4).floor()):
        noise = noise.to(DEVICE)
        for K in (0, L // 4, L // 2 + 1, L):
            want = mask_indices_ref(noise, K)
            got_t = mask_indices_torch(noise, K)
            got_k = mask_indices_triton(noise, K, torch.float32)
            assert all(torch.equal(a, b) for a, b in zip(got_t, want))
            assert torch.equal(got_k[0], want[0]) and torch.equal(got_k[2], want[2])
            assert torch.equal(got_k[1], want[1].float())
    imgs, w, b, pos, _ = make(2, 3, 48, 48, 16, 64)
    gen = lambda: torch.Generator(device=DEVICE).manual_seed(11)  # noqa: E731
    want = masked_patch_embed_ref(imgs, w, b, pos, 0.6, None, gen())
    for fn in IMPLS.values():
        got = fn(imgs, w, b, pos, 0.6, None, gen())
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


def test_bad_input_is_a_clear_error():
    imgs, w, b, pos, noise = make(2, 3, 48, 48, 16, 64)
    for fn in (masked_patch_embed_ref, *IMPLS.values(), kernels.masked_patch_embed):
        with pytest.raises(ValueError, match="mask_ratio=1.5"):
            fn(imgs, w, b, pos, 1.5, noise)
        with pytest.raises(ValueError, match=r"not divisible by patch size 16"):
            fn(imgs[..., :40], w, b, pos, 0.75, noise)
        with pytest.raises(ValueError, match=r"pos_embed must be \[9, 64\]"):
            fn(imgs, w, b, pos[:, 1:], 0.75, noise)
        with pytest.raises(ValueError, match=r"noise must be \[N, L\]=\(2, 9\)"):
            fn(imgs, w, b, pos, 0.75, noise[:, 1:])
    with pytest.raises(ValueError, match="imgs are torch.float64 but the weight is torch.float32"):
        masked_patch_embed_gather(imgs.double(), w, b, pos, 0.75, noise)


# ---------------------------------------------------------------------------------------------------------------
# dispatch: static defaults, cached decisions, requests by name, MAECT_KERNELS=0

MASKING_OPS = ("random_masking", "unshuffle", "decoder_input", "masked_patch_embed")




def test_static_defaults_keep_torch_on_gpu_until_measured(fresh_dispatch):
    """The documented static defaults (no decision made or cached): on CUDA every masking op runs MAE's torch path
    (the standalone Triton kernels were measured slower on an H200; the fused paths are unmeasured) until a decision
    says otherwise; every default names a backend of its op, and none on CPU is a Triton backend (those never run
    undecided through the interpreter)."""
    for op in MASKING_OPS:
        o = D.get(op)
        assert o.default["cuda"] == o.backends[0].name == "ref", op
        assert o.default["cpu"] in o.names() and not o.backend(o.default["cpu"]).cuda_timed_only, op


def _static(op, dev, meta):
    o = D.get(op)
    name = o.default.get(dev.type, o.backends[0].name)
    return o.backend(name if D._unavailable(o, name, dev, meta) is None else o.backends[0].name).fn


def test_dispatch_rules(fresh_dispatch):
    """lookup's rules (kernels/dispatch.py) on the masking ops: a cached decision for the shape class, else the
    static default; a cached pick that cannot run here (unknown, or a Triton kernel on CPU) falls to the static
    default; a backend asked by argument or by force() runs (Triton on CPU in the interpreter); MAECT_KERNELS=0 runs
    the reference unless a backend is asked by argument; an unknown or unrunnable request is a ValueError naming
    why."""
    mp = fresh_dispatch
    dev = torch.device(DEVICE)
    m64, m256 = ("fp32", 64, 32, False), ("fp32", 256, 32, False)
    pick = "ref" if DEVICE == "cpu" else "gather"                                 # not the static default
    dk = D.device_key(dev)
    entries = {f"{dk}|masked_patch_embed|{masking_key(m64)}": {"pick": pick},
               f"{dk}|decoder_input|{masking_key(m64)}": {"pick": "no_such_backend"},
               f"{dk}|unshuffle|{masking_key(m64)}": {"pick": "triton"}}
    D.cache_dir().mkdir(parents=True)
    (D.cache_dir() / "dispatch.json").write_text(json.dumps({"format": D.CACHE_FORMAT, "entries": entries}))
    fn = lambda op, name: D.get(op).backend(name).fn                              # noqa: E731
    look = lambda op, meta, asked=None: D.lookup(op, meta, dev, asked)            # noqa: E731
    assert look("masked_patch_embed", m64) is fn("masked_patch_embed", pick)      # the shape class's decision
    assert look("masked_patch_embed", m256) is _static("masked_patch_embed", dev, m256)   # no decision: default
    assert look("decoder_input", m64) is _static("decoder_input", dev, m64)       # a pick that cannot run
    # a cached pick never runs through the Triton interpreter (on CPU); asked by name it may
    assert look("unshuffle", m64) is (fn("unshuffle", "triton") if DEVICE == "cuda" else
                                      _static("unshuffle", dev, m64))
    assert look("unshuffle", m64, "triton") is fn("unshuffle", "triton")
    assert look("masked_patch_embed", m64, "fused") is fn("masked_patch_embed", "fused")      # asked by argument
    D.force("masked_patch_embed", "fused")                                                    # asked by force()
    assert look("masked_patch_embed", m64) is fn("masked_patch_embed", "fused")
    assert look("random_masking", m256) is _static("random_masking", dev, m256)  # force() is per op
    with pytest.raises(ValueError, match="random_masking: unknown backend 'fused'"):
        D.force("random_masking", "fused")
    mp.setenv("MAECT_KERNELS", "0")
    assert look("masked_patch_embed", m64) is masked_patch_embed_ref              # rule 1 wins over force()
    assert look("masked_patch_embed", m64, "gather") is fn("masked_patch_embed", "gather")   # not over an argument
    mp.setenv("MAECT_KERNELS", "1")
    D.force("masked_patch_embed", None)
    assert look("masked_patch_embed", m64) is fn("masked_patch_embed", pick)
    with pytest.raises(ValueError, match="unknown backend 'gather'"):
        look("decoder_input", m64, "gather")
    if DEVICE == "cpu":
        mp.setenv("TRITON_INTERPRET", "0")                                       # Triton on CPU: interpreter only
        D.clear()
        with pytest.raises(ValueError, match="run on CUDA"):
            look("masked_patch_embed", m64, "fused")


def test_public_ops_run_the_chosen_backend(fresh_dispatch):
    imgs, w, b, pos, noise = make(2, 3, 48, 48, 16, 64)
    for name in ("ref", "gather", "fused"):
        got = kernels.masked_patch_embed(imgs, w, b, pos, 0.75, noise, backend=name)
        want = {"ref": masked_patch_embed_ref, **IMPLS}[name](imgs, w, b, pos, 0.75, noise)
        assert all(torch.equal(a, c) for a, c in zip(got, want)), name


# ---------------------------------------------------------------------------------------------------------------
# the model: MAE's loss and gradients through every backend equal the reference path's

def tiny_mae(dtype):
    from maect.models.vit import build_model
    torch.manual_seed(0)
    m = build_model("custom", img_size=28, patch_size=4, embed_dim=32, depth=1, num_heads=4, decoder_embed_dim=16,
                    decoder_depth=1, decoder_num_heads=2).to(DEVICE, dtype)
    return m


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_mae_loss_unchanged(fresh_dispatch, dtype):
    """MAE loss, prediction and every parameter gradient on a fixed batch and noise: each backend against the
    reference path (MAECT_KERNELS=0). mask / ids are exact and the decoder input is exact, so the only difference
    is the embedding's summation order (bounded above). fp64: that difference is ~1e-16 relative, so the loss and
    gradients must agree to 1e-10 relative - any wrong patch, position or mask token moves them by >1e-3. fp32: the
    embeddings may differ by ~2 (Cpp+1) u ~ 6e-6 relative; the loss and gradients of this 1-block model are smooth
    averages of them, so 1e-4 relative (+1e-6 absolute for near-zero gradient entries) is well above that and
    still far below a semantic error."""
    mp = fresh_dispatch
    m = tiny_mae(dtype)
    g = torch.Generator().manual_seed(5)
    imgs = torch.randn(3, 3, 28, 28, generator=g).to(DEVICE, dtype)
    noise = torch.rand(3, 49, generator=g).to(DEVICE)

    def loss_and_grads():
        m.zero_grad(set_to_none=True)
        loss, pred, mask = m(imgs, 0.75, True, noise)
        loss.backward()
        return loss.detach(), pred.detach(), mask, {n: p.grad.clone() for n, p in m.named_parameters()
                                                     if p.grad is not None}

    mp.setenv("MAECT_KERNELS", "0")
    ref = loss_and_grads()
    mp.setenv("MAECT_KERNELS", "1")
    rtol, atol = (1e-10, 1e-14) if dtype == torch.float64 else (1e-4, 1e-6)
    cpp = D.get("masked_patch_embed").backend("cpp").why_not(torch.device(DEVICE), ()) is None
    for name in ["gather", "fused"] + (["cpp"] if cpp else []):
        for op in ("masked_patch_embed", "decoder_input"):       # the decoder input too, where it has that backend
            D.force(op, name if name in D.get(op).names() else None)
        loss, pred, mask, grads = loss_and_grads()
        print(f"{name}: loss {loss.item():.10g} vs ref {ref[0].item():.10g}")
        assert torch.equal(mask, ref[2])
        torch.testing.assert_close(loss, ref[0], rtol=rtol, atol=atol)
        torch.testing.assert_close(pred, ref[1], rtol=rtol, atol=atol)
        assert grads.keys() == ref[3].keys()
        for n in grads:
            torch.testing.assert_close(grads[n], ref[3][n], rtol=rtol, atol=atol, msg=f"{name}: grad {n}")
