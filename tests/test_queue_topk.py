"""queue_topk: the Triton kernel against the reference (on CPU through the Triton interpreter, see conftest.py).

Tolerances (derived, not tuned). Both sides accumulate fp32 products of the same (possibly bf16/fp16) inputs; bf16 and
fp16 products are exact in fp32, so they differ only in summation order and, for normalized=False, in where the
division by the norms happens. For |q|, |e| <= 1, sum_d |q_d e_d| <= 1, so each side's rounding error is at most
D * u (u = 2^-24, fp32 unit roundoff) plus a few u for the norms: TOL = 2 * (D + 8) * u between the two.
Against the fp32 reference on the un-rounded fp32 data the low-precision rule applies: the kernel's error is at most
2 x the low-precision reference's own error + TOL.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from maect.kernels.ops import queue_topk as qt
from maect.kernels.ops.queue_topk import queue_topk_ref, queue_topk_triton, similarity_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"     # cpu: the Triton interpreter
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
U32 = 2.0 ** -24
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def tol_for(D: int) -> float:
    return 2 * (D + 8) * U32


def make(B, Q, D, dtype, seed=0, normalized=True, n_ids=7):
    """Unit-norm (or random-norm when normalized=False) query/queue in dtype, ids from a small range so that some
    entries are excluded; also the fp32 originals for the float64 truth."""
    g = torch.Generator().manual_seed(seed)
    q32, e32 = torch.randn(B, D, generator=g), torch.randn(Q, D, generator=g)
    if normalized:
        q32, e32 = F.normalize(q32, dim=1), F.normalize(e32, dim=1)
    else:
        q32, e32 = q32 * 3.0, e32 * 0.5
    ex = torch.randint(0, n_ids, (B,), generator=g)
    qi = torch.randint(0, n_ids, (Q,), generator=g)
    to = dict(device=DEVICE)
    return q32.to(dtype).to(**to), e32.to(dtype).to(**to), ex.to(**to), qi.to(**to), q32.to(**to), e32.to(**to)


def check_topk(q, e, k, ex, qi, normalized, v, i, truth=None):
    """Compare a kernel result (v, i) with the reference on the same inputs; see the module docstring."""
    B, D = q.shape
    tol = tol_for(D)
    rv, ri = queue_topk_ref(q, e, k, ex, qi, normalized)
    assert v.shape == rv.shape == (B, k) and i.shape == ri.shape and v.dtype == torch.float32 and i.dtype == torch.int64
    v, i, rv, ri = v.cpu(), i.cpu(), rv.cpu(), ri.cpu()
    fin = torch.isfinite(rv)
    diff = (v[fin] - rv[fin]).abs().max().item() if fin.any() else 0.0
    print(f"max |v - ref| = {diff:.3g} (tol {tol:.3g}); index mismatches: {(i != ri).sum().item()}")
    assert torch.equal(torch.isfinite(v), fin), "padding (-inf) positions differ"
    assert torch.equal(i[~fin], ri[~fin]) and (i[~fin] == -1).all()
    assert diff <= tol
    # every returned entry: admissible, unique, and its reference similarity equals the returned value
    sim = similarity_ref(q, e, ex, qi, normalized).cpu()
    if fin.any():
        at = sim.gather(1, i.clamp(min=0))[fin]
        print(f"max |sim_ref[idx] - v| = {(at - v[fin]).abs().max().item():.3g}")
        assert torch.isfinite(at).all(), "an excluded entry came back"
        assert ((at - v[fin]).abs() <= tol).all()
    for b in range(B):
        got = i[b][i[b] >= 0]
        assert got.unique().numel() == got.numel(), f"row {b}: duplicate indices"
    # identical indices wherever the reference's ranking is decided by more than the rounding noise
    full = sim.sort(dim=1, descending=True).values
    nxt = full[:, 1:k + 1] if full.shape[1] > k else torch.cat([full[:, 1:], full.new_full((B, 1), -float("inf"))], 1)
    prv = torch.cat([full.new_full((B, 1), float("inf")), full[:, :k - 1]], 1)
    clear = fin & ((prv - rv) > 2 * tol) & ((rv - nxt) > 2 * tol)
    assert torch.equal(i[clear], ri[clear])
    if truth is not None and q.dtype != torch.float32:   # low-precision rule against the float64 truth
        q32, e32 = truth
        tv = queue_topk_ref(q32, e32, k, ex, qi, normalized)[0].cpu()   # un-rounded data; top-k values are
        # 1-Lipschitz in the similarities, so the rule transfers from the matrix to the returned values
        err_ref = (rv[fin] - tv[fin]).abs().max().item() if fin.any() else 0.0
        err_k = (v[fin] - tv[fin]).abs().max().item() if fin.any() else 0.0
        print(f"vs fp32 data: kernel err {err_k:.3g}, {q.dtype} reference err {err_ref:.3g}")
        assert err_k <= 2 * err_ref + tol


# (B, Q, D, BLOCK_N, splits): odd sizes on purpose. Small tiles make many tiles per row, so the select kernel prunes
# with a finite threshold and recomputes flagged tiles; BLOCK_N=128 on a short queue flags every tile (k > stored).
SHAPES = [
    (1, 1, 16, 128, None), (3, 17, 40, 16, None), (5, 300, 40, 32, 3), (4, 700, 24, 16, 5), (6, 1500, 256, 32, None),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-Q{}-D{}-N{}-S{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype, shape):
    B, Q, D, bn, splits = shape
    k = min(20, Q)
    q, e, ex, qi, q32, e32 = make(B, Q, D, dtype, seed=B * Q + D)
    v, i = queue_topk_triton(q, e, k, ex, qi, True, splits=splits, config=dict(BLOCK_N=bn))
    check_topk(q, e, k, ex, qi, True, v, i, truth=(q32, e32))


@pytest.mark.parametrize("k", [1, 2, 20, 64, 128, "Q"])
@pytest.mark.parametrize("M", [2, 4])
def test_every_k(k, M):
    """k from 1 to MAX_K and k = Q, with 2 or 4 stored entries per (row, tile)."""
    B, Q, D = 3, 700, 40
    k = Q if k == "Q" else k
    q, e, ex, qi, q32, e32 = make(B, Q, D, torch.bfloat16, seed=k + M)
    v, i = queue_topk_triton(q, e, min(k, 128), ex, qi, True, config=dict(BLOCK_N=16, M=M))
    check_topk(q, e, min(k, 128), ex, qi, True, v, i, truth=(q32, e32))
    if k > 128:                                                  # k > MAX_K: the reference runs
        v, i = queue_topk_triton(q, e, k, ex, qi, True)
        rv, ri = queue_topk_ref(q, e, k, ex, qi, True)
        assert torch.equal(v, rv) and torch.equal(i, ri)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_near_duplicate_rows(dtype):
    """A queue of 6 directions plus noise of 1e-3: hundreds of similarities inside the pruning margin of the k-th,
    and most tiles hide several of the top entries (flagged), as a trained queue full of near-copies does."""
    g = torch.Generator().manual_seed(7)
    base = F.normalize(torch.randn(6, 64, generator=g), dim=1)
    e32 = F.normalize(base[torch.randint(0, 6, (900,), generator=g)] + 1e-3 * torch.randn(900, 64, generator=g), dim=1)
    q32 = F.normalize(base[:4] + 1e-3 * torch.randn(4, 64, generator=g), dim=1)
    ids = torch.randint(0, 50, (900,), generator=g)
    ex = ids[[0, 5, 9, 300]]
    q, e = q32.to(dtype).to(DEVICE), e32.to(dtype).to(DEVICE)
    for k, bn in ((20, 16), (64, 32)):
        v, i = queue_topk_triton(q, e, k, ex.to(DEVICE), ids.to(DEVICE), True, config=dict(BLOCK_N=bn))
        check_topk(q, e, k, ex.to(DEVICE), ids.to(DEVICE), True, v, i, truth=(q32.to(DEVICE), e32.to(DEVICE)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_wide_features(dtype):
    """D=768 (evaluation's k-NN on encoder features): the scan loops over D in chunks instead of keeping the query
    block resident (MAX_RESIDENT_D); the result is the same."""
    q, e, ex, qi, q32, e32 = make(2, 300, 768, dtype, seed=3)
    assert qt.TopkPlan(q, e, 10, ex, qi, True, qt.pick_config(dtype, 2, 300, 10)).scan_meta["BLOCK_D"] == 64
    v, i = queue_topk_triton(q, e, 10, ex, qi, True, config=dict(BLOCK_N=32))
    check_topk(q, e, 10, ex, qi, True, v, i, truth=(q32, e32))


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3]], ids=lambda s: "B{}-Q{}-D{}-N{}-S{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_normalizes_on_the_fly(dtype, shape):
    """normalized=False on rows of norm ~3 (query) and ~0.5 (queue): the kernel computes the norms itself."""
    B, Q, D, bn, splits = shape
    k = min(9, Q)
    q, e, ex, qi, q32, e32 = make(B, Q, D, dtype, seed=B + Q + D, normalized=False)
    v, i = queue_topk_triton(q, e, k, ex, qi, False, splits=splits, config=dict(BLOCK_N=bn))
    check_topk(q, e, k, ex, qi, False, v, i, truth=(q32, e32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_without_ids(dtype):
    q, e, _, _, q32, e32 = make(5, 300, 40, dtype)
    v, i = queue_topk_triton(q, e, 20, None, None, True, splits=2, config=dict(BLOCK_N=32))
    check_topk(q, e, 20, None, None, True, v, i, truth=(q32, e32))


@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_lower_index_first(dtype, splits, normalized):
    """Duplicated queue rows give bit-identical similarities: indices must equal the reference's exactly, across
    tiles (BLOCK_N=32 here: stored, pruned and recomputed tiles) and across splits."""
    g = torch.Generator().manual_seed(1)
    base = F.normalize(torch.randn(9, 16, generator=g), dim=1)
    e = base[torch.randint(0, 9, (600,), generator=g)].to(dtype).to(DEVICE)
    q = base[torch.randint(0, 9, (4,), generator=g)].to(dtype).to(DEVICE)    # each query equals some queue rows
    ids = torch.arange(600, device=DEVICE)
    ex = ids[[3, 150, 599, 0]]
    for k in (1, 7, 40):
        v, i = queue_topk_triton(q, e, k, ex, ids, normalized, splits=splits, config=dict(BLOCK_N=32))
        rv, ri = queue_topk_ref(q, e, k, ex, ids, normalized)
        print(f"k={k}: index mismatches {(i != ri).sum().item()}, max |v - ref| {(v - rv).abs().max().item():.3g}")
        assert torch.equal(i, ri)
        assert (v - rv).abs().max().item() <= tol_for(16)


@pytest.mark.parametrize("normalized", [True, False])
def test_zero_similarities_tie(normalized):
    """Zero queue rows give similarities of +0.0 or -0.0 (sign depends on summation): both must tie, lower index
    first, like the reference's comparisons do."""
    g = torch.Generator().manual_seed(2)
    e = torch.randn(300, 16, generator=g)
    e[torch.randperm(300, generator=g)[:250]] = 0.0
    e = torch.nn.functional.normalize(e, dim=1).to(DEVICE)
    q = -torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=1).to(DEVICE)
    v, i = queue_topk_triton(q, e, 60, None, None, normalized, splits=2, config=dict(BLOCK_N=32))
    rv, ri = queue_topk_ref(q, e, 60, None, None, normalized)
    print(f"index mismatches {(i != ri).sum().item()}, max |v - ref| {(v - rv).abs().max().item():.3g}")
    assert torch.equal(i, ri) and (v - rv).abs().max().item() <= tol_for(16)


