"""Checks of a case before it is written: usable id, matching geometry, integer labels that the
dataset knows, and label names that agree with the dataset's; and the fingerprint that tells a
case exported again from a new one."""
from __future__ import annotations

import hashlib
import json
import re
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..input_checks import check_finite, check_same_grid

_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_case(case_id: str, image, label, label_names: Optional[Dict[int, str]]) -> Tuple[np.ndarray, List[int]]:
    """Validate one case; return the label map as an unsigned integer array and its nonzero values.

    Raises ValueError (naming the case and the problem) for a bad id, NaN or infinite voxels, a
    geometry mismatch, a non-integer or negative label, or label values missing from ``label_names``.
    """
    if not isinstance(case_id, str) or not _CASE_ID.match(case_id):
        raise ValueError(f"case id {case_id!r} is not usable as a file name: use letters, digits, '_', '-', '.'")
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
    exported again carries the same image fingerprint (``export_dataset(replace=)``), and an
    unchanged label map the same label fingerprint, so it is not written again."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(json.dumps([str(array.dtype), list(array.shape), [float(v) for v in volume.spacing],
                                        [float(v) for v in volume.origin],
                                        [float(v) for v in volume.direction]]).encode("utf-8"))
    digest.update(array.reshape(-1).view(np.uint8))
    return digest.hexdigest()
