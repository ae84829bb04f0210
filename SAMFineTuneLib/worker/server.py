"""``python -m SAMFineTuneLib serve --port N``: the worker on a TCP socket, one client at a time,
the model kept warm in between (for a GPU box reached through an SSH tunnel).

Every other user of the machine can reach a port, 127.0.0.1 included, so a server always has a
token: ``$SAMFINETUNE_TOKEN`` or ``--token-file`` (at least ``MIN_TOKEN_LENGTH`` characters; never
a command-line argument, which every user can read in the process list) or one generated at
start and printed once. The token never travels: a connection logs in within ``AUTH_DEADLINE_S``
by a challenge and response in which each side proves it knows the token (``session.Session``,
PROTOCOL.md); until then it may send two short lines and no arrays, its writes time out, and it
does not hold the one-client lock, so a silent or hostile connection blocks nobody. A logged-in
client may read late, but one that takes none of the server's bytes for ``SEND_STALL_S`` is cut
off, so a hung client cannot hold the lock (and a job thread stuck writing to it) for ever. Clients
name no files on the server unless its operator gives ``--data-root`` (``access.PathAccess``); what
one client sent (volumes, embeddings) is gone before the next one is let in.
"""
from __future__ import annotations

import argparse
import io
import ipaddress
import logging
import os
import secrets
import socket
import sys
import threading
import time
from typing import Mapping, Optional, Tuple

from .. import login_proofs, protocol
from ..cli_args import whole_number
from ..protocol import TOKEN_ENV, ProtocolError
from .access import PathAccess
from .core import WorkerCore
from .process import add_worker_arguments, open_log, preload_engine, route_chatter, sweep_in_background
from .session import BEFORE_LOGIN, Session

log = logging.getLogger("SAMFineTuneLib.worker")

MIN_TOKEN_LENGTH = 16
BUSY_WAIT_S = 5.0  # an authenticated client waits this long for the previous one to leave
AUTH_DEADLINE_S = 10.0  # a connection that has not authenticated by then is closed
MAX_UNAUTHENTICATED = 16  # connections waiting to authenticate at once; more are closed at once
# A logged-in client that takes none of the server's bytes for this long is cut off: long enough for
# a busy UI (Slicer reads from a timer) to come back, short of holding the server for ever.
SEND_STALL_S = 300.0
PRE_LOGIN_LOG_LINES = 100  # log lines a minute about connections that have not logged in; the rest are dropped
# TCP keepalive: a client whose machine or network vanished is noticed after ~2 minutes of silence
# instead of holding the one-client lock for ever (the OS default waits 2 hours).
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES = 60, 15, 4


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
    parser.add_argument("--port", type=whole_number(0, 65535), required=True,
                        help="TCP port (0: any free port; the chosen one is printed)")
    parser.add_argument("--host", default="127.0.0.1",
                        help=f"address to bind; anything but loopback needs a token (${TOKEN_ENV} or --token-file)")
    parser.add_argument("--token-file", default=None, metavar="PATH",
                        help=f"file holding the shared secret clients must know (it never travels: each side "
                             f"proves it knows it), at least {MIN_TOKEN_LENGTH} "
                             f"characters, readable by its owner only (chmod 600); or set ${TOKEN_ENV}; without "
                             "either a token is generated and printed once")
    parser.add_argument("--token", default=None, help=argparse.SUPPRESS)  # refused with a pointer to the above
    parser.add_argument("--data-root", default=None,
                        help="folder whose files clients may name (datasets, adapters, checkpoints); without it "
                             "clients name no files on this machine and send arrays only")
    parser.add_argument("--max-upload-mb", type=int, default=protocol.MAX_ATTACHMENT_BYTES >> 20,
                        help="most megabytes of arrays one request may carry")
    parser.add_argument("--auth-deadline", type=float, default=AUTH_DEADLINE_S,
                        help="seconds a new connection has to log in (prove it knows the token)")
    parser.add_argument("--stall-timeout", type=float, default=SEND_STALL_S,
                        help="seconds a logged-in client may leave the server's messages unread before it is "
                             "disconnected")
    add_worker_arguments(parser)


