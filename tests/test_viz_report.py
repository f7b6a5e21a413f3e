"""maect.viz's report (index.html): what it computes (clusters, neighbours, queries) against references, and the page
itself opened in a real browser (headless Chromium from file://, tools/report_browser.py) for every source maect
reads, labelled and unlabelled, plus the pipeline's own report. The browser tests fail (never skip) when chromium,
chromium-driver or selenium is missing: ./setup.sh installs them."""
import json
import os
import re
import sys

import numpy as np
import pytest
import torch

from maect.eval.cluster import cluster_eval
from maect.viz import report as R
from test_viz import tiny_ckpts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import report_browser as B  # noqa: E402  (tools/report_browser.py)


def blobs(n_per=40, C=4, D=12, seed=0, spread=0.15):
    """C well-separated Gaussian blobs on the sphere (features [C * n_per, D], labels [C * n_per])."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(C, D, generator=g), dim=1)
    y = torch.arange(C).repeat_interleave(n_per)
    return centres[y] + spread * torch.randn(len(y), D, generator=g), y


# ------------------------------------------------------------------------------------------------ what is computed
def test_cluster_view_is_cluster_eval_with_the_members_shown():
    """The report's ACC / NMI are cluster_eval's (same k-means call, seed and restarts: equal numbers); 'nearest' are
    the members closest to their centroid in order; 'sample' are other members of the same cluster, never repeated;
    purity = majority count / size; with labels the page order puts each cluster's matched class on the diagonal.
    The blobs are far apart (no point near a tie between clusters)."""
    f, y = blobs()
    y[3] = 1                                             # one wrong label: purity below 1 somewhere
    v = R.cluster_view(f, y, k=4, restarts=3, seed=5, show=6)
    ref = cluster_eval(f, y, num_classes=4, restarts=3, seed=5)
    print(f"ACC {v['acc']:.2f} / {ref['acc']:.2f}, NMI {v['nmi']:.2f} / {ref['nmi']:.2f}")
    assert v["acc"] == ref["acc"] and v["nmi"] == ref["nmi"] and v["inertia"] == ref["inertia"]
    x = torch.nn.functional.normalize(f, dim=1)
    assign = v["assign"]
    assert sorted(v["order"]) == list(range(4)) and sum(v["size"]) == len(y)
    for c in range(4):
        members = (assign == c).nonzero()[:, 0]
        centre = x[members].mean(0)
        d = ((x[members] - centre) ** 2).sum(1)
        want = members[d.argsort()][:6].tolist()
        assert v["nearest"][c] == want
        assert set(v["sample"][c]) <= set(members.tolist()) - set(want) and len(v["sample"][c]) == 6
        counts = torch.bincount(y[members], minlength=4)
        assert v["majority"][c] == int(counts.argmax()) and v["purity"][c] == pytest.approx(float(counts.max()) / len(members))
    t = v["table"][v["order"]]
    assert np.trace(t) == int(round(ref["acc"] * len(y) / 100))     # matched cells on the diagonal
    free = R.cluster_view(f, None, k=3, restarts=2, seed=0, show=4)
    assert "acc" not in free and "table" not in free
    assert [free["size"][c] for c in free["order"]] == sorted(free["size"], reverse=True)
    with pytest.raises(ValueError, match="k=200"):
        R.cluster_view(f, y, k=200)


def test_nearest_neighbours_match_brute_force():
    """Top-k by cosine similarity, query excluded, most similar first. Rule: the returned similarities equal the
    brute-force ones (1e-6: the same fp32 dot products), and the returned set equals the reference top-k set except
    where the reference's k-th and (k+1)-th similarities lie within 1e-5 (a near tie, free either way)."""
    g = torch.Generator().manual_seed(1)
    f = torch.randn(300, 16, generator=g)
    q = [0, 17, 299, 150]
    idx, sim = R.nearest_neighbours(f, q, 8)
    assert idx.shape == sim.shape == (4, 8)
    x = torch.nn.functional.normalize(f, dim=1)
    for r, i in enumerate(q):
        s = [(float(x[i] @ x[j]), j) for j in range(300) if j != i]
        s.sort(reverse=True)
        assert i not in idx[r].tolist()
        assert torch.allclose(sim[r], torch.tensor([a for a, _ in s[:8]]), atol=1e-6)
        assert bool((sim[r][:-1] >= sim[r][1:]).all())
        if s[7][0] - s[8][0] > 1e-5:
            assert set(idx[r].tolist()) == {j for _, j in s[:8]}
    small, _ = R.nearest_neighbours(f[:5], [0], 8)
    assert small.shape == (1, 4)                             # topk cut to the other N - 1 images


