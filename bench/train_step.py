"""End-to-end training step: images/s, MFU, peak memory and host syncs of maect's step against the reference (what a
user of the official code gets on the same torch), one run, side by side; --profile says where the time goes.

Rows (the maect rows run the trainer's own step functions, imported below from maect.engine and maect.train; the
reference rows are written apart in bench/reference_step.py; every row starts from the same weights, data, noise,
queue and neighbour picks):
  reference             timm blocks with SDPA attention, torch fused AdamW, argsort masking, official NNCLR lookup
                        under autocast: the baseline of the 'x ref' column
  reference-math        extra row (the earlier straw man): timm's explicit attention, AdamW(foreach=False)
  reference+compile     the reference with torch.compile of every block: the baseline of the 'x ref+c' column
  maect                 maect's step as maect.train runs it (sync-free guard, maect.kernels with the backends the
                        trainer decides at start-up, printed in one line; fused AdamW)
  maect+compile         + torch.compile of every block (inductor: LayerNorm / bias / GELU / residual fused)
  maect+compile-mat     + mode max-autotune-no-cudagraphs
  maect+cudagraphs      + mode reduce-overhead (CUDA graphs of each block's forward and backward)
  reference+cudagraphs  the reference with mode reduce-overhead
Stages: mae (mask 0.75, encoder on visible tokens, decoder, norm-pix loss, backward, AdamW) and ct (stage 3: both
views through the encoder, blocks below depth/2 under no_grad, NNCLR head, two queue lookups, loss, backward, AdamW
with LLRD, enqueue, target-projector and encoder EMAs).
Correctness first: every row's first-step loss must match the first row's (fp32: 1e-4 relative; bf16 autocast:
5e-2); the script exits 1 otherwise. Timing: bench/common.measure, CUDA events around each step (L2 flushed
between steps), median and p20/p80 of --steps steps after --warmup untimed ones; '1st step s' includes compilation.
MFU: model FLOPs (bench/mfu.py: encoder on visible tokens, decoder on all tokens, backward 2 x forward, frozen CT
blocks forward only) / median step time / the GPU's dense bf16 peak (H100/H200 SXM 989 TFLOP/s; none on CPU).
Peak GiB: the row's own CUDA allocation peak (its model copy, optimizer state, activations; the shared initial
weights excluded). Host syncs per step: counted by torch.cuda.set_sync_debug_mode over 2 untimed steps (CUDA only).

  python bench/train_step.py --model vit_l16 --stage mae                 # GPU; batch min(128, preset global / 8)
  python bench/train_step.py --model vit_h14 --stage mae --compile --profile
  python bench/train_step.py --model vit_l16 --stage mae --rows reference,maect,maect+cudagraphs --batch 256
  python bench/train_step.py --preset tiny --stage ct                    # CPU (the default without CUDA)
GPU targets (unmeasured): MAE ViT-L/16 >= 45 % MFU, every maect step
>= 1.3 x the reference, 0 host syncs per step.
"""
from __future__ import annotations

import copy
import gc
import os
import sys
import time
import warnings

import torch

from common import add_ratio, base_parser, environment, measure, print_table, setup, write_json
import mfu
from reference_step import VARIANTS, build_bases, compile_blocks, path_dispatch, reference_step

from maect.engine import (NNCLRNet, autocast, bn_restore, bn_snapshot, ema_pairs, mae_noise, mae_step,  # noqa: E402
                          mark_step, nnclr_step, nnclr_update, optimizer_step, running_stats)
from maect.train import ct_trainable, mae_lr, nnclr_optimizer  # noqa: E402  (the trainer's own setup)

from maect import config as C  # noqa: E402  (common puts the repo root on sys.path)
from maect.validation import load_config  # noqa: E402
from maect.backends import decide_for_run  # noqa: E402
from maect.models import attention as A  # noqa: E402

GPUS_PER_NODE = 8          # default per-GPU batch: the preset's global batch / 8 GPUs (the paper's node), at most
MAX_GPU_BATCH = 128        # 128 (the recipes: 4096 global over 8-32 GPUs = 128-512 per GPU; --batch for more)
DEFAULT_ROWS = ["reference", "reference-math", "maect"]
COMPILE_ROWS = ["reference+compile", "maect+compile"]