@pytest.mark.parametrize("splits", [1, 2])
def test_excluded_rows_and_padding(splits):
    """All entries excluded -> the row is all -inf / -1; 3 admissible entries with k=5 -> 2 padding slots."""
    q, e, _, _, _, _ = make(3, 40, 16, torch.float32)
    ex = torch.tensor([5, 5, 9], device=DEVICE)
    all_five = torch.full((40,), 5, device=DEVICE)
    v, i = queue_topk_triton(q, e, 5, ex, all_five, True, splits=splits, config=dict(BLOCK_N=16))
    check_topk(q, e, 5, ex, all_five, True, v, i)
    assert (i[:2] == -1).all() and (v[:2] == float("-inf")).all() and (i[2] >= 0).all()
    three = all_five.clone()
    three[[4, 17, 33]] = 6
    v, i = queue_topk_triton(q, e, 5, ex, three, True, splits=splits, config=dict(BLOCK_N=16))
    check_topk(q, e, 5, ex, three, True, v, i)
    assert sorted(i[0, :3].tolist()) == [4, 17, 33] and (i[0, 3:] == -1).all() and (v[0, 3:] == float("-inf")).all()


def nonfinite_inputs(dtype):
    """Query rows 1 (NaN entry) and 3 (+inf entry) are non-finite; queue rows 7 (NaN), 40 (+inf), 41 (-inf) too."""
    q, e, ex, qi, _, _ = make(5, 300, 24, dtype, seed=11)
    q, e = q.clone(), e.clone()
    q[1, 3] = float("nan")
    q[3, 0] = float("inf")
    e[7, 5] = float("nan")
    e[40, 2] = float("inf")
    e[41, 9] = float("-inf")
    return q, e, ex, qi


