"""A synthetic abdominal CT made by code: the demo's and the tests' volume, no download needed.

Hounsfield values follow real tissue: air outside the body, subcutaneous fat, soft tissue, a
vertebra, and a contrast-enhanced organ (an ellipsoid) that is the target. Slices are thicker
than pixels are wide, as in clinical CT, so anisotropic spacing is exercised everywhere.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from .volume_io import Volume

ORGAN_LABEL = 1


def _ellipsoid(shape_kji, spacing_xyz, centre_mm, radii_mm) -> np.ndarray:
    k, j, i = np.indices(shape_kji, dtype=np.float32)
    x, y, z = i * spacing_xyz[0], j * spacing_xyz[1], k * spacing_xyz[2]
    return (((x - centre_mm[0]) / radii_mm[0]) ** 2 + ((y - centre_mm[1]) / radii_mm[1]) ** 2
            + ((z - centre_mm[2]) / radii_mm[2]) ** 2) <= 1.0


def make_ct_phantom(
    shape_kji: Sequence[int] = (24, 96, 96),
    spacing_xyz: Sequence[float] = (1.5, 1.5, 4.0),
    organ_hu: float = 160.0,
    noise_hu: float = 12.0,
    seed: int = 0,
    direction: Optional[Sequence[float]] = None,
    organ_centre: Optional[Sequence[float]] = None,
    organ_radii: Optional[Sequence[float]] = None,
) -> Tuple[Volume, Volume]:
    """Returns (ct, label) with the same geometry; label is 1 on the organ."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape_kji)
    extent = [shape[2] * spacing_xyz[0], shape[1] * spacing_xyz[1], shape[0] * spacing_xyz[2]]
    centre = [e / 2.0 for e in extent]
    body = _ellipsoid(shape, spacing_xyz, centre, (extent[0] * 0.46, extent[1] * 0.40, extent[2] * 10))
    inner = _ellipsoid(shape, spacing_xyz, centre, (extent[0] * 0.42, extent[1] * 0.36, extent[2] * 10))
    spine = _ellipsoid(shape, spacing_xyz, (centre[0], centre[1] + extent[1] * 0.24, centre[2]),
                       (extent[0] * 0.07, extent[1] * 0.07, extent[2] * 10))
    organ_centre = organ_centre or (centre[0] - extent[0] * 0.12, centre[1] - extent[1] * 0.04, centre[2])
    organ_radii = organ_radii or (extent[0] * 0.17, extent[1] * 0.13, extent[2] * 0.36)
    organ = _ellipsoid(shape, spacing_xyz, organ_centre, organ_radii) & inner

    ct = np.full(shape, -1000.0, dtype=np.float32)
    ct[body] = -100.0  # subcutaneous fat
    ct[inner] = 40.0  # soft tissue
    ct[spine] = 700.0
    ct[organ] = organ_hu
    ct += rng.normal(0.0, noise_hu, size=shape).astype(np.float32)
    geometry = dict(spacing=tuple(float(s) for s in spacing_xyz), origin=(-extent[0] / 2, -extent[1] / 2, 0.0),
                    direction=tuple(direction) if direction is not None else (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    image = Volume(np.round(ct).astype(np.int16), **geometry)
    label = Volume(organ.astype(np.uint8) * ORGAN_LABEL, **geometry)
    return image, label


def bounding_box(label: np.ndarray, margin: Sequence[int] = (0, 0, 0)) -> Tuple[int, ...]:
    """Inclusive (i0, j0, k0, i1, j1, k1) box of a KJI label, grown by (mi, mj, mk) voxels and clipped."""
    k, j, i = np.nonzero(label)
    if k.size == 0:
        raise ValueError("the label is empty: there is no structure to put a box around")
    lo = np.array([i.min(), j.min(), k.min()]) - np.asarray(margin)
    hi = np.array([i.max(), j.max(), k.max()]) + np.asarray(margin)
    limit = np.array([label.shape[2], label.shape[1], label.shape[0]]) - 1
    lo, hi = np.maximum(lo, 0), np.minimum(hi, limit)
    return tuple(int(v) for v in (*lo, *hi))
