"""A suite step's results as they are measured: StepOut, a dict that rewrites its JSON file (by rename) after every
change of a top-level key, so a step killed at its time budget leaves what it had measured. While stream_to(out) is
in effect, bench/common.py's print_table and write_json also record into it (child.py wraps them). No torch import here: the suite's step
processes load this before anything else."""
from __future__ import annotations

import json
import os
from pathlib import Path

SINK: dict | None = None       # stream_to(): where print_table / write_json also record


class StepOut(dict):
    """A dict that rewrites `path` (temporary file + rename) after every change of a top-level key, so its file always
    holds what has been measured so far. Changes inside nested values are written with the next top-level change or
    flush(); reassign the key (out[k] = out[k]) to write at once."""

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = str(path)
        self.flush()

    def flush(self) -> None:
        text = json.dumps(self, indent=1, default=str)     # serialise first: a failure leaves the old file intact
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:                           # no fsync: this guards against a killed process, not a
            f.write(text)                                   # lost machine, and a flush per test must stay cheap
        os.replace(tmp, self.path)

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.flush()

    def __delitem__(self, key):
        super().__delitem__(key)
        self.flush()

    def update(self, *args, **kw):
        super().update(*args, **kw)
        self.flush()

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return super().__getitem__(key)

    def pop(self, *args):
        value = super().pop(*args)
        self.flush()
        return value


def stream_to(out: dict | None) -> None:
    """From now on record_table / record_results (called by child.py's wrappers of bench/common.py's print_table and
    write_json) record into `out` (None: stop)."""
    global SINK
    SINK = out


def record_table(title: str, rows: list[dict]) -> None:
    if SINK is not None:
        SINK.setdefault("_tables", []).append({"title": title, "rows": [dict(r) for r in rows]})
        SINK["_tables"] = SINK["_tables"]                 # rewrite the file now


def record_results(payload: dict) -> None:
    if SINK is not None:
        SINK["results"] = payload
