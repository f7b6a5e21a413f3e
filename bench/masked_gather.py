"""MAE masking, forward + backward: MAE's torch path vs maect's backends, per op, side by side.

Ops (every provider gets the same inputs and noise; the providers are every backend of the op, asked for by name
through the public function's backend= argument; 'ref', MAE's own code, is the torch path and the baseline of the
ratio column; a backend that cannot run here is listed with its reason):
  encoder         masked_patch_embed: images [N, 3, H, W] -> patch embedding + pos_embed + random masking ->
                  x_visible [N, K, D]; backward: patch_embed.proj weight and bias gradients.
                  ref = Conv2d over all L patches, + pos_embed, two argsorts, gather (MAE's forward_encoder).
  decoder         decoder_input: tokens [N, 1+K, 512] + mask token + decoder_pos_embed -> [N, 1+L, 512];
                  backward: token and mask-token gradients. ref = cat + gather + cat + add (MAE's forward_decoder).
  random_masking  the standalone op on x [N, L, D];  unshuffle: the standalone op on [N, K, 512].
Providers: ref; cpp / triton (the standalone compiled / Triton ops inside MAE's structure); gather (the encoder: embed
only the kept patches with torch ops); fused (the encoder: index + gather-GEMM Triton kernels; the decoder: one pass,
Triton on CUDA, the compiled op on CPU); 'MAE compiled' (torch.compile of ref; --compile).
Regime: GPU: fp32 parameters and images under bf16 autocast, as in the training step (the decoder tokens are bf16,
the standalone ops' x too); CPU: fp32.
Correctness first, every provider against ref on the same inputs: mask, ids_restore and every copy exact; the
embedding within kernels.ops.masked_patch_embed's derived embed_error_bound (a GEMM instead of a convolution: same products,
another summation order); its weight / bias gradients against the fp64 truth within 2 x the reference's own error +
their dot_error_bound (the flash-attention rule); the mask-token gradient within dot_error_bound for a sum of
N (L - K) rows. A provider that fails is reported, not timed, and the run exits 1. Triton backends on CPU run in
the interpreter (TRITON_INTERPRET=1): checked, not timed. Which backend training runs is decided by the trainer at
start-up or by `python -m maect.kernels.check`, not here. CPU timings on a shared machine are noisy.

  python bench/masked_gather.py                        # GPU: ViT-B/16, L/16, H/14 at N=256, ratio 0.75
  python bench/masked_gather.py --device cpu           # CPU (1 thread unless --threads): the tiny preset's shape
                                                       # (N=256) and ViT-B/16 at N=8
  python bench/masked_gather.py --dry-run              # CPU, one tiny shape, short timing: exercises every path
"""
from __future__ import annotations

import math
import sys
from contextlib import nullcontext

import torch

from common import add_ratio, base_parser, environment, gpu_peak_extra_mb, measure, print_table, setup, write_json

from maect import kernels  # noqa: E402  (common puts the repo root on sys.path)
from maect.kernels import _util as MK, dispatch  # noqa: E402
from maect.kernels.ops import masked_patch_embed as ME  # noqa: E402

# (label, N, image side, patch, encoder width D, decoder width)
GPU_SHAPES = [("ViT-B/16", 256, 224, 16, 768, 512), ("ViT-L/16", 256, 224, 16, 1024, 512),
              ("ViT-H/14", 256, 224, 14, 1280, 512)]
CPU_SHAPES = [("tiny preset", 256, 28, 4, 96, 64), ("ViT-B/16", 8, 224, 16, 768, 512)]
DRY_SHAPES = [("dry", 4, 28, 4, 32, 16)]
OPS = {"encoder": "masked_patch_embed", "decoder": "decoder_input", "random_masking": "random_masking",
       "unshuffle": "unshuffle"}
COMPILED = "MAE compiled"


def make_inputs(N, img, p, D, Dd, ratio, device, low):
    """Everything one shape needs (fp32 parameters; `low`: the activation dtype of the standalone ops / decoder)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    L, K = (img // p) ** 2, int((img // p) ** 2 * (1 - ratio))

    def rnd(*shape, scale=1.0, dtype=torch.float32, grad=False):
        return (scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype).requires_grad_(grad)
    return dict(
        L=L, K=K, imgs=rnd(N, 3, img, img), w=rnd(D, 3, p, p, scale=(6 / (D + 3 * p * p)) ** 0.5, grad=True),
        b=rnd(D, scale=0.02, grad=True), pos=rnd(1, L, D, scale=0.5), noise=torch.rand(N, L, generator=g).to(device),
        g_vis=rnd(N, K, D), dec_x=rnd(N, 1 + K, Dd, dtype=low, grad=True), tok=rnd(1, 1, Dd, scale=0.02, grad=True),
        dec_pos=rnd(1, 1 + L, Dd, scale=0.5), g_full=rnd(N, 1 + L, Dd), x=rnd(N, L, D, dtype=low, grad=True),
        g_xv=rnd(N, K, D, dtype=low), y=rnd(N, K, Dd, dtype=low, grad=True), g_y=rnd(N, L, Dd, dtype=low))


def step_fn(op, fn, t, ratio, autocast):
    """A closure running op's forward + backward with provider fn; returns outputs then gradients."""
    if op == "encoder":
        def run():
            with autocast:
                x, mask, ids = fn(t["imgs"], t["w"], t["b"], t["pos"], ratio, t["noise"])
            return (x, mask, ids, *torch.autograd.grad(x, (t["w"], t["b"]), t["g_vis"]))
    elif op == "decoder":
        def run():
            out = fn(t["dec_x"], t["tok"], t["ids"], t["dec_pos"])
            return (out, *torch.autograd.grad(out, (t["dec_x"], t["tok"]), t["g_full"]))
    elif op == "random_masking":
        def run():
            xv, mask, ids = fn(t["x"], ratio, t["noise"])
            return (xv, mask, ids, *torch.autograd.grad(xv, t["x"], t["g_xv"]))
    else:
        def run():
            out = fn(t["y"], t["tok"], t["ids"])
            return (out, *torch.autograd.grad(out, (t["y"], t["tok"]), t["g_y"]))
    return run


