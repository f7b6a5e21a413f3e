"""The host side of the training loop, in one place: position, log lines, checkpoints and stop requests.

Meter    progress line (loss, lr, images/s, ETA) every log_every steps; metrics.jsonl, forwarded to the experiment
         loggers that log.* opens (maect.loggers: TensorBoard, W&B)
Tracker  everything that reads a device value on the host. The step itself (maect.engine) never does: it leaves
         its non-finite flag, loss and gradient norm on the device, and the Tracker reads them back where the loop
         syncs anyway (log lines, checkpoints), or at once when the optimizer cannot skip on the device.
"""
from __future__ import annotations

import json
import logging
import os
import time

import torch

from maect import config as C
from maect import dist, loggers, preempt
from maect.checkpoint import Checkpoints

log = logging.getLogger("maect")


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


class Tracker:
    """Position (step, epoch, micro-batch in epoch), skipped-step flags, loss / nn-acc sums between log lines, the
    stage's checkpoints and stop requests (maect.preempt) of one stage.

    state: what a checkpoint holds besides the position, {key: module / optimizer / queue (state_dict()) or tensor
    (saved as a CPU copy)}, read at every save. resume: a checkpoint dict of this stage (or None).
    Non-finite guard: end_step records [bad, loss, |g|] on the device; flush() reads the pending ones (one sync),
    logs each skipped step and raises FloatingPointError after cfg.max_skips skips in a row. With an optimizer that
    cannot skip on the device (ran=False possible), end_step flushes at once."""

    def __init__(self, cfg: C.Config, di, stage: str, *, total: int, warm: int, opt, ckpts: Checkpoints,
                 meter: Meter, state: dict, resume: dict | None, nn_acc: bool, on_device: bool):
        self.cfg, self.di, self.stage, self.total, self.warm, self.opt = cfg, di, stage, total, warm, opt
        self.ckpts, self.meter, self.state, self.nn_acc, self.on_device = ckpts, meter, state, nn_acc, on_device
        self.step = self.epoch = self.in_epoch = self.skips = 0
        self.stats = torch.zeros(3, device=di.device)   # loss sum, nn-acc sum, count (summed between log lines)
        if resume is not None:
            self.step, self.epoch, self.in_epoch = resume["step"], resume["epoch"], resume["step_in_epoch"]
            self.skips, self.stats = resume["skips"], resume["stats"].to(di.device)
        self.params = [p for g in opt.param_groups for p in g["params"]]
        self.pending: list[tuple[int, int, torch.Tensor]] = []   # (step, epoch, [bad, loss, |g|]) not yet read back
        self.stop, self.saved_at = 0, -1    # stop: the agreed signal number (0: none); saved_at: step of the last save
        log.info(f"[{stage}] non-finite guard: " + ("on the device (fused AdamW found_inf; no host sync per step), "
                                                     f"read back every {cfg.log_every} steps and at checkpoints"
                                                     if on_device else f"host check every step ({type(opt).__name__} "
                                                     "cannot skip on the device)"))

    def end_step(self, bad: torch.Tensor, ran: bool, loss: torch.Tensor, gnorm: torch.Tensor,
                 nn_acc: torch.Tensor | None = None) -> bool:
        """After the optimizer step (and the stage's queue / EMA updates): counts, log line, periodic checkpoint,
        stop request. Returns True when the loop must leave (the last step, or an agreed stop request)."""
        self.pending.append((self.step, self.epoch, torch.stack([bad.float(), loss.float(), gnorm.float()])))
        if not ran:
            self.flush()   # the host guard logs the skip at once (and stops after max_skips in a row)
        acc = self.stats.new_zeros(()) if nn_acc is None else nn_acc.float()   # a device zero: no host copy
        self.stats += torch.where(bad, 0.0, torch.stack([loss.float(), acc, self.stats.new_ones(())]))
        self.step += 1
        cfg = self.cfg
        if self.step % cfg.log_every == 0 or self.step == self.total:
            self.flush()
            st = dist.all_reduce_mean(self.stats)
            vals = {"loss": float(st[0] / st[2].clamp_min(1))}
            if self.nn_acc:
                vals["nn_acc"] = float(st[1] / st[2].clamp_min(1))
            self.meter.step(self.step, self.epoch, {**vals, "lr": self.opt.param_groups[0]["lr"]})
            self.stats.zero_()
        if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < self.total:
            self.save()
        self.stop = preempt.agreed(self.step, self.di.world, cfg.signal_every, self.di.device)
        return self.step >= self.total or bool(self.stop)

    def end_epoch(self) -> None:
        self.epoch, self.in_epoch = self.epoch + 1, 0
        if self.step < self.total and self.cfg.ckpt_epochs and self.epoch % self.cfg.ckpt_epochs == 0:
            self.save()   # before the monitor: a monitor that fails loses no trained work

    def flush(self) -> None:
        """Read the pending skip flags (one sync), log each skipped step, stop after cfg.max_skips in a row."""
        if not self.pending:
            return
        vals = torch.stack([v for _, _, v in self.pending]).tolist()
        steps = [(st, ep) for st, ep, _ in self.pending]
        self.pending.clear()
        for (st, ep), (bad, lv, gv) in zip(steps, vals):
            if not bad:
                self.skips = 0
                continue
            self.skips += 1
            log.warning(f"[{self.stage}] step {st}: non-finite loss/gradient ({lv:.4g}, |g| {gv:.4g}): "
                        f"step skipped ({self.skips} in a row)")
            self.meter.write({"step": st, "epoch": ep, "skipped": 1})
            if self.skips >= self.cfg.max_skips:
                raise FloatingPointError(
                    f"[{self.stage}] {self.skips} non-finite steps in a row at step {st}; stopping. Last good "
                    f"checkpoint: {os.path.join(self.ckpts.dir, 'checkpoint-latest.pth')} (lower the lr or check "
                    f"the data)")

    def checkpoint(self) -> dict:
        self.flush()
        st = {k: (v.cpu() if isinstance(v, torch.Tensor) else v.state_dict()) for k, v in self.state.items()
              if v is not None}
        return {**st, "step": self.step, "epoch": self.epoch, "step_in_epoch": self.in_epoch, "skips": self.skips,
                "stats": self.stats.cpu(), "args": C.to_dict(self.cfg), "stage": self.stage, "scaler": None}

    def save(self) -> None:
        """checkpoint-<step>.pth and checkpoint-latest.pth (rank 0 writes, atomically)."""
        self.ckpts.save(self.checkpoint(), self.step)
        self.saved_at = self.step

    def save_final(self) -> str:
        path = self.ckpts.save_final(self.checkpoint())
        dist.barrier()  # rank 0 writes; the next stage on every rank reads it
        return path

    def preempted(self) -> preempt.Preempted:
        """The agreed stop: the checkpoint of this step (unless the periodic one just wrote it), on every rank's
        word (a barrier: rank 0's file is complete before any rank exits), as the exception the caller raises."""
        if self.saved_at != self.step:
            self.save()
        dist.barrier()
        path = os.path.join(self.ckpts.dir, "checkpoint-latest.pth")
        log.warning(f"[{self.stage}] {preempt.Preempted(self.stop, path)} (step {self.step})")
        self.meter.close()
        return preempt.Preempted(self.stop, path)

    def monitor_epoch(self, loader) -> float:
        """The epoch value of the last monitor: an epoch end, or inside an epoch when the schedule ends there."""
        return round(self.epoch + self.in_epoch / max(len(loader), 1), 2) if self.in_epoch else self.epoch
