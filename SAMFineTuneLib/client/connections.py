"""Connections to a worker: a child process on pipes, or a ``serve`` endpoint on a socket. Each
turns what the worker says into items of the client's event queue, in one of two ways:

- ``"thread"``: a reader thread blocks on the stream (plain Python, scripts, tests);
- ``"poll"``: no thread; ``pump`` reads whatever the pipe or socket holds right now, without
  blocking, and feeds a ``MessageDecoder``. For Slicer, whose Qt event loop does not release
  the GIL while idle, so a reader thread only runs while the main thread executes Python.
"""
from __future__ import annotations

import os
import queue
import select
import signal
import socket
import subprocess
import threading
import time
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from .. import protocol
from ..message_decoder import MessageDecoder
from ..paths import open_private_log
from ..protocol import ProtocolError
from .login import check_token, log_in

READERS = ("thread", "poll")
# Most bytes one pump reads, so a poll from Slicer's timer returns even while a large array arrives.
PUMP_BYTES = 64 << 20


class Connection:
    """Streams to one worker, and a reader thread or a ``pump`` that turns what it says into queue items."""

    files = True  # arrays by file in a job folder (local) or attached to the stream (TCP)

    def __init__(self, reader, writer, events: "queue.Queue", mode: str = "thread"):
        if mode not in READERS:
            raise ValueError(f"reader must be one of {', '.join(READERS)}, got {mode!r}")
        self.reader, self.writer = reader, writer
        self.write_lock = threading.Lock()
        self.events = events
        self.mode = mode
        self.hello: Optional[Dict[str, Any]] = None
        self.decoder = MessageDecoder()
        self.ended = False
        if mode == "thread":
            self.thread = threading.Thread(target=self._read_loop, name="samft-client-reader", daemon=True)
            self.thread.start()
        else:
            self._start_polling()

    def _read_loop(self) -> None:
        """Whatever the worker sends, this thread ends by queueing "eof" (with why, when it is not
        the stream's end), so the client ends the open jobs instead of waiting for them forever."""
        while True:
            reason = None
            try:
                message = protocol.read_message(self.reader)
            except ProtocolError as exc:
                self.events.put((self, "bad", exc))
                if not exc.fatal:
                    continue
                message, reason = None, _unfollowable(exc)
            except (OSError, ValueError):  # the stream closed: describe_end says how
                message = None
            except Exception as exc:  # anything else ends the connection too, never just this thread
                message, reason = None, _unfollowable(exc)
            if message is None:
                self.events.put((self, "eof", reason))
                return
            self.events.put((self, "msg", message))

    # --- poll mode --------------------------------------------------------------------------

    def _start_polling(self) -> None:
        """Make the read side non-blocking (subclasses)."""

    def _read_available(self) -> Optional[bytes]:
        """What the worker has sent so far (b"" at the end of the stream; None: nothing yet)."""
        raise NotImplementedError

    def _wait_readable(self, seconds: float) -> None:
        raise NotImplementedError

    def pump(self, timeout: float = 0.0) -> None:
        """Poll mode: read what has arrived (waiting up to ``timeout`` s for the first bytes) and queue
        the messages it completes; never blocks longer than ``timeout``."""
        if self.ended:
            return
        deadline = time.monotonic() + timeout
        taken = 0
        while taken < PUMP_BYTES:
            try:
                data = self._read_available()
            except Exception:  # a closed or broken pipe or socket: the end of the stream
                data = b""
            if data is None:
                left = deadline - time.monotonic()
                if taken or left <= 0:
                    return
                self._wait_readable(left)
                continue
            items = self.decoder.feed(data) if data else self.decoder.finish()  # it raises nothing else
            for item in items:
                self.events.put((self, "bad", item) if isinstance(item, ProtocolError) else (self, "msg", item))
            if not data or self.decoder.broken:
                fatal = [item for item in items if isinstance(item, ProtocolError) and item.fatal]
                self.ended = True
                self.events.put((self, "eof", _unfollowable(fatal[-1]) if fatal else None))
                return
            taken += len(data)

    def send(self, message: Dict[str, Any], arrays=None, folder: Optional[str] = None) -> None:
        with self.write_lock:
            protocol.write_message(self.writer, message, arrays, folder=folder if self.files else None)

    def describe_end(self) -> str:
        return "the connection to the worker was closed"

    def close(self, timeout: float = 5.0) -> None:
        for stream in (self.writer, self.reader):
            try:
                stream.close()
            except (OSError, ValueError):
                pass


