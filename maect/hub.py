"""Checkpoints in and out.

Format (official MAE's): {'model': state_dict, 'optimizer': ..., 'epoch': ..., 'scaler': ..., 'args': ...} plus
maect's entries ('stage', 'head', 'model_ema', 'step', 'rng', 'version'). Writes are atomic: a temporary file in
the same directory, fsync, then rename, so a crash or kill never leaves a half-written checkpoint behind.

`load_encoder` reads, besides maect's own checkpoints, every layout that holds a ViT under the official MAE / timm
parameter names (all offline, nothing is downloaded):
  - official MAE pretrain   {'model': encoder + decoder_* + mask_token, 'optimizer', 'epoch', 'args': Namespace}
  - official MAE fine-tune  {'model': encoder + head.* (+ fc_norm.* instead of norm.* when global_pool=True)}
  - timm VisionTransformer  a flat state dict (+ head.*; fc_norm.* for global_pool='avg' models)
  - encoder-only            mae_pretrain_vit_*.pth, maect.export outputs
  - safetensors             a `.safetensors` file, or a folder holding `model.safetensors` + `config.json` in timm's
                            local-folder / model-hub layout (`python -m maect.export --format safetensors`, or a
                            timm model folder); the width's number of heads and the pooling come from config.json
                            (`model_args.num_heads`, `global_pool`: 'token' -> cls, 'avg' -> mean), or from the
                            file's own header metadata ('config', the same JSON) for a bare file
wrapped in any nesting of containers ('model', 'state_dict', 'model_ema', ...) and key prefixes ('module.' from DDP
and EMA wrappers, '_orig_mod.' from torch.compile, 'model.', 'encoder.'), in any order (find_state_dict).

Mappings (each reported in info['notes']):
  - pos_embed[:, 0] nonzero (one official H/14 release; timm's learned pos_embed): folded into the cls token,
    cls_token += pos_embed[:, :1], and the row zeroed. Exact: both layouts feed the blocks cls_token + pos_embed[:, 0]
    (our prepend_cls adds the now-zero row), and fp32 addition of the same two numbers gives the same bits.
  - pos_embed without a cls row (timm no_embed_class): a zero row is prepended (the cls token had no position).
  - learned patch rows of pos_embed load as they are (our pos_embed is frozen, not recomputed).
  - fc_norm without norm (global-pool fine-tunes / timm 'avg' models): fc_norm is loaded as `norm` and pool='mean'.
    Approximate: the fine-tuned model computes LN(mean_patches(x)), ours mean_patches(LN(x)) with the same affine.
    A fresh identity norm would also differ, and fc_norm's gamma/beta are the trained statistics of that feature.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from maect.atomic import atomic_write
from maect.config import ModelCfg, from_dict
from maect.models.vit import ARCHS, MaskedAutoencoderViT, build_model, sincos_pos_embed_2d

# heads per width for weights that do not record their config (official MAE / timm sizes)
HEADS_BY_DIM = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
# Containers (dict keys) and key-prefix parts that wrap a ViT state dict, stripped in any order and nesting: DDP and
# timm/torch EMA wrappers ('module'), torch.compile ('_orig_mod'), training frameworks' 'model' / 'encoder' / 'net'
# attributes, checkpoint dicts ('model', 'state_dict', ...). EMA_WRAPPERS name an EMA copy (timm ModelEmaV2/V3 and
# DeiT 'model_ema', timm's train script 'state_dict_ema', ...): taken with use_ema, else the online weights.
WRAPPERS = ("module", "_orig_mod", "model", "state_dict", "model_state_dict", "encoder", "net")
EMA_WRAPPERS = ("model_ema", "ema", "state_dict_ema", "ema_state_dict", "ema_model", "module_ema")
ANCHOR = "patch_embed.proj.weight"                 # the key every ViT state dict has
MAX_NEST = 6                                       # nested containers searched
VIT_PARTS = {"patch_embed", "blocks", "cls_token", "pos_embed", "norm", "fc_norm", "head", "mask_token",
             "decoder_embed", "decoder_blocks", "decoder_norm", "decoder_pred", "decoder_pos_embed"}
CLASSIFIER = ("head.", "pre_logits.", "head_dist.")  # after the pooled feature: never part of the encoder
SAFE_WEIGHTS = "model.safetensors"                 # the weights file of timm's local-folder / model-hub layout
TIMM_POOL = {"token": "cls", "avg": "mean"}        # timm global_pool -> our pooling


def save_checkpoint(obj: dict, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


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


def is_safetensors(src) -> bool:
    """A path load_encoder reads with safetensors: a folder (model.safetensors + config.json) or a .safetensors file."""
    return isinstance(src, str) and (os.path.isdir(src) or src.endswith(".safetensors"))


def load_safetensors(path: str) -> tuple[dict, dict | None]:
    """(flat state dict on the CPU, timm config dict or None) from a folder holding model.safetensors (+ its
    config.json) or from a .safetensors file (config: the header's 'config' metadata, which maect.export writes,
    else a config.json beside the file). safetensors holds tensors only: nothing in the file runs. A missing or
    unreadable file is an error naming the path."""
    from safetensors import safe_open   # imported here: only this reader needs it
    folder = os.path.isdir(path)
    file = os.path.join(path, SAFE_WEIGHTS) if folder else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file!r} does not exist" + (" (a weights folder holds model.safetensors and "
                                                             "config.json, as maect.export and timm write it)" if folder else ""))
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
            header = f.metadata() or {}
    except Exception as exc:
        raise ValueError(f"{file!r} cannot be read as safetensors (truncated or another format?): {exc}") from exc
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(file)), "config.json")
    try:
        if not folder and "config" in header:
            return sd, json.loads(header["config"])
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                return sd, json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the config of {file!r} is not valid JSON: {exc}") from exc
    return sd, None


def timm_hints(config: dict | None) -> tuple[int | None, str | None]:
    """(num_heads, pool) a timm config.json records: model_args.num_heads, global_pool ('token' -> 'cls',
    'avg' -> 'mean'; top level or model_args). None where it says nothing (a registry model's defaults)."""
    if not config:
        return None, None
    args = config.get("model_args") or {}
    return args.get("num_heads"), TIMM_POOL.get(args.get("global_pool", config.get("global_pool")))


def model_from_cfg(m: ModelCfg, decoder: bool) -> MaskedAutoencoderViT:
    kw = dict(img_size=m.img_size, patch_size=m.patch_size or None, in_chans=m.in_chans,
              embed_dim=m.embed_dim or None, depth=m.depth or None, num_heads=m.num_heads or None,
              decoder_embed_dim=m.decoder_embed_dim, decoder_depth=m.decoder_depth,
              decoder_num_heads=m.decoder_num_heads, decoder=decoder)
    return build_model(m.arch, **kw)


def arch_name(img: int, p: int, D: int, depth: int, heads: int) -> str:
    """The ARCHS name with these sizes (decoder aside), else 'custom'."""
    return next((a for a, v in ARCHS.items() if v[:5] == (img, p, D, depth, heads)), "custom")


def infer_model_cfg(sd: dict, num_heads: int | None = None) -> ModelCfg:
    """Encoder size from the weights (official MAE / timm names): patch, in_chans and width from the patch
    embedding [D, C, p, p], depth from blocks.N, image size from pos_embed's length (1 + L or, without a cls row,
    L tokens), heads from num_heads when given (a timm config.json records it), else from the width (HEADS_BY_DIM)."""
    w = sd["patch_embed.proj.weight"]
    D, C, p = w.shape[0], w.shape[1], w.shape[2]
    depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    if depth == 0:
        raise ValueError("no transformer blocks (blocks.N.*) in the state dict")
    n_tok = sd["pos_embed"].shape[1] if "pos_embed" in sd else None
    L = (224 // p) ** 2 if n_tok is None else n_tok if _is_square(n_tok) else n_tok - 1
    img = int(round(L ** 0.5)) * p
    heads = num_heads or HEADS_BY_DIM.get(D)
    if heads is None:
        raise ValueError(f"cannot infer the number of heads for width {D} (known widths: {sorted(HEADS_BY_DIM)}); "
                         f"load through a maect checkpoint with its config")
    if D % heads:
        raise ValueError(f"width {D} is not divisible by num_heads={heads}")
    hidden = sd["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in sd else 4 * D
    if hidden != 4 * D:
        raise ValueError(f"MLP hidden width {hidden} is not 4 x {D}: only MLP ratio 4 ViTs are supported")
    dec_depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("decoder_blocks.")), default=-1)
    dec_dim = sd["decoder_embed.weight"].shape[0] if "decoder_embed.weight" in sd else 512
    return ModelCfg(arch=arch_name(img, p, D, depth, heads), img_size=img, patch_size=p, in_chans=C,
                    embed_dim=D, depth=depth, num_heads=heads, decoder_embed_dim=dec_dim,
                    decoder_depth=dec_depth, decoder_num_heads=16, pool="cls")


def _is_square(n: int) -> bool:
    return int(round(n ** 0.5)) ** 2 == n


def find_state_dict(ckpt, use_ema: bool = False) -> tuple[dict, list[str], bool]:
    """The ViT state dict inside a checkpoint, with every wrapper removed: the dict (at any depth of nested
    containers) holding a key that ends in 'patch_embed.proj.weight', whose path (container keys, then the key's own
    dotted prefix) consists only of WRAPPERS / EMA_WRAPPERS names, in any order and nesting. Examples:
    {'state_dict': {'module._orig_mod.blocks...'}} (DDP + torch.compile under 'state_dict'),
    {'model': {'_orig_mod.module.blocks...'}} (torch.compile(DDP(model))), {'model_ema': {'module.blocks...'}}
    (timm ModelEmaV2/V3), {'module.blocks...', 'n_averaged': ...} (torch.optim.swa_utils.AveragedModel).
    With use_ema the encoder under an EMA name is taken when there is one; without it the online one (an EMA encoder
    alone is taken, with a note). Returns (state_dict, notes, whether the EMA encoder was taken). ValueError when no
    encoder is found (the message lists the checkpoint's top-level keys and the key prefixes it holds) or when two
    different encoders qualify equally (e.g. 'model.' and 'encoder.' holding other weights)."""
    if not isinstance(ckpt, dict):
        raise ValueError(f"expected a checkpoint dict, got {type(ckpt).__name__}")
    found = list(_anchors(ckpt, ()))
    usable = [c for c in found if all(s in WRAPPERS or s in EMA_WRAPPERS for s in c[0])]
    if not usable:
        raise ValueError(_no_encoder_message(ckpt, found))
    online = [c for c in usable if not any(s in EMA_WRAPPERS for s in c[0])]
    emas = [c for c in usable if any(s in EMA_WRAPPERS for s in c[0])]
    notes, ema = [], False
    if use_ema and emas:
        pick, ema = emas, True
    elif use_ema:
        pick = online
        notes.append(f"EMA encoder requested but the checkpoint has none (no {'/'.join(EMA_WRAPPERS)} container or "
                     f"prefix): the online encoder is loaded")
    elif online:
        pick = online
    else:
        pick, ema = emas, True
        notes.append("the checkpoint holds only an EMA encoder: it is loaded")
    sds = [(path, _strip(d, kp), d) for path, d, kp in pick]
    sds = [x for i, x in enumerate(sds) if not any(_same(x[1], y[1]) for y in sds[:i])]   # one copy per distinct set
    if len(sds) > 1:
        raise ValueError(f"several different ViT encoders in this checkpoint, under {[_dotted(x[0]) for x in sds]}: "
                         f"load the one you mean (e.g. torch.load(PATH)[KEY]) and pass it as a state dict")
    path, sd, holder = sds[0]
    if "n_averaged" in holder and path[-1:] == ("module",):
        notes.append("torch.optim.swa_utils.AveragedModel weights: its 'n_averaged' counter left out")
    if path:
        notes.append(f"'{_dotted(path)}' key prefix removed (containers / wrappers: {', '.join(path)})")
    if ema:
        notes.append(f"EMA encoder ('{_dotted(path).rstrip('.')}') loaded")
    return sd, notes, ema


def _anchors(d: dict, cpath: tuple, depth: int = 0):
    """(path segments, dict, in-key prefix) for every 'patch_embed.proj.weight' tensor key in d or its nested dicts;
    path = the container keys, then the key prefix's dotted parts."""
    for k, v in d.items():
        if isinstance(v, torch.Tensor) and isinstance(k, str) and (k == ANCHOR or k.endswith("." + ANCHOR)):
            kp = k[:-len(ANCHOR)]
            yield cpath + tuple(kp.split(".")[:-1]), d, kp
        elif isinstance(v, dict) and depth < MAX_NEST:
            yield from _anchors(v, cpath + tuple(str(k).split(".")), depth + 1)


def _strip(d: dict, kp: str) -> dict:
    """The tensors of d under key prefix kp, without it (AveragedModel's 'n_averaged' beside 'module.' drops out)."""
    return {k[len(kp):]: v for k, v in d.items()
            if isinstance(k, str) and k.startswith(kp) and isinstance(v, torch.Tensor)}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] is b[k] or (a[k].shape == b[k].shape and torch.equal(a[k], b[k]))
                                        for k in a)


