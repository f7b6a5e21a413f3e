"""Attention backends vs the exact reference, forward and backward; a backend asked for by name, 'auto' running the
decision (kernels/dispatch.py), and the error naming every backend's reason.

Tolerance rule (flash-attention's): max |backend - exact| <= 2 x max |low-precision reference - exact| + atol, for
the output and each of dq, dk, dv; exact = fp64 math of the same inputs. Low-precision reference: fp32 inputs ->
attention_ref (fp32 math); bf16 -> attention_naive (every step in bf16).
atol fp32 = 2e-6: about 30 fp32 ulps at |x| ~ 1 (outputs and gradients here are O(1)); a blocked online softmax sums
in another order than the reference, and on some draws the fp32 reference is unusually exact, so 2x alone is too
tight (measured: backends 4e-7..1.6e-6, the fp32 reference 4e-7..1.3e-6). atol bf16 = 2e-3: a quarter bf16 ulp at 1.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from maect.kernels import dispatch
from maect.models import attention as A

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ATOL = {torch.float32: 2e-6, torch.bfloat16: 2e-3}


@pytest.fixture(autouse=True)
def _restore_backend():
    prev = A.get_backend()
    A.clear_cache()
    yield
    A.set_backend(prev)
    A.clear_cache()


def make_qkv(N, H, T, Dh, dtype=torch.float32, device="cpu", layout="packed", seed=0):
    """'packed': views into one [N, T, 3, H, Dh] tensor, as the ViT passes them; 'contiguous': three tensors."""
    g = torch.Generator(device=device).manual_seed(seed)
    qkv = torch.randn(N, T, 3, H, Dh, generator=g, device=device).to(dtype)
    dout = torch.randn(N, H, T, Dh, generator=g, device=device).to(dtype)
    if layout == "packed":
        return (*qkv.permute(2, 0, 3, 1, 4), dout)
    return (*(t.contiguous() for t in qkv.permute(2, 0, 3, 1, 4)), dout)


def exact(q, k, v, dout):
    q, k, v = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    o = ((q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])).softmax(-1) @ v
    o.backward(dout.double())
    return o.detach(), q.grad, k.grad, v.grad


def fwd_bwd(fn, q, k, v, dout):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    o = fn(q, k, v)
    assert o.shape == q.shape and o.dtype == q.dtype
    o.backward(dout)
    return o.detach(), q.grad, k.grad, v.grad


def assert_matches_reference(name, q, k, v, dout):
    before = [t.clone() for t in (q, k, v)]
    ref = exact(q, k, v, dout)
    low_fn = A.attention_ref if q.dtype == torch.float32 else A.attention_naive
    low = [(a.double() - b).abs().max().item() for a, b in zip(fwd_bwd(low_fn, q, k, v, dout), ref)]
    A.set_backend(name)
    got = fwd_bwd(A.attention, q, k, v, dout)
    err = [(a.double() - b).abs().max().item() for a, b in zip(got, ref)]
    tol = [2 * lo + ATOL[q.dtype] for lo in low]
    print(f"{name} {list(q.shape)} {q.dtype}: err out/dq/dk/dv {['%.2g' % e for e in err]}, "
          f"tol {['%.2g' % t for t in tol]}")
    for what, e, t in zip(("out", "dq", "dk", "dv"), err, tol):
        assert e <= t, f"{name}: {what} error {e:.3g} > tolerance {t:.3g}"
    for a, b in zip(before, (q, k, v)):
        assert torch.equal(a, b), "inputs modified"


def skip_unless_available(name, q, k, v):
    why = A.why_not(name, q, k, v, grad=True)
    if why is not None:
        pytest.skip(f"{name}: {why}")


@pytest.mark.parametrize("Dh", [32, 64, 80])
@pytest.mark.parametrize("T", [50, 65, 257])
@pytest.mark.parametrize("name", A.BACKENDS)
def test_backend_fp32_cpu(name, T, Dh):
    q, k, v, dout = make_qkv(2, 3, T, Dh)
    skip_unless_available(name, q, k, v)
    assert_matches_reference(name, q, k, v, dout)


@pytest.mark.parametrize("layout", ["packed", "contiguous"])
@pytest.mark.parametrize("name", ["sdpa", "sdpa_flash", "sdpa_math", "math"])
def test_layouts_and_single_token(name, layout):
    for T in (1, 197):  # T=1: softmax over one key is exactly 1
        q, k, v, dout = make_qkv(3, 2, T, 64, layout=layout)
        assert_matches_reference(name, q, k, v, dout)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[gpu, needs_cuda])])
@pytest.mark.parametrize("T,Dh", [(50, 64), (65, 80), (257, 80), (197, 32)])
@pytest.mark.parametrize("name", A.BACKENDS)
def test_backend_bf16(name, T, Dh, device):
    """bf16 on CUDA (every available backend, xformers included); the same rule on CPU for the CPU backends."""
    q, k, v, dout = make_qkv(2, 4, T, Dh, torch.bfloat16, device)
    skip_unless_available(name, q, k, v)
    assert_matches_reference(name, q, k, v, dout)


@pytest.mark.parametrize("name", ["xformers", "sdpa_efficient", "sdpa_cudnn"])
def test_unavailable_by_name_lists_every_reason(name):
    """A backend asked for by name that cannot run raises BackendUnavailable (a ValueError) naming its reason and
    every backend's verdict for these inputs; nothing falls back silently."""
    q, k, v, _ = make_qkv(2, 3, 50, 32)
    why = A.why_not(name, q, k, v, grad=False)
    if why is None:
        pytest.skip(f"{name} can run on this machine")
    A.set_backend(name)
    with pytest.raises(A.BackendUnavailable) as e:
        A.attention(q, k, v)
    msg = str(e.value)
    print(msg)
    assert isinstance(e.value, ValueError)
    assert f"backend {name!r} cannot run" in msg and why in msg
    for other in A.OP.names():                   # every backend is listed with its verdict
        assert f"  {other} " in msg, other
    assert "can run" in msg and "no: " in msg


