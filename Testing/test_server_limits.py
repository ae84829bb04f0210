"""What a logged-in client that misbehaves (a bug, or someone with the token) can make a TCP worker
hold: waiting jobs, arrays, click results, a connection it stops reading. Each is bounded, with an
error naming the limit where the client can still read one (PROTOCOL.md, "Limits")."""
from __future__ import annotations

import gc
import logging
import socket
import threading
import time
import weakref

import numpy as np
import pytest

from SAMFineTuneLib import protocol
from SAMFineTuneLib.protocol import ProtocolError
from SAMFineTuneLib.worker import core as core_module
from SAMFineTuneLib.worker import jobs
from SAMFineTuneLib.worker import server as server_module
from SAMFineTuneLib.worker.core import StoredVolume, WorkerCore
from SAMFineTuneLib.worker.session import Session
from worker_servers import Raw, in_process_servers

TOKEN = "in-process-token-0123456789"
UPLOAD = 1 << 20  # the in-process servers' --max-upload-mb


@pytest.fixture
def in_process(tmp_path):
    with in_process_servers(tmp_path, TOKEN) as start:
        yield start


@pytest.fixture
def held(monkeypatch):
    """echo jobs that run until the test lets them go (``held.set()``); ``held.started`` once one runs."""
    release, started = threading.Event(), threading.Event()

    def hold(core, job):
        started.set()
        release.wait(60)
        return {}, None

    monkeypatch.setitem(jobs.HANDLERS, "echo", hold)
    release.started = started
    yield release
    release.set()


def logged_in(port):
    raw = Raw(port, timeout=30)
    assert raw.log_in(TOKEN)["event"] == "result"
    return raw


def first_word(raw, job_id):
    """The first event about ``job_id``: 'accepted' for a queued job, 'error' for a refused one."""
    while True:
        message = raw.read()
        assert message is not None, "the server closed the connection"
        if message.get("id") == job_id and message["event"] in ("accepted", "error"):
            return message


def echo(job_id, nbytes=0, **params):
    message = protocol.request(job_id, "echo", params)
    if nbytes:
        message["arrays"] = {"a": {"dtype": "|u1", "shape": [nbytes], "nbytes": nbytes}}
    return protocol.encode(message) + bytes(nbytes)


def test_a_client_cannot_queue_jobs_without_limit(in_process, held, monkeypatch):
    monkeypatch.setattr(core_module, "MAX_QUEUED_JOBS", 3)
    raw = logged_in(in_process())
    raw.send(echo("run"))
    assert held.started.wait(30)
    for n in range(3):
        raw.send(echo(f"q{n}"))
        assert first_word(raw, f"q{n}")["event"] == "accepted"
    raw.send(echo("one-too-many"))
    refused = first_word(raw, "one-too-many")
    assert refused["event"] == "error" and "queue full: 3 jobs already wait" in refused["error"]
    assert "\n" not in refused["error"] and "wait for some to end" in refused["error"]
    raw.send(protocol.encode(protocol.request("c", "cancel", {"job": "q0"})))
    assert raw.answer("c")["result"]["cancelled"] is True
    raw.send(echo("room-again"))  # the connection goes on, and a freed place is taken again
    assert first_word(raw, "room-again")["event"] == "accepted"
    raw.close()


