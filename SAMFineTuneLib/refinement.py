"""Correcting one slice with clicks: positive and negative points, an optional box, and the
slice's previous result, decoded on the slice's cached embedding.

SAM's interactive protocol: each click is decoded with all the slice's earlier points and the
previous decode's low-res logits as the mask prompt, so a click corrects the last result
instead of starting over. A first prompt that is a single point is ambiguous (a part or the
whole?), so SAM's three outputs are decoded and the most confident kept; later clicks decode
one mask. A user's own mask (a segment drawn or corrected by hand) enters the same way, as
mask-prompt logits. The encoder runs only for a slice not yet cached, so a click costs one
decoder pass over the tokens near the prompts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.nn import functional as F

from . import imaging
from .model_input import SliceGeometry
from .models import EMBED_SIZE, LOW_RES_PER_TOKEN
from .tracking import next_box

#: A click: (x = column, y = row) in slice pixels, and whether it marks the structure (positive).
Point = Tuple[float, float, bool]
#: How sure a user's own mask is, as a mask-prompt logit (SAM's own logits mostly lie within +-20).
USER_MASK_LOGIT = 8.0
#: For a box-trained model: whether the previous result also goes in as the mask prompt.
BOX_MODEL_MASK_PROMPT = True
#: The side of SAM's low-res logits, which its prompt encoder also takes as a mask prompt.
LOW_RES_SIZE = EMBED_SIZE * LOW_RES_PER_TOKEN


@dataclass
class Refined:
    """One slice's refined mask (slice pixels), SAM's predicted IoU for it, and its low-res logits
    [1,1,256,256]: the next click's mask prompt."""

    mask: np.ndarray
    iou: float
    low_res: torch.Tensor


def check_points(points: Sequence, shape: Tuple[int, int]) -> List[Point]:
    """``[(x, y, positive)]`` as floats and booleans; a ValueError naming the first bad point."""
    checked = []
    rows, cols = shape
    for n, point in enumerate(points):
        if not isinstance(point, (list, tuple)) or len(point) != 3:
            raise ValueError(f"point {n + 1} must be [x, y, 1 or 0] (column, row, positive), got {point!r}")
        x, y, label = point
        if not (0 <= float(x) < cols and 0 <= float(y) < rows):
            raise ValueError(f"point {n + 1} ({float(x):g}, {float(y):g}) lies outside the {cols}x{rows} slice; "
                             "click inside the image")
        if label not in (0, 1, True, False):
            raise ValueError(f"point {n + 1}: its label must be 1 (positive) or 0 (negative), got {label!r}")
        checked.append((float(x), float(y), bool(label)))
    return checked


def check_box2d(box: Optional[Sequence], shape: Tuple[int, int]) -> Optional[Tuple[int, int, int, int]]:
    """An inclusive (x0, y0, x1, y1) box clipped to the slice; a ValueError when it misses the slice."""
    if box is None:
        return None
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise ValueError(f"the box must be [x0, y0, x1, y1] (slice pixels), got {box!r}")
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    rows, cols = shape
    if x1 < 0 or y1 < 0 or x0 >= cols or y0 >= rows:
        raise ValueError(f"the box {[x0, y0, x1, y1]} lies outside the {cols}x{rows} slice; draw it on the image")
    return max(0, x0), max(0, y0), min(cols - 1, x1), min(rows - 1, y1)


def mask_prompt(mask: np.ndarray, geometry: SliceGeometry, size: int = LOW_RES_SIZE) -> torch.Tensor:
    """A mask on the slice's pixels -> mask-prompt logits [1,1,size,size], laid out as the model
    input is (resized keeping the aspect, padded at the bottom and right)."""
    if tuple(mask.shape) != tuple(geometry.shape):
        raise ValueError(f"the start mask is {tuple(mask.shape)}, the slice {tuple(geometry.shape)}: send the "
                         "segment's mask on this slice")
    nh, nw = geometry.resized_shape
    plane = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    plane = F.interpolate(plane, size=(nh, nw), mode="bilinear", align_corners=False)
    full = F.pad(plane, (0, geometry.input_size - nw, 0, geometry.input_size - nh))
    low = F.interpolate(full, size=(size, size), mode="bilinear", align_corners=False)
    return torch.where(low > 0.5, USER_MASK_LOGIT, -USER_MASK_LOGIT)


