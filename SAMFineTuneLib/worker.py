"""The background worker: runs SAMFineTune's heavy jobs in their own process.

``python -m SAMFineTuneLib worker`` speaks the protocol (``PROTOCOL.md``) on its stdin/stdout;
``python -m SAMFineTuneLib serve --port N`` speaks it on a TCP socket (loopback by default; any
other address needs ``--token``). The worker keeps one Segmenter (model + embedding cache) warm
between jobs and connections, runs one job at a time on a job thread and keeps reading requests
on the main thread, so ``cancel`` and ``ping`` are answered while a job runs.

The protocol stream is kept clean: fd 1, ``sys.stdout``, warnings and logging all go to the log
file (``--log``, default in the user's cache folder); only ``protocol.write_message`` writes to
the real stdout.
"""
from __future__ import annotations

import argparse
import collections
import faulthandler
import hmac
import inspect
import ipaddress
import logging
import os
import platform
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, BinaryIO, Callable, Dict, Optional, Tuple

import numpy as np

from . import catalogue, protocol
from .progress import Cancelled
from .protocol import PROTOCOL_VERSION, ProtocolError

log = logging.getLogger("SAMFineTuneLib.worker")

TOKEN_ENV = "SAMFINETUNE_TOKEN"
BUSY_WAIT_S = 5.0  # a new TCP client waits this long for the previous one to leave
PROGRESS_INTERVAL_S = 0.05  # at most ~20 progress events a second (first and last always sent)

# segment/reprompt parameters and their defaults (PROTOCOL.md): the catalogue's, plus what only
# the protocol carries.
SEGMENT_PARAMS: Dict[str, Any] = dict(catalogue.SEGMENT_DEFAULTS, box=None, spacing=None, multimask=None,
                                      volume_key=None)
# What picks the segmenter: the model, and the adapter merged into it.
SEGMENTER_KEYS = catalogue.MODEL_KEYS + ("adapter",)

Result = Tuple[Dict[str, Any], Dict[str, np.ndarray]]


def _check_path(path: Optional[str], what: str, folder: bool = False) -> Optional[str]:
    if path in (None, ""):
        return None
    if not isinstance(path, str):
        raise ValueError(f"{what} must be a path string, got {type(path).__name__}")
    if not (os.path.isdir(path) if folder else os.path.isfile(path)):
        raise FileNotFoundError(f"{what} not found: {path}")
    return os.path.abspath(path)


def _lazy(module: str, name: str, command: str) -> Any:
    """A function from another part of SAMFineTuneLib, or a clear error if that part is missing."""
    import importlib

    try:
        return getattr(importlib.import_module(f"{__package__}.{module}"), name)
    except (ImportError, AttributeError) as exc:
        raise RuntimeError(
            f"the '{command}' job needs SAMFineTuneLib.{module}.{name}, which this worker cannot load ({exc}); "
            "check that SAMFineTuneLib is complete and its dependencies are installed in the worker's Python"
        ) from exc


def _call_with_hooks(fn: Callable, job: "Job", *args: Any, **kwargs: Any) -> Any:
    """Call fn, handing it the job's progress/cancel/log hooks where its signature takes them."""
    signature = inspect.signature(fn)
    for hook in ("progress", "cancel", "log"):
        if hook in signature.parameters:
            kwargs[hook] = getattr(job, "cancelled" if hook == "cancel" else hook)
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise ValueError(f"bad {job.command} parameters: {exc}") from None
    return fn(*args, **kwargs)


def _stop_encoder_on_cancel(encoder, core: "WorkerCore") -> None:
    """Let a cancel stop the image encoder between its blocks, not only between slices: one slice
    is ~1 s for LiteMedSAM and ~10 s for SAM ViT-B on a CPU. Nothing is cached from a stopped call."""

    def check(module, inputs) -> None:
        cancelled = core.job_cancelled
        if cancelled is not None and cancelled():
            raise Cancelled("cancelled by the user")

    for module in encoder.modules():
        if next(module.children(), None) is not None:
            module.register_forward_pre_hook(check)


class StoredVolume:
    def __init__(self, array: np.ndarray, params: Dict[str, Any]):
        self.array = array
        self.params = params


