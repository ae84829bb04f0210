"""The TCP login as a program squatting on the client's port meets it, and as a client without the
token meets the server: the token never travels, each side proves it knows it over both sides'
fresh nonces, and neither side's proof can stand in for the other's or for a later login
(PROTOCOL.md, "TCP mode and security")."""
from __future__ import annotations

import socket
import threading

import pytest

from SAMFineTuneLib import login_proofs, protocol
from SAMFineTuneLib.client import JobError, WorkerClient
from worker_servers import Raw, in_process_servers

TOKEN = "login-test-token-0123456789"
READERS = ("thread", "poll")


@pytest.fixture
def in_process(tmp_path):
    with in_process_servers(tmp_path, TOKEN) as start:
        yield start


class Squatter:
    """A program on the port the client expects: says hello as a server of ``version`` would,
    answers the client's first line with ``answer(line)`` (a message, or None for silence) and
    records every byte the client sends until it hangs up."""

    def __init__(self, answer, version=protocol.PROTOCOL_VERSION):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received = bytearray()
        self.done = threading.Event()
        threading.Thread(target=self._serve, args=(answer, version), daemon=True).start()

    def _serve(self, answer, version):
        conn, _ = self.listener.accept()
        self.listener.close()
        with conn, conn.makefile("rb") as lines:
            conn.settimeout(20)
            hello = protocol.event(None, "hello", protocol=version, mode="tcp", auth=True)
            conn.sendall(protocol.encode(dict(hello, v=version)))
            first = lines.readline()
            self.received += first
            reply = answer(protocol.decode(first)) if first and answer is not None else None
            if reply is not None:
                conn.sendall(protocol.encode(reply))
            while data := lines.read1(1 << 16):
                self.received += data
        self.done.set()

    def sent_by(self, client):
        """Everything ``client`` sent, once it has hung up."""
        client.shutdown(timeout=2)
        assert self.done.wait(20)
        return bytes(self.received)


def challenge(token=TOKEN, label=login_proofs.SERVER_PROOF_LABEL, proof=True, salt=None):
    """answer(): the first login step's result, its proof made with ``token``, ``label`` and ``salt``
    (default: a fresh one, sent with it)."""

    def answer(request):
        nonce, server_nonce = (request.get("params") or {}).get("nonce", ""), login_proofs.new_nonce()
        result = {"nonce": server_nonce, "salt": salt or login_proofs.new_salt()}
        if proof:
            key = login_proofs.login_key(token, salt or result["salt"])
            result["proof"] = login_proofs.login_proof(key, label, nonce, server_nonce)
        return protocol.event(request.get("id"), "result", result=result)

    return answer


def refuse(request):
    return protocol.event(request.get("id"), "error", error="PermissionError: no", kind="PermissionError")


# --- the client gives nothing away ---------------------------------------------------------------


@pytest.mark.parametrize("reader", READERS)
def test_the_token_never_leaves_the_client(reader):
    squatter = Squatter(refuse)
    client = WorkerClient(address=("127.0.0.1", squatter.port), token=TOKEN, reader=reader)
    try:
        client.start(timeout=10)
        refused = None
    except JobError as exc:
        refused = str(exc)
    sent = squatter.sent_by(client)
    assert sent and TOKEN.encode() not in sent
    assert refused == f"the worker at 127.0.0.1:{squatter.port} refused the connection: PermissionError: no"


@pytest.mark.parametrize("answer", [challenge(token="another-token-0123456789"), challenge(proof=False),
                                    challenge(label=login_proofs.CLIENT_PROOF_LABEL)],
                         ids=["wrong token", "no proof", "the client's label"])
def test_a_server_that_cannot_prove_the_token_is_refused_before_the_client_proves_anything(answer):
    squatter = Squatter(answer)
    client = WorkerClient(address=("127.0.0.1", squatter.port), token=TOKEN)
    address = f"127.0.0.1:{squatter.port}"
    with pytest.raises(JobError, match=f"the server at {address} does not know this token: wrong token or not our "
                                       "server$"):
        client.start(timeout=10)
    assert not client.connected
    sent = squatter.sent_by(client)
    assert sent.count(b"\n") == 1 and b"proof" not in sent and TOKEN.encode() not in sent  # the nonce only


