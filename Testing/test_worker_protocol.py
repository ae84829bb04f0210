"""The worker's protocol, process handling, cancel, crash recovery and TCP mode (no model needed).

Uses the worker's diagnostic ``echo`` job (sends params and arrays back, optionally waits,
cancellably), so these tests take seconds. Model-backed tests are in test_worker_engine.py.
"""
from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pytest

from SAMFineTuneLib import protocol
from SAMFineTuneLib.client import BOOT, JobCancelled, JobError, WorkerClient, WorkerCrashed
from SAMFineTuneLib.protocol import PROTOCOL_VERSION, ProtocolError
from SAMFineTuneLib.worker import is_loopback
from worker_servers import ENV, LIB, Raw, start_server, stop_server



def patched_worker(log_path, patch: str):
    """A worker command that runs ``patch`` (Python, with ``w`` = the worker module) before serving."""
    code = f"import sys\nimport SAMFineTuneLib.worker as w\n{patch}\nsys.exit(w.main_argv())"
    return [sys.executable, "-c", code, "worker", "--log", str(log_path)]


def wait_for(predicate, client, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        client.poll(timeout=0.05)


@pytest.fixture
def client(tmp_path):
    c = WorkerClient(log_path=str(tmp_path / "worker.log"), env=ENV)
    yield c
    c.shutdown()


# --- the wire format -----------------------------------------------------------------------


def test_encode_decode_round_trip_and_errors():
    message = protocol.request("j1", "segment", {"box": [1, 2, 3, 4, 5, 6], "value": np.float32(0.5)})
    line = protocol.encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    back = protocol.decode(line)
    assert back["v"] == PROTOCOL_VERSION and back["params"] == {"box": [1, 2, 3, 4, 5, 6], "value": 0.5}
    protocol.check_request(back)
    assert json.loads(protocol.encode({"dice": float("nan")}))["dice"] is None  # strict JSON on the wire
    with pytest.raises(ProtocolError, match="malformed"):
        protocol.decode(b"{not json")
    with pytest.raises(ProtocolError, match="JSON object"):
        protocol.decode(b"[1, 2]")
    with pytest.raises(ProtocolError, match="version mismatch.*v=99"):
        protocol.check_request(dict(back, v=99))
    with pytest.raises(ProtocolError, match="unknown command 'fly'"):
        protocol.check_request(dict(back, command="fly"))
    with pytest.raises(TypeError, match="inline"):
        protocol.encode({"big": np.zeros(1000)})


def test_arrays_by_stream_and_file_round_trip(tmp_path):
    volume = np.random.default_rng(0).normal(size=(5, 7, 9)).astype(np.float32)
    mask = np.zeros((20, 30, 40), np.uint8)
    mask[3:6, 10:12, 5:9] = 1
    stream = io.BytesIO()
    protocol.write_message(stream, protocol.event("j1", "result"), {"volume": volume, "mask": mask}, crop_masks=True)
    protocol.write_message(stream, protocol.event("j2", "progress"))
    stream.seek(0)
    first = protocol.read_message(stream)
    assert first["arrays"]["mask"]["shape"] == [3, 2, 4]  # the mask travelled as its bounding box
    arrays = protocol.load_arrays(first["arrays"])
    assert np.array_equal(arrays["volume"], volume) and arrays["volume"].dtype == np.float32
    assert np.array_equal(arrays["mask"], mask)
    assert protocol.read_message(stream)["id"] == "j2"  # the stream stayed in step
    assert protocol.read_message(stream) is None

    stream = io.BytesIO()
    protocol.write_message(stream, protocol.event("j3", "result"), {"mask": mask}, folder=tmp_path)
    ref = protocol.decode(stream.getvalue())["arrays"]["mask"]
    assert os.path.isfile(ref["path"]) and np.array_equal(protocol.load_arrays({"mask": ref})["mask"], mask)
    with pytest.raises(ProtocolError, match="refused"):
        protocol.load_arrays({"mask": ref}, allow_files=False)
    os.remove(ref["path"])
    with pytest.raises(ProtocolError, match="file not found"):
        protocol.load_arrays({"mask": ref})


def test_crop_to_content_edge_cases():
    empty = np.zeros((4, 5, 6), np.uint8)
    block, crop = protocol.crop_to_content(empty)
    assert block.size == 0 and crop["shape"] == [4, 5, 6]
    full = np.ones((4, 5, 6), np.uint8)
    assert protocol.crop_to_content(full)[1] is None
    assert np.array_equal(protocol.load_arrays({"m": {"data": block, "crop": crop}})["m"], empty)


def test_truncated_attachment_is_a_protocol_error():
    stream = io.BytesIO(protocol.encode({"id": "x", "arrays": {"a": {"dtype": "<f4", "shape": [4], "nbytes": 16}}})
                        + b"\0" * 8)
    with pytest.raises(ProtocolError, match="stream ended inside array 'a'"):
        protocol.read_message(stream)


_BAD_LINES = {
    "nested JSON": b"[" * 60000 + b"\n",
    "an integer of 5000 digits": b'{"v":4,"id":"a","command":"ping","params":{"x":' + b"1" * 5000 + b"}}\n",
}


@pytest.mark.parametrize("name", sorted(_BAD_LINES))
def test_any_unreadable_line_is_a_one_line_protocol_error_and_the_reader_goes_on(name):
    line = _BAD_LINES[name]
    with pytest.raises(ProtocolError, match="malformed message") as caught:
        protocol.decode(line)
    assert "\n" not in str(caught.value) and not caught.value.fatal
    stream = io.BytesIO(line + protocol.encode(protocol.request("p", "ping")))
    with pytest.raises(ProtocolError):
        protocol.read_message(stream, max_line=protocol.HELLO_MAX_BYTES, attachments=False)
    assert protocol.read_message(stream)["id"] == "p"


_BAD_REFS = {
    "a shape whose int64 byte count overflows to 0": ({"dtype": "|u1", "shape": [2**32, 2**32]}, 0),
    "a shape element over int64": ({"dtype": "|u1", "shape": [2**64]}, 0),
    "a huge element beside a zero": ({"dtype": "|u1", "shape": [2**62, 2**62, 0]}, 0),
    "a zero-itemsize dtype": ({"dtype": "|V0", "shape": [4]}, 0),
    "a subarray dtype": ({"dtype": "(2,)<f4", "shape": [1]}, 8),
    "a record dtype": ({"dtype": [["a", "<f4"]], "shape": [2]}, 8),
    "a string dtype": ({"dtype": "<U2", "shape": [1]}, 8),
    "an unparsable dtype": ({"dtype": "(((", "shape": [1]}, 1),
    "too many dimensions": ({"dtype": "|u1", "shape": [1] * 70}, 1),
    "a float shape": ({"dtype": "|u1", "shape": [1.5]}, 1),
}


@pytest.mark.parametrize("name", sorted(_BAD_REFS))
def test_an_attachment_numpy_cannot_make_is_a_protocol_error_and_the_stream_stays_in_step(name):
    ref, nbytes = _BAD_REFS[name]
    line = protocol.encode({"id": "a", "arrays": {"x": dict(ref, nbytes=nbytes)}})
    stream = io.BytesIO(line + b"\0" * nbytes + protocol.encode(protocol.request("p", "ping")))
    with pytest.raises(ProtocolError, match="array 'x'") as caught:
        protocol.read_message(stream)
    assert not caught.value.fatal and "\n" not in str(caught.value)
    assert protocol.read_message(stream)["id"] == "p"


def test_arrays_that_cannot_travel_are_refused_when_sent():
    with pytest.raises(ProtocolError, match="cannot travel"):
        protocol.write_message(io.BytesIO(), protocol.event("j", "result"), {"names": np.array(["a", "b"])})


@pytest.mark.parametrize("crop, why", [
    ({"offset": [3, 0], "shape": [4, 4]}, "does not fit"),
    ({"offset": [-1, 0], "shape": [4, 4]}, "non-negative integers"),
    ({"offset": [0], "shape": [4]}, "2 non-negative integers"),
    ({"offset": [0, 0], "shape": [10**6, 10**6]}, "bytes left of this connection.s limit"),
    ({"offset": [0, 0], "shape": [2**70, 0]}, "non-negative integers"),
    ([0, 0], "crop must be"),
])
def test_a_crop_must_hold_its_block_and_stay_in_bounds(crop, why):
    block = np.ones((2, 2), np.uint8)
    with pytest.raises(ProtocolError, match=why):
        protocol.load_arrays({"m": {"data": block, "crop": crop}})


def test_a_crop_is_bounded_by_the_connections_own_limit():
    """A 4-byte block may not stand for an array larger than the connection would accept uncropped."""
    block, crop = np.ones((2, 2), np.uint8), {"offset": [0, 0], "shape": [1024, 1024]}
    assert protocol.load_arrays({"m": {"data": block, "crop": crop}}, max_bytes=1 << 20)["m"].shape == (1024, 1024)
    with pytest.raises(ProtocolError, match="over the 1048575 bytes left of this connection's limit"):
        protocol.load_arrays({"m": {"data": block, "crop": crop}}, max_bytes=(1 << 20) - 1)


def test_array_data_comes_only_from_attachments_or_files():
    with pytest.raises(ProtocolError, match="neither 'path' nor 'nbytes'"):
        protocol.load_arrays({"m": {"dtype": "<f4", "shape": [2], "data": [1.0, 2.0]}})
    with pytest.raises(ProtocolError, match="must be a JSON object"):
        protocol.load_arrays([{"data": 1}])


def test_lib_files_parse_as_python_310_and_client_needs_no_torch():
    for path in LIB.rglob("*.py"):
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 10))
    code = "import sys, SAMFineTuneLib.client; bad = {'torch', 'qt', 'slicer', 'vtk'} & set(sys.modules); print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "set()"


