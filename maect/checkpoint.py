"""Checkpoints of a running stage: keep-last-k + latest, exact resume, config checks.

Layout in a stage directory:
    checkpoint-0000120.pth   every ckpt_every steps and at each epoch end (the last keep_last are kept)
    checkpoint-latest.pth    a hard link to the newest complete one (replaced atomically)
    checkpoint-final.pth     written when the stage completes
Every file is written to a temporary name, fsynced and renamed (hub.save_checkpoint): a crash or kill during a
write leaves the previous files intact. On resume, an unreadable (e.g. truncated) file is skipped with a warning
and the next older one is used.
"""
from __future__ import annotations

import glob
import logging
import os
import random
import subprocess

import numpy as np
import torch

from maect import config as C
from maect import hub

log = logging.getLogger("maect")

# keys that may differ between a checkpoint's config and the resuming run's
RESUME_FREE = ("out_dir", "resume", "init", "log_every", "threads", "device", "stage", "ckpt_every", "ckpt_epochs",
               "keep_last", "max_skips", "signal_every", "eval.", "data.root", "data.num_workers", "data.loader",
               "fused_optimizer", "preset", "log.", "model.grad_checkpointing",   # loggers and checkpointing change no number
               "kernels.")      # backends verified against the same reference (kernels/dispatch.py)


