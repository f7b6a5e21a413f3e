"""The one decode rule for image files (dataloading/images.py), mode by mode, with the right 8-bit values written
down independently of the code under test; the file check that rejects what the rule rejects (torch loader,
evaluation, DALI); and DALI's own decoder measured against the rule (CPU decoder; skipped without nvidia-dali)."""
import os
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from maect.dataloading import BadImage, DataError, ImageFolder, TrainLoader, decode_image, eval_batches
from maect.dataloading import dali as D
from maect.dataloading.images import check_image_file

needs_dali = pytest.mark.skipif(D.import_error() is not None, reason=D.import_error() or "")
H, W = 8, 16
RS = np.random.RandomState(0)
RGB = RS.randint(0, 256, (H, W, 3), dtype=np.uint8)
G8 = RS.randint(0, 256, (H, W), dtype=np.uint8)
FULL16 = np.arange(65536, dtype=np.uint16).reshape(256, 256)      # every 16-bit value once


def grey3(a):
    return np.repeat(a[..., None], 3, axis=2)


def round257(v):          # round(v * 255 / 65535), the rule written as a float computation
    return np.floor(v.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)


def png16(path, arr, color_type):
    """A 16-bit PNG written by hand (PIL cannot write 16-bit colour): arr uint16 [H, W] or [H, W, C]."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _cases():
    """name -> (writer(path), expected uint8 [H, W, 3] | 'reject: <words in the reason>')."""
    pal = Image.fromarray(RGB).quantize(16)
    pal_rgb = np.asarray(pal.getpalette()[:48], np.uint8).reshape(16, 3)[np.asarray(pal)]   # palette lookup
    rgba = np.concatenate([RGB, RS.randint(0, 256, (H, W, 1), dtype=np.uint8)], -1)
    ramp_f = np.linspace(0, 1, 65536, dtype=np.float32).reshape(256, 256)
    cmyk = Image.fromarray(RGB).convert("CMYK")
    exif = Image.Exif()
    exif[0x0112] = 6                                                   # rotate 90 degrees clockwise to view
    rgb_exif = np.zeros((H, W, 3), np.uint8)
    rgb_exif[:, :W // 2] = 255                                         # left half white
    return {
        "1.png": (lambda p: Image.fromarray(G8 > 100).save(p), grey3(np.where(G8 > 100, 255, 0).astype(np.uint8))),
        "L.png": (lambda p: Image.fromarray(G8).save(p), grey3(G8)),
        "LA.png": (lambda p: Image.fromarray(np.stack([G8, 255 - G8], -1), "LA").save(p), grey3(G8)),
        "P.png": (lambda p: pal.save(p), pal_rgb),
        "P_transparency.png": (lambda p: pal.save(p, transparency=3), pal_rgb),
        "RGB.png": (lambda p: Image.fromarray(RGB).save(p), RGB),
        "RGBA.png": (lambda p: Image.fromarray(rgba, "RGBA").save(p), RGB),         # alpha dropped
        "RGBA.webp": (lambda p: Image.fromarray(rgba, "RGBA").save(p, lossless=True, exact=True), RGB),
        "P.bmp": (lambda p: pal.save(p), pal_rgb),
        "CMYK.jpg": (lambda p: cmyk.save(p, quality=100), "cmyk"),      # from the stored (lossy) CMYK samples
        "L.tif": (lambda p: Image.fromarray(G8).save(p), grey3(G8)),
        "RGB.tif": (lambda p: Image.fromarray(RGB).save(p), RGB),
        "I16.png": (lambda p: Image.fromarray(FULL16).save(p), grey3(round257(FULL16))),
        "I16.tif": (lambda p: Image.fromarray(FULL16).save(p), grey3(round257(FULL16))),
        "RGB16.png": (lambda p: png16(p, np.stack([FULL16, FULL16[::-1], FULL16.T], -1), 2),
                      np.stack([FULL16 >> 8, FULL16[::-1] >> 8, FULL16.T >> 8], -1).astype(np.uint8)),
        "F.tif": (lambda p: Image.fromarray(ramp_f).save(p), grey3(np.floor(ramp_f * 255.0 + 0.5).astype(np.uint8))),
        "I.tif": (lambda p: Image.fromarray(FULL16.astype(np.int32)).save(p), "reject: mode I (32-bit integer"),
        "F_0_255.tif": (lambda p: Image.fromarray(ramp_f * 255).save(p),
                        "reject: mode F (32-bit float) with values 0..255"),
        "F_nan.tif": (lambda p: Image.fromarray(np.where(ramp_f > 0.5, np.nan, ramp_f).astype(np.float32)).save(p),
                      "reject: non-finite"),
        "LAB.tif": (lambda p: Image.fromarray(RGB).convert("LAB").save(p), "reject: PIL mode LAB"),
        "exif6.jpg": (lambda p: Image.fromarray(rgb_exif).save(p, exif=exif, quality=100, subsampling=0),
                      np.rot90(rgb_exif, k=-1)),                               # viewed: rotated 90 degrees clockwise
    }


CASES = _cases()


@pytest.fixture(scope="module")
def modes(tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    paths = {}
    for name, (write, _) in CASES.items():
        paths[name] = str(root / name)
        write(paths[name])
    return paths


@pytest.mark.parametrize("name", list(CASES))
def test_each_mode_decodes_to_the_right_8bit_values_or_is_rejected_by_name(modes, name):
    path, want = modes[name], CASES[name][1]
    with Image.open(path) as im:
        print(name, "PIL mode", im.mode)
    if isinstance(want, str) and want == "cmyk":       # R = 255 - min(255, C + K), likewise G (M), B (Y)
        cmyk = np.asarray(Image.open(path)).astype(int)
        want = np.clip(255 - (cmyk[..., :3] + cmyk[..., 3:]), 0, 255).astype(np.uint8)
    if isinstance(want, str):
        reason = check_image_file(path)
        print("check:", reason)
        assert reason is not None and want[len("reject: "):] in reason
        with pytest.raises(BadImage, match=re.escape(want[len("reject: "):])) as e:
            decode_image(path)
        assert path in str(e.value)
        return
    got = decode_image(path)
    assert check_image_file(path) is None
    assert got.dtype == np.uint8 and got.shape == want.shape and got.flags.writeable
    err = np.abs(got.astype(int) - want.astype(int))
    print(f"{name}: max |err| {err.max()}, share at 255: {(got == 255).mean():.4f}")
    assert err.max() == 0


def test_16bit_png_ramp_is_not_white():
    """The issue's case: a 0..65535 ramp loaded with 99.6 % of its pixels at 255. The rule maps v to round(v/257):
    exactly the values >= 254.5 * 257 = 65406.5 reach 255: 129 of 65536 (0.2 %)."""
    want = round257(FULL16)
    assert (want == 255).sum() == 129 and want[0, 0] == 0 and want[0, 128] == 0 and want[0, 129] == 1
    assert np.array_equal((FULL16.astype(np.uint32) + 128) // 257, want)    # the code's integer form


def test_loaders_and_evaluation_reject_bad_modes_by_name(modes, tmp_path):
    """A rejected mode in an image folder: the torch loader and eval_batches raise naming the file before any
    batch; with skip_corrupt it is left out and the rest loads."""
    for c, names in {"a": ["L.png", "I.tif"], "b": ["RGB.png", "I16.png"]}.items():
        os.makedirs(tmp_path / c)
        for n in names:
            os.symlink(modes[n], tmp_path / c / n)
    data = ImageFolder(str(tmp_path))
    bad = str(tmp_path / "a" / "I.tif")
    with pytest.raises(DataError, match=r"I\.tif: mode I"):
        TrainLoader(data, img_size=8, in_chans=3, batch_size=2)
    with pytest.raises(DataError, match=r"I\.tif: mode I"):
        eval_batches(data, img_size=8, in_chans=3)
    L = TrainLoader(data, img_size=8, in_chans=3, batch_size=3, skip_corrupt=True)
    assert bad in L.skipped and sorted(next(iter(L))["idx"].tolist()) == [1, 2, 3]   # sorted: a/I.tif is id 0
    batches = list(eval_batches(data, img_size=8, in_chans=3, skip_corrupt=True))
    assert torch.equal(torch.cat([y for _, y in batches]), torch.tensor([0, 1, 1]))


@needs_dali
def test_dali_decodes_every_mode_like_the_torch_loader(modes):
    """DALI's decoder against decode_image on every file the DALI check accepts: identical, except 16-bit colour
    PNGs, which PIL floors while decoding (v >> 8) and DALI rounds (round(v / 257)): at most one level."""
    for name, (_, want) in CASES.items():
        path = modes[name]
        reason = check_image_file(path, dali=True)
        if isinstance(want, str) and want.startswith("reject"):
            assert reason is not None, name
            continue
        assert reason is None, (name, reason)
        got, ours = D.decode_files([path])[0], decode_image(path)
        err = np.abs(got.astype(int) - ours.astype(int)).max() if got.shape == ours.shape else None
        print(f"{name}: DALI vs decode_image max |err| {err}")
        assert err == (1 if name == "RGB16.png" else 0), name


@needs_dali
def test_dali_check_rejects_the_tiff_modes_dali_decodes_differently(tmp_path):
    """What the DALI-only rejections exist for: on these files DALI fails or gives other pixels than the rule."""
    g = np.stack([G8, 255 - G8], -1)
    files = {"LA.tif": Image.fromarray(g, "LA"), "1.tif": Image.fromarray(G8 > 100),
             "YCbCr.tif": Image.fromarray(RGB).convert("YCbCr")}
    for name, im in files.items():
        path = str(tmp_path / name)
        im.save(path)
        assert check_image_file(path) is None                      # the torch loader reads it by the rule
        reason = check_image_file(path, dali=True)
        assert reason is not None and "DALI decodes it differently" in reason and im.mode in reason
        try:
            differs = not np.array_equal(D.decode_files([path])[0], decode_image(path))
        except DataError:
            differs = True
        print(name, reason, "| DALI differs or fails:", differs)
        assert differs, name
