import os

import pytest
import torch

from maect.dataloading import TrainLoader, fashion_mnist
from maect.dataloading import augment as A
from maect.dataloading.datasets import read_idx
from maect.config import ConfigError, load_config


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
