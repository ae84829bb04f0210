"""A TCP worker as a hostile or unlucky local user meets it: a real ``serve`` on 127.0.0.1 and
raw or second clients. Every user of a machine can reach its loopback address, so the server
must let nobody in without its token, hand out no files, and keep one client's patient data
from the next (PROTOCOL.md, "TCP mode and security")."""
from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest

from SAMFineTuneLib import login_proofs, protocol
from SAMFineTuneLib.client import BOOT, JobError, WorkerClient
from SAMFineTuneLib.volume_io import Volume, write_volume
from SAMFineTuneLib.worker import jobs
from SAMFineTuneLib.worker import server as server_module
from SAMFineTuneLib.worker import session as session_module
from SAMFineTuneLib.worker.core import WorkerCore
from SAMFineTuneLib.worker.session import Session
from worker_servers import LIB, Raw, in_process_servers, start_server, stop_server

TOKEN = "in-process-token-0123456789"


@pytest.fixture
def server(tmp_path):
    proc, _, port, token = start_server(tmp_path, "--auth-deadline", "3")
    yield proc, port, token
    stop_server(proc)


def wait_gone(proc, seconds=20.0) -> bool:
    try:
        proc.wait(timeout=seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


def serve_refused(*args, env_token=None):
    env = {k: v for k, v in os.environ.items() if k != "SAMFINETUNE_TOKEN"}
    if env_token is not None:
        env["SAMFINETUNE_TOKEN"] = env_token
    return subprocess.run([sys.executable, "-c", BOOT, "serve", "--port", "0", *args], capture_output=True, text=True,
                          timeout=30, cwd=str(LIB.parent), env=env)


def token_file(folder, text, mode=0o600, name="token"):
    path = folder / name
    path.write_text(text + "\n")
    os.chmod(path, mode)
    return str(path)


@pytest.fixture
def in_process(tmp_path):
    with in_process_servers(tmp_path, TOKEN) as start:
        yield start


def login(port):
    """The answer to the login on a new raw connection (None: closed before it came)."""
    raw = Raw(port, timeout=10)
    answer = raw.log_in(TOKEN)
    raw.close()
    return answer


# --- nobody in without the token ---------------------------------------------------------------


def test_serve_always_has_a_token_and_refuses_short_ones(server, tmp_path):
    proc, port, token = server
    assert token and len(token) >= 16  # generated and printed once, although no token was given
    with WorkerClient(address=("127.0.0.1", port)) as client:  # no token: refused
        with pytest.raises(JobError, match="authentication failed"):
            client.ping(timeout=30)
    with WorkerClient(address=("127.0.0.1", port), token=token) as client:
        assert client.ping(timeout=30)["pong"] is True
    short = token_file(tmp_path, "x")
    for args, env_token in ((("--token-file", short), None), (("--host", "0.0.0.0", "--token-file", short), None),
                            ((), "x")):
        out = serve_refused(*args, "--log", str(tmp_path / "r.log"), env_token=env_token)
        assert out.returncode == 2 and "use at least 16" in out.stderr and "listening" not in out.stdout


def test_the_token_never_travels_on_the_command_line(tmp_path):
    secret = "from-a-file-0123456789"
    for args, message in ((("--token", secret), "--token puts the token in the process list"),
                          (("--token-file", token_file(tmp_path, secret, 0o644, "shared")), "chmod 600"),
                          (("--token-file", str(tmp_path / "missing")), "cannot read --token-file"),
                          (("--token-file", token_file(tmp_path, "", name="empty")), "is empty")):
        out = serve_refused(*args, "--log", str(tmp_path / "r.log"))
        assert out.returncode == 2 and message in out.stderr and "listening" not in out.stdout
        assert len(out.stderr.strip().splitlines()) == 1
    proc, _, port, printed = start_server(tmp_path, "--token-file", token_file(tmp_path, secret))
    try:
        assert printed is None and secret not in " ".join(psutil.Process(proc.pid).cmdline())
        with WorkerClient(address=("127.0.0.1", port), token=secret) as client:
            assert client.ping(timeout=30)["pong"] is True
    finally:
        stop_server(proc)


def test_only_the_authenticated_owner_stops_the_server(server):
    proc, port, token = server
    for hello in (None, protocol.request("h", "hello"), protocol.request("h", "hello", {"token": "wrong" * 4})):
        raw = Raw(port)
        if hello is not None:
            raw.send(hello)
        raw.send(protocol.request("s", "shutdown", {"server": True}))
        while raw.read() is not None:  # refused, then closed
            pass
        raw.close()
    time.sleep(1.0)
    assert proc.poll() is None
    with WorkerClient(address=("127.0.0.1", port), token=token) as client:
        client.run("shutdown", {"server": True}, timeout=30)
    assert wait_gone(proc)


def test_a_silent_connection_blocks_nobody_and_is_cut_at_the_deadline(server):
    proc, port, token = server
    silent = Raw(port)  # connects, says nothing
    started = time.monotonic()
    with WorkerClient(address=("127.0.0.1", port), token=token) as client:
        assert client.ping(timeout=30)["pong"] is True
    assert time.monotonic() - started < 3.0  # not the 5 s 'busy' wait: the silent one holds no lock
    assert silent.read() is None and time.monotonic() - started < 10.0
    silent.close()


def test_any_message_but_a_good_hello_gets_one_error_and_the_connection_closes(in_process):
    port = in_process()  # the second login step's failures: test_server_login.py
    ping = protocol.encode(protocol.request("p", "ping"))
    token = protocol.encode(protocol.request("h", "hello", {"token": TOKEN}))
    good = protocol.encode(protocol.request("h1", "hello", {"nonce": login_proofs.new_nonce()}))
    for first, kind in ((b"{}\n" * 1000, "ProtocolError"), (ping, "ProtocolError"), (token, "ProtocolError")):
        raw = Raw(port, timeout=10)
        raw.send(first + good)  # a second try comes too late; the token itself logs nobody in
        messages = iter(raw.read, None)
        assert [(m["event"], m.get("kind")) for m in messages] == [("error", kind)]
        raw.close()
    assert login(port)["event"] == "result"


def test_connections_that_never_read_lock_nobody_out(in_process):
    port = in_process()  # a login deadline far beyond this test
    stalled = [socket.create_connection(("127.0.0.1", port), timeout=10)
               for _ in range(server_module.MAX_UNAUTHENTICATED)]
    for sock in stalled:
        with contextlib.suppress(OSError):  # the server may already have closed it
            sock.sendall(b"{}\n" * 2000)  # parses, fails check_request; never reads a reply
    admitted, deadline = None, time.monotonic() + 5.0
    while admitted is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError):  # while every place is taken, a new connection is closed at once
            admitted = login(port)
        time.sleep(0.05)
    assert admitted is not None and admitted["event"] == "result"
    for sock in stalled:
        sock.close()


