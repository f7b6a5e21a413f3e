"""The k-NN monitor of training: quick k-NN accuracy of an encoder on fixed subsets of the labelled splits, the same
code for the per-epoch monitor and the pipeline's final before/after numbers."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from maect import config as C
from maect.dataloading import eval_batches, load_eval_data
from maect.eval.features import NonFiniteFeatures, eval_mode


class KNNMonitor:
    """Quick k-NN accuracy: bank = a fixed subset of the labelled train split, queries = a subset of the labelled
    test split (load_eval_data: for folder / filelist sources, data.labels), both with the deterministic eval
    transform and the training loader's file checks. The same code gives the pipeline's before/after numbers.
    NoLabels when the source has no labels. train / test: those splits already opened (run opens them once).

    Non-finite features (an encoder that produces NaN/inf): strict=False (the per-epoch monitor) returns NaN and
    keeps the error in self.error, so that the stage logs the count of bad rows and records knn_acc null in
    metrics.jsonl and training goes on (the stage's own non-finite guard decides about the run; a monitor must not
    end hours of training). strict=True (the pipeline's final before/after k-NN, run after every checkpoint is on
    disk) raises NonFiniteFeatures. Never a chance-level number."""

    def __init__(self, cfg: C.Config, device, n_train: int, n_test: int, train=None, test=None, strict: bool = False):
        self.cfg, self.device, self.strict, self.error = cfg, device, strict, None
        d = cfg.data
        train = train if train is not None else load_eval_data(d.name, d.root, "train", d.labels)
        test = test if test is not None else load_eval_data(d.name, d.root, "test", d.labels)
        g = torch.Generator().manual_seed(1234)
        self.train = train.subset(torch.randperm(len(train), generator=g)[:n_train]) if 0 < n_train < len(train) else train
        self.test = test.subset(torch.arange(min(n_test, len(test)))) if 0 < n_test < len(test) else test
        self.num_classes = train.num_classes

    @torch.no_grad()
    def features(self, encoder: nn.Module, pool_mode: str, progress: str = "") -> tuple | None:
        """(bank features, bank labels, query features, query labels); progress: a name for progress lines.
        Non-finite features: None with the error in self.error (strict=False), NonFiniteFeatures (strict=True)."""
        from maect.eval.features import extract_features
        m = self.cfg.model
        kw = dict(img_size=m.img_size, in_chans=m.in_chans, batch_size=500, device=self.device,
                  skip_corrupt=self.cfg.data.skip_corrupt, antialias=self.cfg.data.antialias)
        self.error, out = None, []
        try:
            for split, data in (("train", self.train), ("test", self.test)):
                out += extract_features(encoder, eval_batches(data, **kw), pool=pool_mode, device=self.device,
                                        progress=f"{progress} {split}" if progress else "", total=len(data),
                                        split=split)
        except NonFiniteFeatures as e:
            if self.strict:
                raise
            self.error = e
            return None
        return tuple(out)

    def knn(self, ftr, ytr, fte, yte) -> float:
        from maect.eval.knn import knn_accuracy
        return knn_accuracy(ftr, ytr, fte, yte, k=self.cfg.eval.knn_k, T=self.cfg.eval.knn_T,
                            num_classes=self.num_classes)

    def __call__(self, encoder: nn.Module, pool_mode: str, progress: str = "") -> float:
        """k-NN accuracy (%) of `encoder`'s features; non-finite features: see the class docstring."""
        feats = self.features(encoder, pool_mode, progress)
        return math.nan if feats is None else self.knn(*feats)


@torch.no_grad()
def projected(projector: nn.Module, feats: tuple) -> tuple:
    """The monitor's (bank, labels, queries, labels) with the features passed through `projector` in eval mode
    (BatchNorm running statistics) and L2-normalised: what the queue would store for these images."""
    ftr, ytr, fte, yte = feats
    dt = next(projector.parameters()).dtype
    with eval_mode(projector):
        z = [F.normalize(projector(f.to(dt)).float(), dim=1) for f in (ftr, fte)]
    return z[0], ytr, z[1], yte
