"""The static check of the GPU kernels (kernels/static_check.py, python -m maect.kernels.check --static): its readers
(occupancy, SASS classes and loops, failure rules) on hand-made inputs, the tuner's filter on a stubbed verdict, and
the check itself: every launch a preset or queue_topk's config table can make, compiled for sm_90 and sm_80 with
Triton's bundled ptxas / cuobjdump (no GPU), must have no spill, tensor-core MMA where it calls tl.dot, and the
programs per SM its launcher assumes."""
from __future__ import annotations

import importlib
import inspect
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("triton")

from maect.kernels import static_check as S  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_fit_by_registers_and_shared_memory():
    """Programs per SM by the documented limits (64 K registers, allocated per warp in units of 256; 228 / 164 KiB of
    shared memory per SM, 227 / 163 KiB per block, 1 KiB reserved per block). Expected values worked by hand:
    255 regs -> 256 per thread x 32 = 8192 per warp, x 8 warps = 65536: 1 program; 128 regs x 32 x 4 warps = 16384:
    4 programs; 196608 B + 1 KiB into 228 KiB: 1; 64 KiB + 1 KiB into 228 KiB: 3; 512 KiB > 227 KiB: 0."""
    h, a = S.ARCHS["sm_90"], S.ARCHS["sm_80"]
    assert S.fit(h, 255, 8, 196608) == {"by_regs": 1, "by_smem": 1, "by_warps": 8, "programs": 1}
    assert S.fit(h, 128, 4, 65536)["by_regs"] == 4
    assert S.fit(h, 128, 4, 65536)["by_smem"] == 3
    assert S.fit(h, 200, 8, 525312)["programs"] == 0
    assert S.fit(h, 97, 4, 0)["by_regs"] == 4            # 97 x 32 = 3104 -> 3328 per warp; 65536 // (4 x 3328)
    assert S.fit(a, 64, 4, 163840)["by_smem"] == 1       # 160 KiB + 1 KiB of 164 KiB
    assert S.fit(a, 64, 4, 163 * 1024)["by_smem"] == 1
    assert S.fit(a, 64, 4, 163 * 1024 + 1)["by_smem"] == 0   # over 163 KiB per block


SASS = """
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   IMAD.MOV.U32 R1, RZ, RZ, R0 ;
        /*0020*/                   LDG.E R2, desc[UR4][R2.64] ;
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8].tnspB, RZ, !UPT ;
        /*0040*/                   ISETP.GE.AND P0, PT, R2, R3, PT ;
        /*0050*/                   FSEL R4, R4, -INF , P0 ;
        /*0060*/                   LDL R5, [R1+0x10] ;
        /*0070*/                   IADD3 R6, R6, 0x1, RZ ;
        /*0080*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR12].tnspB, R24 ;
        /*0090*/              @!P1 BRA 0x70 ;
        /*00a0*/                   STL [R1+0x10], R5 ;
        /*00b0*/                   UIADD3 UR4, UR4, 0x1, URZ ;
        /*00c0*/              @!P0 BRA 0x30 ;
        /*00d0*/                   EXIT ;
        /*00e0*/                   BRA 0xe0;
"""


def test_sass_classes_and_main_loop():
    """The main loop is the outermost backward branch holding an MMA (0x30..0xc0); the nested loop (0x70..0x90) is
    counted apart; the self-branch at the end is padding, not a loop. Classes by opcode: IMAD.MOV is a move, U* ops
    join their class (UIADD3 integer), LDL/STL are local (spill) traffic, ISETP/FSEL compare-select."""
    ins = S.parse_sass(SASS)
    assert [op for _, op, _ in ins][:4] == ["S2R", "IMAD.MOV.U32", "LDG.E", "HGMMA.64x128x16.F32.BF16"]
    assert sorted(S.loops(ins)) == [(0x30, 0xC0), (0x70, 0x90)]
    mix = S.main_loop_mix(ins)
    assert mix["range"] == ["0x30", "0xc0"] and mix["nested_loops"] == 1
    assert mix["body"] == {"mma": 1, "compare_select": 2, "local": 2, "integer": 1, "control": 1}
    assert mix["nested"] == {"integer": 1, "mma": 1, "control": 1}
    assert S.op_class("IMAD.MOV.U32") == "move" and S.op_class("IMAD.WIDE") == "integer"
    assert S.op_class("HMMA.16816.F32.BF16") == "mma" and S.op_class("ULDC.64") == "memory"