def check_nonfinite(q, e, ex, qi, normalized, v, i):
    """The rule of every backend: non-finite similarities are never returned; non-finite query rows are empty.
    The finite rows: check_topk (identical indices wherever the ranking leads by more than the rounding noise; a
    near tie may rank either way under another summation order)."""
    rv, ri = queue_topk_ref(q, e, v.shape[1], ex, qi, normalized)
    assert (ri[[1, 3]] == -1).all() and (rv[[1, 3]] == float("-inf")).all()
    assert not torch.isin(ri, torch.tensor([7, 40, 41], device=ri.device)).any()
    assert (i[[1, 3]].cpu() == -1).all() and (v[[1, 3]].cpu() == float("-inf")).all()
    assert not torch.isin(i.cpu(), torch.tensor([7, 40, 41])).any()
    check_topk(q, e, v.shape[1], ex, qi, normalized, v, i)


@pytest.mark.filterwarnings("ignore:invalid value encountered")     # numpy inside the interpreter, on purpose
@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_rows(dtype, normalized):
    q, e, ex, qi = nonfinite_inputs(dtype)
    v, i = queue_topk_triton(q, e, 12, ex, qi, normalized, config=dict(BLOCK_N=16))
    check_nonfinite(q, e, ex, qi, normalized, v, i)


