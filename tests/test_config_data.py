import os

import pytest
import torch

from maect.dataloading import TrainLoader, fashion_mnist
from maect.dataloading import augment as A
from maect.dataloading.datasets import read_idx
from maect.config import ConfigError
from maect.validation import load_config
from maect.validation import validate_data


def test_presets_load_and_overrides_are_typed():
    cfg = load_config(["preset=tiny", "ct.epochs=3", "ct.crop_scale=0.3,1.0", "ct.aug=true", "ct.blr=3e-3"])
    assert cfg.ct.epochs == 3.0 and cfg.ct.crop_scale == (0.3, 1.0) and cfg.ct.aug is True
    assert isinstance(cfg.ct.epochs, float) and cfg.ct.blr == 0.003
    aug = load_config(["preset=tiny_aug"])       # 'inherit: tiny' then its own keys
    assert aug.ct.aug and aug.model.embed_dim == cfg.model.embed_dim
    for name in ["vit_b16", "vit_l16", "vit_h16", "vit_h14", "vit_b16_aug", "small_gpu"]:
        load_config([f"preset={name}"])


@pytest.mark.parametrize("args,match", [
    (["ct.nope=1"], "unknown config key 'ct.nope'"),
    (["ct.topk=abc"], "expected an integer"),
    (["preset=missing"], "unknown preset 'missing'"),
    (["stage=train"], "stage='train'"),
    (["nnclr.queue_size=1000"], "divisible by the global batch"),
    (["ct.topk=100000"], "ct.topk=100000"),
    (["mae.crop_scale=0.5,0.2"], "crop_scale"),
    (["epochs"], "not key=value"),
])
def test_bad_config_is_a_one_line_error(args, match):
    with pytest.raises(ConfigError, match=match):
        load_config(args)


# Every value or combination that makes a stage impossible or meaningless (issue 17), on top of the tiny preset: the
# error names the keys. Before these checks each one trained (silently wrong: no masked patch, lr 0, all steps
# skipped ...) or died later with a stack trace (BatchNorm at step 1, k-NN in the epoch-end monitor, modulo by 0).
MONITOR_BELOW_K = "eval.monitor_train=10 is smaller than eval.knn_k=20: the monitor k-NN bank needs at least k"


