"""A dependency-free progress line with an ETA, printed to stderr."""
from __future__ import annotations

import sys
import time


def fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """`step()` after each candidate. On a terminal one line is redrawn in place; in a log
    a line is printed per finished key (`note_key`) only. The ETA starts from the
    up-front estimate and then follows the measured rate."""

    WIDTH = 30

    def __init__(self, total: int, estimate_s: float, stream=None, clock=time.monotonic):
        self.total, self.done, self.estimate_s = total, 0, estimate_s
        self.stream = sys.stderr if stream is None else stream
        self.clock = clock
        self.start = clock()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.label = ""

    def eta(self) -> float:
        elapsed = self.clock() - self.start
        if self.done == 0 or self.total == 0:
            return max(self.estimate_s - elapsed, 0.0)
        return elapsed / self.done * (self.total - self.done)

    def line(self) -> str:
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(frac * self.WIDTH)
        return (f"[{bar:<{self.WIDTH}}] {self.done}/{self.total} candidates, "
                f"elapsed {fmt_seconds(self.clock() - self.start)}, "
                f"ETA {fmt_seconds(self.eta())}  {self.label}")

    def step(self, n: int = 1, label: str = "") -> None:
        self.done += n
        self.label = label or self.label
        if self.tty:
            self.stream.write("\r\033[K" + self.line())
            self.stream.flush()

    def note_key(self, message: str) -> None:
        """A finished key: its own line (above the bar on a terminal)."""
        prefix = "\r\033[K" if self.tty else ""
        self.stream.write(f"{prefix}{message}\n")
        if not self.tty:
            self.stream.write(self.line() + "\n")
        else:
            self.stream.write(self.line())
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