class WorkerCore:
    """What outlives jobs and connections: the Segmenter (model + embedding cache) and recent volumes."""

    def __init__(self, log_path: Optional[str] = None, max_volumes: int = 2):
        self.log_path = log_path
        self.segmenter = None
        self.segmenter_key: Optional[Tuple] = None
        self.adapter: Optional[str] = None
        self.volumes: "collections.OrderedDict[str, StoredVolume]" = collections.OrderedDict()
        self.max_volumes = max_volumes
        self.last_volume_key: Optional[str] = None
        self.job_cancelled: Optional[Callable[[], bool]] = None  # the running job's cancel(), for encoder hooks

    def get_segmenter(self, model: str = "litemedsam", checkpoint: Optional[str] = None,
                      device: Optional[str] = "auto", adapter: Optional[str] = None):
        checkpoint = _check_path(checkpoint, "checkpoint file")
        adapter = _check_path(adapter, "adapter folder", folder=True)
        key = (model, checkpoint, device or "auto")
        if self.segmenter is None or key != self.segmenter_key:
            from .segmenter import Segmenter

            self.segmenter, self.segmenter_key, self.adapter = None, None, None  # free the old model first
            log.info("loading model %s (checkpoint %s) on %s", model, checkpoint, device)
            self.segmenter = Segmenter(model=model, checkpoint=checkpoint, device=device or "auto")
            self.segmenter_key = key
            _stop_encoder_on_cancel(self.segmenter.model.image_encoder, self)
        if adapter != self.adapter:
            self.segmenter.set_adapter(adapter)
            self.adapter = adapter
        return self.segmenter

    def loaded_model(self, model: str, checkpoint: Optional[str], device: Optional[str]):
        """The warm model, if it is exactly this one and has no adapter merged in (training reuses it)."""
        checkpoint = os.path.abspath(checkpoint) if checkpoint else None
        if self.segmenter is None or self.adapter is not None or self.segmenter_key != (model, checkpoint, device):
            return None
        return self.segmenter.model

    def remember_volume(self, key: str, array: np.ndarray, params: Dict[str, Any]) -> None:
        self.volumes.pop(key, None)
        self.volumes[key] = StoredVolume(array, params)
        while len(self.volumes) > self.max_volumes:
            self.volumes.popitem(last=False)
        self.last_volume_key = key

    def info(self) -> Dict[str, Any]:
        info: Dict[str, Any] = {
            "protocol": PROTOCOL_VERSION, "pid": os.getpid(), "python": platform.python_version(),
            "executable": sys.executable, "platform": platform.platform(), "log": self.log_path,
            "model": self.segmenter_key[0] if self.segmenter_key else None, "adapter": self.adapter,
            "volumes": list(self.volumes), "memory": {},
        }
        try:
            import psutil

            ram = psutil.virtual_memory()
            info["memory"].update(ram_total=ram.total, ram_available=ram.available,
                                  worker_rss=psutil.Process().memory_info().rss)
        except ImportError:
            pass
        try:
            import torch
        except ImportError as exc:
            info.update(torch=None, device=None, cuda_name=None, error=f"torch cannot be imported here: {exc}")
            return info
        info.update(torch=torch.__version__, device="cpu", cuda_name=None, threads=torch.get_num_threads())
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            info.update(device="cuda", cuda_name=torch.cuda.get_device_name(0), cuda_version=torch.version.cuda)
            info["memory"].update(gpu_total=total, gpu_free=free, gpu_allocated=torch.cuda.memory_allocated(),
                                  gpu_reserved=torch.cuda.memory_reserved())
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            info["device"] = "mps"
        return info


