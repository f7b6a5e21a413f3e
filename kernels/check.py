"""python -m maect.kernels.check: decide the backend of every op a preset trains and evaluates with, as the trainer
does at start-up (maect/backends.py plan: the same shapes), but measuring each one again; print every backend's
verification, time and ratio to the torch path, and the cost of each decision; write the decisions to the cache.

    python -m maect.kernels.check                              # preset tiny, on CUDA when it is visible
    python -m maect.kernels.check --preset vit_l16 --device cuda --json bench/results/check_vit_l16.json
    python -m maect.kernels.check --preset tiny --device cpu
    python -m maect.kernels.check --static [--arch sm_90 sm_80] [--predict] [--json F]   # no GPU: kernels/static_check.py

Data sizes (the k-NN bank and queries, the queue's sample ids): the data set's (Fashion-MNIST 60000 / 10000, else
ImageNet-1k's), or --bank / --queries; on CPU the bank is capped at CPU_BANK. Exit status 1 when any backend
disagrees with the reference or raises, 2 for arguments that cannot describe a run (or --device cuda without a GPU).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from . import dispatch as D

SIZES = {"fashion_mnist": (60000, 10000)}       # (train, test); other data: ImageNet-1k's
IMAGENET = (1281167, 50000)
CPU_BANK = 262144                               # the largest queue_topk Q bucket


def run(preset: str = "tiny", device: str = "cpu", world: int | None = None, bank: int | None = None,
        queries: int | None = None, overrides: tuple = (), timer=None) -> dict:
    """Decide every (op, shape) of the preset again; {"rows": [...], "decisions": [...], "ok": bool, ...}."""
    from maect.backends import plan
    from maect.validation import load_config
    dev = torch.device(device)
    world = world or (torch.cuda.device_count() if dev.type == "cuda" else 1)
    cfg = load_config([f"preset={preset}", *overrides])
    if dev.type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    n_train, n_test = SIZES.get(cfg.data.name, IMAGENET)
    n_bank = bank or n_train
    if dev.type == "cpu":
        n_bank = min(n_bank, CPU_BANK)
    rows, made, ok, t_all = [], [], True, time.perf_counter()
    # plan() lists each (op, shape class) once: two stages with one shape class share one decision
    for op, args, amp in plan(cfg, dev, world, n_train=n_train, n_bank=n_bank, n_query=queries or n_test):
        d = D.decide(op, args, again=True, timer=timer, budget_s=cfg.kernels.budget_s, amp=amp)
        ok &= not d.dropped
        made.append({"op": op, "shape": d.shape, "pick": d.pick, "cost_s": d.cost_s, "ms": d.ms,
                     "dropped": d.dropped, "not_run": d.not_run})
        for name, ms in d.ms.items():
            base = d.ms.get(d.torch_path)
            rows.append((op, d.shape, name + (" *" if name == d.pick else ""),
                         "torch path" if name == d.torch_path else "yes", f"{ms:.3f}",
                         f"{base / ms:.2f}" if base and ms else "-"))
        rows += [(op, d.shape, n, f"NO: {why}"[:100], "-", "-") for n, why in d.dropped.items()]
        rows += [(op, d.shape, n, f"not run: {why}"[:100], "-", "-") for n, why in d.not_run.items()]
    env = {"torch": torch.__version__, "device": D.device_key(dev), "threads": torch.get_num_threads()}
    return {"preset": preset, "device": device, "world": world, "env": env, "rows": rows, "decisions": made,
            "ok": ok, "cache": str(D.cache().path), "wall_s": round(time.perf_counter() - t_all, 2)}


def format_table(res: dict) -> str:
    head = ("op", "shape class", "backend", "verified", "ms", "x torch path")
    body = res["rows"]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()   # noqa: E731
    out = [f"maect.kernels.check: preset {res['preset']}, {res['env']['device']}, world {res['world']} "
           f"(* = chosen; x torch path > 1: faster)", line(head), line(["-" * w for w in widths])]
    out += [line(b) for b in body]
    out.append("\ncost of each decision (verification + timing, seconds):")
    out += [f"  {d['op']:<18} {d['shape']:<40} {d['cost_s']:.2f} s -> {d['pick']}" for d in res["decisions"]]
    out.append(f"total {res['wall_s']:.1f} s; decisions written to {res['cache']}; " +
               ("every backend verified" if res["ok"] else "MISMATCH or ERROR: see the rows marked NO"))
    return "\n".join(out)


def check_args(a) -> str | None:
    """Why the arguments cannot describe a training run (one line), or None."""
    from maect.config import ConfigError
    from maect.validation import load_config
    if a.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda, but torch sees no CUDA device"
    try:
        cfg = load_config([f"preset={a.preset}", *a.overrides])
    except ConfigError as exc:
        return str(exc)
    world = a.world_size if a.world_size is not None else (torch.cuda.device_count() if a.device == "cuda" else 1)
    if world < 1:
        return f"--world-size={a.world_size} must be >= 1"
    for name in ("mae", "head", "ct"):
        s = getattr(cfg, name)
        accum = s.accum_steps if name == "mae" else 1
        if s.batch_size % (world * accum):
            return (f"--world-size={world} does not divide {name}.batch_size={s.batch_size}"
                    + (f" x mae.accum_steps={accum}" if accum > 1 else "") + " (batch sizes are global)")
    for flag, v in (("--bank", a.bank), ("--queries", a.queries)):
        if v is not None and v < (cfg.eval.knn_k if flag == "--bank" else 1):
            return f"{flag}={v} is too small" + (f": the k-NN bank needs eval.knn_k={cfg.eval.knn_k}" if flag ==
                                                "--bank" else "")
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--static" in argv:   # compile and read the kernels for GPU targets, no GPU needed: kernels/static_check.py
        from . import static_check
        return static_check.main(argv)
    p = argparse.ArgumentParser(prog="python -m maect.kernels.check", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", help="preset name or YAML path (default tiny)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--world-size", type=int, default=None,
                   help="ranks the preset's global batch is split over (default: visible GPUs on cuda, 1 on cpu)")
    p.add_argument("--bank", type=int, default=None, help="train bank size of the k-NN (default: the data set's)")
    p.add_argument("--queries", type=int, default=None, help="test queries of the k-NN (default: the data set's)")
    p.add_argument("--json", help="write the table, the decisions and the environment to this file")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. ct.batch_size=512)")
    a = p.parse_args(argv)
    why = check_args(a)
    if why:
        print(f"maect.kernels.check: {why}", file=sys.stderr)
        return 2
    res = run(a.preset, a.device, a.world_size, a.bank, a.queries, tuple(a.overrides))
    print(format_table(res))
    if a.json:
        from maect.atomic import write_json
        write_json(a.json, res)
        print(f"wrote {a.json}")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
