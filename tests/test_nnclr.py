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


def run_train(args, nproc=1, env=None, ok=True, torchrun_args=(), faults=(), marker_dir=None
              ) -> subprocess.CompletedProcess:
    """`python -m maect.train ARGS` (nproc > 1: under torchrun --standalone); ok: assert it exits 0. faults
    ('KIND@STAGE:STEP[:RANK]', see tests/fault_runner.py): the same run through tests/fault_runner.py, which injects
    them (marker_dir: where a crash remembers that it happened)."""
    entry = ["-m", "maect.train"]
    if faults:
        entry = [os.path.join(ROOT, "tests", "fault_runner.py"), *[a for f in faults for a in ("--fault", f)],
                 *(["--marker-dir", str(marker_dir)] if marker_dir else []), "--"]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *torchrun_args]
           if nproc > 1 else [sys.executable]) + entry + args
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}   # maect.kernels etc.: the install
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


# ------------------------------------------------------------------------------ comparing runs through picks
U32 = 2.0 ** -24      # fp32 unit roundoff
ZTOL = 2e-3           # how far rounding alone moves a normalised projection before any pick differs (see below)


def pick_steps(folder, rank_rows=None) -> list[dict]:
    """The records of tests/pick_recorder.py in folder, one entry per lookup call (one per step): the query rows by
    (sample id, view) -> (z row, candidate list, picked index), and the queue (features, ids) the step searched.
    Every rank of a step searches the same queue (the global batch is enqueued); rank 0's copy is kept."""
    files = {}
    for name in os.listdir(folder):
        rank, call = name[:-3].split("_")
        files.setdefault(int(call[4:]), {})[int(rank[4:])] = os.path.join(folder, name)
    steps = []
    for call in sorted(files):
        recs = [torch.load(files[call][r]) for r in sorted(files[call])]
        rows = {}
        for rec in recs:
            n = len(rec["ids"]) // 2           # the lookup gets view 0's rows, then view 1's
            for j in range(len(rec["ids"])):
                rows[(int(rec["ids"][j]), int(j >= n))] = (rec["z"][j], rec["cand"][j], int(rec["idx"][j]))
        steps.append({"rows": rows, "features": recs[0]["features"], "queue_ids": recs[0]["queue_ids"]})
    return steps


def _exact_sims(z, features, own_id, queue_ids):
    """fp64 similarities of a row's fp32 inputs (exact: fp32 products and their sum fit fp64 to ~2^-50), own id
    excluded (-inf), as queue_topk's admissible set."""
    s = features.double() @ z.double()
    return s.masked_fill(queue_ids == own_id, float("-inf"))


def compare_picks(a: list[dict], b: list[dict], ztol: float = ZTOL) -> tuple[int | None, str]:
    """Compare two runs' neighbour picks step by step. Returns (t, why): t = the first step where a pick differs
    (None: none differs), which every later step is allowed to diverge from. AssertionError for a discrepancy.

    The rule (derived from the math of the lookup): run r picks position p of its top-k list computed in fp32 from
    its inputs z_r, e_r. Let S_r = the exact (fp64) similarities of those inputs; each fp32 dot product of d terms is
    within gamma = d u / (1 - d u) * sum_d |z_d e_d| of the exact one, in any summation order and with or without FMA
    (u = 2^-24). With delta = max_j |S_a[j] - S_b[j]| (what the runs' inputs differ by), the fp32 values of the two
    runs differ by at most eps = delta + 2 gamma, so their top-(p+1) lists are in the same order whenever every gap
    between consecutive entries of sorted S_a, down to position p+1, exceeds 2 eps. Such a pick is *determined*: it
    must be equal in both runs (else AssertionError: a real discrepancy). Where a gap is within 2 eps (a near tie)
    the picks may differ; the first step where one does is returned, and the runs are compared no further (from
    that step on they train on different neighbours). Before that step the queries must also agree to ztol (the
    inputs themselves differ only by rounding: else AssertionError), so a large difference cannot widen eps."""
    assert len(a) == len(b), f"{len(a)} vs {len(b)} lookup steps"
    for t, (sa, sb) in enumerate(zip(a, b)):
        assert sa["rows"].keys() == sb["rows"].keys(), f"step {t + 1}: different query rows"
        assert torch.equal(sa["queue_ids"], sb["queue_ids"]), f"step {t + 1}: different queue ids"
        dq = (sa["features"] - sb["features"]).abs().max().item()
        assert dq <= ztol, f"step {t + 1}: queues differ by {dq:.2e} > {ztol:g} before any pick differed"
        first_diff = None
        for key, (za, ca, ia) in sa["rows"].items():
            zb, cb, ib = sb["rows"][key]
            dz = (za - zb).abs().max().item()
            assert dz <= ztol, f"step {t + 1} row {key}: queries differ by {dz:.2e} > {ztol:g} before any pick differed"
            pa, pb = (ca == ia).nonzero(), (cb == ib).nonzero()
            assert len(pa) == len(pb) == 1 and int(pa) == int(pb), \
                f"step {t + 1} row {key}: picked position {pa.flatten().tolist()} vs {pb.flatten().tolist()}"
            if ia == ib:
                continue
            p = int(pa)
            s_a = _exact_sims(za, sa["features"], key[0], sa["queue_ids"])
            s_b = _exact_sims(zb, sb["features"], key[0], sb["queue_ids"])
            ok = torch.isfinite(s_a) & torch.isfinite(s_b)
            d = za.numel()
            gamma = d * U32 / (1 - d * U32) * max(float((sa["features"].double().abs() @ za.double().abs()).max()),
                                                  float((sb["features"].double().abs() @ zb.double().abs()).max()))
            eps = float((s_a - s_b)[ok].abs().max()) + 2 * gamma
            top = s_a.topk(min(p + 2, len(s_a))).values
            gap = float((top[:-1] - top[1:]).min())
            assert gap <= 2 * eps, (f"step {t + 1} row {key}: picked {ia} vs {ib} at position {p}, but the pick is "
                                    f"determined: the smallest gap of the top-{p + 2} is {gap:.3g} > 2 eps = "
                                    f"{2 * eps:.3g}")
            first_diff = first_diff or (f"step {t + 1} row {key}: picks {ia} vs {ib} at a near tie (gap {gap:.3g} "
                                        f"<= 2 eps = {2 * eps:.3g})")
        if first_diff:
            return t, first_diff
    return None, "no pick differs"


