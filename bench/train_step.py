"""End-to-end training step: images/s and model-FLOPs utilisation, maect's path vs a reference-style path, one run.

The step is built from maect's own modules (maect.models.vit, maect.train.NNCLRNet, maect.heads NNCLRHead /
FeatureQueue, maect.losses.nnclr_loss, maect.optim), on synthetic images already on the device (no loader).
  ct   both views through the encoder in one batch, blocks below depth//2 under no_grad (stage 3), head per view,
       two queue lookups with top-k and a random pick, NNCLR loss, backward, AdamW step with LLRD groups, enqueue,
       target-projector EMA and encoder EMA.
  mae  mask 0.75, encoder on the visible tokens, decoder, norm-pix loss, backward, AdamW step (num_views images).
Paths (same weights, data, noise and queue; each in its own fresh model):
  maect      attention --attention (default auto), kernels.* public dispatch (Triton on GPU, compiled csrc on CPU
             when built), maect.optim.build_optimizer (apex FusedAdam / torch fused AdamW on CUDA); options
             --compile (torch.compile of every block), --channels-last.
  reference  attention 'math' (timm / official MAE's explicit attention), argsort masking and gather unshuffle
             (kernels' references: MAECT_KERNELS=0 for this path only, which kernels.backend_for reads per call),
             the published NNCLR lookup (re-normalise the whole queue, materialise B x Q similarities and a B x Q
             self-id mask, torch.topk; --ref-lookup queue_topk_ref for maect's exact-ties reference instead, which
             adds a host sync through nonzero()), unfused AdamW (foreach=False).
maect's path is the training loop's step (maect.train.train_loop), sync-free: the library's FeatureQueue.lookup and
enqueue, the non-finite guard on the device (gradient norm -> fused AdamW found_inf, queue and EMAs gated by it). The
reference path has no guard, a host-side queue pointer and the same random neighbour picks (one CPU generator per
path, same seed). No host sync inside a timed step: bench/common.measure records CUDA events around each step and
synchronises after it (one step per window).
Correctness first: the first step's loss of both paths must agree (fp32: 1e-4 relative; bf16 autocast: 5e-2).

Model FLOPs (matmuls only, 2 FLOPs per multiply-add; LayerNorm, softmax, GELU, the loss and the queue lookup not
counted; the lookup is 2 B Q d per view, < 0.1 % of a ViT-L step):
  block(T, D) = 24 T D^2 + 4 T^2 D        forward of one pre-norm block: qkv 6TD^2, proj 2TD^2, MLP (ratio 4) 16TD^2,
                                          q kᵀ and attn·v 4T^2D
  training = 3 x forward for trained layers (1 forward + 2 backward GEMMs), 1 x for frozen / no_grad ones, 2 x for
  the patch embedding when it trains (no input gradient)
  ct, per sample (2 views):  2 x [ 2 L p^2 C D + t block(1+L, D) + 3 (depth-t) block(1+L, D)
                                   + 3 (proj + pred) + proj ]          proj = 2(d h + h h + h o), pred = 2(o ph + ph o)
  mae, per image:  2 (2 L p^2 C D) + 3 depth block(1+K, D) + 3 (2 (1+K) D Dd) + 3 dd block(1+L, Dd) + 3 (2 (1+L) Dd p^2 C)
                   K = int(L (1 - mask_ratio))
MFU = model FLOPs per step / median step time / peak (--peak-tflops; default: the GPU's dense bf16 peak from
PEAK_TFLOPS, e.g. H100 SXM 989; none on CPU).

  python bench/train_step.py --model vit_l16 --stage ct          # GPU; batch = min(128, preset's global / 8)
  python bench/train_step.py --model vit_h14 --stage mae --compile
  python bench/train_step.py --preset tiny --stage ct --steps 3  # CPU (the default without CUDA)
Targets on an H100 (not measured here: no GPU on the development machine): ct ViT-L/16 >= 1.5x the reference path;
mae >= 45 % MFU.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from common import add_ratio, base_parser, environment, measure, print_table, setup, write_json
from queue_lookup import official_nnclr

from maect import kernels  # noqa: E402  (common puts the repo root on sys.path)
from maect import config as C  # noqa: E402
from maect import hub  # noqa: E402
from maect.heads import FeatureQueue, NNCLRHead  # noqa: E402
from maect.losses import nnclr_loss  # noqa: E402
from maect.models import attention as A  # noqa: E402
from maect.dataloading.augment import h2d  # noqa: E402
from maect.optim import build_optimizer, can_skip_on_device, freeze, llrd_scale, lr_factor, param_groups, set_lr  # noqa: E402
from maect.train import NNCLRNet, ema_pairs, ema_update, optimizer_step  # noqa: E402

# dense bf16 tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name (first match wins)
PEAK_TFLOPS = [("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("H800", 989), ("B200", 2250),
               ("B100", 1750), ("A100", 312), ("A800", 312), ("L40S", 362), ("L4", 121), ("A10", 125)]
GPUS_PER_NODE = 8          # default per-GPU batch: the preset's global batch / 8 GPUs (the paper's node), at most
MAX_GPU_BATCH = 128        # 128 samples (H/14's MAE preset, 4096 global, was trained on far more GPUs)


# ------------------------------------------------------------------------------------------------ FLOPs
def block_flops(T: int, D: int) -> int:
    return 24 * T * D * D + 4 * T * T * D


def model_flops(stage: str, m, n, t: int, mask_ratio: float, batch: int, views: int) -> float:
    """Training matmul FLOPs of one step (formulas in the module docstring). m: the ViT, n: NNCLRCfg."""
    L, p, C_, D, depth = m.patch_embed.num_patches, m.patch_embed.patch_size, m.in_chans, m.embed_dim, m.depth
    patch = 2 * L * p * p * C_ * D
    if stage == "ct":
        d, h, o, ph = D, n.proj_hidden, n.proj_dim, n.pred_hidden
        proj, pred = 2 * (d * h + h * h + h * o), 2 * (o * ph + ph * o)
        view = patch + t * block_flops(1 + L, D) + 3 * (depth - t) * block_flops(1 + L, D) + 3 * (proj + pred) + proj
        return batch * 2 * view
    K = int(L * (1 - mask_ratio))
    Dd, dd = m.decoder_embed.out_features, len(m.decoder_blocks)
    img = (2 * patch + 3 * depth * block_flops(1 + K, D) + 3 * 2 * (1 + K) * D * Dd + 3 * dd * block_flops(1 + L, Dd)
           + 3 * 2 * (1 + L) * Dd * p * p * C_)
    return batch * views * img


def default_peak(device: torch.device, bf16: bool) -> float | None:
    if device.type != "cuda" or not bf16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS if k in name), None)


# ------------------------------------------------------------------------------------------------ queue, sync-free
def ref_lookup(queue: FeatureQueue, z, ids, k: int, gen, official: bool):
    """The reference path's lookup. official: the published NNCLR path (re-normalise the whole queue, B x Q
    similarities and self-mask, torch.topk); else kernels.queue_topk_ref. The top-k pick is drawn like
    FeatureQueue.lookup's (CPU generator), so both paths pick the same neighbours."""
    if official:
        idx = official_nnclr(z, queue.features, ids, queue.ids, k).indices   # bench/queue_lookup.py's baseline
    else:
        idx = kernels.queue_topk_ref(z.to(queue.features.dtype), queue.features, k, ids, queue.ids)[1]
    if k > 1:
        idx = idx.gather(1, torch.randint(0, k, (z.shape[0], 1), generator=gen).to(z.device))
    return queue.features[idx[:, 0]]