class ProcessConnection(Connection):
    def __init__(self, command: Sequence[str], env: Dict[str, str], cwd: str, log_path: str, events: "queue.Queue",
                 mode: str = "thread"):
        self.log_path = log_path
        with open_private_log(log_path, "ab") as log_file:  # the child keeps its own handle on it
            self.process = subprocess.Popen(
                list(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, env=env, cwd=cwd,
                creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
            )
        try:
            super().__init__(self.process.stdout, self.process.stdin, events, mode)
        except BaseException:
            kill_process_tree(self.process.pid)
            raise

    def _start_polling(self) -> None:
        # The pipe's raw file descriptor, read directly: the buffered reader on it stays unused.
        # Windows pipes take set_blocking from Python 3.12 on (Slicer ships 3.12).
        self.fd = self.process.stdout.fileno()
        try:
            os.set_blocking(self.fd, False)
        except (AttributeError, OSError) as exc:
            raise RuntimeError(f"reader='poll' cannot read the worker's pipe without blocking here ({exc}); use "
                               "Python 3.12 or later, or reader='thread'") from None

    def _read_available(self) -> Optional[bytes]:
        try:
            return os.read(self.fd, 1 << 20)
        except BlockingIOError:
            return None

    def _wait_readable(self, seconds: float) -> None:
        if os.name == "nt":  # select takes sockets only there
            time.sleep(min(seconds, 0.005))
        else:
            select.select([self.fd], [], [], seconds)

    def describe_end(self) -> str:
        try:
            code = self.process.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            code = None
            kill_process_tree(self.process.pid)
        if code is None:
            how = "stopped answering"
        elif code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        text = f"the worker process (pid {self.process.pid}) {how}"
        if self.hello is None:  # it never got going: the log says why (missing package, bad python...)
            text += f" before it was ready; last lines of its log {self.log_path}:\n{_tail(self.log_path)}"
        else:
            text += f"; its log is {self.log_path}"
        return text

    def close(self, timeout: float = 5.0) -> None:
        try:
            self.writer.close()  # stdin EOF: the worker cancels what it runs and exits
        except (OSError, ValueError):
            pass
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_process_tree(self.process.pid)
        super().close()

    def kill(self) -> None:
        kill_process_tree(self.process.pid)
        self.process.wait()
        super().close()


class SocketConnection(Connection):
    """A ``serve`` endpoint, logged in (``login.log_in``) before the reader starts; ``login``: the
    server's answer to it (``protocol``, ``pid``, ``paths``)."""

    files = False

    def __init__(self, host: str, port: int, events: "queue.Queue", timeout: float, mode: str = "thread",
                 token: Optional[str] = None):
        self.address = f"{host}:{port}"
        token = check_token(token, self.address)
        self.sock = socket.create_connection((host, port), timeout=timeout)
        try:
            hello, self.login = log_in(self.sock, self.address, token, timeout)
            self.sock.settimeout(None)  # blocking writes; poll mode reads only what select says is there
            super().__init__(self.sock.makefile("rb"), self.sock.makefile("wb"), events, mode)
        except BaseException:
            self.sock.close()
            raise
        self.hello = hello

    def _read_available(self) -> Optional[bytes]:
        if not select.select([self.sock], [], [], 0)[0]:
            return None
        try:
            return self.sock.recv(1 << 20)
        except ConnectionError:
            return b""

    def _wait_readable(self, seconds: float) -> None:
        select.select([self.sock], [], [], seconds)

    def describe_end(self) -> str:
        return f"the connection to the worker at {self.address} was closed (server stopped or network lost)"

    def close(self, timeout: float = 5.0) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        super().close()
        self.sock.close()

    def kill(self) -> None:
        self.close()


def _unfollowable(exc: BaseException) -> str:
    """Why a connection ends on data the client cannot read (the worker may still be running)."""
    return f"the worker sent data this client cannot follow ({protocol.one_line(exc)}); the connection was closed"


def _tail(path: str, nbytes: int = 3000) -> str:
    try:
        with open(path, "rb") as stream:
            stream.seek(max(0, os.path.getsize(path) - nbytes))
            return stream.read().decode("utf-8", "replace").strip()
    except OSError:
        return "(log unreadable)"


def kill_process_tree(pid: int, timeout: float = 3.0) -> None:
    """Kill a process and everything it started (torch data loaders, ...)."""
    try:
        import psutil
    except ImportError:
        _kill_without_psutil(pid)
        return
    try:
        parent = psutil.Process(pid)
        procs = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout)


def _kill_without_psutil(pid: int) -> None:
    """Windows: taskkill /T ends the whole tree; os.kill there ends only ``pid``, which inside Slicer
    is PythonSlicer.exe, the launcher, and would leave the Python it started running. Elsewhere
    only ``pid`` can be named without psutil."""
    if os.name == "nt":
        try:
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10,
                           creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
            return
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        os.kill(pid, getattr(signal, "SIGKILL", signal.SIGTERM))
    except OSError:
        pass


def parse_address(address: Union[str, Tuple[str, int]]) -> Tuple[str, int]:
    if isinstance(address, str):
        host, _, port = address.rpartition(":")
        return (host.strip("[]") or "127.0.0.1"), int(port)
    return address[0], int(address[1])
