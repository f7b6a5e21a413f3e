"""The GPU suite (bench/gpu_suite.py, the harness in bench/gpu/) and the pieces of bench/loader_throughput.py that
its DALI step relies on; all on CPU: the dry run and fake steps."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "gpu"))
import suite as G  # noqa: E402  (bench/gpu/suite.py)
import report as R  # noqa: E402  (bench/gpu/report.py)
sys.path.remove(str(ROOT / "bench" / "gpu"))

HANGS = """
import time
def gpu_suite_step(out, budget_s):
    out["first"] = {"median_ms": 1.0}
    time.sleep(600)
    out["second"] = {"median_ms": 2.0}
"""
STUBBORN = """
import signal, time
def gpu_suite_step(out, budget_s):
    out["first"] = {"median_ms": 1.0}
    signal.signal(signal.SIGTERM, signal.SIG_IGN)     # a step stuck where Python cannot react to SIGTERM
    time.sleep(600)
"""
QUICK = """
def gpu_suite_step(out, budget_s):
    out["x"] = {"median_ms": 1.0, "budget_s": budget_s}
"""
BROKEN = """
def gpu_suite_step(out, budget_s):
    out["--config a"] = {"median_ms": 1.0}
    out["--config b"] = {"error": "TypeError: boom"}
"""


def script(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / f"{name}.py").write_text(text)
    return str(tmp_path / f"{name}.py")


def test_gpu_suite_dry_run(tmp_path):
    """--dry-run runs every step's code path on CPU (tiny shapes; stand-ins for CUDA: DALI's CPU operators) through
    the bench/gpu_suite.py entry point; only a script that is not in the tree yet may be skipped. The scripts' printed
    tables reach the steps' JSON (the harness wraps bench/common.py's print_table)."""
    out = tmp_path / "suite.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--dry-run", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    print(r.stdout[-4000:], r.stderr[-3000:])
    assert r.returncode == 0
    res = json.loads(out.read_text())
    steps = {s["name"]: s for s in res["steps"]}
    assert list(steps) == G.STEP_NAMES
    for name, s in steps.items():
        ok = s["status"] == "ok" or (s["status"] == "skipped" and s["reason"].endswith("not present"))
        assert ok, (name, s["status"], s.get("reason"))
        if s["status"] == "ok":
            assert {"startup_s", "compile_s", "measure_s"} <= s["timing"].keys(), name
    assert steps["kernel_tests"]["result"]["passed"] == 2
    assert steps["queue_lookup"]["result"]["_tables"], "print_table did not stream into the step's JSON"
    for name in ("attention", "masked_gather"):      # run by their command line: the rows reach the JSON (write_json)
        res = steps[name]["result"]["results"]
        assert any(r.get("median_ms") for r in res["rows"]) and not res["failed"], name
    assert steps["kernels_check"]["result"]["tiny"]["ok"]
    dl = steps["loader_throughput"]["result"]
    if "skipped" not in dl:             # DALI importable here (setup.sh installs it): its CPU stand-in ran
        assert dl["row ct 2 views"]["check"]["ok"] and dl["row ct 2 views"]["ratio"] > 0
    assert "=== gpu_suite: steps" in r.stdout and "ok" in r.stdout.split("=== gpu_suite: steps")[-1]


def test_gpu_suite_counts_a_failed_config_as_a_failed_step():
    """A per-config failure recorded inside a step's result (how train_step / attention record them) must fail the
    step: the dry run above cannot pass over a broken benchmark."""
    assert R.nested_errors({"results": {"a": {"median_ms": 1.0}}, "rc": 0}) == []
    err = R.nested_errors({"results": {"--stage ct": {"error": "TypeError: boom"}, "rows": [{"x": 1}, {"error": "e2"}]}})
    assert err == ["results/--stage ct: TypeError: boom", "results/rows[1]: e2"]
    # what makes a killed step 'partial' rather than 'failed': a measured value or a printed table
    assert not R.has_content({"passed": 0, "tests": {}, "_selection": "-m gpu"})
    assert R.has_content({"passed": 3}) and R.has_content({"_tables": [{"title": "t", "rows": []}]})


def test_step_killed_at_its_deadline_keeps_its_partial_json(tmp_path, monkeypatch):
    """A step past its deadline is stopped (SIGTERM; SIGKILL GRACE_S later when it ignores that) and reported
    'partial' with what it had assigned to `out` before; what it never reached is absent."""
    monkeypatch.setattr(G, "GRACE_S", 1.0)
    env = G.child_env(True, False)
    steps = [G.Step("hangs", script(tmp_path, "hangs", HANGS), 1, "test"),
             G.Step("stubborn", script(tmp_path, "stubborn", STUBBORN), 1, "test")]
    with ThreadPoolExecutor(2) as ex:       # 12 s deadline: the fake steps import no torch, they start in ~1-3 s
        recs = list(ex.map(lambda s: G.run_step(s, 12.0, True, env, tmp_path), steps))
    for rec, how in zip(recs, ("SIGTERM", "SIGKILL")):
        assert rec["status"] == "partial", rec
        assert how in rec["reason"] and rec["result"]["first"] == {"median_ms": 1.0}
        assert "second" not in rec["result"] and rec["wall_s"] < 40
    assert "partial" in R.closing_table(recs)
    assert recs[0]["timing"]["startup_s"] >= 0       # the child wrote its timing on the way out


def test_only_skip_and_merge(tmp_path, capsys):
    """--skip leaves a step out, a failed config fails its step, an absent script is skipped with the reason;
    a second call with --merge --only re-runs one step and keeps the others' records; 'failed' selects the failed."""
    steps = [G.Step("quick", script(tmp_path, "quick", QUICK), 5, "test"),
             G.Step("broken", script(tmp_path, "broken", BROKEN), 5, "test"),
             G.Step("absent", "bench/not_there.py", 5, "test")]
    out = tmp_path / "suite.json"
    assert G.main(["--dry-run", "--out", str(out), "--skip", "quick"], steps=steps) == 1
    first = json.loads(out.read_text())
    by = {s["name"]: s for s in first["steps"]}
    assert set(by) == {"broken", "absent"} and by["broken"]["status"] == "failed"
    assert "boom" in by["broken"]["reason"] and by["broken"]["result"]["--config a"] == {"median_ms": 1.0}
    assert by["absent"] == {**by["absent"], "status": "skipped", "reason": "bench/not_there.py not present"}
    assert [s.name for s in G.select("failed", None, first, steps)] == ["broken"]
    assert G.main(["--dry-run", "--out", str(out), "--merge", "--only", "quick"], steps=steps) == 1   # broken stays
    merged = json.loads(out.read_text())
    by = {s["name"]: s for s in merged["steps"]}
    assert [s["name"] for s in merged["steps"]] == ["quick", "broken", "absent"] and len(merged["calls"]) == 2
    assert by["quick"]["status"] == "ok" and by["broken"]["call"] == {s["name"]: s for s in first["steps"]}["broken"]["call"]
    assert by["quick"]["result"]["x"]["budget_s"] == pytest.approx(5 * G.DRY_BUDGET_SCALE)
    with pytest.raises(SystemExit, match="unknown step nope; steps: quick, broken, absent"):
        G.select("nope", None, None, steps)
    assert "1 ok, 0 partial, 1 failed, 1 skipped" in capsys.readouterr().out


