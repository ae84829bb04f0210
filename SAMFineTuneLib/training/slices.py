"""Which cases a run trains and validates on, and their slices: every slice holding the
structure, plus (training only) the slices just past its ends (``prompts.end_samples``)."""
from __future__ import annotations

from typing import List, Tuple

import numpy as np

from .config import TrainConfig


def split_cases(config: TrainConfig, info) -> Tuple[List[str], List[str]]:
    """(training case ids, validation case ids): the config's, else the dataset's split."""
    train_ids = list(config.train_cases) if config.train_cases is not None else [c.case for c in info.split("train")]
    val_ids = list(config.val_cases) if config.val_cases is not None else [c.case for c in info.split("val")]
    if len(info.cases) == 1 and config.train_cases is None and config.val_cases is None:
        raise ValueError(f"dataset {info.root} holds one case, and validation needs a second one (held out to "
                         "choose the best epoch and to score the adapter); export another case, then train")
    if not train_ids:
        raise ValueError(f"dataset {info.root} has no training cases")
    if not val_ids:
        raise ValueError(f"dataset {info.root} has no validation cases: export again with --val-fraction > 0, or "
                         "name validation cases")
    if set(train_ids) & set(val_ids):
        raise ValueError(f"cases on both sides of the split: {sorted(set(train_ids) & set(val_ids))}")
    return train_ids, val_ids


def load_slices(info, cases: List[str], config: TrainConfig, ends: bool) -> list:
    """The slices of ``cases`` holding each chosen label, then, with ``ends``, the
    ``config.end_slices`` slices past each end of each label (empty targets)."""
    from ..dataset import case_samples, load_case
    from .prompts import end_samples

    filled, beyond = [], []
    for case in cases:
        entry = info.case(case)
        image, label = load_case(entry)
        label, axis = np.asarray(label.array), entry.slicing_axis(config.axis)
        filled += case_samples(case, image, label, axis, config.window, config.labels)
        if ends and config.end_slices:
            beyond += end_samples(case, image, label, axis, config.window, config.end_slices, config.labels)
    return filled + beyond
