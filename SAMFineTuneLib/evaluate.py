"""Base model vs adapted model on a dataset split: Dice, IoU, HD95 and surface Dice per case.

Every slice of a case that holds the label is segmented with its tight reference box (the
usual box-prompt protocol), the slices are stacked back into the case's volume, and monai's
metrics compare it with the reference in millimetres. Embeddings come from the dataset's
cache, so scoring after training costs decoder passes only. Base and adapted models decode
with the same window (``window_margin``), by default the one the Segmenter uses on that device.
"""
from __future__ import annotations

import csv
import io
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .catalogue import (DEFAULT_MODEL, ENGINE_DEFAULTS, SEGMENT_DEFAULTS, SPLITS, VALIDATION_ROI_MARGIN, check_box_mode,
                        comparison_roi_margin)
from .cli_args import (add_axis_argument, add_box_mode_argument, add_decode_window_argument, add_encoder_arguments,
                       add_model_arguments, add_window_argument)
from .metrics import DEFAULT_TOLERANCE_MM, METRIC_NAMES, paired_cases


def evaluate(dataset, model=DEFAULT_MODEL, checkpoint: Optional[str] = None, adapter: Optional[str] = None,
             split: str = "val", progress=None, cancel=None, device: str = SEGMENT_DEFAULTS["device"],
             axis: Optional[str] = None, window: Optional[str] = None, labels: Optional[Sequence[int]] = None,
             tolerance_mm: float = DEFAULT_TOLERANCE_MM, csv_path: Optional[str] = None,
             plot_path: Optional[str] = None, box_margin: float = 0.0, cases: Optional[Sequence[str]] = None,
             window_margin: Union[int, None, str] = ENGINE_DEFAULTS["window_margin"], roi_margin: Optional[int] = None,
             precision: str = ENGINE_DEFAULTS["precision"], backend: str = ENGINE_DEFAULTS["backend"],
             box_mode: str = SEGMENT_DEFAULTS["box_mode"]) -> Dict[str, Any]:
    """Score the base model, and the adapter when given, on one split ('val', 'test', 'train', 'all')
    or on the named ``cases``.

    By default every slice holding the structure is prompted with its reference box, grown by
    ``box_margin`` x its side on each edge when > 0 (a user's box is never tight). With
    ``roi_margin`` (voxels) each structure is segmented as a user starts: from one 3D ROI, its
    reference box grown by that many voxels on every side, through the Segmenter in ``box_mode``
    (``score_from_roi``; by default each model as a user gets it: crossed boxes for the base
    model, tracked with the adapter). ``model`` is a model name or an already loaded SamModel.
    ``window_margin`` is the decode window of both models, as for the Segmenter: "auto" (4
    tokens on a CPU, the whole slice on CUDA), None (the whole slice) or a number of tokens;
    the report holds the margin used. ``precision`` and ``backend``: the image encoder's, for a
    model given by name (``models.load_model``). Axis and window default to the adapter's (from
    its model card), else each case's own axis (``CaseEntry.slicing_axis``) / auto. Returns
    {"cases": [{case, label, base, adapted}], "mean": {"base": {...}, "adapted": {...}}, ...}.
    """
    from .dataset import read_dataset
    from .decoding import resolve_window_margin
    from .input_checks import check_adapter
    from .models import load_model

    _check_before_loading(window_margin, roi_margin, plot_path, csv_path, tolerance_mm, box_margin, box_mode)
    card = check_adapter(adapter, model if isinstance(model, str) else None) if adapter else None
    hints = card["inference"] if card else {}
    axis = axis or hints.get("axis")
    window = window or hints.get("window", SEGMENT_DEFAULTS["window"])
    info = read_dataset(dataset)
    entries = [info.case(c) for c in cases] if cases is not None else info.split(split)
    if not entries:
        raise ValueError(f"dataset {info.root} has no cases in split '{split}'")
    if isinstance(model, str):
        model = load_model(model, checkpoint=checkpoint, device=device, precision=precision, backend=backend)
    window_margin = resolve_window_margin(window_margin, model.device)
    chosen = dict(cases=[e.case for e in entries], adapters={"base": None, **({"adapted": adapter} if adapter else {})},
                  axis=axis, window=window, labels=labels, tolerance_mm=tolerance_mm, window_margin=window_margin,
                  progress=progress, cancel=cancel)
    if roi_margin is None:
        runs = score_from_boxes(model, info, box_margin=box_margin, **chosen)
    else:
        runs = score_from_roi(model, info, roi_margin=roi_margin, box_mode=box_mode, **chosen)
    report = {"dataset": info.root, "split": split, "model": model.spec.name, "adapter": adapter, "axis": axis,
              "window": window, "window_margin": window_margin, "tolerance_mm": tolerance_mm,
              "prompt": "box" if roi_margin is None else "roi", "box_margin": box_margin, "roi_margin": roi_margin,
              "box_mode": None if roi_margin is None else box_mode,
              "cases": paired_cases(runs), "mean": {name: run["mean"] for name, run in runs.items()}}
    if csv_path:
        write_csv(report, csv_path)
    if plot_path:
        write_plot(report, plot_path)
    return report