def provider_fn(op, name, device):
    """The function a provider runs (the public op with backend= forced, or torch.compile of the reference)."""
    kop = OPS[op]
    if name == COMPILED:
        return torch.compile(dispatch.get(kop).reference, dynamic=False)
    return lambda *a: getattr(kernels, kop)(*a, backend=name)


def bounds(op, t, ref, mm, device):
    """Per output of op's step: None (must be exact) or the elementwise bound against ref (float64 tensors)."""
    N, L, K = t["imgs"].shape[0], t["L"], t["K"]
    if op == "encoder":
        x = ref[0]
        ids_keep = torch.argsort(t["noise"], dim=1, stable=True)[:, :K]
        e_x = ME.embed_error_bound(t["imgs"], t["w"], t["b"], t["pos"], ids_keep, mm, x.dtype)
        # gradients against the fp64 truth of the same rounded operands: within 2 x the reference's own error + one
        # side of the bound (the reference's low-precision kernels need not accumulate in fp32 throughout)
        G = t["g_vis"].reshape(-1, x.shape[-1]).to(mm).double()
        A = ME.gather_patches(t["imgs"].to(mm), ids_keep, t["w"].shape[-1]).flatten(0, 1).double()
        tw, tb = (G.t() @ A).reshape(ref[3].shape), G.sum(0)
        e_w = ME.dot_error_bound((G.abs().t() @ A.abs()).reshape(tw.shape), tw, N * L, torch.float32, mm) / 2
        e_b = ME.dot_error_bound(G.abs().sum(0), tb, N * L, torch.float32, mm) / 2
        return [e_x, None, None, (tw, e_w), (tb, e_b)]
    if op == "random_masking":
        return [None] * 4
    g = t["g_full"][:, 1:] if op == "decoder" else t["g_y"]
    masked = t["mask"].bool().unsqueeze(-1)
    gm = (g.double() * masked).reshape(-1, g.shape[-1])
    tok_dtype = t["tok"].dtype if op == "decoder" else g.dtype     # unshuffle rounds the token (and its grad) to x's
    e_t = ME.dot_error_bound(gm.abs().sum(0), gm.sum(0), N * (L - K), torch.float32, tok_dtype).reshape(t["tok"].shape)
    return [None, None, e_t]


def check(op, got, ref, bnd) -> dict:
    errs, ok = [], True
    for a, b, e in zip(got, ref, bnd):
        if a.shape != b.shape or a.dtype != b.dtype:
            return {"ok": False, "why": f"shape/dtype {tuple(a.shape)} {a.dtype} != {tuple(b.shape)} {b.dtype}"}
        d = (a.double() - b.double()).abs()
        if isinstance(e, tuple):                      # (truth, own bound): |a - truth| <= 2 |ref - truth| + bound
            truth, own = e
            d, e = (a.double() - truth).abs(), 2 * (b.double() - truth).abs() + own
        good = torch.equal(a, b) if e is None else bool((d <= e).all())
        errs.append(0.0 if not d.numel() else (d.max().item() if e is None else (d / e.clamp_min(1e-300)).max().item()))
        ok = ok and good
    return {"ok": ok, "err": errs, "note": "err: max |diff| where exact is required, else max |diff| / bound"}


def interpreted(kop, name, device) -> bool:
    """Does this provider run Triton kernels through the interpreter (CPU tensors, TRITON_INTERPRET=1)? Those are
    checked for correctness (the dry run's purpose) but not timed: the interpreter's speed means nothing."""
    if device.type == "cuda" or name == COMPILED:
        return False
    b = dispatch.get(kop).backend(name)
    return b.cuda_timed_only or (kop == "decoder_input" and name == "fused" and MK.cpp_why(device) is not None)


