"""The report: what an encoder's features group together, as a static HTML page (maect.viz writes it).

    report.write(out, encoders, data, class_names, ...) -> OUT/index.html, OUT/thumbs/*, OUT/clusters-*.png

For one or two encoders (before | after, e.g. MAE | MAE-CT) on one image set, from features extracted once:
  Clusters           k-means (maect.eval.cluster.kmeans on the L2-normalised features, the call and defaults of
                     `maect.eval --protocols cluster`: k = the number of classes unless given, 10 seeded k-means++
                     restarts, the lowest inertia kept) per encoder. Each cluster: its size, the images nearest its
                     centroid, a seeded random sample of the rest. With labels: the majority class and the purity
                     (majority count / size), and the cluster x class heat map with ACC (Hungarian-matched,
                     maect.eval.cluster.hungarian_accuracy) and NMI (scikit-learn); clusters are listed in the order
                     of the classes they are matched to, so the matched cells lie on the diagonal. Unlabelled: by size.
  Nearest neighbours a fixed set of query images (one per class when labels exist, evenly spaced classes when there
                     are more classes than queries; else a seeded sample), each with its top-k neighbours among the
                     other images under each encoder side by side: cosine similarity of the L2-normalised features
                     (the k-NN protocol's), written under each image; a neighbour whose class differs from the
                     query's is marked.
  Pictures, figures  the embedding scatter and reconstruction PNGs (maect.viz), and the run's k-NN / k-means / probe
                     figures from results.json and `maect.eval` output when they exist.

The page is one HTML file with its CSS inline, no script and no network address: it opens from file:// on a machine
without a network, and the folder can be copied or zipped as it is. Thumbnails are written only for the images the
page shows (a few hundred, however large the image set): PNG at the source size when it is small (<= 64 px, drawn
with sharp pixels), else JPEG (quality 85) with the longer side cut to `thumb` px.
"""
from __future__ import annotations

import html
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from maect.atomic import atomic_write
from maect.progress import Progress

SMALL_IMAGE = 64      # px: sources up to this size are shown at their own pixels (PNG, nearest-neighbour scaling)


@dataclass
class Encoder:
    """One checkpoint's features on the report's images. name: its column title ('MAE', 'MAE-CT'); path: the
    checkpoint; features: float32 [N, D] (any device; row i = image i of the report's data); note: one line for
    the header (pooling, EMA, where the features came from)."""
    name: str
    path: str
    features: Tensor
    note: str = ""
    clusters: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ what is shown
def cluster_view(f: Tensor, labels: Tensor | None, k: int, restarts: int = 10, seed: int = 0, show: int = 8,
                 progress: str = "") -> dict:
    """k-means of f [N, D] (L2-normalised first, as cluster_eval does) and what the page shows of each cluster.

    labels: int64 [N] class indices, or None (unlabelled). Returns {'k', 'inertia', 'order' (cluster ids in page
    order), 'size' [k], 'nearest' [k lists of <= show image indices, nearest the centroid first], 'sample' [k
    lists of <= show indices: a seeded random draw from the cluster's other members], 'assign' int64 [N]} and, with
    labels, 'table' int64 [k, C] (cluster x class counts), 'acc', 'nmi' (%), 'majority' [k], 'purity' [k] (0..1).
    ValueError for k outside [1, N]."""
    from maect.eval.cluster import hungarian_accuracy, kmeans
    x = F.normalize(f.float(), dim=1, eps=1e-12)
    res = kmeans(x, k, restarts=restarts, seed=seed, progress=progress)
    assign, centres = res["labels"], res["centres"]
    d = ((x - centres[assign]) ** 2).sum(1)                           # squared distance to the own centroid [N]
    assign_c, d_c = assign.cpu(), d.cpu()
    g = torch.Generator().manual_seed(seed)
    size = torch.bincount(assign_c, minlength=k)
    out = {"k": k, "inertia": res["inertia"], "size": size.tolist(), "nearest": [], "sample": [], "assign": assign_c}
    by = d_c.argsort(stable=True)
    by = by[assign_c[by].argsort(stable=True)]                       # grouped by cluster, nearest first in each
    for by_dist in by.split(size.tolist()):
        rest = by_dist[show:]
        out["nearest"].append(by_dist[:show].tolist())
        out["sample"].append(rest[torch.randperm(len(rest), generator=g)[:show]].sort().values.tolist())
    order = sorted(range(k), key=lambda c: (-out["size"][c], c))      # unlabelled: the largest first
    if labels is not None:
        from scipy.optimize import linear_sum_assignment
        from sklearn.metrics import normalized_mutual_info_score
        y = labels.cpu().numpy().astype(np.int64)
        C = int(y.max()) + 1
        table = np.zeros((k, C), dtype=np.int64)
        np.add.at(table, (assign_c.numpy(), y), 1)
        rows, cols = linear_sum_assignment(table, maximize=True)
        matched = [int(r) for _, r in sorted(zip(cols, rows))]        # clusters in the order of their classes
        order = matched + [c for c in order if c not in set(matched)]
        out.update(table=table, acc=hungarian_accuracy(assign_c.numpy(), y),
                   nmi=100.0 * float(normalized_mutual_info_score(y, assign_c.numpy())),
                   majority=table.argmax(1).tolist(),
                   purity=(table.max(1) / np.maximum(table.sum(1), 1)).tolist())
    out["order"] = order
    return out


