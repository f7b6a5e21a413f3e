"""The paper's table at small scale: MAE, then MAE-CT and MAE-CTaug (stages 2+3 each, both from the same MAE
checkpoint; MAE-CTaug trains its own stage-2 head on the colour-augmented views, as the published recipe does), then
every evaluation protocol on each encoder, measured by the same code.

    python bench/paper_table.py                         # Fashion-MNIST, preset tiny / tiny_aug, 2 CPU cores
    python tools/fmnist_data.py && python bench/paper_table.py --preset fmnist_gpu --data-root data/fashion-mnist
    python bench/paper_table.py --preset fmnist_gpu smoke=2 device=cpu      # the GPU preset, a few steps, on a CPU

Prints a table shaped like the paper's (rows MAE / MAE-CT / MAE-CTaug; columns probe, k-NN, 1-shot, 5-shot, 1%,
cluster ACC, NMI) with wall time per stage, and writes OUT/paper_table.json and OUT/paper_table.png. The MAE
encoder is evaluated with cls pooling (SPEC: the MAE baselines' probe input) and with the preset's pooling (what
contrastive tuning starts from), one row each. Every training choice comes from the preset files (maect/presets/);
nothing here is tuned per metric. The evaluation uses the pipeline's final k-NN subsets (eval.final_train /
final_test: 0 = whole split; the first N images otherwise).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from maect import train  # noqa: E402
from maect.atomic import write_json  # noqa: E402
from maect.config import preset_path, ConfigError  # noqa: E402
from maect.validation import load_config  # noqa: E402
from maect.eval import __main__ as ev  # noqa: E402
from flops import table_flops  # noqa: E402  (bench/ is on sys.path when run as a script)

COLUMNS = [("probe", "probe"), ("knn", "k-NN"), ("1shot", "1-shot"), ("5shot", "5-shot"), ("1pct", "1%"),
           ("cluster_acc", "cluster ACC"), ("nmi", "NMI")]


def stage(preset: str, out: str, name: str, extra: list[str]) -> tuple[str, float]:
    cfg = load_config([f"preset={preset}", f"stage={name}", f"out_dir={out}", *extra])
    t = time.perf_counter()
    res = train.run(cfg)
    return res[f"{name}_checkpoint"], time.perf_counter() - t


def evaluate(ckpt: str, args, cfg, pool: str = "") -> tuple[dict, float]:
    # the evaluation CLI's own arguments and defaults (python -m maect.eval)
    limits = [("--train-limit", cfg.eval.final_train), ("--test-limit", cfg.eval.final_test)]
    if cfg.smoke:   # a check that every protocol runs, not a measurement: short probe and low-shot fits
        limits += [("--probe-epochs", 5), ("--lowshot-max-iter", 100)]
    a = ev.parse_args(["--ckpt", ckpt, "--protocols", args.protocols, "--device", args.device,
                       "--export-features", os.path.join(os.path.dirname(ckpt), f"features{pool}"),
                       "--batch-size", "500", "--knn-k", str(args.knn_k), "--probe-epochs", str(args.probe_epochs)]
                      + (["--data-root", args.data_root] if args.data_root else [])
                      + (["--pool", pool] if pool else []) + [str(x) for kv in limits if kv[1] for x in kv])
    t = time.perf_counter()
    res = ev.run(a)
    print(ev.table(res), flush=True)
    return res, time.perf_counter() - t


def row(res: dict, k: int) -> dict:
    P = res["protocols"]
    out = {"knn": P["knn"][f"k{k}"]} if "knn" in P else {}
    if "probe" in P:
        out["probe"] = P["probe"]["test_acc"]
    if "lowshot" in P:
        L = P["lowshot"]
        # a setting maect.eval could not run on this data (e.g. 5-shot with a class of fewer than 5 training images:
        # the eval's not_run says why) is left out of the row and printed as '-'
        out.update({c: L[s]["mean"] for c, s in (("1shot", "1-shot"), ("5shot", "5-shot"), ("1pct", "1%")) if s in L})
    if "cluster" in P:
        out.update(cluster_acc=P["cluster"]["acc"], nmi=P["cluster"]["nmi"])
    return out


def render(rows: dict, times: dict) -> str:
    head = f"{'model':<10}" + "".join(f"{t:>13}" for _, t in COLUMNS)
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        lines.append(f"{name:<10}" + "".join(f"{r[c]:>13.2f}" if c in r else f"{'-':>13}" for c, _ in COLUMNS))
    lines.append("")
    lines.append("wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()))
    return "\n".join(lines)


def bar_chart(rows: dict, path: str, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)")
        return False
    cols = [c for c in COLUMNS if all(c[0] in r for r in rows.values())]
    fig, ax = plt.subplots(figsize=(10, 4))
    w = 0.8 / len(rows)
    for i, (name, r) in enumerate(rows.items()):
        xs = [j + i * w for j in range(len(cols))]
        bars = ax.bar(xs, [r[c] for c, _ in cols], w, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks([j + w * (len(rows) - 1) / 2 for j in range(len(cols))], [t for _, t in cols])
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def default_aug(preset: str) -> str:
    try:
        preset_path(f"{preset}_aug")
        return f"{preset}_aug"
    except ConfigError:
        return ""


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--aug-preset", default=None, help="preset for the MAE-CTaug row (default PRESET_aug when it "
                                                      "exists; '' to skip the row)")
    p.add_argument("--mae-pools", default="cls,mean", help="poolings the MAE rows are evaluated with (SPEC: cls "
                                                          "for the MAE baselines; the preset's pooling is CT's)")
    p.add_argument("--out", default=None, help="default runs/paper_table/PRESET")
    p.add_argument("--data-root", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--protocols", default="knn,probe,lowshot,cluster")
    p.add_argument("--knn-k", type=int, default=20)
    p.add_argument("--probe-epochs", type=int, default=50)
    p.add_argument("--mae-ckpt", default="", help="skip stage 1 and start from this MAE checkpoint")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every stage (e.g. threads=2)")
    args = p.parse_args(argv)
    args.aug_preset = default_aug(args.preset) if args.aug_preset is None else args.aug_preset
    args.out = args.out or os.path.join("runs", "paper_table", args.preset)
    extra = list(args.overrides) + ([f"data.root={args.data_root}"] if args.data_root else [])
    cfg = load_config([f"preset={args.preset}", *extra])
    flops = table_flops(args.preset, args.aug_preset, 60000, 10000, extra) if cfg.data.name == "fashion_mnist" else {}
    if flops and not cfg.smoke:
        print(f"work (bench/flops.py, matrix products only): {sum(flops.values()) / 1e15:.1f} PFLOP", flush=True)
    times, t_all = {}, time.perf_counter()
    if args.mae_ckpt:
        mae = args.mae_ckpt
    else:
        mae, times["MAE"] = stage(args.preset, args.out, "mae", extra)
    head, times["head"] = stage(args.preset, args.out, "head", extra + [f"init={mae}"])
    ct, times["CT"] = stage(args.preset, args.out, "ct", extra + [f"init={head}"])
    pools = [x.strip() for x in args.mae_pools.split(",") if x.strip()]
    models = {f"MAE ({pl})" if len(pools) > 1 else "MAE": (mae, pl) for pl in pools}
    models["MAE-CT"] = (ct, "")
    if args.aug_preset:   # its own stage-2 head, trained on the augmented views (the published MAE-CTaug recipe)
        aug_out = os.path.join(args.out, "aug")
        head_aug, times["head (aug)"] = stage(args.aug_preset, aug_out, "head", extra + [f"init={mae}"])
        ctaug, times["CTaug"] = stage(args.aug_preset, aug_out, "ct", extra + [f"init={head_aug}"])
        models["MAE-CTaug"] = (ctaug, "")
    rows, evals = {}, {}
    for name, (ck, pl) in models.items():
        res, times[f"eval {name}"] = evaluate(ck, args, cfg, pl)
        rows[name], evals[name] = row(res, args.knn_k), res
    times["total"] = time.perf_counter() - t_all
    text = render(rows, times)
    print("\n" + text)
    os.makedirs(args.out, exist_ok=True)
    out = {"rows": rows, "seconds": times, "checkpoints": {k: v[0] for k, v in models.items()}, "evals": evals,
           "knn_k": args.knn_k, "preset": args.preset, "aug_preset": args.aug_preset, "overrides": extra,
           "flops": flops}
    write_json(os.path.join(args.out, "paper_table.json"), out, default=float)
    png = os.path.join(args.out, "paper_table.png")
    if bar_chart(rows, png, f"maect {args.preset}: MAE vs MAE-CT vs MAE-CTaug (k-NN k={args.knn_k})"):
        print(f"wrote {png}")
    print(f"wrote {os.path.join(args.out, 'paper_table.json')}")
    return out


if __name__ == "__main__":
    main()
