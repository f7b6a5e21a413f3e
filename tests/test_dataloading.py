"""Image-folder loaders: the torch twin (TrainLoader) and DALI (DaliLoader, CPU-only mode here; GPU mode where CUDA
is visible), on small trees written by the tests: exported Fashion-MNIST (20 images per class), ramp images whose
pixel values are their coordinates (to measure crops and flips), constant-colour images (colour-op rates), and
trees with bad files. DALI tests skip only when nvidia-dali is not importable."""
import logging
import os
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from maect.dataloading import ImageFolder, TrainLoader, build_loader, fashion_mnist
from maect.dataloading import dali as D
from maect.dataloading.export import export_split, main as export_main

DALI_MISSING = D.import_error()                  # CI installs it: D.PIP
needs_dali = pytest.mark.skipif(DALI_MISSING is not None, reason=DALI_MISSING or "")
KINDS = ["twin", pytest.param("dali", marks=needs_dali)]


def make(kind, data, **kw):
    kw = {"img_size": 28, "in_chans": 3, "batch_size": 16, "num_views": 2, "crop_scale": (0.2, 1.0), "seed": 0, **kw}
    return TrainLoader(data, **kw) if kind == "twin" else D.DaliLoader(data, num_threads=2, **kw)


def unnormalise(x, data):
    """views -> pixel values in [0, 255]"""
    m, s = torch.tensor(data.mean).view(1, 3, 1, 1), torch.tensor(data.std).view(1, 3, 1, 1)
    return (x.cpu() * s + m) * 255


# ---------------------------------------------------------------------------------------------- trees
@pytest.fixture(scope="module")
def fm(tmp_path_factory):
    """Fashion-MNIST test split, first 20 images per class, as JPEG files: (ImageFolder, source arrays)."""
    src = fashion_mnist(None, "test")
    root = tmp_path_factory.mktemp("fm") / "train"
    assert export_split(src, str(root), limit=20) == 200
    return ImageFolder(str(root)), src


def _write_tree(root, images_per_class):
    for c, images in enumerate(images_per_class):
        os.makedirs(root / str(c), exist_ok=True)
        for i, arr in enumerate(images):
            Image.fromarray(arr).save(root / str(c) / f"{i:03d}.png")
    return ImageFolder(str(root))


@pytest.fixture(scope="module")
def ramp(tmp_path_factory):
    """256 x 256 PNGs with R = x, G = y: a view's R/G profile gives its crop box and whether it was flipped."""
    x = np.arange(256, dtype=np.uint8)
    arr = np.stack([np.broadcast_to(x, (256, 256)), np.broadcast_to(x[:, None], (256, 256)),
                    np.full((256, 256), 128, np.uint8)], -1).copy()
    return _write_tree(tmp_path_factory.mktemp("ramp"), [[arr] * 32, [arr] * 32])


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """class 0: constant (200, 60, 30); class 1: white. 32 x 32 PNGs, 48 each."""
    c = np.broadcast_to(np.array([200, 60, 30], np.uint8), (32, 32, 3)).copy()
    return _write_tree(tmp_path_factory.mktemp("colours"), [[c] * 48, [np.full((32, 32, 3), 255, np.uint8)] * 48])


# ---------------------------------------------------------------------------------------------- tests
def test_export_writes_the_arrays(fm, tmp_path, capsys):
    data, src = fm
    assert data.classes == [str(c) for c in range(10)] and len(data) == 200
    for i in [0, 57, 199]:                           # label = class folder = source label of the file's index
        f = data.files[i]
        assert data.labels[i] == int(os.path.basename(os.path.dirname(f))) == src.labels[int(os.path.basename(f)[:-4])]
    export_main(["--out", str(tmp_path), "--limit", "2", "--format", "png"])
    assert "'train': 20, 'val': 20" in capsys.readouterr().out
    png = ImageFolder(str(tmp_path / "val"))
    k = int(os.path.basename(png.files[3])[:-4])     # PNG is lossless: pixels round-trip exactly
    assert torch.equal(png.load(3)[0], src.images[k, 0])


