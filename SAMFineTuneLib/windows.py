"""Intensity windows: which intensities of a volume map to a model input's 0 and 1.

Plain numpy, so the Slicer side can tell whether two windows are the same on a volume before
torch is installed (an adapter learned one window; segmentation may be set to another name for it).
"""
from __future__ import annotations

from typing import Tuple, Union

import numpy as np

from .catalogue import WINDOW_PRESETS, WINDOWS

PERCENTILES = (0.5, 99.5)
_PERCENTILE_SAMPLES = 1 << 20


def looks_like_ct(array: np.ndarray) -> bool:
    """CT is stored in Hounsfield units: air near -1000 and nothing far below it."""
    lo = float(np.min(array))
    return -1100.0 <= lo <= -500.0


def window_setting(array: np.ndarray, window: str) -> Union[Tuple[float, float], str]:
    """What ``window`` means on ``array``: (width, level), or "percentile" (the volume's 0.5-99.5
    percentile range). Two names for one window give the same setting: "auto" is the abdomen
    window on CT and "percentile" on anything else (MRI, ultrasound), as MedSAM's training data
    was prepared; "400/40" is the abdomen window anywhere."""
    if not isinstance(window, str) or not window.strip():
        raise ValueError(f"window must be a preset name or 'W/L', got {window!r}")
    name = window.strip().lower()
    if name == "auto":
        name = "abdomen" if looks_like_ct(array) else "percentile"
    if name == "percentile":
        return name
    return WINDOW_PRESETS[name] if name in WINDOW_PRESETS else parse_window(window)


def _sample(array: np.ndarray) -> np.ndarray:
    flat = array.reshape(-1)
    step = max(1, flat.size // _PERCENTILE_SAMPLES)
    return flat[::step]


def window_range(array: np.ndarray, window: str = "auto") -> Tuple[float, float]:
    """The (low, high) intensities that map to 0 and 1 (``window_setting``). The range depends
    on the whole volume, never on the box, so a second box on the same slices reuses the cache."""
    setting = window_setting(array, window)
    if setting == "percentile":
        lo, hi = np.percentile(_sample(array).astype(np.float64), PERCENTILES)
        return (float(lo), float(hi) if hi > lo else float(lo) + 1.0)
    width, level = setting
    return (level - width / 2.0, level + width / 2.0)


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