class Job:
    """One request being run: its parameters, arrays, and the hooks engine code calls."""

    def __init__(self, session: "Session", message: Dict[str, Any]):
        self.session = session
        self.id: str = message["id"]
        self.command: str = message["command"]
        self.params: Dict[str, Any] = message.get("params") or {}
        self.refs: Dict[str, Any] = message.get("arrays") or {}
        self.job_dir: Optional[str] = message.get("job_dir")
        self.cancel_event = threading.Event()
        self._last_progress = 0.0

    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def progress(self, done: int, total: int, message: str = "") -> None:
        now = time.monotonic()
        if done in (0, total) or now - self._last_progress >= PROGRESS_INTERVAL_S:
            self._last_progress = now
            self.session.send(protocol.event(self.id, "progress", done=int(done), total=int(total), message=str(message)))

    def log(self, message: str, level: str = "info") -> None:
        log.info("[%s] %s", self.id, message)
        self.session.send(protocol.event(self.id, "log", level=level, message=str(message)))

    def arrays(self) -> Dict[str, np.ndarray]:
        return protocol.load_arrays(self.refs, allow_files=self.session.files)

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
                 token: Optional[str] = None, need_hello: bool = False):
        self.core = core
        self.reader, self.writer = reader, writer
        self.files = files  # arrays by file (local, trusted parent) or attached to the stream (TCP)
        self.token = token
        self.authenticated = not need_hello
        self.write_lock = threading.Lock()
        self.cond = threading.Condition()
        self.queue: "collections.deque[Job]" = collections.deque()
        self.current: Optional[Job] = None
        self.stopping = False
        self.stop_server = False
        self.scratch: Optional[str] = None

    # --- output ---------------------------------------------------------------------------

    def send(self, message: Dict[str, Any], arrays: Optional[Dict[str, np.ndarray]] = None,
             folder: Optional[str] = None) -> None:
        """Write one event. A client that went away is logged (the read loop sees it end); any other
        failure (a bad array, a full disk while writing one) is raised to the caller."""
        with self.write_lock:
            try:
                protocol.write_message(self.writer, message, arrays, folder=folder, crop_masks=True)
            except (ConnectionError, ValueError) as exc:  # ValueError: write to a closed stream
                if isinstance(exc, ProtocolError):
                    raise
                log.warning("cannot send %s for %s: %s", message.get("event"), message.get("id"), exc)

    @staticmethod
    def error_event(job_id: Optional[str], exc: BaseException, with_traceback: bool = False) -> Dict[str, Any]:
        text = str(exc) if isinstance(exc, ProtocolError) else f"{type(exc).__name__}: {exc}"
        fields = {"error": text, "kind": type(exc).__name__}
        if with_traceback:
            fields["traceback"] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            log.error("job %s failed:\n%s", job_id, fields["traceback"])
        else:
            log.warning("request %s refused: %s", job_id, text)
        return protocol.event(job_id, "error", **fields)

    def send_error(self, job_id: Optional[str], exc: BaseException) -> None:
        self.send(self.error_event(job_id, exc))

    def _result_folder(self, job: Job) -> Optional[str]:
        if not self.files:
            return None
        folder = job.job_dir
        if not folder:
            if self.scratch is None:
                self.scratch = tempfile.mkdtemp(prefix="samft-worker-")
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
                    message = protocol.read_message(self.reader)
                except ProtocolError as exc:
                    self.send_error(None, exc)
                    continue
                except (OSError, ValueError):
                    break
                if message is None:
                    break
                self._handle(message)
        finally:
            self._stop(thread)

    def _handle(self, message: Dict[str, Any]) -> None:
        job_id = message.get("id") if isinstance(message.get("id"), str) else None
        try:
            protocol.check_request(message)
        except ProtocolError as exc:
            self.send_error(job_id, exc)
            return
        command = message["command"]
        if not self.authenticated and command != "hello":
            self.send_error(job_id, ProtocolError("not authenticated: the first request must be 'hello' with the token"))
            self.stopping = True
            return
        handler = getattr(self, "_now_" + command, None)
        if handler is not None:
            try:
                self.send(protocol.event(job_id, "result", result=handler(message.get("params") or {})))
            except Exception as exc:  # noqa: BLE001 - any failure becomes an error event
                self.send_error(job_id, exc)
            return
        with self.cond:  # 'accepted' goes out before the job thread can say 'started'
            self.queue.append(Job(self, message))
            self.send(protocol.event(job_id, "accepted", position=len(self.queue) + (self.current is not None) - 1))
            self.cond.notify()

    def _now_hello(self, params: Dict[str, Any]) -> Dict[str, Any]:
        if self.token is not None:
            given = params.get("token")
            if not isinstance(given, str) or not hmac.compare_digest(given.encode(), self.token.encode()):
                self.stopping = True
                raise PermissionError("authentication failed: wrong or missing token")
        self.authenticated = True
        return {"protocol": PROTOCOL_VERSION, "pid": os.getpid()}

    def _now_ping(self, params: Dict[str, Any]) -> Dict[str, Any]:
        with self.cond:
            return {"pong": True, "time": time.time(), "busy": self.current.id if self.current else None,
                    "queued": [job.id for job in self.queue]}

    def _now_info(self, params: Dict[str, Any]) -> Dict[str, Any]:
        return self.core.info()

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
            dropped, self.queue = list(self.queue), collections.deque()
            if self.current is not None:
                self.current.cancel_event.set()
            self.cond.notify_all()
        for job in dropped:
            self.send(protocol.event(job.id, "cancelled"))
        thread.join(timeout=10.0)
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)

    # --- the job thread ---------------------------------------------------------------------

    def _job_loop(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return
                job = self.current = self.queue.popleft()
            try:
                final, arrays = self._run(job)
            finally:
                with self.cond:  # no longer busy: a ping after the final event must not name this job
                    self.current = None
            try:
                self.send(final, arrays, folder=self._result_folder(job) if arrays else None)
            except Exception as exc:  # noqa: BLE001 - e.g. a full disk while writing the mask
                self.send_error(job.id, exc)

    def _run(self, job: Job) -> Tuple[Dict[str, Any], Optional[Dict[str, np.ndarray]]]:
        """Run one job; returns its final event (result, error or cancelled) and result arrays."""
        self.send(protocol.event(job.id, "started", command=job.command))
        started = time.perf_counter()
        self.core.job_cancelled = job.cancelled
        try:
            result, arrays = getattr(self, "job_" + job.command)(job)
        except BaseException as exc:  # noqa: BLE001 - report everything, keep serving
            if job.cancelled() or isinstance(exc, Cancelled):
                return protocol.event(job.id, "cancelled"), None
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            return self.error_event(job.id, exc, with_traceback=not isinstance(exc, (ValueError, ProtocolError))), None
        finally:
            self.core.job_cancelled = None
        if job.cancelled():  # finished anyway, but the client gave up on it: drop the late result
            return protocol.event(job.id, "cancelled"), None
        result = dict(result or {})
        result.setdefault("seconds", round(time.perf_counter() - started, 4))
        return protocol.event(job.id, "result", result=result), arrays or None

    # --- jobs (run on the job thread; return (result dict, arrays)) -----------------------------

    def job_echo(self, job: Job) -> Result:
        """Diagnostic: sends params and arrays back; ``seconds`` waits that long, cancellable."""
        params = job.take_params({"seconds": 0.0, "data": None})
        arrays = job.arrays()
        end = time.monotonic() + float(params["seconds"])
        total = max(1, int(float(params["seconds"]) / 0.05))
        for step in range(total + 1):
            if job.cancelled():
                raise Cancelled("cancelled by the user")
            job.progress(step, total, f"waiting {step}/{total}")
            if time.monotonic() >= end:
                break
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))
        return {"params": params, "arrays": {k: [v.dtype.str, list(v.shape)] for k, v in arrays.items()}}, arrays

    def job_load_model(self, job: Job) -> Result:
        params = job.take_params({key: SEGMENT_PARAMS[key] for key in SEGMENTER_KEYS})
        started = time.perf_counter()
        segmenter = self.core.get_segmenter(**params)
        model = getattr(segmenter, "model", None)
        return {"model": params["model"], "fingerprint": getattr(model, "fingerprint", None),
                "device": str(getattr(model, "device", params["device"])), "adapter": self.core.adapter,
                "load_seconds": round(time.perf_counter() - started, 3)}, {}

    def job_segment(self, job: Job) -> Result:
        params = job.take_params(SEGMENT_PARAMS)
        arrays = job.arrays()
        if "volume" not in arrays:
            raise ValueError("segment needs an array named 'volume' (the image, KJI order)")
        key = params.pop("volume_key") or job.id
        self.core.remember_volume(key, arrays["volume"], dict(params))
        return self._segment(job, arrays["volume"], params, key)

    def job_reprompt(self, job: Job) -> Result:
        key = job.params.get("volume_key") or self.core.last_volume_key
        stored = self.core.volumes.get(key) if key else None
        if stored is None:
            raise ValueError(f"the worker holds no volume {key!r} (restarted or evicted since); "
                             "send it again with 'segment'")
        params = job.take_params(SEGMENT_PARAMS, **stored.params)
        params.pop("volume_key")
        return self._segment(job, stored.array, params, key)

    def _segment(self, job: Job, volume: np.ndarray, params: Dict[str, Any], key: str) -> Result:
        segmenter = self.core.get_segmenter(**{name: params.pop(name) for name in SEGMENTER_KEYS})
        box = params.pop("box")
        if not isinstance(box, (list, tuple)) or len(box) != 6:
            raise ValueError(f"'box' must be [i0, j0, k0, i1, j1, k1] (inclusive voxel indices), got {box!r}")
        spacing = params.pop("spacing")
        res = segmenter.segment(volume, box=tuple(int(v) for v in box),
                                spacing=tuple(float(s) for s in spacing) if spacing else None,
                                progress=job.progress, cancel=job.cancelled, **params)
        mask = np.asarray(res.mask, dtype=np.uint8)
        return {"volume_key": key, "slices": [int(s) for s in res.slices], "stats": dict(res.stats or {}),
                "voxels": int(np.count_nonzero(mask))}, {"mask": mask}

    def job_export(self, job: Job) -> Result:
        export_dataset = _lazy("dataset", "export_dataset", "export")
        params = dict(job.params)
        cases_spec = params.pop("cases", None)
        if not isinstance(cases_spec, list) or not cases_spec:
            raise ValueError("export needs 'cases': a list of {id, image, label} (array names or *_path files)")
        arrays = job.arrays()
        cases = [(str(case["id"]), _case_volume(case, "image", arrays), _case_volume(case, "label", arrays))
                 for case in cases_spec]
        if "output_dir" not in params:
            raise ValueError("export needs 'output_dir'")
        if isinstance(params.get("label_names"), dict):
            params["label_names"] = {int(k): v for k, v in params["label_names"].items()}
        summary = _call_with_hooks(export_dataset, job, cases, params.pop("output_dir"), **params)
        return {"summary": summary}, {}

    def job_train(self, job: Job) -> Result:
        train = _lazy("finetune", "train", "train")
        config_class = _lazy("finetune", "TrainConfig", "train")
        try:
            config = config_class(**job.params)
        except TypeError as exc:
            raise ValueError(f"bad train parameters: {exc}") from None
        model = self.core.loaded_model(config.model, config.checkpoint, config.device)
        extra = {"model": model} if model is not None and "model" in inspect.signature(train).parameters else {}
        return {"card": _call_with_hooks(train, job, config, **extra)}, {}

    def job_evaluate(self, job: Job) -> Result:
        evaluate = _lazy("evaluate", "evaluate", "evaluate")
        params = dict(job.params)
        if "dataset" not in params:
            raise ValueError("evaluate needs 'dataset' (a folder written by export)")
        return {"report": _call_with_hooks(evaluate, job, params.pop("dataset"), **params)}, {}


