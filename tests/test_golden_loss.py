"""Golden losses: the tiny preset's first optimizer steps of each stage, compared with tests/golden/tiny_losses.json,
so that a refactor (kernels, dispatch, engine, model) shows whether it left the training numbers unchanged.

The chain (CHAIN_ARGS: the tiny preset's model, recipe and Fashion-MNIST at global batch 64, queue 1024; seed 0):
stage 1 MAE runs 6 steps (warmup 2), then stage 2 (head, encoder frozen) and stage 3 (ct) run 5 steps each (warmup
1), both from that stage-1 encoder (stage 3 with a fresh head and queue: the whole chain is checked, and stage 3 does
not inherit stage 2's divergence, see below). Every stage's per-step loss is compared with the stored one.

Tolerance (LOSS_RTOL = 2e-5, relative, at every compared step). Two CPUs run the same fp32 code in different
summation orders (other GEMM kernels and blocking in oneDNN/MKL, another thread split, other vectorised
exp/log), which differ in last bits at step 1; the optimizer carries the difference on. `python
tests/test_golden_loss.py --write --measure` models those differences on one machine by runs that change only
summation orders or last bits: threads=1 vs 2, model.attention=math vs sdpa, MAECT_KERNELS=0 (every kernel's
reference), fused_optimizer=off (foreach AdamW), every initial weight moved by one ulp. The largest relative loss
difference from the default run over these (AMD EPYC, 2 threads, torch 2.14.1, 2026-12-07; the golden file's
"measured.spread" per step): MAE 1.2e-7 over all 6 steps; head 2.5e-7 and ct 1.4e-7 over the compared steps (later
steps drift to 5e-5: not compared, see below). LOSS_RTOL sits 80x above that, and 17x below the smallest loss
change a real change makes at a compared step ("measured.changes", same command): blr +1% (6.2e-4 .. 3.8e-3; MAE's
step 1 comes before any update and is unchanged), tau +1% (3.4e-4 .. 7.7e-4), mask ratio 0.75 -> 0.73 (3.7e-3;
0.74 keeps int(49 x 0.26) = 12 visible patches and so changes nothing), one warmup step fewer (4.5e-2 at step 2).
test_a_changed_hyperparameter_fails runs two of them (blr, tau) in the suite.

Neighbour picks (stages 2 and 3). A pick whose top-1 and top-2 similarities are within rounding of each other (a
near tie) may go either way on another CPU, and from that step on the losses differ by 1e-3 legitimately. The
measured runs also show how fast the inputs of a pick drift apart: the largest change of a deciding similarity
(each row's top-(k+1) entries) grows up to 16x a step in stage 2 (8e-7 at step 1, 9e-4 at step 5: Adam's update of
gradient entries near zero amplifies last-bit differences), slower in stage 3 from the MAE encoder. Rule: the
golden file stores, per step, the smallest margin (the fp64 gap between consecutive entries of each row's
top-(k+1) similarities of the run's own fp32 inputs) and the near-tie bound `tie` = TIE_FACTOR (8) x that measured
drift (at least twice the fp32 rounding bound of the dot products). Losses are compared at every step before the
first step whose stored margin is within `tie`; from that step on nothing is compared (stage 2: steps 1-2, stage 3:
steps 1-3 with the stored file). At every compared step the picks must equal the stored picks row for row (they
are determined), and this run's own margin must stay above tie / 2 (a legitimate run moves it by at most tie / 4;
more means the inputs moved beyond rounding: a failure). --write refuses a golden run that compares fewer steps
than MIN_COMPARED.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden", "tiny_losses.json")
STAGES = ("mae", "head", "ct")
LOSS_RTOL = 2e-5
TIE_FACTOR = 8
MIN_COMPARED = {"mae": 6, "head": 2, "ct": 2}
BATCH, MAE_STEPS, NNCLR_STEPS = 64, 6, 5
_SPE = 60000 // BATCH          # steps per epoch on Fashion-MNIST's 60000 training images
CHAIN_ARGS = ["preset=tiny", "seed=0", "log_every=1", "eval.monitor_train=100", "eval.monitor_test=50",
              f"mae.batch_size={BATCH}", f"head.batch_size={BATCH}", f"ct.batch_size={BATCH}", "nnclr.queue_size=1024",
              f"mae.epochs={(MAE_STEPS + 0.25) / _SPE:.6g}", f"mae.warmup_epochs={2.5 / _SPE:.6g}",
              f"head.epochs={(NNCLR_STEPS + 0.25) / _SPE:.6g}", f"ct.epochs={(NNCLR_STEPS + 0.25) / _SPE:.6g}"]
U32 = 2.0 ** -24


def pick_margins(z, features, ids, queue_ids, k):
    """fp64 similarities [N, Q] of the lookup's fp32 inputs (exact: products and sums of fp32 fit fp64 to ~2^-50),
    own sample id excluded (-inf), and per row the smallest gap between consecutive entries of its top-(k+1): the
    room a pick (top-1, or a position in the top-k list) has before another summation order could change it."""
    s = z.double() @ features.double().T
    s = s.masked_fill(ids[:, None] == queue_ids[None, :], float("-inf"))
    top = s.topk(k + 1, dim=1)
    return (top.values[:, :-1] - top.values[:, 1:]).min(dim=1).values, s, top.indices


def run_chain(out: str, args=(), stages=STAGES, keep_sims=False, init_mae: str = "") -> dict:
    """The golden chain in this process (maect.train.run, stage by stage) in folder out, with extra config args.
    Returns {stage: {"loss": [per step], "picks": [per step: {"idx": picked queue rows, "margin": min gap}]}};
    keep_sims: each step's fp64 similarities and top-(k+1) indices too (--measure). init_mae: an existing stage-1
    checkpoint for stages head / ct when stage mae is not run."""
    from maect import train
    from maect.heads import FeatureQueue
    from maect.validation import load_config
    rec, steps, real = {}, [], FeatureQueue.lookup

    def lookup(self, z, ids, k, generator=None):
        nn, idx = real(self, z, ids, k, generator=generator)
        m, s, top = pick_margins(z.float(), self.features.float(), ids, self.ids, k)
        gamma = z.shape[1] * U32 * (z.abs().float() @ self.features.abs().float().T).max()   # fp32 dot rounding
        steps.append({"idx": idx.tolist(), "margin": float(m.min()), "tie_floor": float(2 * gamma),
                      **({"sims": s, "top": top} if keep_sims else {})})
        return nn, idx

    FeatureQueue.lookup = lookup
    threads = torch.get_num_threads()
    mae = init_mae or os.path.join(out, "mae", "checkpoint-final.pth")
    try:
        for stage in stages:
            steps.clear()
            train.run(load_config(CHAIN_ARGS + list(args) + [f"stage={stage}", f"out_dir={out}"]
                                  + ([f"init={mae}"] if stage != "mae" else [])))
            with open(os.path.join(out, stage, "metrics.jsonl")) as f:
                losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
            rec[stage] = {"loss": losses, "picks": list(steps)}
    finally:
        FeatureQueue.lookup = real
        torch.set_num_threads(threads)
    return rec


def compared_steps(stage: str, golden: dict) -> int:
    """How many leading steps of a stage are compared: all of stage 1 (no discrete choice that rounding can flip:
    the masks come from CPU-generated noise); stages 2 and 3 up to the first step whose stored margin is a near tie."""
    g = golden["stages"][stage]
    n = len(g["loss"])
    for t, p in enumerate(g.get("picks", [])):
        if p["margin"] <= p["tie"]:
            return t
    return n


def check(rec: dict, golden: dict, stages=STAGES) -> dict:
    """AssertionError listing every mismatch of run rec against golden (the rule in the module docstring);
    returns {stage: steps compared}."""
    bad, compared = [], {}
    for stage in stages:
        g, r = golden["stages"][stage], rec[stage]
        if len(r["loss"]) != len(g["loss"]):
            bad.append(f"{stage}: {len(r['loss'])} steps, golden {len(g['loss'])}")
            continue
        n = compared[stage] = compared_steps(stage, golden)
        for t in range(n):
            if "picks" in g:
                gp, rp = g["picks"][t], r["picks"][t]
                if rp["idx"] != gp["idx"]:
                    diff = sum(a != b for a, b in zip(rp["idx"], gp["idx"]))
                    bad.append(f"{stage} step {t + 1}: {diff} of {len(gp['idx'])} neighbour picks differ from the "
                               f"golden run's, whose smallest margin {gp['margin']:.3g} exceeds the near-tie bound "
                               f"{gp['tie']:.3g}")
                if rp["margin"] <= gp["tie"] / 2:
                    bad.append(f"{stage} step {t + 1}: smallest pick margin {rp['margin']:.3g} <= tie/2 = "
                               f"{gp['tie'] / 2:.3g} (golden {gp['margin']:.3g}): the inputs moved beyond rounding")
            a, b = r["loss"][t], g["loss"][t]
            if not abs(a - b) <= LOSS_RTOL * abs(b):
                bad.append(f"{stage} step {t + 1}: loss {a:.8g} vs golden {b:.8g} (rel {abs(a - b) / abs(b):.2e} > "
                           f"{LOSS_RTOL:g})")
    assert not bad, "golden losses differ:\n  " + "\n  ".join(bad)
    return compared


def load_golden() -> dict:
    with open(GOLDEN) as f:
        return json.load(f)


@pytest.fixture(autouse=True)
def keep_threads():
    """In-process runs set torch's thread count from the config; later tests keep conftest's."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The golden chain, run once on this machine: (folder, record). threads = torch's current count (conftest's)."""
    out = str(tmp_path_factory.mktemp("golden"))
    return out, run_chain(out, [f"threads={torch.get_num_threads()}"])


