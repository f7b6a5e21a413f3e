"""Configuration checks: every value or combination that makes a stage impossible or meaningless is a one-line
ConfigError naming the keys, raised before any work starts.

load_config(args)                        maect.config.parse_config then validate_config: what entry points call
validate_config(cfg)                     the config alone
validate_data(cfg, world, n_train, n_test)  against the world size and the data set's size; maect.train runs it right
                                         after opening the data, before any model is built or any step runs
check_tuned_from_block(t, depth, source) ct.tuned_from_block against an encoder's depth (train.py, for init=)

Only the sections of the stages a run executes are checked (stage=mae ignores head.*), and model.* only where the
model is built from it (stage mae / pipeline; stages head and ct take the encoder from init=, and train.py checks
model.img_size / in_chans against it). Every check is written as the condition that must hold, so a NaN value
(every comparison False) fails it too.
"""
from __future__ import annotations

import math

from maect import config as C
from maect.config import Config, ConfigError, CTCfg, EvalCfg, MAECfg, ModelCfg, STAGES, stages


def _need(ok: bool, msg: str) -> None:
    """ok False (NaN comparisons are False too, so a NaN value fails every check) -> ConfigError(msg)."""
    if not ok:
        raise ConfigError(msg)


def _positive(key: str, v: float) -> None:
    _need(math.isfinite(v) and v > 0, f"{key}={v} must be a positive finite number")


def _non_negative(key: str, v: float) -> None:
    _need(math.isfinite(v) and v >= 0, f"{key}={v} must be a finite number >= 0")


def load_config(args: list[str]) -> Config:
    """A checked Config from ['preset=tiny', 'ct.epochs=3', ...]: maect.config.parse_config (keys, types, presets),
    then validate_config. ConfigError naming the key otherwise."""
    cfg = C.parse_config(args)
    validate_config(cfg)
    return cfg


def validate_config(cfg: Config) -> None:
    """Every value or combination that makes a stage impossible or meaningless, caught before any work starts, as a
    one-line ConfigError naming the keys. Only the sections of the stages this run executes are checked (stage=mae
    ignores head.*). The checks that need the world size or the data set's size are in validate_data, which
    maect.train runs right after opening the data."""
    _check_choices(cfg)
    _check_run(cfg)
    _check_model_keys(cfg.model)
    run = stages(cfg)
    depth = None
    if "mae" in run:   # the model is built from model.* (stages head/ct take the encoder from init=)
        _check_mae(cfg.mae)                  # first: mask_ratio in [0, 1) (and not NaN) before it counts patches
        depth = _check_model(cfg.model, cfg.mae.mask_ratio)
    for name in ("head", "ct"):
        if name in run:
            _check_nnclr_stage(cfg, name)
    if "ct" in run:
        _check_ct(cfg.ct, depth)
    if "head" in run or "ct" in run:
        _check_eval(cfg.eval, final=cfg.stage in ("pipeline", "ct_pipeline"))


FUSED = ("auto", "apex", "torch", "off")           # maect.optim.build_optimizer's
YAML_SWITCHES = ("true", "false", "yes", "no", "on", "off", "y", "n", "1", "0", "none", "null")
WANDB_FORBIDDEN = ("/", "\\", "#", "?", "%", ":")  # characters W&B refuses in a project name


