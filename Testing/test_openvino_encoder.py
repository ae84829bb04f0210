"""The optional OpenVINO encoder backend: same embeddings as PyTorch, silent, and clear errors."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from SAMFineTuneLib.models import loader
from SAMFineTuneLib.models import load_model
from SAMFineTuneLib.openvino_encoder import available
from SAMFineTuneLib.segmenter import Segmenter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Never pytest.importorskip("openvino"): importing it bare would start its telemetry in this process.
needs_openvino = pytest.mark.skipif(not available(), reason="openvino is not installed")


@pytest.fixture(scope="module")
def openvino_model():
    if not available():
        pytest.skip("openvino is not installed")
    return load_model("litemedsam", device="cpu", backend="openvino")


@pytest.mark.slow
def test_openvino_gives_pytorchs_litemedsam_embeddings(openvino_model):
    reference = load_model("litemedsam", device="cpu")
    torch.manual_seed(0)
    images = torch.rand(2, 3, 256, 256) * 4 - 2  # the normalised range of a windowed slice
    with torch.inference_mode():
        expected, got = reference.encode(images), openvino_model.encode(images)
    assert openvino_model.backend == "openvino" and openvino_model.precision == "float32"
    assert got.dtype == torch.float32 and got.is_contiguous() and got.shape == expected.shape == (2, 256, 64, 64)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_an_openvino_model_refuses_to_be_compiled_and_to_be_rewrapped(openvino_model):
    with pytest.raises(ValueError, match="torch backend"):
        openvino_model.compile_encoder(1)
    with pytest.raises(ValueError, match="backend 'openvino' applies to a model given by name"):
        Segmenter(openvino_model, backend="openvino")


@needs_openvino
def test_converting_writes_nothing_into_home_and_sends_nothing(tmp_path):
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
        print("telemetry loaded:", sys.modules.get("openvino_telemetry") is not None)
    """)
    env = dict(os.environ, HOME=str(tmp_path), USERPROFILE=str(tmp_path), PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "telemetry loaded: False" in done.stdout
    assert os.listdir(tmp_path) == []


def test_a_missing_openvino_is_named_with_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(ValueError, match="pip install openvino"):
        load_model("litemedsam", device="cpu", pretrained=False, backend="openvino")


def test_an_unknown_backend_or_openvino_off_the_cpu_is_refused_before_loading(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'onnx'.*torch, openvino"):
        load_model("litemedsam", device="cpu", backend="onnx")
    monkeypatch.setattr(loader, "resolve_device", lambda device: torch.device("cuda"))
    with pytest.raises(ValueError, match="CPU only, not on cuda"):
        load_model("litemedsam", device="cuda", backend="openvino")
