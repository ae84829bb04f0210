"""The worker protocol read incrementally: bytes in, messages out (``MessageDecoder``).

Every reader of the protocol goes through it: the worker's loop and the client's reader thread
(``protocol.read_message``, a blocking read of one message), and the client's thread-less
``poll`` mode, which feeds whatever its pipe or socket holds at the moment (in Slicer a reader
thread only runs while the main thread executes Python, so progress would lag).

The decoder holds at most one message line; a line over the limit is reported once and skipped
to its end, so its tail is never read as a message. An attachment's announced size is checked
(allowed at all, under the limit, matching its dtype and shape) before it is read, and the reader
holds only the bytes that arrived, so a peer cannot make it allocate memory it never sends.
Whatever the bytes, the decoder answers with messages and ``ProtocolError`` only: a reader that
catches ``ProtocolError`` never dies of a peer's bad message.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Union

import numpy as np

from .protocol import MAX_ATTACHMENT_BYTES, MAX_LINE_BYTES, ProtocolError, array_dtype_shape, decode, one_line

Item = Union[Dict[str, Any], ProtocolError]


class _Attachment:
    """One announced attachment being read: its reference, and the pieces that arrived (None: skipped)."""

    def __init__(self, name: str, ref: Dict[str, Any], nbytes: int, keep: bool):
        self.name, self.ref, self.nbytes, self.filled = name, ref, nbytes, 0
        self.pieces: Optional[List[bytes]] = [] if keep else None

    def array(self) -> np.ndarray:
        """The pieces copied into one array of exactly the announced size, each freed once copied,
        so the peak is about one array rather than two (``np.empty`` takes pages as they are written)."""
        dtype, shape = array_dtype_shape(self.name, self.ref)
        flat = np.empty(self.nbytes, np.uint8)
        position, pieces, self.pieces = 0, self.pieces or [], None
        pieces.reverse()
        while pieces:
            piece = pieces.pop()
            flat[position:position + len(piece)] = np.frombuffer(piece, np.uint8)
            position += len(piece)
        return flat.view(dtype).reshape(shape)


class MessageDecoder:
    """Feed it bytes as they arrive; it returns each complete message (a dict, attachments read
    into ``ref["data"]``) or ``ProtocolError`` (a bad message; ``fatal`` when the stream can no
    longer be followed, e.g. an attachment refused: the connection must then close).

    ``attachments``: whether raw attachments may follow a line (a TCP server refuses them before
    the client has authenticated); ``max_attachment_bytes``: the most one message may announce."""

    def __init__(self, max_line: int = MAX_LINE_BYTES, max_attachment_bytes: int = MAX_ATTACHMENT_BYTES,
                 attachments: bool = True):
        self.max_line = max_line
        self.max_attachment_bytes = max_attachment_bytes
        self.attachments = attachments
        self.broken = False
        self.skipping = False  # inside an over-long line, reading on to its end
        self._line = bytearray()
        self._message: Optional[Dict[str, Any]] = None
        self._pending: List[_Attachment] = []
        self._error: Optional[ProtocolError] = None  # a bad array of the message being read

    @property
    def wants(self) -> int:
        """Attachment bytes the current message still needs (0 while a line is being read)."""
        return sum(item.nbytes - item.filled for item in self._pending)

    @property
    def line_room(self) -> int:
        """How many more bytes the current line may take before it is over the limit."""
        return self.max_line + 1 - len(self._line)

    def feed(self, data: bytes) -> List[Item]:
        out: List[Item] = []
        position = 0
        try:
            while position < len(data) and not self.broken:
                if self._pending:
                    position = self._fill(data, position, out)
                else:
                    position = self._take_line(data, position, out)
        except Exception as exc:  # a case the checks below missed: the stream can no longer be followed
            self.broken = True
            out.append(ProtocolError(f"unreadable data from the peer ({one_line(exc)}); the connection must close",
                                     fatal=True))
        return out

    def finish(self) -> List[Item]:
        """The end of the stream: a last line without its newline still counts; a message cut
        inside its attachments is an error."""
        if self.broken:
            return []
        if self._pending:
            item = self._pending[0]
            self.broken = True
            return [ProtocolError(f"stream ended inside array {item.name!r} ({item.filled} of {item.nbytes} bytes)",
                                  fatal=True)]
        if self._line and not self.skipping:
            out: List[Item] = []
            line, self._line = bytes(self._line), bytearray()
            self._start(line, out)
            return out
        return []

    # --- lines ----------------------------------------------------------------------------

    def _take_line(self, data: bytes, position: int, out: List[Item]) -> int:
        end = data.find(b"\n", position)
        stop = len(data) if end < 0 else end
        if self.skipping:
            self.skipping = end < 0
            return stop if end < 0 else end + 1
        self._line += data[position:stop]
        if len(self._line) > self.max_line:
            self._line = bytearray()
            self.skipping = end < 0
            out.append(ProtocolError(f"message line longer than {self.max_line} bytes; skipped to its end "
                                     "(arrays belong in 'arrays')"))
            return stop if end < 0 else end + 1
        if end < 0:
            return stop
        line, self._line = bytes(self._line), bytearray()
        self._start(line, out)
        return end + 1

    def _start(self, line: bytes, out: List[Item]) -> None:
        try:
            message = decode(line)
            pending = self._announced(message)
        except ProtocolError as exc:
            self.broken = exc.fatal
            out.append(exc)
            return
        self._message, self._pending = message, pending
        self._advance(out)

    def _announced(self, message: Dict[str, Any]) -> List[_Attachment]:
        """The attachments a message announces, checked before any is allocated."""
        refs = message.get("arrays")
        if not isinstance(refs, dict):
            return []
        announced = [(name, ref) for name, ref in refs.items() if isinstance(ref, dict) and "nbytes" in ref]
        total = 0
        for name, ref in announced:
            nbytes = ref.get("nbytes")
            if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
                raise ProtocolError(f"array {name!r}: 'nbytes' must be a non-negative integer", fatal=True)
            total += nbytes
        if announced and not self.attachments:
            raise ProtocolError("arrays are refused before authentication: log in first (PROTOCOL.md, TCP mode)",
                                fatal=True)
        if total > self.max_attachment_bytes:
            raise ProtocolError(f"the message announces {total} bytes of arrays, over this connection's limit of "
                                f"{self.max_attachment_bytes}; send smaller arrays (a cropped volume), or ask the "
                                "server's operator for a larger --max-upload-mb", fatal=True)
        self._error = None
        pending = []
        for name, ref in announced:
            problem = _mismatch(name, ref)
            if problem is not None and self._error is None:
                self._error = ProtocolError(problem)  # read its bytes anyway, to stay in step
            pending.append(_Attachment(name, ref, ref["nbytes"], keep=problem is None))
        return pending

    # --- attachments ----------------------------------------------------------------------

    def _fill(self, data: bytes, position: int, out: List[Item]) -> int:
        item = self._pending[0]
        take = min(item.nbytes - item.filled, len(data) - position)
        if item.pieces is not None:
            item.pieces.append(bytes(data[position:position + take]))  # a whole bytes chunk is kept, not copied
        item.filled += take
        self._advance(out)
        return position + take

    def _advance(self, out: List[Item]) -> None:
        """Finish the attachments that are complete; the message, once all of them are."""
        while self._pending and self._pending[0].filled == self._pending[0].nbytes:
            item = self._pending.pop(0)
            if item.pieces is not None:
                try:
                    item.ref["data"] = item.array()
                except Exception as exc:  # its bytes are read, so the stream is still in step
                    self._error = self._error or ProtocolError(f"array {item.name!r}: cannot be made ({one_line(exc)})")
        if not self._pending and self._message is not None:
            out.append(self._error or self._message)
            self._message, self._error = None, None


def _mismatch(name: str, ref: Dict[str, Any]) -> Optional[str]:
    """Why an attachment's bytes cannot make the array its reference describes (None if they can)."""
    try:
        dtype, shape = array_dtype_shape(name, ref)
    except ProtocolError as exc:
        return str(exc)
    if dtype.itemsize * math.prod(shape) != ref["nbytes"]:  # Python ints: no overflow
        return f"array {name!r}: {ref['nbytes']} bytes do not make shape {list(shape)} of {dtype}"
    return None