# --- a raw worker: bad input gives an error event and the worker keeps serving ------------------


@contextlib.contextmanager
def raw_worker(tmp_path):
    """A stdio worker spoken to byte for byte; it must stop by itself at stdin EOF."""
    proc = subprocess.Popen([sys.executable, "-c", BOOT, "worker", "--log", str(tmp_path / "w.log")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=dict(os.environ, **ENV),
                            cwd=str(LIB.parent))
    try:
        assert protocol.read_message(proc.stdout)["event"] == "hello"
        yield proc
    finally:
        proc.stdin.close()  # stdin EOF: the worker stops by itself
        assert proc.wait(timeout=20) == 0
        proc.stdout.close()


def test_worker_answers_bad_requests_with_clear_errors_and_keeps_serving(tmp_path):
    with raw_worker(tmp_path) as proc:

        def ask(line: bytes):
            proc.stdin.write(line if line.endswith(b"\n") else line + b"\n")
            proc.stdin.flush()
            while True:
                message = protocol.read_message(proc.stdout)
                if message["event"] not in ("accepted", "started", "progress"):
                    return message

        missing = {"a": {"dtype": "<f4", "shape": [3], "path": str(tmp_path / "nowhere.npy")}}
        np.save(tmp_path / "a.npy", np.zeros(3, np.float32))
        present = {"a": {"dtype": "<f4", "shape": [3], "path": str(tmp_path / "a.npy")}}
        (tmp_path / "a_file").write_text("not a folder")
        unwritable = str(tmp_path / "a_file" / "job")  # the result's arrays cannot be written there
        cases = [
            (b"this is not json", None, "malformed"),
            (b'["a list"]', None, "JSON object"),
            (protocol.encode(protocol.request("r1", "teleport")), "r1", "unknown command 'teleport'"),
            (protocol.encode(dict(protocol.request("r2", "ping"), v=99)), "r2", "protocol version mismatch"),
            (protocol.encode(dict(protocol.request("r3", "echo"), arrays=missing)), "r3", "file not found"),
            (protocol.encode(protocol.request("r4", "load_model", {"checkpoint": str(tmp_path / "sam.pth")})),
             "r4", "checkpoint file not found"),
            (protocol.encode(protocol.request("r5", "echo", {"secnds": 1})), "r5", "unknown parameter.*secnds"),
            (protocol.encode(protocol.request("r6", "reprompt", {"box": [0] * 6})), "r6", "holds no volume"),
            (protocol.encode(dict(protocol.request("r7", "echo"), arrays=present, job_dir=unwritable)), "r7",
             "NotADirectoryError|FileExistsError"),
        ]
        for line, job_id, pattern in cases:
            answer = ask(line)
            assert answer["event"] == "error" and answer["id"] == job_id, answer
            assert re.search(pattern, answer["error"]), answer["error"]
            assert "traceback" not in answer  # bad input: one line, no traceback
        pong = ask(protocol.encode(protocol.request("r9", "ping")))
        assert pong["event"] == "result" and pong["result"]["pong"] is True


def test_an_over_long_line_is_one_error_and_its_tail_is_no_message(tmp_path):
    with raw_worker(tmp_path) as proc:
        tail = protocol.encode(protocol.request("tail", "ping"))[:-1]  # would parse, were the line cut
        proc.stdin.write(b" " * (protocol.MAX_LINE_BYTES + 10) + tail + b"\n")
        proc.stdin.write(protocol.encode(protocol.request("p", "ping")))
        proc.stdin.flush()
        first, second = protocol.read_message(proc.stdout), protocol.read_message(proc.stdout)
        assert first["event"] == "error" and first["id"] is None and "longer than" in first["error"]
        assert second["id"] == "p" and second["event"] == "result"


def test_the_worker_log_is_private(tmp_path):
    log_path = tmp_path / "logs" / "worker.log"
    with WorkerClient(log_path=str(log_path), env=ENV) as client:
        client.ping(timeout=60)
    if os.name != "nt":
        assert stat.S_IMODE(os.stat(log_path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(log_path.parent).st_mode) == 0o700


def test_a_worker_start_deletes_job_folders_whose_owner_died(tmp_path):
    """A client killed mid-job leaves its job folder (patient arrays) in the temp folder."""
    script = textwrap.dedent(f"""
        import sys, time
        import numpy as np
        from SAMFineTuneLib.client import WorkerClient
        client = WorkerClient(log_path={str(tmp_path / "a.log")!r})
        job = client.submit("echo", {{"seconds": 60}}, {{"volume": np.ones((4, 8, 8), np.int16)}})
        while job.state != "running":
            client.poll(timeout=0.05)
        print(client._res.folder, flush=True)
        time.sleep(600)
    """)
    doomed = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(LIB.parent), **ENV))
    folder = doomed.stdout.readline().strip()
    doomed.kill()
    doomed.wait(timeout=20)
    doomed.stdout.close()
    assert os.listdir(folder)  # its job's arrays are still there
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    kept = tempfile.mkdtemp(prefix=f"samft-jobs-{alive.pid}-")  # its owner still runs
    try:
        with WorkerClient(log_path=str(tmp_path / "b.log"), env=ENV) as client:
            client.ping(timeout=60)
            deadline = time.monotonic() + 20
            while os.path.exists(folder):
                assert time.monotonic() < deadline, f"{folder} is still there"
                time.sleep(0.1)
        assert os.path.isdir(kept)
    finally:
        alive.kill()
        alive.wait()
        shutil.rmtree(kept, ignore_errors=True)