def ref_enqueue(queue: FeatureQueue, z, ids, labels, ptr: int) -> int:
    """The reference path's FIFO write: slices at a host-side pointer."""
    n = z.shape[0]
    queue.features[ptr:ptr + n] = z.to(queue.features.dtype)
    queue.ids[ptr:ptr + n] = ids
    queue.labels[ptr:ptr + n] = labels
    ptr = (ptr + n) % queue.size
    queue.ptr.fill_(ptr)
    return ptr


def guarded_step(opt, params, ref: bool):
    """The optimizer step. maect: the train loop's (optimizer_step, non-finite guard); returns the 'taken' flag."""
    if ref:
        opt.step()
        opt.zero_grad(set_to_none=True)
        return None
    return ~optimizer_step(opt, params, can_skip_on_device(opt))[1]


# ------------------------------------------------------------------------------------------------ the two paths
@contextlib.contextmanager
def path_dispatch(ref: bool, attention: str):
    """Process-wide dispatch for one path: the attention backend and MAECT_KERNELS (kernels.backend_for reads the
    variable on every call, so this switches masking/unshuffle/queue_topk to their references and back)."""
    prev_attn, prev_env = A.get_backend(), os.environ.get("MAECT_KERNELS")
    A.set_backend("math" if ref else attention)
    os.environ["MAECT_KERNELS"] = "0" if ref else (prev_env or "1")
    try:
        yield
    finally:
        A.set_backend(prev_attn)
        if prev_env is None:
            os.environ.pop("MAECT_KERNELS", None)
        else:
            os.environ["MAECT_KERNELS"] = prev_env