def test_golden_losses(chain):
    """The chain's losses and picks against tests/golden/tiny_losses.json (rule and tolerance: module docstring)."""
    golden = load_golden()
    assert golden["args"] == CHAIN_ARGS, "CHAIN_ARGS changed: regenerate with python tests/test_golden_loss.py --write"
    compared = check(chain[1], golden)
    print("steps compared", compared, "losses", {s: chain[1][s]["loss"] for s in STAGES})
    for stage, n in MIN_COMPARED.items():
        assert compared[stage] >= n, (stage, compared[stage])


@pytest.mark.parametrize("stage, key, value", [("mae", "mae.blr", 1.5e-3 * 1.01), ("head", "head.tau", 0.15 * 1.01)])
def test_a_changed_hyperparameter_fails(chain, tmp_path, stage, key, value):
    """A 1% change of one hyperparameter (stage 1's lr, stage 2's temperature), that stage rerun (stage 2 from the
    chain's own stage-1 checkpoint): check() reports the stage's losses as a mismatch, so the golden test can fail."""
    rec = run_chain(str(tmp_path), [f"threads={torch.get_num_threads()}", f"{key}={value}"], stages=(stage,),
                    init_mae=os.path.join(chain[0], "mae", "checkpoint-final.pth"))
    with pytest.raises(AssertionError, match=rf"{stage} step \d: loss"):
        check(rec, load_golden(), stages=(stage,))


