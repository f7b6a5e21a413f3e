"""Configuration: dataclasses with defaults from SPEC, YAML presets (maect/presets/*.yaml) that override some keys,
and `key=value` command-line overrides type-checked against the defaults. Unknown keys are rejected.

Batch sizes are GLOBAL (summed over ranks and gradient-accumulation steps), as in the paper's tables.

This module parses (parse_config: keys and types); the value checks live in maect.validation, which imports this
one, never the other way. Entry points take both at once with maect.validation.load_config.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass

import yaml

PRESET_DIR = os.path.join(os.path.dirname(__file__), "presets")
STAGES = ("mae", "head", "ct", "pipeline", "ct_pipeline")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")   # torch.compile's


@dataclass
class ModelCfg:
    arch: str = "vit_b16"            # vit_b16 | vit_l16 | vit_h16 | vit_h14 | vit_s16 | custom
    img_size: int = 224
    patch_size: int = 0              # 0: the arch's own
    in_chans: int = 3
    embed_dim: int = 0               # 0: the arch's own (required for custom)
    depth: int = 0
    num_heads: int = 0
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    pool: str = "mean"               # head / probe input: 'mean' of patch tokens (B/16, tiny) or 'cls' (L, H)
    attention: str = "auto"          # auto | xformers(_cutlass|_flash) | sdpa | sdpa_flash | sdpa_efficient | sdpa_cudnn | sdpa_math | math
    compile: bool = False            # torch.compile the transformer blocks
    compile_mode: str = "default"    # default | reduce-overhead (CUDA graphs) | max-autotune-no-cudagraphs | max-autotune
    grad_checkpointing: bool = False  # activation checkpointing of the trained blocks (recomputed in backward)


@dataclass
class DataCfg:
    name: str = "fashion_mnist"      # fashion_mnist | imagefolder | folder (unlabelled, any depth) | filelist | wds
    root: str = ""                   # the folder (filelist: the list file; wds: DIR or shard pattern); '' -> fashion-mnist
    labels: str = ""                 # folder/filelist: '' | DIR (train/, val/ class folders) | CSV path,label[,split];
                                     # wds: the evaluation shards (pattern) when root is a pattern (DIR: DIR/val-*.tar)
    loader: str = "auto"             # auto | cpu | dali
    num_workers: int = 0             # DALI threads (0: 4) / decode workers
    skip_corrupt: bool = False       # bad image files: False -> stop naming them; True -> skip and log a count
    dali_hw_decoder_load: float = 0.65  # share of JPEG decoding on the hardware decoder (A100/H100 nvJPEG)
    shuffle_buffer: int = 1000       # wds: samples in each loader worker's shuffle buffer
    antialias: bool = True           # crop resize: antialiased bicubic as PIL's (published); False: the former
                                     # unfiltered grid_sample bicubic (aliases when a crop is downscaled)


@dataclass
class MAECfg:                        # stage 1
    epochs: float = 800
    warmup_epochs: float = 40
    batch_size: int = 4096
    accum_steps: int = 1             # micro-batches per step; an epoch's last (micro-batches mod accum_steps) are dropped
    blr: float = 1.5e-4              # lr = blr * num_views * batch_size / 256 (the published code counts views)
    weight_decay: float = 0.05
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    crop_scale: tuple = (0.2, 1.0)
    num_views: int = 1               # official MAE: 1; the MAE-CT authors' retrained B/L/H: 2


@dataclass
class NNCLRCfg:                      # head and queue, shared by stages 2 and 3
    proj_hidden: int = 2048
    proj_dim: int = 256
    pred_hidden: int = 4096
    queue_size: int = 65536
    queue_dtype: str = "auto"        # auto (bf16 on CUDA, fp32 on CPU), fp32, bf16: storage of the queue's features
    loss_autocast: bool = False      # the NNCLR logits under the run's bf16 autocast (published); False: fp32 logits


@dataclass
class HeadCfg:                       # stage 2: NNCLR head initialisation, encoder frozen
    epochs: float = 20
    warmup_frac: float = 0.2
    batch_size: int = 1024
    blr: float = 1e-4                # lr = blr * 2 * batch_size / 256
    weight_decay: float = 1e-5
    tau: float = 0.15
    topk: int = 1
    crop_scale: tuple = (0.08, 1.0)


@dataclass
class CTCfg:                         # stage 3: contrastive tuning
    epochs: float = 20
    warmup_frac: float = 0.2
    batch_size: int = 1024
    blr: float = 1e-4                # encoder: lr = blr * 2 * batch_size / 256, times LLRD factors
    weight_decay: float = 0.05
    head_blr: float = 1e-4           # 5e-4 for MAE-CTaug
    head_weight_decay: float = 1e-5
    tau: float = 0.15
    topk: int = 20
    target_ema: float = 0.99
    encoder_ema: float = 0.9999
    llrd: float = 0.65
    tuned_from_block: int = -1       # first trained block; -1: depth // 2 (the upper half)
    aug: bool = False                # MAE-CTaug: SPEC's asymmetric colour augmentations, in stage 2 too (published)
    crop_scale: tuple = (0.08, 1.0)


@dataclass
class EvalCfg:                       # the monitors and the pipeline's before/after k-NN
    knn_k: int = 20
    knn_T: float = 0.07
    monitor_train: int = 10000       # bank size for the per-epoch k-NN monitor
    monitor_test: int = 2000
    final_train: int = 0             # 0: the whole train split for the pipeline's final k-NN
    final_test: int = 0
    use_ema: bool = False            # evaluate the EMA encoder instead of the online one


@dataclass
class LogCfg:                        # experiment loggers beside metrics.jsonl (rank 0; maect.loggers)
    tensorboard: bool = False        # event files in out_dir/tb (needs the tensorboard package)
    wandb: str = ""                  # a Weights & Biases project name ('' off; WANDB_MODE=offline needs no network)


@dataclass
class KernelsCfg:                    # backend decisions (kernels/dispatch.py, maect/backends.py), made at start-up
    measure: bool = True             # a decision missing from the cache is measured at start-up; false: static default
    budget_s: float = 1.0            # seconds of timing per decision
    queue_topk: str = "auto"         # auto (the decision) | a backend by name: torch | cpp | triton | ref
    masked_patch_embed: str = "auto"  # auto | ref | cpp | triton | gather | fused
    decoder_input: str = "auto"      # auto | ref | cpp | triton | fused


@dataclass
class Config:
    preset: str = ""
    stage: str = "pipeline"          # mae | head | ct | pipeline (mae -> head -> ct) | ct_pipeline (head -> ct)
    out_dir: str = "runs/default"
    init: str = ""                   # checkpoint to start from (stage head/ct); '' inside a pipeline: previous stage
    seed: int = 0
    device: str = "auto"             # auto | cpu | cuda
    precision: str = "auto"          # auto (bf16 on cuda, fp32 on cpu) | bf16 | fp32
    threads: int = 0                 # CPU threads (0: all cores)
    log_every: int = 20
    fused_optimizer: str = "auto"    # auto | apex | torch | off
    resume: str = ""                 # '' (start fresh) | auto (continue from each stage's latest checkpoint)
    ckpt_every: int = 0              # steps between checkpoints (0: at epoch ends only)
    ckpt_epochs: int = 1             # epochs between end-of-epoch checkpoints (0: none; the final one is always written)
    keep_last: int = 2               # numbered checkpoints kept besides latest/final
    max_skips: int = 5               # consecutive non-finite steps tolerated before the run stops
    signal_every: int = 10           # > 1 rank: steps between the all-reduces of the stop flag (SIGUSR2/SIGTERM)
    smoke: int = 0                   # > 0: a CPU check of any preset: this many steps per stage (apply_smoke)
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    mae: MAECfg = field(default_factory=MAECfg)
    nnclr: NNCLRCfg = field(default_factory=NNCLRCfg)
    head: HeadCfg = field(default_factory=HeadCfg)
    ct: CTCfg = field(default_factory=CTCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    log: LogCfg = field(default_factory=LogCfg)
    kernels: KernelsCfg = field(default_factory=KernelsCfg)


class ConfigError(ValueError):
    pass


def _coerce(key: str, value, default, ftype: str = ""):
    """Convert value to the field's declared type (ftype) or the type of default; ConfigError names the key."""
    if ftype == "float":
        default = float(default)
        if isinstance(value, str):  # YAML 1.1 reads '3e-3' (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key {key!r}: expected true/false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
            value = [yaml.safe_load(v) for v in value]
        if not isinstance(value, (list, tuple)) or len(value) != len(default):
            raise ConfigError(f"config key {key!r}: expected {len(default)} comma-separated numbers, got {value!r}")
        return tuple(_coerce(key, v, d) for v, d in zip(value, default))
    if isinstance(default, str):
        # a bool here is YAML's reading of true/false/yes/no/on/off: never a name or a path (log.wandb=false would
        # be a W&B project named "False"); a list / mapping is not one value
        if isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected a string, got {value!r} (YAML reads an unquoted "
                              f"true/false/yes/no/on/off as a boolean: quote the word, or leave the key empty)")
        if isinstance(value, (list, tuple, dict)):
            raise ConfigError(f"config key {key!r}: expected one string, got {value!r}")
        return "" if value is None else str(value)
    raise ConfigError(f"config key {key!r}: unsupported type {type(default).__name__}")


