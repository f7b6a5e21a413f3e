import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from maect.heads import FeatureQueue, NNCLRHead
from maect.hub import load_checkpoint
from maect.losses import nnclr_loss
from maect.models.vit import build_model
from maect.optim import llrd_scale, param_groups

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_head_shapes_follow_spec():
    h = NNCLRHead(96, 64, 32, 128)
    kinds = [type(m).__name__ for m in h.projector]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert all(m.bias is None for m in h.projector if isinstance(m, torch.nn.Linear))
    assert [type(m).__name__ for m in h.predictor] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert h.predictor[0].bias is None and h.predictor[3].bias is None   # the published predictor: no bias
    p, z = h(torch.randn(8, 96))
    assert p.shape == z.shape == (8, 32) and not z.requires_grad


def test_queue_lookup_never_returns_self_and_enqueue_is_fifo():
    torch.manual_seed(0)
    q = FeatureQueue(64, 8)
    z = F.normalize(torch.randn(16, 8), dim=1)
    ids = torch.arange(16)
    q.enqueue(z, ids, ids % 3)
    assert int(q.ptr) == 16 and torch.equal(q.ids[:16], ids) and torch.equal(q.features[:16], z)
    for k in (1, 4):
        for _ in range(5):
            nn, idx = q.lookup(z, ids, k, generator=torch.Generator().manual_seed(k))
            assert not torch.any(q.ids[idx] == ids), "a query found itself in the queue"
            assert torch.equal(nn, q.features[idx])
    for _ in range(3):
        q.enqueue(z, ids + 100, ids)
    assert int(q.ptr) == 0  # 64 / 16 = 4 enqueues wrap around
    with pytest.raises(ValueError, match="divisible"):
        q.enqueue(z[:10], ids[:10], ids[:10])


def test_nnclr_loss_matches_independent_reference():
    torch.manual_seed(0)
    B, D, tau = 6, 5, 0.2
    nn0, nn1 = F.normalize(torch.randn(B, D), dim=1), F.normalize(torch.randn(B, D), dim=1)
    p0, p1 = torch.randn(B, D), torch.randn(B, D)
    loss = nnclr_loss(nn0, nn1, p0, p1, tau)

    def ce(a, p):   # explicit: -log softmax of row i at column i, cosine(a_i, p_j) / tau
        total = 0.0
        for i in range(B):
            logits = [float(a[i] @ p[j]) / float(p[j].norm()) / tau for j in range(B)]
            m = max(logits)
            total += -(logits[i] - m - math.log(sum(math.exp(v - m) for v in logits)))
        return total / B
    ref = (ce(nn1, p0) + ce(nn0, p1)) / 2
    print(f"loss {loss.item():.7f} ref {ref:.7f}")
    assert abs(loss.item() - ref) < 1e-5


def test_llrd_factors_follow_spec():
    m = build_model("custom", img_size=28, patch_size=4, embed_dim=32, depth=4, num_heads=4, decoder=False,
                    decoder_embed_dim=16, decoder_depth=0, decoder_num_heads=2)
    for p in m.parameters():
        p.requires_grad_(True)
    groups = param_groups(m.named_parameters(), 0.05, lambda n: llrd_scale(n, 4, 0.65))
    for g in groups:
        for name in g["names"]:
            if name.startswith("blocks."):
                j = int(name.split(".")[1])
                want = 0.65 ** (4 - j)
            elif name.startswith(("patch_embed", "cls_token", "pos_embed")):
                want = 0.65 ** 5
            else:
                want = 1.0
            assert g["lr_scale"] == pytest.approx(want), name
            no_decay = name.endswith(".bias") or name.startswith("norm") or ".norm" in name
            assert g["weight_decay"] == (0.0 if no_decay else 0.05), name


