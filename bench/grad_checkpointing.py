"""Activation checkpointing (model.grad_checkpointing): peak memory of one training step with and without it, from
the same weights and inputs, side by side with the ratio; the losses and gradients of the two are checked equal
first (fp32: 1e-5 relative on the loss, gradients within 1e-4 relative max-norm), else the script exits 1.

The step is maect's (maect.train's NNCLRNet, nnclr_loss, FeatureQueue, torch AdamW): stage ct = both views through
the encoder, the lower half frozen under no_grad and the upper half (the checkpointed blocks) trained, the NNCLR
head, one queue lookup, loss, backward, optimizer step; stage mae = the masked encoder and the decoder, norm-pix
loss, backward, optimizer step. One untimed step first (the optimizer state exists before the measured one).

Peak memory of the measured step, above what was allocated before it (weights, optimizer state, queue, inputs):
  CUDA  torch.cuda.max_memory_allocated (reset before the step) minus memory_allocated before it.
  CPU   live bytes of torch's CPU allocator, followed through the step by torch.profiler (profile_memory=True: every
        allocation and free of a CPU tensor, summed in time order; the peak of that running sum). It counts tensor
        memory only (not the allocator's cache or the interpreter): the CPU analogue of max_memory_allocated.
        Also 'saved': the bytes autograd holds for the backward pass when the forward ends (all tensors packed
        through saved_tensors_hooks, by storage, without the parameters, plus the inputs the checkpointed blocks
        keep), the term checkpointing reduces.
No GPU figure comes from a CPU run; GPU peaks are measured by running this script on a GPU.

  python bench/grad_checkpointing.py                               # ViT-B/16, stage ct, batch 8, CPU, fp32
  python bench/grad_checkpointing.py --stage mae --batch 8
  python bench/grad_checkpointing.py --model vit_l16 --device cuda --batch 64 --precision bf16
  python bench/grad_checkpointing.py --estimate      # an estimate for 24 / 40 GB GPUs from counts (estimate_gib)
"""
from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F

from common import MiB, base_parser, environment, print_table, setup, write_json

from maect import config as C  # noqa: E402  (common puts the repo root on sys.path)
from maect.validation import load_config  # noqa: E402
from maect.heads import FeatureQueue, NNCLRHead  # noqa: E402
from maect.losses import nnclr_loss  # noqa: E402
from maect.models.vit import build_model  # noqa: E402
from maect.optim import freeze  # noqa: E402
from maect.train import NNCLRNet  # noqa: E402


def build(stage: str, arch: str, batch: int, device: torch.device, seed: int = 0, img_size: int | None = None,
          cfg: C.Config | None = None) -> dict:
    """Weights, inputs, queue and optimizer of one step (the preset `arch` gives the head sizes)."""
    cfg = cfg or load_config([f"preset={arch}"] if arch != "custom" else [])
    m = cfg.model
    torch.manual_seed(seed)
    kw = dict(img_size=img_size or m.img_size, patch_size=m.patch_size or None, in_chans=m.in_chans,
              embed_dim=m.embed_dim or None, depth=m.depth or None, num_heads=m.num_heads or None,
              decoder_embed_dim=m.decoder_embed_dim, decoder_depth=m.decoder_depth, decoder_num_heads=m.decoder_num_heads)
    model = build_model(m.arch, decoder=stage == "mae", **kw).to(device)
    S, L = model.patch_embed.img_size, model.patch_embed.num_patches
    g = torch.Generator().manual_seed(seed + 1)
    out = {"stage": stage, "model": model, "cfg": cfg}
    if stage == "mae":
        out["x"] = torch.randn(batch, m.in_chans, S, S, generator=g).to(device)
        out["noise"] = torch.rand(batch, L, generator=g).to(device)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        n = cfg.nnclr
        head = NNCLRHead(model.embed_dim, n.proj_hidden, n.proj_dim, n.pred_hidden).to(device)
        t = cfg.ct.tuned_from_block if cfg.ct.tuned_from_block >= 0 else model.depth // 2
        freeze(model)
        for name, p in model.named_parameters():
            if name.startswith("norm.") or (name.startswith("blocks.") and int(name.split(".")[1]) >= t):
                p.requires_grad_(True)
        model.eval()
        out["net"] = NNCLRNet(model, head, t, m.pool, encoder_frozen=False)
        out["queue"] = FeatureQueue(n.queue_size, n.proj_dim, generator=torch.Generator().manual_seed(seed)).to(device)
        out["x"] = [torch.randn(batch, m.in_chans, S, S, generator=g).to(device) for _ in range(2)]
        out["ids"] = torch.arange(batch, device=device)
        out["tuned_from"] = t
        params = [p for p in [*model.parameters(), *head.parameters()] if p.requires_grad]
    out["params"] = params
    out["opt"] = torch.optim.AdamW(params, lr=1e-4)
    return out


