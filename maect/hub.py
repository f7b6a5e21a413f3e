"""Checkpoints in and out.

Format (official MAE's): {'model': state_dict, 'optimizer': ..., 'epoch': ..., 'scaler': ..., 'args': ...} plus
maect's entries ('stage', 'head', 'model_ema', 'step', 'rng', 'version'). Writes are atomic: a temporary file in
the same directory, fsync, then rename, so a crash or kill never leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import argparse
import os

import torch

from maect.config import ModelCfg, from_dict
from maect.models.vit import MaskedAutoencoderViT, build_model

# heads per width for weights that do not record their config (official MAE / timm sizes)
HEADS_BY_DIM = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}


def save_checkpoint(obj: dict, path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(d, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load_checkpoint(path: str) -> dict:
    """torch.load(weights_only=True): no code from the file runs. argparse.Namespace (official MAE 'args') is
    allowed as data. A missing or unreadable file is an error naming the path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint {path!r} cannot be read (truncated or not a torch checkpoint?): {exc}") from exc


def model_from_cfg(m: ModelCfg, decoder: bool) -> MaskedAutoencoderViT:
    kw = dict(img_size=m.img_size, patch_size=m.patch_size or None, in_chans=m.in_chans,
              embed_dim=m.embed_dim or None, depth=m.depth or None, num_heads=m.num_heads or None,
              decoder_embed_dim=m.decoder_embed_dim, decoder_depth=m.decoder_depth,
              decoder_num_heads=m.decoder_num_heads, decoder=decoder)
    return build_model(m.arch, **kw)


def infer_model_cfg(sd: dict) -> ModelCfg:
    """Encoder size from the weights (official MAE / timm names)."""
    w = sd["patch_embed.proj.weight"]                  # [D, C, p, p]
    D, C, p = w.shape[0], w.shape[1], w.shape[2]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    n_tok = sd["pos_embed"].shape[1] if "pos_embed" in sd else None
    L = n_tok - 1 if n_tok is not None else (224 // p) ** 2
    img = int(round(L ** 0.5)) * p
    if D not in HEADS_BY_DIM:
        raise ValueError(f"cannot infer the number of heads for width {D}; load through a maect checkpoint with its config")
    dec_depth = (1 + max(int(k.split(".")[1]) for k in sd if k.startswith("decoder_blocks."))
                 if any(k.startswith("decoder_blocks.") for k in sd) else 0)
    dec_dim = sd["decoder_embed.weight"].shape[0] if "decoder_embed.weight" in sd else 512
    return ModelCfg(arch="custom", img_size=img, patch_size=p, in_chans=C, embed_dim=D, depth=depth,
                    num_heads=HEADS_BY_DIM[D], decoder_embed_dim=dec_dim, decoder_depth=dec_depth,
                    decoder_num_heads=16, pool="cls")


def load_encoder(src, use_ema: bool = False) -> tuple[MaskedAutoencoderViT, dict]:
    """An encoder (no decoder), eval mode, from a path or a loaded checkpoint / state dict.
    Returns (model, info) with info: pool, img_size, in_chans, data (name/root when recorded), missing, unexpected."""
    ckpt = load_checkpoint(src) if isinstance(src, str) else src
    cfg = None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("args"), dict) and "model" in ckpt["args"]:
        cfg = from_dict(ckpt["args"])
    sd = ckpt.get("model_ema") if use_ema and "model_ema" in ckpt else ckpt.get("model", ckpt)
    if not isinstance(sd, dict) or "patch_embed.proj.weight" not in sd:
        raise ValueError("no ViT encoder weights found (expected 'patch_embed.proj.weight' in the state dict)")
    mcfg = cfg.model if cfg is not None else infer_model_cfg(sd)
    model = model_from_cfg(mcfg, decoder=False)
    enc = {k: v for k, v in sd.items() if not (k.startswith("decoder") or k == "mask_token")}
    missing, unexpected = model.load_state_dict(enc, strict=False)
    if missing:
        raise ValueError(f"checkpoint lacks encoder weights: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    model.eval()
    info = {"pool": mcfg.pool, "img_size": mcfg.img_size, "in_chans": mcfg.in_chans, "model_cfg": mcfg,
            "data": {"name": cfg.data.name, "root": cfg.data.root} if cfg is not None else None,
            "missing": list(missing), "unexpected": list(unexpected), "config": cfg}
    return model, info

