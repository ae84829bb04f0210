"""The box mode an adapter's "auto" runs, chosen on the validation cases from one ROI.

For the base model "auto" runs crossed boxes (``crossing``), which beat tracked boxes on the 3D
accuracy benchmark. An adapter learns the slices of its own axis: with the planes decoded by the
base model and the slices by the adapter, crossed boxes scored about as the adapter's own tracking
with the hippocampus adapters of 5 and 10 cases (-0.011 to +0.006), above it with those of 1 case
(+0.012 to +0.063), and the validation cases ranked the two modes as the test cases did wherever
they differed by more than 0.006 (docs/accuracy.md). So once the tracking options are chosen
(``tracking_choice.choose_tracking``), the validation cases are segmented once more with crossed
boxes, as a user would get them (the chosen smoothing, the planes by the base model), and crossed
boxes are kept only where they score higher; the card carries the choice (``inference.box_mode``),
which the Segmenter's "auto" honours.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

import numpy as np

from ..catalogue import VALIDATION_ROI_MARGIN
from ..imaging import box_region
from ..metrics import dice_score
from ..progress import check_cancel, report
from .shared_embeddings import segmenter_from_dataset
from .tracking_choice import card_tracking, tracked_structures


def choose_box_mode(model, decoder, prompt_encoder, info, cases: List[str], config, choice: Dict[str, Any],
                    cache_dir: Optional[str], progress=None, cancel=None) -> Dict[str, Any]:
    """``choice`` (a tracking choice of this adapter) with "dice_crossed", the mean 3D Dice of
    crossed boxes from the same ROIs, "dice_tracked", the chosen tracking's (smoothed as it
    chose), and "box_mode", crossed where it scored higher, else tracked. ``decoder`` (and a
    trained ``prompt_encoder``, or None) decode the slices while it runs; the model is left as it
    was."""
    from ..evaluate import roi_box
    from ..models import decoding_with
    from ..segmenter import Segmenter

    structures = [found for case in cases for found in tracked_structures(info.case(case), config)]
    # Made before the adapter is in place, so the segmenter decodes the planes with the base model.
    segmenter = Segmenter(model, window_margin=config.window_margin)
    segmenter.tracking = dataclasses.replace(segmenter.tracking, **card_tracking(choice))
    scores: List[float] = []
    with decoding_with(model, decoder, prompt_encoder or model.prompt_encoder):
        for image, mask, axis in structures:
            check_cancel(cancel)
            box = roi_box(mask, VALIDATION_ROI_MARGIN)
            segmenter_from_dataset(segmenter, image, axis, config.window, box, cache_dir)
            result = segmenter.segment(image, box, axis=axis, window=config.window, box_mode="crossed",
                                       multimask=False, cancel=cancel)
            region = box_region(box)  # holds the result and the reference
            scores.append(dice_score(result.mask[region] > 0, mask[region]))
            report(progress, len(scores), len(structures),
                   f"weighing crossed boxes: {len(scores)}/{len(structures)} validation runs from one ROI")
    crossed, tracked = float(np.mean(scores)), _tracked_as_used(choice)
    return dict(choice, dice_crossed=crossed, dice_tracked=tracked,
                box_mode="crossed" if crossed > tracked else "tracked")


def _tracked_as_used(choice: Dict[str, Any]) -> float:
    """The mean 3D Dice of tracked boxes at the chosen margin, smoothed as the choice smooths."""
    px = str(choice["min_margin_px"])
    return float(choice["dice"][px] if choice["smooth_mm"] else choice["dice_unsmoothed"][px])


def choice_text(choice: Dict[str, Any]) -> str:
    """The training log's line for a box-mode choice."""
    return (f"box mode for this adapter, chosen from one ROI on the validation cases: {choice['box_mode']} "
            f"(3D Dice crossed {choice['dice_crossed']:.3f}, tracked {choice['dice_tracked']:.3f})")
