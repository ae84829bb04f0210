"""Real ``serve`` processes for the TCP tests, and raw connections to them (what a hostile client
would send, byte for byte)."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

from SAMFineTuneLib import login_proofs, protocol
from SAMFineTuneLib.client import BOOT

LIB = Path(__file__).resolve().parents[1] / "SAMFineTuneLib"
ENV = {"OMP_NUM_THREADS": "1"}


@contextlib.contextmanager
def in_process_servers(tmp_path, token):
    """start(auth_deadline, stall_timeout) -> the port of a server in this process that knows ``token``
    (a test may swap a job handler or a constant); all of them stopped at the end."""
    from SAMFineTuneLib.worker import server as server_module
    from SAMFineTuneLib.worker.access import PathAccess
    from SAMFineTuneLib.worker.core import WorkerCore

    servers = []

    def start(auth_deadline=30.0, stall_timeout=server_module.SEND_STALL_S):
        listener = socket.create_server(("127.0.0.1", 0))
        servers.append(server_module.Server(listener, WorkerCore(str(tmp_path / "w.log")), token, PathAccess(),
                                            1 << 20, auth_deadline, stall_timeout))
        threading.Thread(target=servers[-1].run, daemon=True).start()
        return listener.getsockname()[1]

    try:
        yield start
    finally:
        for srv in servers:
            srv.stop.set()


def start_server(tmp_path, *extra, log_name="s.log"):
    """A real ``serve`` process; (process, host, port, token: the one it printed, or None)."""
    env = {k: v for k, v in os.environ.items() if k != "SAMFINETUNE_TOKEN"}
    proc = subprocess.Popen([sys.executable, "-c", BOOT, "serve", "--port", "0", "--log", str(tmp_path / log_name),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(env, **ENV), cwd=str(LIB.parent))
    line = proc.stdout.readline()
    assert "listening on" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    host, port = line.split("listening on ")[1].split()[0].rsplit(":", 1)
    token = None
    while True:
        line = proc.stdout.readline()
        if line.startswith("token: "):
            token = line.split()[1]
        if not line or line.startswith("log: "):
            return proc, host, int(port), token


def stop_server(proc):
    """Kill the server; returns what it wrote on stderr."""
    proc.kill()
    proc.wait(timeout=10)
    proc.stdout.close()
    err = proc.stderr.read()
    proc.stderr.close()
    return err


class Raw:
    """A raw connection: send any bytes, read the server's messages one by one."""

    def __init__(self, port: int, timeout: float = 20.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.stream = self.sock.makefile("rwb")
        self.hello = protocol.read_message(self.stream)

    def send(self, data) -> None:
        self.stream.write(data if isinstance(data, bytes) else protocol.encode(data))
        self.stream.flush()

    def read(self):
        """The next message (None once the server closed the connection)."""
        try:
            return protocol.read_message(self.stream)
        except (ConnectionError, OSError):
            return None

    def log_in(self, token, job_id="h"):
        """Both login steps with ``token`` (requests ``h1``, ``h2``): the answer to the second, or the
        first's when it was not a challenge."""
        nonce = login_proofs.new_nonce()
        self.send(protocol.request(job_id + "1", "hello", {"nonce": nonce}))
        challenge = self.answer(job_id + "1")
        if challenge is None or challenge["event"] != "result":
            return challenge
        key = login_proofs.login_key(token, challenge["result"]["salt"])
        proof = login_proofs.login_proof(key, login_proofs.CLIENT_PROOF_LABEL, nonce, challenge["result"]["nonce"])
        self.send(protocol.request(job_id + "2", "hello", {"proof": proof}))
        return self.answer(job_id + "2")

    def answer(self, job_id):
        """The final event for ``job_id`` (None if the connection closed first)."""
        while True:
            message = self.read()
            if message is None or (message.get("id") == job_id and message.get("event") in protocol.FINAL_EVENTS):
                return message

    def close(self) -> None:
        try:
            self.stream.close()
            self.sock.close()
        except OSError:
            pass


def fake_login(conn, lines, token):
    """The server's side of the login on an accepted socket, for fake servers: hello, the challenge
    (with a true proof of ``token``), then the client's proof accepted unchecked."""
    conn.sendall(protocol.encode(protocol.event(None, "hello", protocol=protocol.PROTOCOL_VERSION, mode="tcp",
                                                auth=True)))
    first = lines.readline()
    nonce, server_nonce = protocol.decode(first)["params"]["nonce"], login_proofs.new_nonce()
    key = login_proofs.ServerKey(token)
    proof = login_proofs.login_proof(key.key, login_proofs.SERVER_PROOF_LABEL, nonce, server_nonce)
    conn.sendall(protocol.encode(protocol.event("h1", "result", result={"nonce": server_nonce, "salt": key.salt,
                                                                        "proof": proof})))
    lines.readline()
    conn.sendall(protocol.encode(protocol.event("h2", "result", result={"protocol": protocol.PROTOCOL_VERSION})))