def test_headlines_read_the_benchmarks_json():
    """The closing table's ratios come from the steps' JSON; an unknown format gives no line, never an error."""
    ql = {"results": {"results": [{"B": 2048, "Q": 65536, "k": 20, "dtype": "bf16", "rows": [
        {"provider": "matmul (floor)", "median_ms": 0.136}, {"provider": "official NNCLR", "median_ms": 1.83},
        {"provider": "maect", "median_ms": 0.915}]}]}}
    assert R.head_queue_lookup(ql) == ["B=2048 Q=65536 k=20 bf16: 2.00x official, 6.73x GEMM time"]
    ts = {"--model vit_l16 --stage mae": {"stage": "mae", "model": "vit_l16", "rows": [
        {"provider": "reference", "speedup": 1.0}, {"provider": "maect", "mfu": 0.248, "speedup": 1.6}]}}
    assert R.head_train_step(ts) == ["vit_l16 mae: MFU 24.8%, 1.60x reference"]
    dl = {"row ct 2 views": {"row": "ct 2 views", "data": "fmnist", "ratio": 12.5, "twin": {"img_per_s": 400.0},
                             "dali": {"img_per_s": 5000.0}}}
    assert R.head_loader_throughput(dl) == ["fmnist ct 2 views: DALI 5000 img/s = 12.5x twin (400)"]
    assert R.headlines({"name": "queue_lookup", "result": {"something": "else"}}) == []
    assert R.headlines({"name": "train_step", "result": {"x": {"stage": 1, "rows": [{"provider": "maect",
                                                                                      "mfu": "?"}]}}})