TINY = ["preset=tiny", "model.embed_dim=32", "model.depth=4", "model.num_heads=4", "model.decoder_embed_dim=16",
        "model.decoder_depth=1", "model.decoder_num_heads=2", "nnclr.proj_hidden=64", "nnclr.proj_dim=16",
        "nnclr.pred_hidden=64", "nnclr.queue_size=256", "mae.batch_size=64", "head.batch_size=64", "ct.batch_size=64",
        "mae.epochs=0.0033", "head.epochs=0.0033", "ct.epochs=0.0033", "eval.monitor_train=500", "eval.monitor_test=100",
        "eval.final_train=500", "eval.final_test=100", "log_every=1", "threads=1",
        "mae.warmup_epochs=0.003"]   # warmup 2 of the 3 steps; the preset's 0.5 epochs exceed this run (a ConfigError)


def run_train(args, nproc=1, env=None, ok=True, torchrun_args=()) -> subprocess.CompletedProcess:
    """`python -m maect.train ARGS` (nproc > 1: under torchrun --standalone), no injected faults unless env sets
    MAECT_FAULT; ok: assert it exits 0."""
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *torchrun_args]
           if nproc > 1 else [sys.executable]) + ["-m", "maect.train"] + args
    e = {**os.environ, "OMP_NUM_THREADS": "1", "MAECT_FAULT": "", **(env or {})}   # maect.kernels etc.: the install
    r = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)
    if ok:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_pipeline_freezes_what_spec_freezes(tmp_path):
    out = run_train(TINY + [f"out_dir={tmp_path}"]).stdout
    assert "MAE-CT" in out and "k-NN accuracy" in out
    mae = load_checkpoint(str(tmp_path / "mae/checkpoint-final.pth"))["model"]
    head = load_checkpoint(str(tmp_path / "head/checkpoint-final.pth"))
    ct = load_checkpoint(str(tmp_path / "ct/checkpoint-final.pth"))
    for k, v in head["model"].items():            # stage 2: encoder frozen, bitwise
        assert torch.equal(v, mae[k]), k
    for k, v in ct["model"].items():              # stage 3: stem + lower half frozen, upper half + norm trained
        lower = k.startswith(("patch_embed", "cls_token", "pos_embed")) or (k.startswith("blocks.") and int(k.split(".")[1]) < 2)
        if lower or k == "pos_embed":
            assert torch.equal(v, head["model"][k]), k
        elif k.endswith("weight") and "norm" not in k:
            assert not torch.equal(v, head["model"][k]), f"{k} did not train"
    assert {"features", "ids", "labels", "ptr"} <= set(k.split(".")[-1] for k in ct["queue"])
    assert "model_ema" in ct and any(k.startswith("target_projector.") for k in ct["head"])
    res = json.load(open(tmp_path / "results.json"))
    assert 0 <= res["knn_mae"] <= 100 and 0 <= res["knn_maect"] <= 100


def losses(path):
    return [r["loss"] for r in map(json.loads, open(path)) if "loss" in r]


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path):
    """gloo, 2 ranks x 32 vs 1 process x 64: same samples, augmentations and masks, so the same loss curve
    (fp32 reductions in another order: rtol 1e-4). Covers MAE (DDP) and head+CT (SyncBatchNorm, all_gather
    with gradients, queue enqueue of the global batch)."""
    steps = ["mae.epochs=0.016", "head.epochs=0.0053", "ct.epochs=0.0053"]   # 15, 5, 5 steps of 64 on 60000
    run_train(TINY + steps + [f"out_dir={tmp_path}/one"])
    run_train(TINY + steps + [f"out_dir={tmp_path}/two"], nproc=2)
    for stage in ("mae", "head", "ct"):
        a, b = losses(tmp_path / f"one/{stage}/metrics.jsonl"), losses(tmp_path / f"two/{stage}/metrics.jsonl")
        print(stage, a, b)
        assert len(a) == len(b) > 0
        assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-5), stage
    q1 = load_checkpoint(str(tmp_path / "one/ct/checkpoint-final.pth"))["queue"]
    q2 = load_checkpoint(str(tmp_path / "two/ct/checkpoint-final.pth"))["queue"]
    diff = (q1["features"] - q2["features"]).abs().max().item()
    print(f"queue features max |diff| 1 vs 2 ranks: {diff:.2e}")
    # unit vectors; the 2-rank BatchNorm computes var as E[x^2]-E[x]^2 over all-reduced sums (one process: two-pass),
    # which moves single entries of the normalised projections by up to ~1e-4..1e-3 after a few steps
    assert torch.equal(q1["ids"], q2["ids"]) and diff < 2e-3


