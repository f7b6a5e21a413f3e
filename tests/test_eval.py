"""Evaluation protocols: k-NN, linear probe, low-shot, k-means, feature cache and the CLI.

Chance-level tolerance (random labels): test labels drawn uniformly and independently of everything a protocol
sees make its number of correct test predictions Binomial(M, 1/C), whatever it learned from the train side. So
accuracy = 100/C ± 100*sqrt((1/C)(1 - 1/C)/M); we allow 5 standard deviations (false-alarm odds ~1e-6, and the
seeds are fixed anyway). Hungarian-matched cluster accuracy is the exception: the matching is chosen on the
evaluated labels themselves, so it is biased upward; see test_random_labels_near_chance for its bound.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maect.eval import (cache_features, cluster_eval, extract_features, feature_meta, hungarian_accuracy, kmeans,
                        knn_accuracy, knn_predict, linear_probe, load_cached, lowshot)
from maect.eval.features import NonFiniteFeatures
from maect.eval.lowshot import fit_logreg
from maect.eval.probe import train_heads
from maect.models.vit import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist"


def clusters(n, C, D, seed, spread=0.3):
    """Perfectly separable features: C well-apart centres (norm ~5*sqrt(D)) plus small noise; labels cycle 0..C-1."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(C, D, generator=torch.Generator().manual_seed(1234)) * 5
    y = torch.arange(n) % C
    return centres[y] + spread * torch.randn(n, D, generator=g), y


