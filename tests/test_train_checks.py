"""maect.train against bad input: impossible settings stop before any work with one line naming the keys,
a monitor never costs the stage's checkpoint, and non-finite features give no k-NN number."""
import json
import math
import os
import sys

import pytest
import torch

from maect import hub, train
from maect.config import ConfigError, to_dict
from maect.validation import load_config
from maect.eval.features import NonFiniteFeatures
from maect.eval.monitor import KNNMonitor
from maect.stage_init import check_encoder
from maect.train import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from test_nnclr import TINY, run_train  # noqa: E402  (the tiny-model overrides shared by the end-to-end tests)


@pytest.mark.parametrize("total", [3, 4])
def test_stage_checkpoint_is_on_disk_before_the_monitor_runs(tmp_path, monkeypatch, total):
    """A monitor that fails at the end of a stage (e.g. k > monitor bank) must not cost the stage's checkpoint:
    every checkpoint is written before the monitor runs. Stage head, smoke=N (global batch 16) on 48 images: an epoch is 3 steps;
    total=3 ends on an epoch end, total=4 inside the second epoch."""
    from test_accum import image_folder
    import test_accum
    monkeypatch.setattr(test_accum, "N_IMAGES", 48)
    root = image_folder(tmp_path / "imgs")
    seen = []
    stage_dir = tmp_path / "out" / "head"

    def monitor(cfg, tr, mon, encoder, ema, head, nn_sum, epoch):
        seen.append((epoch, tr.step, sorted(f for f in os.listdir(stage_dir) if f.endswith(".pth"))))
        if tr.step == total:
            raise ValueError("the monitor failed")

    monkeypatch.setattr(train, "nnclr_monitor", monitor)
    cfg = load_config([*TINY, "stage=head", f"init={tiny_encoder_checkpoint(tmp_path / 'mae.pth')}",
                       "data.name=folder", f"data.root={root}", f"smoke={total}", f"out_dir={tmp_path / 'out'}"])
    with pytest.raises(ValueError, match="the monitor failed"):
        train.run(cfg)
    assert seen[-1][:2] == ((1, 3) if total == 3 else (1.33, 4))
    assert "checkpoint-final.pth" in seen[-1][2]
    if total == 4:      # the epoch end at step 3: its checkpoint was on disk when the monitor ran
        assert seen[0] == (1, 3, ["checkpoint-0000003.pth", "checkpoint-latest.pth"])
    assert hub.load_checkpoint(str(stage_dir / "checkpoint-final.pth"))["step"] == total


def tiny_encoder_checkpoint(path, nan=False) -> str:
    """An MAE checkpoint of TINY's model; nan: the final norm's weight is NaN (every feature row is NaN)."""
    cfg = load_config(TINY)
    sd = hub.model_from_cfg(cfg.model, decoder=True).state_dict()
    if nan:
        sd["norm.weight"][:] = float("nan")
    torch.save({"model": sd, "args": to_dict(cfg)}, path)
    return str(path)


def test_monitor_gives_no_number_for_non_finite_features(tmp_path):
    cfg = load_config(TINY)
    good = hub.load_encoder(tiny_encoder_checkpoint(tmp_path / "good.pth"))[0]
    bad = hub.load_encoder(tiny_encoder_checkpoint(tmp_path / "nan.pth", nan=True))[0]
    mon = KNNMonitor(cfg, torch.device("cpu"), 60, 20)
    acc = mon(good, "mean")
    assert 0.0 <= acc <= 100.0 and mon.error is None
    assert math.isnan(mon(bad, "mean"))           # before: 10.00 %, chance on Fashion-MNIST's 10 classes
    assert mon.error.counts == {"train": (60, 60)} and "60 of 60 train feature rows are non-finite" in str(mon.error)
    strict = KNNMonitor(cfg, torch.device("cpu"), 60, 20, mon.train, mon.test, strict=True)
    with pytest.raises(NonFiniteFeatures, match="60 of 60 train feature rows"):
        strict(bad, "mean")


@pytest.mark.slow
def test_ct_stage_with_a_nan_encoder_keeps_its_checkpoint_and_records_no_knn(tmp_path):
    """stage=ct from an encoder that outputs NaN: every step is skipped by the non-finite guard (max_skips raised
    so the stage runs to its end), the final checkpoint is written, and the monitor logs the count of bad rows and
    records knn_acc null in metrics.jsonl instead of a chance-level number."""
    init = tiny_encoder_checkpoint(tmp_path / "nan.pth", nan=True)
    out = tmp_path / "run"
    r = run_train(TINY + ["stage=ct", f"init={init}", f"out_dir={out}", "max_skips=100", "eval.monitor_train=100",
                          "eval.monitor_test=50"])
    assert (out / "ct" / "checkpoint-final.pth").exists()
    assert "quick k-NN not computed: extract_features: 100 of 100 train feature rows are non-finite" in r.stdout
    recs = [json.loads(line) for line in open(out / "ct" / "metrics.jsonl")]
    knn = [x for x in recs if "knn_acc" in x]
    assert knn and all(x["knn_acc"] is None and x["knn_nonfinite_rows"] == {"train": [100, 100]} for x in knn)


