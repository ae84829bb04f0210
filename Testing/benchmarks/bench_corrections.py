r"""Propagating from several corrected slices (prints a markdown table).

  python Testing/benchmarks/bench_corrections.py --dataset DIR [--dataset DIR ...] [--corrected N]
      [--merge PREFIX ...] [--max-cases N] [--max-structures N] [--axes AXIS ...] [--cache-dir DIR]

Each structure of each 3D case (images/, masks/, labels.json as in ../shared/data) is segmented
from one ROI 3 voxels loose (one slice along the axis) in the default box mode. Then N slices are
corrected, the middles of N equal parts of the slices where it is present (each replaced by the
reference, as a user would draw it), and the SAM effect's Propagate runs inside the ROI:

- tracked from the last: from the slice corrected last, the others locked but their masks not
  given, so tracking carries it out to them (and no further);
- tracked from each: Propagate pressed after every correction, tracking from each in turn;
- filled between (what the effect sends): the other corrections' masks given
  (``Segmenter.propagate``'s ``corrections``), each slice between two of them decoded with the box
  interpolated between theirs, tracking carrying on from the outermost.

The score is the 3D Dice of the segment the effect leaves: the corrected slices, what propagation
wrote, and the ROI's result on the slices it did not reach. With ``--drawn-boxes`` there is no ROI
(its result is still shown): the user draws a box around the structure on each of the N slices
(the reference's box there) and the effect writes SAM's answer to it; propagation then runs through
the whole volume, and the slices it does not reach stay empty. With ``--clicks K`` each corrected
slice is the ROI's result on it after K simulated clicks (as ``bench_clicks.py`` clicks), not the
reference.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
from typing import Dict, List, Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from accuracy3d_cases import DiskEmbeddingCache, dataset_cases  # noqa: E402
from bench_accuracy3d import roi_box  # noqa: E402
from bench_clicks import simulated_user  # noqa: E402
from SAMFineTuneLib import imaging  # noqa: E402
from SAMFineTuneLib.metrics import dice_score  # noqa: E402
from SAMFineTuneLib.refinement import refine_slice  # noqa: E402

COLUMNS = ("ROI", "tracked from the last", "tracked from each", "filled between")


def corrected_slices(present: np.ndarray, count: int) -> List[int]:
    """The middles of ``count`` equal parts of the slices where the structure is present."""
    return sorted({int(present[int(round((2 * n + 1) / (2 * count) * (len(present) - 1)))]) for n in range(count)})


def _after_clicks(segmenter, case, axis: str, index: int, start: np.ndarray, reference: np.ndarray, clicks: int,
                  roi, window: str) -> np.ndarray:
    """The ROI's result on slice ``index`` after ``clicks`` clicks of ``bench_clicks.simulated_user``."""
    mask = start
    for mask in simulated_user(segmenter, case.image, index, start, reference, roi, clicks, axis, window):
        pass
    return np.asarray(mask) > 0