def given_token(token_file: Optional[str], refused_arg: Optional[str], environ: Mapping[str, str]) -> Optional[str]:
    """The operator's token: the file's first line, else ``$SAMFINETUNE_TOKEN``, else None; a ValueError
    saying what to do for a token on the command line or a file other users can read."""
    if refused_arg is not None:
        raise ValueError(f"--token puts the token in the process list, where every user of this machine can read "
                         f"it; set ${TOKEN_ENV} or use --token-file PATH (chmod 600) instead")
    if token_file is None:
        return environ.get(TOKEN_ENV) or None
    try:
        with open(token_file, "rb") as stream:
            mode = os.fstat(stream.fileno()).st_mode
            if os.name != "nt" and mode & 0o077:
                raise ValueError(f"--token-file {token_file} can be read or changed by other users; run "
                                 f"chmod 600 {token_file}")
            text = stream.read(4096).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read --token-file {token_file}: {exc}") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise ValueError(f"--token-file {token_file} is empty; put the token on its first line")
    return lines[0].strip()


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
                         f"Set ${TOKEN_ENV} or use --token-file PATH, or bind 127.0.0.1 and use an SSH tunnel.")
    return secrets.token_urlsafe(24), True


def serve_main(args: argparse.Namespace) -> int:
    """Serve clients on a TCP socket, one connection at a time, keeping the model warm in between."""
    try:
        token, generated = choose_token(given_token(args.token_file, args.token, os.environ), args.host)
        if args.data_root and not os.path.isdir(args.data_root):
            raise ValueError(f"--data-root {args.data_root} is not a folder")
        if args.max_upload_mb < 1 or not args.auth_deadline > 0 or not args.stall_timeout > 0:
            raise ValueError("--max-upload-mb must be at least 1, --auth-deadline and --stall-timeout above 0")
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
    Server(server, WorkerCore(log_path), token, access, args.max_upload_mb << 20, args.auth_deadline,
           args.stall_timeout).run()
    return 0


class Server:
    """The listening socket and what its connections share: the warm core, the one-client lock,
    the places for connections still authenticating."""

    def __init__(self, listener: socket.socket, core: WorkerCore, token: str, access: PathAccess,
                 max_upload_bytes: int, auth_deadline: float = AUTH_DEADLINE_S, stall_timeout: float = SEND_STALL_S):
        self.listener, self.core, self.access = listener, core, access
        self.login = login_proofs.ServerKey(token)  # stretched once: a connection costs no scrypt
        self.max_upload_bytes, self.auth_deadline, self.stall_timeout = max_upload_bytes, auth_deadline, stall_timeout
        self.busy = threading.Lock()
        self.stop = threading.Event()
        self.waiting = threading.BoundedSemaphore(MAX_UNAUTHENTICATED)
        if not any(isinstance(item, PreLoginLogQuota) for item in log.filters):
            log.addFilter(PreLoginLogQuota())

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
                    log.warning("too many connections waiting to authenticate; closed one from %s", address,
                                extra=BEFORE_LOGIN)
                    conn.close()
                    continue
                conn.settimeout(self.auth_deadline)  # until it logs in, a peer that reads nothing stalls no write
                _keep_alive(conn)
                threading.Thread(target=self._serve, args=(conn, address), daemon=True).start()

    def _serve(self, conn: socket.socket, address) -> None:
        log.info("connection from %s", address, extra=BEFORE_LOGIN)
        slot = _Once(self.waiting.release)
        admitted, ended, sending = [], threading.Event(), _SocketWriter(conn)
        try:
            with conn, conn.makefile("rb") as reader, io.BufferedWriter(sending) as writer:

                def admit() -> None:  # the client proved it knows the token
                    deadline.cancel()
                    slot()
                    if not self.busy.acquire(timeout=BUSY_WAIT_S):  # a client that just left may still be closing
                        raise ProtocolError("server busy: another client is connected; try again later")
                    admitted.append(True)
                    conn.settimeout(None)  # a logged-in client may read its events late (a long job, a busy UI)
                    threading.Thread(target=_watch_sends, args=(sending, conn, ended, self.stall_timeout),
                                     daemon=True).start()

                session = Session(self.core, reader, writer, files=False, login=self.login, need_hello=True,
                                  access=self.access, admit=admit, max_attachment_bytes=self.max_upload_bytes)
                deadline = threading.Timer(self.auth_deadline, _expire, (session, conn, self.auth_deadline))
                deadline.daemon = True
                deadline.start()
                try:
                    session.send(protocol.event(None, "hello", protocol=protocol.PROTOCOL_VERSION, mode="tcp",
                                                auth=True))
                    session.serve()
                finally:
                    deadline.cancel()
                    slot()
                _close_gently(conn)
        except OSError as exc:  # flushing the last words to a peer that stopped reading: nothing left to tell it
            log.info("connection from %s ended: %s", address, exc, extra=None if admitted else BEFORE_LOGIN)
        finally:
            ended.set()
            slot()
            if admitted:
                self._hand_over(session)
        log.info("connection from %s closed", address, extra=None if admitted else BEFORE_LOGIN)

    def _hand_over(self, session: Session) -> None:
        """The admitted client left: stop the server if it asked, else free the one-client lock, but
        only once its job has ended, so no job of one client runs on beside the next client."""
        if session.stop_server:
            self.stop.set()
        session.wait_for_job()
        self.core.forget_client()
        self.busy.release()


