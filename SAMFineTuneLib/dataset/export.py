"""Writing (or appending) cases to a dataset, ``dataset.json`` last."""
from __future__ import annotations

import os
import warnings
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np

from ..catalogue import EXPORT_FORMATS
from ..files import write_json_atomic
from ..progress import check_cancel, report
from .checks import check_case, merge_label_names
from .index import DATASET_JSON, FILE_ENDING, LAYOUT_VERSION, read_dataset
from .slice_formats import ensure_slice_index, write_slice_indexes
from .splits import assign_splits


def export_dataset(cases: Iterable[Tuple[str, Any, Any]], output_dir: str, fmt: str = "msd",
                   val_fraction: float = 0.2, seed: int = 0, label_names: Optional[Dict[int, str]] = None,
                   progress=None, cancel=None, groups: Optional[Dict[str, str]] = None,
                   splits: Optional[Dict[str, str]] = None, modality: Optional[str] = None,
                   name: Optional[str] = None, axis: str = "axial", window: str = "auto") -> Dict[str, Any]:
    """Write (or append) cases to a dataset; returns a summary dict.

    ``cases``: (case_id, volume, label volume) with ``volume_io.Volume``-like objects (``array``
    KJI, ``spacing``, ``origin``, ``direction``). ``groups`` maps case id -> patient id so that
    one patient's cases share a split; ``splits`` forces a split per case. The MSD/nnU-Net
    files are always written (training reads them); ``fmt`` "finetune-sam" or "coco" adds the
    slice PNGs (along ``axis``, windowed with ``window``) and their CSV or COCO index.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown format '{fmt}'; choose one of: {', '.join(EXPORT_FORMATS)}")
    root = os.path.abspath(str(output_dir))
    old = read_dataset(root) if os.path.isfile(os.path.join(root, DATASET_JSON)) else None
    existing = old.cases if old else []
    if old is not None and "samfinetune" not in old.meta:
        raise ValueError(f"{root} holds a dataset not written by SAMFineTune; export into a new folder")
    label_names = merge_label_names(old.labels if old else {}, label_names)
    groups = dict(groups or {})
    summary: Dict[str, Any] = {"dataset": root, "format": fmt, "added": [], "skipped": [], "warnings": []}
    checked = _checked_cases(list(cases), {e.case for e in existing}, label_names, summary)
    if label_names is None:
        label_names = {v: f"label_{v}" for _, _, _, _, present in checked for v in present}
    split_of = assign_splits([(c[0], str(groups.get(c[0], c[0]))) for c in checked], existing,
                             val_fraction, seed, splits)
    for folder in ("imagesTr", "labelsTr") + (("slices",) if fmt != "msd" else ()):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    records = [dict(e.record) for e in existing]
    records += _write_cases(root, checked, split_of, groups, summary, progress, cancel)
    check_cancel(cancel)
    if fmt != "msd":
        for record in records:
            report(progress, len(checked), len(checked), f"slices of {record['case']}")
            ensure_slice_index(root, record, axis, window)
        write_slice_indexes(root, records, label_names, fmt)
    meta = _dataset_json(records, label_names, modality or (old.meta.get("channel_names", {}).get("0") if old else None),
                         name or (old.meta.get("name") if old else None) or os.path.basename(root),
                         old.meta["samfinetune"] if old else {}, fmt, axis, window)
    write_json_atomic(os.path.join(root, DATASET_JSON), meta)
    report(progress, len(checked), len(checked), "done")
    summary.update(cases=len(records), train=sum(r["split"] == "train" for r in records),
                   val=sum(r["split"] == "val" for r in records), labels={str(k): v for k, v in label_names.items()})
    return summary


def _checked_cases(cases: List[Tuple[str, Any, Any]], seen: set, label_names: Optional[Dict[int, str]],
                   summary: Dict[str, Any]) -> List[tuple]:
    """(case_id, image, label, label array, label values) of every case worth writing, all checked
    before anything is written; an empty label map is skipped with a warning."""
    checked: List[tuple] = []
    for case_id, image, label in cases:
        if case_id in seen:
            where = "twice in this export" if case_id in {c for c, *_ in checked} else "already in the dataset"
            raise ValueError(f"case '{case_id}' is {where}; an export never rewrites a case: give it another id")
        seen.add(case_id)
        array, present = check_case(case_id, image, label, label_names)
        if not present:
            message = f"case '{case_id}' skipped: its label map is empty (nothing segmented)"
            warnings.warn(message, stacklevel=3)
            summary["skipped"].append({"case": case_id, "reason": "empty label"})
            summary["warnings"].append(message)
            continue
        checked.append((case_id, image, label, array, present))
    return checked


def _write_cases(root: str, checked: List[tuple], split_of: Dict[str, str], groups: Dict[str, str],
                 summary: Dict[str, Any], progress, cancel) -> List[Dict[str, Any]]:
    """Write each checked case's volume and label map; their records for ``dataset.json``."""
    from ..volume_io import Volume, write_volume

    records = []
    for n, (case_id, image, label, array, present) in enumerate(checked):
        check_cancel(cancel)
        report(progress, n, len(checked), f"writing case {case_id}")
        image_rel = f"imagesTr/{case_id}_0000{FILE_ENDING}"
        label_rel = f"labelsTr/{case_id}{FILE_ENDING}"
        write_volume(Volume(np.asarray(image.array), tuple(image.spacing), tuple(image.origin),
                            tuple(image.direction)), os.path.join(root, image_rel))
        write_volume(Volume(array, tuple(image.spacing), tuple(image.origin), tuple(image.direction)),
                     os.path.join(root, label_rel))
        records.append({"case": case_id, "image": image_rel, "label": label_rel, "split": split_of[case_id],
                        "group": str(groups.get(case_id, case_id)), "shape_kji": list(array.shape),
                        "spacing": [float(s) for s in image.spacing], "labels": present})
        summary["added"].append(case_id)
    return records


def _dataset_json(records: List[Dict[str, Any]], label_names: Dict[int, str], modality: Optional[str], name: str,
                  old_section: Dict[str, Any], fmt: str, axis: str, window: str) -> Dict[str, Any]:
    def listing(split: str) -> List[Dict[str, str]]:
        return [{"image": "./" + r["image"], "label": "./" + r["label"]} for r in records if r["split"] == split]

    formats = sorted(set(old_section.get("formats", ["msd"])) | {fmt})
    return {
        "name": name,
        "description": "exported by SAMFineTune",
        "channel_names": {"0": modality or "CT"},
        "labels": dict([("background", 0)] + [(n, int(v)) for v, n in sorted(label_names.items())]),
        "numTraining": len(records),
        "file_ending": FILE_ENDING,
        "training": listing("train"),
        "validation": listing("val"),
        "test_labelled": listing("test"),
        "samfinetune": {"version": LAYOUT_VERSION, "formats": formats, "slice_axis": axis, "slice_window": window,
                        "cases": records},
    }