def test_queries_one_per_class_and_fixed():
    y = torch.tensor([2, 0, 1, 2, 0, 1, 1, 0, 2, 2])
    q = R.pick_queries(y, 5, 10, seed=3)
    assert [int(y[i]) for i in q] == [0, 1, 2] and q == R.pick_queries(y, 5, 10, seed=3)
    many = torch.arange(100) % 50                            # 50 classes, 8 queries: evenly spaced classes
    q8 = R.pick_queries(many, 8, 100, seed=0)
    assert [int(many[i]) for i in q8] == np.linspace(0, 49, 8).round().astype(int).tolist()
    free = R.pick_queries(None, 4, 10, seed=0)
    assert len(set(free)) == 4 and free == torch.randperm(10, generator=torch.Generator().manual_seed(0))[:4].tolist()


# ------------------------------------------------------------------------------------------------ in the browser
@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's chromium + chromium-driver through selenium). Missing pieces are a failure, not a
    skip: ./setup.sh installs them."""
    with B.chromium(1360, 1200) as d:
        yield d


def viz_report(tmp_path, extra_cfg=(), args=(), name="rep"):
    from maect import viz
    p = tiny_ckpts(tmp_path, list(extra_cfg))
    out = tmp_path / name
    written = viz.main(["--ckpt", p["ct"], "--ckpt-before", p["mae"], "--out", str(out), "--method", "pca",
                        "--use-ema", *args])
    return p, out, written


def check(browser, page, clusters, rows, per_row=8, encoders=2) -> dict:
    r = B.check_page(browser, str(page))
    print({k: v for k, v in r.items() if k != "broken"}, "broken:", r["broken"][:3])
    assert r["errors"] == [] and r["failed"] == [] and r["remote"] == []
    assert r["broken"] == [] and r["images"] > rows * (1 + encoders * per_row)
    assert r["cluster_groups"] == encoders and r["clusters"] == clusters * encoders
    assert r["rows"] == rows and r["row_sets"] == [encoders] * rows and r["row_thumbs"] == [per_row]
    return r


@pytest.mark.slow
def test_report_on_fashion_mnist_in_chromium(tmp_path, browser, caplog):
    """The labelled page (Fashion-MNIST test images): 10 clusters per encoder, one neighbour row per class with 8
    neighbours under MAE and MAE-CT, heat maps, the two PNGs; every image loads from file:// with no console error,
    failed or non-file request. A second run reuses the feature cache. The check fails when a thumbnail is missing."""
    p, out, written = viz_report(tmp_path, args=["--limit", "400"])
    assert set(written) == {"reconstruction", "embedding", "report"}
    check(browser, written["report"], clusters=10, rows=10)
    page = open(written["report"], encoding="utf-8").read()
    assert page.count("purity ") == 20 and "clusters-0.png" in page and "reconstruction.png" in page
    shown = set(re.findall(r'src="thumbs/([^"]+)"', page))
    assert set(os.listdir(out / "thumbs")) == shown and len(shown) < 400      # thumbnails of the shown images only
    from maect import viz
    caplog.clear()
    with caplog.at_level("INFO", logger="maect"):
        viz.main(["--ckpt", p["ct"], "--ckpt-before", p["mae"], "--out", str(out), "--method", "pca", "--use-ema",
                  "--limit", "400"])
    log = caplog.text
    assert log.count("features from the cache") == 2 and "[features MAE]" not in log
    body = lambda s: s[s.index('<section id="neighbours">'):]       # noqa: E731  (the header names the cache)
    assert body(open(written["report"], encoding="utf-8").read()) == body(page)
    # the check itself: a missing thumbnail is seen as a console error, a failed request and a broken image
    gone = sorted(shown)[0]
    os.remove(out / "thumbs" / gone)
    r = B.check_page(browser, written["report"])
    assert r["broken"] and all(b == f"thumbs/{gone}" for b in r["broken"]) and r["failed"] and r["errors"]


@pytest.mark.slow
def test_report_on_an_unlabelled_folder_in_chromium(tmp_path, browser, capsys):
    """The tiny data exported without labels (a flat folder of PNGs, data.name=folder): clusters and neighbours
    render, with no purity, ACC, NMI, heat map or class marks; --k and --queries are obeyed."""
    from maect.dataloading.datasets import fashion_mnist
    from maect.dataloading.export import encode_array_image
    src = fashion_mnist(None, "test")
    root = tmp_path / "unlabelled"
    root.mkdir()
    for i in range(120):
        (root / f"img{i:04d}.png").write_bytes(encode_array_image(src.images[i].numpy(), "png"))
    _, out, written = viz_report(tmp_path, ["data.name=folder", f"data.root={root}"], ["--k", "5", "--queries", "6"])
    assert "without label colours and the report without purity" in capsys.readouterr().err
    check(browser, written["report"], clusters=5, rows=6)
    page = open(written["report"], encoding="utf-8").read()
    assert "purity" not in page and "ACC" not in page and 'class="t miss"' not in page and "heat" not in page
    assert "no labels" in page and re.search(f'title="{re.escape(str(root))}/img\\d{{4}}.png"', page)  # file tooltips


@pytest.mark.slow
@pytest.mark.parametrize("source", ["imagefolder", "filelist", "wds"])
def test_report_on_file_sources_in_chromium(tmp_path, browser, source):
    """Image folders, file lists (labels from a CSV) and WebDataset shards, each labelled: one cluster per class,
    one neighbour row per class."""
    from maect.dataloading import export
    tree = tmp_path / "tree"
    export.main(["--out", str(tree), "--limit", "12", "--format", "png"])        # 12 per class and split
    if source == "imagefolder":
        extra = ["data.name=imagefolder", f"data.root={tree}"]
    elif source == "filelist":
        files = sorted(str(p) for p in tree.rglob("*.png"))
        (tmp_path / "list.txt").write_text("\n".join(f for f in files if "/train/" in f) + "\n")
        (tmp_path / "labels.csv").write_text("path,label,split\n" + "".join(
            f"{f},{os.path.basename(os.path.dirname(f))},{'train' if '/train/' in f else 'val'}\n" for f in files))
        extra = ["data.name=filelist", f"data.root={tmp_path / 'list.txt'}", f"data.labels={tmp_path / 'labels.csv'}"]
    else:
        shards = tmp_path / "shards"
        export.main(["--out", str(shards), "--format", "wds", "--limit", "12", "--shard-size", "50",
                     "--image-format", "png"])
        extra = ["data.name=wds", f"data.root={shards}"]
    _, _, written = viz_report(tmp_path, extra)
    check(browser, written["report"], clusters=10, rows=10)


# ------------------------------------------------------------------------------------------------ the main job
@pytest.mark.slow
def test_pipeline_writes_its_report_beside_the_closing_table(tmp_path, browser, capsys):
    """stage=pipeline ends with OUT_DIR/report/index.html, its path logged right after the closing table; the report
    reuses the final k-NN's test features (no second extraction) and its k-means ACC / NMI per encoder are the
    table's (same features, same k-means call)."""
    from test_nnclr import TINY
    from maect import train
    out = tmp_path / "run"
    train.main(TINY + ["stage=pipeline", "smoke=1", f"out_dir={out}"])
    log = capsys.readouterr().out
    lines = log.splitlines()
    at = next(i for i, s in enumerate(lines) if f"report: {out / 'report' / 'index.html'} (" in s)
    assert lines[at - 1].startswith("change") and "made in" in lines[at]
    assert "report features" not in log and "[final k-NN: MAE-CT test] done: 50 img" in log
    res = json.load(open(out / "results.json"))
    page = open(out / "report" / "index.html", encoding="utf-8").read()
    got = re.findall(r"ACC ([0-9.]+)%</b>, <b>NMI ([0-9.]+)%", page)
    want = [(f"{res['final'][n]['kmeans_acc']:.2f}", f"{res['final'][n]['kmeans_nmi']:.2f}") for n in ("MAE", "MAE-CT")]
    assert got == want
    check(browser, out / "report" / "index.html", clusters=10, rows=10)