def loss_of(ctx: dict, precision: str, device: torch.device) -> torch.Tensor:
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext())
    with amp:
        if ctx["stage"] == "mae":
            loss, _, _ = ctx["model"](ctx["x"], 0.75, True, ctx["noise"])
            return loss
        p0, p1, z0, z1 = ctx["net"](*ctx["x"])
    z0, z1 = F.normalize(z0.float(), dim=1), F.normalize(z1.float(), dim=1)
    cfg = ctx["cfg"]
    nn, _ = ctx["queue"].lookup(torch.cat([z0, z1]), torch.cat([ctx["ids"], ctx["ids"]]), cfg.ct.topk,
                                generator=torch.Generator().manual_seed(0))
    n = z0.shape[0]
    return nnclr_loss(nn[:n].float(), nn[n:].float(), p0, p1, cfg.ct.tau)


def step(ctx: dict, precision: str, device: torch.device, optimizer: bool = True, zero: bool = True) -> torch.Tensor:
    if zero:
        ctx["opt"].zero_grad(set_to_none=True)
    loss = loss_of(ctx, precision, device)
    loss.backward()
    if optimizer:
        ctx["opt"].step()
    return loss.detach()


def saved_bytes(ctx: dict, precision: str, device: torch.device) -> int:
    """Bytes autograd keeps for the backward pass at the end of the forward (by storage, counted once; parameters
    left out), including the inputs of the checkpointed blocks (what torch.utils.checkpoint keeps of them)."""
    seen: dict = {}
    weights = {p.untyped_storage().data_ptr() for p in ctx["opt"].param_groups[0]["params"]} | \
        {p.untyped_storage().data_ptr() for p in ctx["model"].parameters()}

    def pack(t):
        try:
            st = t.untyped_storage()
            if st.data_ptr() not in weights:           # activations only: the weights exist anyway
                seen[(st.data_ptr(), t.device)] = st.nbytes()
        except Exception:
            pass
        return t
    model = ctx["model"]
    real = model.run_block
    block_inputs: dict = {}

    def run_block(blk, x):           # the input a checkpointed block keeps
        if model.grad_checkpointing and torch.is_grad_enabled():
            block_inputs[(x.untyped_storage().data_ptr(), x.device)] = x.untyped_storage().nbytes()
        return real(blk, x)
    model.run_block = run_block
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_of(ctx, precision, device)
    finally:
        del model.run_block
    total = sum({**seen, **block_inputs}.values())
    del loss
    return total


