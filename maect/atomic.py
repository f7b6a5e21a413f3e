"""One way to write a file so that a crash or kill never leaves it half-written: a temporary file in the same
directory, flushed and fsynced, then renamed over the target (and the directory fsynced, so the rename lasts)."""
from __future__ import annotations

import json
import os


def atomic_write(path: str, write, binary: bool = False) -> None:
    """write(f) fills the open temporary file f; then it replaces path atomically."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp{os.getpid()}")
    with open(tmp, "wb" if binary else "w") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_json(path: str, obj, **kw) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=1, **kw))
