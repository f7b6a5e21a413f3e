"""build_loader trusts DALI only after its first batch keeps the loader contract (dataloading/contract.py): a
pipeline that fails to build, or whose batch breaks the contract, falls back to the CPU twin under data.loader=auto
(one warning saying why) and raises under data.loader=dali. DALI runs its CPU operators here; 'auto on CUDA' is
simulated by making dali.why_not report no obstacle."""
import logging
from types import SimpleNamespace

import pytest
import torch

from maect.dataloading import ImageFolder, build_loader, fashion_mnist
from maect.dataloading import contract
from maect.dataloading import dali as D
from maect.dataloading.export import export_split
from maect.dataloading.images import DataError

needs_dali = pytest.mark.skipif(D.import_error() is not None, reason=D.import_error() or "")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
KW = dict(img_size=28, in_chans=3, batch_size=8, rank=0, world=1, seed=0, num_views=2, crop_scale=(0.5, 1.0),
          ctaug=False, device="cpu")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("fm_small") / "train"
    assert export_split(fashion_mnist(None, "test"), str(root), limit=3) == 30
    return ImageFolder(str(root))


def cfg(loader):
    return SimpleNamespace(loader=loader, num_workers=1)


# ------------------------------------------------------------------------------------- the contract itself
def good_batch(n=8, S=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    pix = torch.rand(n, 1, S, S, generator=g).expand(-1, 3, -1, -1)
    return {"views": [(pix - m) / s, (pix - m) / s], "idx": torch.arange(n), "label": torch.arange(n) % 3}, pix


def check(batch, **kw):
    args = dict(n=8, num_views=2, img_size=28, in_chans=3, device="cpu", mean=MEAN, std=STD,
                expected_idx=torch.arange(8), labels=torch.arange(8) % 3)
    return contract.breach(batch, **{**args, **kw})


def test_contract_names_each_breach():
    b, pix = good_batch()
    bright = lambda ids: pix[ids].mean(dim=(1, 2, 3)).tolist()       # noqa: E731  the twin sees the same pixels
    assert check(b, twin_brightness=bright) is None
    assert "2 views, expected 1" in check(b, num_views=1)
    assert "shape (8, 3, 28, 28), expected (8, 3, 32, 32)" in check(b, img_size=32)
    assert "dtype torch.float64" in check({**b, "views": [v.double() for v in b["views"]]})
    assert "sample ids differ from the CPU twin's at row 0" in check({**b, "idx": torch.arange(8).flip(0)})
    assert "labels are not data.labels[idx]" in check({**b, "label": torch.zeros(8, dtype=torch.long)})
    assert "outside the normalised range" in check({**b, "views": [pix * 255, pix * 255]})        # not normalised
    half = [(v * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)) for v in b["views"]]
    assert "normalised differently" in check({**b, "views": half}, twin_brightness=bright)       # left in [0, 1]
    assert "non-finite" in check({**b, "views": [b["views"][0].masked_fill(pix > 0.9, float("nan")), b["views"][1]]})


# --------------------------------------------------------------------------------------- through build_loader
@needs_dali
def test_dali_passes_its_first_batch_check(tree, monkeypatch, caplog):
    monkeypatch.setattr(D, "why_not", lambda data, device: None)       # as on a CUDA machine
    with caplog.at_level(logging.INFO, logger="maect.data"):
        assert build_loader(tree, cfg("auto"), **KW).backend == "dali-cpu"
    assert "first batch checked against the contract" in caplog.text


def broken_build(*a, **kw):
    raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version")


def wrong_normalisation(*a, **kw):       # a pipeline that forgets the normalisation: pixels in [0, 255]
    return REAL_BUILD(*a, **{**kw, "mean": (0.0, 0.0, 0.0), "std": (1 / 255, 1 / 255, 1 / 255)})


def wrong_size(*a, **kw):
    return REAL_BUILD(*a, **{**kw, "img_size": kw["img_size"] + 4})


REAL_BUILD = D.build_pipeline


@needs_dali
@pytest.mark.parametrize("fault, why", [(broken_build, "CUDA driver version is insufficient"),
                                        (wrong_normalisation, "outside the normalised range"),
                                        (wrong_size, "shape (8, 3, 32, 32), expected (8, 3, 28, 28)")],
                         ids=["build fails", "not normalised", "wrong size"])
def test_dali_failure_falls_back_under_auto_and_raises_under_dali(tree, monkeypatch, caplog, fault, why):
    monkeypatch.setattr(D, "why_not", lambda data, device: None)
    monkeypatch.setattr(D, "build_pipeline", fault)
    with caplog.at_level(logging.INFO, logger="maect.data"):
        loader = build_loader(tree, cfg("auto"), **KW)
    assert loader.backend == "cpu-pil"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([r for r in caplog.records if r.name == "maect.data"]) == 1     # one line, saying why
    assert len(warnings) == 1 and "DALI failed its first-batch check" in warnings[0] and why in warnings[0]
    assert "falling back to the CPU twin" in warnings[0]
    with pytest.raises(DataError, match="data.loader=dali: .*" + why.split(" (")[0].replace("(", r"\(")):
        build_loader(tree, cfg("dali"), **KW)
