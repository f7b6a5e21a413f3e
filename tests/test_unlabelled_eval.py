"""Unlabelled samples (label -1: a WebDataset sample without a cls member) in evaluation. load_eval_data leaves them
out of every split it gives the protocols and counts them (the log, maect.eval's table and JSON); every protocol
function refuses a -1 label by name instead of scoring it (an unlabelled query used to count as a wrong answer:
k-NN fell by the unlabelled share without a word; an unlabelled bank crashed the monitor with 'index -1 is out of
bounds')."""
import io
import json
import os
import sys
import tarfile

import pytest
import torch

from maect.dataloading import NoLabels, export, load_eval_data
from maect.dataloading.datasets import ImageFiles, labelled_only
from maect.eval.cluster import cluster_eval
from maect.eval.knn import knn_accuracy
from maect.eval.lowshot import lowshot
from maect.eval.probe import linear_probe
from maect.eval.summary import summarize

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_data_sources import tiny_ckpt  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Fashion-MNIST shards (10 per class per split, shards of 37) and two copies of them: 'part' without the cls
    member of every 4th val sample, 'gone' without those samples at all, 'nolab' without any train cls."""
    root = tmp_path_factory.mktemp("wds")
    src = str(root / "full")
    export.main(["--out", src, "--format", "wds", "--limit", "10", "--shard-size", "37", "--image-format", "png"])
    for name in ("part", "gone", "nolab"):
        os.makedirs(root / name)
        for shard in sorted(os.listdir(src)):
            split = shard.split("-")[0]
            with tarfile.open(os.path.join(src, shard)) as ti, \
                    tarfile.open(root / name / shard, "w", format=tarfile.USTAR_FORMAT) as to:
                for m in ti:
                    key, ext = m.name.split(".")
                    dropped = split == "val" and int(key) % 4 == 0
                    if (name == "part" and dropped and ext == "cls") or (name == "gone" and dropped) or \
                            (name == "nolab" and split == "train" and ext == "cls"):
                        continue
                    to.addfile(m, io.BytesIO(ti.extractfile(m).read()))
    return root


def test_load_eval_data_leaves_unlabelled_samples_out_and_counts_them(shards, caplog):
    test = load_eval_data("wds", str(shards / "part"), "test")
    gone = load_eval_data("wds", str(shards / "gone"), "test")
    n = 100 - len(gone)                                        # the val samples whose key is a multiple of 4
    assert n > 0 and test.unlabelled == n and gone.unlabelled == 0 and len(test) == len(gone)
    assert list(test.files) == [f.replace("/gone/", "/part/") for f in gone.files]
    assert torch.equal(test.labels, gone.labels) and bool((test.labels >= 0).all())
    assert f"{n} of 100 samples of the val split of data.name=wds" in caplog.text and "000000.png" in caplog.text
    with pytest.raises(NoLabels, match=r"none of the 100 samples of the train split of data.name=wds .* has a label "
                                       r"\(no cls member\)"):
        load_eval_data("wds", str(shards / "nolab"), "train")
    files = ImageFiles(["a.png", "b.png", "c.png"], [1, -1, 0], ["x", "y"], "list.txt")   # file lists, folders
    kept = labelled_only(files, "train", "filelist")
    assert kept.files == ["a.png", "c.png"] and kept.labels.tolist() == [1, 0] and kept.unlabelled == 1


def test_maect_eval_on_partly_labelled_shards_equals_the_labelled_shards_alone(shards, tmp_path):
    """knn / probe / lowshot / cluster give the same numbers on 'part' (n val samples without cls) as on 'gone'
    (those samples removed): the unlabelled ones are left out, not scored; the JSON and the table count them."""
    from maect.eval.__main__ import main, table
    ckpt = tiny_ckpt(tmp_path / "tiny.pth")
    common = ["--ckpt", ckpt, "--data", "wds", "--protocols", "knn,probe,lowshot,cluster", "--probe-epochs", "2",
              "--lowshot-max-iter", "50", "--kmeans-restarts", "2", "--device", "cpu"]
    part = main(common + ["--data-root", str(shards / "part"), "--out", str(tmp_path / "part.json")])
    gone = main(common + ["--data-root", str(shards / "gone"), "--out", str(tmp_path / "gone.json")])
    n = 100 - gone["n_test"]
    assert n > 0 and part["unlabelled_left_out"] == {"train": 0, "test": n} and part["n_test"] == gone["n_test"]
    assert json.load(open(tmp_path / "part.json"))["unlabelled_left_out"]["test"] == n
    assert part["protocols"] == gone["protocols"]
    assert f"(unlabelled, left out: {n} test)" in table(part)


def test_every_protocol_refuses_a_minus_one_label_by_name():
    g = torch.Generator().manual_seed(0)
    f, y = torch.randn(40, 8, generator=g), torch.arange(40) % 4
    bad = y.clone()
    bad[[3, 7]] = -1
    msg = r"2 of 40 {} labels are negative \(-1: unlabelled samples\)"
    with pytest.raises(ValueError, match="knn: " + msg.format("test")):
        knn_accuracy(f, y, f, bad, k=5)
    with pytest.raises(ValueError, match="knn: " + msg.format("train")):
        knn_accuracy(f, bad, f, y, k=5, num_classes=4)
    with pytest.raises(ValueError, match="knn: train label 4 is outside the 4 classes"):
        knn_accuracy(f, y + (y == 3).long(), f, y, k=5, num_classes=4)
    with pytest.raises(ValueError, match="linear_probe: " + msg.format("test")):
        linear_probe(f, y, f, bad, epochs=1, batch_size=8)
    with pytest.raises(ValueError, match="lowshot: " + msg.format("train")):
        lowshot(f, bad, f, y, max_iter=5)
    with pytest.raises(ValueError, match="cluster_eval: " + msg.format("test")):
        cluster_eval(f, bad, num_classes=4, restarts=1, split="test")
    with pytest.raises(ValueError, match="knn: " + msg.format("test")):
        summarize({"enc": (f, y, f, bad)}, k=5, num_classes=4, restarts=1)


@pytest.mark.slow
def test_trainer_on_train_shards_without_cls_runs_with_the_label_monitors_off(shards, tmp_path):
    """Stages 1-3 on train shards without any cls member: the k-NN monitors and nn_acc are off, each with one line
    saying why; every stage ends with its final checkpoint (the head stage's monitor crashed on the -1 bank)."""
    from test_nnclr import run_train
    from test_shards import TINY
    log = run_train(TINY + ["data.name=wds", f"data.root={shards / 'nolab'}", f"out_dir={tmp_path}", "mae.epochs=1",
                            "ct.epochs=1"]).stdout
    for stage in ("mae", "head", "ct"):
        assert os.path.exists(tmp_path / stage / "checkpoint-final.pth")
    assert log.count("k-NN monitor and final k-NN off: none of the 100 samples of the train split") == 1
    assert log.count("nn_acc monitor off: 100 of 100 samples have no cls member (data.name=wds)") == 1


def test_shards_to_shards_export_keeps_unlabelled_samples(shards, tmp_path):
    """Evaluation leaves unlabelled samples out; an export of shards to shards copies them (bytes as stored)."""
    from maect.dataloading import load_data
    export.main(["--out", str(tmp_path), "--format", "wds", "--data", "wds", "--root", str(shards / "part")])
    src, out = (load_data("wds", root, "test") for root in (str(shards / "part"), str(tmp_path)))
    assert len(out) == 100 and torch.equal(out.labels, src.labels) and int((out.labels < 0).sum()) > 0
    assert all(src.read(i) == out.read(i) for i in range(len(src)))