def test_bad_settings_stop_before_any_work(tmp_path, capsys):
    """One line naming the keys, exit status != 0, and no stage directory: nothing was trained. Before: the
    pipeline trained MAE, then head.batch_size=1 died inside torch's BatchNorm at step 1."""
    with pytest.raises(SystemExit) as e:
        main(TINY + [f"out_dir={tmp_path}", "head.batch_size=1"])
    assert str(e.value.code) == ("maect.train: head.batch_size=1: the NNCLR head's BatchNorm needs at least 2 samples "
                                 "per view and step (global batch over all ranks)")
    # checks that need the data's size run right after the data is opened, before any model is built
    with pytest.raises(SystemExit) as e:
        main(TINY + [f"out_dir={tmp_path}", "stage=mae", "mae.batch_size=65536"])
    assert str(e.value.code).startswith("maect.train: mae.batch_size=65536 exceeds the 60000 training samples")
    assert not any((tmp_path / s).exists() for s in ("mae", "head", "ct"))


def test_init_encoder_must_match_the_loader_and_ct_settings(tmp_path):
    enc = hub.load_encoder(tiny_encoder_checkpoint(tmp_path / "m.pth"))[0]     # 28 px, 3 channels, 4 blocks
    check_encoder(load_config(TINY + ["stage=ct", "init=m.pth"]), enc, "m.pth")
    for args, match in [(["model.img_size=32"], "model.img_size=32, but the encoder of init=m.pth takes 28"),
                        (["model.in_chans=1"], "model.in_chans=1, but the encoder of init=m.pth takes 3"),
                        (["ct.tuned_from_block=4"], "ct.tuned_from_block=4 must be -1 or in \\[0, 3\\]: the encoder "
                                                    "has 4 blocks \\(init=m.pth\\)")]:
        with pytest.raises(ConfigError, match=match):
            check_encoder(load_config(TINY + ["stage=ct_pipeline", "init=m.pth", *args]), enc, "m.pth")


# ------------------------------------------------------------------------------------------ init of another size
def test_init_of_another_size_is_refused_before_any_step(tmp_path):
    """stage=ct_pipeline / head from an encoder whose width differs from model.*: one line naming the key and both
    sizes, before any step and with no checkpoint. Before: the head stage trained and recorded the config's size,
    then stage 3 (and maect.eval on the head checkpoint) died in load_state_dict with a 12-line traceback."""
    from types import SimpleNamespace
    from maect.stage_init import load_for_nnclr
    init = tiny_encoder_checkpoint(tmp_path / "m.pth")           # TINY: 32-d x 4 blocks, 4 heads, patch 4
    cpu = SimpleNamespace(device=torch.device("cpu"))
    for over, line in ((["model.embed_dim=48"], "model.embed_dim=48, but the encoder of init="),
                       (["model.depth=6"], "model.depth=6, but the encoder of init="),
                       (["model.arch=vit_s16", "model.embed_dim=0", "model.depth=0", "model.num_heads=0",
                         "model.patch_size=0"], "model.arch=vit_s16 (patch_size 16), but the encoder of init=")):
        cfg = load_config(TINY + ["stage=ct_pipeline", f"init={init}", *over])
        with pytest.raises(ConfigError, match=line.replace("(", "\\(").replace(")", "\\)")) as e:
            load_for_nnclr(cfg, cpu, init)
        assert "\n" not in str(e.value) and "width x depth x heads 32x4x4, patch 4" in str(e.value)
    # the CLI: one line, no stage trained
    with pytest.raises(SystemExit) as e:
        main(TINY + ["stage=ct_pipeline", f"init={init}", "model.embed_dim=48", f"out_dir={tmp_path / 'run'}"])
    assert str(e.value.code).startswith("maect.train: model.embed_dim=48, but the encoder of init=")
    assert not list((tmp_path / "run").rglob("*.pth"))
    # a size the config leaves open (custom, 0) is the encoder's, so the stage's checkpoints record it
    cfg = load_config(TINY + ["stage=head", f"init={init}", "model.embed_dim=0", "model.num_heads=0"])
    enc = load_for_nnclr(cfg, cpu, init)[0]
    assert (cfg.model.embed_dim, cfg.model.num_heads) == (32, 4) == (enc.embed_dim, enc.num_heads)
    # weights without a config (official / timm layout) do not record the head count: the config's is used
    wide = ["model.embed_dim=192", "model.num_heads=6"]       # 192: hub guesses 3 heads from the width alone
    torch.save({"model": hub.model_from_cfg(load_config(TINY + wide).model, decoder=False).state_dict()},
               tmp_path / "bare.pth")
    cfg = load_config(TINY + ["stage=head", f"init={tmp_path / 'bare.pth'}", *wide])
    enc = load_for_nnclr(cfg, cpu, str(tmp_path / "bare.pth"))[0]
    assert enc.num_heads == 6 and cfg.model.num_heads == 6
    assert hub.load_encoder(str(tmp_path / "bare.pth"))[0].num_heads == 3