@pytest.mark.parametrize("kind", KINDS)
def test_contract_ranks_and_epochs(fm, kind):
    """world=2, n=16: each epoch every rank reads 6 disjoint batches; together every file at most once, all but the
    last incomplete global batch (200 - 6*32 = 8 files); labels match the files; the two views differ."""
    data, src = fm
    seen = {}
    for epoch in (0, 1):
        ids = []
        for rank in (0, 1):
            L = make(kind, data, rank=rank, world=2)
            L.set_epoch(epoch)
            batches = list(L)
            assert len(L) == len(batches) == 6
            for b in batches:
                assert set(b) == {"views", "idx", "label"} and len(b["views"]) == 2
                for v in b["views"]:
                    assert v.shape == (16, 3, 28, 28) and v.dtype == torch.float32 and torch.isfinite(v).all()
                assert b["idx"].dtype == b["label"].dtype == torch.int64 and b["idx"].shape == (16,)
                assert torch.equal(b["label"], data.labels[b["idx"]])
                stems = [int(os.path.basename(data.files[i])[:-4]) for i in b["idx"].tolist()]
                assert torch.equal(b["label"], src.labels[stems])
                assert (b["views"][0] - b["views"][1]).abs().amax((1, 2, 3)).min() > 0.1
            ids.append(torch.cat([b["idx"] for b in batches]))
        assert len(set(ids[0].tolist())) == len(set(ids[1].tolist())) == 96
        assert not set(ids[0].tolist()) & set(ids[1].tolist())
        seen[epoch] = ids
    assert not torch.equal(seen[0][0], seen[1][0])   # a new order every epoch


@needs_dali
def test_dali_reads_exactly_what_the_twin_reads_and_resumes(fm):
    data, _ = fm
    for rank in (0, 1):
        twin, dali = make("twin", data, rank=rank, world=2), make("dali", data, rank=rank, world=2)
        twin.set_epoch(3)
        dali.set_epoch(3)
        a, b = [x["idx"] for x in twin], [x["idx"] for x in dali]
        assert len(a) == len(b) == 6 and all(torch.equal(x, y) for x, y in zip(a, b))
        dali.set_epoch(3, start_step=4)              # mid-epoch resume: the same samples from step 4 on
        assert [x["idx"].tolist() for x in dali] == [x.tolist() for x in b[4:]]
        assert len(list(dali)) == 6                  # start_step applies to one pass only


def test_twin_resumes_mid_epoch(fm):
    L = make("twin", fm[0])
    L.set_epoch(2)
    full = [b["idx"].tolist() for b in L]
    L.set_epoch(2, start_step=9)
    assert [b["idx"].tolist() for b in L] == full[9:]


def _ramp_boxes(views, data, S):
    """Per view: (crop width, crop height) in source pixels and whether it was flipped, from the R (= x) and
    G (= y) profiles: a linear ramp stays linear under bicubic and antialiased resampling away from the borders,
    so the slope over the inner pixels is crop size / S."""
    x = unnormalise(views, data)
    j = torch.arange(4, S - 4, dtype=torch.float64)
    jc = j - j.mean()

    def slope(profile):                              # least squares over the inner pixels
        return (profile[:, 4:S - 4].double() * jc).sum(1) / (jc * jc).sum()
    sx, sy = slope(x[:, 0].mean(1)), slope(x[:, 1].mean(2))
    return sx.abs() * S, sy.abs() * S, sx < 0, sy < 0


