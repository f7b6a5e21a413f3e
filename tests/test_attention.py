"""Attention backends vs the exact reference, forward and backward; dispatch errors, the auto table, logging.

Tolerance rule (flash-attention's): max |backend - exact| <= 2 x max |low-precision reference - exact| + atol, for
the output and each of dq, dk, dv; exact = fp64 math of the same inputs. Low-precision reference: fp32 inputs ->
attention_ref (fp32 math); bf16 -> attention_naive (every step in bf16).
atol fp32 = 2e-6: about 30 fp32 ulps at |x| ~ 1 (outputs and gradients here are O(1)); a blocked online softmax sums
in another order than the reference, and on some draws the fp32 reference is unusually exact, so 2x alone is too
tight (measured: backends 4e-7..1.6e-6, the fp32 reference 4e-7..1.3e-6). atol bf16 = 2e-3: a quarter bf16 ulp at 1.
"""
from __future__ import annotations

import logging
import math

import pytest
import torch

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
    q, k, v, _ = make_qkv(2, 3, 50, 32)
    why = A.why_not(name, q, k, v, grad=True)
    if why is None:
        pytest.skip(f"{name} can run on this machine")
    A.set_backend(name)
    with pytest.raises(A.BackendUnavailable) as e:
        A.attention(q, k, v)
    msg = str(e.value)
    print(msg)
    assert f"attention backend {name!r} cannot run" in msg and why in msg
    for other in A.CONCRETE:                     # every backend is listed with its verdict
        assert f"  {other} " in msg
    assert "can run" in msg and "auto" in msg


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


def test_auto_without_entry_is_sdpa_and_logs_once(monkeypatch, tmp_path, caplog):
    """No table entry for the shape: SDPA's own kernel choice, said once per shape in the log."""
    monkeypatch.setattr(A, "TABLE_PATH", str(tmp_path / "none.json"))
    q, k, v, _ = make_qkv(2, 3, 65, 80)
    A.set_backend("auto")
    with caplog.at_level(logging.INFO, logger="maect"):
        for _ in range(3):
            out = A.attention(q, k, v)
    msgs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("attention:")]
    assert len(msgs) == 1 and "sdpa runs" in msgs[0] and "no measured entry cpu|float32|80|128" in msgs[0], msgs
    torch.testing.assert_close(out, A.attention_ref(q, k, v), rtol=0, atol=1e-5)


def test_auto_uses_a_table_entry(monkeypatch):
    q, k, v, _ = make_qkv(2, 3, 65, 80)
    monkeypatch.setattr(A, "_table", {"entries": {A.table_key("cpu", q.dtype, 80, 65): {"train": "sdpa_flash",
                                                                                        "infer": "sdpa_math"}}})
    assert A.resolve("auto", q, k, v, grad=True)[0] == "sdpa_flash"
    assert A.resolve("auto", q, k, v, grad=False)[0] == "sdpa_math"
    # a pick that cannot run here falls back to sdpa, saying why
    monkeypatch.setattr(A, "_table", {"entries": {A.table_key("cpu", q.dtype, 80, 65): {"train": "sdpa_cudnn",
                                                                                        "infer": "sdpa_cudnn"}}})
    name, why = A.resolve("auto", q, k, v, grad=True)
    assert name == "sdpa" and "table pick sdpa_cudnn" in why and "no CPU kernel" in why


def test_table_lookup_and_buckets():
    assert [A.seq_bucket(t) for t in (1, 50, 64, 65, 197, 257, 1025)] == [64, 64, 64, 128, 256, 512, 2048]
    table = {"entries": {"cuda|bfloat16|80|128": {"train": "sdpa_flash", "infer": "xformers"},
                         "cuda|bfloat16|32|256": {"train": "sdpa_cudnn", "infer": "sdpa_cudnn"}}}
    assert A.pick_from_table(table, "cuda", torch.bfloat16, 80, 65, grad=True) == "sdpa_flash"
    assert A.pick_from_table(table, "cuda", torch.bfloat16, 80, 65, grad=False) == "xformers"
    assert A.pick_from_table(table, "cuda", torch.bfloat16, 32, 197, grad=True) == "sdpa_cudnn"
    assert A.pick_from_table(table, "cuda", torch.bfloat16, 80, 50, grad=True) is None      # other bucket
    assert A.pick_from_table(table, "cuda", torch.float16, 80, 65, grad=True) is None       # other dtype
    assert A.pick_from_table({}, "cuda", torch.bfloat16, 80, 65, grad=True) is None


