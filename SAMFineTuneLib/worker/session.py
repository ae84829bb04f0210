"""One conversation with the worker: stdin/stdout of a local worker, or one TCP connection.

The main thread reads requests and answers the immediate ones (hello, ping, info, cancel,
shutdown) at once, also while a job runs; jobs queue for the job thread, which runs them one
at a time (``jobs.HANDLERS``) and sends their events. Each conversation has its own volumes
(``core.VolumeStore``) and its own access to the worker's files (``access.PathAccess``).

A conversation that must authenticate (TCP) reads nothing but two short ``hello`` lines until the
client has proved it knows the token: the first carries the client's nonce and gets this side's
nonce, salt and proof, the second carries the client's proof (``login_proofs``; the token never
travels). No attachments, no second try: any message that does not lead to login gets one error
and ends the conversation, so an unknown peer can neither flood the log nor keep a reply stream
going. Request text is never logged (a client of another protocol version may send the token);
only the request id, when it is a plain name, and the error kind. What waits in the queue is
bounded (``core.JobQueue``); a job's arrays and result are let go once it is answered.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
import traceback
from typing import Any, BinaryIO, Callable, Dict, Optional, Tuple

import numpy as np

from .. import login_proofs, protocol
from ..paths import new_job_folder
from ..protocol import ProtocolError
from ..progress import Cancelled
from . import jobs
from .access import PathAccess
from .core import JobQueue, VolumeStore, WorkerCore, request_weight

log = logging.getLogger("SAMFineTuneLib.worker")

PROGRESS_INTERVAL_S = 0.05  # at most ~20 progress events a second (first and last always sent)
JOB_STOP_WAIT_S = 10.0  # how long an ending conversation waits for its cancelled job before saying it still runs
# Failures that are the request's fault (bad input, a missing or refused file, a full disk): their
# message says what to do; a traceback would only hide it. Anything else is a bug: traceback.
EXPECTED_ERRORS = (ValueError, OSError)
# ``extra`` of a log line about a peer that has not logged in: a server lets only so many through
# (``server.PreLoginLogQuota``), so connecting over and over cannot fill its disk.
BEFORE_LOGIN = {"before_login": True}
_PLAIN_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,40}$")


def _loggable_id(job_id: Any) -> str:
    return job_id if isinstance(job_id, str) and _PLAIN_ID.match(job_id) else "(unnamed)"


class RunningJob:
    """One request being run in the worker: its parameters, arrays, and the hooks engine code calls."""

    def __init__(self, session: "Session", message: Dict[str, Any], weight: int = 0):
        self.session = session
        self.weight = weight  # what it holds while queued: its arrays and parsed line (bytes, estimated)
        self.id: str = message["id"]
        self.command: str = message["command"]
        self.params: Dict[str, Any] = message.get("params") or {}
        self.refs: Dict[str, Any] = message.get("arrays") or {}
        self.job_dir: Optional[str] = message.get("job_dir")
        self.volumes: VolumeStore = session.volumes
        self.access: PathAccess = session.access
        self.cancel_event = threading.Event()
        self._last_progress = 0.0

    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def progress(self, done: int, total: int, message: str = "") -> None:
        now = time.monotonic()
        if done in (0, total) or now - self._last_progress >= PROGRESS_INTERVAL_S:
            self._last_progress = now
            self.session.send(protocol.event(self.id, "progress", done=int(done), total=int(total),
                                             message=str(message)))

    def log(self, message: str, level: str = "info") -> None:
        log.info("[%s] %s", _loggable_id(self.id), message)
        self.session.send(protocol.event(self.id, "log", level=level, message=str(message)))

    def arrays(self) -> Dict[str, np.ndarray]:
        return protocol.load_arrays(self.refs, allow_files=self.session.files,
                                    max_bytes=self.session.max_attachment_bytes)

    def resolve_paths(self, names) -> None:
        """The parameters that name files on the worker's machine, as this conversation may use them
        (``access.PathAccess``); a refused one is a PermissionError before the job does anything."""
        for name in names:
            if name in self.params:
                self.params[name] = self.access.resolve(self.params[name], f"'{name}'")

    def take_params(self, defaults: Dict[str, Any], **given: Any) -> Dict[str, Any]:
        """defaults updated with given then the request's params; unknown names are an error."""
        unknown = sorted(set(self.params) - set(defaults))
        if unknown:
            raise ValueError(f"unknown parameter(s) for {self.command}: {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(defaults))}")
        merged = dict(defaults)
        merged.update(given)
        merged.update(self.params)
        return merged


