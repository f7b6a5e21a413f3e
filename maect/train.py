"""One entry point for every stage:  torchrun [--nproc_per_node=N] -m maect.train preset=tiny [key=value ...]

stage=mae       MAE pretraining (stage 1)
stage=head      NNCLR head initialisation, encoder frozen (stage 2), from init=CKPT
stage=ct        contrastive tuning of the upper blocks (stage 3), from init=CKPT (a head checkpoint)
stage=pipeline  mae -> head -> ct, each from the previous stage's checkpoint, then k-NN before/after
stage=ct_pipeline  head -> ct from init=CKPT (an MAE / official checkpoint)
Outputs in out_dir/<stage>/: checkpoint-latest.pth (each epoch), checkpoint-final.pth, metrics.jsonl, config.yaml.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import sys
import time
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from maect import kernels
from maect.dataloading import DataError, NoLabels, build_loader, eval_batches, load_data, load_eval_data
from maect.dataloading.datasets import check_source
from maect.dataloading.augment import h2d
from maect import config as C
from maect import dist, hub, loggers
from maect.atomic import write_json
from maect.checkpoint import Checkpoints, check_resume_config, code_version, fault, set_rng_state
from maect.eval.features import NonFiniteFeatures, eval_mode
from maect.eval.summary import format_summary, summarize
from maect.heads import FeatureQueue, NNCLRHead, lerp_weighted, queue_dtype
from maect.losses import nnclr_loss
from maect.models import attention as attn
from maect.models.vit import num_params, pool
from maect.optim import build_optimizer, can_skip_on_device, freeze, llrd_scale, lr_factor, param_groups, set_lr
from maect.validation import check_tuned_from_block, load_config, validate_data

log = logging.getLogger("maect")


# ------------------------------------------------------------------------------------------------ plumbing
class Meter:
    """Progress line (loss, lr, images/s, ETA) every log_every steps; JSONL metrics, forwarded to the experiment
    loggers log.* opens (maect.loggers: TensorBoard, W&B)."""

    def __init__(self, out_dir: str, stage: str, total_steps: int, global_batch: int, log_every: int, main: bool):
        self.stage, self.total, self.gb, self.every, self.main = stage, total_steps, global_batch, log_every, main
        self.t0 = self.t_last = time.time()
        self.step_last = 0
        self.jsonl = open(os.path.join(out_dir, "metrics.jsonl"), "a") if main else None

    def step(self, step: int, epoch: int, values: dict) -> None:
        if not self.main or (step % self.every and step != self.total):
            return
        now = time.time()
        ips = (step - self.step_last) * self.gb / max(now - self.t_last, 1e-9)
        eta = (self.total - step) * (now - self.t0) / max(step, 1)
        self.t_last, self.step_last = now, step
        vals = " ".join(f"{k} {v:.4g}" for k, v in values.items())
        log.info(f"[{self.stage}] ep {epoch} step {step}/{self.total} {vals} | {ips:.0f} img/s | ETA {eta / 60:.1f} min")
        self.write({"step": step, "epoch": epoch, "img_per_s": ips, **values})

    def write(self, rec: dict) -> None:
        if not self.main:
            return
        rec = {"stage": self.stage, "time": time.time() - self.t0, **rec}
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        loggers.emit(rec)

    def close(self):
        if self.jsonl:
            self.jsonl.close()


def autocast(cfg: C.Config, device: torch.device):
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def step_generator(cfg: C.Config, stage: str, step: int) -> torch.Generator:
    """A CPU generator for per-step randomness (mask noise, NN pick) that does not depend on the rank count."""
    return torch.Generator().manual_seed((cfg.seed * 1000003 + zlib.crc32(stage.encode())) * 1000003 + step)


def stage_dir(cfg: C.Config, stage: str) -> str:
    d = os.path.join(cfg.out_dir, stage)
    os.makedirs(d, exist_ok=True)
    return d


class KNNMonitor:
    """Quick k-NN accuracy: bank = a fixed subset of the labelled train split, queries = a subset of the labelled
    test split (load_eval_data: for folder / filelist sources, data.labels), both with the deterministic eval
    transform and the training loader's file checks. The same code gives the pipeline's before/after numbers.
    NoLabels when the source has no labels. train / test: those splits already opened (run opens them once).

    Non-finite features (an encoder that produces NaN/inf): strict=False (the per-epoch monitor) returns NaN and
    keeps the error in self.error, so that the stage logs the count of bad rows and records knn_acc null in
    metrics.jsonl and training goes on (the stage's own non-finite guard decides about the run; a monitor must not
    end hours of training). strict=True (the pipeline's final before/after k-NN, run after every checkpoint is on
    disk) raises NonFiniteFeatures. Never a chance-level number."""

    def __init__(self, cfg: C.Config, device, n_train: int, n_test: int, train=None, test=None, strict: bool = False):
        self.cfg, self.device, self.strict, self.error = cfg, device, strict, None
        d = cfg.data
        train = train if train is not None else load_eval_data(d.name, d.root, "train", d.labels)
        test = test if test is not None else load_eval_data(d.name, d.root, "test", d.labels)
        g = torch.Generator().manual_seed(1234)
        self.train = train.subset(torch.randperm(len(train), generator=g)[:n_train]) if 0 < n_train < len(train) else train
        self.test = test.subset(torch.arange(min(n_test, len(test)))) if 0 < n_test < len(test) else test
        self.num_classes = train.num_classes

    @torch.no_grad()
    def features(self, encoder: nn.Module, pool_mode: str, progress: str = "") -> tuple | None:
        """(bank features, bank labels, query features, query labels); progress: a name for progress lines.
        Non-finite features: None with the error in self.error (strict=False), NonFiniteFeatures (strict=True)."""
        from maect.eval.features import extract_features
        m = self.cfg.model
        kw = dict(img_size=m.img_size, in_chans=m.in_chans, batch_size=500, device=self.device,
                  skip_corrupt=self.cfg.data.skip_corrupt)
        self.error, out = None, []
        try:
            for split, data in (("train", self.train), ("test", self.test)):
                out += extract_features(encoder, eval_batches(data, **kw), pool=pool_mode, device=self.device,
                                        progress=f"{progress} {split}" if progress else "", total=len(data),
                                        split=split)
        except NonFiniteFeatures as e:
            if self.strict:
                raise
            self.error = e
            return None
        return tuple(out)

    def knn(self, ftr, ytr, fte, yte) -> float:
        from maect.eval.knn import knn_accuracy
        return knn_accuracy(ftr, ytr, fte, yte, k=self.cfg.eval.knn_k, T=self.cfg.eval.knn_T,
                            num_classes=self.num_classes)

    def __call__(self, encoder: nn.Module, pool_mode: str, progress: str = "") -> float:
        """k-NN accuracy (%) of `encoder`'s features; non-finite features: see the class docstring."""
        feats = self.features(encoder, pool_mode, progress)
        return math.nan if feats is None else self.knn(*feats)