@pytest.mark.parametrize("kind", KINDS)
def test_crops_respect_scale_and_ratio_and_flip_half_the_time(ramp, kind):
    """192 views (64 images x 2 views x 3 epochs) of 256² ramps at S=32, scale (0.2, 1). Bounds get 3% slack:
    crop sides are whole pixels (±0.5 px) and the outputs uint8 (slope error ~0.3 px). Flip rate: binomial
    sd = sqrt(0.25/192) = 0.036; tolerance 0.15 (4 sd). Vertical flips never happen."""
    S, W = 32, 256
    L = make(kind, ramp, img_size=S, batch_size=32)
    ws, hs, flips, vflips = [], [], [], []
    for epoch in range(3):
        L.set_epoch(epoch)
        for b in L:
            for v in b["views"]:
                w, h, f, vf = _ramp_boxes(v, ramp, S)
                ws.append(w), hs.append(h), flips.append(f), vflips.append(vf)
    w, h, flip = torch.cat(ws), torch.cat(hs), torch.cat(flips).double()
    area, ratio = w * h / W ** 2, w / h
    print(f"{kind}: area [{area.min():.3f}, {area.max():.3f}] ratio [{ratio.min():.3f}, {ratio.max():.3f}] "
          f"flip rate {flip.mean():.3f}")
    assert area.min() > 0.2 * 0.97 and area.max() < 1.03 and ratio.min() > 0.75 * 0.97 and ratio.max() < 4 / 3 * 1.03
    assert (area < 0.35).sum() > 10 and (area > 0.85).sum() > 10      # the whole scale range is drawn
    assert (ratio < 0.85).sum() > 10 and (ratio > 1.18).sum() > 10
    assert abs(flip.mean() - 0.5) < 0.15 and not torch.cat(vflips).any()


@pytest.mark.parametrize("kind", KINDS)
def test_ctaug_colour_op_rates(colours, kind):
    """Constant images, 3 epochs: 144 views per view index and class. Grayscale p=0.2 shows on the colour class as
    equal channels (jitter's saturation factor is >= 0.8, never grey); solarize p=0.2 (view 1 only) shows on the
    white class as a mean below 128 (brightness >= 0.6 keeps white >= 153). sd = sqrt(.16/144) = 0.033; tolerance
    0.12. Without ctaug the colours pass unchanged."""
    L = make(kind, colours, img_size=16, batch_size=32, ctaug=True)
    plain = make(kind, colours, img_size=16, batch_size=32)
    out = {0: [], 1: []}
    for epoch in range(3):
        L.set_epoch(epoch)
        for b in L:
            for v in (0, 1):
                out[v].append((unnormalise(b["views"][v], colours).mean((2, 3)), b["label"]))
    for v in (0, 1):
        c, y = torch.cat([o[0] for o in out[v]]), torch.cat([o[1] for o in out[v]])
        gray = ((c[y == 0].amax(1) - c[y == 0].amin(1)) < 3).double().mean()
        solar = (c[y == 1].mean(1) < 128).double().mean()
        print(f"{kind} view {v}: grayscale rate {gray:.3f}, solarize rate {solar:.3f}")
        assert abs(gray - 0.2) < 0.12
        assert abs(solar - 0.2) < 0.12 if v == 1 else solar == 0
    b = next(iter(plain))
    c = unnormalise(b["views"][0], colours).mean((2, 3))
    want = torch.where(b["label"].view(-1, 1) == 0, torch.tensor([200.0, 60, 30]), torch.tensor([255.0] * 3))
    assert (c - want).abs().max() < 1.0