@pytest.mark.parametrize("args,match", [
    (["eval.monitor_train=10"], MONITOR_BELOW_K),                                  # the CT stage's monitor
    (["stage=ct_pipeline", "init=x.pth", "eval.final_train=10"], "eval.final_train=10 is smaller than eval.knn_k=20"),
    (["eval.knn_k=0"], "eval.knn_k=0 must be >= 1"),
    (["eval.knn_T=0"], "eval.knn_T=0.0 must exceed 0.01"),
    (["eval.knn_T=0.005"], "exp\\(s / T\\) over eval.knn_k=20 neighbours overflows float32"),
    (["eval.monitor_test=-1"], "eval.monitor_test=-1 must be >= 0"),
    (["head.batch_size=1"], "head.batch_size=1: the NNCLR head's BatchNorm needs at least 2 samples"),
    (["ct.batch_size=1", "nnclr.queue_size=16384"], "ct.batch_size=1: the NNCLR head's BatchNorm"),
    (["mae.accum_steps=0"], "mae.accum_steps=0 must be >= 1"),
    (["mae.batch_size=100", "mae.accum_steps=3"], "mae.batch_size=100 must be divisible by mae.accum_steps=3"),
    (["mae.warmup_epochs=11"], "mae.warmup_epochs=11.0 must be >= 0 and below mae.epochs=10.0"),
    (["mae.warmup_epochs=10"], "mae.warmup_epochs=10.0 must be >= 0 and below mae.epochs=10.0"),
    (["head.warmup_frac=1.5"], "head.warmup_frac=1.5 must lie in \\[0, 1\\]"),
    (["mae.mask_ratio=0.99"], "mae.mask_ratio=0.99 keeps 0 of the 49 patches"),
    (["mae.mask_ratio=0"], "mae.mask_ratio=0.0 keeps 49 of the 49 patches"),
    (["mae.mask_ratio=1"], "mae.mask_ratio=1.0 must be in \\[0, 1\\)"),
    (["model.img_size=30"], "model.img_size=30 is not divisible by the patch size 4"),
    (["model.embed_dim=36", "model.num_heads=8"], "model.embed_dim=36 is not divisible by model.num_heads=8"),
    (["model.embed_dim=18", "model.num_heads=3"], "model.embed_dim=18 must be divisible by 4"),
    (["model.decoder_depth=0"], "model.decoder_depth=0 must be >= 1"),
    (["model.arch=vit_x"], "model.arch='vit_x'"),
    (["model.embed_dim=0"], "model.arch=custom needs model.embed_dim"),
    (["ct.tuned_from_block=4"], "ct.tuned_from_block=4 must be -1 or in \\[0, 3\\]: the encoder has 4 blocks"),
    (["ct.tuned_from_block=-2"], "ct.tuned_from_block=-2"),
    (["head.tau=0"], "head.tau=0.0 must be a positive finite number"),
    (["ct.tau=.nan"], "ct.tau=nan must be a positive finite number"),
    (["ct.target_ema=1.5"], "ct.target_ema=1.5 must lie in \\[0, 1\\]"),
    (["ct.encoder_ema=-0.1"], "ct.encoder_ema=-0.1 must lie in \\[0, 1\\]"),
    (["ct.llrd=0"], "ct.llrd=0.0 must lie in \\(0, 1\\]"),
    (["head.crop_scale=0.5,1.5"], "head.crop_scale=\\(0.5, 1.5\\) must satisfy"),
    (["mae.blr=0"], "mae.blr=0.0 must be a positive finite number"),
    (["mae.blr=.nan"], "mae.blr=nan must be a positive"),
    (["ct.head_blr=-1"], "ct.head_blr=-1.0 must be a positive"),
    (["head.blr=.inf"], "head.blr=inf must be a positive finite number"),
    (["mae.weight_decay=-0.1"], "mae.weight_decay=-0.1 must be a finite number >= 0"),
    (["mae.epochs=-1"], "mae.epochs=-1.0 must be a positive finite number"),
    (["ct.epochs=0"], "ct.epochs=0.0 must be a positive"),
    (["mae.num_views=0"], "mae.num_views=0 must be >= 1"),
    (["nnclr.proj_dim=0"], "nnclr.proj_dim=0 must be >= 1"),
    (["log_every=0"], "log_every=0 must be >= 1"),
    (["seed=123456789"], "seed=123456789 must lie in \\[0, 131072\\)"),      # was an overflow at step 1
    (["stage=ct"], "stage=ct needs init=CHECKPOINT"),
    (["data.dali_hw_decoder_load=2"], "data.dali_hw_decoder_load=2.0 must be in \\[0, 1\\]"),
])
def test_config_that_makes_a_stage_impossible_names_the_keys(args, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(["preset=tiny", *args])
    assert "\n" not in str(e.value)


def test_entry_points_check_values_before_any_work(tmp_path):
    """python -m maect.train and python -m maect.launch refuse an impossible value at once (maect.validation's
    load_config), before a run or a job starts; maect.config.parse_config checks keys and types only."""
    from maect import config as C
    from maect import launch, train
    with pytest.raises(SystemExit, match=r"maect.train: mae.epochs=-1.0 must be a positive"):
        train.main(["preset=tiny", f"out_dir={tmp_path / 'run'}", "mae.epochs=-1"])
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit, match=r"maect.launch: mae.epochs=-1.0 must be a positive"):
        launch.main(["--dry-run", "--job-dir", str(tmp_path / "jobs"), "--", "preset=tiny", "mae.epochs=-1"])
    assert C.parse_config(["preset=tiny", "mae.epochs=-1"]).mae.epochs == -1
    with pytest.raises(ConfigError, match="nope"):
        C.parse_config(["preset=tiny", "nope=1"])


