"""Slice-wise SAM segmentation of a 3D box, with an embedding cache that outlives each job.

A ``Segmenter`` is meant to be long-lived (the worker keeps one): the model is loaded once,
and image embeddings are cached by slice content, axis, window and model, so a second box or
a re-prompt on the same slices never runs the encoder again.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import crossing, imaging, postprocess, propagation, tracking
from .adapter_slot import AdapterSlot
from .cache import EmbeddingCache
from .catalogue import AXES, BOX_MODES, ENGINE_DEFAULTS, SEGMENT_DEFAULTS, check_box_mode
from .decoding import SliceJob, resolve_window_margin
from .model_input import SliceGeometry
from .input_checks import check_triplanar, validate_box, validate_roi, validate_volume
from .models import SamModel, load_model
from .progress import CancelFn, Cancelled, ProgressFn, check_cancel, report
from .tracking import TrackingOptions
from .volume_io import Volume, as_volume
from .windows import roi_window
from .zoom import SliceSource

__all__ = ["Segmenter", "SegmentationResult", "TrackingOptions", "Cancelled", "BOX_MODES", "validate_volume",
           "validate_box"]


@dataclass
class SegmentationResult:
    mask: np.ndarray
    slices: List[int]
    stats: Dict[str, float] = field(default_factory=dict)


class Segmenter:
    """Long-lived slice-wise segmentation engine: one model, one embedding cache.

    ``window_margin``: decode only the image tokens this close to each box ("auto": 4 on a CPU,
    the whole slice on CUDA; None: always the whole slice). ``compile``: torch.compile the
    encoder, for long-lived use: 20-30 s once on CUDA, then about 2x faster encoding; about a
    minute once on a CPU (a C++ compiler is needed). ``precision`` and ``backend`` (for a model
    given by name): see ``models.load_model``, which asks ``cancel()`` between its loading steps.
    """

    def __init__(
        self,
        model: Union[str, SamModel] = "litemedsam",
        checkpoint: Optional[str] = None,
        device: Optional[str] = "auto",
        cache_bytes: int = 2 << 30,
        batch_size: Optional[int] = None,
        tracking: Optional[TrackingOptions] = None,
        window_margin: Union[int, None, str] = "auto",
        compile: bool = False,
        precision: str = ENGINE_DEFAULTS["precision"],
        backend: str = ENGINE_DEFAULTS["backend"],
        cancel: Optional[CancelFn] = None,
    ):
        if isinstance(model, str):
            model = load_model(model, checkpoint, device, precision=precision, backend=backend, cancel=cancel)
        else:
            asked = [f"{name} '{value}'" for name, value in (("precision", precision), ("backend", backend))
                     if value != ENGINE_DEFAULTS[name]]
            if asked:
                raise ValueError(f"{' and '.join(asked)} {'applies' if len(asked) == 1 else 'apply'} to a model given "
                                 f"by name; a loaded model keeps its own ({model.precision}, {model.backend}): load "
                                 "it with load_model(..., precision=..., backend=...)")
        # Checked before compiling, which changes the model: a bad value leaves the caller's model as it was.
        window_margin = resolve_window_margin(window_margin, model.device)
        self.model = model
        on_gpu = self.model.device.type == "cuda"
        self.cache = EmbeddingCache(cache_bytes)
        # On a GPU the cache lives on the GPU: moving 4 MB per slice out and back cost more than encoding.
        self.cache_device = self.model.device if on_gpu else torch.device("cpu")
        # Batching pays on a GPU; on a CPU one image at a time measured faster (1.59 vs 1.83 s/slice).
        self.batch_size = batch_size or (8 if on_gpu else 1)
        if compile:
            check_cancel(cancel)
            self.model.compile_encoder(self.batch_size)
        self.tracking = tracking or TrackingOptions()
        # Windowed decoding (SamModel.decode) brings a fixed-box CPU re-prompt from 54 to 15 ms per
        # slice; a GPU decodes the whole slice in under 1 ms, so there it decodes everything.
        self.window_margin = window_margin
        self.encoder_calls = 0
        self.adapters = AdapterSlot(self.model)

    # ------------------------------------------------------------ adapters

    def set_adapter(self, adapter_dir: Optional[str]) -> None:
        """Swap in a fine-tuned decoder (LoRA merged) and, if it was trained, prompt encoder; None
        restores the base model (``AdapterSlot.set``). Cached embeddings stay valid across adapters."""
        self.adapters.set(adapter_dir)

    @property
    def adapter(self) -> Optional[str]:
        """The folder of the adapter in use; None for the base model."""
        return self.adapters.path

    @property
    def tracking_in_use(self) -> TrackingOptions:
        """This segmenter's tracking options with the adapter's own choices (its card) applied."""
        return replace(self.tracking, **self.adapters.tracking)

    @property
    def clicks_learned(self) -> bool:
        """Whether the adapter in use was trained to answer clicks (``training.clicks``)."""
        return self.adapters.clicks

    # ------------------------------------------------------------ embeddings

    def _embed(self, source: SliceSource, indices: Sequence[int], progress: Optional[ProgressFn],
               cancel: Optional[CancelFn], counter: Dict[str, float]) -> Dict[int, torch.Tensor]:
        keys = {index: source.key(index) for index in indices}
        found: Dict[int, torch.Tensor] = {}
        missing: List[int] = []
        for index in indices:
            cached = self.cache.get(keys[index])
            if cached is None:
                missing.append(index)
            else:
                found[index] = cached
        counter["cache_hits"] += len(found)
        for start in range(0, len(missing), self.batch_size):
            check_cancel(cancel)
            batch = missing[start:start + self.batch_size]
            report(progress, int(counter["done"]), int(counter["total"]),
                   f"encoding slice {batch[0]}" + (f"-{batch[-1]}" if len(batch) > 1 else ""))
            images = torch.stack([source.model_input(index) for index in batch])
            with torch.inference_mode():
                embeddings = self.model.encode(images).to(self.cache_device)
            self.encoder_calls += len(batch)
            counter["encoded"] += len(batch)
            for index, embedding in zip(batch, embeddings):
                self.cache.put(keys[index], embedding)
                found[index] = embedding
        return found

    def embed_slices(self, volume, axis: str = "axial", indices: Sequence[int] = (), window: str = "auto",
                     spacing: Optional[Sequence[float]] = None, progress: Optional[ProgressFn] = None,
                     cancel: Optional[CancelFn] = None) -> List[torch.Tensor]:
        """Embeddings of the given slices (cached, returned on the CPU), for training and evaluation."""
        volume = as_volume(volume, spacing)
        validate_volume(volume)
        source = SliceSource(volume, axis, window, self.model)
        counter = {"done": 0, "total": len(indices), "cache_hits": 0, "encoded": 0}
        found = self._embed(source, list(indices), progress, cancel, counter)
        return [found[index].cpu() for index in indices]

    # ------------------------------------------------------------ box modes

    def slice_embedding(self, volume, axis: str, index: int, window: str = "auto",
                        spacing: Optional[Sequence[float]] = None,
                        roi: Optional[Sequence[int]] = None) -> Tuple[torch.Tensor, SliceGeometry]:
        """One slice's embedding (cached, on the cache's device) and how the slice maps onto the
        model's input, for decoding prompts of one's own (``refinement``); windowed as ``segment``
        windows the 3D ``roi`` the slice's segment came from, where one is given."""
        volume = as_volume(volume, spacing)
        validate_volume(volume)
        count = volume.array.shape[imaging.axis_index(axis)]
        if not 0 <= int(index) < count:
            raise ValueError(f"slice {index} is outside the volume's {count} {axis} slices")
        roi = None if roi is None else validate_roi(roi, volume.array.shape)
        source = self._windowed(volume, axis, window, roi)
        counter = {"done": 0, "total": 1, "cache_hits": 0, "encoded": 0}
        return self._embed(source, [int(index)], None, None, counter)[int(index)], source.geometry

    def _window_around(self, volume: Volume, window: str, roi: Optional[Sequence[int]]) -> str:
        """The window a job inside the 3D ``roi`` runs for ``window`` (``windows.roi_window``)."""
        return window if roi is None else roi_window(volume.array, window, base_model=self.adapters.base_in_place)

    def _job(self, source: SliceSource, multimask: bool, progress, cancel, total: int,
             counter: Optional[Dict[str, float]] = None) -> SliceJob:
        counter = counter or {"done": 0, "total": total, "cache_hits": 0, "encoded": 0}
        return SliceJob(self._embed, source, multimask, self.window_margin, self.batch_size, progress, cancel, counter)

    def _source(self, volume: Volume, axis: str, window: str, box, zoom: bool) -> SliceSource:
        """The slices along ``axis``, cropped around the 3D ``box`` when ``zoom``."""
        return SliceSource(volume, axis, window, self.model, imaging.box_to_slices(box, axis)[1] if zoom else None,
                           roi=box)

    def _windowed(self, volume: Volume, axis: str, window: str, roi) -> SliceSource:
        """The whole slices along ``axis``, windowed as a job inside ``roi`` is (``_window_around``)."""
        return self._source(volume, axis, self._window_around(volume, window, roi), roi, zoom=False)

    def _segment_along(self, volume: Volume, box, axis: str, window: str, box_mode: str, zoom: bool,
                       job_args: tuple) -> Tuple[np.ndarray, List[int]]:
        """One box mode along one axis -> the slices' masks in one volume (not cleaned up), and
        the slices it decoded and kept."""
        slices, box2d = imaging.box_to_slices(box, axis)
        job = self._job(self._source(volume, axis, window, box, zoom), *job_args)
        job.counter["box_mode"] = box_mode  # the result's stats say what ran

        def tracked() -> Dict[int, np.ndarray]:
            job.counter["box_mode"] = "tracked"  # also where crossed boxes fall back to tracking
            return tracking.tracked_mode(job, list(slices), box2d, self.tracking_in_use)

        if box_mode == "crossed":
            masks = crossing.crossed_mode(job, partial(self._decode_planes, volume, window, box, zoom, job_args),
                                          box, axis, tracked, self.tracking_in_use.own_box_px)
        else:
            masks = tracked() if box_mode == "tracked" else job.decode_boxes({i: box2d for i in slices}, box2d)
        return imaging.stacked_slices(volume.array.shape, axis, masks), sorted(masks)

    def _decode_planes(self, volume: Volume, window: str, box, zoom: bool, job_args: tuple, axis: str,
                       boxes: Mapping[int, Sequence[int]], clip: Sequence[int]) -> Dict[int, np.ndarray]:
        """Crossed boxes' planes along ``axis``, decoded by the base model even while an adapter is
        in use: an adapter learns the slices of the axis it was trained along and answers the planes
        across it poorly (with the base model's planes an adapter scores near its own tracking,
        with its own far below; docs/accuracy.md). So they are while training's box-mode choice puts
        the adapter it trains in place (``training.box_mode_choice``)."""
        base = self.adapters.base_in_place
        multimask = job_args[0] if base else self.model.spec.multimask_default
        plane_job = self._job(self._source(volume, axis, window, box, zoom), multimask, *job_args[1:])
        if base:
            return plane_job.decode_again(boxes, clip)
        with self.adapters.base_decoding():
            return plane_job.decode_again(boxes, clip)

    # ------------------------------------------------------------ public entry

    def _prepare(self, volume, spacing, axis: str, multimask: Optional[bool]) -> Tuple[Volume, bool]:
        volume = as_volume(volume, spacing)
        validate_volume(volume)
        imaging.axis_index(axis)
        if multimask is None:
            learned = self.adapters.multimask
            multimask = self.model.spec.multimask_default if learned is None else learned
        return volume, bool(multimask)

    def segment(
        self,
        volume,
        box: Sequence[int],
        axis: str = SEGMENT_DEFAULTS["axis"],
        window: str = SEGMENT_DEFAULTS["window"],
        box_mode: str = SEGMENT_DEFAULTS["box_mode"],
        spacing: Optional[Sequence[float]] = None,
        keep_largest: bool = SEGMENT_DEFAULTS["keep_largest"],
        fill_holes: bool = SEGMENT_DEFAULTS["fill_holes"],
        multimask: Optional[bool] = None,
        zoom: bool = SEGMENT_DEFAULTS["zoom"],
        triplanar: bool = SEGMENT_DEFAULTS["triplanar"],
        progress: Optional[ProgressFn] = None,
        cancel: Optional[CancelFn] = None,
    ) -> SegmentationResult:
        """Segment the structure inside a 3D voxel box, slice by slice along ``axis``, each slice prompted
        as ``box_mode`` says (``catalogue.BOX_MODES``; "auto": crossed, or with an adapter the mode
        its card names, tracked where it names none). ``window``: "auto" runs as ``windows.roi_window`` says
        (so do ``segment_boxes``, ``propagate`` inside its box, and ``slice_embedding`` given a ROI).

        ``zoom``: encode a crop around the box on each slice instead of the whole slice (``zoom.py``),
        so a small structure on a large slice reaches the encoder larger. ``triplanar``: segment
        along all three axes and keep the voxels two of them agree on (three times the encoding);
        ``axis`` then only orders the hole filling; for the base model only."""
        check_triplanar(triplanar, self.adapter)
        started = time.perf_counter()
        volume, multimask = self._prepare(volume, spacing, axis, multimask)
        box = validate_box(box, volume.array.shape)
        check_box_mode(box_mode)
        mode = self.adapters.box_mode if box_mode == "auto" else box_mode
        window = self._window_around(volume, window, box)
        axes = list(AXES) if triplanar else [axis]
        counts = [len(imaging.box_to_slices(box, along)[0]) for along in axes]
        counter = {"done": 0, "total": sum(counts), "cache_hits": 0, "encoded": 0}
        planes = [self._segment_along(volume, box, along, window, mode, zoom, (multimask, progress, cancel,
                                                                              sum(counts), counter)) for along in axes]
        if triplanar:
            out = (sum(votes for votes, _ in planes) >= 2).astype(np.uint8)
            kept = [int(i) for i in imaging.box_to_slices(box, axis)[0] if imaging.extract_slice(out, axis, i).any()]
        else:
            out, kept = planes[0]
        return self._result(volume, axis, box, out, kept, counter, progress, keep_largest, fill_holes, started,
                            self.tracking_in_use.smooth_mm)

    def segment_boxes(
        self,
        volume,
        boxes: Mapping[int, Sequence[int]],
        axis: str = "axial",
        window: str = "auto",
        spacing: Optional[Sequence[float]] = None,
        keep_largest: bool = True,
        fill_holes: bool = True,
        multimask: Optional[bool] = None,
        progress: Optional[ProgressFn] = None,
        cancel: Optional[CancelFn] = None,
    ) -> SegmentationResult:
        """Segment with a 2D box (x0, y0, x1, y1, inclusive slice pixels) of one's own on each slice
        {index: box} along ``axis``: boxes from another tool, or a reference's own boxes, which
        bound what one ROI can reach (the benchmark's "oracle"). Masks are clipped to the 3D box
        around all the boxes, and windowed around it, as ``segment`` clips to and windows its ROI."""
        started = time.perf_counter()
        volume, multimask = self._prepare(volume, spacing, axis, multimask)
        if not boxes:
            raise ValueError("segment_boxes needs at least one {slice index: (x0, y0, x1, y1)} box")
        corners = np.array([tuple(b) for b in boxes.values()], dtype=int)
        lo, hi = corners[:, :2].min(axis=0), corners[:, 2:].max(axis=0)
        box = imaging.slices_to_box(min(boxes), max(boxes), (lo[0], lo[1], hi[0], hi[1]), axis)
        box = validate_box(box, volume.array.shape)
        source = self._windowed(volume, axis, window, box)
        job = self._job(source, multimask, progress, cancel, len(boxes))
        clip = imaging.box_to_slices(box, axis)[1]
        masks = job.decode_boxes({int(i): tuple(int(v) for v in b) for i, b in sorted(boxes.items())}, clip)
        return self._result(volume, axis, box, imaging.stacked_slices(volume.array.shape, axis, masks),
                            sorted(masks), job.counter, progress, keep_largest, fill_holes, started)

    def propagate(
        self,
        volume,
        axis: str,
        index: int,
        mask: np.ndarray,
        locked: Sequence[int] = (),
        corrections: Optional[Mapping[int, np.ndarray]] = None,
        first: Optional[int] = None,
        last: Optional[int] = None,
        box: Optional[Sequence[int]] = None,
        window: str = "auto",
        spacing: Optional[Sequence[float]] = None,
        multimask: Optional[bool] = None,
        progress: Optional[ProgressFn] = None,
        cancel: Optional[CancelFn] = None,
    ) -> SegmentationResult:
        """Carry a corrected 2D ``mask`` on slice ``index`` outwards in both directions, with
        tracking's rules, inside the 3D voxel ``box`` the structure was segmented from (default:
        the whole volume), between slices ``first`` and ``last`` (``propagation.carry``).

        A ``locked`` slice (one the user corrected) is never changed and ends tracking there; given
        the other corrected slices' masks (``corrections``, {slice: mask}), the slices between two
        are decoded with boxes interpolated between theirs. ``slices``: those written.
        """
        started = time.perf_counter()
        volume, multimask = self._prepare(volume, spacing, axis, multimask)
        box = None if box is None else validate_box(box, volume.array.shape)
        source = self._windowed(volume, axis, window, box)
        first, last, roi = propagation.limits(box, axis, index, first, last,
                                              volume.array.shape[imaging.axis_index(axis)], source.geometry.shape)
        mask = propagation.start_mask(mask, source.geometry.shape, axis, roi)
        options = self.tracking_in_use
        job = self._job(source, multimask, progress, cancel, last - first)
        masks = propagation.carry(job, index, mask, first, last, locked, roi, options, corrections)
        if box is not None and options.fixed_fallback > 0:
            masks = tracking.both_keep(masks, job.decode_again({i: roi for i in masks}, roi))
        if options.own_box_px > 0:
            masks = tracking.in_own_boxes(job, masks, roi, options.own_box_px)
        counter = job.counter
        report(progress, counter["total"], counter["total"], "done")
        stats = {"encoded": counter["encoded"], "cache_hits": counter["cache_hits"], "slices": len(masks),
                 "seconds": time.perf_counter() - started}
        return SegmentationResult(imaging.stacked_slices(volume.array.shape, axis, masks), sorted(masks), stats)

    @staticmethod
    def _result(volume: Volume, axis: str, box, out: np.ndarray, kept: List[int], counter: Dict[str, float],
                progress, keep_largest: bool, fill_holes: bool, started: float,
                smooth_mm: float = 0.0) -> SegmentationResult:
        """The mask cleaned up (and smoothed by ``smooth_mm``) inside the box, with the slices
        segmented and the job's numbers."""
        region = imaging.box_region(box)
        out[region] = postprocess.clean(out[region], imaging.axis_index(axis), keep_largest, fill_holes)
        if smooth_mm > 0:
            out = postprocess.smooth_inside(out, box, smooth_mm, volume.spacing)
        report(progress, int(counter["total"]), int(counter["total"]), "done")
        stats = {"encoded": counter["encoded"], "cache_hits": counter["cache_hits"],
                 "slices": len(imaging.box_to_slices(box, axis)[0]), "segmented_slices": len(kept),
                 "seconds": time.perf_counter() - started}
        for name in ("fixed_fallback", "box_mode"):
            if name in counter:
                stats[name] = counter[name]
        return SegmentationResult(out, kept, stats)
