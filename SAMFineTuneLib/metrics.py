"""Segmentation quality against a reference: of one binary mask (monai's metrics), and per case
of a 3D case's slices.

Dice, IoU, the 95th-percentile Hausdorff distance (HD95, mm) and the normalised surface Dice
(NSD: share of both boundaries within ``tolerance_mm`` of the other) on 2D or 3D masks, with
the voxel spacing taken into account. Conventions for the empty cases, where monai returns
NaN or infinity:

- both masks empty: Dice = IoU = NSD = 1, HD95 = 0 (nothing to find and nothing found);
- exactly one empty: Dice = IoU = NSD = 0, HD95 = NaN (undefined; ``summarise`` skips NaN
  and reports how many cases had a value).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

METRIC_NAMES = ("dice", "iou", "hd95", "nsd")
DEFAULT_TOLERANCE_MM = 2.0


def _one_hot(mask: np.ndarray):
    import torch

    fg = torch.from_numpy(np.ascontiguousarray(mask, dtype=bool)).float()
    return torch.stack([1.0 - fg, fg])[None]  # [1, 2, *spatial]


def binary_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Optional[Sequence[float]] = None,
                   tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> Dict[str, float]:
    """Dice, IoU, HD95 (mm) and NSD of ``pred`` against ``ref`` (same shape, nonzero = inside).

    ``spacing`` is per array axis (for a KJI volume: (z, y, x) mm); None means 1 mm.
    """
    pred = np.asarray(pred) != 0
    ref = np.asarray(ref) != 0
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if spacing is not None and len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {pred.ndim}D mask")
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "nsd": 1.0}
    if not has_pred or not has_ref:
        return {"dice": 0.0, "iou": 0.0, "hd95": float("nan"), "nsd": 0.0}
    pred, ref = _around(pred, ref)
    y_pred, y = _one_hot(pred), _one_hot(ref)
    space = None if spacing is None else [float(s) for s in spacing]
    with warnings.catch_warnings():  # monai 1.5+ warns about its own internal argument
        warnings.simplefilter("ignore", FutureWarning)
        return _monai_scores(y_pred, y, space, tolerance_mm)


def _around(pred: np.ndarray, ref: np.ndarray, margin: int = 2) -> Tuple[np.ndarray, np.ndarray]:
    """Both masks cropped to the block that holds them, ``margin`` voxels wider on each side
    (within the array). The scores are the same, since each boundary keeps the background around
    it, and monai's one-hot tensors of a whole 600-slice CT would take gigabytes."""
    region = []
    for axis in range(pred.ndim):
        others = tuple(a for a in range(pred.ndim) if a != axis)
        present = np.flatnonzero(pred.any(axis=others) | ref.any(axis=others))
        region.append(slice(max(int(present[0]) - margin, 0), min(int(present[-1]) + margin + 1, pred.shape[axis])))
    return pred[tuple(region)], ref[tuple(region)]


def _monai_scores(y_pred, y, space, tolerance_mm: float) -> Dict[str, float]:
    from monai.metrics import compute_hausdorff_distance, compute_iou, compute_surface_dice
    from monai.metrics.meandice import compute_dice

    return {
        "dice": float(compute_dice(y_pred, y, include_background=False)[0, 0]),
        "iou": float(compute_iou(y_pred, y, include_background=False)[0, 0]),
        "hd95": float(compute_hausdorff_distance(y_pred, y, include_background=False, percentile=95,
                                                 spacing=space)[0, 0]),
        "nsd": float(compute_surface_dice(y_pred, y, class_thresholds=[float(tolerance_mm)],
                                          include_background=False, spacing=space)[0, 0]),
    }


def summarise(rows: Iterable[Dict[str, float]], names: Sequence[str] = METRIC_NAMES) -> Dict[str, float]:
    """Mean of each metric over cases, skipping NaN; ``n_<metric>`` counts the cases used."""
    rows = list(rows)
    out: Dict[str, float] = {}
    for name in names:
        values: List[float] = [r[name] for r in rows if name in r and not math.isnan(r[name])]
        out[name] = float(np.mean(values)) if values else float("nan")
        out["n_" + name] = len(values)
    return out


