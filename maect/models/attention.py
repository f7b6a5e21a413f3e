"""One attention function for every block, with backends picked by name (xFormers-dispatch style: each backend says
why it cannot run given inputs, and asking for one that cannot lists every backend's reason).

attention(q, k, v): q, k, v [N, H, T, Dh] -> [N, H, T, Dh] = softmax(q kᵀ / sqrt(Dh)) v. No mask, no dropout
(MAE-CT uses neither). Any strides: the ViT passes views into its packed qkv tensor.

Backends (set_backend(name), the config key model.attention, or env MAECT_ATTENTION):
  xformers        xformers.ops.memory_efficient_attention on [N, T, H, Dh] ("BMHK") views (no copy), xFormers
                  picking the operator. CUDA only (xFormers has no CPU operators). Loaded through
                  maect.models.xformers_load, which preloads the CUDA 12 runtime a CUDA-12 xFormers wheel needs beside
                  a CUDA 13 torch and otherwise says exactly why it cannot load.
  xformers_cutlass, xformers_flash
                  the same with one operator pair forced (fmha.cutlass / fmha.flash Fw+Bw ops).
  sdpa            torch.nn.functional.scaled_dot_product_attention, torch picking the kernel per call.
  sdpa_flash, sdpa_efficient, sdpa_cudnn, sdpa_math
                  SDPA with one kernel forced through torch.nn.attention.sdpa_kernel (on CPU only flash and math
                  exist: torch's CPU flash kernel and the composite math path).
  math            attention_ref: the explicit fp32 reference (fp64 inputs stay fp64; under autocast, timm's math).
  auto            per (device type, dtype, head dim, sequence-length bucket, train/infer) the backend that measured
                  fastest, from the table `python bench/attention.py --write-table` writes
                  (maect/models/attention_table.json; env MAECT_ATTENTION_TABLE for another file); 'sdpa' (SDPA's own
                  kernel choice) where the table has no entry or its pick cannot run.
The backend chosen for each (backend asked, device, dtype, Dh, T, grad) is logged once (logger 'maect') and
cached, so the per-call cost is one dict lookup; under torch.compile the choice is a trace-time constant (no graph
break, no recompile). A named backend that cannot run raises BackendUnavailable at the first call (eager) or at
trace time (compiled).
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from maect.models import xformers_load as X

log = logging.getLogger("maect")

CONCRETE = ("xformers", "xformers_cutlass", "xformers_flash", "sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn",
            "sdpa_math", "math")
BACKENDS = CONCRETE + ("auto",)
# what --write-table may pick (the math paths are references, never fast)
AUTO_CANDIDATES = ("xformers", "xformers_cutlass", "xformers_flash", "sdpa", "sdpa_flash", "sdpa_efficient",
                   "sdpa_cudnn")
XFORMERS_OPS = {"xformers_cutlass": "cutlass", "xformers_flash": "flash"}   # backend -> xformers.ops.fmha module
TABLE_PATH = os.environ.get("MAECT_ATTENTION_TABLE", os.path.join(os.path.dirname(__file__), "attention_table.json"))

_backend = os.environ.get("MAECT_ATTENTION", "sdpa")
_chosen: dict[tuple, str] = {}            # resolution key -> concrete backend; filled once per key by _choose
_table: dict | None = None


class BackendUnavailable(RuntimeError):
    """A backend asked for by name cannot run the given inputs; the message lists every backend's reason."""


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    _backend = name


def get_backend() -> str:
    return _backend


# ------------------------------------------------------------------------------------------------ implementations
def attention_ref(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ / sqrt(Dh)) v computed in fp32 (fp64 for fp64 inputs): the math reference. Inside an autocast
    region the products follow autocast instead (low-precision GEMMs, fp32 softmax): exactly the explicit attention
    of timm / official MAE, which is what the reference-style training step measures."""
    if torch.is_autocast_enabled(q.device.type):
        return ((q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)).softmax(dim=-1) @ v
    acc = torch.promote_types(q.dtype, torch.float32)
    s = (q.to(acc) @ k.to(acc).transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return (s.softmax(dim=-1) @ v.to(acc)).to(q.dtype)


def attention_naive(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The same math in the input dtype (scores, softmax and product all low precision): the unfused low-precision
    path whose own error sets the tolerance of the bf16/fp16 checks (rule: err <= 2 x its error + atol)."""
    return ((q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)).softmax(dim=-1) @ v