def _case_volume(case: Dict[str, Any], kind: str, arrays: Dict[str, np.ndarray]):
    """An export case's image or label: an array sent with the request, or a file on the worker's disk."""
    from .volume_io import Volume, read_volume

    if case.get(kind + "_path"):
        return read_volume(_check_path(case[kind + "_path"], f"{kind} file of case {case.get('id')}"))
    name = case.get(kind)
    if name not in arrays:
        raise ValueError(f"case {case.get('id')!r}: no array {name!r} for its {kind} (give '{kind}' or '{kind}_path')")
    geometry = {key: tuple(float(v) for v in case[key]) for key in ("spacing", "origin", "direction") if case.get(key)}
    return Volume(arrays[name], **geometry)


# --- process setup ------------------------------------------------------------------------


def _open_log(log_path: Optional[str]):
    log_path = os.path.abspath(log_path or protocol.default_log_path())
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    stream = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")
    return log_path, stream


def _route_chatter(log_stream, also_stderr: bool) -> None:
    """fd 1 and sys.stdout (and optionally fd 2 / sys.stderr), logging and warnings -> the log file."""
    os.dup2(log_stream.fileno(), 1)
    sys.stdout = log_stream
    if also_stderr:
        os.dup2(log_stream.fileno(), 2)
        sys.stderr = log_stream
    handlers = [logging.StreamHandler(log_stream)]
    if not also_stderr:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)
    faulthandler.enable(log_stream)


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log", default=protocol.default_log_path(),
                        help="log file for everything but the protocol (library output, warnings, tracebacks)")