@torch.no_grad()
def projected(projector: nn.Module, feats: tuple) -> tuple:
    """The monitor's (bank, labels, queries, labels) with the features passed through `projector` in eval mode
    (BatchNorm running statistics) and L2-normalised: what the queue would store for these images."""
    ftr, ytr, fte, yte = feats
    dt = next(projector.parameters()).dtype
    with eval_mode(projector):
        z = [F.normalize(projector(f.to(dt)).float(), dim=1) for f in (ftr, fte)]
    return z[0], ytr, z[1], yte


def maybe_compile(cfg: C.Config, model: nn.Module, backend: str = "inductor") -> None:
    """model.compile=true: torch.compile each transformer block in place (state_dict names unchanged) with mode
    model.compile_mode: default (inductor fuses LayerNorm, bias, GELU and residual adds around the GEMMs),
    reduce-overhead (the same plus CUDA graphs of each block's forward and backward), max-autotune-no-cudagraphs,
    max-autotune. bench/train_step.py measures each against eager."""
    if cfg.model.compile:
        mode = cfg.model.compile_mode
        for blk in [*model.blocks, *getattr(model, "decoder_blocks", [])]:
            # dynamic=False: static kernels per shape (encoder, decoder, eval batches: a few recompiles, none dynamic)
            blk.compile(backend=backend, mode=None if mode == "default" or backend != "inductor" else mode,
                        dynamic=False)
        log.info(f"torch.compile: transformer blocks compiled ({backend}, mode {mode})")


def make_loader(cfg, di, data, s, num_views, ctaug, batch_per_rank):
    return build_loader(data, cfg.data, img_size=cfg.model.img_size, in_chans=cfg.model.in_chans,
                        batch_size=batch_per_rank, rank=di.rank, world=di.world, seed=cfg.seed, num_views=num_views,
                        crop_scale=s.crop_scale, ctaug=ctaug, device=di.device)


def per_rank(batch: int, world: int, key: str, accum: int = 1) -> int:
    """The per-rank micro-batch (validate_data has checked the divisibility before any work; kept as a guard)."""
    if batch % (world * accum):
        raise C.ConfigError(f"{key}={batch} must be divisible by world size {world}" + (f" x accum {accum}" if accum > 1 else ""))
    return batch // (world * accum)


