import numpy as np
import pytest
import torch

from maect.models.vit import build_model, num_params, sincos_pos_embed_2d


def tiny(**kw):
    args = dict(img_size=28, patch_size=4, embed_dim=32, depth=2, num_heads=4, decoder_embed_dim=16,
                decoder_depth=1, decoder_num_heads=2)
    args.update(kw)
    return build_model("custom", **args)


@pytest.mark.parametrize("arch,expected_m", [("vit_b16", 86), ("vit_l16", 304), ("vit_h14", 632)])
def test_param_counts_match_official_mae(arch, expected_m):
    """Official MAE's published sizes (86M, 304M, 632M) are the ViT with its 1000-class head, truncated to
    whole millions; the bare encoder is within 0.5% of them."""
    with torch.device("meta"):
        m = build_model(arch, decoder=False)
    enc = num_params(m)
    with_head = enc + m.embed_dim * 1000 + 1000
    print(f"{arch}: encoder {enc / 1e6:.2f}M, with 1000-class head {with_head / 1e6:.2f}M")
    assert int(with_head / 1e6) == expected_m
    assert abs(enc / 1e6 - expected_m) / expected_m < 0.005


def test_param_names_follow_official_mae():
    keys = set(tiny().state_dict())
    for k in ["patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias",
              "blocks.0.attn.proj.weight", "blocks.0.norm2.bias", "blocks.0.mlp.fc1.weight", "blocks.1.mlp.fc2.bias",
              "norm.weight", "decoder_embed.weight", "mask_token", "decoder_pos_embed", "decoder_blocks.0.attn.qkv.weight",
              "decoder_norm.weight", "decoder_pred.weight"]:
        assert k in keys, k


def test_sincos_matches_closed_form():
    dim, grid = 16, 3
    pe = sincos_pos_embed_2d(dim, grid)
    assert pe.shape == (grid * grid + 1, dim) and np.all(pe[0] == 0)
    i, j = 1, 2                              # row 1, column 2 -> flat index 1*3+2 (+1 for cls)
    omega = 1 / 10000 ** (np.arange(4) / 4)
    want = np.concatenate([np.sin(j * omega), np.cos(j * omega), np.sin(i * omega), np.cos(i * omega)])
    np.testing.assert_allclose(pe[1 + i * grid + j], want, rtol=1e-6)


def test_pos_embed_is_fixed_and_cls_has_none():
    m = tiny()
    assert not m.pos_embed.requires_grad and torch.all(m.pos_embed[0, 0] == 0)


def test_mae_loss_matches_independent_reference():
    """Fixed weights, fixed batch, fixed mask: norm-pix MSE averaged over masked patches only."""
    torch.manual_seed(0)
    m = tiny()
    imgs = torch.randn(3, 3, 28, 28)
    noise = torch.rand(3, 49)
    loss, pred, mask = m(imgs, 0.75, True, noise)
    # independent: patches via unfold (channel-last within a patch, as MAE's patchify), keep = 12 smallest noise
    p = 4
    patches = imgs.unfold(2, p, p).unfold(3, p, p)                  # [N, C, 7, 7, p, p]
    patches = patches.permute(0, 2, 3, 4, 5, 1).reshape(3, 49, p * p * 3)
    mu, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True, unbiased=True)
    target = (patches - mu) / torch.sqrt(var + 1e-6)
    keep = int(49 * 0.25)
    ref_mask = torch.ones(3, 49)
    for n in range(3):
        ref_mask[n, noise[n].argsort()[:keep]] = 0
    assert torch.equal(mask, ref_mask)
    per_patch = ((pred - target) ** 2).mean(-1)
    ref = (per_patch * ref_mask).sum() / ref_mask.sum()
    print(f"loss {loss.item():.6f} ref {ref.item():.6f}")
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-6)


def test_masked_encoder_sees_only_kept_tokens():
    m = tiny(decoder_depth=0)
    latent, mask, ids_restore = m.forward_encoder(torch.randn(2, 3, 28, 28), 0.75)
    assert latent.shape == (2, 1 + 12, 32) and mask.sum(1).tolist() == [37, 37]


def test_grad_from_block_matches_full_forward():
    torch.manual_seed(0)
    m = tiny(decoder_depth=0)
    x = torch.randn(2, 3, 28, 28)
    a = m.forward_features(x)
    b = m.forward_features(x, grad_from_block=1)
    assert torch.equal(a, b)
    b.sum().backward()
    assert m.blocks[0].attn.qkv.weight.grad is None and m.blocks[1].attn.qkv.weight.grad is not None


def test_bad_input_size_is_a_clear_error():
    with pytest.raises(ValueError, match="28x28"):
        tiny().forward_features(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="not divisible"):
        build_model("custom", img_size=30, patch_size=4, embed_dim=32, depth=1, num_heads=4, decoder_depth=0,
                    decoder_embed_dim=16, decoder_num_heads=2)
