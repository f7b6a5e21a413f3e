"""Weighted k-NN classification on frozen features (the DINO protocol; SPEC "Evaluation").

    f  <- f / ||f||                         (optionally standardised first with the train bank's mean/std)
    s  = top-k cosine similarities of a test feature to the train bank, neighbours n_1..n_k
    score[c] = sum_j [y(n_j) == c] * exp(s_j / T)
    prediction = argmax_c score[c]          (ties: the lower class index, torch.argmax's rule)

The top-k search is kernels.queue_topk (fused GEMM + top-k on GPU, compiled op / reference on CPU), run on
chunks of test queries so that no backend ever holds more than about `budget` similarities at once. Its tie rule
(lower bank index first) makes the neighbour set deterministic, so the top-10 is the prefix of the top-20 and
several k come out of one search.

Non-finite features (NaN/inf in any row of either side) raise NonFiniteFeatures before the search (features.py's
check_finite): queue_topk never returns a non-finite similarity and pads a row that has fewer than k finite ones with
index -1, and a -1 used as a bank index would silently vote for the last bank row's class. So a -1 that still comes
back (it cannot, after the check) is an error too, never a vote.

These are plain functions on tensors: the training loop calls knn_accuracy every epoch as a monitor.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from maect import kernels
from maect.eval.features import check_finite, check_labels

SIM_BUDGET = 1 << 26    # similarities per chunk (256 MiB fp32 in the reference path's [chunk, N_train] matrix)


def chunk_rows(n_bank: int) -> int:
    """Test queries per queue_topk call against a bank of n_bank features: at most 4096, and chunk x n_bank <=
    SIM_BUDGET similarities."""
    return max(1, min(4096, SIM_BUDGET // max(n_bank, 1)))


def min_temperature(k: int) -> float:
    """The smallest T whose scores stay finite in fp32: k weights of at most exp(1 / T) (cosine <= 1) sum below
    float32's max when 1 / T + ln k < ln(3.4e38) = 88.72, i.e. T > 1 / (88.72 - ln k) (0.0113 at k = 1, 0.0120
    at k = 200). Below it a score is inf, argmax ties go to the lowest class index, and the accuracy is wrong."""
    return 1.0 / (math.log(torch.finfo(torch.float32).max) - math.log(max(1, k)))


def prepare(train_f: Tensor, test_f: Tensor, standardize: bool = False, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """fp32, optionally standardised with the train bank's per-dimension mean/std, then L2-normalised rows.
    train_f [N, D], test_f [M, D] -> same shapes. Inputs are not modified."""
    a, b = train_f.float(), test_f.float()
    if standardize:
        mean, std = a.mean(0, keepdim=True), a.std(0, keepdim=True)
        a, b = (a - mean) / (std + eps), (b - mean) / (std + eps)
    return F.normalize(a, dim=1, eps=1e-12), F.normalize(b, dim=1, eps=1e-12)


def knn_scores(train_f: Tensor, train_y: Tensor, test_f: Tensor, k: int | list[int] = 20, T: float = 0.07,
               num_classes: int | None = None, chunk: int | None = None, standardize: bool = False) -> dict:
    """Class scores per k: {k: float32 [M, C]} for test_f [M, D] against the bank train_f [N, D] / train_y [N].

    k: one int or several (one top-max(k) search serves all). num_classes: default max label + 1.
    chunk: test queries per queue_topk call; default keeps chunk * N <= SIM_BUDGET.
    Raises ValueError for bad shapes or k, a negative or out-of-range bank label, NonFiniteFeatures (a ValueError) for NaN/inf feature rows.
    """
    ks = [k] if isinstance(k, int) else sorted(set(k))
    kmax = ks[-1]
    N = train_f.shape[0]
    if train_y.shape != (N,) or train_f.dim() != 2 or test_f.dim() != 2:
        raise ValueError(f"knn: need train_f [N, D], train_y [N], test_f [M, D]; got {tuple(train_f.shape)}, "
                         f"{tuple(train_y.shape)}, {tuple(test_f.shape)}")
    if kmax > N or ks[0] < 1:
        raise ValueError(f"knn: k={ks} must lie in [1, {N}] (the train bank size)")
    if not T > min_temperature(kmax):     # also rejects NaN
        raise ValueError(f"knn: T={T} must exceed {min_temperature(kmax):.4f}: exp(s / T) over k={kmax} neighbours "
                         f"overflows float32 below that (the DINO protocol uses 0.07)")
    check_finite("knn", train=train_f, test=test_f)
    C = int(num_classes) if num_classes is not None else int(train_y.max()) + 1
    check_labels("knn", C, train=train_y)             # a -1 bank label would vote for no class (or crash)
    bank, query = prepare(train_f, test_f.to(train_f.device), standardize)
    bank_y = train_y.to(bank.device).long()
    chunk = chunk or chunk_rows(N)
    out = {kk: [] for kk in ks}
    padded = torch.zeros((), dtype=torch.bool, device=bank.device)             # any -1 index: read once at the end
    for s in range(0, query.shape[0], chunk):
        sim, idx = kernels.queue_topk(query[s:s + chunk], bank, kmax)          # [b, kmax] fp32 / int64, sorted desc
        padded |= (idx < 0).any()
        w = (sim / T).exp()                                                     # DINO: exp(s / T), no max-shift
        lab = bank_y[idx.clamp_min(0)]                                          # [b, kmax]; a -1 raises below
        for kk in ks:
            sc = torch.zeros(lab.shape[0], C, device=bank.device, dtype=torch.float32)
            out[kk].append(sc.scatter_add_(1, lab[:, :kk], w[:, :kk]))
    if bool(padded):   # finite, normalised rows always have N >= k finite similarities: a kernel fault
        raise RuntimeError(f"knn: kernels.queue_topk returned index -1 (fewer than k={kmax} finite similarities) for "
                           f"finite features; backend {_backend_name(query[:chunk], bank, kmax)}")
    return {kk: torch.cat(v) if v else torch.zeros(0, C, device=bank.device) for kk, v in out.items()}


def _backend_name(query: Tensor, bank: Tensor, k: int) -> str:
    """The function kernels.queue_topk runs for these inputs (kernels/dispatch.py), for an error message."""
    D = kernels.dispatch
    return D.lookup("queue_topk", D.get("queue_topk").meta(query, bank, k), bank.device).__name__


def knn_predict(train_f: Tensor, train_y: Tensor, test_f: Tensor, k: int = 20, T: float = 0.07,
                num_classes: int | None = None, chunk: int | None = None, standardize: bool = False) -> Tensor:
    """Predicted class per test row: int64 [M] (see knn_scores for the arguments)."""
    return knn_scores(train_f, train_y, test_f, k, T, num_classes, chunk, standardize)[k].argmax(1)


def knn_accuracy(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor, k: int | list[int] = 20,
                 T: float = 0.07, num_classes: int | None = None, chunk: int | None = None,
                 standardize: bool = False):
    """Top-1 accuracy in percent: a float for an int k, {k: float} for a list of k. Labels must be >= 0
    (features.check_labels: an unlabelled query would count as wrong)."""
    check_labels("knn", test=test_y)
    scores = knn_scores(train_f, train_y, test_f, k, T, num_classes, chunk, standardize)
    y = test_y.to(train_f.device).long()
    # one .item() (device sync) per k: fine for a once-per-epoch monitor
    acc = {kk: 100.0 * (sc.argmax(1) == y).float().mean().item() if y.numel() else math.nan
           for kk, sc in scores.items()}
    return acc[k] if isinstance(k, int) else acc
