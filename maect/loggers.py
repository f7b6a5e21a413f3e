"""Experiment loggers beside metrics.jsonl: TensorBoard (log.tensorboard=true) and Weights & Biases
(log.wandb=PROJECT). Rank 0 only; every other rank logs nothing.

The trainer's metrics writer (maect.train.Meter.write) hands every record it writes to metrics.jsonl to emit(), so
both loggers receive the same scalars: per progress line loss, lr, img_per_s, nn_acc (stages 2-3), per epoch the
monitor's knn_acc, nn_acc_epoch and proj_knn_acc, a skipped step's skipped=1, and each record's epoch and time
(seconds since the stage started). Each numeric field `k` of a record of stage `s` becomes the scalar `s/k` at
x = the record's step (the stage's optimizer step); null fields (a monitor that could not run) and non-numeric
fields are left out.

TensorBoard: event files under out_dir/tb (torch.utils.tensorboard.SummaryWriter, flushed after each record), one
directory for the whole run (a pipeline's stages are told apart by the tag prefix). Read them with
`tensorboard --logdir out_dir/tb`.
W&B: one run per maect.train invocation (wandb.init(project=PROJECT, dir=out_dir, config=the full config, name=the
out_dir's base name)); each stage's scalars use their own step axis `s/step` (wandb.define_metric), as steps restart
at 0 in every stage. WANDB_MODE=offline writes the run under out_dir/wandb/offline-run-* with no network (upload it
later with `wandb sync`); online mode needs `wandb login` first.
A missing package is a one-line error before any work, naming the pip command; it is checked on every rank, so all
ranks stop together.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os

from maect.config import ConfigError

log = logging.getLogger("maect")
PIP = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb"}


class LoggerError(ConfigError):
    """A logger that cannot start (missing package, wandb.init failing); the message is one line (the trainer's
    entry point prints it as it prints a config error)."""


def scalars(rec: dict) -> tuple[str, int, dict]:
    """(stage, step, {'stage/key': float}) of a metrics.jsonl record (see the module docstring)."""
    stage, step = rec.get("stage", ""), int(rec.get("step", 0))
    out = {}
    for k, v in rec.items():
        if k in ("stage", "step") or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if isinstance(v, float) and math.isnan(v):
            continue
        out[f"{stage}/{k}"] = float(v)
    return stage, step, out


class Sinks:
    """The run's open loggers (empty off rank 0)."""

    def __init__(self, cfg, main: bool):
        self.tb = self.wandb = None
        self.stages: set[str] = set()
        want = [n for n, on in (("tensorboard", cfg.log.tensorboard), ("wandb", bool(cfg.log.wandb))) if on]
        for name in want:
            if importlib.util.find_spec(name) is None:
                key = "log.tensorboard=true" if name == "tensorboard" else f"log.wandb={cfg.log.wandb}"
                raise LoggerError(f"{key} needs the {name} package: {PIP[name]}")
        if not main:
            return
        if cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            tb = os.path.join(cfg.out_dir, "tb")
            if os.path.exists(tb) and not os.path.isdir(tb):
                raise LoggerError(f"log.tensorboard=true: {tb} is a file, not a folder for the event files")
            try:
                self.tb = SummaryWriter(tb)
            except OSError as exc:
                raise LoggerError(f"log.tensorboard=true: cannot write event files in {tb} ({exc.strerror or exc})") from None
            log.info(f"log: TensorBoard event files in {os.path.join(cfg.out_dir, 'tb')}")
        if cfg.log.wandb:
            import wandb
            from maect import config as C
            try:
                self.wandb = wandb.init(project=cfg.log.wandb, dir=cfg.out_dir, config=C.to_dict(cfg),
                                        name=os.path.basename(os.path.normpath(cfg.out_dir)) or None)
            except Exception as exc:
                raise LoggerError(f"log.wandb={cfg.log.wandb}: wandb.init failed ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''}); run `wandb login`, or set "
                                  f"WANDB_MODE=offline to write the run locally") from None
            log.info(f"log: W&B project {cfg.log.wandb}, run {self.wandb.name} ({self.wandb.settings.mode} mode)")

    def emit(self, rec: dict) -> None:
        stage, step, vals = scalars(rec)
        if not vals:
            return
        if self.tb is not None:
            for k, v in vals.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            if stage not in self.stages:
                self.stages.add(stage)
                self.wandb.define_metric(f"{stage}/step")
                self.wandb.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self.wandb.log({f"{stage}/step": step, **vals})

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


_active: Sinks | None = None


def start(cfg, main: bool) -> Sinks:
    """Open the loggers cfg.log asks for (rank 0 when main); closes any left open by an earlier run in this process.
    LoggerError (one line) when a package is missing or W&B cannot start."""
    global _active
    finish()
    _active = Sinks(cfg, main)
    return _active


def emit(rec: dict) -> None:
    """Forward one metrics.jsonl record to the open loggers (none open: nothing)."""
    if _active is not None:
        _active.emit(rec)


def finish() -> None:
    """Close the open loggers (flushes TensorBoard, ends the W&B run); safe to call twice."""
    global _active
    if _active is not None:
        _active.close()
        _active = None
