"""A job as the client sees it (``Job``, updated by ``WorkerClient.poll``), and how one can fail."""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from ..progress import Cancelled

FINAL_STATES = ("done", "error", "cancelled")


class JobError(RuntimeError):
    """A job ended with an error; ``job`` is the Job (its ``error`` holds the worker's message)."""

    def __init__(self, message: str, job: "Optional[Job]" = None):
        super().__init__(message)
        self.job = job


class WorkerCrashed(JobError):
    """The worker process died (or the connection dropped) before the job ended."""


class JobCancelled(JobError, Cancelled):
    """The job was cancelled (also a ``progress.Cancelled``, as in-process engine calls raise)."""


class JobTimeout(JobError, TimeoutError):
    """``run(..., timeout=)`` ran out; the job was cancelled."""


class Job:
    """A request sent to the worker and what is known of it so far (updated by ``poll``)."""

    def __init__(self, job_id: str, command: str, params: Dict[str, Any]):
        self.id = job_id
        self.command = command
        self.params = params
        self.state = "queued"  # queued -> running -> done | error | cancelled
        self.progress = 0.0  # fraction 0..1
        self.step: Tuple[int, int] = (0, 0)  # (done, total) as the job reported it
        self.message = ""
        self.logs: List[str] = []
        self.result: Optional[Dict[str, Any]] = None
        self.arrays: Dict[str, np.ndarray] = {}
        self.error: Optional[str] = None
        self.traceback: Optional[str] = None
        self.exception: Optional[JobError] = None
        self.on_event: Optional[Callable[[Dict[str, Any]], None]] = None
        self.cancel_requested = False
        self.cancel_time: Optional[float] = None
        self.folder: Optional[str] = None
        self.submitted = time.monotonic()

    @property
    def done(self) -> bool:
        return self.state in FINAL_STATES

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.command} {self.state} {self.progress:.0%} {self.message!r}>"