def test_library_chatter_goes_to_the_log_not_the_protocol(tmp_path):
    log_path = tmp_path / "w.log"
    noisy = ("orig = w.jobs.HANDLERS['echo']\n"
             "def noisy(core, job):\n"
             "    import os, warnings\n"
             "    print('PY-CHATTER'); os.write(1, b'C-LEVEL-CHATTER\\n'); warnings.warn('WARN-CHATTER')\n"
             "    return orig(core, job)\n"
             "w.jobs.HANDLERS['echo'] = noisy")
    with WorkerClient(log_path=str(log_path), command=patched_worker(log_path, noisy), env=ENV) as client:
        result, arrays = client.run("echo", {"data": [1, 2]}, {"x": np.arange(5)}, timeout=60)
        assert result["params"]["data"] == [1, 2] and np.array_equal(arrays["x"], np.arange(5))
    text = log_path.read_text()
    for word in ("PY-CHATTER", "C-LEVEL-CHATTER", "WARN-CHATTER"):
        assert word in text


# --- the client over a local worker ----------------------------------------------------------


def test_client_round_trip_job_states_and_events(client):
    volume = np.random.default_rng(1).integers(-1000, 1000, size=(6, 32, 32)).astype(np.int16)
    events = []
    job = client.submit("echo", {"seconds": 0.3, "data": {"note": "hi"}}, {"volume": volume})
    job.on_event = events.append
    assert job.state == "queued"
    started = time.perf_counter()
    handled = client.poll()  # never blocks
    assert time.perf_counter() - started < 0.05 and handled >= 0
    result, arrays = client.wait(job, timeout=60)
    assert job.state == "done" and job.progress == 1.0
    assert result["params"]["data"] == {"note": "hi"}
    assert np.array_equal(arrays["volume"], volume) and arrays["volume"].dtype == np.int16
    names = [e["event"] for e in events]
    assert "progress" in names and names[-1] == "result"
    assert not os.path.exists(job.folder)  # the job folder is cleaned up
    info = client.info()
    assert info["protocol"] == PROTOCOL_VERSION and info["pid"] == client.worker_pid
    assert "torch" in info and "memory" in info and info["log"] == client.log_path


