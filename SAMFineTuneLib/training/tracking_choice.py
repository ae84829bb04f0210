"""The tracking margin an adapter is used with, chosen on the validation cases from one ROI.

Tracking prompts each next slice with the previous mask's box grown by a margin. The base model
fills the box it is given, so its margin is tight (``catalogue.TRACKING_DEFAULTS``: on real CT a
looser one lost Dice). An adapter trained on the prompts tracking asks with stops filling boxes,
and then a tight box cuts a structure off where it widens and tracking drifts onto a neighbour:
on held-out hippocampus cases three adapters gained 0.05-0.11 Dice from one ROI with a looser
box, while the base model lost (docs/finetuning.md). The best margin is a property of the
adapter and of the user's structure, so it is chosen on the run's own validation cases, the way
inference uses it: each case segmented from one loose ROI by the tracked mode, once per
candidate (``catalogue.ADAPTER_TRACKING_MARGINS_PX``); ties keep the default. A 2D proxy (tracked
boxes from the reference's neighbouring slice) always preferred the tightest box, so it is not
used. An adapter trained on loose ROIs also ranks its seed candidates by area and checks its
tracked result by its answer to the ROI on every slice (``catalogue.ADAPTER_ROI_TRACKING``), in
the choice as in use; its result is smoothed in 3D unless that lowers the validation Dice at the
margin chosen (smoothing lifted hippocampus adapters, but a structure thin against its voxels
loses its rim, so the user's own cases decide; the same runs score both). The choice goes into the
model card (``inference.tracking``), which ``Segmenter`` honours.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

import numpy as np

from .. import postprocess
from ..catalogue import ADAPTER_ROI_TRACKING, ADAPTER_TRACKING_MARGINS_PX, TRACKING_DEFAULTS, VALIDATION_ROI_MARGIN
from ..imaging import box_region
from ..metrics import dice_score
from ..progress import check_cancel, report
from .shared_embeddings import segmenter_from_dataset


def choose_tracking(model, decoder, prompt_encoder, info, cases: List[str], config, cache_dir: Optional[str],
                    progress=None, cancel=None) -> Optional[Dict[str, Any]]:
    """The card's record of the choice: {"min_margin_px": chosen, each of ``ADAPTER_ROI_TRACKING``'s
    options, "dice": {candidate: mean 3D Dice}, "dice_unsmoothed": the same without smoothing,
    "roi_margin", "structures"}; None when no validation case spans 3 slices along the axis (2D
    images: there is nothing to track). ``decoder`` (and a trained ``prompt_encoder``, or None)
    stand in for the model's own while it runs; the model is left as it was."""
    from ..evaluate import roi_box
    from ..models import decoding_with
    from ..segmenter import Segmenter

    structures = [found for case in cases for found in tracked_structures(info.case(case), config)]
    if not structures:
        return None
    # An adapter trained on loose ROIs answers the ROI with the structure (tracking.TrackingOptions).
    answers_roi = config.roi_prompts > 0
    ruled = dict(ADAPTER_ROI_TRACKING) if answers_roi else {key: TRACKING_DEFAULTS[key] for key in ADAPTER_ROI_TRACKING}
    with decoding_with(model, decoder, prompt_encoder or model.prompt_encoder):
        segmenter = Segmenter(model, window_margin=config.window_margin)
        dice: Dict[int, List[float]] = {px: [] for px in ADAPTER_TRACKING_MARGINS_PX}
        plain: Dict[int, List[float]] = {px: [] for px in ADAPTER_TRACKING_MARGINS_PX}
        runs, done = len(structures) * len(dice), 0
        for image, mask, axis in structures:
            box = roi_box(mask, VALIDATION_ROI_MARGIN)
            segmenter_from_dataset(segmenter, image, axis, config.window, box, cache_dir)
            for px in dice:
                check_cancel(cancel)
                segmenter.tracking = dataclasses.replace(segmenter.tracking, min_margin_px=px,
                                                         **dict(ruled, smooth_mm=0.0))
                result = segmenter.segment(image, box, axis=axis, window=config.window, box_mode="tracked",
                                           multimask=False)
                region = box_region(box)  # holds the result and the reference
                plain[px].append(dice_score(result.mask[region] > 0, mask[region]))
                dice[px].append(_smoothed_dice(result.mask[region], mask[region], image.spacing, ruled["smooth_mm"]))
                done += 1
                report(progress, done, runs, f"choosing the tracking margin: {done}/{runs} validation runs from one "
                       "ROI")
    means = {px: float(np.mean(scores)) for px, scores in dice.items()}
    unsmoothed = {px: float(np.mean(scores)) for px, scores in plain.items()}
    default = TRACKING_DEFAULTS["min_margin_px"]
    best = max(means, key=lambda px: (means[px], px == default))
    smooth_mm = ruled["smooth_mm"] if means[best] >= unsmoothed[best] else 0.0
    return {"min_margin_px": int(best), **ruled, "smooth_mm": smooth_mm, "dice": {str(px): means[px] for px in means},
            "dice_unsmoothed": {str(px): unsmoothed[px] for px in unsmoothed}, "roi_margin": VALIDATION_ROI_MARGIN,
            "structures": len(structures)}


