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

Features (`preprocessing`): the published MAE-CT code calls cyanure's preprocess(X, normalize=True, columns=False,
centering=True) on the TRAINING features only: every row is centred on its own mean (over its D entries) and then
L2-normalised; the test features go to the classifier raw. MSN's logistic_eval.py, which that code cites, applies
the same row-wise preprocessing to the test features too. The omission looks like a bug but changes no prediction:
every centred training row is orthogonal to the all-ones vector, so the gradient of the loss is too, and a solver
started at W = 0 ends with every class vector w_c orthogonal to it; then w_c . (x - m 1) = w_c . x for any test
row x, and normalising divides all logits of a row by the same positive number (tests/test_repro.py checks the
predictions agree). The default follows MSN so that the scores do not rest on that identity.
    'row'             every row centred on its own mean, then L2-normalised; train and test (default; MSN)
    'row_train_only'  the same on the training rows, test rows raw (the published MAE-CT code)
    'column'          rows centred with the mean of the FULL train split's features, then L2-normalised, train and
                      test
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

from maect.progress import Progress
from maect.eval.features import check_finite, check_labels

LAMBDA = 0.00025          # lam * n, i.e. lam = LAMBDA / n_train
SHOTS = (1, 2, 5)
PREPROCESSING = ("row", "row_train_only", "column")


def preprocess(f: Tensor, mean: Tensor | None = None) -> np.ndarray:
    """Centre, then L2-normalise rows: f [N, D] -> float64 numpy [N, D] (sklearn's native dtype).
    mean None: every row centred on its own mean over its D entries (cyanure's columns=False); else `mean` [D]
    subtracted from every row."""
    x = f.double().cpu()
    x = x - (x.mean(1, keepdim=True) if mean is None else mean.double().cpu())
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
            percent: float | None = 1.0, seed: int = 0, lam_n: float = LAMBDA, max_iter: int = 1000,
            preprocessing: str = "row", progress: str = "") -> dict:
    """Low-shot accuracies (%) on features train_f [N, D] / test_f [M, D] with labels train_y [N] / test_y [M].
    preprocessing: 'row' | 'row_train_only' | 'column' (module docstring). progress: a name for a log line per fit.

    Returns {'{s}-shot': {'mean', 'std', 'accs', 'n_train', 'converged'} for s in shots,
             '{p}%': {... one split ...}}. std is the population std over the splits (0 for one split).
    Split j of setting s uses seed  seed * 1000 + 100 * s + j  (different settings draw different images).
    Raises NonFiniteFeatures (a ValueError) for NaN/inf feature rows.
    """
    if preprocessing not in PREPROCESSING:
        raise ValueError(f"lowshot: preprocessing={preprocessing!r}: choose one of {PREPROCESSING}")
    check_finite("lowshot", train=train_f, test=test_f)
    check_labels("lowshot", train=train_y, test=test_y)     # -1 would be a class of its own
    mean = train_f.double().mean(0) if preprocessing == "column" else None   # full train split, before subsetting
    x_test = test_f.double().cpu().numpy() if preprocessing == "row_train_only" else preprocess(test_f, mean)
    y_all, y_test = train_y.cpu().numpy(), test_y.cpu().numpy()
    settings = [(f"{s}-shot", [shot_split(y_all, s, seed * 1000 + 100 * s + j) for j in range(n_splits)])
                for s in shots]
    if percent:
        settings.append((f"{percent:g}%", [percent_split(y_all, percent / 100.0, seed * 1000 + 999)]))
    out = {}
    prog = Progress(progress, sum(len(sp) for _, sp in settings), unit="fits", every=0.0)
    for name, splits in settings:
        accs, conv = [], []
        for idx in splits:
            sel = torch.from_numpy(idx).to(train_f.device)
            clf = fit_logreg(preprocess(train_f[sel], mean), y_all[idx], lam_n, max_iter)
            accs.append(100.0 * float((clf.predict(x_test) == y_test).mean()))
            conv.append(clf.converged_)
            prog.update()
        out[name] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "accs": accs,
                     "n_train": [int(len(i)) for i in splits], "converged": all(conv)}
    prog.done()
    return out
