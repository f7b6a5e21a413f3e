"""python -m maect.eval --ckpt PATH [--protocols knn,probe,lowshot,cluster] [--data fashion_mnist|imagefolder|folder|
       filelist|wds] [--data-root DIR] [--labels DIR|CSV] [--skip-corrupt] [--pool cls|mean] [--device auto|cpu|cuda]
       [--out results.json] [--export-features DIR] [--knn-k 20] [--probe-epochs 50] [--probe-aug] [--no-antialias]
       [--train-limit N --test-limit N]

Loads the encoder (maect.hub.load_encoder), extracts train/test features once (or reuses the cache in
--export-features DIR when its metadata matches), runs the protocols on the features, prints a table and writes
the JSON. The checkpoint records the pooling, image size and data set; flags override them. Labels: image folders
label every split by the training split's class folders; folder / filelist sources are evaluated on their labels
(--labels, default the checkpoint's data.labels); WebDataset shards (wds) by their cls members. Samples without a
label (a shard sample without cls) are left out of every protocol, and counted in the log, the table and the JSON
(unlabelled_left_out). Image files pass the training loader's file checks first.
Feature rows with NaN/inf (an encoder that diverged) stop the run with one line counting them per split, before any
protocol runs and before anything is cached (maect.eval.features.check_finite).
--probe-aug trains the linear probe as the published code does, on RandomResizedCrop(S, scale 0.08-1, bicubic) +
flip of the training images, the encoder running on every epoch's crops (probe_augment); by default it trains on
the cached centre-crop features.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import torch

from maect.atomic import write_json
from maect.eval.cluster import cluster_eval
from maect.eval.features import NonFiniteFeatures, cache_features, check_finite, extract_features, feature_meta, load_cached
from maect.eval.knn import knn_accuracy
from maect.eval.lowshot import lowshot
from maect.eval.probe import PROBE_CROP_SCALE, linear_probe

log = logging.getLogger("maect")
PROTOCOLS = ("knn", "probe", "lowshot", "cluster")
STRICT_ADVICE = ("--non-strict evaluates without them (the features then come from another model than the one "
                 "trained)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m maect.eval", description=__doc__.split("\n\n")[1])
    p.add_argument("--ckpt", required=True, help="maect or official MAE checkpoint (.pth)")
    p.add_argument("--protocols", default=",".join(PROTOCOLS), help=f"comma-separated subset of {PROTOCOLS}")
    p.add_argument("--data", default=None, help="fashion_mnist | imagefolder | folder | filelist | wds "
                   "(default: the checkpoint's data set)")
    p.add_argument("--data-root", default=None, help="data directory (imagefolder: with train/ and val/; wds: a folder of train-*.tar and val-*.tar, or "
                   "the training shards' pattern)")
    p.add_argument("--labels", default=None, help="folder/filelist: labels, a DIR with train/ and val/ class folders "
                   "or a CSV of path,label[,split]; wds with a shard pattern: the evaluation shards' pattern "
                   "(default: the checkpoint's data.labels)")
    p.add_argument("--skip-corrupt", action="store_true", help="leave out bad image files (logged) instead of stopping")
    p.add_argument("--no-antialias", action="store_true",
                   help="resize images without antialiasing (data.antialias=false; default: antialiased bicubic as "
                        "PIL's, the published transform)")
    p.add_argument("--pool", default=None, choices=("cls", "mean"), help="default: the checkpoint's model.pool")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--out", default=None, help="results JSON (default: eval_<ckpt name>.json next to the ckpt)")
    p.add_argument("--export-features", default=None, metavar="DIR",
                   help="cache features here (DIR/train.*, DIR/test.*) and reuse them when the metadata matches")
    p.add_argument("--use-ema", action="store_true", help="evaluate the checkpoint's EMA encoder")
    p.add_argument("--non-strict", action="store_true", help="load the encoder even when the checkpoint holds weights "
                   "it has no place for (a ViT variant it does not implement: the features then come from another "
                   "model than the one trained; the log names the weights left out)")
    p.add_argument("--batch-size", type=int, default=256, help="encoder batch size for feature extraction")
    p.add_argument("--train-limit", type=int, default=None, help="use the first N train images")
    p.add_argument("--test-limit", type=int, default=None, help="use the first N test images")
    p.add_argument("--knn-k", type=int, default=20, help="k for k-NN (k=10, the paper's, is always reported too)")
    p.add_argument("--knn-T", type=float, default=0.07)
    p.add_argument("--knn-standardize", action="store_true", help="standardise features (train mean/std) first")
    p.add_argument("--probe-epochs", type=int, default=50)
    p.add_argument("--probe-batch", type=int, default=1024)
    p.add_argument("--probe-aug", action="store_true",
                   help="train the probe on RandomResizedCrop(scale 0.08-1, bicubic) + flip of the training images, "
                        "the published probe (the encoder runs every epoch; default: the cached centre-crop features)")
    p.add_argument("--lowshot-max-iter", type=int, default=1000)
    p.add_argument("--lowshot-preprocess", default="row", choices=("row", "row_train_only", "column"),
                   help="row: centre and L2-normalise every row on its own, train and test (MSN's protocol, which the "
                        "MAE-CT code follows for the train rows); row_train_only: the published MAE-CT code exactly "
                        "(test features raw); column: centre with the train split's mean, then L2-normalise")
    p.add_argument("--kmeans-restarts", type=int, default=10)
    p.add_argument("--cluster-split", default="test", choices=("train", "test"), help="which features k-means clusters")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.protocols = [s.strip() for s in args.protocols.split(",") if s.strip()]
    bad = [s for s in args.protocols if s not in PROTOCOLS]
    if bad or not args.protocols:
        p.error(f"--protocols: unknown {bad}; choose from {PROTOCOLS}")
    low = {"--batch-size": (args.batch_size, 1), "--knn-k": (args.knn_k, 1), "--probe-epochs": (args.probe_epochs, 1),
           "--probe-batch": (args.probe_batch, 2), "--lowshot-max-iter": (args.lowshot_max_iter, 1),
           "--kmeans-restarts": (args.kmeans_restarts, 1), "--train-limit": (args.train_limit, 1),
           "--test-limit": (args.test_limit, 1)}
    for flag, (v, lo) in low.items():
        if v is not None and v < lo:
            p.error(f"{flag}={v} must be >= {lo}" + (" (the probe's BatchNorm needs 2 samples)" if lo == 2 else ""))
    from maect.eval.knn import min_temperature
    if not args.knn_T > min_temperature(max(10, args.knn_k)):
        p.error(f"--knn-T={args.knn_T} must exceed {min_temperature(max(10, args.knn_k)):.4f} (exp(s / T) overflows "
                "float32 below it)")
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    return dev


def split_features(model, info: dict, args, split: str, data_name: str, data_root, pool: str, device, labels=""):
    """(features [N, D] on device, labels [N] on device, num_classes, source, unlabelled) for one split, from the
    cache when its metadata matches, else from the encoder (then written to the cache). The metadata holds the class
    names, so a cache written under another class-to-index mapping is not reused. Unlabelled samples (a shard sample
    without cls) are left out by load_eval_data, which logs their count (`unlabelled`); the metadata records it, so
    a cache written with them in is not reused. Data errors exit with one line."""
    from maect.dataloading import DataError, eval_batches, load_eval_data
    from maect.dataloading.datasets import check_source
    limit = args.train_limit if split == "train" else args.test_limit
    why = None if data_name == "fashion_mnist" else check_source(data_name, data_root or "", labels,
                                                                 keys=("--data", "--data-root", "--labels"))
    if why:
        raise SystemExit(f"maect.eval: {why} (defaults: the checkpoint's data.*)")
    try:
        data = load_eval_data(data_name, data_root, split, labels)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"maect.eval: {exc}") from None
    meta = dict(feature_meta(args.ckpt, pool=pool, split=split, img_size=info["img_size"], in_chans=info["in_chans"],
                             data=data_name, data_root=data_root, limit=limit, use_ema=args.use_ema),
                labels=labels or "", classes=list(data.classes), unlabelled_left_out=data.unlabelled,
                resize="bicubic" if args.no_antialias else "bicubic antialiased")   # caches without it: recomputed
    prefix = os.path.join(args.export_features, split) if args.export_features else None
    hit = load_cached(prefix, meta) if prefix else None
    if hit is not None:
        f, y, stored = hit
        check_finite("cached features", **{split: f})   # a cache written before caches refused non-finite rows
        return f.to(device), y.to(device), stored["num_classes"], "cache", data.unlabelled
    n = len(data) if limit is None else min(limit, len(data))
    try:
        batches = eval_batches(data, img_size=info["img_size"], in_chans=info["in_chans"],
                               batch_size=args.batch_size, device=device, limit=limit, skip_corrupt=args.skip_corrupt,
                               antialias=not args.no_antialias)
        f, y = extract_features(model, batches, pool=pool, device=device, progress=f"features {split}", total=n,
                                split=split)  # raises on NaN/inf
    except (DataError, FileNotFoundError) as exc:         # bad files (named), a model that does not take RGB
        raise SystemExit(f"maect.eval: {exc}") from None
    if prefix:
        cache_features(prefix, f, y, dict(meta, num_classes=int(data.num_classes)))
    return f, y, int(data.num_classes), "encoder", data.unlabelled


def probe_augment(model, info: dict, args, data_name: str, data_root, labels, pool: str, device, n_rows: int):
    """linear_probe's augment for --probe-aug: (rows, epoch) -> pooled features (float32 [n', D], labels [n']) of
    the training images behind feature rows `rows`, cropped RandomResizedCrop(S, PROBE_CROP_SCALE, bicubic,
    antialiased unless --no-antialias) and flipped with p = 0.5, drawn afresh from (--seed, epoch); n' = rows
    rounded down to whole batches of --batch-size (the training loader drops the last partial batch, as the
    published probe's does). Feature row i is the i-th usable training sample (eval_batches' order)."""
    from maect.dataloading import ArrayData, DataError, ImageFiles, TrainLoader, load_eval_data
    from maect.dataloading.shared import bad_file_mask
    data = load_eval_data(data_name, data_root, "train", labels)
    if not isinstance(data, (ArrayData, ImageFiles)):
        raise SystemExit(f"maect.eval: --probe-aug needs images or image files, not {type(data).__name__} "
                         f"(--data {data_name})")
    ids = (torch.arange(len(data)) if isinstance(data, ArrayData)
           else torch.nonzero(~bad_file_mask(data, args.skip_corrupt, {})).flatten())[:args.train_limit]
    if len(ids) != n_rows:
        raise SystemExit(f"maect.eval: --probe-aug: {n_rows} training features but {len(ids)} usable training "
                         f"images (a file failed to decode after its check; fix or remove it)")
    loaders = {}

    def features(rows: torch.Tensor, epoch: int):
        if "L" not in loaders:                 # the same rows every epoch: one loader (its file checks run once)
            sub = data.subset(ids[rows])
            try:
                loaders["L"] = TrainLoader(sub, img_size=info["img_size"], in_chans=info["in_chans"],
                                           batch_size=min(args.batch_size, len(sub)), seed=args.seed, num_views=1,
                                           crop_scale=PROBE_CROP_SCALE, device=device, skip_corrupt=args.skip_corrupt,
                                           antialias=not args.no_antialias)
            except DataError as exc:
                raise SystemExit(f"maect.eval: --probe-aug: {exc}") from None
        L = loaders["L"]
        L.set_epoch(epoch)
        return extract_features(model, ((b["views"][0], b["label"]) for b in L), pool=pool, device=device,
                                progress=f"probe epoch {epoch + 1} augmented features", total=len(L) * L.n,
                                split="augmented train")
    return features


def run(args) -> dict:
    from maect.hub import load_encoder   # imported here: the protocols above need no checkpoint code
    device = resolve_device(args.device)
    from maect.checkpoint import one_line, unreadable
    from maect.hub import is_safetensors
    why = None if is_safetensors(args.ckpt) or not os.path.isfile(args.ckpt) else unreadable(args.ckpt)
    if why:         # truncated, foreign: named before anything is loaded
        raise SystemExit(f"maect.eval: --ckpt {why}")
    try:
        model, info = load_encoder(args.ckpt, use_ema=args.use_ema, strict=not args.non_strict)
    except (ValueError, FileNotFoundError) as exc:      # missing, truncated, foreign or unsupported weights
        msg = one_line(str(exc)).replace("pass strict=False to ignore them", STRICT_ADVICE)
        raise SystemExit(f"maect.eval: --ckpt {msg}") from None
    if args.non_strict and info["unexpected"]:
        log.warning(f"[eval] --non-strict: {'; '.join(n for n in info['notes'] if 'strict=False' in n)}")
    model.to(device)
    pool = args.pool or info.get("pool") or "cls"
    recorded = info.get("data") or {}
    data_name = args.data or recorded.get("name") or "fashion_mnist"
    data_root = args.data_root if args.data_root is not None else (recorded.get("root") or None)
    cfg = info.get("config")
    labels = args.labels if args.labels is not None else (cfg.data.labels if cfg is not None else "")
    res = {"ckpt": os.path.abspath(args.ckpt), "pool": pool, "data": data_name, "data_root": data_root,
           "img_size": info["img_size"], "device": str(device), "use_ema": args.use_ema, "seed": args.seed,
           "lowshot_preprocess": args.lowshot_preprocess,
           "protocols": {}, "seconds": {}}
    t0 = time.perf_counter()
    tr_f, tr_y, C, src_tr, un_tr = split_features(model, info, args, "train", data_name, data_root, pool, device,
                                                   labels)
    te_f, te_y, _, src_te, un_te = split_features(model, info, args, "test", data_name, data_root, pool, device, labels)
    res["seconds"]["features"] = time.perf_counter() - t0
    res.update(num_classes=C, n_train=int(tr_f.shape[0]), n_test=int(te_f.shape[0]), dim=int(tr_f.shape[1]),
               feature_source={"train": src_tr, "test": src_te}, unlabelled_left_out={"train": un_tr, "test": un_te})
    P, res["not_run"] = res["protocols"], {}
    out = out_path(args)
    for name in args.protocols:
        why = why_not(name, args, tr_y, te_y, C)
        if why:                 # recorded and reported; the other protocols still run
            res["not_run"][name] = why
            log.warning(f"[eval] {name} not run: {why}")
            continue
        t = time.perf_counter()
        log.info(f"[eval] {name} on {tr_f.shape[0]} train / {te_f.shape[0]} test features (D={tr_f.shape[1]}, "
                 f"{device})")
        if name == "knn":
            ks = [k for k in sorted({10, args.knn_k}) if k <= tr_f.shape[0]]   # why_not: at least one fits the bank
            res["not_run"].update({f"knn k={k}": f"k={k} exceeds the {tr_f.shape[0]} train features (the k-NN bank)"
                                   for k in sorted({10, args.knn_k}) if k > tr_f.shape[0]})
            acc = knn_accuracy(tr_f, tr_y, te_f, te_y, k=ks, T=args.knn_T, num_classes=C,
                               standardize=args.knn_standardize)
            P["knn"] = {"T": args.knn_T, "standardize": args.knn_standardize, **{f"k{k}": a for k, a in acc.items()}}
        elif name == "probe":
            aug = (probe_augment(model, info, args, data_name, data_root, labels, pool, device, tr_f.shape[0])
                   if args.probe_aug else None)
            P["probe"] = linear_probe(tr_f, tr_y, te_f, te_y, num_classes=C, epochs=args.probe_epochs,
                                      batch_size=args.probe_batch, seed=args.seed, progress="probe", augment=aug)
        elif name == "lowshot":
            shots, short = lowshot_shots(tr_y)
            res["not_run"].update({f"lowshot {s}-shot": why for s, why in short.items()})
            P["lowshot"] = lowshot(tr_f, tr_y, te_f, te_y, shots=shots, seed=args.seed, max_iter=args.lowshot_max_iter,
                                   preprocessing=args.lowshot_preprocess, progress="low-shot")
        elif name == "cluster":
            f, y = (tr_f, tr_y) if args.cluster_split == "train" else (te_f, te_y)
            P["cluster"] = dict(cluster_eval(f, y, num_classes=C, restarts=args.kmeans_restarts, seed=args.seed,
                                             split=args.cluster_split, progress="k-means"),
                                 split=args.cluster_split)
        res["seconds"][name] = time.perf_counter() - t
        log.info(f"[eval] {name} done in {res['seconds'][name]:.1f} s")
        write_json(out, res, default=float)     # atomic, after every protocol: a later failure keeps this one
    return res


def out_path(args) -> str:
    """--out, default eval_<ckpt name>.json next to the checkpoint."""
    return args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)),
                                    f"eval_{os.path.splitext(os.path.basename(args.ckpt))[0]}.json")


def check_out(path: str) -> str | None:
    """Why the results JSON cannot be written at path (one line), or None; checked before any feature is computed."""
    d = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"--out {path} is a folder; name the JSON file (e.g. {os.path.join(path, 'eval.json')})"
    if not os.path.isdir(d):
        return f"--out {path}: the folder {d} does not exist" if not os.path.exists(d) else \
            f"--out {path}: {d} is a file, not a folder"
    if not os.access(d, os.W_OK | os.X_OK):
        return f"--out {path}: the folder {d} is not writable"
    return None


def _class_counts(y: torch.Tensor) -> torch.Tensor:
    return torch.unique(y[y >= 0].cpu(), return_counts=True)[1]


def why_not(name: str, args, tr_y: torch.Tensor, te_y: torch.Tensor, num_classes: int) -> str | None:
    """Why protocol `name` cannot give a meaningful number on these labels (one line naming the count), or None.
    Every protocol needs a test split and 2 classes in the train split (an accuracy over one class measures
    nothing); k-NN a train bank of at least k=10 or --knn-k features; the probe 2 features beside its validation
    split; k-means (k = the number of classes) at least k features in the split it clusters. Low-shot settings that
    need more images of a class than it has are left out one by one (lowshot_shots)."""
    n_tr, n_te, counts = int(tr_y.numel()), int(te_y.numel()), _class_counts(tr_y)
    if name != "cluster" or args.cluster_split == "test":
        if n_te == 0:
            return "the test split has no labelled feature"
    if counts.numel() < 2:
        return (f"the train split has {counts.numel()} class{'es' * (counts.numel() != 1)} ({n_tr} features): a "
                f"classification accuracy needs at least 2")
    if name == "knn" and n_tr < min(10, args.knn_k):
        return f"k={min(10, args.knn_k)} exceeds the {n_tr} train features (the k-NN bank)"
    if name == "probe":
        n_val = max(1, int(round(0.1 * n_tr)))
        if n_tr - n_val < 2:
            return f"{n_tr} train features leave {n_tr - n_val} beside the probe's validation split of {n_val} (needs 2)"
    if name == "cluster":
        n = n_tr if args.cluster_split == "train" else n_te
        if n < num_classes:
            return f"k-means with k={num_classes} classes needs at least {num_classes} features; the {args.cluster_split} split has {n}"
    return None


def lowshot_shots(tr_y: torch.Tensor) -> tuple[tuple, dict]:
    """(the low-shot settings every class has images for, {shots: why not} for the others)."""
    from maect.eval.lowshot import SHOTS
    counts = _class_counts(tr_y)
    least = int(counts.min()) if counts.numel() else 0
    ok = tuple(s for s in SHOTS if s <= least)
    return ok, {s: f"a class has {least} train image{'s' * (least != 1)}, fewer than {s}" for s in SHOTS if s > least}


def table(res: dict) -> str:
    """Human-readable summary, one metric per line (accuracies in %)."""
    rows, P = [], res["protocols"]
    for k, v in P.get("knn", {}).items():
        if k.startswith("k"):
            rows.append((f"k-NN {k[0]}={k[1:]} (T={P['knn']['T']})", f"{v:.2f}"))
    if "probe" in P:
        p = P["probe"]
        aug = ", augmented crops" if p.get("augmented") else ""
        rows.append((f"linear probe (lr {p['lr']:.3g}, val {p['val_acc']:.1f}{aug})", f"{p['test_acc']:.2f}"))
    for k, v in P.get("lowshot", {}).items():
        rows.append((f"low-shot {k} ({len(v['accs'])} split{'s' * (len(v['accs']) > 1)})",
                     f"{v['mean']:.2f} ± {v['std']:.2f}"))
    if "cluster" in P:
        c = P["cluster"]
        rows.append((f"k-means ACC (k={c['k']}, {c['restarts']} restarts)", f"{c['acc']:.2f}"))
        rows.append(("k-means NMI", f"{c['nmi']:.2f}"))
    w = max(len(r[0]) for r in rows) if rows else 10
    head = (f"{os.path.basename(res['ckpt'])}: {res['data']} train {res['n_train']} / test {res['n_test']}, "
            f"pool={res['pool']}, D={res['dim']}")
    left = {s: n for s, n in res.get("unlabelled_left_out", {}).items() if n}
    if left:
        head += " (unlabelled, left out: " + ", ".join(f"{n} {s}" for s, n in left.items()) + ")"
    return "\n".join([head, "-" * (w + 16)] + [f"{a:<{w}}  {b:>14}" for a, b in rows])


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not logging.getLogger().handlers:   # progress lines (maect.progress) on stdout, like maect.train's
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    out = out_path(args)
    why = check_out(out)
    if not why and args.export_features and os.path.exists(args.export_features) and \
            not os.path.isdir(args.export_features):
        why = f"--export-features {args.export_features} is a file, not a folder for the feature cache"
    if why:
        sys.exit(f"maect.eval: {why}")
    try:
        res = run(args)
    except NonFiniteFeatures as e:
        sys.exit(f"maect.eval: {e}")
    print(table(res))
    write_json(out, res, default=float)   # default=float: numpy scalars
    print(f"wrote {out}")
    if res["not_run"]:
        sys.exit("maect.eval: not run on this data: " + "; ".join(f"{k}: {v}" for k, v in res["not_run"].items())
                 + f" (the rest is in {out})")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
