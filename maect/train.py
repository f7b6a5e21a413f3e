"""One entry point for every stage:  torchrun [--nproc_per_node=N] -m maect.train preset=tiny [key=value ...]

stage=mae       MAE pretraining (stage 1)
stage=head      NNCLR head initialisation, encoder frozen (stage 2), from init=CKPT
stage=ct        contrastive tuning of the upper blocks (stage 3), from init=CKPT (a head checkpoint)
stage=pipeline  mae -> head -> ct, each from the previous stage's checkpoint, then k-NN before/after
stage=ct_pipeline  head -> ct from init=CKPT (an MAE / official checkpoint)
Layers (FAIR MAE's main -> engine -> model): this file sets each stage up and runs its epochs; maect.engine holds
one epoch's loop and the steps; maect.steplog the host side (log lines, checkpoints, stop requests).
SIGUSR2 / SIGTERM: the checkpoint of the next step boundary, then exit status 75 (maect.preempt; docs/reliability.md).
Outputs in out_dir/<stage>/: checkpoint-latest.pth (each epoch), checkpoint-final.pth, metrics.jsonl, config.yaml.
"""
from __future__ import annotations

import copy
import logging
import os
import sys
import time

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from maect.dataloading import DataError, NoLabels, build_loader, load_data, load_eval_data
from maect.dataloading.datasets import check_source
from maect import config as C
from maect import backends, dist, hub, loggers, preempt
from maect.atomic import write_json
from maect.checkpoint import (Checkpoints, check_resume_config, check_resume_run, code_version, set_rng_state,
                              unreadable)
from maect.engine import (NNCLRNet, autocast, ema_pairs, ema_update, mae_one_epoch, nnclr_one_epoch,  # noqa: F401
                          optimizer_step, running_stats, step_generator, uses_bf16)
from maect.eval.features import NonFiniteFeatures
from maect.eval.monitor import KNNMonitor, projected
from maect.eval.summary import format_summary, summarize
from maect.models.vit import num_params
from maect.optim import build_optimizer, can_skip_on_device, freeze, llrd_scale, param_groups, warmup_steps
from maect.steplog import Meter, Tracker  # noqa: F401  (Meter: re-exported for callers of maect.train)
from maect.stage_init import check_encoder, load_for_nnclr, load_head, shape_mismatch
from maect.validation import load_config, validate_data

log = logging.getLogger("maect")


# ------------------------------------------------------------------------------------------------ setup pieces
def stage_dir(cfg: C.Config, stage: str) -> str:
    d = os.path.join(cfg.out_dir, stage)
    os.makedirs(d, exist_ok=True)
    return d


def check_out_dir(cfg: C.Config) -> None:
    """out_dir and the folders a run writes in it (a folder per stage, tb/ and wandb/ for the loggers) are folders
    this process can write, before any work: ConfigError naming the path otherwise."""
    sub = list(C.stages(cfg)) + (["tb"] if cfg.log.tensorboard else []) + (["wandb"] if cfg.log.wandb else [])
    for p in [cfg.out_dir] + [os.path.join(cfg.out_dir, d) for d in sub]:
        if os.path.exists(p) and not os.path.isdir(p):
            raise C.ConfigError(f"out_dir={cfg.out_dir}: {p} is a file, not a folder")
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
    except OSError as exc:
        raise C.ConfigError(f"out_dir={cfg.out_dir}: cannot create the folder ({exc.strerror})") from None
    if not os.access(cfg.out_dir, os.W_OK | os.X_OK):
        raise C.ConfigError(f"out_dir={cfg.out_dir}: the folder is not writable")


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
        try:
            sd, _, _ = hub.find_state_dict(hub.load_checkpoint(cfg.init))
            enc_keys = [k for k in model.state_dict() if not (k.startswith("decoder") or k == "mask_token")]
            enc, rep = hub.convert_state_dict(sd, enc_keys)
        except (ValueError, KeyError) as exc:
            raise C.ConfigError(f"init={cfg.init}: {str(exc).splitlines()[0]}") from None
        dec = {k: v for k, v in sd.items() if k.startswith("decoder") or k == "mask_token"}
        bad = shape_mismatch({**enc, **dec}, model.state_dict())
        if bad:
            raise C.ConfigError(f"init={cfg.init} does not fit the model.* of this run ({bad}): set model.* (or the "
                                f"preset) to the size it was trained with")
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
    spe = len(loader) // s.accum_steps       # optimizer steps per epoch (a partial window is dropped: engine)
    if spe == 0:
        raise DataError(f"mae.accum_steps={s.accum_steps}: an epoch has {len(loader)} micro-batches of {micro} x "
                        f"{di.world} ranks (after skipped files), fewer than one accumulation window")
    total = cfg.smoke or max(1, round(s.epochs * spe))   # smoke=N: N steps (config.apply_smoke)
    warm = warmup_steps(s.warmup_epochs * spe)        # published: whole warmup epochs x updates per epoch
    log.info(f"[mae] {num_params(model) / 1e6:.2f}M params, global batch {s.batch_size} ({micro}/rank x "
             f"{di.world} ranks x {s.accum_steps} accum), {s.num_views} view(s), lr {lr:.3g}, {total} steps, "
             f"optimizer {opt_name}, loader {loader.backend}")
    model.train()
    t = Tracker(cfg, di, "mae", total=total, warm=warm, opt=opt, ckpts=ckpts, state={"model": model, "optimizer": opt},
                meter=Meter(out, "mae", total, s.batch_size, cfg.log_every, di.is_main), resume=resume, nn_acc=False,
                on_device=can_skip_on_device(opt))
    while t.step < total:
        loader.set_epoch(t.epoch, t.in_epoch)
        ended = mae_one_epoch(ddp, opt, loader, t, lr=lr, cfg=cfg, L=model.patch_embed.num_patches)
        if t.stop and t.step < total:     # a stop request (maect.preempt): checkpoint, then out
            raise t.preempted()
        if ended:
            t.end_epoch()
    path = t.save_final()
    t.meter.close()
    return path


