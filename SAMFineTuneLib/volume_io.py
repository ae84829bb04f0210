"""Volumes with their geometry, read and written with SimpleITK.

A ``Volume`` keeps the array in KJI order beside the ITK (LPS) geometry, so a mask written
from it overlays the source volume in Slicer voxel for voxel.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence, Tuple

import numpy as np

from .files import atomic_write

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass
class Volume:
    array: np.ndarray
    spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0)  # x, y, z (i, j, k) in mm
    origin: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: Tuple[float, ...] = field(default=IDENTITY)  # 3x3 row-major, ITK/LPS convention

    def with_array(self, array: np.ndarray) -> "Volume":
        """Same geometry, new voxels (a mask for this volume)."""
        if tuple(array.shape) != tuple(self.array.shape):
            raise ValueError(f"array shape {array.shape} does not match the volume's {self.array.shape}")
        return replace(self, array=array)


def as_volume(volume, spacing: Optional[Sequence[float]] = None) -> Volume:
    if isinstance(volume, Volume):
        return volume if spacing is None else replace(volume, spacing=tuple(float(s) for s in spacing))
    return Volume(np.asarray(volume), tuple(float(s) for s in (spacing or (1.0, 1.0, 1.0))))


def read_volume(path: str) -> Volume:
    import SimpleITK as sitk

    if not os.path.isfile(path):
        raise FileNotFoundError(f"volume file not found: {path}")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise ValueError(f"could not read {path} as an image: {str(error).strip().splitlines()[-1]}") from None
    if image.GetDimension() != 3:
        raise ValueError(f"{path} is a {image.GetDimension()}D image; SAMFineTune segments 3D volumes")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path} has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB/vector); "
                         "a scalar volume is needed")
    return Volume(sitk.GetArrayFromImage(image), image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def read_image_any(path: str):
    """A 3D volume, or a 2D image (PNG, 2D NIfTI) as a one-slice volume, as a ``volume_io.Volume``."""
    import SimpleITK as sitk

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    image = sitk.ReadImage(str(path))
    if image.GetDimension() == 3:
        return read_volume(path)
    if image.GetDimension() != 2:
        raise ValueError(f"{path} is a {image.GetDimension()}D image; 2D or 3D expected")
    if image.GetNumberOfComponentsPerPixel() != 1:  # RGB(A) picture of a greyscale scan: take luminance
        channels = sitk.GetArrayFromImage(image).astype(np.float32)[..., :3]
        array = (channels @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[None]
    else:
        array = sitk.GetArrayFromImage(image)[None]
    (sx, sy), (ox, oy) = image.GetSpacing(), image.GetOrigin()
    d = image.GetDirection()
    return Volume(array, (sx, sy, 1.0), (ox, oy, 0.0), (d[0], d[1], 0.0, d[2], d[3], 0.0, 0.0, 0.0, 1.0))


def to_sitk(volume: Volume):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array))
    image.SetSpacing(tuple(float(s) for s in volume.spacing))
    image.SetOrigin(tuple(float(s) for s in volume.origin))
    image.SetDirection(tuple(float(s) for s in volume.direction))
    return image


def write_volume(volume: Volume, path: str) -> str:
    """Write atomically: readers see the old file or the new one, never half of one."""
    import SimpleITK as sitk

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"output folder does not exist: {folder}")
    atomic_write(path, lambda temp: sitk.WriteImage(to_sitk(volume), temp, True))
    return path