# ------------------------------------------------------------------------------------------------ the rows' steps
def maect_step(stage: str, cfg: C.Config, args, data: dict, variant, device, total: int, bases: dict):
    """(step() -> detached loss, info) of a maect row: the trainer's functions as maect.engine's epoch loops call
    them (one rank, accum 1), on the variant's own copy of the base weights."""
    from dataclasses import replace
    from maect.heads import FeatureQueue, queue_dtype
    from maect.optim import build_optimizer, can_skip_on_device, freeze, lr_factor, param_groups, set_lr
    mode, x, B = variant.compile_mode, data["x"], data["batch"]
    amp = autocast("bf16" if args.bf16 else "fp32", device)
    gen = torch.Generator().manual_seed(1)     # mask noise and neighbour picks, drawn on the CPU in both paths
    state = {"step": 0}
    model = copy.deepcopy(bases["model"])
    info = {"model": model, "attention": args.attention}
    if stage == "mae":
        s = replace(cfg.mae, batch_size=B)
        model.train()
        compile_blocks(cfg, model, mode, args.compile_backend)
        lr = mae_lr(s)
        opt, info["opt"] = build_optimizer(param_groups(model.named_parameters(), s.weight_decay), lr, fused="auto",
                                           device=device)
        params, on_device = [p for g in opt.param_groups for p in g["params"]], can_skip_on_device(opt)
        L, views = model.patch_embed.num_patches, list(x.chunk(data["views"]))

        def step():
            mark_step(mode)
            noise = mae_noise(gen, B, 1, 0, L, len(views), device)
            loss = mae_step(model, views, noise, mask_ratio=s.mask_ratio, norm_pix=s.norm_pix_loss, accum=1,
                            sync=True, amp=amp)
            set_lr(opt, lr, lr_factor(state["step"], total, 1))
            optimizer_step(opt, params, on_device)
            state["step"] += 1
            return loss
        return step, {**info, "t": model.depth}

    s, n = replace(cfg.ct, batch_size=B), cfg.nnclr
    encoder, head = model, copy.deepcopy(bases["head"])
    queue = FeatureQueue(n.queue_size, n.proj_dim, generator=torch.Generator().manual_seed(0),
                         dtype=queue_dtype(n.queue_dtype, device))   # as the trainer stores it (auto: bf16 on CUDA)
    queue.ids.copy_(torch.randint(0, data["n_ids"], (n.queue_size,), generator=torch.Generator().manual_seed(2)))
    queue = queue.to(device)
    t = s.tuned_from_block if s.tuned_from_block >= 0 else encoder.depth // 2
    freeze(encoder)
    ct_trainable(encoder, t)
    encoder.eval()
    head.train()
    ema = copy.deepcopy(encoder).requires_grad_(False)
    compile_blocks(cfg, encoder, mode, args.compile_backend)
    net = NNCLRNet(encoder, head, t, cfg.model.pool, encoder_frozen=False)
    opt, info["opt"], lrs = nnclr_optimizer(cfg, s, encoder, head, True, device)
    params, on_device = [p for g in opt.param_groups for p in g["params"]], can_skip_on_device(opt)
    x0, x1 = x.chunk(2)
    ids, labels = data["ids"], data["labels"]
    ema_params, bn, nn_sum = ema_pairs(ema, encoder), running_stats(head), torch.zeros(2, device=device)

    def step():
        saved = bn_snapshot(bn)
        mark_step(mode)
        loss, z0, nn_acc = nnclr_step(net, queue, x0, x1, ids, labels, gen, topk=s.topk, tau=s.tau, amp=amp,
                                      labelled=True)
        set_lr(opt, lrs, lr_factor(state["step"], total, 1))
        gnorm, bad, ran = optimizer_step(opt, params, on_device)
        nnclr_update(queue, z0, ids, labels, ~bad, gather=lambda v: v, head=head, target_ema=s.target_ema,
                     ema_params=ema_params, encoder_ema=s.encoder_ema, nn_acc=nn_acc, nn_sum=nn_sum)
        bn_restore(bn, saved, bad)
        state["step"] += 1
        return loss
    return step, {**info, "t": t, "head_cfg": n}


def build_step(stage, cfg, args, data, variant, device, total, bases):
    make = reference_step if variant.path == "reference" else maect_step
    return make(stage, cfg, args, data, variant, device, total, bases)


# ------------------------------------------------------------------------------------------------ per-row measures
def count_host_syncs(step, device, n: int = 2) -> dict:
    """Host syncs per step, counted by torch.cuda.set_sync_debug_mode('warn') over n untimed steps (it flags
    cudaStreamSynchronize, blocking copies, .item() and the like). CPU: not applicable (None)."""
    if device.type != "cuda":
        return {"host_syncs_per_step": None}
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(n):
                step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    sites = sorted({f"{os.path.relpath(w.filename)}:{w.lineno}" for w in caught})   # where the syncing op was called
    return {"host_syncs_per_step": len(caught) / n, "host_sync_sites": sites[:5]}


