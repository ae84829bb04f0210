"""How a slice, or a crop of it, becomes a model's square input, and the model's logits come back
onto its pixels (torch; the slices and boxes themselves are ``imaging``'s)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch.nn import functional as F

from .catalogue import ModelSpec
from .models import normalise_unit_images


@dataclass(frozen=True)
class SliceGeometry:
    """How one slice, or a crop of it, maps onto a model's square input.

    The slice is resized so that its *physical* aspect ratio is kept (a coronal slice of a 5 mm
    CT is tall in mm, not square in pixels), its longest side filling the input, then padded at
    the bottom and right as SAM expects. ``shape`` is the crop's, ``origin`` its (row, column)
    on the slice; boxes are given in slice pixels, logits come back on the crop's pixels.
    """

    shape: Tuple[int, int]
    pixel_spacing: Tuple[float, float]
    input_size: int
    origin: Tuple[int, int] = (0, 0)

    @property
    def resized_shape(self) -> Tuple[int, int]:
        rows, cols = self.shape
        height, width = rows * self.pixel_spacing[0], cols * self.pixel_spacing[1]
        scale = self.input_size / max(height, width)
        return (max(1, min(self.input_size, int(round(height * scale)))),
                max(1, min(self.input_size, int(round(width * scale)))))

    @property
    def scale(self) -> Tuple[float, float]:
        """(row, column) model-input pixels per slice pixel."""
        nh, nw = self.resized_shape
        return nh / self.shape[0], nw / self.shape[1]

    def box_to_model(self, box: Sequence[float]) -> Tuple[float, float, float, float]:
        """Inclusive slice-pixel box -> box edges in model-input pixels."""
        fr, fc = self.scale
        x0, y0, x1, y1 = box
        row, col = self.origin
        return ((x0 - col) * fc, (y0 - row) * fr, (x1 - col + 1) * fc, (y1 - row + 1) * fr)

    def logits_to_slices(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits at the model's padded input size [B,S,S] -> logits on the crop's pixels [B,H,W],
        on the logits' device (a GPU thresholds them there and sends back booleans)."""
        nh, nw = self.resized_shape
        crop = logits[:, :nh, :nw].float().unsqueeze(1)
        return F.interpolate(crop, size=self.shape, mode="bilinear", align_corners=False)[:, 0]

    def logits_to_slice(self, logits: torch.Tensor) -> np.ndarray:
        """Logits at the model's padded input size [S,S] -> logits on the slice's pixels."""
        return self.logits_to_slices(logits.reshape(1, *logits.shape[-2:]))[0].cpu().numpy()


def to_model_input(plane: np.ndarray, geometry: SliceGeometry, spec: ModelSpec,
                   device: Optional[torch.device] = None) -> torch.Tensor:
    """A windowed [0,1] slice -> normalised 3-channel model input [3,S,S], made on ``device``
    (a GPU resizes faster than it receives a 1024x1024x3 float image)."""
    tensor = torch.from_numpy(np.ascontiguousarray(plane, dtype=np.float32))[None, None].to(device)
    nh, nw = geometry.resized_shape
    if (nh, nw) != tuple(plane.shape):
        antialias = nh < plane.shape[0] or nw < plane.shape[1]
        tensor = F.interpolate(tensor, size=(nh, nw), mode="bilinear", align_corners=False, antialias=antialias)
    size = geometry.input_size
    tensor = F.pad(tensor, (0, size - nw, 0, size - nh))
    images = tensor[0].expand(3, -1, -1).clamp(0.0, 1.0)
    return normalise_unit_images(images, spec).contiguous()
