"""WebDataset shards (data.name=wds): export, index, decode, the rank/worker split, resume, bad members, and the
trainer on shards (stages 1-3 with the array loader's step counts, TensorBoard and W&B offline beside it)."""
import glob
import json
import os
import shutil
import struct
import tarfile

import numpy as np
import pytest
import torch

from maect.dataloading import export, shard_loader
from maect.dataloading.datasets import ArrayData, check_source, fashion_mnist, load_data, load_eval_data
from maect.dataloading.images import DataError, decode_image
from maect.dataloading.loader import TrainLoader
from wds_rank_worker import collate_spy

PER_CLASS, SHARD = 10, 37        # 100 samples per split in shards of 37, 37, 26: uneven on purpose


@pytest.fixture(scope="module")
def wds_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("wds"))
    export.main(["--out", out, "--format", "wds", "--limit", str(PER_CLASS), "--shard-size", str(SHARD),
                 "--image-format", "png"])
    return out


def source_subset(split="train") -> ArrayData:
    src = fashion_mnist(None, split)
    return src.subset(torch.from_numpy(export.select(src.labels.numpy(), PER_CLASS)))


def loader(data, **kw):
    args = dict(img_size=28, in_chans=3, batch_size=8, rank=0, world=1, seed=3, num_views=2, crop_scale=(0.5, 1.0),
                shuffle_buffer=16)
    args.update(kw)
    return shard_loader.ShardLoader(data, **args)


def epoch_ids(ld, epoch, start=0) -> list[list[int]]:
    ld.set_epoch(epoch, start)
    return [b["idx"].tolist() for b in ld]


def test_export_layout_labels_and_decode_match_the_arrays(wds_dir):
    """Uneven shards train-000000..2 and val-000000..2; every sample decodes (images.decode_image, the image-folder
    rule: grey PNG -> 3 equal channels) to the source array's pixels, with its cls label, in source order."""
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(wds_dir, "*.tar")))
    assert names == [f"{s}-{k:06d}.tar" for s in ("train", "val") for k in range(3)]
    for split, folder in (("train", "train"), ("test", "val")):
        data, src = load_eval_data("wds", wds_dir, split), source_subset(split)
        assert [len(s.keys) for s in data.shards] == [37, 37, 26]
        assert data.has_labels and data.num_classes == 10
        assert torch.equal(data.labels, src.labels)
        for i in (0, 36, 37, 99):
            img = data.load(i)
            assert img.shape == (3, 28, 28) and img.dtype == torch.uint8
            assert torch.equal(img, src.images[i].expand(3, -1, -1))
        assert data.files[37].endswith(f"{folder}-000001.tar:{data.shards[1].keys[0]}.png")


def test_brace_pattern_and_source_errors(wds_dir, tmp_path):
    pattern = os.path.join(wds_dir, "train-{000000..000002}.tar")
    assert len(load_data("wds", pattern, "train")) == 100
    assert len(load_eval_data("wds", pattern, "test", os.path.join(wds_dir, "val-*.tar"))) == 100
    with pytest.raises(DataError, match="data.labels=PATTERN"):
        load_eval_data("wds", pattern, "test")
    why = check_source("wds", os.path.join(wds_dir, "train-{000000..000003}.tar"))
    assert "1 of 4 shards" in why and "train-000003.tar" in why
    assert "holds no train-" in check_source("wds", str(tmp_path))
    bad = tmp_path / "x.tar"
    bad.write_bytes(b"not a tar file at all" * 40)
    with pytest.raises(DataError, match="x.tar.*not a readable"):
        load_data("wds", str(bad), "train")