def test_the_login_deadline_cuts_a_connection_whose_writes_are_stuck():
    ours, peer = socket.socketpair()
    with ours, peer:
        session = Session(WorkerCore(), ours.makefile("rb"), ours.makefile("wb"), files=False, need_hello=True)
        with session.write_lock:  # a write blocked on a peer that reads nothing holds it
            expire = threading.Thread(target=server_module._expire, args=(session, ours, 1.0), daemon=True)
            expire.start()
            expire.join(5)
            assert not expire.is_alive()
        peer.settimeout(5)
        assert peer.recv(10) == b""  # shut down


def test_writes_time_out_until_login_and_silent_peers_are_probed(in_process, monkeypatch):
    accepted = []
    keep_alive = server_module._keep_alive
    monkeypatch.setattr(server_module, "_keep_alive", lambda conn: (accepted.append(conn), keep_alive(conn)))
    port = in_process(auth_deadline=7.0)
    raw = Raw(port, timeout=10)
    assert len(accepted) == 1 and accepted[0].gettimeout() == 7.0
    assert accepted[0].getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    if hasattr(socket, "TCP_KEEPIDLE"):
        assert accepted[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == server_module.KEEPALIVE_IDLE_S
    assert raw.log_in(TOKEN)["event"] == "result"
    assert accepted[0].gettimeout() is None  # a logged-in client may read late
    raw.close()


def test_the_next_client_waits_until_the_previous_clients_job_has_ended(in_process, monkeypatch):
    release, started = threading.Event(), threading.Event()

    def stubborn(core, job):  # a step that never asks whether it was cancelled
        started.set()
        release.wait(30)
        return {}, None

    monkeypatch.setitem(jobs.HANDLERS, "echo", stubborn)
    monkeypatch.setattr(session_module, "JOB_STOP_WAIT_S", 0.2)
    monkeypatch.setattr(server_module, "BUSY_WAIT_S", 0.2)
    port = in_process()
    try:
        first = Raw(port, timeout=10)
        assert first.log_in(TOKEN)["event"] == "result"
        first.send(protocol.request("job", "echo"))
        assert started.wait(10)
        first.close()
        for _ in range(5):  # well past the ending conversation's wait for its job
            time.sleep(0.3)
            answer = login(port)
            assert answer["event"] == "error" and "server busy" in answer["error"]
    finally:
        release.set()
    for _ in range(50):  # the lock is free once the job's thread has ended
        if (answer := login(port))["event"] == "result":
            break
    assert answer["event"] == "result"


def settled_rss(pid, still_bytes=8 << 20, wait_s=60.0):
    """The process's resident memory once it stops growing: a server imports the engine (torch) in
    the background after it starts listening, hundreds of MB that are no attachment's."""
    deadline, before = time.monotonic() + wait_s, psutil.Process(pid).memory_info().rss
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = psutil.Process(pid).memory_info().rss
        if abs(now - before) < still_bytes:
            return now
        before = now
    return before


def test_no_attachment_before_authentication_and_a_cap_after(tmp_path):
    proc, _, port, token = start_server(tmp_path, "--max-upload-mb", "1")
    try:
        rss = settled_rss(proc.pid)
        raw = Raw(port, timeout=10)
        huge = {"a": {"dtype": "|u1", "shape": [1 << 30], "nbytes": 1 << 30}}
        raw.send(dict(protocol.request("e", "echo"), arrays=huge))
        answer = raw.read()
        assert answer["event"] == "error" and "refused before authentication" in answer["error"]
        assert raw.read() is None  # and the connection is closed
        assert psutil.Process(proc.pid).memory_info().rss - rss < 200 << 20
        raw.close()
        raw = Raw(port, timeout=10)
        assert raw.log_in(token)["event"] == "result"
        two_mb = {"a": {"dtype": "|u1", "shape": [2 << 20], "nbytes": 2 << 20}}
        raw.send(dict(protocol.request("e", "echo"), arrays=two_mb))
        answer = raw.answer(None)
        assert answer["event"] == "error" and "over this connection's limit" in answer["error"]
        raw.close()
    finally:
        stop_server(proc)


def test_a_malformed_hello_never_puts_the_token_in_a_log(tmp_path):
    proc, _, port, token = start_server(tmp_path, log_name="logs/s.log")
    try:
        raw = Raw(port)
        secret = "LEAKCHECK-0123456789abcdef"
        raw.send(b'{"v": %d, "id": "h", "command": "hello", "params": {"token": "' % protocol.PROTOCOL_VERSION
                 + secret.encode() + b'"}\n')
        answer = raw.read()
        assert answer["event"] == "error" and "malformed" in answer["error"] and secret not in answer["error"]
        raw.close()
        time.sleep(0.5)
    finally:
        stderr = stop_server(proc)
    log_text = (tmp_path / "logs" / "s.log").read_text()
    assert "refused before authentication" in log_text
    assert "LEAKCHECK" not in log_text and "LEAKCHECK" not in stderr and (token or "LEAKCHECK") not in log_text + stderr
    if os.name != "nt":
        assert stat.S_IMODE(os.stat(tmp_path / "logs" / "s.log").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(tmp_path / "logs").st_mode) == 0o700


def test_an_over_long_line_before_hello_closes_the_connection(server):
    proc, port, token = server
    raw = Raw(port)
    raw.send(b"{" + b" " * (1 << 20))  # far over the limit on a line before 'hello', far under a message's
    answer = raw.read()
    assert answer["event"] == "error" and "longer than" in answer["error"]
    assert raw.read() is None
    raw.close()


# --- no files on the server ----------------------------------------------------------------


def _secret_volume(folder):
    folder.mkdir(exist_ok=True)
    path = folder / "patient.nii.gz"
    write_volume(Volume(np.arange(4 * 8 * 8, dtype=np.int16).reshape(4, 8, 8)), str(path))
    return path


def test_tcp_clients_name_no_server_side_paths(server, tmp_path):
    proc, port, token = server
    secret = _secret_volume(tmp_path / "private")
    stolen = tmp_path / "stolen"
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with WorkerClient(address=("127.0.0.1", port), token=token) as client:
        with pytest.raises(JobError, match="PermissionError: 'output_dir': this server takes no file paths"):
            client.run("export", {"cases": [{"id": "a", "image_path": str(secret), "label_path": str(secret)}],
                                  "output_dir": str(stolen)}, timeout=60)
        with pytest.raises(JobError, match="PermissionError"):
            client.run("export", {"cases": [{"id": "a", "image": "i", "label": "i"}], "output_dir": "x"},
                       {"i": np.ones((2, 4, 4), np.uint8)}, timeout=60)
        with pytest.raises(JobError, match="PermissionError: 'dataset'"):
            client.run("train", {"dataset": str(tmp_path), "output": str(tmp_path / "adapter")}, timeout=60)
        with pytest.raises(JobError, match="PermissionError: 'dataset'"):
            client.run("evaluate", {"dataset": str(tmp_path)}, timeout=60)
        answers = []
        for path in (secret, tmp_path / "nothing-here.pth"):  # one exists, one does not: the same answer
            with pytest.raises(JobError) as caught:
                client.run("load_model", {"checkpoint": str(path), "device": "cpu"}, timeout=60)
            answers.append(str(caught.value))
        assert answers[0] == answers[1] and "PermissionError" in answers[0]
        assert client.ping(timeout=30)["pong"] is True
    assert not stolen.exists() and (tmp_path / "adapter" / "adapter_config.json").read_text() == "{}"


def test_a_data_root_allows_paths_inside_it_only(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    proc, _, port, token = start_server(tmp_path, "--data-root", str(root))
    image = np.random.default_rng(0).integers(0, 100, (3, 16, 16)).astype(np.int16)
    label = np.zeros_like(image, dtype=np.uint8)
    label[1, 4:9, 4:9] = 1
    cases = [{"id": "c0", "image": "img", "label": "lab"}]
    try:
        with WorkerClient(address=("127.0.0.1", port), token=token) as client:
            result, _ = client.run("export", {"cases": cases, "output_dir": "ds", "val_fraction": 0.0},
                                   {"img": image, "lab": label}, timeout=120)
            assert result["summary"]["dataset"] == str((root / "ds").resolve())
            assert (root / "ds" / "dataset.json").is_file()
            for bad in ("../outside/ds", str(outside / "ds"), "link/ds"):
                with pytest.raises(JobError, match="is not inside the server's data root"):
                    client.run("export", {"cases": cases, "output_dir": bad}, {"img": image, "lab": label}, timeout=60)
            with pytest.raises(JobError, match="checkpoint file not found"):  # inside the root: plain answers
                client.run("load_model", {"checkpoint": "missing.pth", "device": "cpu"}, timeout=60)
        assert os.listdir(outside) == []
    finally:
        stop_server(proc)


# --- nothing of one client for the next ------------------------------------------------------


def test_a_later_connection_sees_no_volume_of_an_earlier_one(server):
    proc, port, token = server
    volume = np.random.default_rng(1).integers(0, 500, (3, 24, 24)).astype(np.int16)
    params = {"box": [2, 2, 0, 20, 20, 2], "volume_key": "patient-A", "model": "no-such-model"}
    with WorkerClient(address=("127.0.0.1", port), token=token) as first:
        with pytest.raises(JobError, match="unknown model"):  # the volume is kept, the model fails to load
            first.run("segment", params, {"volume": volume}, timeout=120)
        assert first.info(timeout=120)["volumes"] == ["patient-A"]
    with WorkerClient(address=("127.0.0.1", port), token=token) as second:
        assert second.info(timeout=120)["volumes"] == []
        with pytest.raises(JobError, match="holds no volume 'patient-A'"):
            second.run("reprompt", {"volume_key": "patient-A", "box": [2, 2, 0, 20, 20, 2]}, timeout=120)


@pytest.mark.slow
def test_embeddings_of_one_client_do_not_answer_the_next(server):
    pytest.importorskip("torch")
    proc, port, token = server
    rng = np.random.default_rng(2)
    volume = rng.integers(-200, 300, (2, 48, 48)).astype(np.int16)
    volume[:, 16:32, 16:32] += 400
    params = {"box": [12, 12, 0, 36, 36, 1], "box_mode": "fixed", "device": "cpu"}
    with WorkerClient(address=("127.0.0.1", port), token=token) as first:
        result, _ = first.run("segment", params, {"volume": volume}, timeout=600)
        assert result["stats"]["encoded"] == 2
        again, _ = first.run("segment", params, {"volume": volume}, timeout=600)
        assert again["stats"]["encoded"] == 0  # within one connection the cache works
    with WorkerClient(address=("127.0.0.1", port), token=token) as second:
        result, _ = second.run("segment", params, {"volume": volume}, timeout=600)
        assert result["stats"]["encoded"] == 2 and result["stats"]["cache_hits"] == 0