def _sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def _sdpa_forced(kernel_name: str) -> Callable:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    kernel = getattr(SDPBackend, kernel_name)

    def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        with sdpa_kernel(kernel):   # the backward runs the same kernel's backward op; only the forward needs it
            return F.scaled_dot_product_attention(q, k, v)
    return fn


def _xformers_ops(name: str):
    """The (forward, backward) operator pair forced by backend `name`, or None for xFormers' own dispatch."""
    if name not in XFORMERS_OPS:
        return None
    from xformers.ops import fmha
    mod = getattr(fmha, XFORMERS_OPS[name])
    return mod.FwOp, mod.BwOp


def _xformers_fn(name: str) -> Callable:
    def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        import xformers.ops as xops
        # [N, H, T, Dh] -> [N, T, H, Dh] (BMHK): transposed views (the ViT's packed qkv is already in this order)
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              op=_xformers_ops(name))
        return out.transpose(1, 2)
    return fn


def _impl(name: str) -> Callable:
    if name.startswith("xformers"):
        return _xformers_fn(name)
    return {"sdpa": _sdpa, "math": attention_ref}.get(name) or _sdpa_forced(
        {"sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
         "sdpa_math": "MATH"}[name])


# ------------------------------------------------------------------------------------------------ availability
def _xformers_reason(name: str, q: Tensor, k: Tensor, v: Tensor, grad: bool) -> str | None:
    if q.device.type != "cuda":
        if X._xformers_dir() is None:
            return f"not installed (and no {q.device.type.upper()} operators in xFormers)"
        return f"no {q.device.type.upper()} operators (every xFormers attention operator is CUDA-only)"
    status = X.load_xformers()
    if not status.ok:
        return status.reason
    from xformers.ops import fmha
    inp = fmha.Inputs(query=q.transpose(1, 2), key=k.transpose(1, 2), value=v.transpose(1, 2))
    forced = _xformers_ops(name)
    kinds = (("forward", [forced[0]] if forced else fmha.ALL_FW_OPS),)
    if grad:
        kinds += (("backward", [forced[1]] if forced else fmha.ALL_BW_OPS),)
    out = []
    for kind, ops in kinds:
        why = {op.NAME: op.not_supported_reasons(inp) for op in ops}
        if all(why.values()):
            out.append(f"no {kind} operator: " + "; ".join(f"{n}: {', '.join(r)}" for n, r in why.items()))
    return " | ".join(out) or None


# SDPA kernel -> (label in reasons, torch.backends.cuda names: is-enabled query, switch, can_use_* check)
_SDPA_CUDA = {"sdpa_flash": ("flash", "flash_sdp_enabled", "enable_flash_sdp", "can_use_flash_attention"),
              "sdpa_efficient": ("mem-efficient", "mem_efficient_sdp_enabled", "enable_mem_efficient_sdp",
                                 "can_use_efficient_attention"),
              "sdpa_cudnn": ("cuDNN attention", "cudnn_sdp_enabled", "enable_cudnn_sdp", "can_use_cudnn_attention")}
_HALF_ONLY_MAX_DH = {"sdpa_flash": 256, "sdpa_cudnn": 128}   # sm80+, fp16/bf16, head dim a multiple of 8 up to this


def _cuda_sdpa_reason(name: str, q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """Documented limits first (clear reasons), then torch's own verdict for anything else."""
    cc = torch.cuda.get_device_capability(q.device)
    dt, Dh = q.dtype, q.shape[-1]
    half = dt in (torch.float16, torch.bfloat16)
    label, enabled_fn, switch, can_fn = _SDPA_CUDA[name]
    if name in _HALF_ONLY_MAX_DH:
        max_dh = _HALF_ONLY_MAX_DH[name]
        if cc < (8, 0):
            return f"needs sm80+ (this GPU is sm{cc[0]}{cc[1]})"
        if not half:
            return f"dtype {dt} unsupported ({label}: fp16/bf16)"
        if Dh % 8 or Dh > max_dh:
            return f"head dim {Dh} unsupported ({label}: a multiple of 8, <= {max_dh})"
    else:  # sdpa_efficient
        if dt == torch.bfloat16 and cc < (8, 0):
            return f"bf16 needs sm80+ (this GPU is sm{cc[0]}{cc[1]})"
        if dt not in (torch.float32, torch.float16, torch.bfloat16):
            return f"dtype {dt} unsupported ({label}: fp32/fp16/bf16)"
        if Dh % (8 if half else 4):
            return f"head dim {Dh} unsupported ({label}: a multiple of {8 if half else 4} for {dt})"
    if not getattr(torch.backends.cuda, enabled_fn)():
        return f"disabled globally (torch.backends.cuda.{switch}(False) or equivalent)"
    params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, False, False)
    if not getattr(torch.backends.cuda, can_fn)(params, False):
        return f"torch refuses these inputs (torch.backends.cuda.{can_fn}(params, debug=True) says why)"
    return None


