"""Fidelity to the published MAE-CT code where maect once differed without a flag: the crop resize (antialiased as
PIL's bicubic, data.antialias), the warmup formula of every stage and of the probe. Each flag is checked to reach
the code path it names (docs/fidelity.md lists every remaining deviation)."""
import json
import math
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from maect.dataloading import ImageFolder, TrainLoader, build_loader
from maect.dataloading import augment as A
from maect.dataloading import dali as D
from maect.dataloading.datasets import ArrayData
from maect.eval import probe
from maect.optim import lr_factor, warmup_steps

DALI_MISSING = D.import_error()


# ---------------------------------------------------------------------------------------------- crop resize
def _abs_weight_sum(n: int, S: int) -> float:
    """max over output pixels of sum |w| of the 1-D antialiased bicubic weights (n -> S pixels): the weights are
    the outputs for unit impulses, so interpolating the identity gives them all at once."""
    eye = torch.eye(n, dtype=torch.float64).view(n, 1, 1, n)
    w = F.interpolate(eye, size=(1, S), mode="bicubic", align_corners=False, antialias=True).view(n, S)
    return float(w.abs().sum(0).max())


@pytest.mark.parametrize("factor", [1.34, 2.0])
def test_crop_resize_matches_pil_bicubic(factor):
    """A crop of n = round(S * factor) pixels resized to S = 112 by resample_boxes and by PIL (crop, then
    resize(BICUBIC): what torchvision's RandomResizedCrop does to a PIL image in the published code).

    Bound. PIL resamples an 8-bit image in two separable passes (horizontal, then vertical) with the same kernel
    as torch's antialiased bicubic (a = -0.5, support widened by the downscale factor, normalised weights), in
    fixed point (22 fractional bits: under 3e-4 of a level here), and rounds to a whole level after each pass.
    Random pixels in [32, 223] keep every intermediate within [0, 255] (|w| sums to at most 1.25, and
    95.5 x 1.25 < 127.5), so PIL's clipping never acts, and torch's float passes differ from PIL's only by the
    two roundings: the first (<= 0.5 level) carried through the vertical weights (sum |w| = A), the second
    <= 0.5. Per pixel |torch - PIL| <= (0.5 A + 0.5) / 255 + 1e-3 / 255 slack (fixed point and fp32), so the mean
    too. The unfiltered path (data.antialias=false) is shown to miss that bound by far: it aliases."""
    S = 112
    n = int(round(S * factor))
    rng = np.random.default_rng(0)
    img = rng.integers(32, 224, (n + 9, n + 13, 3), dtype=np.uint8)
    top, left = 5, 8
    pil = np.asarray(Image.fromarray(img).crop((left, top, left + n, top + n)).resize((S, S), Image.BICUBIC))
    pil = torch.from_numpy(pil.astype(np.float64) / 255)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    box = torch.tensor([[top, left, n, n]], dtype=torch.float64)
    A_sum = _abs_weight_sum(n, S)
    bound = (0.5 * A_sum + 0.5 + 1e-3) / 255
    new = (A.resample_boxes(x, box, S)[0].permute(1, 2, 0).double() - pil).abs()           # one image
    batch = (A.resample_boxes(x.expand(2, -1, -1, -1), box.expand(2, -1), S)[1].permute(1, 2, 0).double() - pil).abs()
    old = (A.resample_boxes(x, box, S, antialias=False)[0].permute(1, 2, 0).double() - pil).abs()
    print(f"{n}->{S} ({n / S:.3f}x): mean |torch - PIL| antialiased {new.mean():.4f} (max {new.max():.4f}; batched "
          f"path {batch.mean():.4f}), unfiltered {old.mean():.4f} (max {old.max():.4f}); bound {bound:.4f} "
          f"(sum |w| = {A_sum:.3f})")
    assert A_sum <= 1.25
    assert new.max() <= bound and new.mean() <= bound and batch.max() <= bound
    assert old.mean() > 5 * bound


