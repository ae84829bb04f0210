"""The SAM-family models SAMFineTune can drive, split as segment-anything splits ``modeling/``:

- ``registry``: the parts of each variant built from its spec (encoder, prompt encoder, decoder);
- ``sam_model``: ``SamModel``, one variant as a module, with batched encode/decode and the
  methods that set up its encoder's speed-ups;
- ``decoding``: batched decoding, one prompt per image, and windows of the token grid;
- ``checkpoints``: reading, fingerprinting and strictly loading weight files;
- ``loader``: ``build_model`` (as segment-anything builds it) and ``load_model`` (with speed-ups and
  the encoder's backend, ``resolve_backend``).
"""
from ..catalogue import BACKENDS, DEFAULT_MODEL, MODEL_SPECS, PRECISIONS, ModelSpec, get_spec
from .checkpoints import file_sha256, guess_architecture, load_state_strict, read_state_dict
from .decoding import (CPU_DECODE_TOKENS, LOW_RES_PER_TOKEN, OUTSIDE_WINDOW_LOGIT, Window, chosen_masks,
                       decoding_with, paste_windows, predict_masks_batched, run_transformer, token_windows,
                       upscale_masks)
from .loader import ModelLoader, build_model, load_model, resolve_backend, resolve_device
from .registry import (EMBED_DIM, EMBED_SIZE, build_image_encoder, build_mask_decoder, build_prompt_encoder,
                       normalise_unit_images)
from .sam_model import SamModel, check_encoder_options

__all__ = [
    "BACKENDS", "CPU_DECODE_TOKENS", "DEFAULT_MODEL", "EMBED_DIM", "EMBED_SIZE", "LOW_RES_PER_TOKEN", "MODEL_SPECS",
    "ModelLoader", "ModelSpec", "OUTSIDE_WINDOW_LOGIT", "PRECISIONS", "SamModel", "Window", "build_image_encoder",
    "build_mask_decoder", "build_model", "build_prompt_encoder", "check_encoder_options", "chosen_masks",
    "decoding_with", "file_sha256", "get_spec", "guess_architecture", "load_model", "load_state_strict",
    "normalise_unit_images", "paste_windows", "predict_masks_batched", "read_state_dict", "resolve_backend",
    "resolve_device", "run_transformer", "token_windows", "upscale_masks",
]