def test_only_the_stages_that_run_are_checked():
    """stage=mae never builds the NNCLR head; stages head/ct take the model from init= (so model.* is not theirs)."""
    load_config(["preset=tiny", "stage=mae", "head.batch_size=1", "eval.monitor_train=10", "ct.tau=0"])
    load_config(["preset=tiny", "stage=ct", "init=x.pth", "mae.mask_ratio=0.99", "model.img_size=30"])


def test_validate_data_checks_world_and_data_size():
    """The checks that need the world size and the data set's size (train.run calls them right after opening the
    data), each a one-line ConfigError naming the keys."""
    cfg = load_config(["preset=tiny"])
    validate_data(cfg, world=1, n_train=60000, n_test=10000)
    validate_data(cfg, world=4, n_train=60000, n_test=10000)          # 256 = 4 x 64 per rank
    for world, n_train, n_test, match in [
        (3, 60000, 10000, "mae.batch_size=256 must be divisible by world size 3"),
        (1, 100, 10000, "mae.batch_size=256 exceeds the 100 training samples \\(data.name=fashion_mnist\\): an "
                        "epoch would have no step"),
        (1, 60000, 0, "the test split of data.name=fashion_mnist is empty"),
    ]:
        with pytest.raises(ConfigError, match=match):
            validate_data(cfg, world=world, n_train=n_train, n_test=n_test)
    acc = load_config(["preset=tiny", "mae.batch_size=256", "mae.accum_steps=2"])
    with pytest.raises(ConfigError, match="mae.batch_size=256 must be divisible by world size 3 x mae.accum_steps 2"):
        validate_data(acc, world=3, n_train=60000, n_test=10000)
    # a per-rank batch of 1 is fine for BatchNorm when it spans 2 ranks (SyncBatchNorm / GlobalBatchNorm1d)
    validate_data(load_config(["preset=tiny", "head.batch_size=2", "ct.batch_size=2"]), 2, 60000, 10000)
    # the monitor's bank is the train split when eval.monitor_train is 0 or larger than it
    small = load_config(["preset=tiny", "stage=head", "init=x.pth", "head.batch_size=8", "eval.monitor_train=0"])
    with pytest.raises(ConfigError, match="eval.knn_k=20 exceeds the monitor k-NN bank of 16 samples "
                                          "\\(eval.monitor_train=0, 16 in the train split"):
        validate_data(small, world=1, n_train=16, n_test=16)


@pytest.mark.parametrize("queue_size,n,topk", [(256, 60000, 20), (8, 8, 7), (8, 8, 8), (16, 4, 12), (16, 4, 13),
                                               (64, 1000, 64), (4096, 3, 2730), (4096, 3, 2731)])
def test_queue_admissibility_matches_feature_queue(queue_size, n, topk):
    """validate_data applies FeatureQueue.check_admissible's rule before any work; both must agree everywhere."""
    from maect.heads import FeatureQueue
    cfg = load_config(["preset=tiny", "stage=head", "init=x.pth", "head.batch_size=2", f"nnclr.queue_size={queue_size}",
                       f"head.topk={min(topk, queue_size)}", "eval.knn_k=1"])
    cfg.head.topk = topk
    try:
        FeatureQueue(queue_size, 4).check_admissible(topk, n)
        queue_ok = True
    except ValueError:
        queue_ok = False
    try:
        validate_data(cfg, world=1, n_train=n, n_test=10)
        ours = True
    except ConfigError as e:
        assert f"nnclr.queue_size={queue_size} over {n} training samples" in str(e) and f"head.topk={topk}" in str(e)
        ours = False
    assert ours == queue_ok