# ------------------------------------------------------------------------------------------------ the loop
def optimizer_step(opt, params: list, on_device: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The optimizer step behind the non-finite guard: (gradient norm, bad: a device bool, whether opt.step ran).
    on_device (torch's fused AdamW, optim.can_skip_on_device): bad becomes the optimizer's found_inf and its kernel
    leaves parameters and moments as they were (GradScaler's hook), with no host sync. Otherwise bad is read on the
    host (one sync) and opt.step is not called when it is set. Gradients are zeroed either way."""
    gnorm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    bad = ~torch.isfinite(gnorm)    # under DDP the gradient is all-reduced: every rank computes the same flag
    if on_device:
        opt.found_inf = bad.float()
    ran = on_device or not bool(bad)
    if ran:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return gnorm, bad, ran


def train_loop(cfg: C.Config, di: dist.DistInfo, stage: str, loader, *, total: int, warm: int, accum: int, opt,
               lrs, step_fn, post_fn, state_fn, ckpts: Checkpoints, meter: Meter, resume: dict | None,
               after_epoch=None, running_stats: list[torch.Tensor] = ()) -> str:
    """Shared by every stage. step_fn(batch, step, micro, sync, poison) runs forward + backward of one micro-batch
    and returns (loss [detached], extras); after the last micro-batch of a step, the optimizer steps unless the
    gradient is non-finite (then the step is skipped and logged; after cfg.max_skips skips in a row the run stops);
    post_fn(batch, extras, taken) runs after the optimizer (queue, EMAs) and returns nn-accuracy (or None); taken is
    a device bool (False: the step was skipped, leave everything as it was).
    state_fn() -> the stage's checkpoint dict (model, optimizer, ...); the loop adds its own position.
    running_stats: buffers the forward pass updates (BatchNorm running statistics); a skipped step restores them.

    Non-finite guard (optimizer_step). With torch's fused AdamW the decision stays on the device: the queue, EMAs
    and running statistics are gated by the same flag, so a step has no host sync, and the flags are read back where
    the loop syncs anyway (log lines, checkpoints), which log each skipped step and stop the run after
    cfg.max_skips in a row. Other optimizers (apex, fused_optimizer=off) read the flag on the host every step and
    log a skip at once."""
    step, epoch, in_epoch, skips = 0, 0, 0, 0
    stats = torch.zeros(3, device=di.device)  # loss sum, nn-acc sum, count (summed between log lines)
    if resume is not None:
        step, epoch, in_epoch, skips = resume["step"], resume["epoch"], resume["step_in_epoch"], resume["skips"]
        stats = resume["stats"].to(di.device)
    params = [p for g in opt.param_groups for p in g["params"]]
    on_device = can_skip_on_device(opt)
    log.info(f"[{stage}] non-finite guard: " + ("on the device (fused AdamW found_inf; no host sync per step), "
                                                 f"read back every {cfg.log_every} steps and at checkpoints"
                                                 if on_device else f"host check every step ({type(opt).__name__} "
                                                 "cannot skip on the device)"))
    pending: list[tuple[int, int, torch.Tensor]] = []   # (step, epoch, [bad, loss, |g|]) not yet read back
    saved: list[torch.Tensor] = []                       # running_stats as they were before this step

    def acc_or_zero(nn_acc) -> torch.Tensor:   # a device zero, not a host scalar copied over (a sync on CUDA)
        return stats.new_zeros(()) if nn_acc is None else nn_acc.float()

    def check_skips() -> None:
        """Read the pending skip flags (one sync), log each skipped step, stop after cfg.max_skips in a row."""
        nonlocal skips
        if not pending:
            return
        vals = torch.stack([v for _, _, v in pending]).tolist()
        steps = [(st, ep) for st, ep, _ in pending]
        pending.clear()
        for (st, ep), (bad, lv, gv) in zip(steps, vals):
            if not bad:
                skips = 0
                continue
            skips += 1
            log.warning(f"[{stage}] step {st}: non-finite loss/gradient ({lv:.4g}, |g| {gv:.4g}): "
                        f"step skipped ({skips} in a row)")
            meter.write({"step": st, "epoch": ep, "skipped": 1})
            if skips >= cfg.max_skips:
                raise FloatingPointError(
                    f"[{stage}] {skips} non-finite steps in a row at step {st}; stopping. Last good checkpoint: "
                    f"{os.path.join(ckpts.dir, 'checkpoint-latest.pth')} (lower the lr or check the data)")

    def save_state(final: bool = False) -> str:
        check_skips()
        st = {**state_fn(), "step": step, "epoch": epoch, "step_in_epoch": in_epoch, "skips": skips,
              "stats": stats.cpu(), "args": C.to_dict(cfg), "stage": stage, "scaler": None}
        if final:
            path = ckpts.save_final(st)
            dist.barrier()  # rank 0 writes; the next stage on every rank reads it
            return path
        ckpts.save(st, step)
        return ""

    while step < total:
        loader.set_epoch(epoch, in_epoch)
        for b in loader:
            micro = in_epoch % accum
            in_epoch += 1
            sync = micro == accum - 1
            poison = fault("nan", stage, step, di.rank)
            if micro == 0 and running_stats:
                saved = [t.clone() for t in running_stats]   # a skipped step puts them back
            loss, extras = step_fn(b, step, micro, sync, poison)
            if not sync:
                continue
            fault("crash", stage, step, di.rank)
            set_lr(opt, lrs, lr_factor(step, total, warm))
            gnorm, bad, ran = optimizer_step(opt, params, on_device)
            pending.append((step, epoch, torch.stack([bad.float(), loss.float(), gnorm.float()])))
            if not ran:
                check_skips()   # the host guard logs the skip at once (and stops after max_skips in a row)
            nn_acc = post_fn(b, extras, ~bad)
            for t, t0 in zip(running_stats, saved):
                t.copy_(torch.where(bad, t0, t))
            stats += torch.where(bad, 0.0, torch.stack([loss.float(), acc_or_zero(nn_acc), stats.new_ones(())]))
            step += 1
            if step % cfg.log_every == 0 or step == total:
                check_skips()
                st = dist.all_reduce_mean(stats)
                vals = {"loss": float(st[0] / st[2].clamp_min(1))}
                if stage != "mae" and loader.data.has_labels:
                    vals["nn_acc"] = float(st[1] / st[2].clamp_min(1))
                meter.step(step, epoch, {**vals, "lr": opt.param_groups[0]["lr"]})
                stats.zero_()
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < total:
                save_state()
            if step >= total:
                break
        else:  # the epoch ran to its end
            epoch, in_epoch = epoch + 1, 0
            if step < total:
                if cfg.ckpt_epochs and epoch % cfg.ckpt_epochs == 0:
                    save_state()   # before the monitor: a monitor that fails loses no trained work
                if after_epoch is not None:
                    after_epoch(epoch, step, meter)
            continue
        break
    path = save_state(final=True)   # on disk before the last monitor runs, for the same reason
    if after_epoch is not None:     # the final weights (an epoch end, or inside an epoch when the schedule ends there)
        after_epoch(round(epoch + in_epoch / max(len(loader), 1), 2) if in_epoch else epoch, step, meter)
    meter.close()
    return path


def stage_resume(cfg: C.Config, ckpts: Checkpoints) -> dict | None:
    if cfg.resume != "auto":
        return None
    ck = ckpts.load_latest()
    if ck is not None:
        check_resume_config(ck, cfg, ckpts.dir)
        set_rng_state(ck["rng"])
    return ck


# ------------------------------------------------------------------------------------------------ stage 1
def mae_lr(s: C.MAECfg) -> float:
    """SPEC: blr x views x global batch / 256. The published code scales every stage's lr by the number of views
    (lr_scaler_factor = n_views x effective batch), so two views per image double the lr of one."""
    return s.blr * s.num_views * s.batch_size / 256


def run_mae(cfg: C.Config, di: dist.DistInfo, data) -> str:
    """Stage 1 on the train split `data` (opened and checked by run)."""
    s, out = cfg.mae, stage_dir(cfg, "mae")
    ckpts = Checkpoints(out, cfg.keep_last, di.is_main)
    model = hub.model_from_cfg(cfg.model, decoder=True).to(di.device)
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)   # model.grad_checkpointing (models/vit.py)
    if cfg.init:  # continue MAE pretraining from any encoder hub reads; the decoder too when the file has one
        sd, _, _ = hub.find_state_dict(hub.load_checkpoint(cfg.init))
        enc_keys = [k for k in model.state_dict() if not (k.startswith("decoder") or k == "mask_token")]
        enc, rep = hub.convert_state_dict(sd, enc_keys)
        dec = {k: v for k, v in sd.items() if k.startswith("decoder") or k == "mask_token"}
        missing = model.load_state_dict({**enc, **dec}, strict=False).missing_keys
        log.info(f"[mae] init {cfg.init}: {'; '.join(rep['notes'])}" + (f"; fresh decoder ({len(missing)} tensors)" if missing else ""))
    micro = per_rank(s.batch_size, di.world, "mae.batch_size", s.accum_steps)
    loader = make_loader(cfg, di, data, s, s.num_views, False, micro)
    maybe_compile(cfg, model)
    ddp = DDP(model, gradient_as_bucket_view=True) if di.world > 1 else model
    lr = mae_lr(s)
    opt, opt_name = build_optimizer(param_groups(model.named_parameters(), s.weight_decay), lr,
                                    fused=cfg.fused_optimizer, device=di.device)
    resume = stage_resume(cfg, ckpts)
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
    spe = len(loader) // s.accum_steps
    total = cfg.smoke or max(1, round(s.epochs * spe))   # smoke=N: N steps (config.apply_smoke)
    warm = round(s.warmup_epochs * spe)
    log.info(f"[mae] {num_params(model) / 1e6:.2f}M params, global batch {s.batch_size} ({micro}/rank x "
             f"{di.world} ranks x {s.accum_steps} accum), {s.num_views} view(s), lr {lr:.3g}, {total} steps, "
             f"optimizer {opt_name}, "
             f"loader {loader.backend}, attention {attn.get_backend()}, masking {kernels.mae_backends(model, di.device)}")
    L = model.patch_embed.num_patches
    model.train()

    def step_fn(b, step, micro_i, sync, poison):
        x = torch.cat(b["views"])
        g = step_generator(cfg, "mae", step * s.accum_steps + micro_i)
        sel = slice(di.rank * micro, (di.rank + 1) * micro)  # this rank's rows of the global batch's noise
        noise = h2d(torch.cat([torch.rand(micro * di.world, L, generator=g)[sel] for _ in b["views"]]), di.device)
        with (contextlib.nullcontext() if sync or di.world == 1 else ddp.no_sync()), autocast(cfg, di.device):
            loss, _, _ = ddp(x, s.mask_ratio, s.norm_pix_loss, noise)
        if poison:
            loss = loss * float("nan")
        (loss / s.accum_steps).backward()
        return loss.detach(), None

    def state_fn():
        return {"model": model.state_dict(), "optimizer": opt.state_dict()}

    meter = Meter(out, "mae", total, s.batch_size, cfg.log_every, di.is_main)
    return train_loop(cfg, di, "mae", loader, total=total, warm=warm, accum=s.accum_steps, opt=opt, lrs=lr,
                      step_fn=step_fn, post_fn=lambda b, e, taken: None, state_fn=state_fn, ckpts=ckpts, meter=meter,
                      resume=resume)


# ------------------------------------------------------------------------------------------------ stages 2, 3
def load_for_nnclr(cfg: C.Config, di, init: str):
    """Encoder (+ head and queue when the checkpoint has them) for stages 2/3."""
    if not init:
        raise C.ConfigError("stage head/ct needs init=CHECKPOINT (an MAE, official MAE/timm or head checkpoint)")
    ck = hub.load_checkpoint(init)
    encoder, info = hub.load_encoder(ck)
    if info["config"] is None:
        log.info(f"[init] {init}: encoder inferred from weights ({info['model_cfg'].embed_dim}d x {info['model_cfg'].depth})")
    n = cfg.nnclr
    head = NNCLRHead(encoder.embed_dim, n.proj_hidden, n.proj_dim, n.pred_hidden)
    queue = FeatureQueue(n.queue_size, n.proj_dim, generator=torch.Generator().manual_seed(cfg.seed),
                         dtype=queue_dtype(n.queue_dtype, di.device))
    if "head" in ck:
        load_head(head, ck["head"])
        if "queue" in ck and ck["queue"]["features"].shape == queue.features.shape:
            queue.load_state_dict(ck["queue"])
    return encoder.to(di.device), head.to(di.device), queue.to(di.device)


def load_head(head: NNCLRHead, sd: dict) -> None:
    extra = sorted(set(sd) - set(head.state_dict()) - {k for k in sd if k.startswith("target_projector.")})
    if extra:   # e.g. predictor.3.bias: heads written before the predictor lost its bias (the published layout)
        raise C.ConfigError(f"the checkpoint's NNCLR head has parameters this head does not ({', '.join(extra)}): it "
                            f"was written by an older maect; re-run stage 2 (stage=head) from its MAE checkpoint")
    if head.target_projector is None and any(k.startswith("target_projector.") for k in sd):
        head.add_target()
    head.load_state_dict(sd)


class NNCLRNet(nn.Module):
    """encoder (upper blocks from grad_from) + head; one forward for both views so DDP sees one graph."""

    def __init__(self, encoder, head, grad_from: int, pool_mode: str, encoder_frozen: bool):
        super().__init__()
        self.encoder, self.head, self.grad_from, self.pool_mode = encoder, head, grad_from, pool_mode
        self.encoder_frozen = encoder_frozen

    def forward(self, x0, x1):
        n = x0.shape[0]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoder_frozen):
            f = pool(self.encoder.forward_features(torch.cat([x0, x1]), grad_from_block=self.grad_from), self.pool_mode)
        f0, f1 = f[:n].float(), f[n:].float()
        p0, z0 = self.head(f0)      # separate calls: BatchNorm statistics per view
        p1, z1 = self.head(f1)
        return p0, p1, z0, z1


def running_stats(module: nn.Module) -> list[torch.Tensor]:
    """The BatchNorm running mean / var / batch counters a forward pass updates (restored on a skipped step)."""
    return [t for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for t in (m.running_mean, m.running_var, m.num_batches_tracked) if t is not None]


def ema_pairs(ema: nn.Module, model: nn.Module) -> tuple[list, list]:
    """The (EMA, online) parameter lists of the trained parameters, built once."""
    pairs = [(e, p) for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad]
    return [e for e, _ in pairs], [p for _, p in pairs]


@torch.no_grad()
def ema_update(pairs: tuple[list, list], m: float, taken: torch.Tensor | None = None) -> None:
    """EMA of the trained parameters in one foreach launch; taken (device bool) False leaves it unchanged."""
    lerp_weighted(pairs[0], pairs[1], 1.0 - m, taken)


def check_encoder(cfg: C.Config, encoder: nn.Module, init: str) -> None:
    """The init checkpoint's encoder against the keys that must agree with it, before any step: the loaders make
    model.img_size / model.in_chans images, and ct.tuned_from_block names one of its blocks (checked already in
    the head stage of a ct_pipeline, whose encoder is the same)."""
    pe = encoder.patch_embed
    for key, want, have in (("model.img_size", cfg.model.img_size, pe.img_size),
                            ("model.in_chans", cfg.model.in_chans, encoder.in_chans)):
        if want != have:
            raise C.ConfigError(f"{key}={want}, but the encoder of init={init} takes {have} (set {key}={have})")
    if "ct" in C.stages(cfg):
        check_tuned_from_block(cfg.ct.tuned_from_block, encoder.depth, f"init={init}")


def run_nnclr(cfg: C.Config, di: dist.DistInfo, stage: str, init: str, monitor: KNNMonitor | None, data) -> str:
    """Stage 2 (stage='head') or stage 3 (stage='ct'): the same step, different trainable sets and settings, on the
    train split `data` (opened and checked by run)."""
    s, out, ct = (cfg.head if stage == "head" else cfg.ct), stage_dir(cfg, stage), stage == "ct"
    ckpts = Checkpoints(out, cfg.keep_last, di.is_main)
    encoder, head, queue = load_for_nnclr(cfg, di, init)
    check_encoder(cfg, encoder, init)
    encoder.set_grad_checkpointing(cfg.model.grad_checkpointing)   # the tuned blocks (stage 3; stage 2 has none)
    depth = encoder.depth
    t = (cfg.ct.tuned_from_block if cfg.ct.tuned_from_block >= 0 else depth // 2) if ct else depth
    freeze(encoder)
    if ct:
        for name, p in encoder.named_parameters():  # upper blocks + final norm train
            if name.startswith("norm.") or (name.startswith("blocks.") and int(name.split(".")[1]) >= t):
                p.requires_grad_(True)
        if head.target_projector is None:
            head.add_target()
    encoder.eval()  # frozen part in eval mode; no dropout/drop-path anywhere, so the trained part is unaffected
    ema = copy.deepcopy(encoder).requires_grad_(False) if ct else None
    ema_params = ema_pairs(ema, encoder) if ct else None
    if di.world > 1:
        head = dist.sync_batchnorm(head, di.device)
    net = NNCLRNet(encoder, head, t, cfg.model.pool, encoder_frozen=not ct)
    maybe_compile(cfg, encoder)
    ddp = DDP(net, gradient_as_bucket_view=True) if di.world > 1 else net

    n_rank = per_rank(s.batch_size, di.world, f"{stage}.batch_size")
    labelled = data.has_labels      # nn_acc compares a sample's label with its queue neighbour's
    if not labelled and di.is_main:
        log_once(f"nn_acc monitor off: {int((data.labels < 0).sum())} of {len(data)} training files have no label "
                 f"(data.name={cfg.data.name}" + (f", data.labels={cfg.data.labels})" if cfg.data.labels else
                                                  "; set data.labels=DIR|CSV to turn it on)"))
    queue.check_admissible(s.topk, len(data))
    # MAE-CTaug (ct.aug) augments stage 2's views too: the published recipe trains the head on them
    loader = make_loader(cfg, di, data, s, 2, cfg.ct.aug, n_rank)
    scale = 2 * s.batch_size / 256
    lrs = {"enc": s.blr * scale, "head": (cfg.ct.head_blr if ct else s.blr) * scale}
    groups = param_groups(head.named_parameters(), cfg.ct.head_weight_decay if ct else s.weight_decay, tag="head")
    if ct:
        groups += param_groups(encoder.named_parameters(), s.weight_decay,
                               lambda n: llrd_scale(n, depth, cfg.ct.llrd), tag="enc")
    opt, opt_name = build_optimizer(groups, 1.0, fused=cfg.fused_optimizer, device=di.device)
    resume = stage_resume(cfg, ckpts)
    if resume is not None:
        encoder.load_state_dict(resume["model"])
        load_head(head, resume["head"])
        queue.load_state_dict(resume["queue"])
        opt.load_state_dict(resume["optimizer"])
        if ema is not None:
            ema.load_state_dict(resume["model_ema"])
    total = cfg.smoke or max(1, round(s.epochs * len(loader)))   # smoke=N: N steps (config.apply_smoke)
    warm = round(s.warmup_frac * total)
    n_enc = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    log.info(f"[{stage}] trainable: head {num_params(head, True) / 1e6:.2f}M, encoder {n_enc / 1e6:.2f}M "
             f"(blocks {t}..{depth - 1} + norm)" if ct else f"[{stage}] encoder frozen; head {num_params(head, True) / 1e6:.2f}M")
    log.info(f"[{stage}] global batch {s.batch_size}, lr enc {lrs['enc']:.3g} head {lrs['head']:.3g}, tau {s.tau}, "
             f"top-k {s.topk}, queue {queue.size}, {total} steps, "
             f"views {'MAE-CTaug colour' if cfg.ct.aug else 'crop+flip'}, "
             f"optimizer {opt_name}, loader {loader.backend}, queue {queue.features.dtype}, "
             f"queue_topk backend {kernels.backend_for(queue.features)}, attention {attn.get_backend()}")
    head.train()

    def step_fn(b, step, micro, sync, poison):
        x0, x1 = b["views"]
        with autocast(cfg, di.device):
            p0, p1, z0, z1 = ddp(x0, x1)
        z0, z1 = F.normalize(z0.float(), dim=1), F.normalize(z1.float(), dim=1)
        g = step_generator(cfg, stage, step)
        n = z0.shape[0]   # both views in one lookup: the queue is read once (same picks as two calls: one CPU stream)
        nn, i = queue.lookup(torch.cat([z0, z1]), torch.cat([b["idx"], b["idx"]]), s.topk, generator=g)
        nn0, nn1, i0 = nn[:n], nn[n:], i[:n]
        # view 0's picked neighbour, as the published metric (index -1: no admissible neighbour, never a match)
        nn_acc = None if not labelled else ((queue.labels[i0.clamp(min=0)] == b["label"]) & (i0 >= 0)).float().mean()
        loss = nnclr_loss(nn0.float(), nn1.float(), p0, p1, s.tau)
        if poison:
            loss = loss * float("nan")
        loss.backward()
        return loss.detach(), (z0, nn_acc)

    nn_epoch = torch.zeros(2, device=di.device)   # (sum of nn_acc, steps) since the last monitor: neighbour quality
    if resume is not None and "nn_epoch" in resume:
        nn_epoch.copy_(resume["nn_epoch"])

    def post_fn(b, extras, taken):
        z0, nn_acc = extras
        if nn_acc is not None:   # None: unlabelled training data (nn_acc off)
            nn_epoch.add_(torch.where(taken, torch.stack([nn_acc, torch.ones_like(nn_acc)]), 0.0))
        queue.enqueue(dist.all_gather(z0), dist.all_gather(b["idx"]), dist.all_gather(b["label"]), taken)
        if ct:
            head.update_target(cfg.ct.target_ema, taken)
            ema_update(ema_params, cfg.ct.encoder_ema, taken)
        return nn_acc

    def state_fn():
        st = {"model": encoder.state_dict(), "head": head.state_dict(), "queue": queue.state_dict(),
              "optimizer": opt.state_dict(), "nn_epoch": nn_epoch.cpu()}
        if ema is not None:
            st["model_ema"] = ema.state_dict()
        return st

    def after_epoch(epoch, step, meter):
        """Quick k-NN of the encoder, and neighbour quality: how often view 0's picked neighbour has the query's
        label (nn_acc, mean over the steps since the last monitor) and the k-NN accuracy of the (target)
        projector's normalised output, the space the queue lookups run in."""
        tot = dist.all_reduce_mean(nn_epoch)   # every rank's share of the global batch (collective: all ranks)
        nn_mean = float(tot[0] / tot[1].clamp_min(1))
        nn_epoch.zero_()
        if monitor is not None and (ct or epoch == 1):
            feats = monitor.features(ema if (ema is not None and cfg.eval.use_ema) else encoder, cfg.model.pool)
            if feats is None:   # non-finite features: the count in the log, null (not NaN) in the JSONL
                e = monitor.error
                log.warning(f"[{stage}] epoch {epoch}: quick k-NN not computed: {e}")
                meter.write({"step": step, "epoch": epoch, "knn_acc": None,
                             "knn_nonfinite_rows": {k: list(v) for k, v in e.counts.items()}})
                return
            acc = monitor.knn(*feats)
            proj = head.target_projector if head.target_projector is not None else head.projector
            zacc = monitor.knn(*projected(proj, feats))
            nn_txt = f"nn_acc {nn_mean:.3f} (view 0's picked neighbour shares the query's label)" if labelled \
                else "nn_acc off (unlabelled training data)"
            log.info(f"[{stage}] epoch {epoch}: quick k-NN (k={cfg.eval.knn_k}) {acc:.2f}% | neighbour quality: "
                     f"{nn_txt}, {'target ' if ct else ''}projector k-NN {zacc:.2f}%")
            meter.write({"step": step, "epoch": epoch, "knn_acc": acc, "nn_acc_epoch": nn_mean if labelled else None,
                         "proj_knn_acc": zacc})

    meter = Meter(out, stage, total, s.batch_size, cfg.log_every, di.is_main)
    return train_loop(cfg, di, stage, loader, total=total, warm=warm, accum=1, opt=opt, lrs=lrs, step_fn=step_fn,
                      post_fn=post_fn, state_fn=state_fn, ckpts=ckpts, meter=meter, resume=resume,
                      after_epoch=after_epoch, running_stats=running_stats(head))


# ------------------------------------------------------------------------------------------------ entry
_said: set[str] = set()


def log_once(msg: str) -> None:
    """Log msg the first time only (a pipeline runs head and ct with the same data)."""
    if msg not in _said:
        _said.add(msg)
        log.info(msg)


def setup_logging(main: bool) -> None:
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout, force=True)


def run(cfg: C.Config) -> dict:
    di = dist.init(cfg.device)
    setup_logging(di.is_main)
    why = check_source(cfg.data.name, cfg.data.root, cfg.data.labels)   # data paths, before any work
    if why:
        raise C.ConfigError(why)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    attn.set_backend(cfg.model.attention)
    os.makedirs(cfg.out_dir, exist_ok=True)
    if di.is_main:
        C.dump(cfg, os.path.join(cfg.out_dir, "config.yaml"))
    loggers.start(cfg, di.is_main)      # log.tensorboard / log.wandb (rank 0); closed at the end of run / main
    log.info(f"maect {code_version()} | stage {cfg.stage} | device {di.device} x {di.world} ranks | torch {torch.__version__} "
             f"| threads {torch.get_num_threads()} | out {cfg.out_dir}")
    results, times = {}, {}
    need_monitor = cfg.stage in ("head", "ct", "pipeline", "ct_pipeline")
    # open the data once (the training split with data.labels: nn_acc reads them; the k-NN splits on every rank, so
    # that every rank runs the same checks), and check all that depends on its size before any model or step
    d = cfg.data
    train, bank, queries, no_labels = load_data(d.name, d.root, "train", d.labels), None, None, None
    if need_monitor:
        try:
            bank, queries = (load_eval_data(d.name, d.root, split, d.labels) for split in ("train", "test"))
        except NoLabels as e:
            no_labels = str(e)
            log_once(f"k-NN monitor and final k-NN off: {e}")
    validate_data(cfg, di.world, len(train), *((len(queries), len(bank)) if bank is not None else ()))
    monitor = (KNNMonitor(cfg, di.device, cfg.eval.monitor_train, cfg.eval.monitor_test, bank, queries)
               if bank is not None and di.is_main else None)
    init = cfg.init
    for stage in C.stages(cfg):
        t0 = time.time()
        # every stage starts from the same global RNG state (the head's initialisation draws from it), so a
        # pipeline gives exactly what its stages run one by one with init= give
        torch.manual_seed(cfg.seed)
        done = os.path.join(cfg.out_dir, stage, "checkpoint-final.pth")
        if cfg.resume == "auto" and os.path.exists(done):
            log.info(f"[{stage}] already finished ({done}); resume=auto skips it")
            init = done
        elif stage == "mae":
            init = run_mae(cfg, di, train)
        else:
            init = run_nnclr(cfg, di, stage, init, monitor, train)
        times[stage] = time.time() - t0
        results[f"{stage}_checkpoint"] = init
        log.info(f"[{stage}] done in {times[stage] / 60:.1f} min -> {init}")
    results["stage_minutes"] = {k: round(v / 60, 2) for k, v in times.items()}
    if cfg.stage in ("pipeline", "ct_pipeline") and di.is_main:
        if no_labels is None:   # without labels results.json holds the checkpoints and times only
            final = KNNMonitor(cfg, di.device, cfg.eval.final_train, cfg.eval.final_test, bank, queries, strict=True)
            before = results.get("mae_checkpoint") or cfg.init
            s = {name: summarize({name: final_knn(final, cfg, di, path, ema, progress=f"final k-NN: {name}")},
                                 k=cfg.eval.knn_k, T=cfg.eval.knn_T, num_classes=final.num_classes)[name]
                 for name, path, ema in (("MAE", before, False), ("MAE-CT", init, cfg.eval.use_ema))}  # one at a time
            results.update(knn_mae=s["MAE"]["knn"], knn_maect=s["MAE-CT"]["knn"], final=s)
            log.info(format_summary(s, cfg.eval.knn_k, len(final.train), len(final.test), final.num_classes))
        write_json(os.path.join(cfg.out_dir, "results.json"), results)
    loggers.finish()
    return results


def final_knn(final: KNNMonitor, cfg: C.Config, di, path: str, use_ema: bool, progress: str = "") -> tuple:
    """The pipeline's before/after features of one checkpoint (every checkpoint is on disk by now; KNNMonitor.features'
    tuple), with progress lines named `progress`; non-finite features raise NonFiniteFeatures naming the checkpoint."""
    try:
        encoder = hub.load_encoder(path, use_ema=use_ema)[0].to(di.device)
        return final.features(encoder, cfg.model.pool, progress=progress)
    except NonFiniteFeatures as e:
        raise NonFiniteFeatures(f"final k-NN of {path}: {e}", e.counts) from None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = load_config(argv)
    except C.ConfigError as e:
        sys.exit(f"maect.train: {e}")
    try:
        run(cfg)
    except (C.ConfigError, FileNotFoundError, FloatingPointError, DataError, NonFiniteFeatures) as e:
        sys.exit(f"maect.train: {e}")
    finally:
        loggers.finish()
        if dist.is_dist():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