def test_check_rule_on_built_records():
    """check()'s rule on hand-built records (no training): a loss beyond LOSS_RTOL at a compared step fails; a pick
    that differs at a determined step fails; a margin this run has within tie / 2 fails; after a stored near tie
    (margin <= tie) nothing is compared, however far the losses go."""
    pick = lambda idx, margin, tie=1e-4: {"idx": idx, "margin": margin, "tie": tie}   # noqa: E731
    golden = {"stages": {"mae": {"loss": [2.0, 1.5]},
                         "head": {"loss": [4.0, 3.5, 3.0], "picks": [pick([1, 2], 1e-3), pick([3, 4], 1e-3),
                                                                     pick([5, 6], 5e-5)]}}}
    run = {"mae": {"loss": [2.0 * (1 + LOSS_RTOL / 2), 1.5]},
           "head": {"loss": [4.0, 3.5, 9.0], "picks": [pick([1, 2], 1e-3), pick([3, 4], 1e-3), pick([6, 5], 0.0)]}}
    assert check(run, golden, stages=("mae", "head")) == {"mae": 2, "head": 2}   # step 3: a stored near tie
    with pytest.raises(AssertionError, match=r"mae step 1: loss"):
        check({**run, "mae": {"loss": [2.0 * (1 + 2 * LOSS_RTOL), 1.5]}}, golden, stages=("mae",))
    moved = [pick([1, 2], 1e-3), pick([3, 7], 1e-3), pick([5, 6], 1e-3)]
    with pytest.raises(AssertionError, match=r"head step 2: 1 of 2 neighbour picks differ"):
        check({"head": {**run["head"], "picks": moved}}, golden, stages=("head",))
    close = [pick([1, 2], 4e-5), pick([3, 4], 1e-3), pick([5, 6], 1e-3)]
    with pytest.raises(AssertionError, match=r"head step 1: smallest pick margin"):
        check({"head": {**run["head"], "picks": close}}, golden, stages=("head",))


# ------------------------------------------------------------------------------------------------ --measure, --write
VARIANTS = {   # runs that change only summation orders or last bits: what another CPU changes
    "threads=1": (["threads=1"], {}), "attention=math": (["model.attention=math"], {}),
    "MAECT_KERNELS=0": ([], {"MAECT_KERNELS": "0"}), "fused_optimizer=off": (["fused_optimizer=off"], {}),
    "weights+-1ulp": ([], {"ULP": "1"})}
CHANGES = {    # real changes the golden test must catch
    "mae.blr+1%": ["mae.blr=0.001515"], "mae.mask_ratio=0.73": ["mae.mask_ratio=0.73"],
    "head.tau+1%": ["head.tau=0.1515"], "ct.tau+1%": ["ct.tau=0.1515"],
    "warmup-1step": [f"mae.warmup_epochs={1.5 / _SPE:.6g}", "head.warmup_frac=0", "ct.warmup_frac=0"]}


