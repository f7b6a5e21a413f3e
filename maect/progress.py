"""Progress lines for long loops that are not training steps: feature extraction, the pipeline's final k-NN and the
evaluation protocols. Training steps log through steplog.Meter; this is the same idea for everything else.

    p = Progress("features MAE train", total=60000, unit="img")
    for x in batches:
        ...
        p.update(len(x))          # logs 'done/total unit, rate unit/s, ETA' at most every `every` seconds
    p.done()                      # one closing line with the total time and rate

Lines go to the "maect" logger (maect.train and python -m maect.eval send it to stdout).
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger("maect")


class Progress:
    def __init__(self, what: str, total: int | None = None, unit: str = "img", every: float = 10.0):
        """what: the loop's name in the log ('' = silent); total: expected count (None: no ETA); unit: what is
        counted; every: seconds between progress lines (the first line comes after `every` seconds, so short
        loops print only the closing line)."""
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.n = 0
        self.t0 = self.t_last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if not self.what or now - self.t_last < self.every:
            return
        self.t_last = now
        rate = self.n / max(now - self.t0, 1e-9)
        of = f"/{self.total}" if self.total else ""
        eta = f", ETA {(self.total - self.n) / max(rate, 1e-9):.0f} s" if self.total else ""
        log.info(f"[{self.what}] {self.n}{of} {self.unit}, {rate:.0f} {self.unit}/s{eta}")

    def done(self, extra: str = "") -> float:
        """Log the closing line (count, seconds, rate, extra) and return the elapsed seconds."""
        dt = time.perf_counter() - self.t0
        if self.what:
            log.info(f"[{self.what}] done: {self.n} {self.unit} in {dt:.1f} s ({self.n / max(dt, 1e-9):.0f} "
                     f"{self.unit}/s){' ' + extra if extra else ''}")
        return dt