def _dotted(path) -> str:
    return "".join(f"{s}." for s in path)


def _no_encoder_message(ckpt: dict, found: list) -> str:
    """The refusal: what was expected, the top-level keys, the key prefixes the tensors sit under (up to the first
    ViT part name, so wrappers show), and where a patch embedding sits under names that are not known wrappers."""
    seen: dict[str, int] = {}

    def walk(d, cpath, depth):
        for k, v in d.items():
            if isinstance(v, dict) and depth < MAX_NEST:
                walk(v, cpath + tuple(str(k).split(".")), depth + 1)
            elif isinstance(v, torch.Tensor) and isinstance(k, str):
                parts = k.split(".")
                i = next((j for j, s in enumerate(parts) if s in VIT_PARTS), min(1, len(parts) - 1))
                pre = _dotted(cpath + tuple(parts[:i]))
                seen[pre] = seen.get(pre, 0) + 1
    walk(ckpt, (), 0)
    top = [k for k in ckpt][:12]
    pres = ", ".join(f"'{p}' ({n})" for p, n in list(seen.items())[:12]) + (" ..." if len(seen) > 12 else "")
    msg = (f"no ViT encoder weights found (expected 'patch_embed.proj.weight' at the top level or under containers / "
           f"key prefixes named {'/'.join(WRAPPERS + EMA_WRAPPERS)}, nested in any order); top-level keys: {top}; "
           f"tensor key prefixes seen (tensor counts): {pres or 'none'}")
    odd = sorted({_dotted(p) for p, _, _ in found})
    if odd:
        msg += (f"; a patch embedding sits under {odd}, whose names are not known wrappers: load that sub-dict "
                f"yourself and pass it as a state dict")
    return msg