def test_loader_drops_the_partial_last_batch():
    """No step sees a batch smaller than the configured one (a batch of 1 would break the head's BatchNorm)."""
    d = fashion_mnist(None, "test").subset(torch.arange(5))
    L = TrainLoader(d, img_size=28, in_chans=1, batch_size=2, num_views=2, seed=0)
    sizes = [b["idx"].numel() for b in L]
    assert len(L) == 2 and sizes == [2, 2]


def test_fashion_mnist_loads_and_missing_root_is_clear(tmp_path):
    d = fashion_mnist(None, "test")
    assert d.images.shape == (10000, 1, 28, 28) and d.images.dtype == torch.uint8 and d.labels.max() == 9
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist(str(tmp_path), "train")


def test_truncated_idx_file_is_detected(tmp_path):
    src = "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"
    import gzip
    raw = gzip.open(src).read()
    bad = tmp_path / "x-idx1-ubyte"
    bad.write_bytes(raw[:-10])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(str(bad))


def test_crop_boxes_respect_scale_and_ratio():
    g = torch.Generator().manual_seed(0)
    boxes = A.rrc_boxes(A.Draw(g, 4000), 28, 28, scale=(0.2, 1.0))
    area = boxes[:, 2] * boxes[:, 3] / (28 * 28)
    ratio = boxes[:, 3] / boxes[:, 2]
    # rounding of h, w to whole pixels moves area/ratio by at most ~1 pixel row/column
    assert area.min() > 0.2 - 2 * 28 / 784 and area.max() <= 1.0
    assert ratio.min() > 3 / 4 * 0.8 and ratio.max() < 4 / 3 * 1.25
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 28).all()


def test_ranks_see_exactly_the_global_batch_of_one_process():
    d = fashion_mnist(None, "test")
    kw = dict(img_size=28, in_chans=3, num_views=2, crop_scale=(0.2, 1.0), ctaug=True, seed=3)
    one = next(iter(TrainLoader(d, batch_size=64, **kw)))
    parts = [next(iter(TrainLoader(d, batch_size=32, rank=r, world=2, **kw))) for r in range(2)]
    assert torch.equal(one["idx"], torch.cat([p["idx"] for p in parts]))
    for v in range(2):
        assert torch.allclose(one["views"][v], torch.cat([p["views"][v] for p in parts]), atol=1e-6)
    assert not torch.allclose(one["views"][0], one["views"][1])  # two views differ


def test_epoch_visits_every_sample_once_and_resumes_mid_epoch():
    d = fashion_mnist(None, "test").subset(torch.arange(640))
    kw = dict(img_size=28, in_chans=1, num_views=1, batch_size=64, seed=1)
    L = TrainLoader(d, **kw)
    L.set_epoch(2)
    ids = torch.cat([b["idx"] for b in L])
    assert sorted(ids.tolist()) == list(range(640))
    L.set_epoch(2, start_step=4)
    rest = torch.cat([b["idx"] for b in L])
    assert torch.equal(rest, ids[4 * 64:])


def test_flip_rate_and_ctaug_ops_are_sane():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2000, 3, 8, 8)
    y = A.solarize(x, 1.0, A.Draw(g, 2000))
    assert torch.allclose(torch.where(x >= 128 / 255, 1 - x, x), y)
    gray = A.random_grayscale(x, 1.0, A.Draw(g, 2000))
    assert torch.allclose(gray[:, 0], gray[:, 1])
    flips = torch.stack([A.Draw(g, 1).rand() < 0.5 for _ in range(2000)]).float().mean()
    assert abs(flips.item() - 0.5) < 0.05   # 2000 Bernoulli(0.5): std 0.011
    hsv = A._hsv_to_rgb(A._rgb_to_hsv(x))
    assert torch.allclose(hsv, x, atol=1e-5)
    assert os.path.exists("/usr/share/datasets/fashion-mnist")