def make_optimizer(groups, lr, ref: bool, device):
    if not ref:
        return build_optimizer(groups, lr, fused="auto", device=device)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), foreach=False), "torch.AdamW(foreach=False)"


def lean(model, args, ref: bool) -> None:
    if ref:
        return
    if args.channels_last:
        model.patch_embed.to(memory_format=torch.channels_last)
    if args.compile:
        for blk in list(model.blocks) + list(getattr(model, "decoder_blocks", [])):
            blk.compile()                     # in place: parameter names unchanged


def build_step(stage: str, cfg: C.Config, args, data: dict, ref: bool, device, total: int):
    """(step() -> detached loss, info). Fresh model from seed 0, so both paths start identical."""
    torch.manual_seed(0)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext())
    gen = torch.Generator().manual_seed(1)             # the neighbour picks, drawn on the CPU as FeatureQueue.lookup does
    state = {"step": 0, "ptr": 0}
    x = data["x"]
    if args.channels_last and not ref:
        x = x.contiguous(memory_format=torch.channels_last)
    if stage == "mae":
        s = cfg.mae
        model = hub.model_from_cfg(cfg.model, decoder=True).to(device)
        model.train()
        lean(model, args, ref)
        lr = s.blr * s.batch_size / 256
        opt, opt_name = make_optimizer(param_groups(model.named_parameters(), s.weight_decay), lr, ref, device)
        L = model.patch_embed.num_patches

        def step():
            noise = h2d(torch.rand(x.shape[0], L, generator=gen), device)
            with autocast:
                loss, _, _ = model(x, s.mask_ratio, s.norm_pix_loss, noise)
            loss.backward()
            set_lr(opt, lr, lr_factor(state["step"], total, 1))
            guarded_step(opt, params, ref)
            state["step"] += 1
            return loss.detach()
        params = [p for g in opt.param_groups for p in g["params"]]
        return step, {"model": model, "opt": opt_name, "t": model.depth}

    s, n = cfg.ct, cfg.nnclr
    encoder = hub.model_from_cfg(cfg.model, decoder=False).to(device)
    head = NNCLRHead(encoder.embed_dim, n.proj_hidden, n.proj_dim, n.pred_hidden)
    head.add_target()
    queue = FeatureQueue(n.queue_size, n.proj_dim, generator=torch.Generator().manual_seed(0))
    queue.ids.copy_(torch.randint(0, data["n_ids"], (n.queue_size,), generator=torch.Generator().manual_seed(2)))
    head, queue = head.to(device), queue.to(device)
    depth = encoder.depth
    t = s.tuned_from_block if s.tuned_from_block >= 0 else depth // 2
    freeze(encoder)                                   # as run_nnclr: upper blocks + final norm train
    for name, p in encoder.named_parameters():
        if name.startswith("norm.") or (name.startswith("blocks.") and int(name.split(".")[1]) >= t):
            p.requires_grad_(True)
    encoder.eval()
    head.train()
    ema = copy.deepcopy(encoder).requires_grad_(False)
    lean(encoder, args, ref)
    net = NNCLRNet(encoder, head, t, cfg.model.pool, encoder_frozen=False)
    scale = 2 * s.batch_size / 256
    lrs = {"enc": s.blr * scale, "head": s.head_blr * scale}
    groups = param_groups(head.named_parameters(), s.head_weight_decay, tag="head")
    groups += param_groups(encoder.named_parameters(), s.weight_decay, lambda nm: llrd_scale(nm, depth, s.llrd), tag="enc")
    opt, opt_name = make_optimizer(groups, 1.0, ref, device)
    x0, x1 = x.chunk(2)
    ids, labels = data["ids"], data["labels"]
    official = ref and args.ref_lookup == "official"

    params = [p for g in opt.param_groups for p in g["params"]]
    ema_params = ema_pairs(ema, encoder)

    def step():
        with autocast:
            p0, p1, z0, z1 = net(x0, x1)
        z0, z1 = F.normalize(z0.float(), dim=1), F.normalize(z1.float(), dim=1)
        if ref:
            nn0 = ref_lookup(queue, z0, ids, s.topk, gen, official)
            nn1 = ref_lookup(queue, z1, ids, s.topk, gen, official)
        else:
            nn0 = queue.lookup(z0, ids, s.topk, generator=gen)[0]
            nn1 = queue.lookup(z1, ids, s.topk, generator=gen)[0]
        loss = nnclr_loss(nn0.float(), nn1.float(), p0, p1, s.tau)
        loss.backward()
        set_lr(opt, lrs, lr_factor(state["step"], total, 1))
        taken = guarded_step(opt, params, ref)
        if ref:
            state["ptr"] = ref_enqueue(queue, z0, ids, labels, state["ptr"])
        else:
            queue.enqueue(z0, ids, labels, taken)
        head.update_target(s.target_ema, taken)
        ema_update(ema_params, s.encoder_ema, taken)
        state["step"] += 1
        return loss.detach()
    return step, {"model": encoder, "opt": opt_name, "t": t}


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