def cpu_peak_bytes(fn) -> int:
    """Peak of live CPU-allocator bytes during fn(), above the start (torch.profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # every allocation (+bytes) and free (-bytes) of a CPU block allocated while profiling, in time order (frees of
    # blocks from before the profiler started are not reported: the step starts with its gradients already freed)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch._C._autograd.DeviceType.CPU)
    live = peak = 0
    for _, b in events:
        live += b
        peak = max(peak, live)
    return peak


def peak_bytes(fn, device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    return cpu_peak_bytes(fn)


def measure(stage: str, arch: str, batch: int, device: torch.device, checkpointing: bool, precision: str = "fp32",
            cfg: C.Config | None = None, img_size: int | None = None) -> dict:
    """One configuration: {'peak_mib', 'saved_mib', 'loss', 'grads'} of a measured step after a warm-up step."""
    ctx = build(stage, arch, batch, device, cfg=cfg, img_size=img_size)
    ctx["model"].set_grad_checkpointing(checkpointing)
    loss0 = step(ctx, precision, device, optimizer=False)      # the check step: loss and gradients, no update
    grads = [p.grad.detach().clone() for p in ctx["params"]]
    step(ctx, precision, device)                               # optimizer state allocated
    saved = saved_bytes(ctx, precision, device)
    ctx["opt"].zero_grad(set_to_none=True)                     # gradients freed before the measured step
    peak = peak_bytes(lambda: step(ctx, precision, device, zero=False), device)
    return {"grad_checkpointing": checkpointing, "peak_mib": peak / MiB, "saved_mib": saved / MiB,
            "loss": float(loss0), "grads": grads}


def check_equal(a: dict, b: dict) -> str | None:
    """Why two configurations' losses/gradients differ beyond the fp32 tolerance (None: equal)."""
    if abs(a["loss"] - b["loss"]) > 1e-5 * max(1.0, abs(a["loss"])):
        return f"loss {a['loss']!r} vs {b['loss']!r}"
    for i, (ga, gb) in enumerate(zip(a["grads"], b["grads"])):
        if (ga - gb).abs().max() > 1e-4 * max(ga.abs().max().item(), 1e-12):
            return f"gradient {i}: max difference {(ga - gb).abs().max().item():.3g}"
    return None


def compare(stage: str = "ct", arch: str = "vit_b16", batch: int = 8, device: str | torch.device = "cpu",
            precision: str = "fp32", cfg: C.Config | None = None, img_size: int | None = None) -> dict:
    """Both configurations from the same weights and inputs: {'rows': [off, on], 'ratio': peak off / peak on,
    'saved_ratio', 'mismatch': None or why the losses / gradients differ}."""
    device = torch.device(device)
    rows = [measure(stage, arch, batch, device, c, precision, cfg, img_size) for c in (False, True)]
    mismatch = check_equal(*rows) if precision == "fp32" else None
    for r in rows:
        r.pop("grads")
    off, on = rows
    return {"stage": stage, "model": arch, "batch": batch, "device": str(device), "precision": precision,
            "rows": rows, "ratio": off["peak_mib"] / max(on["peak_mib"], 1e-9),
            "saved_ratio": off["saved_mib"] / max(on["saved_mib"], 1e-9), "mismatch": mismatch}


def print_result(res: dict) -> None:
    what = "CUDA max_memory_allocated" if res["device"].startswith("cuda") else "CPU allocator peak (torch.profiler)"
    print_table(f"activation checkpointing: {res['model']} stage {res['stage']}, batch {res['batch']}, "
                f"{res['precision']}, {res['device']} (peak = {what}, above the memory before the step)",
                [{**r, "grad_checkpointing": "on" if r["grad_checkpointing"] else "off"} for r in res["rows"]],
                [("grad_checkpointing", "checkpointing", "s"), ("peak_mib", "peak MiB", ".1f"),
                 ("saved_mib", "saved for backward MiB", ".1f"), ("loss", "loss", ".6f")])
    print(f"  ratio off/on: peak {res['ratio']:.2f}x, saved-for-backward {res['saved_ratio']:.2f}x"
          + (f"; MISMATCH: {res['mismatch']}" if res["mismatch"] else "; losses and gradients equal (fp32 tol.)"))


# ------------------------------------------------------------------------------------------------ estimate
COEF = 16      # bytes / (token x width x activation byte) a block keeps for backward (estimate_gib's docstring)

