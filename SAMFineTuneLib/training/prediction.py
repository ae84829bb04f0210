"""Masks and per-case scores of prepared slices, for the base model or an adapted decoder."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..metrics import DEFAULT_TOLERANCE_MM, score_cases
from .boxes import loose_boxes
from .decoder_step import DecoderStep
from .samples import Prepared, batch_embeddings


def predict_masks(model, prepared: Prepared, step: Optional[DecoderStep] = None, batch_size: int = 16,
                  box_margin: float = 0.0, window_margin: Optional[int] = None) -> List[np.ndarray]:
    """Binary masks in slice pixels for every prepared sample, prompted with its tight box, or
    with the box grown by ``box_margin`` x its side on every edge (a user's loose box).

    ``step`` is the decoder to use (None: the model's own). ``window_margin``: decode only the
    tokens this close to each box (None: the whole slice); give base and adapted decoders the
    same margin to compare them."""
    step = step or DecoderStep(model, model.mask_decoder, None)
    boxes = loose_boxes(prepared, box_margin) if box_margin else prepared.boxes
    out: List[np.ndarray] = []
    was_training = step.training
    step.eval()
    with torch.no_grad():
        for start in range(0, len(prepared), batch_size):
            index = slice(start, start + batch_size)
            embeddings = batch_embeddings(model, prepared, torch.arange(len(prepared))[index])
            low, _ = step(embeddings, boxes[index].to(embeddings.device), window_margin=window_margin)
            logits = model.upscale_logits(low.float())
            for n, geometry in enumerate(prepared.geometries[index]):
                out.append(geometry.logits_to_slice(logits[n, 0]) > 0)
    step.train(was_training)
    return out


def score_prepared(model, prepared: Prepared, step: Optional[DecoderStep] = None,
                   tolerance_mm: float = DEFAULT_TOLERANCE_MM, box_margin: float = 0.0,
                   window_margin: Optional[int] = None) -> Dict[str, Any]:
    """Per-case metrics (3D, per label) of the decoder in ``step`` (None = the base model),
    decoding the tokens within ``window_margin`` of each box (None = the whole slice)."""
    predictions = predict_masks(model, prepared, step, box_margin=box_margin, window_margin=window_margin)
    return score_cases(prepared.samples, predictions, tolerance_mm)