def click_to_model(x: float, y: float, scale_x: float, scale_y: float) -> Tuple[float, float]:
    """A click on pixel (x, y) -> the coordinates SAM's prompt encoder takes for that pixel's centre
    in an image scaled by (scale_x, scale_y): it adds half a pixel itself, so 0.5 less."""
    return (x + 0.5) * scale_x - 0.5, (y + 0.5) * scale_y - 0.5


def _model_points(points: List[Point], geometry: SliceGeometry) -> Tuple[torch.Tensor, torch.Tensor]:
    """Slice-pixel clicks -> (coordinates [1,N,2], labels [1,N]) in model-input pixels."""
    fr, fc = geometry.scale
    coords = [list(click_to_model(x, y, fc, fr)) for x, y, _ in points]
    labels = [1 if positive else 0 for _, _, positive in points]
    return torch.tensor([coords], dtype=torch.float32), torch.tensor([labels], dtype=torch.int64)


def _prompt_window(points: List[Point], box, mask: Optional[np.ndarray], geometry: SliceGeometry) -> torch.Tensor:
    """The model-input box around every prompt: clicks, box and the mask being corrected."""
    xs = [x for x, _, _ in points]
    ys = [y for _, y, _ in points]
    for extent in (box, None if mask is None else imaging.mask_box(mask)):
        if extent is not None:
            xs += [extent[0], extent[2]]
            ys += [extent[1], extent[3]]
    return torch.tensor([geometry.box_to_model((min(xs), min(ys), max(xs), max(ys)))], dtype=torch.float32)


def edited_box(base: Optional[np.ndarray], points: List[Point], shape: Tuple[int, int],
               grow) -> Optional[Tuple[int, int, int, int]]:
    """A box-trained model's answer to clicks: the box around the mask being corrected, grown as
    tracking grows a box (``grow(mask) -> box``), with each click moving one edge.

    A click is taken as the middle of what is wrong (users click there, and so does
    ``simulated_click``), so the edge moves past the click by as far again: a positive click
    outside the box pushes the nearest edge out to twice its distance, a negative click inside
    pulls the nearest edge in to twice its distance. None when there is nothing to start from.
    """
    rows, cols = shape
    seeds = np.zeros(shape, bool) if base is None else np.asarray(base, bool).copy()
    if not seeds.any():
        for x, y, positive in points:
            if positive:
                seeds[int(y), int(x)] = True
    if not seeds.any():
        return None
    edges = list(grow(seeds))  # x0, y0, x1, y1
    for x, y, positive in points:
        inside = edges[0] <= x <= edges[2] and edges[1] <= y <= edges[3]
        if positive == inside:
            continue  # a positive click inside the box, or a negative one outside it, is the mask's business
        along = {0: x, 1: y, 2: x, 3: y}
        gaps = {n: abs(along[n] - edges[n]) for n in range(4)}
        if positive:  # only the edges the click lies beyond
            gaps = {n: gap for n, gap in gaps.items() if (along[n] < edges[n]) == (n < 2) and along[n] != edges[n]}
        n = min(gaps, key=gaps.get)
        edges[n] = int(round(2 * along[n] - edges[n]))
    x0, x1 = max(0, min(edges[0], cols - 1)), max(0, min(edges[2], cols - 1))
    y0, y1 = max(0, min(edges[1], rows - 1)), max(0, min(edges[3], rows - 1))
    return x0, y0, max(x0, x1), max(y0, y1)


#: How far a box-trained model's click changes the mask, in multiples of the click's distance from
#: the mask's edge: on 6 held-out hippocampus cases with an adapter, Dice per slice after 3 clicks
#: 0.834-0.845 for 1-2, 0.813 for 3 and 0.781 unbounded, against 0.826 with the reference's box
#: (with boxes tried around every click the decode left out; 0.846 at 1.5 with the rule below).
CLICK_REACH = 1.5
#: A positive click that the edited box's decode leaves outside the mask: nearer the mask than
#: this (pixels), the round piece reaching the mask is added; farther, SAM's answer to boxes around
#: the click (four more decodes, 3x a click's time). Near the mask the bound above leaves the two
#: the same few pixels: Dice after 1 / 3 / 5 clicks on 10 structures 0.404 / 0.517 / 0.571 against
#: 0.404 / 0.516 / 0.570 with the boxes tried at every distance, and such a click through the worker
#: 1/29 of a first click instead of 1/13 (docs/accuracy.md).
BOX_FALLBACK_DEPTH = 2.0
#: Sizes of the boxes a first click on an empty slice tries, as fractions of the slice's longer side.
CLICK_BOX_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4)