def _group(keys) -> str:
    """['blocks.0.a', 'blocks.1.a', 'norm.w'] -> 'blocks.*.a, norm.w' (short lists for messages)."""
    out = []
    for k in keys:
        parts = k.split(".")
        g = ".".join("*" if s.isdigit() else s for s in parts)
        if g not in out:
            out.append(g)
    return ", ".join(out[:12]) + (" ..." if len(out) > 12 else "")


def convert_state_dict(sd: dict, model_keys, strict: bool = True) -> tuple[dict, dict]:
    """Map a ViT state dict onto our encoder's keys (the module docstring lists the mappings).

    Returns (encoder_state_dict with exactly model_keys, report) where report has kind ('mae_pretrain' |
    'finetune' | 'encoder'), missing (our keys absent from the file), unexpected (file keys not loaded), notes
    (sentences) and pool_hint ('mean' for fc_norm models, 'cls' for classifier checkpoints, None otherwise).
    Raises ValueError when an encoder weight is missing, or (strict) when the file holds weights the encoder has
    no place for."""
    model_keys = list(model_keys)
    notes, pool_hint = [], None
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    dec = [k for k in sd if k.startswith("decoder") or k == "mask_token"]
    head = [k for k in sd if k.startswith(CLASSIFIER)]
    fc = [k for k in sd if k.startswith("fc_norm.")]
    kind = "mae_pretrain" if dec else "finetune" if head or fc else "encoder"
    if dec:
        notes.append(f"decoder ({len(dec)} tensors: decoder_*, mask_token) dropped: expected for an MAE pretrain "
                     f"checkpoint")
    else:
        what = {"finetune": "fine-tune / classifier checkpoint", "encoder": "encoder-only checkpoint"}[kind]
        notes.append(f"no decoder ({what}): expected")
    if head:
        notes.append(f"classifier head ({_group(head)}) ignored: expected (features are taken before it)")
        pool_hint = "cls"
    out = {k: v for k, v in sd.items() if k in model_keys}
    # fc_norm: the global-pool fine-tune's only final norm (applied after pooling); see the module docstring
    if fc and not any(k.startswith("norm.") for k in sd):
        for k in fc:
            if k.replace("fc_", "", 1) in model_keys:
                out[k.replace("fc_", "", 1)] = sd[k]
        notes.append("fc_norm loaded as norm and pool='mean' (global-pool fine-tune: it computed LN(mean(x)), "
                     "this encoder computes mean(LN(x)) with the same gamma/beta: close, not identical)")
        pool_hint = "mean"
    elif fc:
        notes.append("fc_norm ignored: the checkpoint also has the token norm 'norm', which is loaded")
    if "pos_embed" in out:
        out["pos_embed"], pos_notes = _fix_pos_embed(out)
        notes += pos_notes
    missing = [k for k in model_keys if k not in sd]
    absent = [k for k in model_keys if k not in out]
    if absent:
        raise ValueError(f"checkpoint lacks encoder weights: {_group(absent)} ({len(absent)} tensors)")
    unexpected = [k for k in sd if k not in model_keys]
    unknown = [k for k in unexpected if k not in dec and k not in head and k not in fc]
    if unknown:
        msg = (f"weights this encoder has no place for (a ViT variant it does not implement: layer scale, "
               f"qk-norm, register tokens, pre-norm, ...?): {_group(unknown)} ({len(unknown)} tensors)")
        if strict:
            raise ValueError(msg + "; pass strict=False to ignore them")
        notes.append(msg + ": ignored (strict=False)")
    return out, {"kind": kind, "missing": missing, "unexpected": unexpected, "notes": notes, "pool_hint": pool_hint}