def _check_before_loading(window_margin, roi_margin, plot_path: Optional[str], csv_path: Optional[str] = None,
                          tolerance_mm: float = DEFAULT_TOLERANCE_MM, box_margin: float = 0.0,
                          box_mode: str = SEGMENT_DEFAULTS["box_mode"]) -> None:
    """The options that can be refused before any model or case is read (the files come last)."""
    from .decoding import check_window_margin
    from .files import check_output_file

    check_window_margin(window_margin)
    check_box_mode(box_mode)
    if not 0 < tolerance_mm < math.inf:
        raise ValueError(f"the surface Dice tolerance is a distance in mm > 0, got {tolerance_mm!r}")
    if not 0 <= box_margin < math.inf:
        raise ValueError(f"box_margin is the share of a box's side each edge grows by, >= 0, got {box_margin!r}")
    for path, what in ((csv_path, "the CSV file"), (plot_path, "the plot")):
        if path:
            check_output_file(path, what)
    if plot_path:
        plot_format(plot_path)
    if roi_margin is not None and (isinstance(roi_margin, bool) or not isinstance(roi_margin, int) or roi_margin < 0):
        raise ValueError(f"roi_margin is a whole number of voxels >= 0, got {roi_margin!r}")


def score_from_boxes(model, info, cases, adapters, axis, window, labels, tolerance_mm, window_margin,
                     box_margin=0.0, progress=None, cancel=None) -> Dict[str, Dict[str, Any]]:
    """``metrics.score_cases`` of each run in ``adapters`` ({name: adapter folder, or None for
    the base model}) with every slice prompted with its reference box (grown by ``box_margin``),
    decoded from the dataset's embedding cache."""
    from . import adapters as adapter_files
    from .dataset import load_samples
    from .training import DecoderStep, cache_dir_for, prepare, score_prepared

    samples = load_samples(info, axis=axis, window=window, labels=labels, cases=cases)
    if not samples:
        raise ValueError(f"the cases {', '.join(cases[:3])}{', ...' if len(cases) > 3 else ''} of {info.root} "
                         "hold no labelled slice")
    prepared = prepare(model, samples, cache_dir_for(info.root), progress=progress, cancel=cancel)
    runs = {}
    for name, adapter in adapters.items():
        step = None
        if adapter:
            peft_decoder, prompt_encoder, _ = adapter_files.load_adapter(model, adapter)
            step = DecoderStep(model, adapter_files.inner_decoder(peft_decoder), prompt_encoder)
        runs[name] = score_prepared(model, prepared, step, tolerance_mm, box_margin, window_margin)
    return runs


def compare_adapters(dataset, candidate: str, current: Optional[str] = None, model=None,
                     cases: Optional[Sequence[str]] = None, roi_margin: Union[int, None, str] = "card",
                     min_gain: float = 0.0, progress=None, cancel=None) -> Dict[str, Any]:
    """Whether a newly trained adapter (``candidate``) beats the one in use (``current``; None: the
    base model) on the same cases: by default the candidate's validation cases (its model card).
    For "keep learning": retrain in the background, keep the current adapter unless this says so.

    Both decode as at inference: one reference box per slice (``roi_margin`` None), or each
    structure from one ROI that many voxels loose through the Segmenter's default box mode, as a
    user gets each (crossed boxes for the base model, with an adapter its card's); "card": as the
    candidate's card says (``catalogue.comparison_roi_margin``, as "keep learning" weighs them).
    ``model``: a loaded model (default: the candidate's base model on the CPU). Returns {"cases",
    "prompt": "box" or "roi", "current": means, "candidate": means, "per_case": rows, "gain":
    candidate - current mean Dice, "candidate_better": gain > ``min_gain``}."""
    from . import adapters
    from .dataset import read_dataset
    from .models import load_model

    card = adapters.read_model_card(candidate)
    if current is not None:
        adapters.read_model_card(current)  # a bad folder is named before any work
    info = read_dataset(dataset)
    cases = list(cases) if cases is not None else list(card["dataset"]["val_cases"])
    if roi_margin == "card":
        roi_margin = comparison_roi_margin(card)
    missing = sorted(set(cases) - {c.case for c in info.cases})
    if missing:
        raise ValueError(f"cases {', '.join(missing[:3])} are not in dataset {info.root}")
    if model is None:
        base = card["base_model"]
        model = load_model(base["name"], checkpoint=base.get("checkpoint"), device="cpu")
    chosen = dict(cases=cases, adapters={"current": current, "candidate": candidate},
                  axis=card["inference"]["axis"], window=card["inference"]["window"], labels=None,
                  tolerance_mm=DEFAULT_TOLERANCE_MM, window_margin=card["inference"]["window_margin"],
                  progress=progress, cancel=cancel)
    runs = (score_from_boxes(model, info, **chosen) if roi_margin is None
            else score_from_roi(model, info, roi_margin=roi_margin, **chosen))
    gain = runs["candidate"]["mean"]["dice"] - runs["current"]["mean"]["dice"]
    return {"cases": cases, "prompt": "box" if roi_margin is None else "roi", "current": runs["current"]["mean"],
            "candidate": runs["candidate"]["mean"], "per_case": paired_cases(runs), "gain": gain,
            "candidate_better": bool(gain > min_gain)}


