"""The TCP login's proofs (PROTOCOL.md, "TCP mode and security").

Whatever listens on a port may be another user's program, so the token never travels: each side
sends an HMAC-SHA256 over both sides' fresh nonces, and the labels differ, so one side's proof can
never stand in for the other's. The server answers the client's nonce with its proof before the
client proves anything, so anyone who reaches the port holds a proof to test guesses of the token
against, offline. The HMAC's key is therefore the token stretched by scrypt with a salt the server
draws at start: each guess costs tens of milliseconds and 32 MiB instead of a microsecond, and
nothing computed for one server serves against another. The server stretches once; a client once
per server salt and token (kept, so reconnecting costs nothing more).

Standard library only, like ``protocol``.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import re
import secrets
from typing import Any

NONCE_BYTES = 32
SALT_BYTES = 16
SERVER_PROOF_LABEL = b"SAMFineTune login: server proof"
CLIENT_PROOF_LABEL = b"SAMFineTune login: client proof"
# scrypt's cost: about 0.05 s and 32 MiB on one core, per key.
SCRYPT_COST = {"n": 1 << 15, "r": 8, "p": 1}
_SCRYPT_MAXMEM = 64 << 20


def _hex_pattern(nbytes: int) -> "re.Pattern[str]":
    return re.compile(r"[0-9a-f]{%d}" % (2 * nbytes))


_NONCE_RE, _SALT_RE = _hex_pattern(NONCE_BYTES), _hex_pattern(SALT_BYTES)


def new_nonce() -> str:
    """A login nonce: fresh random bytes as lowercase hex."""
    return secrets.token_hex(NONCE_BYTES)


def new_salt() -> str:
    """A server's salt for its login key: fresh random bytes as lowercase hex."""
    return secrets.token_hex(SALT_BYTES)


def is_nonce(value: Any) -> bool:
    return isinstance(value, str) and _NONCE_RE.fullmatch(value) is not None


def is_salt(value: Any) -> bool:
    return isinstance(value, str) and _SALT_RE.fullmatch(value) is not None


@functools.lru_cache(maxsize=8)
def login_key(token: str, salt: str) -> bytes:
    """The HMAC key of ``token`` under a server's ``salt`` (``is_salt`` checked by the caller)."""
    # surrogatepass: a token given in Python may hold a lone surrogate, which plain UTF-8 refuses
    return hashlib.scrypt(token.encode("utf-8", "surrogatepass"), salt=bytes.fromhex(salt), dklen=32,
                          maxmem=_SCRYPT_MAXMEM, **SCRYPT_COST)


def login_proof(key: bytes, label: bytes, client_nonce: str, server_nonce: str) -> str:
    """HMAC-SHA256 (hex) keyed by ``login_key`` over the label and both nonces (``is_nonce`` checked)."""
    message = b"\n".join((label, client_nonce.encode("ascii"), server_nonce.encode("ascii")))
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def proof_matches(given: Any, expected: str) -> bool:
    """Whether the peer's proof (any JSON value, lone surrogates included) is ``expected``, in constant time."""
    return isinstance(given, str) and hmac.compare_digest(given.encode("utf-8", "surrogatepass"),
                                                          expected.encode("ascii"))


class ServerKey:
    """A server's side of the login: its salt, drawn at start, and the token's key under it."""

    def __init__(self, token: str):
        self.salt = new_salt()
        self.key = login_key(token, self.salt)
