"""The progress and cancel convention shared by every long job (segment, export, train, evaluate).

A job takes ``progress(done, total, message)`` and ``cancel() -> bool`` callables, so the same
code reports to a terminal bar, a worker's event stream or a Slicer progress bar.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional

ProgressFn = Callable[[int, int, str], None]
CancelFn = Callable[[], bool]


class Cancelled(Exception):
    """The caller asked the job to stop; nothing was written."""


def check_cancel(cancel: Optional[CancelFn]) -> None:
    if cancel is not None and cancel():
        raise Cancelled("cancelled by the user")


def report(progress: Optional[ProgressFn], done: int, total: int, message: str) -> None:
    if progress is not None:
        progress(done, total, message)


class StderrBar:
    """A one-line progress bar on stderr for the command line (stdout stays clean for data)."""

    def __init__(self, stream=None, width: int = 30):
        self.stream = stream or sys.stderr
        self.width = width
        self.start = time.monotonic()
        self.mid_line = False

    def line(self, text: str) -> None:
        """``text`` on a line of its own (a log line), below the bar's current line."""
        self.stream.write(("\n" if self.mid_line else "") + text + "\n")
        self.mid_line = False
        self.stream.flush()

    def __call__(self, done: int, total: int, message: str) -> None:
        fraction = done / total if total else 1.0
        filled = int(round(self.width * fraction))
        elapsed = time.monotonic() - self.start
        text, eta = message.partition(", ETA ")[::2]  # the time left stays in sight however long the text
        eta = f" ETA {eta}" if eta else ""
        self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {text[:50]:<50} "
                          f"{elapsed:6.1f}s{eta:<14}")
        self.mid_line = not (total and done >= total)
        if not self.mid_line:
            self.stream.write("\n")
        self.stream.flush()
