"""The ``demo`` command: the whole loop on volumes made by code, with the default model.

1. Segment the organ in a synthetic abdominal CT with LiteMedSAM from one 3D box (tracked
   boxes), print Dice against the phantom's reference label, write the mask and a picture.
2. Export low-contrast phantom cases (a structure SAM gets wrong zero-shot) as a training set,
   fine-tune a LoRA adapter on the mask decoder, and print base vs adapted Dice on held-out cases.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from .cli_args import add_device_argument, whole_number
from .metrics import dice_score as dice

#: The name the demo's dataset carries in its dataset.json, so a later run knows it may replace it.
DEMO_DATASET = "SAMFineTune demo (low-contrast phantom)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="demo_output", help="folder for the volume, mask, dataset, adapter, PNGs")
    add_device_argument(parser)
    parser.add_argument("--train-cases", type=whole_number(1), default=8,
                        help="phantom cases for fine-tuning (2 more are held out)")
    parser.add_argument("--epochs", type=whole_number(1), default=2,
                        help="each at least 36 steps (--min-epoch-steps of train)")


def save_overlay(image: np.ndarray, mask: np.ndarray, reference: np.ndarray, path: str, title: str) -> None:
    """Three slices side by side: image, reference contour (green) and SAM's mask (red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .imaging import slices_holding

    present = slices_holding(reference, "axial")
    picks = [present[len(present) // 6], present[len(present) // 2], present[(5 * len(present)) // 6]]
    figure, axes = plt.subplots(1, 3, figsize=(10, 3.8))
    for ax, k in zip(axes, picks):
        ax.imshow(np.clip((image[k] + 160.0) / 400.0, 0, 1), cmap="gray")
        ax.contour(reference[k], levels=[0.5], colors="lime", linewidths=1.2)
        ax.contour(mask[k], levels=[0.5], colors="red", linewidths=1.0, linestyles="--")
        ax.set_title(f"slice {k}: Dice {dice(mask[k], reference[k]):.3f}", fontsize=9)
        ax.axis("off")
    figure.suptitle(title + "  (green: reference, red dashed: SAMFineTune)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def segment_part(args, output: str) -> None:
    from .phantom import bounding_box, make_ct_phantom
    from .progress import StderrBar
    from .segmenter import Segmenter
    from .volume_io import write_volume

    ct, label = make_ct_phantom(shape_kji=(32, 128, 128), spacing_xyz=(1.2, 1.2, 3.0), seed=7)
    write_volume(ct, os.path.join(output, "phantom_ct.nii.gz"))
    write_volume(label, os.path.join(output, "phantom_reference.nii.gz"))
    roi = bounding_box(label.array, (6, 6, 2))
    print(f"[1/2] segmenting the organ of a synthetic CT {ct.array.shape[::-1]} voxels, spacing "
          f"{ct.spacing} mm, with LiteMedSAM inside the box {roi} (i0 j0 k0 i1 j1 k1)", flush=True)
    segmenter = Segmenter("litemedsam", device=args.device)
    started = time.perf_counter()
    result = segmenter.segment(ct, roi, progress=StderrBar())  # the default box mode: crossed boxes
    cold = time.perf_counter() - started
    write_volume(ct.with_array(result.mask), os.path.join(output, "phantom_mask.nii.gz"))
    tracked = segmenter.segment(ct, roi, box_mode="tracked")
    fixed = segmenter.segment(ct, roi, box_mode="fixed")
    save_overlay(ct.array, result.mask, label.array, os.path.join(output, "segmentation.png"),
                 "LiteMedSAM, one 3D box, crossed boxes")
    print(f"      Dice vs reference: crossed boxes (the default) {dice(result.mask, label.array):.3f}, tracked boxes "
          f"{dice(tracked.mask, label.array):.3f}, fixed ROI rectangle {dice(fixed.mask, label.array):.3f}")
    print(f"      {len(result.slices)} slices in {cold:.1f} s cold (model loaded, nothing cached); the fixed-ROI "
          f"re-run took {fixed.stats['seconds']:.2f} s, {fixed.stats['cache_hits']} slices from the cache and "
          f"{fixed.stats['encoded']} newly encoded")


def _clear_earlier_demo_dataset(dataset: str) -> None:
    """An export appends and never rewrites a case, so a second demo run starts its dataset anew;
    a folder there that is not a demo's dataset is left alone, and the demo stops before any work."""
    import json
    import shutil

    if not os.path.exists(dataset):
        return
    try:
        with open(os.path.join(dataset, "dataset.json"), encoding="utf-8") as handle:
            ours = json.load(handle).get("name") == DEMO_DATASET
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise ValueError(f"{dataset} exists and is not a dataset the demo wrote; choose another --output")
    shutil.rmtree(dataset)


def _earlier_demo_adapter(adapter: str, dataset: str) -> bool:
    """Whether ``adapter`` holds an earlier demo run's adapter (its card names the demo's dataset),
    which this run replaces; an adapter of anything else there stops the demo before any work."""
    import json

    from .adapter_folders import COMPLETE_MARK, holds_adapter

    if not holds_adapter(adapter):
        return False
    try:
        with open(os.path.join(adapter, COMPLETE_MARK), encoding="utf-8") as handle:
            ours = json.load(handle)["dataset"]["path"] == os.path.abspath(dataset)
    except (OSError, ValueError, KeyError, TypeError):
        ours = False
    if not ours:
        raise ValueError(f"{adapter} holds an adapter the demo did not train; choose another --output")
    return True


def finetune_part(args, output: str, overwrite: bool = False) -> None:
    from .dataset import export_dataset
    from .evaluate import evaluate, format_table
    from .training import TrainConfig, train
    from .training.card import kept_text
    from .phantom_lowcontrast import make_cases
    from .progress import StderrBar

    dataset = os.path.join(output, "dataset")
    adapter = os.path.join(output, "adapter")
    cases = make_cases(args.train_cases + 2, first_seed=100)
    print(f"\n[2/2] fine-tuning: {len(cases)} low-contrast phantom cases (a faint organ beside a bright bone: "
          "zero-shot SAM takes the bone's edge)", flush=True)
    export_dataset(cases, dataset, val_fraction=2.0 / len(cases), seed=0, label_names={1: "organ"},
                   name=DEMO_DATASET)
    # The held-out cases are scored with the reference box on every slice, so training asks that
    # prompt alone; the default mix trains for tracking from one ROI (docs/finetuning.md).
    card = train(TrainConfig(dataset=dataset, output=adapter, model="litemedsam", device=args.device,
                             epochs=args.epochs, patience=0, tracked_prompts=0.0, roi_prompts=0.0, end_slices=0,
                             overwrite=overwrite),
                 progress=StderrBar())
    report = evaluate(dataset, model="litemedsam", adapter=adapter, split="val", device=args.device,
                      plot_path=os.path.join(output, "finetune_scores.png"))
    print(format_table(report))
    print(f"      adapter: {adapter} ({kept_text(card)} kept; model card beside it)")


def main(args: argparse.Namespace) -> int:
    output = os.path.abspath(args.output)
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"--output {args.output} is a file; give a folder for the demo's files")
    os.makedirs(output, exist_ok=True)
    dataset = os.path.join(output, "dataset")
    again = _earlier_demo_adapter(os.path.join(output, "adapter"), dataset)
    _clear_earlier_demo_dataset(dataset)
    segment_part(args, output)
    finetune_part(args, output, overwrite=again)
    print(f"\nwrote everything under {output}")
    return 0
