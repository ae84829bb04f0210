"""The worker's message protocol: JSON lines for messages, arrays beside them.

Written down for people in ``PROTOCOL.md`` (same folder); this module is the one place that
knows the wire format, shared by the worker (``worker/``) and the client (``client/``);
``message_decoder`` reads it incrementally (``read_message`` is its blocking form). It imports
only the standard library and numpy, so Slicer can import it without torch.

A message is one UTF-8 JSON object on one line. Arrays never travel inside the JSON: a
message names them in ``"arrays"`` with a reference that is either

- a file: ``{"dtype": "<f4", "shape": [..], "path": "/abs/name.npy"}`` (local worker, pipes), or
- a stream attachment: ``{"dtype": "<f4", "shape": [..], "nbytes": N}``, whose raw C-order
  bytes follow the message's newline, in the order the names appear (TCP worker).

Either kind may carry ``"crop": {"offset": [..], "shape": [..]}``: the array is then the block
at ``offset`` of an otherwise zero array of ``shape`` (masks travel as their bounding box).
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, BinaryIO, Dict, Optional, Tuple

import numpy as np


PROTOCOL_VERSION = 8

# Longest message line accepted (arrays are never inline, so a message is small).
MAX_LINE_BYTES = 16 << 20
# Longest line a TCP server reads before the client has authenticated ('hello' is tiny).
HELLO_MAX_BYTES = 64 << 10
# Most bytes of attachments one message may announce (a 1024^3 float32 volume is 4 GiB).
MAX_ATTACHMENT_BYTES = 4 << 30
# Attachment bytes are read in chunks of this size.
CHUNK_BYTES = 1 << 20

# Environment variable with the token of a TCP server (read by ``serve`` and by ``WorkerClient``).
TOKEN_ENV = "SAMFINETUNE_TOKEN"

# Requests the worker answers at once on its reading thread, even while a job runs.
IMMEDIATE_COMMANDS = ("hello", "ping", "info", "cancel", "shutdown")
# Requests that run as jobs, one at a time, in the order they arrive.
JOB_COMMANDS = ("load_model", "segment", "reprompt", "refine", "propagate", "export", "train", "evaluate", "echo")
COMMANDS = IMMEDIATE_COMMANDS + JOB_COMMANDS

# Event names, worker -> client.
EVENTS = ("hello", "accepted", "started", "progress", "log", "result", "error", "cancelled")
FINAL_EVENTS = ("result", "error", "cancelled")

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")
# Array dtypes that travel: bool and plain numbers (no strings, records, objects, subarrays).
_ARRAY_KINDS = "biufc"
# Most dimensions of an array that travels: every numpy version makes 32 (numpy 2 makes 64).
_MAX_DIMS = 32


class ProtocolError(ValueError):
    """A message that does not follow the protocol (bad JSON, wrong version, missing array...).

    ``fatal``: the stream can no longer be followed (an attachment refused or cut off), so the
    connection must close; otherwise the reader goes on with the next message."""

    def __init__(self, message: str, fatal: bool = False):
        super().__init__(message)
        self.fatal = fatal


def one_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, short: how an unexpected error of a peer's data is named.
    Python's advice to this process's programmer ("; use sys.set_int_max_str_digits()...") is cut:
    it is not for whoever sent the data."""
    text = (str(exc).splitlines() or [""])[0].split("; use ")[0]
    return f"{type(exc).__name__}: {text[:limit]}"


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        if value.size > 64:
            raise TypeError(f"a {value.shape} array cannot go inline in a message; send it in 'arrays'")
        return value.tolist()
    if isinstance(value, (Path, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if hasattr(value, "__dataclass_fields__"):
        return {name: getattr(value, name) for name in value.__dataclass_fields__}
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _finite(value: Any) -> Any:
    """NaN/inf become null so every line is strict JSON (a Dice of NaN, say)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def encode(message: Dict[str, Any]) -> bytes:
    """One message -> one line of bytes (with the trailing newline), version stamped."""
    body = dict(message)
    body.setdefault("v", PROTOCOL_VERSION)
    try:
        text = json.dumps(body, separators=(",", ":"), default=_json_default, allow_nan=False)
    except ValueError:  # NaN somewhere: rewrite it as null
        text = json.dumps(_finite(json.loads(json.dumps(body, default=_json_default))), separators=(",", ":"))
    return text.encode("utf-8") + b"\n"


def decode(line: "bytes | str") -> Dict[str, Any]:
    """One line -> a message dict; ProtocolError (with a readable reason) when it is not one."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"message is not UTF-8: {exc}") from None
    line = line.strip()
    if not line:
        raise ProtocolError("empty message line")
    try:
        message = json.loads(line)
    except json.JSONDecodeError as exc:  # the line itself is never quoted: it may hold a token
        raise ProtocolError(f"malformed message (not JSON: {exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise ProtocolError("malformed message: JSON nested too deeply; send flatter params") from None
    except Exception as exc:  # e.g. an integer of more digits than Python converts: the reader goes on
        raise ProtocolError(f"malformed message ({one_line(exc)})") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"malformed message: expected a JSON object, got {type(message).__name__}")
    return message


def check_version(message: Dict[str, Any]) -> None:
    version = message.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version mismatch: the message has v={version!r}, this side speaks v={PROTOCOL_VERSION}; "
            "use the same SAMFineTune version for Slicer's module and the worker"
        )


def check_request(message: Dict[str, Any]) -> None:
    """Raise ProtocolError unless ``message`` is a well-formed request of this version."""
    check_version(message)
    if not isinstance(message.get("id"), str) or not message["id"]:
        raise ProtocolError("request has no 'id' (a non-empty string)")
    command = message.get("command")
    if not isinstance(command, str):
        raise ProtocolError("request has no 'command' (a string)")
    if command not in COMMANDS:
        raise ProtocolError(f"unknown command {command!r}; known commands: {', '.join(COMMANDS)}")
    for key in ("params", "arrays"):
        if not isinstance(message.get(key, {}), dict):
            raise ProtocolError(f"request '{key}' must be a JSON object")


def request(job_id: str, command: str, params: Optional[Dict[str, Any]] = None, **extra: Any) -> Dict[str, Any]:
    return dict(v=PROTOCOL_VERSION, id=job_id, command=command, params=dict(params or {}), **extra)


def event(job_id: Optional[str], name: str, **fields: Any) -> Dict[str, Any]:
    return dict(v=PROTOCOL_VERSION, id=job_id, event=name, **fields)


# --- arrays -------------------------------------------------------------------------------


def _ref(array: np.ndarray) -> Dict[str, Any]:
    return {"dtype": array.dtype.str, "shape": list(array.shape)}


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ProtocolError(f"array name {name!r} is not allowed (letters, digits, _ . - only)")
    return name


def crop_to_content(array: np.ndarray) -> Tuple[np.ndarray, Optional[Dict[str, Any]]]:
    """The bounding box of the non-zero part (and a 'crop' note), or the array if cropping saves nothing."""
    if array.ndim == 0 or array.size == 0:
        return array, None
    starts, stops = [], []
    for axis in range(array.ndim):
        other = tuple(a for a in range(array.ndim) if a != axis)
        hit = np.flatnonzero(array.any(axis=other)) if other else np.flatnonzero(array)
        if hit.size == 0:
            starts, stops = [0] * array.ndim, [0] * array.ndim
            break
        starts.append(int(hit[0]))
        stops.append(int(hit[-1]) + 1)
    block = array[tuple(slice(a, b) for a, b in zip(starts, stops))]
    if block.size == array.size:
        return array, None
    return block, {"offset": starts, "shape": list(array.shape)}


def _uncrop(name: str, block: np.ndarray, crop: Any, max_bytes: int) -> np.ndarray:
    """The whole array a cropped block stands for; the crop must hold the block inside its shape,
    and the whole may be no larger than ``max_bytes`` (what is left of the message's limit)."""
    offset = crop.get("offset") if isinstance(crop, dict) else None
    shape = crop.get("shape") if isinstance(crop, dict) else None
    if not (_counts(offset, block.ndim) and _counts(shape, block.ndim)):
        raise ProtocolError(f"array {name!r}: crop must be {{'offset': [..], 'shape': [..]}} with "
                            f"{block.ndim} non-negative integers each")
    if any(o + n > m for o, n, m in zip(offset, block.shape, shape)):
        raise ProtocolError(f"array {name!r}: block {list(block.shape)} at offset {offset} does not fit "
                            f"crop shape {shape}")
    if block.dtype.itemsize * math.prod(max(n, 1) for n in shape) > max_bytes:
        raise ProtocolError(f"array {name!r}: crop shape {shape} is over the {max_bytes} bytes left of this "
                            "connection's limit for one message's arrays; send smaller arrays")
    full = np.zeros(tuple(shape), dtype=block.dtype)
    full[tuple(slice(o, o + n) for o, n in zip(offset, block.shape))] = block
    return full


def _counts(values: Any, length: int) -> bool:
    """Whether ``values`` is a list of ``length`` integers, each from 0 to the largest numpy index."""
    return (isinstance(values, list) and len(values) == length
            and all(type(n) is int and 0 <= n <= np.iinfo(np.intp).max for n in values))


def _as_sendable(arrays: Dict[str, Any], crop: bool) -> Dict[str, Tuple[np.ndarray, Optional[Dict[str, Any]]]]:
    out = {}
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        _check_dtype(name, array.dtype)
        croppable = crop and array.dtype in (np.uint8, np.bool_)
        out[_check_name(name)] = crop_to_content(array) if croppable else (array, None)
    return out


def write_message(
    stream: BinaryIO,
    message: Dict[str, Any],
    arrays: Optional[Dict[str, np.ndarray]] = None,
    folder: "Optional[str | os.PathLike]" = None,
    crop_masks: bool = False,
) -> None:
    """Write one message; its arrays go to ``folder`` as .npy files, or (folder None) after the line.

    The caller serialises writers (one lock per stream)."""
    message = dict(message)
    payloads = []
    if arrays:
        refs = {}
        for name, (array, crop) in _as_sendable(arrays, crop_masks).items():
            ref = _ref(array)
            if crop:
                ref["crop"] = crop
            if folder is not None:
                # a job's own folder, read once this line names the file: a failed write sends no line
                path = os.path.join(os.fspath(folder), name + ".npy")
                _save_npy(path, array)
                ref["path"] = os.path.abspath(path)
            else:
                ref["nbytes"] = int(array.nbytes)
                payloads.append(array)
            refs[name] = ref
        message["arrays"] = refs
    stream.write(encode(message))
    for array in payloads:
        stream.write(memoryview(array.reshape(-1)).cast("B"))
    stream.flush()


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as stream:  # a file object: np.save would add ".npy" to a name without it
        np.save(stream, array, allow_pickle=False)


def read_message(stream: BinaryIO, max_line: int = MAX_LINE_BYTES,
                 max_attachment_bytes: int = MAX_ATTACHMENT_BYTES, attachments: bool = True,
                 skip_long_lines: bool = True) -> Optional[Dict[str, Any]]:
    """Read one message from a blocking stream (None at end of stream). Stream attachments are read
    off at once and kept in their reference under ``"data"``; file references are left for
    ``load_arrays``. Never reads past the message, so calls can follow each other.

    Raises ProtocolError for a bad message. A non-fatal one leaves the stream in step (an over-long
    line is read to its end first, unless ``skip_long_lines`` is False), so the reader can go on."""
    from .message_decoder import MessageDecoder

    decoder = MessageDecoder(max_line, max_attachment_bytes, attachments)
    error: Optional[ProtocolError] = None
    while True:
        wanted = decoder.wants
        if wanted:
            chunk = stream.read(min(wanted, CHUNK_BYTES))
        else:
            chunk = stream.readline(CHUNK_BYTES if decoder.skipping else decoder.line_room)
        items = decoder.feed(chunk) if chunk else decoder.finish()
        for item in items:
            if not isinstance(item, ProtocolError):
                return item
            error = error or item
        if error is not None and (not decoder.skipping or not skip_long_lines or not chunk):
            raise error
        if not chunk:
            return None


def _check_dtype(name: str, dtype: np.dtype) -> None:
    if dtype.kind not in _ARRAY_KINDS or dtype.fields is not None or dtype.subdtype is not None or dtype.itemsize < 1:
        raise ProtocolError(f"array {name!r}: dtype {dtype.str!r} cannot travel; use bool, integer, float or "
                            "complex arrays")


def array_dtype_shape(name: str, ref: Dict[str, Any]) -> Tuple[np.dtype, Tuple[int, ...]]:
    """The dtype and shape a reference names, checked so that numpy can make the array."""
    dtype_text, shape = ref.get("dtype"), ref.get("shape")
    if not isinstance(dtype_text, str) or not isinstance(shape, list) or len(shape) > _MAX_DIMS:
        raise ProtocolError(f"array {name!r}: a reference needs 'dtype' (a string) and 'shape' (a list of at most "
                            f"{_MAX_DIMS} integers)")
    try:
        dtype = np.dtype(dtype_text)
    except Exception as exc:  # numpy's parser raises TypeError, ValueError, SyntaxError...
        raise ProtocolError(f"array {name!r}: unknown dtype {dtype_text[:40]!r} ({type(exc).__name__})") from None
    _check_dtype(name, dtype)
    if not _counts(shape, len(shape)) or math.prod(n for n in shape if n) > np.iinfo(np.intp).max // dtype.itemsize:
        raise ProtocolError(f"array {name!r}: shape {str(shape)[:100]} is not one numpy can make (non-negative "
                            "integers, not too many elements)")
    return dtype, tuple(shape)


def load_arrays(refs: Optional[Dict[str, Any]], allow_files: bool = True,
                max_bytes: int = MAX_ATTACHMENT_BYTES) -> Dict[str, np.ndarray]:
    """The arrays a message names, in memory (files read whole). Its attachments and rebuilt crops
    together hold at most ``max_bytes``, the limit on what one message announces: tiny blocks cannot
    stand for many arrays as large as the limit."""
    if not isinstance(refs or {}, dict):
        raise ProtocolError("'arrays' must be a JSON object of array references")
    arrays, left = {}, max_bytes
    for name, ref in (refs or {}).items():
        if not isinstance(ref, dict):
            raise ProtocolError(f"array {name!r}: reference must be an object")
        if isinstance(ref.get("data"), np.ndarray):  # an attachment the decoder read
            array = ref["data"]
        elif "path" in ref:
            if not allow_files:
                raise ProtocolError(f"array {name!r}: file references are refused on this connection; attach the bytes")
            array = _load_file(name, ref)
        else:
            raise ProtocolError(f"array {name!r}: reference has neither 'path' nor 'nbytes'")
        if ref.get("crop"):
            array = _uncrop(name, array, ref["crop"], left)
        if ref.get("crop") or "path" not in ref:
            left -= array.nbytes
        arrays[name] = array
    return arrays


def _load_file(name: str, ref: Dict[str, Any]) -> np.ndarray:
    path = ref["path"]
    if not isinstance(path, str) or not os.path.isfile(path):
        raise ProtocolError(f"array {name!r}: file not found: {path}")
    dtype, shape = array_dtype_shape(name, ref)
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:  # OSError, ValueError, EOFError (an empty file)...
        raise ProtocolError(f"array {name!r}: cannot read {path}: {exc}") from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        array.close()
        raise ProtocolError(f"array {name!r}: {path} is not a .npy file")
    if array.dtype != dtype or array.shape != shape:
        raise ProtocolError(f"array {name!r}: file holds {array.dtype}{array.shape}, message says {dtype}{shape}")
    return array
