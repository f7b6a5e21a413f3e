"""python -m maect.viz --ckpt PATH [--ckpt-before PATH] [--data NAME] [--data-root DIR] --out DIR

See what an encoder learned, in --out:
  index.html          the report (maect.viz.report): k-means clusters of each encoder's features (size, the images
                      nearest the centroid, a random sample; with labels the majority class, purity, the cluster x
                      class heat map, ACC and NMI), each query image's nearest neighbours under --ckpt-before and
                      --ckpt side by side, the two PNGs below and the run's figures (results.json, maect.eval
                      output). A static page (no script, no network) with thumbnails of the images it shows in
                      thumbs/. Features come from one pass of each encoder over the images, cached in
                      OUT/features (--feature-cache) like maect.eval's. --no-report: the two PNGs only.
  reconstruction.png  one row per test image (one per class first): original | masked (the visible 25%) |
                      reconstruction (the decoder's prediction for every patch) | reconstruction with the visible
                      patches pasted back (what the MAE loss is scored on: the masked patches). Needs a checkpoint
                      with the MAE decoder: --ckpt-before when it has one, else --ckpt (an MAE checkpoint).
  embedding.png       --embed-n images' features (the encoder's pooled, L2-normalised output: what k-NN sees) in
                      2-D, coloured by label: PCA, or UMAP (cosine) when umap-learn is installed (--method). With
                      --ckpt-before: that encoder (e.g. MAE) and --ckpt's (e.g. MAE-CT) side by side.

Images: the labelled test split evaluation reads (Fashion-MNIST's test set, imagefolder's val/, data.labels' val rows,
val-*.tar shards); for an unlabelled folder / file list / shards (no labels) its training images, and the report
without purity, ACC, NMI or class marks.

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
import logging
import os
import sys

import numpy as np
import torch
from torch import Tensor

from maect import hub
from maect.viz import report

log = logging.getLogger("maect")

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
    """(images, whether every one carries a label): the labelled test split evaluation reads; for an unlabelled
    folder / file list / shards (no data.labels, no val shards, no cls members) its training images."""
    from maect.dataloading import NoLabels, load_data, load_eval_data
    why = "without label colours and the report without purity, ACC, NMI or class marks"
    try:
        data = load_eval_data(name, root, "test", labels)
    except NoLabels as exc:
        print(f"maect.viz: {exc}: the embedding is drawn {why}", file=sys.stderr)
        return load_data(name, root, "train"), False
    if not data.has_labels:
        print(f"maect.viz: {int((data.labels < 0).sum())} of {len(data)} evaluation images have no label: the "
              f"embedding is drawn {why}", file=sys.stderr)
        return data, False
    return data, True


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


# ------------------------------------------------------------------------------------------------ checkpoints
STAGE_NAMES = {"mae": "MAE", "ct": "MAE-CT", "head": "MAE + NNCLR head"}


def open_checkpoint(path: str, use_ema: bool = False):
    """(encoder in eval mode, load_encoder's info, the checkpoint's stage or None, whether it holds the MAE decoder),
    reading the file once. Errors name the path."""
    if hub.is_safetensors(path):               # exports hold the encoder only
        enc, info = hub.load_encoder(path, use_ema=use_ema)
        return enc, info, None, False
    ck = hub.load_checkpoint(path)
    try:
        enc, info = hub.load_encoder(ck, use_ema=use_ema)
    except ValueError as exc:
        raise ValueError(f"{path}: {str(exc).removeprefix('<in-memory checkpoint>: ')}") from None
    sd, _, _ = hub.find_state_dict(ck)
    stage = ck.get("stage") if isinstance(ck, dict) else None
    return enc, info, stage, any(k.startswith("decoder_") for k in sd)


def encoder_names(stages: list, paths: list[str], given: str | None = None) -> list[str]:
    """Column titles: --names 'A,B', else the stage's name (MAE, MAE-CT), else the short path; made distinct."""
    if given:
        names = [s.strip() for s in given.split(",")]
        if len(names) != len(paths) or not all(names):
            raise ValueError(f"--names {given!r}: give {len(paths)} comma-separated names, one per checkpoint "
                             f"(--ckpt-before first)")
        return names
    names = [STAGE_NAMES.get(s) or _short(p) for s, p in zip(stages, paths)]
    if len(set(names)) < len(names):
        names = [f"{n} ({_short(p)})" for n, p in zip(names, paths)]
    return names