def test_crop_resize_flip_and_box_edges():
    """The antialiased path crops the box and flips left-right: a ramp R = x keeps its slope sign per flip, and a
    box already at the output size is cut out exactly (weights of a 1:1 resize are the identity)."""
    x = torch.arange(40, dtype=torch.float32).view(1, 1, 1, 40).expand(2, 3, 30, 40) / 64
    box = torch.tensor([[3, 5, 16, 16], [0, 24, 16, 16]], dtype=torch.float64)
    y = A.resample_boxes(x.contiguous(), box, 16, flip=torch.tensor([False, True]))
    assert torch.equal(y[0], x[0, :, 3:19, 5:21])
    assert torch.equal(y[1], x[1, :, 0:16, 24:40].flip(-1))


@pytest.mark.parametrize("out_size", [16, 48])
def test_batched_antialiased_resize_equals_interpolate_per_image(out_size):
    """The batched path (aa_weights as two matrix products) against F.interpolate(antialias=True) on each box cut
    out (the one-image path): 40 random RandomResizedCrop boxes of a 40 x 56 image, scale (0.08, 1), half flipped,
    resized down (16) and up (48). Tolerance: torch computes the kernel positions (j - centre + 0.5) / max(s, 1) in
    fp32, so with coordinates up to 56 each carries up to 56 x 2^-24 = 3.3e-6 of error; the kernel's slope is at
    most 1.39, so each weight moves by <= 4.6e-6 and a pass's <= 4 max(s, 1) taps (15 here, but each tap's error
    shrinks by 1 / max(s, 1)) by <= 4 x 4.6e-6 = 1.9e-5 per output of pixels in [0, 1]; two passes (the first's
    error carried through sum |w| <= 1.25): <= 1.9e-5 x 2.25 = 4.2e-5; fp32 sums add under 1e-6. 5e-5 given."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 3, 40, 56, generator=g)
    d = A.Draw(torch.Generator().manual_seed(1), 40)
    boxes = A.rrc_boxes(d, 40, 56, scale=(0.08, 1.0))
    flip = d.rand() < 0.5
    got = A.resample_boxes(x, boxes, out_size, flip)
    want = torch.cat([A.resample_boxes(x[i:i + 1], boxes[i:i + 1], out_size, flip[i:i + 1]) for i in range(40)])
    err = (got - want).abs().max().item()
    print(f"out {out_size}: max |batched - per image| = {err:.2e}")
    assert err <= 5e-5 and flip.any() and not flip.all()


def _noise_arrays(n=32, side=64, seed=0) -> ArrayData:
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8)
    return ArrayData(img, torch.arange(n) % 2, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 2)


def _noise_folder(root, n=16, side=64) -> ImageFolder:
    rng = np.random.default_rng(1)
    for c in range(2):
        os.makedirs(root / str(c), exist_ok=True)
        for i in range(n // 2):
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / str(c) / f"{i}.png")
    return ImageFolder(str(root))


KW = dict(img_size=16, in_chans=3, batch_size=8, rank=0, world=1, seed=0, num_views=2, crop_scale=(0.5, 1.0),
          ctaug=False, device="cpu")


@pytest.mark.parametrize("antialias", [True, False])
def test_antialias_flag_reaches_the_torch_loader(antialias):
    """data.antialias reaches TrainLoader (via build_loader) and its crops are resample_boxes' with that flag: the
    loader's views equal the crops computed here from the same draws."""
    data = _noise_arrays()
    loader = build_loader(data, SimpleNamespace(loader="cpu", num_workers=0, antialias=antialias), **KW)
    assert isinstance(loader, TrainLoader) and loader.antialias is antialias
    b = next(iter(loader))
    idx = b["idx"]
    g = torch.Generator().manual_seed((0 * 1000003 + 0) * 1000003 + 0)      # TrainLoader._augment's step 0
    x = data.images[idx].float().div_(255)
    for v in range(2):
        want = A.normalize(A.random_resized_crop_flip(x, 16, (0.5, 1.0), A.Draw(g, 8), antialias=antialias),
                           data.mean, data.std)
        assert torch.equal(b["views"][v], want)


def _view_std(loader, data) -> float:
    """Pixel std of view 0 (in [0, 1] units): i.i.d. noise downscaled keeps its variance when resampled without
    a low-pass filter (each output is a few-tap interpolation of independent pixels) and loses most of it when
    antialiased (averaging over ~(64 / 16)^2 x scale pixels)."""
    b = next(iter(loader))
    m, s = torch.tensor(data.mean).view(1, 3, 1, 1), torch.tensor(data.std).view(1, 3, 1, 1)
    return float((b["views"][0].cpu() * s + m).std())


