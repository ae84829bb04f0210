"""Logging in to a ``serve`` endpoint without the token ever leaving this machine.

Whatever listens on the port may not be our server: on a shared machine another user can bind
127.0.0.1:PORT before an SSH tunnel opens or while the server restarts. So the client sends only a
fresh nonce, checks the server's proof over both nonces (``login_proofs``) before it sends
its own, and refuses a server that cannot prove it knows the token (PROTOCOL.md, "TCP mode and
security"). The login reads its lines a byte at a time, so nothing after it is taken from the
socket before the connection's reader (thread or poll) starts.
"""
from __future__ import annotations

import socket
import time
from typing import Any, Dict, Optional, Tuple

from .. import login_proofs, protocol
from ..protocol import PROTOCOL_VERSION, TOKEN_ENV, ProtocolError
from .jobs import JobError, JobTimeout, WorkerCrashed


def version_mismatch(message: Dict[str, Any]) -> Optional[str]:
    """Why a message of the worker cannot be followed for its protocol version (None: it can)."""
    if message.get("v") == PROTOCOL_VERSION and (message.get("event") != "hello"
                                                 or message.get("protocol") == PROTOCOL_VERSION):
        return None
    worker_version = message.get("protocol", message.get("v"))
    return (f"protocol version mismatch: the worker speaks v{worker_version}, this client v{PROTOCOL_VERSION}; "
            "use the same SAMFineTune version in Slicer and in the worker")


def check_token(token: Optional[str], address: str) -> str:
    if not token:
        raise JobError(f"authentication failed: no token for the server at {address}; pass WorkerClient(token=...) "
                       f"or set ${TOKEN_ENV} (the token the server printed at start, or its --token-file)")
    return token


def log_in(sock: socket.socket, address: str, token: str, timeout: float) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(the server's hello event, the answer to the login) once both sides proved they know ``token``;
    JobError (JobTimeout, WorkerCrashed) naming the problem otherwise."""
    lines = _Lines(sock, address, time.monotonic() + timeout, timeout)
    hello = lines.read()
    if hello.get("event") != "hello":
        raise JobError(f"the server at {address} did not start with 'hello' (it sent {hello.get('event')!r}); "
                       "is the address that of a SAMFineTune server?")
    client_nonce = login_proofs.new_nonce()
    lines.send(protocol.request("h1", "hello", {"nonce": client_nonce}))
    challenge = lines.answer("h1")
    server_nonce, salt, server_proof = challenge.get("nonce"), challenge.get("salt"), challenge.get("proof")
    key = login_proofs.login_key(token, salt) if login_proofs.is_salt(salt) else None
    if key is None or not (login_proofs.is_nonce(server_nonce) and login_proofs.proof_matches(
            server_proof, login_proofs.login_proof(key, login_proofs.SERVER_PROOF_LABEL, client_nonce, server_nonce))):
        raise JobError(f"authentication failed: the server at {address} does not know this token: wrong token or "
                       "not our server")
    proof = login_proofs.login_proof(key, login_proofs.CLIENT_PROOF_LABEL, client_nonce, server_nonce)
    lines.send(protocol.request("h2", "hello", {"proof": proof}))
    return hello, lines.answer("h2")


class _Lines:
    """The login's messages on a socket, each a short line, all within one deadline."""

    def __init__(self, sock: socket.socket, address: str, deadline: float, timeout: float):
        self.sock, self.address, self.deadline, self.timeout = sock, address, deadline, timeout

    def send(self, message: Dict[str, Any]) -> None:
        self._settimeout()
        try:
            self.sock.sendall(protocol.encode(message))
        except socket.timeout:
            raise self._late() from None
        except OSError as exc:
            raise WorkerCrashed(f"the connection to the worker at {self.address} was closed during login "
                                f"({exc})") from None

    def answer(self, job_id: str) -> Dict[str, Any]:
        """The result of login request ``job_id``; the worker's refusal is a JobError with its reason."""
        message = self.read()
        if message.get("event") == "error":
            raise JobError(f"the worker at {self.address} refused the connection: {message.get('error')}")
        if message.get("id") != job_id or message.get("event") != "result" or not isinstance(message.get("result"),
                                                                                             dict):
            raise JobError(f"the server at {self.address} answered the login with {message.get('event')!r} for "
                           f"{message.get('id')!r}, not a result for {job_id!r}")
        return message["result"]

    def read(self) -> Dict[str, Any]:
        line = bytearray()
        while not line.endswith(b"\n"):
            if len(line) > protocol.HELLO_MAX_BYTES:
                raise JobError(f"the server at {self.address} sent a login line longer than "
                               f"{protocol.HELLO_MAX_BYTES} bytes")
            self._settimeout()
            try:
                byte = self.sock.recv(1)
            except socket.timeout:
                raise self._late() from None
            except OSError:
                byte = b""
            if not byte:
                raise WorkerCrashed(f"the connection to the worker at {self.address} was closed during login (server "
                                    "stopped, busy with connections, or network lost)")
            line += byte
        try:
            message = protocol.decode(bytes(line))
        except ProtocolError as exc:
            raise JobError(f"the server at {self.address} sent an unreadable login line ({exc})") from None
        mismatch = version_mismatch(message)
        if mismatch:
            raise JobError(mismatch)
        return message

    def _settimeout(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self._late()
        self.sock.settimeout(left)

    def _late(self) -> JobTimeout:
        return JobTimeout(f"the server at {self.address} did not complete the login within {self.timeout:g} s")
