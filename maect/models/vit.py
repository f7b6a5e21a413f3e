"""ViT encoder + MAE decoder, parameter names identical to official MAE / timm (see SPEC "Model").

Token layout: x [N, 1 + L, D], cls first. pos_embed is [1, 1 + L, D] with a zero row for cls (official MAE
layout, so its checkpoints load as they are); it is fixed (sin-cos) and never trained.

Activation checkpointing (set_grad_checkpointing, config model.grad_checkpointing): every transformer block that
runs with autograd on (the encoder's and decoder's blocks in MAE, the tuned upper blocks in contrastive tuning; never
a frozen block under no_grad) runs under torch.utils.checkpoint(use_reentrant=False): only its input is kept for the
backward pass, which runs the block's forward again to rebuild the rest. Same loss and gradients (the blocks have no
dropout or drop-path, so there is no random state to replay; non-reentrant checkpointing would restore it anyway),
for one more forward per block; bench/grad_checkpointing.py measures the memory saved.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from maect import kernels
from maect.models.attention import attention


def sincos_pos_embed_2d(dim: int, grid: int, cls_token: bool = True) -> np.ndarray:
    """Fixed 2-D sin-cos embedding [grid*grid (+1), dim]: half the channels encode the row, half the column
    (MAE's layout: the w coordinate first), each as [sin(p*w_k), cos(p*w_k)], w_k = 1/10000^(k/(dim/4))."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim % 4 == 0, got dim={dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    gh, gw = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def emb(pos):  # [M] -> [M, dim/2]
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    pe = np.concatenate([emb(gw), emb(gh)], axis=1)  # MAE: emb_h uses grid[0] = w-major meshgrid
    if cls_token:
        pe = np.concatenate([np.zeros([1, dim]), pe], axis=0)
    return pe.astype(np.float32)


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not divisible by patch_size={patch_size}")
        self.img_size, self.patch_size = img_size, patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def check(self, x: Tensor) -> None:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"input images are {tuple(x.shape[-2:])}, the model expects {self.img_size}x{self.img_size}")

    def forward(self, x: Tensor) -> Tensor:  # [N, C, H, W] -> [N, L, D]
        self.check(x)
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = attention(qkv[0], qkv[1], qkv[2])  # [N, H, T, Dh]
        return self.proj(out.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (timm names: norm1, attn, norm2, mlp)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MaskedAutoencoderViT(nn.Module):
    """ViT encoder (+ optional MAE decoder when decoder_depth > 0)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        L = self.patch_embed.num_patches
        self.embed_dim, self.depth, self.num_heads, self.in_chans = embed_dim, depth, num_heads, in_chans
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.has_decoder = decoder_depth > 0
        if self.has_decoder:
            self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
            self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + 1, decoder_embed_dim), requires_grad=False)
            self.decoder_blocks = nn.ModuleList(
                [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)])
            self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
            self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans, bias=True)
        self.grad_checkpointing = False
        self.initialize_weights()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every block that runs with autograd on (module docstring); timm's name."""
        self.grad_checkpointing = bool(enable)

    def run_block(self, blk: nn.Module, x: Tensor) -> Tensor:
        """blk(x), under non-reentrant activation checkpointing when it is on and autograd records this block."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    # ----------------------------------------------------------------------------------------- init
    def initialize_weights(self):
        grid = int(self.patch_embed.num_patches ** 0.5)
        self.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed_2d(self.embed_dim, grid)).unsqueeze(0))
        if self.has_decoder:
            dd = self.decoder_pos_embed.shape[-1]
            self.decoder_pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed_2d(dd, grid)).unsqueeze(0))
            nn.init.normal_(self.mask_token, std=0.02)
        w = self.patch_embed.proj.weight.data  # xavier-uniform as if it were a Linear [D, C*p*p]
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------------------------------- encoder
    def embed(self, imgs: Tensor) -> Tensor:
        """[N, C, H, W] -> patch tokens with position embedding [N, L, D] (no cls)."""
        return self.patch_embed(imgs) + self.pos_embed[:, 1:, :]

    def prepend_cls(self, x: Tensor) -> Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward_encoder(self, imgs: Tensor, mask_ratio: float, noise: Tensor | None = None):
        """MAE encoder. Returns latent [N, 1 + K, D] (after norm), mask [N, L] (0 keep, 1 remove), ids_restore [N, L].
        Patch embedding + position embedding + masking in one op: kernels.masked_patch_embed equals MAE's
        patch_embed -> + pos_embed -> random_masking; its measured dispatch may embed only the kept patches."""
        self.patch_embed.check(imgs)
        proj = self.patch_embed.proj
        x, mask, ids_restore = kernels.masked_patch_embed(imgs, proj.weight, proj.bias, self.pos_embed[:, 1:, :],
                                                          mask_ratio, noise)
        x = self.prepend_cls(x)
        for blk in self.blocks:
            x = self.run_block(blk, x)
        return self.norm(x), mask, ids_restore

    def forward_features(self, imgs: Tensor, grad_from_block: int = 0) -> Tensor:
        """Unmasked encoder output after the final norm, [N, 1 + L, D]. Blocks below grad_from_block run without
        autograd (frozen lower half in stage 3: no activations kept, no backward through them)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and grad_from_block == 0):
            x = self.prepend_cls(self.embed(imgs))
        for i, blk in enumerate(self.blocks):
            if i < grad_from_block:
                with torch.no_grad():
                    x = blk(x)
            else:
                x = self.run_block(blk, x)
        return self.norm(x)

    # ----------------------------------------------------------------------------------------- decoder
    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """latent [N, 1 + K, D] -> per-patch pixel predictions [N, L, p*p*C] (cls output dropped). The decoder input
        (mask tokens appended, unshuffled, cls re-attached, + decoder_pos_embed) is one op: kernels.decoder_input."""
        x = self.decoder_embed(latent)
        x = kernels.decoder_input(x, self.mask_token, ids_restore, self.decoder_pos_embed)
        for blk in self.decoder_blocks:
            x = self.run_block(blk, x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def patchify(self, imgs: Tensor) -> Tensor:
        """[N, C, H, W] -> [N, L, p*p*C] (MAE order: row, col, channel last)."""
        p = self.patch_embed.patch_size
        N, C, H, W = imgs.shape
        h, w = H // p, W // p
        x = imgs.reshape(N, C, h, p, w, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(N, h * w, p * p * C)

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor, norm_pix_loss: bool = True) -> Tensor:
        """MSE on (per-patch normalised) pixels, averaged over masked patches only."""
        target = self.patchify(imgs)
        if norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as official MAE
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred.float() - target.float()) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(self, imgs: Tensor, mask_ratio: float = 0.75, norm_pix_loss: bool = True, noise: Tensor | None = None):
        if not self.has_decoder:
            raise RuntimeError("this model was built without a decoder (decoder_depth=0): MAE loss unavailable")
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask, norm_pix_loss), pred, mask


