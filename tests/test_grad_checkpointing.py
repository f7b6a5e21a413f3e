"""model.grad_checkpointing: the checkpointed blocks give the same loss and gradients as without (fp32: loss within
1e-6 relative, every gradient within rtol 1e-5 / atol 1e-7; on CPU they come out bitwise equal), only the blocks
autograd records are checkpointed, the saved activations shrink, and bench/grad_checkpointing.py's compare()."""
import importlib
import sys
from pathlib import Path

import pytest
import torch

from maect.validation import load_config
from maect.models import vit

BENCH = str(Path(__file__).resolve().parents[1] / "bench")
TINY = ["model.arch=custom", "model.img_size=32", "model.patch_size=8", "model.embed_dim=48", "model.depth=4",
        "model.num_heads=4", "model.decoder_embed_dim=32", "model.decoder_depth=2", "model.decoder_num_heads=4",
        "nnclr.proj_hidden=64", "nnclr.proj_dim=16", "nnclr.pred_hidden=64", "nnclr.queue_size=64", "ct.topk=1",
        "mae.batch_size=16", "head.batch_size=16", "ct.batch_size=16"]


def bench(name: str):
    sys.path.insert(0, BENCH)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(BENCH)


@pytest.fixture
def count_checkpoints(monkeypatch):
    calls = []
    real = vit.checkpoint

    def counting(fn, *args, **kw):
        assert kw.get("use_reentrant") is False
        calls.append(fn)
        return real(fn, *args, **kw)
    monkeypatch.setattr(vit, "checkpoint", counting)
    return calls


@pytest.mark.parametrize("stage", ["mae", "ct"])
def test_same_loss_and_gradients_and_only_trained_blocks(stage, count_checkpoints):
    gc = bench("grad_checkpointing")
    cfg = load_config(TINY)
    out = {}
    for on in (False, True):
        ctx = gc.build(stage, "custom", 4, torch.device("cpu"), cfg=cfg)
        ctx["model"].set_grad_checkpointing(on)
        count_checkpoints.clear()
        loss = gc.step(ctx, "fp32", torch.device("cpu"), optimizer=False)
        out[on] = (loss, [p.grad.clone() for p in ctx["params"]], len(count_checkpoints), gc.saved_bytes(
            ctx, "fp32", torch.device("cpu")))
    (l0, g0, n0, s0), (l1, g1, n1, s1) = out[False], out[True]
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    assert len(g0) == len(g1) > 0
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    m = cfg.model
    assert n0 == 0 and n1 == (m.depth + m.decoder_depth if stage == "mae" else m.depth - m.depth // 2)
    assert s1 < s0          # fewer bytes kept for the backward pass


def test_no_checkpoint_without_autograd(count_checkpoints):
    model = vit.build_model("custom", img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=4, decoder_embed_dim=32,
                            decoder_depth=1, decoder_num_heads=4, decoder=False)
    model.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = model.forward_features(x)
    assert count_checkpoints == []
    b = model.forward_features(x, grad_from_block=3)     # blocks 0-2 frozen under no_grad, block 3 checkpointed
    assert len(count_checkpoints) == 1
    torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


def test_bench_compare_reports_both_rows_and_ratio():
    gc = bench("grad_checkpointing")
    res = gc.compare("ct", "custom", batch=4, device="cpu", cfg=load_config(TINY))
    off, on = res["rows"]
    assert res["mismatch"] is None and not off["grad_checkpointing"] and on["grad_checkpointing"]
    assert off["peak_mib"] > 0 and on["peak_mib"] > 0 and on["saved_mib"] < off["saved_mib"]
    assert res["ratio"] == pytest.approx(off["peak_mib"] / on["peak_mib"])
