"""The compiled CPU ops (csrc/ via kernels/_cpp.py) against the references in kernels/ops/.

The first run builds the extension just in time (~1 min on 2 cores, then cached). If it cannot be built these tests
FAIL (a CI machine without a compiler must not pass silently); nothing skips them. The fallback test (extension
unavailable -> the torch path) patches the loader in-process.

Top-k rule (STYLE.md): the returned values must equal the similarities at the returned indices and the reference's
values within rounding noise; indices must be identical wherever the reference's value is separated from every other
similarity in its row by more than that noise. Inputs with small integer entries make every dot product exact in
fp32, so there (ties, duplicated rows) values and indices must be bit-identical to the reference.
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from maect import kernels
from maect.kernels import _cpp
from maect.kernels import dispatch as D
from maect.kernels.ops.queue_topk import _meta as qt_meta
from maect.kernels.ops.queue_topk import queue_topk_cpp, queue_topk_ref, queue_topk_torch, similarity_ref
from maect.kernels.ops.random_masking import random_masking_cpp, random_masking_ref
from maect.kernels.ops.unshuffle import unshuffle_cpp, unshuffle_ref

pytestmark = pytest.mark.usefixtures("fresh_dispatch")     # tests/conftest.py: no decision, a fresh cache


@pytest.fixture(scope="module")
def ext():
    mod = _cpp.load()
    assert mod is not None, ("the maect C++ extension did not build/load (see the 'maect.kernels' warning; "
                             "logging level DEBUG on maect.kernels shows the build log)")
    return mod


def _noise_tol(D: int) -> float:
    # fp32 dot product of two unit vectors: |error| <= D * 2^-24 (recursive summation bound) plus a few ulps from the
    # normalisation; the reference and the kernel sum in different orders, so each may sit anywhere in that band.
    return 2 * (D + 8) * 2.0 ** -24


def _check_topk(query, queue, k, exclude_ids=None, queue_ids=None, normalized=True):
    """Run the compiled op and the reference on the same inputs; assert the contract (see the module docstring)."""
    before = [t.clone() for t in (query, queue) + ((exclude_ids, queue_ids) if exclude_ids is not None else ())]
    v, i = queue_topk_cpp(query, queue, k, exclude_ids, queue_ids, normalized)
    after = [query, queue] + ([exclude_ids, queue_ids] if exclude_ids is not None else [])
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "inputs were modified"
    rv, ri = queue_topk_ref(query, queue, k, exclude_ids, queue_ids, normalized)
    assert v.dtype == torch.float32 and i.dtype == torch.int64 and v.shape == i.shape == (query.shape[0], k)
    sim = similarity_ref(query, queue, exclude_ids, queue_ids, normalized)
    tol = _noise_tol(query.shape[1])
    print(f"max |value - ref| = {(v - rv).abs().nan_to_num(0.0).max().item() if v.numel() else 0:.3g} (tol {tol:.3g})")
    pad = i == -1
    assert torch.equal(pad, ri == -1), "padding (-1) positions differ from the reference"
    assert torch.all(v[pad] == float("-inf")) and torch.all(v[~pad] > float("-inf"))
    valid = i.clamp_min(0)
    at_idx = sim.gather(1, valid)
    assert torch.all(at_idx[~pad] > float("-inf")), "an excluded entry was returned"
    torch.testing.assert_close(v[~pad], at_idx[~pad], rtol=0, atol=tol)   # values are the similarities at indices
    torch.testing.assert_close(v[~pad], rv[~pad], rtol=0, atol=tol)       # ... and the k largest
    assert torch.all(v[:, 1:][~pad[:, 1:]] <= v[:, :-1][~pad[:, 1:]]), "values not in descending order"
    rows_sorted = i.masked_fill(pad, -1).sort(dim=1).values
    assert torch.all((rows_sorted[:, 1:] != rows_sorted[:, :-1]) | (rows_sorted[:, 1:] == -1)), "duplicate index"
    # identical indices wherever the reference's value has no other similarity within the noise band in its row
    srt = sim.sort(dim=1).values
    near = torch.searchsorted(srt, rv + 2 * tol, right=True) - torch.searchsorted(srt, rv - 2 * tol)  # [B, k]
    unique = (near == 1) & ~pad
    assert torch.equal(i[unique], ri[unique]), "index differs where the similarity gap exceeds rounding noise"
    return v, i, rv, ri


def _inputs(B, Q, D, dtype, normalized, seed=0, n_ids=None):
    g = torch.Generator().manual_seed(seed)
    q, e = torch.randn(B, D, generator=g), torch.randn(Q, D, generator=g)
    if normalized:
        q, e = F.normalize(q, dim=1), F.normalize(e, dim=1)
    ids = None
    if n_ids:
        ids = torch.randint(0, n_ids, (B,), generator=g), torch.randint(0, n_ids, (Q,), generator=g)
    return q.to(dtype), e.to(dtype), ids


# ---------------------------------------------------------------------------------------------------------------
# queue_topk

SHAPES = [  # (B, Q, D, k): realistic (NNCLR-like) and odd (Q not a multiple of the 512-row block, B = 1 / odd / prime)
    (256, 8192, 256, 20),
    (200, 1537, 96, 5),
    (37, 1000, 33, 7),
    (1, 517, 64, 1),
    (3, 2049, 16, 64),
    (5, 300, 16, 300),  # k = Q
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("B,Q,D,k", SHAPES)
def test_queue_topk_matches_reference(ext, B, Q, D, k, normalized, dtype):
    q, e, ids = _inputs(B, Q, D, dtype, normalized, n_ids=max(2, Q // 4))
    if not normalized:  # on-the-fly normalisation must not care about the scale of either side
        q, e = q * 3.0, e * torch.linspace(0.01, 50, Q, dtype=dtype).unsqueeze(1)
    _check_topk(q, e, k, *ids, normalized=normalized)
    _check_topk(q, e, k, normalized=normalized)


@pytest.mark.parametrize("threads", [1, 3, 4])
def test_queue_topk_work_splits(ext, threads):
    """Row tiles handed out dynamically (B=1100 -> 3 tiles of 512) and queue chunks merged (B=1, 60 with 3-4 threads)
    give the same answer as the reference whatever the thread count."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for B in (1, 60, 130, 1100):
            q, e, ids = _inputs(B, 2049, 24, torch.float32, True, seed=B, n_ids=300)
            _check_topk(q, e, 11, *ids)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("B,Q,D,k", [(64, 1100, 16, 10), (1, 700, 8, 1), (9, 260, 4, 260), (130, 513, 8, 33)])
