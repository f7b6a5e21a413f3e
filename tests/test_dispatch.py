"""The one backend mechanism (kernels/dispatch.py): decisions made before training (verified, timed, cached), a
plain lookup at call time, the torch path never beaten by a slower backend, the same backends in two processes of
one config and on every rank.

Timings are injected (timer_of) wherever a test asserts which backend wins: no assertion depends on machine speed.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import maect.kernels as K
from maect.kernels import dispatch as D

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("fresh_dispatch")     # tests/conftest.py


def timer_of(ms: dict, calls: list | None = None):
    """A timer that runs fn once (so its errors surface) and reports ms[name]."""
    def timer(name, fn, device, budget):
        fn()
        if calls is not None:
            calls.append(name)
        return ms[name]
    return timer


def topk_args(B=24, Q=200, D_=16, k=4, seed=0, ids=True):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, D_, generator=g), dim=1)
    e = F.normalize(torch.randn(Q, D_, generator=g), dim=1)
    if not ids:
        return q, e, k, None, None, True
    qids = torch.randint(0, 50, (Q,), generator=g)
    return q, e, k, torch.randint(0, 50, (B,), generator=g), qids, True


def with_backend(op: str, backend: D.Backend):
    """The op with one more backend (restored by the fixture's monkeypatch)."""
    o = D.OPS[op]
    return dataclasses.replace(o, backends=o.backends + (backend,))


def runnable_topk() -> list[str]:
    return [b.name for b in D.OPS["queue_topk"].backends if b.why_not(torch.device("cpu"), ()) is None]


@pytest.mark.parametrize("torch_ms, other_ms, pick", [(1.0, 0.5, "other"), (1.0, 0.93, "torch"), (0.4, 1.0, "torch")])
def test_torch_path_wins_when_it_is_faster(monkeypatch, torch_ms, other_ms, pick):
    """The torch path is first in every op's order: a backend replaces it only when measured > MARGIN faster."""
    other = D.Backend("other", D.OPS["queue_topk"].backends[0].fn)
    monkeypatch.setitem(D.OPS, "queue_topk", with_backend("queue_topk", other))
    ms = {n: 5.0 for n in runnable_topk()} | {"torch": torch_ms, "other": other_ms}
    d = D.decide("queue_topk", topk_args(), timer=timer_of(ms))
    assert d.pick == pick and d.source == "measured" and d.torch_path == "torch"
    args = topk_args()
    meta = D.OPS["queue_topk"].meta(*args)
    assert D.lookup("queue_topk", meta, torch.device("cpu")) is D.OPS["queue_topk"].backend(pick).fn


def wrong_index(q, e, k, ids=None, qids=None, normalized=True):
    v, i = K.queue_topk_ref(q, e, k, ids, qids, normalized)
    i = i.clone()
    i[3, 0] = (i[3, 0] + 1) % e.shape[0]
    return v, i


def raises(*a, **kw):
    raise RuntimeError("cannot compile this")


def test_wrong_and_raising_backends_are_dropped_never_picked(monkeypatch, caplog):
    op = with_backend("queue_topk", D.Backend("wrong", wrong_index))
    op = dataclasses.replace(op, backends=op.backends + (D.Backend("boom", raises),))
    monkeypatch.setitem(D.OPS, "queue_topk", op)
    ms = {n: 5.0 for n in runnable_topk()} | {"wrong": 0.01, "boom": 0.01}
    with caplog.at_level(logging.WARNING, logger="maect.kernels"):
        d = D.decide("queue_topk", topk_args(), timer=timer_of(ms))
    assert d.pick not in ("wrong", "boom")
    assert d.dropped["wrong"].startswith("disagrees with the reference: row 3")
    assert "RuntimeError: cannot compile this" in d.dropped["boom"]
    assert any("DEFECT" in r.message and "'wrong'" in r.message for r in caplog.records)


def test_call_time_never_measures(monkeypatch):
    """With no decision, a call runs the static default; nothing is measured outside decide()."""
    called = []
    monkeypatch.setattr(D, "measure", lambda *a, **k: called.append(a) or pytest.fail("measured at call time"))
    args = topk_args()
    v, i = K.queue_topk(*args)
    rv, ri = K.queue_topk_ref(*args)
    assert torch.equal(i, ri) and not called
    assert D.decisions() == {}


def test_decisions_are_cached_and_reused_by_a_new_process_state(monkeypatch):
    ms = {n: 5.0 for n in runnable_topk()} | {"torch": 1.0}
    d = D.decide("queue_topk", topk_args(), timer=timer_of(ms))
    assert d.pick == "torch"
    entries = json.loads((D.cache().path).read_text())["entries"]
    assert len(entries) == 1 and next(iter(entries.values()))["pick"] == "torch"
    D.clear()                                       # a new process: nothing in memory
    monkeypatch.setattr(D, "measure", lambda *a, **k: pytest.fail("a cached decision was measured again"))
    d2 = D.decide("queue_topk", topk_args(seed=1))  # same shape class, other values
    assert d2.pick == "torch" and d2.source == "cache"
    args = topk_args()
    assert D.lookup("queue_topk", D.OPS["queue_topk"].meta(*args), torch.device("cpu")) is \
        D.OPS["queue_topk"].backend("torch").fn


def test_a_cached_decision_that_cannot_run_here_is_not_used(monkeypatch, caplog):
    """A cache entry naming a backend this process cannot run (no GPU, no build) -> the static default at call
    time, and a new decision at start-up."""
    args = topk_args()
    op = D.OPS["queue_topk"]
    key = f"{D.device_key(torch.device('cpu'))}|queue_topk|{op.key(op.meta(*args))}"
    D.cache().put(key, {"pick": "triton", "ms": {"triton": 0.1}})
    D.clear()
    with caplog.at_level(logging.INFO, logger="maect.kernels"):
        fn = D.lookup("queue_topk", op.meta(*args), torch.device("cpu"))
    default = op.default["cpu"] if op.backend(op.default["cpu"]).why_not(torch.device("cpu"), ()) is None else "torch"
    assert fn is op.backend(default).fn
    assert any("'triton' cannot run here" in r.message for r in caplog.records)
    d = D.decide("queue_topk", args, timer=timer_of({n: 1.0 for n in runnable_topk()}))
    assert d.source == "measured" and d.pick != "triton"


def test_corrupt_cache_warns_once_and_is_replaced(caplog):
    D.cache().path.parent.mkdir(parents=True, exist_ok=True)
    D.cache().path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="maect.kernels"):
        D.decide("queue_topk", topk_args(), timer=timer_of({n: 1.0 for n in runnable_topk()}))
        D.decide("queue_topk", topk_args(B=600), timer=timer_of({n: 1.0 for n in runnable_topk()}))
    assert sum("unreadable" in r.message for r in caplog.records) == 1
    assert len(json.loads(D.cache().path.read_text())["entries"]) == 2