def chance_band(C, M, sds=5.0):
    p = 1.0 / C
    return 100 * p, 100 * sds * math.sqrt(p * (1 - p) / M)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_model("custom", img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                       decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


# ------------------------------------------------------------------------------------------ separable: 100%
def test_separable_features_score_100():
    C, D = 10, 32
    tr_f, tr_y = clusters(1000, C, D, seed=0)
    te_f, te_y = clusters(500, C, D, seed=1)
    assert knn_accuracy(tr_f, tr_y, te_f, te_y, k=[10, 20]) == {10: 100.0, 20: 100.0}
    pr = linear_probe(tr_f, tr_y, te_f, te_y, epochs=5, batch_size=512)
    print("probe", pr)
    assert pr["test_acc"] == 100.0 and pr["val_acc"] == 100.0
    ls = lowshot(tr_f, tr_y, te_f, te_y)
    print({k: v["mean"] for k, v in ls.items()})
    assert set(ls) == {"1-shot", "2-shot", "5-shot", "1%"}
    assert all(v["mean"] == 100.0 for v in ls.values())
    assert [len(v["accs"]) for v in ls.values()] == [3, 3, 3, 1]
    assert ls["1-shot"]["n_train"] == [C] * 3 and ls["5-shot"]["n_train"] == [5 * C] * 3
    cl = cluster_eval(te_f, te_y, num_classes=C, restarts=3)
    print("cluster", cl)
    assert cl["acc"] == 100.0 and cl["nmi"] == pytest.approx(100.0)


# ------------------------------------------------------------------------------------------ random: chance
def test_random_labels_near_chance():
    C, D, N, M = 10, 32, 1000, 1000
    g = torch.Generator().manual_seed(7)
    tr_f, te_f = torch.randn(N, D, generator=g), torch.randn(M, D, generator=g)
    tr_y, te_y = torch.randint(0, C, (N,), generator=g), torch.randint(0, C, (M,), generator=g)
    mid, tol = chance_band(C, M)
    accs = {"knn": knn_accuracy(tr_f, tr_y, te_f, te_y, k=20),
            "probe": linear_probe(tr_f, tr_y, te_f, te_y, epochs=5, batch_size=512)["test_acc"]}
    accs.update({k: v["mean"] for k, v in lowshot(tr_f, tr_y, te_f, te_y).items()})
    print(f"chance {mid} ± {tol:.2f}:", accs)
    for name, a in accs.items():
        assert abs(a - mid) <= tol, name
    # k-means on 2000 random points: each of the C x C contingency cells is ~Binomial(2000, 0.01), mean 20, sd 4.4;
    # the matching takes one cell per row, at best about the row maximum (~mean + 2 sd = 29), so ACC <= ~14.5%.
    # Independent labellings have expected MI ~ (C-1)^2 / (2N) nats = 0.02, i.e. NMI ~ 0.9% of ln(10).
    cf = torch.randn(2000, D, generator=g)
    cl = cluster_eval(cf, torch.randint(0, C, (2000,), generator=g), num_classes=C, restarts=3)
    print("cluster", cl)
    assert 10.0 <= cl["acc"] <= 17.0 and cl["nmi"] <= 3.0


# ------------------------------------------------------------------------------------------ k-NN reference
def knn_bruteforce(train_f, train_y, test_f, k, T, C, standardize=False):
    """Full [M, N] similarity matrix, stable descending sort (ties: lower index), explicit per-class vote sums."""
    a, b = train_f.float(), test_f.float()
    if standardize:
        mu, sd = a.mean(0), a.std(0)
        a, b = (a - mu) / (sd + 1e-6), (b - mu) / (sd + 1e-6)
    a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    sim = b @ a.t()
    preds, gaps = [], []
    for i in range(sim.shape[0]):
        order = torch.sort(sim[i], descending=True, stable=True).indices[:k]
        votes = [0.0] * C
        for j in order.tolist():
            votes[int(train_y[j])] += math.exp(float(sim[i, j]) / T)
        top2 = sorted(votes)[-2:]
        gaps.append((top2[1] - top2[0]) / top2[1])
        preds.append(int(np.argmax(votes)))
    return torch.tensor(preds), min(gaps)


def knn_decided_rows(train_f, train_y, test_f, k, T, C, standardize):
    """Rows whose k-NN prediction no fp32 rounding can change: the exact (fp64) k-th and (k+1)-th similarities
    differ by more than 2 delta, and the best class's vote exceeds the second's by a factor above exp(2 delta / T)
    (each vote is a sum of terms exp(s / T), each off by a factor of at most exp(delta / T)). delta bounds how far
    one fp32 computation of a cosine can be from the exact one: (D + 8) u for the dot product and 4 (D + 4) u for
    the normalisation (u = 2^-24), plus, with standardisation, 4 N u for the fp32 mean and std (sums of N terms,
    features within a few sd). Elsewhere (a near tie) the two implementations may pick either side."""
    u = 2.0 ** -24
    N, D = train_f.shape
    delta = (D + 8) * u + 4 * (D + 4) * u + (4 * N * u if standardize else 0.0)
    a, b = train_f.double(), test_f.double()
    if standardize:
        mu, sd = a.mean(0), a.std(0)
        a, b = (a - mu) / (sd + 1e-6), (b - mu) / (sd + 1e-6)
    sim = F.normalize(b, dim=1) @ F.normalize(a, dim=1).t()
    top = sim.topk(min(k + 1, N), dim=1)
    clear = (top.values[:, k - 1] - top.values[:, k] > 2 * delta) if N > k else torch.ones(len(b), dtype=torch.bool)
    votes = torch.zeros(len(b), C, dtype=torch.float64).scatter_add_(
        1, train_y[top.indices[:, :k]], torch.exp(top.values[:, :k] / T))
    two = votes.topk(2, dim=1).values
    return clear & (two[:, 0] > two[:, 1] * math.exp(2 * delta / T))


@pytest.mark.parametrize("k,standardize,chunk", [(20, False, None), (10, True, 37), (1, False, 1000)])
def test_knn_matches_bruteforce(k, standardize, chunk):
    """knn_predict against the brute-force vote: the same prediction on every row whose neighbour set and vote are
    decided beyond rounding (knn_decided_rows, over 90% of them here); near ties may go either way."""
    C, N, M, D = 7, 701, 213, 24                                  # odd sizes on purpose
    g = torch.Generator().manual_seed(k)
    tr_f = torch.randn(N, D, generator=g) + 0.5                   # offset: standardisation does something
    te_f = torch.randn(M, D, generator=g) + 0.5
    tr_y = torch.randint(0, C, (N,), generator=g)
    tr_copy, te_copy = tr_f.clone(), te_f.clone()
    pred = knn_predict(tr_f, tr_y, te_f, k=k, T=0.07, num_classes=C, chunk=chunk, standardize=standardize)
    ref, gap = knn_bruteforce(tr_f, tr_y, te_f, k, 0.07, C, standardize)
    clear = knn_decided_rows(tr_f, tr_y, te_f, k, 0.07, C, standardize)
    print(f"k={k} std={standardize}: {int((pred != ref).sum())} mismatches, smallest relative vote gap {gap:.2e}, "
          f"{int(clear.sum())} of {len(clear)} rows decided beyond rounding")
    assert torch.equal(pred[clear], ref[clear]) and clear.float().mean() > 0.9
    assert torch.equal(tr_f, tr_copy) and torch.equal(te_f, te_copy)   # inputs unchanged


def test_knn_rejects_k_larger_than_bank():
    with pytest.raises(ValueError, match="train bank size"):
        knn_accuracy(torch.randn(5, 4), torch.zeros(5, dtype=torch.long), torch.randn(3, 4),
                     torch.zeros(3, dtype=torch.long), k=20)


# ------------------------------------------------------------------------------------------ clustering
def test_hungarian_accuracy_on_permuted_labels():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 500)
    perm = rng.permutation(10)
    assert hungarian_accuracy(perm[y], y) == 100.0
    pred = perm[y].copy()
    pred[:50] = (pred[:50] + 1) % 10                              # 50 of 500 moved to another cluster
    assert hungarian_accuracy(pred, y) == pytest.approx(90.0)


