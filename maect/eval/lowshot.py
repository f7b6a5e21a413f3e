"""Low-shot classification on frozen features (SPEC "Evaluation"; the MSN / MAE-CT protocol).

Splits: 1, 2 and 5 labelled images per class (3 seeded splits each) and 1% of the labels (1 seeded split,
class-stratified: round(1% of each class), at least one image per class).

Classifier: multinomial logistic regression, L2 penalty, no intercept. The paper states the objective in
cyanure's scaling (MSN's evaluation code):
    min_W  (1/n) * sum_i CE(W x_i, y_i) + (lam / 2) * ||W||_F^2,      lam = 0.00025 / n   (n = labelled images)
scikit-learn's LogisticRegression minimises
    min_W  C * sum_i CE(W x_i, y_i) + (1 / 2) * ||W||_F^2
Dividing the first objective by lam (same minimiser) gives (1/(lam*n)) * sum CE + 1/2 ||W||^2, hence
    C = 1 / (lam * n) = 1 / 0.00025 = 4000  for every n.
(tests/test_eval.py checks the mapping: the gradient of the cyanure-scaled objective vanishes at sklearn's
solution.) With two classes sklearn fits a single binary-logistic vector instead of a softmax; all our data sets
have more classes.

Features: centred with the mean of the FULL train split's features (unlabelled data: a legitimate semi-supervised
statistic, and far less noisy than the mean of 10 labelled images), then each row L2-normalised: centre first,
normalise second, applied identically to the labelled subset and the test set.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

from maect.eval.features import check_finite

LAMBDA = 0.00025          # lam * n, i.e. lam = LAMBDA / n_train
SHOTS = (1, 2, 5)


def preprocess(f: Tensor, mean: Tensor) -> np.ndarray:
    """Centre with `mean` [D], then L2-normalise rows: f [N, D] -> float64 numpy [N, D] (sklearn's native dtype)."""
    x = f.double().cpu() - mean.double().cpu()
    return torch.nn.functional.normalize(x, dim=1, eps=1e-12).numpy()


def shot_split(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Indices of `shots` images per class (fewer when a class has fewer), drawn with a seeded RNG; sorted."""
    rng = np.random.default_rng(seed)
    idx = [rng.choice(np.flatnonzero(labels == c), size=min(shots, int((labels == c).sum())), replace=False)
           for c in np.unique(labels)]
    return np.sort(np.concatenate(idx))


def percent_split(labels: np.ndarray, frac: float, seed: int) -> np.ndarray:
    """Class-stratified fraction: round(frac * n_c) (at least 1) images of each class c, seeded; sorted."""
    rng = np.random.default_rng(seed)
    idx = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        idx.append(rng.choice(members, size=max(1, int(round(frac * members.size))), replace=False))
    return np.sort(np.concatenate(idx))


def fit_logreg(x: np.ndarray, y: np.ndarray, lam_n: float = LAMBDA, max_iter: int = 1000, tol: float = 1e-4):
    """Multinomial L2 logistic regression, no intercept, lam = lam_n / n  <=>  sklearn C = 1 / lam_n (see the
    module docstring). Returns the fitted LogisticRegression; a non-converged fit is reported by a flag, not a
    warning flood (weak regularisation on separable few-shot sets converges slowly and changes little)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    clf = LogisticRegression(C=1.0 / lam_n, l1_ratio=0.0, fit_intercept=False, solver="lbfgs", max_iter=max_iter,
                             tol=tol)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(x, y)
    clf.converged_ = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return clf


def lowshot(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor, shots=SHOTS, n_splits: int = 3,
            percent: float | None = 1.0, seed: int = 0, lam_n: float = LAMBDA, max_iter: int = 1000) -> dict:
    """Low-shot accuracies (%) on features train_f [N, D] / test_f [M, D] with labels train_y [N] / test_y [M].

    Returns {'{s}-shot': {'mean', 'std', 'accs', 'n_train', 'converged'} for s in shots,
             '{p}%': {... one split ...}}. std is the population std over the splits (0 for one split).
    Split j of setting s uses seed  seed * 1000 + 100 * s + j  (different settings draw different images).
    Raises NonFiniteFeatures (a ValueError) for NaN/inf feature rows.
    """
    check_finite("lowshot", train=train_f, test=test_f)
    mean = train_f.double().mean(0)            # full train split, before any subsetting
    x_test = preprocess(test_f, mean)          # train rows are preprocessed per split: only the labelled ones
    y_all, y_test = train_y.cpu().numpy(), test_y.cpu().numpy()
    settings = [(f"{s}-shot", [shot_split(y_all, s, seed * 1000 + 100 * s + j) for j in range(n_splits)])
                for s in shots]
    if percent:
        settings.append((f"{percent:g}%", [percent_split(y_all, percent / 100.0, seed * 1000 + 999)]))
    out = {}
    for name, splits in settings:
        accs, conv = [], []
        for idx in splits:
            sel = torch.from_numpy(idx).to(train_f.device)
            clf = fit_logreg(preprocess(train_f[sel], mean), y_all[idx], lam_n, max_iter)
            accs.append(100.0 * float((clf.predict(x_test) == y_test).mean()))
            conv.append(clf.converged_)
        out[name] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "accs": accs,
                     "n_train": [int(len(i)) for i in splits], "converged": all(conv)}
    return out
