"""Checkpoint interop: official MAE pretrain / fine-tune, timm VisionTransformer and maect checkpoints load into
our encoder with features equal to timm's forward of the same weights; exports load into timm with strict=True.

All weights are random (no downloads). Full-size ViT-B/16 for the two main formats; reduced width/depth
(192 x 2, heads 3) for the rest, with the real patch sizes 16 and 14. L/16, H/14 and H/16 are checked on the meta
device (state-dict keys and shapes only).
"""
import argparse
import json
import types

import pytest
import timm
import torch

from maect import config as C
from maect import export, hub
from maect.models.vit import build_model, pool

# fp32, same weights, same ops: on CPU (torch 2.14, both through F.scaled_dot_product_attention) the difference is
# exactly 0; the margin is for other attention backends / BLAS blockings, which reorder sums (~1e-7 per block)
TOL = 1e-5
SMALL = dict(embed_dim=192, depth=2, num_heads=3)   # 192 -> 3 heads is also what hub infers from the width
DEC = dict(decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4)


def randomize(sd: dict, seed: int, keep=("pos_embed", "decoder_pos_embed")) -> dict:
    """Perturb every tensor so that a wrong mapping (norm vs fc_norm, a dropped bias) changes the features:
    matrices += 0.02 N(0, 1); vectors (biases, LayerNorm gamma/beta) += 0.1 N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v.clone() if k in keep else v + (0.02 if v.dim() > 1 else 0.1) * torch.randn(v.shape, generator=g)
            for k, v in sd.items()}


def timm_vit(img=224, patch=16, **kw):
    args = dict(img_size=img, patch_size=patch, num_classes=0, **SMALL)
    args.update(kw)
    return timm.create_model("vit_base_patch16_224", pretrained=False, **args).eval()


def image(img=224, seed=0):
    return torch.randn(1, 3, img, img, generator=torch.Generator().manual_seed(seed))


def enc_keys(sd):
    return {k: v for k, v in sd.items() if not (k.startswith(("decoder", "head.")) or k == "mask_token")}


@torch.no_grad()
def assert_same_features(model, tm, x):
    """Our cls / mean pooling of forward_features vs timm's forward_features (after its final norm): token 0 and
    the mean of the patch tokens."""
    ours, ref = model.forward_features(x), tm.forward_features(x)
    for mode, r in (("cls", ref[:, 0]), ("mean", ref[:, 1:].mean(dim=1))):
        d = (pool(ours, mode) - r).abs().max().item()
        print(f"  {mode}: max |ours - timm| = {d:.2e}")
        assert d <= TOL, (mode, d)


def has_note(info, *words):
    return any(all(w in n for w in words) for n in info["notes"])


# ------------------------------------------------------------------------------------------------ official MAE
def test_mae_pretrain_b16(tmp_path):
    torch.manual_seed(0)
    sd = randomize(build_model("vit_b16").state_dict(), 1)           # encoder + decoder_* + mask_token
    args = argparse.Namespace(model="mae_vit_base_patch16", input_size=224, mask_ratio=0.75, norm_pix_loss=True)
    path = str(tmp_path / "mae_pretrain_vit_base_full.pth")
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 799, "scaler": {},
                "args": args}, path)
    model, info = hub.load_encoder(path)
    print(hub.describe(info))
    assert info["format"] == "mae_pretrain" and info["model_cfg"].arch == "vit_b16" and info["pool"] == "mean"
    assert info["missing"] == [] and "decoder_embed.weight" in info["unexpected"] and "mask_token" in info["unexpected"]
    assert has_note(info, "decoder", "dropped", "expected") and has_note(info, "mae_vit_base_patch16")
    assert not has_note(info, "folded") and not has_note(info, "not the fixed sin-cos")
    tm = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()
    tm.load_state_dict(enc_keys(sd), strict=True)
    assert_same_features(model, tm, image())


def test_mae_pretrain_h14_style_cls_position_folded():
    """Patch 14 pretrain layout whose pos_embed[:, 0] is nonzero (one official H/14 release): folded into the cls
    token, the row zeroed, features equal timm's forward of the ORIGINAL (unfolded) weights."""
    torch.manual_seed(0)
    src = build_model("custom", img_size=224, patch_size=14, **DEC, **SMALL)
    sd = randomize(src.state_dict(), 2)
    sd["pos_embed"][:, 0] = 0.02 * torch.randn(sd["pos_embed"].shape[-1])
    ckpt = {"model": sd, "epoch": 1599}
    model, info = hub.load_encoder(ckpt)
    print(hub.describe(info))
    assert info["model_cfg"].patch_size == 14 and info["img_size"] == 224 and info["model_cfg"].num_heads == 3
    assert has_note(info, "folded into cls_token")
    assert torch.all(model.pos_embed[:, 0] == 0)
    assert torch.equal(model.cls_token.data, sd["cls_token"] + sd["pos_embed"][:, :1])
    assert torch.equal(model.pos_embed.data[:, 1:], sd["pos_embed"][:, 1:])
    assert torch.any(ckpt["model"]["pos_embed"][:, 0] != 0)        # the caller's dict is not modified
    tm = timm_vit(patch=14)
    tm.load_state_dict(enc_keys(sd), strict=True)
    assert_same_features(model, tm, image())