def _smoothed_dice(result: np.ndarray, mask: np.ndarray, spacing_xyz, smooth_mm: float) -> float:
    """A tracked result's 3D Dice once smoothed by ``smooth_mm``, as the Segmenter smooths it inside
    its ROI; as it is when ``smooth_mm`` is 0. Both are the ROI's block, which holds the result and
    the reference: copies of a whole 600-slice CT's masks took seconds and a gigabyte."""
    smoothed = postprocess.smooth(result, smooth_mm, tuple(spacing_xyz)[::-1]) if smooth_mm > 0 else result
    return dice_score(smoothed > 0, mask)


#: The tracking options ``choose_tracking`` decides, which the card carries to the Segmenter.
CHOSEN_OPTIONS = ("min_margin_px",) + tuple(ADAPTER_ROI_TRACKING)


def smoothing_text(choice: Dict[str, Any]) -> str:
    """What the choice did about smoothing, for the training log ('' when it did not weigh it)."""
    px = str(choice["min_margin_px"])
    smoothed, unsmoothed = choice["dice"][px], choice["dice_unsmoothed"][px]
    if smoothed == unsmoothed and not choice["smooth_mm"]:
        return ""
    verdict = f"smoothed by {choice['smooth_mm']:g} mm" if choice["smooth_mm"] else "not smoothed"
    return f"; {verdict} (3D Dice {smoothed:.3f} smoothed, {unsmoothed:.3f} as decoded)"


def choice_text(choice: Dict[str, Any]) -> str:
    """The training log's line for a choice."""
    scores = ", ".join(f"{px} px {dice:.3f}" for px, dice in choice["dice"].items())
    return (f"tracking margin for this adapter, chosen from one ROI on the validation cases: "
            f"{choice['min_margin_px']} px (3D Dice {scores})" + smoothing_text(choice))


def card_tracking(choice: Dict[str, Any]) -> Dict[str, Any]:
    """The card's ``inference.tracking`` for a choice: the options it decided, nothing of its record."""
    return {key: choice[key] for key in CHOSEN_OPTIONS}


def tracked_structures(entry, config):
    """(image, mask, axis) of each chosen label of a case that spans at least 3 slices along the
    axis the case is sliced along."""
    from ..dataset import load_case
    from ..imaging import label_values, slices_holding

    image, label = load_case(entry)
    array = np.asarray(label.array)
    axis = entry.slicing_axis(config.axis)
    for value in config.labels or label_values(array):
        mask = array == value
        if slices_holding(mask, axis).size >= 3:
            yield image, mask, axis
