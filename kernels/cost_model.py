"""A static cost model of queue_topk's scan kernel against a bare GEMM of the same shape: a PREDICTION computed from
the static check's table (kernels/static_check.py), no GPU. docs/performance.md states the model and its sources.

Per SM, for the scan (query block BLOCK_B x queue tile BLOCK_N x feature depth D, `warps` warps per program):
    T_mma   = 2 BLOCK_B BLOCK_N D / R_tc                      tensor-core cycles per tile
    T_issue = I_tile x warps / 4                               issue cycles per tile: I_tile = the main loop's non-MMA
                                                               SASS instructions per warp (body + nested-loop trips),
                                                               4 schedulers issuing one warp-instruction per cycle
    T_tile  = max(T_mma, T_issue) when >= 2 programs fit on an SM (one program's epilogue overlaps the other's
              MMA), else T_mma + T_issue (the epilogue waits for its own tile's MMA)
    T_comp  = ceil(tiles / SMs) x T_tile / f                   tiles = ceil(B / BLOCK_B) x ceil(Q / BLOCK_N)
    T_mem   = max(HBM bytes / BW_hbm, L2 bytes / BW_l2)
        HBM: queue Q D e + queries B D e + ids 8 (B + Q) + keys written B NT M 4 (int32 packed value and position)
        L2:  the queue once per query row block ceil(B / BLOCK_B) Q D e + the same queries, ids and keys
    T_scan  = max(T_comp, T_mem)
The bare GEMM (q @ queueᵀ in the input dtype, as bench/queue_lookup.py's "matmul (floor)": bf16 on the tensor cores,
fp32 without TF32 on the FP32 units):
    T_gemm  = max(2 B Q D / (R x SMs x f), ((B + Q) D e + B Q e) / BW_hbm)       (its output is written once)
The prediction is T_scan / T_gemm (for fp32 also against the GEMM in TF32, the scan's own precision). What it leaves
out: latency (a loop that waits on memory or on spilled values runs slower than its issue count says), the select
kernel, launch overhead, tail effects below one tile per SM.
"""
from __future__ import annotations

import math

from .static_check import PREDICT_SHAPES

# Per-SM rates from NVIDIA's published figures (docs/performance.md cites them): FLOP per cycle per SM, dense.
GPUS = {
    "sm_90": dict(name="H100 SXM5", sms=132, clock_hz=1.83e9,     # 989.4 TFLOPS bf16 dense / (132 x 4096) = 1.83 GHz
                  flop_per_clk={"bf16": 4096, "tf32": 2048, "fp32": 256}, hbm_Bps=3.35e12,
                  l2_B_per_clk=5120, l2_note="assumed: A100's documented 5120 B/clk (none published for H100)"),
    "sm_80": dict(name="A100 SXM4 80GB", sms=108, clock_hz=1.41e9,  # 312 TFLOPS bf16 dense / (108 x 2048)
                  flop_per_clk={"bf16": 2048, "tf32": 1024, "fp32": 128}, hbm_Bps=2.039e12,
                  l2_B_per_clk=5120, l2_note="A100 whitepaper: 5120 B/clk"),
}
ISSUE_PER_CLK = 4      # warp schedulers per SM (sm_80, sm_90), one warp-instruction each per cycle


def _find(rows, arch, kernel, name):
    return next((r for r in rows if r["arch"] == arch and r["kernel"] == kernel and "error" not in r
                 and any(u.get("predict") == name for u in r["uses"])), None)


def gemm_seconds(gpu: dict, dt: str, B: int, Q: int, D: int, tf32: bool = False) -> dict:
    """The bare GEMM's time (fp32: on the FP32 units as the bench's floor, or with tf32=True on the tensor cores)."""
    e = 2 if dt == "bf16" else 4
    rate = gpu["flop_per_clk"]["bf16" if dt == "bf16" else ("tf32" if tf32 else "fp32")]
    t_mma = 2 * B * Q * D / (rate * gpu["sms"] * gpu["clock_hz"])
    t_hbm = ((B + Q) * D * e + B * Q * e) / gpu["hbm_Bps"]
    return {"t_mma_us": t_mma * 1e6, "t_hbm_us": t_hbm * 1e6, "t_us": max(t_mma, t_hbm) * 1e6}