@pytest.mark.parametrize("salt", [None, "", "00" * 15, "AB" * 16, 7], ids=["none", "empty", "short", "upper", "number"])
def test_a_challenge_without_a_good_salt_is_refused_before_any_stretching(salt, monkeypatch):
    stretched = []
    monkeypatch.setattr(login_proofs.hashlib, "scrypt", lambda *a, **k: stretched.append(1) or b"k" * 32)

    def answer(request):
        result = {"nonce": login_proofs.new_nonce(), "proof": "0" * 64}
        if salt is not None:
            result["salt"] = salt
        return protocol.event(request.get("id"), "result", result=result)

    squatter = Squatter(answer)
    client = WorkerClient(address=("127.0.0.1", squatter.port), token=TOKEN + "-unseen")
    with pytest.raises(JobError, match="does not know this token"):
        client.start(timeout=10)
    assert stretched == [] and b"proof" not in squatter.sent_by(client)


def test_a_server_proof_can_be_tested_only_against_the_stretched_token():
    """Anyone who reaches the port gets a server proof: a guess of the token is tested against it
    only through scrypt under that server's salt, so a plain HMAC of the guess never matches, and a
    key stretched for one server does not serve against another."""
    import hashlib
    import hmac

    first, second = login_proofs.ServerKey(TOKEN), login_proofs.ServerKey(TOKEN)
    assert login_proofs.is_salt(first.salt) and first.salt != second.salt and first.key != second.key
    assert first.key == hashlib.scrypt(TOKEN.encode(), salt=bytes.fromhex(first.salt), dklen=32, maxmem=64 << 20,
                                       **login_proofs.SCRYPT_COST)
    assert login_proofs.SCRYPT_COST["n"] >= 1 << 15 and login_proofs.SCRYPT_COST["r"] >= 8
    nonces = login_proofs.new_nonce(), login_proofs.new_nonce()
    proof = login_proofs.login_proof(first.key, login_proofs.SERVER_PROOF_LABEL, *nonces)
    message = b"\n".join((login_proofs.SERVER_PROOF_LABEL, *(n.encode() for n in nonces)))
    assert proof != hmac.new(TOKEN.encode(), message, hashlib.sha256).hexdigest()
    assert proof != login_proofs.login_proof(second.key, login_proofs.SERVER_PROOF_LABEL, *nonces)


def test_the_server_stretches_the_token_once_not_per_connection(tmp_path, monkeypatch):
    """A connection costs the server no scrypt: otherwise anyone who reaches the port could keep its
    cores and memory busy without knowing the token."""
    real, calls = login_proofs.hashlib.scrypt, []
    monkeypatch.setattr(login_proofs.hashlib, "scrypt", lambda *a, **k: calls.append(k["salt"]) or real(*a, **k))
    login_proofs.login_key.cache_clear()
    with in_process_servers(tmp_path, TOKEN + "-once") as start:
        port = start()
        for _ in range(3):
            raw = Raw(port, timeout=10)
            assert raw.log_in(TOKEN + "-once")["event"] == "result"
            raw.close()
        for _ in range(3):
            assert after_challenge(port, lambda nonce, ch: proof("0" * 64)) == [("h2", "error", "PermissionError")]
    assert len(calls) == 1  # the server's one key (this client, in the same process, finds it kept)


def test_a_server_of_another_version_hears_nothing_from_the_client():
    squatter = Squatter(challenge(), version=protocol.PROTOCOL_VERSION - 1)
    client = WorkerClient(address=("127.0.0.1", squatter.port), token=TOKEN)
    with pytest.raises(JobError, match=f"version mismatch: the worker speaks v{protocol.PROTOCOL_VERSION - 1},"):
        client.start(timeout=10)
    assert squatter.sent_by(client) == b""


# --- the server lets in only a client that proves it knows the token ----------------------------------


def after_challenge(port, second, nonce=None):
    """What the server says, until it closes the connection, when ``second(client_nonce, challenge)``
    (a message) follows its challenge."""
    raw = Raw(port, timeout=10)
    nonce = nonce or login_proofs.new_nonce()
    raw.send(protocol.request("h1", "hello", {"nonce": nonce}))
    first = raw.read()
    assert (first["id"], first["event"]) == ("h1", "result") and login_proofs.is_nonce(first["result"]["nonce"])
    raw.send(second(nonce, first["result"]))
    messages = [(message["id"], message["event"], message.get("kind")) for message in iter(raw.read, None)]
    raw.close()
    return messages