# ------------------------------------------------------------------------------------------------ stages 2, 3
def ct_trainable(encoder: nn.Module, t: int) -> None:
    """Stage 3's trainable set: blocks t.. and the final norm (requires_grad); the rest is left as it is."""
    for name, p in encoder.named_parameters():
        if name.startswith("norm.") or (name.startswith("blocks.") and int(name.split(".")[1]) >= t):
            p.requires_grad_(True)


def nnclr_optimizer(cfg: C.Config, s, encoder, head, ct: bool, device):
    """SPEC: lr = blr x 2 views x global batch / 256 (head: ct.head_blr in stage 3); stage 3's encoder groups with
    layer-wise lr decay ct.llrd. Returns (optimizer, its name, lrs by group tag)."""
    scale = 2 * s.batch_size / 256
    lrs = {"enc": s.blr * scale, "head": (cfg.ct.head_blr if ct else s.blr) * scale}
    groups = param_groups(head.named_parameters(), cfg.ct.head_weight_decay if ct else s.weight_decay, tag="head")
    if ct:
        groups += param_groups(encoder.named_parameters(), s.weight_decay,
                               lambda n: llrd_scale(n, encoder.depth, cfg.ct.llrd), tag="enc")
    opt, name = build_optimizer(groups, 1.0, fused=cfg.fused_optimizer, device=device)
    return opt, name, lrs


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
        ct_trainable(encoder, t)
        if head.target_projector is None:
            head.add_target()
    encoder.eval()  # frozen part in eval mode; no dropout/drop-path anywhere, so the trained part is unaffected
    ema = copy.deepcopy(encoder).requires_grad_(False) if ct else None
    if di.world > 1:
        head = dist.sync_batchnorm(head, di.device)
    net = NNCLRNet(encoder, head, t, cfg.model.pool, encoder_frozen=not ct)
    maybe_compile(cfg, encoder)
    ddp = DDP(net, gradient_as_bucket_view=True) if di.world > 1 else net

    n_rank = per_rank(s.batch_size, di.world, f"{stage}.batch_size")
    labelled = data.has_labels      # nn_acc compares a sample's label with its queue neighbour's
    if not labelled and di.is_main:
        why = ("samples have no cls member (data.name=wds)" if cfg.data.name == "wds" else
               f"training files have no label (data.name={cfg.data.name}" +
               (f", data.labels={cfg.data.labels})" if cfg.data.labels else "; set data.labels=DIR|CSV to turn it on)"))
        log_once(f"nn_acc monitor off: {int((data.labels < 0).sum())} of {len(data)} {why}")
    queue.check_admissible(s.topk, len(data))
    # MAE-CTaug (ct.aug) augments stage 2's views too: the published recipe trains the head on them
    loader = make_loader(cfg, di, data, s, 2, cfg.ct.aug, n_rank)
    opt, opt_name, lrs = nnclr_optimizer(cfg, s, encoder, head, ct, di.device)
    nn_sum = torch.zeros(2, device=di.device)   # (sum of nn_acc, steps) since the last monitor: neighbour quality
    resume = stage_resume(cfg, ckpts)
    if resume is not None:
        encoder.load_state_dict(resume["model"])
        load_head(head, resume["head"])
        queue.load_state_dict(resume["queue"])
        opt.load_state_dict(resume["optimizer"])
        if ema is not None:
            ema.load_state_dict(resume["model_ema"])
        if "nn_epoch" in resume:
            nn_sum.copy_(resume["nn_epoch"])
    total = cfg.smoke or max(1, round(s.epochs * len(loader)))   # smoke=N: N steps (config.apply_smoke)
    warm = warmup_steps(s.warmup_frac * total)        # published: floor(0.2 total)
    n_enc = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    log.info(f"[{stage}] trainable: head {num_params(head, True) / 1e6:.2f}M, encoder {n_enc / 1e6:.2f}M "
             f"(blocks {t}..{depth - 1} + norm)" if ct else f"[{stage}] encoder frozen; head {num_params(head, True) / 1e6:.2f}M")
    log.info(f"[{stage}] global batch {s.batch_size}, lr enc {lrs['enc']:.3g} head {lrs['head']:.3g}, tau {s.tau}, "
             f"top-k {s.topk}, queue {queue.size}, {total} steps, "
             f"views {'MAE-CTaug colour' if cfg.ct.aug else 'crop+flip'}, "
             f"optimizer {opt_name}, loader {loader.backend}, queue {queue.features.dtype}, "
             f"logits {'bf16' if cfg.nnclr.loss_autocast and uses_bf16(cfg.precision, di.device) else 'fp32'}")
    head.train()
    meter = Meter(out, stage, total, s.batch_size, cfg.log_every, di.is_main)
    state = {"model": encoder, "head": head, "queue": queue, "optimizer": opt, "nn_epoch": nn_sum, "model_ema": ema}
    tr = Tracker(cfg, di, stage, total=total, warm=warm, opt=opt, ckpts=ckpts, meter=meter, state=state,
                 resume=resume, nn_acc=labelled, on_device=can_skip_on_device(opt))
    kw = dict(lrs=lrs, s=s, cfg=cfg, bn=running_stats(head), nn_sum=nn_sum,
              ema_params=ema_pairs(ema, encoder) if ct else None, gather=dist.all_gather)
    while tr.step < total:
        loader.set_epoch(tr.epoch, tr.in_epoch)
        ended = nnclr_one_epoch(ddp, head, queue, opt, loader, tr, **kw)
        if tr.stop and tr.step < total:
            raise tr.preempted()
        if ended:
            tr.end_epoch()
            if tr.step < total:
                nnclr_monitor(cfg, tr, monitor, encoder, ema, head, nn_sum, tr.epoch)
    path = tr.save_final()      # on disk before the last monitor runs: a monitor that fails loses no trained work
    nnclr_monitor(cfg, tr, monitor, encoder, ema, head, nn_sum, tr.monitor_epoch(loader))
    meter.close()
    return path