def why_not(name: str, q: Tensor, k: Tensor, v: Tensor, grad: bool | None = None) -> str | None:
    """None if backend `name` can run attention(q, k, v) (with a backward when grad), else the reason."""
    grad = _needs_grad(q, k, v) if grad is None else grad
    if not q.dtype.is_floating_point:
        return f"dtype {q.dtype} is not a floating-point type"
    if name in ("sdpa", "sdpa_math", "math"):
        return None
    if name.startswith("xformers") and name in CONCRETE:
        return _xformers_reason(name, q, k, v, grad)
    if name in ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn"):
        if q.device.type == "cpu":
            if name == "sdpa_flash":
                return None if q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16) else \
                    f"dtype {q.dtype} unsupported (CPU flash: fp32/fp64/bf16/fp16)"
            return f"no CPU kernel ({'mem-efficient' if name == 'sdpa_efficient' else 'cuDNN'} attention is CUDA-only)"
        if q.device.type == "cuda":
            return _cuda_sdpa_reason(name, q, k, v)
        return f"no {q.device.type} kernel"
    if name == "auto":
        return None
    raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")


def reasons(q: Tensor, k: Tensor, v: Tensor, grad: bool | None = None) -> dict[str, str | None]:
    """Every concrete backend -> None (can run) or why not."""
    return {n: why_not(n, q, k, v, grad) for n in CONCRETE}


def _needs_grad(q: Tensor, k: Tensor, v: Tensor) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def _describe(q: Tensor, grad: bool) -> str:
    T, Dh = q.shape[-2:]
    return f"q [*, *, T={T}, Dh={Dh}] {str(q.dtype).replace('torch.', '')} on {q.device.type}, {'with' if grad else 'no'} grad"


def unavailable_message(name: str, q: Tensor, k: Tensor, v: Tensor, grad: bool) -> str:
    why = reasons(q, k, v, grad)
    w = max(map(len, why))
    lines = [f"  {n:<{w}}  {'can run' if r is None else 'no: ' + r}" for n, r in why.items()]
    return (f"attention backend {name!r} cannot run {_describe(q, grad)}: {why[name]}\nEvery backend for these inputs:\n"
            + "\n".join(lines) + "\nSet model.attention (or env MAECT_ATTENTION) to one that can run, or to 'auto'.")


# ------------------------------------------------------------------------------------------------ the auto table
def seq_bucket(T: int) -> int:
    """Sequence-length bucket: the next power of two >= T, at least 64 (ViT: 50 -> 64, 65 -> 128, 197 -> 256,
    257 -> 512), so MAE-visible and full-sequence shapes of every ViT size land in different buckets."""
    return max(64, 1 << (max(T, 1) - 1).bit_length())


def table_key(device_type: str, dtype: torch.dtype, Dh: int, T: int) -> str:
    return f"{device_type}|{str(dtype).replace('torch.', '')}|{Dh}|{seq_bucket(T)}"


def load_table(path: str | None = None) -> dict:
    """The measured table ({'entries': {key: {'train': name, 'infer': name}}, 'measured_on': ...}); {} if absent."""
    global _table
    if path is None and _table is not None:
        return _table
    p = path or TABLE_PATH
    try:
        with open(p) as f:
            t = json.load(f)
    except FileNotFoundError:
        t = {}
    except (OSError, ValueError) as e:
        log.warning(f"attention: cannot read the auto table {p} ({e}); auto uses sdpa")
        t = {}
    if path is None:
        _table = t
    return t


