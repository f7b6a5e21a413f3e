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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
# Triton (CUDA): GEMM with a per-tile top-M epilogue, then an exact per-row select. Kernels and the argument for
# exactness: kernels/_queue_topk_kernels.py. Extra memory: keys [B, 2 ceil(Q / BLOCK_N) M] int32 (32 MiB at
# B=2048, Q=65536, BLOCK_N=64, M=2; the scan writes half) and a [B, KP] int64 scratch; never O(B x Q) values.
#
# Exactness: the GEMM's values S (tf32 for fp32 inputs) only prune; every returned value is re-scored exactly (R)
# and the k best R are selected with the tie rule. The pruning margin covers |S - R| for rows of norm <= 1 + 2^-4
# (normalized=True promises unit rows; normalized=False normalises inside the op). For inputs that break that promise
# the selection can only differ from the exact one among entries closer than ~2 eps |q| |e| to the k-th value.
# ----------------------------------------------------------------------------------------------------------------
import contextlib
import functools
import json
import math
import os
from pathlib import Path

from . import _queue_topk_kernels as _K

triton = _K.triton

MAX_K = 128            # larger k: queue_topk_triton declines (the bag is a [KP] register tensor) -> reference
MAX_STORED = 8192      # stored keys per row (next_pow2(ceil(Q / BLOCK_N)) x M) held by one select program;
#                        longer queues are cut into slices whose results are merged exactly
_U = 2.0 ** -24        # fp32 unit roundoff
UNIT_NORM_SLACK = 1.0 + 2.0 ** -4
MAX_RESIDENT_D = 256   # widest query row kept resident in the scan (64 x 256 bf16 = 32 KiB of shared memory per program)

# One entry per (dtype, k bucket): the shipped defaults, overridden per shape class by kernels/queue_topk_configs.json
# when bench/tune_queue_topk.py --write-configs has measured one on a GPU. Fields: BLOCK_B query rows per scan
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


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def _bucket(n: int, buckets: tuple) -> int:
    return next((b for b in buckets if n <= b), buckets[-1])


def shape_class(dtype: torch.dtype, B: int, Q: int, k: int) -> str:
    """The key of a tuned config: dtype (fp16 shares bf16's), k bucket (1 / <=32 / <=128), B and Q buckets."""
    dt = "fp32" if dtype == torch.float32 else "bf16"
    kb = 1 if k == 1 else (32 if k <= 32 else 128)
    return f"{dt}/k{kb}/B{_bucket(B, B_BUCKETS)}/Q{_bucket(Q, Q_BUCKETS)}"


@functools.lru_cache(maxsize=1)
def _tuned_table() -> dict:
    """kernels/queue_topk_configs.json's table ({} when absent or unreadable: the defaults apply)."""
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
    eps_s = (D + 16) * 4 * _U + (block_n - 1) * 2 * _U
    if dtype == torch.float32:
        eps_s += {"tf32": 2.0 ** -9, "tf32x3": 2.0 ** -17, "ieee": 0.0}[precision]
    eps = eps_s + (D + 4) * _U + (8 * (D + 4) * _U if normalize else 0.0)
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
        NTP = max(2, _next_pow2(NT))
        if NTP * M > MAX_STORED:
            raise ValueError(f"queue_topk_triton: Q={Q} needs {NTP * M} stored keys per row > MAX_STORED={MAX_STORED}")
        KP = max(16, _next_pow2(k))
        interp = _interpreting()
        # BLOCK_D 0: the query block stays resident for the whole scan when D fits (16-bit rows, D <= MAX_RESIDENT_D,
        # as the projector's 256: 64-192 KiB of shared memory on sm_90 by ptxas, measured for the tuner's grid);
        # fp32 rows (512 KiB resident: beyond the SM) and wider features loop over D in chunks of 64
        resident = _next_pow2(D) <= MAX_RESIDENT_D and query.dtype != torch.float32
        block_d = cfg["BLOCK_D"] or (max(16, _next_pow2(D)) if resident else 64)
        block_b, ch = cfg["BLOCK_B"], cfg["CH"]
        if interp:   # big blocks: interpreter cost grows with programs and loop trips, not block size
            block_b, ch = min(64, max(16, _next_pow2(B))), max(ch, min(BN, 128))
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

    def _on_device(self):
        return torch.cuda.device(self.dev) if self.dev.type == "cuda" else contextlib.nullcontext()

    def scan(self) -> None:
        if self.B:
            with self._on_device():   # launch on the data's GPU
                _K._scan_kernel[self.grid](*self.scan_args, **self.scan_meta)

    def select(self) -> None:
        if self.B:
            with self._on_device():
                _K._select_kernel[(self.B,)](*self.select_args, **self.select_meta)


def tune_grid(dt: str) -> list[dict]:
    """The tuner's search space for the scan at the headline shape (bench/tune_queue_topk.py; the static check,
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