def code_version() -> str:
    from maect import __version__
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(__file__),
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()  # as tensors/ints: loadable with weights_only=True
    s = {"torch": torch.get_rng_state(), "python": random.getstate(),
         "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = tuple(v) if isinstance(v, list) else v
    return out


def config_mismatches(saved: dict, cfg: C.Config) -> list[str]:
    a, b = flat(saved), flat(C.to_dict(cfg))
    return [f"{k}: checkpoint {a.get(k)!r} vs run {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if not k.startswith(RESUME_FREE) and a.get(k) != b.get(k)]


class Checkpoints:
    def __init__(self, stage_dir: str, keep_last: int, is_main: bool):
        self.dir, self.keep, self.main = stage_dir, max(1, keep_last), is_main

    def save(self, state: dict, step: int) -> None:
        """Write checkpoint-<step>.pth, point checkpoint-latest.pth at it, prune old ones. Rank 0 only."""
        if not self.main:
            return
        state = {**state, "rng": rng_state(), "version": code_version()}
        path = os.path.join(self.dir, f"checkpoint-{step:07d}.pth")
        hub.save_checkpoint(state, path)
        tmp = os.path.join(self.dir, f".latest.tmp{os.getpid()}")
        if os.path.exists(tmp):
            os.remove(tmp)
        try:
            os.link(path, tmp)
        except OSError:  # file systems without hard links: a second atomic copy
            hub.save_checkpoint(state, tmp)
        os.replace(tmp, os.path.join(self.dir, "checkpoint-latest.pth"))
        for old in sorted(glob.glob(os.path.join(self.dir, "checkpoint-[0-9]*.pth")))[:-self.keep]:
            os.remove(old)

    def save_final(self, state: dict) -> str:
        path = os.path.join(self.dir, "checkpoint-final.pth")
        if self.main:
            hub.save_checkpoint({**state, "rng": rng_state(), "version": code_version()}, path)
        return path

    def load_latest(self) -> dict | None:
        """The newest readable checkpoint of this stage, or None. Unreadable files are skipped with a warning."""
        cands = [os.path.join(self.dir, "checkpoint-latest.pth")]
        cands += sorted(glob.glob(os.path.join(self.dir, "checkpoint-[0-9]*.pth")), reverse=True)
        for p in cands:
            if not os.path.exists(p):
                continue
            try:
                ck = hub.load_checkpoint(p)
                log.info(f"resuming from {p} (step {ck.get('step')})")
                return ck
            except ValueError as e:
                log.warning(f"skipping unreadable checkpoint: {e}")
        return None


def check_resume_config(ck: dict, cfg: C.Config, path: str) -> None:
    """ConfigError (one line naming each changed key with the checkpoint's and the run's value) when the checkpoint
    at path was written with a config that differs from cfg outside RESUME_FREE."""
    bad = config_mismatches(ck.get("args", {}), cfg)
    if bad:
        raise C.ConfigError(f"refusing to resume from {path}: it was written with another config ({'; '.join(bad)}); "
                            f"run with the checkpoint's values, or start a new run in another out_dir")


def read_args(path: str) -> dict | None:
    """The config a checkpoint was written with (its 'args'), read without loading its tensors into memory (mmap);
    None for a file that cannot be read (resume skips those with a warning) or that records none."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    args = ck.get("args") if isinstance(ck, dict) else None
    return args if isinstance(args, dict) else None


def unreadable(path: str) -> str | None:
    """Why the checkpoint at path cannot be read (one line naming it), or None. Reads the file's index and records
    (mmap: no tensor is loaded), so a truncated or foreign file is caught before any work."""
    import argparse
    torch.serialization.add_safe_globals([argparse.Namespace])   # official MAE 'args' (as hub.load_checkpoint)
    if os.path.isdir(path):
        return f"{path!r} is a folder, not a checkpoint file"
    import zipfile
    with open(path, "rb") as f:
        head = f.read(4)
    size = os.path.getsize(path)
    if head[:2] == b"PK" and not zipfile.is_zipfile(path):
        return f"checkpoint {path!r} is truncated ({size} bytes: its zip index is missing; a copy cut short?)"
    if head[:2] != b"PK" and head[:1] != b"\x80":      # torch.save writes a zip; the legacy format, a pickle
        return f"{path!r} is not a torch checkpoint (it starts with {head!r}, {size} bytes)"
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):         # the legacy (non-zip) format cannot be mmapped: read it whole
            return f"checkpoint {path!r} cannot be read (truncated or not a torch checkpoint?): {_first(exc)}"
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc2:
            return f"checkpoint {path!r} cannot be read (truncated or not a torch checkpoint?): {_first(exc2)}"
    except Exception as exc:
        return f"checkpoint {path!r} cannot be read (truncated or not a torch checkpoint?): {_first(exc)}"
    return None


def one_line(msg: str) -> str:
    """The line of a (multi-line) load error that names the cause: torch's load_state_dict lists every tensor
    under a heading; the first 'size mismatch' line names a tensor and both shapes."""
    lines = [ln.strip() for ln in str(msg).strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    hit = next((ln for ln in lines if ln.startswith("size mismatch")), None)
    return f"{lines[0]} {hit} (and {sum(ln.startswith('size mismatch') for ln in lines) - 1} more)" if hit else lines[0]


def _first(exc: BaseException) -> str:
    """The line of an exception's message that names the cause (torch's weights_only refusal puts it last)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    line = next((ln for ln in lines if "Unsupported global" in ln or "WeightsUnpickler error" in ln),
                lines[0] if lines else "")
    return f"{type(exc).__name__}: {line}"


def check_resume_run(cfg: C.Config) -> None:
    """resume=auto: each stage's checkpoint that the run would continue from (checkpoint-final.pth of a finished
    stage, which is skipped; else the newest readable one) against cfg, before anything is written (config.yaml
    included). ConfigError naming the changed keys; the keys in RESUME_FREE may change."""
    if cfg.resume != "auto":
        return
    for stage in C.stages(cfg):
        d = os.path.join(cfg.out_dir, stage)
        cands = [os.path.join(d, "checkpoint-final.pth"), os.path.join(d, "checkpoint-latest.pth")]
        cands += sorted(glob.glob(os.path.join(d, "checkpoint-[0-9]*.pth")), reverse=True)
        for p in cands:
            args = read_args(p) if os.path.exists(p) else None
            if args is not None:
                check_resume_config({"args": args}, cfg, p)
                break