class PreLoginLogQuota(logging.Filter):
    """Lets through at most ``PRE_LOGIN_LOG_LINES`` a minute of the log lines marked ``BEFORE_LOGIN``,
    then one saying the rest are left out: anyone who reaches the port can make such lines."""

    def __init__(self):
        super().__init__()
        self.lock, self.minute, self.count = threading.Lock(), None, 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "before_login", False):
            return True
        with self.lock:
            minute = int(time.monotonic() // 60)
            if minute != self.minute:
                self.minute, self.count = minute, 0
            self.count += 1
            if self.count == PRE_LOGIN_LOG_LINES + 1:
                record.msg, record.args = ("more lines about connections that did not log in are left out of the "
                                           "log this minute"), ()
            return self.count <= PRE_LOGIN_LOG_LINES + 1


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
    """The authentication deadline passed: cut the connection. Shutting the socket down takes no lock,
    so a write stuck on a peer that reads nothing cannot hold it up; the blocked reader and writer
    wake up and the connection's thread frees its place."""
    if session.authenticated:
        return
    log.info("no login within %g s; closing the connection", seconds, extra=BEFORE_LOGIN)
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _SocketWriter(io.RawIOBase):
    """The connection's write side; ``blocked_since``: when the write waiting on the peer began
    (None while none waits). Each call returns once the kernel took some bytes: the peer read some."""

    def __init__(self, conn: socket.socket):
        self.conn, self.blocked_since = conn, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.blocked_since = time.monotonic()
        try:
            return self.conn.send(data)
        finally:
            self.blocked_since = None


def _watch_sends(writer: _SocketWriter, conn: socket.socket, ended: threading.Event, limit: float) -> None:
    """Until the connection ends: cut it once a write has waited ``limit`` s for the peer to read.
    Nothing can be told to a peer that reads nothing; the log says why."""
    while not ended.wait(min(1.0, limit / 4)):
        since = writer.blocked_since
        if since is not None and time.monotonic() - since > limit:
            log.warning("the client read none of the server's messages for %g s; disconnected it (serve "
                        "--stall-timeout)", limit)
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return


def _keep_alive(conn: socket.socket) -> None:
    """Ask the kernel to probe a silent peer (``KEEPALIVE_*``), where the platform lets us set it."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle = getattr(socket, "TCP_KEEPIDLE", getattr(socket, "TCP_KEEPALIVE", None))  # macOS: TCP_KEEPALIVE
    options = ((idle, KEEPALIVE_IDLE_S), (getattr(socket, "TCP_KEEPINTVL", None), KEEPALIVE_INTERVAL_S),
               (getattr(socket, "TCP_KEEPCNT", None), KEEPALIVE_PROBES))
    for option, value in options:
        if option is not None:
            try:
                conn.setsockopt(socket.IPPROTO_TCP, option, value)
            except OSError:  # an old kernel or Windows build without it: the OS default applies
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
