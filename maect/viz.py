"""python -m maect.viz --ckpt PATH [--ckpt-before PATH] [--data NAME] [--data-root DIR] --out DIR

See what MAE learned, as two PNGs in --out:
  reconstruction.png  one row per test image (one per class first): original | masked (the visible 25%) |
                      reconstruction (the decoder's prediction for every patch) | reconstruction with the visible
                      patches pasted back (what the MAE loss is scored on: the masked patches). Needs a checkpoint
                      with the MAE decoder: --ckpt-before when it has one, else --ckpt (an MAE checkpoint).
  embedding.png       test-split features (the encoder's pooled, L2-normalised output: what k-NN sees) in 2-D,
                      coloured by label: PCA, or UMAP (cosine) when umap-learn is installed (--method). With
                      --ckpt-before: that encoder (e.g. MAE) and --ckpt's (e.g. MAE-CT) side by side.

Norm-pix targets (MAE's default norm_pix_loss): the decoder predicts every patch normalised by that patch's own mean
and variance, so its raw output has no brightness or contrast. For display each predicted patch is un-normalised with
the ORIGINAL patch's mean and variance (unbiased, +1e-6, as in the loss), the practice of MAE-pytorch's and
VideoMAE's visualisations (official MAE's demo instead uses a checkpoint trained on raw pixels). Those two numbers per
masked patch come from the image, not from the model: the picture shows the structure the model predicted inside
each patch, not the patch's brightness. --norm-pix off shows the raw prediction (for checkpoints trained without it);
auto reads the checkpoint's config (mae.norm_pix_loss; official MAE args), default on.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from torch import Tensor

from maect import hub

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


# ------------------------------------------------------------------------------------------------ reconstruction
def load_mae(path: str):
    """(MaskedAutoencoderViT with decoder, eval mode; norm_pix_loss recorded in the checkpoint or None) from a maect
    MAE checkpoint or an official MAE pretrain checkpoint that kept its decoder. ValueError (naming the path) when
    the checkpoint has no decoder."""
    from maect.config import from_dict
    ck = hub.load_checkpoint(path)
    sd, _, _ = hub.find_state_dict(ck)
    if not any(k.startswith("decoder_") for k in sd):
        raise ValueError(f"{path}: no MAE decoder in this checkpoint (a head / CT stage or an encoder export); "
                         f"reconstructions need the MAE stage's checkpoint, e.g. --ckpt-before runs/tiny/mae/checkpoint-final.pth")
    args = ck.get("args")
    cfg = from_dict(args) if isinstance(args, dict) and "model" in args else None
    mcfg = cfg.model if cfg is not None else hub.infer_model_cfg(sd)
    model = hub.model_from_cfg(mcfg, decoder=True)
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    if missing:
        raise ValueError(f"{path}: the MAE model lacks {hub._group(missing)}")
    model.load_state_dict({k: sd[k] for k in want}, strict=True)
    norm_pix = cfg.mae.norm_pix_loss if cfg is not None else getattr(args, "norm_pix_loss", None)
    return model.eval(), norm_pix


def unpatchify(x: Tensor, p: int, C: int) -> Tensor:
    """[N, L, p*p*C] -> [N, C, H, W]: the inverse of MaskedAutoencoderViT.patchify (row, col, channel last)."""
    N, L, _ = x.shape
    h = int(round(L ** 0.5))
    x = x.reshape(N, h, h, p, p, C)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(N, C, h * p, h * p)


@torch.no_grad()
def reconstruct(model, x: Tensor, mask_ratio: float, norm_pix: bool, seed: int = 0) -> dict[str, Tensor]:
    """x [N, C, H, W] (normalised as in training) -> {'original', 'masked', 'reconstruction', 'pasted'}, each
    [N, C, H, W] in the same normalised space; masked patches are 0 (the data mean) in 'masked'. The mask noise is
    drawn from `seed` (the same patches for every run)."""
    p, C = model.patch_embed.patch_size, model.in_chans
    L = model.patch_embed.num_patches
    noise = torch.rand(x.shape[0], L, generator=torch.Generator().manual_seed(seed)).to(x.device)
    _, pred, mask = model(x, mask_ratio=mask_ratio, norm_pix_loss=norm_pix, noise=noise)   # [N, L, p*p*C], [N, L]
    pred = pred.float()
    if norm_pix:   # un-normalise with each original patch's own statistics (module docstring: not the model's)
        target = model.patchify(x)
        pred = pred * (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    m = unpatchify(mask[:, :, None].expand(-1, -1, p * p * C).float(), p, C)   # 1 = masked
    rec = unpatchify(pred, p, C)
    return {"original": x, "masked": x * (1 - m), "reconstruction": rec, "pasted": x * (1 - m) + rec * m}


def to_display(x: Tensor, mean, std) -> Tensor:
    """Undo the data normalisation: [N, C, H, W] -> [N, H, W, C] in [0, 1]."""
    C = x.shape[1]
    mean = torch.tensor(list(mean) * (C // len(mean)), device=x.device).view(1, C, 1, 1)
    std = torch.tensor(list(std) * (C // len(std)), device=x.device).view(1, C, 1, 1)
    return (x * std + mean).clamp(0, 1).permute(0, 2, 3, 1).cpu()


def reconstruction_png(images: dict[str, Tensor], labels: list[str], mean, std, title: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = [("original", "original"), ("masked", "masked (input)"), ("reconstruction", "reconstruction"),
            ("pasted", "reconstruction\n+ visible")]
    shown = {k: to_display(v, mean, std).numpy() for k, v in images.items()}
    n = shown["original"].shape[0]
    fig, axes = plt.subplots(n, len(cols), figsize=(1.5 * len(cols) + 1.1, 1.5 * n + 0.6), squeeze=False)
    for r in range(n):
        for c, (key, name) in enumerate(cols):
            ax, img = axes[r][c], shown[key][r]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=8)
            if c == 0:
                ax.set_ylabel(labels[r], fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))   # room for the title above the column names
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ embedding
def embed_2d(f: Tensor, method: str, seed: int = 0) -> tuple[Tensor, str]:
    """[N, D] features -> ([N, 2], description). Features are L2-normalised first (the geometry of k-NN).
    pca: the top-2 principal components (SVD of the centred features) with their share of the variance;
    umap: umap-learn, cosine metric, seeded; auto: umap when installed, else pca."""
    f = torch.nn.functional.normalize(f.float(), dim=1).cpu()
    if method in ("auto", "umap"):
        try:
            import umap
        except ImportError:
            if method == "umap":
                raise RuntimeError("--method umap needs umap-learn: pip install umap-learn") from None
        else:
            z = umap.UMAP(n_components=2, metric="cosine", random_state=seed).fit_transform(f.numpy())
            return torch.as_tensor(z), "UMAP (cosine)"
    fc = f - f.mean(dim=0, keepdim=True)
    _, S, V = torch.linalg.svd(fc, full_matrices=False)
    share = (S[:2] ** 2).sum() / (S ** 2).sum()
    return fc @ V[:2].T, f"PCA (2 components: {100 * share:.0f}% of the variance)"


def embedding_png(panels: list[tuple[str, Tensor]], labels: Tensor, class_names, path: str) -> None:
    """panels: [(title, [N, 2])]; points coloured by label (grey when there are no labels)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels) + 1.6, 4.4), squeeze=False)
    y = labels.cpu().numpy()
    panels = [(title, z.cpu().numpy()) for title, z in panels]
    classes = sorted(int(c) for c in set(y.tolist()) if c >= 0)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    colour = {c: cmap(i % cmap.N) for i, c in enumerate(classes)}
    point_colours = [colour.get(int(c), "0.5") for c in y]             # grey: unlabelled
    order = np.random.default_rng(0).permutation(len(y))              # no class drawn on top of all the others
    for ax, (title, z) in zip(axes[0], panels):
        ax.scatter(z[order, 0], z[order, 1], s=3, c=[point_colours[i] for i in order], linewidths=0)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    if classes and len(classes) <= 20:
        names = [class_names[c] if class_names and c < len(class_names) else str(c) for c in classes]
        handles = [plt.Line2D([], [], marker="o", ls="", ms=4, color=colour[c]) for c in classes]
        axes[0][-1].legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ data