def pick_queries(labels: Tensor | None, n: int, N: int, seed: int = 0) -> list[int]:
    """n query indices among N images, fixed by `seed`: with labels one per class (the first of each class in a
    seeded permutation; when there are more classes than n, n evenly spaced classes), in class order; without
    labels the first n of a seeded permutation."""
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
    if labels is None:
        return perm[:n].tolist()
    y = labels.cpu()[perm]
    classes = sorted(set(y.tolist()))
    if len(classes) > n:
        classes = [classes[i] for i in np.linspace(0, len(classes) - 1, n).round().astype(int)]
    return [int(perm[(y == c).nonzero()[0, 0]]) for c in classes]


def nearest_neighbours(f: Tensor, queries: list[int], topk: int) -> tuple[Tensor, Tensor]:
    """Top-`topk` neighbours of each query row of f [N, D] among the other rows, by cosine similarity (L2-normalised
    rows, the k-NN protocol's geometry), the query itself left out. Returns (indices int64 [Q, topk], similarities
    float32 [Q, topk]) on the CPU, most similar first; topk is cut to N - 1."""
    x = F.normalize(f.float(), dim=1, eps=1e-12)
    q = torch.as_tensor(queries, dtype=torch.long, device=x.device)
    s = x[q] @ x.t()                                                  # [Q, N]
    s[torch.arange(len(q), device=x.device), q] = -float("inf")
    sim, idx = s.topk(min(topk, x.shape[0] - 1), dim=1)
    return idx.cpu(), sim.cpu()


# ------------------------------------------------------------------------------------------------ thumbnails
def source_image(data, i: int) -> np.ndarray:
    """Image i of any source maect reads as uint8 [H, W, C] (C = 1 or 3): the array itself for Fashion-MNIST,
    the decoded file / shard member (images.decode_image, the loaders' rule) for file sources."""
    from maect.dataloading.datasets import ArrayData
    t = data.images[i] if isinstance(data, ArrayData) else data.load(i)
    return t.permute(1, 2, 0).numpy()


def write_thumbnails(data, ids, folder: str, thumb: int) -> dict[int, str]:
    """{image index: file name under folder} for the distinct `ids`; see the module docstring for the format.
    Progress lines (images/s) for long runs."""
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    ids = sorted(set(int(i) for i in ids))
    names = {}
    prog = Progress("report thumbnails", len(ids))
    for i in ids:
        a = source_image(data, i)
        im = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
        if max(im.size) <= SMALL_IMAGE:
            names[i], fmt, kw = f"{i}.png", "PNG", {"optimize": True}
        else:
            im.thumbnail((thumb, thumb), Image.LANCZOS)
            names[i], fmt, kw = f"{i}.jpg", "JPEG", {"quality": 85}
        im.save(os.path.join(folder, names[i]), format=fmt, **kw)
        prog.update()
    prog.done()
    return names