@pytest.mark.slow
def test_queue_identical_on_both_ranks(tmp_path):
    worker = os.path.join(ROOT, "tests", "ddp_queue_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker, str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    s0, s1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for k in ("features", "ids", "labels", "ptr"):
        assert torch.equal(s0["queue"][k], s1["queue"][k]), k
    assert int(s0["queue"]["ptr"]) == 16 and torch.equal(s0["queue"]["ids"][:16], torch.arange(16))
    # the gathered-gradient loss equals one process computing on the global batch
    torch.manual_seed(0)
    g = s0["global"]
    p0, p1 = g["p0"].clone().requires_grad_(), g["p1"].clone().requires_grad_()
    loss = nnclr_loss(g["nn0"], g["nn1"], p0, p1, 0.15)
    loss.backward()
    grad0 = torch.cat([s0["grad_p0"], s1["grad_p0"]]) / 2      # DDP averages the ranks' gradients
    assert torch.allclose(grad0, p0.grad, atol=1e-6)
    assert abs((s0["loss"] + s1["loss"]) / 2 - loss.item()) < 1e-5


def test_skipped_step_gates_queue_and_emas_on_device():
    """taken=False (a skipped step, decided on the device) leaves queue, pointer, target projector and encoder EMA
    bitwise as they were; taken=True gives exactly the ungated update."""
    from maect.optim import can_skip_on_device
    from maect.train import ema_pairs, ema_update
    torch.manual_seed(0)
    z, ids = F.normalize(torch.randn(16, 8), dim=1), torch.arange(16)
    gated, plain = FeatureQueue(64, 8), FeatureQueue(64, 8)
    plain.load_state_dict(gated.state_dict())
    gated.enqueue(z, ids, ids % 3, torch.tensor(False))
    assert int(gated.ptr) == 0 and torch.equal(gated.features, plain.features) and bool((gated.ids == -1).all())
    gated.enqueue(z, ids, ids % 3, torch.tensor(True))
    plain.enqueue(z, ids, ids % 3)
    for k, v in plain.state_dict().items():
        assert torch.equal(gated.state_dict()[k], v), k

    h = NNCLRHead(12, 32, 8, 16)
    h.add_target()
    h(torch.randn(10, 12))                                 # moves the online BatchNorm statistics
    with torch.no_grad():
        for p in h.projector.parameters():
            p.add_(0.1)
    before = {k: v.clone() for k, v in h.target_projector.state_dict().items()}
    h.update_target(0.99, torch.tensor(False))
    for k, v in h.target_projector.state_dict().items():
        assert torch.equal(v, before[k]), k
    ref = copy.deepcopy(h)
    h.update_target(0.99, torch.tensor(True))
    ref.update_target(0.99)
    for k, v in h.target_projector.state_dict().items():
        assert torch.equal(v, ref.target_projector.state_dict()[k]), k
    assert not torch.equal(h.target_projector[0].weight, before["0.weight"])

    enc, ema = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    pairs = ema_pairs(ema, enc)
    w0 = ema.weight.clone()
    ema_update(pairs, 0.9, torch.tensor(False))
    assert torch.equal(ema.weight, w0)
    ema_update(pairs, 0.9, torch.tensor(True))
    assert torch.equal(ema.weight, w0.lerp(enc.weight, 0.1))

    p = [torch.nn.Parameter(torch.randn(3))]
    assert can_skip_on_device(torch.optim.AdamW(p, fused=True))
    assert not can_skip_on_device(torch.optim.AdamW(p, foreach=False))