def test_queue_runs_in_order_and_a_queued_job_can_be_cancelled(client):
    jobs = [client.submit("echo", {"seconds": 0.5, "data": n}) for n in range(3)]
    client.cancel(jobs[1])
    for job in (jobs[0], jobs[2]):
        client.wait(job, timeout=60)
    wait_for(lambda: jobs[1].done, client)
    assert [j.state for j in jobs] == ["done", "cancelled", "done"]
    assert [j.result["params"]["data"] for j in (jobs[0], jobs[2])] == [0, 2]  # results tied to request ids
    with pytest.raises(JobCancelled):
        client.wait(jobs[1])


def test_cancel_running_job_is_prompt_and_worker_stays_usable(client):
    job = client.submit("echo", {"seconds": 120})
    wait_for(lambda: job.state == "running", client)
    pid = client.worker_pid
    started = time.monotonic()
    client.cancel(job)
    wait_for(lambda: job.done, client, timeout=10)
    assert job.state == "cancelled" and time.monotonic() - started < 2.0
    assert client.ping()["pong"] and client.worker_pid == pid and client.starts == 1


def test_wait_cancels_the_job_once_the_callers_cancel_says_so(client):
    """A blocking caller (Slicer's in-process-style backend) passes its cancel check to wait."""
    job = client.submit("echo", {"seconds": 120})
    asked = []

    def cancel():
        asked.append(job.state)
        return job.state == "running"

    started = time.monotonic()
    with pytest.raises(JobCancelled):
        client.wait(job, timeout=60, cancel=cancel)
    assert job.state == "cancelled" and time.monotonic() - started < 10.0 and "running" in asked
    result, _ = client.run("echo", {"data": 1}, timeout=60, cancel=lambda: False)
    assert result["params"]["data"] == 1 and client.starts == 1


