"""Batched mask decoding with segment-anything's decoder: N images with one prompt each, and
windows of the token grid.

segment-anything's ``predict_masks`` repeats every image embedding once per prompt, which
turns N images x N boxes into N*N decodes; here image i is paired with prompt i only. The
decoder's own sub-modules are used, so a LoRA-wrapped or merged decoder works unchanged.
SAM's decoder costs in proportion to the image tokens it attends to, so a box on a fifth of
the slice can decode only the tokens near it (a window); outside, the mask is background.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List, Optional, Tuple

import torch

from segment_anything.modeling import MaskDecoder

from .registry import EMBED_SIZE

Window = Tuple[int, int, int, int]  # rows r0:r1, columns c0:c1 of the 64x64 token grid
LOW_RES_PER_TOKEN = 4  # the decoder upscales its token grid 4x into low-res logits
OUTSIDE_WINDOW_LOGIT = -32.0  # "surely background" for pixels a windowed decode did not compute
# On a CPU the decoder runs at most one whole slice of image tokens per call: five whole slices
# one at a time took 192 ms against 241 ms in one batch (its activations stay in the caches),
# while small windows still gain from batching (two 25x25-token windows: 9.8 vs 11.8 ms).
CPU_DECODE_TOKENS = EMBED_SIZE * EMBED_SIZE


def token_windows(boxes: torch.Tensor, input_size: int, margin: int) -> List[Window]:
    """One window of the token grid per box: the box plus ``margin`` tokens, all the same size.

    Same-size windows let a batch of boxes decode as one tensor; a window that would cross the
    grid's edge is shifted inwards, never shrunk.
    """
    stride = input_size / EMBED_SIZE
    spans = []
    for x0, y0, x1, y1 in boxes.reshape(-1, 4).tolist():
        r0, c0 = max(0, int(y0 // stride) - margin), max(0, int(x0 // stride) - margin)
        r1 = min(EMBED_SIZE, int(-(-y1 // stride)) + margin)
        c1 = min(EMBED_SIZE, int(-(-x1 // stride)) + margin)
        spans.append((r0, max(r1, r0 + 1), c0, max(c1, c0 + 1)))
    height = max(r1 - r0 for r0, r1, _, _ in spans)
    width = max(c1 - c0 for _, _, c0, c1 in spans)
    windows = []
    for r0, _, c0, _ in spans:
        r0, c0 = min(r0, EMBED_SIZE - height), min(c0, EMBED_SIZE - width)
        windows.append((r0, r0 + height, c0, c0 + width))
    return windows


def _crop(grid: torch.Tensor, windows: List[Window]) -> torch.Tensor:
    """[B or 1, C, 64, 64] -> [len(windows), C, h, w], window n taken from item n (or the only item)."""
    return torch.stack([grid[n if grid.shape[0] > 1 else 0, :, r0:r1, c0:c1]
                        for n, (r0, r1, c0, c1) in enumerate(windows)])


def paste_windows(masks: torch.Tensor, windows: List[Window]) -> torch.Tensor:
    """Window logits [B,M,4h,4w] -> full low-res logits [B,M,256,256], background outside."""
    size = EMBED_SIZE * LOW_RES_PER_TOKEN
    full = masks.new_full((masks.shape[0], masks.shape[1], size, size), OUTSIDE_WINDOW_LOGIT)
    k = LOW_RES_PER_TOKEN
    for n, (r0, r1, c0, c1) in enumerate(windows):
        full[n, :, r0 * k:r1 * k, c0 * k:c1 * k] = masks[n]
    return full


def run_transformer(
    decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    windows: Optional[List[Window]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two-way transformer of a segment-anything mask decoder, N images with one prompt each
    -> (output tokens [B,T,256], image tokens [B,256,h,w], predicted IoU [B,4]).

    The IoU is known here, before any mask is upscaled (``upscale_masks``), so a caller that
    keeps only the most confident of several prompts upscales that one alone. With ``windows``,
    only those image tokens are decoded (see ``SamModel.decode``).
    """
    tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1)
    tokens = torch.cat([tokens, sparse], dim=1)
    if windows is None:
        src = image_embeddings + dense
        pos = image_pe
    else:
        src = _crop(image_embeddings, windows) + _crop(dense, windows)
        pos = _crop(image_pe, windows)
    b, c, h, w = src.shape
    # Channels-last, so the transformer's [B,C,h,w] -> [B,hw,C] view is contiguous: otherwise its
    # first projections take a slow copy-and-matmul path (a quarter of a CPU decode).
    src = src.contiguous(memory_format=torch.channels_last)
    pos = pos.contiguous(memory_format=torch.channels_last).expand(b, -1, -1, -1)
    hs, src = decoder.transformer(src, pos, tokens)
    return hs, src.transpose(1, 2).reshape(b, c, h, w), decoder.iou_prediction_head(hs[:, 0, :])


def chosen_token(iou: torch.Tensor, multimask: bool) -> torch.Tensor:
    """Which mask token each image keeps: the single-mask one (0), or the most confident of
    SAM's three multimask outputs (1-3)."""
    if not multimask:
        return torch.zeros(iou.shape[0], dtype=torch.long, device=iou.device)
    return iou[:, 1:].argmax(dim=1) + 1



def chosen_masks(decoder: MaskDecoder, hs: torch.Tensor, image_tokens: torch.Tensor, iou: torch.Tensor,
                 multimask: bool, windows: Optional[List[Window]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``run_transformer``'s outputs -> the kept mask token's low-res logits [B,1,4h,4w] (pasted
    into the whole frame when decoded in ``windows``) and its predicted IoU [B]."""
    token = chosen_token(iou, multimask)
    masks = upscale_masks(decoder, hs, image_tokens, token)
    return (masks if windows is None else paste_windows(masks, windows)), iou.gather(1, token[:, None])[:, 0]


def upscale_masks(decoder: MaskDecoder, hs: torch.Tensor, image_tokens: torch.Tensor,
                  token: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mask logits [B,M,4h,4w] from ``run_transformer``'s outputs: every mask token (M=4), or
    only mask token ``token[n]`` of image n (M=1). Upscaling is about a third of a decode."""
    upscaled = decoder.output_upscaling(image_tokens)
    hyper = torch.stack([mlp(hs[:, 1 + i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1)
    if token is not None:
        hyper = hyper[torch.arange(hyper.shape[0], device=hyper.device), token].unsqueeze(1)
    b, c, h, w = upscaled.shape
    return (hyper @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)


def predict_masks_batched(decoder: MaskDecoder, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                          sparse: torch.Tensor, dense: torch.Tensor,
                          windows: Optional[List[Window]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every mask [B,4,4h,4w] and its predicted IoU [B,4] for N images with one prompt each
    (``run_transformer``); with ``windows`` the masks cover the windows alone."""
    hs, image_tokens, iou = run_transformer(decoder, image_embeddings, image_pe, sparse, dense, windows)
    return upscale_masks(decoder, hs, image_tokens), iou


@contextmanager
def decoding_with(model, mask_decoder, prompt_encoder) -> Iterator[None]:
    """``model`` decodes with this mask decoder and prompt encoder inside the block (an adapter's,
    or the base model's while an adapter is in place), and with its own again after it, also when
    the block raises or is cancelled."""
    own = model.mask_decoder, model.prompt_encoder
    model.mask_decoder, model.prompt_encoder = mask_decoder, prompt_encoder
    try:
        yield
    finally:
        model.mask_decoder, model.prompt_encoder = own
