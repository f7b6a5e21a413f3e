"""Nearest-neighbour lookup in a feature queue: top-k cosine similarity with self-id exclusion.

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
    * Similarities accumulate in fp32; inputs are not upcast first in the kernels (bf16 x bf16 products are exact
      in fp32, so only the summation order differs from the reference).
    * Ties: among equal similarities the lower queue index ranks first.
    * Excluded entries never come back. A row with fewer than k admissible entries is padded at the end with
      value -inf and index -1 (so an all-excluded row is all -1).
    * k must satisfy 1 <= k <= Q; otherwise ValueError. B == 0 returns empty [0, k] tensors.
    * normalized=False L2-normalises query and queue rows (eps 1e-12) inside the op; the inputs are not modified.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
    if not isinstance(k, int) or k < 1 or k > queue.shape[0]:
        raise ValueError(f"queue_topk: k={k} must satisfy 1 <= k <= queue size Q={queue.shape[0]}")
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
    """The full [B, Q] fp32 similarity matrix with excluded entries set to -inf (reference helper)."""
    q, e = query.float(), queue.float()
    if not normalized:
        q, e = F.normalize(q, dim=1, eps=1e-12), F.normalize(e, dim=1, eps=1e-12)
    sim = q @ e.t()
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
# Triton: fused tile-wise GEMM + running top-k + self-id exclusion; the [B, Q] matrix is never written.
#
# Program (pid_b, pid_s) owns BLOCK_B query rows and a contiguous range of queue tiles (split-Q: SPLITS programs
# share a row block when B alone cannot fill the SMs). Per queue tile it computes s = q_blk @ e_tileᵀ with tl.dot
# (fp32 accumulation), applies normalisation and the id mask, then folds the tile into a running "bag" of the k best
# entries per row, held in registers: take each row's tile maximum (one paired max/argmax reduction, leftmost on
# ties), let it replace the row's worst bag entry if it ranks above it, mask it out of the tile, repeat until no row
# improves. The loop runs k times on a program's first tile; on the t-th tile a row gains about k/t entries (random
# order), and the loop runs for the row block's largest gain. No sort: tl.sort is far slower in the interpreter and
# needs log^2 passes on GPU. (Unmeasured on GPU so far: bench/gpu_suite.py reports it.)
#
# The tie rule lives in one packed int64 key per bag entry:  key = ord(value) << 32 | (2^31 - 1 - index),  where
# ord() maps fp32 bits to int32 in the same order as the floats (-0.0 folded into +0.0 first). Larger key = ranks
# first: higher value, and among equal values the lower index. The bag's worst entry is then a single tl.min.
# With one split the program sorts its bag and writes the final [B, k]; otherwise it writes its bag keys and
# _queue_topk_merge_kernel selects the k largest of the [B, SPLITS * KP] candidate keys.
# ----------------------------------------------------------------------------------------------------------------
import contextlib
import functools
import math
import os

try:
    import triton
    import triton.language as tl
    _jit, _constexpr = triton.jit, tl.constexpr
except ImportError:  # pure-PyTorch install: the reference above still works, queue_topk_triton raises
    triton = tl = None
    _jit = _constexpr = lambda x: x  # noqa: E731


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Device helpers are jit functions on GPU; under the interpreter they are plain Python (it re-patches triton.language
# on every jit-to-jit call, which costs more than the arithmetic the helpers do).
_device_fn = _jit if not _interpreting() else (lambda fn: fn)

MAX_K = 128                                  # larger k: queue_topk_triton declines (the bag lives in registers)
# key(-inf, index 0), the largest key a -inf value can have: an empty bag slot; every finite value ranks above it
_EMPTY_KEY = _constexpr((-2139095041 << 32) + 2147483647)
_MASKED_KEY = _constexpr(-9223372036854775807)   # below every key: already taken


@_device_fn
def _pack_key(v, i):
    """int64 key ordering (value desc, index asc): larger key ranks first. v fp32 (not NaN), i int32 in [0, 2^31)."""
    v = tl.where(v == 0.0, 0.0, v)                    # -0.0 == +0.0 must tie like in the reference
    bits = v.to(tl.int32, bitcast=True)
    ordv = bits ^ ((bits >> 31) & 0x7FFFFFFF)         # monotone fp32 -> int32
    return (ordv.to(tl.int64) << 32) + (2147483647 - i).to(tl.int64)


@_device_fn
def _unpack_key(key):
    """(value fp32, index int32) of packed keys; keys <= _EMPTY_KEY (empty, masked, -inf) give (-inf, -1)."""
    ordv = (key >> 32).to(tl.int32)
    v = (ordv ^ ((ordv >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    i = 2147483647 - (key & 0x7FFFFFFF).to(tl.int32)
    valid = key > _EMPTY_KEY
    return tl.where(valid, v, float("-inf")), tl.where(valid, i, -1)


@_device_fn
def _sorted_keys(keys, slots, K, KP: tl.constexpr):
    """The K largest of keys [R, C] in descending order, as [R, KP] (slots >= K: _EMPTY_KEY). Keys are unique
    except empty ones, which are all equal and sort last."""
    out = tl.full([keys.shape[0], KP], _EMPTY_KEY, tl.int64)
    for j in range(K):
        top = tl.max(keys, 1)
        out = tl.where(slots[None, :] == j, top[:, None], out)
        keys = tl.where(keys == top[:, None], _MASKED_KEY, keys)
    return out


@_jit
def _queue_topk_split_kernel(
    q_ptr,      # query [B, D] fp32/bf16/fp16, strides (stride_qb, stride_qd); read only
    e_ptr,      # queue [Q, D] same dtype, strides (stride_eq, stride_ed); read only
    ex_ptr,     # exclude_ids [B] integer, contiguous; read only when HAS_IDS
    qid_ptr,    # queue_ids [Q] integer, contiguous; read only when HAS_IDS
    out_v_ptr,  # FINAL: values [B, K] fp32, contiguous; unused otherwise
    out_i_ptr,  # FINAL: indices [B, K] int64, contiguous; unused otherwise
    cand_ptr,   # not FINAL: candidate keys [B, SPLITS * KP] int64, this program writes columns pid_s*KP ...+KP
    B, Q, D,
    stride_qb, stride_qd, stride_eq, stride_ed,
    K, SPLITS,   # runtime ints (fewer compiled variants): k, and the number of programs along the queue
    KP: tl.constexpr, FINAL: tl.constexpr,
    HAS_IDS: tl.constexpr, NORMALIZE: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    pos = tl.arange(0, BLOCK_Q)
    slots = tl.arange(0, KP)

    if NORMALIZE:  # query row norms once; F.normalize semantics x / max(||x||, eps)
        qsq = tl.zeros([BLOCK_B], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + dd
            qc = tl.load(q_ptr + rows64[:, None] * stride_qb + d[None, :] * stride_qd,
                         mask=row_ok[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
            qsq += tl.sum(qc * qc, 1)
        q_norm = tl.maximum(tl.sqrt(qsq), 1e-12)
    if HAS_IDS:
        ex = tl.load(ex_ptr + rows, mask=row_ok, other=-1).to(tl.int64)

    # slots >= K never hold an entry: they look "best" (max key) so the worst-slot search skips them
    bag = tl.where(slots[None, :] < K, _EMPTY_KEY, 9223372036854775807) + tl.zeros([BLOCK_B, KP], tl.int64)
    n_tiles = tl.cdiv(Q, BLOCK_Q)
    per_split = tl.cdiv(n_tiles, SPLITS)
    t_lo = pid_s * per_split
    t_hi = tl.minimum(t_lo + per_split, n_tiles)
    for t in range(t_lo, t_hi):
        cols = t * BLOCK_Q + pos
        col_ok = cols < Q
        cols64 = cols.to(tl.int64)
        acc = tl.zeros([BLOCK_B, BLOCK_Q], tl.float32)
        esq = tl.zeros([BLOCK_Q], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + dd
            d_ok = d < D
            qc = tl.load(q_ptr + rows64[:, None] * stride_qb + d[None, :] * stride_qd,
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)                   # [BLOCK_B, BLOCK_D]
            ec = tl.load(e_ptr + cols64[None, :] * stride_eq + d[:, None] * stride_ed,
                         mask=d_ok[:, None] & col_ok[None, :], other=0.0)                   # [BLOCK_D, BLOCK_Q]
            if DOT_F32:  # the interpreter's tl.dot mishandles bf16; bf16 x bf16 products are exact in fp32
                acc = tl.dot(qc.to(tl.float32), ec.to(tl.float32), acc, input_precision=PRECISION)
            else:
                acc = tl.dot(qc, ec, acc, input_precision=PRECISION)
            if NORMALIZE:
                ef = ec.to(tl.float32)
                esq += tl.sum(ef * ef, 0)
        s = acc
        if NORMALIZE:
            s = s / q_norm[:, None] / tl.maximum(tl.sqrt(esq), 1e-12)[None, :]
        ok = row_ok[:, None] & col_ok[None, :]
        if HAS_IDS:
            qid = tl.load(qid_ptr + cols, mask=col_ok, other=-1).to(tl.int64)
            ok = ok & (ex[:, None] != qid[None, :])
        s = tl.where(ok, s, float("-inf"))           # excluded / out-of-range entries never enter the bag

        m, p = tl.max(s, 1, return_indices=True, return_indices_tie_break_left=True)
        ck = _pack_key(m, t * BLOCK_Q + p)       # a -inf candidate packs to <= _EMPTY_KEY: never taken
        w, ws = tl.min(bag, 1, return_indices=True, return_indices_tie_break_left=True)
        better = ck > w
        go = tl.max(better.to(tl.int32), 0) > 0
        while go:
            bag = tl.where(better[:, None] & (slots[None, :] == ws[:, None]), ck[:, None], bag)
            s = tl.where(pos[None, :] == p[:, None], float("-inf"), s)
            m, p = tl.max(s, 1, return_indices=True, return_indices_tie_break_left=True)
            ck = _pack_key(m, t * BLOCK_Q + p)
            w, ws = tl.min(bag, 1, return_indices=True, return_indices_tie_break_left=True)
            better = ck > w
            go = tl.max(better.to(tl.int32), 0) > 0

    bag = tl.where(slots[None, :] < K, bag, _EMPTY_KEY)
    if FINAL:
        v, i = _unpack_key(_sorted_keys(bag, slots, K, KP))
        offs = rows64[:, None] * K + slots[None, :]
        st_mask = row_ok[:, None] & (slots[None, :] < K)
        tl.store(out_v_ptr + offs, v, mask=st_mask)
        tl.store(out_i_ptr + offs, i.to(tl.int64), mask=st_mask)
    else:
        tl.store(cand_ptr + rows64[:, None] * (SPLITS * KP) + pid_s * KP + slots[None, :], bag,
                 mask=row_ok[:, None])


@_jit
def _queue_topk_merge_kernel(
    cand_ptr,   # candidate keys [B, C] int64, C = SPLITS * KP, contiguous; empty slots hold _EMPTY_KEY
    out_v_ptr,  # values [B, K] fp32, contiguous
    out_i_ptr,  # indices [B, K] int64, contiguous
    B, K,
    C: tl.constexpr, KP: tl.constexpr, BLOCK_B: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    c = tl.arange(0, C)
    slots = tl.arange(0, KP)
    keys = tl.load(cand_ptr + rows64[:, None] * C + c[None, :], mask=row_ok[:, None], other=_EMPTY_KEY)
    v, i = _unpack_key(_sorted_keys(keys, slots, K, KP))
    offs = rows64[:, None] * K + slots[None, :]
    st_mask = row_ok[:, None] & (slots[None, :] < K)
    tl.store(out_v_ptr + offs, v, mask=st_mask)
    tl.store(out_i_ptr + offs, i.to(tl.int64), mask=st_mask)


def _next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def _prune_configs(configs, named_args, **kwargs):
    """Keep the register-resident bag (BLOCK_B x KP int64 keys) within reach of the register file."""
    kp = {**named_args, **kwargs}["KP"]
    kept = [c for c in configs if c.kwargs["BLOCK_B"] * kp <= 8192]
    return kept or configs[-1:]


_GPU_CONFIGS = [  # (BLOCK_B, BLOCK_Q, BLOCK_D, num_warps, num_stages); the last is the safest for large k
    (128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (64, 64, 64, 4, 4), (128, 64, 64, 4, 3), (64, 128, 128, 8, 2),
    (32, 128, 64, 4, 3),
]


_kernel_cache: dict = {}


def _split_kernel():
    """The split kernel, autotuned on GPU (MAECT_AUTOTUNE=0: one config); decided on first use, then cached."""
    if "split" not in _kernel_cache:
        if _interpreting():
            kern = _queue_topk_split_kernel      # block sizes are chosen per call in the launcher
        else:
            configs = [triton.Config(dict(BLOCK_B=b, BLOCK_Q=q, BLOCK_D=d), num_warps=w, num_stages=st)
                       for b, q, d, w, st in _GPU_CONFIGS]
            if os.environ.get("MAECT_AUTOTUNE", "1") == "0":
                configs = configs[1:2]
            kern = triton.autotune(configs, key=["B", "Q", "D", "KP", "SPLITS", "HAS_IDS", "NORMALIZE"],
                                   prune_configs_by={"early_config_prune": _prune_configs})(_queue_topk_split_kernel)
        _kernel_cache["split"] = kern
    return _kernel_cache["split"]


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _num_splits(B: int, Q: int, device: torch.device) -> int:
    """Split the queue across programs until ~2 programs per SM, keeping >= 4 tiles of 128 per split."""
    n_sm = _sm_count(device)
    row_blocks = -(-B // 64)
    tiles = -(-Q // 128)
    splits = 1
    while row_blocks * splits < 2 * n_sm and tiles >= 8 * splits and splits < 32:
        splits *= 2
    return splits


def queue_topk_triton(query: Tensor, queue: Tensor, k: int, exclude_ids: Tensor | None = None,
                      queue_ids: Tensor | None = None, normalized: bool = True, *,
                      splits: int | None = None) -> tuple[Tensor, Tensor]:
    """Fused Triton queue top-k; same contract as queue_topk_ref. k > MAX_K falls back to the reference.
    splits: override the split-Q heuristic (a power of two; tests use it to exercise the merge path)."""
    check_inputs(query, queue, k, exclude_ids, queue_ids)
    if triton is None:
        raise RuntimeError("queue_topk_triton: triton is not installed")
    if k > MAX_K:
        return queue_topk_ref(query, queue, k, exclude_ids, queue_ids, normalized)
    B, D = query.shape
    Q = queue.shape[0]
    dev = query.device
    out_v = torch.empty(B, k, device=dev, dtype=torch.float32)
    out_i = torch.empty(B, k, device=dev, dtype=torch.int64)
    if B == 0:
        return out_v, out_i
    KP = max(2, _next_pow2(k))
    S = splits if splits is not None else _num_splits(B, Q, dev)
    if S < 1 or S & (S - 1):
        raise ValueError(f"queue_topk_triton: splits={S} must be a power of two")
    has_ids = exclude_ids is not None
    ex = exclude_ids.contiguous() if has_ids else query      # dummy pointer when HAS_IDS is False
    qid = queue_ids.contiguous() if has_ids else query
    final = S == 1
    cand = out_i if final else torch.empty(B, S * KP, device=dev, dtype=torch.int64)
    args = (query, queue, ex, qid, out_v, out_i, cand, B, Q, D, query.stride(0), query.stride(1), queue.stride(0),
            queue.stride(1), k, S)
    meta = dict(KP=KP, FINAL=final, HAS_IDS=has_ids, NORMALIZE=not normalized,
                PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
                DOT_F32=_interpreting() and query.dtype == torch.bfloat16)
    kern = _split_kernel()
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():   # launch on the data's GPU
        if _interpreting():  # big blocks: interpreter cost grows with programs and loop trips, not block size
            blocks = dict(BLOCK_B=min(64, max(16, _next_pow2(B))), BLOCK_Q=128,
                          BLOCK_D=min(128, max(16, _next_pow2(D))))
            kern[(triton.cdiv(B, blocks["BLOCK_B"]), S)](*args, **meta, **blocks)
        else:
            kern[lambda m: (triton.cdiv(B, m["BLOCK_B"]), S)](*args, **meta)
        if not final:
            C = S * KP
            block_b = 64 if _interpreting() else max(1, min(16, 4096 // C))
            _queue_topk_merge_kernel[(triton.cdiv(B, block_b),)](cand, out_v, out_i, B, k, C=C, KP=KP,
                                                                 BLOCK_B=block_b)
    return out_v, out_i
