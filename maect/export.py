"""python -m maect.export --ckpt PATH --format timm|mae|safetensors --out OUT [--ema] [--pool cls|mean]

Writes the encoder of any checkpoint maect.hub.load_encoder reads (maect, official MAE pretrain / fine-tune, timm),
the EMA encoder with --ema when the checkpoint has one, under timm / official MAE names:
  timm: a flat state dict; timm.create_model(<timm_model>, **<timm_kwargs>).load_state_dict(sd, strict=True) then
        model.forward_head(model.forward_features(x), pre_logits=True) (= model(x), num_classes=0) gives our
        pool(forward_features(x), pool) up to fp32 rounding.
  mae:  {'model': state_dict}, the layout of the official encoder-only mae_pretrain_vit_*.pth files (official
        main_finetune / main_linprobe read it with strict=False and report head.* / fc_norm.* missing).
and a JSON beside OUT (OUT with its extension replaced by .json) with the sizes, pooling and timm call.
  safetensors: OUT is a folder; it gets model.safetensors (the timm state dict, tensors only: loading it runs no
        code) and config.json in timm's local-folder / model-hub layout (architecture, num_classes, global_pool,
        model_args, pretrained_cfg; timm's save_for_hf writes the same fields), plus a "maect" entry with the
        JSON above. timm.create_model('local-dir:OUT', pretrained=True) rebuilds the encoder from config.json and
        loads the weights with strict=True; the file's header carries the same config (metadata 'config').

timm kwargs: num_classes=0 (no head.* keys) and
  pool 'cls':  global_pool='token'                -> final norm on all tokens, then the cls token;
  pool 'mean': global_pool='avg', fc_norm=False   -> final norm on all tokens, then the mean of the patch tokens.
timm's default for global_pool='avg' is fc_norm=True, which drops `norm` and normalises after pooling (LN(mean),
the official MAE global-pool fine-tune head): different features and a state dict with fc_norm.* instead of norm.*.
The cls row of pos_embed is zero (a nonzero one was folded into cls_token on load), so timm, which adds
pos_embed[:, 0] to the cls token, gets the same input.
"""
from __future__ import annotations

import argparse
import os
import sys

from maect import hub
from maect.atomic import atomic_write, write_json

# timm model name -> (img_size, patch_size, embed_dim, depth, num_heads); the names our sizes start from
TIMM_MODELS = {
    "vit_small_patch16_224": (224, 16, 384, 12, 6),
    "vit_base_patch16_224": (224, 16, 768, 12, 12),
    "vit_large_patch16_224": (224, 16, 1024, 24, 16),
    "vit_huge_patch14_224": (224, 14, 1280, 32, 16),   # H/16: this name with patch_size=16
}
SIZE_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads")
FORMATS = ("timm", "mae", "safetensors")


def timm_spec(sizes: dict, in_chans: int, pool: str) -> tuple[str, dict]:
    """(timm model name, create_model kwargs) for an encoder of these sizes whose features are pool(...).
    The name whose width/depth/heads match (else ViT-B/16); sizes that differ from the name's become kwargs."""
    if pool not in ("cls", "mean"):
        raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
    want = tuple(sizes[k] for k in SIZE_KEYS)
    name = next((n for n, v in TIMM_MODELS.items() if v[2:] == want[2:]), "vit_base_patch16_224")
    kw = {k: w for k, w, b in zip(SIZE_KEYS, want, TIMM_MODELS[name]) if w != b}
    if in_chans != 3:
        kw["in_chans"] = in_chans
    kw.update(num_classes=0, global_pool="token" if pool == "cls" else "avg")
    if pool == "mean":
        kw["fc_norm"] = False
    return name, kw