def _fix_pos_embed(out: dict) -> tuple[torch.Tensor, list[str]]:
    """pos_embed -> [1, 1 + L, D] with a zero cls row (cls position folded into cls_token, which `out` gets)."""
    pe, notes = out["pos_embed"].float(), []
    if _is_square(pe.shape[1]):       # timm no_embed_class: only the L patch rows, cls had no position
        pe = torch.cat([pe.new_zeros(1, 1, pe.shape[2]), pe], dim=1)
        notes.append("pos_embed has no cls row (no_embed_class layout): a zero row prepended (exact)")
    if torch.any(pe[:, 0] != 0) and "cls_token" in out:
        out["cls_token"] = out["cls_token"].float() + pe[:, :1]
        pe = pe.clone()
        pe[:, 0] = 0
        notes.append("pos_embed[:, 0] (cls position) is nonzero: folded into cls_token (cls_token += pos_embed[:, 0], "
                     "row zeroed; exact, the cls token entering the blocks is the same sum)")
    grid = int(round((pe.shape[1] - 1) ** 0.5))
    ref = torch.from_numpy(sincos_pos_embed_2d(pe.shape[2], grid))[1:] if pe.shape[2] % 4 == 0 else None
    if ref is None or not torch.allclose(pe[0, 1:], ref, atol=1e-5):
        notes.append("pos_embed patch rows are not the fixed sin-cos (learned, e.g. timm or a fine-tune): "
                     "loaded as they are")
    return pe, notes


