"""Data sources and labels: one class-to-index mapping (the training split's) for every split of an image folder, in
training, evaluation, the feature cache and export; the evaluation path runs the training loader's file checks;
unlabelled flat folders and file lists, labels from a class-folder tree or a CSV, config errors in one line; the
torch loader and DALI read the new sources; training stages 1-3 on them with the label monitors off or on."""
import ast
import json
import logging
import os
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from maect import hub
from maect.config import ConfigError, Config, to_dict
from maect.validation import load_config
from maect.dataloading import DataError, ImageFiles, NoLabels, TrainLoader, eval_batches, fashion_mnist, load_data
from maect.dataloading import dali as D
from maect.dataloading import load_eval_data
from maect.dataloading.datasets import check_source, list_images, read_file_list, read_label_csv
from maect.dataloading.export import export_split
from maect.eval.__main__ import main as eval_main
from maect.models.vit import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from test_nnclr import TINY, run_train  # noqa: E402

needs_dali = pytest.mark.skipif(D.import_error() is not None, reason=D.import_error() or "")
COLOURS = {"a": (220, 30, 30), "b": (30, 220, 30), "c": (30, 30, 220), "d": (220, 220, 30)}


def write_tree(root, spec):
    """spec {split: {class: n}}: n constant-colour 16 x 16 PNGs per class (separable: same class = same image)."""
    for split, classes in spec.items():
        for c, n in classes.items():
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(np.full((16, 16, 3), COLOURS[c], np.uint8)).save(d / f"{i:02d}.png")
    return str(root)


def tiny_ckpt(path):
    cfg = Config()
    m = cfg.model
    m.arch, m.img_size, m.patch_size, m.in_chans, m.embed_dim, m.depth, m.num_heads, m.pool = \
        "custom", 16, 4, 3, 32, 2, 2, "mean"
    m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads = 16, 1, 2
    torch.manual_seed(0)
    model = build_model("custom", img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                        decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    torch.save({"model": model.state_dict(), "args": to_dict(cfg)}, path)
    return str(path)


def evaluate(ckpt, root, tmp_path, *extra):
    return eval_main(["--ckpt", ckpt, "--data", "imagefolder", "--data-root", root, "--protocols", "knn",
                      "--knn-k", "5", "--device", "cpu", "--out", str(tmp_path / "res.json"), *extra])


# ------------------------------------------------------------------------------ one class-to-index mapping
def test_val_split_labels_follow_the_training_classes(tmp_path, caplog):
    """train/{a,b,c}, val/{a,c}: val c is class 2 (was 1, from val's own folders), so k-NN is 100 % (was 50 %) in
    maect.eval and in the training monitor; the feature cache records the mapping and is not reused under another."""
    root = write_tree(tmp_path / "data", {"train": {"a": 12, "b": 12, "c": 12}, "val": {"a": 4, "c": 4}})
    with caplog.at_level(logging.INFO, logger="maect.data"):
        val = load_data("imagefolder", root, "test")
    assert val.classes == ["a", "b", "c"] and val.num_classes == 3
    assert val.labels.tolist() == [0] * 4 + [2] * 4
    assert "no folder for 1 of the 3 classes" in caplog.text and "(b)" in caplog.text
    ckpt = tiny_ckpt(tmp_path / "tiny.pth")
    feats = str(tmp_path / "feats")
    res = evaluate(ckpt, root, tmp_path, "--export-features", feats)
    print(res["protocols"]["knn"])
    assert res["protocols"]["knn"]["k5"] == res["protocols"]["knn"]["k10"] == 100.0 and res["num_classes"] == 3

    from maect.eval.monitor import KNNMonitor
    cfg = load_config(["data.name=imagefolder", f"data.root={root}", "model.arch=custom", "model.img_size=16",
                       "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
                       "eval.knn_k=5"])
    assert KNNMonitor(cfg, "cpu", 0, 0)(hub.load_encoder(ckpt)[0], "mean") == 100.0

    write_tree(tmp_path / "data", {"train": {"d": 12}})            # a new training class: a new mapping
    res2 = evaluate(ckpt, root, tmp_path, "--export-features", feats)
    assert res2["feature_source"] == {"train": "encoder", "test": "encoder"} and res2["num_classes"] == 4
    assert res2["protocols"]["knn"]["k5"] == 100.0
    res3 = evaluate(ckpt, root, tmp_path, "--export-features", feats)
    assert res3["feature_source"] == {"train": "cache", "test": "cache"}


def test_val_class_missing_from_train_is_an_error_naming_it_and_both_folders(tmp_path):
    root = write_tree(tmp_path / "data", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "d": 1}})
    with pytest.raises(DataError) as e:
        load_data("imagefolder", root, "test")
    msg = str(e.value)
    print(msg)
    assert "['d']" in msg and os.path.join(root, "val") in msg and os.path.join(root, "train") in msg
    with pytest.raises(SystemExit, match=r"maect.eval: class folder\(s\) \['d'\]"):
        evaluate(tiny_ckpt(tmp_path / "tiny.pth"), root, tmp_path)
    only_train = write_tree(tmp_path / "only_train", {"train": {"a": 1}})
    with pytest.raises(NoLabels, match="no val/"):                  # the k-NN monitor is then off, not a crash
        load_eval_data("imagefolder", only_train, "test")


