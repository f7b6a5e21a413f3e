"""Measured dispatch (kernels/dispatch.py, kernels/_route.py, kernels/ops/): the decision logic with injected timings (no
test depends on how fast anything runs), the verification rules with fake backends, the cache file (round trip,
corrupt file, unwritable folder, two processes at once) and the agreement of two gloo ranks."""
from __future__ import annotations

import importlib
import json
import logging
import multiprocessing as mp
import os

import pytest
import torch
import torch.nn.functional as F

from maect import kernels
from maect.kernels import dispatch as D
from maect.kernels.ops import _measure as MS

qt = importlib.import_module("maect.kernels.ops.queue_topk")


@pytest.fixture
def measure(monkeypatch, tmp_path):
    """Measure mode, a fresh cache folder, no decisions in memory; the default timer restored afterwards."""
    monkeypatch.setenv("MAECT_DISPATCH", "measure")
    monkeypatch.setenv("MAECT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MAECT_KERNELS", raising=False)
    monkeypatch.delenv("MAECT_MASKING", raising=False)
    kernels.clear_cache()
    yield monkeypatch
    D.set_timer(None)
    kernels.clear_cache()


def timer_of(ms: dict, calls: list | None = None):
    def timer(name, fn, device, budget):
        if calls is not None:
            calls.append(name)
        fn()
        return ms[name]
    return timer


def topk_inputs(B=24, Q=200, D_=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, D_, generator=g), dim=1)
    e = F.normalize(torch.randn(Q, D_, generator=g), dim=1)
    e[7] = e[3]                                                   # an exact tie: index 3 must win
    qids = torch.arange(Q)
    ids = torch.randint(0, Q, (B,), generator=g)
    return q, e, 5, ids, qids


def wrong_index(q, e, k, ids, qids, normalized=True):
    v, i = qt.queue_topk_ref(q, e, k, ids, qids, normalized)
    i = i.clone()
    i[3, 0] = (i[3, 0] + 1) % e.shape[0] if i[3, 0] + 1 != i[3, 1] else (i[3, 0] + 2) % e.shape[0]
    return v, i


def raises(*a, **kw):
    raise RuntimeError("PTXAS error: out of registers")          # as a compile failure surfaces


def problem_with(impls, inputs=None):
    q, e, k, ids, qids = inputs or topk_inputs()
    return qt.topk_problem(q, e, k, ids, qids, True, impls, key=qt.topk_key(q, e, k, ids))


# ------------------------------------------------------------------------------------------- decision logic
def test_wrong_index_raising_and_slower_backends(measure, caplog):
    """A backend returning a wrong index is dropped as a defect naming its first bad row; one that raises is
    dropped with its error; a correct but slower one is verified and timed but not picked."""
    p = problem_with({"wrong": wrong_index, "boom": raises, "slow": qt.queue_topk_ref})
    ms = {"ref": 5.0, "wrong": 1.0, "boom": 1.0, "slow": 9.0, "torch mm+topk": 4.0}
    with caplog.at_level(logging.INFO, logger="maect.kernels"):
        d = D.choose(p.key, lambda: p, "ref", timer=timer_of(ms))
    assert d.pick == "ref" and d.source == "measured"
    assert d.dropped["wrong"].startswith("mismatch: row 3:") and d.defects["wrong"].startswith("row 3:")
    assert d.dropped["boom"] == "raised RuntimeError: PTXAS error: out of registers"
    assert set(d.ms) == {"ref", "slow", "torch mm+topk"} and d.ratio("slow") == pytest.approx(4 / 9)
    assert "DEFECT: queue_topk backend 'wrong'" in caplog.text and "row 3" in caplog.text
    lines = [r.getMessage() for r in caplog.records if "backend 'ref' (measured" in r.getMessage()]
    assert len(lines) == 1 and "slow 9.000 ms = 0.44x" in lines[0] and "torch mm+topk 4.000 ms (torch path)" in lines[0]


def test_fastest_verified_backend_wins_and_is_kept(measure):
    calls = []
    D.set_timer(timer_of({"ref": 5.0, "fast": 2.0, "torch mm+topk": 4.0}, calls))
    measure.setattr(qt, "impls", lambda device: {"fast": qt.queue_topk_ref})
    q, e, k, ids, qids = topk_inputs()
    v, i = kernels.queue_topk(q, e, k, ids, qids)
    assert torch.equal(i, qt.queue_topk_ref(q, e, k, ids, qids)[1])
    assert list(kernels.decisions().values()) == ["fast"] and sorted(calls) == ["fast", "ref", "torch mm+topk"]
    kernels.queue_topk(q, e, k, ids, qids)                       # decided: no second measurement
    assert len(calls) == 3