def test_waiting_jobs_hold_at_most_one_uploads_worth(in_process, held):
    raw = logged_in(in_process())
    raw.send(echo("run", UPLOAD))  # running: not waiting
    assert held.started.wait(30)
    raw.send(echo("big", UPLOAD * 3 // 5))  # nothing waits before it: always taken
    assert first_word(raw, "big")["event"] == "accepted"
    raw.send(echo("another", UPLOAD * 3 // 5))
    refused = first_word(raw, "another")
    assert refused["event"] == "error" and f"over the {UPLOAD} byte limit for waiting jobs" in refused["error"]
    raw.send(echo("objects", data=[{}] * (UPLOAD // 100)))  # a short line, but many objects once parsed
    assert first_word(raw, "objects")["event"] == "error"
    raw.send(echo("small"))
    assert first_word(raw, "small")["event"] == "accepted"
    raw.close()


def test_a_jobs_arrays_and_result_are_let_go_once_it_is_answered(monkeypatch):
    kept = []

    def keep(core, job):
        result = np.full(1000, 7, np.uint8)
        if job.session is not session:  # an earlier test's conversation still ending runs the same handler
            return {}, {"b": result}
        kept.extend((weakref.ref(job.arrays()["a"]), weakref.ref(result)))
        return {}, {"b": result}

    monkeypatch.setitem(jobs.HANDLERS, "echo", keep)
    ours, peer = socket.socketpair()
    with ours, peer:
        session = Session(WorkerCore(), ours.makefile("rb"), ours.makefile("wb"), files=False)
        threading.Thread(target=session.serve, daemon=True).start()
        stream = peer.makefile("rwb")
        stream.write(echo("j", 1000))
        stream.flush()
        while (message := protocol.read_message(stream))["event"] != "result":
            pass
        deadline = time.monotonic() + 30
        while any(ref() is not None for ref in kept) and time.monotonic() < deadline:
            gc.collect()
            time.sleep(0.05)
        assert kept and all(ref() is None for ref in kept), "an idle conversation still holds the last job's arrays"
        stream.close()


def test_a_client_that_stops_reading_is_cut_off_and_frees_the_server(in_process, monkeypatch):
    monkeypatch.setitem(jobs.HANDLERS, "echo", lambda core, job: ({}, {"big": np.ones(64 << 20, np.uint8)}))
    monkeypatch.setattr(server_module, "BUSY_WAIT_S", 0.2)
    port = in_process(stall_timeout=1.0)
    stuck = logged_in(port)
    stuck.send(echo("j"))  # 64 MiB comes back, far beyond what the sockets buffer; never read
    answer, deadline = None, time.monotonic() + 60
    while time.monotonic() < deadline:
        other = Raw(port, timeout=30)
        answer = other.log_in(TOKEN)
        other.close()
        if answer is not None and answer["event"] == "result":
            break
        assert answer is None or "server busy" in answer["error"]
    assert answer is not None and answer["event"] == "result", "a client that reads nothing holds the server"
    stuck.close()


def test_a_volume_keeps_the_click_results_of_its_last_clicked_slices_only():
    stored = StoredVolume(np.zeros((2, 2, 2), np.uint8), {})
    limit = core_module.MAX_REFINED_SLICES
    for n in range(limit + 10):  # e.g. a client that clicks with a new window string each time
        stored.keep_refined(("axial", 0, f"{n},40"), n)
    assert len(stored.refined) == limit and ("axial", 0, "9,40") not in stored.refined
    stored.keep_refined(("axial", 0, "10,40"), "again")  # clicked again: the last to go
    stored.keep_refined(("axial", 1, "new"), "new")
    assert ("axial", 0, "10,40") in stored.refined and ("axial", 0, "11,40") not in stored.refined


def test_the_crops_of_one_message_share_its_limit():
    """Tiny blocks may not stand for many arrays each as large as the limit."""
    block = np.ones((2, 2), np.uint8)
    crop = {"offset": [0, 0], "shape": [768, 1024]}  # 3/4 of the limit each
    one = protocol.load_arrays({"m": {"data": block, "crop": crop}}, max_bytes=UPLOAD)
    assert one["m"].shape == (768, 1024)
    with pytest.raises(ProtocolError, match=r"over the 262144 bytes left of this connection's limit"):
        protocol.load_arrays({"m": {"data": block, "crop": crop}, "n": {"data": block, "crop": dict(crop)}},
                             max_bytes=UPLOAD)


def test_connections_that_never_log_in_cannot_flood_the_log(in_process, monkeypatch, caplog):
    monkeypatch.setattr(server_module, "PRE_LOGIN_LOG_LINES", 5)
    port = in_process()
    for quota in logging.getLogger("SAMFineTuneLib.worker").filters:  # one per process: earlier tests' lines
        if isinstance(quota, server_module.PreLoginLogQuota):
            quota.minute = None
    caplog.set_level("INFO", logger="SAMFineTuneLib.worker")
    for _ in range(30):  # anyone who reaches the port: three lines each, unbounded
        raw = Raw(port, timeout=30)
        raw.send(b"{}\n")
        while raw.read() is not None:
            pass
        raw.close()
    assert login_answer(port)["event"] == "result"  # a logged-in client's lines are not counted
    before_login = [record for record in caplog.records if getattr(record, "before_login", False)]
    assert 6 <= len(before_login) <= 12  # the quota (+1 saying the rest are left out), twice across a minute's end
    assert any("left out" in record.getMessage() for record in before_login)


def login_answer(port):
    raw = Raw(port, timeout=30)
    answer = raw.log_in(TOKEN)
    raw.close()
    return answer