def estimate_gib(stage: str, arch: str, batch: int, checkpointing: bool, act_bytes: int = 2,
                 context_gib: float = 1.0) -> dict:
    """An ESTIMATE (not a measurement) of one GPU's memory for `batch` images per GPU under bf16 autocast, from
    counts, not from a run:
      static       fp32 weights (+ the EMA encoder copy in ct), fp32 gradients and AdamW's two fp32 moments of the
                   trained parameters, the queue (bf16), plus context_gib for the CUDA context and workspaces;
      activations  per trained block and image, COEF * T * D * act_bytes bytes kept for backward, T tokens (ct:
                   1 + L per view, two views; mae: the visible 1 + L/4 in the encoder, 1 + L in the decoder), D the
                   block width; with checkpointing the block inputs (T * D * act_bytes each) plus one block's full
                   set during its recomputation. COEF = 16: Korthikanti et al. 2022 ('Reducing Activation
                   Recomputation in Large Transformer Models', eq. 2) without the dropout masks and with flash
                   attention (no T x T terms); the ViT-B/16 ct step on the CPU (fp32, batch 8, this script) keeps
                   898 MiB of activations for backward where COEF = 16 predicts 886 MiB.
    Not counted: the head's and the queue lookup's transient buffers, the allocator's fragmentation.
    Returns {'static_gib', 'act_gib', 'total_gib'}."""
    cfg = load_config([f"preset={arch}"])
    m, n = cfg.model, cfg.nnclr
    with torch.device("meta"):                         # sizes only: no memory, no initialisation cost
        model = build_model(m.arch, decoder=stage == "mae", img_size=m.img_size)
    L, D, depth = model.patch_embed.num_patches, model.embed_dim, model.depth
    per_block = lambda T, d: COEF * T * d * act_bytes                          # noqa: E731
    if stage == "mae":
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        blocks = [(1 + L // 4, D)] * depth + [(1 + L, m.decoder_embed_dim)] * m.decoder_depth
        blocks = blocks * cfg.mae.num_views
        extra = 0
    else:
        t = depth // 2
        with torch.device("meta"):
            head = NNCLRHead(D, n.proj_hidden, n.proj_dim, n.pred_hidden)
        trained = sum(p.numel() for b in model.blocks[t:] for p in b.parameters()) + \
            sum(p.numel() for p in head.parameters())
        blocks = [(1 + L, D)] * (depth - t) * 2
        extra = sum(p.numel() for p in model.parameters()) * 4 + n.queue_size * n.proj_dim * 2   # EMA copy, queue
    weights = sum(p.numel() for p in model.parameters()) * 4
    static = weights + trained * 4 * 3 + extra + context_gib * 2 ** 30
    if checkpointing:
        act = sum(T * d * act_bytes for T, d in blocks) + max(per_block(T, d) for T, d in blocks)
    else:
        act = sum(per_block(T, d) for T, d in blocks)
    gib = 2 ** 30
    return {"static_gib": static / gib, "act_gib": act * batch / gib, "total_gib": (static + act * batch) / gib}


def largest_batch(stage: str, arch: str, gib: float, checkpointing: bool) -> int:
    """The largest per-GPU batch (a multiple of 8) whose estimate_gib total fits in gib (0: none)."""
    one = estimate_gib(stage, arch, 1, checkpointing)
    b = int((gib - one["static_gib"]) / max(one["act_gib"], 1e-12))
    return max(0, b // 8 * 8)


def print_estimates(gpus=(24, 40), archs=("vit_b16", "vit_l16", "vit_h14")) -> list[dict]:
    rows = []
    for arch in archs:
        for stage in ("mae", "ct"):
            r = {"model": arch, "stage": stage}
            for g in gpus:
                for c in (False, True):
                    r[f"{g}{'c' if c else ''}"] = largest_batch(stage, arch, g * 0.92, c)   # 8 % headroom
            rows.append(r)
    cols = [("model", "model", "s"), ("stage", "stage", "s")]
    for g in gpus:
        cols += [(f"{g}", f"{g} GB off", "d"), (f"{g}c", f"{g} GB on", "d")]
    print_table("ESTIMATE (not measured): largest per-GPU batch (images, multiple of 8) under bf16 autocast, "
                "activation checkpointing off / on (estimate_gib; 8 % of the card kept free)", rows, cols)
    return rows


def main(argv=None) -> int:
    p = base_parser(__doc__.split("\n\n")[0], budget=False)
    p.add_argument("--stage", choices=["ct", "mae"], default="ct")
    p.add_argument("--model", default="vit_b16", help="a preset name with the architecture (vit_b16, vit_l16, ...)")
    p.add_argument("--batch", type=int, default=8, help="samples per view")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--estimate", action="store_true", help="print the 24 / 40 GB estimate table (no measurement)")
    a = p.parse_args(argv)
    if a.estimate:
        print_estimates()
        return 0
    device = setup(a.device, a.threads)
    res = compare(a.stage, a.model, a.batch, device, a.precision)
    print_result(res)
    write_json(a.json, {"env": environment(device), **res})
    return 1 if res["mismatch"] else 0


if __name__ == "__main__":
    sys.exit(main())
