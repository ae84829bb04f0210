"""A TCP worker as a hostile or unlucky local user meets it: a real ``serve`` on 127.0.0.1 and
raw or second clients. Every user of a machine can reach its loopback address, so the server
must let nobody in without its token, hand out no files, and keep one client's patient data
from the next (PROTOCOL.md, "TCP mode and security")."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from SAMFineTuneLib import protocol
from SAMFineTuneLib.client import BOOT, JobError, WorkerClient
from SAMFineTuneLib.volume_io import Volume, write_volume
from worker_servers import LIB, Raw, start_server, stop_server


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


def serve_refused(*args):
    env = {k: v for k, v in os.environ.items() if k != "SAMFINETUNE_TOKEN"}
    return subprocess.run([sys.executable, "-c", BOOT, "serve", "--port", "0", *args], capture_output=True, text=True,
                          timeout=30, cwd=str(LIB.parent), env=env)


# --- nobody in without the token ---------------------------------------------------------------


def test_serve_always_has_a_token_and_refuses_short_ones(server, tmp_path):
    proc, port, token = server
    assert token and len(token) >= 16  # generated and printed once, although no token was given
    with WorkerClient(address=("127.0.0.1", port)) as client:  # no token: refused
        with pytest.raises(JobError, match="authentication failed"):
            client.ping(timeout=30)
    with WorkerClient(address=("127.0.0.1", port), token=token) as client:
        assert client.ping(timeout=30)["pong"] is True
    for args in (("--token", "x"), ("--host", "0.0.0.0", "--token", "x")):
        out = serve_refused(*args, "--log", str(tmp_path / "r.log"))
        assert out.returncode == 2 and "use at least 16" in out.stderr and "listening" not in out.stdout


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
    error = silent.read()
    assert error["event"] == "error" and "no 'hello' with the token within 3 s" in error["error"]
    assert silent.read() is None and time.monotonic() - started < 10.0
    silent.close()


def test_no_attachment_before_authentication_and_a_cap_after(tmp_path):
    proc, _, port, token = start_server(tmp_path, "--max-upload-mb", "1")
    try:
        rss = psutil.Process(proc.pid).memory_info().rss
        raw = Raw(port, timeout=10)
        huge = {"a": {"dtype": "|u1", "shape": [1 << 30], "nbytes": 1 << 30}}
        raw.send(dict(protocol.request("e", "echo"), arrays=huge))
        answer = raw.read()
        assert answer["event"] == "error" and "refused before authentication" in answer["error"]
        assert raw.read() is None  # and the connection is closed
        assert psutil.Process(proc.pid).memory_info().rss - rss < 200 << 20
        raw.close()
        raw = Raw(port, timeout=10)
        raw.send(protocol.request("h", "hello", {"token": token}))
        assert raw.answer("h")["event"] == "result"
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