class Session:
    """One conversation: stdin/stdout of a local worker, or one TCP connection to a server."""

    def __init__(self, core: WorkerCore, reader: BinaryIO, writer: BinaryIO, files: bool = True,
                 login: Optional[login_proofs.ServerKey] = None, need_hello: bool = False,
                 access: Optional[PathAccess] = None,
                 admit: Optional[Callable[[], None]] = None,
                 max_attachment_bytes: int = protocol.MAX_ATTACHMENT_BYTES):
        """files: arrays by file (local, trusted parent) or attached to the stream (TCP).
        login / need_hello: the client must log in first, proving it knows the token whose key this is
        (two 'hello's).
        access: which of the worker's files requests may name (default: any, as for a local worker).
        admit(): called once the client's proof checks out (the server takes its one-client lock there);
        raises ProtocolError to turn the client away."""
        self.core = core
        self.reader, self.writer = _CountingReader(reader), writer
        self.files = files
        self.login = login
        self.authenticated = not need_hello
        self.challenge: Optional[Tuple[str, str]] = None  # (client nonce, server nonce) once the first hello came
        self.access = access or PathAccess(any_path=True)
        self.admit = admit
        self.max_attachment_bytes = max_attachment_bytes
        self.volumes = VolumeStore()
        self.write_lock = threading.Lock()
        self.cond = threading.Condition()
        self.queue = JobQueue(max_attachment_bytes)
        self.current: Optional[RunningJob] = None
        self.stopping = False
        self.stop_server = False
        self.scratch: Optional[str] = None
        self.job_thread: Optional[threading.Thread] = None

    # --- output ---------------------------------------------------------------------------

    def send(self, message: Dict[str, Any], arrays: Optional[Dict[str, np.ndarray]] = None,
             folder: Optional[str] = None) -> None:
        """Write one event. A client that went away or stopped reading (a write past the socket's
        timeout) is logged (the read loop sees it end); any other failure (a bad array, a full disk
        while writing one) is raised to the caller."""
        with self.write_lock:
            try:
                protocol.write_message(self.writer, message, arrays, folder=folder, crop_masks=True)
            except (ConnectionError, TimeoutError, ValueError) as exc:  # ValueError: write to a closed stream
                if isinstance(exc, ProtocolError):
                    raise
                log.warning("cannot send %s for %s: %s", message.get("event"), _loggable_id(message.get("id")), exc,
                            extra=None if self.authenticated else BEFORE_LOGIN)

    def error_event(self, job_id: Optional[str], exc: BaseException, with_traceback: bool = False) -> Dict[str, Any]:
        text = str(exc) if isinstance(exc, ProtocolError) else f"{type(exc).__name__}: {exc}"
        fields = {"error": text, "kind": type(exc).__name__}
        if with_traceback:
            fields["traceback"] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            log.error("job %s failed:\n%s", _loggable_id(job_id), fields["traceback"])
        elif self.authenticated:
            log.warning("request %s refused: %s", _loggable_id(job_id), text)
        else:  # before authentication the text may echo what an unknown client sent
            log.warning("request %s refused before authentication (%s)", _loggable_id(job_id), type(exc).__name__,
                        extra=BEFORE_LOGIN)
        return protocol.event(job_id, "error", **fields)

    def send_error(self, job_id: Optional[str], exc: BaseException) -> None:
        self.send(self.error_event(job_id, exc))

    def _result_folder(self, job: RunningJob) -> Optional[str]:
        if not self.files:
            return None
        folder = job.job_dir
        if not folder:
            if self.scratch is None:
                self.scratch = new_job_folder("worker")
            folder = os.path.join(self.scratch, job.id)
        os.makedirs(folder, exist_ok=True)
        return folder

    # --- the read loop (main thread) ----------------------------------------------------------

    def serve(self) -> None:
        thread = threading.Thread(target=self._job_loop, name="samft-job", daemon=True)
        thread.start()
        try:
            while not self.stopping:
                try:
                    start = self.reader.count
                    message = protocol.read_message(self.reader, **self._read_limits())
                except ProtocolError as exc:
                    self.send_error(None, exc)
                    if exc.fatal or not self.authenticated:
                        break
                    continue
                except (OSError, ValueError):
                    break
                if message is None:
                    break
                challenged = self.challenge is not None
                self._handle(message, self.reader.count - start)
                message = None  # its arrays belong to the job: they go when it goes, not at the next read
                # Before login only a first hello that got a challenge is followed by a second message;
                # whatever answers the challenge either logs in or ends the conversation: no second try.
                if not self.authenticated and (challenged or self.challenge is None):
                    break
        finally:
            self._stop(thread)

    def _read_limits(self) -> Dict[str, Any]:
        if self.authenticated:
            return {"max_attachment_bytes": self.max_attachment_bytes}
        return {"max_line": protocol.HELLO_MAX_BYTES, "attachments": False, "skip_long_lines": False}

    def _handle(self, message: Dict[str, Any], size: int = 0) -> None:
        """Answer or queue one request; ``size``: the bytes it took on the stream."""
        job_id = message.get("id") if isinstance(message.get("id"), str) else None
        try:
            protocol.check_request(message)
        except ProtocolError as exc:
            self.send_error(job_id, exc)
            return
        command = message["command"]
        if not self.authenticated and command != "hello":
            self.send_error(job_id, ProtocolError("not authenticated: log in first ('hello' with a nonce, then "
                                                  "'hello' with the proof; PROTOCOL.md, TCP mode)"))
            return
        handler = getattr(self, "_now_" + command, None)
        if handler is not None:
            try:
                self.send(protocol.event(job_id, "result", result=handler(message.get("params") or {})))
            except Exception as exc:  # noqa: BLE001 - any failure becomes an error event
                self.send_error(job_id, exc)
            return
        with self.cond:  # 'accepted' goes out before the job thread can say 'started'
            job = RunningJob(self, message, request_weight(message, size))
            refusal = self.queue.refusal(job.weight)
            if refusal is not None:
                self.send_error(job_id, ProtocolError(refusal))
                return
            self.queue.append(job)
            self.send(protocol.event(job_id, "accepted", position=len(self.queue) + (self.current is not None) - 1))
            self.cond.notify()

    def _now_hello(self, params: Dict[str, Any]) -> Dict[str, Any]:
        if self.authenticated:
            return {"protocol": protocol.PROTOCOL_VERSION, "pid": os.getpid()}
        if self.login is not None:
            if self.challenge is None:
                return self._challenge(params)
            self._check_proof(params)
        if self.admit is not None:
            self.admit()
        self.authenticated = True
        return {"protocol": protocol.PROTOCOL_VERSION, "pid": os.getpid(), "paths": self.access.describe()}

    def _challenge(self, params: Dict[str, Any]) -> Dict[str, Any]:
        """Login, first step: this side's nonce, the salt of its key and its proof over both nonces.
        The client checks the proof before it sends its own, so a program squatting on the port
        learns nothing of the token."""
        client_nonce = params.get("nonce")
        if not login_proofs.is_nonce(client_nonce):
            raise ProtocolError(f"login: the first 'hello' must carry 'nonce', {2 * login_proofs.NONCE_BYTES} "
                                "lowercase hex digits from a random source (the token itself is never sent)")
        server_nonce = login_proofs.new_nonce()
        self.challenge = (client_nonce, server_nonce)
        proof = login_proofs.login_proof(self.login.key, login_proofs.SERVER_PROOF_LABEL, client_nonce, server_nonce)
        return {"nonce": server_nonce, "salt": self.login.salt, "proof": proof}

    def _check_proof(self, params: Dict[str, Any]) -> None:
        """Login, second step: the client's proof over this conversation's nonces (so an answer seen on
        another connection, or this side's own proof, does not log anyone in)."""
        expected = login_proofs.login_proof(self.login.key, login_proofs.CLIENT_PROOF_LABEL, *self.challenge)
        if not login_proofs.proof_matches(params.get("proof"), expected):
            raise PermissionError("authentication failed: wrong or missing proof of the token; pass the token the "
                                  f"server printed at start (WorkerClient(token=...) or ${protocol.TOKEN_ENV})")

    def _now_ping(self, params: Dict[str, Any]) -> Dict[str, Any]:
        with self.cond:
            return {"pong": True, "time": time.time(), "busy": self.current.id if self.current else None,
                    "queued": [job.id for job in self.queue]}

    def _now_info(self, params: Dict[str, Any]) -> Dict[str, Any]:
        return dict(self.core.info(), volumes=self.volumes.keys(), paths=self.access.describe())

    def _now_cancel(self, params: Dict[str, Any]) -> Dict[str, Any]:
        target = params.get("job")
        with self.cond:
            if self.current is not None and self.current.id == target:
                self.current.cancel_event.set()
                return {"job": target, "cancelled": True, "was": "running"}
            for job in list(self.queue):
                if job.id == target:
                    self.queue.remove(job)
                    self.send(protocol.event(target, "cancelled"))
                    return {"job": target, "cancelled": True, "was": "queued"}
        return {"job": target, "cancelled": False, "was": "unknown or finished"}

    def _now_shutdown(self, params: Dict[str, Any]) -> Dict[str, Any]:
        self.stopping = True
        self.stop_server = bool(params.get("server", False))
        return {"stopping": True}

    def _stop(self, thread: threading.Thread) -> None:
        with self.cond:
            self.stopping = True
            dropped = list(self.queue)
            self.queue.clear()
            if self.current is not None:
                self.current.cancel_event.set()
            self.cond.notify_all()
        for job in dropped:
            self.send(protocol.event(job.id, "cancelled"))
        self.job_thread = thread
        thread.join(timeout=JOB_STOP_WAIT_S)
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def wait_for_job(self) -> None:
        """Block until the job thread of this ended conversation has ended. A job that ignores its
        cancel still uses the shared core, so a server admits nobody else until then."""
        thread = self.job_thread
        if thread is None or not thread.is_alive():
            return
        log.warning("a job of a client that left is still running %g s after its cancel; the next client waits "
                    "until it ends (or restart the server)", JOB_STOP_WAIT_S)
        thread.join()
        log.info("the job of the client that left has ended")

    # --- the job thread ---------------------------------------------------------------------

    def _job_loop(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return
                self.current = self.queue.popleft()
            self._answer(self.current)  # the job, its arrays and its result are let go when this returns

    def _answer(self, job: RunningJob) -> None:
        """Run ``job`` and send its final event."""
        try:
            final, arrays = self._run(job)
        finally:
            with self.cond:  # no longer busy: a ping after the final event must not name this job
                self.current = None
        try:
            self.send(final, arrays, folder=self._result_folder(job) if arrays else None)
        except Exception as exc:  # noqa: BLE001 - e.g. a full disk while writing the mask
            self.send_error(job.id, exc)

    def _run(self, job: RunningJob) -> Tuple[Dict[str, Any], Optional[Dict[str, np.ndarray]]]:
        """Run one job; returns its final event (result, error or cancelled) and result arrays."""
        self.send(protocol.event(job.id, "started", command=job.command))
        started = time.perf_counter()
        self.core.job_cancelled = job.cancelled
        try:
            job.resolve_paths(jobs.PATH_PARAMS.get(job.command, ()))
            result, arrays = jobs.HANDLERS[job.command](self.core, job)
        except BaseException as exc:  # noqa: BLE001 - report everything, keep serving
            if job.cancelled() or isinstance(exc, Cancelled):
                return protocol.event(job.id, "cancelled"), None
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            return self.error_event(job.id, exc, with_traceback=not isinstance(exc, EXPECTED_ERRORS)), None
        finally:
            self.core.job_cancelled = None
        if job.cancelled():  # finished anyway, but the client gave up on it: drop the late result
            return protocol.event(job.id, "cancelled"), None
        result = dict(result or {})
        result.setdefault("seconds", round(time.perf_counter() - started, 4))
        return protocol.event(job.id, "result", result=result), arrays or None


class _CountingReader:
    """A binary stream that counts the bytes read from it (what ``protocol.read_message`` calls)."""

    def __init__(self, stream: BinaryIO):
        self.stream, self.count = stream, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.count += len(data or b"")
        return data

    def readline(self, size: int = -1) -> bytes:
        data = self.stream.readline(size)
        self.count += len(data or b"")
        return data
