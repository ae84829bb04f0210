"""Prompt boxes for training and scoring: loose as a user's boxes are, jittered, kept inside
the image; and positive points drawn inside a target."""
from __future__ import annotations

import torch

from .samples import LOW_RES, Prepared


def box_limits(prepared: Prepared) -> torch.Tensor:
    """(rows, cols) of each sample's image inside the padded model input."""
    return torch.tensor([g.resized_shape for g in prepared.geometries], dtype=torch.float32).reshape(-1, 2)


def grow_boxes(boxes: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """Move each edge outward by ``fractions`` x the box side (negative = inward)."""
    size = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], dim=1).repeat(1, 2)
    return boxes + fractions * size * torch.tensor([-1.0, -1.0, 1.0, 1.0])


def clip_boxes(boxes: torch.Tensor, limits: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Keep boxes inside the image; a box squeezed below one pixel falls back to ``fallback``."""
    out = boxes.clone()
    out[:, 0::2] = torch.minimum(out[:, 0::2].clamp(min=0.0), limits[:, 1:2])
    out[:, 1::2] = torch.minimum(out[:, 1::2].clamp(min=0.0), limits[:, 0:1])
    wide = (out[:, 2] - out[:, 0] >= 1.0) & (out[:, 3] - out[:, 1] >= 1.0)
    return torch.where(wide[:, None], out, fallback)


def loose_boxes(prepared: Prepared, margin: float) -> torch.Tensor:
    """Every sample's tight box grown by ``margin`` x its side on each edge, inside the image."""
    boxes = prepared.boxes
    return clip_boxes(grow_boxes(boxes, torch.full(boxes.shape, float(margin))), box_limits(prepared), boxes)


def jitter_boxes(boxes: torch.Tensor, limits: torch.Tensor, amount: float, generator: torch.Generator) -> torch.Tensor:
    """Move each edge by U(-amount/4, amount) x the box side, outward positive, inside the image."""
    if amount <= 0:
        return boxes
    fractions = (torch.rand(boxes.shape, generator=generator) * 1.25 - 0.25) * amount
    return clip_boxes(grow_boxes(boxes, fractions), limits, boxes)


def random_points(targets: torch.Tensor, generator: torch.Generator, input_size: int):
    """One positive point per sample, drawn inside its target mask, in model-input pixels."""
    coords = torch.zeros(targets.shape[0], 1, 2)
    scale = input_size / LOW_RES
    for n in range(targets.shape[0]):
        inside = torch.nonzero(targets[n])
        if len(inside):
            y, x = inside[int(torch.randint(len(inside), (1,), generator=generator))].tolist()
            coords[n, 0] = torch.tensor([(x + 0.5) * scale, (y + 0.5) * scale])
    return coords, torch.ones(targets.shape[0], 1, dtype=torch.int64)