def test_epoch_plan_splits_ranks_and_workers_without_duplicates(wds_dir):
    """2 ranks x 2 DataLoader worker processes: disjoint samples that together are the epoch (N // G steps, the
    array loader's count for N samples; fewer than G samples left over); each epoch a different order, the same
    epoch twice the same batches; the plan itself (every worker's part) covers all N exactly once."""
    data = load_data("wds", wds_dir, "train")
    n, world = 8, 2
    lds = [loader(data, batch_size=n, rank=r, world=world, num_workers=2) for r in range(world)]
    steps = len(TrainLoader(source_subset(), img_size=28, in_chans=1, batch_size=n, world=world))
    assert len(lds[0]) == steps == 100 // (n * world)
    for epoch in (0, 1):
        parts = [p for ld in lds for p in ld.worker_parts(epoch)]
        assert sorted(torch.cat(parts).tolist()) == list(range(100))
        seen = [sum(epoch_ids(ld, epoch), []) for ld in lds]
        assert [len(s) for s in seen] == [steps * n] * world
        assert not set(seen[0]) & set(seen[1])
        assert len(set(seen[0]) | set(seen[1])) == steps * n * world > 100 - n * world
        assert all(set(s) <= set(torch.cat(ld.worker_parts(epoch)).tolist()) for s, ld in zip(seen, lds))
    assert epoch_ids(lds[0], 0) == epoch_ids(lds[0], 0)
    assert epoch_ids(lds[0], 0) != epoch_ids(lds[0], 1)
    # one process with in-process reading: the same plan, all N available to it
    one = loader(data, batch_size=n * world)
    assert len(one) == steps and len(set(sum(epoch_ids(one, 0), []))) == steps * n * world


def test_buffer_shuffle_and_round_robin():
    g = torch.Generator().manual_seed(0)
    out = list(shard_loader.buffer_shuffle(range(50), 8, g))
    assert sorted(out) == list(range(50)) and out != list(range(50))
    assert list(shard_loader.buffer_shuffle(range(5), 8, torch.Generator().manual_seed(1))) != []   # shorter than buffer
    assert list(shard_loader.round_robin([3, 2, 3])) == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1), (0, 2), (2, 2)]
    assert [shard_loader.split_range(0, 10, 3, k) for k in range(3)] == [(0, 3), (3, 6), (6, 10)]


def test_resume_mid_epoch_gives_the_rest_of_the_epoch(wds_dir):
    data = load_data("wds", wds_dir, "train")
    ld = loader(data, num_workers=2)
    full = []
    ld.set_epoch(1)
    for b in ld:
        full.append((b["idx"].tolist(), b["views"][1]))
    ld.set_epoch(1, 4)
    rest = [(b["idx"].tolist(), b["views"][1]) for b in ld]
    assert len(rest) == len(full) - 4
    for (i0, v0), (i1, v1) in zip(full[4:], rest):
        assert i0 == i1 and torch.equal(v0, v1)


def corrupt(src_dir, dst_dir, member_of, how):
    """Copy the shards and overwrite member `member_of(tar members)` in train-000001.tar in place (same size)."""
    shutil.copytree(src_dir, dst_dir)
    path = os.path.join(dst_dir, "train-000001.tar")
    with tarfile.open(path) as tf:
        m = member_of(tf.getmembers())
    with open(path, "r+b") as f:
        f.seek(m.offset_data)
        raw = f.read(m.size)
        f.seek(m.offset_data)
        f.write(how(raw))
    return m.name


def test_bad_member_is_named_or_skipped(wds_dir, tmp_path):
    """A member that is no image is named by the file check before any step (or left out with skip_corrupt); one
    that passes the cheap check (PNG signature and IEND end) but does not decode is named when the stream reaches
    it, from a loader worker as a one-line DataError, or replaced in its batch with skip_corrupt."""
    garbage = corrupt(wds_dir, tmp_path / "a", lambda ms: [m for m in ms if m.name.endswith(".png")][3],
                      lambda raw: b"\0" * len(raw))
    data = load_data("wds", str(tmp_path / "a"), "train")
    with pytest.raises(DataError, match=rf"train-000001.tar:{garbage}: not an image.*data.skip_corrupt=true"):
        loader(data)
    ld = loader(data, skip_corrupt=True, batch_size=33)
    assert ld.n_valid == 99 and len(ld) == 3
    bad_id = 37 + 3
    assert all(bad_id not in ids for ids in epoch_ids(ld, 0))

    broken = corrupt(wds_dir, tmp_path / "b", lambda ms: [m for m in ms if m.name.endswith(".png")][5],
                     lambda raw: raw[:16] + b"\x55" * (len(raw) - 28) + raw[-12:])
    data = load_data("wds", str(tmp_path / "b"), "train")
    ld = loader(data, batch_size=50, num_workers=2, shuffle_buffer=1)   # buffer 1: the read order, all 100 used
    with pytest.raises(DataError, match=rf"train-000001.tar:{broken}"):
        epoch_ids(ld, 0)
    ld = loader(data, batch_size=50, skip_corrupt=True, shuffle_buffer=1)
    batches = epoch_ids(ld, 0)
    assert all(len(b) == 50 for b in batches) and 37 + 5 not in sum(batches, [])
    assert list(ld.skipped) == [data.files[37 + 5]]


