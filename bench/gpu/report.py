"""The GPU suite's reading of step results: nested failures, "anything measured?", and the closing table with
each step's status and the headline ratios pulled from the steps' JSON (tolerant of format changes: a step whose
JSON has no recognisable rows shows '-', never an exception)."""
from __future__ import annotations


def nested_errors(obj, path: str = "") -> list[str]:
    """Every 'error' entry inside a step's result (the per-config runs record their failures there)."""
    found = []
    if isinstance(obj, dict):
        if isinstance(obj.get("error"), str):
            found.append(f"{path or 'result'}: {obj['error']}")
        for k, v in obj.items():
            if k != "error":
                found += nested_errors(v, f"{path}/{k}" if path else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += nested_errors(v, f"{path}[{i}]")
    return found


def has_content(result: dict) -> bool:
    """Did a step record any measurement (a non-empty value under a key of its own, or a printed table) before it
    stopped? Keys starting with '_' are bookkeeping."""
    return bool(result.get("_tables")) or any(not k.startswith("_") and v not in (None, 0, "", [], {})
                                              for k, v in result.items())


def dicts(obj, pred):
    """Every nested dict of obj for which pred(dict) holds, depth first."""
    if isinstance(obj, dict):
        if pred(obj):
            yield obj
        for v in obj.values():
            yield from dicts(v, pred)
    elif isinstance(obj, list):
        for v in obj:
            yield from dicts(v, pred)


def _provider(rows, name):
    return next((r for r in rows if isinstance(r, dict) and r.get("provider") == name and r.get("median_ms")), None)


def head_queue_lookup(res) -> list[str]:
    """maect vs the official path (speedup) and maect's time over the bare GEMM's, per (B, Q, k, dtype)."""
    out = []
    for c in dicts(res, lambda d: {"k", "dtype", "rows"} <= d.keys() and isinstance(d["rows"], list)):
        m, o, g = (_provider(c["rows"], n) for n in ("maect", "official NNCLR", "matmul (floor)"))
        if m and o:
            out.append(f"B={c.get('B')} Q={c.get('Q')} k={c['k']} {c['dtype']}: {o['median_ms'] / m['median_ms']:.2f}x "
                       f"official" + (f", {m['median_ms'] / g['median_ms']:.3g}x GEMM time" if g else ""))
    return out


def head_masked_gather(res) -> list[str]:
    """Per op, the fastest backend's speedup over MAE's path (ref): the range over shapes."""
    best: dict[tuple, tuple] = {}
    for c in dicts(res, lambda d: isinstance(d.get("rows"), list)):
        for r in c["rows"]:
            if isinstance(r, dict) and r.get("provider") != "ref" and r.get("speedup") and r.get("op"):
                k = (r["op"], r.get("shape"))
                best[k] = max(best.get(k, (0.0, "")), (r["speedup"], r["provider"]))
    by_op: dict[str, list] = {}
    for (op, _), v in best.items():
        by_op.setdefault(op, []).append(v)
    return [f"{op} {min(v)[0]:.2f}-{max(v)[0]:.2f}x MAE path ({', '.join(sorted({n for _, n in v}))})"
            for op, v in by_op.items()]


def head_train_step(res) -> list[str]:
    """Per configuration: maect's MFU and its speedup over the reference step."""
    out = []
    for c in dicts(res, lambda d: "stage" in d and isinstance(d.get("rows"), list)):
        m = next((r for r in c["rows"] if isinstance(r, dict) and str(r.get("provider", "")).startswith("maect")), None)
        if m:
            mfu = f"MFU {100 * m['mfu']:.1f}%" if isinstance(m.get("mfu"), (int, float)) else "MFU -"
            sp = f", {m['speedup']:.2f}x reference" if isinstance(m.get("speedup"), (int, float)) else ""
            out.append(f"{c.get('model', c.get('preset', '?'))} {c['stage']}: {mfu}{sp}")
    return out


def head_loader_throughput(res) -> list[str]:
    """DALI images/s against the CPU twin's, per data set and row."""
    out = []
    for c in dicts(res, lambda d: "ratio" in d and isinstance(d.get("dali"), dict) and isinstance(d.get("twin"), dict)):
        out.append(f"{c.get('data', '')} {c.get('row', '?')}: DALI {c['dali']['img_per_s']:.0f} img/s = "
                   f"{c['ratio']:.1f}x twin ({c['twin']['img_per_s']:.0f})".strip())
    return out


def head_kernel_tests(res) -> list[str]:
    return [f"{res.get('passed', 0)} passed, {res.get('failed', 0)} failed, {res.get('skipped', 0)} skipped"]


HEADLINES = {"kernel_tests": head_kernel_tests, "queue_lookup": head_queue_lookup,
             "masked_gather": head_masked_gather, "train_step": head_train_step, "loader_throughput": head_loader_throughput}


def headlines(rec: dict) -> list[str]:
    fn = HEADLINES.get(rec["name"])
    if fn is None or not isinstance(rec.get("result"), dict):
        return []
    try:
        return fn(rec["result"])[:6]
    except Exception as e:            # a format this reader does not know: say so, never fail the report
        return [f"(headline not readable: {type(e).__name__}: {e})"]


def closing_table(records: list[dict]) -> str:
    """One line per step (status, seconds, the time split, reason) and its headline ratios under it."""
    cols = ("wall s", "budget", "start", "compile", "measure")
    lines = ["", "=== gpu_suite: steps (seconds; start = interpreter + imports) ===",
             f"  {'step':<16} {'status':<8} " + " ".join(f"{c:>7}" for c in cols) + "  reason / headline",
             "  " + "-" * 110]
    pad = " " * (2 + 17 + 9 + 8 * len(cols) + 1)
    for r in records:
        t = r.get("timing") or {}
        nums = (r.get("wall_s"), r.get("budget_s"), t.get("startup_s"), t.get("compile_s"), t.get("measure_s"))
        lines.append(f"  {r['name']:<16} {r['status']:<8} "
                     + " ".join(f"{v:7.1f}" if isinstance(v, (int, float)) else f"{'-':>7}" for v in nums)
                     + f"  {str(r.get('reason', ''))[:110]}")
        lines += [pad + h for h in headlines(r)]
    counts = {s: sum(r["status"] == s for r in records) for s in ("ok", "partial", "failed", "skipped")}
    lines.append("  " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)
