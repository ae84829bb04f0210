"""A dataset read back as per-slice samples: one windowed slice and one label's mask on it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .index import CaseEntry, DatasetInfo, read_dataset


@dataclass
class SliceSample:
    """One 2D training/evaluation sample: a windowed slice, one label's mask on it."""

    case: str
    axis: str
    index: int
    label: int
    image: np.ndarray  # float32 [0,1], (rows, cols)
    mask: np.ndarray  # bool, (rows, cols)
    pixel_spacing: Tuple[float, float]  # (row, column) mm
    thickness: float = 1.0  # mm between slices along ``axis``

    @property
    def box(self) -> Tuple[int, int, int, int]:
        from ..imaging import mask_box

        return mask_box(self.mask)


def load_case(entry: CaseEntry):
    from ..volume_io import read_volume

    return read_volume(entry.image), read_volume(entry.label)


def case_samples(case_id: str, image, label: np.ndarray, axis: str = "axial", window: str = "auto",
                 labels: Optional[Sequence[int]] = None) -> List[SliceSample]:
    """Every slice along ``axis`` where a label is present, one sample per (slice, label value).
    The window's range comes from the whole volume; only the slices taken are scaled (a float copy
    of a whole 600-slice CT is 600 MB for the few dozen slices a structure spans)."""
    from ..imaging import axis_index, extract_slice, label_values, slice_pixel_spacing, slices_holding
    from ..windows import apply_window, window_range

    array = np.asarray(image.array)
    low, high = window_range(array, window)
    spacing = slice_pixel_spacing(image.spacing, axis)
    thickness = float(image.spacing[2 - axis_index(axis)])
    values = labels if labels is not None else label_values(label)
    out = []
    for value in values:
        for index in slices_holding(label == value, axis):
            out.append(SliceSample(case_id, axis, int(index), int(value),
                                   apply_window(extract_slice(array, axis, index), low, high),
                                   extract_slice(label, axis, index) == value, spacing, thickness))
    return out


def load_samples(dataset, split: str = "train", axis: Optional[str] = None, window: str = "auto",
                 labels: Optional[Sequence[int]] = None, cases: Optional[Sequence[str]] = None) -> List[SliceSample]:
    """Per-slice samples of one split (or of the named ``cases``) of a dataset folder, each case
    sliced along ``axis``, else its own (``CaseEntry.slicing_axis``)."""
    info = dataset if isinstance(dataset, DatasetInfo) else read_dataset(dataset)
    entries = [info.case(c) for c in cases] if cases is not None else info.split(split)
    out: List[SliceSample] = []
    for entry in entries:
        image, label = load_case(entry)
        out.extend(case_samples(entry.case, image, np.asarray(label.array), entry.slicing_axis(axis), window, labels))
    return out
