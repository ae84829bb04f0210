"""The prompts a fine-tuning run trains on: the ones inference will ask with.

The Segmenter starts from one 3D ROI. It decodes the ROI's rectangle on a few slices and keeps
the most confident one as its seed, then follows the structure slice by slice, each slice
prompted with the previous slice's mask box grown by the tracking margin, and stops where a mask
comes back empty. An adapter trained on tight reference boxes alone learns none of that: on the
hippocampus it lifted Dice with a reference box per slice, yet tracking from one ROI still
followed the wrong tissue and never stopped. So every training slice draws one prompt per step:

- "box": its reference box, jittered (``boxes.jitter_boxes``), as a user's box on one slice;
- "tracked": the box tracking gives it, a neighbouring slice's reference mask box grown by the
  tracking margin of ``segmenter.TrackingOptions`` (and jittered: a predicted mask is never the
  reference);
- "roi": the structure's ROI rectangle (its box over all its slices), each edge moved outwards
  by U(0, ``roi_margin``) x the side, as a loose ROI is drawn;

and the slices just beyond each end of the structure (``end_slices`` of them) train with an
empty target, prompted with the ROI rectangle, or, on the first slice past an end, with the box
tracking would carry over from the last slice that holds the structure: the adapter learns to
return nothing there, which is where tracking stops. A one-slice case (a 2D image) has no
neighbours and no ends: its slices draw "box" or "roi" prompts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from .boxes import box_limits, clip_boxes, grow_boxes, jitter_boxes
from .samples import Prepared

KINDS = ("box", "tracked", "roi")


def end_samples(case_id: str, image, label: np.ndarray, axis: str, window: str, depth: int,
                labels: Optional[Sequence[int]] = None) -> list:
    """Slices just past each end of every label along ``axis`` (``depth`` on each side, inside
    the volume), as samples with an empty mask: where the structure has ended."""
    from ..dataset import SliceSample
    from ..imaging import axis_index, extract_slice, label_values, slice_pixel_spacing, slices_holding
    from ..windows import apply_window, window_range

    along = axis_index(axis)
    array = np.asarray(image.array)
    low, high = window_range(array, window)
    spacing = slice_pixel_spacing(image.spacing, axis)
    thickness = float(image.spacing[2 - along])
    values = labels if labels is not None else label_values(label)
    out = []
    for value in values:
        present = slices_holding(label == value, axis)
        if present.size == 0:
            continue
        beyond = [present[0] - d for d in range(1, depth + 1)] + [present[-1] + d for d in range(1, depth + 1)]
        for index in (int(i) for i in beyond if 0 <= i < label.shape[along]):
            plane = extract_slice(array, axis, index)
            out.append(SliceSample(case_id, axis, index, int(value), apply_window(plane, low, high),
                                   np.zeros(plane.shape, dtype=bool), spacing, thickness))
    return out


def tracking_box(mask: np.ndarray, options) -> Tuple[int, int, int, int]:
    """The box tracking prompts the next slice with (``tracking.next_box`` under ``options``,
    a ``TrackingOptions``), the whole slice standing for the ROI."""
    from ..tracking import next_box

    rows, cols = mask.shape
    return next_box(mask, (0, 0, cols - 1, rows - 1), options)


@dataclass
class PromptBoxes:
    """Every prompt box a training slice can be given, in model-input pixels."""

    tight: torch.Tensor  # [N,4] the reference box (zeros where the target is empty)
    roi: torch.Tensor  # [N,4] the structure's box over all its slices
    track: torch.Tensor  # [N,2,4] tracking's box from the slice before / after (zeros where none)
    has_track: torch.Tensor  # [N,2] bool
    empty: torch.Tensor  # [N] bool: a slice beyond the structure's end
    limits: torch.Tensor  # [N,2] the image inside the padded input (rows, cols)


def prompt_boxes(prepared: Prepared) -> PromptBoxes:
    """The candidate boxes of each prepared slice, from its case's other slices."""
    from ..segmenter import TrackingOptions

    options = TrackingOptions()
    samples, geometries = prepared.samples, prepared.geometries
    count = len(samples)
    empty = torch.tensor([not s.mask.any() for s in samples], dtype=torch.bool)
    roi, track = torch.zeros(count, 4), torch.zeros(count, 2, 4)
    has_track = torch.zeros(count, 2, dtype=torch.bool)
    groups: Dict[tuple, Dict[int, int]] = {}
    for n, sample in enumerate(samples):
        groups.setdefault((sample.case, sample.label), {})[sample.index] = n
    for members in groups.values():
        filled = [n for n in members.values() if not empty[n]]
        if not filled:
            continue
        boxes = np.array([samples[n].box for n in filled])
        union = (boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max())
        for index, n in members.items():
            roi[n] = torch.tensor(geometries[n].box_to_model(union))
            for side, neighbour in enumerate((members.get(index - 1), members.get(index + 1))):
                if neighbour is not None and not empty[neighbour]:
                    box = tracking_box(samples[neighbour].mask, options)
                    track[n, side] = torch.tensor(geometries[n].box_to_model(box))
                    has_track[n, side] = True
    return PromptBoxes(prepared.boxes.clone(), roi, track, has_track, empty, box_limits(prepared))


class PromptSampler:
    """One prompt box per training slice and step, drawn as described in the module docstring.

    ``tracked`` and ``roi`` are the shares of slices holding the structure that get those
    prompts (the rest get jittered reference boxes); a slice where no kind of prompt it was
    drawn for exists (no neighbour to track from) takes its reference box instead."""

    def __init__(self, prepared: Prepared, tracked: float, roi: float, jitter: float, roi_margin: float):
        self.boxes = prompt_boxes(prepared)
        self.jitter, self.roi_margin = float(jitter), float(roi_margin)
        self.weights = torch.tensor([max(0.0, 1.0 - tracked - roi), float(tracked), float(roi)])

    def kinds(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The kind of prompt (index into KINDS) each slice at ``index`` gets."""
        b = self.boxes
        allowed = torch.stack([~b.empty[index], b.has_track[index].any(dim=1),
                               torch.ones(len(index), dtype=torch.bool)], dim=1)
        weights = self.weights.expand(len(index), -1) * allowed
        # a slice that can only be given an unwanted kind (weight 0) takes its first allowed one
        fallback = (weights.sum(dim=1) == 0)[:, None] & allowed & (allowed.cumsum(dim=1) == 1)
        weights = weights + fallback.float()
        return torch.multinomial(weights, 1, generator=generator)[:, 0]

    def draw(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Prompt boxes [B,4] for the slices at ``index``."""
        b = self.boxes
        limits = b.limits[index]
        kinds = self.kinds(index, generator)
        side = torch.randint(0, 2, (len(index),), generator=generator)
        side = torch.where(b.has_track[index, side], side, 1 - side)
        tracked = b.track[index, side]
        roi = b.roi[index]
        loose = torch.rand(roi.shape, generator=generator) * self.roi_margin
        candidates = torch.stack([jitter_boxes(b.tight[index], limits, self.jitter, generator),
                                  jitter_boxes(tracked, limits, self.jitter, generator),
                                  clip_boxes(grow_boxes(roi, loose), limits, roi)], dim=1)
        return candidates[torch.arange(len(index)), kinds]

    def counts(self) -> Dict[str, int]:
        """How many slices hold the structure and how many lie beyond its ends (for the card)."""
        return {"slices": int((~self.boxes.empty).sum()), "end_slices": int(self.boxes.empty.sum())}
