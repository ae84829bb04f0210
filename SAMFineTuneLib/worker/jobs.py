"""The worker's jobs: each handler takes the worker core and the running job and returns
(result dict, result arrays); ``HANDLERS`` maps a protocol command to its handler.

Handlers run on the job thread, one at a time. Engine functions get the job's progress,
cancel and log hooks where their signature takes them. A parameter that names a file on the
worker's machine is listed in ``PATH_PARAMS``: the session resolves it through the
conversation's ``access.PathAccess`` before the handler runs (a TCP client may name none, or
only paths inside the server's data root), so a new command with a path lists it there.
Input is checked before a model loads.
"""
from __future__ import annotations

import importlib
import inspect
import time
from typing import Any, Callable, Dict, Tuple

import numpy as np

from .. import catalogue
from ..progress import Cancelled

Result = Tuple[Dict[str, Any], Dict[str, np.ndarray]]

# segment/reprompt parameters and their defaults (PROTOCOL.md): the catalogue's, plus what only
# the protocol carries.
SEGMENT_PARAMS: Dict[str, Any] = dict(catalogue.SEGMENT_DEFAULTS, box=None, spacing=None, multimask=None,
                                      volume_key=None)
# What picks the segmenter: the model, and the adapter merged into it.
SEGMENTER_KEYS = catalogue.MODEL_KEYS + ("adapter",)
# The parameters of each command that name files or folders on the worker's machine.
PATH_PARAMS: Dict[str, Tuple[str, ...]] = {
    "load_model": ("checkpoint", "adapter"), "segment": ("checkpoint", "adapter"),
    "reprompt": ("checkpoint", "adapter"), "refine": ("checkpoint", "adapter"),
    "propagate": ("checkpoint", "adapter"), "export": ("output_dir",), "train": ("dataset", "output", "checkpoint"),
    "evaluate": ("dataset", "checkpoint", "adapter", "csv_path", "plot_path"),
}


def _lazy(module: str, name: str, command: str) -> Any:
    """A function from another part of SAMFineTuneLib, or a clear error if that part is missing."""
    package = __package__.rsplit(".", 1)[0]
    try:
        return getattr(importlib.import_module(f"{package}.{module}"), name)
    except (ImportError, AttributeError) as exc:
        raise RuntimeError(
            f"the '{command}' job needs SAMFineTuneLib.{module}.{name}, which this worker cannot load ({exc}); "
            "check that SAMFineTuneLib is complete and its dependencies are installed in the worker's Python"
        ) from exc


def _call_with_hooks(fn: Callable, job, *args: Any, **kwargs: Any) -> Any:
    """Call fn, handing it the job's progress/cancel/log hooks where its signature takes them."""
    signature = inspect.signature(fn)
    for hook in ("progress", "cancel", "log"):
        if hook in signature.parameters:
            kwargs[hook] = getattr(job, "cancelled" if hook == "cancel" else hook)
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise ValueError(f"bad {job.command} parameters: {exc}") from None
    return fn(*args, **kwargs)


def echo(core, job) -> Result:
    """Diagnostic: sends params and arrays back; ``seconds`` waits that long, cancellably."""
    params = job.take_params({"seconds": 0.0, "data": None})
    arrays = job.arrays()
    end = time.monotonic() + float(params["seconds"])
    total = max(1, int(float(params["seconds"]) / 0.05))
    for step in range(total + 1):
        if job.cancelled():
            raise Cancelled("cancelled by the user")
        job.progress(step, total, f"waiting {step}/{total}")
        if time.monotonic() >= end:
            break
        time.sleep(min(0.05, max(0.0, end - time.monotonic())))
    return {"params": params, "arrays": {k: [v.dtype.str, list(v.shape)] for k, v in arrays.items()}}, arrays


def load_model(core, job) -> Result:
    params = job.take_params({key: SEGMENT_PARAMS[key] for key in SEGMENTER_KEYS})
    started = time.perf_counter()
    segmenter = core.get_segmenter(cancel=job.cancelled, **params)
    model = getattr(segmenter, "model", None)
    return {"model": params["model"], "fingerprint": getattr(model, "fingerprint", None),
            "device": str(getattr(model, "device", params["device"])), "adapter": core.adapter,
            "load_seconds": round(time.perf_counter() - started, 3)}, {}


def segment(core, job) -> Result:
    params = job.take_params(SEGMENT_PARAMS)
    arrays = job.arrays()
    if "volume" not in arrays:
        raise ValueError("segment needs an array named 'volume' (the image, KJI order)")
    key = params.pop("volume_key") or job.id
    remembered = dict(params)
    checked = _checked_input(job, arrays["volume"], params)
    job.volumes.remember(key, arrays["volume"], remembered)
    return _segment(core, job, checked, params, key)


def reprompt(core, job) -> Result:
    key = job.params.get("volume_key") or job.volumes.last_key
    stored = job.volumes.held(key, "send it again with 'segment'")
    params = job.take_params(SEGMENT_PARAMS, **stored.params)
    params.pop("volume_key")
    return _segment(core, job, _checked_input(job, stored.array, params), params, key)