def _all_keys(obj, prefix="") -> list[str]:
    out = []
    for f in fields(obj):
        v = getattr(obj, f.name)
        out += _all_keys(v, f"{prefix}{f.name}.") if is_dataclass(v) else [prefix + f.name]
    return out


def set_key(cfg: Config, key: str, value) -> None:
    parts, obj = key.split("."), cfg
    for p in parts[:-1]:
        if not (hasattr(obj, p) and is_dataclass(getattr(obj, p))):
            raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(_all_keys(cfg))}")
        obj = getattr(obj, p)
    name = parts[-1]
    if name not in {f.name for f in fields(obj)} or is_dataclass(getattr(obj, name)):
        raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(_all_keys(cfg))}")
    ftype = {f.name: f.type for f in fields(obj)}[name]
    setattr(obj, name, _coerce(key, value, getattr(obj, name), ftype if isinstance(ftype, str) else ftype.__name__))


def _apply_dict(cfg: Config, d: dict, prefix: str = "", source: str = "") -> None:
    for k, v in d.items():
        if isinstance(v, dict):
            _apply_dict(cfg, v, f"{prefix}{k}.", source)
        else:
            try:
                set_key(cfg, prefix + k, v)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None


def preset_path(name: str) -> str:
    path = name if name.endswith((".yaml", ".yml")) else os.path.join(PRESET_DIR, f"{name}.yaml")
    if not os.path.exists(path):
        avail = sorted(p[:-5] for p in os.listdir(PRESET_DIR) if p.endswith(".yaml"))
        raise ConfigError(f"unknown preset {name!r} (no file {path}); available presets: {avail} or a path to a .yaml")
    return path


