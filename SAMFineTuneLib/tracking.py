"""Tracked boxes: follow a structure from slice to slice inside one ROI.

A user draws one ROI, but a structure's outline on its end slices is far smaller than the ROI,
and SAM given a loose box fills the box. Tracking starts on the slice where the ROI's rectangle
fits best (the seed), decodes each next slice with the previous mask's box, grown a little, and
stops where the structure has ended.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from . import imaging
from .catalogue import TRACKING_DEFAULTS
from .decoding import Box2D, Decoded, SliceJob
from .progress import check_cancel


@dataclass
class TrackingOptions:
    """Where tracking starts, how it follows a structure from slice to slice, and when it gives up.

    It starts on the best-fitting of ``seed_candidates`` slices spread over the ROI (see ``seed``).
    Each next slice is decoded with the previous mask's box grown by ``margin`` (a fraction of its
    size, at least ``min_margin_px``): a box much larger than the structure makes SAM fill the box,
    one too tight cuts it off where it widens. Tracking stops where the structure has ended: the
    mask is empty or below ``min_area_fraction`` of the seed's area, it is more than
    ``max_growth`` times the previous mask, less than ``min_overlap`` of it lies on the previous
    mask, or its mean intensity moved from the previous mask's by more than ``max_intensity_shift``
    (in window units) and by more than ``intensity_spread`` standard deviations of the previous
    mask's intensities (SAM has jumped to a neighbouring tissue; a textured or noisy structure, as
    on MR, moves its mean further from slice to slice without leaving it).

    The seed: ``seed_span`` is where the candidates lie, as fractions of the ROI's slices;
    ``seed_shrink`` also tries the ROI shrunk by these fractions of its size per side;
    ``seed_refine`` re-decodes the seed with its own mask's box this many times;
    ``seed_area_weight`` ranks the candidates by predicted IoU x mask area ** weight instead of
    predicted IoU alone (0). The base model fills any box it is given, so area says nothing about
    its candidates; an adapter trained on loose ROIs (``training.prompts``) answers the ROI with
    the structure, largest where the structure is widest, while its most confident candidate was
    at times a small piece of another tissue, which tracking then followed (docs/finetuning.md).
    Training sets it for such adapters in their card, and ``fixed_fallback`` too: such an adapter
    also answers the ROI on every slice (box mode fixed) with the structure, so where that answer
    and the tracked result agree below this 3D Dice, tracking followed another tissue or stopped
    early and the fixed answer is returned instead; above it, only the voxels both answers keep
    (0: never checked; the base model fills the ROI on every slice). ``own_box_px`` > 0 ends tracking
    and propagation with every kept slice decoded again with its own mask's box grown by that many
    pixels: tracking's box comes from the neighbouring slice, and such an adapter, trained on
    jittered reference boxes, answers best a box close around the structure (0: no such pass; the
    base model would grow into the margin). ``smooth_mm`` > 0 smooths the surface of what either
    ROI box mode returns in 3D (``postprocess.smooth``): such an adapter's slices, each decoded on
    its own, step where the structure's surface does not (0: none, the base model's: a Gaussian as
    wide as a 3 mm CT voxel took thin structures' rims). Following:
    ``mask_prompt`` gives SAM the previous slice's logits with its box; ``min_score`` says the
    structure has ended where SAM's predicted IoU falls below it; ``patience`` is how many slices
    in a row may fail the rules before tracking gives up (gaps, re-entry). The defaults are the
    catalogue's (``TRACKING_DEFAULTS``).

    One box per slice, grown by 5%: two candidates per slice (the box, and the box grown by 15%,
    SAM's predicted IoU picking one) cost twice the decoding and scored lower on aggregate on real
    CT and MR.
    """

    margin: float = TRACKING_DEFAULTS["margin"]
    min_margin_px: int = TRACKING_DEFAULTS["min_margin_px"]
    min_area_fraction: float = TRACKING_DEFAULTS["min_area_fraction"]
    max_growth: float = TRACKING_DEFAULTS["max_growth"]
    min_overlap: float = TRACKING_DEFAULTS["min_overlap"]
    max_intensity_shift: float = TRACKING_DEFAULTS["max_intensity_shift"]
    intensity_spread: float = TRACKING_DEFAULTS["intensity_spread"]
    seed_candidates: int = TRACKING_DEFAULTS["seed_candidates"]
    seed_span: Tuple[float, float] = TRACKING_DEFAULTS["seed_span"]
    seed_shrink: Tuple[float, ...] = TRACKING_DEFAULTS["seed_shrink"]
    seed_refine: int = TRACKING_DEFAULTS["seed_refine"]
    seed_area_weight: float = TRACKING_DEFAULTS["seed_area_weight"]
    fixed_fallback: float = TRACKING_DEFAULTS["fixed_fallback"]
    mask_prompt: bool = TRACKING_DEFAULTS["mask_prompt"]
    min_score: Optional[float] = TRACKING_DEFAULTS["min_score"]
    patience: int = TRACKING_DEFAULTS["patience"]
    own_box_px: int = TRACKING_DEFAULTS["own_box_px"]
    smooth_mm: float = TRACKING_DEFAULTS["smooth_mm"]


def next_box(previous: np.ndarray, roi: Box2D, options: TrackingOptions) -> Box2D:
    """The previous slice's mask box, grown by the tracking margin and kept inside the ROI."""
    return tracking_box(imaging.mask_box(previous), roi, options)


def tracking_box(box: Box2D, roi: Box2D, options: TrackingOptions) -> Box2D:
    """A 2D ``box`` grown by the tracking margin (``margin`` of its size, at least
    ``min_margin_px``), kept inside the ROI: the prompt the model in use tracks with."""
    x0, y0, x1, y1 = box
    grow_x = max(options.min_margin_px, int(round(options.margin * (x1 - x0 + 1))))
    grow_y = max(options.min_margin_px, int(round(options.margin * (y1 - y0 + 1))))
    return imaging.grown_box((x0, y0, x1, y1), grow_x, grow_y, roi)


def own_boxes(masks: Dict[int, np.ndarray], roi: Box2D, px: int) -> Dict[int, Box2D]:
    """Each non-empty slice's own mask box grown by ``px`` inside the ROI
    (``TrackingOptions.own_box_px``)."""
    return {index: imaging.grown_box(imaging.mask_box(mask), px, px, roi)
            for index, mask in masks.items() if mask.any()}


def keeps_tracking(decoded: Decoded, previous: np.ndarray, seed_area: int, plane: np.ndarray,
                   previous_plane: np.ndarray, options: TrackingOptions) -> bool:
    mask = decoded.mask
    area, previous_area = int(mask.sum()), int(previous.sum())
    if area == 0 or area < options.min_area_fraction * seed_area or area > options.max_growth * previous_area:
        return False
    if np.logical_and(mask, previous).sum() < options.min_overlap * area:
        return False
    if options.min_score is not None and decoded.score < options.min_score:
        return False
    inside = previous_plane[previous]
    shift = abs(float(plane[mask].mean()) - float(inside.mean()))
    return shift <= max(options.max_intensity_shift, options.intensity_spread * float(inside.std()))


def shrunk(roi: Box2D, fraction: float) -> Box2D:
    """The ROI with ``fraction`` of its width and height taken off each side."""
    x0, y0, x1, y1 = roi
    dx, dy = int(round(fraction * (x1 - x0 + 1))), int(round(fraction * (y1 - y0 + 1)))
    return (x0 + dx, y0 + dy, max(x0 + dx, x1 - dx), max(y0 + dy, y1 - dy))


def seed(job: SliceJob, slices: List[int], roi: Box2D, options: TrackingOptions) -> Tuple[int, Decoded]:
    """The slice to start tracking from, and its decode.

    The ROI's rectangle fits the structure best on the slice where the structure is widest,
    and SAM's predicted IoU is highest where its box fits; so the ROI box is decoded on a few
    slices spread over the range and the most confident one wins. (The middle slice alone
    fails when the structure is cut by the volume's edge or lies off-centre in the ROI.)
    """
    count = min(len(slices), options.seed_candidates)
    picks = sorted({slices[int(round(p))] for p in np.linspace(*options.seed_span, count) * (len(slices) - 1)})
    boxes = [roi] + [shrunk(roi, f) for f in options.seed_shrink]
    embeddings = job.embed(picks)
    # The seed decides everything after it, so it is decoded over the whole slice even when
    # tracking decodes windows: a windowed seed lost the MR stomach (Dice 0.007 vs 0.484), and
    # even a window 16 tokens around the ROI lost the MR right kidney (0.002 vs 0.634).
    pairs = [(index, box) for index in picks for box in boxes]
    candidates = [embeddings[i] for i, _ in pairs], [b for _, b in pairs]
    if options.seed_area_weight > 0:
        decoded = job.decode(*candidates, roi, windowed=False)
        ranks = [(d.score * float(d.mask.sum()) ** options.seed_area_weight, d.score) for d in decoded]
        place = max(range(len(decoded)), key=ranks.__getitem__)  # all empty: the most confident
        best = decoded[place]
    else:  # only the most confident candidate is upscaled
        best, = job.decode(*candidates, roi, windowed=False, best_of=len(pairs))
        place = best.place
    index = pairs[place][0]
    for _ in range(options.seed_refine):
        if not best.mask.any():
            break
        refined, = job.decode([embeddings[index]], [next_box(best.mask, roi, options)], roi, windowed=False)
        if refined.score < best.score:
            break
        best = refined
    return index, best


def follow(job: SliceJob, ahead: List[int], start: Decoded, start_index: int, seed_area: int, roi: Box2D,
           options: TrackingOptions, masks: Dict[int, np.ndarray]) -> None:
    """Track from ``start`` over the slices ``ahead`` (nearest first) until the structure ends:
    more than ``options.patience`` slices in a row that fail ``keeps_tracking``."""
    source = job.source
    previous, previous_plane = start, source.windowed(start_index)
    misses = 0
    for first in range(0, len(ahead), job.batch_size):
        chunk = ahead[first:first + job.batch_size]
        embeddings = job.embed(chunk)
        for index in chunk:
            check_cancel(job.cancel)
            prompt: Optional[torch.Tensor] = (previous.low_res[None] if options.mask_prompt
                                              and previous.low_res is not None else None)
            decoded, = job.decode([embeddings[index]], [next_box(previous.mask, roi, options)], roi,
                                  mask_inputs=prompt)
            plane = source.windowed(index)
            job.step(1, f"tracked slice {index}")
            if not keeps_tracking(decoded, previous.mask, seed_area, plane, previous_plane, options):
                misses += 1
                if misses > options.patience:
                    return
                continue
            masks[index] = decoded.mask
            previous, previous_plane, misses = decoded, plane, 0


def track(job: SliceJob, slices: List[int], roi: Box2D, options: TrackingOptions) -> Dict[int, np.ndarray]:
    """Start where the ROI box fits best and follow the structure outwards, slice by slice."""
    seed_index, start = seed(job, slices, roi, options)
    job.step(1, f"seed slice {seed_index}")
    masks = {seed_index: start.mask}
    if not start.mask.any():
        return masks
    seed_area = int(start.mask.sum())
    for direction in (1, -1):
        ahead = sorted((i for i in slices if (i - seed_index) * direction > 0), key=lambda i: abs(i - seed_index))
        follow(job, ahead, start, seed_index, seed_area, roi, options, masks)
    return masks


def tracked_mode(job: SliceJob, slices: List[int], roi: Box2D, options: TrackingOptions) -> Dict[int, np.ndarray]:
    """The tracked box mode: ``track``, then the checks ``options`` turn on (the ROI decoded on
    every slice, each kept slice decoded again in its own box)."""
    masks = track(job, slices, roi, options)
    if options.fixed_fallback > 0:
        fixed = job.decode_again({index: roi for index in slices}, roi)
        masks, job.counter["fixed_fallback"] = checked_by_fixed(masks, fixed, options.fixed_fallback)
    if options.own_box_px > 0:
        masks = in_own_boxes(job, masks, roi, options.own_box_px)
    return masks


def in_own_boxes(job: SliceJob, masks: Dict[int, np.ndarray], roi: Box2D, px: int) -> Dict[int, np.ndarray]:
    """Each non-empty slice of ``masks`` decoded again with its own box (``TrackingOptions.own_box_px``)."""
    return {**masks, **job.decode_again(own_boxes(masks, roi, px), roi)}


def disagree(first: Dict[int, np.ndarray], second: Dict[int, np.ndarray], agreement: float) -> bool:
    """Whether two results, masks by slice, overlap below ``agreement`` 3D Dice (two empty ones agree)."""
    from .metrics import dice_score

    slices = sorted(set(first) | set(second))
    if not slices:
        return False
    empty = np.zeros_like(next(iter({**first, **second}.values())))
    stacked = [np.stack([result.get(index, empty) for index in slices]) for result in (first, second)]
    return dice_score(*stacked) < agreement


def checked_by_fixed(tracked: Dict[int, np.ndarray], fixed: Dict[int, np.ndarray],
                     agreement: float) -> Tuple[Dict[int, np.ndarray], bool]:
    """An adapter's tracked result checked against its answer to the ROI on every slice
    (``TrackingOptions.fixed_fallback``), and whether tracking lost the structure: below
    ``agreement`` (3D Dice) it did and ``fixed`` is returned, else the voxels both answers keep,
    which trims what either adds on its own (one ROI +0.013 on the test cases over three draws of
    hippocampus adapters, docs/finetuning.md)."""
    if disagree(tracked, fixed, agreement):
        return fixed, True
    return both_keep(tracked, fixed), False


def both_keep(tracked: Dict[int, np.ndarray], fixed: Dict[int, np.ndarray]) -> Dict[int, np.ndarray]:
    """Each slice of ``tracked`` trimmed to what ``fixed`` also keeps there."""
    return {index: (mask > 0) & (fixed[index] > 0) for index, mask in tracked.items()}


def card_overrides(card: Dict, adapter_dir: str) -> Dict[str, object]:
    """The tracking options an adapter's card asks for (``inference.tracking``, written by
    ``training.tracking_choice``); a ValueError naming the adapter for anything other than a
    numeric ``TrackingOptions`` field with a value of its kind."""
    asked = card.get("inference", {}).get("tracking") or {}
    numbers = {name: type(value) for name, value in vars(TrackingOptions()).items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    for name, value in asked.items():
        kind = numbers.get(name)
        if (kind is None or isinstance(value, bool) or not isinstance(value, (int, float))
                or (kind is int and value != int(value))):
            raise ValueError(f"adapter {adapter_dir}: its model card sets tracking option {name} = {value!r} "
                             "(inference.tracking), which is not a number tracking takes there; remove it or train "
                             "the adapter again")
    return {name: numbers[name](value) for name, value in asked.items()}