def _variant(args, env) -> dict:
    from maect import hub
    real, old = hub.model_from_cfg, {k: os.environ.get(k) for k in env}

    def ulp(*a, **kw):   # every initial weight moved by one ulp, random sign
        m = real(*a, **kw)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(1 + 2.0 ** -23 * (torch.randint(0, 2, p.shape, generator=g) * 2 - 1))
        return m
    os.environ.update({k: v for k, v in env.items() if k != "ULP"})
    hub.model_from_cfg = ulp if "ULP" in env else real
    try:
        return run_chain(tempfile.mkdtemp(prefix="golden_"), ["threads=2"] + args, keep_sims=True)
    finally:
        hub.model_from_cfg = real
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def measure(base: dict) -> dict:
    """Per stage and step: the largest relative loss difference from base over VARIANTS ("loss"), and the largest
    change of a deciding similarity (base's top-(k+1) entries of each row) ("sims"); then CHANGES' loss differences."""
    spread = {s: {"loss": [0.0] * len(base[s]["loss"]), "sims": [0.0] * len(base[s]["picks"])} for s in STAGES}
    for name, (args, env) in VARIANTS.items():
        r = _variant(args, env)
        for s in STAGES:
            rel = [abs(a - b) / abs(b) for a, b in zip(r[s]["loss"], base[s]["loss"])]
            ds = [float((p["sims"].gather(1, q["top"]) - q["sims"].gather(1, q["top"])).abs().max())
                  for p, q in zip(r[s]["picks"], base[s]["picks"])]
            same = [p["idx"] == q["idx"] for p, q in zip(r[s]["picks"], base[s]["picks"])]
            print(f"{name:20s} {s:4s} loss rel " + " ".join(f"{x:.1e}" for x in rel)
                  + (" | deciding sims " + " ".join(f"{x:.1e}" for x in ds) + f" | picks same {same}" if ds else ""))
            spread[s]["loss"] = [max(a, b) for a, b in zip(spread[s]["loss"], rel)]
            spread[s]["sims"] = [max(a, b) for a, b in zip(spread[s]["sims"], ds)]
    changes = {}
    for name, args in CHANGES.items():
        r = _variant(args, {})
        changes[name] = {s: [abs(a - b) / abs(b) for a, b in zip(r[s]["loss"], base[s]["loss"])] for s in STAGES}
        print(f"{name:20s} " + " | ".join(f"{s} " + " ".join(f"{x:.1e}" for x in v) for s, v in changes[name].items()))
    return {"spread": spread, "changes": changes}


def write(measured: bool) -> None:
    """Run the chain (threads=2), measure the spreads (--measure), derive each step's near-tie bound and write
    tests/golden/tiny_losses.json."""
    base = _variant([], {})
    cpu = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if ln.startswith("Model name")), platform.processor())
    made = {"command": "python tests/test_golden_loss.py --write" + (" --measure" if measured else ""), "cpu": cpu,
            "torch": torch.__version__, "python": platform.python_version(), "threads": 2,
            "date": datetime.date.today().isoformat()}
    m = {**measure(base), "made": made} if measured else load_golden()["measured"]
    stages = {}
    for s in STAGES:
        stages[s] = {"loss": base[s]["loss"]}
        if base[s]["picks"]:
            stages[s]["picks"] = [{"idx": p["idx"], "margin": p["margin"],
                                   "tie": max(TIE_FACTOR * m["spread"][s]["sims"][t], p["tie_floor"])}
                                  for t, p in enumerate(base[s]["picks"])]
    golden = {"made": made, "args": CHAIN_ARGS, "loss_rtol": LOSS_RTOL, "tie_factor": TIE_FACTOR, "measured": m,
              "stages": stages}
    compared = {s: compared_steps(s, golden) for s in STAGES}
    print("steps compared", compared)
    for s, n in MIN_COMPARED.items():
        if compared[s] < n:
            sys.exit(f"{s}: a near tie leaves {compared[s]} compared steps (< {n}); golden file not written")
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    with open(GOLDEN, "w") as f:
        json.dump(golden, f, indent=1)
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":   # python tests/test_golden_loss.py --write [--measure]
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write", action="store_true", help="rewrite tests/golden/tiny_losses.json")
    ap.add_argument("--measure", action="store_true", help="measure the spreads and changes (else reuse the file's)")
    a = ap.parse_args()
    import tempfile
    os.environ.setdefault("MAECT_CACHE_DIR", tempfile.mkdtemp(prefix="maect_golden_cache_"))   # as tests/conftest.py
    if a.write:
        write(a.measure)
    else:
        measure(_variant([], {}))
