"""Stop requests (SIGUSR2, SIGTERM): the handler only records the signal; the training loop acts on it.

    install()                 SIGUSR2 and SIGTERM -> record(); returns the handlers it replaced (by signal number)
    requested() -> int        the first recorded signal number, 0 when none
    agreed(step, world, every, device) -> int   the signal every rank acts on at this step boundary (see below)
    Preempted                 raised by the loop once the stage's checkpoint is on disk

Why nothing happens inside the handler: a handler runs between two bytecodes of whatever the main thread is doing,
which may be torch.save of a checkpoint, a collective or a CUDA call; raising or exiting there (what submitit's own
handler does) breaks that work midway. Here the handler sets a number and returns, so a signal during a save, or a
second signal while the loop saves, changes nothing but that number.

When the loop acts (maect.steplog.Tracker.end_step, after each optimizer step and any periodic checkpoint):
one rank reads its own flag every step (a Python int: no device work). With several ranks every rank must stop at
the same step, so the flags are combined by an all-reduce (max) of one integer every `every` steps (config key
signal_every; the all-reduce is the only host sync it adds: one per `every` steps). Worst-case latency from the
signal to the start of the checkpoint: `every` steps (one step on one rank), plus the checkpoint's write time.
"""
from __future__ import annotations

import signal
import threading

import torch

SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
REQUEUE_EXIT = 75       # sysexits EX_TEMPFAIL: "try again later"; the exit status after a requested stop
_requested = 0


class Preempted(Exception):
    """A stop was requested (signal number `signum`); the stage's latest checkpoint `path` is complete on disk."""

    def __init__(self, signum: int, path: str):
        super().__init__(f"stopped on {signal.Signals(signum).name}: checkpoint {path} written; "
                         f"resume=auto continues from it")
        self.signum, self.path = signum, path


def record(signum: int, frame=None) -> None:
    """The signal handler: remember the first signal, nothing else (no I/O, no exception, no exit)."""
    global _requested
    if not _requested:
        _requested = signum


def install() -> dict:
    """Route SIGUSR2 and SIGTERM to record(). Only the main thread may set handlers; elsewhere (a test runner's
    worker thread) nothing is installed. Returns {signal number: previous handler}."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, record) for s in SIGNALS}


def requested() -> int:
    return _requested


def clear() -> None:
    global _requested
    _requested = 0


def agreed(step: int, world: int, every: int, device) -> int:
    """The signal every rank stops for after `step` (0: go on). world 1: the local flag. world > 1: every `every`
    steps an all-reduce (max) of the flags (all ranks call this with the same step, so they meet), else 0."""
    if world == 1:
        return _requested
    if step % max(1, every):
        return 0
    flag = torch.tensor([_requested], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item())    # host sync: once per `every` steps