def load_encoder(src, use_ema: bool = False, strict: bool = True) -> tuple[MaskedAutoencoderViT, dict]:
    """An encoder (no decoder), eval mode, from a path (.pth checkpoint, .safetensors file, or a folder with
    model.safetensors + config.json) or a loaded checkpoint / state dict in any layout of the module docstring. Returns (model, info) with info: pool, img_size, in_chans, model_cfg, data (name/root when
    recorded), config (maect Config or None), ema (the EMA encoder was loaded), format (maect | mae_pretrain |
    finetune | encoder), missing (our encoder keys absent from the file, e.g. norm.* for fc_norm fine-tunes),
    unexpected (file keys not loaded: decoder, head, ...), notes (each mapping and skipped group in words), source.
    strict=False ignores weights the encoder has no place for (reported in notes) instead of raising."""
    name = src if isinstance(src, str) else "<in-memory checkpoint>"
    heads = tpool = None
    if is_safetensors(src):
        ckpt, tcfg = load_safetensors(src)
        heads, tpool = timm_hints(tcfg)
    else:
        ckpt = load_checkpoint(src) if isinstance(src, str) else src
    try:
        cfg = None
        if isinstance(ckpt, dict) and isinstance(ckpt.get("args"), dict) and "model" in ckpt["args"]:
            cfg = from_dict(ckpt["args"])
        sd, notes, ema = find_state_dict(ckpt, use_ema)
        mcfg = cfg.model if cfg is not None else infer_model_cfg(sd, num_heads=heads)
        model = model_from_cfg(mcfg, decoder=False)
        enc, rep = convert_state_dict(sd, model.state_dict().keys(), strict=strict)
        model.load_state_dict(enc, strict=True)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise ValueError(f"{name}: {exc}") from exc
    if cfg is None:   # official / timm weights: pooling from timm's config, the layout, else SPEC's table (B: mean, L/H: cls)
        mcfg.pool = tpool or rep["pool_hint"] or ("mean" if mcfg.embed_dim < 1024 else "cls")
        if is_safetensors(src):
            notes.append(f"safetensors weights; num_heads {'from config' if heads else 'from the width'}, pool "
                         f"{'from config (global_pool)' if tpool else 'from the layout'}")
        notes.append(f"no maect config: size inferred from the weights ({mcfg.arch}, {mcfg.embed_dim}d x {mcfg.depth}, "
                     f"patch {mcfg.patch_size}, {mcfg.num_heads} heads, {mcfg.img_size}px), pool={mcfg.pool!r}")
        if isinstance(ckpt, dict) and isinstance(ckpt.get("args"), argparse.Namespace):
            notes.append(f"official MAE args: model={getattr(ckpt['args'], 'model', '?')!r}")
    model.eval()
    info = {"pool": mcfg.pool, "img_size": mcfg.img_size, "in_chans": mcfg.in_chans, "model_cfg": mcfg,
            "data": {"name": cfg.data.name, "root": cfg.data.root} if cfg is not None else None,
            "missing": rep["missing"], "unexpected": rep["unexpected"], "config": cfg, "ema": ema,
            "format": "maect" if cfg is not None else rep["kind"], "notes": notes + rep["notes"], "source": name}
    return model, info


def describe(info: dict) -> str:
    """One line per note, for logs and the export CLI."""
    return f"{info['source']} ({info['format']}):\n" + "\n".join(f"  - {n}" for n in info["notes"])
