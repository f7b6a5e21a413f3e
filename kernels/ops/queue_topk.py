"""queue_topk: nearest-neighbour lookup in a feature queue, top-k cosine similarity with self-id exclusion.

This file holds the whole op: its contract (below), input checks, the pure-PyTorch reference (queue_topk_ref, the
specification), the Triton kernels and their launcher (queue_topk_triton, TopkPlan, the tuned configs), the compiled
CPU op's wrapper (queue_topk_cpp; the C++ is csrc/queue_topk.cpp), the torch path (queue_topk_torch), the
verification rule (check_topk), its backends (OP) and the public function queue_topk.

Math
    s[b, j] = <q_b, e_j>                      (q, e L2-normalised; normalised on the fly if normalized=False)
    s[b, j] = -inf   where queue_ids[j] == exclude_ids[b]
    values[b], indices[b] = the k largest s[b, :], in descending order

Shapes and dtypes
    query   [B, D]  fp32 / bf16 / fp16
    queue   [Q, D]  same dtype as query
    exclude_ids [B] int (optional), queue_ids [Q] int (optional; both or neither)
    returns values [B, k] fp32, indices [B, k] int64

Rules every backend follows (the reference below is the specification)
    * Returned values are fp32 similarities of the inputs as given: fp32 products summed in fp32 (bf16 / fp16
      products are exact in fp32, so backends differ from the reference only in summation order; the Triton kernel
      re-scores its candidates this way even where its GEMM used tf32, see "Triton" below).
    * Ties: among equal similarities the lower queue index ranks first.
    * Admissible entries: not excluded by id, and a finite similarity. NaN, +inf and -inf similarities are never
      returned (a query row with a NaN/inf entry has none; a queue row with one is never a neighbour). A row with
      fewer than k admissible entries is padded at the end with value -inf and index -1 (an all-excluded or
      non-finite query row is all -inf / -1); callers that need k neighbours must check for -1.
    * k: an integer (Python int, numpy integer, 0-d integer tensor: anything operator.index takes, bool excluded)
      with 1 <= k <= Q; another type is a TypeError, a value outside the range a ValueError naming Q.
      B == 0 returns empty [0, k] tensors.
    * normalized=False L2-normalises query and queue rows (eps 1e-12) inside the op; the inputs are not modified.

Backends (OP, kernels/dispatch.py), in the decision's order
    torch    queue_topk_torch: the torch path in the op's contract (one fp32 matmul, the exclusion, one topk)
    cpp      the compiled CPU op (csrc/queue_topk.cpp)                           CPU; the static default there
    triton   the Triton scan + select kernels below                             CUDA (the interpreter on CPU)
    ref      queue_topk_ref, the specification (asked by name only)
Measurement inputs: the first rows of the query (at most ROWS, rows x Q <= SIMS), the whole queue. Verification rule
(check_topk, the first bad row is reported): shapes and dtypes; padding (-inf / -1) exactly where the reference pads;
no index out of range, repeated in a row, or excluded by id; each value within tol of the reference's value at its
rank and of the similarity at its own index; values descending; where two indices differ at a rank their queue rows
are not bitwise equal (equal rows tie exactly: the lower index must win). tol = 2 (D + 8) u (+ 8 (D + 4) u when
normalized=False): both sides sum D fp32 products in different orders (u = 2^-24; the Triton kernel re-scores in
fp32, see "Triton" below).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import dispatch
from .._util import U, cpp_why, device_fn, dtype_name, interpreting, jit, next_pow2, on, tl, triton, triton_why

BACKENDS = ("ref", "torch", "triton", "cpp")


def as_k(k, Q: int) -> int:
    """k as a Python int (numpy integers and 0-d integer tensors through operator.index); TypeError for a bool, a
    float or anything else that is not an integer, ValueError unless 1 <= k <= Q (the queue size)."""
    import operator
    if isinstance(k, bool) or getattr(k, "dtype", None) in (torch.bool, bool) or type(k).__name__ == "bool_":
        raise TypeError(f"queue_topk: k={k!r} is a bool; pass the number of neighbours as an integer")
    if isinstance(k, Tensor) and k.dim() != 0:
        raise TypeError(f"queue_topk: k must be one integer, got a tensor of shape {tuple(k.shape)}")
    try:
        k_int = operator.index(k)
    except TypeError:
        raise TypeError(f"queue_topk: k={k!r} ({type(k).__name__}) must be an integer (int, numpy integer or 0-d "
                        f"integer tensor)") from None
    if k_int < 1:
        raise ValueError(f"queue_topk: k={k_int} must be >= 1")
    if k_int > Q:
        raise ValueError(f"queue_topk: k={k_int} exceeds the queue size Q={Q}")
    return k_int


def check_inputs(query: Tensor, queue: Tensor, k: int, exclude_ids: Tensor | None, queue_ids: Tensor | None) -> None:
    """Validate arguments shared by every backend; raises ValueError naming the bad value."""
    if query.dim() != 2 or queue.dim() != 2:
        raise ValueError(f"queue_topk: query must be [B, D] and queue [Q, D], got {tuple(query.shape)} and {tuple(queue.shape)}")
    if query.shape[1] != queue.shape[1]:
        raise ValueError(f"queue_topk: feature dims differ: query D={query.shape[1]}, queue D={queue.shape[1]}")
    if query.dtype not in (torch.float32, torch.bfloat16, torch.float16) or queue.dtype != query.dtype:
        raise ValueError(f"queue_topk: query and queue must share a float dtype (fp32/bf16/fp16), got {query.dtype} and {queue.dtype}")
    if query.device != queue.device:
        raise ValueError(f"queue_topk: query on {query.device}, queue on {queue.device}")
    as_k(k, queue.shape[0])
    if (exclude_ids is None) != (queue_ids is None):
        raise ValueError("queue_topk: pass both exclude_ids and queue_ids, or neither")
    if exclude_ids is not None:
        if exclude_ids.shape != (query.shape[0],) or queue_ids.shape != (queue.shape[0],):
            raise ValueError(f"queue_topk: exclude_ids must be [B={query.shape[0]}] and queue_ids [Q={queue.shape[0]}], "
                             f"got {tuple(exclude_ids.shape)} and {tuple(queue_ids.shape)}")
        if exclude_ids.dtype.is_floating_point or queue_ids.dtype.is_floating_point:
            raise ValueError(f"queue_topk: ids must be integer tensors, got {exclude_ids.dtype} and {queue_ids.dtype}")


def similarity_ref(query: Tensor, queue: Tensor, exclude_ids: Tensor | None, queue_ids: Tensor | None,
                   normalized: bool = True) -> Tensor:
    """The full [B, Q] fp32 similarity matrix with excluded and non-finite entries set to -inf (reference helper)."""
    q, e = query.float(), queue.float()
    if not normalized:
        q, e = F.normalize(q, dim=1, eps=1e-12), F.normalize(e, dim=1, eps=1e-12)
    sim = q @ e.t()
    sim = sim.masked_fill(~torch.isfinite(sim), float("-inf"))    # only finite similarities are admissible
    if exclude_ids is not None:
        sim = sim.masked_fill(exclude_ids.view(-1, 1).long() == queue_ids.view(1, -1).long(), float("-inf"))
    return sim


def select_topk_ref(sim: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row of sim [B, Q] with the tie rule (lower index first) and -inf/-1 padding."""
    B, Q = sim.shape
    if B == 0:
        return sim.new_empty(0, k), torch.empty(0, k, dtype=torch.long, device=sim.device)
    thr = sim.topk(k, dim=1).values[:, -1:]                       # k-th largest value per row
    above = sim > thr
    at = sim == thr
    room = k - above.sum(1, keepdim=True)                          # slots left for entries equal to the threshold
    keep = above | (at & (at.cumsum(1) <= room))                   # exactly k per row; ties -> lowest indices
    idx = keep.nonzero()[:, 1].view(B, k)                          # ascending index order
    val = sim.gather(1, idx)
    val, order = val.sort(dim=1, descending=True, stable=True)    # stable: equal values keep ascending index
    idx = idx.gather(1, order)
    idx = idx.masked_fill(val == float("-inf"), -1)
    return val, idx


