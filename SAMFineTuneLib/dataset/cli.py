"""The ``export`` command: ``python -m SAMFineTuneLib export --volumes ... --labels ... --output DATASET``."""
from __future__ import annotations

import json
import os
import warnings
from typing import Dict, Optional

from ..catalogue import EXPORT_FORMATS
from ..cli_args import add_axis_argument, add_window_argument
from ..volume_io import read_image_any
from .export import export_dataset


def _parse_label_names(text: Optional[str]) -> Optional[Dict[int, str]]:
    if not text:
        return None
    try:
        if text.strip().startswith("{"):
            return {int(k): str(v) for k, v in json.loads(text).items()}
        pairs = [part.partition("=") for part in text.split(",")]
        if not all(name.strip() for _, _, name in pairs):
            raise ValueError
        return {int(value): name.strip() for value, _, name in pairs}
    except (ValueError, AttributeError):  # JSON errors are ValueErrors; AttributeError: JSON that is no object
        raise ValueError(f"--label-names wants 1=spleen,2=liver or JSON such as '{{\"1\": \"spleen\"}}' "
                         f"(whole-number values), got '{text}'") from None


def _case_id_from_path(path: str) -> str:
    name = os.path.basename(path)
    for ending in (".nii.gz", ".seg.nrrd"):
        if name.endswith(ending):
            return name[: -len(ending)]
    return os.path.splitext(name)[0]


def add_arguments(parser) -> None:
    parser.add_argument("--volumes", nargs="+", required=True, help="image files (3D NIfTI/NRRD/..., or 2D PNG)")
    parser.add_argument("--labels", nargs="+", required=True, help="label maps, in the same order as --volumes")
    parser.add_argument("--output", required=True, help="dataset folder (created, or appended to)")
    parser.add_argument("--format", default="msd", choices=EXPORT_FORMATS,
                        help="extra slice format beside the MSD layout")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of cases held out for validation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the case split")
    parser.add_argument("--case-ids", nargs="+", help="case ids (default: file names)")
    parser.add_argument("--groups", nargs="+", help="patient id per case, so one patient stays on one side")
    parser.add_argument("--label-names", help="1=spleen,2=liver or JSON; default label_<value>")
    parser.add_argument("--modality", help="channel name in dataset.json (CT, MRI, US...)")
    add_axis_argument(parser, default=None,
                      help="slice direction of the slice PNGs of csv/coco formats (default: the dataset's, else axial)")
    add_window_argument(parser, default=None,
                        help="window for the slice PNGs of csv/coco formats (default: the dataset's, else auto)")


def main(args) -> int:
    from ..progress import StderrBar

    if len(args.volumes) != len(args.labels):
        raise ValueError(f"{len(args.volumes)} volumes but {len(args.labels)} label files: give one label file per "
                         "volume, in the same order")
    ids = args.case_ids or [_case_id_from_path(p) for p in args.volumes]
    if len(ids) != len(args.volumes) or (args.groups and len(args.groups) != len(ids)):
        raise ValueError("--case-ids and --groups need one value per volume")
    label_names = _parse_label_names(args.label_names)
    cases = [(cid, read_image_any(v), read_image_any(lab)) for cid, v, lab in zip(ids, args.volumes, args.labels)]
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("ignore")
        summary = export_dataset(cases, args.output, fmt=args.format, val_fraction=args.val_fraction, seed=args.seed,
                                 label_names=label_names, progress=StderrBar(),
                                 groups=dict(zip(ids, args.groups)) if args.groups else None,
                                 modality=args.modality, axis=args.axis, window=args.window)
    for message in summary["warnings"]:
        print("warning: " + message)
    print(f"{summary['dataset']}: added {len(summary['added'])} case(s); dataset has {summary['cases']} "
          f"({summary['train']} train, {summary['val']} val)")
    return 0