def compare_curves(stage, la, lb, a, b) -> int:
    """The losses of two runs of a stage: equal to rtol 1e-4 (fp32 reductions in another order) up to the first
    step whose neighbour picks differ (compare_picks' rule), free from then on. Returns how many steps compared."""
    assert len(la) == len(lb) == len(a) == len(b) > 0, (stage, len(la), len(lb), len(a), len(b))
    t, why = compare_picks(a, b)
    n = len(la) if t is None else t
    print(f"{stage}: losses of steps 1-{n} of {len(la)} compared ({why})")
    assert torch.allclose(torch.tensor(la[:n]), torch.tensor(lb[:n]), rtol=1e-4, atol=1e-5), (stage, la, lb)
    return n


def run_recorded(args, folder, nproc=1) -> None:
    """run_train's command with tests/pick_recorder.py in front of maect.train: every pick recorded in folder."""
    rec = os.path.join(ROOT, "tests", "pick_recorder.py")
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
           if nproc > 1 else [sys.executable]) + [rec, str(folder)] + args
    e = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path):
    """gloo, 2 ranks x 32 vs 1 process x 64: same samples, augmentations and masks. Each 2-rank stage starts from
    the one-process run's previous stage (init=), so every stage is compared from the same weights. Covers MAE (DDP)
    and head + CT (SyncBatchNorm, all_gather with gradients, queue enqueue of the global batch).

    Rule: MAE's curve has no discrete choice that rounding can flip (the masks come from the same noise): its losses
    agree to rtol 1e-4 (fp32 reductions in another order) at every step. The head and CT curves pass through a
    nearest-neighbour pick, which a near tie flips under another summation order (then the loss moves by ~1e-3):
    they agree to rtol 1e-4 up to the first step where a pick differs, and every pick before it and at it that
    differs must be a near tie by compare_picks' rule (its margin within the rounding bound of the two runs'
    inputs; a pick whose margin exceeds it must be equal). tests: test_pick_rule_* build both cases on purpose."""
    steps = ["mae.epochs=0.016", "head.epochs=0.0053", "ct.epochs=0.0053"]   # 15, 5, 5 steps of 64 on 60000
    one, two = tmp_path / "one", tmp_path / "two"
    run_recorded(TINY + steps + [f"out_dir={one}"], tmp_path / "picks_one")
    run_train(TINY + steps + ["stage=mae", f"out_dir={two}"], nproc=2)
    run_recorded(TINY + steps + ["stage=head", f"out_dir={two}", f"init={one}/mae/checkpoint-final.pth"],
                 tmp_path / "picks_two_head", nproc=2)
    run_recorded(TINY + steps + ["stage=ct", f"out_dir={two}", f"init={one}/head/checkpoint-final.pth"],
                 tmp_path / "picks_two_ct", nproc=2)
    a, b = losses(one / "mae/metrics.jsonl"), losses(two / "mae/metrics.jsonl")
    print("mae", a, b)
    assert len(a) == len(b) > 0 and torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-5)
    picks_one = pick_steps(tmp_path / "picks_one")
    n_head = len(losses(one / "head/metrics.jsonl"))
    compared = {}
    for stage, mine in (("head", picks_one[:n_head]), ("ct", picks_one[n_head:])):
        la, lb = losses(one / f"{stage}/metrics.jsonl"), losses(two / f"{stage}/metrics.jsonl")
        print(stage, la, lb)
        compared[stage] = compare_curves(stage, la, lb, mine, pick_steps(tmp_path / f"picks_two_{stage}"))
    q1 = load_checkpoint(str(one / "ct/checkpoint-final.pth"))["queue"]
    q2 = load_checkpoint(str(two / "ct/checkpoint-final.pth"))["queue"]
    assert torch.equal(q1["ids"], q2["ids"])
    if compared["ct"] == len(losses(one / "ct/metrics.jsonl")):     # no pick differed: the queues agree too
        diff = (q1["features"] - q2["features"]).abs().max().item()
        print(f"queue features max |diff| 1 vs 2 ranks: {diff:.2e}")
        # unit vectors; the 2-rank BatchNorm computes var as E[x^2]-E[x]^2 over all-reduced sums (one process:
        # two-pass), which moves single entries of the normalised projections by up to ~1e-4..1e-3 after a few steps
        assert diff < ZTOL


