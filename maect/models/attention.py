"""One attention function for every block; its backend is the decision for the inputs' shape class (kernels/dispatch.py:
made at start-up, a dict lookup per call) or one asked for by name. Each backend says why it cannot run given inputs
(xFormers-dispatch style), and asking for one that cannot raises BackendUnavailable listing every backend's reason.

attention(q, k, v): q, k, v [N, H, T, Dh] -> [N, H, T, Dh] = softmax(q kᵀ / sqrt(Dh)) v. No mask, no dropout
(MAE-CT uses neither). Any strides: the ViT passes views into its packed qkv tensor.

Backends (the config key model.attention, or set_backend(name); 'auto', the default, runs the decision):
  sdpa            torch.nn.functional.scaled_dot_product_attention, torch picking the kernel per call: the torch
                  path, and the static default where no decision exists.
  sdpa_flash, sdpa_efficient, sdpa_cudnn, sdpa_math
                  SDPA with one kernel forced through torch.nn.attention.sdpa_kernel (on CPU only flash and math
                  exist: torch's CPU flash kernel and the composite math path).
  xformers        xformers.ops.memory_efficient_attention on [N, T, H, Dh] ("BMHK") views (no copy), xFormers
                  picking the operator. CUDA only (xFormers has no CPU operators). Loaded through
                  maect.models.xformers_load, which preloads the CUDA 12 runtime a CUDA-12 xFormers wheel needs beside
                  a CUDA 13 torch and otherwise says exactly why it cannot load.
  xformers_cutlass, xformers_flash
                  the same with one operator pair forced (fmha.cutlass / fmha.flash Fw+Bw ops).
  math            attention_ref: the explicit fp32 reference (fp64 inputs stay fp64; under autocast, timm's math).
Decision key: dtype, head dim, sequence bucket (seq_bucket), train (a backward follows) or infer. Under
torch.compile the lookup is a trace-time constant (no graph break, no recompile).
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from maect.kernels import dispatch
from maect.models import xformers_load as X

log = logging.getLogger("maect")

CONCRETE = ("xformers", "xformers_cutlass", "xformers_flash", "sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn",
            "sdpa_math", "math")
BACKENDS = CONCRETE + ("auto",)
ORDER = ("sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "xformers", "xformers_cutlass", "xformers_flash",
         "sdpa_math")                     # the decision's candidates: the torch path first
XFORMERS_OPS = {"xformers_cutlass": "cutlass", "xformers_flash": "flash"}   # backend -> xformers.ops.fmha module
BackendUnavailable = dispatch.Unavailable   # a backend asked for by name cannot run the inputs (every reason listed)


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
            + "\n".join(lines) + "\nSet model.attention to one that can run, or to 'auto'.")


# ------------------------------------------------------------------------------------------------ the op
def seq_bucket(T: int) -> int:
    """Sequence-length bucket of a decision: the next power of two >= T, at least 64 (ViT: 50 -> 64, 65 -> 128,
    197 -> 256, 257 -> 512), so MAE-visible and full-sequence shapes of every ViT size land in different buckets."""
    return max(64, 1 << (max(T, 1) - 1).bit_length())


def _meta(q: Tensor, k: Tensor, v: Tensor) -> tuple:
    """What a decision depends on: dtype, head dim, sequence bucket, whether a backward follows."""
    return (str(q.dtype).replace("torch.", ""), dispatch.concrete(q.shape[-1]),
            seq_bucket(dispatch.concrete(q.shape[-2])), _needs_grad(q, k, v))


def _key(meta: tuple) -> str:
    dt, Dh, Tb, grad = meta
    return f"{dt}|Dh{Dh}-T{Tb}-{'train' if grad else 'infer'}"


def _why_not_meta(name: str):
    def check(device: torch.device, meta: tuple) -> str | None:
        dt, Dh, Tb, grad = meta
        r = torch.empty(1, 1, Tb, Dh, dtype=getattr(torch, dt), device=device)
        return why_not(name, r, r, r, grad)
    return check


def _verify(args: tuple, out: Tensor, ref: Tensor) -> str | None:
    """max |out - exact| <= 2 max |low-precision reference - exact| + atol (tests/test_attention.py's rule, forward)."""
    q, k, v = args
    if out.shape != q.shape or out.dtype != q.dtype:
        return f"output {tuple(out.shape)} {out.dtype}, expected {tuple(q.shape)} {q.dtype}"
    ex = ((q.double() @ k.double().transpose(-2, -1)) / math.sqrt(q.shape[-1])).softmax(-1) @ v.double()
    low = attention_ref(q, k, v) if q.dtype in (torch.float32, torch.float64) else attention_naive(q, k, v)
    tol = 2 * (low.double() - ex).abs().max().item() + (2e-6 if q.dtype in (torch.float32, torch.float64) else 2e-3)
    err = (out.double() - ex).abs()
    if not err.max().item() <= tol:
        n = int(err.reshape(err.shape[0], -1).amax(1).argmax())
        return f"sample {n}: error {err.max().item():.3g} > tolerance {tol:.3g}"
    return None


OP = dispatch.register(dispatch.Op(
    name="attention", reference=attention_ref, ref_name="math", meta=_meta, key=_key, verify=_verify,
    backends=tuple(dispatch.Backend(n, _impl(n), _why_not_meta(n)) for n in ORDER),
    default={"cpu": "sdpa", "cuda": "sdpa"}))


def set_backend(name: str) -> None:
    """Every attention call of this process runs backend `name` ('auto': the decision, kernels/dispatch.py)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    dispatch.force("attention", name)


def get_backend() -> str:
    return dispatch.forced().get("attention", "auto")


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ / sqrt(Dh)) v for q, k, v [N, H, T, Dh] with the backend asked for by name (set_backend), else
    the decision for these inputs (kernels/dispatch.py: made at start-up, a lookup here). BackendUnavailable (a
    ValueError naming every backend's reason) when the backend asked for cannot run them."""
    return dispatch.lookup("attention", _meta(q, k, v), q.device)(q, k, v)


def clear_cache() -> None:
    """Forget this process's attention decisions and resolutions (tests)."""
    dispatch.clear()