# name fragments -> category, first match wins (kernel names on CUDA, aten op names on CPU)
CATEGORIES = [("attention", ("flash", "fmha", "attention", "attn", "softmax")),
              ("GEMM", ("gemm", "xmma", "nvjet", "cutlass", "cublas", "aten::mm", "aten::addmm", "aten::bmm",
                        "aten::baddbmm", "matmul", "conv", "wgrad", "dgrad")),
              ("optimizer", ("adam", "multi_tensor", "foreach", "lerp", "norm_kernel")),
              ("LayerNorm / BatchNorm", ("layer_norm", "layernorm", "batch_norm", "batchnorm")),
              ("masking / gather / top-k", ("gather", "scatter", "index", "sort", "topk", "masking", "unshuffle")),
              ("copy / cast / fill", ("copy", "cat", "clone", "fill", "memcpy", "memset", "zero", "cast")),
              ("fused by compile (triton)", ("triton",)),
              ("elementwise / reduction", ("elementwise", "vectorized", "reduce", "gelu", "add", "mul", "div",
                                           "sum", "mean", "pow", "sqrt", "where"))]


def categorize(name: str) -> str:
    low = name.lower()
    return next((c for c, keys in CATEGORIES if any(k in low for k in keys)), "other")


def profile_step(step, device, n: int = 3, row_limit: int = 20) -> dict:
    """torch.profiler over n steps: the per-op table (top row_limit by self CUDA time on GPU, self CPU time on CPU)
    and self time per category (CATEGORIES, by kernel / op name), ms per step."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=acts) as prof:
        for _ in range(n):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    cats: dict[str, float] = {}
    for e in events:
        t = getattr(e, key)
        is_kernel = getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
        if t > 0 and (is_kernel or not cuda):
            c = categorize(e.key)
            cats[c] = cats.get(c, 0.0) + t / 1e3 / n
    total = sum(cats.values()) or 1.0
    return {"table": events.table(sort_by=key, row_limit=row_limit, max_name_column_width=70),
            "by_category_ms": dict(sorted(cats.items(), key=lambda kv: -kv[1])), "total_ms": total, "steps": n,
            "time": "self CUDA (kernel) time" if cuda else "self CPU time"}


def print_profile(name: str, p: dict) -> None:
    print(f"\nprofile of '{name}' ({p['steps']} steps; {p['time']} per step by category, by kernel/op name):")
    for c, ms in p["by_category_ms"].items():
        print(f"  {c:<28} {ms:9.2f} ms  {ms / p['total_ms']:6.1%}")
    print(p["table"])


def _counters() -> dict:
    from torch._dynamo.utils import counters
    return {"graph_breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"].get("cudagraph_skips", 0)}


def run_row(ctx: dict, name: str, profile: bool = False) -> dict:
    """Build variant `name` from the shared initial weights, check step, warm-up, timed steps, host syncs."""
    args, device, v = ctx["args"], ctx["device"], VARIANTS[name]
    if v.compile_mode is not None:
        torch._dynamo.reset()                 # each compiled row compiles afresh (its '1st step s' says how long)
    before = _counters()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device)
    total = args.warmup + args.steps + 4
    with path_dispatch(v, args.attention):
        step, info = build_step(args.stage, ctx["cfg"], args, ctx["data"], v, device, total, ctx["bases"])
        t0 = time.perf_counter()
        first = float(step())                 # the correctness check's loss (and compile / autotune, if any)
        first_s = time.perf_counter() - t0
        res = measure(step, device, warmup=args.warmup, budget_s=0.0, min_reps=args.steps, max_reps=args.steps)
        syncs = count_host_syncs(step, device)
        prof = profile_step(step, device, n=3 if device.type == "cuda" else 1) if profile else None
    after = _counters()
    row = {"provider": name, "first_loss": first, "first_step_s": first_s, "optimizer": info["opt"], **res,
           "attention": info["attention"],
           "compile": "-" if v.compile_mode is None else v.compile_mode + ("" if args.compile_backend == "inductor"
                                                                           else f" ({args.compile_backend})"),
           "lookup": ("official" if v.path == "reference" else "kernels.queue_topk") if args.stage == "ct" else "-",
           **syncs, **{k: after[k] - before[k] for k in after}}
    if device.type == "cuda":
        row["peak_gib"] = (torch.cuda.max_memory_allocated(device) - base_mem) / 2 ** 30
    if prof is not None:
        row["profile"] = prof
        print_profile(name, prof)
    del step, info
    gc.collect()
    return row


# ------------------------------------------------------------------------------------------------ one configuration
def resolve_args(args) -> tuple[C.Config, int, int]:
    """(config, per-device batch, views per sample)."""
    preset = args.preset or args.model or ("vit_l16" if args.device == "cuda" else "tiny")
    cfg = load_config([f"preset={preset}"])
    s = cfg.mae if args.stage == "mae" else cfg.ct
    batch = args.batch or (s.batch_size if preset.startswith("tiny") else
                           max(1, min(MAX_GPU_BATCH, s.batch_size // GPUS_PER_NODE)))
    views = cfg.mae.num_views if args.stage == "mae" else 2
    if args.stage == "ct" and cfg.nnclr.queue_size % batch:
        sys.exit(f"--batch {batch}: nnclr.queue_size={cfg.nnclr.queue_size} is not divisible by it (FIFO enqueue)")
    cfg.preset = preset
    return cfg, batch, views


def prepare(args) -> dict:
    """Device, config, synthetic data already on the device, the shared initial weights, the step's FLOPs."""
    device = setup(args.device, args.threads)
    args.bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    cfg, batch, views = resolve_args(args)
    m = cfg.model
    g = torch.Generator(device=device).manual_seed(0)
    n_ids = 1_281_167
    data = {"x": torch.randn(batch * views, m.in_chans, m.img_size, m.img_size, device=device, generator=g),
            "ids": torch.randint(0, n_ids, (batch,), device=device, generator=g),
            "labels": torch.randint(0, 1000, (batch,), device=device, generator=g), "n_ids": n_ids,
            "batch": batch, "views": views}
    kernels = None
    if any(VARIANTS[r].path == "maect" for r in args.rows):   # the trainer's start-up decisions (maect/backends.py)
        run_cfg = copy.deepcopy(cfg)
        run_cfg.stage, run_cfg.model.attention = args.stage, args.attention
        run_cfg.mae.batch_size = run_cfg.ct.batch_size = batch
        run_cfg.mae.accum_steps = 1
        kernels = decide_for_run(run_cfg, device)
        print(f"maect rows: {kernels}")
    bases = build_bases(args.stage, cfg, device)
    model = bases["model"]
    if args.stage == "mae":
        flops = mfu.mae_flops(model, cfg.mae.mask_ratio, batch, views)
    else:
        t = cfg.ct.tuned_from_block if cfg.ct.tuned_from_block >= 0 else model.depth // 2
        flops = mfu.ct_flops(model, cfg.nnclr, t, batch)
    return {"args": args, "device": device, "cfg": cfg, "batch": batch, "views": views, "data": data,
            "bases": bases, "flops": flops, "kernels": kernels,
            "peak": args.peak_tflops or mfu.default_peak(device, args.bf16)}