def test_export_stores_image_files_as_they_are(tmp_path):
    tree = tmp_path / "tree"
    export.main(["--out", str(tree), "--limit", "2", "--format", "png"])
    export.main(["--out", str(tmp_path / "w"), "--format", "wds", "--data", "imagefolder", "--root", str(tree),
                 "--shard-size", "7"])
    files = load_data("imagefolder", str(tree), "train")
    data = load_data("wds", str(tmp_path / "w"), "train")
    assert len(data) == len(files) == 20 and torch.equal(data.labels, files.labels)
    for i in range(20):
        assert data.read(i) == open(files.files[i], "rb").read()
        assert np.array_equal(decode_image(files.files[i]), data.load(i).permute(1, 2, 0).numpy())


# ------------------------------------------------------------------------------------------------ the trainer
TINY = ["preset=tiny", "model.embed_dim=32", "model.depth=4", "model.num_heads=4", "model.decoder_embed_dim=16",
        "model.decoder_depth=1", "model.decoder_num_heads=2", "nnclr.proj_hidden=64", "nnclr.proj_dim=16",
        "nnclr.pred_hidden=64", "nnclr.queue_size=64", "mae.batch_size=16", "head.batch_size=16",
        "ct.batch_size=16", "mae.epochs=2", "mae.warmup_epochs=0.5", "head.epochs=1", "ct.epochs=2", "log_every=2",
        "threads=1", "data.shuffle_buffer=20"]


def wandb_history(run_dir) -> list[dict]:
    """The history rows of an offline W&B run file (LevelDB-style log of 32 KiB blocks after a 7-byte header,
    records = wandb_internal_pb2.Record)."""
    from wandb.proto import wandb_internal_pb2 as pb
    raw = open(glob.glob(os.path.join(run_dir, "run-*.wandb"))[0], "rb").read()
    pos, block, recs, buf = 7, 32768, [], b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pos += 7
        if kind == 0 and n == 0:
            pos += left - 7
            continue
        buf += raw[pos:pos + n]
        pos += n
        if kind in (1, 4):           # a full record, or the last fragment of one
            recs.append(buf)
            buf = b""
    rows = []
    for d in recs:
        r = pb.Record()
        r.ParseFromString(d)
        if r.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return rows


@pytest.fixture(scope="module")
def wds_run(wds_dir, tmp_path_factory):
    """One tiny pipeline (MAE -> head -> CT) on the shards through maect.train.main, TensorBoard and W&B (offline)
    on, activation checkpointing on; records every training batch's sample ids."""
    from maect import train
    out = str(tmp_path_factory.mktemp("run"))
    mp = pytest.MonkeyPatch()
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": out, "WANDB_CACHE_DIR": out,
                 "WANDB_DATA_DIR": out}.items():
        mp.setenv(k, v)
    seen = []
    mp.setattr(shard_loader.ShardLoader, "_collate", collate_spy(seen))
    threads = torch.get_num_threads()
    try:
        train.main(TINY + ["data.name=wds", f"data.root={wds_dir}", f"out_dir={out}", "log.tensorboard=true",
                           "log.wandb=maect-test", "model.grad_checkpointing=true"])
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    return out, seen


def metrics(out, stage) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out, stage, "metrics.jsonl"))]