def test_late_result_of_cancelled_job_is_dropped(client):
    job = client.submit("echo", {"seconds": 0.2})
    job.cancel_requested = True  # as if the cancel crossed the result on the wire
    wait_for(lambda: job.done, client)
    assert job.state == "cancelled" and job.result is None and job.arrays == {}


def test_kill_9_mid_job_reports_crash_and_next_job_gets_a_fresh_worker(client):
    job = client.submit("echo", {"seconds": 120})
    wait_for(lambda: job.state == "running", client)
    old_pid = client.worker_pid
    os.kill(old_pid, signal.SIGKILL)
    with pytest.raises(WorkerCrashed, match="SIGKILL"):
        client.wait(job, timeout=20)
    assert job.state == "error" and "WorkerCrashed" in job.error and client.log_path in job.error
    assert client.run("echo", {"data": "again"}, timeout=60)[0]["params"]["data"] == "again"
    assert client.worker_pid != old_pid and client.starts == 2


def test_worker_that_cannot_start_is_a_clear_error(tmp_path):
    command = [sys.executable, "-c",
               "import sys; sys.stderr.write('ModuleNotFoundError: no torch here\\n'); sys.exit(3)"]
    with WorkerClient(log_path=str(tmp_path / "w.log"), command=command) as client:
        with pytest.raises(WorkerCrashed, match=r"(?s)exited with code 3 before it was ready.*no torch here"):
            client.ping(timeout=30)


def test_protocol_version_mismatch_is_a_clear_error(tmp_path):
    log_path = tmp_path / "w.log"
    patch = "import SAMFineTuneLib.protocol as p\np.PROTOCOL_VERSION = w.PROTOCOL_VERSION = 99"
    with WorkerClient(log_path=str(log_path), command=patched_worker(log_path, patch)) as client:
        with pytest.raises(JobError, match="protocol version mismatch: the worker speaks v99"):
            client.ping(timeout=30)


def test_job_that_ignores_cancel_gets_its_worker_restarted(tmp_path):
    log_path = tmp_path / "w.log"
    stubborn = "import time\nw.jobs.HANDLERS['echo'] = lambda core, job: (job.progress(0, 1, 'stuck'), time.sleep(600))"
    with WorkerClient(log_path=str(log_path), command=patched_worker(log_path, stubborn), cancel_grace=1.0) as client:
        job = client.submit("echo")
        wait_for(lambda: job.state == "running" and job.message == "stuck", client)
        pid = client.worker_pid
        client.cancel(job)
        wait_for(lambda: job.done, client, timeout=10)
        assert job.state == "cancelled" and not client.connected
        assert not _alive(pid)