@pytest.mark.parametrize("kind", ["cpu-pil", pytest.param("dali-cpu", marks=pytest.mark.skipif(
    DALI_MISSING is not None, reason=DALI_MISSING or ""))])
def test_antialias_flag_reaches_file_loaders(tmp_path, kind):
    """Image files, 64² i.i.d. uniform noise (std 0.29) cropped at scale >= 0.5 to 16²: with data.antialias=false
    the views keep most of the noise's std (> 0.2: a bicubic interpolation of 4 x 4 independent pixels keeps
    sqrt(sum w^2) >= 0.7 of it), antialiased they keep under half of it (< 0.14: each output averages over at
    least ~2.8 x 2.8 input pixels). The torch twin and DALI (CPU mode) both honour the flag."""
    data = _noise_folder(tmp_path / "noise")
    stds = {}
    for aa in (True, False):
        cfg = SimpleNamespace(loader="dali" if kind.startswith("dali") else "cpu", num_workers=0, antialias=aa)
        loader = build_loader(data, cfg, **KW)
        assert loader.backend == kind and loader.antialias is aa
        stds[aa] = _view_std(loader, data)
    print(kind, {("antialiased" if k else "unfiltered"): round(v, 3) for k, v in stds.items()})
    assert stds[False] > 0.2 and stds[True] < 0.14


@pytest.mark.parametrize("antialias", [True, False])
def test_antialias_flag_reaches_the_shard_loader(tmp_path, antialias):
    """data.antialias reaches ShardLoader (via build_loader): a sample's views are the crops computed here with
    that flag from the loader's per-sample generator."""
    from maect.dataloading import export
    from maect.dataloading.datasets import load_data
    out = str(tmp_path / "wds")
    export.main(["--out", out, "--format", "wds", "--limit", "2", "--shard-size", "8", "--image-format", "png"])
    data = load_data("wds", out, "train")
    loader = build_loader(data, SimpleNamespace(loader="cpu", num_workers=0, skip_corrupt=False, antialias=antialias),
                          **{**KW, "img_size": 20, "batch_size": 4})
    assert loader.antialias is antialias
    i = 3
    got = loader.views_of(i, data.read(i))
    img = data.load(i).float().div_(255).unsqueeze(0)
    for v in range(2):
        gi = torch.Generator().manual_seed(((0 * 1000003 + 0) * 10000019 + i) * 8 + v)   # ShardLoader.views_of's
        assert torch.equal(got[v], A.random_resized_crop_flip(img, 20, (0.5, 1.0), A.Draw(gi, 1), antialias=antialias))


# ---------------------------------------------------------------------------------------------- lr schedules
def published_factor(step: int, total: int, frac: float) -> float:
    """The published stage schedule (MAE-CT's schedules/: SequentialSchedule of LinearIncreasing(exclude_first,
    exclude_last) up to end_percent = 100 frac, floored, then CosineDecreasing(exclude_last)), written out from
    those classes' definitions: BasicSchedule.get_value adds 1 to total_steps for exclude_last, and 1 to step and
    total_steps for exclude_first; progress = step / max(1, total_steps - 1)."""
    W = int(total * frac)
    if step < W:
        s, n = step + 1, W + 2                      # exclude_first, exclude_last
        return s / max(1, n - 1)
    s, n = step - W, total - W + 1                  # exclude_last
    return 1 - (1 - math.cos(math.pi * s / max(1, n - 1))) / 2


@pytest.mark.parametrize("total", [1, 2, 5, 10, 13, 14, 100, 937])
def test_stage_warmup_is_the_published_formula(total):
    """lr_factor with warmup_steps(0.2 T) equals the published schedule at every step: the first step trains at
    1 / (W + 1), not 0; W = floor(0.2 T) (T = 13, 14: round would give 3, floor gives 2); the cosine starts at 1
    on step W. Exact up to float rounding (1e-12)."""
    W = warmup_steps(0.2 * total)
    assert W == (total // 5)
    got = [lr_factor(s, total, W) for s in range(total)]
    want = [published_factor(s, total, 0.2) for s in range(total)]
    assert got == pytest.approx(want, abs=1e-12)
    if W:
        assert got[0] == pytest.approx(1 / (W + 1)) and got[W - 1] == pytest.approx(W / (W + 1))
    assert got[W] == pytest.approx(1.0)                       # W = floor(0.2 T) < T
    assert min(got) > 0


def test_warmup_steps_floors_and_refuses_bad_values():
    assert [warmup_steps(x) for x in (0, 0.999, 2.6, 2.9999, 3.0)] == [0, 0, 2, 2, 3]
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="warmup"):
            warmup_steps(bad)


