"""The ``refine`` command: correct slices of a mask with clicks, and optionally carry the last
corrected slice on through the volume (``--propagate``)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Tuple

from .cli_args import add_axis_argument, add_engine_arguments, add_model_arguments, add_window_argument


def click_arg(text: str) -> Tuple[int, int, int, bool]:
    """``I,J,K,+1`` (positive) or ``I,J,K,-1`` (negative) -> (i, j, k, positive)."""
    parts = text.split(",")
    if len(parts) != 4 or parts[3] not in ("+1", "1", "-1", "0"):
        raise argparse.ArgumentTypeError(f"a click is I,J,K,+1 or I,J,K,-1 (voxel indices, then positive or "
                                         f"negative), got {text!r}")
    try:
        i, j, k = (int(part) for part in parts[:3])
    except ValueError:
        raise argparse.ArgumentTypeError(f"a click's voxel indices are whole numbers, got {text!r}") from None
    return i, j, k, parts[3] in ("+1", "1")


def clicks_by_slice(clicks, axis: str) -> Dict[int, List[Tuple[float, float, bool]]]:
    """Voxel clicks -> {slice index along ``axis``: [(x, y, positive)] on that slice}, in order
    (a click is a one-voxel box, mapped as ``imaging.box_to_slices`` maps boxes)."""
    from .imaging import box_to_slices

    slices: Dict[int, List[Tuple[float, float, bool]]] = {}
    for i, j, k, positive in clicks:
        along, (x, y, _, _) = box_to_slices((i, j, k, i, j, k), axis)
        slices.setdefault(along[0], []).append((float(x), float(y), positive))
    return slices


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--volume", required=True, help="3D image readable by SimpleITK (.nii.gz, .nrrd, .mha, ...)")
    parser.add_argument("--points", required=True, nargs="+", type=click_arg, metavar="I,J,K,+1|-1",
                        help="clicks in voxel indices, +1 on the structure, -1 off it; clicks on one slice "
                             "refine that slice together, in order")
    parser.add_argument("--mask", help="the mask being corrected (same geometry); default: empty")
    parser.add_argument("--output", required=True, help="mask file to write (same geometry as the volume)")
    parser.add_argument("--propagate", action="store_true",
                        help="then fill the slices between clicked slices from the boxes between theirs and carry "
                             "the outermost on through the volume (the clicked slices stay)")
    parser.add_argument("--roi", nargs=6, type=int, metavar=("I0", "J0", "K0", "I1", "J1", "K1"),
                        help="the ROI the structure was segmented from (segment's --box): the clicked slices are "
                             "windowed as that segmentation windowed them, and with --propagate the carried slices "
                             "keep to it")
    add_model_arguments(parser)
    add_engine_arguments(parser)
    add_axis_argument(parser)
    add_window_argument(parser)
    parser.add_argument("--adapter", help="folder of a fine-tuned LoRA adapter for this model")


def main(args: argparse.Namespace) -> int:
    """Every input is checked before torch is imported and the model loads (``_checked_inputs``);
    the mask is read back before it replaces an earlier one."""
    volume, mask, by_slice, roi = _checked_inputs(args)
    import numpy as np

    from . import imaging
    from .refinement import refine_slice
    from .segmenter import Segmenter
    from .volume_io import write_volume

    segmenter = Segmenter(args.model, checkpoint=args.checkpoint, device=args.device,
                          window_margin=args.decode_window, precision=args.precision, backend=args.backend)
    if args.adapter:
        segmenter.set_adapter(args.adapter)
    corrected = []
    for index, points in by_slice.items():
        current = imaging.extract_slice(mask, args.axis, index)
        refined = refine_slice(segmenter, volume, args.axis, index, points, start_mask=current, window=args.window,
                               roi=roi)
        imaging.place_slice(mask, args.axis, index, refined.mask.astype(np.uint8))
        corrected.append(index)
    carried = []
    if args.propagate:
        last = corrected[-1]
        others = {index: imaging.extract_slice(mask, args.axis, index) for index in corrected if index != last}
        result = segmenter.propagate(volume, args.axis, last, imaging.extract_slice(mask, args.axis, last),
                                     locked=corrected, corrections=others, box=roi, window=args.window)
        for index in result.slices:
            imaging.place_slice(mask, args.axis, index, imaging.extract_slice(result.mask, args.axis, index))
        carried = result.slices
    write_volume(volume.with_array(mask), args.output)
    print(json.dumps({"output": os.path.abspath(args.output), "voxels": int(mask.sum()), "corrected": corrected,
                      "propagated": carried}))
    return 0


def _checked_inputs(args: argparse.Namespace):
    """(volume, starting mask, clicks by slice, ROI or None) once all are known good: the output's
    folder, the files, the volume as ``segment`` checks it, the clicks inside it, and contrast on
    every clicked slice and inside the ROI (``input_checks.check_contrast``, as ``segment`` checks
    its box). Warnings go to stderr. Only a propagation inside a ROI is checked by the engine's own
    rule, which imports torch."""
    import numpy as np

    from . import imaging
    from .input_checks import check_adapter, check_contrast, check_same_grid, check_volume_input, validate_box
    from .volume_io import check_volume_output, read_volume

    check_volume_output(args.output, "the output mask", inputs=[args.volume])  # --mask may be corrected in place
    volume = read_volume(args.volume)
    check_volume_input(volume, args.volume)
    mask = np.zeros(volume.array.shape, np.uint8)
    if args.mask:
        start = read_volume(args.mask, "mask")
        check_same_grid(volume, start, f"the mask {args.mask}")
        mask = (start.array > 0).astype(np.uint8)
    for i, j, k, _ in args.points:
        if not all(0 <= v < n for v, n in zip((k, j, i), volume.array.shape)):
            raise ValueError(f"the click ({i}, {j}, {k}) lies outside the volume's {volume.array.shape[::-1]} voxels")
    by_slice = clicks_by_slice(args.points, args.axis)
    roi = None if args.roi is None else validate_box(args.roi, volume.array.shape)
    if roi is not None and args.propagate:
        from .propagation import limits

        last = list(by_slice)[-1]
        plane = imaging.extract_slice(mask, args.axis, last).shape
        limits(roi, args.axis, last, None, None, volume.array.shape[imaging.axis_index(args.axis)], plane)
    warnings = [warning for index in by_slice
                for warning in check_contrast(imaging.extract_slice(volume.array, args.axis, index), None,
                                              f"the clicked {args.axis} slice {index} of {args.volume}", "the click")]
    if roi is not None:
        warnings += check_contrast(volume.array, roi, args.volume, "the ROI")
    if args.adapter:
        check_adapter(args.adapter, args.model)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return volume, mask, by_slice, roi