def test_xformers_reason_on_cpu():
    q, k, v, _ = make_qkv(1, 1, 8, 32)
    why = A.why_not("xformers", q, k, v)
    assert why is not None and ("not installed" in why or "no CPU operators" in why)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown attention backend 'flash3'.*auto"):
        A.set_backend("flash3")


def test_non_float_dtype_refused():
    q = torch.zeros(1, 1, 4, 8, dtype=torch.int32)
    assert "not a floating-point type" in A.why_not("sdpa", q, q, q)


@pytest.fixture
def ran(monkeypatch):
    """The names of the attention backends the calls ran: each registered backend's function (and the reference,
    'math') wrapped; the dispatch looks the function up in the registration at every call."""
    names = []

    def spy(name, fn):
        def run(*args):
            names.append(name)
            return fn(*args)
        return run
    monkeypatch.setattr(A.OP, "backends", tuple(dataclasses.replace(b, fn=spy(b.name, b.fn)) for b in A.OP.backends))
    monkeypatch.setattr(A.OP, "reference", spy(A.OP.ref_name, A.OP.reference))
    return names


def test_set_backend_asks_by_name(ran):
    """set_backend(name) runs that backend for every shape and grad mode, whatever a decision says; 'auto' returns
    to the decision (here none: the static default, sdpa)."""
    q, k, v, _ = make_qkv(2, 3, 50, 32)
    for name in ("sdpa_math", "sdpa_flash", "math"):
        A.set_backend(name)
        assert A.get_backend() == name
        out = A.attention(q, k, v)
        A.attention(*(t.detach().requires_grad_(True) for t in make_qkv(2, 3, 197, 64)[:3])).sum().backward()
        assert ran[-2:] == [name, name], ran
        torch.testing.assert_close(out, A.attention_ref(q, k, v), rtol=0, atol=1e-5)
    A.set_backend("auto")
    A.attention(q, k, v)
    assert ran[-1] == "sdpa" and A.OP.default["cpu"] == "sdpa"