# ------------------------------------------------------------------------------------------ probe / low-shot maths
def test_probe_parallel_sweep_equals_single_lr_runs():
    """Each head in the one-pass sweep gets exactly its own gradient: it matches a run with that lr alone."""
    f, y = clusters(300, 5, 16, seed=3, spread=3.0)
    lrs = torch.tensor([0.4, 0.1, 0.02])
    _, W, b = train_heads(f, y, 5, lrs, epochs=3, batch_size=64)
    for i in range(3):
        _, Wi, bi = train_heads(f, y, 5, lrs[i:i + 1], epochs=3, batch_size=64)
        print(i, float((W[i] - Wi[0]).abs().max()))
        torch.testing.assert_close(W[i], Wi[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b[i], bi[0], rtol=1e-5, atol=1e-6)


def test_lowshot_lambda_to_sklearn_C_mapping():
    """At sklearn's solution with C = 1/(lam*n), the gradient of the cyanure-scaled objective
    (1/n) sum CE + lam/2 ||W||^2 vanishes (relative to its two terms)."""
    rng = np.random.default_rng(0)
    n, D, C, lam_n = 200, 8, 4, 0.5                          # overlapping classes, strong penalty: a crisp optimum
    x = rng.standard_normal((n, D))
    y = rng.integers(0, C, n)
    x[np.arange(n), y] += 1.0
    clf = fit_logreg(x, y, lam_n=lam_n, tol=1e-10, max_iter=10000)
    W = clf.coef_                                            # [C, D]
    logits = x @ W.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad_loss = (p - np.eye(C)[y]).T @ x / n                 # d/dW of the mean CE
    grad_pen = (lam_n / n) * W                               # d/dW of lam/2 ||W||^2
    rel = np.abs(grad_loss + grad_pen).max() / np.abs(grad_pen).max()
    print("relative stationarity residual", rel)
    assert clf.converged_ and rel < 1e-3


# ------------------------------------------------------------------------------------------ features / model
def test_extract_features_restores_flags_and_leaves_model_bitwise_unchanged(tmp_path):
    model = tiny_model()
    model.train()
    model.blocks[0].eval()                                   # stage-3 style: frozen lower half in eval mode
    flags = {n: m.training for n, m in model.named_modules()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 1, 28, 28, generator=g), torch.arange(8) % 3) for _ in range(3)]
    f, y = extract_features(model, batches, pool="mean")
    fc, _ = extract_features(model, batches, pool="cls")
    assert f.shape == (24, 32) and f.dtype == torch.float32 and y.tolist() == [i % 3 for i in range(8)] * 3
    with torch.no_grad():
        ref = model.eval().forward_features(batches[1][0])
    model.train()
    model.blocks[0].eval()
    torch.testing.assert_close(f[8:16], ref[:, 1:].mean(1))
    torch.testing.assert_close(fc[8:16], ref[:, 0])
    # run every protocol on these features too: none of them may reach back into the model
    knn_accuracy(f, y, f, y, k=5)
    linear_probe(f, y, f, y, epochs=1, batch_size=8)
    cluster_eval(f, y, restarts=1)
    assert {n: m.training for n, m in model.named_modules()} == flags
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_feature_cache_roundtrip_and_mismatch(tmp_path):
    ckpt = tmp_path / "m.pth"
    ckpt.write_bytes(b"x")
    meta = feature_meta(str(ckpt), pool="mean", split="train", img_size=28, in_chans=1, data="fashion_mnist",
                        data_root=None, limit=100)
    f, y = torch.randn(10, 4), torch.arange(10)
    prefix = str(tmp_path / "feats" / "train")
    assert load_cached(prefix, meta) is None
    cache_features(prefix, f, y, meta)
    got = load_cached(prefix, meta)
    assert got is not None and torch.equal(got[0], f) and torch.equal(got[1], y)
    assert load_cached(prefix, dict(meta, pool="cls")) is None
    ckpt.write_bytes(b"retrained")                           # new size / mtime: the cache no longer vouches
    assert load_cached(prefix, feature_meta(str(ckpt), pool="mean", split="train", img_size=28, in_chans=1,
                                            data="fashion_mnist", data_root=None, limit=100)) is None


