"""Evaluation protocols on frozen-encoder features (SPEC "Evaluation").

    extract_features(model, batches, pool, device) -> (features [N, D] fp32, labels [N])     features.py
    knn_accuracy(train_f, train_y, test_f, test_y, k=20, T=0.07)  -> % (cheap: the training monitor)  knn.py
    linear_probe(train_f, train_y, test_f, test_y, epochs=50)     -> {'test_acc', 'lr', ...}          probe.py
    lowshot(train_f, train_y, test_f, test_y)                     -> {'1-shot': {...}, ...}           lowshot.py
    cluster_eval(features, labels, num_classes)                   -> {'acc', 'nmi', ...}              cluster.py
CLI: python -m maect.eval --ckpt PATH --protocols knn,probe,lowshot,cluster
"""
from maect.eval.cluster import cluster_eval, hungarian_accuracy, kmeans  # noqa: F401
from maect.eval.features import cache_features, extract_features, feature_meta, load_cached  # noqa: F401
from maect.eval.knn import knn_accuracy, knn_predict, knn_scores  # noqa: F401
from maect.eval.lowshot import lowshot  # noqa: F401
from maect.eval.probe import linear_probe  # noqa: F401
