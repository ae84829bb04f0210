"""Which Segmenter is loaded: one per model (``catalogue.MODEL_KEYS``: model, checkpoint, device,
encoder precision and backend), kept warm between jobs, the adapter swapped in place.

A long-lived process (the worker, Slicer's in-process backend) asks for a segmenter with the
options of each job; loading a model takes seconds and its embedding cache is what makes a
re-prompt fast, so the same model is reused, and another model replaces it only after the
old one is freed (two large models may not fit in memory at once).
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Dict, Optional, Tuple

from .catalogue import DEFAULT_MODEL, MODEL_KEYS, SEGMENT_DEFAULTS
from .files import existing_path
from .progress import CancelFn, check_cancel

log = logging.getLogger(__name__)


class SegmenterCache:
    """Holds at most one ``segmenter.Segmenter``.

    ``on_load(segmenter)`` is called once for each newly loaded segmenter (the worker hooks its
    cancel into the image encoder there).
    """

    def __init__(self, on_load: Optional[Callable] = None):
        self.on_load = on_load
        self.segmenter = None
        self.key: Optional[Tuple] = None  # the MODEL_KEYS values of the loaded segmenter
        self.adapter: Optional[str] = None  # the adapter merged into it

    def get(self, model: str = DEFAULT_MODEL, checkpoint: Optional[str] = None,
            device: Optional[str] = SEGMENT_DEFAULTS["device"], precision: str = SEGMENT_DEFAULTS["precision"],
            backend: str = SEGMENT_DEFAULTS["backend"], adapter: Optional[str] = None,
            cancel: Optional[CancelFn] = None):
        """The segmenter for these options, loading it (and swapping its adapter) when needed.
        Missing files are a FileNotFoundError before anything loads. ``cancel()`` is asked before and
        after a load and before an adapter swap (``Cancelled``): a cancel before the load keeps the old
        model; one during it keeps nothing (the old model was let go before loading)."""
        options = _model_options(model, existing_path(checkpoint, "checkpoint file"), device, precision, backend)
        adapter = existing_path(adapter, "adapter folder", folder=True)
        key = tuple(options.values())
        if self.segmenter is None or key != self.key:
            self._load(options, cancel)
        if adapter != self.adapter:
            check_cancel(cancel)
            self.segmenter.set_adapter(adapter)
            self.adapter = adapter
        return self.segmenter

    def _load(self, options: Dict[str, Optional[str]], cancel: Optional[CancelFn]) -> None:
        """Replace the segmenter with a new one for ``options``; it is kept only once loaded, not
        cancelled, and hooked (``on_load``), so a later job never gets a half-set-up one."""
        from .segmenter import Segmenter

        check_cancel(cancel)
        self.clear()  # free the old model first
        log.info("loading model %(model)s (checkpoint %(checkpoint)s) on %(device)s, encoder precision "
                 "%(precision)s, backend %(backend)s", options)
        segmenter = Segmenter(**options, cancel=cancel)
        check_cancel(cancel)
        if self.on_load is not None:
            self.on_load(segmenter)
        self.segmenter, self.key = segmenter, tuple(options.values())

    def loaded_model(self, model: str, checkpoint: Optional[str], device: Optional[str],
                     precision: str = SEGMENT_DEFAULTS["precision"], backend: str = SEGMENT_DEFAULTS["backend"]):
        """The warm model, if it is exactly this one and has no adapter merged in (training reuses it)."""
        checkpoint = os.path.abspath(checkpoint) if checkpoint else None
        key = tuple(_model_options(model, checkpoint, device, precision, backend).values())
        if self.segmenter is None or self.adapter is not None or self.key != key:
            return None
        return self.segmenter.model

    def forget_adapter(self) -> None:
        """The loaded segmenter back to its base model (a no-op without an adapter)."""
        if self.adapter is not None:
            self.segmenter.set_adapter(None)
            self.adapter = None

    def clear(self) -> None:
        """Forget the loaded segmenter (its model and embeddings are freed with it)."""
        self.segmenter, self.key, self.adapter = None, None, None


def _model_options(model: str, checkpoint: Optional[str], device: Optional[str], precision: Optional[str],
                   backend: Optional[str]) -> Dict[str, Optional[str]]:
    """The options that pick a model (``MODEL_KEYS``, in that order), None read as the default."""
    given = dict(model=model, checkpoint=checkpoint, device=device, precision=precision, backend=backend)
    return {name: SEGMENT_DEFAULTS[name] if given[name] is None else given[name] for name in MODEL_KEYS}