# ------------------------------------------------------------------------------------------ non-finite features
# Before the check, all-NaN test features scored k-NN 10.00 %, k-means ACC 10.0 / NMI 0.0 and probe 10 % (chance on
# 10 classes) with no error. Now every protocol refuses them before any work, counting the bad rows per split.
PROTOCOLS = {
    "knn": lambda tr, ytr, te, yte: knn_accuracy(tr, ytr, te, yte, k=5, num_classes=4),
    "linear_probe": lambda tr, ytr, te, yte: linear_probe(tr, ytr, te, yte, num_classes=4, epochs=1, batch_size=64),
    "lowshot": lambda tr, ytr, te, yte: lowshot(tr, ytr, te, yte, max_iter=20),
}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_protocols_refuse_non_finite_features_counting_rows(protocol, value):
    tr_f, tr_y = clusters(200, 4, 8, seed=0)
    te_f, te_y = clusters(40, 4, 8, seed=1)
    bad_tr, bad_te = tr_f.clone(), te_f.clone()
    bad_tr[[3, 7, 11], 2] = value                    # 3 train rows with one bad entry each
    bad_te[:, 5] = value                             # every test row
    fn = PROTOCOLS[protocol]
    with pytest.raises(NonFiniteFeatures, match=f"^{protocol}: 3 of 200 train and 40 of 40 test feature rows are "
                                                 "non-finite \\(NaN/inf\\).*first bad train rows \\[3, 7, 11\\]"):
        fn(bad_tr, tr_y, bad_te, te_y)
    with pytest.raises(NonFiniteFeatures, match=f"^{protocol}: 40 of 40 test feature rows") as e:
        fn(tr_f, tr_y, bad_te, te_y)
    assert e.value.counts == {"train": (0, 200), "test": (40, 40)} and "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)           # callers that catch ValueError keep working


def test_clustering_refuses_non_finite_features():
    f, y = clusters(60, 4, 8, seed=0)
    f[[0, 59]] = float("nan")
    with pytest.raises(NonFiniteFeatures, match="^cluster_eval: 2 of 60 test feature rows are non-finite"):
        cluster_eval(f, y, num_classes=4, restarts=1, split="test")
    with pytest.raises(NonFiniteFeatures, match="^kmeans: 2 of 60 input feature rows"):
        kmeans(f, 4, restarts=1)
    f[[0, 59]] = float("inf")       # F.normalize would turn these into NaN: counted before normalising
    with pytest.raises(NonFiniteFeatures, match="2 of 60 clustered feature rows"):
        cluster_eval(f, y, num_classes=4, restarts=1)


