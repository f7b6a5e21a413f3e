"""The trainer's backend decisions: made once at start-up, before any step, for the shapes its stages will train
and evaluate (kernels/dispatch.py says how a decision is made and looked up).

plan(cfg, device, world, n_train) lists one call per (op, dtype, shape class, train/infer) the run will make, with
synthetic inputs of those shapes: the MAE stage's masked patch embedding, decoder input and attention (encoder on
the visible tokens, decoder on all), the NNCLR stages' queue lookup (both views in one call: 2 x the per-rank batch
against the queue) and attention (frozen blocks without gradients, tuned blocks with), the k-NN monitor's and the
final evaluation's lookup and attention. Rows are capped at ROWS (the shape class of these ops does not depend on
the batch, except queue_topk's, which gets its real rows). decide_for_run makes the decisions (rank 0 under
torch.distributed; every rank then runs rank 0's), logs one line, and returns it.

Config (kernels.*): measure (default true: a decision missing from this process and the cache is measured now;
false: the cache or the static default), budget_s (seconds of timing per decision), and a backend per op by name
(kernels.queue_topk / masked_patch_embed / decoder_input, model.attention; 'auto' = the decision).
"""
from __future__ import annotations

import contextlib
import logging
import math

import torch

from maect import config as C
from maect.kernels import dispatch

log = logging.getLogger("maect")

ROWS = {"cpu": 64, "cuda": 256}
FORCED_OPS = ("queue_topk", "masked_patch_embed", "decoder_input")   # config keys kernels.<op>


def _g(*shape, dtype=torch.float32, device="cpu", grad=False, gen=None):
    t = torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    return t.requires_grad_(grad)


def _model_cfg(cfg: C.Config, stages: tuple):
    """The model's sizes: the config's, or where stages head / ct start from init= with sizes the config leaves open
    (model.arch=custom, a size 0), the init encoder's (as maect.stage_init.match_size resolves them; a size that
    contradicts the encoder is its ConfigError, now instead of at the stage's start)."""
    if "mae" in stages or not cfg.init:
        return cfg.model
    import copy
    from maect import hub
    from maect.stage_init import match_size
    try:
        encoder, info = hub.load_encoder(cfg.init)
    except ValueError as exc:
        from maect.checkpoint import one_line
        raise C.ConfigError(f"init={cfg.init}: {one_line(str(exc))}") from None
    resolved = copy.deepcopy(cfg)
    match_size(resolved, encoder, info, cfg.init)
    m = resolved.model
    m.img_size, m.in_chans = info.get("img_size") or m.img_size, info.get("in_chans") or m.in_chans
    return m