# every config key: a value it takes, and values it must refuse (each a one-line ConfigError naming the key). A new
# key without a row fails test_every_key_has_a_row. The run checked: preset=tiny stage=pipeline (every section).
KEY_TABLE = {
    "preset": ("tiny", ["nope"]),
    "stage": ("mae", ["train", "true"]),
    "out_dir": ("runs/x", ["", "  "]),
    "init": ("x.pth", []),                  # any text is a path: maect.train checks it exists before any work
    "seed": (3, [-1, 1.5, 2 ** 17, "true"]),
    "device": ("cpu", ["gpu", "true"]),
    "precision": ("fp32", ["fp16", "true"]),
    "threads": (1, [-1, 1.5]),
    "log_every": (5, [0, -1]),
    "fused_optimizer": ("off", ["fast", "yes", "false"]),
    "resume": ("auto", ["always", "yes"]),
    "ckpt_every": (10, [-1]),
    "ckpt_epochs": (0, [-1]),
    "keep_last": (0, [-1]),
    "max_skips": (0, [-1]),
    "signal_every": (1, [0]),
    "smoke": (2, [-1, 0.5, "true"]),
    "model.arch": ("custom", ["vit_x", "true"]),
    "model.img_size": (32, [0, 30]),
    "model.patch_size": (7, [-1, 5]),
    "model.in_chans": (1, [0, -3]),
    "model.embed_dim": (64, [-4, 18, 30]),
    "model.depth": (2, [-1, 0]),
    "model.num_heads": (2, [-1, 5]),
    "model.decoder_embed_dim": (32, [0, 30]),
    "model.decoder_depth": (1, [0]),
    "model.decoder_num_heads": (2, [0, 3]),
    "model.pool": ("cls", ["max", "true"]),
    "model.attention": ("math", ["fast"]),
    "model.compile": ("true", ["maybe", 1]),
    "model.compile_mode": ("max-autotune", ["turbo"]),
    "model.grad_checkpointing": ("true", ["maybe", 2]),
    "data.name": ("fashion_mnist", ["mnist", "true"]),
    "data.root": ("/data", []),             # a path: maect.train / maect.eval check it before any work
    "data.labels": ("", ["x.csv", "true"]),
    "data.loader": ("cpu", ["gpu", "true"]),
    "data.num_workers": (2, [-1]),
    "data.skip_corrupt": ("true", ["maybe"]),
    "data.dali_hw_decoder_load": (0.0, [1.5, -0.1, ".nan"]),
    "data.shuffle_buffer": (1, [0]),
    "data.antialias": ("false", ["maybe", 2]),
    "mae.epochs": (2, [0, -1, ".inf", ".nan"]),
    "mae.warmup_epochs": (0, [-1, 10, 11]),
    "mae.batch_size": (128, [0]),
    "mae.accum_steps": (2, [0, 3]),
    "mae.blr": (1e-3, [0, ".nan", ".inf"]),
    "mae.weight_decay": (0, [-0.1, ".inf"]),
    "mae.mask_ratio": (0.5, [1, -0.1, 0.99]),
    "mae.norm_pix_loss": ("false", ["maybe"]),
    "mae.crop_scale": ("0.5,1", ["0.5,0.2", "0,1", "0.2", "0.2,1.5"]),
    "mae.num_views": (2, [0]),
    "nnclr.proj_hidden": (32, [0]),
    "nnclr.proj_dim": (32, [0]),
    "nnclr.pred_hidden": (32, [0]),
    "nnclr.queue_size": (512, [0, 100]),
    "nnclr.queue_dtype": ("bf16", ["fp16", "true"]),
    "nnclr.loss_autocast": ("false", ["maybe", 2]),
    "head.epochs": (1, [0, ".inf"]),
    "head.warmup_frac": (0.5, [1.5, -0.1]),
    "head.batch_size": (128, [1, 0]),
    "head.blr": (1e-3, [0]),
    "head.weight_decay": (0, [-1]),
    "head.tau": (0.1, [0, -0.1]),
    "head.topk": (2, [0, 10 ** 9]),
    "head.crop_scale": ("0.5,1", ["0.5,0.2"]),
    "ct.epochs": (1, [0]),
    "ct.warmup_frac": (0, [2]),
    "ct.batch_size": (128, [1]),
    "ct.blr": (1e-3, [0]),
    "ct.weight_decay": (0, [-1]),
    "ct.head_blr": (1e-3, [0]),
    "ct.head_weight_decay": (0, [-1]),
    "ct.tau": (0.2, [0]),
    "ct.topk": (5, [0, 10 ** 9]),
    "ct.target_ema": (0.9, [1.5, -0.1]),
    "ct.encoder_ema": (0.9, [1.5]),
    "ct.llrd": (0.5, [0, 1.5]),
    "ct.tuned_from_block": (1, [-2, 4]),
    "ct.aug": ("true", ["maybe"]),
    "ct.crop_scale": ("0.5,1", ["1,0.5"]),
    "eval.knn_k": (10, [0]),
    "eval.knn_T": (0.1, [0, ".inf"]),
    "eval.monitor_train": (0, [-1, 10]),
    "eval.monitor_test": (0, [-1]),
    "eval.final_train": (0, [-1, 10]),
    "eval.final_test": (0, [-1]),
    "eval.use_ema": ("true", ["maybe"]),
    "log.tensorboard": ("true", ["maybe"]),
    "log.wandb": ("my-project", ["false", "off", "true", "a/b", "x" * 129]),
    "kernels.measure": ("false", ["maybe"]),
    "kernels.budget_s": (0.5, [0, -1, "nan", "inf"]),
    "kernels.queue_topk": ("torch", ["fast", "sdpa"]),
    "kernels.masked_patch_embed": ("gather", ["fast", "torch"]),
    "kernels.decoder_input": ("fused", ["gather"]),
}


