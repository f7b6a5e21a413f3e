"""python -m maect.kernels.check: every op and shape of a preset measured, one table, the cache written, exit 1 on
a mismatch. Timings are injected (the check's real timings are printed by the command, never asserted)."""
import importlib
import json

import pytest

from maect import kernels
from maect.kernels import check
from maect.kernels import dispatch as D

qt = importlib.import_module("maect.kernels.ops.queue_topk")
SMALL = ("nnclr.queue_size=1024", "eval.final_train=2048", "mae.batch_size=16", "ct.batch_size=16",
         "head.batch_size=16")


def fake_timer(name, fn, device, budget):
    fn()
    return {"ref": 4.0, "cpp": 1.0, "gather": 2.0, "fused": 1.5}.get(name, 3.0)


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("MAECT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MAECT_DISPATCH", "table")        # the check measures whatever the mode says
    kernels.clear_cache()
    yield monkeypatch
    kernels.clear_cache()


def test_check_tiny_cpu_measures_every_op_and_writes_the_cache(fresh):
    res = check.run("tiny", "cpu", overrides=SMALL, timer=fake_timer)
    assert res["ok"]
    ops = {r["op"] for r in res["rows"]}
    assert ops == {"queue_topk", "masked_patch_embed", "random_masking", "decoder_input", "unshuffle"}
    assert len(res["cost"]) == 6                          # head+ct lookup, k-NN chunk, four masking ops
    picks = {c["op"] + c["shape"]: [r for r in res["rows"] if r["pick"] and r["shape"] == c["shape"]
                                    and r["op"] == c["op"]] for c in res["cost"]}
    assert all(len(v) == 1 for v in picks.values())
    want = "cpp" if kernels.why_not("random_masking", "cpp", "cpu") is None else "ref"
    assert [r["backend"] for r in res["rows"] if r["op"] == "random_masking" and r["pick"]] == [want + " *"]
    assert any(r["backend"] == "triton" and r["verified"].startswith("not run") for r in res["rows"])
    entries = json.loads((D.cache_dir() / "dispatch.json").read_text())["entries"]
    assert {c["key"] for c in res["cost"]} == set(entries)
    text = check.format_table(res)
    assert "x torch path" in text and "cost of measuring" in text and "every backend verified" in text


def test_check_exits_1_on_a_mismatch(fresh, capsys):
    def off_by_one(q, e, k, ids=None, qids=None, normalized=True):
        v, i = qt.queue_topk_ref(q, e, k, ids, qids, normalized)
        return v, (i + 1) % e.shape[0]
    fresh.setattr(qt, "impls", lambda device: {"broken": off_by_one})
    D.set_timer(fake_timer)
    try:
        assert check.main(["--preset", "tiny", "--device", "cpu", *SMALL]) == 1
    finally:
        D.set_timer(None)
    out = capsys.readouterr().out
    assert "NO: mismatch: row 0" in out and "MISMATCH or ERROR" in out


@pytest.mark.parametrize("argv,line", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["mae.blr=abc"], "config key 'mae.blr': expected a number, got 'abc'"),
    (["nokey=1"], "unknown config key 'nokey'"),
    (["head.batch_size=1"], "head.batch_size=1: the NNCLR head's BatchNorm needs at least 2 samples"),
    (["--bank", "5"], "--bank=5 is smaller than eval.knn_k=20"),
    (["--world-size", "3"], "--world-size=3 does not divide mae.batch_size=256 (batch sizes are global)"),
    (["--world-size", "2", "mae.accum_steps=256"], "--world-size=2 does not divide mae.batch_size=256 x "
                                                   "mae.accum_steps=256"),
    (["--world-size", "0"], "--world-size=0 must be >= 1"),
])
def test_bad_arguments_are_one_line_before_any_measurement(fresh, capsys, monkeypatch, argv, line):
    """Exit status 2 and one line on stderr naming the value; nothing is measured. Before: a traceback for an
    unknown preset or a bad override, --bank below k failed deep in the k-NN case, and --world-size 3 silently
    measured N = 256 // 3 = 85 rows per rank (no run of that batch exists)."""
    monkeypatch.setattr(check, "run", lambda *a, **k: pytest.fail("measured despite bad arguments"))
    assert check.main(["--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("maect.kernels.check: ") and line in err, err
