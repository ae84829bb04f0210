"""The client without a reader thread (``WorkerClient(reader="poll")``, what Slicer uses: Qt's
idle loop holds the GIL, so a thread would only read while Python runs) gives the same events
as with one, and the incremental decoder under it gives the same messages however the bytes
are split."""
from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import threading
import time
import tracemalloc

import numpy as np
import pytest

from SAMFineTuneLib import protocol
from SAMFineTuneLib.client import JobCancelled, WorkerClient, WorkerCrashed
from SAMFineTuneLib.client import connections
from SAMFineTuneLib.message_decoder import MessageDecoder
from SAMFineTuneLib.protocol import ProtocolError
from worker_servers import ENV, fake_login, start_server, stop_server

READERS = ("thread", "poll")
FAKE_TOKEN = "t" * 20


# --- the decoder -------------------------------------------------------------------------------


def _stream():
    volume = np.random.default_rng(0).normal(size=(5, 7, 9)).astype(np.float32)
    mask = np.zeros((20, 30, 40), np.uint8)
    mask[3:6, 10:12, 5:9] = 1
    out = io.BytesIO()
    protocol.write_message(out, protocol.event("j1", "result"), {"volume": volume, "mask": mask, "e": np.zeros(0)},
                           crop_masks=True)
    protocol.write_message(out, protocol.event("j2", "progress", done=1, total=2))
    protocol.write_message(out, protocol.event("j3", "result"), {"big": np.arange(30_000, dtype=np.int64)})
    return out.getvalue(), volume, mask


def _same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if key == "arrays":
            for name in a[key]:
                assert np.array_equal(a[key][name]["data"], b[key][name]["data"])
        else:
            assert a[key] == b[key]


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
def test_decoder_gives_the_messages_however_the_bytes_are_split(chunk):
    data, volume, mask = _stream()
    expected = []
    reader = io.BytesIO(data)
    while (message := protocol.read_message(reader)) is not None:
        expected.append(message)
    decoder = MessageDecoder()
    got = []
    for start in range(0, len(data), chunk):
        got += decoder.feed(data[start:start + chunk])
    assert decoder.finish() == [] and len(got) == len(expected) == 3
    for a, b in zip(got, expected):
        _same(a, b)
    arrays = protocol.load_arrays(got[0]["arrays"])
    assert np.array_equal(arrays["volume"], volume) and np.array_equal(arrays["mask"], mask)


def test_decoder_skips_an_over_long_line_whole_and_refuses_attachments_it_may_not_take():
    decoder = MessageDecoder(max_line=100)
    long_line = b'{"v": %d, "id": "x", "pad": "' % protocol.PROTOCOL_VERSION + b"a" * 500 + b'"}\n'
    items = []
    for start in range(0, len(long_line), 64):  # the over-long line arrives in pieces
        items += decoder.feed(long_line[start:start + 64])
    items += decoder.feed(protocol.encode(protocol.request("p", "ping")))
    assert len(items) == 2 and isinstance(items[0], ProtocolError) and "longer than 100 bytes" in str(items[0])
    assert items[1]["id"] == "p"  # the line's tail was never read as a message
    refused = MessageDecoder(attachments=False)
    [error] = refused.feed(protocol.encode({"id": "e", "arrays": {"a": {"dtype": "|u1", "shape": [4], "nbytes": 4}}}))
    assert error.fatal and "refused before authentication" in str(error) and refused.broken
    capped = MessageDecoder(max_attachment_bytes=10)
    [error] = capped.feed(protocol.encode({"id": "e", "arrays": {"a": {"dtype": "|u1", "shape": [11], "nbytes": 11}}}))
    assert error.fatal and "over this connection's limit of 10" in str(error)
    wrong = MessageDecoder()
    items = wrong.feed(protocol.encode({"id": "e", "arrays": {"a": {"dtype": "<f4", "shape": [3], "nbytes": 8}}})
                       + b"\0" * 8 + protocol.encode(protocol.request("p", "ping")))
    assert "8 bytes do not make shape [3]" in str(items[0]) and not items[0].fatal and items[1]["id"] == "p"


def test_decoder_reports_a_bad_line_and_gives_the_rest_of_the_chunk():
    ping = protocol.encode(protocol.request("p", "ping"))
    bad = {"dtype": "|u1", "shape": [2**32, 2**32], "nbytes": 0}
    for first in (b"[" * 20000 + b"\n", protocol.encode({"id": "a", "arrays": {"x": bad}})):
        items = MessageDecoder().feed(first + ping)
        assert len(items) == 2 and isinstance(items[0], ProtocolError) and items[1]["id"] == "p"


