"""Checks of a case before it is written: usable id, matching geometry, integer labels that the
dataset knows, and label names that agree with the dataset's; and what tells a case exported
again from a new one (``voxel_fingerprint``, and ``KnownCases`` for the cases a dataset holds)
and whether it changed (``volume_fingerprint``)."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from ..input_checks import check_finite, check_same_grid
from .index import DATASET_JSON, plain_case_id, read_dataset



def check_case(case_id: str, image, label, label_names: Optional[Dict[int, str]]) -> Tuple[np.ndarray, List[int]]:
    """Validate one case; return the label map as an unsigned integer array and its nonzero values.

    Raises ValueError (naming the case and the problem) for a bad id, NaN or infinite voxels, a
    geometry mismatch, a non-integer or negative label, or label values missing from ``label_names``.
    """
    if not plain_case_id(case_id):
        raise ValueError(f"case id {case_id!r} is not usable as a file name: use letters, digits, '_', '-', '.' "
                         "(not a name Windows keeps for a device, such as CON or NUL)")
    img, lab = np.asarray(image.array), np.asarray(label.array)
    check_finite(img, f"case '{case_id}': the volume")
    if img.ndim != 3:
        raise ValueError(f"case '{case_id}': the volume is {img.ndim}D (shape {img.shape}); a 3D KJI array is needed")
    check_same_grid(image, label, f"case '{case_id}': label")
    if not np.issubdtype(lab.dtype, np.integer) and not np.issubdtype(lab.dtype, np.bool_):
        if not np.all(np.isfinite(lab)) or np.any(lab != np.round(lab)):
            raise ValueError(f"case '{case_id}': label map has non-integer values; a label map holds integers")
    values = [int(v) for v in np.unique(lab)]
    if values and values[0] < 0:
        raise ValueError(f"case '{case_id}': label map has negative values ({values[0]})")
    if values and values[-1] > 65535:
        raise ValueError(f"case '{case_id}': label value {values[-1]} is larger than 65535")
    present = [v for v in values if v != 0]
    if label_names is not None:
        unknown = [v for v in present if v not in label_names]
        if unknown:
            known = ", ".join(f"{k}={n}" for k, n in sorted(label_names.items())) or "none"
            raise ValueError(f"case '{case_id}': label values {unknown} are not among the dataset's labels "
                             f"({known}); name them in label_names (--label-names)")
    dtype = np.uint8 if (not values or values[-1] < 256) else np.uint16
    return lab.astype(dtype, copy=False), present


def merge_label_names(existing: Dict[int, str], given: Optional[Dict[int, str]]) -> Optional[Dict[int, str]]:
    if given is None:
        return dict(existing) if existing else None
    merged = dict(existing)
    for value, name in given.items():
        value = int(value)
        if value <= 0:
            raise ValueError(f"label value {value} for '{name}': label values are positive integers (0 = background)")
        if value in merged and merged[value] != name:
            raise ValueError(f"label {value} is '{merged[value]}' in the existing dataset, not '{name}'")
        merged[value] = str(name)
    names = list(merged.values())
    if len(set(names)) != len(names) or "background" in names:
        raise ValueError(f"label names must be unique and not 'background': {merged}")
    return merged


def volume_fingerprint(array: np.ndarray, volume) -> str:
    """SHA-256 of ``array`` (a case's volume or label map) with ``volume``'s geometry: a case
    exported again unchanged carries the same image and label fingerprints, so it is not written
    again."""
    return _digest(np.ascontiguousarray(array), [[float(v) for v in volume.spacing],
                                                 [float(v) for v in volume.origin],
                                                 [float(v) for v in volume.direction]])


def voxel_fingerprint(array: np.ndarray) -> str:
    """SHA-256 of a case's voxels alone (type, shape, values): what tells that a volume is a case
    the dataset holds (``KnownCases``), also once it was moved (registered, a transform hardened),
    since no two scans share every voxel; its case is then written again on the new grid."""
    return _digest(np.ascontiguousarray(array), [])


def case_fingerprints(image, label: np.ndarray, known: "KnownCases") -> Dict[str, str]:
    """The fingerprints a record keeps: ``image`` and ``label`` (with the grid: unchanged or not),
    ``voxels`` (which case it is)."""
    return {"image": known.image_print(image), "label": volume_fingerprint(label, image),
            "voxels": known.voxel_print(image)}


def _digest(array: np.ndarray, grid: list) -> str:
    digest = hashlib.sha256(json.dumps([str(array.dtype), list(array.shape), *grid]).encode("utf-8"))
    digest.update(array.reshape(-1).view(np.uint8))
    return digest.hexdigest()


def stored_as(array: np.ndarray, volume, path: str) -> bool:
    """Whether the file ``path`` (an image or label map a dataset holds) is ``array`` as the export
    wrote it: the same voxels (type, shape, values), and, unless ``volume`` is None, on
    ``volume``'s grid to the precision a file keeps (``input_checks.check_same_grid``).
    ``volume_fingerprint`` of the file read back would not tell: NIfTI keeps spacing, origin and
    direction (as a quaternion) in float32, so they come back rounded (about 1e-7 of their size).
    Voxels compared exactly, no other patient's volume matches; an unreadable file matches nothing."""
    from ..volume_io import read_volume

    try:
        stored = read_volume(path)
        if volume is not None:
            check_same_grid(volume, stored, path)
    except (OSError, ValueError):
        return False
    return stored.array.dtype == array.dtype and bool(np.array_equal(stored.array, array))


class KnownCases:
    """The cases of a dataset (``index.DatasetInfo``, or None for a new one), told apart by their
    voxels (``voxel_fingerprint``): the fingerprints each record keeps, or, for a record without
    that one (written before records kept it), its stored image, read only when a volume of its
    shape is asked about. Each volume is fingerprinted once however often it is asked about (the
    panel names its cases by it, then the export checks them: pass ``earlier``)."""

    def __init__(self, info=None, earlier: Optional["KnownCases"] = None):
        self.info = info
        self.entries = list(info.cases) if info is not None else []
        self.signature = _index_signature(info.root) if info is not None else None
        # id(volume): (volume, {"image" | "voxels": fingerprint})
        self._prints = dict(earlier._prints) if earlier is not None else {}
        # case id -> the volume whose voxels its stored image holds; valid only for the index it was found in
        self._matched = dict(earlier._matched) if earlier is not None and earlier.info is info else {}

    @classmethod
    def of(cls, folder: Optional[str]) -> "KnownCases":
        """The cases of the dataset in ``folder`` (none for a new or missing folder)."""
        if not folder or not os.path.isfile(os.path.join(folder, DATASET_JSON)):
            return cls(None)
        return cls(read_dataset(folder))

    def current(self, root: str) -> bool:
        """Whether this reading of ``root``'s ``dataset.json`` is still the file there (every write
        replaces it with a new file, so its inode, size and time tell)."""
        return self.info is not None and self.info.root == root and self.signature == _index_signature(root)

    def image_print(self, image) -> str:
        """``volume_fingerprint`` of ``image`` (a ``volume_io.Volume``), computed once per volume."""
        return self._print(image, "image")

    def voxel_print(self, image) -> str:
        """``voxel_fingerprint`` of ``image``, computed once per volume."""
        return self._print(image, "voxels")

    def _print(self, image, kind: str) -> str:
        memo = self._prints.get(id(image))
        if memo is None or memo[0] is not image:
            memo = self._prints[id(image)] = (image, {})
        if kind not in memo[1]:
            array = np.asarray(image.array)
            memo[1][kind] = volume_fingerprint(array, image) if kind == "image" else voxel_fingerprint(array)
        return memo[1][kind]

    def case_of(self, image, taken: Iterable[str] = ()) -> Optional[str]:
        """The id of the case (not among ``taken``) whose voxels ``image`` holds, or None."""
        taken = set(taken)
        entries = [e for e in self.entries if e.case not in taken]
        for entry in entries:
            prints = entry.record.get("fingerprints") or {}
            if prints.get("voxels") == self.voxel_print(image) or prints.get("image") == self.image_print(image):
                return entry.case
        for entry in entries:
            if "voxels" not in (entry.record.get("fingerprints") or {}) and self.holds_voxels(entry, image):
                return entry.case
        return None

    def holds_voxels(self, entry, image) -> bool:
        """Whether the stored image of ``entry`` (a record without a voxel fingerprint) holds the
        voxels of ``image``, whatever its grid."""
        if self._matched.get(entry.case) is image:
            return True
        array = np.asarray(image.array)
        if "shape_kji" in entry.record and list(entry.record["shape_kji"]) != list(array.shape):
            return False
        if not stored_as(array, None, entry.image):
            return False
        self._matched[entry.case] = image
        return True


def _index_signature(root: str) -> Optional[Tuple[int, int, int]]:
    try:
        found = os.stat(os.path.join(root, DATASET_JSON))
    except OSError:
        return None
    return found.st_ino, found.st_size, found.st_mtime_ns