def test_mae_finetune_global_pool_fc_norm():
    """global_pool=True fine-tune: fc_norm.* and head.*, no norm.*; pos_embed learned in every row. fc_norm is
    loaded as norm, pool 'mean' (hub's docstring: LN(mean) there vs mean(LN) here). Reference: timm with norm :=
    fc_norm on the tokens, global_pool='avg', fc_norm=False."""
    ft = timm_vit(global_pool="avg", num_classes=10)                   # timm's default fc_norm=True: MAE's layout
    sd = randomize(ft.state_dict(), 3, keep=())
    assert "fc_norm.weight" in sd and "norm.weight" not in sd
    ckpt = {"model": sd, "epoch": 99, "args": argparse.Namespace(model="vit_base_patch16", global_pool=True)}
    model, info = hub.load_encoder(ckpt)
    print(hub.describe(info))
    assert info["format"] == "finetune" and info["pool"] == "mean"
    assert sorted(info["missing"]) == ["norm.bias", "norm.weight"]
    assert {"fc_norm.weight", "head.weight", "head.bias"} <= set(info["unexpected"])
    assert has_note(info, "no decoder (fine-tune", "expected") and has_note(info, "classifier head", "ignored")
    assert has_note(info, "fc_norm loaded as norm") and has_note(info, "learned", "loaded as they are")
    tm = timm_vit(global_pool="avg", fc_norm=False)
    tm.load_state_dict({k.replace("fc_norm.", "norm."): v for k, v in enc_keys(sd).items()}, strict=True)
    assert_same_features(model, tm, image())


def test_mae_finetune_cls_token():
    """global_pool=False fine-tune (and timm classifiers): norm.* + head.*; exact, pool 'cls'."""
    ft = timm_vit(patch=14, num_classes=10)
    sd = randomize(ft.state_dict(), 4, keep=())
    model, info = hub.load_encoder({"model": sd})
    print(hub.describe(info))
    assert info["format"] == "finetune" and info["pool"] == "cls" and info["missing"] == []
    assert sorted(info["unexpected"]) == ["head.bias", "head.weight"]
    ft.reset_classifier(0)
    ft.load_state_dict(enc_keys(sd), strict=True)
    assert_same_features(model, ft, image())


# ------------------------------------------------------------------------------------------------ timm
def test_timm_b16_state_dict():
    """A timm VisionTransformer state dict (learned pos_embed in every row, cls row included; 1000-class head)."""
    torch.manual_seed(0)
    tm = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    tm.load_state_dict(randomize(tm.state_dict(), 5, keep=()))
    sd = tm.state_dict()
    model, info = hub.load_encoder(sd)
    print(hub.describe(info))
    assert info["model_cfg"].arch == "vit_b16" and info["pool"] == "cls" and info["missing"] == []
    assert has_note(info, "folded into cls_token") and has_note(info, "classifier head")
    assert torch.equal(model.pos_embed.data[:, 1:], sd["pos_embed"][:, 1:])   # learned patch rows as they are
    assert_same_features(model, tm, image())