def _check_choices(cfg: Config) -> None:
    _need(cfg.stage in STAGES, f"stage={cfg.stage!r}: choose one of {STAGES}")
    from maect.models.attention import BACKENDS
    _need(cfg.model.attention in BACKENDS, f"model.attention={cfg.model.attention!r}: choose one of {BACKENDS}")
    _need(cfg.model.compile_mode in C.COMPILE_MODES,
          f"model.compile_mode={cfg.model.compile_mode!r}: choose one of {C.COMPILE_MODES}")
    _need(cfg.model.pool in ("mean", "cls"), f"model.pool={cfg.model.pool!r}: choose 'mean' or 'cls'")
    _need(cfg.data.loader in ("auto", "cpu", "dali"), f"data.loader={cfg.data.loader!r}: choose auto, cpu or dali")
    from maect.dataloading.datasets import SOURCES     # paths are checked when a run starts (datasets.check_source)
    _need(cfg.data.name in SOURCES, f"data.name={cfg.data.name!r}: choose one of {', '.join(SOURCES)}")
    _need(not cfg.data.labels or cfg.data.name in ("folder", "filelist", "wds"),
          f"data.labels={cfg.data.labels!r} is for data.name=folder|filelist|wds ({cfg.data.name} has its own labels)")
    _need(cfg.data.shuffle_buffer >= 1, f"data.shuffle_buffer={cfg.data.shuffle_buffer} must be >= 1")
    _need(cfg.device in ("auto", "cpu", "cuda"), f"device={cfg.device!r}: choose auto, cpu or cuda")
    _need(cfg.precision in ("auto", "bf16", "fp32"), f"precision={cfg.precision!r}: choose auto, bf16 or fp32")
    _need(cfg.fused_optimizer in FUSED, f"fused_optimizer={cfg.fused_optimizer!r}: choose one of {', '.join(FUSED)}")
    _need(bool(cfg.out_dir.strip()), "out_dir='' : name the run's output folder (e.g. out_dir=runs/tiny)")
    _need(cfg.log.wandb.lower() not in YAML_SWITCHES, f"log.wandb={cfg.log.wandb!r} is a switch word, not a W&B "
                                                      f"project name: log.wandb= (empty) turns W&B off, "
                                                      f"log.wandb=PROJECT turns it on")
    bad = sorted(set(cfg.log.wandb) & set(WANDB_FORBIDDEN))
    _need(not bad and len(cfg.log.wandb) <= 128, f"log.wandb={cfg.log.wandb!r}: a W&B project name has at most 128 "
                                                  f"characters, none of {' '.join(WANDB_FORBIDDEN)} ('' turns W&B off)")
    _need(cfg.resume in ("", "auto"),
          f"resume={cfg.resume!r}: use resume=auto (continue from out_dir's latest checkpoints)")
    _need(bool(cfg.init) or cfg.stage not in ("head", "ct", "ct_pipeline"),
          f"stage={cfg.stage} needs init=CHECKPOINT (an MAE, official MAE/timm or head checkpoint)")


def _check_run(cfg: Config) -> None:
    # the per-step generators are seeded with seed x ~8e13 + ... (dataloading.loader's per-image crops, the largest
    # factor), which torch.Generator.manual_seed must take as a 64-bit integer: seed < 2^17 keeps every one in range
    _need(0 <= cfg.seed < 2 ** 17, f"seed={cfg.seed} must lie in [0, {2 ** 17}): the per-step generator seeds derived "
                                   f"from it must fit in 64 bits")
    _need(cfg.log_every >= 1, f"log_every={cfg.log_every} must be >= 1 (steps between progress lines)")
    _need(cfg.signal_every >= 1, f"signal_every={cfg.signal_every} must be >= 1 (steps between stop-flag checks)")
    _need(cfg.max_skips >= 0, f"max_skips={cfg.max_skips} must be >= 0 (non-finite steps tolerated in a row)")
    for key in ("ckpt_every", "ckpt_epochs", "keep_last", "threads", "smoke"):
        _need(getattr(cfg, key) >= 0, f"{key}={getattr(cfg, key)} must be >= 0")
    _need(cfg.data.num_workers >= 0, f"data.num_workers={cfg.data.num_workers} must be >= 0")
    _need(0 <= cfg.data.dali_hw_decoder_load <= 1,
          f"data.dali_hw_decoder_load={cfg.data.dali_hw_decoder_load} must be in [0, 1]")
    _need(0 < cfg.kernels.budget_s < float("inf"),
          f"kernels.budget_s={cfg.kernels.budget_s} must be a positive number of seconds (timing per decision)")
    from maect.kernels import dispatch
    for op in ("queue_topk", "masked_patch_embed", "decoder_input"):
        names = ("auto",) + dispatch.get(op).names()
        name = getattr(cfg.kernels, op)
        _need(name in names, f"kernels.{op}={name!r}: choose one of {names}")


