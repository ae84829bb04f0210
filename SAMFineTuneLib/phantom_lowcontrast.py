"""A CT-like phantom on which zero-shot SAM is measurably wrong, for the fine-tuning tests.

Each case is a small body (soft tissue, 40 HU, air outside) holding a low-contrast organ
(+``contrast`` HU over the tissue around it) with a bright bone (700 HU) lodged in a bite
out of its edge, a thin tissue gap between them. The organ's tight bounding box covers the
bone, so the strongest edge inside the box is the bone's, not the organ's: LiteMedSAM
prompted with the organ's box segments the bone with it, or the bone alone. A short LoRA fine-tune learns the organ.
Noise and a smooth intensity drift make the boundary ambiguous pixel by pixel.
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np

TISSUE_HU, BONE_HU, AIR_HU = 40.0, 700.0, -1000.0


def _smooth_noise(rng: np.random.Generator, shape: Tuple[int, ...], sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    noise = gaussian_filter(rng.standard_normal(shape), sigma=sigma)
    return noise / (noise.std() + 1e-8)


def make_case(seed: int, size: int = 96, slices: int = 2, contrast: float = 20.0, noise_hu: float = 12.0,
              spacing: Tuple[float, float, float] = (1.0, 1.0, 3.0)):
    """One phantom case -> (image Volume in HU, label Volume with 1 = organ)."""
    from .volume_io import Volume

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    c = size / 2.0
    image = np.empty((slices, size, size), np.float32)
    label = np.zeros((slices, size, size), np.uint8)
    body = ((yy - c) / (0.47 * size)) ** 2 + ((xx - c) / (0.45 * size)) ** 2 <= 1.0
    # organ centre, radii and the side on which the bone sits vary per case
    oy, ox = c + rng.uniform(-0.08, 0.08, 2) * size
    ry, rx = rng.uniform(0.16, 0.22, 2) * size
    angle = rng.uniform(0, 2 * np.pi)
    bone_r = rng.uniform(0.09, 0.12) * size
    gap = 0.03 * size
    for k in range(slices):
        sy, sx = ry * (1.0 - 0.08 * k), rx * (1.0 - 0.06 * k)
        # the bone sits in a bite out of the organ's edge: inside the organ's box, outside the organ
        by, bx = oy + 0.6 * sy * np.sin(angle), ox + 0.6 * sx * np.cos(angle)
        to_bone = np.hypot(yy - by, xx - bx)
        organ = (((yy - oy) / sy) ** 2 + ((xx - ox) / sx) ** 2 <= 1.0) & (to_bone > bone_r + gap) & body
        bone = (to_bone <= bone_r) & body
        slab = np.full((size, size), AIR_HU)
        slab[body] = TISSUE_HU
        slab += 25.0 * _smooth_noise(rng, (size, size), size / 6.0) * body  # slow drift
        slab[organ] += contrast
        slab[bone] = BONE_HU
        slab += noise_hu * _smooth_noise(rng, (size, size), 0.8) * body
        image[k] = slab
        label[k] = organ
    return Volume(image, spacing), Volume(label, spacing)


def make_cases(n: int, first_seed: int = 0, **kwargs) -> List[tuple]:
    """``n`` cases as (case_id, image, label), ready for ``dataset.export_dataset``."""
    return [(f"phantom{first_seed + i:03d}",) + make_case(first_seed + i, **kwargs) for i in range(n)]