def _two_orders(z, e):
    """The similarities of z [D] with the rows of e [Q, D] summed in two fixed fp32 orders (first to last, and last
    to first): exact products, then a sequential sum, so each is the same on every CPU."""
    prod = (e * z).float()
    fwd, rev = torch.zeros(len(e)), torch.zeros(len(e))
    for d in range(prod.shape[1]):        # elementwise fp32 adds (cumsum would accumulate in fp64 on CPU)
        fwd, rev = fwd + prod[:, d], rev + prod[:, -1 - d]
    return fwd, rev


def _near_tie(D=16, Q=6, seed=0):
    """z [D] and a queue e [Q, D] of unit rows whose entries 0 and 1 are within an ulp of each other in similarity
    to z, and which the two summation orders of _two_orders rank differently; every other entry is far below."""
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(D, generator=g), dim=0)
    for _ in range(2000):
        e = F.normalize(torch.randn(Q, D, generator=g), dim=1)
        e[0] = F.normalize(z + 0.3 * e[0], dim=0)
        e[1] = F.normalize(e[0] + 1e-7 * torch.randn(D, generator=g), dim=0)
        e[2:] = F.normalize(e[2:] - 2 * z, dim=1)              # far below entries 0 and 1
        fwd, rev = _two_orders(z, e)
        if int(fwd.argmax()) != int(rev.argmax()):
            return z, e
    raise AssertionError("no near tie found")


def _synthetic_run(z, e, sims, pick_offset=0, steps=3):
    """Records in pick_steps' layout for a run that searches the fixed queue e with query z at every step, its
    similarities `sims` [Q] (one summation order); pick_offset: pick that far down the ranking (a wrong run)."""
    order = sims.argsort(descending=True, stable=True)
    cand = torch.cat([order[pick_offset:pick_offset + 1], order[:pick_offset]])[:1]    # top-1, as the run saw it
    rows = {(7, 0): (z, cand, int(cand[0]))}
    return [{"rows": rows, "features": e, "queue_ids": torch.arange(len(e))} for _ in range(steps)]


def test_pick_rule_tolerates_a_built_near_tie():
    """A queue with two entries whose similarities to the query differ by about an ulp, ranked differently by two
    fp32 summation orders (both within the rounding bound): compare_picks finds the flip at step 1, calls it a near
    tie, and compare_curves compares no loss from there (the losses after a flip differ by 1e-3)."""
    z, e = _near_tie()
    fwd, rev = _two_orders(z, e)
    exact = e.double() @ z.double()
    print(f"exact similarities {exact[:2].tolist()}: gap {float(exact[0] - exact[1]):.3g}; fp32 picks "
          f"{int(fwd.argmax())} (first to last) vs {int(rev.argmax())} (last to first)")
    a, b = _synthetic_run(z, e, fwd), _synthetic_run(z, e, rev)
    t, why = compare_picks(a, b)
    assert t == 0 and "near tie" in why
    assert compare_curves("built", [4.250135, 4.3, 4.2], [4.253910, 4.1, 4.4], a, b) == 0
    assert compare_picks(a, a) == (None, "no pick differs")


def test_pick_rule_fails_on_a_real_discrepancy():
    """A deliberately wrong second run: it picks the second-best entry where that one is far below the best (a
    determined pick), or its losses drift before any pick differs, or its queries drift beyond rounding. Each is
    an AssertionError."""
    torch.manual_seed(0)
    z = F.normalize(torch.randn(16), dim=0)
    e = F.normalize(torch.randn(6, 16), dim=1)
    e[0] = F.normalize(z + 0.1 * e[0], dim=0)                 # a clear best entry
    sims = _two_orders(z, e)[0]
    good = _synthetic_run(z, e, sims)
    with pytest.raises(AssertionError, match="determined"):
        compare_picks(good, _synthetic_run(z, e, sims, pick_offset=1))
    with pytest.raises(AssertionError):
        compare_curves("drift", [4.25, 4.2, 4.1], [4.25, 4.21, 4.1], good, good)
    moved = [dict(s, rows={k: (v[0] + 1e-2, v[1], v[2]) for k, v in s["rows"].items()}) for s in good]
    with pytest.raises(AssertionError, match="queries differ"):
        compare_picks(good, moved)


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
