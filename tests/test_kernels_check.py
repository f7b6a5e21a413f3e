"""python -m maect.kernels.check: decides again, for a preset, every (op, shape class) the trainer decides at
start-up (maect/backends.py plan), prints one table and the cost of each decision, writes the decisions to the cache,
exits 1 when a backend disagrees with the reference. Timings are injected through check.run(timer=...) (the check's
real timings are printed by the command, never asserted)."""
import importlib

import pytest
import torch

from maect import backends
from maect.kernels import check
from maect.kernels import dispatch as D
from maect.validation import load_config

qt = importlib.import_module("maect.kernels.ops.queue_topk")
SMALL = ("nnclr.queue_size=1024", "eval.final_train=2048", "mae.batch_size=16", "ct.batch_size=16",
         "head.batch_size=16")
TORCH_PATHS = {"torch", "ref", "sdpa"}          # backends[0] of queue_topk, the masking ops, attention


def fast_kernels(name, fn, device, budget):
    """Every compiled backend 4x faster than the torch path, the others 2x."""
    fn()
    return 4.0 if name in TORCH_PATHS else (1.0 if name == "cpp" else 2.0)


def fast_torch(name, fn, device, budget):
    """The torch path fastest."""
    fn()
    return 1.0 if name in TORCH_PATHS else 2.0


@pytest.fixture(autouse=True)
def fresh(fresh_dispatch):
    """tests/conftest.py's fresh_dispatch for every test here (its monkeypatch, by this name)."""
    return fresh_dispatch


def _plan_keys():
    """(op, shape class) of every decision the trainer makes for the SMALL tiny run on CPU."""
    cfg = load_config(["preset=tiny", *SMALL])
    keys = set()
    for op, args, amp in backends.plan(cfg, torch.device("cpu"), 1, **_sizes(cfg)):
        o = D.get(op)
        with torch.autocast("cpu", dtype=amp) if amp is not None else torch.autocast("cpu", enabled=False):
            keys.add((op, o.key(o.meta(*args))))
    return keys


def _sizes(cfg):
    n_train, n_test = check.SIZES.get(cfg.data.name, check.IMAGENET)
    return {"n_train": n_train, "n_bank": min(n_train, check.CPU_BANK), "n_query": n_test}


def test_check_decides_every_planned_op_once_and_writes_the_cache():
    """Every (op, shape class) of the trainer's plan is decided exactly once (two stages sharing a shape class share
    a decision), each with its cost; the fastest verified backend wins (the compiled one, where it loaded); the
    Triton backends are listed as not run on CPU; the cache holds exactly these decisions."""
    res = check.run("tiny", "cpu", overrides=SMALL, timer=fast_kernels)
    assert res["ok"]
    got = [(d["op"], d["shape"]) for d in res["decisions"]]
    assert len(got) == len(set(got)) and set(got) == _plan_keys()
    assert {op for op, _ in got} == {"queue_topk", "masked_patch_embed", "decoder_input", "attention"}
    cpp = D.get("queue_topk").backend("cpp").why_not(torch.device("cpu"), ()) is None
    for d in res["decisions"]:
        assert d["cost_s"] >= 0 and not d["dropped"], d
        if d["op"] != "attention":
            assert d["pick"] == ("cpp" if cpp else min(d["ms"], key=d["ms"].get)), d
            assert "triton" in d["not_run"], d
    entries = D.cache().get
    for d in res["decisions"]:
        e = entries(f"{res['env']['device']}|{d['op']}|{d['shape']}")
        assert e is not None and e["pick"] == d["pick"], d
    text = check.format_table(res)
    assert "x torch path" in text and "cost of each decision" in text and "every backend verified" in text


def test_the_torch_path_wins_when_it_is_faster():
    res = check.run("tiny", "cpu", overrides=SMALL, timer=fast_torch)
    assert res["ok"] and res["decisions"]
    assert all(d["pick"] in TORCH_PATHS for d in res["decisions"]), res["decisions"]


def test_two_checks_pick_the_same_and_the_trainer_reads_them(fresh):
    """Two calls measure again (each decision has its own cost) and pick the same backends; the trainer's start-up
    with kernels.measure=false then runs exactly these picks from the cache, measuring nothing."""
    a = check.run("tiny", "cpu", overrides=SMALL, timer=fast_kernels)
    D.clear()
    b = check.run("tiny", "cpu", overrides=SMALL, timer=fast_kernels)
    picks = lambda r: {(d["op"], d["shape"]): d["pick"] for d in r["decisions"]}   # noqa: E731
    assert picks(a) == picks(b)
    D.clear()
    fresh.setattr(D, "measure", lambda *a, **k: pytest.fail("measured with kernels.measure=false"))
    cfg = load_config(["preset=tiny", *SMALL, "kernels.measure=false"])
    backends.decide_for_run(cfg, torch.device("cpu"), **_sizes(cfg))
    got = {(op, key): d.pick for (op, _, key), d in D.decisions().items()}
    assert got == picks(a)
    assert {d.source for d in D.decisions().values()} == {"cache"}


def test_check_exits_1_on_a_mismatch(fresh, capsys):
    """A backend that returns the reference's indices shifted by one is dropped with its first bad row, the table
    says so, and the exit status is 1."""
    def off_by_one(q, e, k, ids=None, qids=None, normalized=True):
        v, i = qt.queue_topk_ref(q, e, k, ids, qids, normalized)
        return v, (i + 1) % e.shape[0]
    fresh.setattr(qt.OP, "backends", qt.OP.backends + (D.Backend("broken", off_by_one),))
    fresh.setattr(D, "interleaved", lambda runs, device, budget: (
        {n: fast_kernels(n, fn, device, budget) for n, fn in runs.items()}, {}))
    assert check.main(["--preset", "tiny", "--device", "cpu", *SMALL]) == 1
    out = capsys.readouterr().out
    assert "NO: disagrees with the reference: row 0" in out and "MISMATCH or ERROR" in out


@pytest.mark.parametrize("argv,line", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["mae.blr=abc"], "config key 'mae.blr': expected a number, got 'abc'"),
    (["nokey=1"], "unknown config key 'nokey'"),
    (["head.batch_size=1"], "head.batch_size=1: the NNCLR head's BatchNorm needs at least 2 samples"),
    (["--bank", "5"], "--bank=5 is too small: the k-NN bank needs eval.knn_k=20"),
    (["--world-size", "3"], "--world-size=3 does not divide mae.batch_size=256 (batch sizes are global)"),
    (["--world-size", "2", "mae.accum_steps=256"], "--world-size=2 does not divide mae.batch_size=256 x "
                                                   "mae.accum_steps=256"),
    (["--world-size", "0"], "--world-size=0 must be >= 1"),
])
def test_bad_arguments_are_one_line_before_any_measurement(capsys, monkeypatch, argv, line):
    """Exit status 2 and one line on stderr naming the value; nothing is measured."""
    monkeypatch.setattr(check, "run", lambda *a, **k: pytest.fail("measured despite bad arguments"))
    assert check.main(["--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("maect.kernels.check: ") and line in err, err
