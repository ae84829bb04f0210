"""``python -m SAMFineTuneLib serve --port N``: the worker on a TCP socket, one client at a time,
the model kept warm in between (for a GPU box reached through an SSH tunnel).

Every other user of the machine can reach a port, 127.0.0.1 included, so a server always has a
token: ``--token`` (or ``$SAMFINETUNE_TOKEN``, at least ``MIN_TOKEN_LENGTH`` characters) or one
generated at start and printed once. A connection must send ``hello`` with it within
``AUTH_DEADLINE_S``; until then it may send one short line and no arrays, and it does not hold
the one-client lock, so a silent or hostile connection blocks nobody. Clients name no files on
the server unless its operator gives ``--data-root`` (``access.PathAccess``); what one client
sent (volumes, embeddings) is gone before the next one is let in.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import secrets
import socket
import sys
import threading
from typing import Optional, Tuple

from .. import protocol
from ..protocol import TOKEN_ENV, ProtocolError
from .access import PathAccess
from .core import WorkerCore
from .process import add_worker_arguments, open_log, preload_engine, route_chatter, sweep_in_background
from .session import Session

log = logging.getLogger("SAMFineTuneLib.worker")

MIN_TOKEN_LENGTH = 16
BUSY_WAIT_S = 5.0  # an authenticated client waits this long for the previous one to leave
AUTH_DEADLINE_S = 10.0  # a connection that has not authenticated by then is closed
MAX_UNAUTHENTICATED = 16  # connections waiting to authenticate at once; more are closed at once


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
    parser.add_argument("--port", type=int, required=True,
                        help="TCP port (0: any free port; the chosen one is printed)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind; anything but loopback needs --token")
    parser.add_argument("--token", default=None,
                        help=f"shared secret clients must send, at least {MIN_TOKEN_LENGTH} characters (or set "
                             f"${TOKEN_ENV}); without one a token is generated and printed once")
    parser.add_argument("--data-root", default=None,
                        help="folder whose files clients may name (datasets, adapters, checkpoints); without it "
                             "clients name no files on this machine and send arrays only")
    parser.add_argument("--max-upload-mb", type=int, default=protocol.MAX_ATTACHMENT_BYTES >> 20,
                        help="most megabytes of arrays one request may carry")
    parser.add_argument("--auth-deadline", type=float, default=AUTH_DEADLINE_S,
                        help="seconds a new connection has to send 'hello' with the token")
    add_worker_arguments(parser)


def choose_token(given: Optional[str], host: str) -> Tuple[str, bool]:
    """(token, generated): the operator's token once it is long enough, else a fresh one on
    loopback; a ValueError saying what to do otherwise."""
    if given:
        if len(given) < MIN_TOKEN_LENGTH:
            raise ValueError(f"the token has {len(given)} characters; use at least {MIN_TOKEN_LENGTH} (e.g. "
                             "python -c \"import secrets; print(secrets.token_urlsafe(24))\")")
        return given, False
    if not is_loopback(host):
        raise ValueError(f"refusing to listen on {host} without a token: anyone who can reach it could run jobs. "
                         f"Use --token SECRET (or ${TOKEN_ENV}), or bind 127.0.0.1 and use an SSH tunnel.")
    return secrets.token_urlsafe(24), True


def serve_main(args: argparse.Namespace) -> int:
    """Serve clients on a TCP socket, one connection at a time, keeping the model warm in between."""
    try:
        token, generated = choose_token(args.token or os.environ.get(TOKEN_ENV), args.host)
        if args.data_root and not os.path.isdir(args.data_root):
            raise ValueError(f"--data-root {args.data_root} is not a folder")
        if args.max_upload_mb < 1 or not args.auth_deadline > 0:
            raise ValueError("--max-upload-mb must be at least 1 and --auth-deadline above 0")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    try:
        server = socket.create_server((args.host, args.port), family=family)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    port = server.getsockname()[1]
    access = PathAccess(args.data_root)
    print(f"SAMFineTune worker listening on {args.host}:{port} (protocol v{protocol.PROTOCOL_VERSION}, token "
          f"required, clients may name {access.describe()})", flush=True)
    if generated:  # shown once, here, and never logged
        print(f"token: {token}", flush=True)
        print(f"  clients: WorkerClient(address=\"{args.host}:{port}\", token=...) or ${TOKEN_ENV}", flush=True)
    log_path, log_stream = open_log(args.log)
    print(f"log: {log_path}", flush=True)
    route_chatter(log_stream, also_stderr=False)
    sweep_in_background()
    preload_engine()
    Server(server, WorkerCore(log_path), token, access, args.max_upload_mb << 20, args.auth_deadline).run()
    return 0


class Server:
    """The listening socket and what its connections share: the warm core, the one-client lock,
    the places for connections still authenticating."""

    def __init__(self, listener: socket.socket, core: WorkerCore, token: str, access: PathAccess,
                 max_upload_bytes: int, auth_deadline: float = AUTH_DEADLINE_S):
        self.listener, self.core, self.token, self.access = listener, core, token, access
        self.max_upload_bytes, self.auth_deadline = max_upload_bytes, auth_deadline
        self.busy = threading.Lock()
        self.stop = threading.Event()
        self.waiting = threading.BoundedSemaphore(MAX_UNAUTHENTICATED)

    def run(self) -> None:
        """Take connections until a client asks the server to stop (or the socket fails)."""
        self.listener.settimeout(0.5)  # wake up now and then to see whether a client asked the server to stop
        with self.listener:
            while not self.stop.is_set():
                try:
                    conn, address = self.listener.accept()
                except socket.timeout:
                    continue
                except (OSError, KeyboardInterrupt):
                    break
                if not self.waiting.acquire(blocking=False):
                    log.warning("too many connections waiting to authenticate; closed one from %s", address)
                    conn.close()
                    continue
                conn.settimeout(None)
                threading.Thread(target=self._serve, args=(conn, address), daemon=True).start()

    def _serve(self, conn: socket.socket, address) -> None:
        log.info("connection from %s", address)
        slot = _Once(self.waiting.release)
        with conn, conn.makefile("rb") as reader, conn.makefile("wb") as writer:
            admitted = []

            def admit() -> None:  # the token checked out
                deadline.cancel()
                slot()
                if not self.busy.acquire(timeout=BUSY_WAIT_S):  # a client that just left may still be closing
                    raise ProtocolError("server busy: another client is connected; try again later")
                admitted.append(True)

            session = Session(self.core, reader, writer, files=False, token=self.token, need_hello=True,
                              access=self.access, admit=admit, max_attachment_bytes=self.max_upload_bytes)
            deadline = threading.Timer(self.auth_deadline, _expire, (session, conn, self.auth_deadline))
            deadline.daemon = True
            deadline.start()
            try:
                session.send(protocol.event(None, "hello", protocol=protocol.PROTOCOL_VERSION, mode="tcp", auth=True))
                session.serve()
            finally:
                deadline.cancel()
                slot()
                if admitted:
                    self.core.forget_embeddings()
                    self.busy.release()
            _close_gently(conn)
        log.info("connection from %s closed", address)
        if session.stop_server:
            self.stop.set()


class _Once:
    """Call ``action`` the first time this is called, never again."""

    def __init__(self, action):
        self.action, self.lock, self.done = action, threading.Lock(), False

    def __call__(self) -> None:
        with self.lock:
            if not self.done:
                self.done = True
                self.action()


def _expire(session: Session, conn: socket.socket, seconds: float) -> None:
    """The authentication deadline passed: say so and cut the connection."""
    if session.authenticated:
        return
    session.send_error(None, ProtocolError(f"no 'hello' with the token within {seconds:g} s; closing"))
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _close_gently(conn: socket.socket, drain_bytes: int = 1 << 20) -> None:
    """Half-close and drain (a little), so the peer reads our last words (closing with unread input
    sends a reset); a peer that keeps sending is cut off."""
    try:
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(2.0)
        while drain_bytes > 0:
            data = conn.recv(1 << 16)
            if not data:
                break
            drain_bytes -= len(data)
    except OSError:
        pass