def scan_seconds(gpu: dict, row: dict, dt: str, B: int, Q: int, D: int) -> dict:
    c, w = row["constexprs"], row["num_warps"]
    BB, BN, BD, M = c["BLOCK_B"], c["BLOCK_N"], c["BLOCK_D"], c["M"]
    e = 2 if dt == "bf16" else 4
    trips = max(0, math.ceil(D / BD) - 1)                     # the nested D loop (0 when the query block is resident)
    loop = row["loop"]
    instr = sum(v for k, v in loop["body"].items() if k != "mma") + \
        trips * sum(v for k, v in loop["nested"].items() if k != "mma")
    rate = gpu["flop_per_clk"]["bf16" if dt == "bf16" else "tf32"]
    t_mma = 2 * BB * BN * D / rate
    t_issue = instr * w / ISSUE_PER_CLK
    resident = row["fit"]["programs"]
    t_tile = max(t_mma, t_issue) if resident >= 2 else t_mma + t_issue
    rb, NT = math.ceil(B / BB), math.ceil(Q / BN)
    t_comp = math.ceil(rb * NT / gpu["sms"]) * t_tile / gpu["clock_hz"]
    keys = B * NT * M * 4      # int32 keys (kernels/ops/queue_topk.py: value bits with the tile position)
    hbm = Q * D * e + B * D * e + 8 * (B + Q) + keys
    l2 = rb * Q * D * e + B * D * e + 8 * (B + Q) + keys
    t_mem = max(hbm / gpu["hbm_Bps"], l2 / (gpu["l2_B_per_clk"] * gpu["clock_hz"]))
    return {"config": f"BLOCK_B={BB} BLOCK_N={BN} BLOCK_D={BD} M={M} warps={w}", "mma_cycles_per_tile": t_mma,
            "non_mma_instr_per_warp_per_tile": instr, "issue_cycles_per_tile": t_issue, "programs_per_sm": resident,
            "overlap": resident >= 2, "t_compute_us": t_comp * 1e6, "hbm_MB": hbm / 1e6, "l2_MB": l2 / 1e6,
            "t_mem_us": t_mem * 1e6, "t_us": max(t_comp, t_mem) * 1e6,
            "launches": resident >= 1, "spill_bytes": [row["spill_stores"], row["spill_loads"]]}


def predictions(rows: list[dict], archs) -> list[dict]:
    """One PREDICTION per (arch, shape of PREDICT_SHAPES): scan and GEMM times and their ratio."""
    out = []
    for arch in archs:
        gpu = GPUS[arch]
        for name, (dt, B, Q, D, k) in PREDICT_SHAPES.items():
            row = _find(rows, arch, "_scan_kernel", name)
            rec = {"arch": arch, "gpu": gpu["name"], "shape": name, "dtype": dt, "B": B, "Q": Q, "D": D, "k": k,
                   "gemm": gemm_seconds(gpu, dt, B, Q, D), "kind": "PREDICTION"}
            if row is None or not row["loop"].get("found"):
                rec["error"] = "no compiled scan kernel for this shape"
            else:
                rec["scan"] = scan_seconds(gpu, row, dt, B, Q, D)
                rec["predicted_scan_over_gemm"] = rec["scan"]["t_us"] / rec["gemm"]["t_us"]
                if dt == "fp32":   # the same GEMM in TF32 (torch with allow_tf32): the scan's own precision
                    rec["gemm_tf32"] = gemm_seconds(gpu, dt, B, Q, D, tf32=True)
                    rec["predicted_scan_over_gemm_tf32"] = rec["scan"]["t_us"] / rec["gemm_tf32"]["t_us"]
            out.append(rec)
    return out