def test_export_keeps_the_class_index_when_a_split_lacks_a_class(tmp_path):
    src = fashion_mnist(None, "test")
    train = src.subset(torch.nonzero(src.labels < 3).flatten()[:30])
    val = src.subset(torch.nonzero((src.labels == 0) | (src.labels == 2)).flatten()[:6])
    train.num_classes = val.num_classes = 3
    export_split(train, str(tmp_path / "train"))
    export_split(val, str(tmp_path / "val"))
    assert sorted(os.listdir(tmp_path / "val")) == ["0", "2"]     # no empty folder for class 1
    got = load_data("imagefolder", str(tmp_path), "test")
    stems = [int(os.path.basename(f)[:-4]) for f in got.files]
    assert torch.equal(got.labels, val.labels[stems]) and set(got.labels.tolist()) == {0, 2}   # stem: index in val


def test_evaluation_runs_the_training_loaders_file_checks(tmp_path):
    """A zero-byte file and an empty class folder in val: named before any image is encoded (eval_batches, the
    monitor, maect.eval), or left out with skip_corrupt."""
    root = write_tree(tmp_path / "data", {"train": {"a": 6, "b": 6}, "val": {"a": 3, "b": 3}})
    bad = tmp_path / "data" / "val" / "b" / "zero.png"
    bad.write_bytes(b"")
    val = load_data("imagefolder", root, "test")
    with pytest.raises(DataError, match=str(bad) + ": empty file"):
        eval_batches(val, img_size=16, in_chans=3)                  # raises on the call, not half-way
    x, y = zip(*eval_batches(val, img_size=16, in_chans=3, skip_corrupt=True))
    assert torch.cat(y).tolist() == [0, 0, 0, 1, 1, 1]
    ckpt = tiny_ckpt(tmp_path / "tiny.pth")
    with pytest.raises(SystemExit, match="zero.png: empty file"):
        evaluate(ckpt, root, tmp_path)
    res = evaluate(ckpt, root, tmp_path, "--skip-corrupt")
    assert res["n_test"] == 6 and res["protocols"]["knn"]["k5"] == 100.0
    write_tree(tmp_path / "data", {"train": {"c": 1}})
    (tmp_path / "data" / "val" / "c").mkdir()                     # a class of train, empty in val
    with pytest.raises(DataError, match="holds no images"):
        eval_batches(load_data("imagefolder", root, "test"), img_size=16, in_chans=3)


