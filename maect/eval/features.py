"""Frozen-encoder features for the evaluation protocols, and an on-disk cache of them.

extract_features runs the encoder once over deterministic eval batches (no augmentation) and pools the tokens
after the final LayerNorm: 'cls' (L/H, MAE baselines) or 'mean' of patch tokens (MAE-CT B/16, tiny). Every
protocol (k-NN, probe, low-shot, k-means) then works on these [N, D] tensors only.

Cache layout for a prefix P (e.g. DIR/train):
    P.features.npy   float32 [N, D]
    P.labels.npy     int64 [N]
    P.json           metadata: checkpoint path/mtime/size, pool, split, img_size, ... (see feature_meta)
The cache is used only when the stored metadata equals the expected one, so a retrained checkpoint (new mtime or
size), another pooling or another --train-limit re-runs the encoder instead of silently reusing stale features.

Non-finite features (the rule every protocol follows): a feature row holding NaN or +-inf has no place in any
protocol, so check_finite refuses it before any work, with one error (NonFiniteFeatures) that counts the bad rows of
each split. Without it, k-NN, k-means and the probe turn NaN rows into a chance-level number (NaN similarities
lose every comparison, a NaN logit row argmaxes to class 0) and nothing says why. extract_features and
cache_features apply it too, so a NaN-producing encoder is named before a protocol runs and never lands in a cache.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from torch import Tensor

from maect.atomic import atomic_write, write_json
from maect.models.vit import pool as pool_tokens
from maect.progress import Progress


class NonFiniteFeatures(ValueError):
    """Feature rows with NaN or +-inf. counts: {split: (bad rows, rows)} for every split that was checked."""

    def __init__(self, message: str, counts: dict):
        super().__init__(message)
        self.counts = counts


def check_finite(where: str, **splits: Tensor) -> None:
    """Raise NonFiniteFeatures when any row of any split [N, D] holds NaN or +-inf; `where` starts the message.
    Example: check_finite("knn", train=train_f, test=test_f) ->
      knn: 3 of 500 train and 200 of 200 test feature rows are non-finite (NaN/inf): ...
    One reduction per split (one device sync each); splits are named by their keyword."""
    bad = {}
    for name, f in splits.items():
        ok = torch.isfinite(f)
        bad[name] = ~(ok.flatten(1).all(1) if f.dim() > 1 else ok)         # [N] rows holding any NaN/inf
    counts = {name: (int(b.sum()), b.numel()) for name, b in bad.items()}
    if not any(n for n, _ in counts.values()):
        return
    parts = [f"{n} of {total} {name}" for name, (n, total) in counts.items() if n]
    first = next(name for name, (n, _) in counts.items() if n)
    rows = bad[first].nonzero()[:3, 0].tolist()
    raise NonFiniteFeatures(
        f"{where}: {' and '.join(parts)} feature rows are non-finite (NaN/inf): the encoder that made them produces "
        f"NaN/inf (a diverged run or a corrupt checkpoint?); first bad {first} rows {rows}; refusing to evaluate them "
        f"(k-NN, k-means and the probe would report a chance-level number)", counts)


def check_labels(where: str, num_classes: int | None = None, **splits: Tensor) -> None:
    """Raise ValueError when a split's labels [N] hold a negative value (-1: an unlabelled sample) or, for the split
    named 'train' (the k-NN bank, the probe's and low-shot's training set), a value >= num_classes; `where` starts
    the message, which counts the bad labels per split. An unlabelled query would count as a wrong answer and an
    unlabelled bank row would vote for a class that does not exist: evaluation's data (load_eval_data) leaves
    unlabelled samples out and says how many; a caller passing them here gets this error, never a number."""
    for name, y in splits.items():
        neg = int((y < 0).sum())
        if neg:
            raise ValueError(f"{where}: {neg} of {y.numel()} {name} labels are negative (-1: unlabelled samples); "
                             f"leave them out first (maect.dataloading.load_eval_data does, and counts them)")
        if name == "train" and num_classes is not None and y.numel() and int(y.max()) >= num_classes:
            raise ValueError(f"{where}: train label {int(y.max())} is outside the {num_classes} classes "
                             f"(num_classes={num_classes})")


@contextmanager
def eval_mode(net: torch.nn.Module):
    """Every module of `net` in eval mode inside the block, and each module's own training flag restored after it
    (not a blanket net.train(): stage 3 keeps the frozen lower half of the encoder in eval mode while the upper
    half trains)."""
    flags = {m: m.training for m in net.modules()}
    net.eval()
    try:
        yield net
    finally:
        for m, t in flags.items():
            m.training = t


@torch.no_grad()
def extract_features(model: torch.nn.Module, batches, pool: str = "mean", device=None, progress: str = "",
                     total: int | None = None, split: str = "extracted") -> tuple[Tensor, Tensor]:
    """Pooled encoder features of every batch.

    model:   MaskedAutoencoderViT (or a DDP/compile wrapper exposing .module); only forward_features is used.
    batches: iterable of (x [n, C, S, S] float normalised, y [n] int64), e.g. dataloading.eval_batches(...).
    pool:    'cls' | 'mean'.
    device:  where the encoder runs and the features live (default: the model's parameters' device).
    progress: a name for progress lines (images done, images/s, ETA; every 10 s and at the end); '' = silent.
    total:   the number of images expected (for the ETA).
    split:   the split's name in the NonFiniteFeatures error.
    Returns (features float32 [N, D], labels int64 [N]) on `device`; raises NonFiniteFeatures when a row holds
    NaN/inf (check_finite).

    The model is put in eval mode for the pass, and every module's own training flag is restored afterwards
    (stage 3 keeps the frozen lower half in eval mode while the upper half trains: a blanket model.train() at
    the end would flip the frozen half). No gradients, so no parameter or buffer is touched; LayerNorm has no
    running statistics, so eval mode only matters for modules a wrapper may add (e.g. BatchNorm in a head).
    """
    net = getattr(model, "module", model)
    if device is None:
        device = next(net.parameters()).device
    device = torch.device(device)
    # bf16 autocast on CUDA as in training; fp32 on CPU (CPU autocast would only slow the small eval models down)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    feats, labels = [], []
    prog = Progress(progress, total)
    with eval_mode(net):
        for x, y in batches:
            with amp:
                tokens = net.forward_features(x.to(device, non_blocking=True))   # [n, 1 + L, D]
            feats.append(pool_tokens(tokens, pool).float())                      # [n, D] fp32
            labels.append(torch.as_tensor(y).to(device=device, dtype=torch.long))
            prog.update(x.shape[0])
        prog.done(f"on {device}")
    if not feats:
        raise ValueError("extract_features: the batch iterator yielded no batches (empty dataset or limit=0?)")
    feats = torch.cat(feats)
    check_finite("extract_features", **{split: feats})
    return feats, torch.cat(labels)


def feature_meta(ckpt: str | None, *, pool: str, split: str, img_size: int, in_chans: int, data: str,
                 data_root: str | None, limit: int | None, use_ema: bool = False) -> dict:
    """Everything that determines the features of one split. The checkpoint is identified by its absolute path,
    mtime and size (cheap; hashing a 2.5 GB ViT-H file on every call would not be)."""
    meta = {"checkpoint": None, "ckpt_mtime": None, "ckpt_size": None, "pool": pool, "split": split,
            "img_size": int(img_size), "in_chans": int(in_chans), "data": data, "data_root": data_root or "",
            "limit": None if limit is None else int(limit), "use_ema": bool(use_ema)}
    if ckpt is not None:
        st = os.stat(ckpt)
        meta.update(checkpoint=os.path.abspath(ckpt), ckpt_mtime=st.st_mtime, ckpt_size=st.st_size)
    return meta


def cache_features(prefix: str, features: Tensor, labels: Tensor, meta: dict) -> None:
    """Write P.features.npy (float32 [N, D]), P.labels.npy (int64 [N]) and P.json (meta) atomically; the JSON is
    written last, so a run killed half-way leaves no metadata that would vouch for a partial cache. Non-finite
    rows raise NonFiniteFeatures and nothing is written."""
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"cache_features: {features.shape[0]} feature rows but {labels.shape[0]} labels")
    check_finite("cache_features", **{os.path.basename(prefix) or "cached": features})
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    f = features.detach().float().cpu().numpy()
    y = labels.detach().long().cpu().numpy()

    # a file object, not a path: np.save on a path would append '.npy' to the temporary name
    atomic_write(prefix + ".features.npy", lambda fh: np.save(fh, f), binary=True)
    atomic_write(prefix + ".labels.npy", lambda fh: np.save(fh, y), binary=True)
    write_json(prefix + ".json", dict(meta, num_samples=int(f.shape[0]), dim=int(f.shape[1])))


def load_cached(prefix: str, expect: dict | None = None) -> tuple[Tensor, Tensor, dict] | None:
    """(features float32 [N, D], labels int64 [N], meta) from the cache at prefix, on CPU; None when the cache is
    missing, or when `expect` is given and any of its keys differs from the stored metadata."""
    paths = [prefix + s for s in (".features.npy", ".labels.npy", ".json")]
    if not all(os.path.exists(p) for p in paths):
        return None
    with open(paths[2]) as fh:
        meta = json.load(fh)
    if expect is not None and any(meta.get(k) != v for k, v in expect.items()):
        return None
    f = torch.from_numpy(np.load(paths[0]))
    y = torch.from_numpy(np.load(paths[1])).long()
    if f.shape != (meta.get("num_samples"), meta.get("dim")) or y.shape != (f.shape[0],):
        return None  # files from different writes: treat as no cache
    return f, y, meta