def test_empty_batch_and_bad_k():
    q, e, ex, qi, _, _ = make(0, 17, 16, torch.float32)
    v, i = queue_topk_triton(q, e, 5, ex, qi, True)
    assert v.shape == (0, 5) and i.shape == (0, 5) and i.dtype == torch.int64
    q, e, ex, qi, _, _ = make(3, 17, 16, torch.float32)
    for bad in (0, 18, -1):
        with pytest.raises(ValueError, match=f"k={bad}"):
            queue_topk_triton(q, e, bad, ex, qi, True)


def test_long_queue_is_cut_into_slices(monkeypatch):
    """A queue longer than one select program holds (MAX_STORED keys) runs as slices merged exactly: same result."""
    q, e, ex, qi, _, _ = make(3, 700, 24, torch.float32, seed=5)
    want = queue_topk_triton(q, e, 20, ex, qi, True, config=dict(BLOCK_N=16))
    monkeypatch.setattr(qt, "MAX_STORED", 16)                   # slices of (16 // M) * 16 = 128 rows
    got = queue_topk_triton(q, e, 20, ex, qi, True, config=dict(BLOCK_N=16))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    check_topk(q, e, 20, ex, qi, True, *got)


def test_tuned_configs_are_read(monkeypatch, tmp_path):
    """The tuner's table (kernels/ops/queue_topk_configs.json) overrides the defaults per shape class, field by field."""
    f = tmp_path / "queue_topk_configs.json"
    key = qt.shape_class(torch.bfloat16, 2048, 65536, 20)
    assert key == "bf16/k32/B2048/Q65536"
    f.write_text(json.dumps({"table": {key: {"BLOCK_N": 64, "M": 4}}}))
    monkeypatch.setattr(qt, "CONFIG_FILE", f)
    qt._tuned_table.cache_clear()
    try:
        cfg = qt.pick_config(torch.bfloat16, 2000, 60000, 20)
        assert cfg["BLOCK_N"] == 64 and cfg["M"] == 4 and cfg["BLOCK_B"] == qt.DEFAULT_CONFIGS[("bf16", 32)]["BLOCK_B"]
        assert qt.pick_config(torch.float32, 2000, 60000, 20) == qt.DEFAULT_CONFIGS[("fp32", 32)]
    finally:
        qt._tuned_table.cache_clear()


