"""The dispatch cache: $MAECT_CACHE_DIR/dispatch.json (default ~/.cache/maect/dispatch.json), the decisions that
kernels/dispatch.py measured, kept across processes.

Layout: {"format": 1, "entries": {key: entry}}; an entry holds the pick, ms per backend, the torch path's ms, the
dropped backends and why, cost_s and when (Decision.to_json). Every new decision re-reads the file and rewrites it
atomically (a temporary file in the same folder, fsync, os.replace) under an exclusive lock (fcntl.flock on
dispatch.json.lock), so processes and ranks writing at once merge their entries and lose none. A corrupt or
unreadable file, or a folder that cannot be written, gives one warning per process and decisions live in memory;
a corrupt file is replaced by the next successful write.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger("maect.kernels")

FORMAT = 1
CACHE_NAME = "dispatch.json"


def cache_dir() -> Path:
    return Path(os.environ.get("MAECT_CACHE_DIR") or Path.home() / ".cache" / "maect")


class Cache:
    """The decisions file: read once per process, merged and rewritten atomically on every new decision."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else cache_dir() / CACHE_NAME
        self._entries: dict | None = None
        self._mine: dict[str, dict] = {}
        self._warned = False
        self._lock = threading.Lock()

    def _warn(self, what: str) -> None:
        if not self._warned:
            self._warned = True
            logger.warning("maect: dispatch cache %s %s; decisions are kept in memory for this process (set "
                           "MAECT_CACHE_DIR to a writable folder to keep them)", self.path, what)

    def _read(self, warn: bool = True) -> dict:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            if warn:
                self._warn(f"cannot be read ({type(exc).__name__}: {exc})")
            return {}
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
                raise ValueError("no 'entries' object")
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
            return data["entries"]
        except ValueError as exc:
            if warn:
                self._warn(f"is corrupt ({exc}); it is replaced by the next decision written")
            return {}

    def entries(self) -> dict:
        with self._lock:
            if self._entries is None:
                self._entries = self._read()
            return {**self._entries, **self._mine}

    def get(self, key: str) -> dict | None:
        e = self.entries().get(key)
        return e if isinstance(e, dict) and isinstance(e.get("pick"), str) else None

    def put(self, key: str, entry: dict) -> bool:
        """Keep entry in memory and merge it into the file; False (and one warning) where that is impossible."""
        with self._lock:
            self._mine[key] = entry
            try:
                self._write()
                return True
            except OSError as exc:
                self._warn(f"cannot be written ({type(exc).__name__}: {exc})")
                return False

    def _write(self) -> None:
        import fcntl
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                merged = {**self._read(warn=False), **self._mine}
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".", suffix=".tmp")
                try:
                    with os.fdopen(fd, "w") as f:
                        json.dump({"format": FORMAT, "entries": merged}, f, indent=1, sort_keys=True)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, self.path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
                self._entries = merged
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