def test_knn_never_turns_a_padded_index_into_a_vote(monkeypatch):
    """queue_topk pads a row with fewer than k finite similarities with index -1; used as a bank index it would
    vote for the last bank row's class. With finite features it cannot happen (the check comes first), so a -1
    is a kernel fault: an error, never a vote."""
    from maect import kernels
    tr_f, tr_y = clusters(50, 4, 8, seed=0)
    real = kernels.queue_topk

    def padded(q, bank, k, **kw):
        v, i = real(q, bank, k, **kw)
        v[0, -1], i[0, -1] = -math.inf, -1
        return v, i
    monkeypatch.setattr(kernels, "queue_topk", padded)
    with pytest.raises(RuntimeError, match=r"queue_topk returned index -1 .*; backend queue_topk_\w+$"):
        knn_accuracy(tr_f, tr_y, tr_f, tr_y, k=5)


def test_knn_temperature_that_overflows_is_refused():
    tr_f, tr_y = clusters(50, 4, 8, seed=0)
    with pytest.raises(ValueError, match="T=0.005 must exceed 0.011"):
        knn_accuracy(tr_f, tr_y, tr_f, tr_y, k=5, T=0.005)
    assert knn_accuracy(tr_f, tr_y, tr_f, tr_y, k=5, T=0.02) == 100.0


def test_probe_batch_of_one_is_refused():
    tr_f, tr_y = clusters(50, 4, 8, seed=0)
    with pytest.raises(ValueError, match="batch_size=1 >= 2 \\(its BatchNorm cannot normalise a single sample\\)"):
        linear_probe(tr_f, tr_y, tr_f, tr_y, epochs=1, batch_size=1)


def test_extraction_and_cache_refuse_non_finite_features(tmp_path):
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 28, 28, generator=g)
    x[2, 0, 5, 5] = float("nan")                   # one image: only its row goes bad (samples are independent)
    with pytest.raises(NonFiniteFeatures, match="^extract_features: 1 of 16 test feature rows.*rows \\[2\\]"):
        extract_features(model, [(x, torch.zeros(8)), (x.nan_to_num(), torch.zeros(8))], split="test")
    f, y = torch.randn(10, 4), torch.arange(10)
    f[4, 1] = float("inf")
    with pytest.raises(NonFiniteFeatures, match="^cache_features: 1 of 10 train feature rows"):
        cache_features(str(tmp_path / "feats" / "train"), f, y, {"split": "train"})
    assert not (tmp_path / "feats").exists()        # nothing written that a later run could reuse


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="Fashion-MNIST not installed")
def test_cli_refuses_an_encoder_that_produces_nan(tmp_path):
    """python -m maect.eval on a checkpoint whose encoder outputs NaN: one line counting the bad rows, exit != 0,
    no table, no cache; and a cache holding NaN (written before caches refused them) is refused as well."""
    from maect.eval.__main__ import main
    good = tiny_checkpoint(tmp_path / "good.pth")
    bad = tiny_checkpoint(tmp_path / "nan.pth", nan=True)
    out, feats = tmp_path / "res.json", tmp_path / "feats"
    args = ["--train-limit", "60", "--test-limit", "40", "--protocols", "knn", "--out", str(out)]
    with pytest.raises(SystemExit) as e:
        main(["--ckpt", str(bad), "--export-features", str(feats), *args])
    msg = str(e.value.code)
    assert msg.startswith("maect.eval: extract_features: 60 of 60 train feature rows are non-finite (NaN/inf)")
    assert "\n" not in msg and not out.exists()
    assert not feats.exists() or not list(feats.iterdir())     # no cache that would vouch for NaN features
    main(["--ckpt", str(good), "--export-features", str(feats), *args])
    cached = np.load(feats / "test.features.npy")
    cached[::2] = np.nan
    np.save(feats / "test.features.npy", cached)
    with pytest.raises(SystemExit) as e:
        main(["--ckpt", str(good), "--export-features", str(feats), *args])
    assert str(e.value.code).startswith("maect.eval: cached features: 20 of 40 test feature rows are non-finite")