def report_features(enc, info: dict, path: str, use_ema: bool, data, split: str, meta_data: dict, cache: str | None,
                    device, name: str) -> tuple[Tensor, str]:
    """(features float32 [N, D] of every image of `data`, 'cache' | 'encoder'): one pass of the encoder, or the
    feature cache of maect.eval (maect.eval.features: P.features.npy, P.labels.npy, P.json; reused only when the
    metadata match: checkpoint path, mtime and size, pooling, split, image size, data, limit, EMA, classes)."""
    from maect.dataloading import eval_batches
    from maect.eval.features import cache_features, extract_features, feature_meta, load_cached
    meta = dict(feature_meta(path, pool=info["pool"], split=split, img_size=info["img_size"],
                             in_chans=info["in_chans"], use_ema=use_ema, **meta_data), classes=list(data.classes))
    prefix = None
    if cache:
        slug = os.path.splitext(_short(path))[0].replace("/", "-") + ("-ema" if use_ema else "")
        prefix = os.path.join(cache, slug, split)
        hit = load_cached(prefix, meta)
        if hit is not None and hit[0].shape[0] == len(data):
            log.info(f"[report] {name}: features from the cache {prefix}.*")
            return hit[0].to(device), "cache"
    f, _ = extract_features(enc.to(device), eval_batches(data, img_size=info["img_size"], in_chans=info["in_chans"],
                                                         batch_size=256, device=device),
                            pool=info["pool"], device=device, progress=f"features {name}", total=len(data))
    if prefix:
        cache_features(prefix, f, data.labels[: len(f)], meta)
    return f, "encoder"


