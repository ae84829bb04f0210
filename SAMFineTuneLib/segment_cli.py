"""The ``segment`` command: one structure inside a 3D box, slice by slice, written as a mask."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .cli_args import (add_engine_arguments, add_model_arguments, add_postprocess_arguments, add_prompt_arguments,
                       add_slicing_arguments)


def add_segment_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--volume", required=True, help="3D image readable by SimpleITK (.nii.gz, .nrrd, .mha, ...)")
    parser.add_argument("--box", required=True, nargs=6, type=int, metavar=("I0", "J0", "K0", "I1", "J1", "K1"),
                        help="inclusive voxel indices of the box corners (i = x/column, j = y/row, k = slice)")
    parser.add_argument("--output", required=True, help="mask file to write (same geometry as the volume)")
    add_model_arguments(parser)
    add_engine_arguments(parser)
    add_slicing_arguments(parser)
    add_prompt_arguments(parser)
    parser.add_argument("--adapter", help="folder of a fine-tuned LoRA adapter for this model")
    add_postprocess_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def segment_main(args: argparse.Namespace) -> int:
    """Every input is checked (the options, the output's folder, the volume file, its voxels inside
    the box) before the model loads; the mask is read back before it replaces an earlier one."""
    from .input_checks import check_adapter, check_segment_input, check_triplanar
    from .volume_io import check_volume_output, read_volume, write_volume

    check_triplanar(args.triplanar, args.adapter)
    check_volume_output(args.output, "the output mask", inputs=[args.volume])
    volume = read_volume(args.volume)
    box, warnings = check_segment_input(volume, args.box, args.volume)
    if args.adapter:
        check_adapter(args.adapter, args.model)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    from .progress import StderrBar
    from .segmenter import Segmenter

    segmenter = Segmenter(args.model, checkpoint=args.checkpoint, device=args.device,
                          window_margin=args.decode_window, compile=args.compile, precision=args.precision,
                          backend=args.backend)
    if args.adapter:
        segmenter.set_adapter(args.adapter)
    result = segmenter.segment(
        volume, box, axis=args.axis, window=args.window, box_mode=args.box_mode,
        keep_largest=not args.no_largest_component, fill_holes=not args.no_fill_holes, zoom=args.zoom,
        triplanar=args.triplanar,
        progress=None if args.quiet else StderrBar(),
    )
    write_volume(volume.with_array(result.mask), args.output)
    print(json.dumps({"output": os.path.abspath(args.output), "voxels": int(result.mask.sum()),
                      "slices": result.slices,
                      **{k: round(v, 3) if isinstance(v, float) else v for k, v in result.stats.items()}}))
    return 0
