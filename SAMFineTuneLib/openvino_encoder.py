"""The image encoder run by OpenVINO on a CPU (``load_model(..., backend="openvino")``, ``--backend``).

Why: on a CPU a cold slice is nearly all encoder, and LiteMedSAM's encoder spends most of its time
in element-wise passes over 256 x 256 x 256 activations that PyTorch runs one operator at a time.
OpenVINO fuses them into its convolutions: on two Xeon cores (AMX) a cold slice took 405 ms
against PyTorch's 1034 ms in float32, with embeddings within 2e-6 of PyTorch's, and 184 ms in
bf16, 6.1x the per-slice loop (README, "Speed (CPU)"). OpenVINO is optional (``pip install
openvino``); the PyTorch encoder stays the default and the reference.
"""
from __future__ import annotations

import importlib.util
import sys
import warnings

import torch
from torch import nn

# OpenVINO's name for each of load_model's encoder precisions ("auto" is float32 on a CPU).
_PRECISION_HINTS = {"auto": "f32", "float32": "f32", "bf16": "bf16"}


def available() -> bool:
    """Whether openvino is installed, found without importing it (importing starts its telemetry
    unless ``_import_openvino`` has turned that off first)."""
    return importlib.util.find_spec("openvino") is not None


def _import_openvino():
    # Importing openvino starts its usage telemetry, which writes a client id into the user's home
    # and sends events from convert_model. openvino falls back to a silent stub when the telemetry
    # package cannot be imported, so it is made unimportable here, before openvino is first imported.
    sys.modules.setdefault("openvino_telemetry", None)
    try:
        import openvino
        from openvino.frontend import FrontEndManager
        from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder
    except ImportError as exc:
        raise ValueError("the openvino backend needs the 'openvino' package, which is not installed here "
                         f"({exc}); install it with 'pip install openvino', or use --backend torch") from None
    return openvino, FrontEndManager, TorchScriptPythonDecoder


class OpenVinoEncoder:
    """A PyTorch image encoder converted once to OpenVINO and compiled for this CPU.

    Called like the encoder: float32 images [B,3,S,S] -> embeddings (float32, contiguous). Images
    go through one at a time, as batching does not pay on a CPU. The conversion traces the
    encoder (about 8 s for LiteMedSAM), so a model is converted once and kept, as the Segmenter
    and the worker keep theirs.
    """

    def __init__(self, encoder: nn.Module, input_size: int, precision: str = "auto", threads: int = 0):
        if precision not in _PRECISION_HINTS:
            raise ValueError(f"unknown precision '{precision}' for the openvino backend; choose one of: "
                             f"{', '.join(_PRECISION_HINTS)}")
        openvino, FrontEndManager, TorchScriptPythonDecoder = _import_openvino()
        example = torch.zeros(1, 3, input_size, input_size)
        with torch.no_grad(), warnings.catch_warnings():  # the front end, not convert_model, which reports usage
            # Tracing fixes the input size, which the encoder's size checks then warn about.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace's deprecation
            traced = TorchScriptPythonDecoder(encoder.eval(), example_input=(example,))
            front_end = FrontEndManager().load_by_framework("pytorch")
            graph = front_end.convert(front_end.load(traced))  # ``traced`` must outlive this call
        config = {"INFERENCE_PRECISION_HINT": _PRECISION_HINTS[precision], "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads())}
        self.compiled = openvino.Core().compile_model(graph, "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        outputs = []
        for image in images.detach().to("cpu", torch.float32):
            result = self.request.infer({0: image[None].contiguous().numpy()})
            outputs.append(torch.from_numpy(result[0].copy()))
        return torch.cat(outputs)