def test_model_attention_config_asks_by_name(ran):
    """The config key model.attention reaches the same mechanism: the trainer's start-up (maect/backends.py) asks
    for it by name, says so in its line, and the model's attention calls run it; an unknown name is a config error
    naming the key."""
    from maect import config as C
    from maect.backends import decide_for_run
    from maect.validation import load_config
    cfg = load_config(["preset=tiny", "stage=mae", "model.attention=sdpa_math", "kernels.measure=false"])
    line = decide_for_run(cfg, torch.device("cpu"))
    assert "attention -> sdpa_math (asked)" in line and dispatch.forced()["attention"] == "sdpa_math"
    A.attention(*make_qkv(2, 3, 65, 16)[:3])
    assert ran == ["sdpa_math"]
    with pytest.raises(C.ConfigError, match="model.attention='flash3'"):
        load_config(["preset=tiny", "model.attention=flash3"])


def test_auto_runs_the_decision(ran, monkeypatch, tmp_path):
    """'auto' runs the decision for the inputs' shape class: dispatch.decide on attention inputs, with an injected
    timer that makes sdpa_flash the fastest (more than MARGIN under the torch path), verifies every backend that can
    run, picks sdpa_flash and stores it; a training call of that class then runs sdpa_flash, also in a process that
    only reads the cache; an inference call (another class, no decision) runs the static default. With the torch
    path timed fastest, the torch path is picked."""
    monkeypatch.setenv("MAECT_CACHE_DIR", str(tmp_path))
    dispatch.clear()
    q, k, v, _ = make_qkv(2, 3, 65, 80)
    train = tuple(t.detach().requires_grad_(True) for t in (q, k, v))
    ms = {"sdpa": 2.0, "sdpa_flash": 1.0, "sdpa_math": 5.0}
    d = dispatch.decide("attention", train, timer=lambda name, fn, device, budget: ms.get(name, 9.0))
    assert (d.pick, d.source, d.shape) == ("sdpa_flash", "measured", "float32|Dh80-T128-train")
    assert {"sdpa", "sdpa_flash", "sdpa_math"} <= set(d.ms) and not d.dropped, d
    assert "sdpa_cudnn" in d.not_run and "sdpa_flash" in ran     # the verification ran it once
    A.set_backend("auto")
    for clear in (False, True):
        if clear:
            dispatch.clear()                     # a new process: the decision comes from the cache file
        ran.clear()
        A.attention(*train).sum().backward()
        assert ran == ["sdpa_flash"], ran
    ran.clear()
    with torch.no_grad():
        A.attention(q, k, v)
    assert ran == ["sdpa"]
    ms.update(sdpa=1.0, sdpa_flash=0.98)         # within MARGIN of the torch path: the torch path stays
    assert dispatch.decide("attention", train, again=True,
                           timer=lambda name, fn, device, budget: ms.get(name, 9.0)).pick == "sdpa"


def test_seq_bucket():
    assert [A.seq_bucket(t) for t in (1, 50, 64, 65, 197, 257, 1025)] == [64, 64, 64, 128, 256, 512, 2048]


@pytest.mark.parametrize("name", ["sdpa", "sdpa_flash", "auto"])
def test_dispatch_compiles_without_graph_break(name):
    """The backend choice is a trace-time constant: torch.compile traces the dispatch in one graph (fullgraph), even
    on a cold cache, forward and backward, also once shapes turn dynamic."""
    A.set_backend(name)
    f = torch.compile(lambda x: A.attention(x, x, x), backend="eager", fullgraph=True)
    try:
        # the second and third shapes recompile with automatic dynamic shapes (symbolic T, Dh): still one graph
        for T, Dh in ((50, 32), (65, 16), (197, 64)):
            q = torch.randn(2, 3, T, Dh, requires_grad=True)
            out = f(q)
            out.sum().backward()
            torch.testing.assert_close(out, A.attention_ref(q, q, q), rtol=0, atol=1e-5)
    finally:
        torch._dynamo.reset()