def tiny_checkpoint(path, nan=False):
    """tiny_model() saved with the maect config that describes it; nan: its final norm's weight is NaN, so every
    feature row is NaN (what a diverged run leaves)."""
    from maect.config import Config, to_dict
    cfg = Config()
    cfg.model.arch, cfg.model.img_size, cfg.model.patch_size, cfg.model.in_chans = "custom", 28, 7, 1
    cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads, cfg.model.pool = 32, 2, 2, "mean"
    cfg.model.decoder_embed_dim, cfg.model.decoder_depth, cfg.model.decoder_num_heads = 16, 1, 2
    sd = tiny_model().state_dict()
    if nan:
        sd["norm.weight"][:] = float("nan")
    torch.save({"model": sd, "args": to_dict(cfg)}, path)
    return path


def test_cli_rejects_bad_numbers_before_loading_anything(capsys):
    from maect.eval.__main__ import parse_args
    for flag, val, match in [("--probe-batch", "1", "--probe-batch=1 must be >= 2"), ("--knn-k", "0", "--knn-k=0"),
                             ("--train-limit", "0", "--train-limit=0"), ("--knn-T", "0", "--knn-T=0.0 must exceed")]:
        with pytest.raises(SystemExit):
            parse_args(["--ckpt", "x.pth", flag, val])
        assert match in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ CLI end to end