def dice_score(pred: np.ndarray, ref: np.ndarray) -> float:
    """Plain Dice of two binary masks (1.0 when both are empty); cheap, for per-epoch validation."""
    pred = np.asarray(pred) != 0
    ref = np.asarray(ref) != 0
    total = np.count_nonzero(pred) + np.count_nonzero(ref)
    return 1.0 if total == 0 else 2.0 * np.count_nonzero(pred & ref) / total


# ---------------------------------------------------------------- per case, from per-slice samples


def stack_case(samples: Sequence, masks: Sequence[np.ndarray]) -> Tuple[np.ndarray, Tuple[float, ...]]:
    """Slices of one case -> a 3D block spanning its slice range (gaps empty) + its spacing (mm).

    ``samples`` are ``dataset.SliceSample``s (``index``, ``thickness``, ``pixel_spacing``)."""
    first = min(s.index for s in samples)
    depth = max(s.index for s in samples) - first + 1
    block = np.zeros((depth,) + masks[0].shape, dtype=bool)
    for sample, mask in zip(samples, masks):
        block[sample.index - first] = mask
    sample = samples[0]
    return block, (sample.thickness,) + tuple(sample.pixel_spacing)


def score_cases(samples: Sequence, predictions: Sequence[np.ndarray],
                tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> Dict[str, Any]:
    """3D metrics per (case, label) of per-slice predictions against the samples' masks:
    {"cases": [{case, label, slices, dice, iou, hd95, nsd}], "mean": ``summarise`` of them}."""
    groups: Dict[tuple, List[int]] = {}
    for n, sample in enumerate(samples):
        groups.setdefault((sample.case, sample.label), []).append(n)
    rows = []
    for (case, label), members in groups.items():
        chosen = [samples[n] for n in members]
        pred, spacing = stack_case(chosen, [predictions[n] for n in members])
        ref, _ = stack_case(chosen, [s.mask for s in chosen])
        rows.append(dict(case=case, label=label, slices=len(members),
                         **binary_metrics(pred, ref, spacing, tolerance_mm)))
    return {"cases": rows, "mean": summarise(rows)}


def paired_cases(runs: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """``score_cases`` results of several runs on the same slices (e.g. "base", "adapted") side by
    side: one row per (case, label), {case, label, slices, <run>: {dice, iou, hd95, nsd}, ...}."""
    first = next(iter(runs.values()))["cases"]
    rows = []
    for n, row in enumerate(first):
        entry = {"case": row["case"], "label": row["label"], "slices": row["slices"]}
        for name, run in runs.items():
            entry[name] = {k: run["cases"][n][k] for k in METRIC_NAMES}
        rows.append(entry)
    return rows


def case_dice(samples: Sequence, predictions: Sequence[np.ndarray]) -> Dict[str, float]:
    """Plain Dice per (case, label) over all its slices (a 3D Dice), keyed 'case' or 'case:label';
    cheap, for per-epoch validation."""
    totals: Dict[str, List[int]] = {}
    labels = {s.label for s in samples}
    for sample, pred in zip(samples, predictions):
        key = sample.case if len(labels) == 1 else f"{sample.case}:{sample.label}"
        entry = totals.setdefault(key, [0, 0])
        entry[0] += 2 * int(np.logical_and(pred, sample.mask).sum())
        entry[1] += int(pred.sum()) + int(sample.mask.sum())
    return {k: (inter / total if total else 1.0) for k, (inter, total) in totals.items()}


def mean_dice(samples: Sequence, predictions: Sequence[np.ndarray]) -> float:
    """The mean over cases of ``case_dice``."""
    scores = case_dice(samples, predictions)
    return float(np.mean(list(scores.values()))) if scores else float("nan")