@pytest.mark.parametrize("fault", ["value", "excluded", "tie", "padding"])
def test_topk_rule_catches_each_fault(fault):
    """check_topk rejects a wrong value, an excluded index, the higher of two equal rows, and lost padding."""
    q, e, k, ids, qids = topk_inputs()
    ids[0] = 3 if fault != "tie" else ids[0]
    ref = qt.queue_topk_ref(q, e, k, ids, qids)
    v, i = ref[0].clone(), ref[1].clone()
    if fault == "value":
        v[2, 1] += 1e-3
    elif fault == "excluded":
        i[0, 4] = 3
    elif fault == "tie":
        q[5], ids[5] = e[3], 100                                  # rows 3 and 7 are equal: 3 ranks first
        ref = qt.queue_topk_ref(q, e, k, ids, qids)
        assert ref[1][5, :2].tolist() == [3, 7]
        v, i = ref[0].clone(), ref[1].clone()
        i[5, 0], i[5, 1] = 7, 3
    else:
        e2 = e.clone()
        ids[:] = 0
        qids = torch.zeros_like(qids)
        qids[:3] = 1                                              # only 3 admissible entries < k = 5
        ref = qt.queue_topk_ref(q, e2, k, ids, qids)
        v, i = ref[0].clone(), ref[1].clone()
        i[1, 4] = 10
        v[1, 4] = float((q[1] @ e2[10]).item())
    assert qt.check_topk(q, e, k, ids, qids, True, ref, ref) is None
    assert qt.check_topk(q, e, k, ids, qids, True, (v, i), ref) is not None


def test_masking_rule_mask_exact_tokens_bounded(measure):
    """masked_patch_embed: a token off by more than the derived bound, or a flipped mask entry, is a defect; the
    gather backend (another summation order) passes."""
    emb = importlib.import_module("maect.kernels.ops.masked_patch_embed")
    g = torch.Generator().manual_seed(1)
    imgs, w = torch.randn(4, 3, 16, 16, generator=g), torch.randn(32, 3, 4, 4, generator=g).requires_grad_()
    b, pos = torch.randn(32, generator=g), torch.randn(1, 16, 32, generator=g)
    args, shape = MS.masking_inputs("masked_patch_embed", (imgs, w, b, pos, 0.75, None))

    def off_token(*a):
        x, m, r = emb.masked_patch_embed_ref(*a)
        x = x.detach().clone()
        x[2, 1, 5] += 1e-2
        return x, m, r

    def off_mask(*a):
        x, m, r = emb.masked_patch_embed_ref(*a)
        m = m.clone()
        m[1, 0] = 1 - m[1, 0]
        return x, m, r
    p = MS.masking_problem("masked_patch_embed", "k|masked_patch_embed|fp32|s", args,
                          {"gather": emb.masked_patch_embed_gather, "token": off_token, "mask": off_mask},
                          emb.masked_patch_embed_ref, True, shape)
    d = D.decide(p, timer=timer_of({"ref": 3.0, "gather": 1.0}))
    assert d.pick == "gather"
    assert d.defects["token"].startswith("sample 2: x_visible beyond the derived error bound")
    assert d.defects["mask"].startswith("sample 1: mask differs")


def test_measurement_leaves_the_global_rng_alone(measure):
    """Measuring draws its noise from a private generator: a measure-mode call consumes the global RNG exactly
    as a table-mode call does (same masks, same run)."""
    D.set_timer(timer_of({"ref": 3.0, "cpp": 2.0, "gather": 1.0}))
    g = torch.Generator().manual_seed(0)
    imgs, w = torch.randn(4, 3, 16, 16, generator=g), torch.randn(32, 3, 4, 4, generator=g).requires_grad_()
    torch.manual_seed(7)
    out_m = kernels.masked_patch_embed(imgs, w, None, None, 0.75)
    after_m = torch.get_rng_state()
    measure.setenv("MAECT_DISPATCH", "table")
    kernels.clear_cache()
    torch.manual_seed(7)
    out_t = kernels.masked_patch_embed(imgs, w, None, None, 0.75)
    assert torch.equal(after_m, torch.get_rng_state()) and torch.equal(out_m[2], out_t[2])