def queue_topk_ref(query: Tensor, queue: Tensor, k: int, exclude_ids: Tensor | None = None,
                   queue_ids: Tensor | None = None, normalized: bool = True) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch reference: materialises the [B, Q] fp32 similarity matrix. See the module docstring."""
    check_inputs(query, queue, k, exclude_ids, queue_ids)
    return select_topk_ref(similarity_ref(query, queue, exclude_ids, queue_ids, normalized), k)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels (CUDA)
#
# Two kernels (launched by queue_topk_triton / TopkPlan below), no state carried across queue tiles, so any split
# of the queue across programs is exact:
#
# _scan_kernel  (the fused GEMM; grid = (query row blocks, queue splits))
#     A program keeps BLOCK_B query rows resident and streams queue tiles of BLOCK_N rows. Per tile it computes
#     S = q_blk @ e_tileᵀ with tl.dot (fp32 accumulation; tf32 for fp32 inputs unless told otherwise), applies the
#     id exclusion and range mask (-inf), drops NaN (never a maximum), and stores each row's M best entries of the
#     tile into keys[B, 2 NT M] int32 (NT = number of tiles; slots [t M, t M + M) of a row), each as one int32:
#     ord(S) with its low log2(BLOCK_N) bits replaced by BLOCK_N - 1 - position (the select kernel unpacks it to the
#     int64 key below). A +inf maximum unpacks to NONFINITE_KEY: the select kernel then recomputes that tile exactly,
#     where the non-finite rule applies.
#     Work per similarity: the MMA, an add (range), an id compare and select, a maxnum (NaN), the int32 packing of
#     value and position (shift, two logic ops, a subtract), then M integer maxima (an equality select between them).
#     The stored values are S lowered by <= BLOCK_N - 1 ulp (the packing); delta_for's block_n term covers it.
#
# _select_kernel  (one program per query row)
#     1. t = the k-th largest stored value of the row (32-step bisection on the order-preserving integer of the fp32
#        values; -inf when fewer than k finite values are stored).
#     2. The stored values are only approximations S of the exact similarities R that the op returns (R: fp32
#        products of the inputs summed in one fixed order, the same code for every candidate). With |S - R| <= eps
#        for every entry (eps from the dtype, the dot precision and D: delta_for below), every entry
#        whose R reaches the k-th largest R has S >= t - 2 eps =: thr. Such an entry is either stored, or hidden
#        behind its tile's M stored entries, which are then all >= thr. So the candidates are
#            stored keys with S >= thr                      (about k of them)
#            every entry of a tile whose M-th stored key has S >= thr, or that holds a non-finite stored key
#        ("flagged" tiles; expected C(k, M) (BLOCK_N / Q)^(M-1) per row for random data: 0.2 at k=20, M=2,
#        BLOCK_N=64, Q=65536). Both lists are compacted (cumsum) into the row's stretch of the keys buffer.
#     3. The candidates are re-scored exactly (R, ids and the non-finite rule applied) in chunks of CH and merged
#        into a sorted bag of k keys by rank arithmetic: an entry's new position = the number of kept keys above it.
#        Keys are unique (value, index) pairs, so the positions are a permutation; no sort, no insertion loop.
#     4. The bag, unpacked: values [k] fp32 descending, indices [k] int64 (padding -inf / -1).
#
# Key packing (the select kernel): key = ord(v) << 32 | (2^31 - 1 - index), ord() maps fp32 bits to int32 in the
# order of the floats (-0.0 folded into +0.0 first). Larger key = ranks first: higher value, then the lower index
# (the tie rule).
# ----------------------------------------------------------------------------------------------------------------
# Sizes that vary from call to call are not specialised on (value 1 / divisible by 16), so one compiled kernel serves
# every batch and queue length: no recompiles in evaluation's chunked calls, and a compile done for one B (the
# tuner's compile workers) serves all. Strides and D stay specialised (aligned vector loads).
_VARYING = ["B", "Q", "NT", "TILES", "K"]


def _kernel(fn):
    return jit(fn, do_not_specialize=[a for a in _VARYING if a in fn.__code__.co_varnames])


# Device helpers are jit functions on GPU, plain Python under the interpreter (kernels/_util.py device_fn). For the
# same reason the reductions go straight to tl.reduce / tl.associative_scan with triton's own combine functions there
# (the interpreter runs those as numpy sum / nanmax / nanargmax / cumsum), instead of through tl.sum, tl.max,
# tl.cumsum (jit functions).
if tl is not None and interpreting():
    def _sum(x, axis):
        return tl.reduce(x, axis, tl.standard._sum_combine)

    def _max(x, axis):
        return tl.reduce(x, axis, tl.standard._elementwise_max)

    def _cumsum(x, axis):
        return tl.associative_scan(x, axis, tl.standard._sum_combine)

    def _min(x, axis):
        return tl.reduce(x, axis, tl.standard._elementwise_min)
elif tl is not None:
    _sum, _max, _min, _cumsum = tl.sum, tl.max, tl.min, tl.cumsum

# key(-inf, index 0): the largest key a -inf value packs to. Stored keys <= EMPTY_KEY hold no admissible entry.
EMPTY_KEY = (-2139095041 << 32) + 2147483647
NONFINITE_KEY = 9223372036854775807          # a stored NaN / +inf maximum: the tile is recomputed exactly
ABSENT_KEY = -9223372036854775807            # below every key: a masked candidate lane
_constexpr = tl.constexpr if tl is not None else (lambda x: x)
_EMPTY = _constexpr(EMPTY_KEY)
_NONFINITE = _constexpr(NONFINITE_KEY)
_ABSENT = _constexpr(ABSENT_KEY)


@device_fn
def _ord(v):
    """Order-preserving int32 of fp32 v (not NaN); -0.0 and +0.0 map to the same integer."""
    v = tl.where(v == 0.0, 0.0, v)
    bits = v.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@device_fn
def _unord(o):
    """Inverse of _ord (int32 -> fp32)."""
    return (o ^ ((o >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@device_fn
def _pack(v, i):
    """int64 key of (value v fp32 not NaN, index i int32 in [0, 2^31))."""
    return (_ord(v).to(tl.int64) << 32) + (2147483647 - i).to(tl.int64)


@device_fn
def _key_index(key):
    return 2147483647 - (key & 0x7FFFFFFF).to(tl.int32)


@device_fn
def _unpack(km, t, BLOCK_N: tl.constexpr):
    """int64 key of the scan's packed int32 km of tile t: (truncated ord(S), column t BLOCK_N + position);
    NONFINITE_KEY for a +inf value (the tile is then recomputed exactly)."""
    o = km & (-BLOCK_N)
    col = t * BLOCK_N + (BLOCK_N - 1) - (km & (BLOCK_N - 1))
    return tl.where(o < 0x7F800000, (o.to(tl.int64) << 32) + (2147483647 - col).to(tl.int64), _NONFINITE)


@_kernel
def _scan_kernel(
    q_ptr,      # query [B, D] fp32/bf16/fp16, strides (stride_qb, stride_qd); read only
    e_ptr,      # queue [Q, D] same dtype, strides (stride_eq, stride_ed); read only
    ex_ptr,     # exclude_ids [B] integer, contiguous; read only when HAS_IDS
    qid_ptr,    # queue_ids [Q] integer, contiguous; read only when HAS_IDS
    einv_ptr,   # [Q] fp32 1 / max(|e_j|, 1e-12) (the launcher's, any summation order), contiguous; read when NORMALIZE
    keys_ptr,   # out: packed keys int32 [B, 2 NT M], contiguous; this program writes slots [t M, t M + M) of its rows
                #      for its tiles (the select kernel uses the row's 2 NT M slots as scratch afterwards)
    B, Q, D, NT,
    stride_qb, stride_qd, stride_eq, stride_ed,
    TILES,      # tiles per program along the queue (runtime: any split is exact)
    M: tl.constexpr, HAS_IDS: tl.constexpr, NORMALIZE: tl.constexpr, PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    RESIDENT: tl.constexpr,     # BLOCK_D >= D: one query block for the whole scan, no D loop (a flat tile loop that
                                # the compiler pipelines); else D is covered in chunks of BLOCK_D per tile
):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    pos = tl.arange(0, BLOCK_N)
    if HAS_IDS:
        ex = tl.load(ex_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    if NORMALIZE:   # the query rows' norms, in chunks of 32 (an fp32 copy of the whole block would take registers)
        qsq = tl.zeros([BLOCK_B], tl.float32)
        d32 = tl.arange(0, 32)
        for d0 in range(0, D, 32):
            d = d0 + d32
            qc = tl.load(q_ptr + rows64[:, None] * stride_qb + d[None, :] * stride_qd,
                         mask=row_ok[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
            qsq += _sum(qc * qc, 1)
        inv_q = 1.0 / tl.maximum(tl.sqrt(qsq), 1e-12)
    if RESIDENT:   # the query block, loaded once
        q_res = tl.load(q_ptr + rows64[:, None] * stride_qb + dd[None, :] * stride_qd,
                        mask=row_ok[:, None] & (dd < D)[None, :], other=0.0)
        if DOT_F32:  # the interpreter's tl.dot mishandles bf16; bf16 x bf16 products are exact in fp32
            q_res = q_res.to(tl.float32)
    # queue tile addresses: one 64-bit base per tile, 32-bit offsets inside it (the tile spans < 2^31 elements)
    e_off = pos[None, :] * stride_eq + dd[:, None] * stride_ed                        # [BLOCK_D, BLOCK_N] int32
    d_ok = (dd < D)[:, None]

    t_lo = pid_s * TILES
    t_hi = tl.minimum(t_lo + TILES, NT)
    for t in range(t_lo, t_hi):
        col0 = t * BLOCK_N
        cols = col0 + pos
        col_ok = cols < Q
        e_tile = e_ptr + col0.to(tl.int64) * stride_eq
        if HAS_IDS:   # issued before the MMA, which hides its latency
            qid = tl.load(qid_ptr + cols, mask=col_ok, other=-1).to(tl.int64)
        if NORMALIZE:
            einv = tl.load(einv_ptr + cols, mask=col_ok, other=0.0)
        if RESIDENT:
            e = tl.load(e_tile + e_off, mask=d_ok & col_ok[None, :], other=0.0)          # [BLOCK_D, BLOCK_N]
            if DOT_F32:
                e = e.to(tl.float32)
            s = tl.dot(q_res, e, input_precision=PRECISION)                              # [BLOCK_B, BLOCK_N] fp32
        else:
            s = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + dd
                qc = tl.load(q_ptr + rows64[:, None] * stride_qb + d[None, :] * stride_qd,
                             mask=row_ok[:, None] & (d < D)[None, :], other=0.0)
                ec = tl.load(e_tile + d0 * stride_ed + e_off, mask=(d < D)[:, None] & col_ok[None, :], other=0.0)
                if DOT_F32:
                    qc = qc.to(tl.float32)
                    ec = ec.to(tl.float32)
                s = tl.dot(qc, ec, s, input_precision=PRECISION)
        if NORMALIZE:
            s = s * inv_q[:, None] * einv[None, :]
        # admissible: column in range (an additive -inf per column, last tile only), not excluded by id; NaN -> -inf
        # by a NaN-ignoring max (maxnum), one instruction
        if col0 + BLOCK_N > Q:                              # only the queue's last tile is ragged
            s = s + tl.where(col_ok, 0.0, float("-inf"))[None, :]
        if HAS_IDS:
            s = tl.where(ex[:, None] != qid[None, :], s, float("-inf"))
        s = tl.maximum(s, float("-inf"))
        # one int32 per entry: ord(S) with its low log2(BLOCK_N) bits replaced by BLOCK_N - 1 - position, so one
        # integer max finds the largest truncated value and, among equal ones, the lowest position (the tie rule).
        # The truncation lowers S by <= BLOCK_N - 1 ulp (delta_for's block_n term); -0.0 ranks a few ulp below
        # +0.0 here (the select's exact re-score folds them); finite values stay above ord(-inf), +inf stays +inf
        sb = s.to(tl.int32, bitcast=True)
        kk = ((sb ^ ((sb >> 31) & 0x7FFFFFFF)) | (BLOCK_N - 1)) - pos[None, :]
        out = keys_ptr + rows64 * (2 * NT * M) + t * M
        for m in tl.static_range(M):
            km = _max(kk, 1)                                # stored as is: the select kernel unpacks it (_unpack)
            tl.store(out + m, km, mask=row_ok)
            if m + 1 < M:
                kk = tl.where(kk == km[:, None], -2147483647 - 1, kk)


@device_fn
def _exact_keys(q_ptr, e_ptr, qid_ptr, b64, ex_b, inv_q, cols, valid, D, stride_qb, stride_qd, stride_eq,
                stride_ed, HAS_IDS: tl.constexpr, NORMALIZE: tl.constexpr, CH: tl.constexpr, BLOCK_D: tl.constexpr):
    """Exact keys of queue columns cols [CH] (lanes with valid False -> ABSENT): R = sum_d q_d e_d in fp32, one fixed
    order for every candidate (so bit-identical rows give bit-identical R: the tie rule holds), normalised by
    1/max(|q|, 1e-12) 1/max(|e|, 1e-12) when NORMALIZE; ids and the non-finite rule applied."""
    dd = tl.arange(0, BLOCK_D)
    cols64 = cols.to(tl.int64)
    acc = tl.zeros([CH], tl.float32)
    esq = tl.zeros([CH], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + dd
        dm = d < D
        qc = tl.load(q_ptr + b64 * stride_qb + d * stride_qd, mask=dm, other=0.0).to(tl.float32)
        ec = tl.load(e_ptr + cols64[:, None] * stride_eq + d[None, :] * stride_ed,
                     mask=valid[:, None] & dm[None, :], other=0.0).to(tl.float32)
        acc += _sum(ec * qc[None, :], 1)
        if NORMALIZE:
            esq += _sum(ec * ec, 1)
    r = acc
    if NORMALIZE:
        r = r * inv_q * (1.0 / tl.maximum(tl.sqrt(esq), 1e-12))
    ok = valid & (r == r) & (r < float("inf")) & (r > float("-inf"))
    if HAS_IDS:
        qid = tl.load(qid_ptr + cols, mask=valid, other=-1).to(tl.int64)
        ok = ok & (qid != ex_b)
    return tl.where(ok, _pack(tl.where(ok, r, 0.0), cols), _ABSENT)


@device_fn
def _merge(bag, ck, slot, K, bag_ptr, KP: tl.constexpr, CH: tl.constexpr):
    """The k best of bag [KP] (sorted descending, unique keys, slots >= K unused) and ck [CH] (unique keys or
    ABSENT), sorted, as a new bag. New position of a key = number of keys above it in the union."""
    live = slot < K
    cv = ck > _ABSENT
    pos_c = _sum(((bag[None, :] > ck[:, None]) & live[None, :]).to(tl.int32), 1) \
        + _sum(((ck[None, :] > ck[:, None]) & cv[None, :]).to(tl.int32), 1)
    pos_b = slot + _sum(((ck[None, :] > bag[:, None]) & cv[None, :]).to(tl.int32), 1)
    tl.debug_barrier()                                   # earlier reads of the scratch bag are done
    tl.store(bag_ptr + pos_b, bag, mask=live & (pos_b < K))
    tl.store(bag_ptr + pos_c, ck, mask=cv & (pos_c < K))
    tl.debug_barrier()                                   # the new bag is written before anyone reads it
    return tl.load(bag_ptr + slot, mask=live, other=_ABSENT)


@_kernel
def _select_kernel(
    q_ptr,      # query [B, D], strides (stride_qb, stride_qd); read only
    e_ptr,      # queue [Q, D], strides (stride_eq, stride_ed); read only
    ex_ptr,     # exclude_ids [B] (HAS_IDS); read only
    qid_ptr,    # queue_ids [Q] (HAS_IDS); read only
    keys_ptr,   # packed keys int32 [B, 2 NT M] from _scan_kernel (slots [0, NT M) of a row); read, then
                #   this row's 2 NT M slots hold its candidate and tile lists (scratch)
    bag_ptr,    # scratch [B, KP] int64
    out_v_ptr,  # out: values [B, K] fp32, contiguous
    out_i_ptr,  # out: indices [B, K] int64, contiguous
    B, Q, D, NT, K,
    stride_qb, stride_qd, stride_eq, stride_ed,
    delta,      # fp32: 2 eps (x |q| when the rows are promised unit-norm); see delta_for below
    M: tl.constexpr, NTP: tl.constexpr, KP: tl.constexpr, CH: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_IDS: tl.constexpr, NORMALIZE: tl.constexpr,
):
    b = tl.program_id(0)
    b64 = b.to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    qc = tl.load(q_ptr + b64 * stride_qb + dd * stride_qd, mask=dd < D, other=0.0).to(tl.float32)
    qsq = _sum(qc * qc, 0)
    for d0 in range(BLOCK_D, D, BLOCK_D):
        d = d0 + dd
        qc = tl.load(q_ptr + b64 * stride_qb + d * stride_qd, mask=d < D, other=0.0).to(tl.float32)
        qsq += _sum(qc * qc, 0)
    q_norm = tl.sqrt(qsq)
    q_ok = (q_norm < float("inf")).to(tl.int32) > 0     # False for NaN/inf rows: no entry is admissible
    inv_q = 1.0 / tl.maximum(q_norm, 1e-12)
    ex_b = -1
    if HAS_IDS:
        ex_b = tl.load(ex_ptr + b).to(tl.int64)

    # 1. the stored keys and the threshold t (k-th largest finite stored value in tiles without non-finite keys)
    tt = tl.arange(0, NTP)
    mm = tl.arange(0, M)
    row_keys = keys_ptr + b64 * (2 * NT * M)
    km = tl.load(row_keys + tt[:, None] * M + mm[None, :], mask=(tt < NT)[:, None], other=0)          # [NTP, M]
    keys = tl.where((tt < NT)[:, None], _unpack(km, tt[:, None], BLOCK_N), _EMPTY)
    nonfin = _max((keys == _NONFINITE).to(tl.int32), 1) > 0                                          # [NTP]
    live = (keys > _EMPTY) & (keys != _NONFINITE) & (~nonfin)[:, None]
    o = (keys >> 32).to(tl.int32)                                                                      # ord(S)
    u = tl.where(live, o.to(tl.int64) + 2147483648, -1)                                                # [0, 2^32)
    n_live = _sum(tl.reshape(live.to(tl.int32), [NTP * M]), 0)
    res = n_live.to(tl.int64) * 0
    for bit in tl.static_range(32):                     # MSB first: the largest c with #(u >= c) >= K
        c = res | (1 << (31 - bit))
        cnt = _sum(tl.reshape((u >= c).to(tl.int32), [NTP * M]), 0)
        res = tl.where(cnt >= K, c, res)
    t = _unord((res - 2147483648).to(tl.int32))
    t = tl.where(n_live >= K, t, float("-inf"))
    if NORMALIZE:                                       # S and R are normalised: |S - R| <= eps
        thr = t - delta
    else:                                               # unit rows promised: |S - R| <= eps |q| (1 + 2^-4)
        thr = t - delta * q_norm
    thr_o = _ord(thr)

    # 2. flagged tiles and stored candidates, compacted into this row's stretch of the keys buffer (int32 view)
    last = _max(tl.where(mm[None, :] == M - 1, o, -2147483647 - 1), 1)
    last_live = _max(tl.where(mm[None, :] == M - 1, live.to(tl.int32), 0), 1) > 0
    flag = (nonfin | (last_live & (last >= thr_o))) & (tt < NT) & q_ok                                # [NTP]
    cand = live & (o >= thr_o) & (~flag)[:, None] & q_ok
    cand_f = tl.reshape(cand.to(tl.int32), [NTP * M]) > 0
    cols_f = tl.reshape(_key_index(keys), [NTP * M])
    c_pos = _cumsum(cand_f.to(tl.int32), 0) - 1
    n_cand = _sum(cand_f.to(tl.int32), 0)
    f_pos = _cumsum(flag.to(tl.int32), 0) - 1
    n_flag = _sum(flag.to(tl.int32), 0)
    scratch = row_keys                                   # 2 NT M int32 slots: [candidate columns | flagged tiles]
    tl.debug_barrier()                                   # every thread has read its keys before they are overwritten
    tl.store(scratch + c_pos, cols_f, mask=cand_f)
    tl.store(scratch + NT * M + f_pos, tt, mask=flag)
    tl.debug_barrier()

    # 3. exact re-scoring and the rank merge into the bag of the k best
    slot = tl.arange(0, KP)
    bag = _pack(tl.full([KP], float("-inf"), tl.float32), slot)      # distinct empty keys, sorted descending
    row_bag = bag_ptr + b64 * KP
    lane = tl.arange(0, CH)
    for c0 in range(0, n_cand, CH):
        j = c0 + lane
        jm = j < n_cand
        cols = tl.load(scratch + j, mask=jm, other=0)
        ck = _exact_keys(q_ptr, e_ptr, qid_ptr, b64, ex_b, inv_q, cols, jm, D, stride_qb, stride_qd, stride_eq,
                         stride_ed, HAS_IDS, NORMALIZE, CH, BLOCK_D)
        bag = _merge(bag, ck, slot, K, row_bag, KP, CH)
    for i in range(0, n_flag):
        tile = tl.load(scratch + NT * M + i)
        for n0 in range(0, BLOCK_N, CH):
            cols = tile * BLOCK_N + n0 + lane
            ck = _exact_keys(q_ptr, e_ptr, qid_ptr, b64, ex_b, inv_q, cols, (n0 + lane < BLOCK_N) & (cols < Q), D,
                             stride_qb, stride_qd, stride_eq, stride_ed, HAS_IDS, NORMALIZE, CH, BLOCK_D)
            bag = _merge(bag, ck, slot, K, row_bag, KP, CH)

    # 4. write: keys at or below an empty key (value -inf) are padding
    valid = bag > _EMPTY
    v = tl.where(valid, _unord((bag >> 32).to(tl.int32)), float("-inf"))
    idx = tl.where(valid, _key_index(bag), -1)
    st = slot < K
    tl.store(out_v_ptr + b64 * K + slot, v, mask=st)
    tl.store(out_i_ptr + b64 * K + slot, idx.to(tl.int64), mask=st)


# ----------------------------------------------------------------------------------------------------------------
# Triton (CUDA): GEMM with a per-tile top-M epilogue, then an exact per-row select. Kernels and the argument for
# exactness: the kernel section above. Extra memory: keys [B, 2 ceil(Q / BLOCK_N) M] int32 (32 MiB at
# B=2048, Q=65536, BLOCK_N=64, M=2; the scan writes half) and a [B, KP] int64 scratch; never O(B x Q) values.
#
# Exactness: the GEMM's values S (tf32 for fp32 inputs) only prune; every returned value is re-scored exactly (R)
# and the k best R are selected with the tie rule. The pruning margin covers |S - R| for rows of norm <= 1 + 2^-4
# (normalized=True promises unit rows; normalized=False normalises inside the op). For inputs that break that promise
# the selection can only differ from the exact one among entries closer than ~2 eps |q| |e| to the k-th value.
# ----------------------------------------------------------------------------------------------------------------

MAX_K = 128            # larger k: queue_topk_triton declines (the bag is a [KP] register tensor) -> reference
MAX_STORED = 8192      # stored keys per row (next_pow2(ceil(Q / BLOCK_N)) x M) held by one select program;
#                        longer queues are cut into slices whose results are merged exactly
UNIT_NORM_SLACK = 1.0 + 2.0 ** -4
MAX_RESIDENT_D = 256   # widest query row kept resident in the scan (64 x 256 bf16 = 32 KiB of shared memory per program)

# One entry per (dtype, k bucket): the shipped defaults, overridden per shape class by kernels/ops/queue_topk_configs.json
# when bench/gpu/tune_queue_topk.py --write-configs has measured one on a GPU. Fields: BLOCK_B query rows per scan
# program, BLOCK_N queue rows per tile, BLOCK_D (0: next_pow2(D), the query block resident for the whole scan), M
# stored entries per (row, tile), warps/stages of the scan, CH candidates per merge and warps of the select kernel,
# precision of the scan's fp32 dot ("tf32" | "tf32x3" | "ieee"; ignored for bf16/fp16), programs per SM targeted
# by the queue split.
DEFAULT_CONFIGS = {
    ("bf16", 32): dict(BLOCK_B=64, BLOCK_N=64, BLOCK_D=0, M=2, warps=4, stages=1, CH=32, warps2=4, precision="tf32",
                       per_sm=2),
    ("bf16", 128): dict(BLOCK_B=64, BLOCK_N=64, BLOCK_D=0, M=4, warps=4, stages=1, CH=64, warps2=8,
                        precision="tf32", per_sm=2),
    ("fp32", 32): dict(BLOCK_B=64, BLOCK_N=64, BLOCK_D=64, M=2, warps=4, stages=3, CH=32, warps2=4, precision="tf32",
                       per_sm=2),
    ("fp32", 128): dict(BLOCK_B=64, BLOCK_N=64, BLOCK_D=64, M=4, warps=4, stages=3, CH=64, warps2=8,
                        precision="tf32", per_sm=2),
}
CONFIG_FILE = Path(__file__).with_name("queue_topk_configs.json")
B_BUCKETS = (256, 1024, 2048, 8192)
Q_BUCKETS = (16384, 65536, 262144)


def _bucket(n: int, buckets: tuple) -> int:
    return next((b for b in buckets if n <= b), buckets[-1])


def shape_class(dtype: torch.dtype, B: int, Q: int, k: int) -> str:
    """The key of a tuned config: dtype (fp16 shares bf16's), k bucket (1 / <=32 / <=128), B and Q buckets."""
    dt = "fp32" if dtype == torch.float32 else "bf16"
    kb = 1 if k == 1 else (32 if k <= 32 else 128)
    return f"{dt}/k{kb}/B{_bucket(B, B_BUCKETS)}/Q{_bucket(Q, Q_BUCKETS)}"


@functools.lru_cache(maxsize=1)
def _tuned_table() -> dict:
    """kernels/ops/queue_topk_configs.json's table ({} when absent or unreadable: the defaults apply)."""
    try:
        return json.loads(CONFIG_FILE.read_text()).get("table", {})
    except (OSError, ValueError):
        return {}


def pick_config(dtype: torch.dtype, B: int, Q: int, k: int) -> dict:
    """The measured config of this shape class if the tuner wrote one, else the default for (dtype, k bucket)."""
    tuned = _tuned_table().get(shape_class(dtype, B, Q, k))
    base = DEFAULT_CONFIGS[("fp32" if dtype == torch.float32 else "bf16", 32 if k <= 32 else 128)]
    return {**base, **(tuned or {})}


def delta_for(dtype: torch.dtype, precision: str, D: int, normalize: bool, block_n: int = 1) -> float:
    """Pruning margin 2 eps with eps >= |S - R| / (|q| |e|): S = the scan's value, R = the exact re-score.
    |R - s*| <= (D + 4) u sum|q_d e_d| (fp32 products and sum); |S - s*| <= (D + 16) 4u sum|q_d e_d| for exact
    products with fp32 accumulation (4x slack for the tensor cores' internal order), plus the input rounding of the
    fp32 dot: tf32 rounds each input to 11 significant bits (2^-9 per product, with margin), 3xtf32 ~2^-17.
    sum|q_d e_d| <= |q| |e| (Cauchy-Schwarz). normalize: both sides divide by norms computed in fp32 (8 (D + 4) u).
    block_n: the scan stores S with its low log2(block_n) bits replaced by the position (S lowered by <= block_n - 1
    ulp <= (block_n - 1) 2u |S|)."""
    eps_s = (D + 16) * 4 * U + (block_n - 1) * 2 * U
    if dtype == torch.float32:
        eps_s += {"tf32": 2.0 ** -9, "tf32x3": 2.0 ** -17, "ieee": 0.0}[precision]
    eps = eps_s + (D + 4) * U + (8 * (D + 4) * U if normalize else 0.0)
    return 2.0 * eps * (1.0 if normalize else UNIT_NORM_SLACK)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _num_splits(row_blocks: int, n_tiles: int, per_sm: int, device: torch.device) -> int:
    """Queue splits so that row blocks x splits fills per_sm programs per SM (any split is exact)."""
    return max(1, min(n_tiles, -(-per_sm * _sm_count(device) // row_blocks)))


def _merge_slices(parts: list[tuple[Tensor, Tensor]], k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k of per-slice results (values desc, global indices; padding -inf / -1) with the tie rule."""
    v = torch.cat([p[0] for p in parts], 1)
    i = torch.cat([p[1] for p in parts], 1)
    bits = v.view(torch.int32).to(torch.int64)
    ordv = torch.where(v == 0, torch.zeros_like(bits), bits ^ ((bits >> 31) & 0x7FFFFFFF))
    key = (ordv << 32) + (2147483647 - i.clamp(min=0))
    key = key.masked_fill(i < 0, torch.iinfo(torch.int64).min)
    top = key.topk(k, dim=1).indices
    return v.gather(1, top), i.gather(1, top)


def queue_topk_triton(query: Tensor, queue: Tensor, k: int, exclude_ids: Tensor | None = None,
                      queue_ids: Tensor | None = None, normalized: bool = True, *, splits: int | None = None,
                      config: dict | None = None) -> tuple[Tensor, Tensor]:
    """Triton queue top-k; same contract as queue_topk_ref. k > MAX_K runs the reference.
    splits: queue splits of the scan (default: fill the SMs); config: override fields of pick_config (tests, tuner)."""
    check_inputs(query, queue, k, exclude_ids, queue_ids)
    if triton is None:
        raise RuntimeError("queue_topk_triton: triton is not installed")
    if k > MAX_K:
        return queue_topk_ref(query, queue, k, exclude_ids, queue_ids, normalized)
    B, Q = query.shape[0], queue.shape[0]
    cfg = {**pick_config(query.dtype, B, Q, k), **(config or {})}
    q_slice = (MAX_STORED // cfg["M"]) * cfg["BLOCK_N"]
    if B > 0 and Q > q_slice:   # one select program holds at most MAX_STORED keys: cut the queue, merge exactly
        parts = []
        for j0 in range(0, Q, q_slice):
            j1 = min(Q, j0 + q_slice)
            v, i = queue_topk_triton(query, queue[j0:j1], min(k, j1 - j0), exclude_ids,
                                     None if queue_ids is None else queue_ids[j0:j1], normalized, config=config)
            parts.append((v, torch.where(i >= 0, i + j0, i)))
        return _merge_slices(parts, k)
    plan = TopkPlan(query, queue, k, exclude_ids, queue_ids, normalized, cfg, splits)
    plan.scan()
    plan.select()
    return plan.out_v, plan.out_i


class TopkPlan:
    """One queue_topk_triton call, its buffers allocated, the two launches separately callable (the tuner times
    them apart). Q must fit one select program (queue_topk_triton cuts longer queues first)."""

    def __init__(self, query, queue, k, exclude_ids, queue_ids, normalized, cfg: dict, splits: int | None = None):
        B, D = query.shape
        Q = queue.shape[0]
        dev = query.device
        self.cfg, self.dev = cfg, dev
        BN, M = cfg["BLOCK_N"], cfg["M"]
        self.out_v = torch.empty(B, k, device=dev, dtype=torch.float32)
        self.out_i = torch.empty(B, k, device=dev, dtype=torch.int64)
        NT = -(-Q // BN)
        NTP = max(2, next_pow2(NT))
        if NTP * M > MAX_STORED:
            raise ValueError(f"queue_topk_triton: Q={Q} needs {NTP * M} stored keys per row > MAX_STORED={MAX_STORED}")
        KP = max(16, next_pow2(k))
        interp = interpreting()
        # BLOCK_D 0: the query block stays resident for the whole scan when D fits (16-bit rows, D <= MAX_RESIDENT_D,
        # as the projector's 256: 64-192 KiB of shared memory on sm_90 by ptxas, measured for the tuner's grid);
        # fp32 rows (512 KiB resident: beyond the SM) and wider features loop over D in chunks of 64
        resident = next_pow2(D) <= MAX_RESIDENT_D and query.dtype != torch.float32
        block_d = cfg["BLOCK_D"] or (max(16, next_pow2(D)) if resident else 64)
        block_b, ch = cfg["BLOCK_B"], cfg["CH"]
        if interp:   # big blocks: interpreter cost grows with programs and loop trips, not block size
            block_b, ch = min(64, max(16, next_pow2(B))), max(ch, min(BN, 128))
        has_ids = exclude_ids is not None
        ex = exclude_ids.contiguous() if has_ids else self.out_i     # dummy pointer when HAS_IDS is False
        qid = queue_ids.contiguous() if has_ids else self.out_i
        precision = cfg["precision"] if query.dtype == torch.float32 else "tf32"
        self.keys = torch.empty(B, 2 * NT * M, device=dev, dtype=torch.int32)   # scan's packed keys, select's scratch
        bag = torch.empty(B, KP, device=dev, dtype=torch.int64)
        row_blocks = triton.cdiv(max(B, 1), block_b)
        S = splits if splits is not None else _num_splits(row_blocks, NT, cfg["per_sm"], dev)
        if S < 1:
            raise ValueError(f"queue_topk_triton: splits={S} must be >= 1")
        tiles = triton.cdiv(NT, S)
        S = triton.cdiv(NT, tiles)
        # unit strides along D (a copy only for a strided view): the compiled kernel then knows them (Triton makes
        # an argument equal to 1 a constant), loads 16-byte vectors and keeps 32-bit offsets inside a tile
        query = query if query.stride(1) == 1 else query.contiguous()
        queue = queue if queue.stride(1) == 1 else queue.contiguous()
        strides = (query.stride(0), query.stride(1), queue.stride(0), queue.stride(1))
        self.grid = (row_blocks, S)
        # normalized=False: the queue rows' inverse norms once per call (fp32 sums, no copy), not once per row block
        einv = (1.0 / torch.linalg.vector_norm(queue, dim=1, dtype=torch.float32).clamp_min(1e-12) if not normalized
                else self.out_v)                                       # dummy pointer when NORMALIZE is False
        self.scan_args = (query, queue, ex, qid, einv, self.keys, B, Q, D, NT, *strides, tiles)
        self.scan_meta = dict(M=M, HAS_IDS=has_ids, NORMALIZE=not normalized, PRECISION=precision,
                              DOT_F32=interp and query.dtype == torch.bfloat16, BLOCK_B=block_b, BLOCK_N=BN,
                              BLOCK_D=block_d, RESIDENT=block_d >= D, **({} if interp else dict(num_warps=cfg["warps"],
                                                                         num_stages=cfg["stages"])))
        self.select_args = (query, queue, ex, qid, self.keys, bag, self.out_v,
                            self.out_i, B, Q, D, NT, k, *strides, delta_for(query.dtype, precision, D, not normalized, BN))
        # select warps: the config's between 512 and 4096 stored keys per row, else 8 (sm_90 / sm_80, python -m
        # maect.kernels.check --static): 4096 and more need 8 to hold the keys; at 512 and fewer, ptxas -O3 spills
        # loop-carried values of the merge loops at 4 warps (12-44 B on sm_90 at 80 registers: not pressure, the
        # same under any register cap), not at 8
        self.select_meta = dict(M=M, NTP=NTP, KP=KP, CH=ch, BLOCK_N=BN, BLOCK_D=min(block_d, 256), HAS_IDS=has_ids,
                                NORMALIZE=not normalized,
                                **({} if interp else dict(num_warps=cfg["warps2"] if 512 < NTP * M < 4096 else 8)))
        self.B = B

    def scan(self) -> None:
        if self.B:
            with on(self.dev):   # launch on the data's GPU
                _scan_kernel[self.grid](*self.scan_args, **self.scan_meta)

    def select(self) -> None:
        if self.B:
            with on(self.dev):
                _select_kernel[(self.B,)](*self.select_args, **self.select_meta)


def tune_grid(dt: str) -> list[dict]:
    """The tuner's search space for the scan at the headline shape (bench/gpu/tune_queue_topk.py; the static check,
    python -m maect.kernels.check --static, compiles each and the tuner drops those that spill or do not fit on the
    GPU it runs on): config fields that replace the (dt, k bucket) default. The shipped defaults (64 x 64, 4 warps)
    are clean on sm_90a and sm_80; the wider blocks are clean on sm_90a only (on sm_80 mma.sync keeps the query
    fragments in registers and a 128-row block spills), so an A100 tuner keeps the narrow ones."""
    grid = []
    for bb in (64, 128):
        for bn in (64, 128):
            for m in (2, 4):
                if dt == "bf16":    # D resident: the tile loop is the only loop; 1-2 stages fit 2 programs per SM
                    for w, st in ((4, 1), (4, 2), (8, 1), (8, 2)):
                        grid.append(dict(BLOCK_B=bb, BLOCK_N=bn, BLOCK_D=0, M=m, warps=w, stages=st))
                elif bn == 64:      # fp32 loops over D (a resident 256-wide fp32 query block needs 512 KiB of smem)
                    for bd in (32, 64):
                        for w, st in ((4, 3), (8, 3)):
                            grid.append(dict(BLOCK_B=bb, BLOCK_N=bn, BLOCK_D=bd, M=m, warps=w, stages=st,
                                             precision="tf32"))
    return grid


# ----------------------------------------------------------------------------------------------------------------
# The compiled CPU op (csrc/queue_topk.cpp; loaded by kernels/_cpp.py): wrapper, fake kernel, autograd.

def queue_topk_cpp(query: Tensor, queue: Tensor, k: int, exclude_ids: Tensor | None = None,
                   queue_ids: Tensor | None = None, normalized: bool = True) -> tuple[Tensor, Tensor]:
    """Compiled queue_topk (the contract above). Requires kernels._cpp.load() to have succeeded."""
    check_inputs(query, queue, k, exclude_ids, queue_ids)
    return torch.ops.maect.queue_topk(query, queue, k, exclude_ids, queue_ids, normalized)


def _cpp_setup(ctx, inputs, output):
    query, queue, _, _, _, normalized = inputs
    ctx.normalized = normalized
    ctx.save_for_backward(query, queue, output[1])
    ctx.mark_non_differentiable(output[1])


def _cpp_backward(ctx, grad_values, _grad_indices):
    """values[b, i] = <q_b, e_idx[b,i]> (normalised as in the forward); recomputed for the B*k selected pairs only
    ([B, k, D] gathered rows) and differentiated; padded entries (index -1) get no gradient, as in the reference."""
    query, queue, indices = ctx.saved_tensors
    with torch.enable_grad():
        q = query.detach().requires_grad_(ctx.needs_input_grad[0])
        e = queue.detach().requires_grad_(ctx.needs_input_grad[1])
        qf, ef = q.float(), e.float()
        if not ctx.normalized:
            qf, ef = F.normalize(qf, dim=1, eps=1e-12), F.normalize(ef, dim=1, eps=1e-12)
        values = (qf.unsqueeze(1) * ef[indices.clamp_min(0)]).sum(-1)
        wanted = [t for t in (q, e) if t.requires_grad]
        grads = iter(torch.autograd.grad(values, wanted, grad_values * (indices >= 0)))
    return tuple(next(grads) if t.requires_grad else None for t in (q, e)) + (None, None, None, None)


def register_cpp() -> None:
    """The fake kernel and the autograd formula of torch.ops.maect.queue_topk (kernels/_cpp.py calls this once)."""
    @torch.library.register_fake("maect::queue_topk")
    def _(query, queue, k, exclude_ids, queue_ids, normalized):
        B = query.shape[0]
        return query.new_empty(B, k, dtype=torch.float32), query.new_empty(B, k, dtype=torch.long)

    torch.library.register_autograd("maect::queue_topk", _cpp_backward, setup_context=_cpp_setup)


# ----------------------------------------------------------------------------------------------------------------
# Verification and the torch path (what kernels/dispatch.py measures for this op)

ROWS = {"cpu": 256, "cuda": 1 << 16}       # measurement rows (kernels/dispatch.py), at most SIMS similarities
SIMS = {"cpu": 1 << 24, "cuda": 1 << 30}


def check_topk(query, queue, k, exclude_ids, queue_ids, normalized, out, ref) -> str | None:
    """None if out = (values, indices) follows queue_topk's rules on these inputs, else the first bad row."""
    v, i = out
    rv, ri = ref
    if not (isinstance(v, Tensor) and isinstance(i, Tensor)) or v.shape != rv.shape or i.shape != ri.shape:
        return f"output shapes {getattr(v, 'shape', type(v))}, {getattr(i, 'shape', type(i))}; expected {tuple(rv.shape)}"
    if v.dtype != torch.float32 or i.dtype != torch.int64:
        return f"output dtypes {v.dtype}, {i.dtype}; expected torch.float32, torch.int64"
    if v.shape[0] == 0:
        return None
    B, Q, D = query.shape[0], queue.shape[0], query.shape[1]
    sim = similarity_ref(query, queue, exclude_ids, queue_ids, normalized)
    tol = 2 * (D + 8) * U + (8 * (D + 4) * U if not normalized else 0.0)
    v, i = v.to(sim.device), i.to(sim.device)
    pad, rpad = i < 0, ri < 0
    reasons = []
    bad = (pad != rpad).any(1)
    reasons.append(("padding (-1) differs from the reference's", bad))
    reasons.append(("index out of range", ((i >= Q) | (i < -1)).any(1)))
    ic = i.clamp(0, Q - 1)
    srt = ic.masked_fill(pad, -1).sort(1).values
    reasons.append(("an index repeated", ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any(1)))
    if exclude_ids is not None:
        hit = queue_ids.long().to(sim.device)[ic] == exclude_ids.long().to(sim.device)[:, None]
        reasons.append(("an index excluded by id returned", (hit & ~pad).any(1)))
    fin = ~rpad & ~pad
    at = sim.gather(1, ic)
    reasons.append((f"a value differs from the reference's by more than {tol:.2g}",
                    (((v - rv).abs() > tol) & fin).any(1)))
    reasons.append(("a value differs from the similarity at its index",
                    (((at - v).abs() > tol) & fin).any(1) | ((at == float("-inf")) & ~pad).any(1)))
    reasons.append(("padding values are not -inf", ((v != float("-inf")) & pad).any(1)))
    reasons.append(("values not descending", ((v[:, 1:] > v[:, :-1] + tol) & fin[:, 1:]).any(1)))
    diff = (i != ri) & fin
    if diff.any():
        qrows = queue.reshape(Q, -1)
        same = (qrows[ic] == qrows[ri.clamp(0, Q - 1)]).all(-1) & diff
        reasons.append(("tie rule: an equal queue row with a lower index ranks after a higher one", same.any(1)))
    for why, rows in reasons:
        if rows.any():
            b = int(rows.nonzero()[0, 0])
            return (f"row {b}: {why}: indices {i[b, :8].tolist()} values {[round(x, 6) for x in v[b, :8].tolist()]}; "
                    f"reference {ri[b, :8].tolist()} {[round(x, 6) for x in rv[b, :8].tolist()]}")
    return None


def queue_topk_torch(query: Tensor, queue: Tensor, k: int, exclude_ids: Tensor | None = None,
                     queue_ids: Tensor | None = None, normalized: bool = True) -> tuple[Tensor, Tensor]:
    """The torch path as a backend in queue_topk's contract (this module): the fp32 similarity matrix
    (queue_topk_ref's similarity_ref: the same matmul and exclusion; its non-finite masking only for the rows that
    need it), then one torch.topk of k + 1 per row. A row whose k + 1 best are finite and whose k-th value is strictly above the (k + 1)-th holds
    exactly its k best, ordered by value, then index (the tie rule); the other rows (a tie at the k-th value, fewer
    than k + 1 admissible entries, or k = Q) are selected by the reference's select_topk_ref. Costs one [B, Q]
    matrix, as the torch path; the same values as the reference, bitwise, on the same inputs."""
    check_inputs(query, queue, k, exclude_ids, queue_ids)
    B, Q = query.shape[0], queue.shape[0]
    if B == 0 or k >= Q:
        return select_topk_ref(similarity_ref(query, queue, exclude_ids, queue_ids, normalized), k)
    q, e = query.float(), queue.float()
    if not normalized:
        q, e = F.normalize(q, dim=1, eps=1e-12), F.normalize(e, dim=1, eps=1e-12)
    sim = q @ e.t()                          # similarity_ref's product; its masks only where a row needs them:
    if exclude_ids is not None:              # topk ranks NaN first, so a NaN / inf among a row's k + 1 best
        sim.masked_fill_(exclude_ids.view(-1, 1).long() == queue_ids.view(1, -1).long(), float("-inf"))
    v, i = sim.topk(k + 1, dim=1)            # sends the row to the reference's select below
    redo = ~torch.isfinite(v).all(1) | (v[:, k] == v[:, k - 1])
    v, i = v[:, :k], i[:, :k]
    i, by_index = i.sort(dim=1)                                   # equal values: the lower index first
    v, by_value = v.gather(1, by_index).sort(dim=1, descending=True, stable=True)
    i = i.gather(1, by_value)
    if bool(redo.any()):
        rows = redo.nonzero()[:, 0]
        part = sim[rows]
        v[rows], i[rows] = select_topk_ref(part.masked_fill(~torch.isfinite(part), float("-inf")), k)
    return v, i


# ----------------------------------------------------------------------------------------------------------------
# Backends (kernels/dispatch.py) and the public function

def measurement_inputs(args: tuple) -> tuple:
    """The first rows of the query (at most ROWS, and rows x Q <= SIMS), the whole queue."""
    query, queue, k, exclude_ids, queue_ids, normalized = (tuple(args) + (None, None, True))[:6]
    dev = "cuda" if query.device.type == "cuda" else "cpu"
    rows = max(1, min(query.shape[0], ROWS[dev], SIMS[dev] // max(1, queue.shape[0])))
    return (query[:rows], queue, k, exclude_ids[:rows] if exclude_ids is not None else None, queue_ids, normalized)


def verify(args, out, ref) -> str | None:
    return check_topk(*args, out, ref)


def _meta(query: Tensor, queue: Tensor, k: int, exclude_ids: Tensor | None = None, queue_ids=None,
          normalized: bool = True) -> tuple:
    """(dtype, k bucket, B bucket, Q bucket, next_pow2(D), exclusion): the tuned-config buckets (shape_class)."""
    c = dispatch.concrete
    kb = 1 if k == 1 else (32 if k <= 32 else 128)
    return (dtype_name(query.dtype), kb, _bucket(c(query.shape[0]), B_BUCKETS), _bucket(c(queue.shape[0]), Q_BUCKETS),
            next_pow2(c(query.shape[-1])), exclude_ids is not None)


def _key(meta: tuple) -> str:
    dt, kb, B, Q, D, ids = meta
    return f"{dt}|k{kb}-B{B}-Q{Q}-D{D}" + ("-ids" if ids else "")


OP = dispatch.register(dispatch.Op(
    name="queue_topk", reference=queue_topk_ref, meta=_meta, key=_key, verify=verify,
    backends=(dispatch.Backend("torch", queue_topk_torch), dispatch.Backend("cpp", queue_topk_cpp, cpp_why),
              dispatch.Backend("triton", queue_topk_triton, triton_why, cuda_timed_only=True)),
    default={"cpu": "cpp", "cuda": "torch"}, prepare=measurement_inputs))


def queue_topk(query: Tensor, queue: Tensor, k: int, exclude_ids: Tensor | None = None,
               queue_ids: Tensor | None = None, normalized: bool = True, backend: str | None = None):
    """Top-k cosine neighbours of each query row in the queue; the contract is this module's docstring.
    k: any integer operator.index takes (numpy, 0-d tensor). backend: one by name (torch, cpp, triton, ref), else
    the decision for this shape class (kernels/dispatch.py; static default: cpp on CPU, the torch path on CUDA)."""
    if queue.dim() == 2:
        k = as_k(k, queue.shape[0])
    check_inputs(query, queue, k, exclude_ids, queue_ids)
    fn = dispatch.lookup("queue_topk", _meta(query, queue, k, exclude_ids), query.device, backend)
    return fn(query, queue, k, exclude_ids, queue_ids, normalized)
