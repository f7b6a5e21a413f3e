"""maect.viz: the reconstruction grid (norm-pix un-normalisation, masking, pasting) and the embedding plot, on tiny
random-weight checkpoints and the real Fashion-MNIST test split."""
import os

import pytest
import torch

from maect import config as C
from maect import validation as V
from maect import hub, viz
from maect.models.vit import build_model

TINY = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=4, decoder_embed_dim=16,
            decoder_depth=1, decoder_num_heads=2)


def tiny_ckpts(tmp_path, extra=()):
    """runs/mae/checkpoint-final.pth (encoder + decoder) and runs/ct/checkpoint-final.pth (encoder only, EMA), with
    the tiny preset's config (Fashion-MNIST unless `extra` says otherwise, mean pooling)."""
    cfg = V.load_config(["preset=tiny", "model.embed_dim=32", "model.depth=2", "model.num_heads=4",
                         "model.decoder_embed_dim=16", "model.decoder_depth=1", "model.decoder_num_heads=2", *extra])
    torch.manual_seed(0)
    mae = hub.model_from_cfg(cfg.model, decoder=True)
    paths = {}
    for stage in ("mae", "ct"):
        sd = mae.state_dict() if stage == "mae" else {k: v + 0.01 for k, v in hub.find_state_dict(
            {"model": mae.state_dict()})[0].items() if not k.startswith("decoder") and k != "mask_token"}
        extra = {"model_ema": sd} if stage == "ct" else {}
        paths[stage] = str(tmp_path / stage / "checkpoint-final.pth")
        hub.save_checkpoint({"model": sd, "args": C.to_dict(cfg), "stage": stage, **extra}, paths[stage])
    return paths


def test_unpatchify_inverts_patchify():
    m = build_model("custom", **TINY)
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(viz.unpatchify(m.patchify(x), 4, 1), x)
    m3 = build_model("custom", **dict(TINY, in_chans=3))
    x3 = torch.randn(2, 3, 28, 28)
    assert torch.equal(viz.unpatchify(m3.patchify(x3), 4, 3), x3)


def test_reconstruct_unnormalises_with_each_patch_statistics():
    """With norm_pix the shown prediction of patch j is pred_j * sqrt(var_j + 1e-6) + mean_j of the original patch;
    visible patches are exactly the original in 'pasted' and 'masked'; masked ones are 0 in 'masked'."""
    torch.manual_seed(1)
    m = build_model("custom", **TINY).eval()
    x = torch.randn(4, 1, 28, 28)
    out = viz.reconstruct(m, x, 0.75, norm_pix=True, seed=3)
    noise = torch.rand(4, 49, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, pred, mask = m(x, mask_ratio=0.75, noise=noise)
    t = m.patchify(x)
    want = pred * (t.var(-1, keepdim=True) + 1e-6) ** 0.5 + t.mean(-1, keepdim=True)
    got = m.patchify(out["reconstruction"])
    d = (got - want).abs().max().item()
    print(f"un-normalised prediction: max diff {d:.2e}")
    assert d <= 1e-6                                     # the same fp32 ops, reshaped: rounding only
    keep = mask == 0
    assert keep.sum() == 4 * int(49 * (1 - 0.75))        # MAE keeps int(L * (1 - ratio)) = 12 patches
    assert torch.equal(m.patchify(out["pasted"])[keep], t[keep]) and torch.equal(m.patchify(out["masked"])[keep], t[keep])
    assert torch.equal(m.patchify(out["pasted"])[~keep], got[~keep])
    assert m.patchify(out["masked"])[~keep].abs().max() == 0
    raw = viz.reconstruct(m, x, 0.75, norm_pix=False, seed=3)
    assert torch.allclose(m.patchify(raw["reconstruction"]), pred, atol=1e-6)


def test_one_per_class_spans_classes():
    y = torch.tensor([3, 3, 1, 0, 1, 2, 0, 3])
    assert viz.one_per_class(y, 4).tolist() == [3, 2, 5, 0]
    assert viz.one_per_class(y, 6).tolist() == [3, 2, 5, 0, 6, 4]


def test_embedding_pca_explains_the_top_directions():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(500, 16, generator=g) * torch.tensor([5.0, 3.0] + [0.1] * 14) + 10   # two dominant axes
    z, how = viz.embed_2d(f, "pca")
    assert z.shape == (500, 2) and "PCA" in how
    fn = torch.nn.functional.normalize(f, dim=1)
    fc = fn - fn.mean(0)
    share = (z.var(0).sum() / fc.var(0).sum()).item()
    print(how, f"share {share:.3f}")
    assert share > 0.9 and str(round(100 * share)) in how


@pytest.mark.slow
def test_viz_command_writes_pngs(tmp_path, capsys):
    from PIL import Image
    p = tiny_ckpts(tmp_path)
    out = tmp_path / "viz"
    written = viz.main(["--ckpt", p["ct"], "--ckpt-before", p["mae"], "--out", str(out), "--n", "4", "--embed-n", "300",
                        "--method", "pca", "--use-ema", "--no-report"])
    print(capsys.readouterr().out)
    assert set(written) == {"reconstruction", "embedding"}
    for path in written.values():
        with Image.open(path) as im:
            print(path, im.size)
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200
    # a CT checkpoint alone: no decoder, so only the embedding, and a message saying why
    only = viz.main(["--ckpt", p["ct"], "--out", str(tmp_path / "ct_only"), "--embed-n", "100", "--method", "pca",
                     "--no-report"])
    assert set(only) == {"embedding"} and "reconstruction.png skipped" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"ct/checkpoint-final\.pth: no MAE decoder"):
        viz.load_mae(p["ct"])
    with pytest.raises(SystemExit, match=r"nope\.pth"):
        viz.main(["--ckpt", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "x")])
    assert sorted(os.listdir(out)) == ["embedding.png", "reconstruction.png"]


def test_viz_on_an_unlabelled_folder(tmp_path, capsys):
    """data.name=folder without labels: reconstructions as usual, the embedding uncoloured, and a line saying why."""
    import numpy as np
    from PIL import Image
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (36, 30, 3), dtype=np.uint8)).save(root / f"im{i:02d}.png")
    p = tiny_ckpts(tmp_path, ["data.name=folder", f"data.root={root}"])
    written = viz.main(["--ckpt", p["ct"], "--ckpt-before", p["mae"], "--out", str(tmp_path / "viz"), "--n", "3",
                        "--embed-n", "12", "--method", "pca", "--no-report"])
    assert set(written) == {"reconstruction", "embedding"}
    assert "without label colours" in capsys.readouterr().err