def test_dataloading_contract_catches_a_wrong_normalisation():
    """The DALI step's comparison of the two loaders' batches: equal batches pass; a batch left in [0, 1] (not
    normalised) or read in another order fails."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import loader_throughput as dl
    finally:
        sys.path.remove(str(ROOT / "bench"))

    class Data:
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    m, s = torch.tensor(Data.mean).view(1, 3, 1, 1), torch.tensor(Data.std).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(0)
    pix = torch.rand(64, 1, 8, 8, generator=g).expand(-1, 3, -1, -1)
    batch = {"views": [(pix - m) / s], "idx": torch.arange(64), "label": torch.zeros(64, dtype=torch.long)}
    assert dl.compare(batch, batch, Data, gray=True)["ok"]
    with pytest.raises(AssertionError, match="batch brightness"):
        dl.compare(batch, {**batch, "views": [pix + 0.0]}, Data, gray=False)
    with pytest.raises(AssertionError, match="different samples"):
        dl.compare(batch, {**batch, "idx": torch.arange(64).flip(0)}, Data, gray=False)


def test_export_size_option(tmp_path):
    """dataloading/export.py --size: every image written at SIZE x SIZE (the DALI step exports Fashion-MNIST at 224)."""
    from PIL import Image

    from maect.dataloading.datasets import ArrayData
    from maect.dataloading.export import export_split
    data = ArrayData(torch.randint(0, 255, (6, 1, 28, 28), dtype=torch.uint8), torch.tensor([0, 1, 2, 0, 1, 2]),
                     (0.5,), (0.5,), 3)
    assert export_split(data, str(tmp_path), limit=1, size=40) == 3
    files = sorted(tmp_path.rglob("*.jpg"))
    assert len(files) == 3 and all(Image.open(f).size == (40, 40) for f in files)


CLOCK = r"""
import sys
sys.path[:0] = [sys.argv[1]]
from child import CompileClock
clock = CompileClock()
clock.install()                      # before the kernel exists, as the suite's step processes do
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

@triton.jit
def add_one(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) + 1, mask=i < n)

sig = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}
triton.compiler.compile(ASTSource(fn=add_one, signature=sig, constexprs={"BLOCK": 128}),
                        target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
print(clock.report(startup_s=0.0, run_s=1e3))
"""


def test_compile_clock_counts_triton_compiles(tmp_path):
    """The suite's compile_s: a Triton compile (for sm_90, through ptxas: no GPU needed) is counted and timed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    (tmp_path / "clock.py").write_text(CLOCK)                 # @triton.jit needs its source in a file
    r = subprocess.run([sys.executable, str(tmp_path / "clock.py"), str(ROOT / "bench" / "gpu")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = eval(r.stdout.strip().splitlines()[-1])          # a dict literal printed by the child
    assert rep["triton_compiles"] == 1 and 0 < rep["triton_compile_s"] == rep["compile_s"] < rep["run_s"]
    assert rep["measure_s"] == pytest.approx(rep["run_s"] - rep["compile_s"], abs=0.02)


def test_suite_names_the_install_an_uninstalled_checkout_needs():
    """The steps import maect.kernels from this checkout through its install (setup.py's package_dir); without one
    (here: -S, no site-packages) the suite stops at once with the command that installs it."""
    env = G.child_env(True, False)
    assert G.package_problem(env) is None
    msg = G.package_problem(env, flags=("-S",))
    assert "not found" in msg and "--no-index -e ." in msg, msg


def test_bench_scripts_stand_apart_from_the_harness():
    """No user-facing script in bench/ imports the GPU-suite harness (bench/gpu/), and no bench/*.py is named like a
    module Python would otherwise import (the project's packages, the standard library, anything installed)."""
    import ast
    from importlib.machinery import PathFinder
    elsewhere = [p for p in sys.path if Path(p or ".").resolve() not in (ROOT / "bench", ROOT / "bench" / "gpu")]
    harness = {p.stem for p in (ROOT / "bench" / "gpu").glob("*.py")}
    project = {p.name for p in ROOT.iterdir() if p.is_dir()} | {"setup"}
    for path in sorted((ROOT / "bench").glob("*.py")):
        if path.name == "gpu_suite.py":          # the suite's command: runs bench/gpu/suite.py by path
            continue
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
        assert not names & harness, (path.name, names & harness)
        stem = path.stem
        assert stem not in project and stem not in sys.stdlib_module_names, path.name
        found = PathFinder.find_spec(stem, elsewhere)      # sys.path without bench/, ignoring sys.modules
        assert found is None, (path.name, found.origin)