def _checked_input(job, array: np.ndarray, params: Dict[str, Any]):
    """The volume with its spacing, its box as six ints, and its warnings (sent as log events),
    all checked before any model loads; takes 'box' and 'spacing' out of ``params``."""
    from ..input_checks import check_segment_input
    from ..volume_io import as_volume

    box, spacing = params.pop("box"), params.pop("spacing")
    if not isinstance(box, (list, tuple)) or len(box) != 6:
        raise ValueError(f"'box' must be [i0, j0, k0, i1, j1, k1] (inclusive voxel indices), got {box!r}")
    volume = as_volume(array, tuple(float(s) for s in spacing) if spacing else None)
    box, warnings = check_segment_input(volume, box, "the volume")
    for warning in warnings:
        job.log(warning, level="warning")
    return volume, box, warnings


def _segment(core, job, checked, params: Dict[str, Any], key: str) -> Result:
    from ..input_checks import check_triplanar

    volume, box, warnings = checked
    check_triplanar(params["triplanar"], params["adapter"])
    segmenter = core.get_segmenter(cancel=job.cancelled, **{name: params.pop(name) for name in SEGMENTER_KEYS})
    res = segmenter.segment(volume, box=box, progress=job.progress, cancel=job.cancelled, **params)
    mask = np.asarray(res.mask, dtype=np.uint8)
    return {"volume_key": key, "slices": [int(s) for s in res.slices], "stats": dict(res.stats or {}),
            "voxels": int(np.count_nonzero(mask)), "warnings": warnings}, {"mask": mask}


def export(core, job) -> Result:
    export_dataset = _lazy("dataset", "export_dataset", "export")
    params = dict(job.params)
    cases_spec = params.pop("cases", None)
    if not isinstance(cases_spec, list) or not cases_spec:
        raise ValueError("export needs 'cases': a list of {id, image, label} (array names or *_path files)")
    if not all(isinstance(case, dict) and case.get("id") is not None for case in cases_spec):
        raise ValueError("export 'cases' must be a list of objects {id, image, label} (or image_path, label_path)")
    if not params.get("output_dir"):
        raise ValueError("export needs 'output_dir'")
    arrays = job.arrays()
    cases = [(str(case["id"]), _case_volume(job, case, "image", arrays), _case_volume(job, case, "label", arrays))
             for case in cases_spec]
    if isinstance(params.get("label_names"), dict):
        params["label_names"] = {int(k): v for k, v in params["label_names"].items()}
    summary = _call_with_hooks(export_dataset, job, cases, params.pop("output_dir"), **params)
    return {"summary": summary}, {}


def _case_volume(job, case: Dict[str, Any], kind: str, arrays: Dict[str, np.ndarray]):
    """An export case's image or label: an array sent with the request, or a file on the worker's disk."""
    from ..files import existing_path
    from ..volume_io import Volume, read_volume

    if case.get(kind + "_path"):
        what = f"{kind} file of case {case.get('id')!r}"
        return read_volume(existing_path(job.access.resolve(case[kind + "_path"], what), what))
    name = case.get(kind)
    if name not in arrays:
        raise ValueError(f"case {case.get('id')!r}: no array {name!r} for its {kind} (give '{kind}' or '{kind}_path')")
    geometry = {key: tuple(float(v) for v in case[key]) for key in ("spacing", "origin", "direction") if case.get(key)}
    return Volume(arrays[name], **geometry)


def train(core, job) -> Result:
    run = _lazy("training", "train", "train")
    config_class = _lazy("training", "TrainConfig", "train")
    try:
        config = config_class(**job.params)
    except TypeError as exc:
        raise ValueError(f"bad train parameters: {exc}") from None
    _lazy("training.trainer", "check_start", "train")(config)  # a refused run: before the model or embeddings
    model = core.loaded_model(config.model, config.checkpoint, config.device, config.precision, config.backend)
    extra = {"model": model} if model is not None and "model" in inspect.signature(run).parameters else {}
    if core.segmenters.segmenter is not None:  # slices the user segmented here are not encoded again
        keep = _lazy("training.shared_embeddings", "keep_for_training", "train")
        keep(core.segmenters.segmenter, config, progress=job.progress, cancel=job.cancelled)
    return {"card": _call_with_hooks(run, job, config, **extra)}, {}


def evaluate(core, job) -> Result:
    run = _lazy("evaluate", "evaluate", "evaluate")
    params = dict(job.params)
    if "dataset" not in params:
        raise ValueError("evaluate needs 'dataset' (a folder written by export)")
    return {"report": _call_with_hooks(run, job, params.pop("dataset"), **params)}, {}


# The correction jobs read this module's names, so they are imported once those exist.
from .corrections import propagate, refine  # noqa: E402

HANDLERS: Dict[str, Callable[[Any, Any], Result]] = {
    "echo": echo, "load_model": load_model, "segment": segment, "reprompt": reprompt, "refine": refine,
    "propagate": propagate, "export": export, "train": train, "evaluate": evaluate,
}