def test_probe_schedule_is_the_published_probe_schedule(monkeypatch):
    """The published probe (yamls/probe.yaml: legacy Linear to end_percent 10, then CosineAnnealing; no exclude
    flags): step / (W - 1) during warmup (0 at the first step, 1 at step W - 1), then a cosine from 1 at step W
    to exactly 0 at the last step; W = floor(0.1 T). train_heads uses it: with 15 steps W is 1 (round: 2)."""
    T, W = 50, 5
    got = [probe.lr_at(s, T, W) for s in range(T)]
    assert got[:W + 1] == pytest.approx([0, 0.25, 0.5, 0.75, 1, 1])
    assert got[-1] == pytest.approx(0, abs=1e-12)
    assert got[W + 1:] == pytest.approx([(1 + math.cos(math.pi * k / (T - W - 1))) / 2 for k in range(1, T - W)])
    seen = []
    real = probe.lr_at
    monkeypatch.setattr(probe, "lr_at", lambda s, t, w: seen.append((s, t, w)) or real(s, t, w))
    g = torch.Generator().manual_seed(0)
    f, y = torch.randn(60, 4, generator=g), torch.randint(0, 3, (60,), generator=g)
    probe.train_heads(f, y, 3, torch.tensor([0.1]), epochs=3, batch_size=12)        # 5 steps per epoch
    assert [s for s, _, _ in seen] == list(range(15)) and {(t, w) for _, t, w in seen} == {(15, 1)}


def _lrs(out_dir, stage) -> list[float]:
    recs = [json.loads(x) for x in open(os.path.join(out_dir, stage, "metrics.jsonl"))]
    return [r["lr"] for r in recs if "lr" in r and "loss" in r]


@pytest.mark.slow
def test_trainer_stages_follow_the_published_warmup(tmp_path):
    """The trainer's logged lr (param group 0, log_every=1) at each step is base lr x lr_factor with the
    published warmup. MAE: 6 steps of 64 on 60000 images (937 per epoch), warmup_epochs 0.0032 = 2.998 steps ->
    W = 2 (round: 3), so steps 0-2 train at 1/3, 2/3, 1 of the base lr. Head and CT: 8 steps, warmup_frac 0.2 ->
    W = 1 (round(1.6): 2), so step 0 at 1/2, step 1 at 1."""
    from maect import train
    from maect.validation import load_config
    from test_nnclr import TINY
    common = [a for a in TINY if not a.startswith(("mae.epochs", "head.epochs", "mae.warmup_epochs"))]
    common += ["log_every=1", f"out_dir={tmp_path}"]
    cfg = load_config(common + ["stage=mae", "mae.epochs=0.0064", "mae.warmup_epochs=0.0032"])
    train.run(cfg)
    base = train.mae_lr(cfg.mae)
    lrs = _lrs(tmp_path, "mae")
    assert len(lrs) == 6
    assert lrs == pytest.approx([base * lr_factor(s, 6, 2) for s in range(6)], rel=1e-6)
    assert lrs[:3] == pytest.approx([base / 3, 2 * base / 3, base], rel=1e-6)
    cfg = load_config(common + ["stage=head", "head.epochs=0.008538", f"init={tmp_path}/mae/checkpoint-final.pth"])
    train.run(cfg)
    base = cfg.head.blr * 2 * cfg.head.batch_size / 256
    lrs = _lrs(tmp_path, "head")
    assert len(lrs) == 8
    assert lrs == pytest.approx([base * lr_factor(s, 8, 1) for s in range(8)], rel=1e-6)
    assert lrs[:2] == pytest.approx([base / 2, base], rel=1e-6)
    cfg = load_config(common + ["stage=ct", "ct.epochs=0.008538", f"init={tmp_path}/head/checkpoint-final.pth"])
    train.run(cfg)
    base = cfg.ct.head_blr * 2 * cfg.ct.batch_size / 256      # param group 0: the head's (stage 3 builds it first)
    lrs = _lrs(tmp_path, "ct")
    assert lrs == pytest.approx([base * lr_factor(s, 8, 1) for s in range(8)], rel=1e-6)