def test_modes(measure):
    """table mode never measures (the committed rule, or a measured cache entry); MAECT_KERNELS=0 runs the
    reference; an unknown mode is an error naming the variable."""
    q, e, k, ids, qids = topk_inputs()
    key = qt.topk_key(q, e, k, ids)
    measure.setenv("MAECT_DISPATCH", "table")

    def never():
        raise AssertionError("table mode measured")
    assert D.choose(key, None, "cpp").pick == "cpp"
    D.cache().put(key, D.Decision(pick="ref", source="measured").to_json())
    D.clear()
    assert D.choose(key, None, "cpp").pick == "ref"                # the cache (measured here) before the table
    kernels.clear_cache()
    measure.setenv("MAECT_KERNELS", "0")
    measure.setattr(qt, "topk_problem", lambda *a, **kw: never())
    kernels.queue_topk(q, e, k, ids, qids)
    assert kernels.decisions() == {}
    measure.setenv("MAECT_KERNELS", "1")
    measure.setenv("MAECT_DISPATCH", "fastest")
    with pytest.raises(ValueError, match="MAECT_DISPATCH='fastest'"):
        kernels.queue_topk(q, e, k, ids, qids)


# ----------------------------------------------------------------------------------------------------- cache
def test_cache_round_trip(measure, caplog):
    p = problem_with({"fast": qt.queue_topk_ref})
    d = D.choose(p.key, lambda: p, "ref", timer=timer_of({"ref": 3.0, "fast": 1.0, "torch mm+topk": 2.0}))
    data = json.loads((D.cache_dir() / "dispatch.json").read_text())
    assert data["format"] == 1 and data["entries"][p.key]["pick"] == "fast" == d.pick
    D.clear()                                                      # a new process, as far as dispatch knows

    def never():
        raise AssertionError("measured again")
    with caplog.at_level(logging.INFO, logger="maect.kernels"):
        again = D.choose(p.key, never, "ref")
    assert again.pick == "fast" and again.source.startswith("cache") and again.ms == d.ms
    assert "backend 'fast' (cache" in caplog.text                  # a resumed run logs what it runs


def test_corrupt_cache_warns_once_and_is_replaced(measure, caplog):
    path = D.cache_dir() / "dispatch.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"format": 1, "entries": {"x": ')             # a write cut short
    p1, p2 = problem_with({}), problem_with({}, topk_inputs(B=300))
    with caplog.at_level(logging.WARNING, logger="maect.kernels"):
        D.choose(p1.key, lambda: p1, "ref", timer=timer_of({"ref": 1.0, "torch mm+topk": 1.0}))
        D.choose(p2.key, lambda: p2, "ref", timer=timer_of({"ref": 1.0, "torch mm+topk": 1.0}))
    assert caplog.text.count("is corrupt") == 1
    assert set(json.loads(path.read_text())["entries"]) == {p1.key, p2.key}


@pytest.mark.parametrize("how", ["folder under a file", "replace fails"])
def test_unwritable_cache_keeps_decisions_in_memory(measure, tmp_path, caplog, how):
    """Tests run as root (chmod does not stop root): a cache folder below a regular file (mkdir fails), or an
    injected failure of the atomic rename. One warning, the decision kept, never an exception."""
    if how == "folder under a file":
        (tmp_path / "file").write_text("x")
        measure.setenv("MAECT_CACHE_DIR", str(tmp_path / "file" / "maect"))
    else:
        def refuse(*a):
            raise PermissionError(13, "Read-only file system")
        measure.setattr(D.os, "replace", refuse)
    p1, p2 = problem_with({}), problem_with({}, topk_inputs(B=300))
    t = timer_of({"ref": 1.0, "torch mm+topk": 1.0})
    with caplog.at_level(logging.WARNING, logger="maect.kernels"):
        assert D.choose(p1.key, lambda: p1, "ref", timer=t).pick == "ref"
        D.choose(p2.key, lambda: p2, "ref", timer=t)
    assert caplog.text.count("kept in memory") == 1                 # one warning (unreadable or unwritable)
    assert set(D.decisions()) == {p1.key, p2.key}
    if how == "replace fails":
        assert not list(D.cache_dir().glob("*.tmp"))               # the temporary file is cleaned up


