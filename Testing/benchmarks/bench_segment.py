r"""Segmentation speed and accuracy: cold vs warm segmentation against a per-slice loop, and fixed ROI
vs tracked boxes on labelled volumes (prints markdown tables).

  python Testing/benchmarks/bench_segment.py [--dataset DIR] [--device cpu|cuda] [--skip-speed] ...

``--dataset`` is a folder with images/ and masks/ (3D NIfTI, integer labels) and labels.json, as in
../shared/data; without it the built-in CT phantom is used. The speed table times the engine
(batched encoding, embedding cache, windowed decoding) against encoding and decoding each slice
alone on the model as segment-anything builds it (``models.build_model``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from SAMFineTuneLib import imaging  # noqa: E402
from SAMFineTuneLib.cli_args import (add_axis_argument, add_engine_arguments, add_model_arguments,  # noqa: E402
                                     add_window_argument)
from SAMFineTuneLib.metrics import dice_score as dice  # noqa: E402
from SAMFineTuneLib.models import build_model, load_model  # noqa: E402
from SAMFineTuneLib.phantom import bounding_box, make_ct_phantom  # noqa: E402
from SAMFineTuneLib.segmenter import Segmenter  # noqa: E402
from SAMFineTuneLib.volume_io import read_volume  # noqa: E402


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", help="folder with images/ and masks/ (3D NIfTI, integer labels) and "
                                          "labels.json, as in ../shared/data; default: the built-in CT phantom")
    parser.add_argument("--labels", nargs="*", type=int, help="label values to score (default: the largest ones)")
    parser.add_argument("--max-structures", type=int, default=6, help="at most this many structures per case")
    parser.add_argument("--min-slices", type=int, default=4, help="skip structures spanning fewer slices")
    parser.add_argument("--margin", type=int, default=3, help="ROI margin around the reference box, in voxels "
                                                               "(in-plane; 1 slice along the axis)")
    parser.add_argument("--speed-slices", type=int, default=20, help="slices in the speed test")
    add_model_arguments(parser)
    add_engine_arguments(parser)
    parser.add_argument("--pretrained", choices=["yes", "no"], default="yes",
                        help="'no' times random weights (for GPU timing of checkpoints you do not have)")
    add_axis_argument(parser)
    add_window_argument(parser)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")


def _cases(dataset: Optional[str]):
    """(case id, volume, label volume, label names) for each 3D case."""
    if not dataset:
        image, label = make_ct_phantom(shape_kji=(40, 128, 128))
        yield "phantom", image, label, {1: "organ"}
        return
    names: Dict[int, str] = {}
    labels_path = os.path.join(dataset, "labels.json")
    if os.path.isfile(labels_path):
        with open(labels_path) as handle:
            raw = json.load(handle)
        for value in raw.values():  # {case description: {value: name}} or {value: name}
            table = value if isinstance(value, dict) else raw
            names.update({int(k): v for k, v in table.items() if str(k).isdigit()})
    for name in sorted(os.listdir(os.path.join(dataset, "images"))):
        if not name.endswith((".nii.gz", ".nii", ".nrrd", ".mha")):
            continue
        yield (name.split(".")[0], read_volume(os.path.join(dataset, "images", name)),
               read_volume(os.path.join(dataset, "masks", name)), names)


def _structures(label: np.ndarray, wanted: Optional[Sequence[int]], limit: int, min_slices: int, axis: int):
    values, counts = np.unique(label[label > 0], return_counts=True)
    order = [int(v) for _, v in sorted(zip(counts, values), reverse=True)]
    chosen = [v for v in order if wanted is None or v in wanted]
    kept = []
    for value in chosen:
        present = np.flatnonzero(np.moveaxis(label == value, axis, 0).any(axis=(1, 2)))
        if present.size >= min_slices:
            kept.append(value)
        if len(kept) >= limit:
            break
    return kept


def _roi_box(mask: np.ndarray, margin: int, axis: str) -> Tuple[int, ...]:
    along = {"axial": 2, "coronal": 1, "sagittal": 0}[axis]
    grow = [margin, margin, margin]
    grow[along] = 1
    return bounding_box(mask, grow)


def _per_slice_loop(model, volume, box, axis, window, warm_up: bool = False) -> float:
    """The per-slice loop: encode each slice alone, no batching, no cache, then decode. Returns seconds.

    Like ``SamPredictor.set_image`` + ``predict``, it runs the encoder in float32 on every device
    (the engine's bf16 autocast on CUDA is one of the things being compared).
    """
    lo, hi = imaging.window_range(volume.array, window)
    slices, box2d = imaging.box_to_slices(box, axis)
    rows_cols = [s for n, s in enumerate(volume.array.shape) if n != imaging.axis_index(axis)]
    geometry = imaging.SliceGeometry(tuple(rows_cols), imaging.slice_pixel_spacing(volume.spacing, axis),
                                     model.spec.input_size)
    started = time.perf_counter()
    with torch.inference_mode():
        for index in slices[:1] if warm_up else slices:
            plane = imaging.apply_window(imaging.extract_slice(volume.array, axis, index), lo, hi)
            embedding = model.image_encoder(imaging.to_model_input(plane, geometry, model.spec)[None].to(model.device))
            low_res, _ = model.decode(embedding, torch.tensor([geometry.box_to_model(box2d)]))
            geometry.logits_to_slice(model.upscale_logits(low_res)[0, 0])
    return time.perf_counter() - started


def _decoding(margin) -> str:
    return "whole slice" if margin is None else f"window of {margin} tokens around the box"


def _speed_table(args, segmenter, baseline, volume, label, load_seconds: float) -> List[str]:
    box = list(bounding_box(label.array, (args.margin, args.margin, 0)))
    along = {"axial": (2, 5, volume.array.shape[0]), "coronal": (1, 4, volume.array.shape[1]),
             "sagittal": (0, 3, volume.array.shape[2])}[args.axis]
    middle = (box[along[0]] + box[along[1]]) // 2
    half = args.speed_slices // 2
    box[along[0]] = max(0, middle - half)
    box[along[1]] = min(along[2] - 1, box[along[0]] + args.speed_slices - 1)
    n = box[along[1]] - box[along[0]] + 1
    # One throwaway batch first: PyTorch's first forward of each batch shape sets up kernels (and
    # compiles, when asked), which would otherwise be charged to whichever side runs first. The
    # cache is emptied after it; the loop gets its own warm-up below.
    warm_up = list(box)
    warm_up[along[1]] = min(box[along[1]], warm_up[along[0]] + segmenter.batch_size - 1)
    warm_up_seconds = segmenter.segment(volume, warm_up, axis=args.axis, window=args.window,
                                        box_mode="fixed").stats["seconds"]
    segmenter.cache.clear()
    cold = segmenter.segment(volume, box, axis=args.axis, window=args.window, box_mode="fixed")

    def warm_seconds(mode: str) -> float:
        """Median of three warm runs: one run of well under a second moves with whatever else the CPU does."""
        return float(np.median([segmenter.segment(volume, box, axis=args.axis, window=args.window,
                                                  box_mode=mode).stats["seconds"] for _ in range(3)]))

    warm, tracked_warm = warm_seconds("fixed"), warm_seconds("tracked")
    margin, segmenter.window_margin = segmenter.window_margin, None
    full_warm, full_tracked = warm_seconds("fixed"), warm_seconds("tracked")
    segmenter.window_margin = margin
    _per_slice_loop(baseline, volume, box, args.axis, args.window, warm_up=True)
    loop = _per_slice_loop(baseline, volume, box, args.axis, args.window)
    cold_s, warm_s = cold.stats["seconds"] / n, warm / n
    decoding = _decoding(margin)
    rows = [
        f"speed: {n} slices, model {segmenter.model.spec.name}, device {segmenter.model.device}, "
        f"encoder batch {segmenter.batch_size}, {segmenter.model.precision}"
        f"{', compiled' if segmenter.model.compiled_batch else ''}"
        f"{', openvino' if segmenter.model.backend == 'openvino' else ''}, "
        f"decoding {decoding}",
        "| measure | value |",
        "|---|---|",
        f"| model load{' (converting to openvino)' if segmenter.model.backend == 'openvino' else ''} | "
        f"{load_seconds:.1f} s |",
        f"| one-off warm-up (first batch{', compiling' if segmenter.model.compiled_batch else ''}) | "
        f"{warm_up_seconds:.1f} s |",
        f"| cold segmentation (fixed box) | {1 / cold_s:.2f} slices/s ({cold_s * 1000:.0f} ms/slice) |",
        f"| warm re-prompt, cached (fixed box; median of 3) | {warm_s * 1000:.1f} ms/slice |",
        f"| warm re-prompt, cached (tracked box; median of 3) | {tracked_warm / n * 1000:.1f} ms/slice |",
        f"| warm re-prompt, whole-slice decode (fixed / tracked box) | {full_warm / n * 1000:.1f}"
        f" / {full_tracked / n * 1000:.1f} ms/slice |",
        f"| warm / cold (fixed / tracked box) | 1/{cold_s / warm_s:.0f} / 1/{cold.stats['seconds'] / tracked_warm:.0f} |",
        f"| per-slice loop (encode+decode each slice, no batch, no cache) | {n / loop:.2f} slices/s |",
        f"| cold engine vs per-slice loop | {loop / cold.stats['seconds']:.2f}x |",
        f"| warm engine vs per-slice loop | {loop / warm:.1f}x |",
    ]
    return rows


def _accuracy_table(args, segmenter, cases) -> None:
    """Dice per structure, fixed ROI vs tracked boxes (and whole-slice decoding when windowed)."""
    axis_number = {"axial": 0, "coronal": 1, "sagittal": 2}[args.axis]
    # Windowed decoding is compared with whole-slice decoding on the same cached embeddings.
    columns = [("fixed ROI", "fixed", segmenter.window_margin), ("tracked", "tracked", segmenter.window_margin)]
    if segmenter.window_margin is not None:
        columns.append(("tracked, whole-slice decode", "tracked", None))
    print(f"\naccuracy: 3D Dice, one ROI per structure = reference box + {args.margin} voxels in-plane "
          f"and 1 slice along the {args.axis} axis; decoding {_decoding(segmenter.window_margin)}")
    print("| case | structure | slices | " + " | ".join(title for title, _, _ in columns) + " |")
    print("|---|---|---|" + "---|" * len(columns), flush=True)
    scores = {title: [] for title, _, _ in columns}
    margin = segmenter.window_margin
    for case, volume, label, names in cases:
        for value in _structures(label.array, args.labels, args.max_structures, args.min_slices, axis_number):
            reference = (label.array == value).astype(np.uint8)
            box = _roi_box(reference, args.margin, args.axis)
            row = []
            for title, mode, window_margin in columns:
                segmenter.window_margin = window_margin
                result = segmenter.segment(volume, box, axis=args.axis, window=args.window, box_mode=mode)
                scores[title].append(dice(result.mask, reference))
                row.append(f"{scores[title][-1]:.3f}")
            segmenter.window_margin = margin
            span = int(np.moveaxis(reference, axis_number, 0).any(axis=(1, 2)).sum())
            print(f"| {case} | {names.get(value, value)} | {span} | " + " | ".join(row) + " |", flush=True)
    count = len(scores[columns[0][0]])
    if count:
        print(f"| **mean** | {count} structures | | "
              + " | ".join(f"{np.mean(scores[title]):.3f}" for title, _, _ in columns) + " |")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    model = load_model(args.model, args.checkpoint, args.device, pretrained=args.pretrained == "yes",
                       precision=args.precision, backend=args.backend)
    load_seconds = time.perf_counter() - started
    segmenter = Segmenter(model, window_margin=args.decode_window, compile=args.compile)
    # The per-slice loop runs on the model as segment-anything builds it: float32, no fused
    # attention, no channels-last, not compiled.
    baseline = build_model(args.model, args.checkpoint, args.device, pretrained=args.pretrained == "yes")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {model.device}", flush=True)
    cases = list(_cases(args.dataset))
    if not args.skip_speed:
        _, volume, label, _ = cases[0]
        biggest = _structures(label.array, args.labels, 1, 1, 0)
        target = label.with_array((label.array == biggest[0]).astype(np.uint8))
        print("\n".join(_speed_table(args, segmenter, baseline, volume, target, load_seconds)), flush=True)
    if args.skip_accuracy:
        return 0
    _accuracy_table(args, segmenter, cases)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
