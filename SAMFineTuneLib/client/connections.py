"""Connections to a worker: a child process on pipes, or a ``serve`` endpoint on a socket. Each
has a reader thread that turns what the worker says into items of the client's event queue."""
from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import threading
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from .. import protocol
from ..protocol import ProtocolError


class Connection:
    """Streams to one worker plus a reader thread that turns what it says into queue items."""

    files = True  # arrays by file in a job folder (local) or attached to the stream (TCP)

    def __init__(self, reader, writer, events: "queue.Queue"):
        self.reader, self.writer = reader, writer
        self.write_lock = threading.Lock()
        self.events = events
        self.hello: Optional[Dict[str, Any]] = None
        self.thread = threading.Thread(target=self._read_loop, name="samft-client-reader", daemon=True)
        self.thread.start()

    def _read_loop(self) -> None:
        while True:
            try:
                message = protocol.read_message(self.reader)
            except ProtocolError as exc:
                self.events.put((self, "bad", exc))
                continue
            except (OSError, ValueError):
                message = None
            if message is None:
                self.events.put((self, "eof", None))
                return
            self.events.put((self, "msg", message))

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
    def __init__(self, command: Sequence[str], env: Dict[str, str], cwd: str, log_path: str, events: "queue.Queue"):
        self.log_path = log_path
        with open(log_path, "ab") as log_file:  # the child keeps its own handle on it
            self.process = subprocess.Popen(
                list(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, env=env, cwd=cwd,
                creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
            )
        super().__init__(self.process.stdout, self.process.stdin, events)

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
    files = False

    def __init__(self, host: str, port: int, events: "queue.Queue", timeout: float):
        self.address = f"{host}:{port}"
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(None)
        super().__init__(self.sock.makefile("rb"), self.sock.makefile("wb"), events)

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
        try:
            os.kill(pid, getattr(signal, "SIGKILL", signal.SIGTERM))
        except OSError:
            pass
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


def parse_address(address: Union[str, Tuple[str, int]]) -> Tuple[str, int]:
    if isinstance(address, str):
        host, _, port = address.rpartition(":")
        return (host.strip("[]") or "127.0.0.1"), int(port)
    return address[0], int(address[1])
