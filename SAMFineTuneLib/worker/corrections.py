"""The worker's correction jobs: ``refine`` (clicks and a box on one slice) and ``propagate``
(a corrected slice carried on through the volume), on a volume this conversation holds.

A client names its volume by ``volume_key`` and sends the voxels only when the worker may not
have them; a worker that has not (it restarted, or let the volume go) answers with an error
starting ``UnknownVolume``, and the client sends the request again with the voxels.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

from .. import catalogue
from .jobs import SEGMENTER_KEYS, Result

# refine/propagate parameters and their defaults (PROTOCOL.md).
_SLICE_PARAMS: Dict[str, Any] = dict({key: catalogue.SEGMENT_DEFAULTS[key] for key in SEGMENTER_KEYS + ("window",)},
                                     axis="axial", index=None, spacing=None, volume_key=None)
REFINE_PARAMS: Dict[str, Any] = dict(_SLICE_PARAMS, points=(), box=None, reset=False, roi=None)
PROPAGATE_PARAMS: Dict[str, Any] = dict(_SLICE_PARAMS, locked=(), first=None, last=None, box=None)


def _stored(job, params: Dict[str, Any], arrays: Dict[str, np.ndarray]):
    """The request's volume: the voxels sent with it (kept under its key), else the one kept ->
    (key, ``core.StoredVolume``, the volume with its spacing, the slice index)."""
    from ..volume_io import as_volume

    key = params.pop("volume_key")
    if not isinstance(params["window"], str):  # it also names the slice's last click result
        raise ValueError(f"'window' must be text (auto, a named window or width/level such as 400/40), got "
                         f"{params['window']!r}")
    if "volume" in arrays:
        if not key:
            raise ValueError(f"{job.command} needs 'volume_key' (a name for the volume, to reuse it next time)")
        job.volumes.remember(key, arrays["volume"], {"spacing": params["spacing"]})
    stored = job.volumes.held(key, "send the request again with the voxels as 'volume'")
    index = _slice_index(params, stored.array.shape)
    spacing = params.pop("spacing") or stored.params.get("spacing")
    return key, stored, as_volume(stored.array, tuple(float(s) for s in spacing) if spacing else None), index


def _slice_index(params: Dict[str, Any], shape) -> int:
    from ..imaging import axis_index

    index, axis = params.pop("index"), params["axis"]
    count = shape[axis_index(axis)]
    if not isinstance(index, int) or not 0 <= index < count:
        raise ValueError(f"'index' must be a slice number from 0 to {count - 1} along {axis}, got {index!r}")
    return index


def refine(core, job) -> Result:
    from ..refinement import refine_slice

    params = job.take_params(REFINE_PARAMS)
    arrays = job.arrays()
    key, stored, volume, index = _stored(job, params, arrays)
    slot = (params["axis"], index, params["window"])
    previous = None if params["reset"] else stored.refined.get(slot)
    segmenter = core.get_segmenter(cancel=job.cancelled, **{name: params[name] for name in SEGMENTER_KEYS})
    refined = refine_slice(segmenter, volume, params["axis"], index, params["points"], params["box"],
                           previous=previous, start_mask=arrays.get("mask"), window=params["window"],
                           roi=params["roi"])
    stored.keep_refined(slot, refined)
    return ({"volume_key": key, "axis": params["axis"], "index": index, "iou": round(refined.iou, 4),
             "voxels": int(refined.mask.sum())}, {"mask": refined.mask.astype(np.uint8)})


def propagate(core, job) -> Result:
    params = job.take_params(PROPAGATE_PARAMS)
    arrays = job.arrays()
    if "mask" not in arrays:
        raise ValueError("propagate needs an array named 'mask': the corrected slice (rows x columns)")
    corrections = _locked_masks(params["locked"], arrays.get("locked_masks"))
    key, stored, volume, index = _stored(job, params, arrays)
    segmenter = core.get_segmenter(cancel=job.cancelled, **{name: params[name] for name in SEGMENTER_KEYS})
    result = segmenter.propagate(volume, params["axis"], index, arrays["mask"], locked=params["locked"],
                                 corrections=corrections, first=params["first"], last=params["last"], box=params["box"],
                                 window=params["window"], progress=job.progress, cancel=job.cancelled)
    for slot in [slot for slot in stored.refined if slot[0] == params["axis"] and slot[1] in result.slices]:
        del stored.refined[slot]  # those slices changed: a click there starts from the new mask
    return ({"volume_key": key, "axis": params["axis"], "index": index, "slices": result.slices,
             "stats": result.stats}, {"mask": result.mask})


def _locked_masks(locked, masks: Optional[np.ndarray]) -> Optional[Dict[int, np.ndarray]]:
    """{slice: mask} of the locked slices from the optional array ``locked_masks``, one mask per
    entry of ``locked``, in its order."""
    if masks is None:
        return None
    count = len(locked) if isinstance(locked, (list, tuple)) else None
    if masks.ndim != 3 or len(masks) != count:
        raise ValueError(f"'locked_masks' must hold one rows x columns mask per entry of 'locked' ({count}), in its "
                         f"order; got an array of shape {masks.shape}")
    return {int(i): mask for i, mask in zip(locked, masks)}
