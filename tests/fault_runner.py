"""`python tests/fault_runner.py [--fault KIND@STAGE:STEP[:RANK]]... [--marker-dir DIR] -- ARGS` (or the same
script under torchrun): `python -m maect.train ARGS` with faults injected. The faults are wrappers this file puts
around maect's own functions in the training process before it starts; maect reads no test switch and its loop has
no test branch.

STEP is the stage's count of finished optimizer steps (maect.steplog.Tracker.step) when the fault acts; RANK, when
given, limits it to that global rank (default: every rank). STAGE is mae, head or ct. KIND:

  nan             the loss of step STEP is NaN: the MAE model's forward_loss, or maect.engine.nnclr_loss, returns
                  loss * NaN on that step's micro-batches (the backward then gives non-finite gradients)
  crash           the process exits with status 17 (os._exit: no cleanup) after the backward of step STEP, before its
                  optimizer step (wraps maect.engine.optimizer_step). Once per rank: a marker file in --marker-dir
                  remembers it, so a resumed or restarted run goes past that step
  signal          SIGUSR2 to this process after step STEP has ended (its periodic checkpoint written), before the loop
                  reads its stop flags (wraps maect.preempt.agreed), as Slurm would send it. The handler runs before
                  the loop reads the flag, whatever the machine's speed: it is checked, not assumed
  ckpt_write      writing checkpoint-STEP.pth of STAGE fails part-way: its temporary file keeps the first 4 KiB that
                  torch.save wrote, then OSError(ENOSPC, 'injected fault while writing PATH') (wraps the
                  checkpoint writer's file object, through maect.hub.atomic_write); the file stays behind, as after
                  a kill
  signal_in_save  SIGUSR2 arrives inside torch.save of checkpoint-STEP.pth of STAGE: the writer's first write past
                  4 KiB sends it (Python runs the handler between bytecodes: here, inside that write)

install(faults, marker_dir) does the same in a running process (returns a function that undoes it); FaultJob is
maect.launch.TrainJob with faults, for jobs submitted through submitit.
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import sys
from typing import NamedTuple

from maect import engine, hub, launch, preempt, steplog
from maect.models.vit import MaskedAutoencoderViT

log = logging.getLogger("maect")
KINDS = ("nan", "crash", "signal", "ckpt_write", "signal_in_save")
CRASH_EXIT = 17
AFTER_BYTES = 4096


class Fault(NamedTuple):
    kind: str
    stage: str
    step: int
    rank: int | None


def parse(spec: str) -> Fault:
    kind, _, where = spec.partition("@")
    parts = where.split(":")
    if kind not in KINDS or len(parts) not in (2, 3) or not all(p.isdigit() for p in parts[1:]):
        raise ValueError(f"fault {spec!r}: expected KIND@STAGE:STEP[:RANK] with KIND one of {', '.join(KINDS)}")
    return Fault(kind, parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else None)


class _Writer:
    """The checkpoint writer's file, as torch.save sees it. signal: past AFTER_BYTES, send SIGUSR2 once and go on
    writing. fail: keep only the first AFTER_BYTES bytes (the rest is dropped, as a full disk would); the caller
    raises once torch.save is done (an exception inside torch.save's writer reaches Python as torch's own error)."""

    def __init__(self, f, mode: str):
        self.f, self.mode, self.n, self.sent = f, mode, 0, False

    def write(self, b) -> int:
        room = AFTER_BYTES - self.n
        self.n += len(b)
        if self.mode == "fail":
            if room > 0:
                self.f.write(bytes(b)[:room])
            return len(b)
        if self.n > AFTER_BYTES and not self.sent:
            self.sent = True
            log.warning("injected SIGUSR2 inside torch.save")
            os.kill(os.getpid(), signal.SIGUSR2)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def install(faults, marker_dir: str | None = None):
    """Wrap maect's functions so that `faults` (Fault or 'KIND@STAGE:STEP[:RANK]' strings) happen in this process.
    Returns a function that puts the originals back."""
    faults = [f if isinstance(f, Fault) else parse(f) for f in faults]
    if any(f.kind == "crash" for f in faults) and not marker_dir:
        raise ValueError("a crash fault needs a marker folder (--marker-dir): it must happen only once")
    current = [None]                                  # the running stage's Tracker
    saved = []

    def patch(owner, name, make):
        real = getattr(owner, name)
        saved.append((owner, name, real))
        setattr(owner, name, make(real))

    def due(kind: str, step: int | None = None, stage: str | None = None) -> Fault | None:
        t = current[0]
        if t is None:
            return None
        step, stage = t.step if step is None else step, t.stage if stage is None else stage
        for f in faults:
            if f.kind == kind and f.stage == stage and f.step == step and f.rank in (None, t.di.rank):
                return f
        return None

    def tracker_init(real):
        def __init__(self, *a, **k):
            real(self, *a, **k)
            current[0] = self
        return __init__

    def poisoned(real):
        def loss_fn(*a, **k):
            loss = real(*a, **k)
            return loss * float("nan") if due("nan") else loss
        return loss_fn

    def crash(real):
        def optimizer_step(*a, **k):
            f = due("crash")
            if f is not None:
                t = current[0]
                marker = os.path.join(marker_dir, f"fault-crash-{f.stage}-{f.step}-rank{t.di.rank}")
                if not os.path.exists(marker):
                    open(marker, "w").close()
                    log.warning(f"injected crash at {f.stage} step {f.step} rank {t.di.rank}")
                    os._exit(CRASH_EXIT)
            return real(*a, **k)
        return optimizer_step

    def signal_after(real):
        def agreed(step, *a, **k):
            if due("signal", step) is not None:
                log.warning(f"injected SIGUSR2 after {current[0].stage} step {step}")
                os.kill(os.getpid(), signal.SIGUSR2)
                if not preempt.requested():
                    raise RuntimeError("the SIGUSR2 handler did not run before the loop read its stop flags")
            return real(step, *a, **k)
        return agreed

    def ckpt_writer(real):
        def atomic_write(path, write, binary=False):
            name, stage = os.path.basename(path), os.path.basename(os.path.dirname(os.path.abspath(path)))
            hit = [f for f in faults if f.kind in ("ckpt_write", "signal_in_save") and f.stage == stage
                   and name == f"checkpoint-{f.step:07d}.pth"]
            if not hit:
                return real(path, write, binary)
            if hit[0].kind == "signal_in_save":
                return real(path, lambda f: write(_Writer(f, "signal")), binary)

            def failing(f):
                write(_Writer(f, "fail"))
                raise OSError(errno.ENOSPC, f"injected fault while writing {path}")
            return real(path, failing, binary)
        return atomic_write

    patch(steplog.Tracker, "__init__", tracker_init)
    if any(f.kind == "nan" for f in faults):
        patch(MaskedAutoencoderViT, "forward_loss", poisoned)
        patch(engine, "nnclr_loss", poisoned)
    if any(f.kind == "crash" for f in faults):
        patch(engine, "optimizer_step", crash)
    if any(f.kind == "signal" for f in faults):
        patch(preempt, "agreed", signal_after)
    if any(f.kind in ("ckpt_write", "signal_in_save") for f in faults):
        patch(hub, "atomic_write", ckpt_writer)

    def undo():
        for owner, name, real in reversed(saved):
            setattr(owner, name, real)
    return undo


class FaultJob(launch.TrainJob):
    """maect.launch.TrainJob whose tasks install `faults` before training. Its requeue hook (checkpoint(), inherited)
    resubmits a plain TrainJob: the requeued run has no injected faults."""

    def __init__(self, train_args: list[str], port: int | None = None, faults=(), marker_dir: str | None = None):
        super().__init__(train_args, port)
        self.faults, self.marker_dir = list(faults), marker_dir

    def __call__(self) -> None:
        install(self.faults, self.marker_dir)
        super().__call__()


def main(argv: list[str]) -> None:
    if "--" not in argv:
        sys.exit("fault_runner: put the training arguments after --")
    cut = argv.index("--")
    own, train_args = argv[:cut], argv[cut + 1:]
    faults, marker_dir = [], None
    it = iter(own)
    for a in it:
        if a == "--fault":
            faults.append(parse(next(it)))
        elif a == "--marker-dir":
            marker_dir = next(it)
        else:
            sys.exit(f"fault_runner: unknown argument {a!r}")
    install(faults, marker_dir)
    from maect import train
    train.main(train_args)


if __name__ == "__main__":
    main(sys.argv[1:])
