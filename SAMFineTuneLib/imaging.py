"""Slices, boxes and coordinates of a volume, in numpy alone: the command line checks clicks and
boxes with them before torch is imported (a slice's way onto a model's input: ``model_input``).

Conventions: a volume array is indexed [k, j, i] (SimpleITK/Slicer KJI order); a 3D box is
(i0, j0, k0, i1, j1, k1) in inclusive voxel indices; a 2D box is (x0, y0, x1, y1) in inclusive
slice pixels, x along columns and y along rows.
"""
from __future__ import annotations

from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .catalogue import AXES

# ---------------------------------------------------------------- slices and boxes


def axis_index(axis: str) -> int:
    if axis not in AXES:
        raise ValueError(f"unknown axis '{axis}'; choose one of: {', '.join(AXES)}")
    return AXES[axis]


def extract_slice(array: np.ndarray, axis: str, index: int) -> np.ndarray:
    return np.take(array, int(index), axis=axis_index(axis))


def slices_holding(mask: np.ndarray, axis: str) -> np.ndarray:
    """The indices of the slices along ``axis`` on which a [k,j,i] ``mask`` holds any voxel."""
    along = axis_index(axis)
    return np.flatnonzero(np.asarray(mask).any(axis=tuple(a for a in range(3) if a != along)))


def label_values(label: np.ndarray) -> List[int]:
    """The values other than 0 a label map holds, ascending: the structures it draws."""
    return [int(v) for v in np.unique(label) if v != 0]


def slice_pixel_spacing(spacing_xyz: Sequence[float], axis: str) -> Tuple[float, float]:
    """(row, column) spacing in mm of a slice taken along ``axis``."""
    sx, sy, sz = (float(s) for s in spacing_xyz)
    return {"axial": (sy, sx), "coronal": (sz, sx), "sagittal": (sz, sy)}[axis]


def box_to_slices(box: Sequence[int], axis: str) -> Tuple[range, Tuple[int, int, int, int]]:
    """3D voxel box -> (slice indices, 2D box on each slice)."""
    i0, j0, k0, i1, j1, k1 = (int(v) for v in box)
    if axis == "axial":
        return range(k0, k1 + 1), (i0, j0, i1, j1)
    if axis == "coronal":
        return range(j0, j1 + 1), (i0, k0, i1, k1)
    if axis == "sagittal":
        return range(i0, i1 + 1), (j0, k0, j1, k1)
    raise ValueError(f"unknown axis '{axis}'; choose one of: {', '.join(AXES)}")


def box_region(box: Sequence[int]) -> Tuple[slice, slice, slice]:
    """A 3D voxel box (i0, j0, k0, i1, j1, k1), inclusive -> the index into a (k, j, i) array."""
    i0, j0, k0, i1, j1, k1 = (int(v) for v in box)
    return slice(k0, k1 + 1), slice(j0, j1 + 1), slice(i0, i1 + 1)


def slices_to_box(first: int, last: int, box2d: Sequence[int], axis: str) -> Tuple[int, ...]:
    """A slice range and one 2D box -> the 3D voxel box (inverse of box_to_slices)."""
    x0, y0, x1, y1 = (int(v) for v in box2d)
    first, last = int(first), int(last)
    if axis == "axial":
        return (x0, y0, first, x1, y1, last)
    if axis == "coronal":
        return (x0, first, y0, x1, last, y1)
    if axis == "sagittal":
        return (first, x0, y0, last, x1, y1)
    raise ValueError(f"unknown axis '{axis}'; choose one of: {', '.join(AXES)}")


def place_slice(volume: np.ndarray, axis: str, index: int, plane: np.ndarray) -> None:
    """Write a 2D slice back into a KJI volume (inverse of extract_slice)."""
    selector = [slice(None)] * 3
    selector[axis_index(axis)] = int(index)
    volume[tuple(selector)] = plane


def stacked_slices(shape: Sequence[int], axis: str, masks: Mapping[int, np.ndarray]) -> np.ndarray:
    """Masks by slice index along ``axis`` -> one uint8 volume of ``shape``."""
    out = np.zeros(tuple(shape), dtype=np.uint8)
    for index, plane in masks.items():
        place_slice(out, axis, index, plane)
    return out


def grown_box(box: Sequence[int], grow_x: int, grow_y: int, roi: Sequence[int]) -> Tuple[int, int, int, int]:
    """A 2D ``box`` grown by ``grow_x`` and ``grow_y`` pixels per side, kept inside the 2D ``roi``."""
    x0, y0, x1, y1 = box
    return (max(roi[0], x0 - grow_x), max(roi[1], y0 - grow_y), min(roi[2], x1 + grow_x), min(roi[3], y1 + grow_y))


def mask_box(mask: np.ndarray) -> Optional[Tuple[int, int, int, int]]:
    """Tight inclusive (x0, y0, x1, y1) box of a 2D mask, None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return (int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1]))


# ---------------------------------------------------------------- physical <-> voxel


def index_to_physical_matrix(spacing: Sequence[float], direction: Sequence[float],
                             origin: Sequence[float]) -> np.ndarray:
    """4x4 matrix mapping (i, j, k, 1) to physical (x, y, z, 1) in the volume's frame (LPS for ITK)."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(direction, dtype=float).reshape(3, 3) @ np.diag(np.asarray(spacing, dtype=float))
    matrix[:3, 3] = np.asarray(origin, dtype=float)
    return matrix


def physical_box_to_voxels(corners: np.ndarray, physical_to_index: np.ndarray,
                           shape_kji: Sequence[int]) -> Tuple[Tuple[int, ...], bool]:
    """Physical corner points -> inclusive voxel box of the voxels whose centres lie inside.

    Returns (box, clipped). A box with no voxel centre inside the volume is a ValueError; one
    partly outside is clipped to the volume and flagged so the caller can warn.
    """
    points = np.asarray(corners, dtype=float).reshape(-1, 3)
    homogeneous = np.c_[points, np.ones(len(points))]
    ijk = (np.asarray(physical_to_index, dtype=float) @ homogeneous.T).T[:, :3]
    # Voxel n covers [n-0.5, n+0.5); a tiny tolerance keeps edges on voxel centres inside.
    lo = np.ceil(ijk.min(axis=0) - 1e-6).astype(int)
    hi = np.floor(ijk.max(axis=0) + 1e-6).astype(int)
    limit = np.array([shape_kji[2], shape_kji[1], shape_kji[0]]) - 1
    if np.any(hi < 0) or np.any(lo > limit) or np.any(hi < lo):
        raise ValueError(
            f"the box (voxels {lo.tolist()} to {hi.tolist()}) does not contain any voxel of the volume "
            f"(valid indices 0..{limit.tolist()})"
        )
    clipped_lo, clipped_hi = np.maximum(lo, 0), np.minimum(hi, limit)
    clipped = bool(np.any(clipped_lo != lo) or np.any(clipped_hi != hi))
    return tuple(int(v) for v in (*clipped_lo, *clipped_hi)), clipped
