"""bench/train_step.py on CPU: the MFU FLOP counter against a hand count and against torch's FlopCounterMode, and the
reference and maect steps giving the same first-step loss (MAE and CT), the compiled row's code path included."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from maect.models import attention as A
from maect.models.vit import build_model

BENCH = str(Path(__file__).resolve().parents[1] / "bench")


def bench(name: str):
    """bench/NAME.py (NAME may be gpu/STEM: the harness folder) imported with its folder on sys.path."""
    folder = str(Path(BENCH, name).parent)
    sys.path.insert(0, folder)
    try:
        return importlib.import_module(Path(name).name)
    finally:
        sys.path.remove(folder)


@pytest.fixture
def math_attention(monkeypatch):
    """Explicit attention matmuls, which FlopCounterMode counts (it has no formula for the CPU flash kernel), and the
    kernels' references: official MAE's patch embedding over all L patches (maect's 'gather' backend embeds only the
    kept ones: fewer executed FLOPs, the same model FLOPs)."""
    monkeypatch.setenv("MAECT_KERNELS", "0")
    prev = A.get_backend()
    A.clear_cache()                 # forgets every decision and forced backend: before asking for math
    A.set_backend("math")
    yield
    A.clear_cache()
    A.set_backend(prev)


def tiny(depth=1, decoder=True):
    # 8x8 single-channel images, 4x4 patches: L = 4 patches, C = 1, p = 4, D = 8, decoder width 4
    torch.manual_seed(0)
    return build_model("custom", img_size=8, patch_size=4, in_chans=1, embed_dim=8, depth=depth, num_heads=2,
                       decoder_embed_dim=4, decoder_depth=1, decoder_num_heads=2, decoder=decoder)


def test_block_flops_by_hand():
    mfu = bench("mfu")
    # T=3, D=8: qkv 2*3*8*24 = 1152, proj 2*3*8*8 = 384, fc1 2*3*8*32 = 1536, fc2 1536, q kᵀ 2*3*3*8 = 144,
    # attn·v 144: 4896 = 24 T D^2 + 4 T^2 D
    assert mfu.block_flops(3, 8) == 1152 + 384 + 1536 + 1536 + 144 + 144 == 4896


def test_mae_flops_hand_count_and_flop_counter(math_attention):
    """MAE, mask 0.5 (K = 2 visible of L = 4), batch 2. Per image:
      patch embedding  2 L p^2 C D = 2*4*16*1*8 = 1024, x 2 (forward + weight gradient)        2048
      encoder block    T = 1 + K = 3, D = 8: 24*3*64 + 4*9*8 = 4896, x 3                      14688
      decoder_embed    2 (1 + K) D Dd = 2*3*8*4 = 192, x 3                                      576
      decoder block    T = 1 + L = 5, Dd = 4: 24*5*16 + 4*25*4 = 2320, x 3                     6960
      decoder_pred     2 (1 + L) Dd p^2 C = 2*5*4*16 = 640, x 3                                1920
                                                                                   total  26192 per image
    and FlopCounterMode over the real forward + backward counts the same."""
    mfu = bench("mfu")
    m = tiny()
    hand = 2 * (2048 + 14688 + 576 + 6960 + 1920)
    assert mfu.mae_flops(m, 0.5, batch=2) == hand == 52384
    assert mfu.mae_flops(m, 0.5, batch=1, views=2) == hand
    x, noise = torch.randn(2, 1, 8, 8), torch.rand(2, 4)
    with FlopCounterMode(display=False) as fc:
        loss, _, _ = m(x, 0.5, True, noise)
        loss.backward()
    assert fc.get_total_flops() == hand


def test_ct_flops_hand_count_and_flop_counter(math_attention):
    """MAE-CT stage 3, depth 2, tuned from block t = 1, head proj_hidden 6, proj_dim 4, pred_hidden 5, batch 2.
    Per view:
      patch embedding (frozen, no_grad)   1024, x 1                                         1024
      block 0 (frozen, no_grad)           T = 5, D = 8: 24*5*64 + 4*25*8 = 8480, x 1         8480
      block 1 (tuned)                     8480, x 3                                         25440
      projector + predictor (trained)     2 (8*6 + 6*6 + 6*4) = 216 and 2 (4*5 + 5*4) = 80, x 3   888
      target projector (forward only)     216                                                 216
                                                                                   total  36048 per view
    x 2 views x 2 samples = 144192; FlopCounterMode over the network's forward and backward (the loss and queue
    lookup are not model FLOPs) counts the same."""
    mfu = bench("mfu")
    from maect.heads import NNCLRHead
    from maect.train import NNCLRNet
    n = SimpleNamespace(proj_hidden=6, proj_dim=4, pred_hidden=5)
    m = tiny(depth=2, decoder=False)
    hand = 2 * 2 * (1024 + 8480 + 25440 + 888 + 216)
    assert mfu.ct_flops(m, n, t=1, batch=2) == hand == 144192
    head = NNCLRHead(8, n.proj_hidden, n.proj_dim, n.pred_hidden)
    head.add_target()
    for name, p in m.named_parameters():
        p.requires_grad_(name.startswith(("blocks.1.", "norm.")))
    net = NNCLRNet(m.eval(), head.train(), 1, "mean", encoder_frozen=False)
    with FlopCounterMode(display=False) as fc:
        p0, p1, z0, z1 = net(torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8))
        (p0.sum() + p1.sum()).backward()
    assert fc.get_total_flops() == hand


def test_peak_table():
    mfu = bench("mfu")
    assert mfu.default_peak(torch.device("cpu"), True) is None
    names = dict(mfu.PEAK_TFLOPS)
    assert names["H100"] == names["H200"] == 989
    # a more specific name must come before the substring it contains (first match wins)
    order = [k for k, _ in mfu.PEAK_TFLOPS]
    assert order.index("H100 PCIe") < order.index("H100") and order.index("H200 NVL") < order.index("H200")


def run_rows(stage: str, rows: str, *extra: str) -> dict:
    ts = bench("train_step")
    args = ts.finish_args(ts.parser().parse_args(
        ["--preset", "tiny", "--stage", stage, "--batch", "8", "--device", "cpu", "--threads", "2", "--steps", "1",
         "--warmup", "0", "--precision", "fp32", "--rows", rows, *extra]))
    return ts.run(args)


def test_mae_reference_and_maect_same_first_loss():
    """timm blocks with SDPA + fused AdamW + argsort masking (reference), timm's explicit attention (reference-math),
    maect's step, and maect's blocks through torch.compile (aot_eager: the tracing of the compiled row, no
    inductor build on CPU CI) all start from the same weights and data: the same loss within 1e-4. The maect rows
    run the trainer's start-up decisions (their line is in the result); the reference rows ask for every kernel op's
    reference by name, and the backends asked for are restored afterwards."""
    pytest.importorskip("timm")
    from maect.kernels import dispatch
    before = dispatch.forced()
    res = run_rows("mae", "reference,reference-math,maect,maect+compile", "--compile-backend", "aot_eager")
    assert dispatch.forced() == before
    assert res["kernels"].startswith("kernels: ") and "masked_patch_embed" in res["kernels"], res["kernels"]
    rows = {r["provider"]: r for r in res["rows"]}
    print({k: (r["first_loss"], r["attention"], r["optimizer"]) for k, r in rows.items()})
    assert res["check"]["ok"] and res["check"]["against"] == "reference"
    assert rows["reference"]["attention"] == "timm SDPA" and rows["reference-math"]["attention"] == "timm explicit"
    assert rows["reference"]["optimizer"] == "torch.AdamW(fused)"
    assert rows["reference-math"]["optimizer"] == "torch.AdamW(foreach=False)"
    assert rows["maect+compile"]["compile"] == "default (aot_eager)" and rows["maect+compile"]["graph_breaks"] == 0
    assert res["model_tflop_per_step"] > 0 and all(r["median_ms"] > 0 for r in res["rows"])


def test_ct_reference_and_maect_same_first_loss(capsys):
    """The CT step (official lookup vs maect's queue_topk, host-side vs device queue pointer) from the same weights,
    queue and neighbour picks: the same loss; --profile prints the per-op table and the per-category split."""
    pytest.importorskip("timm")
    res = run_rows("ct", "reference,maect", "--profile")
    assert res["check"]["ok"], res["check"]
    prof = res["rows"][1]["profile"]
    assert "GEMM" in prof["by_category_ms"] and "aten::" in prof["table"]
    assert "profile of 'maect'" in capsys.readouterr().out


def test_compile_mode_config():
    from maect import config as C
    from maect import validation as V
    assert V.load_config(["preset=tiny", "model.compile_mode=reduce-overhead"]).model.compile_mode == "reduce-overhead"
    with pytest.raises(C.ConfigError, match="model.compile_mode='fast': choose one of"):
        V.load_config(["preset=tiny", "model.compile_mode=fast"])


def test_suite_child_row_matches_in_process():
    """The GPU suite's train_step phase 2 (bench/gpu/train_step_suite.py) runs each compiled row in a child process (a
    long compilation costs that row only): the child's row comes back as JSON and its first-step loss equals the
    in-process reference's."""
    pytest.importorskip("timm")
    tss = bench("gpu/train_step_suite")      # bench/gpu/train_step_suite.py (the GPU suite's harness)
    cfg_args = ["--preset", "tiny", "--stage", "mae", "--batch", "8"]
    common = ["--device", "cpu", "--threads", "2", "--steps", "1", "--warmup", "0", "--precision", "fp32",
              "--compile-backend", "aot_eager"]
    row = tss._child_row(cfg_args, "maect+compile", common, timeout=600)
    assert row["provider"] == "maect+compile" and row["compile"] == "default (aot_eager)", row
    ref = run_rows("mae", "reference")
    assert abs(row["first_loss"] - ref["rows"][0]["first_loss"]) <= 1e-4 * abs(ref["rows"][0]["first_loss"])
