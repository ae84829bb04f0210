"""Volumes with their geometry, read and written with SimpleITK.

A ``Volume`` keeps the array in KJI order beside the ITK (LPS) geometry, so a mask written
from it overlays the source volume in Slicer voxel for voxel. Reading refuses files cut short,
an axis of size 0, NaN / infinite voxels (``input_checks``) and sheared grids (NIfTI cannot store
them); writing reads the file back before it replaces the target (``files.atomic_write``).
"""
from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence, Tuple

import numpy as np

from .files import atomic_write, check_output_file
from .input_checks import check_finite, check_image_file, check_sizes, empty_axis_error, verify_image_file

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
#: Endings of the one-file 3D formats a mask is written in: a two-file format (.mhd, .nhdr, .hdr)
#: would name its data file after the temporary file that ``atomic_write`` renames.
MASK_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha")


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


def _read_image(path: str, what: str):
    """The SimpleITK image in ``path`` once its file is known complete; clear errors otherwise."""
    import SimpleITK as sitk

    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    check_image_file(path)
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's multi-line warnings; its errors are reported below
    try:
        image = sitk.ReadImage(path)
    except RuntimeError as error:
        reason = _itk_reason(error)
        empty = re.search(r"axis (\d+) size is zero", reason)  # NRRD's reader names the empty axis itself
        if empty:
            raise empty_axis_error(path, int(empty.group(1))) from None
        raise ValueError(f"could not read {path} as an image ({reason}); the file may be incomplete "
                         "or in a format SimpleITK does not read") from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    check_sizes(path, image.GetSize())  # MetaImage reads an empty axis back as an empty array
    return image


def _itk_reason(error: RuntimeError) -> str:
    """The line of an ITK exception that says what went wrong, without ITK's source location and
    object address (and without a stale 'No such file' reason for a file that exists)."""
    lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
    lines = [line for line in lines if not line.startswith("Reason: No such file")] or ["unknown reason"]
    return re.sub(r"^(ITK ERROR: \w+\(0x[0-9a-f]+\): |Reason: )", "", lines[-1])


def read_volume(path: str, what: str = "volume") -> Volume:
    """The 3D scalar volume in ``path``; ``what`` names it in the errors (volume, mask)."""
    return _as_3d_volume(_read_image(path, what), path)


def _as_3d_volume(image, path: str) -> Volume:
    import SimpleITK as sitk

    if image.GetDimension() != 3:
        raise ValueError(f"{path} is a {image.GetDimension()}D image; SAMFineTune segments 3D volumes")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path} has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB/vector); "
                         "a scalar volume is needed")
    direction = np.reshape(image.GetDirection(), (3, 3))
    if not np.allclose(direction @ direction.T, np.eye(3), atol=1e-4):
        raise ValueError(f"{path} has a non-orthogonal direction matrix (a sheared voxel grid), which the NIfTI "
                         "files the engine writes cannot keep; resample it onto an orthogonal grid first")
    array = sitk.GetArrayFromImage(image)
    check_finite(array, str(path))
    return Volume(array, image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def read_image_any(path: str):
    """A 3D volume, or a 2D image (PNG, 2D NIfTI) as a one-slice volume, as a ``volume_io.Volume``."""
    import SimpleITK as sitk

    image = _read_image(path, "image")
    if image.GetDimension() == 3:
        return _as_3d_volume(image, path)
    if image.GetDimension() != 2:
        raise ValueError(f"{path} is a {image.GetDimension()}D image; 2D or 3D expected")
    if image.GetNumberOfComponentsPerPixel() != 1:  # RGB(A) picture of a greyscale scan: take luminance
        channels = sitk.GetArrayFromImage(image).astype(np.float32)[..., :3]
        array = (channels @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[None]
    else:
        array = sitk.GetArrayFromImage(image)[None]
        check_finite(array, str(path))
    (sx, sy), (ox, oy) = image.GetSpacing(), image.GetOrigin()
    d = image.GetDirection()
    return Volume(array, (sx, sy, 1.0), (ox, oy, 0.0), (d[0], d[1], 0.0, d[2], d[3], 0.0, 0.0, 0.0, 1.0))


def check_volume_output(path: str, what: str, inputs: Sequence[str] = ()) -> str:
    """``files.check_output_file``, and a format ``write_volume`` writes as one 3D file, and never a
    name whose write would overwrite one of ``inputs`` (the files the run reads): checked before
    slow work, as the write comes last."""
    path = check_output_file(path, what)
    if not path.endswith(MASK_ENDINGS):
        raise ValueError(f"cannot write {what} as {os.path.basename(path)}: end its name with "
                         f"{', '.join(MASK_ENDINGS[:-1])} or {MASK_ENDINGS[-1]}")
    for given in inputs:
        if not given:
            continue
        chain = _entries_read(given)
        if any(_same_entry(_entry_written(path), entry) for entry in chain):
            how = "" if _same_entry(_entry_written(path), chain[0]) else ", through a link"
            raise ValueError(f"{what} {path} is the input {given}{how}: writing it would overwrite the input; "
                             "give another output name")
    return path


def _entry_written(path: str) -> str:
    """The folder entry a write to ``path`` replaces: ``files.atomic_write`` renames its file onto
    the name itself, so a link there is replaced, never written through (its folder is resolved)."""
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def _entries_read(path: str) -> list:
    """The folder entries that reading ``path`` goes through: the name itself, then each link it
    follows, up to the file. Replacing any of them changes what ``path`` reads."""
    entries = [_entry_written(path)]
    while os.path.islink(entries[-1]) and len(entries) < 40:  # 40: the kernel's own limit on links followed
        target = os.readlink(entries[-1])
        entry = _entry_written(os.path.join(os.path.dirname(entries[-1]), target))
        if entry in entries:
            break
        entries.append(entry)
    return entries


def _same_entry(one: str, other: str) -> bool:
    """Whether two paths name the same folder entry (their folders already resolved), also on a
    file system that ignores case; two hard links to one file are two entries."""
    try:
        same_file = os.path.samestat(os.lstat(one), os.lstat(other))
        return (same_file and os.path.basename(one).casefold() == os.path.basename(other).casefold()
                and os.path.samefile(os.path.dirname(one), os.path.dirname(other)))
    except OSError:  # either is missing: nothing there to overwrite
        return False


def to_sitk(volume: Volume):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array))
    image.SetSpacing(tuple(float(s) for s in volume.spacing))
    image.SetOrigin(tuple(float(s) for s in volume.origin))
    image.SetDirection(tuple(float(s) for s in volume.direction))
    return image


def write_volume(volume: Volume, path: str) -> str:
    """Write atomically and checked (``write_image``)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"output folder does not exist: {folder}")
    write_image(to_sitk(volume), path, compress=True)
    return path


def write_image(image, path: str, compress: bool = True) -> None:
    """Write a SimpleITK image atomically and checked: the file is read back (voxel count, and
    for NIfTI the payload length) before it replaces ``path``, so a full disk or a file-size
    limit is a ``files.WriteError``, never a short file. Every image the engine writes (masks,
    dataset images and labels, slice PNGs) goes through here."""
    import SimpleITK as sitk

    shape = tuple(reversed(image.GetSize()))

    def write(temp: str) -> None:
        try:
            sitk.WriteImage(image, temp, compress)
        except RuntimeError as error:  # ITK's own report of a failed write
            raise OSError(errno.EIO, _itk_reason(error)) from None

    atomic_write(path, write, verify=lambda temp: verify_image_file(temp, shape))