def _box_around_click(segmenter, embedding, geometry, click: Point) -> Tuple[Tuple[int, int, int, int], np.ndarray]:
    """A box-trained model given one click on an empty slice: boxes of a few sizes centred on it,
    and the one SAM is most sure of (its predicted IoU, as tracking picks its seed), with SAM's
    mask for it (slice pixels). Each box is decoded in a window around it, as tracking decodes."""
    x, y, _ = click
    rows, cols = geometry.shape
    boxes = []
    for fraction in CLICK_BOX_FRACTIONS:
        half = max(2.0, fraction * max(rows, cols))
        boxes.append((max(0, int(x - half)), max(0, int(y - half)),
                      min(cols - 1, int(x + half)), min(rows - 1, int(y + half))))
    model_boxes = torch.tensor([geometry.box_to_model(box) for box in boxes], dtype=torch.float32)
    model = segmenter.model
    with torch.inference_mode():
        low_res, _, place = model.decode_best(embedding[None], model_boxes, len(boxes),
                                              window_margin=segmenter.window_margin)
        mask = (geometry.logits_to_slices(model.upscale_logits(low_res)[:, 0])[0] > 0).cpu().numpy()
    return boxes[int(place[0])], mask


def _prompts(segmenter, embedding, points, box, previous, start_mask, geometry):
    """What the decoder is given: (points or None, box or None, mask prompt or None, multimask),
    and the mask being corrected (None when starting over).

    SAM (``spec.point_prompts``) takes the clicks themselves with the previous logits; a model
    trained on boxes alone gets a box edited by the clicks (``edited_box``) instead, and the
    clicks too when its adapter learned them (``training.clicks`` asks the same question)."""
    base = previous.mask if previous is not None else (None if start_mask is None else np.asarray(start_mask) > 0)
    if previous is not None:
        mask_input = previous.low_res.reshape(1, 1, LOW_RES_SIZE, LOW_RES_SIZE)
    elif base is not None and base.any():
        mask_input = mask_prompt(base, geometry)
    else:
        mask_input = None
    if segmenter.model.spec.point_prompts:
        multimask = mask_input is None and box is None and len(points) == 1
        return points or None, box, mask_input, multimask, base
    if box is None and (base is None or not base.any()):
        first = next((point for point in points if point[2]), None)
        if first is None:
            raise ValueError("this model was trained on boxes: start with a positive click on the structure or a box")
        box, _ = _box_around_click(segmenter, embedding, geometry, first)
    if box is None:
        rows, cols = geometry.shape
        whole = (0, 0, cols - 1, rows - 1)
        box = edited_box(base, points, geometry.shape, lambda mask: next_box(mask, whole, segmenter.tracking))
    if segmenter.clicks_learned:
        return points or None, box, mask_input, False, base
    return None, box, (mask_input if BOX_MODEL_MASK_PROMPT else None), False, base


def refine_slice(segmenter, volume, axis: str, index: int, points: Sequence, box: Optional[Sequence] = None,
                 previous: Optional[Refined] = None, start_mask: Optional[np.ndarray] = None,
                 window: str = "auto", spacing: Optional[Sequence[float]] = None,
                 roi: Optional[Sequence[int]] = None) -> Refined:
    """Refine slice ``index`` along ``axis`` from ``points`` (all of this slice's clicks so far) and
    an optional ``box``, starting from ``previous`` (the last result on this slice) or else from
    ``start_mask`` (what the segment holds there); ``roi``: the 3D box that segment came from, so
    that the slice is windowed as it was segmented (``Segmenter.slice_embedding``)."""
    embedding, geometry = segmenter.slice_embedding(volume, axis, index, window, spacing, roi)
    points = check_points(points, geometry.shape)
    box = check_box2d(box, geometry.shape)
    if not points and box is None:
        raise ValueError("give at least one point or a box")
    model = segmenter.model
    clicks, prompt_box, mask_input, multimask, base = _prompts(segmenter, embedding, points, box, previous, start_mask,
                                                               geometry)
    window_box = None if segmenter.window_margin is None else _prompt_window(points, prompt_box, base, geometry)
    with torch.inference_mode():
        low_res, iou = model.decode_prompts(
            embedding[None], points=_model_points(clicks, geometry) if clicks else None,
            box=None if prompt_box is None else torch.tensor([geometry.box_to_model(prompt_box)], dtype=torch.float32),
            mask_input=mask_input, multimask=multimask, window=window_box)
        logits = geometry.logits_to_slices(model.upscale_logits(low_res)[:, 0])
    mask = (logits[0] > 0).cpu().numpy()
    if not model.spec.point_prompts and not segmenter.clicks_learned and box is None and points:
        mask = _local_change(segmenter, embedding, geometry, base, mask, points[-1])
    return Refined(mask, float(iou[0]), low_res.cpu())


