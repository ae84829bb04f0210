"""``python -m SAMFineTuneLib serve --port N``: the worker on a TCP socket, one client at a time,
the model kept warm in between (for a GPU box reached through an SSH tunnel).

Loopback by default; any other address needs a token (``--token`` or ``$SAMFINETUNE_TOKEN``),
which a client sends in its first request ('hello').
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
import threading
from typing import Optional

from .. import protocol
from ..protocol import ProtocolError
from .core import WorkerCore
from .process import add_worker_arguments, open_log, preload_engine, route_chatter
from .session import Session

log = logging.getLogger("SAMFineTuneLib.worker")

TOKEN_ENV = "SAMFINETUNE_TOKEN"
BUSY_WAIT_S = 5.0  # a new TCP client waits this long for the previous one to leave


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
    print(f"SAMFineTune worker listening on {args.host}:{port} (protocol v{protocol.PROTOCOL_VERSION}"
          f"{', token required' if token else ''})", flush=True)
    log_path, log_stream = open_log(args.log)
    print(f"log: {log_path}", flush=True)
    route_chatter(log_stream, also_stderr=False)
    core = WorkerCore(log_path)
    preload_engine()
    _accept(server, core, token)
    return 0


def _accept(server: socket.socket, core: WorkerCore, token: Optional[str]) -> None:
    """Take connections until a client asks the server to stop (or the socket fails)."""
    busy = threading.Lock()
    stop = threading.Event()
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
            threading.Thread(target=_run_connection, args=(conn, address, core, token, busy, stop),
                             daemon=True).start()


def _run_connection(conn: socket.socket, address, core: WorkerCore, token: Optional[str], busy: threading.Lock,
                    stop: threading.Event) -> None:
    log.info("connection from %s", address)
    with conn, conn.makefile("rb") as reader, conn.makefile("wb") as writer:
        session = Session(core, reader, writer, files=False, token=token, need_hello=True)
        if not busy.acquire(timeout=BUSY_WAIT_S):  # a client that just left may still be closing
            session.send_error(None, ProtocolError("server busy: another client is connected; try again later"))
        else:
            try:
                session.send(protocol.event(None, "hello", protocol=protocol.PROTOCOL_VERSION, pid=os.getpid(),
                                            mode="tcp", auth=token is not None))
                session.serve()
            finally:
                busy.release()
        _close_gently(conn)
    log.info("connection from %s closed", address)
    if session.stop_server:
        stop.set()


def _close_gently(conn: socket.socket) -> None:
    """Half-close and drain, so the peer reads our last words (closing with unread input sends a reset)."""
    try:
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(2.0)
        while conn.recv(1 << 16):
            pass
    except OSError:
        pass
