"""Crossed boxes: a box on every slice from a few planes that cross the ROI along the other axes.

SAM given the structure's own box on every slice (the benchmark's "oracle") scores far above one
ROI, whose rectangle is loose on most slices; tracking a box from slice to slice drifts onto
neighbours. A plane across the ROI along another axis shows the structure's whole run along the
slicing axis, so its mask says on which slices the structure lies and how wide it is there. A
few such planes along each of the two other axes, decoded with the ROI's rectangle in their
plane, give every slice a box near the structure's own. With the reference's own planes those
boxes score within 0.01 of the oracle on CT and MR organs; with SAM's, they beat tracking on
aggregate at every ROI margin (docs/accuracy.md). The price: the planes are encoded too.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from . import imaging, tracking
from .catalogue import AXES, CROSSING_DEFAULTS
from .decoding import Box2D, SliceJob


def plane_indices(box: Sequence[int], other: str, fractions: Sequence[float] = CROSSING_DEFAULTS["planes"],
                  grid: int = CROSSING_DEFAULTS["grid"]) -> List[int]:
    """The planes along ``other`` that cross the 3D ``box``: near these fractions of its extent there,
    each put on the nearest multiple of a power of two about ``grid`` times smaller than that extent,
    so that a box moved or resized by a few voxels crosses at the same planes, whose embeddings the
    cache then holds (a re-prompt would otherwise encode every plane anew)."""
    slices, _ = imaging.box_to_slices(box, other)
    step = 2 ** int(np.log2(max(1.0, len(slices) / grid)))
    picks = (int(round((slices[0] + f * (len(slices) - 1)) / step)) * step for f in fractions)
    return sorted({min(max(pick, slices[0]), slices[-1]) for pick in picks})


def plane_voxels(other: str, planes: Mapping[int, np.ndarray]) -> np.ndarray:
    """The (k, j, i) voxels the 2D masks {index: mask} of planes along ``other`` hold, one row each."""
    rows = []
    for index, mask in planes.items():
        voxels = list(np.nonzero(mask))
        voxels.insert(AXES[other], np.full(len(voxels[0]), index))
        rows.append(np.stack(voxels, axis=1))
    return np.concatenate(rows) if rows else np.zeros((0, 3), dtype=int)


def slice_extents(voxels: np.ndarray, axis: str, slices: range) -> Tuple[np.ndarray, np.ndarray]:
    """The (column, row) extent of ``voxels`` (rows of k, j, i) on each slice of ``slices`` along
    ``axis``: lowest and highest, one row per slice; a slice they miss has highest -1."""
    along = AXES[axis]
    rows, cols = (n for n in range(3) if n != along)  # a slice's rows and columns, as extract_slice takes it
    at = voxels[:, along] - slices[0]
    inside = (at >= 0) & (at < len(slices))
    at, held = at[inside], voxels[inside][:, [cols, rows]]
    lowest = np.full((len(slices), 2), np.iinfo(np.int64).max, dtype=np.int64)
    highest = np.full((len(slices), 2), -1, dtype=np.int64)
    np.minimum.at(lowest, at, held)
    np.maximum.at(highest, at, held)
    return lowest, highest


def crossed_boxes(crossing: Mapping[str, Mapping[int, np.ndarray]], axis: str, slices: range,
                  roi: Box2D, grow: int = CROSSING_DEFAULTS["grow_px"]) -> Dict[int, Box2D]:
    """{slice: box} along ``axis`` from the masks of the planes crossing it ({other axis: {index:
    mask}}): on each slice that planes of both other axes reach, the box around what they hold
    there, grown by ``grow`` pixels and kept inside ``roi``. One other axis alone gives the
    structure's width in one direction only, so a slice only one reaches gets no box."""
    if len(crossing) < 2:
        return {}
    extents = [slice_extents(plane_voxels(other, planes), axis, slices) for other, planes in crossing.items()]
    lowest = np.minimum.reduce([low for low, _ in extents])
    highest = np.maximum.reduce([high for _, high in extents])
    reached = np.logical_and.reduce([high[:, 0] >= 0 for _, high in extents])
    return {slices[n]: tuple(int(v) for v in imaging.grown_box((*lowest[n], *highest[n]), grow, grow, roi))
            for n in np.flatnonzero(reached)}


PlaneDecoder = Callable[[str, Mapping[int, Box2D], Box2D], Dict[int, np.ndarray]]


def crossed_mode(job: SliceJob, decode_planes: PlaneDecoder, box: Sequence[int], axis: str,
                 fallback: Callable[[], Dict[int, np.ndarray]], own_box_px: int = 0) -> Dict[int, np.ndarray]:
    """The crossed box mode: the planes crossing ``box`` along the other two axes decoded with the
    ROI's rectangle there (``decode_planes(other, {index: box}, clip)`` decodes that axis's
    slices), then every slice they give a box decoded with it. Where they give none (no plane
    found the structure),
    ``fallback()``: the structure may lie between the planes, which tracking can still find; and
    ``fallback()`` on a ROI too thin along ``axis`` for planes (``CROSSING_DEFAULTS["min_slices"]``).
    ``own_box_px`` > 0 (an adapter's ``TrackingOptions.own_box_px``) ends with each kept slice
    decoded again in its own mask's box grown by that much, as tracking ends for such an adapter:
    it answers that prompt best (hippocampus adapters of 1-10 cases gained 0.002-0.034 from one
    ROI; docs/accuracy.md)."""
    slices, roi = imaging.box_to_slices(box, axis)
    if len(slices) < CROSSING_DEFAULTS["min_slices"]:
        return fallback()
    crossing = {}
    for other in AXES:
        if other != axis:
            planes, rect = plane_indices(box, other), imaging.box_to_slices(box, other)[1]
            crossing[other] = decode_planes(other, {index: rect for index in planes}, rect)
    boxes = crossed_boxes(crossing, axis, slices, roi)
    if not boxes:
        return fallback()
    masks = job.decode_boxes(boxes, roi)
    return tracking.in_own_boxes(job, masks, roi, own_box_px) if own_box_px > 0 else masks
