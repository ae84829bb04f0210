r"""3D accuracy from one ROI against a perfect box on every slice (issue 16).

For each structure of each 3D case, along each axis asked for: the "oracle" (the reference's own
box on every slice where the structure is present, as published SAM fine-tuning recipes prompt
it), and what a user gets from one ROI, the reference's 3D box grown by each margin (voxels
in-plane, plus one slice along the axis for a margin > 0), in each box mode asked for: crossed
boxes (the default for the base model), tracked boxes, the fixed rectangle. 3D Dice. The auto
window, and the lung window for a lung on CT (what a user picks); the engine's default
post-processing everywhere, the oracle's too, so the gap measures the prompts alone. Means per
set, per structure class and overall, a post-processing table (the first mode, middle margin), a
PNG of the worst cases, and the slices each mode needs encoded (a cold run's cost on a CPU).

  python Testing/benchmarks/bench_accuracy3d.py \
      --dataset ../shared/data/totalseg_examples_silver --dataset ../shared/data/msd_hippocampus_mri_dev \
      --dataset ../shared/data/breast_mri_tumor_pyradiomics --backend openvino \
      --cache-dir /tmp/samft-embeddings --markdown /tmp/accuracy_tables.md --png /tmp/accuracy_worst.png
  ... --quick          (2 cases per set, 4 structures per case, for iteration)
  ... --option zoom=true --tracking margin=0.1   (engine options and TrackingOptions fields)

The synthetic CT (two phantoms) is always included (``--no-phantom`` leaves it out). Not a
test, and no test needs it. What was tried on it, what paid and what did not: docs/accuracy.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), HERE]

from accuracy3d_cases import DiskEmbeddingCache, dataset_cases, phantom_cases  # noqa: E402
from SAMFineTuneLib import imaging, postprocess, windows  # noqa: E402
from SAMFineTuneLib.catalogue import (AXES, BACKENDS, BOX_MODES, ENGINE_DEFAULTS, PRECISIONS,  # noqa: E402
                                     SEGMENT_DEFAULTS)
from SAMFineTuneLib.metrics import dice_score  # noqa: E402
from SAMFineTuneLib.phantom import bounding_box  # noqa: E402

POSTPROCESSING = {"none": (False, False), "largest": (True, False), "fill": (False, True), "both": (True, True)}


@dataclass
class Run:
    set_name: str
    case_id: str
    structure: str
    klass: str
    axis: str
    slices: int
    scores: Dict[str, float] = field(default_factory=dict)
    post: Dict[str, float] = field(default_factory=dict)  # the first mode, middle margin, per clean-up
    embedded: Dict[str, int] = field(default_factory=dict)  # slices each mode needed encoded (cached or not)
    worst: Optional[dict] = None  # the slice where the first mode (middle margin) and the reference differ most


def parse_options(pairs: List[str]) -> Dict[str, object]:
    """key=value pairs, values read as JSON where they parse (true, 0.1, null), else as text."""
    options = {}
    for pair in pairs or []:
        key, _, text = pair.partition("=")
        try:
            options[key.replace("-", "_")] = json.loads(text)
        except json.JSONDecodeError:
            options[key.replace("-", "_")] = text
    return options


def roi_box(reference: np.ndarray, margin: int, axis: str):
    grow = [margin] * 3
    grow[2 - AXES[axis]] = 1 if margin > 0 else 0  # (i, j, k) order: axial steps along k
    return bounding_box(reference, grow)


def oracle_boxes(reference: np.ndarray, axis: str) -> Dict[int, tuple]:
    boxes = {}
    for index in imaging.slices_holding(reference, axis):
        boxes[int(index)] = imaging.mask_box(imaging.extract_slice(reference, axis, index))
    return boxes


def worst_slice(case, reference: np.ndarray, ours: np.ndarray, oracle: np.ndarray, axis: str, window) -> dict:
    along = AXES[axis]
    wrong = np.moveaxis(reference != ours, along, 0).sum(axis=(1, 2))
    index = int(wrong.argmax())
    lo, hi = window
    take = lambda array: imaging.extract_slice(array, axis, index)  # noqa: E731
    return {"index": index, "image": windows.apply_window(take(case.image.array), lo, hi),
            "reference": take(reference), "ours": take(ours), "oracle": take(oracle),
            "spacing": imaging.slice_pixel_spacing(case.image.spacing, axis)}


def score_structure(segmenter, case, structure, axis: str, args, options: Dict[str, object]) -> Optional[Run]:
    reference = case.reference(structure)
    boxes = oracle_boxes(reference, axis)
    if len(boxes) < args.min_slices:
        return None
    run = Run(case.set_name, case.case_id, structure.name, structure.klass, axis, len(boxes))
    window = structure.window if args.window == "auto" else args.window
    clean = dict(keep_largest=options.get("keep_largest", True), fill_holes=options.get("fill_holes", True))
    engine = {k: v for k, v in options.items() if k not in clean}
    oracle = segmenter.segment_boxes(case.image, boxes, axis=axis, window=window, **clean).mask
    run.scores["oracle"] = dice_score(oracle, reference)
    middle = args.margins[len(args.margins) // 2]
    for mode in args.modes:
        for margin in args.margins:
            box = roi_box(reference, margin, axis)
            result = segmenter.segment(case.image, box, axis=axis, window=window, box_mode=mode, keep_largest=False,
                                       fill_holes=False, **engine)
            raw = result.mask
            run.embedded[f"{mode} +{margin}"] = int(result.stats["encoded"] + result.stats["cache_hits"])
            region = imaging.box_region(box)
            variants = {}
            for name, (largest, fill) in POSTPROCESSING.items():
                mask = raw.copy()
                mask[region] = postprocess.clean(raw[region], AXES[axis], largest, fill)
                variants[name] = mask
            chosen = variants[{v: k for k, v in POSTPROCESSING.items()}[(clean["keep_largest"], clean["fill_holes"])]]
            run.scores[f"{mode} +{margin}"] = dice_score(chosen, reference)
            if mode == args.modes[0] and margin == middle:
                run.post = {name: dice_score(mask, reference) for name, mask in variants.items()}
                run.worst = worst_slice(case, reference, chosen, oracle, axis,
                                        windows.window_range(case.image.array, window))
    return run


# ---------------------------------------------------------------- tables


def encoder_work(runs: List[Run], args) -> str:
    """What each box mode costs a cold run on a CPU, where the encoder is nearly all the time: the
    slices it needed encoded, summed over the runs, and against tracked boxes."""
    totals = {mode: sum(n for r in runs for key, n in r.embedded.items() if key.startswith(mode + " "))
              for mode in args.modes}
    tracked = totals.get("tracked")
    return "slices to encode, all runs: " + ", ".join(
        f"{mode} {n}" + (f" ({n / tracked:.2f}x tracked)" if tracked and mode != "tracked" else "")
        for mode, n in totals.items())


def columns(args) -> List[str]:
    return ["oracle"] + [f"{mode} +{m}" for mode in args.modes for m in args.margins]


def mean_row(title: str, runs: List[Run], names: List[str]) -> str:
    values = [np.mean([r.scores[n] for r in runs]) for n in names]
    return f"| {title} | {len(runs)} | " + " | ".join(f"{v:.3f}" for v in values) + " |"


def summary_tables(runs: List[Run], args) -> List[str]:
    names = columns(args)
    head = "| {} | runs | " + " | ".join(names) + " |"
    rule = "|---|---|" + "---|" * len(names)
    lines = ["### Means per set and axis", "", head.format("set, axis"), rule]
    sets = sorted({r.set_name for r in runs})
    for set_name in sets:
        for axis in args.axes:
            group = [r for r in runs if r.set_name == set_name and r.axis == axis]
            if group:
                lines.append(mean_row(f"{set_name}, {axis}", group, names))
        lines.append(mean_row(f"**{set_name}**", [r for r in runs if r.set_name == set_name], names))
    lines.append(mean_row("**overall**", runs, names))
    lines += ["", "### Means per set and structure class (both axes)", "", head.format("set, class"), rule]
    for set_name in sets:
        for klass in sorted({r.klass for r in runs if r.set_name == set_name}):
            group = [r for r in runs if r.set_name == set_name and r.klass == klass]
            lines.append(mean_row(f"{set_name}, {klass}", group, names))
    lines += ["", "### Means per structure class (all sets, both axes)", "", head.format("class"), rule]
    for klass in sorted({r.klass for r in runs}):
        lines.append(mean_row(klass, [r for r in runs if r.klass == klass], names))
    return lines


def postprocessing_table(runs: List[Run], args) -> List[str]:
    middle = args.margins[len(args.margins) // 2]
    lines = [f"### Post-processing, {args.modes[0]} +{middle} (largest component / hole filling)", "",
             "| class | runs | " + " | ".join(POSTPROCESSING) + " |", "|---|---|" + "---|" * len(POSTPROCESSING)]
    for klass in sorted({r.klass for r in runs if r.post}):
        group = [r for r in runs if r.klass == klass and r.post]
        lines.append(f"| {klass} | {len(group)} | "
                     + " | ".join(f"{np.mean([r.post[n] for r in group]):.3f}" for n in POSTPROCESSING) + " |")
    return lines


def structure_row(run: Run, names: List[str]) -> str:
    return (f"| {run.set_name} | {run.case_id} | {run.structure} | {run.klass} | {run.axis} | {run.slices} | "
            + " | ".join(f"{run.scores[n]:.3f}" for n in names) + " |")


def structure_header(names: List[str]) -> List[str]:
    return ["| set | case | structure | class | axis | slices | " + " | ".join(names) + " |",
            "|---|---|---|---|---|---|" + "---|" * len(names)]


def save_png(runs: List[Run], path: str, count: int, name: str) -> None:
    """The ``count`` runs of the column ``name`` (the first mode, middle margin) furthest below the oracle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranked = sorted((r for r in runs if r.worst), key=lambda r: r.scores[name] - r.scores["oracle"])
    picks = ranked[:count]
    columns_ = min(4, len(picks)) or 1
    rows_ = max(1, -(-len(picks) // columns_))
    figure, axes = plt.subplots(rows_, columns_, figsize=(3.6 * columns_, 3.8 * rows_), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, run in zip(axes.ravel(), picks):
        worst = run.worst
        aspect = worst["spacing"][0] / worst["spacing"][1]
        ax.imshow(worst["image"], cmap="gray", aspect=aspect)
        for mask, colour, style in ((worst["reference"], "lime", "solid"), (worst["oracle"], "cyan", "dotted"),
                                    (worst["ours"], "red", "dashed")):
            if mask.any():
                ax.contour(mask, levels=[0.5], colors=colour, linewidths=1.0, linestyles=style)
        ax.set_title(f"{run.case_id} {run.structure} ({run.axis} {worst['index']})\n"
                     f"oracle {run.scores['oracle']:.2f}, {name} {run.scores[name]:.2f}",
                     fontsize=8)
    figure.suptitle(f"worst runs, {name}: reference (green), oracle (cyan dotted), one ROI (red dashed)",
                    fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_markdown(path: str, runs: List[Run], args, header: List[str]) -> None:
    names = columns(args)
    lines = ["# 3D accuracy: one ROI against a perfect box on every slice", "", *header, "",
             *summary_tables(runs, args), "", *postprocessing_table(runs, args), "",
             "## Every structure", "", *structure_header(names), *(structure_row(r, names) for r in runs), ""]
    scratch = path + ".tmp"
    with open(scratch, "w") as handle:
        handle.write("\n".join(lines))
    os.replace(scratch, path)


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", action="append", default=[], help="a 3D folder in the shared-data layout")
    parser.add_argument("--no-phantom", action="store_true", help="leave out the synthetic CT")
    parser.add_argument("--merge", nargs="*", default=["hippocampus"],
                        help="score the labels whose names start with each of these as one structure")
    parser.add_argument("--parts", action="store_true", help="also score merged labels one by one")
    parser.add_argument("--axes", nargs="+", default=["axial", "coronal"], choices=list(AXES))
    parser.add_argument("--margins", nargs="+", type=int, default=[0, 3, 6], help="ROI margins, voxels in-plane")
    parser.add_argument("--modes", nargs="+", default=["crossed", "tracked", "fixed"], choices=list(BOX_MODES),
                        help="box modes to score; the first one's runs fill the post-processing table and the PNG "
                             "(crossed: what the default, auto, runs for the base model)")
    parser.add_argument("--quick", action="store_true", help="2 cases per set, 4 structures per case")
    parser.add_argument("--max-cases", type=int, help="cases per set, spread over the set")
    parser.add_argument("--max-structures", type=int, help="structures per case, spread over their sizes")
    parser.add_argument("--min-voxels", type=int, default=50)
    parser.add_argument("--min-slices", type=int, default=3, help="slices the structure must span along the axis")
    parser.add_argument("--window", default=SEGMENT_DEFAULTS["window"],
                        help="auto: the engine's auto window, and the lung window for lungs on CT")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a Segmenter.segment option for the tracked and fixed runs (zoom=true, multimask=true)")
    parser.add_argument("--tracking", action="append", default=[], metavar="KEY=VALUE",
                        help="a TrackingOptions field (margin=0.1)")
    parser.add_argument("--backend", default=ENGINE_DEFAULTS["backend"], choices=list(BACKENDS),
                        help="the image encoder's (default: the engine's; OpenVINO and PyTorch agree to 2e-6)")
    parser.add_argument("--precision", default="auto", choices=list(PRECISIONS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", help="keep embeddings on disk here, so reruns skip the encoder")
    parser.add_argument("--markdown", help="write the tables to this file")
    parser.add_argument("--png", help="write the worst cases to this PNG")
    parser.add_argument("--worst", type=int, default=8, help="cases in the PNG")
    parser.add_argument("--json", help="write every run's scores to this file (for comparing experiments)")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_cases, args.max_structures = args.max_cases or 2, args.max_structures or 4
    return args


def all_cases(args):
    for dataset in args.dataset:
        if not os.path.isdir(os.path.join(dataset, "images")):
            raise SystemExit(f"--dataset {dataset}: no images/ folder there (expected the shared-data layout)")
    for dataset in args.dataset:
        yield from dataset_cases(dataset, args.merge, args.parts, args.min_voxels, args.max_cases, args.max_structures)
    if not args.no_phantom:
        yield from phantom_cases()


def make_segmenter(args):
    import torch

    from SAMFineTuneLib.models import load_model
    from SAMFineTuneLib.segmenter import Segmenter, TrackingOptions

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    model = load_model("litemedsam", device=args.device, precision=args.precision, backend=args.backend)
    tracking = TrackingOptions(**parse_options(args.tracking))
    segmenter = Segmenter(model, tracking=tracking)
    if args.cache_dir:
        segmenter.cache = DiskEmbeddingCache(args.cache_dir, f"{model.backend}:{model.precision}")
    return segmenter


def main(argv=None) -> int:
    args = parse_args(argv)
    options = parse_options(args.option)
    started = time.perf_counter()
    segmenter = make_segmenter(args)
    names = columns(args)
    header = [f"LiteMedSAM, {segmenter.model.device}, encoder {segmenter.model.backend} {segmenter.model.precision}, "
              f"decode window {segmenter.window_margin}; axes {', '.join(args.axes)}; ROI margins "
              f"{', '.join(map(str, args.margins))} voxels in-plane (+1 slice along the axis when > 0); options "
              f"{options or 'defaults'}; tracking {parse_options(args.tracking) or 'defaults'}"
              f"{'; quick mode' if args.quick else ''}"]
    print(header[0], flush=True)
    print("\n".join(structure_header(names)), flush=True)
    runs: List[Run] = []
    for case in all_cases(args):
        for axis in args.axes:
            for structure in case.structures:
                run = score_structure(segmenter, case, structure, axis, args, options)
                if run is not None:
                    runs.append(run)
                    print(structure_row(run, names), flush=True)
    elapsed = time.perf_counter() - started
    cache = segmenter.cache
    header.append(f"{len(runs)} runs in {elapsed / 60:.1f} min; {segmenter.encoder_calls} slices encoded"
                  f"{f', {cache.disk_hits} read from the disk cache' if hasattr(cache, 'disk_hits') else ''}")
    header.append(encoder_work(runs, args))
    tables = summary_tables(runs, args) + [""] + postprocessing_table(runs, args)
    print("\n" + "\n".join(header[1:]) + "\n\n" + "\n".join(tables))
    if args.markdown:
        write_markdown(args.markdown, runs, args, header)
    if args.png and runs:
        save_png(runs, args.png, args.worst, f"{args.modes[0]} +{args.margins[len(args.margins) // 2]}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([{k: v for k, v in vars(r).items() if k != "worst"} for r in runs], handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