def worker_main(args: argparse.Namespace) -> int:
    """Serve one client on stdin/stdout until it says shutdown or closes stdin."""
    # Keep the real stdin/stdout for the protocol, then point fds 0/1 elsewhere so nothing else
    # (a library's print, a C extension's printf, input()) can touch the channel.
    proto_in = os.fdopen(os.dup(0), "rb")
    proto_out = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdin = open(os.devnull)
    log_path, log_stream = _open_log(args.log)
    _route_chatter(log_stream, also_stderr=True)
    log.info("worker started: pid %d, python %s, protocol v%d", os.getpid(), sys.executable, PROTOCOL_VERSION)
    session = Session(WorkerCore(log_path), proto_in, proto_out, files=True)
    session.send(protocol.event(None, "hello", protocol=PROTOCOL_VERSION, pid=os.getpid(), log=log_path,
                                python=platform.python_version(), mode="stdio"))
    _preload_engine()
    session.serve()
    log.info("worker stopping")
    # Leave without interpreter teardown: a daemon thread still importing (preload) or stuck in a
    # cancelled job could otherwise hold the exit up. Everything worth keeping is flushed.
    for stream in (proto_out, log_stream):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


def _preload_engine() -> None:
    """Import torch and the engine in the background (seconds), so the first job does not wait
    for it when the client started the worker ahead of time. A failure shows up in that job."""

    def run() -> None:
        try:
            from . import segmenter  # noqa: F401
        except Exception:  # noqa: BLE001 - the job that needs it reports the error
            log.exception("preloading the engine failed")

    threading.Thread(target=run, name="samft-preload", daemon=True).start()


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, required=True, help="TCP port (0: any free port; the chosen one is printed)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind; anything but loopback needs --token")
    parser.add_argument("--token", default=None,
                        help=f"shared secret clients must send (or set ${TOKEN_ENV}); required off loopback")
    add_worker_arguments(parser)


