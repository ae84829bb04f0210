"""What the image encoder sees of each slice: the whole slice, or a crop around the ROI.

SAM's input is a fixed square (256 pixels for LiteMedSAM), so a 20-pixel structure on a
512-pixel CT slice reaches the encoder 10 pixels wide. Encoding a crop around the ROI instead
(nnInteractive's AutoZoom, MedSAM's small-object crops) gives it more of the input. Crops are
snapped to a coarse grid of sizes and positions, so ROIs that differ by a few voxels share a crop,
and with it the cached embeddings.
"""
from __future__ import annotations

import hashlib
import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from . import imaging, windows
from .model_input import SliceGeometry, to_model_input

Region = Tuple[int, int, int, int]  # rows r0:r1, columns c0:c1 of a slice (half-open)

ZOOM_CONTEXT = 2.0  # the crop's side is this many times the ROI's longest side (in mm)
MIN_MAGNIFICATION = 1.25  # a crop that would enlarge the structure less than this encodes the whole slice
MAX_UPSAMPLING = 4.0  # a crop is at least input size / this many slice pixels across: no finer than the image
_SIZE_STEPS = 4  # crop sides come in steps of 2 ** (1 / 4), about 19%
_POSITION_STEPS = 8  # crop corners move in steps of an eighth of its side


def crop_region(shape: Sequence[int], pixel_spacing: Sequence[float], roi: Sequence[int],
                input_size: int) -> Optional[Region]:
    """The crop of a slice of ``shape`` (rows, columns) to encode around the 2D box ``roi``
    (x0, y0, x1, y1, inclusive), or None where the whole slice serves as well.

    The crop is square in millimetres (SAM's input is square), ZOOM_CONTEXT times the ROI's longest
    side (but no smaller than ``input_size`` / MAX_UPSAMPLING slice pixels), rounded up to the next
    size step and placed on a grid, then shifted inside the slice.
    """
    rows, cols = int(shape[0]), int(shape[1])
    row_mm, col_mm = (float(s) for s in pixel_spacing)
    x0, y0, x1, y1 = (int(v) for v in roi)
    side_mm = max(ZOOM_CONTEXT * max((y1 - y0 + 1) * row_mm, (x1 - x0 + 1) * col_mm),
                  input_size / MAX_UPSAMPLING * min(row_mm, col_mm))
    side_mm = 2.0 ** (math.ceil(_SIZE_STEPS * math.log2(max(side_mm, 1e-6))) / _SIZE_STEPS)
    if max(rows * row_mm, cols * col_mm) < MIN_MAGNIFICATION * side_mm:
        return None
    height, width = min(rows, int(math.ceil(side_mm / row_mm))), min(cols, int(math.ceil(side_mm / col_mm)))
    r0 = _place((y0 + y1 + 1) / 2.0, height, rows)
    c0 = _place((x0 + x1 + 1) / 2.0, width, cols)
    return (r0, r0 + height, c0, c0 + width)


def _place(centre: float, size: int, limit: int) -> int:
    """The first pixel of a ``size``-pixel span centred near ``centre`` on the crop grid, inside 0..limit."""
    step = max(1, size // _POSITION_STEPS)
    start = int(round((centre - size / 2.0) / step)) * step
    return min(max(0, start), limit - size)


class SliceSource:
    """The windowed model inputs of one volume along one axis, whole slices or one crop of each,
    keyed for the embedding cache by what the encoder sees."""

    def __init__(self, volume, axis: str, window: str, model, zoom_roi: Optional[Sequence[int]] = None,
                 roi: Optional[Sequence[int]] = None):
        """``zoom_roi``: a 2D box (x0, y0, x1, y1) to encode a crop around (``crop_region``);
        ``roi``: the 3D box whose neighbourhood the "roi" window reads."""
        self.volume = volume
        self.axis = axis
        self.model = model
        self.low, self.high = windows.window_range(volume.array, window, roi)
        rows, cols = [s for n, s in enumerate(volume.array.shape) if n != imaging.axis_index(axis)]
        spacing = imaging.slice_pixel_spacing(volume.spacing, axis)
        self.shape = (rows, cols)
        region = None if zoom_roi is None else crop_region(self.shape, spacing, zoom_roi, model.spec.input_size)
        self.region = region or (0, rows, 0, cols)
        r0, r1, c0, c1 = self.region
        self.geometry = SliceGeometry((r1 - r0, c1 - c0), spacing, model.spec.input_size, (r0, c0))

    def plane(self, index: int) -> np.ndarray:
        return imaging.extract_slice(self.volume.array, self.axis, index)

    def _crop(self, index: int) -> np.ndarray:
        r0, r1, c0, c1 = self.region
        return self.plane(index)[r0:r1, c0:c1]

    def key(self, index: int) -> tuple:
        crop = np.ascontiguousarray(self._crop(index))
        digest = hashlib.blake2b(crop.tobytes(), digest_size=16).hexdigest()
        return (self.model.fingerprint, self.axis, digest, crop.shape, str(crop.dtype),
                self.geometry.resized_shape, round(self.low, 4), round(self.high, 4))

    def windowed(self, index: int) -> np.ndarray:
        """The whole slice in window units (what the tracking rules compare)."""
        return windows.apply_window(self.plane(index), self.low, self.high)

    def model_input(self, index: int) -> torch.Tensor:
        crop = windows.apply_window(self._crop(index), self.low, self.high)
        return to_model_input(crop, self.geometry, self.model.spec, self.model.device)