def test_every_key_has_a_row():
    from maect.config import Config, _all_keys
    assert set(KEY_TABLE) == set(_all_keys(Config()))


@pytest.mark.parametrize("key", sorted(KEY_TABLE))
def test_each_key_takes_only_its_documented_values(key):
    """The good value loads (and is stored as given); each bad one is a ConfigError whose one line names the key.
    Before: log.wandb=false / off became a W&B project named 'False', smoke=-1 trained 0 steps, fused_optimizer=fast
    silently ran plain AdamW, ckpt_epochs=-1 was taken."""
    base = ["preset=tiny", "stage=pipeline"]
    good, bads = KEY_TABLE[key]
    load_config(base + [f"{key}={good}"])
    name = key if key != "preset" else "preset"
    for bad in bads:
        with pytest.raises(ConfigError) as e:
            load_config(base + [f"{key}={bad}"])
        msg = str(e.value)
        assert "\n" not in msg and (name in msg or (key.startswith("model.") and "model." in msg)), (key, bad, msg)


def test_string_keys_refuse_yaml_booleans_and_lists():
    """A preset file's unquoted `wandb: false` reaches a string key as YAML's False: refused naming the key, for
    every string key (before: it became the text 'False'). On the command line a string key takes the text as
    typed, so fused_optimizer=off is 'off'."""
    from maect.config import Config, _all_keys, set_key
    cfg = Config()
    def get(k):
        obj = cfg
        for p in k.split("."):
            obj = getattr(obj, p)
        return obj
    str_keys = [k for k in _all_keys(cfg) if isinstance(get(k), str)]
    assert "log.wandb" in str_keys and "out_dir" in str_keys
    for k in str_keys:
        for v in (False, True, ["a"]):
            with pytest.raises(ConfigError, match=f"config key '{k}': expected"):
                set_key(Config(), k, v)
    assert load_config(["preset=tiny", "fused_optimizer=off"]).fused_optimizer == "off"
    assert load_config(["preset=tiny", "log.wandb=''"]).log.wandb == ""
    assert load_config(["preset=tiny", "log.wandb="]).log.wandb == ""
