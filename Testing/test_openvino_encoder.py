"""The OpenVINO encoder backend: the default on a CPU, the same embeddings as PyTorch, its
conversions kept on disk and rebuilt when damaged, silent, and clear errors."""
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from SAMFineTuneLib import openvino_encoder
from SAMFineTuneLib.catalogue import ENGINE_DEFAULTS, MODEL_KEYS, SEGMENT_DEFAULTS
from SAMFineTuneLib.models import loader
from SAMFineTuneLib.models import load_model, resolve_backend
from SAMFineTuneLib.openvino_encoder import OpenVinoEncoder, available
from SAMFineTuneLib.progress import Cancelled
from SAMFineTuneLib.segmenter import Segmenter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Never pytest.importorskip("openvino"): importing it bare would start its telemetry in this process.
needs_openvino = pytest.mark.skipif(not available(), reason="openvino is not installed")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def openvino_model():
    if not available():
        pytest.skip("openvino is not installed")
    return load_model("litemedsam", device="cpu", backend="openvino")


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.GELU()).eval()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A conversion cache of this test's own."""
    monkeypatch.setenv("SAMFINETUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "openvino"


def entries(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


# ---------------------------------------------------------------- choosing the backend


def test_auto_is_the_default_and_part_of_what_picks_a_model():
    assert ENGINE_DEFAULTS["backend"] == SEGMENT_DEFAULTS["backend"] == "auto"
    assert SEGMENT_DEFAULTS["precision"] == ENGINE_DEFAULTS["precision"] == "auto"
    assert {"precision", "backend"} <= set(MODEL_KEYS)
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    assert resolve_backend("torch", CPU) == "torch" and resolve_backend("openvino", CPU) == "openvino"


@needs_openvino
def test_on_a_cpu_the_default_model_runs_its_encoder_on_openvino_in_float32(litemedsam, monkeypatch):
    assert resolve_backend("auto", CPU) == "openvino"
    assert litemedsam.backend == "openvino" and litemedsam.precision == "float32"
    asked = []  # the Python API's Segmenter, as the command line, the worker and the panel
    monkeypatch.setattr("SAMFineTuneLib.segmenter.load_model", lambda *a, **k: asked.append(k) or litemedsam)
    Segmenter("litemedsam", device="cpu")
    assert (asked[0]["precision"], asked[0]["backend"]) == (ENGINE_DEFAULTS["precision"], ENGINE_DEFAULTS["backend"])


def test_without_openvino_auto_runs_torch_and_says_why_once(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    monkeypatch.setattr(loader, "_said", set())
    with caplog.at_level(logging.INFO, logger=loader.__name__):
        models = [load_model("litemedsam", device="cpu", pretrained=False) for _ in range(2)]
    assert [model.backend for model in models] == ["torch", "torch"]
    reasons = [r.getMessage() for r in caplog.records if "runs on PyTorch" in r.getMessage()]
    assert len(reasons) == 1 and "openvino package is not installed" in reasons[0], reasons


def test_a_failing_conversion_falls_back_to_torch_under_auto_only(monkeypatch, caplog):
    class Failing:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("unsupported operation")

    monkeypatch.setattr(loader, "resolve_backend", lambda backend, device: "openvino" if backend == "auto" else backend)
    monkeypatch.setattr(openvino_encoder, "OpenVinoEncoder", Failing)
    with caplog.at_level(logging.WARNING, logger=loader.__name__):
        model = load_model("litemedsam", device="cpu", pretrained=False)
    assert model.backend == "torch" and "unsupported operation" in caplog.text
    with pytest.raises(RuntimeError, match="unsupported operation"):
        load_model("litemedsam", device="cpu", pretrained=False, backend="openvino")


def test_only_weights_from_a_file_are_kept_converted(monkeypatch):
    """Random weights get a fingerprint of their own, never seen again: keeping them would only fill the disk."""
    seen = []

    class Recorder:
        def __init__(self, encoder, input_size, precision, fingerprint=None, cancel=None):
            seen.append(fingerprint)

    monkeypatch.setattr(openvino_encoder, "OpenVinoEncoder", Recorder)
    load_model("litemedsam", device="cpu", pretrained=False, backend="openvino")
    model = load_model("litemedsam", device="cpu", backend="openvino")
    assert seen == [None, model.fingerprint] and model.fingerprint.startswith("litemedsam:")


# ---------------------------------------------------------------- same embeddings


@pytest.mark.slow
def test_openvino_gives_pytorchs_litemedsam_embeddings(openvino_model):
    reference = load_model("litemedsam", device="cpu", backend="torch")
    torch.manual_seed(0)
    images = torch.rand(2, 3, 256, 256) * 4 - 2  # the normalised range of a windowed slice
    with torch.inference_mode():
        expected, got = reference.encode(images), openvino_model.encode(images)
    assert openvino_model.backend == "openvino" and openvino_model.precision == "float32"
    assert got.dtype == torch.float32 and got.is_contiguous() and got.shape == expected.shape == (2, 256, 64, 64)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_trainings_embedding_step_on_the_default_backend_gives_pytorchs(litemedsam):
    from SAMFineTuneLib.dataset.samples import case_samples
    from SAMFineTuneLib.phantom import make_ct_phantom
    from SAMFineTuneLib.training import prepare

    ct, label = make_ct_phantom((12, 64, 64))
    samples = case_samples("phantom", ct, label.array)[:3]
    reference = load_model("litemedsam", device="cpu", backend="torch")
    got, expected = prepare(litemedsam, samples, None), prepare(reference, samples, None)
    assert litemedsam.backend == "openvino" and got.stats["encoder_calls"] == 3
    torch.testing.assert_close(got.embeddings.float(), expected.embeddings.float(), atol=2e-3, rtol=1e-3)


@pytest.mark.slow
def test_an_openvino_model_refuses_to_be_compiled_and_to_be_rewrapped(openvino_model):
    with pytest.raises(ValueError, match="torch backend"):
        openvino_model.compile_encoder(1)
    with pytest.raises(ValueError, match="backend 'openvino' applies to a model given by name"):
        Segmenter(openvino_model, backend="openvino")


# ---------------------------------------------------------------- the conversion cache


@needs_openvino
def test_the_second_load_reads_the_conversion_back(litemedsam):
    """The session's default model was converted once; loading it again reads that conversion back."""
    again = load_model("litemedsam", device="cpu")
    assert again.openvino_encoder.from_cache
    images = torch.rand(1, 3, 256, 256) * 4 - 2
    with torch.inference_mode():
        torch.testing.assert_close(again.encode(images), litemedsam.encode(images), atol=0, rtol=0)


@needs_openvino
def test_a_conversion_is_kept_once_per_weights_and_precision(tiny_net, cache):
    images = torch.rand(2, 3, 16, 16)
    first = OpenVinoEncoder(tiny_net, 16, fingerprint="tiny:1")
    assert not first.from_cache and len(entries(cache)) == 1
    (entry,) = entries(cache)
    assert sorted(os.listdir(cache / entry)) == ["encoder.blob", "entry.json"]
    again = OpenVinoEncoder(tiny_net, 16, fingerprint="tiny:1")
    assert again.from_cache
    torch.testing.assert_close(again(images), first(images), atol=0, rtol=0)
    torch.testing.assert_close(again(images), tiny_net(images).detach(), atol=1e-5, rtol=1e-4)
    assert not OpenVinoEncoder(tiny_net, 16, precision="bf16", fingerprint="tiny:1").from_cache
    assert not OpenVinoEncoder(tiny_net, 16, fingerprint="tiny:2").from_cache
    assert len(entries(cache)) == 3 and not [name for name in os.listdir(cache) if name.startswith(".")]
    key = json.loads((cache / entry / "entry.json").read_text())["key"]
    assert key["fingerprint"] == "tiny:1" and key["precision"] == "f32" and key["openvino"]


@needs_openvino
def test_a_cancel_ends_the_wait_for_a_conversion_which_goes_on_for_the_next_load(tiny_net, cache, monkeypatch):
    """A job must stop within a second, and converting takes seconds: the cancelled load returns
    while the conversion still runs; a load of the same encoder meanwhile waits for that one
    conversion, not a second; what it converted is kept."""
    import threading

    release, calls = threading.Event(), []
    real_convert = openvino_encoder._convert

    def slow_convert(*args):
        calls.append(1)
        assert release.wait(30), "the test never let the conversion finish"
        return real_convert(*args)

    monkeypatch.setattr(openvino_encoder, "_convert", slow_convert)
    asked = []
    with pytest.raises(Cancelled):
        OpenVinoEncoder(tiny_net, 16, fingerprint="tiny:1", cancel=lambda: asked.append(1) or len(asked) > 2)
    assert calls == [1] and not release.is_set()  # cancelled while converting, not after it
    second = []
    waiter = threading.Thread(target=lambda: second.append(OpenVinoEncoder(tiny_net, 16, fingerprint="tiny:1",
                                                                           cancel=lambda: False)))
    waiter.start()
    release.set()
    waiter.join(30)
    images = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(second[0](images), tiny_net(images).detach(), atol=1e-5, rtol=1e-4)
    assert calls == [1] and len(entries(cache)) == 1  # one conversion, kept for later processes
    assert OpenVinoEncoder(tiny_net, 16, fingerprint="tiny:1").from_cache


def test_a_cancel_during_the_conversion_is_not_taken_for_a_failed_one(monkeypatch):
    """Under "auto" a failed conversion falls back to PyTorch; a cancelled one ends the load."""
    class Cancelling:
        def __init__(self, *args, cancel=None, **kwargs):
            raise Cancelled("cancelled by the user")

    monkeypatch.setattr(loader, "resolve_backend", lambda backend, device: "openvino" if backend == "auto" else backend)
    monkeypatch.setattr(openvino_encoder, "OpenVinoEncoder", Cancelling)
    with pytest.raises(Cancelled):
        load_model("litemedsam", device="cpu", pretrained=False, cancel=lambda: False)


def _truncate(folder):
    blob = folder / "encoder.blob"
    blob.write_bytes(blob.read_bytes()[:100])


def _flip_a_byte(folder):
    blob = folder / "encoder.blob"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))


def _file_in_its_place(folder):
    shutil.rmtree(folder)
    folder.write_bytes(b"")


@needs_openvino
@pytest.mark.parametrize("damage", [
    _truncate, _flip_a_byte, lambda folder: (folder / "entry.json").unlink(),
    lambda folder: (folder / "entry.json").write_text("{not json"),
    lambda folder: (folder / "encoder.blob").unlink(),
    lambda folder: (folder / "entry.json").write_text("[]"),
    lambda folder: (folder / "entry.json").write_text("null"),
    lambda folder: (folder / "entry.json").write_text('"x"'),
    _file_in_its_place,
], ids=["truncated", "flipped byte", "no description", "bad description", "no model", "description a list",
        "description null", "description a string", "a file in its place"])
def test_a_damaged_conversion_is_made_again_with_a_warning(tiny_net, cache, damage, caplog):
    OpenVinoEncoder(tiny_net, 16, fingerprint="tiny:1")
    (entry,) = entries(cache)
    damage(cache / entry)
    images = torch.rand(1, 3, 16, 16)
    with caplog.at_level(logging.WARNING, logger=openvino_encoder.__name__):
        rebuilt = OpenVinoEncoder(tiny_net, 16, fingerprint="tiny:1")
    assert not rebuilt.from_cache and "damaged" in caplog.text and "converting it again" in caplog.text
    torch.testing.assert_close(rebuilt(images), tiny_net(images).detach(), atol=1e-5, rtol=1e-4)
    assert entries(cache) == [entry] and OpenVinoEncoder(tiny_net, 16, fingerprint="tiny:1").from_cache


@needs_openvino
def test_a_cache_folder_that_cannot_be_written_costs_only_the_conversion(tiny_net, tmp_path, monkeypatch, caplog):
    blocked = tmp_path / "a file"
    blocked.write_text("")
    monkeypatch.setenv("SAMFINETUNE_CACHE", str(blocked))
    with caplog.at_level(logging.WARNING, logger=openvino_encoder.__name__):
        encoder = OpenVinoEncoder(tiny_net, 16, fingerprint="tiny:1")
    images = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(encoder(images), tiny_net(images).detach(), atol=1e-5, rtol=1e-4)
    assert "could not keep the converted encoder" in caplog.text


@needs_openvino
def test_converting_and_caching_write_nothing_into_home_and_send_nothing(tmp_path):
    """openvino's telemetry would write a client id under ~/intel and report conversions."""
    script = textwrap.dedent("""
        import socket, sys, torch
        def refuse(*args, **kwargs):
            raise AssertionError("a network connection was attempted")
        socket.socket.connect = refuse
        from SAMFineTuneLib.openvino_encoder import OpenVinoEncoder
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.GELU()).eval()
        images = torch.rand(2, 3, 16, 16)
        got = OpenVinoEncoder(net, 16)(images)
        torch.testing.assert_close(got, net(images).detach(), atol=1e-5, rtol=1e-4)
        kept = [OpenVinoEncoder(net, 16, fingerprint="net:1").from_cache for _ in range(2)]
        print("read back:", kept)
        print("telemetry loaded:", sys.modules.get("openvino_telemetry") is not None)
    """)
    home, cache = tmp_path / "home", tmp_path / "cache"
    home.mkdir()
    env = dict(os.environ, HOME=str(home), USERPROFILE=str(home), PYTHONPATH=ROOT, SAMFINETUNE_CACHE=str(cache))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "telemetry loaded: False" in done.stdout and "read back: [False, True]" in done.stdout
    assert os.listdir(home) == [] and len(entries(cache / "openvino")) == 1


# ---------------------------------------------------------------- errors


def test_a_missing_openvino_is_named_with_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(ValueError, match="pip install openvino"):
        load_model("litemedsam", device="cpu", pretrained=False, backend="openvino")


def test_an_unknown_backend_or_openvino_off_the_cpu_is_refused_before_loading(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'onnx'.*auto, torch, openvino"):
        load_model("litemedsam", device="cpu", backend="onnx")
    monkeypatch.setattr(loader, "resolve_device", lambda device: torch.device("cuda"))
    with pytest.raises(ValueError, match="CPU only, not on cuda"):
        load_model("litemedsam", device="cuda", backend="openvino")


# ---------------------------------------------------------------- in the worker


@pytest.mark.slow
@needs_openvino
def test_the_worker_runs_openvino_by_default_and_a_cancel_stops_it_within_a_slice(tmp_path, litemedsam):
    """One OpenVINO call per slice (about 0.4 s for LiteMedSAM on two idle cores) and a cancel
    check between slices: a cancel stops the job before the slice after the one running. The
    caller blocks, as Slicer's blocking runs do, and cancels a few slices in (model loaded, warm)."""
    from SAMFineTuneLib.client import JobCancelled, WorkerClient

    started, asked = {}, []

    def progress(done, total, message):
        if message.startswith("encoding slice"):
            started.setdefault(message, time.monotonic())

    def cancel():
        if len(started) >= 4 and not asked:
            asked.append(time.monotonic())
        return bool(asked)

    log_path = tmp_path / "worker.log"
    volume = np.random.default_rng(0).integers(-200, 300, size=(60, 64, 64)).astype(np.int16)
    params = {"box": [10, 10, 0, 50, 50, 59], "box_mode": "fixed", "device": "cpu"}
    with WorkerClient(log_path=str(log_path), env={"OMP_NUM_THREADS": "2"}) as client:
        with pytest.raises(JobCancelled):
            client.run("segment", params, {"volume": volume}, progress=progress, cancel=cancel, timeout=600)
        stopped_in = time.monotonic() - asked[0]
        assert client.ping()["busy"] is None
    slice_seconds = float(np.median(np.diff(sorted(started.values()))))
    log = log_path.read_text()
    assert "image encoder on openvino in float32" in log and "read the image encoder's OpenVINO conversion back" in log
    assert stopped_in < slice_seconds + 0.5, f"cancel took {stopped_in:.2f} s, a slice {slice_seconds:.2f} s"
