"""The trainer's backend decisions (maect/backends.py): made before the first step for every op and shape class the
run trains and evaluates with, never inside a forward or a backward, logged in one line; config keys ask for a
backend by name."""
from __future__ import annotations

import pytest
import torch

from maect import backends, train
from maect.config import ConfigError
from maect.kernels import dispatch as D
from maect.validation import load_config
from test_nnclr import TINY

SMALL = [a for a in TINY if not a.startswith(("mae.epochs", "head.epochs", "ct.epochs", "eval.", "log_every"))]


pytestmark = pytest.mark.usefixtures("fresh_dispatch")     # tests/conftest.py


def test_decisions_are_made_at_start_up_and_never_inside_a_step(tmp_path, monkeypatch, capfd):
    """Spy on the measuring function and on every call-time lookup through a whole pipeline: measuring happens
    before the first step only, and every (op, shape class) a step or an evaluation looks up was decided then."""
    measured, in_step, looked_up = [], [False], set()
    real_measure, real_resolve = D.measure, D._resolve

    def spy_measure(op, args, **kw):
        measured.append((op, in_step[0]))
        return real_measure(op, args, **kw)

    def spy_resolve(op, device_type, device_index, meta, asked):
        if in_step[0] and asked is None:
            looked_up.add((op, device_type, D.OPS[op].key(meta)))
        return real_resolve(op, device_type, device_index, meta, asked)

    def stepping(fn):
        def run(*a, **kw):
            in_step[0] = True
            try:
                return fn(*a, **kw)
            finally:
                in_step[0] = False
        return run

    monkeypatch.setattr(D, "measure", spy_measure)
    monkeypatch.setattr(D, "_resolve", spy_resolve)
    for name in ("mae_one_epoch", "nnclr_one_epoch", "final_knn", "nnclr_monitor"):
        monkeypatch.setattr(train, name, stepping(getattr(train, name)))
    train.run(load_config(SMALL + ["smoke=2", "kernels.budget_s=0.05", f"out_dir={tmp_path}/run"]))
    assert measured and not any(inside for _, inside in measured), measured
    decided = set(D.decisions())
    assert looked_up and looked_up <= decided, f"looked up but not decided at start-up: {looked_up - decided}"
    out = capfd.readouterr()
    lines = [ln for ln in (out.out + out.err).splitlines() if " kernels: " in ln]
    assert len(lines) == 1 and "queue_topk" in lines[0] and "attention" in lines[0], lines


def test_config_asks_for_a_backend_by_name(tmp_path):
    cfg = load_config(SMALL + ["kernels.queue_topk=torch", "kernels.measure=false"])
    line = backends.decide_for_run(cfg, torch.device("cpu"), n_train=600, n_bank=100, n_query=50)
    assert "queue_topk -> torch (asked)" in line
    assert D.forced() == {"queue_topk": "torch"}
    assert all(op != "queue_topk" for op, _, _ in D.decisions())
    with pytest.raises(ConfigError, match=r"kernels.queue_topk='nope': choose one of"):
        load_config(SMALL + ["kernels.queue_topk=nope"])
    with pytest.raises(ConfigError, match=r"kernels.budget_s=0.0 must be a positive number"):
        load_config(SMALL + ["kernels.budget_s=0"])


def test_measure_false_reads_the_cache_or_runs_the_static_default(monkeypatch):
    monkeypatch.setattr(D, "measure", lambda *a, **k: pytest.fail("measured with kernels.measure=false"))
    cfg = load_config(SMALL + ["kernels.measure=false"])
    backends.decide_for_run(cfg, torch.device("cpu"), n_train=600, n_bank=100, n_query=50)
    assert D.decisions() and {d.source for d in D.decisions().values()} == {"static default"}