def test_decoder_holds_only_the_attachment_bytes_that_arrived():
    announced = 64 << 20
    header = protocol.encode({"id": "a", "arrays": {"x": {"dtype": "|u1", "shape": [announced], "nbytes": announced}}})
    decoder = MessageDecoder()
    tracemalloc.start()
    try:
        assert decoder.feed(header + b"\1" * 1000) == [] and decoder.wants == announced - 1000
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20  # not the 64 MiB the header announced
    piece = b"\2" * (1 << 20)
    items = []
    while decoder.wants:
        items += decoder.feed(piece[:decoder.wants])
    data = items[0]["arrays"]["x"]["data"]
    assert data.shape == (announced,) and data[999] == 1 and data[1000] == 2 and data[-1] == 2


# --- a worker that sends what it should not ----------------------------------------------------


def _fake_server(send):
    """A TCP 'worker' that logs the client in, reads one request and then sends ``send`` (bytes)
    before closing; returns its port."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        lines = conn.makefile("rb")
        with contextlib.suppress(OSError):  # the client may hang up first
            fake_login(conn, lines, FAKE_TOKEN)
            lines.readline()
            conn.sendall(send)
            time.sleep(0.3)
            conn.shutdown(socket.SHUT_RDWR)
        conn.close()
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


def _job_against(send, reader, seconds=10.0):
    client = WorkerClient(address=("127.0.0.1", _fake_server(send)), token=FAKE_TOKEN, reader=reader)
    try:
        client.start(timeout=10)
        job = client.submit("ping")
        deadline = time.monotonic() + seconds
        while not job.done and time.monotonic() < deadline:
            client.poll(0.05)
        return job
    finally:
        client.shutdown()


@pytest.mark.parametrize("reader", READERS)
def test_bad_messages_from_the_worker_never_leave_a_job_waiting(reader):
    late = protocol.encode(protocol.event("j1", "progress", done=2, total=4))
    bad = [b"[" * 20000 + b"\n", b'{"v":%d,"id":"j1","event":"log","x":' % protocol.PROTOCOL_VERSION + b"1" * 5000
           + b"}\n",
           protocol.encode(protocol.event(["j1"], "progress")),
           protocol.encode(protocol.event("j1", "progress", done="x", total=1e300)),
           protocol.encode(protocol.event("j1", "result", arrays={"x": {"dtype": "|V0", "shape": [4], "nbytes": 0}}))]
    job = _job_against(b"".join(bad) + late, reader)
    assert job.state == "error" and job.step == (2, 4)  # the lines after the bad ones were read
    job = _job_against(b"[" * 20000 + b"\n", reader)  # then the server went away
    assert job.state == "error" and isinstance(job.exception, WorkerCrashed)


@pytest.mark.parametrize("reader", READERS)
def test_a_message_that_ends_the_connection_says_why(reader):
    huge = {"x": {"dtype": "|u1", "shape": [5 << 30], "nbytes": 5 << 30}}  # over the client's 4 GiB limit
    job = _job_against(protocol.encode(protocol.event("j1", "result", result={}, arrays=huge)), reader)
    assert job.state == "error" and isinstance(job.exception, WorkerCrashed)
    assert "cannot follow" in job.error and "limit" in job.error, job.error


def test_the_reader_thread_always_ends_the_connection(monkeypatch):
    def broken_reader(stream, **limits):
        raise RuntimeError("something unforeseen")

    monkeypatch.setattr(connections.protocol, "read_message", broken_reader)
    client = WorkerClient(address=("127.0.0.1", _fake_server(b"")), token=FAKE_TOKEN)
    with pytest.raises(WorkerCrashed, match="cannot follow .*RuntimeError: something unforeseen"):
        client.ping(timeout=10)
    assert not client.connected


@pytest.mark.parametrize("reader", READERS)
def test_a_tcp_worker_cannot_make_the_client_read_local_files(tmp_path, reader):
    secret = tmp_path / "secret.npy"
    np.save(secret, np.arange(4))
    ref = {"dtype": "<i8", "shape": [4], "path": str(secret)}
    job = _job_against(protocol.encode(protocol.event("j1", "result", result={}, arrays={"x": ref})), reader)
    assert job.state == "error" and "file references are refused" in job.error and not job.arrays
    crop = {"dtype": "|u1", "shape": [2], "nbytes": 2, "crop": {"offset": [5], "shape": [4]}}
    job = _job_against(protocol.encode(protocol.event("j1", "result", result={}, arrays={"x": crop})) + b"\1\1",
                       reader)
    assert job.state == "error" and "does not fit" in job.error


# --- thread and poll give the same events ---------------------------------------------------


def _collapse(names):
    """Event names with repeats folded (how many progress events arrive depends on timing)."""
    out = []
    for name in names:
        if not out or out[-1] != name:
            out.append(name)
    return out


def _follow(client, command, params=None, arrays=None):
    events = []
    job = client.submit(command, params, arrays)
    job.on_event = lambda event: events.append(event["event"])
    return job, events


def _scenario(tmp_path, reader):
    """Arrays, progress, a cancel, a worker killed mid-job and its replacement; what was seen."""
    seen = {}
    volume = np.random.default_rng(1).integers(-1000, 1000, size=(6, 32, 32)).astype(np.int16)
    mask = np.zeros((6, 32, 32), np.uint8)
    mask[2:4, 5:9, 6:8] = 1
    with WorkerClient(log_path=str(tmp_path / f"{reader}.log"), env=ENV, reader=reader) as client:
        job, events = _follow(client, "echo", {"seconds": 0.3, "data": "hi"}, {"volume": volume, "mask": mask})
        result, arrays = client.wait(job, timeout=60)
        seen["echo"] = (_collapse(events), result["params"], np.array_equal(arrays["volume"], volume),
                        np.array_equal(arrays["mask"], mask))
        job, events = _follow(client, "echo", {"seconds": 60})
        while not job.message.startswith("waiting"):  # running, and said so
            client.poll(timeout=0.05)
        client.cancel(job)
        with pytest.raises(JobCancelled):
            client.wait(job, timeout=20)
        seen["cancel"] = (_collapse(events), job.state)
        job, events = _follow(client, "echo", {"seconds": 60})
        while not job.message.startswith("waiting"):
            client.poll(timeout=0.05)
        os.kill(client.worker_pid, signal.SIGKILL)
        with pytest.raises(WorkerCrashed, match="SIGKILL"):
            client.wait(job, timeout=20)
        seen["crash"] = (_collapse(events), job.state)
        seen["after"] = client.run("echo", {"data": 2}, timeout=60)[0]["params"]["data"], client.starts
        seen["threads"] = [t.name for t in threading.enumerate() if t.name == "samft-client-reader"]
    return seen


def test_poll_mode_gives_the_same_events_as_a_reader_thread(tmp_path):
    thread, poll = (_scenario(tmp_path, reader) for reader in READERS)
    assert thread["threads"] and not poll["threads"]  # poll mode starts no reader thread
    for key in ("echo", "cancel", "crash", "after"):
        assert poll[key] == thread[key], key
    assert poll["echo"] == (["accepted", "started", "progress", "result"], {"seconds": 0.3, "data": "hi"}, True, True)
    assert poll["cancel"][1] == "cancelled" and poll["crash"][1] == "error" and poll["after"] == (2, 2)


def test_poll_mode_reads_a_large_attachment_over_tcp_in_pieces(tmp_path):
    proc, _, port, token = start_server(tmp_path)
    big = np.random.default_rng(2).normal(size=(16, 512, 512)).astype(np.float32)  # 16 MiB each way
    try:
        results = {}
        for reader in READERS:
            with WorkerClient(address=("127.0.0.1", port), token=token, reader=reader) as client:
                client.start()
                feeds = []
                if reader == "poll":
                    decoder = client._res.conn.decoder
                    plain = decoder.feed
                    decoder.feed = lambda data: (feeds.append(len(data)), plain(data))[1]
                started = time.monotonic()
                job = client.submit("echo", {"data": reader}, {"big": big})
                while not job.done:  # what Slicer's timer does
                    client.poll()
                    time.sleep(0.01)
                    assert time.monotonic() - started < 120
                results[reader] = job.arrays["big"]
                if reader == "poll":
                    assert len(feeds) > 2 and sum(feeds) > big.nbytes  # the array came in many reads
        assert np.array_equal(results["poll"], big) and np.array_equal(results["thread"], big)
    finally:
        stop_server(proc)


def test_reader_must_be_thread_or_poll():
    with pytest.raises(ValueError, match="reader must be one of thread, poll"):
        WorkerClient(reader="select")