def test_bad_values_are_one_line_errors(tmp_path):
    from maect import viz
    p = tiny_ckpts(tmp_path)
    with pytest.raises(SystemExit, match=r"--names 'A': give 2 comma-separated names"):
        viz.main(["--ckpt", p["ct"], "--ckpt-before", p["mae"], "--out", str(tmp_path / "o"), "--names", "A",
                  "--limit", "20"])
    with pytest.raises(SystemExit, match=r"k=50 clusters must lie in \[1, 20\]"):
        viz.main(["--ckpt", p["ct"], "--out", str(tmp_path / "o"), "--k", "50", "--limit", "20", "--method", "pca"])
    with pytest.raises(SystemExit):
        viz.parse_args(["--ckpt", "x", "--out", "y", "--topk", "0"])


@pytest.mark.slow
def test_pipeline_on_unlabelled_images_writes_its_report(tmp_path, browser, capsys):
    """An unlabelled folder (no final k-NN, no closing table): the pipeline still ends with its report, its features
    extracted once per encoder (progress lines), and the page renders without class marks."""
    from test_nnclr import TINY
    from maect import train
    from maect.dataloading.datasets import fashion_mnist
    from maect.dataloading.export import encode_array_image
    src, root = fashion_mnist(None, "test"), tmp_path / "imgs"
    root.mkdir()
    for i in range(96):
        (root / f"{i:03d}.png").write_bytes(encode_array_image(src.images[i].numpy(), "png"))
    out = tmp_path / "run"
    train.main(TINY + ["stage=pipeline", "smoke=1", "data.name=folder", f"data.root={root}", "mae.batch_size=16",
                       "head.batch_size=16", "ct.batch_size=16", "nnclr.queue_size=32", f"out_dir={out}"])
    log = capsys.readouterr().out      # maect.train logs to stdout (its own handler)
    assert f"report: {out / 'report' / 'index.html'} (" in log
    assert "[report features MAE] done: 96 img" in log and "[report features MAE-CT] done: 96 img" in log
    check(browser, out / "report" / "index.html", clusters=10, rows=10)
    assert "purity" not in open(out / "report" / "index.html", encoding="utf-8").read()