def roi_box(mask: np.ndarray, margin: int) -> Tuple[int, int, int, int, int, int]:
    """The (i0, j0, k0, i1, j1, k1) voxel box of a KJI mask grown by ``margin`` voxels on every
    side, inside the volume: the ROI a user draws a little looser than the structure."""
    k, j, i = np.nonzero(mask)
    low = np.maximum(np.array([i.min(), j.min(), k.min()]) - margin, 0)
    high = np.minimum(np.array([i.max(), j.max(), k.max()]) + margin, np.array(mask.shape[::-1]) - 1)
    return tuple(int(v) for v in np.r_[low, high])


def score_from_roi(model, info, cases, adapters, axis, window, labels, tolerance_mm, window_margin,
                   roi_margin=VALIDATION_ROI_MARGIN, progress=None, cancel=None,
                   segmenter=None, box_mode: str = SEGMENT_DEFAULTS["box_mode"]) -> Dict[str, Dict[str, Any]]:
    """Each run's scores (as ``metrics.score_cases``; ``adapters`` as in ``score_from_boxes``):
    each case's structure (per label) segmented from one ROI (``roi_box`` with ``roi_margin``)
    by the Segmenter in ``box_mode`` (the default "auto" resolves per run: an adapter tracks, the
    base model crosses), scored in 3D against the reference. A case's slices are
    encoded once for all runs. ``segmenter``: a Segmenter on ``model`` to use (its adapter is
    restored afterwards)."""
    from .dataset import load_case
    from .imaging import label_values, slices_holding
    from .metrics import binary_metrics, summarise
    from .progress import check_cancel, report
    from .segmenter import Segmenter

    segmenter = segmenter or Segmenter(model, window_margin=window_margin)
    runs: Dict[str, List[Dict[str, Any]]] = {name: [] for name in adapters}
    previous = segmenter.adapter
    try:
        for n, case in enumerate(cases):
            entry = info.case(case)
            image, label = load_case(entry)
            array, along = np.asarray(label.array), entry.slicing_axis(axis)
            for value in labels or label_values(array):
                mask = array == value
                if not mask.any():
                    continue
                box = roi_box(mask, roi_margin)
                slices = int(slices_holding(mask, along).size)
                for name in runs:
                    check_cancel(cancel)
                    segmenter.set_adapter(adapters[name])
                    result = segmenter.segment(image, box, axis=along, window=window, box_mode=box_mode)
                    runs[name].append(dict(case=case, label=int(value), slices=slices,
                                           **binary_metrics(result.mask > 0, mask, image.spacing[::-1], tolerance_mm)))
            report(progress, n + 1, len(cases), f"segmented {case} from one ROI")
    finally:
        segmenter.set_adapter(previous)
    return {name: {"cases": rows, "mean": summarise(rows)} for name, rows in runs.items()}


def write_csv(report: Dict[str, Any], path: str) -> None:
    from .files import write_text_atomic

    runs = list(report["mean"])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "label", "slices"] + [f"{run}_{m}" for run in runs for m in METRIC_NAMES])
    for row in report["cases"]:
        writer.writerow([row["case"], row["label"], row["slices"]] +
                        [f"{row[run][m]:.6g}" for run in runs for m in METRIC_NAMES])
    writer.writerow(["mean", "", ""] + [f"{report['mean'][run][m]:.6g}" for run in runs for m in METRIC_NAMES])
    write_text_atomic(path, buffer.getvalue())