def _row(**over):
    row = {"arch": "sm_90", "kernel": "_scan_kernel", "spill_stores": 0, "spill_loads": 0, "tensor_core_dot": True,
           "mma": True, "fit": {"programs": 2, "by_regs": 2, "by_smem": 2, "by_warps": 8}}
    row.update(over)
    return row


def test_failure_rules():
    """A launch fails on any spill byte, on a tensor-core tl.dot compiled without MMA, on fewer programs per SM than
    the launcher assumes, and when it does not compile; a clean row has no failure."""
    assert S.failures(_row(), 2) == []
    assert "spills 8 B stores / 4 B loads" in S.failures(_row(spill_stores=8, spill_loads=4), 2)[0]
    assert "without tensor-core MMA" in S.failures(_row(mma=False), 1)[0]
    assert S.failures(_row(mma=False, tensor_core_dot=False), 1) == []    # an fp32 "ieee" dot runs on the FMA units
    assert "< 2 assumed" in S.failures(_row(fit={"programs": 1, "by_regs": 1, "by_smem": 1, "by_warps": 8}), 2)[0]
    assert "does not compile" in S.failures({"error": "PTXASError: x"}, 1)[0]


def _launched_kernels() -> set[str]:
    """Every Triton kernel (a jit function that reads tl.program_id) defined in the kernel modules."""
    out = set()
    for mod in S.KERNEL_MODULES:
        m = importlib.import_module(mod)
        for name, obj in vars(m).items():
            fn = getattr(obj, "fn", None)
            if fn is not None and getattr(fn, "__module__", None) == mod and "tl.program_id" in inspect.getsource(fn):
                out.add(name)
    return out


@pytest.mark.slow
def test_shipped_launches_compile_clean():
    """Every launch a preset or the config table can make (kernels/static_check.py enumerate_launches), compiled for
    sm_90 and sm_80: no spill, MMA where tl.dot runs on tensor cores, the launcher's programs per SM. Also: every
    kernel defined in the kernel modules is among the compiled launches (a kernel no launcher reaches at a shipped
    shape would go unchecked). Compiles run in worker processes without TRITON_INTERPRET; analyses are cached by
    Triton's kernel hash in Triton's cache, so a second run only re-reads."""
    t0 = time.perf_counter()
    res = S.run(archs=("sm_90", "sm_80"), tuner=False, progress=False)
    print(f"static check: {len(res['rows'])} compiles of {res['launches']} launches, {time.perf_counter() - t0:.0f} s")
    assert not res["launch_errors"], res["launch_errors"]
    assert {r["kernel"] for r in res["rows"]} >= _launched_kernels()
    bad = [line for line in S.format_table(res).splitlines() if "FAIL" in line]
    assert res["ok"] and not bad, "shipped launches failing the static check:\n" + "\n".join(bad)


def _tuner():
    sys.path.insert(0, str(ROOT / "bench" / "gpu"))
    try:
        return importlib.import_module("tune_queue_topk")
    finally:
        sys.path.remove(str(ROOT / "bench" / "gpu"))