def test_pruning_margin():
    """delta_for: the bound grows with D, covers tf32 rounding for fp32 (2^-9 per product) and norm computation."""
    d_bf16 = qt.delta_for(torch.bfloat16, "tf32", 256, False)
    assert d_bf16 == pytest.approx(2 * ((256 + 16) * 4 + (256 + 4)) * 2 ** -24 * (1 + 2 ** -4))    # ~1.7e-4
    assert qt.delta_for(torch.float32, "tf32", 256, False) > 2 * 2 ** -9
    assert qt.delta_for(torch.float32, "ieee", 256, False) == pytest.approx(d_bf16)
    assert qt.delta_for(torch.bfloat16, "tf32", 256, True) > qt.delta_for(torch.bfloat16, "tf32", 256, False) / 1.1
    # the scan's stored values are S lowered by < BLOCK_N ulp (the position packed into the low bits)
    assert qt.delta_for(torch.bfloat16, "tf32", 256, False, 128) >= d_bf16 + 2 * 127 * 2 * 2.0 ** -24


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_noncontiguous_inputs_unchanged(dtype):
    g = torch.Generator().manual_seed(3)
    big_q = torch.randn(37, 80, generator=g).to(dtype).to(DEVICE)
    big_e = torch.randn(40, 300, generator=g).to(dtype).to(DEVICE)
    q = big_q[:, ::2]                          # [37, 40], column stride 2
    e = big_e.t()                              # [300, 40], column-major
    ex = torch.randint(0, 7, (74,), generator=g).to(DEVICE)[::2]
    qi = torch.randint(0, 7, (300,), generator=g).to(DEVICE).int()   # int32 ids are accepted
    before = [t.clone() for t in (big_q, big_e, ex, qi)]
    v, i = queue_topk_triton(q, e, 9, ex, qi, False, splits=2)
    check_topk(q, e, 9, ex, qi, False, v, i)
    for a, b in zip(before, (big_q, big_e, ex, qi)):
        assert torch.equal(a, b), "an input was modified"


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 20, 64])
def test_gpu_headline_shape(dtype, k):
    """B=2048, Q=65536, D=256 on CUDA through the public function (backend asked by name), with the shipped
    configs."""
    from maect import kernels
    q, e, ex, qi, q32, e32 = make(2048, 65536, 256, dtype, n_ids=50000)
    v, i = kernels.queue_topk(q, e, k, ex, qi, True, backend="triton")
    check_topk(q[:256], e, k, ex[:256], qi, True, v[:256], i[:256], truth=(q32[:256], e32))


@gpu
@needs_cuda
@pytest.mark.parametrize("B", [1, 7, 300])
def test_gpu_split_heuristic(B):
    q, e, ex, qi, _, _ = make(B, 20000, 256, torch.bfloat16)
    v, i = queue_topk_triton(q, e, 20, ex, qi, False)
    check_topk(q, e, 20, ex, qi, False, v, i)


AOT_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from maect.kernels.ops import queue_topk as K