def nnclr_monitor(cfg: C.Config, tr: Tracker, monitor: KNNMonitor | None, encoder, ema, head, nn_sum, epoch) -> None:
    """Quick k-NN of the encoder (its EMA with eval.use_ema), and neighbour quality: how often view 0's picked
    neighbour has the query's label (nn_acc, mean over the steps since the last monitor) and the k-NN accuracy of
    the (target) projector's normalised output, the space the queue lookups run in. Stage 2: its last epoch only."""
    stage, ct, meter, step = tr.stage, tr.stage == "ct", tr.meter, tr.step
    tot = dist.all_reduce_mean(nn_sum)   # every rank's share of the global batch (collective: all ranks)
    nn_mean = float(tot[0] / tot[1].clamp_min(1))
    nn_sum.zero_()
    if monitor is None or not (ct or epoch == 1):
        return
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
    nn_txt = f"nn_acc {nn_mean:.3f} (view 0's picked neighbour shares the query's label)" if tr.nn_acc \
        else "nn_acc off (unlabelled training data)"
    log.info(f"[{stage}] epoch {epoch}: quick k-NN (k={cfg.eval.knn_k}) {acc:.2f}% | neighbour quality: "
             f"{nn_txt}, {'target ' if ct else ''}projector k-NN {zacc:.2f}%")
    meter.write({"step": step, "epoch": epoch, "knn_acc": acc, "nn_acc_epoch": nn_mean if tr.nn_acc else None,
                 "proj_knn_acc": zacc})


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
    """Every stage of cfg.stage in order. SIGUSR2 / SIGTERM from here on only record a stop request, which the
    loop acts on at its next step boundary (maect.preempt): the stage's checkpoint, then preempt.Preempted."""
    preempt.install()
    di = dist.init(cfg.device)
    setup_logging(di.is_main)
    why = check_source(cfg.data.name, cfg.data.root, cfg.data.labels)   # data paths, before any work
    if why:
        raise C.ConfigError(why)
    if cfg.init:
        why = f"{cfg.init!r} does not exist" if not os.path.exists(cfg.init) else unreadable(cfg.init)
        if why:
            raise C.ConfigError(f"init={cfg.init}: {why}")
    check_out_dir(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    check_resume_run(cfg)      # resume=auto: every stage's checkpoint has this config, before config.yaml is written
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
    # every backend decision, before any step: measured (or read from the cache) on rank 0, shared with every rank
    backends.decide_for_run(cfg, di.device, di.world, di.rank, n_train=len(train),
                            n_bank=len(bank) if bank is not None else None,
                            n_query=len(queries) if queries is not None else None)
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
        table, test_feats, shown = "", {}, train
        if no_labels is None:   # without labels results.json holds the checkpoints and times only
            final = KNNMonitor(cfg, di.device, cfg.eval.final_train, cfg.eval.final_test, bank, queries, strict=True)
            before, s, shown = results.get("mae_checkpoint") or cfg.init, {}, final.test
            for name, path, ema in (("MAE", before, False), ("MAE-CT", init, cfg.eval.use_ema)):  # one at a time
                feats = final_knn(final, cfg, di, path, ema, progress=f"final k-NN: {name}")
                test_feats[name] = feats[2]       # the report's clusters and neighbours reuse the test features
                s[name] = summarize({name: feats}, k=cfg.eval.knn_k, T=cfg.eval.knn_T,
                                    num_classes=final.num_classes)[name]
                del feats                         # the bank's features: one encoder's at a time
            results.update(knn_mae=s["MAE"]["knn"], knn_maect=s["MAE-CT"]["knn"], final=s)
            table = format_summary(s, cfg.eval.knn_k, len(final.train), len(final.test), final.num_classes)
        write_json(os.path.join(cfg.out_dir, "results.json"), results)
        report = write_report(cfg, di, results, shown, no_labels is None, test_feats)
        for line in (table, report):      # the report's path beside the closing table
            if line:
                log.info(line)
    loggers.finish()
    return results


def write_report(cfg: C.Config, di, results: dict, data, labelled: bool, feats: dict) -> str:
    """The run's report (maect.viz.run_report: OUT_DIR/report/index.html, clusters and nearest neighbours of the MAE
    and MAE-CT encoders on the final k-NN's test images, reusing their features; unlabelled: up to 10000 training
    images). A view of finished work: when it fails, one warning line, and the run's results stand."""
    from maect.viz import run_report
    if not labelled and len(data) > 10000:
        data = data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:10000].sort().values)
    t0 = time.time()
    try:
        rep = run_report(cfg, di.device, results, data, labelled, feats)
    except Exception as e:  # noqa: BLE001  (checkpoints and results.json are written; the report must not undo that)
        log.warning(f"report not written: {type(e).__name__}: {e}")
        return ""
    return f"report: {rep['path']} (clusters and nearest neighbours of MAE and MAE-CT; made in {time.time() - t0:.1f} s)"


