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
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from .catalogue import DEFAULT_MODEL, ENGINE_DEFAULTS, SEGMENT_DEFAULTS, SPLITS
from .cli_args import (add_axis_argument, add_decode_window_argument, add_encoder_arguments, add_model_arguments,
                       add_window_argument)
from .metrics import DEFAULT_TOLERANCE_MM, METRIC_NAMES


def evaluate(dataset, model=DEFAULT_MODEL, checkpoint: Optional[str] = None, adapter: Optional[str] = None,
             split: str = "val", progress=None, cancel=None, device: str = SEGMENT_DEFAULTS["device"],
             axis: Optional[str] = None,
             window: Optional[str] = None, labels: Optional[Sequence[int]] = None,
             tolerance_mm: float = DEFAULT_TOLERANCE_MM, csv_path: Optional[str] = None,
             plot_path: Optional[str] = None, box_margin: float = 0.0,
             cases: Optional[Sequence[str]] = None,
             window_margin: Union[int, None, str] = ENGINE_DEFAULTS["window_margin"],
             precision: str = ENGINE_DEFAULTS["precision"],
             backend: str = ENGINE_DEFAULTS["backend"]) -> Dict[str, Any]:
    """Score the base model, and the adapter when given, on one split ('val', 'test', 'train', 'all')
    or on the named ``cases``.

    ``model`` is a model name or an already loaded SamModel. ``box_margin`` > 0 grows every
    reference box by that fraction of its side on each edge, as a user's box is never tight.
    ``window_margin`` is the decode window of both models, as for the Segmenter: "auto" (4
    tokens on a CPU, the whole slice on CUDA), None (the whole slice) or a number of tokens;
    the report holds the margin used. ``precision`` and ``backend``: the image encoder's, for a
    model given by name (``models.load_model``). Axis and window default to the
    adapter's (from its model card), else axial / auto. Returns {"cases": [{case, label,
    base: {...}, adapted: {...}}], "mean": {"base": {...}, "adapted": {...}}, ...}.
    """
    from . import adapters
    from .dataset import load_samples, read_dataset
    from .models import load_model
    from .segmenter import check_window_margin, resolve_window_margin
    from .training import DecoderStep, cache_dir_for, prepare, score_prepared

    check_window_margin(window_margin)  # before loading anything
    card = adapters.read_model_card(adapter) if adapter else None
    hints = card["inference"] if card else {}
    axis = axis or hints.get("axis", SEGMENT_DEFAULTS["axis"])
    window = window or hints.get("window", SEGMENT_DEFAULTS["window"])
    if isinstance(model, str):
        model = load_model(model, checkpoint=checkpoint, device=device, precision=precision, backend=backend)
    window_margin = resolve_window_margin(window_margin, model.device)
    info = read_dataset(dataset)
    entries = [info.case(c) for c in cases] if cases is not None else info.split(split)
    if not entries:
        raise ValueError(f"dataset {info.root} has no cases in split '{split}'")
    samples = load_samples(info, axis=axis, window=window, labels=labels, cases=[e.case for e in entries])
    if not samples:
        raise ValueError(f"split '{split}' of {info.root} holds no labelled slice")
    prepared = prepare(model, samples, cache_dir_for(info.root), progress=progress, cancel=cancel)
    runs = {"base": score_prepared(model, prepared, None, tolerance_mm, box_margin, window_margin)}
    if adapter:
        peft_decoder, prompt_encoder, _ = adapters.load_adapter(model, adapter)
        step = DecoderStep(model, adapters.inner_decoder(peft_decoder), prompt_encoder)
        runs["adapted"] = score_prepared(model, prepared, step, tolerance_mm, box_margin, window_margin)
    report = {"dataset": info.root, "split": split, "model": model.spec.name, "adapter": adapter, "axis": axis,
              "window": window, "window_margin": window_margin, "tolerance_mm": tolerance_mm,
              "box_margin": box_margin, "cases": _per_case(runs),
              "mean": {name: run["mean"] for name, run in runs.items()}}
    if csv_path:
        write_csv(report, csv_path)
    if plot_path:
        write_plot(report, plot_path)
    return report


def _per_case(runs: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (case, label) holding every run's metrics: {case, label, slices, base: {...}, ...}."""
    cases = []
    for n, row in enumerate(runs["base"]["cases"]):
        entry = {"case": row["case"], "label": row["label"], "slices": row["slices"]}
        for name, run in runs.items():
            entry[name] = {k: run["cases"][n][k] for k in METRIC_NAMES}
        cases.append(entry)
    return cases


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


def write_plot(report: Dict[str, Any], path: str) -> None:
    """Per-case Dice, base vs adapted, as a bar chart (PNG)."""
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
    fig.savefig(path, dpi=120)
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
        lines.append(f"{_row_name(row, report)[:24]:24s} " + " ".join(cell(row[run][m]) for run in runs for m in METRIC_NAMES))
    lines.append(f"{'mean':24s} " + " ".join(cell(report["mean"][run][m]) for run in runs for m in METRIC_NAMES))
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("--dataset", required=True)
    add_model_arguments(parser)
    add_encoder_arguments(parser)
    parser.add_argument("--adapter", help="adapter folder to compare with the base model")
    parser.add_argument("--split", default="val", choices=SPLITS + ("all",))
    add_axis_argument(parser, None, "slice direction; None: the adapter's, else axial")
    add_window_argument(parser, None, "intensity window; None: the adapter's, else auto")
    parser.add_argument("--tolerance-mm", type=float, default=DEFAULT_TOLERANCE_MM, help="surface Dice tolerance")
    parser.add_argument("--box-margin", type=float, default=0.0,
                        help="grow each reference box by this fraction of its side (0.1 = a loose user box)")
    add_decode_window_argument(parser, "decode only the image tokens within N tokens of each box, base and adapted "
                                       "alike; full = the whole slice; auto = as the segmenter (4 on CPU, full on CUDA)")
    parser.add_argument("--csv", help="write per-case metrics to this CSV file")
    parser.add_argument("--plot", help="write a per-case Dice bar chart to this PNG file")


def main(args) -> int:
    from .progress import StderrBar

    report = evaluate(args.dataset, model=args.model, checkpoint=args.checkpoint, adapter=args.adapter,
                      split=args.split, progress=StderrBar(), device=args.device, axis=args.axis,
                      window=args.window, tolerance_mm=args.tolerance_mm, csv_path=args.csv, plot_path=args.plot,
                      box_margin=args.box_margin, window_margin=args.decode_window, precision=args.precision,
                      backend=args.backend)
    print(format_table(report))
    return 0
