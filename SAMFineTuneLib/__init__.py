"""SAMFineTune's engine: slice-wise Segment Anything for 3D medical volumes, in plain Python.

Never imports slicer, qt, ctk or vtk, and imports torch only when a model is used, so the
Slicer module can import it before the dependencies are installed.

    from SAMFineTuneLib import Segmenter, read_volume, write_volume
    volume = read_volume("ct.nii.gz")
    result = Segmenter("litemedsam").segment(volume, box=(i0, j0, k0, i1, j1, k1))
    write_volume(volume.with_array(result.mask), "mask.nii.gz")
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Segmenter": "segmenter",
    "SegmentationResult": "segmenter",
    "TrackingOptions": "segmenter",
    "Cancelled": "progress",
    "load_model": "models",
    "MODEL_SPECS": "catalogue",
    "DEFAULT_MODEL": "catalogue",
    "Volume": "volume_io",
    "read_volume": "volume_io",
    "write_volume": "volume_io",
    "WINDOW_PRESETS": "catalogue",
    "window_volume": "windows",
    "make_ct_phantom": "phantom",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    """Lazy exports: importing the package must not import torch."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