def find_figures(paths: list[str]) -> list[str]:
    """The run's figures beside the checkpoints: OUT_DIR/results.json of a pipeline (the checkpoint's stage folder's
    parent) and `python -m maect.eval`'s default output eval_<checkpoint name>.json beside each checkpoint."""
    found = []
    for p in paths:
        d = os.path.dirname(os.path.abspath(p))
        for f in (os.path.join(os.path.dirname(d), "results.json"),
                  os.path.join(d, f"eval_{os.path.splitext(os.path.basename(p))[0]}.json")):
            if os.path.isfile(f) and f not in found:
                found.append(f)
    return found


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m maect.viz", description=__doc__.split("\n\n")[1])
    p.add_argument("--ckpt", required=True, help="checkpoint to show (e.g. the CT stage's; an MAE one also works)")
    p.add_argument("--ckpt-before", default=None, help="the checkpoint before CT (the MAE stage's): its decoder "
                                                       "draws the reconstructions, its encoder the left column")
    p.add_argument("--out", required=True, help="folder for index.html, its thumbnails and the PNGs")
    p.add_argument("--data", default=None, help="fashion_mnist | imagefolder | folder | filelist | wds (default: "
                                                "the checkpoint's)")
    p.add_argument("--data-root", default=None, help="data directory, file list or shards (default: the checkpoint's)")
    p.add_argument("--labels", default=None, help="folder / filelist: their labels (default: the checkpoint's "
                                                  "data.labels; none: an unlabelled report)")
    p.add_argument("--limit", type=int, default=None, help="the first N images only (default: all)")
    p.add_argument("--k", type=int, default=None, help="k-means clusters (default: the number of classes; 10 "
                                                       "without labels)")
    p.add_argument("--queries", type=int, default=None, help="nearest-neighbour query images (default: one per "
                                                             "class up to 20; 10 without labels)")
    p.add_argument("--topk", type=int, default=8, help="neighbours shown per query and encoder")
    p.add_argument("--show", type=int, default=8, help="images per cluster strip (nearest the centroid; random)")
    p.add_argument("--show-clusters", type=int, default=50, help="clusters drawn per encoder (all are computed)")
    p.add_argument("--kmeans-restarts", type=int, default=10)
    p.add_argument("--thumb", type=int, default=96, help="longest thumbnail side in px (larger images only)")
    p.add_argument("--names", default=None, help="column titles 'BEFORE,AFTER' (default: the stages' names)")
    p.add_argument("--results", action="append", default=[], help="a results.json / maect.eval JSON to show (found "
                                                                   "beside the checkpoints without it); repeatable")
    p.add_argument("--feature-cache", default=None, metavar="DIR", help="feature cache (default: OUT/features; "
                                                                        "'none': no cache)")
    p.add_argument("--no-report", action="store_true", help="the two PNGs only (the embedding from --embed-n "
                                                            "images)")
    p.add_argument("--n", type=int, default=10, help="images in the reconstruction grid")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--norm-pix", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--embed-n", type=int, default=2000, help="images in the embedding plot")
    p.add_argument("--method", default="auto", choices=("auto", "pca", "umap"))
    p.add_argument("--use-ema", action="store_true", help="--ckpt's EMA encoder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    if not 0 < a.mask_ratio < 1:
        p.error(f"--mask-ratio must be in (0, 1), got {a.mask_ratio}")
    for flag, v, lo in (("--n", a.n, 1), ("--embed-n", a.embed_n, 2), ("--limit", a.limit, 2), ("--k", a.k, 1),
                        ("--queries", a.queries, 1), ("--topk", a.topk, 1), ("--show", a.show, 1),
                        ("--show-clusters", a.show_clusters, 1), ("--kmeans-restarts", a.kmeans_restarts, 1),
                        ("--thumb", a.thumb, 16)):
        if v is not None and v < lo:
            p.error(f"{flag}={v} must be >= {lo}")
    return a


def write_reconstruction(src: str, data, class_names, a, batch: dict, out: str) -> str:
    """reconstruction.png from the MAE checkpoint `src` on --n test images (one per class first)."""
    from maect.dataloading import eval_batches
    mae, norm_pix = load_mae(src)
    norm_pix = {"on": True, "off": False}.get(a.norm_pix, True if norm_pix is None else bool(norm_pix))
    cand = torch.randperm(len(data), generator=torch.Generator().manual_seed(a.seed))[: max(2000, a.n)]
    idx = cand[one_per_class(data.labels[cand], a.n)]
    x, y = next(iter(eval_batches(data.subset(idx), batch_size=len(idx), **batch)))
    imgs = reconstruct(mae.to(batch["device"]), x, a.mask_ratio, norm_pix, a.seed)
    names = [class_names[c] if class_names and 0 <= c < len(class_names) else "" if c < 0 else str(c)
             for c in y.tolist()]
    title = (f"{_short(src)}, mask "
             f"{a.mask_ratio:.0%}" + (", norm-pix: patches un-normalised with the original patch's mean/var"
                                      if norm_pix else ", raw-pixel targets"))
    path = os.path.join(out, "reconstruction.png")
    reconstruction_png(imgs, names, data.mean, data.std, title, path)
    return path


def run(a: argparse.Namespace) -> dict[str, str]:
    from maect.dataloading import eval_batches
    from maect.eval.features import extract_features
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          "cpu" if a.device == "auto" else a.device)
    paths = [p for p in (a.ckpt_before, a.ckpt) if p]
    opened = [open_checkpoint(p, use_ema=a.use_ema and p == a.ckpt) for p in paths]
    names = encoder_names([o[2] for o in opened], paths, a.names)
    after, info = opened[-1][0], opened[-1][1]
    recorded = info.get("data") or {}
    name = a.data or recorded.get("name") or "fashion_mnist"
    root = a.data_root if a.data_root is not None else (recorded.get("root") or None)
    cfg = info.get("config")
    labels = a.labels if a.labels is not None else (getattr(cfg.data, "labels", "") if cfg is not None else "")
    data, labelled = load_viz_data(name, root, labels)
    if a.limit and a.limit < len(data):
        data = data.subset(torch.arange(a.limit))
    class_names = FASHION_MNIST_CLASSES if name == "fashion_mnist" else (list(data.classes) or None)
    batch = dict(img_size=info["img_size"], in_chans=info["in_chans"], device=device)
    os.makedirs(a.out, exist_ok=True)
    written = {}

    src = next((p for p, o in zip(reversed(paths), reversed(opened)) if o[3]), None)   # --ckpt-before first
    if src is None:
        print(f"maect.viz: no MAE decoder in {' or '.join(paths)}: reconstruction.png skipped (pass the MAE stage's "
              f"checkpoint as --ckpt-before)", file=sys.stderr)
    else:
        written["reconstruction"] = write_reconstruction(src, data, class_names, a, batch, a.out)

    g = torch.Generator().manual_seed(a.seed)
    idx = torch.randperm(len(data), generator=g)[: a.embed_n].sort().values   # a seeded sample over all classes
    cache = None if a.feature_cache == "none" else (a.feature_cache or os.path.join(a.out, "features"))
    meta_data = dict(data=name, data_root=root, limit=a.limit)
    panels, encoders = [], []
    for path, (enc, inf, _, _), title in zip(paths, opened, names):
        use_ema = a.use_ema and path == a.ckpt
        if a.no_report:    # the embedding's images only
            f = extract_features(enc.to(device), eval_batches(data.subset(idx), batch_size=256, **batch),
                                 pool=inf["pool"], device=device)[0]
        else:
            full, how = report_features(enc, inf, path, use_ema, data, "test" if labelled else "train", meta_data,
                                        cache, device, title)
            encoders.append(report.Encoder(title, path, full, f"{inf['pool']}-pooled, D={full.shape[1]}"
                                           f"{', EMA encoder' if use_ema else ''}; features from the {how}"))
            f = full[idx.to(full.device)]
        z, how = embed_2d(f, a.method, a.seed)
        panels.append((f"{title}: {_short(path)}{' (EMA)' if use_ema else ''}\n{inf['pool']}-pooled features, {how}",
                       z))
    y = data.labels[idx]
    written["embedding"] = os.path.join(a.out, "embedding.png")
    embedding_png(panels, y if labelled else torch.full_like(y, -1), class_names, written["embedding"])
    if not a.no_report:
        figures = list(dict.fromkeys([*a.results, *find_figures(paths)]))
        pictures = {"embedding": written["embedding"]}
        if "reconstruction" in written:
            pictures["reconstructions"] = written["reconstruction"]
        rep = report.write(a.out, encoders, data, class_names, labelled=labelled, source=_source(name, root, labels),
                           title=f"maect report: {' | '.join(names)}", k=a.k, queries=a.queries, topk=a.topk,
                           show=a.show, show_clusters=a.show_clusters, thumb=a.thumb, restarts=a.kmeans_restarts,
                           seed=a.seed, figures=figures, pictures=pictures)
        written["report"] = rep["path"]
    return written