def test_tuner_drops_configs_failing_static_check(monkeypatch):
    """bench/gpu/tune_queue_topk.py's filter keeps exactly the configs whose static verdict is clean (stubbed here: one
    config spills), records each drop with its reason, and sees every config at the shape it is timed at."""
    tq = _tuner()
    seen = []

    def fake(specs, arch, workers):
        from maect.kernels.static_check import spec_key
        seen.extend(specs)
        return {spec_key(s): (["sm_90 _scan_kernel: spills 8 B stores / 8 B loads per thread"]
                              if s["config"].get("BLOCK_N") == 128 else []) for s in specs}

    monkeypatch.setattr(tq, "static_verdicts", fake)
    grid = tq.scan_grid("bf16", dry=False)
    out = {}
    kept = tq.static_filter({("bf16", 20): grid}, lambda key: (key[0], 2048, 65536, 256, key[1]), "sm_90", 1, out)
    assert kept[("bf16", 20)] == [g for g in grid if g["BLOCK_N"] != 128] and kept[("bf16", 20)]
    assert len(out["static_dropped"]) == sum(g["BLOCK_N"] == 128 for g in grid)
    assert all("spills" in d["failures"][0] and d["config"]["BLOCK_N"] == 128 for d in out["static_dropped"])
    assert {(s["B"], s["Q"], s["D"], s["k"]) for s in seen} == {(2048, 65536, 256, 20)}
    assert tq.static_filter({0: grid}, lambda _: ("bf16", 1, 1, 1, 1), None, 1, {}) == {0: grid}   # unknown arch


def test_cost_model_by_hand():
    """kernels/cost_model.py's formulas on a stub scan row, worked by hand (H100 figures: 132 SMs, 1.83 GHz, 4096
    bf16 FLOP/clk/SM, 3.35 TB/s): a 128 x 128 tile at D = 256 is 2 x 128 x 128 x 256 / 4096 = 2048 tensor cycles;
    100 non-MMA instructions x 8 warps / 4 schedulers = 200 issue cycles; one program per SM: they add (2248); 16 row
    blocks x 512 tiles over 132 SMs = 63 tiles per SM. The GEMM: 68.7 GFLOP at 989.4 TFLOP/s = 69.5 us against
    (2048 + 65536) x 256 x 2 + 2048 x 65536 x 2 bytes at 3.35 TB/s = 90.5 us: memory-bound."""
    from maect.kernels import cost_model as CM
    gpu = CM.GPUS["sm_90"]
    row = {"constexprs": {"BLOCK_B": 128, "BLOCK_N": 128, "BLOCK_D": 256, "M": 2}, "num_warps": 8,
           "loop": {"body": {"integer": 60, "compare_select": 40, "mma": 16}, "nested": {"integer": 999, "mma": 16}},
           "fit": {"programs": 1}, "spill_stores": 0, "spill_loads": 0}
    s = CM.scan_seconds(gpu, row, "bf16", 2048, 65536, 256)
    assert s["mma_cycles_per_tile"] == 2048 and s["issue_cycles_per_tile"] == 200 and not s["overlap"]
    assert s["t_compute_us"] == pytest.approx(63 * 2248 / 1.83e9 * 1e6)
    g = CM.gemm_seconds(gpu, "bf16", 2048, 65536, 256)
    assert g["t_mma_us"] == pytest.approx(2 * 2048 * 65536 * 256 / (4096 * 132 * 1.83e9) * 1e6)
    assert g["t_us"] == pytest.approx(((2048 + 65536) * 256 * 2 + 2048 * 65536 * 2) / 3.35e12 * 1e6)
    row2 = {**row, "fit": {"programs": 2}, "constexprs": {**row["constexprs"], "BLOCK_D": 64}}
    s2 = CM.scan_seconds(gpu, row2, "bf16", 2048, 65536, 256)   # nested D loop: 3 trips of 999 non-MMA instructions
    assert s2["non_mma_instr_per_warp_per_tile"] == 100 + 3 * 999 and s2["overlap"]
    assert s2["t_compute_us"] == pytest.approx(63 * max(2048, 3097 * 8 / 4) / 1.83e9 * 1e6)


def test_static_cli_rejects_unknown_arch(capsys):
    """--arch names only the architectures whose limits the check knows; anything else is a one-line error."""
    from maect.kernels import check
    assert check.main(["--static", "--arch", "sm_75"]) == 2
    assert "unknown --arch 'sm_75' (known: sm_90, sm_80)" in capsys.readouterr().err
