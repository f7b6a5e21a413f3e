"""What every loader backend shares (the torch loader in loader.py, DALI in dali.py, evaluation's eval_batches): the
epoch order and the handling of bad image files. One home, so the backends cannot drift apart; loader.py and
dali.py both import from here and not from each other's internals.

Epoch order: a permutation of the sample ids from (seed, epoch), without the files the check rejected; the same on
every rank and for every backend (loader.py's docstring says how ranks and steps slice it).
Bad files: data.validate() runs first (cheap, deterministic, so every rank finds the same set). Without
skip_corrupt the loader raises naming the files; with it they leave the epoch order and are counted in the log and
in loader.skipped ({path: reason}). A file that passes the check but fails to decode later raises naming it, or
with skip_corrupt is replaced in its batch by the next good sample of the batch (substitute), so the batch keeps
its size and the ranks stay in step.
"""
from __future__ import annotations

import logging

import torch

from maect.dataloading.images import DataError

log = logging.getLogger("maect.data")


def epoch_order(n: int, seed: int, epoch: int, drop: torch.Tensor | None = None) -> torch.Tensor:
    """The epoch's sample order: a permutation of range(n) from (seed, epoch), without the ids where drop [n] is
    True. The same on every rank and for every backend."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm if drop is None else perm[~drop[perm]]


def bad_file_mask(data, skip_corrupt: bool, skipped: dict, dali: bool = False) -> torch.Tensor:
    """data.validate(dali) (an ImageFiles) as a bool mask [len(data)] of files to leave out; raises DataError naming
    them unless skip_corrupt, else records them in skipped and logs a count. dali: also the files DALI decodes
    differently from the torch loader (images.check_image_file)."""
    problems = data.validate(dali=dali)
    names = {i: (data.files[i] if i >= 0 else data.empty_classes[-1 - i]) for i in problems}
    if problems and not skip_corrupt:
        shown = "; ".join(f"{names[i]}: {why}" for i, why in list(problems.items())[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DataError(f"{len(problems)} bad image file(s) or empty class folder(s) under {data.root!r}: "
                         f"{shown}{more}. Fix or remove them, or set data.skip_corrupt=true to skip them")
    drop = torch.zeros(len(data), dtype=torch.bool)
    for i, why in problems.items():
        if i >= 0:
            drop[i] = True
        skipped[names[i]] = why
    if problems:
        log.warning(f"data: skip_corrupt: leaving out {int(drop.sum())} of {len(data)} files and "
                    f"{len(problems) - int(drop.sum())} empty class folder(s) under {data.root}; first: "
                    + "; ".join(f"{names[i]} ({why})" for i, why in list(problems.items())[:3]))
    return drop


def note_skipped(skipped: dict, path: str, why: str) -> None:
    skipped[path] = why
    log.warning(f"data: skip_corrupt: {path} cannot be decoded ({why}); replaced in its batch "
                f"({len(skipped)} skipped so far)")


def substitute(ids: list[int], good, files: list[str]) -> list[int]:
    """ids with every id not in `good` replaced by the next good id of the batch (cyclically): the batch keeps its
    size and order, so all ranks stay in step. Raises if no sample of the batch can be decoded."""
    good = set(good)
    if len(good) == len(set(ids)):
        return ids
    ok = [k for k, i in enumerate(ids) if i in good]
    if not ok:
        raise DataError(f"no image of a batch can be decoded (first: {files[ids[0]]!r})")
    return [i if i in good else ids[next((k for k in ok if k > j), ok[0])] for j, i in enumerate(ids)]