def load_viz_data(name: str, root, labels: str):
    """(test images, whether they carry labels): the labelled test split evaluation reads; for an unlabelled
    folder / file list (no data.labels) its training images, drawn uncoloured."""
    from maect.dataloading import NoLabels, load_data, load_eval_data
    try:
        return load_eval_data(name, root, "test", labels), True
    except NoLabels as exc:
        print(f"maect.viz: {exc}: the embedding is drawn without label colours", file=sys.stderr)
        return load_data(name, root, "train"), False


def one_per_class(labels: Tensor, n: int) -> Tensor:
    """n indices: the first image of each class in turn (then the next of each), so the grid spans the classes."""
    order, seen = [], {}
    for i, c in enumerate(labels.tolist()):
        seen.setdefault(c, []).append(i)
    queues = [seen[c] for c in sorted(seen)]
    while len(order) < n and any(queues):
        for q in queues:
            if q and len(order) < n:
                order.append(q.pop(0))
    return torch.tensor(order, dtype=torch.long)


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m maect.viz", description=__doc__.split("\n\n")[1])
    p.add_argument("--ckpt", required=True, help="checkpoint to show (e.g. the CT stage's; an MAE one also works)")
    p.add_argument("--ckpt-before", default=None, help="the checkpoint before CT (the MAE stage's): its decoder "
                                                       "draws the reconstructions, its encoder the left embedding")
    p.add_argument("--out", required=True, help="folder for reconstruction.png and embedding.png")
    p.add_argument("--data", default=None, help="fashion_mnist | imagefolder | folder | filelist | wds (default: the "
                                                "checkpoint's)")
    p.add_argument("--data-root", default=None, help="data directory or file list (default: the checkpoint's)")
    p.add_argument("--labels", default=None, help="folder / filelist: their labels (default: the checkpoint's "
                                                  "data.labels; none: uncoloured embedding)")
    p.add_argument("--n", type=int, default=10, help="images in the reconstruction grid")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--norm-pix", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--embed-n", type=int, default=2000, help="test images in the embedding plot")
    p.add_argument("--method", default="auto", choices=("auto", "pca", "umap"))
    p.add_argument("--use-ema", action="store_true", help="--ckpt's EMA encoder for its embedding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    if not 0 < a.mask_ratio < 1:
        p.error(f"--mask-ratio must be in (0, 1), got {a.mask_ratio}")
    if a.n < 1 or a.embed_n < 2:
        p.error(f"--n must be >= 1 and --embed-n >= 2, got {a.n} and {a.embed_n}")
    return a


def run(a: argparse.Namespace) -> dict[str, str]:
    from maect.dataloading import eval_batches
    from maect.eval.features import extract_features
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          "cpu" if a.device == "auto" else a.device)
    after, info = hub.load_encoder(a.ckpt, use_ema=a.use_ema)
    recorded = info.get("data") or {}
    name = a.data or recorded.get("name") or "fashion_mnist"
    cfg = info.get("config")
    labels = a.labels if a.labels is not None else (getattr(cfg.data, "labels", "") if cfg is not None else "")
    data, labelled = load_viz_data(name, a.data_root if a.data_root is not None else (recorded.get("root") or None),
                                   labels)
    class_names = FASHION_MNIST_CLASSES if name == "fashion_mnist" else (list(data.classes) or None)
    batch = dict(img_size=info["img_size"], in_chans=info["in_chans"], device=device)
    os.makedirs(a.out, exist_ok=True)
    written = {}

    src = next((c for c in (a.ckpt_before, a.ckpt) if c and _has_decoder(c)), None)
    if src is None:
        print(f"maect.viz: no MAE decoder in {a.ckpt}{' or ' + a.ckpt_before if a.ckpt_before else ''}: "
              f"reconstruction.png skipped (pass the MAE stage's checkpoint as --ckpt-before)", file=sys.stderr)
    else:
        mae, norm_pix = load_mae(src)
        norm_pix = {"on": True, "off": False}.get(a.norm_pix, True if norm_pix is None else bool(norm_pix))
        cand = torch.randperm(len(data), generator=torch.Generator().manual_seed(a.seed))[: max(2000, a.n)]
        idx = cand[one_per_class(data.labels[cand], a.n)]
        x, y = next(iter(eval_batches(data.subset(idx), batch_size=len(idx), **batch)))
        imgs = reconstruct(mae.to(device), x, a.mask_ratio, norm_pix, a.seed)
        names = [class_names[c] if class_names and 0 <= c < len(class_names) else "" if c < 0 else str(c)
                 for c in y.tolist()]
        title = (f"{_short(src)}, mask "
                 f"{a.mask_ratio:.0%}" + (", norm-pix: patches un-normalised with the original patch's mean/var"
                                          if norm_pix else ", raw-pixel targets"))
        written["reconstruction"] = os.path.join(a.out, "reconstruction.png")
        reconstruction_png(imgs, names, data.mean, data.std, title, written["reconstruction"])

    g = torch.Generator().manual_seed(a.seed)
    idx = torch.randperm(len(data), generator=g)[: a.embed_n].sort().values   # a seeded sample over all classes
    panels, y = [], None
    for path, use_ema in ((a.ckpt_before, False), (a.ckpt, a.use_ema)):
        if not path:
            continue
        enc, inf = (after, info) if path == a.ckpt else hub.load_encoder(path)
        f, y = extract_features(enc.to(device), eval_batches(data.subset(idx), batch_size=256, **batch),
                                     pool=inf["pool"], device=device)
        z, how = embed_2d(f, a.method, a.seed)
        panels.append((f"{_short(path)}{' (EMA encoder)' if use_ema else ''}\n{inf['pool']}-pooled features, {how}", z))
    written["embedding"] = os.path.join(a.out, "embedding.png")
    embedding_png(panels, y if labelled else torch.full_like(y, -1), class_names, written["embedding"])
    return written


def _short(path: str) -> str:
    """'runs/tiny/mae/checkpoint-final.pth' -> 'mae/checkpoint-final.pth' (the stage folder names the stage)."""
    return f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}/{os.path.basename(path)}"


def _has_decoder(path: str) -> bool:
    if hub.is_safetensors(path):      # exports hold the encoder only
        return False
    sd, _, _ = hub.find_state_dict(hub.load_checkpoint(path))
    return any(k.startswith("decoder_") for k in sd)


def main(argv=None) -> dict[str, str]:
    a = parse_args(argv)
    try:
        written = run(a)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        sys.exit(f"maect.viz: {exc}")
    for kind, path in written.items():
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
