"""python -m maect.kernels.check --static: every Triton kernel the project ships, compiled for Hopper / Ampere on any
machine (no GPU), and read: registers, spills, shared memory, occupancy against the launcher's assumption, tensor-core
MMA, the main loop's SASS instruction mix; and a static cost model of the queue scan against a bare GEMM.

    python -m maect.kernels.check --static                              # sm_90 and sm_80, shipped + tuner configs
    python -m maect.kernels.check --static --arch sm_90 --json bench/results/static_check.json
    python -m maect.kernels.check --static --predict                    # + the cost model's scan / GEMM ratios
    python -m maect.kernels.check --static --predict --device cuda      # + the measured ratios beside them (a GPU)

What is compiled: the launches themselves. Every launcher (queue_topk_triton, masked_patch_embed_triton and the
masking ops) is called on meta tensors (no memory, no GPU) with the kernels' launch method replaced by a recorder, at
the shapes of every preset (_preset_cases(): the head / CT lookups, the final k-NN chunk, the MAE masking
ops), at every (dtype, k, B, Q) shape class queue_topk's config table can pick from, at the integrations' k = 1
search on rows normalised inside the op (maect/integrations: lightly's NNMemoryBankModule), and at every config of
the tuner's search space (kernels/ops/queue_topk.py tune_grid). Each distinct launch (kernel, argument specialisation,
constexprs, warps, stages) is then compiled with triton.compile for each architecture, exactly as Triton's launcher
would specialise it (its own binder: pointer alignment, unit strides), in worker processes with TRITON_INTERPRET
unset (the kernel modules pick their GPU or interpreter helpers when imported). Triton's bundled tools read the
result: ptxas -v on the PTX (same flags as Triton's own ptxas call) for registers and spill bytes,
cuobjdump -res-usage / -sass on the cubin for static shared memory and the SASS. Analyses are cached by Triton's
compiled-kernel hash under <MAECT_CACHE_DIR>/static (Triton's own cache holds the compiled kernels).

A launch is "shipped" when a preset or the config table (defaults, kernels/ops/queue_topk_configs.json) can pick it; the
tuner's other configs are listed (the tuner drops those that fail) but do not fail the check. Failures of a shipped
launch: spill bytes > 0; a kernel that calls tl.dot with tensor-core inputs (bf16 / fp16, fp32 as tf32) and has no MMA
instruction (HGMMA on sm_90, HMMA on sm_80); programs per SM below the launcher's assumption (queue_topk's scan:
the config's per_sm; every other kernel: 1, i.e. it must launch at all).

Architecture figures (CUDA C++ Programming Guide, "Technical Specifications per Compute Capability"; the Hopper and
Ampere tuning guides): 64 K 32-bit registers per SM, at most 255 per thread, allocated per warp in units of 256;
at most 64 resident warps and 32 resident blocks per SM; shared memory per SM 228 KiB (sm_90) / 164 KiB (sm_80), at
most 227 KiB / 163 KiB per block, and 1 KiB per resident block reserved by the system.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import importlib
import io
import json
import math
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ARCHS = {
    "sm_90": dict(capability=90, ptxas_arch="sm_90a", regs_per_sm=65536, smem_per_sm=228 * 1024,
                  smem_per_block=227 * 1024, smem_reserved=1024, max_warps=64, max_blocks=32, mma=("HGMMA", "HMMA")),
    "sm_80": dict(capability=80, ptxas_arch="sm_80", regs_per_sm=65536, smem_per_sm=164 * 1024,
                  smem_per_block=163 * 1024, smem_reserved=1024, max_warps=64, max_blocks=32, mma=("HMMA",)),
}
KERNEL_MODULES = ("maect.kernels.ops.queue_topk", "maect.kernels.ops.masked_patch_embed",
                  "maect.kernels.ops.random_masking", "maect.kernels.ops.unshuffle")
PREDICT_SHAPES = {   # name: (dtype, B, Q, D, k); the headline and the variations the cost model is quoted at
    "headline bf16 B2048 k20": ("bf16", 2048, 65536, 256, 20),
    "bf16 B2048 k1": ("bf16", 2048, 65536, 256, 1),
    "bf16 B2048 k64": ("bf16", 2048, 65536, 256, 64),
    "fp32 B2048 k20": ("fp32", 2048, 65536, 256, 20),
    "bf16 B256 k20": ("bf16", 256, 65536, 256, 20),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------------ recording launches
def _jit_kernels() -> dict:
    """{qualified name: JITFunction} of every module-level Triton function in the kernel modules (GPU mode only)."""
    from triton.runtime.jit import JITFunction
    out = {}
    for mod in KERNEL_MODULES:
        m = importlib.import_module(mod)
        for name, obj in vars(m).items():
            if isinstance(obj, JITFunction) and obj.__module__ == mod:    # defined there, not imported
                out[f"{mod}.{name}"] = obj
    return out


@contextlib.contextmanager
def recording(sink: list, context: dict):
    """Within: a launch of any kernel appends (qualified name, args, launch kwargs, dict(context)) to sink instead of
    running. context is read at launch time (callers update it to label what they launch)."""
    kernels = _jit_kernels()

    def recorder(name):
        def run(*args, grid, warmup, **kwargs):
            sink.append((name, args, kwargs, dict(context)))
        return run

    for name, fn in kernels.items():
        fn.run = recorder(name)
    try:
        yield
    finally:
        for fn in kernels.values():
            del fn.run


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device="meta", dtype=dtype)


def _topk_launch(qt, dt: str, B: int, Q: int, D: int, k: int, ids: bool, config: dict | None = None) -> None:
    q, e = _meta(B, D, dtype=DTYPES[dt]), _meta(Q, D, dtype=DTYPES[dt])
    ex, qid = (_meta(B, dtype=torch.int64), _meta(Q, dtype=torch.int64)) if ids else (None, None)
    qt.queue_topk_triton(q, e, k, ex, qid, True, config=config)


def _masking_launches(dims: dict, N: int, ratio: float, ctx: dict) -> None:
    """The MAE ops' forward and backward launches at one preset's shapes, as training on CUDA runs them (bf16
    autocast: the patch-embedding GEMM in bf16 from fp32 images, fp32 position table; token tensors in bf16 and
    fp32)."""
    from maect.kernels.ops import decoder_input as DI, masked_patch_embed as ME, random_masking as RM, unshuffle as US
    L, Dm, Dd, p, C, img = dims["L"], dims["D"], dims["Ddec"], dims["patch"], dims["chans"], dims["img"]
    K = int(L * (1 - ratio))
    noise = _meta(N, L, dtype=torch.float32)
    gemm = [("bf16 autocast, fp32 images", torch.float32, torch.bfloat16),
            ("bf16 images", torch.bfloat16, torch.bfloat16), ("fp16 autocast, fp32 images", torch.float32,
                                                               torch.float16),
            ("fp32", torch.float32, torch.float32)]
    real_gemm_dtype = ME.gemm_dtype
    try:
        for label, img_dt, mm in gemm:
            ctx["variant"] = label
            ME.gemm_dtype = lambda imgs, weight, mm=mm: mm     # what CUDA autocast would pick (meta has none)
            ME.masked_patch_embed_triton(_meta(N, C, img, img, dtype=img_dt), _meta(Dm, C, p, p, dtype=mm),
                                         _meta(Dm, dtype=mm), _meta(1, L, Dm, dtype=torch.float32), ratio, noise)
    finally:
        ME.gemm_dtype = real_gemm_dtype
    for dt in (torch.bfloat16, torch.float32):
        ctx["variant"] = str(dt).replace("torch.", "")
        x = _meta(N, L, Dm, dtype=dt).requires_grad_()
        xv, _, ids_restore = RM.random_masking_triton(x, ratio, noise)
        xv.sum().backward()
        ids_restore = _meta(N, L, dtype=torch.int64)
        tok = _meta(1, 1, Dd, dtype=dt).requires_grad_()
        xd = _meta(N, 1 + K, Dd, dtype=dt).requires_grad_()
        DI.decoder_input_triton(xd, tok, ids_restore, _meta(1, 1 + L, Dd, dtype=torch.float32), True).sum().backward()
        xu = _meta(N, K, Dd, dtype=dt).requires_grad_()
        US.unshuffle_triton(xu, tok, ids_restore).sum().backward()


def _presets() -> list[str]:
    from maect import config as cfgmod
    d = Path(cfgmod.__file__).with_name("presets")
    return sorted(p.stem for p in d.glob("*.yaml"))


def tuner_space(B: int = 2048, Q: int = 65536, D: int = 256, ks=(1, 20, 64), dtypes=("bf16", "fp32")) -> list[dict]:
    """bench/gpu/tune_queue_topk.py's search space at its headline shape: [{dtype, B, Q, D, k, config}] with config the
    fields that replace the (dtype, k bucket) default (kernels/ops/queue_topk.py tune_grid)."""
    qt = importlib.import_module("maect.kernels.ops.queue_topk")
    return [dict(dtype=dt, B=B, Q=Q, D=D, k=k, config=g) for dt in dtypes for k in ks for g in qt.tune_grid(dt)]


def spec_key(spec: dict) -> str:
    return json.dumps([spec["dtype"], spec["B"], spec["Q"], spec["D"], spec["k"], spec["config"]], sort_keys=True)


def _shape(spec: dict) -> str:
    return f"{spec['dtype']} B={spec['B']} Q={spec['Q']} D={spec['D']} k={spec['k']}"


def _model_dims(cfg) -> dict:
    """The preset's model sizes the Triton launches depend on (patches, widths, image size, channels)."""
    from maect.models.vit import ARCHS
    m = cfg.model
    base = ARCHS.get(m.arch, (m.img_size, m.patch_size, m.embed_dim, m.depth, m.num_heads, m.decoder_embed_dim,
                              m.decoder_depth, m.decoder_num_heads))
    patch = m.patch_size or base[1]
    return {"L": (m.img_size // patch) ** 2, "patch": patch, "img": m.img_size, "D": m.embed_dim or base[2],
            "Ddec": m.decoder_embed_dim or base[5], "chans": m.in_chans}


def _preset_cases(cfg, dims: dict) -> list[dict]:
    """The Triton launches a preset's run makes on one GPU: the head / CT queue lookups (both views, the queue's
    dtype), the final k-NN's chunk (maect.eval.knn) and the MAE masking batch."""
    from maect.eval.knn import chunk_rows
    from maect.heads import queue_dtype
    from .check import IMAGENET, SIZES
    qdt = queue_dtype(cfg.nnclr.queue_dtype, torch.device("cuda"))
    Q, Dp, out, ks = cfg.nnclr.queue_size, cfg.nnclr.proj_dim, [], {}
    for stage in ("head", "ct"):
        ks.setdefault(getattr(cfg, stage).topk, []).append(stage)
    for k, stages in ks.items():
        B = 2 * max(1, getattr(cfg, stages[-1]).batch_size)
        out.append({"op": "queue_topk", "label": f"{'+'.join(stages)} lookup", "args": ("lookup", B, Q, Dp, k, qdt)})
    n_train = cfg.eval.final_train or SIZES.get(cfg.data.name, IMAGENET)[0]
    chunk = chunk_rows(n_train)
    out.append({"op": "queue_topk", "label": "final k-NN chunk",
                "args": ("knn", chunk, n_train, dims["D"], cfg.eval.knn_k, torch.float32)})
    out.append({"op": "masked_patch_embed", "label": "MAE",
                "args": (max(1, cfg.mae.batch_size * cfg.mae.num_views), dims, cfg.mae.mask_ratio)})
    return out


def enumerate_launches(presets: list[str] | None = None, tuner=True, predict: bool = False,
                       shipped: bool = True) -> tuple[list, list]:
    """Every launch the launchers make at the shipped shapes / configs (and the tuner's space, the model's shapes):
    ([(qualified kernel name, args, kwargs, context)], [launcher errors]). tuner: True (tuner_space()), False, or a
    list of tuner_space()-style specs; shipped False: neither the presets nor the config table. Must run with
    TRITON_INTERPRET unset."""
    from maect.validation import load_config
    qt = importlib.import_module("maect.kernels.ops.queue_topk")
    sink, ctx, errors = [], {}, []
    with recording(sink, ctx):
        for name in (presets or _presets()) if shipped else ():
            cfg = load_config([f"preset={name}"])
            dims = _model_dims(cfg)
            for case in _preset_cases(cfg, dims):
                ctx.clear()
                ctx.update(source="preset", shipped=True, preset=name, op=case["op"], label=case["label"])
                if case["op"] == "queue_topk":
                    kind, B, Q, D, k, dt = case["args"]
                    dt = "fp32" if dt == torch.float32 else "bf16"
                    ctx.update(shape=f"{dt} B={B} Q={Q} D={D} k={k}",
                               per_sm=qt.pick_config(DTYPES[dt], B, Q, k)["per_sm"])
                    _topk_launch(qt, dt, B, Q, D, k, kind == "lookup")
                elif case["op"] == "masked_patch_embed":   # the masking ops' launches come with it, once per preset
                    N = case["args"][0]
                    ctx.update(shape=f"N={N} L={dims['L']} D={dims['D']} Ddec={dims['Ddec']}")
                    _masking_launches(dims, N, cfg.mae.mask_ratio, ctx)
        for dt in ("bf16", "fp32") if shipped else ():    # every config the table can pick: each class at D = 256
            for k in (1, 20, 64):
                for B in qt.B_BUCKETS:
                    for Q in qt.Q_BUCKETS:
                        ctx.clear()
                        ctx.update(source="config table", shipped=True, shape=f"{dt} B={B} Q={Q} D=256 k={k}",
                                   per_sm=qt.pick_config(DTYPES[dt], B, Q, k)["per_sm"])
                        _topk_launch(qt, dt, B, Q, 256, k, True)
        for dt in ("bf16", "fp32") if shipped else ():    # the lightly / NNCLR swap-ins (maect/integrations):
            for d in (128, 256):                             # k = 1 on rows normalised inside (normalized=False)
                for Q in qt.Q_BUCKETS:
                    ctx.clear()
                    per_sm = qt.pick_config(DTYPES[dt], 256, Q, 1)["per_sm"]
                    ctx.update(source="integration", shipped=True, per_sm=per_sm,
                               shape=f"{dt} B=256 Q={Q} D={d} k=1 normalized=False")
                    qt.queue_topk_triton(_meta(256, d, dtype=DTYPES[dt]), _meta(Q, d, dtype=DTYPES[dt]), 1,
                                         normalized=False)
        for spec in (tuner_space() if tuner is True else tuner or []):
            cfg = {**qt.DEFAULT_CONFIGS[(spec["dtype"], 32 if spec["k"] <= 32 else 128)], **spec["config"]}
            ctx.clear()
            ctx.update(source="tuner", shipped=False, shape=_shape(spec), per_sm=cfg["per_sm"],
                       tuner_key=spec_key(spec))
            try:
                _topk_launch(qt, spec["dtype"], spec["B"], spec["Q"], spec["D"], spec["k"], True, cfg)
            except Exception as ex:   # the launcher refuses the config (e.g. too many stored keys): a finding
                errors.append({**ctx, "error": f"{type(ex).__name__}: {ex}"[:300]})
        if predict:
            for name, (dt, B, Q, D, k) in PREDICT_SHAPES.items():
                ctx.clear()
                ctx.update(source="predict", shipped=True, predict=name, shape=f"{dt} B={B} Q={Q} D={D} k={k}",
                           per_sm=qt.pick_config(DTYPES[dt], B, Q, k)["per_sm"])
                _topk_launch(qt, dt, B, Q, D, k, True)
    return sink, errors


def _describe(a):
    """A picklable stand-in for a launch argument (tensors -> dtype; Triton specialises on dtype and alignment, and
    every tensor here is a fresh allocation or a row slice of one, as at run time)."""
    if isinstance(a, torch.Tensor):
        return ("tensor", str(a.dtype).replace("torch.", ""), a.storage_offset() * a.element_size() % 16 == 0)
    return a


def _undescribe(a):
    if isinstance(a, tuple) and a and a[0] == "tensor":
        t = torch.empty(64, device="meta", dtype=getattr(torch, a[1]))
        return t if a[2] else t[1:]
    return a


def _bind(fn, args, kwargs, capability: int):
    """Triton's own specialisation of a launch for a GPU target: (signature, constexprs, attrs, options)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(GPUTarget("cuda", capability, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kw = {"debug": False, **kwargs}
    bound, spec, opts = binder(*args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
    return signature, constexprs, attrs, options, spec


def _launch_key(name, args, kwargs) -> str:
    fn = _jit_kernels()[name]
    _, constexprs, attrs, _, spec = _bind(fn, [_undescribe(a) for a in args], kwargs, 90)
    return json.dumps([name, [str(s) for s in spec], sorted((k, str(v)) for k, v in kwargs.items())])


def _enumerate_job(presets, tuner, predict, shipped=True) -> tuple[list, list]:
    """Worker: the distinct launches, with every context that makes each."""
    _gpu_mode()
    launches = {}
    sink, errors = enumerate_launches(presets, tuner, predict, shipped)
    for name, args, kwargs, ctx in sink:
        d_args = [_describe(a) for a in args]
        key = _launch_key(name, d_args, kwargs)
        rec = launches.setdefault(key, {"kernel": name, "args": d_args, "kwargs": kwargs, "uses": []})
        rec["uses"].append(ctx)
    return list(launches.values()), errors


def _gpu_mode():
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("static_check: the workers must start with TRITON_INTERPRET unset")


# ------------------------------------------------------------------------------------------------ compile + read
def _tool(name: str) -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


_PTXAS_RE = dict(
    regs=re.compile(r"Used (\d+) registers"),
    stack=re.compile(r"(\d+) bytes stack frame"),
    spill_stores=re.compile(r"(\d+) bytes spill stores"),
    spill_loads=re.compile(r"(\d+) bytes spill loads"),
)


def ptxas_info(ptx: str, ptxas_arch: str, log: str | None = None) -> dict:
    """registers, stack frame and spill bytes per thread, from ptxas -v: the log of Triton's own ptxas call when it
    was captured, else ptxas run again on the PTX with the flags Triton's call uses."""
    if not log or "Used" not in log:
        with tempfile.TemporaryDirectory() as d:
            src = Path(d, "k.ptx")
            src.write_text(ptx)
            log = subprocess.run([_tool("ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2",
                                  f"--gpu-name={ptxas_arch}", str(src), "-o", str(Path(d, "k.cubin"))],
                                 capture_output=True, text=True, check=True).stderr
    out = {}
    for k, rx in _PTXAS_RE.items():
        m = rx.search(log)
        out[k] = int(m.group(1)) if m else 0
    return out


def cubin_info(cubin: bytes) -> tuple[dict, str]:
    """({static shared bytes, ...} from cuobjdump -res-usage, SASS text from cuobjdump -sass)."""
    with tempfile.TemporaryDirectory() as d:
        f = Path(d, "k.cubin")
        f.write_bytes(cubin)
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", str(f)], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(f)], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    return {"res_regs": int(m.group(1)), "static_shared": int(m.group(3)), "local": int(m.group(4))}, sass


# SASS opcode classes (the base opcode before the first '.'; uniform-datapath U* ops join their class)
MMA_OPS = {"HGMMA", "HMMA", "IMMA", "DMMA", "BMMA", "QGMMA", "IGMMA"}
MEM_OPS = {"LDG", "STG", "LDS", "STS", "LDSM", "STSM", "LD", "ST", "LDGSTS", "LDGDEPBAR", "ATOM", "ATOMS", "ATOMG",
           "RED", "UBLKCP", "UTMALDG", "UTMASTG", "UTMAPF", "SYNCS", "LDC", "ULDC", "CCTL", "MEMBAR", "FENCE"}
LOCAL_OPS = {"LDL", "STL"}
INT_OPS = {"IMAD", "IADD3", "IADD", "LEA", "LOP3", "LOP", "SHF", "SHL", "SHR", "IMUL", "IABS", "IMNMX", "VIMNMX",
           "VIADD", "VIADDMNMX", "POPC", "FLO", "BREV", "PRMT", "SGXT", "BMSK", "IDP", "IDP4A", "IMUL32I", "IADD32I",
           "LOP32I", "ISCADD", "BFE", "BFI", "I2I", "I2IP"}
CMP_OPS = {"ISETP", "FSETP", "DSETP", "HSETP2", "SEL", "FSEL", "PLOP3", "P2R", "R2P", "FMNMX", "HMNMX2", "CSET",
           "CSETP", "VOTE", "VOTEU", "PSETP"}
FLOAT_OPS = {"FADD", "FMUL", "FFMA", "MUFU", "F2F", "I2F", "F2I", "FRND", "FCHK", "HADD2", "HMUL2", "HFMA2", "DADD",
             "DMUL", "DFMA", "F2FP", "FSWZADD", "FADD32I", "FMUL32I", "FFMA32I", "I2FP", "F2IP"}
MOVE_OPS = {"MOV", "MOV32I", "SHFL", "S2R", "S2UR", "CS2R", "R2UR", "UMOV", "REDUX"}


def op_class(op: str) -> str:
    base = op.split(".")[0]
    if op.startswith("IMAD.MOV"):
        return "move"
    for cls, ops in (("mma", MMA_OPS), ("local", LOCAL_OPS), ("memory", MEM_OPS), ("integer", INT_OPS),
                     ("compare_select", CMP_OPS), ("float", FLOAT_OPS), ("move", MOVE_OPS)):
        if base in ops or (base.startswith("U") and base[1:] in ops):
            return cls
    return "control"   # branches, barriers, WARPGROUP.*, NOP, ...


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")


def parse_sass(sass: str) -> list[tuple[int, str, str]]:
    """[(address, opcode, operands)] of the first function in the listing."""
    out = []
    for m in _SASS_LINE.finditer(sass):
        out.append((int(m.group(1), 16), m.group(3), m.group(4).strip()))
    return out


def loops(instrs: list) -> list[tuple[int, int]]:
    """Loops as (first, last) addresses: the target and the source of each backward branch (BRA to a lower
    address; the trailing self-branch padding excluded)."""
    out = []
    for addr, op, rest in instrs:
        if op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", rest)
            if m and int(m.group(1), 16) < addr:
                out.append((int(m.group(1), 16), addr))
    return out


def main_loop_mix(instrs: list) -> dict:
    """The main loop (the outermost loop that holds an MMA; without MMA, the loop with the most instructions) and its
    instruction mix: counts per class of its body outside nested loops ("body") and of the nested loops ("nested",
    one trip of each). Static counts: every instruction once, predicated or not."""
    lp = loops(instrs)
    with_mma = [(a, b) for a, b in lp if any(a <= x <= b and op_class(op) == "mma" for x, op, _ in instrs)]
    cand = with_mma or lp
    if not cand:
        return {"found": False}
    size = lambda r: sum(1 for x, _, _ in instrs if r[0] <= x <= r[1])  # noqa: E731
    main = max(cand, key=lambda r: (r[1] - r[0], size(r)))
    nested = [r for r in lp if r != main and main[0] <= r[0] and r[1] <= main[1]]
    outer_nested = [r for r in nested if not any(o != r and o[0] <= r[0] and r[1] <= o[1] for o in nested)]
    body, inner = {}, {}
    for x, op, _ in instrs:
        if not main[0] <= x <= main[1]:
            continue
        tgt = inner if any(a <= x <= b for a, b in outer_nested) else body
        c = op_class(op)
        tgt[c] = tgt.get(c, 0) + 1
    return {"found": True, "range": [hex(main[0]), hex(main[1])], "nested_loops": len(outer_nested),
            "body": body, "nested": inner}


def tile_elements(kernel: str, constexprs: dict) -> int | None:
    """Output elements one trip of the main loop produces / updates (the scan: a BLOCK_B x BLOCK_N similarity tile;
    the patch-embedding GEMM: a BLOCK_M x BLOCK_N accumulator per K step); None where no tile applies."""
    c = constexprs
    if kernel.endswith("_scan_kernel"):
        return c["BLOCK_B"] * c["BLOCK_N"]
    if kernel.endswith("_masked_embed_fwd_kernel"):
        return c["BLOCK_M"] * c["BLOCK_N"]
    return None


def fit(arch: dict, regs: int, warps: int, smem: int) -> dict:
    """Programs per SM that fit by registers and by shared memory (and by the warp / block limits)."""
    regs_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = arch["regs_per_sm"] // (regs_warp * warps)
    by_smem = 0 if smem > arch["smem_per_block"] else arch["smem_per_sm"] // (smem + arch["smem_reserved"])
    by_warps = min(arch["max_warps"] // warps, arch["max_blocks"])
    return {"by_regs": by_regs, "by_smem": by_smem, "by_warps": by_warps, "programs": min(by_regs, by_smem, by_warps)}


def _uses_dot(fn) -> bool:
    return "tl.dot(" in fn.src


def _tensor_core_dot(kernel: str, constexprs: dict, signature: dict) -> bool:
    """Whether this launch's tl.dot should run on tensor cores: 16-bit inputs, or fp32 inputs as tf32 / 3xtf32
    (an "ieee" fp32 dot or the fp64 one runs on the FMA units)."""
    prec = constexprs.get("PRECISION", constexprs.get("PREC", "tf32"))
    if constexprs.get("ACC64"):
        return False
    return prec != "ieee" or any(v in ("*bf16", "*fp16") for v in signature.values())


def cache_dir() -> Path:
    """Where the analyses live: beside the compiled kernels they describe, in Triton's cache (TRITON_CACHE_DIR),
    keyed by Triton's hash of the compiled kernel (source, specialisation, options, target)."""
    from triton import knobs
    return Path(knobs.cache.dir) / "maect_static"


def _compile_job(job: dict) -> dict:
    """Worker: compile one launch for one architecture and read it (cached by Triton's compiled-kernel hash)."""
    _gpu_mode()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    arch = ARCHS[job["arch"]]
    fn = _jit_kernels()[job["kernel"]]
    t0 = time.perf_counter()
    out = {"kernel": job["kernel"].rsplit(".", 1)[1], "module": job["kernel"].rsplit(".", 1)[0], "arch": job["arch"]}
    try:
        signature, constexprs, attrs, options, _ = _bind(fn, [_undescribe(a) for a in job["args"]], job["kwargs"],
                                                         arch["capability"])
        names = [p.name for p in fn.params]
        named = {names[p[0]]: v for p, v in constexprs.items()}
        out["constexprs"] = {k: v for k, v in named.items() if not k.startswith("stride")}
        out["specialised"] = {k: v for k, v in named.items() if k.startswith("stride")}
        out["num_warps"], out["num_stages"] = options.num_warps, options.num_stages
        out["dtypes"] = ",".join(v[1:] for k, v in signature.items() if v.startswith("*") and v not in ("*i64", "*i32")
                                 and not k.startswith(("ex", "qid", "keep", "ids", "scratch", "bag", "keys", "out_i")))
        from triton import knobs
        log = io.StringIO()
        with knobs.nvidia.scope(), contextlib.redirect_stdout(log):   # Triton prints its ptxas -v log (cold compile)
            knobs.nvidia.dump_ptxas_log = True
            ck = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                target=GPUTarget("cuda", arch["capability"], 32), options=options.__dict__)
        f = cache_dir() / f"{ck.hash}_{job['arch']}.json"
        if f.exists():
            info = json.loads(f.read_text())
        else:
            info = ptxas_info(ck.asm["ptx"], arch["ptxas_arch"], log.getvalue())
            res, sass = cubin_info(ck.asm["cubin"])
            instrs = parse_sass(sass)
            ops = {}
            for _, op, _ in instrs:
                ops[op_class(op)] = ops.get(op_class(op), 0) + 1
            mma_ops = sorted({op.split(".")[0] for _, op, _ in instrs if op_class(op) == "mma"})
            info.update(res, dynamic_shared=ck.metadata.shared, sass_instructions=len(instrs), sass_mix=ops,
                        mma_ops=mma_ops, loop=main_loop_mix(instrs))
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_suffix(".tmp%d" % os.getpid())
            tmp.write_text(json.dumps(info))
            os.replace(tmp, f)
        out.update(info)
        out["shared"] = info["dynamic_shared"] + info["static_shared"]
        out["fit"] = fit(arch, info["regs"], out["num_warps"], out["shared"])
        out["dot"] = _uses_dot(fn)
        out["tensor_core_dot"] = out["dot"] and _tensor_core_dot(job["kernel"], named, signature)
        out["mma"] = bool(set(info["mma_ops"]) & set(arch["mma"]))
        n = tile_elements(job["kernel"], named)
        if n and info["loop"].get("found"):
            out["tile_elements"] = n
            out["loop_per_tile_element"] = {c: round(v * out["num_warps"] / n, 4)
                                            for c, v in info["loop"]["body"].items()}
        out["hash"] = ck.hash
    except Exception as ex:   # a launch that does not compile is a finding, not a crash of the check
        out["error"] = f"{type(ex).__name__}: {ex}"[:500]
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def failures(row: dict, assumed: int) -> list[str]:
    """Why a launch fails the check (empty: clean)."""
    if "error" in row:
        return [f"does not compile: {row['error'][:160]}"]
    bad = []
    if row["spill_stores"] or row["spill_loads"]:
        bad.append(f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads per thread")
    if row["tensor_core_dot"] and not row["mma"]:
        bad.append(f"tl.dot without tensor-core MMA ({'/'.join(ARCHS[row['arch']]['mma'])})")
    if row["fit"]["programs"] < assumed:
        f = row["fit"]
        bad.append(f"{f['programs']} program(s) per SM fit (registers {f['by_regs']}, shared memory {f['by_smem']}) "
                   f"< {assumed} assumed by the launcher")
    return bad


# ------------------------------------------------------------------------------------------------ the run
@contextlib.contextmanager
def _worker_env():
    """Worker processes spawned inside start with TRITON_INTERPRET unset and without re-running the caller's __main__
    (a script such as bench/gpu/tune_queue_topk.py sets TRITON_INTERPRET when imported; the workers' functions live in
    this module). The caller's environment and __main__ are restored on exit (spawned children copy them at start,
    and ProcessPoolExecutor starts them at submit, inside)."""
    main = sys.modules["__main__"]
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    old = os.environ.pop("TRITON_INTERPRET", None)
    main.__spec__ = None
    main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        main.__dict__.update(saved)
        if "__spec__" not in saved:
            del main.__spec__
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old


def run(archs=("sm_90", "sm_80"), presets=None, tuner=True, predict=False, workers=None, progress=True,
        shipped=True) -> dict:
    """Enumerate, compile and read every launch; returns {"rows": [...], "ok": bool (no shipped launch fails),
    "tuner_verdicts": {spec_key: [failures]}, ...}. presets: names (default all); tuner: True (tuner_space()),
    False or a list of specs; shipped False: only the tuner's launches (bench/gpu/tune_queue_topk.py)."""
    for a in archs:
        if a not in ARCHS:
            raise SystemExit(f"maect.kernels.check --static: unknown --arch {a!r} (known: {', '.join(ARCHS)})")
    t0 = time.perf_counter()
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    with _worker_env():
        with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as p:   # imports in GPU mode
            launches, errors = p.submit(_enumerate_job, presets, tuner, predict, shipped).result()
        t_enum = time.perf_counter() - t0
        jobs = [{"arch": a, "kernel": r["kernel"], "args": r["args"], "kwargs": r["kwargs"], "i": i}
                for i, r in enumerate(launches) for a in archs]
        rows = [None] * len(jobs)
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futs = {pool.submit(_compile_job, j): n for n, j in enumerate(jobs)}
            for done, fut in enumerate(cf.as_completed(futs), 1):
                n = futs[fut]
                rows[n] = {**fut.result(), "uses": launches[jobs[n]["i"]]["uses"]}
                if progress and (done % 10 == 0 or done == len(jobs)):
                    print(f"static check: {done}/{len(jobs)} compiled and read, {time.perf_counter() - t0:.0f} s",
                          file=sys.stderr, flush=True)
    ok = True
    for r in rows:
        uses = r["uses"]
        r["shipped"] = any(u.get("shipped") for u in uses)
        r["assumed_per_sm"] = max([u.get("per_sm", 1) for u in uses if r["kernel"] == "_scan_kernel"] or [1])
        r["failures"] = failures(r, r["assumed_per_sm"])
        r["clean"] = not r["failures"]
        ok &= r["clean"] or not r["shipped"]
    import triton
    res = {"triton": triton.__version__, "torch": torch.__version__, "archs": list(archs), "rows": rows, "ok": ok,
           "launches": len(launches), "launch_errors": errors, "seconds": round(time.perf_counter() - t0, 1),
           "enumerate_seconds": round(t_enum, 1), "workers": workers}
    res["tuner_verdicts"] = tuner_verdicts(res)
    if predict:
        from . import cost_model
        res["predictions"] = cost_model.predictions(rows, archs)
    for r in rows:   # the contexts, as short labels
        r["used_by"] = sorted({_use_label(u) for u in r.pop("uses")})
    return res


def tuner_verdicts(res: dict) -> dict:
    """{spec_key: [failures]} for every tuner spec the run enumerated: empty list = every launch it makes (scan and
    select, each architecture) compiles clean; a launcher error or a failing launch lists why."""
    out = {}
    for e in res.get("launch_errors", []):
        if e.get("tuner_key"):
            out.setdefault(e["tuner_key"], []).append(f"launcher: {e['error']}")
    for r in res["rows"]:
        for u in r["uses"]:
            if u.get("tuner_key"):
                bad = out.setdefault(u["tuner_key"], [])
                bad += [f"{r['arch']} {r['kernel']}: {f}" for f in failures(r, u.get("per_sm", 1)
                                                                              if r["kernel"] == "_scan_kernel" else 1)]
    return out


def _label(r: dict) -> str:
    c = r.get("constexprs", {})
    keys = [k for k in ("BLOCK_B", "BLOCK_N", "BLOCK_D", "M", "BLOCK_M", "BLOCK_K", "NTP", "KP", "CH", "BLOCK_I",
                        "BLOCK_L", "P", "PRECISION", "PREC", "HAS_IDS", "A_CAST", "HAS_POS") if k in c]
    return (" ".join(f"{k}={c[k]}" for k in keys) + f" w{r.get('num_warps')}s{r.get('num_stages')}" +
            (f" [{r['dtypes']}]" if r.get("dtypes") else ""))


def _use_label(u: dict) -> str:
    where = f"{u['preset']} {u['label']}" if u.get("preset") else u.get("predict", "")
    return " ".join(x for x in (u["source"] + ":", where, u.get("variant", ""), u.get("shape", ""),
                                json.dumps(u["config"], sort_keys=True) if u.get("config") else "") if x)


def _source(r: dict) -> str:
    srcs = sorted({u.split(":")[0] for u in r["used_by"]})
    presets = sorted({u.split()[1] for u in r["used_by"] if u.startswith("preset:")})
    return ",".join(srcs) + (f" ({len(presets)} presets)" if presets else "")


def summary(res: dict) -> str:
    """Per architecture and kernel, over the shipped launches: clean / all, the most registers and spill bytes, the
    largest shared memory, the smallest fit against the launcher's assumption, MMA where tl.dot runs on tensor cores."""
    groups = {}
    for r in res["rows"]:
        if r["shipped"]:
            groups.setdefault((r["arch"], r["kernel"]), []).append(r)
    head = ("arch", "kernel", "shipped launches clean", "max regs", "max spill st/ld B", "max smem B",
            "min fit vs need", "MMA where tensor-core dot")
    body = []
    for (arch, kernel), rs in sorted(groups.items()):
        ok = [r for r in rs if "error" not in r]
        dots = [r for r in ok if r["tensor_core_dot"]]
        fits = [(r["fit"]["programs"] - r["assumed_per_sm"], f"{r['fit']['programs']} vs {r['assumed_per_sm']}")
                for r in ok]
        st, ld = (max((r[k] for r in ok), default=0) for k in ("spill_stores", "spill_loads"))
        body.append((arch, kernel, f"{sum(r['clean'] for r in rs)}/{len(rs)}",
                     str(max((r["regs"] for r in ok), default="-")), f"{st}/{ld}",
                     str(max((r["shared"] for r in ok), default="-")), min(fits)[1] if fits else "-",
                     (f"{sum(r['mma'] for r in dots)}/{len(dots)}" if dots else "-")))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"   # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def format_table(res: dict) -> str:
    head = ("arch", "kernel", "config", "used by", "regs", "spill st/ld B", "smem B", "fit regs/smem vs need", "MMA",
            "loop per tile elem: mma mem local int cmp/sel", "status")
    body = []
    for r in sorted(res["rows"], key=lambda r: (r["arch"], r["kernel"], not r["shipped"], _label(r))):
        if "error" in r:
            body.append((r["arch"], r["kernel"], _label(r), _source(r), "-", "-", "-", "-", "-", "-",
                         "FAIL " + r["failures"][0] if r["shipped"] else "does not compile"))
            continue
        lp = r.get("loop_per_tile_element")
        mix = "-" if not lp else " ".join(f"{lp.get(c, 0):.3g}" for c in
                                          ("mma", "memory", "local", "integer", "compare_select"))
        mma = ("/".join(r["mma_ops"]) or "none") if r["dot"] else "-"
        f = r["fit"]
        status = "ok" if r["clean"] else ("FAIL: " if r["shipped"] else "unfit (tuner drops): ") + "; ".join(
            r["failures"])
        body.append((r["arch"], r["kernel"], _label(r), _source(r), str(r["regs"]),
                     f"{r['spill_stores']}/{r['spill_loads']}", str(r["shared"]),
                     f"{f['by_regs']}/{f['by_smem']} vs {r['assumed_per_sm']}", mma, mix, status))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()   # noqa: E731
    out = [f"maect.kernels.check --static: triton {res['triton']}, {', '.join(res['archs'])}; {res['launches']} "
           f"distinct launches, {len(res['rows'])} compiles in {res['seconds']} s ({res['workers']} workers); "
           "per thread: registers, spill bytes; per block: shared memory; fit = programs per SM by registers / by "
           "shared memory vs what the launcher assumes", line(head), line(["-" * w for w in widths])]
    out += [line(b) for b in body]
    out += ["", summary(res)]
    n_ship = sum(r["shipped"] for r in res["rows"])
    n_bad = sum(r["shipped"] and not r["clean"] for r in res["rows"])
    n_tune_bad = sum(not r["shipped"] and not r["clean"] for r in res["rows"])
    out.append(f"shipped launches: {n_ship - n_bad}/{n_ship} clean" + (f"; {n_bad} FAIL" if n_bad else "") +
               f"; tuner-only launches failing (dropped by the tuner): {n_tune_bad}")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m maect.kernels.check --static", description=__doc__.splitlines()[0])
    p.add_argument("--static", action="store_true", required=True)
    p.add_argument("--arch", nargs="+", default=["sm_90", "sm_80"], help=f"targets (known: {', '.join(ARCHS)})")
    p.add_argument("--preset", nargs="+", default=None, help="presets whose shapes are checked (default: all)")
    p.add_argument("--shipped-only", action="store_true", help="skip the tuner's search space")
    p.add_argument("--predict", action="store_true", help="the static cost model's scan / GEMM ratios (PREDICTION)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="cuda: measure the scan / GEMM ratios beside the prediction (needs a GPU)")
    p.add_argument("--workers", type=int, default=None, help="compile processes (default: cores, at most 8)")
    p.add_argument("--json", help="write the table (and the predictions) to this file")
    a = p.parse_args(argv)
    bad = [x for x in a.arch if x not in ARCHS]
    if bad:
        print(f"maect.kernels.check --static: unknown --arch {bad[0]!r} (known: {', '.join(ARCHS)})", file=sys.stderr)
        return 2
    if a.device == "cuda" and not torch.cuda.is_available():
        print("maect.kernels.check --static --device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    res = run(tuple(a.arch), a.preset, not a.shipped_only, a.predict or a.device == "cuda", a.workers)
    print(format_table(res))
    if "predictions" in res:
        if a.device == "cuda":
            from . import cost_model
            cost_model.measure_into(res["predictions"])
        print()
        from . import cost_model
        print(cost_model.format_predictions(res["predictions"]))
    if a.json:
        from maect.atomic import write_json
        write_json(a.json, res)
        print(f"wrote {a.json}")
    return 0 if res["ok"] else 1
