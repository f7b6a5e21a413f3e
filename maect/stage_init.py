"""A stage's starting point for stages 2 and 3: the init checkpoint's encoder (an MAE, official MAE / timm or maect
head checkpoint, through maect.hub), its NNCLR head and queue when it has them, and the checks that the checkpoint
agrees with the run's config before any step."""
from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn as nn

from maect import config as C
from maect import hub
from maect.heads import FeatureQueue, NNCLRHead, queue_dtype
from maect.validation import check_tuned_from_block

log = logging.getLogger("maect")


def load_for_nnclr(cfg: C.Config, di, init: str):
    """Encoder (+ head and queue when the checkpoint has them) for stages 2/3."""
    if not init:
        raise C.ConfigError("stage head/ct needs init=CHECKPOINT (an MAE, official MAE/timm or head checkpoint)")
    try:
        ck = {} if hub.is_safetensors(init) else hub.load_checkpoint(init)      # a safetensors export has no head
        encoder, info = hub.load_encoder(init if hub.is_safetensors(init) else ck, path=init)
    except ValueError as exc:      # truncated / not a checkpoint / weights of another layout: one line
        from maect.checkpoint import one_line
        raise C.ConfigError(f"init={init}: {one_line(str(exc)).replace('<in-memory checkpoint>: ', '')}") from None
    if info["config"] is None:
        log.info(f"[init] {init}: encoder inferred from weights ({info['model_cfg'].embed_dim}d x {info['model_cfg'].depth})")
    encoder = match_size(cfg, encoder, info, init)
    n = cfg.nnclr
    head = NNCLRHead(encoder.embed_dim, n.proj_hidden, n.proj_dim, n.pred_hidden)
    queue = FeatureQueue(n.queue_size, n.proj_dim, generator=torch.Generator().manual_seed(cfg.seed),
                         dtype=queue_dtype(n.queue_dtype, di.device))
    if "head" in ck:
        load_head(head, ck["head"])
        if "queue" in ck and ck["queue"]["features"].shape == queue.features.shape:
            queue.load_state_dict(ck["queue"])
    return encoder.to(di.device), head.to(di.device), queue.to(di.device)


SIZE_KEYS = ("patch_size", "embed_dim", "depth", "num_heads")     # ARCHS' order after img_size


def shape_mismatch(sd: dict, want: dict) -> str | None:
    """The first tensor of state dict sd whose shape differs from the same name's in want, as 'name: file
    [shape] vs model [shape]'; None when every shared name agrees."""
    for k, v in sd.items():
        if k in want and tuple(v.shape) != tuple(want[k].shape):
            return f"{k}: file {list(v.shape)} vs model {list(want[k].shape)}"
    return None


def match_size(cfg: C.Config, encoder: nn.Module, info: dict, init: str) -> nn.Module:
    """The init checkpoint's encoder against the size the config describes (model.arch's sizes, a non-zero
    model.patch_size / embed_dim / depth / num_heads overriding them), before any step: the stage's checkpoints
    record the config, and maect.eval, maect.hub and the next stage rebuild the encoder from it. A size the config
    leaves open (model.arch=custom with the key 0) is taken from the encoder. num_heads shapes no weight: where
    the file does not record it (official / timm weights without a config, heads guessed from the width), the
    config's count is used. ConfigError naming the key and both values otherwise."""
    from maect.models.vit import ARCHS
    m = cfg.model
    base = ARCHS.get(m.arch)
    have = {"patch_size": encoder.patch_embed.patch_size, "embed_dim": encoder.embed_dim, "depth": encoder.depth,
            "num_heads": encoder.num_heads}
    for i, k in enumerate(SIZE_KEYS):
        want = getattr(m, k) or (base[i + 1] if base else 0)
        if not want:                                     # custom, key left 0: the encoder's
            setattr(m, k, have[k])
        elif want != have[k]:
            if k == "num_heads" and info.get("config") is None and have["embed_dim"] % want == 0:
                sized = hub.model_from_cfg(dataclasses.replace(info["model_cfg"], num_heads=want), decoder=False)
                sized.load_state_dict(encoder.state_dict())
                log.info(f"[init] {init}: {want} attention heads (model.num_heads; the file does not record them)")
                encoder = sized.eval()
                continue
            src = f"model.{k}={want}" if getattr(m, k) else f"model.arch={m.arch} ({k} {want})"
            shape = "x".join(str(have[j]) for j in ("embed_dim", "depth", "num_heads"))
            raise C.ConfigError(f"{src}, but the encoder of init={init} has {k}={have[k]} (width x depth x heads "
                                f"{shape}, patch {have['patch_size']}): set model.{k}={have[k]}, or the preset "
                                f"that encoder was trained with")
    return encoder


def load_head(head: NNCLRHead, sd: dict) -> None:
    extra = sorted(set(sd) - set(head.state_dict()) - {k for k in sd if k.startswith("target_projector.")})
    if extra:   # e.g. predictor.3.bias: heads written before the predictor lost its bias (the published layout)
        raise C.ConfigError(f"the checkpoint's NNCLR head has parameters this head does not ({', '.join(extra)}): it "
                            f"was written by an older maect; re-run stage 2 (stage=head) from its MAE checkpoint")
    if head.target_projector is None and any(k.startswith("target_projector.") for k in sd):
        head.add_target()
    head.load_state_dict(sd)


def check_encoder(cfg: C.Config, encoder: nn.Module, init: str) -> None:
    """The init checkpoint's encoder against the keys that must agree with it, before any step: the loaders make
    model.img_size / model.in_chans images, and ct.tuned_from_block names one of its blocks (checked already in
    the head stage of a ct_pipeline, whose encoder is the same)."""
    pe = encoder.patch_embed
    for key, want, have in (("model.img_size", cfg.model.img_size, pe.img_size),
                            ("model.in_chans", cfg.model.in_chans, encoder.in_chans)):
        if want != have:
            raise C.ConfigError(f"{key}={want}, but the encoder of init={init} takes {have} (set {key}={have})")
    if "ct" in C.stages(cfg):
        check_tuned_from_block(cfg.ct.tuned_from_block, encoder.depth, f"init={init}")