# ---------------------------------------------------------------------------------------------- eval resize
def test_eval_resize_matches_torchvision_on_pil(tmp_path):
    """eval_batches on an image file: torchvision's Resize(round(S / 0.875)) + CenterCrop(S) on the PIL image (the
    published test transform), written here with PIL: shorter side 73 for S = 64, longer int(73 x 300 / 200) =
    109, crop offsets int(round(d / 2)). Same bound as the crop resize (random pixels in [32, 223]; two 8-bit
    roundings in PIL; sum |w| <= 1.25); the unfiltered resize (antialias=False) misses it by far."""
    S, short = 64, 73
    rng = np.random.default_rng(2)
    arr = rng.integers(32, 224, (200, 300, 3), dtype=np.uint8)
    os.makedirs(tmp_path / "val" / "a")
    os.makedirs(tmp_path / "train" / "a")
    Image.fromarray(arr).save(tmp_path / "val" / "a" / "0.png")
    Image.fromarray(arr).save(tmp_path / "train" / "a" / "0.png")
    from maect.dataloading import eval_batches
    from maect.dataloading.datasets import load_eval_data
    data = load_eval_data("imagefolder", str(tmp_path), "test")
    w = int(short * 300 / 200)
    pil = Image.fromarray(arr).resize((w, short), Image.BICUBIC)
    top, left = int(round((short - S) / 2)), int(round((w - S) / 2))
    pil = torch.from_numpy(np.asarray(pil.crop((left, top, left + S, top + S))).astype(np.float64) / 255)
    bound = (0.5 * max(_abs_weight_sum(300, w), _abs_weight_sum(200, short)) + 0.5 + 1e-3) / 255
    m, s = torch.tensor(data.mean).view(3, 1, 1), torch.tensor(data.std).view(3, 1, 1)
    diffs = {}
    for aa in (True, False):
        x, _ = next(iter(eval_batches(data, img_size=S, in_chans=3, antialias=aa)))
        diffs[aa] = ((x[0] * s + m).permute(1, 2, 0).double() - pil).abs()
    print(f"mean |eval - torchvision on PIL|: antialiased {diffs[True].mean():.4f} (max {diffs[True].max():.4f}), "
          f"unfiltered {diffs[False].mean():.4f}; bound {bound:.4f}")
    assert diffs[True].max() <= bound + 1e-6 and diffs[False].mean() > 5 * bound


def test_data_antialias_reaches_the_monitor_and_the_eval_cli(monkeypatch, tmp_path):
    """The k-NN monitor passes data.antialias to eval_batches; maect.eval's --no-antialias passes False and keys
    the feature cache on the resize (a cache written with the other resize is not reused)."""
    from maect.eval import __main__ as E
    from maect.eval import monitor as M
    from maect.validation import load_config
    seen = []

    class Stop(Exception):
        pass

    def spy(data, **kw):
        seen.append(kw["antialias"])
        raise Stop

    monkeypatch.setattr(M, "eval_batches", spy)
    for flag in (True, False):
        cfg = load_config(["preset=tiny", f"data.antialias={str(flag).lower()}"])
        mon = M.KNNMonitor(cfg, "cpu", 10, 10)
        with pytest.raises(Stop):
            mon.features(torch.nn.Identity(), "mean")
    assert seen == [True, False]
    import maect.dataloading as Dl
    from maect.eval.features import cache_features, feature_meta
    monkeypatch.setattr(Dl, "eval_batches", spy)
    args = E.parse_args(["--ckpt", "x.pth", "--no-antialias", "--export-features", str(tmp_path)])
    args.ckpt = None                                                      # feature_meta without a file
    call = (None, {"img_size": 28, "in_chans": 1}, args, "test", "fashion_mnist", None, "mean", "cpu")
    with pytest.raises(Stop):
        E.split_features(*call)
    assert seen[-1] is False and E.parse_args(["--ckpt", "x.pth"]).no_antialias is False
    classes = [str(c) for c in range(10)]
    meta = dict(feature_meta(None, pool="mean", split="test", img_size=28, in_chans=1, data="fashion_mnist",
                             data_root=None, limit=None), labels="", classes=classes, num_classes=10,
                unlabelled_left_out=0)
    f, y = torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)
    cache_features(str(tmp_path / "test"), f, y, meta)                    # written before the resize was recorded
    with pytest.raises(Stop):
        E.split_features(*call)
    cache_features(str(tmp_path / "test"), f, y, dict(meta, resize="bicubic"))
    assert E.split_features(*call)[3] == "cache"


