"""``WorkerClient``: start the worker (or connect to one), send jobs, follow them, notice when it dies."""
from __future__ import annotations

import itertools
import logging
import os
import queue
import shutil
import sys
import time
import weakref
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from .. import protocol
from ..paths import default_log_path, make_private_dir, new_job_folder
from ..protocol import PROTOCOL_VERSION, TOKEN_ENV, ProtocolError
from .connections import READERS, Connection, ProcessConnection, SocketConnection, parse_address
from .jobs import Job, JobCancelled, JobError, JobTimeout, WorkerCrashed
from .login import version_mismatch

log = logging.getLogger("SAMFineTuneLib.client")

# The folder that holds SAMFineTuneLib: the worker process gets it on its PYTHONPATH.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BOOT = "import sys; from SAMFineTuneLib.worker import main_argv; sys.exit(main_argv())"
LOG_ROTATE_BYTES = 10 << 20


class _Resources:
    """What must be cleaned up even if the client is just dropped (weakref.finalize target)."""

    def __init__(self):
        self.conn: Optional[Connection] = None
        self.folder: Optional[str] = None

    def close(self, timeout: float = 5.0) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close(timeout)
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


class WorkerClient:
    """Client of one background worker (a child process, or a ``serve`` endpoint with ``address``).

    Use from one thread (Slicer's main thread). ``poll`` never blocks; ``run`` blocks."""

    def __init__(self, python: Optional[str] = None, log_path: Optional[str] = None,
                 env: Optional[Dict[str, str]] = None, address: Union[str, Tuple[str, int], None] = None,
                 token: Optional[str] = None, command: Optional[Sequence[str]] = None,
                 cancel_grace: float = 10.0, connect_timeout: float = 10.0, reader: str = "thread"):
        """python: interpreter for the worker (default: this one; in Slicer, PythonSlicer).
        log_path: the worker's log (default: logs/worker.log in the user's cache folder).
        env: extra environment variables for the worker (e.g. OMP_NUM_THREADS, CUDA_VISIBLE_DEVICES).
        address/token: use a running ``serve`` endpoint instead of a child process (token default:
        ``$SAMFINETUNE_TOKEN``; it never travels: client and server prove to each other that they know it).
        command: the full command that starts a worker (overrides python; it must speak on stdin/stdout).
        cancel_grace: a cancelled job still running after this many seconds gets its worker restarted.
        reader: "thread" (a reader thread follows the worker) or "poll" (no thread: ``poll`` reads
        what has arrived; for Slicer, where a thread only runs while Python does)."""
        if reader not in READERS:
            raise ValueError(f"reader must be one of {', '.join(READERS)}, got {reader!r}")
        self.python = python or sys.executable
        self.log_path = os.path.abspath(log_path or default_log_path())
        self.env = dict(env or {})
        self.address = parse_address(address) if address is not None else None
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)
        self.reader = reader
        self.command = list(command) if command else None
        self.cancel_grace = cancel_grace
        self.connect_timeout = connect_timeout
        self._events: "queue.Queue" = queue.Queue()
        self._jobs: Dict[str, Job] = {}
        self._ids = itertools.count(1)
        self._res = _Resources()
        self._finalizer = weakref.finalize(self, _Resources.close, self._res)
        self.starts = 0  # how many workers this client has started or connected to

    # --- connection -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._res.conn is not None

    @property
    def worker_pid(self) -> Optional[int]:
        conn = self._res.conn
        return conn.process.pid if isinstance(conn, ProcessConnection) else None

    def _folder(self) -> str:
        if self._res.folder is None:
            self._res.folder = new_job_folder("jobs")
        return self._res.folder

    def _connect(self) -> Connection:
        if self._res.conn is not None:
            return self._res.conn
        if self.address is not None:
            conn: Connection = SocketConnection(self.address[0], self.address[1], self._events, self.connect_timeout,
                                                self.reader, token=self.token)
            self._res.conn = conn
        else:
            make_private_dir(os.path.dirname(self.log_path))
            try:
                if os.path.getsize(self.log_path) > LOG_ROTATE_BYTES:
                    os.replace(self.log_path, self.log_path + ".1")
            except OSError:  # no log yet, or another worker holds it open (Windows): keep appending
                pass
            env = dict(os.environ)
            env.update(self.env)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
            command = self.command or [self.python, "-c", BOOT, "worker", "--log", self.log_path]
            conn = ProcessConnection(command, env, self._folder(), self.log_path, self._events, self.reader)
            self._res.conn = conn
        self.starts += 1
        return conn

    def start(self, timeout: float = 120.0) -> Dict[str, Any]:
        """Start (or connect to) the worker now and wait until it has said hello; returns the hello."""
        conn = self._connect()
        deadline = time.monotonic() + timeout
        while conn.hello is None:
            if self._res.conn is not conn:
                raise WorkerCrashed(self._last_crash or "the worker stopped while starting")
            if time.monotonic() > deadline:
                raise JobTimeout(f"the worker did not start within {timeout:.0f} s; see {self.log_path}")
            self.poll(timeout=0.1)
        return conn.hello

    _last_crash: Optional[str] = None

    def _lost(self, conn: Connection, reason: Optional[str] = None, kind: type = WorkerCrashed) -> None:
        """The worker is gone (or refused us): every open job ends, cancelled if the user asked for
        that, else with ``kind`` (WorkerCrashed unless the worker said why)."""
        if self._res.conn is conn:
            self._res.conn = None
        text = reason or conn.describe_end()
        self._last_crash = text
        log.warning("%s", text)
        prefix = "WorkerCrashed: " if kind is WorkerCrashed else ""
        for job in list(self._jobs.values()):
            if job.command == "shutdown":
                self._finish(job, "done", result={"stopping": True})
            elif job.cancel_requested:
                self._finish(job, "cancelled")
            else:
                self._finish(job, "error", error=f"{prefix}job {job.id} ({job.command}) did not finish: {text}",
                             kind=kind)
        conn.kill()

    # --- jobs -------------------------------------------------------------------------------

    def _new_job(self, command: str, params: Optional[Dict[str, Any]]) -> Job:
        job = Job(f"j{next(self._ids)}", command, dict(params or {}))
        self._jobs[job.id] = job
        return job

    def _send_request(self, job: Job, arrays: Optional[Dict[str, np.ndarray]] = None) -> None:
        conn = self._res.conn
        extra = {}
        if conn is not None and conn.files:
            job.folder = extra["job_dir"] = os.path.join(self._folder(), job.id)
            if arrays:
                os.makedirs(job.folder, exist_ok=True)
        try:
            conn.send(protocol.request(job.id, job.command, job.params, **extra), arrays, folder=job.folder)
        except (ConnectionError, ValueError) as exc:
            if isinstance(exc, ProtocolError):  # a bad array name or dtype: the caller's mistake
                self._forget(job)
                raise
            self._lost(conn)  # broken pipe / closed stream: the worker is already gone
            if not job.done:
                self._finish(job, "error", error=f"WorkerCrashed: {self._last_crash}", kind=WorkerCrashed)
        except BaseException:  # unserialisable params, a full disk: nothing was sent
            self._forget(job)
            raise

    def _forget(self, job: Job) -> None:
        self._jobs.pop(job.id, None)
        if job.folder:
            shutil.rmtree(job.folder, ignore_errors=True)

    def submit(self, command: str, params: Optional[Dict[str, Any]] = None,
               arrays: Optional[Dict[str, np.ndarray]] = None) -> Job:
        """Queue a job on the worker (starting one if needed) and return at once."""
        if command not in protocol.COMMANDS or command in ("hello", "cancel"):
            raise ValueError(f"unknown command {command!r}; use one of: "
                             f"{', '.join(c for c in protocol.COMMANDS if c not in ('hello', 'cancel'))}")
        for name, array in (arrays or {}).items():
            if not isinstance(array, np.ndarray):
                raise TypeError(f"array {name!r} must be a numpy array, got {type(array).__name__}")
        self._connect()
        job = self._new_job(command, params)
        self._send_request(job, arrays)
        return job

    def cancel(self, job: Job) -> None:
        """Ask the worker to stop ``job``; its state becomes 'cancelled' when it has (see ``poll``).
        Whatever result it still sends is dropped."""
        if job.done or job.cancel_requested:
            return
        job.cancel_requested, job.cancel_time = True, time.monotonic()
        job.message = "cancelling"
        conn = self._res.conn
        if conn is None:
            self._finish(job, "cancelled")
            return
        try:
            conn.send(protocol.request(f"c{next(self._ids)}", "cancel", {"job": job.id}))
        except (OSError, ValueError):
            self._lost(conn)

    def poll(self, timeout: float = 0.0) -> int:
        """Handle what the worker has said so far; wait up to ``timeout`` s for the first word.
        Returns how many messages were handled. Call it from a qt.QTimer in Slicer."""
        handled = 0
        conn = self._res.conn
        if conn is not None and conn.mode == "poll":
            conn.pump(timeout if self._events.empty() else 0.0)
            timeout = 0.0
        try:
            item = self._events.get(timeout=timeout) if timeout > 0 else self._events.get_nowait()
            while True:
                handled += self._handle(*item)
                item = self._events.get_nowait()
        except queue.Empty:
            pass
        self._check_stuck_cancels()
        return handled

    def _handle(self, conn: Connection, kind: str, payload: Any) -> int:
        if conn is not self._res.conn:
            return 0  # from a worker we already gave up on
        if kind == "eof":
            self._lost(conn, payload)  # payload: why, when the connection ended on unreadable data
        elif kind == "bad":
            log.warning("unreadable message from the worker: %s", payload)
        else:
            self._on_message(conn, payload)
        return 1

    def _on_message(self, conn: Connection, message: Dict[str, Any]) -> None:
        job_id = message.get("id")
        name, job = message.get("event"), self._jobs.get(job_id) if isinstance(job_id, str) else None
        mismatch = version_mismatch(message)
        if mismatch:
            self._lost(conn, mismatch, kind=JobError)
            return
        if name == "hello":
            conn.hello = message
            return
        if job is None:
            if name == "error" and message.get("id") is None:  # about the connection itself (e.g. an unreadable line)
                self._lost(conn, f"the worker refused: {message.get('error')}", kind=JobError)
            return
        if name == "started":
            job.state = "running"
        elif name == "progress":
            done, total = _count(message.get("done")), _count(message.get("total"))
            job.step, job.progress = (done, total), (done / total if total else 0.0)
            if not job.cancel_requested:  # keep showing "cancelling"
                job.message = str(message.get("message", ""))
        elif name == "log":
            job.logs.append(str(message.get("message", "")))
        elif name == "result":
            if job.cancel_requested:
                self._finish(job, "cancelled")  # a late result of a cancelled job is dropped
            else:
                try:  # files only from the child worker (conn.files): a server must not make Slicer read them
                    arrays = protocol.load_arrays(message.get("arrays"), allow_files=conn.files)
                except (ProtocolError, MemoryError) as exc:
                    self._finish(job, "error", error=f"ProtocolError: {exc}")
                else:
                    self._finish(job, "done", result=message.get("result") or {}, arrays=arrays)
        elif name == "error":
            job.traceback = message.get("traceback")
            self._finish(job, "error", error=str(message.get("error")))
        elif name == "cancelled":
            self._finish(job, "cancelled")
        if job.on_event is not None and not job.done:
            job.on_event(message)

    def _finish(self, job: Job, state: str, result: Optional[Dict[str, Any]] = None,
                arrays: Optional[Dict[str, np.ndarray]] = None, error: Optional[str] = None,
                kind: type = JobError) -> None:
        job.state = state
        if state == "done":
            job.result, job.arrays, job.progress = result, arrays or {}, 1.0
            job.message = job.message or "done"
        elif state == "cancelled":
            job.message = "cancelled"
            job.exception = JobCancelled(f"job {job.id} ({job.command}) was cancelled", job)
        else:
            job.error = error
            job.message = error or "error"
            job.exception = kind(error or "error", job)
        self._forget(job)
        if job.on_event is not None:
            final = {"v": PROTOCOL_VERSION, "id": job.id, "event": {"done": "result"}.get(state, state)}
            if error:
                final.update(error=error, kind=kind.__name__)
            job.on_event(final)

    def _check_stuck_cancels(self) -> None:
        conn = self._res.conn
        if conn is None:
            return
        now = time.monotonic()
        for job in list(self._jobs.values()):
            if job.cancel_requested and now - (job.cancel_time or now) > self.cancel_grace:
                self._lost(conn, f"job {job.id} ({job.command}) did not stop within {self.cancel_grace:.0f} s "
                                 "of being cancelled, so its worker was stopped")
                return

    # --- blocking helpers -----------------------------------------------------------------

    def wait(self, job: Job, progress: Optional[Callable[[int, int, str], None]] = None,
             timeout: Optional[float] = None,
             cancel: Optional[Callable[[], bool]] = None) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
        """Block until ``job`` ends; return (result, arrays) or raise its JobError / JobCancelled /
        WorkerCrashed. progress(done, total, message) is called as the job reports; ``cancel()`` is
        asked about every 0.1 s and, once it returns True, the job is cancelled (JobCancelled)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = None
        try:
            while not job.done:
                self.poll(timeout=0.1)
                if progress is not None and (job.step, job.message) != seen and job.step[1]:
                    seen = (job.step, job.message)
                    progress(job.step[0], job.step[1], job.message)
                if job.cancel_requested or job.done:
                    continue
                if (deadline is not None and time.monotonic() > deadline) or (cancel is not None and cancel()):
                    self.cancel(job)
        except KeyboardInterrupt:
            self.cancel(job)
            raise
        if job.state == "done":
            return job.result or {}, job.arrays
        if job.state == "cancelled" and deadline is not None and time.monotonic() > deadline:
            raise JobTimeout(f"job {job.id} ({job.command}) did not finish within {timeout} s and was cancelled", job)
        raise job.exception or JobError(job.error or job.state, job)

    def run(self, command: str, params: Optional[Dict[str, Any]] = None,
            arrays: Optional[Dict[str, np.ndarray]] = None,
            progress: Optional[Callable[[int, int, str], None]] = None,
            timeout: Optional[float] = None,
            cancel: Optional[Callable[[], bool]] = None) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
        """Submit and wait (for scripts, the console and blocking backends)."""
        return self.wait(self.submit(command, params, arrays), progress=progress, timeout=timeout, cancel=cancel)

    def ping(self, timeout: float = 30.0) -> Dict[str, Any]:
        return self.run("ping", timeout=timeout)[0]

    def info(self, timeout: float = 120.0) -> Dict[str, Any]:
        """Device, torch version, CUDA device name, memory, loaded model, log path."""
        return self.run("info", timeout=timeout)[0]

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the worker (or leave the server) and remove this client's job folders."""
        conn = self._res.conn
        if conn is not None:
            try:
                conn.send(protocol.request(f"s{next(self._ids)}", "shutdown", {}))
            except (OSError, ValueError):
                pass
        for job in list(self._jobs.values()):
            self._finish(job, "cancelled")
        self._res.close(timeout)

    close = shutdown

    def __enter__(self) -> "WorkerClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()


def _count(value: Any) -> int:
    """A step count from a progress event; anything but a non-negative integer counts as 0."""
    return value if type(value) is int and value >= 0 else 0