def serve_main(args: argparse.Namespace) -> int:
    """Serve clients on a TCP socket, one connection at a time, keeping the model warm in between."""
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if not token and not is_loopback(args.host):
        print(f"error: refusing to listen on {args.host} without a token: anyone who can reach it could run jobs. "
              f"Use --token SECRET (or ${TOKEN_ENV}), or bind 127.0.0.1 and use an SSH tunnel.", file=sys.stderr)
        return 2
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    try:
        server = socket.create_server((args.host, args.port), family=family)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    port = server.getsockname()[1]
    print(f"SAMFineTune worker listening on {args.host}:{port} (protocol v{PROTOCOL_VERSION}"
          f"{', token required' if token else ''})", flush=True)
    log_path, log_stream = _open_log(args.log)
    print(f"log: {log_path}", flush=True)
    _route_chatter(log_stream, also_stderr=False)
    core = WorkerCore(log_path)
    _preload_engine()
    busy = threading.Lock()
    stop = threading.Event()

    def run_connection(conn: socket.socket, address) -> None:
        log.info("connection from %s", address)
        with conn, conn.makefile("rb") as reader, conn.makefile("wb") as writer:
            session = Session(core, reader, writer, files=False, token=token, need_hello=True)
            if not busy.acquire(timeout=BUSY_WAIT_S):  # a client that just left may still be closing
                session.send_error(None, ProtocolError("server busy: another client is connected; try again later"))
            else:
                try:
                    session.send(protocol.event(None, "hello", protocol=PROTOCOL_VERSION, pid=os.getpid(),
                                                mode="tcp", auth=token is not None))
                    session.serve()
                finally:
                    busy.release()
            _close_gently(conn)
        log.info("connection from %s closed", address)
        if session.stop_server:
            stop.set()

    server.settimeout(0.5)  # wake up now and then to see whether a client asked the server to stop
    with server:
        while not stop.is_set():
            try:
                conn, address = server.accept()
            except socket.timeout:
                continue
            except (OSError, KeyboardInterrupt):
                break
            conn.settimeout(None)
            threading.Thread(target=run_connection, args=(conn, address), daemon=True).start()
    return 0


def _close_gently(conn: socket.socket) -> None:
    """Half-close and drain, so the peer reads our last words (closing with unread input sends a reset)."""
    try:
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(2.0)
        while conn.recv(1 << 16):
            pass
    except OSError:
        pass


def main_argv(argv=None) -> int:
    """``python -m SAMFineTuneLib.worker {worker,serve} ...`` (the package CLI dispatches the same way)."""
    parser = argparse.ArgumentParser(prog="python -m SAMFineTuneLib.worker")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, add, text in (("worker", add_worker_arguments, "serve one client on stdin/stdout"),
                            ("serve", add_serve_arguments, "serve clients on a TCP port")):
        add(commands.add_parser(name, help=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    args = parser.parse_args(argv)
    return worker_main(args) if args.command == "worker" else serve_main(args)


if __name__ == "__main__":
    sys.exit(main_argv())