def sig(dt, names):
    ptr = dict(q_ptr=f"*{dt}", e_ptr=f"*{dt}", ex_ptr="*i64", qid_ptr="*i64", einv_ptr="*fp32", keys_ptr="*i32",
               bag_ptr="*i64", out_v_ptr="*fp32", out_i_ptr="*i64", delta="fp32")
    return {n: ptr.get(n, "i32") for n in names}

scan = ["q_ptr", "e_ptr", "ex_ptr", "qid_ptr", "einv_ptr", "keys_ptr", "B", "Q", "D", "NT", "stride_qb", "stride_qd",
        "stride_eq", "stride_ed", "TILES"]
select = ["q_ptr", "e_ptr", "ex_ptr", "qid_ptr", "keys_ptr", "bag_ptr", "out_v_ptr", "out_i_ptr",
          "B", "Q", "D", "NT", "K", "stride_qb", "stride_qd", "stride_eq", "stride_ed", "delta"]
cases = [  # the shipped bf16 config (query block resident), fp32 with tf32 and a D loop, the normalising variants
    (K._scan_kernel, sig("bf16", scan), dict(M=2, HAS_IDS=True, NORMALIZE=False, PRECISION="tf32", DOT_F32=False,
                                              BLOCK_B=128, BLOCK_N=128, BLOCK_D=256, RESIDENT=True), 8),
    (K._scan_kernel, sig("fp32", scan), dict(M=4, HAS_IDS=False, NORMALIZE=True, PRECISION="tf32", DOT_F32=False,
                                              BLOCK_B=64, BLOCK_N=64, BLOCK_D=64, RESIDENT=False), 4),
    (K._select_kernel, sig("bf16", select), dict(M=2, NTP=512, KP=32, CH=32, BLOCK_N=128, BLOCK_D=256,
                                                 HAS_IDS=True, NORMALIZE=False), 4),
    (K._select_kernel, sig("fp32", select), dict(M=4, NTP=2048, KP=128, CH=64, BLOCK_N=64, BLOCK_D=64,
                                                 HAS_IDS=False, NORMALIZE=True), 8),
]
for fn, s, c, warps in cases:
    src = ASTSource(fn=fn, signature={**s, **{k: "constexpr" for k in c}}, constexprs=c)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=3))
    print("compiled", fn.__name__, c)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels for real")
def test_kernels_compile_for_sm90():
    """No GPU here: compile the non-interpreted kernels ahead of time for an H100 (sm_90, through ptxas), so type
    and code-generation errors in the GPU path show up on CPU-only machines too."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", AOT_SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                       timeout=400)
    print(r.stdout, r.stderr[-3000:])
    assert r.returncode == 0


def test_integer_like_k_is_taken_and_bad_k_named():
    """k from numpy or a 0-d integer tensor (an argsort result, a config read by numpy) is the same k as the int;
    a float, a bool or a 1-element tensor is a TypeError saying it must be an integer, and k outside [1, Q] a
    ValueError naming Q. Before: np.int64(2) was refused with 'k=2 must satisfy 1 <= k <= Q'."""
    import numpy as np
    from maect.kernels import queue_topk
    q, e, _, _, _, _ = make(3, 17, 16, torch.float32)
    want = queue_topk(q, e, 2)
    for k in (np.int64(2), np.int32(2), np.uint8(2), torch.tensor(2), torch.tensor(2, dtype=torch.int32)):
        got = queue_topk(q, e, k)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), type(k)
    for k, match in ((2.0, r"k=2.0 \(float\) must be an integer"), (np.float32(2), "must be an integer"),
                     (torch.tensor(2.0), "must be an integer"), (True, "k=True is a bool"),
                     (np.bool_(True), "is a bool"), (torch.tensor(True), "is a bool"),
                     (torch.tensor([2]), r"one integer, got a tensor of shape \(1,\)"), ("2", "must be an integer")):
        with pytest.raises(TypeError, match=match):
            queue_topk(q, e, k)
    for k, match in ((0, "k=0 must be >= 1"), (np.int64(18), "k=18 exceeds the queue size Q=17"),
                     (-1, "k=-1 must be >= 1")):
        with pytest.raises(ValueError, match=match):
            queue_topk(q, e, k)
