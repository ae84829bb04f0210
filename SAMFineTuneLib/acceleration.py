"""Speed-ups for the image encoder (and the mask decoder's attention) that keep their output (to bf16
rounding), on GPU and CPU.

On an H200, segment-anything's ViT-B encoder ran 17.6 ms per image at bf16 batch 8; fused
attention and channels-last memory brought it to 9.2 ms, and torch.compile on top to 3.8 ms
(embedding cosine similarity to float32 0.99997 in each case); docs/performance.md, "Segmentation
on a GPU", has the table.
Fused attention and channels-last cost nothing and are used on every CUDA model; compiling takes
20-30 s once per process, so it is asked for (``Segmenter(compile=True)``, ``--compile``) by
long-lived users such as the worker.

On a CPU, ``precision="bf16"`` runs the encoder with bf16 weights in channels-last memory: on
two cores with native bf16 (AVX512-BF16), a cold LiteMedSAM slice (its encoder costs 75 GFLOP)
went from 1.72 s to 0.61 s, and compiled (inductor fuses the element-wise work and pre-packs the
weights) to 0.48 s. It is not the CPU default, because it moved some results on real MR
(docs/performance.md, "Segmentation on a CPU"). On every device ``load_model`` folds the encoder's batch norms into its
convolutions (``fold_batch_norms``), which neither eager mode nor inductor did.
"""
from __future__ import annotations

import os
import shutil
import warnings

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from segment_anything.modeling.image_encoder import Attention
from segment_anything.modeling.transformer import Attention as DecoderAttention


def _relative_index(size: int, device: torch.device) -> torch.Tensor:
    """Row i, column j: where the offset i - j sits in a (2*size-1)-long relative-position table."""
    coords = torch.arange(size, device=device)
    return coords[:, None] - coords[None, :] + (size - 1)


class FusedAttention(Attention):
    """segment-anything's ViT attention through ``scaled_dot_product_attention``.

    The decomposed relative-position terms become the attention mask, so the softmax is fused
    and no float32 map of every token pair is written; the table lookup stays on the GPU
    (segment-anything's builds its index on the CPU, which stalls the stream at every layer).
    Only square, equal query/key grids occur in SAM's encoders, and only those are handled.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, tokens, head_dim]
        bias = None
        if self.use_rel_pos:
            rel_h = self.rel_pos_h[_relative_index(height, x.device)].to(q.dtype)
            rel_w = self.rel_pos_w[_relative_index(width, x.device)].to(q.dtype)
            grid_q = q.reshape(batch, self.num_heads, height, width, -1)
            along_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, rel_h)
            along_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, rel_w)
            bias = (along_h[..., :, None] + along_w[..., None, :]).reshape(
                batch, self.num_heads, height * width, height * width)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.view(batch, self.num_heads, height, width, -1).permute(0, 2, 3, 1, 4)
        return self.proj(out.reshape(batch, height, width, -1))


def _switch_class(root: nn.Module, old: type, new: type) -> int:
    """Give every module of exactly class ``old`` under ``root`` the class ``new`` (a subclass
    with another forward): parameters stay where they are, same names, same tensors."""
    count = 0
    for module in root.modules():
        if type(module) is old:
            module.__class__ = new
            count += 1
    return count


def fuse_attention(encoder: nn.Module) -> int:
    """Switch every segment-anything ViT attention block in ``encoder`` to FusedAttention;
    returns how many were switched."""
    return _switch_class(encoder, Attention, FusedAttention)


class FusedDecoderAttention(DecoderAttention):
    """segment-anything's mask-decoder attention through ``scaled_dot_product_attention``.

    Same projections (so LoRA on them works unchanged), same result to float rounding (masks
    within 2e-5); on a CPU a windowed decode ran 12% faster, since the softmax over every
    image token and prompt token pair is fused instead of written out.
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = self._separate_heads(self.q_proj(q), self.num_heads)
        k = self._separate_heads(self.k_proj(k), self.num_heads)
        v = self._separate_heads(self.v_proj(v), self.num_heads)
        return self.out_proj(self._recombine_heads(F.scaled_dot_product_attention(q, k, v)))


def fuse_decoder_attention(decoder: nn.Module) -> int:
    """Switch every attention of a segment-anything mask decoder to FusedDecoderAttention;
    returns how many were switched."""
    return _switch_class(decoder, DecoderAttention, FusedDecoderAttention)


def fold_batch_norms(root: nn.Module) -> int:
    """Fold each eval-mode (Conv2d, BatchNorm2d) pair held by a two-layer Sequential into one
    convolution; returns how many were folded.

    LiteMedSAM's TinyViT has 27 such pairs, the first ones over 256-channel maps of 256 x 256
    pixels. Inductor's freezing left them unfolded, so folding here
    is what saves their pass over memory, eager or compiled (docs/performance.md, "Segmentation on a CPU"). The
    result changes only by float rounding; the encoder is never trained, so no batch
    statistics are lost.
    """
    count = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            layers = list(child.children()) if isinstance(child, nn.Sequential) else []
            if (len(layers) == 2 and isinstance(layers[0], nn.Conv2d) and isinstance(layers[1], nn.BatchNorm2d)
                    and not any(layer.training for layer in layers)):
                setattr(parent, name, fuse_conv_bn_eval(*layers))
                count += 1
    return count


def prepare_for_cuda(encoder: nn.Module) -> None:
    """Fused attention and channels-last memory (cuDNN's fast layout for bf16 convolutions) for an
    image encoder on CUDA (``SamModel.accelerate``)."""
    fuse_attention(encoder)
    encoder.to(memory_format=torch.channels_last)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX tiles)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def prepare_for_cpu(encoder: nn.Module) -> None:
    """bf16 weights and channels-last memory for an image encoder on a CPU (precision "bf16",
    ``SamModel.configure_encoder``). The decoder stays float32: it is small, and it trains in float32.
    """
    if not cpu_has_native_bf16():
        warnings.warn("this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 encoding will be emulated and "
                      "slower than float32", stacklevel=4)
    encoder.to(dtype=torch.bfloat16, memory_format=torch.channels_last)


def cpp_compiler() -> str:
    """The C++ compiler torch.compile will use on a CPU, or '' when there is none."""
    for name in (os.environ.get("CXX", ""), "g++", "clang++", "c++", "cl"):
        if name and shutil.which(name):
            return name
    return ""


def pad_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """Pad a batch with blank images up to ``size``, so a compiled encoder sees one shape only."""
    if images.shape[0] >= size:
        return images
    blank = images.new_zeros((size - images.shape[0], *images.shape[1:]))
    return torch.cat([images, blank])