def _bad_tree(root, fm_data, case):
    """classes 0 and 1 with 16 good JPEGs each (15 + the bad file for 'badsof'), plus the bad item in class 0."""
    for c in (0, 1):
        os.makedirs(root / str(c))
        good = [f for f, y in zip(fm_data.files, fm_data.labels.tolist()) if y == c][:16]
        for f in good[:15] if case == "badsof" and c == 0 else good:
            shutil.copy(f, root / str(c))
    jpeg = open(fm_data.files[0], "rb").read()
    bad = root / "0" / "bad.jpg"
    if case == "zero":
        bad.write_bytes(b"")
    elif case == "truncated":
        bad.write_bytes(jpeg[:len(jpeg) // 2])
    elif case == "not_an_image":
        bad.write_text("this is not an image\n")
    elif case == "empty_class":
        bad = root / "2"
        bad.mkdir()
    elif case == "badsof":                         # passes the cheap check (header, end marker): height 0 in SOF0
        k = jpeg.find(b"\xff\xc0")
        bad.write_bytes(jpeg[:k + 5] + b"\x00\x00" + jpeg[k + 7:])
    return str(bad)


@pytest.mark.parametrize("case", ["zero", "truncated", "not_an_image", "empty_class", "badsof"])
@pytest.mark.parametrize("kind", KINDS)
def test_bad_files_raise_naming_them_or_are_skipped(fm, tmp_path, caplog, kind, case):
    bad = _bad_tree(tmp_path, fm[0], case)
    with pytest.raises(ValueError, match=re.escape(bad)):
        L = make(kind, ImageFolder(str(tmp_path)), batch_size=8)
        list(L)
    for n in ((8, 32) if case == "badsof" else (8,)):    # n=32: the bad file is in the first batch DALI runs
        data = ImageFolder(str(tmp_path))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="maect.data"):
            L = make(kind, data, batch_size=n, skip_corrupt=True)
            batches = list(L)
        assert len(batches) == len(L) == 32 // n and all(b["idx"].shape == (n,) for b in batches)
        ids = torch.cat([b["idx"] for b in batches]).tolist()
        assert bad in L.skipped and "skip_corrupt" in caplog.text and bad in caplog.text
        assert all(data.files[i] != bad for i in ids)
        if case == "badsof":                        # found while decoding: replaced inside its batch
            assert len(set(ids)) == 31
        else:                                       # every good file once
            assert sorted(ids) == sorted(i for i, f in enumerate(data.files) if f != bad)
    if case == "badsof" and kind == "dali":         # the culprit is found by a PIL decode when DALI's message is mute
        bad_id = data.files.index(bad)
        assert set(L._culprits("nvImageCodec failure: '#3'", [0, bad_id, 5], 3)) == {bad_id}


def _cfg(loader, **kw):
    return SimpleNamespace(loader=loader, num_workers=0, **kw)


def test_build_loader_selects_and_says_why(fm, caplog, monkeypatch):
    data, src = fm
    kw = dict(img_size=28, in_chans=3, batch_size=16, rank=0, world=1, seed=0, num_views=2, crop_scale=(0.2, 1),
              ctaug=False, device="cpu")
    with caplog.at_level(logging.INFO, logger="maect.data"):
        assert build_loader(data, _cfg("auto"), **kw).backend == "cpu-pil"
        assert build_loader(src, _cfg("auto"), **kw).backend == "cpu-batched"
        assert build_loader(data, _cfg("cpu"), **kw).backend == "cpu-pil"
    assert "not dali:" in caplog.text
    with pytest.raises(ValueError, match="dataloading.export"):
        build_loader(src, _cfg("dali"), **kw)
    with pytest.raises(ValueError, match="auto, cpu or dali"):
        build_loader(data, _cfg("fast"), **kw)
    if DALI_MISSING is None:
        assert build_loader(data, _cfg("dali", skip_corrupt=True), **kw).backend == "dali-cpu"
    monkeypatch.setitem(__import__("sys").modules, "nvidia.dali", None)      # as if not installed
    with pytest.raises(ValueError, match=re.escape(D.PIP)):
        build_loader(data, _cfg("dali"), **kw)
    assert build_loader(data, _cfg("auto"), **kw).backend == "cpu-pil"


@needs_dali
@pytest.mark.skipif(not torch.cuda.is_available(), reason="DALI GPU mode needs a CUDA device")
def test_dali_gpu_matches_the_twin_order(fm):
    data, _ = fm
    L = make("dali", data, device="cuda", ctaug=True)
    twin = make("twin", data)
    assert L.backend == "dali-gpu"
    for a, b in zip(L, twin):
        assert a["views"][0].is_cuda and a["views"][0].shape == (16, 3, 28, 28)
        assert torch.equal(a["idx"].cpu(), b["idx"]) and torch.equal(a["label"].cpu(), b["label"])