def _piece_at(mask: np.ndarray, x: float, y: float) -> np.ndarray:
    """The connected piece of ``mask`` at pixel (x, y); empty when the pixel is not in it."""
    from scipy import ndimage

    pieces, _ = ndimage.label(mask)
    piece = pieces[int(y), int(x)]
    return pieces == piece if piece else np.zeros_like(mask)


def _disc(shape: Tuple[int, int], x: float, y: float, radius: float) -> np.ndarray:
    rows, cols = np.ogrid[:shape[0], :shape[1]]
    return (rows - int(y)) ** 2 + (cols - int(x)) ** 2 <= radius ** 2


def _edge_distance(mask: np.ndarray, x: float, y: float) -> float:
    """How far pixel (x, y) lies from the other side of ``mask``'s edge (the slice's border counts
    as outside the mask)."""
    from scipy import ndimage

    same = mask if mask[int(y), int(x)] else ~mask
    return float(ndimage.distance_transform_edt(np.pad(same, 1))[1:-1, 1:-1][int(y), int(x)])


def _local_change(segmenter, embedding, geometry, base: Optional[np.ndarray], decoded: np.ndarray,
                  click: Point) -> np.ndarray:
    """A box-trained model's click changes the mask where it was made, nowhere else.

    A box edited by a click also moves the mask far from the click (a box is a coarse prompt), so
    only the piece of the change under the click is taken: what the decode added there for a
    positive click, what it took away there for a negative one; and of that piece only what lies
    within ``CLICK_REACH`` times the click's distance from the mask's edge, since a click in the
    middle of what is wrong says how wide the error is (``simulated_click``). When the decode
    changed nothing under the click, a positive click takes SAM's answer to a box around it
    (``_box_around_click``; next to the mask, ``BOX_FALLBACK_DEPTH``, the round piece around it
    that reaches the mask) and a negative one cuts the round piece around it that reaches the
    mask's edge."""
    x, y, positive = click
    if base is None or not base.any():
        piece = _piece_at(decoded, x, y)
        return piece if piece.any() else decoded
    depth = _edge_distance(base, x, y)
    reach = _disc(base.shape, x, y, CLICK_REACH * depth)
    if positive:
        added = _piece_at(decoded & ~base, x, y)
        if not added.any() and not base[int(y), int(x)]:
            if depth > BOX_FALLBACK_DEPTH:
                _, around = _box_around_click(segmenter, embedding, geometry, click)
                added = _piece_at(around & ~base, x, y)
            else:
                added = _disc(base.shape, x, y, depth)
        return base | (added & reach)
    removed = _piece_at(base & ~decoded, x, y)
    if not removed.any() and base[int(y), int(x)]:
        removed = _disc(base.shape, x, y, depth)
    return base & ~(removed & reach)


def simulated_click(predicted: np.ndarray, reference: np.ndarray) -> Optional[Point]:
    """The click a user would make next, as interactive-segmentation papers simulate it: at the
    point deepest inside the largest error region, positive where the structure was missed,
    negative where the mask leaked. None when the mask is already exact."""
    from scipy import ndimage

    predicted, reference = np.asarray(predicted, bool), np.asarray(reference, bool)
    best = None
    for errors, positive in ((reference & ~predicted, True), (predicted & ~reference, False)):
        regions, count = ndimage.label(errors)
        if count == 0:
            continue
        sizes = np.bincount(regions.ravel())[1:]
        region = regions == int(np.argmax(sizes)) + 1
        if best is None or sizes.max() > best[0]:
            # Padded, so a region touching the slice's edge is not deepest at the edge.
            depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
            ys, xs = np.nonzero(depth == depth.max())  # of the deepest points, the most central
            n = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
            best = (int(sizes.max()), (float(xs[n]), float(ys[n]), positive))
    return None if best is None else best[1]