def _source(name: str, root, labels) -> str:
    return f"{name}{' ' + str(root) if root else ''}{' (labels ' + labels + ')' if labels else ''}"


def run_report(cfg, device, results: dict, data, labelled: bool, feats: dict | None = None) -> dict:
    """The report of a pipeline run (maect.train, stage=pipeline | ct_pipeline, rank 0, at the end):
    OUT_DIR/report/index.html for the encoders before CT (MAE: results['mae_checkpoint'], else init=) and after it
    (MAE-CT: results['ct_checkpoint'], its EMA encoder with eval.use_ema) on `data` (the final k-NN's test images
    when labelled). feats: {'MAE': [N, D], 'MAE-CT': [N, D]}, the features the final k-NN extracted for `data`
    (reused: no second pass), or None (extracted here). The embedding is PCA (fast; UMAP is the command's choice).
    Returns report.write's dict."""
    from maect.dataloading import eval_batches
    from maect.eval.features import extract_features
    out = os.path.join(cfg.out_dir, "report")
    os.makedirs(out, exist_ok=True)
    before, after = results.get("mae_checkpoint") or cfg.init, results["ct_checkpoint"]
    m = cfg.model
    batch = dict(img_size=m.img_size, in_chans=m.in_chans, device=device)
    encoders, panels = [], []
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:2000].sort().values
    for name, path, ema in (("MAE", before, False), ("MAE-CT", after, cfg.eval.use_ema)):
        if feats and name in feats:
            f, how = feats[name], "the final k-NN's pass"
        else:
            enc = hub.load_encoder(path, use_ema=ema)[0].to(device)
            f = extract_features(enc, eval_batches(data, batch_size=500, **batch), pool=m.pool, device=device,
                                 progress=f"report features {name}", total=len(data))[0]
            how = "the encoder"
        encoders.append(report.Encoder(name, path, f, f"{m.pool}-pooled, D={f.shape[1]}{', EMA encoder' if ema else ''}"
                                                       f"; features from {how}"))
        z, desc = embed_2d(f[idx.to(f.device)], "pca")
        panels.append((f"{name}: {_short(path)}\n{m.pool}-pooled features, {desc}", z))
    class_names = FASHION_MNIST_CLASSES if cfg.data.name == "fashion_mnist" else (list(data.classes) or None)
    y = data.labels[idx]
    pictures = {"embedding": os.path.join(out, "embedding.png")}
    embedding_png(panels, y if labelled else torch.full_like(y, -1), class_names, pictures["embedding"])
    if before and not hub.is_safetensors(before) and _has_decoder(before):
        a = argparse.Namespace(norm_pix="auto", seed=0, n=10, mask_ratio=cfg.mae.mask_ratio)
        pictures["reconstructions"] = write_reconstruction(before, data, class_names, a, batch, out)
    return report.write(out, encoders, data, class_names, labelled=labelled,
                        source=_source(cfg.data.name, cfg.data.root, cfg.data.labels),
                        title=f"maect report: {cfg.out_dir}", figures=find_figures([after]), pictures=pictures)


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
    if not logging.getLogger().handlers:   # progress lines (maect.progress) on stdout, like maect.eval's
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    try:
        written = run(a)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:    # DataError and NonFiniteFeatures included
        sys.exit(f"maect.viz: {exc}")
    for kind, path in written.items():
        print(f"wrote {path}")
    return written