# ---------------------------------------------------------------------------------------------- probe augmentation
def test_probe_augment_trains_on_each_epochs_features():
    """linear_probe(augment=fn) asks fn for the training rows' features once per epoch (rows = the train part of
    the holdout split, epochs 0..E-1) and trains on them; validation and test use the given features. A feature
    count that changes between epochs is refused."""
    g = torch.Generator().manual_seed(0)
    f, y = torch.randn(200, 8, generator=g), torch.randint(0, 3, (200,), generator=g)
    calls = []

    def augment(rows, epoch):
        calls.append((rows.clone(), epoch))
        return f[rows] + 0.5 * torch.randn(len(rows), 8, generator=torch.Generator().manual_seed(epoch)), y[rows]
    plain = probe.linear_probe(f, y, f[:50], y[:50], num_classes=3, epochs=3, batch_size=32)
    aug = probe.linear_probe(f, y, f[:50], y[:50], num_classes=3, epochs=3, batch_size=32, augment=augment)
    tr, va = probe.holdout_split(200)
    assert [e for _, e in calls] == [0, 1, 2] and all(torch.equal(r, tr) for r, _ in calls)
    assert aug["augmented"] and not plain["augmented"] and aug["n_val"] == len(va)
    assert aug["val_acc_per_base_lr"] != plain["val_acc_per_base_lr"] or aug["test_acc"] != plain["test_acc"]
    with pytest.raises(ValueError, match="epoch 1 gave features"):
        probe.linear_probe(f, y, f, y, num_classes=3, epochs=2, batch_size=32,
                           augment=lambda rows, e: (f[rows][:len(rows) - e], y[rows][:len(rows) - e]))


class _PixelMeans(torch.nn.Module):
    """A stand-in encoder: tokens = the image's pixels (C channels per token), so mean pooling gives each image's
    per-channel mean."""
    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward_features(self, x):
        t = x.flatten(2).transpose(1, 2)
        return torch.cat([t[:, :1], t], 1)


def test_eval_probe_aug_crops_training_images_as_published(monkeypatch):
    """maect.eval --probe-aug: the training loader behind the probe's features crops RandomResizedCrop(S, scale
    (0.08, 1)) with flips (num_views 1, antialiased unless --no-antialias), the rows' images (labels follow), whole
    batches of --batch-size, fresh draws each epoch."""
    import maect.dataloading as Dl
    from maect.eval import __main__ as E
    built = []
    real = Dl.TrainLoader

    def spy(*a, **kw):
        built.append(kw)
        return real(*a, **kw)
    monkeypatch.setattr(Dl, "TrainLoader", spy)
    args = E.parse_args(["--ckpt", "x.pth", "--probe-aug", "--train-limit", "64", "--batch-size", "16"])
    fn = E.probe_augment(_PixelMeans(), {"img_size": 28, "in_chans": 1}, args, "fashion_mnist", None, "", "mean",
                         torch.device("cpu"), 64)
    rows = torch.arange(5, 45)
    f0, y0 = fn(rows, 0)
    f1, y1 = fn(rows, 1)
    assert len(built) == 1 and built[0]["crop_scale"] == (0.08, 1.0) and built[0]["num_views"] == 1
    assert built[0]["antialias"] is True and built[0]["batch_size"] == 16
    assert f0.shape == (32, 1) and y0.shape == (32,)                          # 40 rows -> 2 whole batches of 16
    labels = Dl.fashion_mnist(None, "train").labels[5:45]
    assert set(y0.tolist()) <= set(labels.tolist())
    assert not torch.equal(f0, f1) or not torch.equal(y0, y1)                 # another epoch, other crops
    with pytest.raises(SystemExit, match="63 training features but 64 usable"):
        E.probe_augment(_PixelMeans(), {"img_size": 28, "in_chans": 1}, args, "fashion_mnist", None, "", "mean",
                        torch.device("cpu"), 63)