def apply_preset(cfg: Config, name: str, _seen: tuple = ()) -> None:
    """Apply a preset file; its optional `inherit: OTHER` key applies OTHER first (variants stay short)."""
    path = preset_path(name)
    if path in _seen:
        raise ConfigError(f"preset {name!r} inherits from itself ({' -> '.join(_seen + (path,))})")
    with open(path) as f:
        d = yaml.safe_load(f) or {}
    if not isinstance(d, dict):
        raise ConfigError(f"preset file {path} must hold a mapping of keys")
    parent = d.pop("inherit", None)
    if parent:
        apply_preset(cfg, parent, _seen + (path,))
    _apply_dict(cfg, d, source=path)


def parse_config(args: list[str]) -> Config:
    """args: ['preset=tiny', 'ct.epochs=3', ...]. The preset (if any) applies first, then the rest in order.
    Unknown keys, values of the wrong type and bad presets are ConfigErrors here; values that make a stage impossible
    are not checked (maect.validation.load_config parses and checks)."""
    pairs = []
    for a in args:
        if "=" not in a:
            raise ConfigError(f"argument {a!r} is not key=value (e.g. preset=tiny, ct.epochs=3)")
        k, v = a.split("=", 1)
        pairs.append((k.lstrip("-").strip(), v))
    cfg = Config()
    for k, v in pairs:
        if k == "preset":
            apply_preset(cfg, v)
            cfg.preset = v
    for k, v in pairs:
        if k != "preset":
            set_key(cfg, k, cli_value(cfg, k, v))
    apply_smoke(cfg)
    return cfg


def cli_value(cfg: Config, key: str, v: str):
    """A command-line value as set_key takes it: YAML for numbers, booleans and tuples; the text as typed for a
    string key (fused_optimizer=off is 'off', not YAML's False), YAML only when it is quoted ('' is empty)."""
    obj = cfg
    for p in key.split("."):
        obj = getattr(obj, p, None)
    if isinstance(obj, str) and not v.startswith(("'", '"')):
        return v
    return yaml.safe_load(v) if v != "" else ""


SMOKE_BATCH = 16


def apply_smoke(cfg: Config) -> None:
    """smoke=N (N > 0): the preset's model, stages and settings, but N optimizer steps per stage on global batches
    of SMOKE_BATCH, a queue of 4 batches and small monitor / evaluation subsets (100 train, 50 test images): checks
    on a CPU that a preset (a GPU one, say) runs end to end. The keys it sets override the preset and the command
    line; the step count itself is applied in maect.train."""
    if cfg.smoke <= 0:
        return
    for s in (cfg.mae, cfg.head, cfg.ct):
        s.batch_size = SMOKE_BATCH
    cfg.mae.accum_steps = 1
    cfg.nnclr.queue_size = 4 * SMOKE_BATCH
    e = cfg.eval
    e.monitor_train, e.monitor_test, e.final_train, e.final_test = 100, 50, 100, 50
    cfg.log_every = 1


def from_dict(d: dict) -> Config:
    cfg = Config()
    _apply_dict(cfg, d, source="checkpoint config")
    return cfg


def stages(cfg: Config) -> tuple[str, ...]:
    """The stages a run executes, in order."""
    return {"pipeline": ("mae", "head", "ct"), "ct_pipeline": ("head", "ct")}.get(cfg.stage, (cfg.stage,))


def to_dict(cfg: Config) -> dict:
    return asdict(cfg)


def dump(cfg: Config, path: str) -> None:
    d = to_dict(cfg)

    def fix(x):  # tuples -> lists for plain YAML
        return {k: fix(v) for k, v in x.items()} if isinstance(x, dict) else list(x) if isinstance(x, tuple) else x
    from maect.atomic import atomic_write
    atomic_write(path, lambda f: yaml.safe_dump(fix(d), f, sort_keys=False))