@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="Fashion-MNIST not installed")
def test_cli_end_to_end(tmp_path):
    from maect.config import Config, to_dict
    from maect.eval.__main__ import main
    cfg = Config()
    cfg.model.arch, cfg.model.img_size, cfg.model.patch_size, cfg.model.in_chans = "custom", 28, 7, 1
    cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads, cfg.model.pool = 32, 2, 2, "mean"
    cfg.model.decoder_embed_dim, cfg.model.decoder_depth, cfg.model.decoder_num_heads = 16, 1, 2
    model = tiny_model()
    ckpt = tmp_path / "tiny.pth"
    torch.save({"model": model.state_dict(), "args": to_dict(cfg)}, ckpt)
    raw = ckpt.read_bytes()
    out, feats = tmp_path / "res.json", tmp_path / "feats"
    cmd = [sys.executable, "-m", "maect.eval", "--ckpt", str(ckpt), "--train-limit", "300", "--test-limit", "200",
           "--probe-epochs", "3", "--kmeans-restarts", "2", "--out", str(out), "--export-features", str(feats)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    print(r.stdout, r.stderr[-2000:])
    assert r.returncode == 0
    res = json.loads(out.read_text())
    P = res["protocols"]
    assert (res["n_train"], res["n_test"], res["dim"], res["pool"]) == (300, 200, 32, "mean")
    assert res["feature_source"] == {"train": "encoder", "test": "encoder"}
    assert set(P) == {"knn", "probe", "lowshot", "cluster"} and {"k10", "k20"} <= set(P["knn"])
    for v in (P["knn"]["k20"], P["probe"]["test_acc"], P["lowshot"]["1-shot"]["mean"], P["cluster"]["acc"]):
        assert 0.0 <= v <= 100.0
    assert "k-NN k=20" in r.stdout and "low-shot 1%" in r.stdout
    # a second run finds the cache (same checkpoint, pool, limits) and does not touch the encoder
    res2 = main(["--ckpt", str(ckpt), "--train-limit", "300", "--test-limit", "200", "--protocols", "knn",
                 "--out", str(tmp_path / "res2.json"), "--export-features", str(feats)])
    assert res2["feature_source"] == {"train": "cache", "test": "cache"}
    assert res2["protocols"]["knn"]["k20"] == P["knn"]["k20"]
    assert ckpt.read_bytes() == raw


# ------------------------------------------------------------------------------------------ the pipeline's closing table
def test_summary_is_knn_and_kmeans_of_the_same_features_and_formats_a_table():
    from maect.eval.summary import format_summary, summarize
    C, D = 10, 32
    good = (*clusters(400, C, D, seed=0), *clusters(200, C, D, seed=1))          # separable: 100 / 100 / 100
    g = torch.Generator().manual_seed(3)
    noise = (torch.randn(400, D, generator=g), good[1], torch.randn(200, D, generator=g), good[3])
    s = summarize({"MAE": noise, "MAE-CT": good}, k=20, T=0.07, num_classes=C)
    print(s)
    assert list(s) == ["MAE", "MAE-CT"]
    assert s["MAE-CT"] == {"knn": 100.0, "kmeans_acc": 100.0, "kmeans_nmi": pytest.approx(100.0)}
    # the same calls as maect.eval's k-NN and cluster protocols (seed 0, 10 restarts, the test split)
    assert s["MAE"]["knn"] == knn_accuracy(*noise, k=20, T=0.07, num_classes=C)
    cl = cluster_eval(noise[2], noise[3], num_classes=C, restarts=10, seed=0)
    assert (s["MAE"]["kmeans_acc"], s["MAE"]["kmeans_nmi"]) == (cl["acc"], cl["nmi"])
    mid, half = chance_band(C, 200)
    assert abs(s["MAE"]["knn"] - mid) < half
    text = format_summary(s, k=20, n_train=400, n_test=200, kmeans_k=C)
    print(text)
    lines = text.splitlines()
    assert lines[0].startswith("k-NN accuracy (k=20, 400 train / 200 test) and k-means (k=10, 10 restarts")
    assert lines[2].split()[0] == "MAE" and lines[3].split() == ["MAE-CT", "100.00", "100.00", "100.00"]
    change = lines[4].split()
    assert change[0] == "change" and float(change[1]) == pytest.approx(100.0 - s["MAE"]["knn"], abs=0.006)
    # fewer test images than classes: no k-means, the k-NN still reported
    few = summarize({"MAE": (good[0], good[1], good[2][:5], good[3][:5])}, k=5, num_classes=C)
    assert few["MAE"]["kmeans_acc"] is None and few["MAE"]["knn"] == 100.0
    assert format_summary(few, 5, 400, 5, C).splitlines()[-1].split() == ["MAE", "100.00", "-", "-"]
    bad = (good[0], good[1], good[2].clone().index_fill_(0, torch.tensor([0]), float("nan")), good[3])
    with pytest.raises(NonFiniteFeatures):
        summarize({"MAE": bad}, num_classes=C)


# ------------------------------------------------------------------------------------------ degenerate data
def class_folders(root, counts: dict) -> str:
    """An image folder root/{train,val}/<class>/*.png: counts {class: (n_train, n_val)} of random 28x28 images."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for cls, (n_tr, n_va) in counts.items():
        for split, n in (("train", n_tr), ("val", n_va)):
            os.makedirs(os.path.join(root, split, cls), exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(
                    os.path.join(root, split, cls, f"{i}.png"))
    return str(root)


def rgb_checkpoint(path) -> str:
    """A 28-px, 3-channel, 32-d x 2-block encoder with the maect config that describes it (image folders decode to
    RGB)."""
    from maect import hub
    from maect.config import Config, to_dict
    cfg = Config()
    m = cfg.model
    m.arch, m.img_size, m.patch_size, m.in_chans, m.embed_dim, m.depth, m.num_heads = "custom", 28, 7, 3, 32, 2, 2
    m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads, m.pool = 16, 1, 2, "mean"
    torch.manual_seed(0)
    torch.save({"model": hub.model_from_cfg(m, decoder=True).state_dict(), "args": to_dict(cfg)}, path)
    return str(path)


def test_cli_on_one_class_says_why_each_protocol_cannot_run(tmp_path):
    """A folder with one class: exit != 0 with one line naming, per protocol, why it cannot run, and the JSON is
    written with those reasons. Before: a scikit-learn traceback from the low-shot fit, and no JSON at all."""
    from maect.eval.__main__ import main
    ckpt = rgb_checkpoint(tmp_path / "tiny.pth")
    root = class_folders(tmp_path / "imgs", {"only": (12, 6)})
    out = tmp_path / "res.json"
    with pytest.raises(SystemExit) as e:
        main(["--ckpt", str(ckpt), "--data", "imagefolder", "--data-root", root, "--out", str(out),
              "--probe-epochs", "1", "--kmeans-restarts", "1"])
    msg = str(e.value.code)
    assert "\n" not in msg and msg.startswith("maect.eval: not run on this data: knn: the train split has 1 class "
                                              "(12 features): a classification accuracy needs at least 2")
    res = json.loads(out.read_text())
    assert set(res["not_run"]) == {"knn", "probe", "lowshot", "cluster"} and res["protocols"] == {}


def test_cli_keeps_what_it_computed_and_names_each_setting_it_skips(tmp_path, monkeypatch):
    """Two classes, one with a single training image: the 2- and 5-shot settings are named as not run (a class has
    1 image), the rest runs; then a protocol that fails (here an injected error in k-means) leaves the JSON of the
    protocols computed before it. Before: shot_split silently took 1 image for that class in every setting."""
    from maect.eval import __main__ as ev
    ckpt = rgb_checkpoint(tmp_path / "tiny.pth")
    root = class_folders(tmp_path / "imgs", {"a": (12, 5), "b": (1, 5)})
    out = tmp_path / "res.json"

    def broken(*a, **k):
        raise RuntimeError("k-means failed")
    monkeypatch.setattr(ev, "cluster_eval", broken)
    argv = ["--ckpt", str(ckpt), "--data", "imagefolder", "--data-root", root, "--out", str(out),
            "--probe-epochs", "1", "--knn-k", "5"]
    with pytest.raises(RuntimeError, match="k-means failed"):
        ev.main(argv)
    res = json.loads(out.read_text())
    assert set(res["protocols"]) == {"knn", "probe", "lowshot"}
    assert set(res["protocols"]["lowshot"]) == {"1-shot", "1%"}
    assert res["not_run"] == {"lowshot 2-shot": "a class has 1 train image, fewer than 2",
                              "lowshot 5-shot": "a class has 1 train image, fewer than 5"}
    assert {"k5", "k10"} <= set(res["protocols"]["knn"])
    # a k above the bank (13 train features here) is named, the k that fits is reported
    monkeypatch.undo()
    with pytest.raises(SystemExit) as e:
        ev.main(argv[:-2] + ["--knn-k", "20", "--protocols", "knn"])
    assert str(e.value.code).startswith("maect.eval: not run on this data: knn k=20: k=20 exceeds the 13 train "
                                        "features (the k-NN bank)")
    assert set(json.loads(out.read_text())["protocols"]["knn"]) == {"T", "standardize", "k10"}


def test_cli_names_an_unreadable_checkpoint_and_offers_a_flag_for_extra_weights(tmp_path):
    """A truncated .pth, a file of another format, a missing path: one line naming the file (before: a 12-line
    traceback). Weights the encoder has no place for: the advice is a flag of this command (--non-strict), which
    then evaluates the rest; before, the message said strict=False, which no flag offered."""
    from maect.eval.__main__ import main
    ckpt = rgb_checkpoint(tmp_path / "tiny.pth")
    raw = open(ckpt, "rb").read()
    (tmp_path / "cut.pth").write_bytes(raw[:len(raw) // 2])
    (tmp_path / "text.pth").write_text("not a checkpoint")
    for path, line in ((tmp_path / "cut.pth", "is truncated"), (tmp_path / "text.pth", "is not a torch checkpoint"),
                       (tmp_path / "none.pth", "does not exist")):
        with pytest.raises(SystemExit) as e:
            main(["--ckpt", str(path), "--out", str(tmp_path / "r.json")])
        msg = str(e.value.code)
        assert msg.startswith(f"maect.eval: --ckpt ") and line in msg and str(path) in msg and "\n" not in msg, msg
    ck = torch.load(ckpt, weights_only=True)
    ck["model"]["blocks.0.ls1.gamma"] = torch.ones(32)          # layer scale: a ViT variant maect does not build
    torch.save(ck, tmp_path / "ls.pth")
    root = class_folders(tmp_path / "imgs", {"a": (12, 4), "b": (12, 4)})
    argv = ["--ckpt", str(tmp_path / "ls.pth"), "--data", "imagefolder", "--data-root", root, "--protocols", "knn",
            "--knn-k", "5", "--out", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value.code)
    assert "ls1.gamma (1 tensors)" in msg and "--non-strict evaluates without them" in msg and "strict=False" not in msg
    assert 0 <= main(argv + ["--non-strict"])["protocols"]["knn"]["k5"] <= 100
