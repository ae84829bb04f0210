"""One segmentation job's slices: cached embeddings in, masks on the slice out.

A ``SliceJob`` binds what a job decodes with (the model, the slice source and its crop, the
decode window, single- or multimask output) to the progress and cancel hooks, so the box modes
(``segmenter``) and tracking (``tracking``) ask for embeddings and masks without passing them on.
Decoding with a mask prompt (the previous slice's logits) goes through segment-anything's prompt
encoder and ``models.run_transformer`` directly, as ``SamModel.decode`` takes boxes only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from . import models
from .progress import CancelFn, ProgressFn, check_cancel, report

Box2D = Tuple[int, int, int, int]
DEFAULT_WINDOW_MARGIN = 4  # tokens (16 px at LiteMedSAM's 256 input) around the box on a CPU


def check_window_margin(margin) -> None:
    """A ValueError unless ``margin`` is "auto", None or a whole number of tokens >= 0."""
    if margin is None or (isinstance(margin, str) and margin == "auto"):
        return
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
        raise ValueError(f"window_margin must be 'auto', None (decode the whole slice) or a whole number of "
                         f"tokens >= 0, got {margin!r}")


def resolve_window_margin(margin, device) -> Optional[int]:
    """The decode window on ``device``: "auto" -> DEFAULT_WINDOW_MARGIN on a CPU, None (the whole
    slice) on CUDA, where the whole slice decodes in under 1 ms; None and whole numbers pass through.
    Training and evaluation resolve it here too, so they decode as inference does."""
    check_window_margin(margin)
    if margin != "auto":
        return margin
    return None if torch.device(device).type == "cuda" else DEFAULT_WINDOW_MARGIN


@dataclass
class Decoded:
    """One slice's mask (slice pixels, clipped), SAM's predicted IoU for it, its place in its group
    of candidates, and its low-res logits [1,256,256] (the next slice's mask prompt)."""

    mask: np.ndarray
    score: float
    place: int = 0
    low_res: Optional[torch.Tensor] = None


def decode_with_masks(model, embeddings: torch.Tensor, boxes: torch.Tensor, mask_inputs: torch.Tensor,
                      multimask: bool, window_margin: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """A box and a mask prompt (low-res logits [B,1,256,256]) per image -> (low-res logits
    [B,1,256,256], predicted IoU [B]), as ``SamModel.decode``."""
    device = model.device
    boxes = boxes.to(device, torch.float32).reshape(-1, 1, 4)
    sparse, dense = model.prompt_encoder(points=None, boxes=boxes, masks=mask_inputs.to(device))
    windows = None if window_margin is None else models.token_windows(boxes, model.spec.input_size, window_margin)
    decoder = model.mask_decoder
    hs, image_tokens, iou = models.run_transformer(decoder, embeddings.to(device), model.dense_pe(), sparse, dense,
                                                   windows)
    return models.chosen_masks(decoder, hs, image_tokens, iou, multimask, windows)


@dataclass
class SliceJob:
    """The slices of one job: ``embed`` from the segmenter's cache, ``decode`` with boxes."""

    embedder: Callable  # Segmenter._embed
    source: object  # zoom.SliceSource
    multimask: bool
    window_margin: Optional[int]
    batch_size: int = 1  # slices encoded per call
    progress: Optional[ProgressFn] = None
    cancel: Optional[CancelFn] = None
    counter: Dict[str, float] = field(default_factory=dict)

    @property
    def model(self):
        return self.source.model

    def embed(self, indices: Sequence[int]) -> Dict[int, torch.Tensor]:
        return self.embedder(self.source, list(indices), self.progress, self.cancel, self.counter)

    def step(self, count: int, message: str) -> None:
        self.counter["done"] += count
        report(self.progress, int(self.counter["done"]), int(self.counter["total"]), message)

    def decode(self, embeddings: List[torch.Tensor], boxes: List[Box2D], clip: Box2D, windowed: bool = True,
               best_of: int = 1, mask_inputs: Optional[torch.Tensor] = None) -> List[Decoded]:
        """Decode several slices in one batch; masks are clipped to ``clip`` (slice pixels). With
        ``best_of`` > 1 the boxes come in groups of that many and only the most confident of each
        group is kept (and upscaled)."""
        geometry, model = self.source.geometry, self.model
        model_boxes = torch.tensor([geometry.box_to_model(box) for box in boxes], dtype=torch.float32)
        margin = self.window_margin if windowed else None
        with torch.inference_mode():
            stacked = torch.stack(embeddings)
            if mask_inputs is not None:
                low_res, iou = decode_with_masks(model, stacked, model_boxes, mask_inputs, self.multimask, margin)
                place = torch.zeros_like(iou, dtype=torch.long)
            elif best_of > 1:
                low_res, iou, place = model.decode_best(stacked, model_boxes, best_of, multimask=self.multimask,
                                                        window_margin=margin)
            else:
                low_res, iou = model.decode(stacked, model_boxes, multimask=self.multimask, window_margin=margin)
                place = torch.zeros_like(iou, dtype=torch.long)
            logits = geometry.logits_to_slices(model.upscale_logits(low_res)[:, 0])
        return [Decoded(mask, float(score), int(pick), low_res[n]) for n, (mask, score, pick)
                in enumerate(zip(self._paste(logits, clip), iou.tolist(), place.tolist()))]

    def decode_boxes(self, boxes: Mapping[int, Box2D], clip: Box2D) -> Dict[int, np.ndarray]:
        """Each slice {index: box} decoded with its own box, masks clipped to ``clip``; embeddings
        are fetched a few batches at a time, so cancel is checked between chunks."""
        masks: Dict[int, np.ndarray] = {}
        slices = list(boxes)
        step = self.batch_size * 2
        for start in range(0, len(slices), step):
            chunk = slices[start:start + step]
            embeddings = self.embed(chunk)
            check_cancel(self.cancel)
            decoded = self.decode([embeddings[i] for i in chunk], [boxes[i] for i in chunk], clip)
            for index, result in zip(chunk, decoded):
                masks[index] = result.mask
            self.step(len(chunk), f"segmented slice {chunk[-1]}")
        return masks

    def decode_again(self, boxes: Mapping[int, Box2D], clip: Box2D) -> Dict[int, np.ndarray]:
        """``decode_boxes`` for a further pass over slices the job has already counted once (a
        check, a second prompt): its slices join the job's total, so progress stays truthful."""
        self.counter["total"] += len(boxes)
        return self.decode_boxes(boxes, clip)

    def _paste(self, logits: torch.Tensor, clip: Box2D) -> List[np.ndarray]:
        """Logits on the crop's pixels -> boolean masks on the whole slice, inside ``clip`` only."""
        (row, col), (height, width) = self.source.geometry.origin, self.source.geometry.shape
        x0, y0 = max(clip[0], col), max(clip[1], row)
        x1, y1 = min(clip[2], col + width - 1), min(clip[3], row + height - 1)
        inside = (logits[:, y0 - row:y1 - row + 1, x0 - col:x1 - col + 1] > 0).cpu().numpy()
        masks = []
        for plane in inside:
            mask = np.zeros(self.source.shape, dtype=bool)
            mask[y0:y1 + 1, x0:x1 + 1] = plane
            masks.append(mask)
        return masks