def test_asked_backend_that_cannot_run_names_every_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")     # on CPU, Triton runs only in its interpreter
    D.force("queue_topk", "triton")
    with pytest.raises(D.Unavailable) as e:
        K.queue_topk(*topk_args())
    msg = str(e.value)
    assert "backend 'triton' cannot run" in msg and "Every backend for these inputs" in msg and "torch" in msg
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        D.force("queue_topk", "nope")


def test_maect_kernels_0_runs_every_reference(monkeypatch):
    monkeypatch.setenv("MAECT_KERNELS", "0")
    args = topk_args()
    assert D.lookup("queue_topk", D.OPS["queue_topk"].meta(*args), torch.device("cpu")) is \
        D.OPS["queue_topk"].reference


def test_every_op_lists_the_torch_path_first_and_a_runnable_static_default():
    from maect.models import attention  # noqa: F401  (registers attention)
    assert {"queue_topk", "random_masking", "unshuffle", "decoder_input", "masked_patch_embed", "attention"} <= set(D.OPS)
    for name, op in D.OPS.items():
        for dev, default in op.default.items():
            assert default in op.names(), (name, dev, default)
        assert op.backends[0].name in ("torch", "ref", "sdpa"), name


PROBE = r"""
import json, sys, torch
from maect.validation import load_config
from maect import backends
from maect.kernels import dispatch as D
cfg = load_config(["preset=tiny", "kernels.budget_s=0.2"])
backends.decide_for_run(cfg, torch.device("cpu"), n_train=600, n_bank=100, n_query=50)
print(json.dumps({"|".join(k): [d.pick, d.source] for k, d in D.decisions().items()}))
"""


def test_two_processes_with_the_same_config_choose_the_same_backends(tmp_path):
    """The first process measures at start-up and writes the cache; the second reads every decision from it."""
    env = {**os.environ, "MAECT_CACHE_DIR": str(tmp_path / "shared")}
    runs = [json.loads(subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                                      check=True, cwd=ROOT).stdout.strip().splitlines()[-1]) for _ in range(2)]
    assert runs[0].keys() == runs[1].keys() and len(runs[0]) >= 5
    assert {k: v[0] for k, v in runs[0].items()} == {k: v[0] for k, v in runs[1].items()}
    assert {v[1] for v in runs[0].values()} == {"measured"} and {v[1] for v in runs[1].values()} == {"cache"}
    assert {k.split("|")[0] for k in runs[0]} >= {"queue_topk", "masked_patch_embed", "decoder_input", "attention"}


def _rank(rank: int, init: str, cache: str, out: str) -> None:
    import torch.distributed as dist
    os.environ["MAECT_CACHE_DIR"] = cache
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    args = topk_args()
    names = runnable_topk()
    # rank 0 measures the torch path fastest; rank 1 would measure another backend fastest
    fast = "torch" if rank == 0 else next(n for n in names if n != "torch")
    D.decide("queue_topk", args, timer=timer_of({n: (0.1 if n == fast else 5.0) for n in names}))
    D.share_from_rank0()
    op = D.OPS["queue_topk"]
    fn = D.lookup("queue_topk", op.meta(*args), torch.device("cpu"))
    other = D.lookup("queue_topk", op.meta(*topk_args(B=3000)), torch.device("cpu"))   # not decided: static default
    name = next(b.name for b in op.backends if b.fn is fn)
    other_name = next(b.name for b in op.backends if b.fn is other)
    with open(out, "w") as f:
        json.dump([name, other_name], f)
    dist.destroy_process_group()


def test_every_rank_runs_rank0s_decisions(tmp_path):
    if len(runnable_topk()) < 2:
        pytest.skip("one queue_topk backend runs here (the compiled op did not load): nothing to disagree on")
    import torch.multiprocessing as mp
    init = f"file://{tmp_path / 'pg'}"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, init, str(tmp_path / f"c{r}"), str(tmp_path / f"o{r}")))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    got = [json.loads((tmp_path / f"o{r}").read_text()) for r in range(2)]
    assert got[0] == got[1] and got[0][0] == "torch"