def _writer(path: str, tag: str, n: int) -> None:
    from maect.kernels import dispatch as Dw
    c = Dw.Cache(path)
    for j in range(n):
        c.put(f"{tag}-{j}", {"pick": "ref", "ms": {"ref": float(j)}})


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    path = str(tmp_path / "dispatch.json")
    ctx = mp.get_context("fork")            # the writers run no torch op: fork is safe and quick
    procs = [ctx.Process(target=_writer, args=(path, tag, 25)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    entries = json.loads(open(path).read())["entries"]
    assert set(entries) == {f"{t}-{j}" for t in "ab" for j in range(25)}


# --------------------------------------------------------------------------------------------- distributed
def _rank(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist
    os.environ["MAECT_DISPATCH"] = "measure"
    os.environ["MAECT_CACHE_DIR"] = os.path.join(os.path.dirname(out), f"cache{rank}")
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    from maect.kernels import dispatch as Dr
    built = []
    q, e, k, ids, qids = topk_inputs()

    def problem():
        built.append(rank)
        return problem_with({"fast": qt.queue_topk_ref}, (q, e, k, ids, qids))
    # the ranks' clocks disagree: on rank 0 'fast' wins, on rank 1 the reference would
    ms = {0: {"ref": 5.0, "fast": 1.0, "torch mm+topk": 2.0}, 1: {"ref": 1.0, "fast": 5.0, "torch mm+topk": 2.0}}[rank]
    key = qt.topk_key(q, e, k, ids).replace("cpu:", f"cpu-node{rank}:")   # device names may differ per rank
    d = Dr.choose(key, problem, "ref", timer=timer_of(ms))
    dist.barrier()
    with open(out, "w") as f:
        json.dump({"pick": d.pick, "source": d.source, "built": built}, f)
    dist.destroy_process_group()


def test_two_gloo_ranks_run_the_same_backend(tmp_path):
    ctx = mp.get_context("spawn")
    init = f"file://{tmp_path / 'rendezvous'}"
    outs = [str(tmp_path / f"rank{r}.json") for r in (0, 1)]
    procs = [ctx.Process(target=_rank, args=(r, init, outs[r])) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
        assert p.exitcode == 0
    r0, r1 = (json.load(open(o)) for o in outs)
    assert r0["pick"] == r1["pick"] == "fast"
    assert r0["source"] == "measured" and r1["source"] == "rank 0 (measured)"
    assert r0["built"] == [0] and r1["built"] == []               # rank 1 did not measure: it ran rank 0's pick


# ------------------------------------------------------------------------------ the torch path is a candidate
def test_queue_topk_torch_follows_the_contract():
    """queue_topk_torch (the torch path in queue_topk's contract) equals the reference bitwise, values and indices:
    exact ties (duplicated rows, an all-zero queue), self exclusion down to padding, NaN / inf rows on either side,
    k = Q, B = 0, bf16, normalized=False. Both compute the same similarity matrix, so equality is exact."""
    q, e, k, ids, qids = topk_inputs(B=40)
    q[5] = float("nan")
    q[6, 0] = float("inf")
    e[11] = float("nan")
    e[12, 0] = float("inf")
    cases = [(q, e, k, ids, qids, True), (q, e, 1, None, None, True), (q, e, e.shape[0], ids, qids, True),
             (q[:0], e, k, ids[:0], qids, True), (q.bfloat16(), e.bfloat16(), k, ids, qids, True),
             (q * 3, e * 2, k, ids, qids, False), (q, torch.zeros_like(e), 7, None, None, True)]
    few = torch.zeros(4, dtype=torch.long)                          # queue of 6 rows, 4 of them the query's id
    cases.append((q[:3], e[:6], 3, few[:3], torch.tensor([0, 0, 0, 0, 1, 2]), True))
    for args in cases:
        v, i = qt.queue_topk_torch(*args)
        rv, ri = qt.queue_topk_ref(*args)
        assert torch.equal(i, ri) and torch.equal(v, rv), args[2]
    assert "torch" in qt.impls("cpu") and "torch" in qt.impls("cuda")


@pytest.mark.parametrize("torch_ms, pick", [(42.5, "torch"), (90.0, "cpp")])
def test_torch_path_wins_when_it_is_faster(measure, torch_ms, pick):
    """Injected timings, lightly's bank on CPU as measured (B=16, Q=65536: torch path 42.5 ms, the compiled op
    67 ms): the torch path in the op's contract is a candidate, so it is picked when it is the fastest, and the
    faster backend when it is not. 'cpp' stands in for the compiled op (the reference's code: no build needed)."""
    D.set_timer(timer_of({"ref": 120.0, "cpp": 67.0, "torch": torch_ms, "torch mm+topk": 42.0}))
    measure.setattr(qt, "impls", lambda device: {"torch": qt.queue_topk_torch, "cpp": qt.queue_topk_ref})
    q, e, k, ids, qids = topk_inputs()
    v, i = kernels.queue_topk(q, e, k, ids, qids)
    assert list(kernels.decisions().values()) == [pick]
    rv, ri = qt.queue_topk_ref(q, e, k, ids, qids)
    assert torch.equal(i, ri) and torch.equal(v, rv)


# ------------------------------------------------------------------------------ a backend switched off
def test_stale_decisions():
    """A decision from the cache or rank 0 is stale when its pick cannot run here, or when it was measured without
    a backend that can run here now; otherwise it holds."""
    d = D.Decision(pick="cpp", source="cache", ms={"ref": 5.0, "cpp": 1.0, "torch mm+topk": 2.0})
    ok = {"ref": None, "cpp": None, "triton": "Triton runs on CUDA"}
    assert D.stale(d, ok) is None
    assert "'cpp' cannot run here (MAECT_CPP=0)" in D.stale(d, {**ok, "cpp": "MAECT_CPP=0"})
    assert "without 'torch'" in D.stale(d, {**ok, "torch": None})
    d.dropped["torch"] = "mismatch: row 0"
    assert D.stale(d, {**ok, "torch": None}) is None               # measured and dropped: holds


SWITCHED_OFF = r"""
import json, logging, sys, torch
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
torch.set_num_threads(1)
from maect import kernels
from maect.kernels import dispatch as D
from maect.kernels.ops import _measure as MS, queue_topk as qt
g = torch.Generator().manual_seed(0)
q = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1)
e = torch.nn.functional.normalize(torch.randn(64, 16, generator=g), dim=1)
x = torch.randn(4, 16, 32, generator=g)
ids_restore = torch.argsort(torch.rand(4, 16, generator=g), dim=1)
tok = torch.randn(1, 1, 32, generator=g)
pos = torch.randn(1, 17, 32, generator=g)
xv = torch.randn(4, 5, 32, generator=g)
# a warm cache, as a run with the compiled ops writes it: each op's measured pick is a compiled / one-pass backend
ms = {"ref": 5.0, "cpp": 1.0, "torch": 4.0, "gather": 3.0, "fused": 0.5, "torch mm+topk": 2.0}
keys = {qt.topk_key(q, e, 2, None): "cpp",
        MS.masking_key("random_masking", x, 16, 32, False): "cpp",
        MS.masking_key("decoder_input", xv, 16, 32, False): "fused",
        MS.masking_key("unshuffle", xv[:, 1:], 16, 32, False): "cpp"}
for key, pick in keys.items():
    D.cache().put(key, D.Decision(pick=pick, source="measured", ms=ms).to_json())
D.clear()
with torch.no_grad():
    v, i = kernels.queue_topk(q, e, 2)
    assert torch.equal(i, kernels.queue_topk_ref(q, e, 2)[1])
    noise = torch.rand(4, 16, generator=g)
    got, want = kernels.random_masking(x, 0.75, noise), kernels.random_masking_ref(x, 0.75, noise)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    out = kernels.decoder_input(xv, tok, ids_restore, pos)
    assert torch.equal(out, kernels.decoder_input_ref(xv, tok, ids_restore, pos))
    out = kernels.unshuffle(xv[:, 1:], tok, ids_restore)
    assert torch.equal(out, kernels.unshuffle_ref(xv[:, 1:], tok, ids_restore))
print("ran", json.dumps(kernels.decisions()))
"""


@pytest.mark.parametrize("mode", ["measure", "table"])
def test_a_backend_switched_off_runs_with_a_warm_cache(tmp_path, mode):
    """MAECT_CPP=0 (the documented switch for the compiled ops) with a cache whose decisions name them (and the
    one-pass decoder_input, which without the compiled op would be the Triton kernel on a CPU tensor): every op
    runs, the references' results, each cached decision re-decided with one log line naming why (in table mode:
    the table's choice, never a measurement). Before, queue_topk raised "'_OpNamespace' 'maect' object has no
    attribute 'queue_topk'" and decoder_input "0 active drivers"."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # as a training run: no interpreter
    env.update(MAECT_CPP="0", MAECT_DISPATCH=mode, MAECT_CACHE_DIR=str(tmp_path / "cache"), MAECT_KERNELS="1")
    env.pop("MAECT_MASKING", None)
    r = subprocess.run([sys.executable, "-c", SWITCHED_OFF], env=env, capture_output=True, text=True, timeout=300)
    print(r.stdout[-3000:], r.stderr[-3000:])
    assert r.returncode == 0, r.stderr[-3000:]
    ran = json.loads(r.stdout.split("ran ", 1)[1])
    assert len(ran) == 4 and not set(ran.values()) & {"cpp", "fused", "triton"}, ran
    assert r.stdout.count("the cached decision is not used: its backend") == 4
    assert "cannot run here (the csrc extension did not load (MAECT_CPP=0" in r.stdout
