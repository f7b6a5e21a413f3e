"""Triton kernels of queue_topk (the contract and the launcher are in kernels/queue_topk.py).

Two kernels, no state carried across queue tiles, so any split of the queue across programs is exact:

_scan_kernel  (the fused GEMM; grid = (query row blocks, queue splits))
    A program keeps BLOCK_B query rows resident and streams queue tiles of BLOCK_N rows. Per tile it computes
    S = q_blk @ e_tileᵀ with tl.dot (fp32 accumulation; tf32 for fp32 inputs unless told otherwise), applies the
    id exclusion and range mask (-inf), drops NaN (never a maximum), and stores each row's M best entries of the
    tile into keys[B, 2 NT M] int32 (NT = number of tiles; slots [t M, t M + M) of a row), each as one int32:
    ord(S) with its low log2(BLOCK_N) bits replaced by BLOCK_N - 1 - position (the select kernel unpacks it to the
    int64 key below). A +inf maximum unpacks to NONFINITE_KEY: the select kernel then recomputes that tile exactly,
    where the non-finite rule applies.
    Work per similarity: the MMA, an add (range), an id compare and select, a maxnum (NaN), the int32 packing of
    value and position (shift, two logic ops, a subtract), then M integer maxima (an equality select between them).
    The stored values are S lowered by <= BLOCK_N - 1 ulp (the packing); delta_for's block_n term covers it.

_select_kernel  (one program per query row)
    1. t = the k-th largest stored value of the row (32-step bisection on the order-preserving integer of the fp32
       values; -inf when fewer than k finite values are stored).
    2. The stored values are only approximations S of the exact similarities R that the op returns (R: fp32
       products of the inputs summed in one fixed order, the same code for every candidate). With |S - R| <= eps
       for every entry (eps from the dtype, the dot precision and D: kernels/queue_topk.py, delta_for), every entry
       whose R reaches the k-th largest R has S >= t - 2 eps =: thr. Such an entry is either stored, or hidden
       behind its tile's M stored entries, which are then all >= thr. So the candidates are
           stored keys with S >= thr                      (about k of them)
           every entry of a tile whose M-th stored key has S >= thr, or that holds a non-finite stored key
       ("flagged" tiles; expected C(k, M) (BLOCK_N / Q)^(M-1) per row for random data: 0.2 at k=20, M=2,
       BLOCK_N=64, Q=65536). Both lists are compacted (cumsum) into the row's stretch of the keys buffer.
    3. The candidates are re-scored exactly (R, ids and the non-finite rule applied) in chunks of CH and merged
       into a sorted bag of k keys by rank arithmetic: an entry's new position = the number of kept keys above it.
       Keys are unique (value, index) pairs, so the positions are a permutation; no sort, no insertion loop.
    4. The bag, unpacked: values [k] fp32 descending, indices [k] int64 (padding -inf / -1).

Key packing (the select kernel): key = ord(v) << 32 | (2^31 - 1 - index), ord() maps fp32 bits to int32 in the order of the
floats (-0.0 folded into +0.0 first). Larger key = ranks first: higher value, then the lower index (the tie rule).
"""
from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl
    _jit, _constexpr = triton.jit, tl.constexpr
except ImportError:  # pure-PyTorch install: the launcher raises, the reference works
    triton = tl = None
    _jit = _constexpr = lambda x: x  # noqa: E731

# Sizes that vary from call to call are not specialised on (value 1 / divisible by 16), so one compiled kernel serves
# every batch and queue length: no recompiles in evaluation's chunked calls, and a compile done for one B (the
# tuner's compile workers) serves all. Strides and D stay specialised (aligned vector loads).
_VARYING = ["B", "Q", "NT", "TILES", "K"]


def _kernel(fn):
    return triton.jit(do_not_specialize=[a for a in _VARYING if a in fn.__code__.co_varnames])(fn) \
        if triton is not None else fn

# Device helpers are jit functions on GPU; under the interpreter plain Python (it re-patches triton.language on every
# jit-to-jit call, ~5 ms, which costs more than the arithmetic the helpers do). For the same reason the reductions
# go straight to tl.reduce / tl.associative_scan with triton's own combine functions there (the interpreter runs
# those as numpy sum / nanmax / nanargmax / cumsum), instead of through tl.sum, tl.max, tl.cumsum (jit functions).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_device_fn = _jit if not _INTERPRET else (lambda fn: fn)

if tl is not None and _INTERPRET:
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
_EMPTY = _constexpr(EMPTY_KEY)
_NONFINITE = _constexpr(NONFINITE_KEY)
_ABSENT = _constexpr(ABSENT_KEY)


@_device_fn
def _ord(v):
    """Order-preserving int32 of fp32 v (not NaN); -0.0 and +0.0 map to the same integer."""
    v = tl.where(v == 0.0, 0.0, v)
    bits = v.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@_device_fn
def _unord(o):
    """Inverse of _ord (int32 -> fp32)."""
    return (o ^ ((o >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@_device_fn
def _pack(v, i):
    """int64 key of (value v fp32 not NaN, index i int32 in [0, 2^31))."""
    return (_ord(v).to(tl.int64) << 32) + (2147483647 - i).to(tl.int64)


@_device_fn
def _key_index(key):
    return 2147483647 - (key & 0x7FFFFFFF).to(tl.int32)


@_device_fn
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


@_device_fn
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


@_device_fn
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
    delta,      # fp32: 2 eps (x |q| when the rows are promised unit-norm); see kernels/queue_topk.py delta_for
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