def _check_model_keys(m: ModelCfg) -> None:
    """The model.* keys every stage reads (stages head / ct compare them with init's encoder: stage_init)."""
    from maect.models.vit import ARCHS
    _need(m.arch == "custom" or m.arch in ARCHS, f"model.arch={m.arch!r}: choose one of {sorted(ARCHS)} or 'custom'")
    for k in ("patch_size", "embed_dim", "depth", "num_heads"):
        _need(getattr(m, k) >= 0, f"model.{k}={getattr(m, k)} must be >= 0 (0: the arch's own)")
    for k in ("img_size", "in_chans"):
        _need(getattr(m, k) >= 1, f"model.{k}={getattr(m, k)} must be >= 1")


def _check_model(m: ModelCfg, mask_ratio: float) -> int:
    """The encoder + decoder model.* describes (the arch's sizes where a key is 0) can be built and trained with
    mae.mask_ratio. Returns the encoder depth."""
    from maect.models.vit import ARCHS
    _need(m.arch == "custom" or m.arch in ARCHS, f"model.arch={m.arch!r}: choose one of {sorted(ARCHS)} or 'custom'")
    keys = ("patch_size", "embed_dim", "depth", "num_heads")          # 0: the arch's own
    for k in keys:
        _need(getattr(m, k) >= 0, f"model.{k}={getattr(m, k)} must be >= 0 (0: the arch's own)")
    base = ARCHS.get(m.arch, (0,) * 8)
    patch, dim, depth, heads = (getattr(m, k) or b for k, b in zip(keys, base[1:5]))
    missing = [f"model.{k}" for k, v in zip(keys, (patch, dim, depth, heads)) if v == 0]
    _need(not missing, f"model.arch=custom needs {', '.join(missing)}")
    for k in ("img_size", "in_chans", "decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
        _need(getattr(m, k) >= 1, f"model.{k}={getattr(m, k)} must be >= 1 (stage mae trains the decoder too)")
    _need(m.img_size % patch == 0, f"model.img_size={m.img_size} is not divisible by the patch size {patch} "
                                   f"(model.patch_size / model.arch={m.arch})")
    for d, h, what in ((dim, heads, "embed_dim"), (m.decoder_embed_dim, m.decoder_num_heads, "decoder_embed_dim")):
        hk = "num_heads" if what == "embed_dim" else "decoder_num_heads"
        _need(d % h == 0, f"model.{what}={d} is not divisible by model.{hk}={h}")
        _need(d % 4 == 0, f"model.{what}={d} must be divisible by 4 (2-D sin-cos position embedding)")
    L = (m.img_size // patch) ** 2
    keep = int(L * (1 - float(mask_ratio)))        # kernels.ops.random_masking's len_keep
    _need(1 <= keep < L, f"mae.mask_ratio={mask_ratio} keeps {keep} of the {L} patches "
                         f"(model.img_size={m.img_size} / patch {patch}): MAE needs at least one kept and one "
                         f"masked patch")
    return depth


def _check_mae(s: MAECfg) -> None:
    _need(0.0 <= s.mask_ratio < 1.0, f"mae.mask_ratio={s.mask_ratio} must be in [0, 1)")
    _positive("mae.epochs", s.epochs)
    _need(0 <= s.warmup_epochs < s.epochs, f"mae.warmup_epochs={s.warmup_epochs} must be >= 0 and below mae.epochs="
                                           f"{s.epochs} (the lr must reach its peak before the run ends, then decay): "
                                           f"shorten mae.warmup_epochs with mae.epochs")
    _need(s.batch_size >= 1, f"mae.batch_size={s.batch_size} must be positive")
    _need(s.accum_steps >= 1, f"mae.accum_steps={s.accum_steps} must be >= 1")
    _need(s.batch_size % s.accum_steps == 0,
          f"mae.batch_size={s.batch_size} must be divisible by mae.accum_steps={s.accum_steps}")
    _positive("mae.blr", s.blr)
    _non_negative("mae.weight_decay", s.weight_decay)
    _need(s.num_views >= 1, f"mae.num_views={s.num_views} must be >= 1")
    _check_crop("mae", s.crop_scale)


def _check_crop(name: str, crop: tuple) -> None:
    lo, hi = crop
    _need(0 < lo <= hi <= 1, f"{name}.crop_scale={crop} must satisfy 0 < min <= max <= 1")


def _check_nnclr_stage(cfg: Config, name: str) -> None:
    s, n = getattr(cfg, name), cfg.nnclr
    for k in ("proj_hidden", "proj_dim", "pred_hidden", "queue_size"):
        _need(getattr(n, k) >= 1, f"nnclr.{k}={getattr(n, k)} must be >= 1")
    _need(n.queue_dtype in ("auto", "fp32", "bf16"), f"nnclr.queue_dtype={n.queue_dtype!r}: choose auto, fp32 or bf16")
    _need(not n.loss_autocast or cfg.precision != "fp32",
          "nnclr.loss_autocast=true computes the NNCLR logits under the run's bf16 autocast, but precision=fp32 has "
          "none: set precision=bf16 (or auto on CUDA), or nnclr.loss_autocast=false")
    _positive(f"{name}.epochs", s.epochs)
    _need(0 <= s.warmup_frac <= 1, f"{name}.warmup_frac={s.warmup_frac} must lie in [0, 1] (a share of the stage)")
    # the head's BatchNorm normalises each view over the global batch (SyncBatchNorm / GlobalBatchNorm1d across
    # ranks), so it needs 2 samples per step whatever the world size; the loaders drop a partial last batch
    _need(s.batch_size >= 2, f"{name}.batch_size={s.batch_size}: the NNCLR head's BatchNorm needs at least 2 samples "
                             f"per view and step (global batch over all ranks)")
    _positive(f"{name}.blr", s.blr)
    _non_negative(f"{name}.weight_decay", s.weight_decay)
    _positive(f"{name}.tau", s.tau)
    _need(1 <= s.topk <= n.queue_size, f"{name}.topk={s.topk} must be between 1 and nnclr.queue_size={n.queue_size}")
    _need(n.queue_size % s.batch_size == 0, f"nnclr.queue_size={n.queue_size} must be divisible by the global batch "
                                            f"{name}.batch_size={s.batch_size} (FIFO enqueue of whole global batches)")
    _check_crop(name, s.crop_scale)


def _check_ct(s: CTCfg, depth: int | None) -> None:
    """depth: the encoder's, when the config decides it (stage pipeline); else train.py checks it against init."""
    _positive("ct.head_blr", s.head_blr)
    _non_negative("ct.head_weight_decay", s.head_weight_decay)
    for k in ("target_ema", "encoder_ema"):
        _need(0 <= getattr(s, k) <= 1, f"ct.{k}={getattr(s, k)} must lie in [0, 1] (EMA momentum)")
    _need(0 < s.llrd <= 1, f"ct.llrd={s.llrd} must lie in (0, 1] (layer-wise lr decay factor)")
    _need(s.tuned_from_block >= -1, f"ct.tuned_from_block={s.tuned_from_block} must be -1 (depth // 2) or a block")
    if depth is not None:
        check_tuned_from_block(s.tuned_from_block, depth, "model.depth")


def check_tuned_from_block(t: int, depth: int, source: str) -> None:
    """ct.tuned_from_block (-1: depth // 2) must name one of the encoder's blocks, so that at least one block trains."""
    _need(-1 <= t < depth, f"ct.tuned_from_block={t} must be -1 or in [0, {depth - 1}]: the encoder has {depth} "
                           f"blocks ({source})")


def _check_eval(e: EvalCfg, final: bool) -> None:
    from maect.eval.knn import min_temperature
    _need(e.knn_k >= 1, f"eval.knn_k={e.knn_k} must be >= 1")
    _need(math.isfinite(e.knn_T), f"eval.knn_T={e.knn_T} must be finite")
    _need(e.knn_T > min_temperature(e.knn_k), f"eval.knn_T={e.knn_T} must exceed {min_temperature(e.knn_k):.4f}: "
                                              f"exp(s / T) over eval.knn_k={e.knn_k} neighbours overflows float32")
    banks = ("monitor", "final") if final else ("monitor",)
    for b in banks:
        n_tr, n_te = getattr(e, f"{b}_train"), getattr(e, f"{b}_test")
        _need(n_tr >= 0 and n_te >= 0, f"eval.{b}_train={n_tr} and eval.{b}_test={n_te} must be >= 0 (0: whole split)")
        _need(not 0 < n_tr < e.knn_k, f"eval.{b}_train={n_tr} is smaller than eval.knn_k={e.knn_k}: the {b} k-NN "
                                      f"bank needs at least k samples")


def validate_data(cfg: Config, world: int, n_train: int, n_test: int | None = None,
                  n_eval_train: int | None = None) -> None:
    """The checks that need the world size and the size of the data: n_train training samples (before any corrupt
    file is skipped); n_test test samples and n_eval_train samples in the k-NN bank's split (default n_train; it
    differs for folder / filelist sources, whose k-NN splits come from data.labels), both None when no k-NN runs.
    maect.train runs them right after opening the data, before any model is built or any step runs."""
    run = stages(cfg)
    where = f"data.name={cfg.data.name}" + (f" data.root={cfg.data.root}" if cfg.data.root else "")
    for name in run:
        s = getattr(cfg, name)
        accum = s.accum_steps if name == "mae" else 1
        _need(s.batch_size % (world * accum) == 0, f"{name}.batch_size={s.batch_size} must be divisible by world size "
                                                   f"{world}" + (f" x mae.accum_steps {accum}" if accum > 1 else ""))
        _need(s.batch_size <= n_train, f"{name}.batch_size={s.batch_size} exceeds the {n_train} training samples "
                                       f"({where}): an epoch would have no step")
        if name in ("head", "ct"):   # the rule of heads.FeatureQueue.check_admissible
            Q = cfg.nnclr.queue_size
            per_id = -(-Q // n_train)
            _need(Q - per_id >= s.topk, f"nnclr.queue_size={Q} over {n_train} training samples holds up to {per_id} "
                                        f"entries of one sample, leaving {Q - per_id} < {name}.topk={s.topk} "
                                        f"neighbours that are not the query itself; enlarge nnclr.queue_size")
    if n_test is None:          # no k-NN monitor (stage mae, or a source without labels)
        return
    n_bank = n_train if n_eval_train is None else n_eval_train
    banks = (("monitor",) if "head" in run or "ct" in run else ()) + \
        (("final",) if cfg.stage in ("pipeline", "ct_pipeline") else ())
    for b in banks:
        n_tr = getattr(cfg.eval, f"{b}_train")
        bank = min(n_tr, n_bank) if n_tr > 0 else n_bank
        _need(bank >= cfg.eval.knn_k, f"eval.knn_k={cfg.eval.knn_k} exceeds the {b} k-NN bank of {bank} samples "
                                      f"(eval.{b}_train={n_tr}, {n_bank} in the train split of {where})")
        _need(n_test >= 1, f"the test split of {where} is empty: the {b} k-NN has no query")