def save_table(path: str, new: dict, merge: bool = True) -> dict:
    """Write table `new` to path atomically; merge=True keeps the entries of the existing file that `new` does not
    measure (another device type, dtype or shape). Each entry keeps its own 'measured_on'. Returns what was written."""
    from maect.atomic import write_json
    old = load_table(path) if merge else {}
    entries = {**old.get("entries", {}), **new.get("entries", {})}
    out = {**old, **new, "entries": dict(sorted(entries.items()))}
    write_json(path, out)
    return out


def pick_from_table(table: dict, device_type: str, dtype: torch.dtype, Dh: int, T: int, grad: bool) -> str | None:
    """The measured pick for these inputs, or None if the table has no entry."""
    entry = table.get("entries", {}).get(table_key(device_type, dtype, Dh, T))
    return None if entry is None else entry.get("train" if grad else "infer")


def resolve(name: str, q: Tensor, k: Tensor, v: Tensor, grad: bool | None = None) -> tuple[str, str]:
    """(concrete backend that runs, why) for backend `name`; raises BackendUnavailable for a named backend that
    cannot run these inputs."""
    grad = _needs_grad(q, k, v) if grad is None else grad
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    if name != "auto":
        if why_not(name, q, k, v, grad) is not None:
            raise BackendUnavailable(unavailable_message(name, q, k, v, grad))
        return name, "asked by name"
    table = load_table()
    key = table_key(q.device.type, q.dtype, q.shape[-1], q.shape[-2])
    pick = pick_from_table(table, q.device.type, q.dtype, q.shape[-1], q.shape[-2], grad)
    if pick is None:
        return "sdpa", (f"auto: no measured entry {key} in {TABLE_PATH} (bench/attention.py --write-table measures "
                        "one): SDPA's own kernel choice")
    why = why_not(pick, q, k, v, grad) if pick in CONCRETE else f"unknown backend {pick!r} in the table"
    if why is not None:
        return "sdpa", f"auto: table pick {pick} for {key} cannot run ({why}): SDPA's own kernel choice"
    entry = table["entries"][key]
    dev = (entry.get("measured_on") or table.get("measured_on") or {}).get("device", "?")
    return pick, f"auto: table entry {key} ({'train' if grad else 'infer'}), measured on {dev}"


_IMPLS = {n: _impl(n) for n in CONCRETE}


@torch.compiler.assume_constant_result
def _choose(backend: str, device_type: str, device_index: int | None, dtype: torch.dtype, T: int, Dh: int,
            grad: bool) -> str:
    """The concrete backend for these inputs: cached per key, logged once. Metadata in, a string out, so under
    torch.compile it runs once at trace time and its result is a constant (no graph break, no guard on the cache).
    The availability checks see representative [1, 1, T, Dh] contiguous tensors (allocated only on a cache miss)."""
    key = (backend, device_type, dtype, Dh, T, grad)
    name = _chosen.get(key)
    if name is None:
        r = torch.empty(1, 1, T, Dh, dtype=dtype, device=torch.device(device_type, device_index))
        name, why = resolve(backend, r, r, r, grad)
        _chosen[key] = name
        log.info(f"attention: {name} runs [*, *, T={T}, Dh={Dh}] {str(dtype).replace('torch.', '')} on {device_type} "
                 f"({'train' if grad else 'infer'}) - {why}")
    return name


def _concrete(n, hi: int = 1 << 24) -> int:
    """n as a Python int. Under torch.compile's dynamic shapes (automatic after a recompile for a second shape: the
    decoder's blocks share Block.forward with the encoder's) a size is symbolic and cannot be an argument of _choose;
    a binary search of comparisons turns it into a constant, each comparison a guard, so the graph is specialised on
    the size (a recompile per new size, as with static shapes) instead of breaking at _choose."""
    if not torch.compiler.is_compiling():
        return n
    lo = 0
    while lo < hi:
        mid = (lo + hi) // 2
        if n <= mid:
            hi = mid
        else:
            lo = mid + 1
    return lo


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ / sqrt(Dh)) v for q, k, v [N, H, T, Dh] with the configured backend."""
    T, Dh = _concrete(q.shape[-2]), _concrete(q.shape[-1])
    name = _choose(_backend, q.device.type, q.device.index, q.dtype, T, Dh, _needs_grad(q, k, v))
    return _IMPLS[name](q, k, v)


def clear_cache() -> None:
    """Forget resolved choices and the loaded table (tests; after writing a new table)."""
    global _table
    _chosen.clear()
    _table = None