def test_eval_cli_probe_aug_end_to_end(tmp_path):
    """python -m maect.eval --probe-aug on a tiny checkpoint: the probe reports it trained on augmented crops."""
    from maect.config import Config, to_dict
    from maect.eval.__main__ import main, table
    from test_eval import tiny_model
    cfg = Config()
    cfg.model.arch, cfg.model.img_size, cfg.model.patch_size, cfg.model.in_chans = "custom", 28, 7, 1
    cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads, cfg.model.pool = 32, 2, 2, "mean"
    cfg.model.decoder_embed_dim, cfg.model.decoder_depth, cfg.model.decoder_num_heads = 16, 1, 2
    ckpt = tmp_path / "tiny.pth"
    torch.save({"model": tiny_model().state_dict(), "args": to_dict(cfg)}, ckpt)
    res = main(["--ckpt", str(ckpt), "--protocols", "probe", "--probe-aug", "--probe-epochs", "2", "--train-limit",
                "300", "--test-limit", "100", "--batch-size", "100", "--out", str(tmp_path / "r.json")])
    p = res["protocols"]["probe"]
    assert p["augmented"] and 0 <= p["test_acc"] <= 100 and "augmented crops" in table(res)


# ---------------------------------------------------------------------------------------------- NNCLR logits precision
def test_nnclr_loss_autocast_computes_the_logits_in_bf16(monkeypatch):
    """nnclr_loss(amp=bf16 autocast) (nnclr.loss_autocast) hands cross_entropy bf16 logits, as the published code
    under its bf16 autocast; amp=None hands it fp32 logits. Bound on the difference (unit roundoff u = 2^-9 in
    bf16): the inputs' rounding moves a logit nn . q of unit vectors by <= 2u, the GEMM's bf16 output by <= u and
    the bf16 division by tau by <= u / tau, so |delta logit| <= 4u / tau; |d CE / d logits|_1 <= 2, so
    |loss_bf16 - loss_fp32| <= 8u / tau = 2^-6 / tau."""
    from maect import losses
    seen = []
    real = F.cross_entropy

    def spy(logits, target, *a, **kw):
        seen.append(logits.dtype)
        return real(logits, target, *a, **kw)
    monkeypatch.setattr(losses.F, "cross_entropy", spy)
    g = torch.Generator().manual_seed(0)
    B, D, tau = 16, 32, 0.15
    nn0, nn1 = (F.normalize(torch.randn(B, D, generator=g), dim=1) for _ in range(2))
    p0, p1 = (torch.randn(B, D, generator=g, requires_grad=True) for _ in range(2))
    fp32 = losses.nnclr_loss(nn0, nn1, p0, p1, tau)
    bf16 = losses.nnclr_loss(nn0, nn1, p0, p1, tau, amp=torch.autocast("cpu", dtype=torch.bfloat16))
    assert seen == [torch.float32] * 2 + [torch.bfloat16] * 2
    assert fp32.dtype == bf16.dtype == torch.float32
    diff = abs(float((bf16 - fp32).detach()))
    print(f"|loss with bf16 logits - fp32 logits| = {diff:.2e} (bound {2 ** -6 / tau:.3f})")
    assert diff <= 2 ** -6 / tau
    bf16.backward()
    assert p0.grad is not None and torch.isfinite(p0.grad).all()


