"""Floating-point work of a preset's paper table (MAE, head + CT, head + CTaug, evaluation), counted from the config:
an ESTIMATE of GPU time, never a measurement.

    python bench/flops.py --preset fmnist_gpu [--tflops 100 200 400] [--n-train 60000 --n-test 10000]

Counting (multiply-add = 2 FLOPs; matrix products only: LayerNorm, GELU, softmax, the optimizer and the data
augmentation are left out, so the real work is higher and the real throughput lower than a GEMM's):
  * one ViT block on T tokens of width d, MLP ratio 4: 24 T d^2 (qkv 6, proj 2, MLP 16) + 4 T^2 d (scores, values)
  * patch embedding 2 L (p^2 C) d; MAE decoder: embed 2 T_vis d d_dec, blocks as above at d_dec on 1 + L tokens,
    prediction 2 L d_dec p^2 C
  * NNCLR head per view: projector 2 (d h + h^2 + h o), predictor 2 (o h_p + h_p o), target projector (stage 3)
  * training = 3 x forward for what gets gradients (forward, and backward for the input and the weight
    gradients), 1 x forward for frozen parts: stage 2's whole encoder, stage 3's lower blocks and stem
  * the per-epoch k-NN monitor (bank + queries), the pipeline's evaluation: one encoder pass over train + test
    per evaluated model
Time = FLOPs / an ASSUMED sustained throughput; the table prints it for several, so no single guess is hidden.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from maect.validation import load_config  # noqa: E402
from maect.models.vit import ARCHS  # noqa: E402
from mfu import block_flops as block  # noqa: E402  (one ViT block's forward: the MFU counter's formula)


def sizes(m) -> tuple[int, int, int, int]:
    """(patch, width, depth, channels) of a ModelCfg, filling 0s from the arch table."""
    a = ARCHS.get(m.arch)
    p = m.patch_size or (a[1] if a else 16)
    d = m.embed_dim or (a[2] if a else 768)
    depth = m.depth or (a[3] if a else 12)
    return p, d, depth, m.in_chans


def encoder_fwd(cfg, tokens: int | None = None, blocks: range | None = None) -> float:
    """Forward FLOPs of the encoder for one image: all 1 + L tokens (tokens=None) or `tokens` (MAE's visible + cls);
    blocks: which blocks to count (default all); the stem is counted with block 0."""
    p, d, depth, C = sizes(cfg.model)
    L = (cfg.model.img_size // p) ** 2
    T = 1 + L if tokens is None else tokens
    blocks = range(depth) if blocks is None else blocks
    stem = 2 * L * p * p * C * d if 0 in blocks else 0
    return stem + sum(block(T, d) for _ in blocks)


def decoder_fwd(cfg) -> float:
    p, d, _, C = sizes(cfg.model)
    m = cfg.model
    L = (m.img_size // p) ** 2
    vis = 1 + int(L * (1 - cfg.mae.mask_ratio))
    dd = m.decoder_embed_dim
    return 2 * vis * d * dd + m.decoder_depth * block(1 + L, dd) + 2 * L * dd * p * p * C


def head_fwd(cfg, target: bool) -> float:
    _, d, _, _ = sizes(cfg.model)
    n = cfg.nnclr
    proj = 2 * (d * n.proj_hidden + n.proj_hidden ** 2 + n.proj_hidden * n.proj_dim)
    pred = 2 * 2 * n.proj_dim * n.pred_hidden
    return proj, pred + (proj if target else 0)


def stage_flops(cfg, n_train: int, n_test: int, ct_epochs: float | None = None) -> dict:
    """{stage: FLOPs} for the MAE stage, stage 2 and stage 3 of cfg, and one evaluation of one encoder."""
    p, d, depth, _ = sizes(cfg.model)
    L = (cfg.model.img_size // p) ** 2
    vis = 1 + int(L * (1 - cfg.mae.mask_ratio))
    mae = cfg.mae.epochs * n_train * cfg.mae.num_views * 3 * (encoder_fwd(cfg, vis) + decoder_fwd(cfg))
    proj, rest = head_fwd(cfg, target=False)
    monitor = (cfg.eval.monitor_train + cfg.eval.monitor_test) * encoder_fwd(cfg)
    head = cfg.head.epochs * n_train * 2 * (encoder_fwd(cfg) + 3 * (proj + rest)) + monitor
    t = cfg.ct.tuned_from_block if cfg.ct.tuned_from_block >= 0 else depth // 2
    low, up = encoder_fwd(cfg, blocks=range(t)), encoder_fwd(cfg, blocks=range(t, depth))
    proj, rest_t = head_fwd(cfg, target=True)
    ep = cfg.ct.epochs if ct_epochs is None else ct_epochs
    ct = ep * n_train * 2 * (low + 3 * up + 3 * (proj + rest_t)) + math.ceil(ep) * monitor
    ev = (n_train + n_test) * encoder_fwd(cfg)
    return {"mae": mae, "head": head, "ct": ct, "eval": ev}


def table_flops(preset: str, aug_preset: str, n_train: int, n_test: int, overrides=()) -> dict:
    """The paper table's work: MAE, head + CT, head + CTaug (when aug_preset), and four evaluations
    (MAE with cls and mean pooling, MAE-CT, MAE-CTaug)."""
    cfg = load_config([f"preset={preset}", *overrides])
    f = stage_flops(cfg, n_train, n_test)
    out = {"MAE": f["mae"], "head": f["head"], "CT": f["ct"]}
    evals = 3
    if aug_preset:
        fa = stage_flops(load_config([f"preset={aug_preset}", *overrides]), n_train, n_test)
        out.update({"head (aug)": fa["head"], "CTaug": fa["ct"]})
        evals += 1
    out["evaluation"] = evals * f["eval"]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="fmnist_gpu")
    ap.add_argument("--aug-preset", default=None, help="default: PRESET_aug ('' for none)")
    ap.add_argument("--n-train", type=int, default=60000)
    ap.add_argument("--n-test", type=int, default=10000)
    ap.add_argument("--tflops", type=float, nargs="+", default=[100, 200, 400],
                    help="ASSUMED sustained TFLOP/s to convert FLOPs into seconds")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    aug = f"{a.preset}_aug" if a.aug_preset is None else a.aug_preset
    f = table_flops(a.preset, aug, a.n_train, a.n_test, a.overrides)
    total = sum(f.values())
    print(f"{a.preset} (+ {aug or 'no aug'}): matrix-product FLOPs per stage, and seconds at ASSUMED throughputs")
    print(f"{'stage':<12}{'PFLOP':>9}" + "".join(f"{f'@{t:g} TF/s':>12}" for t in a.tflops))
    for k, v in {**f, "total": total}.items():
        print(f"{k:<12}{v / 1e15:>9.2f}" + "".join(f"{v / (t * 1e12):>11.0f}s" for t in a.tflops))


if __name__ == "__main__":
    main()
