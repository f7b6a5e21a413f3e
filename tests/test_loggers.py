"""maect.loggers: the scalars of a metrics record, rank 0 only, TensorBoard and W&B (offline) read back, and the
one-line error of a missing package (checked on every rank). The trainer run on shards in test_shards.py checks
the same through maect.train.main."""
import glob
import importlib.util
import os

import pytest

from maect import config as C
from maect.validation import load_config
from maect import loggers
from maect.train import Meter


def cfg_for(tmp_path, *args):
    return load_config(["preset=tiny", f"out_dir={tmp_path}", *args])


def test_scalars_of_a_record():
    stage, step, vals = loggers.scalars({"stage": "ct", "step": 7, "epoch": 1, "loss": 2.5, "knn_acc": None,
                                         "knn_nonfinite_rows": {"train": [1]}, "skipped": 1, "nn_acc": float("nan")})
    assert (stage, step) == ("ct", 7) and vals == {"ct/epoch": 1.0, "ct/loss": 2.5, "ct/skipped": 1.0}


def test_missing_package_is_one_line_naming_pip_on_every_rank(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in ("tensorboard", "wandb") else real(n, *a))
    for args, pip in ((["log.tensorboard=true"], "pip install tensorboard"), (["log.wandb=proj"], "pip install wandb")):
        for main in (True, False):
            with pytest.raises(C.ConfigError, match=pip) as e:
                loggers.start(cfg_for(tmp_path, *args), main)
            assert "\n" not in str(e.value)
    from maect import train
    with pytest.raises(SystemExit, match=r"^maect.train: log.tensorboard=true needs the tensorboard package: "
                                         r"pip install tensorboard$"):
        train.main(["preset=tiny", f"out_dir={tmp_path}", "log.tensorboard=true", "smoke=1"])


def test_meter_records_reach_tensorboard_and_wandb_offline_on_rank_0_only(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    for k in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(k, str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = cfg_for(tmp_path, "log.tensorboard=true", "log.wandb=maect-test")
    loggers.start(cfg, main=False)                        # another rank: nothing opened, nothing written
    Meter(str(tmp_path), "mae", 4, 8, 1, main=False).write({"step": 1, "loss": 1.0})
    loggers.finish()
    assert not os.path.exists(tmp_path / "tb") and not os.path.exists(tmp_path / "wandb")

    loggers.start(cfg, main=True)
    os.makedirs(tmp_path / "mae", exist_ok=True)
    os.makedirs(tmp_path / "ct", exist_ok=True)
    m = Meter(str(tmp_path / "mae"), "mae", 4, 8, 1, main=True)
    for s in (1, 2):
        m.step(s, 0, {"loss": 1.0 / s, "lr": 0.1 * s})
    m.close()
    m = Meter(str(tmp_path / "ct"), "ct", 4, 8, 1, main=True)
    m.step(1, 0, {"loss": 3.0, "nn_acc": 0.25, "lr": 0.5})
    m.write({"step": 1, "epoch": 1, "knn_acc": 61.5, "nn_acc_epoch": 0.3, "proj_knn_acc": None})
    m.close()
    loggers.finish()
    # wandb.finish() returns once the run has ended; W&B's service process may still be writing the offline file.
    # teardown() waits for that process to exit, so the file is complete before it is read (a long session under
    # load once read it before its history records were written).
    import wandb
    wandb.teardown()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("mae/loss")] == [(1, 1.0), (2, 0.5)]
    assert [(e.step, e.value) for e in acc.Scalars("ct/knn_acc")] == [(1, 61.5)]
    assert {"mae/img_per_s", "mae/lr", "ct/nn_acc", "ct/nn_acc_epoch", "mae/time"} <= set(acc.Tags()["scalars"])
    assert "ct/proj_knn_acc" not in acc.Tags()["scalars"]      # null in the JSONL: no point
    from test_shards import wandb_history
    rows = wandb_history(glob.glob(str(tmp_path / "wandb" / "offline-run-*"))[0])
    assert [(r["mae/step"], r["mae/loss"]) for r in rows if "mae/loss" in r] == [(1, 1.0), (2, 0.5)]
    assert [(r["ct/step"], r["ct/knn_acc"]) for r in rows if "ct/knn_acc" in r] == [(1, 61.5)]