def test_nnclr_loss_autocast_flag_reaches_the_step_and_is_checked(tmp_path, monkeypatch):
    """nnclr.loss_autocast=true with precision=bf16 passes the run's autocast to nnclr_loss in stage 2 (the head
    step); the default passes None (fp32 logits); with precision=fp32 the flag is a ConfigError naming both keys."""
    from maect import engine, train
    from maect.config import ConfigError
    from maect.validation import load_config
    from test_repro import SMALL
    with pytest.raises(ConfigError, match="nnclr.loss_autocast=true .* precision=fp32"):
        load_config(SMALL + ["precision=fp32", "nnclr.loss_autocast=true"])
    seen = []
    real = engine.nnclr_loss

    def spy(*a, amp=None, **kw):
        seen.append(amp)
        return real(*a, amp=amp, **kw)
    monkeypatch.setattr(engine, "nnclr_loss", spy)
    common = SMALL + ["smoke=1", "precision=bf16", f"out_dir={tmp_path}"]
    train.run(load_config(common + ["stage=mae"]))
    init = f"init={tmp_path}/mae/checkpoint-final.pth"
    train.run(load_config(common + ["stage=head", init, "nnclr.loss_autocast=true"]))
    train.run(load_config(common + ["stage=head", init, f"out_dir={tmp_path}/b"]))
    assert len(seen) == 2 and isinstance(seen[0], torch.autocast) and seen[1] is None


# ---------------------------------------------------------------------------------------------- the table
def _table_flags() -> list[str]:
    """The backticked flags in docs/fidelity.md's table's 'flag' column."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = [ln for ln in open(os.path.join(root, "docs", "fidelity.md")) if ln.startswith("| ") and "---" not in ln]
    head = [c.strip() for c in rows[0].strip().strip("|").split("|")]
    col = head.index("flag")
    flags = []
    for ln in rows[1:]:
        cell = [c.strip() for c in ln.strip().strip("|").split("|")][col]
        flags += re.findall(r"`([^`]+)`", cell)
    return flags


def test_string_keys_take_yaml_boolean_words_and_fused_optimizer_is_checked():
    """fused_optimizer=off is the word 'off', not YAML's False turned into 'False'; an unknown choice is refused."""
    from maect.config import ConfigError
    from maect.validation import load_config
    assert load_config(["preset=tiny", "fused_optimizer=off"]).fused_optimizer == "off"
    with pytest.raises(ConfigError, match="fused_optimizer='fast': choose one of auto, apex, torch, off"):
        load_config(["preset=tiny", "fused_optimizer=fast"])


@pytest.mark.parametrize("key", ["data.antialias", "nnclr.loss_autocast"])
def test_new_boolean_keys_are_checked(key):
    """The keys these fidelity flags add parse as strictly as every boolean key: true/false, else a ConfigError
    naming the key and the value."""
    from maect.config import ConfigError
    from maect.validation import load_config
    section, leaf = key.split(".")
    assert getattr(getattr(load_config(["preset=tiny", "precision=bf16", f"{key}=true"]), section), leaf) is True
    with pytest.raises(ConfigError, match=f"config key '{key}': expected true/false, got 'maybe'"):
        load_config(["preset=tiny", f"{key}=maybe"])


def test_every_flag_in_the_fidelity_table_exists():
    """Every flag docs/fidelity.md names is accepted where it says: config keys by load_config (the tiny preset, plus
    precision=bf16 where the flag needs it), maect.eval flags by its parser, environment variables and API
    arguments by the code that reads them. The tests that show each one reaches its code path are named in the
    table (and live in this file for the flags it adds)."""
    from maect.eval import __main__ as E
    from maect.validation import load_config
    flags = _table_flags()
    assert len(flags) >= 12, flags
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for flag in flags:
        if flag.startswith("maect.eval "):
            E.parse_args(["--ckpt", "x.pth", *flag.split()[1:]])
        elif flag.startswith("MAECT_"):
            name = flag.split("=")[0]
            src = open(os.path.join(root, "kernels", "dispatch.py")).read() + open(
                os.path.join(root, "kernels", "__init__.py")).read()
            assert name in src, flag
        elif flag.startswith("linear_probe("):
            assert "base_lrs" in probe.linear_probe.__code__.co_varnames
        elif flag.startswith("preset="):
            assert load_config([flag]).preset == flag.split("=")[1]
        elif "=" in flag:
            key, value = flag.split("=", 1)
            cfg = load_config(["preset=tiny", "precision=bf16", f"{key}={value}"])
            section, _, leaf = key.rpartition(".")
            got = getattr(getattr(cfg, section) if section else cfg, leaf)
            assert str(got).lower() == value.lower(), flag
        else:
            raise AssertionError(f"docs/fidelity.md: unrecognised flag {flag!r}")