@pytest.mark.slow
def test_trainer_runs_stages_1_to_3_on_shards_with_the_array_step_counts(wds_run):
    out, seen = wds_run
    steps = len(TrainLoader(source_subset(), img_size=28, in_chans=1, batch_size=16, world=1))   # 100 // 16
    for stage, epochs in (("mae", 2), ("head", 1), ("ct", 2)):
        assert os.path.exists(os.path.join(out, stage, "checkpoint-final.pth"))
        assert max(r["step"] for r in metrics(out, stage)) == epochs * steps
    loaders = list(dict.fromkeys(k for k, _, _ in seen))
    assert len(loaders) == 3
    for k, epochs in zip(loaders, (2, 1, 2)):
        for e in range(epochs):
            ids = sum((b for kk, ee, b in seen if kk == k and ee == e), [])
            assert len(ids) == len(set(ids)) == steps * 16              # each sample at most once per epoch
    res = json.load(open(os.path.join(out, "results.json")))
    assert {"knn_mae", "knn_maect"} <= set(res)


@pytest.mark.slow
def test_tensorboard_and_wandb_hold_the_metrics_scalars(wds_run):
    """The event files and the offline W&B run hold every numeric metrics.jsonl field, per stage, at its step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, _ = wds_run
    acc = EventAccumulator(os.path.join(out, "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    rows = wandb_history(glob.glob(os.path.join(out, "wandb", "offline-run-*"))[0])
    for stage in ("mae", "head", "ct"):
        recs = metrics(out, stage)
        want = {(f"{stage}/{k}", r["step"]): v for r in recs for k, v in r.items()
                if k not in ("stage", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        assert {"loss", "lr", "img_per_s"} <= {k.split("/")[1] for k, _ in want}
        if stage != "mae":
            assert {"nn_acc", "knn_acc", "proj_knn_acc"} <= {k.split("/")[1] for k, _ in want}
        assert {k for k, _ in want} <= tags
        for (tag, step), v in want.items():
            assert any(e.step == step and e.value == pytest.approx(v, rel=1e-6) for e in acc.Scalars(tag)), tag
            assert any(r.get(f"{stage}/step") == step and r.get(tag) == pytest.approx(v, rel=1e-12)
                       for r in rows), tag


@pytest.mark.slow
def test_two_rank_gloo_trainer_reads_disjoint_samples_covering_the_epoch(wds_dir, tmp_path):
    """torchrun, 2 ranks (gloo), 2 loader workers each: stage 1 on the shards for 2 epochs. Per epoch the ranks'
    batches hold disjoint samples, each at most once, N // G steps of them (G = 16: 96 of the 100 samples, the 4
    left over differing between epochs as the plan says); every id a rank reads is in that rank's part of the plan,
    and the two parts together are all 100 samples; the trainer ran N // G steps per epoch."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    worker = os.path.join(root, "tests", "wds_rank_worker.py")
    args = TINY + ["stage=mae", "data.name=wds", f"data.root={wds_dir}", f"out_dir={tmp_path}", "data.num_workers=2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker,
           str(tmp_path), *args]
    r = subprocess.run(cmd, cwd=root, env=dict(os.environ, OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    seen = [json.load(open(tmp_path / f"ids-rank{k}.json")) for k in range(2)]
    data = load_data("wds", wds_dir, "train")
    from maect.validation import load_config
    seed = load_config(args).seed                       # the trainer's loader: seed=cfg.seed (maect.train.make_loader)
    plan = [loader(data, batch_size=8, rank=k, world=2, num_workers=2, seed=seed) for k in range(2)]
    steps = len(plan[0])
    assert steps == 100 // 16
    left = []
    for epoch in (0, 1):
        ids = [sum((b for _, e, b in s if e == epoch), []) for s in seen]
        assert [len(x) for x in ids] == [steps * 8] * 2
        assert all(len(set(x)) == len(x) for x in ids)
        assert not set(ids[0]) & set(ids[1])
        parts = [set(torch.cat(p.worker_parts(epoch)).tolist()) for p in plan]
        assert set(ids[0]) <= parts[0] and set(ids[1]) <= parts[1]
        assert parts[0] | parts[1] == set(range(100)) and not parts[0] & parts[1]
        left.append(set(range(100)) - set(ids[0]) - set(ids[1]))
        assert len(left[-1]) == 100 - steps * 16
    assert left[0] != left[1]
    assert max(rec["step"] for rec in metrics(str(tmp_path), "mae")) == 2 * steps