def final_knn(final: KNNMonitor, cfg: C.Config, di, path: str, use_ema: bool, progress: str = "") -> tuple:
    """The pipeline's before/after features of one checkpoint (every checkpoint is on disk by now; KNNMonitor.features'
    tuple), with progress lines named `progress`; non-finite features raise NonFiniteFeatures naming the checkpoint."""
    try:
        encoder = hub.load_encoder(path, use_ema=use_ema)[0].to(di.device)
        return final.features(encoder, cfg.model.pool, progress=progress)
    except NonFiniteFeatures as e:
        raise NonFiniteFeatures(f"final k-NN of {path}: {e}", e.counts) from None


def main(argv: list[str] | None = None, exit_on_stop: bool = True) -> None:
    """The command line. A requested stop (SIGUSR2 / SIGTERM) ends with exit status preempt.REQUEUE_EXIT (75) once
    its checkpoint is written; exit_on_stop=False re-raises preempt.Preempted instead (maect.launch requeues)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = load_config(argv)
    except C.ConfigError as e:
        sys.exit(f"maect.train: {e}")
    try:
        run(cfg)
    except preempt.Preempted as e:
        if not exit_on_stop:
            raise
        print(f"maect.train: {e}", file=sys.stderr, flush=True)
        sys.exit(preempt.REQUEUE_EXIT)
    except (C.ConfigError, FileNotFoundError, FloatingPointError, DataError, NonFiniteFeatures) as e:
        sys.exit(f"maect.train: {e}")
    finally:
        loggers.finish()
        if dist.is_dist():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