def test_queue_topk_ties_exact(ext, B, Q, D, k):
    """Entries in {-1, 0, 1}: every similarity is an exact small integer -> massive ties, duplicated queue rows;
    values and indices must equal the reference bit for bit (lower index first among equals)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-1, 2, (B, D), generator=g).float()
    e = torch.randint(-1, 2, (Q, D), generator=g).float()
    e[Q // 2:Q // 2 + 40] = e[:40]  # duplicated rows, far apart
    for dtype in (torch.float32, torch.bfloat16):
        ex, qid = torch.randint(0, 7, (B,), generator=g), torch.randint(0, 7, (Q,), generator=g)
        for args in ((None, None), (ex, qid)):
            v, i, rv, ri = _check_topk(q.to(dtype), e.to(dtype), k, *args)
            assert torch.equal(v, rv) and torch.equal(i, ri)


def test_queue_topk_exclusion_and_padding(ext):
    B, Q, D, k = 6, 40, 8, 10
    q, e, _ = _inputs(B, Q, D, torch.float32, True)
    qid = torch.arange(Q) % 4                      # ids 0..3, ten queue rows each
    ex = torch.tensor([0, 1, 2, 3, 9, 0])          # 9 matches nothing
    qid_all = torch.zeros(Q, dtype=torch.long)
    v, i, _, _ = _check_topk(q, e, k, ex, qid)
    assert torch.all(i >= 0) and torch.all(qid[i] != ex.unsqueeze(1))
    # rows 0 and 5 exclude everything (id 0), row 4 nothing: all-excluded rows are all (-inf, -1)
    v, i, _, _ = _check_topk(q, e, k, ex, qid_all)
    assert torch.all(i[[0, 5]] == -1) and torch.all(v[[0, 5]] == float("-inf")) and torch.all(i[1:5] >= 0)
    # fewer than k admissible entries: 30 admissible, k = 35 -> 5 padded at the end of each row
    v, i, _, _ = _check_topk(q, e, 35, ex.clamp_max(3), qid)
    assert torch.all(i[:, 30:] == -1) and torch.all(i[:, :30] >= 0)
    # int32 ids work too
    _check_topk(q, e, k, ex.int(), qid.int())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_queue_topk_non_contiguous(ext, dtype):
    g = torch.Generator().manual_seed(2)
    base_q = torch.randn(48, 2 * 40, generator=g).to(dtype)
    q = base_q[::2, ::2]                                       # strided rows and columns
    e_t = torch.randn(40, 777, generator=g).to(dtype).t()      # [777, 40] transposed: column stride != 1
    e_slice = torch.randn(777, 60, generator=g).to(dtype)[:, 10:50]  # unit column stride, row stride 60
    ids = torch.randint(0, 20, (24,), generator=g), torch.randint(0, 20, (777,), generator=g)
    for e in (e_t, e_slice):
        assert not q.is_contiguous() and not e.is_contiguous()
        _check_topk(q, e, 9, *ids, normalized=False)
        _check_topk(q, e, 9, normalized=True)


def test_queue_topk_edge_cases(ext):
    e = torch.randn(10, 4)
    v, i = queue_topk_cpp(torch.empty(0, 4), e, 3)
    assert v.shape == i.shape == (0, 3)
    for bad_k in (0, 11):
        with pytest.raises(ValueError):
            kernels.queue_topk(torch.randn(2, 4), e, bad_k)
    # no decision (a fresh cache, fixture fresh_dispatch): the static default on CPU is the compiled op
    assert D.lookup("queue_topk", qt_meta(torch.randn(2, 4), e, 3), e.device) is queue_topk_cpp


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_queue_topk_nonfinite(ext, dtype, normalized):
    """The non-finite rule, the same in every backend (tests/test_queue_topk.py checks the Triton kernel with the same
    inputs): NaN/inf query rows return all (-inf, -1); NaN/inf queue rows are never returned; the rest is exact."""
    from test_queue_topk import check_nonfinite, nonfinite_inputs
    q, e, ex, qi = (t.cpu() for t in nonfinite_inputs(dtype))
    v, i = queue_topk_cpp(q, e, 12, ex, qi, normalized=normalized)
    check_nonfinite(q, e, ex, qi, normalized, v, i)
    v, i = kernels.queue_topk(q, e, 12, ex, qi, normalized)          # the public dispatch (cpp here)
    check_nonfinite(q, e, ex, qi, normalized, v, i)


@pytest.mark.parametrize("normalized", [True, False])
def test_queue_topk_grad(ext, normalized):
    q, e, ids = _inputs(7, 300, 16, torch.float32, normalized, n_ids=50)
    q, e = q.requires_grad_(), e.requires_grad_()
    w = torch.randn(7, 5)
    v, i = queue_topk_cpp(q, e, 5, *ids, normalized=normalized)
    rv, ri = queue_topk_ref(q, e, 5, *ids, normalized=normalized)
    # inputs with no near tie (checked on the exact similarities: every gap among each row's 6 best exceeds twice
    # the two summation orders' rounding), so both backends select the same entries on any CPU
    qd, ed = q.detach().double(), e.detach().double()
    if not normalized:
        qd, ed = F.normalize(qd, dim=1), F.normalize(ed, dim=1)
    sim = qd @ ed.T
    if ids[0] is not None:
        sim = sim.masked_fill(ids[0][:, None] == ids[1][None, :], float("-inf"))
    exact = sim.topk(6, dim=1).values
    assert float((exact[:, :-1] - exact[:, 1:]).min()) > 4 * _noise_tol(16), "a near tie in the inputs: reseed"
    assert torch.equal(i, ri)
    got = torch.autograd.grad((v * w).sum(), (q, e))
    want = torch.autograd.grad((rv * w).sum(), (q, e))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------------------
# random_masking / unshuffle: copies, so exact (the mask-token gradient is a sum: summation order differs)

MASK_SHAPES = [(8, 196, 192), (3, 7, 5), (1, 1, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_ratio", [0.0, 0.75, 1.0])
@pytest.mark.parametrize("N,L,D", MASK_SHAPES)
def test_masking_and_unshuffle_exact(ext, N, L, D, mask_ratio, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, L, D, generator=g).to(dtype)
    for noise in (torch.rand(N, L, generator=g), torch.randint(0, 3, (N, L), generator=g).float()):  # 2nd: ties
        x0 = x.clone()
        xa = x.clone().requires_grad_()
        xb = x.clone().requires_grad_()
        out = random_masking_cpp(xa, mask_ratio, noise)
        ref = random_masking_ref(xb, mask_ratio, noise)
        for a, b in zip(out, ref):
            assert a.dtype == b.dtype and torch.equal(a, b)
        assert not out[1].requires_grad and not out[2].requires_grad
        assert torch.equal(x, x0)
        token_a = torch.randn(1, 1, D, generator=g).requires_grad_()  # fp32 token, as in MAE, cast to x's dtype
        token_b = token_a.detach().clone().requires_grad_()
        full = unshuffle_cpp(out[0], token_a, out[2])
        full_ref = unshuffle_ref(ref[0], token_b, ref[2])
        assert torch.equal(full, full_ref)
        w = torch.randn(full.shape, generator=g).to(dtype)
        ga = torch.autograd.grad((full.float() * w.float()).sum(), (xa, token_a))
        gb = torch.autograd.grad((full_ref.float() * w.float()).sum(), (xb, token_b))
        print(f"max |dx| {(ga[0] - gb[0]).abs().max().item():.3g}, "
              f"max |dtoken| {(ga[1] - gb[1]).abs().max().item():.3g}")
        assert torch.equal(ga[0], gb[0])
        # d token = a sum over the N*(L-K) masked rows, summed in another order than torch.sum: both must sit within
        # the recursive-summation bound n * 2^-24 * sum|terms| of the exact (fp64) sum, plus one rounding to dtype.
        terms = (w.double() * ref[1].unsqueeze(-1).double()).reshape(-1, D)
        exact, n = terms.sum(0), int(ref[1].sum().item())
        bound = n * 2.0 ** -24 * terms.abs().sum(0) + exact.abs() * torch.finfo(dtype).eps / 2
        for grad in (ga[1], gb[1]):
            assert torch.all((grad.double().reshape(-1) - exact).abs() <= bound)


def test_masking_generator_and_strides(ext):
    x = torch.randn(4, 50, 24)[:, ::2, 4:20]  # non-contiguous [4, 25, 16]
    a = random_masking_cpp(x, 0.6, generator=torch.Generator().manual_seed(5))
    b = random_masking_ref(x, 0.6, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(u, w) for u, w in zip(a, b))
    a_vis = a[0].transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous visible tokens
    token = torch.randn(16)
    assert torch.equal(unshuffle_cpp(a_vis, token, a[2]), unshuffle_ref(a_vis, token, a[2]))
    with pytest.raises(ValueError):
        random_masking_cpp(x, 1.5)
    with pytest.raises(RuntimeError, match="ids_restore"):
        unshuffle_cpp(a_vis, token, a[2] + 100)


def test_opcheck(ext):
    """Schema, fake kernels and autograd registration are consistent (torch.library.opcheck)."""
    q, e, (ex, qid) = _inputs(9, 130, 16, torch.float32, True, n_ids=20)
    torch.library.opcheck(torch.ops.maect.queue_topk, (q, e, 4, ex, qid, False))
    x = torch.randn(3, 10, 8, requires_grad=True)
    vis, mask, ids = torch.ops.maect.random_masking(x, torch.rand(3, 10), 4)
    torch.library.opcheck(torch.ops.maect.random_masking, (x, torch.rand(3, 10), 4))
    torch.library.opcheck(torch.ops.maect.unshuffle, (vis.detach().requires_grad_(), torch.randn(8), ids))
    torch.library.opcheck(torch.ops.maect.unshuffle_backward, (torch.randn(3, 10, 8), ids, 4))


def test_torch_compile(ext):
    def step(x, token, noise, q, e, ex, qid):
        vis, mask, ids = kernels.random_masking(x, 0.75, noise)
        full = kernels.unshuffle(vis * 2, token, ids)
        v, i = kernels.queue_topk(q, e, 5, ex, qid, normalized=False)
        return full, mask, v, i

    x, token, noise = torch.randn(2, 16, 8, requires_grad=True), torch.randn(8, requires_grad=True), torch.rand(2, 16)
    q, e, (ex, qid) = _inputs(6, 600, 8, torch.float32, False, n_ids=30)
    args = (x, token, noise, q, e, ex, qid)
    got = torch.compile(step)(*args)
    want = step(*args)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    g_got = torch.autograd.grad(got[0].sum(), (x, token))
    g_want = torch.autograd.grad(want[0].sum(), (x, token))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------------------
# fallback: no extension -> the public ops run the torch path / the reference (the same result), with one log line why

def test_fallback_when_extension_unavailable(monkeypatch, caplog):
    def fail_build():
        raise RuntimeError("Error building extension 'maect_cpu': simulated missing compiler")

    monkeypatch.setattr(_cpp, "_loaded", _cpp._UNSET)       # forget the memoised result (restored afterwards)
    monkeypatch.setattr(_cpp, "_jit_module", fail_build)
    with caplog.at_level(logging.WARNING, logger="maect.kernels"):
        assert _cpp.load() is None
        assert _cpp.load() is None  # memoised: no second attempt, no second line
    lines = [r for r in caplog.records if r.name == "maect.kernels"]
    assert len(lines) == 1 and "simulated missing compiler" in lines[0].getMessage()
    q, e, (ex, qid) = _inputs(5, 64, 8, torch.float32, True, n_ids=10)
    assert D.lookup("queue_topk", qt_meta(q, e, 3, ex), q.device) is queue_topk_torch    # the static default
    assert "did not load" in D.get("queue_topk").backend("cpp").why_not(q.device, ())        # cannot run, says why
    got, want = kernels.queue_topk(q, e, 3, ex, qid), queue_topk_ref(q, e, 3, ex, qid)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    x, noise = torch.randn(2, 8, 4), torch.rand(2, 8)
    got, want = kernels.random_masking(x, 0.5, noise), random_masking_ref(x, 0.5, noise)
    assert all(torch.equal(a, b) for a, b in zip(got, want))