def score_run(segmenter, case, structure, axis: str, count: int, drawn: bool,
              clicks: int = 0) -> Optional[Dict[str, float]]:
    reference = case.reference(structure)
    present = imaging.slices_holding(reference, axis)
    if len(present) < 2 * count + 1:
        return None
    roi = roi_box(reference, 3, axis)
    start = segmenter.segment(case.image, roi, axis=axis, window=structure.window).mask
    corrected = corrected_slices(present, count)
    masks = {i: imaging.extract_slice(reference, axis, i) > 0 for i in corrected}
    if clicks:
        masks = {i: _after_clicks(segmenter, case, axis, i, imaging.extract_slice(start, axis, i) > 0, mask, clicks,
                                  roi, structure.window) for i, mask in masks.items()}
    box, base = roi, start
    if drawn:  # no ROI: a box drawn on each of those slices, SAM's answer to it, carried through the volume
        masks = {i: refine_slice(segmenter, case.image, axis, i, [], box=imaging.mask_box(mask),
                                 window=structure.window).mask for i, mask in masks.items()}
        box, base = None, np.zeros_like(start)
    x0, y0, x1, y1 = imaging.box_to_slices(box, axis)[1] if box is not None else (0, 0, 1 << 30, 1 << 30)
    starts = [i for i in corrected if masks[i][y0:y1 + 1, x0:x1 + 1].any()]  # what propagation can start from
    if corrected[-1] not in starts:
        return None

    def propagated(index: int, **extra):
        return segmenter.propagate(case.image, axis, index, masks[index], locked=[i for i in corrected if i != index],
                                   box=box, window=structure.window, **extra)

    def left(*results) -> float:
        out = base.copy()
        for result in results:
            for i in result.slices:
                imaging.place_slice(out, axis, i, imaging.extract_slice(result.mask, axis, i))
        for i, mask in masks.items():
            imaging.place_slice(out, axis, i, mask)
        return float(dice_score(out, reference))

    last = corrected[-1]
    return {"ROI": float(dice_score(start, reference)),
            "tracked from the last": left(propagated(last)),
            "tracked from each": left(*[propagated(i) for i in starts]),
            "filled between": left(propagated(last, corrections={i: masks[i] for i in corrected[:-1]}))}


def table(rows: List[dict]) -> str:
    groups = collections.defaultdict(list)
    for row in rows:
        groups[f"{row['set']}, {row['klass']}"].append(row)
    groups["**overall**"] = rows
    lines = ["| set, class | runs | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for name, members in groups.items():
        means = (f"{np.mean([m[c] for m in members]):.3f}" for c in COLUMNS)
        lines.append(f"| {name} | {len(members)} | " + " | ".join(means) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", action="append", required=True, help="a 3D folder in the shared-data layout")
    parser.add_argument("--corrected", type=int, default=3, help="slices corrected per structure")
    parser.add_argument("--clicks", type=int, default=0,
                        help="each slice corrected by this many simulated clicks on the ROI's result, not replaced "
                             "by the reference")
    parser.add_argument("--drawn-boxes", action="store_true",
                        help="no ROI: on each of those slices a box drawn around the structure (the reference's "
                             "box) and SAM's answer to it, propagated through the whole volume")
    parser.add_argument("--merge", nargs="*", default=[], help="score the labels starting with each as one structure")
    parser.add_argument("--max-cases", type=int, default=None)
    parser.add_argument("--max-structures", type=int, default=None)
    parser.add_argument("--axes", nargs="+", default=["axial", "coronal"], choices=["axial", "coronal", "sagittal"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", help="a folder of embeddings kept between runs")
    args = parser.parse_args(argv)
    if args.corrected < 2:
        parser.error("--corrected must be at least 2: between one correction and nothing there is nothing to fill")

    from SAMFineTuneLib.models import load_model
    from SAMFineTuneLib.segmenter import Segmenter

    model = load_model("litemedsam", device=args.device)
    segmenter = Segmenter(model)
    if args.cache_dir:
        segmenter.cache = DiskEmbeddingCache(args.cache_dir, f"{model.backend}:{model.precision}")
    rows = []
    for dataset in args.dataset:
        for case in dataset_cases(dataset, args.merge, False, 50, args.max_cases, args.max_structures):
            for structure in case.structures:
                for axis in args.axes:
                    scores = score_run(segmenter, case, structure, axis, args.corrected, args.drawn_boxes,
                                       args.clicks)
                    if scores is not None:
                        rows.append(dict(scores, set=case.set_name, klass=structure.klass))
                        print(f"{case.case_id} {structure.name} {axis}: "
                              + ", ".join(f"{c} {scores[c]:.3f}" for c in COLUMNS), file=sys.stderr, flush=True)
    start = "a box drawn on each, no ROI" if args.drawn_boxes else "after one ROI 3 voxels loose"
    start += f", {args.clicks} simulated clicks on each" if args.clicks else ""
    print(f"# {args.corrected} corrected slices per structure, {start}; LiteMedSAM on "
          f"{model.device}, {model.backend} {model.precision}\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
