r"""Correcting with clicks, measured the way interactive-segmentation papers do (prints markdown tables).

  python Testing/benchmarks/bench_clicks.py --dataset DIR [--dataset DIR ...] [--max-cases N]
      [--max-structures N] [--slices N] [--device cpu|cuda] [--latency-clicks N]
      [--merge-labels] [--adapter DIR ...] [--min-area F] [--box-mode MODE]

For each structure of each 3D case (images/, masks/, labels.json as in ../shared/data; without
--dataset the built-in CT phantom) one ROI is drawn 3 voxels loose (1 slice along the axis) and
segmented in ``--box-mode`` (default: the Segmenter's, crossed boxes for the base model, and with
an adapter the box mode its card names). Then, on up to --slices slices spread over those where the
structure is present (with ``--min-area``, only those where it covers that fraction of its
largest slice: a one-pixel end scores all or nothing), a simulated user clicks
(``refinement.simulated_click``: the centre of the largest error region, positive where missed,
negative where leaked) and Dice is read after 0 (the ROI's result), 1, 3 and 5 clicks, beside
SAM's Dice with the reference's own box on that slice (the "oracle" box no user draws).
Propagation: the slice the ROI's result got most pixels wrong is replaced by the reference (the
user corrected it) and carried on inside the ROI (its slices and rectangle, ``Segmenter.propagate``'s
``box``); its 3D Dice is compared with the ROI's result's, alone (the slices it did not reach
empty) and as the segment the SAM effect leaves (those slices keep the ROI's result). Latency: one
click through the background worker on a cached slice.

With ``--adapter`` (repeatable) every structure is also measured with each adapter in place,
side by side with the base model, on cases none of the adapters trained or validated on (their
model cards list them): whether an adapter trained with simulated clicks (``train
--click-prompts``) corrects with fewer clicks. ``--merge-labels`` takes all labels as one
structure, as the hippocampus adapters are trained.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import os
import time
from typing import Dict, Iterator, List, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_segment import _cases, _roi_box, _structures  # noqa: E402
from SAMFineTuneLib import imaging  # noqa: E402
from SAMFineTuneLib.cli_args import add_box_mode_argument, add_engine_arguments, add_model_arguments  # noqa: E402
from SAMFineTuneLib.metrics import dice_score  # noqa: E402
from SAMFineTuneLib.refinement import refine_slice, simulated_click  # noqa: E402
from SAMFineTuneLib.segmenter import Segmenter  # noqa: E402

CLICKS = (0, 1, 3, 5)


def dice(a, b) -> float:
    return float(dice_score(np.asarray(a, bool), np.asarray(b, bool)))


def oracle_box_mask(segmenter, volume, k, reference, roi) -> np.ndarray:
    """SAM's answer to the reference's own box on one slice (what the published recipes prompt with),
    the slice windowed as the SAM effect windows a segment made from ``roi``."""
    return refine_slice(segmenter, volume, "axial", k, [], box=imaging.mask_box(reference), roi=roi).mask


def simulated_user(segmenter, volume, k, start, reference, roi, clicks: int, axis: str = "axial",
                   window: str = "auto") -> Iterator[np.ndarray]:
    """Slice k's mask after each of ``clicks`` simulated clicks (``refinement.simulated_click``: the
    middle of the largest error), each added to the slice's earlier ones, starting from ``start``;
    the clicks name the ROI the segment came from, as the SAM effect does. Once the mask is exact
    (no click left to make) it stays."""
    points, previous, current = [], None, start
    for _ in range(clicks):
        click = simulated_click(current, reference)
        if click is not None:
            points.append(click)
            previous = refine_slice(segmenter, volume, axis, k, points, previous=previous,
                                    start_mask=start if previous is None else None, window=window, roi=roi)
            current = previous.mask
        yield current


def click_curve(segmenter, volume, k, start, reference, roi) -> List[float]:
    """Dice after 0..max(CLICKS) simulated clicks on slice k (``simulated_user``)."""
    scores = [dice(start, reference)] + [dice(mask, reference) for mask in
                                         simulated_user(segmenter, volume, k, start, reference, roi, max(CLICKS))]
    return [scores[n] for n in CLICKS]


def structure_rows(args, segmenter, volume, label) -> Dict[str, object]:
    roi = _roi_box(label, 3, "axial")
    first = segmenter.segment(volume, roi, box_mode=args.box_mode).mask > 0
    present = [k for k in range(roi[2], roi[5] + 1) if label[k].any()]
    areas = label.sum(axis=(1, 2))
    clicked = [k for k in present if areas[k] >= args.min_area * areas.max()]
    picks = [clicked[int(i)] for i in np.linspace(0, len(clicked) - 1, min(args.slices, len(clicked)))]
    curves = [click_curve(segmenter, volume, k, first[k], label[k], roi) for k in picks]
    oracle = [dice(oracle_box_mask(segmenter, volume, k, label[k], roi), label[k]) for k in picks]
    # The user corrects the slice the ROI's result got the most pixels wrong.
    worst = max(present, key=lambda k: int((first[k] != label[k]).sum()))
    propagated = segmenter.propagate(volume, "axial", worst, label[worst], box=roi)
    carried = propagated.mask > 0
    carried[worst] = label[worst]
    # The SAM effect writes the slices propagation reached; the others keep the ROI's result.
    segment = first.copy()
    segment[propagated.slices] = carried[propagated.slices]
    segment[worst] = label[worst]
    return {"slices": len(picks), "curve": np.mean(curves, axis=0), "oracle": float(np.mean(oracle)),
            "roi3d": dice(first, label), "propagated3d": dice(carried, label),
            "segment3d": dice(segment, label)}


def latency_ms(args, volume, label) -> Tuple[float, float]:
    """(the first click on a slice, which encodes it; the median later click on the cached slice),
    in ms, through the background worker, each click correcting the reference slice shrunk by a
    few pixels from the start."""
    from scipy import ndimage

    from SAMFineTuneLib.client import WorkerClient

    k = int(np.argmax(label.sum(axis=(1, 2))))
    start = ndimage.binary_erosion(label[k], iterations=2).astype(np.uint8)
    ys, xs = np.nonzero(label[k] & ~start.astype(bool))
    options = {"device": args.device, "model": args.model, "checkpoint": args.checkpoint, "axis": "axial",
               "index": k, "volume_key": "bench", "backend": args.backend, "precision": args.precision,
               "spacing": [1.0, 1.0, 1.0], "reset": True}
    client = WorkerClient()
    try:
        client.run("load_model", {key: options[key] for key in ("device", "model", "checkpoint", "backend",
                                                                 "precision")}, timeout=600)
        times = []
        for n in range(args.latency_clicks + 1):
            click = [float(xs[n % len(xs)]), float(ys[n % len(ys)]), 1]
            arrays = {"mask": start, **({"volume": volume} if n == 0 else {})}
            started = time.perf_counter()
            client.run("refine", dict(options, points=[click]), arrays, timeout=600)
            times.append(time.perf_counter() - started)
    finally:
        client.shutdown()
    return 1000.0 * times[0], 1000.0 * statistics.median(times[1:])


def print_tables(rows, latency) -> None:
    for variant in dict.fromkeys(variant for _, variant, _ in rows):
        mine = [(key, row) for key, name, row in rows if name == variant]
        print(f"\n{variant}:\n")
        print("| case | structure | slices | oracle box | " + " | ".join(f"{n} clicks" for n in CLICKS)
              + " | one ROI, 3D | propagated from 1 corrected slice, 3D | the segment after Propagate, 3D |")
        print("|---" * (len(CLICKS) + 7) + "|")
        for (case, name), row in mine:
            print(f"| {case} | {name} | {row['slices']} | {row['oracle']:.3f} | "
                  + " | ".join(f"{v:.3f}" for v in row["curve"])
                  + f" | {row['roi3d']:.3f} | {row['propagated3d']:.3f} | {row['segment3d']:.3f} |")
        mean = lambda key: float(np.mean([row[key] for _, row in mine]))  # noqa: E731
        curve = np.mean([row["curve"] for _, row in mine], axis=0)
        print(f"| **mean** | {len(mine)} structures | | {mean('oracle'):.3f} | "
              + " | ".join(f"{v:.3f}" for v in curve) + f" | {mean('roi3d'):.3f} | {mean('propagated3d'):.3f} | "
              f"{mean('segment3d'):.3f} |")
    if latency is not None:
        cold, warm = latency
        print(f"\nA click through the worker: {warm:.1f} ms on a cached slice (median), {cold:.0f} ms for the "
              f"first click on a slice (it encodes the slice): 1/{cold / warm:.0f} of it")


def adapter_cases(adapters) -> set:
    """Every case an adapter in ``adapters`` trained or validated on (from its model card)."""
    from SAMFineTuneLib.adapters import read_model_card

    seen = set()
    for folder in adapters:
        dataset = read_model_card(folder).get("dataset", {})
        seen.update(dataset.get("train_cases", []) + dataset.get("val_cases", []))
    return seen


def measure(args, segmenter, volume, mask) -> List[Tuple[str, Dict[str, object]]]:
    """One structure's rows with the base model and with each adapter."""
    out = []
    for adapter in [None] + list(args.adapter):
        segmenter.set_adapter(adapter)
        out.append(("base model" if adapter is None else f"adapter {adapter}",
                    structure_rows(args, segmenter, volume, mask)))
    segmenter.set_adapter(None)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", action="append", help="a folder with images/, masks/ (3D) and labels.json")
    parser.add_argument("--max-cases", type=int, default=3)
    parser.add_argument("--max-structures", type=int, default=3)
    parser.add_argument("--slices", type=int, default=6, help="slices clicked on per structure")
    parser.add_argument("--min-area", type=float, default=0.0,
                        help="click only on slices where the structure covers at least this fraction of its "
                             "largest slice (0: every slice, its one-pixel ends included)")
    parser.add_argument("--latency-clicks", type=int, default=20)
    parser.add_argument("--merge-labels", action="store_true", help="all labels as one structure")
    parser.add_argument("--adapter", action="append", default=[],
                        help="also measure with this adapter folder (side by side with the base model)")
    add_box_mode_argument(parser, "how the ROI prompts each slice before the clicks")
    add_model_arguments(parser)
    add_engine_arguments(parser)
    args = parser.parse_args(argv)
    segmenter = Segmenter(args.model, checkpoint=args.checkpoint, device=args.device, precision=args.precision,
                          backend=args.backend)
    seen = adapter_cases(args.adapter)
    started, rows, sample = time.perf_counter(), [], None
    for dataset in args.dataset or [None]:
        cases = (case for case in _cases(dataset) if case[0] not in seen)
        for n, (case, volume, label, names) in enumerate(cases):
            if n >= args.max_cases:
                break
            array = (label.array > 0).astype(np.uint8) if args.merge_labels else label.array
            for value in _structures(array, None, args.max_structures, 3, "axial"):
                mask = array == value
                name = "all labels" if args.merge_labels else names.get(value, str(value))
                rows += [((case, name), variant, row) for variant, row in measure(args, segmenter, volume, mask)]
                sample = sample or (volume.array, mask)
    latency = latency_ms(args, *sample) if sample is not None and args.latency_clicks else None
    print_tables(rows, latency)
    print(f"\n{len(rows)} structures in {time.perf_counter() - started:.0f} s; model {args.model}, "
          f"device {args.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
