"""Sharing weights: `maect.export --format safetensors` writes model.safetensors + config.json in timm's
local-folder / model-hub layout; timm loads the folder with strict=True and gives maect's features; hub.load_encoder
reads the folder, the bare file and a folder timm itself wrote.

The model is the tiny preset's shape (28 px, patch 4, one channel, width 96 with 4 heads): a width hub cannot map to a
number of heads by itself, so the heads must come from the config the export writes.
"""
import json
import os

import pytest
import timm
import torch
from safetensors.torch import load_file

from maect import config as C
from maect import export, hub
from maect.models.vit import pool
from test_hub import TOL, enc_keys, randomize

TINY = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=96, depth=2, num_heads=4)


def tiny_ckpt(tmp_path, pool_mode="mean"):
    """A maect CT-style checkpoint (config, online + EMA encoder) with random weights."""
    cfg = C.Config()
    cfg.model = C.ModelCfg(arch="custom", pool=pool_mode, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
                           **TINY)
    torch.manual_seed(0)
    sd = randomize(hub.model_from_cfg(cfg.model, decoder=True).state_dict(), 3)
    ema = randomize(enc_keys(sd), 4)
    path = str(tmp_path / "checkpoint-final.pth")
    hub.save_checkpoint({"model": sd, "model_ema": ema, "args": C.to_dict(cfg), "stage": "ct"}, path)
    return path


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("pool_mode", ["mean", "cls"])
def test_safetensors_export_loads_in_timm_strict(tmp_path, capsys, pool_mode):
    ckpt = tiny_ckpt(tmp_path, pool_mode)
    out = str(tmp_path / "share")
    export.main(["--ckpt", ckpt, "--format", "safetensors", "--out", out, "--ema"])
    print(capsys.readouterr().out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["architecture"] == "vit_base_patch16_224" and cfg["num_classes"] == 0
    assert cfg["global_pool"] == {"mean": "avg", "cls": "token"}[pool_mode]
    assert cfg["pretrained_cfg"]["input_size"] == [1, 28, 28] and cfg["maect"]["ema"] is True
    weights = load_file(os.path.join(out, "model.safetensors"))
    assert not any(k.startswith(("decoder", "head.", "fc_norm.")) or k == "mask_token" for k in weights)

    ours, _ = hub.load_encoder(ckpt, use_ema=True)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = pool(ours.forward_features(x), pool_mode)
        # timm's local-folder scheme: architecture and model_args from config.json, weights through timm's
        # load_pretrained (strict unless num_classes differs from the config's, which it does not here)
        tm = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        sd = tm.state_dict()
        assert set(sd) == set(weights), set(sd) ^ set(weights)          # what strict=True demands, checked directly
        assert all(torch.equal(sd[k], weights[k]) for k in sd)
        d = max_diff(tm(x), want)
        # the same file through a registry name + pretrained_cfg_overlay (timm without local-dir:)
        kw = cfg["maect"]["timm_kwargs"]
        tm2 = timm.create_model(cfg["architecture"], pretrained=True, **kw, pretrained_cfg_overlay=dict(
            file=os.path.join(out, "model.safetensors"), num_classes=0, input_size=(1, 28, 28))).eval()
        tm2.load_state_dict(weights, strict=True)
        d2 = max_diff(tm2(x), want)
    print(f"pool {pool_mode}: max |timm(local-dir) - maect| = {d:.2e}, overlay: {d2:.2e}")
    assert d <= TOL and d2 <= TOL


def test_hub_reads_safetensors_folder_and_file(tmp_path):
    ckpt = tiny_ckpt(tmp_path)
    out = str(tmp_path / "share")
    export.export(ckpt, "safetensors", out, ema=False)
    ours, _ = hub.load_encoder(ckpt)
    for src in (out, os.path.join(out, "model.safetensors")):
        model, info = hub.load_encoder(src)
        print(hub.describe(info))
        assert info["pool"] == "mean" and model.num_heads == 4 and info["in_chans"] == 1 and info["img_size"] == 28
        assert any("num_heads from config" in n for n in info["notes"])
        for k, v in ours.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k
    # the bare file alone (no config.json beside it): heads and pooling from its header metadata
    alone = tmp_path / "alone.safetensors"
    os.rename(os.path.join(out, "model.safetensors"), alone)
    model, info = hub.load_encoder(str(alone))
    assert model.num_heads == 4 and info["pool"] == "mean"


def test_hub_reads_folder_written_by_timm(tmp_path):
    """timm's own save_for_hf folder (cls-token model, learned pos_embed with a cls row, width 128 / 4 heads):
    pooling and heads from its config.json; features equal timm's."""
    from timm.models import save_for_hf
    tm = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=64, embed_dim=128, depth=2, num_heads=4,
                           num_classes=0).eval()
    tm.load_state_dict(randomize(tm.state_dict(), 5, keep=()))
    save_for_hf(tm, str(tmp_path / "timm"), safe_serialization=True)
    model, info = hub.load_encoder(str(tmp_path / "timm"))
    print(hub.describe(info))
    assert info["pool"] == "cls" and model.num_heads == 4
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        d = max_diff(tm(x), pool(model.forward_features(x), "cls"))
    print(f"timm-written folder: max |timm - maect| = {d:.2e}")
    assert d <= TOL


def test_safetensors_bad_paths_name_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/model\.safetensors.*config\.json"):
        hub.load_encoder(str(tmp_path / "empty"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match=r"bad\.safetensors.*cannot be read as safetensors"):
        hub.load_encoder(str(bad))
    ckpt = tiny_ckpt(tmp_path)
    with pytest.raises(SystemExit, match=r"is a file; --format safetensors writes a folder"):
        export.main(["--ckpt", ckpt, "--format", "safetensors", "--out", ckpt])