def proof(value):
    return protocol.request("h2", "hello", {"proof": value})


def client_proof(token, nonce, challenge):
    key = login_proofs.login_key(token, challenge["salt"])
    return proof(login_proofs.login_proof(key, login_proofs.CLIENT_PROOF_LABEL, nonce, challenge["nonce"]))


SECOND_STEPS = {  # what follows the challenge -> the error kind it gets
    "a wrong token": (lambda nonce, ch: client_proof("wrong-token-0123456789", nonce, ch), "PermissionError"),
    "the server's own proof": (lambda nonce, ch: proof(ch["proof"]), "PermissionError"),
    "a lone surrogate": (lambda nonce, ch: proof("\ud800x"), "PermissionError"),
    "a number": (lambda nonce, ch: proof(12345), "PermissionError"),
    "another nonce": (lambda nonce, ch: protocol.request("h2", "hello", {"nonce": login_proofs.new_nonce()}),
                      "PermissionError"),
    "a ping": (lambda nonce, ch: protocol.request("h2", "ping"), "ProtocolError"),
    "an attachment": (lambda nonce, ch: dict(protocol.request("h2", "echo"),
                                             arrays={"a": {"dtype": "|u1", "shape": [4], "nbytes": 4}}),
                      "ProtocolError"),
}


@pytest.mark.parametrize("name", sorted(SECOND_STEPS))
def test_anything_but_the_right_proof_gets_one_error_and_the_connection_closes(in_process, name):
    port = in_process()
    second, kind = SECOND_STEPS[name]
    messages = after_challenge(port, second)
    assert len(messages) == 1 and messages[0][1:] == ("error", kind)


@pytest.mark.parametrize("reader", READERS)
def test_the_server_refuses_a_wrong_token_and_admits_the_right_one(in_process, reader):
    port = in_process()
    assert after_challenge(port, lambda nonce, ch: client_proof("wrong-token-0123456789", nonce, ch)) == [
        ("h2", "error", "PermissionError")]
    raw = Raw(port, timeout=10)
    admitted = raw.log_in(TOKEN)
    assert admitted["event"] == "result" and admitted["result"]["protocol"] == protocol.PROTOCOL_VERSION
    raw.send(protocol.request("p", "ping"))
    assert raw.answer("p")["result"]["pong"] is True
    raw.close()
    with WorkerClient(address=("127.0.0.1", port), token="wrong-token-0123456789", reader=reader) as client:
        with pytest.raises(JobError, match="does not know this token"):
            client.ping(timeout=10)
    with WorkerClient(address=("127.0.0.1", port), token=TOKEN, reader=reader) as client:
        assert client.ping(timeout=10)["pong"] is True
        assert client._res.conn.login["paths"]


def test_a_replayed_proof_logs_nobody_in(in_process):
    port = in_process()
    raw, nonce = Raw(port, timeout=10), login_proofs.new_nonce()
    raw.send(protocol.request("h1", "hello", {"nonce": nonce}))
    seen = client_proof(TOKEN, nonce, raw.answer("h1")["result"])  # what an onlooker of this login saw
    raw.send(seen)
    assert raw.answer("h2")["event"] == "result"
    raw.close()
    replayed = after_challenge(port, lambda nonce, ch: seen, nonce=nonce)  # same client nonce, fresh server nonce
    assert replayed == [("h2", "error", "PermissionError")]
    assert after_challenge(port, lambda nonce, ch: proof(ch["proof"])) == [("h2", "error", "PermissionError")]


def test_the_login_deadline_covers_both_steps(in_process):
    port = in_process(auth_deadline=1.0)
    raw = Raw(port, timeout=15)
    raw.send(protocol.request("h1", "hello", {"nonce": login_proofs.new_nonce()}))
    assert raw.read()["event"] == "result"
    assert raw.stream.read(1) == b""  # closed without a word, not our own timeout
    raw.close()