def timm_config(name: str, kw: dict, sizes: dict, in_chans: int, data: dict | None, meta: dict) -> dict:
    """config.json of timm's local-folder / model-hub layout (the fields timm's save_config_for_hf writes and
    _parse_model_cfg reads). model_args rebuild our encoder (num_classes=0, pooling); pretrained_cfg states the
    preprocessing of maect's evaluation: the data set's mean/std, Fashion-MNIST arrays resized whole (crop_pct 1),
    image files resized to S/0.875 (bicubic) and centre-cropped."""
    from maect.dataloading.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD, IMAGENET_MEAN, IMAGENET_STD
    fmnist = (data or {}).get("name") == "fashion_mnist"
    mean, std = (FASHION_MNIST_MEAN, FASHION_MNIST_STD) if fmnist else (IMAGENET_MEAN, IMAGENET_STD)
    if len(mean) != in_chans:   # grey statistics repeated for a 3-channel model (as the loader does)
        mean, std = mean * (in_chans // len(mean)), std * (in_chans // len(std))
    S = sizes["img_size"]
    return {"architecture": name, "num_classes": 0, "num_features": sizes["embed_dim"],
            "global_pool": kw["global_pool"], "model_args": kw,
            "pretrained_cfg": {"tag": "maect", "custom_load": False, "input_size": [in_chans, S, S],
                               "fixed_input_size": True, "interpolation": "bicubic",
                               "crop_pct": 1.0 if fmnist else 0.875, "crop_mode": "center",
                               "mean": list(mean), "std": list(std), "num_classes": 0, "pool_size": None,
                               "first_conv": "patch_embed.proj", "classifier": "head"},
            "maect": meta}


def write_safetensors(sd: dict, folder: str, config: dict) -> None:
    """folder/model.safetensors (header metadata: format 'pt', config) and folder/config.json, each atomically."""
    import json

    from safetensors.torch import save   # imported here: only this format needs it
    blob = save(sd, metadata={"format": "pt", "config": json.dumps(config)})
    atomic_write(os.path.join(folder, hub.SAFE_WEIGHTS), lambda f: f.write(blob), binary=True)
    write_json(os.path.join(folder, "config.json"), config)


def export(ckpt: str, fmt: str, out: str, ema: bool = False, pool: str | None = None) -> dict:
    """Write the encoder (+ JSON) and return the JSON's content."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    meta_path = os.path.splitext(out)[0] + ".json"
    if fmt == "safetensors" and os.path.isfile(out):
        raise ValueError(f"--out {out!r} is a file; --format safetensors writes a folder (model.safetensors + config.json)")
    if fmt != "safetensors" and os.path.abspath(meta_path) == os.path.abspath(out):
        raise ValueError(f"--out {out!r} would be overwritten by its own JSON; use a .pth name")
    model, info = hub.load_encoder(ckpt, use_ema=ema)
    pool = pool or info["pool"]
    sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    sizes = dict(img_size=model.patch_embed.img_size, patch_size=model.patch_embed.patch_size,
                 embed_dim=model.embed_dim, depth=model.depth, num_heads=model.num_heads)
    name, kw = timm_spec(sizes, model.in_chans, pool)
    meta = {"arch": hub.arch_name(*(sizes[k] for k in SIZE_KEYS)), **sizes, "in_chans": model.in_chans,
            "pool": pool, "format": fmt, "ema": info["ema"],
            "source": os.path.abspath(ckpt), "source_format": info["format"],
            "timm_model": name, "timm_kwargs": kw,
            "timm_usage": f"timm.create_model({name!r}, pretrained=False, "
                          + ", ".join(f"{k}={v!r}" for k, v in kw.items()) + ")"
                          + (".load_state_dict(torch.load(OUT), strict=True)" if fmt == "timm"
                             else ".load_state_dict(torch.load(OUT)['model'], strict=True)"),
            "notes": info["notes"]}
    if fmt == "safetensors":   # a folder meant for sharing: no local absolute paths in it
        meta["source"] = os.path.basename(ckpt)
        meta["timm_usage"] = "timm.create_model('local-dir:<this folder>', pretrained=True)"
        write_safetensors(sd, out, timm_config(name, kw, sizes, model.in_chans, info["data"], meta))
        return meta
    hub.save_checkpoint(sd if fmt == "timm" else {"model": sd}, out)
    write_json(meta_path, meta)
    return meta


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m maect.export", description=__doc__.split("\n\n")[1])
    p.add_argument("--ckpt", required=True, help="maect, official MAE (pretrain / fine-tune) or timm checkpoint")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="output .pth (the JSON goes beside it); for safetensors a folder")
    p.add_argument("--ema", action="store_true", help="the checkpoint's EMA encoder (under model_ema, state_dict_ema, "
                   "ema, ...: maect.hub.EMA_WRAPPERS) when present")
    p.add_argument("--pool", default=None, choices=("cls", "mean"), help="default: the checkpoint's pooling")
    a = p.parse_args(argv)
    try:
        meta = export(a.ckpt, a.format, a.out, a.ema, a.pool)
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    if a.ema and not meta["ema"]:
        print(f"warning: {a.ckpt} has no EMA encoder (nothing under "
              f"{'/'.join(hub.EMA_WRAPPERS)}); exported the online encoder", file=sys.stderr)
    for n in meta["notes"]:
        print(f"  - {n}")
    wrote = (f"{os.path.join(a.out, hub.SAFE_WEIGHTS)} and {os.path.join(a.out, 'config.json')}" if a.format == "safetensors"
             else f"{a.out} and {os.path.splitext(a.out)[0]}.json")
    print(f"wrote {wrote}\n  load with: {meta['timm_usage']}")


if __name__ == "__main__":
    main()