# ------------------------------------------------------------------------------ unlabelled sources, labels
def test_flat_folder_is_recursive_sorted_images_only_without_hidden(tmp_path):
    for rel in ["b.png", "a/z.jpg", "a/y/x.PNG", ".hidden/h.png", "a/.h.png", "a/._mac.jpg", "notes.txt",
                "c.tif"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(p, format="PNG")
    os.symlink(str(tmp_path), str(tmp_path / "a" / "loop"))      # a cycle: followed once, not forever
    want = [str(tmp_path / r) for r in ["a/y/x.PNG", "a/z.jpg", "b.png", "c.tif"]]
    assert list_images(str(tmp_path)) == want
    data = load_data("folder", str(tmp_path), "train")
    assert isinstance(data, ImageFiles) and data.files == want and not data.has_labels
    assert data.labels.tolist() == [-1] * 4 and data.classes == []
    with pytest.raises(NoLabels, match="data.labels"):
        load_eval_data("folder", str(tmp_path), "train")


def test_file_list_and_label_csv(tmp_path):
    write_tree(tmp_path, {"img": {"a": 2, "b": 2}})
    (tmp_path / "lists").mkdir()
    lst = tmp_path / "lists" / "train.txt"
    lst.write_text(f"# training images\n../img/a/00.png\n\n  ../img/b/01.png  \n{tmp_path}/img/a/01.png\n")
    files = read_file_list(str(lst))
    assert files == [str(tmp_path / "img/a/00.png"), str(tmp_path / "img/b/01.png"), str(tmp_path / "img/a/01.png")]
    (tmp_path / "dup.txt").write_text("img/a/00.png\n# x\nimg/b/00.png\n./img/a/00.png\n")
    with pytest.raises(DataError, match="line 4 repeats line 1"):
        read_file_list(str(tmp_path / "dup.txt"))
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label,split\nimg/a/00.png,10,train\nimg/a/01.png,2\nimg/b/00.png,10,val\n"
                   "\"img/b/01.png\",9,val\n")
    classes, rows = read_label_csv(str(csv))
    assert classes == ["2", "9", "10"]                              # numeric order when every label is an integer
    assert rows["train"] == [(str(tmp_path / "img/a/00.png"), 2), (str(tmp_path / "img/a/01.png"), 0)]
    assert [y for _, y in rows["test"]] == [2, 1]
    data = load_data("filelist", str(lst), "train", str(csv))      # labels by absolute path, -1 where none
    assert data.labels.tolist() == [2, 1, 0] and data.has_labels
    assert load_data("filelist", str(lst), "train").labels.tolist() == [-1, -1, -1]
    test = load_eval_data("filelist", str(lst), "test", str(csv))
    assert test.files == [str(tmp_path / "img/b/00.png"), str(tmp_path / "img/b/01.png")] and test.num_classes == 3
    (tmp_path / "bad.csv").write_text("img/a/00.png,1\nimg/a/01.png,2,holdout\n")
    with pytest.raises(DataError, match="line 2: split must be train or val"):
        read_label_csv(str(tmp_path / "bad.csv"))
    (tmp_path / "dup.csv").write_text("img/a/00.png,1\n./img/a/00.png,2\n")
    with pytest.raises(DataError, match="line 2 repeats the path of line 1"):
        read_label_csv(str(tmp_path / "dup.csv"))
    (tmp_path / "train_only.csv").write_text("img/a/00.png,1\n")
    with pytest.raises(NoLabels, match="no val rows"):
        load_eval_data("filelist", str(lst), "test", str(tmp_path / "train_only.csv"))
    tree = write_tree(tmp_path / "tree", {"train": {"a": 1, "b": 1}, "val": {"b": 1}})
    assert load_eval_data("folder", str(tmp_path / "img"), "test", tree).labels.tolist() == [1]