def heatmap_png(view: dict, class_names, title: str, path: str) -> None:
    """The cluster x class table as a heat map (rows: clusters in page order; colour: share of the cluster;
    counts written in the cells when the table is small)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t = view["table"][view["order"]]
    share = t / np.maximum(t.sum(1, keepdims=True), 1)
    k, C = t.shape
    fig, ax = plt.subplots(figsize=(min(1.6 + 0.42 * C, 12), min(1.3 + 0.32 * k, 12)))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    if k * C <= 625:
        for r in range(k):
            for c in range(C):
                if t[r, c]:
                    ax.text(c, r, str(t[r, c]), ha="center", va="center", fontsize=6,
                            color="white" if share[r, c] > 0.55 else "#333")
    if C <= 40:
        ax.set_xticks(range(C), [_class(class_names, c) for c in range(C)], rotation=45, ha="right", fontsize=7)
    if k <= 40:
        ax.set_yticks(range(k), [f"cluster {c}" for c in view["order"]], fontsize=7)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ the page
CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0 24px 40px;
 color:#222;background:#fafafa}
h1{font-size:20px;margin:16px 0 4px}h2{font-size:17px;border-bottom:1px solid #ccc;padding-bottom:3px;margin:26px 0 8px}
h3{font-size:13px;margin:0 0 3px;font-weight:600}h4{font-size:12px;margin:0 0 2px;font-weight:600}
p{margin:4px 0}.meta{color:#555;font-size:12px}nav a{margin-right:14px}code{font-size:12px}
table.fig{border-collapse:collapse;margin:4px 0 10px;font-size:13px}
table.fig td,table.fig th{border:1px solid #ddd;padding:2px 9px;text-align:right}
table.fig th:first-child,table.fig td:first-child{text-align:left}
pre{font-size:12px;background:#fff;border:1px solid #ddd;padding:6px 8px;display:inline-block;margin:4px 0}
.thumbs{display:flex;flex-wrap:wrap;gap:3px}
figure.t{margin:0;width:var(--t);font-size:10px;line-height:1.2;text-align:center;color:#555}
figure.t img{width:var(--t);height:var(--t);object-fit:contain;background:#111;display:block;
 border:2px solid transparent;box-sizing:border-box}
.px figure.t img{image-rendering:pixelated}
figure.miss img{border-color:#d33}figure.miss figcaption{color:#c22;font-weight:600}
figure.q img{border-color:#2a6}
.nn-row{display:flex;flex-wrap:wrap;gap:22px;align-items:flex-start;padding:6px 0;border-bottom:1px solid #e4e4e4}
.cluster{display:flex;flex-wrap:wrap;gap:22px;align-items:flex-start;padding:6px 0;border-bottom:1px solid #e4e4e4}
.cluster .head{width:150px;font-size:12px}.strip .what{font-size:11px;color:#666}
.pics img{max-width:100%;margin:4px 12px 4px 0;vertical-align:top}
.warn{color:#a40}
"""


def _class(class_names, c: int) -> str:
    return str(class_names[c]) if class_names and 0 <= c < len(class_names) else str(c)


def _thumb(names: dict, data, i: int, caption: str = "", cls: str = "", title: str = "") -> str:
    files = getattr(data, "files", None)      # image files and shard members: the file / 'shard.tar:key.ext'
    tip = title or (files[i] if files is not None else f"image {i}")
    return (f'<figure class="t{" " + cls if cls else ""}"><img src="thumbs/{names[i]}" alt="image {i}" '
            f'title="{html.escape(str(tip))}"><figcaption>{caption}</figcaption></figure>')


def _figures(paths: list[str]) -> str:
    """The run's figures: results.json of a pipeline (k-NN / k-means of MAE and MAE-CT) and maect.eval outputs."""
    import json
    parts = []
    for p in paths:
        try:
            with open(p) as fh:
                res = json.load(fh)
        except (OSError, ValueError) as exc:
            parts.append(f'<p class="warn">{html.escape(p)}: not read ({html.escape(str(exc))})</p>')
            continue
        src = f'<p class="meta"><code>{html.escape(os.path.abspath(p))}</code></p>'
        if isinstance(res.get("final"), dict):
            rows = "".join(f"<tr><td>{html.escape(n)}</td>" + "".join(
                "<td>-</td>" if v.get(c) is None else f"<td>{v[c]:.2f}</td>" for c in ("knn", "kmeans_acc", "kmeans_nmi"))
                + "</tr>" for n, v in res["final"].items())
            parts.append(f"{src}<table class=fig><tr><th>the run's final evaluation, %</th><th>k-NN</th>"
                         f"<th>k-means ACC</th><th>NMI</th></tr>{rows}</table>")
        elif isinstance(res.get("protocols"), dict):
            from maect.eval.__main__ import table
            try:
                text = table(res)
            except (KeyError, TypeError, ValueError) as exc:
                text = f"not a maect.eval result ({exc})"
            parts.append(f"{src}<pre>{html.escape(text)}</pre>")
        elif "stage_minutes" in res:
            parts.append(f"{src}<p>no final evaluation in this run (unlabelled data): stage minutes "
                         f"{html.escape(str(res['stage_minutes']))}</p>")
    return "".join(parts)


