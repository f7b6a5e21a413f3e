"""An exported encoder reloads (maect.hub.load_encoder) with the hyperparameters it was trained with, in every
format: the maect checkpoint itself, --format timm (flat state dict + the JSON record beside it), --format mae
({'model', 'maect_export'} + the JSON) and --format safetensors (folder with config.json, or the bare file with the
config in its header). Widths with a non-default head count (192-d with 6 heads, where the width alone says 3; 192-d
with 12 heads, where timm's config leaves num_heads out) and the tiny preset's 96-d (no standard count at all):
features are bit-equal to the source checkpoint's (same code, same weights, same pooling). Where the record is
missing or disagrees with the weights, the load is refused in one line naming what is missing or wrong."""
import json
import os
import shutil

import pytest
import torch

from maect import config as C
from maect import export, hub
from maect.models.vit import pool

SIZES = {"192d_6heads_cls": (192, 6, 32, 8, "cls"), "192d_12heads_mean": (192, 12, 32, 8, "mean"),
         "96d_tiny_mean": (96, 4, 28, 4, "mean")}


def source(tmp_path, D, H, img, p, pool_mode) -> str:
    cfg = C.Config()
    cfg.model = C.ModelCfg(arch="custom", img_size=img, patch_size=p, embed_dim=D, depth=2, num_heads=H,
                           pool=pool_mode, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    torch.manual_seed(0)
    m = hub.model_from_cfg(cfg.model, decoder=True)
    with torch.no_grad():                                   # weights far from init, so heads and pooling matter
        for v in m.parameters():
            v.add_(0.05 * torch.randn_like(v))
    path = str(tmp_path / "checkpoint-final.pth")
    hub.save_checkpoint({"model": m.state_dict(), "args": C.to_dict(cfg), "stage": "ct"}, path)
    return path


def features(src, img):
    model, info = hub.load_encoder(src)
    x = torch.randn(3, 3, img, img, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return pool(model.forward_features(x), info["pool"]), model, info


@pytest.mark.parametrize("size", list(SIZES))
def test_every_format_reloads_with_its_heads_and_pooling(tmp_path, size):
    D, H, img, p, pool_mode = SIZES[size]
    ckpt = source(tmp_path, D, H, img, p, pool_mode)
    want, _, info = features(ckpt, img)
    assert info["format"] == "maect" and info["model_cfg"].num_heads == H
    outs = {"timm": str(tmp_path / "timm" / "enc.pth"), "mae": str(tmp_path / "mae" / "enc.pth"),
            "safetensors": str(tmp_path / "st")}
    for fmt, out in outs.items():
        export.main(["--ckpt", ckpt, "--format", fmt, "--out", out])
    outs["safetensors-file"] = str(tmp_path / "st" / "model.safetensors")      # header metadata, no config.json
    shutil.copy(outs["safetensors-file"], tmp_path / "bare.safetensors")
    outs["safetensors-file"] = str(tmp_path / "bare.safetensors")
    for fmt, out in outs.items():
        got, model, binfo = features(out, img)
        assert model.num_heads == H and binfo["pool"] == pool_mode, (fmt, model.num_heads, binfo["pool"])
        assert (model.embed_dim, model.depth, binfo["img_size"]) == (D, 2, img)
        assert torch.equal(got, want), (fmt, (got - want).abs().max().item())
    mae = torch.load(outs["mae"], weights_only=True)
    assert mae["maect_export"]["num_heads"] == H and mae["maect_export"]["norm_eps"] == 1e-6
    moved = tmp_path / "moved.pth"                           # the mae format carries its record inside
    shutil.copy(outs["mae"], moved)
    assert torch.equal(features(str(moved), img)[0], want)
    cfg = json.load(open(os.path.join(outs["safetensors"], "config.json")))
    del cfg["maect"]                                         # a timm-only config: model_args, else the architecture's
    json.dump(cfg, open(os.path.join(outs["safetensors"], "config.json"), "w"))
    assert features(outs["safetensors"], img)[1].num_heads == H


def test_missing_or_wrong_record_is_refused_in_one_line(tmp_path):
    D, H, img, p, pool_mode = SIZES["96d_tiny_mean"]
    ckpt = source(tmp_path, D, H, img, p, pool_mode)
    out = str(tmp_path / "enc.pth")
    export.main(["--ckpt", ckpt, "--format", "timm", "--out", out])
    side = str(tmp_path / "enc.json")
    rec = json.load(open(side))
    for key, val, match in (("embed_dim", 192, "records embed_dim=192 but the weights have embed_dim=96"),
                            ("norm_eps", 1e-5, "records norm_eps=1e-05; maect's ViT is built with norm_eps=1e-06"),
                            ("mlp_ratio", 2.0, "records mlp_ratio=2.0")):
        json.dump(dict(rec, **{key: val}), open(side, "w"))
        with pytest.raises(ValueError, match=match.replace("(", r"\(")) as e:
            hub.load_encoder(out)
        assert "\n" not in str(e.value)
    os.remove(side)
    with pytest.raises(ValueError, match="do not record the number of attention heads, and width 96 has no standard "
                                         "count") as e:
        hub.load_encoder(out)
    assert "JSON maect.export writes beside a .pth" in str(e.value) and "\n" not in str(e.value)


def test_init_from_an_export_keeps_its_heads(tmp_path):
    """stage=head init=EXPORT (stage_init.load_for_nnclr) builds the encoder the export records: the timm .pth with
    its JSON beside it, the mae file, the safetensors folder (it used to be refused as 'does not exist')."""
    import types

    from maect import stage_init
    D, H, img, p, pool_mode = SIZES["192d_6heads_cls"]
    ckpt = source(tmp_path, D, H, img, p, pool_mode)
    want = features(ckpt, img)[0]
    cfg = C.Config()
    cfg.nnclr = C.NNCLRCfg(proj_hidden=32, proj_dim=16, pred_hidden=32, queue_size=64)
    cfg.model.arch = "custom"       # sizes left 0: the export's (a preset of another size is refused by name)
    di = types.SimpleNamespace(device=torch.device("cpu"))
    x = torch.randn(3, 3, img, img, generator=torch.Generator().manual_seed(1))
    for fmt, out in (("timm", tmp_path / "t.pth"), ("mae", tmp_path / "m.pth"), ("safetensors", tmp_path / "st")):
        export.main(["--ckpt", ckpt, "--format", fmt, "--out", str(out)])
        encoder, _, _ = stage_init.load_for_nnclr(cfg, di, str(out))
        assert encoder.num_heads == H, fmt
        with torch.no_grad():
            assert torch.equal(pool(encoder.eval().forward_features(x), pool_mode), want), fmt


def test_a_json_that_is_not_an_export_record_is_ignored_a_broken_record_named(tmp_path):
    D, H, img, p, pool_mode = SIZES["192d_6heads_cls"]
    ckpt = source(tmp_path, D, H, img, p, pool_mode)
    out = str(tmp_path / "enc.pth")
    export.main(["--ckpt", ckpt, "--format", "timm", "--out", out])
    side = tmp_path / "enc.json"
    text = side.read_text()
    side.write_text(text[:len(text) // 2])                   # a record cut short: named, not silently 3 heads
    with pytest.raises(ValueError, match="the export record .*enc.json' beside the weights cannot be read"):
        hub.load_encoder(out)
    side.write_text("{not json")                            # someone else's file: the weights load on their own
    model, info = hub.load_encoder(out)
    assert model.num_heads == hub.HEADS_BY_DIM[D] and any("no maect config" in n for n in info["notes"])