def test_data_config_errors_name_the_key_and_path(tmp_path):
    for args, match in [(["data.name=flat"], "data.name='flat': choose one of"),
                        (["data.labels=x.csv"], "data.labels='x.csv' is for data.name=folder|filelist")]:
        with pytest.raises(ConfigError, match=match):
            load_config(args)
    (tmp_path / "f.txt").write_text("x.png\n")
    for args, match in [(("folder", ""), "data.name=folder needs data.root=PATH"),
                        (("folder", str(tmp_path / "nope")), "data.root='.*nope': no such folder"),
                        (("filelist", str(tmp_path)), "data.root='.*': no such file"),
                        (("imagefolder", str(tmp_path)), "has no train/ folder"),
                        (("filelist", str(tmp_path / "f.txt"), str(tmp_path / "x")), "data.labels='.*x': neither")]:
        assert re.search(match, check_source(*args)), args
    with pytest.raises(SystemExit, match="maect.eval: --data-root='.*nope': no such folder"):
        evaluate(tiny_ckpt(tmp_path / "t.pth"), str(tmp_path / "nope"), tmp_path)
    r = run_train(["stage=mae", "data.name=folder", f"data.root={tmp_path}/nope", f"out_dir={tmp_path}/o"], ok=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "data.root=" in lines[0] and "no such folder" in lines[0]


@pytest.mark.parametrize("kind", ["twin", pytest.param("dali", marks=needs_dali)])
def test_loaders_read_flat_folders_and_file_lists(tmp_path, kind):
    write_tree(tmp_path, {"img": {"a": 8, "b": 8}})
    lst = tmp_path / "l.txt"
    lst.write_text("\n".join(f"img/{c}/{i:02d}.png" for i in range(8) for c in "ba"))
    csv = tmp_path / "y.csv"
    csv.write_text("".join(f"img/{c}/{i:02d}.png,{c}\n" for c in "ab" for i in range(8)))
    for data, labels in [(load_data("folder", str(tmp_path / "img"), "train"), [-1] * 16),
                         (load_data("filelist", str(lst), "train", str(csv)), [1, 0] * 8)]:
        kw = dict(img_size=8, in_chans=3, batch_size=4, num_views=2, seed=0)
        L = TrainLoader(data, **kw) if kind == "twin" else D.DaliLoader(data, num_threads=2, **kw)
        twin = TrainLoader(data, **kw)
        got = list(L)
        assert len(got) == 4 and sorted(torch.cat([b["idx"] for b in got]).tolist()) == list(range(16))
        for b, t in zip(got, twin):
            assert torch.equal(b["idx"], t["idx"]) and b["label"].tolist() == [labels[i] for i in b["idx"].tolist()]
            assert b["views"][0].shape == (4, 3, 8, 8)


# ------------------------------------------------------------------------------ training on unlabelled data
@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    """160 Fashion-MNIST JPEGs (16 per class) under class subfolders of one folder, 40 more for val, a file list of
    the 160 and a CSV labelling both."""
    root = tmp_path_factory.mktemp("flat")
    export_split(fashion_mnist(None, "test"), str(root / "images"), limit=16)
    export_split(fashion_mnist(None, "train"), str(root / "heldout"), limit=4)
    train = list_images(str(root / "images"))
    (root / "list.txt").write_text("\n".join(os.path.relpath(f, root) for f in train) + "\n")
    rows = [f"{os.path.relpath(f, root)},{os.path.basename(os.path.dirname(f))},train" for f in train]
    rows += [f"{os.path.relpath(f, root)},{os.path.basename(os.path.dirname(f))},val"
             for f in list_images(str(root / "heldout"))]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("source", ["folder", "filelist+labels", pytest.param("filelist+dali", marks=needs_dali)])
def test_stages_1_to_3_on_unlabelled_sources(flat, tmp_path, source):
    """MAE -> head -> CT (one step each) on a flat unlabelled folder (label monitors off, said once each) and on a
    file list with CSV labels (monitors on); the DALI loader on the file list, unlabelled."""
    data = (["data.name=folder", f"data.root={flat / 'images'}"] if source == "folder" else
            ["data.name=filelist", f"data.root={flat / 'list.txt'}"])
    if source == "filelist+labels":
        data.append(f"data.labels={flat / 'labels.csv'}")
    if source == "filelist+dali":
        data.append("data.loader=dali")
    r = run_train(TINY + data + ["eval.knn_k=5", f"out_dir={tmp_path}"])
    log = r.stdout
    for stage in ("mae", "head", "ct"):
        assert os.path.exists(tmp_path / stage / "checkpoint-final.pth"), stage
    res = json.load(open(tmp_path / "results.json"))
    metrics = [json.loads(x) for x in open(tmp_path / "ct" / "metrics.jsonl")]
    labelled = source == "filelist+labels"
    assert ("dali-cpu" in log) == (source == "filelist+dali")
    if labelled:
        assert "monitor off" not in log and "k-NN accuracy" in log and 0 <= res["knn_maect"] <= 100
        assert any("nn_acc" in m for m in metrics) and any("knn_acc" in m for m in metrics)
    else:
        print("\n".join(x for x in log.splitlines() if "off:" in x))
        assert log.count("k-NN monitor and final k-NN off: data.name=") == 1
        assert log.count("nn_acc monitor off: 160 of 160 training files have no label") == 1
        assert "knn_mae" not in res and "ct_checkpoint" in res
        assert not any("nn_acc" in m or "knn_acc" in m for m in metrics)


# ------------------------------------------------------------------------------ one home for shared pieces
def test_loader_and_dali_share_one_module_and_do_not_import_each_other():
    def imports(name):
        tree = ast.parse(open(os.path.join(ROOT, "dataloading", name)).read())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | \
            {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
             for a in n.names}
    dali, loader, shared = imports("dali.py"), imports("loader.py"), imports("shared.py")
    assert "maect.dataloading.loader" not in dali and "maect.dataloading.shared" in dali
    assert "maect.dataloading.shared" in loader
    assert not {m for m in shared if m.startswith(("maect.dataloading.loader", "maect.dataloading.dali"))}