def plan(cfg: C.Config, device: torch.device, world: int = 1, n_train: int | None = None,
         n_bank: int | None = None, n_query: int | None = None) -> list[tuple[str, tuple, torch.dtype | None]]:
    """(op, args, autocast dtype or None) for every decision the run needs (module docstring)."""
    from maect import hub
    from maect.engine import uses_bf16
    from maect.eval.knn import chunk_rows
    from maect.models import attention as _attention  # noqa: F401  (registers the attention op)
    stages = C.stages(cfg)
    mcfg = _model_cfg(cfg, stages)                  # (outside the meta device: it may read init's weights)
    with torch.device("meta"):
        model = hub.model_from_cfg(mcfg, decoder=True)
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    amp = torch.bfloat16 if uses_bf16(cfg.precision, dev) else None
    act = amp or torch.float32
    eval_dt = torch.bfloat16 if dev.type == "cuda" else torch.float32        # maect.eval.features' autocast
    pe = model.patch_embed
    L, p, C_in, D = pe.num_patches, pe.patch_size, pe.proj.in_channels, pe.proj.out_channels
    img = int(math.isqrt(L)) * p
    H = model.blocks[0].attn.num_heads
    calls, seen = [], set()

    def add(op, args, a=None):
        """One call per (op, shape class): the first one planned."""
        o = dispatch.get(op)
        with torch.autocast(dev.type, dtype=a) if a is not None else contextlib.nullcontext():
            k = (op, o.key(o.meta(*args)))
        if k not in seen:
            seen.add(k)
            calls.append((op, args, a))

    def attn(T, Dh, dt, grad, n, heads):
        return tuple(_g(n, heads, T, Dh, dtype=dt, device=dev, grad=grad, gen=gen) for _ in range(3))

    def n_rows(batch):
        return max(1, min(batch, ROWS.get(dev.type, 64)))

    if "mae" in stages:
        s = cfg.mae
        n = n_rows(max(1, s.batch_size // max(1, world * s.accum_steps)))
        K = int(L * (1 - s.mask_ratio))
        imgs = _g(n, C_in, img, img, device=dev, gen=gen)
        w = pe.proj.weight
        args = (imgs, _g(*w.shape, device=dev, grad=True, gen=gen), _g(D, device=dev, grad=True, gen=gen),
                _g(1, L, D, device=dev, gen=gen), s.mask_ratio, torch.rand(n, L, generator=gen).to(dev))
        add("masked_patch_embed", args, amp)                       # the encoder input
        add("attention", attn(1 + K, D // H, act, True, n, H))      # the encoder on the visible tokens
        Dd = model.decoder_embed.out_features
        Hd = model.decoder_blocks[0].attn.num_heads
        ids = torch.argsort(torch.rand(n, L, generator=gen), dim=1).to(dev)
        add("decoder_input", (_g(n, 1 + K, Dd, dtype=act, device=dev, grad=True, gen=gen),
                              _g(1, 1, Dd, device=dev, grad=True, gen=gen), ids, _g(1, 1 + L, Dd, device=dev, gen=gen),
                              True), amp)
        add("attention", attn(1 + L, Dd // Hd, act, True, n, Hd))   # the decoder on all tokens
    from maect.heads import queue_dtype
    qdt = queue_dtype(cfg.nnclr.queue_dtype, dev)                               # the queue's storage, as the stages'
    for st in ("head", "ct"):
        if st not in stages:
            continue
        s = getattr(cfg, st)
        b = max(1, s.batch_size // max(1, world))
        add("attention", attn(1 + L, D // H, act, False, n_rows(2 * b), H))      # the frozen blocks
        if st == "ct":
            add("attention", attn(1 + L, D // H, act, True, n_rows(2 * b), H))   # the tuned blocks
        Q, Dp = cfg.nnclr.queue_size, cfg.nnclr.proj_dim
        q = torch.nn.functional.normalize(_g(2 * b, Dp, gen=gen), dim=1).to(dev, qdt)
        e = torch.nn.functional.normalize(_g(Q, Dp, gen=gen), dim=1).to(dev, qdt)
        qids = torch.randint(0, max(1, n_train or Q), (Q,), generator=gen).to(dev)
        ids = torch.randint(0, max(1, n_train or Q), (b,), generator=gen).to(dev).repeat(2)
        add("queue_topk", (q, e, max(1, s.topk), ids, qids, True))
    if any(st in stages for st in ("head", "ct")) or cfg.stage in ("pipeline", "ct_pipeline"):
        add("attention", attn(1 + L, D // H, eval_dt, False, ROWS.get(dev.type, 64), H))    # evaluation
        ev = cfg.eval

        def size(limit, n):
            return min(limit, n) if limit and n else (limit or n or 0)
        for i, (bank_limit, query_limit) in enumerate(((ev.monitor_train, ev.monitor_test),
                                                       (ev.final_train, ev.final_test))):
            N, Bq = size(bank_limit, n_bank), size(query_limit, n_query)
            if not N or not Bq:
                continue
            Bq = min(Bq, chunk_rows(N))                                        # maect.eval.knn's chunk
            # the encoder's features; the monitor also looks up in the projector's space (maect.eval.monitor)
            for Df in (D, cfg.nnclr.proj_dim) if i == 0 else (D,):
                f = torch.nn.functional.normalize(_g(N + Bq, Df, gen=gen), dim=1).to(dev)
                add("queue_topk", (f[N:], f[:N], min(ev.knn_k, N)))
    return calls


def decide_for_run(cfg: C.Config, device: torch.device, world: int = 1, rank: int = 0, **sizes) -> str:
    """Make (or read) every decision of plan() on rank 0, share them with the other ranks, log and return one line.
    Asked backends (config keys) are installed first and not measured."""
    for key, op in [(f"kernels.{op}", op) for op in FORCED_OPS] + [("model.attention", "attention")]:
        name = getattr(cfg.kernels, op) if key.startswith("kernels.") else cfg.model.attention
        try:
            dispatch.force(op, name)
        except ValueError as exc:
            raise C.ConfigError(f"{key}={name!r}: {exc}") from None
    made = []
    if rank == 0:                        # plan() lists each (op, shape class) once
        for op, args, amp in plan(cfg, device, world, **sizes):
            if op not in dispatch.forced():
                made.append((op, dispatch.decide(op, args, measure_missing=cfg.kernels.measure,
                                                 budget_s=cfg.kernels.budget_s, amp=amp)))
    dispatch.share_from_rank0()
    asked = [f"{op} -> {name} (asked)" for op, name in dispatch.forced().items()]
    line = dispatch.summary(made) + ("; " if made and asked else "") + "; ".join(asked)
    if rank == 0:
        log.info(line)
    return line