def summarize(ctx: dict, rows: list[dict], quiet: bool = False) -> dict:
    """Ratios, MFU, the loss check against the first row; prints the table. Returns the JSON-able result."""
    args, batch, views, flops, peak = ctx["args"], ctx["batch"], ctx["views"], ctx["flops"], ctx["peak"]
    timed = [r for r in rows if r.get("median_ms")]
    for r in timed:
        sec = r["median_ms"] * 1e-3
        r["img_per_s"] = batch * views / sec if args.stage == "mae" else batch / sec
        r["tflops"] = flops / sec / 1e12
        r["mfu"] = r["tflops"] / peak if peak else None
    add_ratio(timed, "reference")
    add_ratio(timed, "reference+compile", col="x_ref_compiled")
    tol = 5e-2 if args.bf16 else 1e-4
    base = timed[0] if timed else None
    for r in timed:
        r["loss_rel_diff"] = abs(r["first_loss"] - base["first_loss"]) / max(abs(base["first_loss"]), 1e-12)
        r["loss_ok"] = r["loss_rel_diff"] <= tol
    check = {"against": base and base["provider"], "tol": tol, "ok": all(r["loss_ok"] for r in timed),
             "losses": {r["provider"]: r["first_loss"] for r in timed}}
    env = environment(ctx["device"])
    unit = "images" if args.stage == "mae" else "samples (2 views each)"
    if not quiet:
        losses = [f"{r['provider']} {r['first_loss']:.6g} ({'OK' if r['loss_ok'] else 'MISMATCH'})" for r in timed]
        print(f"\ncheck: first-step loss of every row vs '{check['against']}' (rel tol {tol:g}): " + ", ".join(losses))
        print_table(f"{args.stage} step  preset {ctx['cfg'].preset}  batch {batch} {unit}/step  "
                    f"{'bf16 autocast' if args.bf16 else 'fp32'}  {env['device']}  threads {env['threads']}  model "
                    f"{flops / 1e12:.4g} TFLOP/step (bench/mfu.py)  peak {peak or '-'} TFLOP/s",
                    rows, [("provider", "row", ""), ("median_ms", "median ms", ".1f"), ("p20_ms", "p20", ".1f"),
                           ("p80_ms", "p80", ".1f"), ("img_per_s", "img/s" if args.stage == "mae" else "samples/s",
                                                     ".1f"),
                           ("tflops", "TFLOP/s", ".3f"), ("mfu", "MFU", ".1%"), ("speedup", "x ref", ".2f"),
                           ("x_ref_compiled", "x ref+c", ".2f"), ("first_step_s", "1st step s", ".1f"),
                           ("peak_gib", "peak GiB", ".1f"), ("host_syncs_per_step", "syncs", "g"),
                           ("attention", "attention", ""), ("compile", "compile", ""),
                           ("lookup", "lookup", ""), ("optimizer", "optimizer", ""), ("error", "error", "")])
        for r in rows:
            if r.get("host_sync_sites"):
                print(f"host syncs per step ({r['provider']}): {r['host_syncs_per_step']:g} at "
                      + ", ".join(r["host_sync_sites"]))
            if r.get("graph_breaks") or r.get("cudagraph_skips"):
                print(f"{r['provider']}: {r['graph_breaks']} graph breaks, cudagraphs skipped {r['cudagraph_skips']}x")
    return {"bench": "train_step", "stage": args.stage, "preset": ctx["cfg"].preset, "batch": batch, "views": views,
            "bf16": args.bf16, "model_tflop_per_step": flops / 1e12, "peak_tflops": peak,
            "flops_counted": "bench/mfu.py", "kernels": ctx["kernels"], "check": check, "rows": rows, "env": env}


