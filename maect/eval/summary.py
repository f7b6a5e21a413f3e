"""The pipeline's closing table: k-NN and k-means ACC / NMI of several encoders, from the same features.

    summarize({'MAE': feats, 'MAE-CT': feats}, k=20, T=0.07, num_classes=10)
        -> {'MAE': {'knn': %, 'kmeans_acc': %, 'kmeans_nmi': %}, 'MAE-CT': {...}}
    format_summary(summary, k=20, n_train=60000, n_test=10000, kmeans_k=10, restarts=10) -> str (the table)

feats = (bank features [N, D], bank labels [N], query features [M, D], query labels [M]) as the k-NN monitor
extracts them (maect.train.KNNMonitor.features). k-NN: knn.knn_accuracy on the bank and the queries (SPEC
"Evaluation": cosine, votes exp(s / T)). k-means: cluster.cluster_eval on the query (test) split's features, k = the
number of classes (SPEC), 10 seeded k-means++ restarts, the lowest inertia kept: the same call and defaults as
`python -m maect.eval --protocols cluster` (seed 0), so both report the same numbers for the same features.
All numbers are percentages; k-means is None when the test split has fewer images than classes. NaN/inf feature rows raise NonFiniteFeatures (features.check_finite), never a number.
"""
from __future__ import annotations

from torch import Tensor

from maect.eval.cluster import cluster_eval
from maect.eval.knn import knn_accuracy


def summarize(feats: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]], k: int = 20, T: float = 0.07,
              num_classes: int | None = None, restarts: int = 10, seed: int = 0) -> dict[str, dict[str, float]]:
    """{name: {'knn', 'kmeans_acc', 'kmeans_nmi'}} (%, insertion order of `feats` kept); see the module docstring."""
    out = {}
    for name, (ftr, ytr, fte, yte) in feats.items():
        acc = knn_accuracy(ftr, ytr, fte, yte, k=k, T=T, num_classes=num_classes)
        n_clusters = int(num_classes) if num_classes is not None else int(ytr.max().item()) + 1
        if fte.shape[0] < n_clusters:      # fewer test images than classes: no k-means (None), the k-NN still counts
            out[name] = {"knn": acc, "kmeans_acc": None, "kmeans_nmi": None}
            continue
        c = cluster_eval(fte, yte, num_classes=n_clusters, restarts=restarts, seed=seed, split="test",
                         progress=f"k-means {name}")
        out[name] = {"knn": acc, "kmeans_acc": c["acc"], "kmeans_nmi": c["nmi"]}
    return out


def format_summary(summary: dict[str, dict[str, float]], k: int, n_train: int, n_test: int, kmeans_k: int,
                   restarts: int = 10) -> str:
    """The table as text: one row per encoder, a last row with the change from the first encoder to the last."""
    names = list(summary)
    w = max(len("change"), *(len(n) for n in names))
    cols = ("knn", "kmeans_acc", "kmeans_nmi")
    lines = [f"k-NN accuracy (k={k}, {n_train} train / {n_test} test) and k-means (k={kmeans_k}, {restarts} restarts, "
             f"test split), %:",
             f"{'':<{w}}  {'k-NN':>7}  {'k-means ACC':>11}  {'NMI':>7}"]
    def row(name, vals, sign=""):
        return f"{name:<{w}}  " + "  ".join("-".rjust(n) if v is None else f"{v:>{sign}{n}.2f}"
                                            for v, n in zip(vals, (7, 11, 7)))
    lines += [row(n, [summary[n][c] for c in cols]) for n in names]
    if len(names) > 1:
        a, b = summary[names[0]], summary[names[-1]]
        lines.append(row("change", [None if a[c] is None or b[c] is None else b[c] - a[c] for c in cols], "+"))
    return "\n".join(lines)