def format_predictions(preds: list[dict]) -> str:
    lines = ["PREDICTION (static cost model, kernels/cost_model.py; not a measurement): scan / bare GEMM",
             f"{'gpu':<16} {'shape':<26} {'scan config':<44} {'MMA cyc':>8} {'issue cyc':>9} {'fit':>3} "
             f"{'scan us':>8} {'GEMM us':>8} {'PREDICTED x GEMM':>16} {'measured':>9}  note"]
    for p in preds:
        if "error" in p:
            lines.append(f"{p['gpu']:<16} {p['shape']:<26} {p['error']}")
            continue
        s = p["scan"]
        note = [] if s["launches"] else ["does not launch (fit 0): as if 1 program"]
        if any(s["spill_bytes"]):
            note.append("spills {} / {} B per thread (stores / loads): latency not modelled".format(*s["spill_bytes"]))
        if "predicted_scan_over_gemm_tf32" in p:
            note.append(f"GEMM fp32 without TF32 (the bench's floor); vs a TF32 GEMM "
                        f"({p['gemm_tf32']['t_us']:.1f} us): {p['predicted_scan_over_gemm_tf32']:.2f}")
        meas = f"{p['measured_scan_over_gemm']:.2f}" if p.get("measured_scan_over_gemm") else "-"
        lines.append(f"{p['gpu']:<16} {p['shape']:<26} {s['config']:<44} {s['mma_cycles_per_tile']:>8.0f} "
                     f"{s['issue_cycles_per_tile']:>9.0f} {s['programs_per_sm']:>3} {s['t_us']:>8.1f} "
                     f"{p['gemm']['t_us']:>8.1f} {p['predicted_scan_over_gemm']:>16.2f} {meas:>9}  {'; '.join(note)}")
    return "\n".join(lines)


def measure_into(preds: list[dict]) -> None:
    """--device cuda: time the scan kernel and the bare GEMM at each predicted shape on this GPU (CUDA events after an
    L2 flush, medians; bench/common.py's method) and put the measured ratio beside the prediction."""
    import importlib

    import torch
    import torch.nn.functional as F

    from .dispatch import call_ms
    qt = importlib.import_module("maect.kernels.ops.queue_topk")
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    flush = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=dev)

    def median_ms(fn, reps=20):
        fn()
        ts = []
        for _ in range(reps):
            flush.zero_()
            ts.append(call_ms(fn, dev))
        return sorted(ts)[len(ts) // 2]

    for p in preds:
        if "error" in p:
            continue
        dt = torch.bfloat16 if p["dtype"] == "bf16" else torch.float32
        g = torch.Generator(device=dev).manual_seed(0)
        q = F.normalize(torch.randn(p["B"], p["D"], device=dev, generator=g), dim=1).to(dt)
        e = F.normalize(torch.randn(p["Q"], p["D"], device=dev, generator=g), dim=1).to(dt)
        ids = torch.randint(0, 1 << 30, (p["B"],), device=dev, generator=g)
        qids = torch.randint(0, 1 << 30, (p["Q"],), device=dev, generator=g)
        cfg = qt.pick_config(dt, p["B"], p["Q"], p["k"])
        try:
            plan = qt.TopkPlan(q, e, p["k"], ids, qids, True, cfg)
            scan_ms = median_ms(plan.scan)
            gemm_ms = median_ms(lambda: q @ e.T)
            p.update(measured_on=name, measured_scan_ms=scan_ms, measured_gemm_ms=gemm_ms,
                     measured_scan_over_gemm=scan_ms / gemm_ms)
        except Exception as ex:   # e.g. a config that does not launch: the measurement says so
            p["measured_error"] = f"{type(ex).__name__}: {ex}"[:200]
