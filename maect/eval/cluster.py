"""k-means clustering of frozen features, scored by Hungarian-matched accuracy and NMI (SPEC "Evaluation").

Choices (SPEC leaves them open):
  * Features are L2-normalised first (the cosine geometry the k-NN protocol and the contrastive loss use), then
    ordinary Euclidean k-means runs on them (centroids are means, not re-normalised: on the unit sphere
    ||a - b||^2 = 2 - 2 cos(a, b), so assignments follow cosine similarity to the centroid direction scaled by
    the centroid norm; this is what sklearn's KMeans on normalised features does, too).
  * k = number of classes; restarts (default 10), each seeded, greedy k-means++ init (sklearn's variant:
    2 + ln k candidate centres per step, keep the one that lowers the potential most), Lloyd iterations until the
    centroid shift is below tol * mean per-dimension variance (sklearn's criterion) or max_iter; the restart
    with the lowest inertia is kept.
  * Pure torch on the features' device: [chunk, k] distance blocks, so it runs on GPU for ImageNet-size sets.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from maect.progress import Progress
from maect.eval.features import check_finite, check_labels

DIST_BUDGET = 1 << 24     # distances per block


def sq_dists(x: Tensor, c: Tensor, x_sq: Tensor) -> Tensor:
    """Squared Euclidean distances [n, k] from x [n, D] (with x_sq = ||x||^2 [n]) to centres c [k, D], >= 0."""
    return (x_sq[:, None] - 2.0 * (x @ c.t()) + (c * c).sum(1)[None, :]).clamp_min_(0)


def assign(x: Tensor, c: Tensor, x_sq: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centre per row, blockwise: (labels int64 [N], squared distance float32 [N])."""
    chunk = max(1, DIST_BUDGET // max(1, c.shape[0]))
    lab, dist = [], []
    for s in range(0, x.shape[0], chunk):
        d, i = sq_dists(x[s:s + chunk], c, x_sq[s:s + chunk]).min(1)
        lab.append(i)
        dist.append(d)
    return torch.cat(lab), torch.cat(dist)


def kmeans_pp(x: Tensor, k: int, x_sq: Tensor, g: torch.Generator) -> Tensor:
    """Greedy k-means++ initial centres [k, D] (rows of x)."""
    N = x.shape[0]
    trials = 2 + int(math.log(k))
    first = torch.randint(N, (1,), generator=g, device=x.device)
    centres = [x[first]]
    pot = sq_dists(x, x[first], x_sq)[:, 0]                                     # D^2 to the nearest centre [N]
    for _ in range(1, k):
        probs = pot if pot.sum() > 0 else torch.ones_like(pot)                  # all points on the centres: uniform
        cand = torch.multinomial(probs, trials, replacement=True, generator=g)  # [trials]
        new_pot = torch.minimum(pot[None, :], sq_dists(x, x[cand], x_sq).t())   # [trials, N]
        best = int(new_pot.double().sum(1).argmin())                            # one sync per centre
        centres.append(x[cand[best:best + 1]])
        pot = new_pot[best]
    return torch.cat(centres)


def lloyd(x: Tensor, c: Tensor, x_sq: Tensor, max_iter: int, tol: float) -> tuple[Tensor, Tensor, float, int]:
    """Lloyd iterations from centres c [k, D]. Returns (labels [N], centres [k, D], inertia, iterations).
    An empty cluster is re-seeded with the point currently farthest from its centre (sklearn does the same)."""
    k = c.shape[0]
    thresh = tol * float(x.var(0).mean())
    it = 0
    for it in range(1, max_iter + 1):
        lab, dist = assign(x, c, x_sq)
        counts = torch.bincount(lab, minlength=k)
        new = torch.zeros_like(c).index_add_(0, lab, x) / counts.clamp_min(1)[:, None].to(x.dtype)
        empty = (counts == 0).nonzero()[:, 0]
        if empty.numel():
            new[empty] = x[dist.topk(empty.numel()).indices]
        shift = float(((new - c) ** 2).sum())
        c = new
        if shift <= thresh:
            break
    lab, dist = assign(x, c, x_sq)
    return lab, c, float(dist.double().sum()), it


def kmeans(x: Tensor, k: int, restarts: int = 10, max_iter: int = 300, tol: float = 1e-4, seed: int = 0,
           progress: str = "") -> dict:
    """k-means of x [N, D] (any float dtype, computed in fp32 on x's device), best of `restarts` by inertia;
    progress: a name for progress lines (restarts done, ETA).
    Returns {'labels': int64 [N], 'centres': [k, D], 'inertia': float, 'inertias': [restarts], 'iters': [...]}.
    Raises ValueError for k outside [1, N] or restarts < 1, NonFiniteFeatures for NaN/inf rows."""
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"kmeans: k={k} must lie in [1, N={x.shape[0]}]")
    if restarts < 1:
        raise ValueError(f"kmeans: restarts={restarts} must be >= 1")
    check_finite("kmeans", input=x)
    x = x.float()
    x_sq = (x * x).sum(1)
    g = torch.Generator(device=x.device).manual_seed(seed)
    best, inertias, iters = None, [], []
    prog = Progress(progress, restarts, unit="restarts")
    for _ in range(restarts):
        lab, c, inertia, it = lloyd(x, kmeans_pp(x, k, x_sq, g), x_sq, max_iter, tol)
        inertias.append(inertia)
        iters.append(it)
        if best is None or inertia < best[2]:
            best = (lab, c, inertia)
        prog.update()
    prog.done(f"({x.shape[0]} points, k={k})")
    return {"labels": best[0], "centres": best[1], "inertia": best[2], "inertias": inertias, "iters": iters}


def hungarian_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy (%) of cluster ids `pred` [N] against `labels` [N] under the best one-to-one cluster -> class map
    (scipy's linear_sum_assignment on the contingency table; unmatched clusters count as wrong)."""
    from scipy.optimize import linear_sum_assignment
    pred, labels = np.asarray(pred).astype(np.int64), np.asarray(labels).astype(np.int64)
    n = int(max(pred.max(), labels.max())) + 1
    table = np.zeros((n, n), dtype=np.int64)
    np.add.at(table, (pred, labels), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(100.0 * table[rows, cols].sum() / max(1, pred.size))


def cluster_eval(features: Tensor, labels: Tensor, num_classes: int | None = None, restarts: int = 10,
                 seed: int = 0, max_iter: int = 300, normalize: bool = True, split: str = "clustered",
                 progress: str = "") -> dict:
    """k-means with k = num_classes (default: max label + 1) on the L2-normalised features [N, D].
    Returns {'acc' (%), 'nmi' (%), 'inertia', 'k', 'restarts'}. NaN/inf rows raise NonFiniteFeatures (checked
    before normalising, which would turn an inf row into NaN), counted under the name `split`."""
    from sklearn.metrics import normalized_mutual_info_score
    check_finite("cluster_eval", **{split: features})
    check_labels("cluster_eval", **{split: labels})          # -1 would index the contingency table from the end
    k = int(num_classes) if num_classes is not None else int(labels.max()) + 1
    x = F.normalize(features.float(), dim=1, eps=1e-12) if normalize else features.float()
    res = kmeans(x, k, restarts=restarts, max_iter=max_iter, seed=seed, progress=progress)
    pred, y = res["labels"].cpu().numpy(), labels.cpu().numpy()
    return {"acc": hungarian_accuracy(pred, y), "nmi": 100.0 * float(normalized_mutual_info_score(y, pred)),
            "inertia": res["inertia"], "k": k, "restarts": restarts}