def test_head_checkpoint_of_a_sized_run_is_readable(tmp_path):
    """A head stage from an init whose size the config states correctly writes a checkpoint that maect.hub (and so
    maect.eval and stage 3) rebuilds with the same encoder: the frozen encoder's features are the init's."""
    from test_accum import image_folder
    init = tiny_encoder_checkpoint(tmp_path / "m.pth")
    root = image_folder(tmp_path / "imgs")
    cfg = load_config(TINY + ["stage=head", f"init={init}", "model.embed_dim=0", "data.name=folder",
                              f"data.root={root}", "smoke=1", "head.batch_size=16", f"out_dir={tmp_path / 'out'}"])
    path = train.run(cfg)["head_checkpoint"]
    enc, info = hub.load_encoder(path)
    ref = hub.load_encoder(init)[0]
    x = torch.randn(2, 3, 28, 28)
    assert info["model_cfg"].embed_dim == 32 and torch.equal(enc.forward_features(x), ref.forward_features(x))


# ------------------------------------------------------------------------------------------ bad paths: one line
def test_bad_out_dirs_and_checkpoints_are_one_line_before_any_work(tmp_path):
    """out_dir (or the TensorBoard folder in it) that is a file, an init that is truncated, a folder, or not a
    checkpoint: one line naming the path, exit != 0, before the data is opened. Before: FileExistsError tracebacks
    (15 lines for the TensorBoard folder) and a 13-line traceback for a truncated init."""
    init = tiny_encoder_checkpoint(tmp_path / "m.pth")
    raw = open(init, "rb").read()
    (tmp_path / "cut.pth").write_bytes(raw[:len(raw) // 3])
    (tmp_path / "text.pth").write_text("hello")
    (tmp_path / "file").write_text("")
    (tmp_path / "run" / "tb").parent.mkdir()
    (tmp_path / "run" / "tb").write_text("")
    cases = [([f"out_dir={tmp_path / 'file'}"], f"out_dir={tmp_path / 'file'}: {tmp_path / 'file'} is a file"),
             ([f"out_dir={tmp_path / 'run'}", "log.tensorboard=true"], f"{tmp_path / 'run' / 'tb'} is a file"),
             (["stage=head", f"init={tmp_path / 'cut.pth'}"], "is truncated"),
             (["stage=head", f"init={tmp_path / 'text.pth'}"], "is not a torch checkpoint (it starts with b'hell'"),
             (["stage=head", f"init={tmp_path}"], "is a folder, not a checkpoint file"),
             (["stage=head", f"init={tmp_path / 'none.pth'}"], "does not exist")]
    for args, line in cases:
        with pytest.raises(SystemExit) as e:
            main(TINY + [f"out_dir={tmp_path / 'o'}", *args])
        msg = str(e.value.code)
        assert msg.startswith("maect.train: ") and line in msg and "\n" not in msg, (args, msg)


# ------------------------------------------------------------------------------------------ resume, changed config
def test_resume_with_a_changed_config_is_refused_and_config_yaml_kept(tmp_path):
    """resume=auto with changed keys: refused in one line naming each key with the checkpoint's and the run's
    value, whether the stage finished (checkpoint-final.pth) or not (checkpoint-latest.pth), and config.yaml keeps
    the values the checkpoints were trained with. Keys that change no number (log.*, keep_last,
    model.grad_checkpointing) may change. Before: a finished stage was skipped with exit status 0 and config.yaml
    rewritten with the new values."""
    from test_accum import image_folder
    root = image_folder(tmp_path / "imgs")
    out = tmp_path / "run"
    base = TINY + ["stage=mae", "data.name=folder", f"data.root={root}", "smoke=2", "ckpt_every=1", f"out_dir={out}"]
    main(base)
    saved = (out / "config.yaml").read_text()
    for state in ("finished", "unfinished"):
        if state == "unfinished":           # a run stopped before its end: only numbered / latest checkpoints
            os.remove(out / "mae" / "checkpoint-final.pth")
        with pytest.raises(SystemExit) as e:
            main(base + ["resume=auto", "mae.blr=0.01", "mae.mask_ratio=0.5"])
        msg = str(e.value.code)
        ckpt = "checkpoint-final.pth" if state == "finished" else "checkpoint-latest.pth"
        assert msg.startswith(f"maect.train: refusing to resume from {out / 'mae' / ckpt}: it was written with "
                              f"another config (mae.blr: checkpoint 0.0015 vs run 0.01; mae.mask_ratio: checkpoint "
                              f"0.75 vs run 0.5)") and "\n" not in msg, msg
        assert (out / "config.yaml").read_text() == saved, state
    main(base + ["resume=auto", "keep_last=3", "model.grad_checkpointing=true", "log.tensorboard=false"])
    assert (out / "mae" / "checkpoint-final.pth").exists()
    now = (out / "config.yaml").read_text()
    assert "keep_last: 3" in now and "grad_checkpointing: true" in now
    assert now.replace("keep_last: 3", "keep_last: 2").replace("resume: auto", "resume: ''").replace("grad_checkpointing: true",
                                                                "grad_checkpointing: false") == saved
