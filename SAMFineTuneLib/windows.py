"""Intensity windows: which intensities of a volume map to a model input's 0 and 1.

Plain numpy, so the Slicer side can tell whether two windows are the same on a volume before
torch is installed (an adapter learned one window; segmentation may be set to another name for it).

The "roi" window takes the percentiles of the ROI's neighbourhood rather than of the volume: on
MR, where the volume's range holds fat, fluid and air besides the structure, it stretched the
structure's contrast and lifted the base model's crossed boxes from one ROI by 0.04-0.07 Dice
(docs/accuracy.md, "The ROI's window"); on CT, whose organs the abdomen window already spreads,
it lost, so "auto" stays the abdomen window there.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np

from .catalogue import ROI_WINDOW_CONTEXT, WINDOW_PRESETS, WINDOWS
from .volume_facts import remembered

PERCENTILES = (0.5, 99.5)
_PERCENTILE_SAMPLES = 1 << 20


def looks_like_ct(array: np.ndarray) -> bool:
    """CT is stored in Hounsfield units: air near -1000 and nothing far below it."""
    lo = remembered(array, "minimum", lambda: float(np.min(array)))
    return -1100.0 <= lo <= -500.0


def window_setting(array: np.ndarray, window: str) -> Union[Tuple[float, float], str]:
    """What ``window`` means on ``array``: (width, level), "percentile" (the volume's 0.5-99.5
    percentile range) or "roi" (the same range of the ROI's neighbourhood). Two names for one
    window give the same setting: "auto" is the abdomen window on CT and "percentile" on anything
    else (MRI, ultrasound), as MedSAM's training data was prepared (from a ROI, the base model runs
    "roi" for it: ``roi_window``); "400/40" is the abdomen window anywhere."""
    if not isinstance(window, str) or not window.strip():
        raise ValueError(f"window must be a preset name or 'W/L', got {window!r}")
    name = window.strip().lower()
    if name == "auto":
        name = "abdomen" if looks_like_ct(array) else "percentile"
    if name in ("percentile", "roi"):
        return name
    return WINDOW_PRESETS[name] if name in WINDOW_PRESETS else parse_window(window)


def _sample(array: np.ndarray) -> np.ndarray:
    """About ``_PERCENTILE_SAMPLES`` voxels at most, evenly strided; a block of a larger volume (the
    "roi" window's neighbourhood) is strided along each axis, so that it is never copied whole."""
    if array.flags.c_contiguous:
        flat = array.reshape(-1)
        return flat[::max(1, flat.size // _PERCENTILE_SAMPLES)]
    step = max(1, int(np.ceil((array.size / _PERCENTILE_SAMPLES) ** (1.0 / array.ndim))))
    return array[(slice(None, None, step),) * array.ndim].reshape(-1)


def window_range(array: np.ndarray, window: str = "auto", box: Optional[Sequence[int]] = None) -> Tuple[float, float]:
    """The (low, high) intensities that map to 0 and 1 (``window_setting``). "roi" reads the
    neighbourhood of the 3D voxel ``box`` (i0, j0, k0, i1, j1, k1; ``roi_neighbourhood``), the
    whole volume without one; every other window ignores the box, so a second box on the same
    slices reuses the embedding cache."""
    setting = window_setting(array, window)
    whole = remembered(array, "percentiles", lambda: _percentiles(array)) if setting in ("percentile", "roi") else None
    if setting == "roi" and box is not None:
        block = roi_neighbourhood(box, array.shape)
        return _narrowed(whole, remembered(array, ("percentiles", tuple((s.start, s.stop) for s in block)),
                                           lambda: _percentiles(array[block])))
    if whole is not None:
        return whole
    width, level = setting
    return (level - width / 2.0, level + width / 2.0)


def roi_window(array: np.ndarray, window: str, base_model: bool) -> str:
    """The window a segmentation from a ROI runs for ``window``: "auto" on an image other than CT
    is the ROI's neighbourhood ("roi") for the base model, and the volume's percentiles for an
    adapter, which learned those (training windows whole volumes, so "roi" is for the base model)."""
    auto = isinstance(window, str) and window.strip().lower() == "auto"
    return "roi" if auto and base_model and window_setting(array, window) == "percentile" else window


def _percentiles(array: np.ndarray) -> Tuple[float, float]:
    lo, hi = np.percentile(_sample(array).astype(np.float64), PERCENTILES)
    return (float(lo), float(hi) if hi > lo else float(lo) + 1.0)


def roi_neighbourhood(box: Sequence[int], shape: Sequence[int]) -> Tuple[slice, slice, slice]:
    """The block of a (k, j, i) array the "roi" window reads: along each axis, the box grown by a
    power of two near ``ROI_WINDOW_CONTEXT`` of its extent on each side, its edges moved outward
    onto multiples of that power, so that a box nudged by a voxel mostly reads the same block
    (and keeps its window, and with it the cached embeddings)."""
    i0, j0, k0, i1, j1, k1 = (int(v) for v in box)
    block = []
    for lo, hi, size in ((k0, k1, shape[0]), (j0, j1, shape[1]), (i0, i1, shape[2])):
        step = 2 ** int(round(np.log2(max(1.0, ROI_WINDOW_CONTEXT * (hi - lo + 1)))))
        start, stop = (lo - step) // step * step, -(-(hi + 1 + step) // step) * step
        block.append(slice(max(0, start), min(int(size), stop)))
    return tuple(block)


def _narrowed(volume: Tuple[float, float], block: Tuple[float, float]) -> Tuple[float, float]:
    """The ``volume``'s window with each end moved to the ``block``'s in whole steps (a power of
    two within 1/16 of the block's span), stopping short of it: a block that is the whole volume
    (a crop around the structure) keeps the volume's window and its cached embeddings, and the
    block of a nudged box mostly gives the same steps (on the MR example's structures, 90 % of
    boxes with one edge moved by a voxel kept their window)."""
    step = 2.0 ** np.floor(np.log2((block[1] - block[0]) / 16.0))
    return (float(volume[0] + np.floor((block[0] - volume[0]) / step) * step),
            float(volume[1] - np.floor((volume[1] - block[1]) / step) * step))


def parse_window(text: str) -> Tuple[float, float]:
    """'400/40' -> (width, level)."""
    parts = str(text).split("/")
    try:
        width, level = (float(p) for p in parts)
    except ValueError:
        raise ValueError(
            f"unknown window '{text}': use one of {', '.join(WINDOWS)} or width/level numbers such as 400/40"
        ) from None
    if not width > 0:
        raise ValueError(f"window width must be positive, got {width:g} in '{text}'")
    return width, level


def apply_window(array: np.ndarray, lo: float, hi: float) -> np.ndarray:
    out = (np.asarray(array, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def window_volume(array: np.ndarray, window: str = "auto") -> np.ndarray:
    """Whole volume scaled to [0,1] float32 with the chosen window."""
    lo, hi = window_range(array, window)
    return apply_window(array, lo, hi)