@pytest.mark.parametrize("wrap", ["module_prefix_in_state_dict", "compiled_in_model", "no_embed_class"])
def test_timm_wrappers_and_layouts(wrap):
    """DDP 'module.' prefix under 'state_dict', torch.compile '_orig_mod.' under 'model', and timm's
    no_embed_class pos_embed ([1, L, D], no cls row), patch 14."""
    tm = timm_vit(patch=14, no_embed_class=(wrap == "no_embed_class"))
    tm.load_state_dict(randomize(tm.state_dict(), 6, keep=()))
    sd = tm.state_dict()
    ckpt = {"module_prefix_in_state_dict": {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
            "compiled_in_model": {"model": {f"_orig_mod.{k}": v for k, v in sd.items()}},
            "no_embed_class": sd}[wrap]
    model, info = hub.load_encoder(ckpt)
    print(hub.describe(info))
    if wrap == "no_embed_class":
        assert sd["pos_embed"].shape[1] == 256 and has_note(info, "no cls row")
        assert torch.all(model.pos_embed[:, 0] == 0) and torch.equal(model.cls_token.data, sd["cls_token"])
    else:
        assert has_note(info, "prefix removed")
    assert_same_features(model, tm, image())


@pytest.mark.parametrize("arch", ["vit_b16", "vit_l16", "vit_h14", "vit_h16"])
def test_timm_spec_keys_and_shapes_real_sizes(arch):
    """For the real sizes (meta device, no compute): the timm model that export names, with its kwargs, has
    exactly our encoder's keys and shapes, for both poolings; hub infers the arch back from those weights."""
    with torch.device("meta"):
        ours = build_model(arch, decoder=False)
        ours_sd = {k: v.shape for k, v in ours.state_dict().items()}
        sizes = dict(img_size=224, patch_size=ours.patch_embed.patch_size, embed_dim=ours.embed_dim,
                     depth=ours.depth, num_heads=ours.num_heads)
        for p in ("cls", "mean"):
            name, kw = export.timm_spec(sizes, 3, p)
            tsd = timm.create_model(name, pretrained=False, **kw).state_dict()
            assert {k: v.shape for k, v in tsd.items()} == ours_sd, (arch, p, name, kw)
        assert hub.infer_model_cfg(ours.state_dict()).arch == arch
    print(arch, name, kw)


# ------------------------------------------------------------------------------------------------ maect
def maect_ckpt(tmp_path, pool_mode="mean"):
    cfg = C.Config()
    cfg.model = C.ModelCfg(arch="custom", img_size=64, patch_size=16, pool=pool_mode, **DEC, **SMALL)
    torch.manual_seed(0)
    m = hub.model_from_cfg(cfg.model, decoder=True)
    sd = randomize(m.state_dict(), 7)
    ema = randomize(enc_keys(sd), 8)
    path = str(tmp_path / "checkpoint-final.pth")
    hub.save_checkpoint({"model": sd, "model_ema": ema, "head": {}, "args": C.to_dict(cfg), "stage": "ct"}, path)
    return path, sd, ema


def test_maect_checkpoint_online_and_ema(tmp_path):
    path, sd, ema = maect_ckpt(tmp_path)
    x = image(64)
    for use_ema, want in ((False, sd), (True, ema)):
        model, info = hub.load_encoder(path, use_ema=use_ema)
        print(hub.describe(info))
        assert info["format"] == "maect" and info["config"] is not None and info["pool"] == "mean"
        assert info["ema"] == use_ema and info["img_size"] == 64
        tm = timm_vit(img=64)
        tm.load_state_dict(enc_keys(want), strict=True)
        assert_same_features(model, tm, x)


def test_train_head_init_from_official_checkpoint(tmp_path):
    """stage=head init=PATH: stage_init.load_for_nnclr (hub.load_checkpoint then hub.load_encoder on the dict) takes an
    official MAE pretrain checkpoint; the dict it keeps for ck['head'] / ck['queue'] is left intact."""
    from maect import stage_init
    src = build_model("custom", img_size=64, patch_size=16, **DEC, **SMALL)
    path = str(tmp_path / "mae.pth")
    torch.save({"model": randomize(src.state_dict(), 9), "epoch": 1,
                "args": argparse.Namespace(model="mae_vit_custom")}, path)
    cfg = C.Config()
    cfg.nnclr = C.NNCLRCfg(proj_hidden=32, proj_dim=16, pred_hidden=32, queue_size=64)
    cfg.model.arch = "custom"       # sizes left 0: the encoder's (the default vit_b16 would be refused: 768 != 192)
    encoder, head, queue = stage_init.load_for_nnclr(cfg, types.SimpleNamespace(device=torch.device("cpu")), path)
    assert encoder.embed_dim == 192 and encoder.depth == 2 and not encoder.has_decoder
    assert (cfg.model.embed_dim, cfg.model.depth, cfg.model.patch_size) == (192, 2, 16)


# ------------------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("fmt", ["timm", "mae"])
@pytest.mark.parametrize("source", ["maect_mean_ema", "h14_cls_folded"])
def test_export_loads_in_timm_strict(tmp_path, capsys, fmt, source):
    if source == "maect_mean_ema":
        ckpt, sd, ema = maect_ckpt(tmp_path)
        img, want_ema, pool_mode = 64, True, "mean"
    else:
        src = build_model("custom", img_size=224, patch_size=14, **DEC, **SMALL)
        sd = randomize(src.state_dict(), 10)
        sd["pos_embed"][:, 0] = 0.02 * torch.randn(sd["pos_embed"].shape[-1])
        ckpt = str(tmp_path / "mae_h14.pth")
        torch.save({"model": sd}, ckpt)
        img, want_ema, pool_mode = 224, False, "cls"
    out = str(tmp_path / "export" / "encoder.pth")
    export.main(["--ckpt", ckpt, "--format", fmt, "--out", out, "--pool", pool_mode] + (["--ema"] if want_ema else []))
    print(capsys.readouterr().out)
    meta = json.load(open(tmp_path / "export" / "encoder.json"))
    assert meta["pool"] == pool_mode and meta["ema"] == want_ema and meta["patch_size"] == (16 if img == 64 else 14)
    obj = torch.load(out, weights_only=True)
    state = obj if fmt == "timm" else obj["model"]
    assert not any(k.startswith(("head.", "fc_norm.", "decoder")) for k in state)
    tm = timm.create_model(meta["timm_model"], pretrained=False, **meta["timm_kwargs"]).eval()
    tm.load_state_dict(state, strict=True)
    model, info = hub.load_encoder(ckpt, use_ema=want_ema)
    x = image(img)
    with torch.no_grad():
        d = (tm(x) - pool(model.forward_features(x), pool_mode)).abs().max().item()
    print(f"{source} {fmt}: timm({meta['timm_kwargs']})(x) vs ours pool {pool_mode!r}: {d:.2e}")
    assert d <= TOL
    back, binfo = hub.load_encoder(out)                                    # and the export reads back in
    assert binfo["format"] == "encoder" and has_note(binfo, "no decoder (encoder-only")
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_export_ema_missing_warns_and_bad_args(tmp_path, capsys):
    src = build_model("custom", img_size=64, patch_size=16, decoder=False, **DEC, **SMALL)
    ckpt = str(tmp_path / "enc.pth")
    torch.save({"model": src.state_dict()}, ckpt)
    export.main(["--ckpt", ckpt, "--format", "timm", "--out", str(tmp_path / "e.pth"), "--ema"])
    assert "no EMA encoder" in capsys.readouterr().err
    assert json.load(open(tmp_path / "e.json"))["ema"] is False
    with pytest.raises(SystemExit, match="would be overwritten"):
        export.main(["--ckpt", ckpt, "--format", "timm", "--out", str(tmp_path / "e.json")])
    with pytest.raises(SystemExit, match="nope.pth"):
        export.main(["--ckpt", str(tmp_path / "nope.pth"), "--format", "mae", "--out", str(tmp_path / "o.pth")])


# ------------------------------------------------------------------------------------------------ errors
def small_sd(seed=11):
    m = build_model("custom", img_size=64, patch_size=16, decoder=False, **DEC, **SMALL)
    return randomize(m.state_dict(), seed)


def test_missing_and_unknown_keys_are_reported(tmp_path):
    sd = small_sd()
    del sd["blocks.1.mlp.fc2.weight"]
    path = str(tmp_path / "broken.pth")
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError, match=r"broken\.pth.*lacks encoder weights: blocks\.\*\.mlp\.fc2\.weight"):
        hub.load_encoder(path)
    sd = small_sd()
    del sd["norm.weight"], sd["norm.bias"]                                 # no norm and no fc_norm to stand in
    with pytest.raises(ValueError, match=r"lacks encoder weights: norm\.weight, norm\.bias"):
        hub.load_encoder(sd)
    sd = small_sd()
    sd["blocks.0.ls1.gamma"] = torch.ones(192)                             # layer scale: not our architecture
    with pytest.raises(ValueError, match=r"no place for.*blocks\.\*\.ls1\.gamma.*strict=False"):
        hub.load_encoder(sd)
    model, info = hub.load_encoder(sd, strict=False)
    assert "blocks.0.ls1.gamma" in info["unexpected"] and has_note(info, "ls1.gamma", "ignored")


def test_garbage_and_missing_files_name_the_path(tmp_path):
    missing = str(tmp_path / "does_not_exist.pth")
    with pytest.raises(FileNotFoundError, match="does_not_exist.pth"):
        hub.load_encoder(missing)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint\x00\x01" * 10)
    with pytest.raises(ValueError, match="garbage.pth.*cannot be read"):
        hub.load_encoder(str(garbage))
    other = str(tmp_path / "not_a_vit.pth")
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}, "epoch": 0}, other)
    with pytest.raises(ValueError, match=r"not_a_vit\.pth.*patch_embed\.proj\.weight"):
        hub.load_encoder(other)
