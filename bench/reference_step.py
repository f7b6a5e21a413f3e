"""The reference rows of bench/train_step.py (what a user of the official code gets on this torch), written here
apart from maect's trainer, and the table of rows; every row starts from the same weights, data, noise, queue and
neighbour picks.

  reference           official MAE / MAE-CT on a current torch: timm's Block (the class official MAE builds its ViT
                      from; parameter names identical to maect's, weights copied), whose attention is
                      F.scaled_dot_product_attention; torch's fused AdamW (fused=True: one flag); argsort masking and
                      gather unshuffle (maect.kernels' references, asked for by name); the published NNCLR
                      lookup (bench/queue_lookup.py's official_nnclr: re-normalise the whole queue, B x Q similarities,
                      B x Q self-id mask, topk) inside the autocast region as the official code runs it; no
                      non-finite guard; a host-side queue pointer. Without timm installed: maect's blocks with
                      attention 'sdpa' (the same operators), labelled so.
  reference-math      extra row, not a baseline: the same with timm's explicit attention (q kᵀ, softmax, · v; the
                      timm 0.3 path official MAE was released with) and AdamW(foreach=False): the earlier straw man.
  reference+compile   the reference with torch.compile of every block (inductor, default mode): the honest baseline
                      for maect's compiled rows.
  maect, maect+compile, maect+compile-mat, maect+cudagraphs   not here: bench/train_step.py's maect_step runs the
                      trainer's own functions (maect.engine's mae_step / nnclr_step / optimizer_step / nnclr_update,
                      maect.train's mae_lr / ct_trainable / nnclr_optimizer / maybe_compile) with compile mode
                      none, default, max-autotune-no-cudagraphs, reduce-overhead.
  reference+cudagraphs  the reference with mode reduce-overhead.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from queue_lookup import official_nnclr

from maect import config as C  # noqa: E402  (bench/common.py puts the repo root on sys.path)
from maect.dataloading.augment import h2d  # noqa: E402
from maect.heads import FeatureQueue, NNCLRHead  # noqa: E402
from maect.kernels import dispatch  # noqa: E402
from maect.losses import nnclr_loss  # noqa: E402
from maect.models import attention as _attention  # noqa: E402,F401  (registers the attention op)
from maect.optim import build_optimizer, llrd_scale, lr_factor, param_groups, set_lr  # noqa: E402
from maect.engine import NNCLRNet  # noqa: E402  (the model wrapper both paths share: encoder + head forward)
from maect.train import maybe_compile  # noqa: E402


@dataclass(frozen=True)
class Variant:
    name: str
    path: str                 # "reference" | "maect"
    attention: str            # reference: "sdpa" | "math"; maect: "" (the --attention option)
    optimizer: str            # "fused" | "unfused" (torch AdamW) | "maect" (maect.optim.build_optimizer)
    compile_mode: str | None  # None: eager; else a torch.compile mode


VARIANTS = {v.name: v for v in [
    Variant("reference", "reference", "sdpa", "fused", None),
    Variant("reference-math", "reference", "math", "unfused", None),
    Variant("reference+compile", "reference", "sdpa", "fused", "default"),
    Variant("reference+cudagraphs", "reference", "sdpa", "fused", "reduce-overhead"),
    Variant("maect", "maect", "", "maect", None),
    Variant("maect+compile", "maect", "", "maect", "default"),
    Variant("maect+compile-mat", "maect", "", "maect", "max-autotune-no-cudagraphs"),
    Variant("maect+cudagraphs", "maect", "", "maect", "reduce-overhead"),
]}


def timm_block_cls():
    try:
        from timm.models.vision_transformer import Block
        return Block
    except ImportError:
        return None


def use_timm_blocks(model: nn.Module, explicit: bool) -> str:
    """Replace each block of model (encoder and decoder) by timm's Block with the same weights, as official MAE
    builds it (qkv_bias=True, LayerNorm eps 1e-6). explicit: timm's explicit attention instead of SDPA. Returns the
    attention label for the table."""
    Block = timm_block_cls()
    if Block is None:
        return f"{'math' if explicit else 'sdpa'} (maect blocks: timm not installed)"
    for blocks in (model.blocks, getattr(model, "decoder_blocks", [])):
        for i, old in enumerate(blocks):
            D, heads = old.norm1.normalized_shape[0], old.attn.num_heads
            new = Block(D, heads, mlp_ratio=old.mlp.fc1.out_features / D, qkv_bias=True,
                        norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))
            new.load_state_dict(old.state_dict())     # strict: the names are the same (timm's)
            new.attn.fused_attn = not explicit
            blocks[i] = new.to(old.norm1.weight.device)
    return "timm explicit" if explicit else "timm SDPA"


@contextlib.contextmanager
def path_dispatch(variant: Variant, attention: str):
    """Backends asked for by name while one variant runs (kernels/dispatch.py's force): the reference runs every
    kernel op's reference (argsort masking, gather unshuffle, the reference top-k) and its attention; maect's rows
    keep the start-up decisions, with attention `attention` ('auto': the decision)."""
    prev = dispatch.forced()
    ref = variant.path == "reference"
    want = {op: o.ref_name if ref else prev.get(op) for op, o in dispatch.OPS.items()}
    want["attention"] = variant.attention if ref else attention
    try:
        for op, name in want.items():
            dispatch.force(op, name)
        yield
    finally:
        for op in dispatch.OPS:
            dispatch.force(op, prev.get(op))


def make_optimizer(groups, lr, variant: Variant, device):
    if variant.optimizer == "maect":
        return build_optimizer(groups, lr, fused="auto", device=device)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    fused = variant.optimizer == "fused"
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), **({"fused": True} if fused else {"foreach": False}))
    return opt, "torch.AdamW(fused)" if fused else "torch.AdamW(foreach=False)"


def compile_blocks(cfg: C.Config, model: nn.Module, mode: str | None, backend: str) -> None:
    """torch.compile every block in place, through maect.train.maybe_compile (what training runs)."""
    if mode is None:
        return
    cfg = copy.deepcopy(cfg)
    cfg.model.compile, cfg.model.compile_mode = True, mode
    maybe_compile(cfg, model, backend=backend)


def ref_lookup(queue: FeatureQueue, z, ids, k: int, gen):
    """The reference's lookup: official_nnclr (bench/queue_lookup.py), then FeatureQueue.lookup's random top-k pick
    (the same CPU generator draws), so both paths pick the same neighbours."""
    idx = official_nnclr(z, queue.features, ids, queue.ids, k).indices
    if k > 1:
        idx = idx.gather(1, torch.randint(0, k, (z.shape[0], 1), generator=gen).to(z.device))
    return queue.features[idx[:, 0]]


def ref_enqueue(queue: FeatureQueue, z, ids, labels, ptr: int) -> int:
    """The reference's FIFO write: slices at a host-side pointer."""
    n = z.shape[0]
    queue.features[ptr:ptr + n] = z.to(queue.features.dtype)
    queue.ids[ptr:ptr + n] = ids
    queue.labels[ptr:ptr + n] = labels
    return (ptr + n) % queue.size


def build_bases(stage: str, cfg: C.Config, device) -> dict:
    """The initial weights every variant copies (built once per configuration: ViT-H init takes seconds)."""
    from maect import hub
    torch.manual_seed(0)
    with torch.device(device):             # initialised on the device (ViT-H on the CPU takes seconds)
        model = hub.model_from_cfg(cfg.model, decoder=stage == "mae")
        if stage == "mae":
            return {"model": model}
        n = cfg.nnclr
        head = NNCLRHead(model.embed_dim, n.proj_hidden, n.proj_dim, n.pred_hidden)
        head.add_target()
    return {"model": model, "head": head}


def reference_step(stage: str, cfg: C.Config, args, data: dict, variant: Variant, device, total: int, bases: dict):
    """(step() -> detached loss, info) of a reference row: the official code's step, written here (not maect's).
    The variant's own copy of the base weights; call inside path_dispatch."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    gen = torch.Generator().manual_seed(1)     # mask noise and neighbour picks, drawn on the CPU in both paths
    state = {"step": 0, "ptr": 0}
    # CUDA graphs (cudagraph trees): say where an iteration starts, so no graph output is read after being replayed
    mark = torch.compiler.cudagraph_mark_step_begin if variant.compile_mode == "reduce-overhead" else lambda: None
    x = data["x"]
    model = copy.deepcopy(bases["model"])
    info = {"model": model, "attention": use_timm_blocks(model, variant.attention == "math")}
    if stage == "mae":
        s = dataclasses.replace(cfg.mae, batch_size=data["batch"])
        model.train()
        compile_blocks(cfg, model, variant.compile_mode, args.compile_backend)
        lr = s.blr * s.num_views * s.batch_size / 256    # official MAE-CT: blr x views x batch / 256 (SPEC)
        opt, info["opt"] = make_optimizer(param_groups(model.named_parameters(), s.weight_decay), lr, variant, device)
        L, views = model.patch_embed.num_patches, data["views"]

        def step():
            mark()
            noise = h2d(torch.cat([torch.rand(s.batch_size, L, generator=gen) for _ in range(views)]), device)
            with autocast:
                loss, _, _ = model(x, s.mask_ratio, s.norm_pix_loss, noise)
            loss.backward()
            set_lr(opt, lr, lr_factor(state["step"], total, 1))
            opt.step()
            opt.zero_grad(set_to_none=True)
            state["step"] += 1
            return loss.detach()
        return step, {**info, "t": model.depth}

    s, n = cfg.ct, cfg.nnclr
    encoder, head = model, copy.deepcopy(bases["head"])
    queue = FeatureQueue(n.queue_size, n.proj_dim, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    queue.ids.copy_(torch.randint(0, data["n_ids"], (n.queue_size,), generator=torch.Generator().manual_seed(2)))
    queue = queue.to(device)                          # the official fp32 queue
    depth = encoder.depth
    t = s.tuned_from_block if s.tuned_from_block >= 0 else depth // 2
    for name, p in encoder.named_parameters():        # upper blocks + final norm train
        p.requires_grad_(name.startswith("norm.") or (name.startswith("blocks.") and int(name.split(".")[1]) >= t))
    encoder.eval()
    head.train()
    ema = copy.deepcopy(encoder).requires_grad_(False)
    compile_blocks(cfg, encoder, variant.compile_mode, args.compile_backend)
    net = NNCLRNet(encoder, head, t, cfg.model.pool, encoder_frozen=False)
    scale = 2 * data["batch"] / 256
    lrs = {"enc": s.blr * scale, "head": s.head_blr * scale}
    groups = param_groups(head.named_parameters(), s.head_weight_decay, tag="head")
    groups += param_groups(encoder.named_parameters(), s.weight_decay, lambda nm: llrd_scale(nm, depth, s.llrd),
                           tag="enc")
    opt, info["opt"] = make_optimizer(groups, 1.0, variant, device)
    x0, x1 = x.chunk(2)
    ids, labels = data["ids"], data["labels"]
    trained = [(e, p) for e, p in zip(ema.parameters(), encoder.parameters()) if p.requires_grad]

    def step():
        mark()
        with autocast:         # the official path: normalise and look up inside the autocast region
            p0, p1, z0, z1 = net(x0, x1)
            z0, z1 = F.normalize(z0, dim=1), F.normalize(z1, dim=1)
            nn0, nn1 = ref_lookup(queue, z0, ids, s.topk, gen), ref_lookup(queue, z1, ids, s.topk, gen)
        loss = nnclr_loss(nn0.float(), nn1.float(), p0, p1, s.tau)
        loss.backward()
        set_lr(opt, lrs, lr_factor(state["step"], total, 1))
        opt.step()             # no non-finite guard, as the official code
        opt.zero_grad(set_to_none=True)
        state["ptr"] = ref_enqueue(queue, z0.float(), ids, labels, state["ptr"])
        head.update_target(s.target_ema)
        with torch.no_grad():
            for e, p in trained:
                e.lerp_(p, 1.0 - s.encoder_ema)
        state["step"] += 1
        return loss.detach()
    return step, {**info, "t": t, "head_cfg": n}