def run(args) -> dict:
    ctx = prepare(args)
    rows = [run_row(ctx, name, profile=args.profile) for name in args.rows]
    return summarize(ctx, rows)


# ------------------------------------------------------------------------------------------------ CLI
def parser():
    p = base_parser(__doc__.splitlines()[0], budget=False)
    p.add_argument("--stage", choices=["ct", "mae"], default="ct")
    p.add_argument("--model", choices=["vit_b16", "vit_l16", "vit_h16", "vit_h14"], help="the size's preset")
    p.add_argument("--preset", help="any maect preset (tiny: the CPU default)")
    p.add_argument("--batch", type=int, help="per-device samples (default: min(128, preset's global batch / 8); "
                                             "tiny: the preset's)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on GPU, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after the check step (3 GPU, 1 CPU)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 autocast on GPU")
    p.add_argument("--attention", default="auto", choices=list(A.BACKENDS), help="maect rows' attention backend")
    p.add_argument("--rows", default=None, help=f"comma-separated rows from {list(VARIANTS)} "
                                                f"(default: {','.join(DEFAULT_ROWS)})")
    p.add_argument("--compile", action="store_true", help=f"add the rows {','.join(COMPILE_ROWS)}")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled rows "
                                                                "(aot_eager: tracing only, for CPU dry runs)")
    p.add_argument("--profile", action="store_true", help="torch.profiler table per row (3 untimed steps)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: known GPUs' dense bf16)")
    return p


def finish_args(args):
    cpu = args.device == "cpu"
    args.steps = args.steps or (3 if cpu else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 3)
    rows = args.rows.split(",") if isinstance(args.rows, str) else list(args.rows or DEFAULT_ROWS)
    rows += [r for r in COMPILE_ROWS if args.compile and r not in rows]
    bad = [r for r in rows if r not in VARIANTS]
    if bad:
        sys.exit(f"--rows: unknown row(s) {bad}; choose from {list(VARIANTS)}")
    args.rows = rows
    return args


def main() -> int:
    args = parser().parse_args()
    res = run(finish_args(args))
    write_json(args.json, res)
    return 0 if res["check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