def plot_format(path: str) -> str:
    """The image format of a plot file, from its extension (PNG when it has none); one matplotlib
    cannot write is a ValueError, so a caller can refuse it before any slow work."""
    from matplotlib.backend_bases import FigureCanvasBase

    supported = FigureCanvasBase.get_supported_filetypes()
    extension = os.path.splitext(os.fspath(path))[1][1:].lower() or "png"
    if extension not in supported:
        raise ValueError(f"cannot write a plot to {path}: '.{extension}' is not an image format matplotlib writes; "
                         f"end the name with .png (or {', '.join('.' + name for name in sorted(supported))})")
    return extension


def write_plot(report: Dict[str, Any], path: str) -> None:
    """Per-case Dice, base vs adapted, as a bar chart (PNG, or the format the extension names),
    written beside ``path`` and renamed onto it (``files.atomic_write``)."""
    from .files import atomic_write

    form = plot_format(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(report["mean"])
    names = [_row_name(r, report) for r in report["cases"]]
    x = np.arange(len(names))
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(names) + 2), 3.5))
    for n, run in enumerate(runs):
        ax.bar(x + n * width, [r[run]["dice"] for r in report["cases"]], width,
               label=f"{run} (mean {report['mean'][run]['dice']:.3f})")
    ax.set_xticks(x + width * (len(runs) - 1) / 2)
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice")
    ax.set_title(f"{os.path.basename(report['dataset'])} ({report['split']})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    try:  # the temporary name ends in .part + the extension: the format is given, not guessed from it
        atomic_write(path, lambda temp: fig.savefig(temp, dpi=120, format=form))
    finally:
        plt.close(fig)


def _row_name(row: Dict[str, Any], report: Dict[str, Any]) -> str:
    single = len({r["label"] for r in report["cases"]}) == 1
    return row["case"] if single else f"{row['case']}:{row['label']}"


def format_table(report: Dict[str, Any]) -> str:
    runs = list(report["mean"])
    head = f"{'case':24s} " + " ".join(f"{run + ' ' + m:>14s}" for run in runs for m in METRIC_NAMES)
    lines = [head, "-" * len(head)]

    def cell(value: float) -> str:
        return f"{'n/a' if math.isnan(value) else format(value, '.4f'):>14s}"

    for row in report["cases"]:
        cells = " ".join(cell(row[run][m]) for run in runs for m in METRIC_NAMES)
        lines.append(f"{_row_name(row, report)[:24]:24s} {cells}")
    lines.append(f"{'mean':24s} " + " ".join(cell(report["mean"][run][m]) for run in runs for m in METRIC_NAMES))
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("--dataset", required=True)
    add_model_arguments(parser)
    add_encoder_arguments(parser)
    parser.add_argument("--adapter", help="adapter folder to compare with the base model")
    parser.add_argument("--split", default="val", choices=SPLITS + ("all",))
    add_axis_argument(parser, None, "slice direction; default: the adapter's, else each case's own (the axis it "
                                    "was segmented along, recorded at export), else axial")
    add_window_argument(parser, None, "intensity window; None: the adapter's, else auto")
    parser.add_argument("--tolerance-mm", type=float, default=DEFAULT_TOLERANCE_MM, help="surface Dice tolerance")
    parser.add_argument("--box-margin", type=float, default=0.0,
                        help="grow each reference box by this fraction of its side (0.1 = a loose user box)")
    parser.add_argument("--roi-margin", type=int, default=None,
                        help="segment each structure from one 3D ROI, its reference box grown by N voxels (as a "
                             "user starts), instead of one reference box per slice")
    add_box_mode_argument(parser, "with --roi-margin, how the ROI prompts each slice")
    add_decode_window_argument(parser, "decode only the image tokens within N tokens of each box, base and "
                                       "adapted alike; full = the whole slice; auto = as the segmenter (4 on "
                                       "CPU, full on CUDA)")
    parser.add_argument("--csv", help="write per-case metrics to this CSV file")
    parser.add_argument("--plot", help="write a per-case Dice bar chart to this PNG file")


def main(args) -> int:
    from .progress import StderrBar

    report = evaluate(args.dataset, model=args.model, checkpoint=args.checkpoint, adapter=args.adapter,
                      split=args.split, progress=StderrBar(), device=args.device, axis=args.axis,
                      window=args.window, tolerance_mm=args.tolerance_mm, csv_path=args.csv, plot_path=args.plot,
                      box_margin=args.box_margin, window_margin=args.decode_window, precision=args.precision,
                      backend=args.backend, roi_margin=args.roi_margin, box_mode=args.box_mode)
    print(format_table(report))
    return 0