def test_shutdown_stops_the_worker_and_removes_job_folders(tmp_path):
    client = WorkerClient(log_path=str(tmp_path / "w.log"), env=ENV)
    client.run("echo", {}, {"a": np.ones(3)}, timeout=60)
    pid, folder = client.worker_pid, client._res.folder
    assert os.path.isdir(folder)
    client.shutdown()
    assert not _alive(pid) and not os.path.exists(folder)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- TCP mode ------------------------------------------------------------------------------


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("no.such.host.invalid")


def test_tcp_binds_loopback_by_default_and_serves_arrays(tmp_path):
    proc, host, port, token = start_server(tmp_path)
    try:
        assert host == "127.0.0.1" and len(token) >= 16  # a token even on loopback, generated and printed
        import psutil

        listening = [c.laddr for c in psutil.Process(proc.pid).net_connections() if c.status == psutil.CONN_LISTEN]
        assert [(a.ip, a.port) for a in listening] == [("127.0.0.1", port)]
        mask = np.zeros((8, 16, 16), np.uint8)
        mask[2:4, 3:9, 5:7] = 1
        with WorkerClient(address=f"127.0.0.1:{port}", token=token) as client:
            result, arrays = client.run("echo", {"data": 7}, {"mask": mask, "f": np.eye(3)}, timeout=60)
            assert result["params"]["data"] == 7 and result["arrays"]["mask"][1] == [8, 16, 16]
            assert np.array_equal(arrays["mask"], mask) and np.array_equal(arrays["f"], np.eye(3))
            assert client.info()["pid"] == proc.pid
        # A file reference would let a remote client read the server's files: refused.
        raw = Raw(port)
        assert raw.hello["event"] == "hello" and raw.log_in(token)["event"] == "result"
        outside = {"a": {"dtype": "<f4", "shape": [1], "path": "/etc/passwd"}}
        raw.send(dict(protocol.request("e", "echo"), arrays=outside))
        error = raw.answer("e")
        assert error["event"] == "error" and "file references are refused" in error["error"]
        raw.close()
    finally:
        stop_server(proc)


def test_tcp_refuses_non_loopback_without_token(tmp_path):
    out = subprocess.run([sys.executable, "-c", BOOT, "serve", "--port", "0", "--host", "0.0.0.0",
                          "--log", str(tmp_path / "s.log")], capture_output=True, text=True, timeout=60,
                         cwd=str(LIB.parent), env={k: v for k, v in os.environ.items() if k != "SAMFINETUNE_TOKEN"})
    assert out.returncode == 2 and "refusing to listen on 0.0.0.0 without a token" in out.stderr
    assert "listening" not in out.stdout


def test_tcp_rejects_wrong_token_and_accepts_right_one(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-s3cret-s3cret\n")
    token_file.chmod(0o600)
    proc, host, port, printed = start_server(tmp_path, "--host", "0.0.0.0", "--token-file", str(token_file))
    try:
        assert host == "0.0.0.0" and printed is None  # allowed off loopback because a token is set; never printed
        for token in ("wrong", None):
            with WorkerClient(address=("127.0.0.1", port), token=token) as client:
                with pytest.raises(JobError, match="authentication failed") as caught:
                    client.ping(timeout=30)
                assert not isinstance(caught.value, WorkerCrashed)
        with WorkerClient(address=("127.0.0.1", port), token="s3cret-s3cret-s3cret") as client:
            assert client.ping(timeout=30)["pong"] is True
    finally:
        stop_server(proc)


def test_bad_submissions_raise_at_once_and_leave_the_client_usable(client):
    with pytest.raises(ValueError, match="unknown command 'fly'"):
        client.submit("fly")
    with pytest.raises(TypeError, match="must be a numpy array"):
        client.submit("echo", {}, {"a": [1, 2, 3]})
    with pytest.raises(ProtocolError, match="not allowed"):
        client.submit("echo", {}, {"../escape": np.zeros(3)})
    with pytest.raises(TypeError, match="not JSON serialisable"):
        client.submit("echo", {"data": object()})
    assert client.run("echo", {"data": 1}, timeout=60)[0]["params"]["data"] == 1
    assert client._jobs == {}