def test_unavailable_under_compile_keeps_the_message():
    A.set_backend("sdpa_cudnn")
    q = torch.randn(1, 2, 7, 16)
    if A.why_not("sdpa_cudnn", q, q, q) is None:
        pytest.skip("sdpa_cudnn can run here")
    f = torch.compile(lambda x: A.attention(x, x, x), backend="eager")
    try:
        with pytest.raises(Exception, match="backend 'sdpa_cudnn' cannot run"):
            f(q)
    finally:
        torch._dynamo.reset()


def test_math_under_autocast_is_timm_attention():
    """Inside autocast the reference follows autocast (bf16 GEMMs, fp32 softmax): the explicit attention of timm /
    official MAE, which the reference-style training step stands for. Outside autocast it stays fp32."""
    q, k, v, _ = make_qkv(2, 3, 50, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = A.attention_ref(q, k, v)
        timm = ((q @ k.transpose(-2, -1)) * 32 ** -0.5).softmax(dim=-1) @ v
    assert got.dtype == timm.dtype and torch.equal(got, timm)
    assert A.attention_ref(q, k, v).dtype == torch.float32


def test_cuda_sdpa_reasons_without_a_gpu(monkeypatch):
    """The documented CUDA limits of each forced SDPA kernel, with the GPU's capability and torch's switches faked:
    each reason names the kernel, the limit and the exact torch.backends.cuda function."""
    q16 = torch.empty(1, 1, 8, 64, dtype=torch.float16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert A._cuda_sdpa_reason("sdpa_flash", q16, q16, q16) == "needs sm80+ (this GPU is sm75)"
    assert A._cuda_sdpa_reason("sdpa_cudnn", q16, q16, q16) == "needs sm80+ (this GPU is sm75)"
    b16 = q16.bfloat16()
    assert A._cuda_sdpa_reason("sdpa_efficient", b16, b16, b16) == "bf16 needs sm80+ (this GPU is sm75)"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    f32 = q16.float()
    assert A._cuda_sdpa_reason("sdpa_flash", f32, f32, f32) == "dtype torch.float32 unsupported (flash: fp16/bf16)"
    assert A._cuda_sdpa_reason("sdpa_cudnn", f32, f32, f32) == \
        "dtype torch.float32 unsupported (cuDNN attention: fp16/bf16)"
    h160 = torch.empty(1, 1, 8, 160, dtype=torch.float16)
    assert A._cuda_sdpa_reason("sdpa_cudnn", h160, h160, h160) == \
        "head dim 160 unsupported (cuDNN attention: a multiple of 8, <= 128)"
    h264 = torch.empty(1, 1, 8, 264, dtype=torch.float16)
    assert A._cuda_sdpa_reason("sdpa_flash", h264, h264, h264) == \
        "head dim 264 unsupported (flash: a multiple of 8, <= 256)"
    h6 = torch.empty(1, 1, 8, 6, dtype=torch.float32)
    assert A._cuda_sdpa_reason("sdpa_efficient", h6, h6, h6) == \
        "head dim 6 unsupported (mem-efficient: a multiple of 4 for torch.float32)"
    for name, query, switch in (("sdpa_flash", "flash_sdp_enabled", "enable_flash_sdp"),
                                ("sdpa_efficient", "mem_efficient_sdp_enabled", "enable_mem_efficient_sdp"),
                                ("sdpa_cudnn", "cudnn_sdp_enabled", "enable_cudnn_sdp")):
        monkeypatch.setattr(torch.backends.cuda, query, lambda: False)
        assert A._cuda_sdpa_reason(name, q16, q16, q16) == \
            f"disabled globally (torch.backends.cuda.{switch}(False) or equivalent)"
        assert callable(getattr(torch.backends.cuda, switch))