def run_path(stage, cfg, args, data, ref: bool, device) -> dict:
    name = "reference" if ref else "maect"
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    total = args.warmup + args.steps + 1
    with path_dispatch(ref, args.attention):
        step, info = build_step(stage, cfg, args, data, ref, device, total)
        t0 = time.perf_counter()
        first = step()                        # the correctness check's loss (and compile / autotune, if any)
        first = float(first)                  # host sync: outside the timed steps
        first_s = time.perf_counter() - t0
        res = measure(step, device, warmup=args.warmup, budget_s=0.0, min_reps=args.steps, max_reps=args.steps)
        syncs = count_host_syncs(step, device)
    flops = model_flops(stage, info["model"], cfg.nnclr, info["t"], cfg.mae.mask_ratio, data["batch"], data["views"])
    row = {"provider": name, "flops": flops, "first_loss": first, "first_step_s": first_s, "optimizer": info["opt"], **res,
           "attention": "math" if ref else args.attention,
           "kernels": "ref" if ref else kernels.backend_for(data["x"]),
           "lookup": (args.ref_lookup if ref else "kernels.queue_topk") if stage == "ct" else "-", **syncs}
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    del step, info
    gc.collect()
    return row


def resolve_args(args) -> tuple[C.Config, int, int]:
    """(config, per-device batch, views per sample)."""
    preset = args.preset or args.model or ("vit_l16" if args.device == "cuda" else "tiny")
    cfg = C.load_config([f"preset={preset}"])
    s = cfg.mae if args.stage == "mae" else cfg.ct
    batch = args.batch or (s.batch_size if preset.startswith("tiny") else
                           max(1, min(MAX_GPU_BATCH, s.batch_size // GPUS_PER_NODE)))
    views = cfg.mae.num_views if args.stage == "mae" else 2
    if args.stage == "ct" and cfg.nnclr.queue_size % batch:
        sys.exit(f"nnclr.queue_size={cfg.nnclr.queue_size} is not divisible by --batch {batch} (FIFO enqueue)")
    cfg.preset = preset
    return cfg, batch, views


def run(args) -> dict:
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
    rows = [run_path(args.stage, cfg, args, data, ref, device) for ref in (True, False)]
    flops = rows[0]["flops"]
    peak = args.peak_tflops or default_peak(device, args.bf16)
    for r in rows:
        sec = r["median_ms"] * 1e-3
        r["img_per_s"] = batch * views / sec if args.stage == "mae" else batch / sec
        r["tflops"] = flops / sec / 1e12
        r["mfu"] = r["tflops"] / peak if peak else None
    add_ratio(rows, "reference")
    l_ref, l_new = rows[0]["first_loss"], rows[1]["first_loss"]
    rel = abs(l_new - l_ref) / max(abs(l_ref), 1e-12)
    tol = 5e-2 if args.bf16 else 1e-4
    check = {"loss_reference": l_ref, "loss_maect": l_new, "rel_diff": rel, "tol": tol, "ok": rel <= tol}
    env = environment(device)
    unit = "images" if args.stage == "mae" else "samples (2 views each)"
    print(f"\ncheck: first-step loss reference {l_ref:.6g} vs maect {l_new:.6g}: rel diff {rel:.2g} "
          f"{'<=' if check['ok'] else '>'} {tol:g} -> {'OK' if check['ok'] else 'MISMATCH'}")
    print_table(f"{args.stage} step  preset {cfg.preset}  batch {batch} {unit}/step  {'bf16 autocast' if args.bf16 else 'fp32'}"
                f"  {env['device']}  threads {env['threads']}  model {flops / 1e12:.3f} TFLOP/step  peak "
                f"{peak or '-'} TFLOP/s{'  compile' if args.compile else ''}{'  channels-last' if args.channels_last else ''}",
                rows, [("provider", "path", ""), ("median_ms", "median ms", ".1f"), ("p20_ms", "p20", ".1f"),
                       ("p80_ms", "p80", ".1f"), ("img_per_s", "img/s" if args.stage == "mae" else "samples/s", ".1f"),
                       ("tflops", "TFLOP/s", ".3f"), ("mfu", "MFU", ".1%"), ("speedup", "x ref", ".2f"),
                       ("first_step_s", "1st step s", ".1f"), ("peak_gib", "peak GiB", ".1f"),
                       ("attention", "attention", ""), ("kernels", "kernels", ""), ("lookup", "lookup", ""),
                       ("optimizer", "optimizer", "")])
    for r in rows:
        if r.get("host_syncs_per_step") is not None:
            print(f"host syncs per step ({r['provider']}): {r['host_syncs_per_step']:g}"
                  + (f"  at {', '.join(r['host_sync_sites'])}" if r["host_sync_sites"] else ""))
    return {"bench": "train_step", "stage": args.stage, "preset": cfg.preset, "batch": batch, "views": views,
            "bf16": args.bf16, "compile": args.compile, "channels_last": args.channels_last,
            "model_tflop_per_step": flops / 1e12, "peak_tflops": peak, "check": check, "rows": rows, "env": env}


def parser():
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--stage", choices=["ct", "mae"], default="ct")
    p.add_argument("--model", choices=["vit_b16", "vit_l16", "vit_h16", "vit_h14"], help="the size's preset")
    p.add_argument("--preset", help="any maect preset (tiny: the CPU default)")
    p.add_argument("--batch", type=int, help="per-device samples (default: min(128, preset's global batch / 8); "
                                             "tiny: the preset's)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on GPU, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after the check step (3 GPU, 1 CPU)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 autocast on GPU")
    p.add_argument("--attention", default="auto", choices=list(A.BACKENDS), help="maect path's attention backend")
    p.add_argument("--compile", action="store_true", help="maect path: torch.compile every transformer block")
    p.add_argument("--channels-last", action="store_true", help="maect path: channels-last images and patch embed")
    p.add_argument("--ref-lookup", choices=["official", "queue_topk_ref"], default="official")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: known GPUs' dense bf16)")
    return p


def finish_args(args):
    cpu = args.device == "cpu"
    args.steps = args.steps or (3 if cpu else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 3)
    return args


def gpu_suite_step(out: dict, budget_s: float) -> None:
    """For bench/gpu_suite.py: ViT-L/16 CT and MAE steps, both paths, no compile (CPU: the tiny preset, 2 steps).
    Fills out[<stage>] with each run's result; configs that no longer fit the budget are skipped and named."""
    t0 = time.perf_counter()
    cuda = torch.cuda.is_available()
    configs = ([["--model", "vit_l16", "--stage", "ct"], ["--model", "vit_l16", "--stage", "mae"],
                ["--model", "vit_h14", "--stage", "mae"]] if cuda else
               [["--preset", "tiny", "--stage", "ct", "--batch", "64"], ["--preset", "tiny", "--stage", "mae", "--batch", "64"]])
    per_run = None
    for cfg_args in configs:
        left = budget_s - (time.perf_counter() - t0)
        key = " ".join(cfg_args)
        if per_run is not None and left < 1.5 * per_run:
            out.setdefault("skipped", []).append(key)
            continue
        t1 = time.perf_counter()
        args = finish_args(parser().parse_args(cfg_args + ["--device", "cuda" if cuda else "cpu", "--steps",
                                                           "5" if cuda else "2", "--warmup", "2" if cuda else "0"]))
        try:
            out[key] = run(args)
        except Exception as e:  # one failing config must not lose the others
            out[key] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        per_run = max(per_run or 0.0, time.perf_counter() - t1)
        if cuda:
            torch.cuda.empty_cache()
    out["seconds"] = round(time.perf_counter() - t0, 1)


def main() -> int:
    args = finish_args(parser().parse_args())
    res = run(args)
    write_json(args.json, res)
    return 0 if res["check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
