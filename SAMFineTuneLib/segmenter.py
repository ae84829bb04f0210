"""Slice-wise SAM segmentation of a 3D box, with an embedding cache that outlives each job.

A ``Segmenter`` is meant to be long-lived (the worker keeps one): the model is loaded once,
and image embeddings are cached by slice content, axis, window and model, so a second box or
a re-prompt on the same slices never runs the encoder again.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import imaging
from .cache import EmbeddingCache
from .catalogue import BOX_MODES
from .imaging import SliceGeometry
from .models import SamModel, load_model
from . import postprocess
from .progress import CancelFn, Cancelled, ProgressFn, check_cancel, report
from .volume_io import Volume, as_volume

__all__ = ["Segmenter", "SegmentationResult", "Cancelled", "BOX_MODES", "validate_volume", "validate_box"]

DEFAULT_WINDOW_MARGIN = 4  # tokens (16 px at LiteMedSAM's 256 input) around the box on a CPU
Box2D = Tuple[int, int, int, int]


@dataclass
class SegmentationResult:
    mask: np.ndarray
    slices: List[int]
    stats: Dict[str, float] = field(default_factory=dict)


@dataclass
class TrackingOptions:
    """Where tracking starts, how it follows a structure from slice to slice, and when it gives up.

    It starts on the best-fitting of ``seed_candidates`` slices spread over the ROI (see _seed).
    Each next slice is decoded with the previous mask's box grown by ``margin`` (a fraction of its
    size, at least ``min_margin_px``): a box much larger than the structure makes SAM fill the box,
    one too tight cuts it off where it widens. Tracking stops where the structure has ended: the
    mask is empty or below ``min_area_fraction`` of the seed's area, it is more than
    ``max_growth`` times the previous mask, less than ``min_overlap`` of it lies on the previous
    mask, or its mean intensity moved by more than ``max_intensity_shift`` (in window units) from
    the previous mask's (SAM has jumped to a neighbouring tissue).

    One box per slice, grown by 5%, replaced two candidates (the box, and the box grown by 15%,
    SAM's predicted IoU picking one), which cost twice the decoding; on real CT and MR it scored
    higher on aggregate (README, "Fixed ROI vs tracked boxes").
    """

    margin: float = 0.05
    min_margin_px: int = 2
    min_area_fraction: float = 0.02
    max_growth: float = 2.0
    min_overlap: float = 0.3
    max_intensity_shift: float = 0.15
    seed_candidates: int = 5


# ---------------------------------------------------------------- validation


def check_window_margin(margin) -> None:
    """A ValueError unless ``margin`` is "auto", None or a whole number of tokens >= 0."""
    if margin is None or (isinstance(margin, str) and margin == "auto"):
        return
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
        raise ValueError(f"window_margin must be 'auto', None (decode the whole slice) or a whole number of "
                         f"tokens >= 0, got {margin!r}")


def resolve_window_margin(margin, device) -> Optional[int]:
    """The decode window on ``device``: "auto" -> DEFAULT_WINDOW_MARGIN on a CPU, None (the whole
    slice) on CUDA, where the whole slice decodes in under 1 ms; None and whole numbers pass through.
    Training and evaluation resolve it here too, so they decode as inference does."""
    check_window_margin(margin)
    if margin != "auto":
        return margin
    return None if torch.device(device).type == "cuda" else DEFAULT_WINDOW_MARGIN


def validate_volume(volume: Volume) -> None:
    array = volume.array
    if not isinstance(array, np.ndarray):
        raise ValueError(f"volume must be a numpy array, got {type(array).__name__}")
    if array.ndim == 4 and array.shape[-1] in (3, 4):
        raise ValueError(f"volume has shape {array.shape}: RGB/vector volumes are not supported, use a scalar volume")
    if array.ndim != 3:
        raise ValueError(f"volume must be 3D (k, j, i); got a {array.ndim}D array of shape {array.shape}")
    if 0 in array.shape:
        raise ValueError(f"volume has a zero-size axis: shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) or np.iscomplexobj(array):
        raise ValueError(f"volume must hold real numbers, got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.floating):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise ValueError(f"volume contains {bad} NaN or infinite voxels; fill or mask them before segmenting")
    spacing = np.asarray(volume.spacing, dtype=float)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"spacing must be three positive numbers (x, y, z) in mm, got {volume.spacing}")


def validate_box(box: Sequence, shape_kji: Sequence[int]) -> Tuple[int, ...]:
    values = np.asarray(box, dtype=float).reshape(-1) if box is not None else np.empty(0)
    if values.size != 6:
        raise ValueError(f"box must be six voxel indices (i0, j0, k0, i1, j1, k1), got {box!r}")
    if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
        raise ValueError(f"box indices must be whole numbers, got {list(box)}")
    i0, j0, k0, i1, j1, k1 = (int(v) for v in values)
    limits = {"i": shape_kji[2], "j": shape_kji[1], "k": shape_kji[0]}
    for name, lo, hi in (("i", i0, i1), ("j", j0, j1), ("k", k0, k1)):
        if hi < lo:
            raise ValueError(f"empty box: {name}1={hi} is before {name}0={lo}")
        if lo < 0 or hi >= limits[name]:
            raise ValueError(f"box is outside the volume along {name}: {lo}..{hi}, valid 0..{limits[name] - 1}")
    return (i0, j0, k0, i1, j1, k1)


# ---------------------------------------------------------------- per-job preparation


class _SliceSource:
    """The windowed, resized model inputs of one volume along one axis, keyed for the cache."""

    def __init__(self, volume: Volume, axis: str, window: str, model: SamModel):
        self.volume = volume
        self.axis = axis
        self.model = model
        self.low, self.high = imaging.window_range(volume.array, window)
        rows_cols = [s for n, s in enumerate(volume.array.shape) if n != imaging.axis_index(axis)]
        self.geometry = SliceGeometry(
            tuple(rows_cols), imaging.slice_pixel_spacing(volume.spacing, axis), model.spec.input_size
        )

    def plane(self, index: int) -> np.ndarray:
        return imaging.extract_slice(self.volume.array, self.axis, index)

    def key(self, index: int) -> tuple:
        plane = np.ascontiguousarray(self.plane(index))
        digest = hashlib.blake2b(plane.tobytes(), digest_size=16).hexdigest()
        return (self.model.fingerprint, self.axis, digest, plane.shape, str(plane.dtype),
                self.geometry.resized_shape, round(self.low, 4), round(self.high, 4))

    def windowed(self, index: int) -> np.ndarray:
        return imaging.apply_window(self.plane(index), self.low, self.high)

    def model_input(self, index: int) -> torch.Tensor:
        return imaging.to_model_input(self.windowed(index), self.geometry, self.model.spec, self.model.device)


class Segmenter:
    """Long-lived slice-wise segmentation engine: one model, one embedding cache.

    ``window_margin``: decode only the image tokens this close to each box ("auto": 4 on a CPU,
    the whole slice on CUDA; None: always the whole slice). ``compile``: torch.compile the
    encoder, for long-lived use: 20-30 s once on CUDA, then about 2x faster encoding; about a
    minute once on a CPU (a C++ compiler is needed). ``precision`` and ``backend`` (for a model
    given by name): see ``models.load_model``.
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
        precision: str = "auto",
        backend: str = "torch",
    ):
        if isinstance(model, str):
            model = load_model(model, checkpoint, device, precision=precision, backend=backend)
        else:
            asked = [f"{name} '{value}'" for name, value, default in
                     (("precision", precision, "auto"), ("backend", backend, "torch")) if value != default]
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
            self.model.compile_encoder(self.batch_size)
        self.tracking = tracking or TrackingOptions()
        # Windowed decoding (SamModel.decode) brings a fixed-box CPU re-prompt from 54 to 15 ms per
        # slice; a GPU decodes the whole slice in under 1 ms, so there it decodes everything.
        self.window_margin = window_margin
        self.encoder_calls = 0
        self.adapter: Optional[str] = None
        self._base_decoder = self.model.mask_decoder
        self._base_prompt_encoder = getattr(self.model, "prompt_encoder", None)
        self._adapter_multimask: Optional[bool] = None

    # ------------------------------------------------------------ adapters

    def set_adapter(self, adapter_dir: Optional[str]) -> None:
        """Swap in a fine-tuned decoder (LoRA merged) and, if it was trained, prompt encoder.

        None restores the base model. The image encoder is never touched, so cached embeddings
        stay valid across adapters. A failing adapter leaves the current model as it was.
        """
        if adapter_dir is None:
            decoder, prompt_encoder = self._base_decoder, self._base_prompt_encoder
        else:
            from .adapters import load_adapter

            self.model.mask_decoder = self._base_decoder  # merge onto the base, never onto another adapter
            current = self.adapter
            try:
                peft_decoder, prompt_encoder, card = load_adapter(self.model, adapter_dir)
            except BaseException:
                self.set_adapter(current)
                raise
            decoder = peft_decoder.merge_and_unload().to(self.model.device).eval().requires_grad_(False)
            prompt_encoder = prompt_encoder or self._base_prompt_encoder
        self.model.mask_decoder = decoder
        self.model.prompt_encoder = prompt_encoder
        self.adapter = adapter_dir
        # An adapter is trained on one output token; decode with the one it learned.
        self._adapter_multimask = None if adapter_dir is None else card.get("inference", {}).get("multimask")

    # ------------------------------------------------------------ embeddings

    def _embed(self, source: _SliceSource, indices: Sequence[int], progress: Optional[ProgressFn],
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
        source = _SliceSource(volume, axis, window, self.model)
        counter = {"done": 0, "total": len(indices), "cache_hits": 0, "encoded": 0}
        found = self._embed(source, list(indices), progress, cancel, counter)
        return [found[index].cpu() for index in indices]

    def slice_embedding(self, volume, axis: str, index: int, window: str = "auto",
                        spacing: Optional[Sequence[float]] = None) -> Tuple[torch.Tensor, SliceGeometry]:
        """One slice's embedding (cached, on the cache's device) and how the slice maps onto the
        model's input, for decoding prompts of one's own (``refinement``)."""
        volume = as_volume(volume, spacing)
        validate_volume(volume)
        count = volume.array.shape[imaging.axis_index(axis)]
        if not 0 <= int(index) < count:
            raise ValueError(f"slice {index} is outside the volume's {count} {axis} slices")
        source = _SliceSource(volume, axis, window, self.model)
        counter = {"done": 0, "total": 1, "cache_hits": 0, "encoded": 0}
        return self._embed(source, [int(index)], None, None, counter)[int(index)], source.geometry

    # ------------------------------------------------------------ decoding

    def _decode(self, source: _SliceSource, embeddings: List[torch.Tensor], boxes: List[Box2D],
                clip: Box2D, multimask: bool, windowed: bool = True,
                best_of: int = 1) -> List[Tuple[np.ndarray, float, int]]:
        """Decode several slices in one batch -> (mask, predicted IoU, place in its group) each;
        masks are clipped to the user's box. With ``best_of`` > 1 the boxes come in groups of
        that many and only the most confident of each group is kept (and upscaled)."""
        geometry = source.geometry
        model_boxes = torch.tensor([geometry.box_to_model(box) for box in boxes], dtype=torch.float32)
        margin = self.window_margin if windowed else None
        with torch.inference_mode():
            stacked = torch.stack(embeddings)
            if best_of > 1:
                low_res, iou, place = self.model.decode_best(stacked, model_boxes, best_of, multimask=multimask,
                                                             window_margin=margin)
            else:
                low_res, iou = self.model.decode(stacked, model_boxes, multimask=multimask, window_margin=margin)
                place = torch.zeros_like(iou, dtype=torch.long)
            logits = self.model.upscale_logits(low_res)
            x0, y0, x1, y1 = clip
            inside = (geometry.logits_to_slices(logits[:, 0])[:, y0:y1 + 1, x0:x1 + 1] > 0).cpu().numpy()
        results = []
        for n, (score, pick) in enumerate(zip(iou.tolist(), place.tolist())):
            mask = np.zeros(geometry.shape, dtype=bool)
            mask[y0:y1 + 1, x0:x1 + 1] = inside[n]
            results.append((mask, float(score), int(pick)))
        return results

    def _segment_fixed(self, source, slices, box2d, multimask, progress, cancel, counter):
        masks: Dict[int, np.ndarray] = {}
        step = self.batch_size * 2
        for start in range(0, len(slices), step):
            chunk = list(slices[start:start + step])
            embeddings = self._embed(source, chunk, progress, cancel, counter)
            check_cancel(cancel)
            decoded = self._decode(source, [embeddings[i] for i in chunk], [box2d] * len(chunk), box2d, multimask)
            for index, (mask, _, _) in zip(chunk, decoded):
                masks[index] = mask
            counter["done"] += len(chunk)
            report(progress, int(counter["done"]), int(counter["total"]), f"segmented slice {chunk[-1]}")
        return masks

    def _next_box(self, previous: np.ndarray, roi: Box2D) -> Box2D:
        """The previous slice's mask box, grown by the tracking margin and kept inside the ROI."""
        x0, y0, x1, y1 = imaging.mask_box(previous)
        grow_x = max(self.tracking.min_margin_px, int(round(self.tracking.margin * (x1 - x0 + 1))))
        grow_y = max(self.tracking.min_margin_px, int(round(self.tracking.margin * (y1 - y0 + 1))))
        return (max(roi[0], x0 - grow_x), max(roi[1], y0 - grow_y), min(roi[2], x1 + grow_x), min(roi[3], y1 + grow_y))

    def _keeps_tracking(self, mask: np.ndarray, previous: np.ndarray, seed_area: int, plane: np.ndarray,
                        previous_plane: np.ndarray) -> bool:
        options = self.tracking
        area, previous_area = int(mask.sum()), int(previous.sum())
        if area == 0 or area < options.min_area_fraction * seed_area or area > options.max_growth * previous_area:
            return False
        if np.logical_and(mask, previous).sum() < options.min_overlap * area:
            return False
        shift = abs(float(plane[mask].mean()) - float(previous_plane[previous].mean()))
        return shift <= options.max_intensity_shift

    def _seed(self, source, slices, box2d, multimask, progress, cancel, counter):
        """The slice to start tracking from, and its mask.

        The ROI's rectangle fits the structure best on the slice where the structure is widest,
        and SAM's predicted IoU is highest where its box fits; so the ROI box is decoded on a few
        slices spread over the range and the most confident one wins. (The middle slice alone
        fails when the structure is cut by the volume's edge or lies off-centre in the ROI.)
        """
        count = min(len(slices), self.tracking.seed_candidates)
        picks = sorted({slices[int(round(p))] for p in np.linspace(0.1, 0.9, count) * (len(slices) - 1)})
        embeddings = self._embed(source, picks, progress, cancel, counter)
        # The seed decides everything after it, so it is decoded over the whole slice even when
        # tracking decodes windows: a windowed seed lost the MR stomach (Dice 0.007 vs 0.484), and
        # even a window 16 tokens around the ROI lost the MR right kidney (0.002 vs 0.634).
        (mask, _, best), = self._decode(source, [embeddings[i] for i in picks], [box2d] * len(picks), box2d,
                                        multimask, windowed=False, best_of=len(picks))
        return picks[best], mask

    def _segment_tracked(self, source, slices, box2d, multimask, progress, cancel, counter):
        """Start where the ROI box fits best and follow the structure outwards, slice by slice."""
        seed_index, seed = self._seed(source, slices, box2d, multimask, progress, cancel, counter)
        counter["done"] += 1
        masks = {seed_index: seed}
        if not seed.any():
            return masks
        for direction in (1, -1):
            ahead = sorted((i for i in slices if (i - seed_index) * direction > 0), key=lambda i: abs(i - seed_index))
            self._follow(source, ahead, seed_index, seed, box2d, multimask, progress, cancel, counter, masks)
        return masks

    def _follow(self, source, ahead, start_index, start, roi, multimask, progress, cancel, counter, masks):
        """Track from ``start`` (the mask on slice ``start_index``) over the slices ``ahead``, in
        order, into ``masks``, until the structure ends (``_keeps_tracking``)."""
        seed_area = int(start.sum())
        previous, previous_plane = start, source.windowed(start_index)
        for first in range(0, len(ahead), self.batch_size):
            chunk = ahead[first:first + self.batch_size]
            embeddings = self._embed(source, chunk, progress, cancel, counter)
            for index in chunk:
                check_cancel(cancel)
                box = self._next_box(previous, roi)
                (mask, _, _), = self._decode(source, [embeddings[index]], [box], roi, multimask)
                plane = source.windowed(index)
                counter["done"] += 1
                report(progress, int(counter["done"]), int(counter["total"]), f"tracked slice {index}")
                if not self._keeps_tracking(mask, previous, seed_area, plane, previous_plane):
                    return
                masks[index] = mask
                previous, previous_plane = mask, plane

    # ------------------------------------------------------------ public entry

    def segment(
        self,
        volume,
        box: Sequence[int],
        axis: str = "axial",
        window: str = "auto",
        box_mode: str = "tracked",
        spacing: Optional[Sequence[float]] = None,
        keep_largest: bool = True,
        fill_holes: bool = True,
        multimask: Optional[bool] = None,
        progress: Optional[ProgressFn] = None,
        cancel: Optional[CancelFn] = None,
    ) -> SegmentationResult:
        """Segment the structure inside a 3D voxel box, slice by slice along ``axis``."""
        started = time.perf_counter()
        volume = as_volume(volume, spacing)
        validate_volume(volume)
        box = validate_box(box, volume.array.shape)
        imaging.axis_index(axis)
        if box_mode not in BOX_MODES:
            raise ValueError(f"unknown box mode '{box_mode}'; choose one of: {', '.join(BOX_MODES)}")
        if multimask is None:
            multimask = self.model.spec.multimask_default if self._adapter_multimask is None else self._adapter_multimask
        multimask = bool(multimask)
        source = _SliceSource(volume, axis, window, self.model)
        slices, box2d = imaging.box_to_slices(box, axis)
        counter = {"done": 0, "total": len(slices), "cache_hits": 0, "encoded": 0}
        run = self._segment_tracked if box_mode == "tracked" else self._segment_fixed
        masks = run(source, list(slices), box2d, multimask, progress, cancel, counter)

        out = np.zeros(volume.array.shape, dtype=np.uint8)
        for index, plane in masks.items():
            imaging.place_slice(out, axis, index, plane)
        region = (slice(box[2], box[5] + 1), slice(box[1], box[4] + 1), slice(box[0], box[3] + 1))
        sub = out[region]
        if keep_largest and sub.any():
            sub = postprocess.keep_largest_component(sub)
        if fill_holes and sub.any():
            sub = postprocess.fill_holes(sub, imaging.axis_index(axis))
        out[region] = sub
        report(progress, len(slices), len(slices), "done")
        stats = {"encoded": counter["encoded"], "cache_hits": counter["cache_hits"], "slices": len(slices),
                 "segmented_slices": len(masks), "seconds": time.perf_counter() - started}
        return SegmentationResult(out, sorted(masks), stats)

    def propagate(
        self,
        volume,
        axis: str,
        index: int,
        mask: np.ndarray,
        locked: Sequence[int] = (),
        first: Optional[int] = None,
        last: Optional[int] = None,
        window: str = "auto",
        spacing: Optional[Sequence[float]] = None,
        multimask: Optional[bool] = None,
        progress: Optional[ProgressFn] = None,
        cancel: Optional[CancelFn] = None,
    ) -> SegmentationResult:
        """Carry a corrected 2D ``mask`` on slice ``index`` outwards in both directions, with
        tracking's rules, between slices ``first`` and ``last`` (default: the whole volume).

        A ``locked`` slice (one the user corrected) is never changed and ends propagation in its
        direction: past it, that slice's own correction is the better start. The result holds the
        slices written (``slices``), the corrected slice not among them.
        """
        started = time.perf_counter()
        volume = as_volume(volume, spacing)
        validate_volume(volume)
        count = volume.array.shape[imaging.axis_index(axis)]
        first, last = (0 if first is None else int(first)), (count - 1 if last is None else int(last))
        if not 0 <= first <= int(index) <= last < count:
            raise ValueError(f"propagation from slice {index} between slices {first} and {last} does not fit the "
                             f"volume's {count} {axis} slices")
        source = _SliceSource(volume, axis, window, self.model)
        mask = np.asarray(mask) > 0
        if mask.shape != source.geometry.shape:
            raise ValueError(f"the corrected slice is {mask.shape}, the volume's {axis} slices "
                             f"{source.geometry.shape}: send the segment's mask on that slice")
        if not mask.any():
            raise ValueError("the corrected slice is empty: correct it first, then propagate from it")
        if multimask is None:
            multimask = self.model.spec.multimask_default if self._adapter_multimask is None else self._adapter_multimask
        rows, cols = mask.shape
        roi = (0, 0, cols - 1, rows - 1)
        stops = set(int(i) for i in locked)
        counter = {"done": 0, "total": last - first, "cache_hits": 0, "encoded": 0}
        masks: Dict[int, np.ndarray] = {}
        for direction, end in ((1, last), (-1, first)):
            ahead = []
            for i in range(int(index) + direction, end + direction, direction):
                if i in stops:
                    break
                ahead.append(i)
            self._follow(source, ahead, int(index), mask, roi, bool(multimask), progress, cancel, counter, masks)
        out = np.zeros(volume.array.shape, dtype=np.uint8)
        for i, plane in masks.items():
            imaging.place_slice(out, axis, i, plane)
        report(progress, counter["total"], counter["total"], "done")
        stats = {"encoded": counter["encoded"], "cache_hits": counter["cache_hits"], "slices": len(masks),
                 "seconds": time.perf_counter() - started}
        return SegmentationResult(out, sorted(masks), stats)
