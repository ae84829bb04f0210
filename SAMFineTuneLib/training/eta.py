"""Time left in a long phase (preparing slices, training), from its pace so far, for the
progress messages the panel and the command line show."""
from __future__ import annotations

import time


def clock(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour on."""
    seconds = int(round(max(0.0, seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Eta:
    """``text(done)``: ", ETA m:ss" for ``total`` units of work begun at construction (or at
    ``start``), once one has finished; an empty string before that."""

    def __init__(self, total: int, start: float = None):
        self.total = total
        self.start = time.monotonic() if start is None else start

    def seconds_left(self, done: int) -> float:
        return (time.monotonic() - self.start) / done * (self.total - done) if done > 0 else float("nan")

    def text(self, done: int) -> str:
        return f", ETA {clock(self.seconds_left(done))}" if 0 < done < self.total else ""