def bench_shape(label, N, img, p, D, Dd, ratio, device, budget, compile_, ops) -> list[dict]:
    cuda = device.type == "cuda"
    low = torch.bfloat16 if cuda else torch.float32
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    mm = torch.bfloat16 if cuda else torch.float32
    t = make_inputs(N, img, p, D, Dd, ratio, device, low)
    _, t["mask"], t["ids"] = kernels.random_masking_ref(t["noise"][..., None], ratio, t["noise"])
    rows = []
    for op in ops:
        kop = OPS[op]
        L, width = t["L"], (D if op in ("encoder", "random_masking") else Dd)
        names = list(dispatch.get(kop).names()) + ([COMPILED] if compile_ else [])
        ref = step_fn(op, provider_fn(op, "ref", device), t, ratio, autocast)()
        bnd = bounds(op, t, ref, mm, device)
        for name in names:
            row = {"shape": label, "op": op, "provider": name, "N": N, "L": L, "D": width, "device": device.type}
            try:
                fn = step_fn(op, provider_fn(op, name, device), t, ratio, autocast)
                row["check"] = check(op, fn(), ref, bnd)
                if not row["check"]["ok"]:
                    row["error"] = f"WRONG vs ref: {row['check']}"[:300]
                elif interpreted(kop, name, device):
                    row["note"] = "Triton interpreter: checked, not timed"
                else:
                    row.update(measure(fn, device, warmup=3 if cuda else 1, budget_s=budget))
                    if cuda:
                        row["peak_extra_mib"] = gpu_peak_extra_mb(fn, device)
            except dispatch.Unavailable as ex:          # cannot run here: its reason, not a failure
                row["note"] = "n/a: " + str(ex).splitlines()[0].split(f" on {device.type}: ", 1)[-1]
            except Exception as ex:  # a backend that claims support but crashes: report, keep going
                row["error"] = f"{type(ex).__name__}: {str(ex).splitlines()[0] if str(ex) else ''}"[:300]
            rows.append(row)
        add_ratio([r for r in rows if r["op"] == op], "ref")
    return rows


COLUMNS = [("op", "op", ""), ("provider", "provider", ""), ("median_ms", "median ms", ".3f"), ("p20_ms", "p20", ".3f"),
           ("p80_ms", "p80", ".3f"), ("speedup", "x MAE (ref)", ".2f"), ("peak_extra_mib", "peak extra MiB", ".1f"),
           ("error", "error", ""), ("note", "note", "")]


def run(device, shapes, ratio=0.75, budget=0.2, compile_=False, ops=tuple(OPS)) -> dict:
    env = environment(device)
    rows = []
    for label, N, img, p, D, Dd in shapes:
        r = bench_shape(label, N, img, p, D, Dd, ratio, device, budget, compile_, ops)
        L = (img // p) ** 2
        print_table(f"{label}: N={N} L={L} K={int(L * (1 - ratio))} D={D} decoder {Dd}, forward+backward on "
                    f"{env['device']} ({'bf16 autocast' if device.type == 'cuda' else 'fp32'}; x MAE = ref time / "
                    f"provider time)", r, COLUMNS)
        rows += r
    return {"bench": "masked_gather", "env": env, "ratio": ratio, "rows": rows,
            "failed": [f"{r['shape']}/{r['op']}/{r['provider']}: {r['error']}" for r in rows if r.get("error")]}


def main() -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--ratio", type=float, default=0.75)
    p.add_argument("--shape", type=str, default=None,
                   help="N,L,D[,p[,Dd]]: one custom shape (L a square; patch p default 16, decoder width Dd 512)")
    p.add_argument("--ops", type=str, default=",".join(OPS), help=f"comma list of {list(OPS)}")
    p.add_argument("--compile", action="store_true", help="add torch.compile of MAE's path")
    p.add_argument("--dry-run", action="store_true", help="CPU, one tiny shape, short timing (exercises the paths)")
    args = p.parse_args()
    # CPU: 1 thread unless --threads (on a shared machine multi-thread timings of these small ops are dominated by
    # OpenMP threads waiting for a core)
    dev = "cpu" if args.dry_run else args.device
    device = setup(dev, args.threads or (1 if dev == "cpu" else None))
    shapes = DRY_SHAPES if args.dry_run else (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    if args.shape:
        v = [int(s) for s in args.shape.split(",")]
        g = math.isqrt(v[1])
        if g * g != v[1] or len(v) < 3:
            sys.exit(f"--shape {args.shape}: need N,L,D[,p[,Dd]] with L a square number of patches")
        pp = v[3] if len(v) > 3 else 16
        shapes = [("custom", v[0], g * pp, pp, v[2], v[4] if len(v) > 4 else 512)]
    ops = [o.strip() for o in args.ops.split(",")]
    if bad := [o for o in ops if o not in OPS]:
        sys.exit(f"--ops: unknown {bad}; choose from {list(OPS)}")
    budget = args.budget if args.budget is not None else (0.02 if args.dry_run else 0.1 if device.type == "cuda" else 1.0)
    if device.type == "cpu":
        print(f"CPU run ({torch.get_num_threads()} threads): wall-clock times on a shared machine are noisy")
    res = run(device, shapes, args.ratio, budget, args.compile, ops)
    print("\ncorrectness: " + ("FAILED:\n  " + "\n  ".join(res["failed"]) if res["failed"] else
                               f"ok ({sum('check' in r for r in res['rows'])} provider x op x shape checks exact or "
                               f"within their bounds)"))
    write_json(args.json, res)
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