def test_shipped_table_is_valid():
    t = A.load_table(A.TABLE_PATH)
    assert t.get("format") == 1 and isinstance(t.get("entries"), dict)
    for key, e in t["entries"].items():
        dev, dtype, Dh, bucket = key.split("|")
        assert dev == "cuda" and hasattr(torch, dtype) and int(Dh) > 0 and int(bucket) >= 64
        assert e["train"] in A.AUTO_CANDIDATES and e["infer"] in A.AUTO_CANDIDATES


def test_logs_once_per_shape(caplog):
    A.set_backend("sdpa")
    q, k, v, _ = make_qkv(2, 3, 50, 32)
    with caplog.at_level(logging.INFO, logger="maect"):
        for _ in range(3):
            A.attention(q, k, v)
        A.attention(*make_qkv(2, 3, 65, 32)[:3])
    msgs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("attention:")]
    print(msgs)
    assert len(msgs) == 2 and "sdpa runs" in msgs[0] and "T=50" in msgs[0] and "T=65" in msgs[1]


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
        with pytest.raises(Exception, match="attention backend 'sdpa_cudnn' cannot run"):
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


def _bench_attention():
    import importlib
    import sys
    from pathlib import Path
    bench = str(Path(__file__).resolve().parents[1] / "bench")
    sys.path.insert(0, bench)
    try:
        return importlib.import_module("attention")
    finally:
        sys.path.remove(bench)


def test_table_round_trip(monkeypatch, tmp_path, caplog):
    """bench/attention.py's table writer -> the file -> 'auto' reads it and runs the written winner. Once with rows
    measured here (whatever won), once with rows where sdpa_flash wins training and sdpa inference; an entry for
    another key already in the file survives the write (merge)."""
    bench = _bench_attention()
    path = tmp_path / "table.json"
    other = {"cuda|bfloat16|80|128": {"train": "sdpa_cudnn", "infer": "sdpa_flash"}}
    A.save_table(str(path), {"format": 1, "entries": other}, merge=False)
    monkeypatch.setattr(A, "TABLE_PATH", str(path))
    measured = bench.bench_shape("t", 2, 2, 50, 32, torch.float32, torch.device("cpu"), 0.0, ["sdpa", "sdpa_flash"])
    assert all(r["check"]["ok"] for r in measured)
    env = {"device": "test-cpu", "torch": torch.__version__}
    crafted = [dict(r, median_ms=1.0 if r["provider"] == "sdpa_flash" else 2.0,
                    fwd_ms=2.0 if r["provider"] == "sdpa_flash" else 1.0, Dh=80, T=65) for r in measured]
    for rows, Dh, T in ((measured, 32, 50), (crafted, 80, 65)):
        table = bench.make_table(rows, env, "cpu")
        key = A.table_key("cpu", torch.float32, Dh, T)
        want = table["entries"][key]
        A.save_table(str(path), table)
        A.clear_cache()
        on_disk = A.load_table(str(path))
        assert on_disk["entries"][key]["train"] == want["train"] and on_disk["entries"]["cuda|bfloat16|80|128"] == \
            other["cuda|bfloat16|80|128"]
        assert on_disk["entries"][key]["measured_on"]["device"] == "test-cpu"
        q, k, v, _ = make_qkv(2, 3, T, Dh)
        A.set_backend("auto")
        with caplog.at_level(logging.INFO, logger="maect"):
            A.attention(q.requires_grad_(True), k, v)
        assert A.resolve("auto", q, k, v, grad=True)[0] == want["train"]
        assert A.resolve("auto", q, k, v, grad=False)[0] == want["infer"]
        assert any(f"{want['train']} runs" in r.getMessage() and f"table entry {key}" in r.getMessage()
                   for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert (want["train"], want["infer"]) == ("sdpa_flash", "sdpa")     # the crafted rows