def write(out: str, encoders: list[Encoder], data, class_names=None, *, labelled: bool, title: str, source: str,
          k: int | None = None, queries: int | None = None, topk: int = 8, show: int = 8, show_clusters: int = 50,
          thumb: int = 96, restarts: int = 10, seed: int = 0, figures: list[str] = (),
          pictures: dict[str, str] | None = None, notes: list[str] = ()) -> dict:
    """Write out/index.html (and its thumbnails and heat maps) for `encoders` (1 or 2: before first) on `data` (any
    source; image i = feature row i of every encoder). labelled: data.labels are class indices (else no purity,
    ACC, NMI or marks); k: clusters (default: the number of classes, 10 without labels); queries: query images
    (default: one per class up to 20; 10 without labels); show: images per strip; show_clusters: clusters drawn per
    encoder (all are computed); pictures: {caption: png path} shown as they are (copied beside the page when they
    live elsewhere); figures: JSON files (results.json, maect.eval output). Returns {'path', 'seconds', 'clusters'
    (drawn per encoder), 'queries', 'thumbnails', 'views' ({name: cluster_view})}. ValueError names a bad value."""
    t0 = time.perf_counter()
    if not 1 <= len(encoders) <= 2:
        raise ValueError(f"report: 1 or 2 encoders, got {len(encoders)}")
    N = len(data)
    for e in encoders:
        if e.features.shape[0] != N:
            raise ValueError(f"report: {e.name} ({e.path}) has {e.features.shape[0]} feature rows for {N} images")
    y = data.labels[:N].cpu() if labelled else None
    num_classes = int(y.max()) + 1 if labelled else None
    k = k or num_classes or 10
    if not 1 <= k <= N:
        raise ValueError(f"report: k={k} clusters must lie in [1, {N}] (the number of images)")
    n_q = min(queries or (min(len(set(y.tolist())), 20) if labelled else 10), N)
    os.makedirs(out, exist_ok=True)
    for e in encoders:
        e.clusters = cluster_view(e.features, y, k, restarts=restarts, seed=seed, show=show,
                                  progress=f"report k-means {e.name}")
    q = pick_queries(y, n_q, N, seed)
    nn = [nearest_neighbours(e.features, q, topk) for e in encoders]
    drawn = min(k, show_clusters)
    shown = set(q)
    for e in encoders:
        for c in e.clusters["order"][:drawn]:
            shown.update(e.clusters["nearest"][c] + e.clusters["sample"][c])
    for idx, _ in nn:
        shown.update(idx.flatten().tolist())
    names = write_thumbnails(data, shown, os.path.join(out, "thumbs"), thumb)
    side = max(max(source_image(data, i).shape[:2]) for i in (q[0], q[-1]))   # the source's image size, px
    small = side <= SMALL_IMAGE
    t = max(1, SMALL_IMAGE // side) * side if small else 80         # small sources: a whole multiple of their pixels

    def cap(c): return html.escape(_class(class_names, c))
    body = [f"<h1>{html.escape(title)}</h1>",
            f'<p class="meta">{html.escape(source)}: {N} images, {"labelled (" + str(num_classes) + " classes)" if labelled else "no labels"}'
            f" · made {time.strftime('%Y-%m-%d %H:%M')} by <code>maect.viz</code></p>"]
    body += [f'<p class="meta"><b>{html.escape(e.name)}</b>: <code>{html.escape(os.path.abspath(e.path))}</code> '
             f"{html.escape(e.note)}</p>" for e in encoders]
    body += [f'<p class="meta warn">{html.escape(n)}</p>' for n in notes]
    links = [("neighbours", "Nearest neighbours")] + [(f"clusters-{j}", f"Clusters: {e.name}") for j, e in
                                                      enumerate(encoders)]
    links += [("pictures", "Embedding and reconstructions")] * bool(pictures) + [("figures", "Figures")] * bool(figures)
    body.append("<nav>" + "".join(f'<a href="#{a}">{html.escape(b)}</a>' for a, b in links) + "</nav>")

    # nearest neighbours
    body.append(f'<section id="neighbours"><h2>Nearest neighbours</h2><p class="meta">{n_q} query images '
                f"({'one per class' if labelled else 'a seeded sample'}); the top {nn[0][0].shape[1]} of the other "
                f"{N - 1} images under each encoder, cosine similarity of the L2-normalised features under each"
                f"{'; a red frame and the class name mark a neighbour of another class' if labelled else ''}.</p>")
    if labelled:
        agree = [float((y[idx] == y[torch.tensor(q)][:, None]).float().mean()) for idx, _ in nn]
        body.append('<p>Neighbours of the query\'s class: ' + " | ".join(
            f"<b>{html.escape(e.name)}</b> {100 * a:.0f}%" for e, a in zip(encoders, agree)) + "</p>")
    for r, i in enumerate(q):
        row = [f'<div class="nn-row" data-query="{i}"><div><h4>query</h4>'
               + _thumb(names, data, i, cap(int(y[i])) if labelled else f"#{i}", "q") + "</div>"]
        for e, (idx, sim) in zip(encoders, nn):
            ids = idx[r].tolist()
            same = sum(int(y[j]) == int(y[i]) for j in ids) if labelled else None
            figs = "".join(_thumb(names, data, j, f"{float(s):.3f}" + (
                f"<br>✗&nbsp;{cap(int(y[j]))}" if labelled and int(y[j]) != int(y[i]) else ""),
                "miss" if labelled and int(y[j]) != int(y[i]) else "") for j, s in zip(ids, sim[r].tolist()))
            row.append(f'<div class="nn-set" data-encoder="{html.escape(e.name)}"><h4>{html.escape(e.name)}'
                       f"{f' · {same}/{len(ids)} same class' if labelled else ''}</h4>"
                       f'<div class="thumbs">{figs}</div></div>')
        body.append("".join(row) + "</div>")
    body.append("</section>")

    # clusters
    for j, e in enumerate(encoders):
        v = e.clusters
        head = (f"k-means, k={k} ({restarts} seeded restarts, the lowest inertia kept) on the L2-normalised features"
                f"{f'; {drawn} of {k} clusters drawn (--show-clusters)' if drawn < k else ''}.")
        if labelled:
            head += (f" <b>ACC {v['acc']:.2f}%</b>, <b>NMI {v['nmi']:.2f}%</b> (Hungarian-matched; clusters in "
                     f"the order of their matched classes).")
            png = f"clusters-{j}.png"
            heatmap_png(v, class_names, f"{e.name}: clusters x classes (ACC {v['acc']:.1f}%, NMI {v['nmi']:.1f}%)",
                        os.path.join(out, png))
            head += f'<br><img class="heat" src="{png}" alt="{html.escape(e.name)} cluster x class heat map">'
        body.append(f'<section class="clusters" id="clusters-{j}"><h2>Clusters: {html.escape(e.name)}</h2>'
                    f"<p class=meta>{head}</p>")
        for c in v["order"][:drawn]:
            info = f"{v['size'][c]} images"
            maj = v["majority"][c] if labelled else None
            if labelled:
                info += f"<br>majority <b>{cap(maj)}</b><br>purity {100 * v['purity'][c]:.1f}%"

            def strip(ids, what):
                figs = "".join(_thumb(names, data, i, "", "miss" if labelled and int(y[i]) != maj else "",
                                      title=None) for i in ids)
                return f'<div class="strip"><div class="what">{what}</div><div class="thumbs">{figs}</div></div>'
            body.append(f'<section class="cluster" data-cluster="{c}"><div class="head"><h3>cluster {c}</h3>{info}'
                        f"</div>{strip(v['nearest'][c], 'nearest the centroid')}"
                        f"{strip(v['sample'][c], 'random members') if v['sample'][c] else ''}</section>")
        body.append("</section>")

    if pictures:
        body.append('<section id="pictures"><h2>Embedding and reconstructions</h2><div class="pics">')
        for caption, p in pictures.items():
            name = os.path.basename(p)
            if os.path.abspath(os.path.dirname(p)) != os.path.abspath(out):
                import shutil
                shutil.copyfile(p, os.path.join(out, name))
            body.append(f'<img src="{html.escape(name)}" alt="{html.escape(caption)}" title="{html.escape(caption)}">')
        body.append("</div></section>")
    if figures:
        body.append(f'<section id="figures"><h2>Figures</h2>{_figures(list(figures))}</section>')
    page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width,initial-scale=1"><title>{html.escape(title)}</title>'
            f'<link rel="icon" href="data:,"><style>:root{{--t:{t}px}}{CSS}</style></head>'
            f'<body{" class=px" if small else ""}>\n' + "\n".join(body) + "\n</body></html>\n")
    path = os.path.join(out, "index.html")
    atomic_write(path, lambda fh: fh.write(page.encode("utf-8")), binary=True)
    return {"path": path, "seconds": time.perf_counter() - t0, "clusters": drawn, "queries": len(q),
            "thumbnails": len(names), "views": {e.name: e.clusters for e in encoders}}