def pool(tokens: Tensor, mode: str) -> Tensor:
    """[N, 1 + L, D] -> [N, D]: 'cls' token or 'mean' of patch tokens (the cls token excluded)."""
    if mode == "cls":
        return tokens[:, 0]
    if mode == "mean":
        return tokens[:, 1:].mean(dim=1)
    raise ValueError(f"pooling must be 'cls' or 'mean', got {mode!r}")


# name -> (img, patch, dim, depth, heads, dec_dim, dec_depth, dec_heads). Encoder sizes from SPEC; decoder 512x8x16.
ARCHS = {
    "vit_b16": (224, 16, 768, 12, 12, 512, 8, 16),
    "vit_l16": (224, 16, 1024, 24, 16, 512, 8, 16),
    "vit_h16": (224, 16, 1280, 32, 16, 512, 8, 16),
    "vit_h14": (224, 14, 1280, 32, 16, 512, 8, 16),
    "vit_s16": (224, 16, 384, 12, 6, 512, 8, 16),
}


def build_model(arch: str = "vit_b16", *, img_size: int | None = None, patch_size: int | None = None,
                in_chans: int = 3, embed_dim: int | None = None, depth: int | None = None,
                num_heads: int | None = None, decoder_embed_dim: int | None = None,
                decoder_depth: int | None = None, decoder_num_heads: int | None = None,
                decoder: bool = True) -> MaskedAutoencoderViT:
    """Build a named architecture ('custom' takes every size from the keyword arguments); overrides win."""
    if arch != "custom" and arch not in ARCHS:
        raise ValueError(f"unknown model arch {arch!r}; choose one of {sorted(ARCHS)} or 'custom'")
    base = ARCHS.get(arch, (None,) * 8)
    given = (img_size, patch_size, embed_dim, depth, num_heads, decoder_embed_dim, decoder_depth, decoder_num_heads)
    vals = [g if g is not None else b for g, b in zip(given, base)]
    names = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth",
             "decoder_num_heads")
    missing = [n for n, v in zip(names, vals) if v is None]
    if missing:
        raise ValueError(f"model arch 'custom' needs {missing}")
    kw = dict(zip(names, vals))
    if not decoder:
        kw["decoder_depth"] = 0
    return MaskedAutoencoderViT(in_chans=in_chans, **kw)


def num_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def encoder_state_dict(model: nn.Module) -> dict:
    """The encoder's entries (no decoder_*/mask_token) of a model's state dict."""
    return {k: v for k, v in model.state_dict().items() if not (k.startswith("decoder") or k == "mask_token")}

