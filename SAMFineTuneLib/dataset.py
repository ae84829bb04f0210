"""Training sets: export volumes + label maps to disk, and read them back as per-slice samples.

The on-disk layout is the one nnU-Net, MONAI and the Medical Segmentation Decathlon use::

    DATASET/
      dataset.json                 labels, channel names, per-case split (the index: written last)
      imagesTr/<case>_0000.nii.gz  the volume, geometry kept
      labelsTr/<case>.nii.gz       integer label map (0 = background)
      train.csv, val.csv           --format finetune-sam: image,mask slice PNG paths (no header)
      coco_train.json, coco_val.json   --format coco: slice PNGs + RLE masks (finestSAM)
      slices/                      the slice PNGs and one small index per case for those formats
      .embeddings/                 encoder outputs cached by training and evaluation

``dataset.json`` is nnU-Net v2's (``channel_names``, ``labels`` name -> value, ``numTraining``,
``file_ending``) plus MONAI's ``training`` / ``validation`` lists (``load_decathlon_datalist``)
and a ``samfinetune`` section with one record per case (split, group, shape, spacing).

Rules: splits are by case or by group (patient), never by slice; exporting into an existing
dataset appends and never rewrites or drops a case; every file is written to a temporary name
and renamed, and ``dataset.json`` is replaced last, so a crash or cancel mid-export leaves the
previous dataset exactly as it was (at most some unreferenced files that the next export
overwrites). Geometry mismatches and unknown label values are errors; an empty label map is
skipped with a warning (returned in the summary and issued through ``warnings``).
"""
from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .progress import Cancelled, check_cancel, report  # noqa: F401  (Cancelled re-exported for callers)

DATASET_JSON = "dataset.json"
FORMATS = ("msd", "finetune-sam", "coco")
SPLITS = ("train", "val", "test")
EMBEDDING_DIR = ".embeddings"
FILE_ENDING = ".nii.gz"
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_LAYOUT_VERSION = 1


# ---------------------------------------------------------------- small file helpers


def atomic_write(path: str, write) -> None:
    """``write(temp_path)`` then rename onto ``path``: readers see the old file or the new one."""
    from .volume_io import atomic_target

    temp = atomic_target(path)
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def write_text_atomic(path: str, text: str) -> None:
    def write(temp: str) -> None:
        with open(temp, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    atomic_write(path, write)


def write_json_atomic(path: str, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=False) + "\n")


def _write_png_atomic(array: np.ndarray, path: str) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    atomic_write(path, lambda temp: sitk.WriteImage(image, temp))


def read_image_any(path: str):
    """A 3D volume, or a 2D image (PNG, 2D NIfTI) as a one-slice volume, as a ``volume_io.Volume``."""
    import SimpleITK as sitk

    from .volume_io import Volume, read_volume

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    image = sitk.ReadImage(str(path))
    if image.GetDimension() == 3:
        return read_volume(path)
    if image.GetDimension() != 2:
        raise ValueError(f"{path} is a {image.GetDimension()}D image; 2D or 3D expected")
    if image.GetNumberOfComponentsPerPixel() != 1:  # RGB(A) picture of a greyscale scan: take luminance
        channels = sitk.GetArrayFromImage(image).astype(np.float32)[..., :3]
        array = (channels @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[None]
    else:
        array = sitk.GetArrayFromImage(image)[None]
    (sx, sy), (ox, oy) = image.GetSpacing(), image.GetOrigin()
    d = image.GetDirection()
    return Volume(array, (sx, sy, 1.0), (ox, oy, 0.0), (d[0], d[1], 0.0, d[2], d[3], 0.0, 0.0, 0.0, 1.0))


# ---------------------------------------------------------------- the dataset index


@dataclass
class CaseEntry:
    case: str
    image: str  # absolute paths
    label: str
    split: str
    group: str
    record: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetInfo:
    root: str
    labels: Dict[int, str]  # value -> name, background excluded
    cases: List[CaseEntry]
    meta: Dict[str, Any]

    def split(self, name: str = "all") -> List[CaseEntry]:
        if name == "all":
            return list(self.cases)
        if name not in SPLITS:
            raise ValueError(f"unknown split '{name}'; choose one of: {', '.join(SPLITS + ('all',))}")
        return [c for c in self.cases if c.split == name]

    def case(self, case_id: str) -> CaseEntry:
        for entry in self.cases:
            if entry.case == case_id:
                return entry
        raise KeyError(f"case '{case_id}' is not in dataset {self.root}")


def read_dataset(path: str) -> DatasetInfo:
    """Read ``dataset.json`` (ours, or any MSD/nnU-Net one with a ``training`` list)."""
    root = os.path.abspath(str(path))
    index = os.path.join(root, DATASET_JSON)
    if not os.path.isfile(index):
        raise ValueError(f"{root} is not a dataset: it has no {DATASET_JSON} (export one with "
                         "'python -m SAMFineTuneLib export')")
    with open(index, encoding="utf-8") as handle:
        meta = json.load(handle)
    labels = _labels_from_json(meta.get("labels", {}))
    ours = meta.get("samfinetune", {}).get("cases")
    if ours is not None:
        cases = [CaseEntry(r["case"], os.path.join(root, r["image"]), os.path.join(root, r["label"]),
                           r["split"], r.get("group", r["case"]), r) for r in ours]
    else:
        cases = _foreign_cases(root, meta)
    for entry in cases:
        for file in (entry.image, entry.label):
            if not os.path.isfile(file):
                raise ValueError(f"dataset {root} lists {file} for case '{entry.case}', but the file is missing")
    return DatasetInfo(root, labels, cases, meta)


def _labels_from_json(labels: Dict[str, Any]) -> Dict[int, str]:
    out: Dict[int, str] = {}
    for key, value in labels.items():
        if isinstance(value, int):  # nnU-Net v2: name -> value
            name, number = key, value
        else:  # MSD: "value" -> name
            name, number = str(value), int(key)
        if number != 0:
            out[number] = name
    return out


def _foreign_cases(root: str, meta: Dict[str, Any]) -> List[CaseEntry]:
    def entries(key: str) -> List[Dict[str, str]]:
        return [e for e in meta.get(key, []) if isinstance(e, dict) and "image" in e and "label" in e]

    def case_id(item: Dict[str, str]) -> str:
        name = os.path.basename(item["label"])
        return name[: -len(FILE_ENDING)] if name.endswith(FILE_ENDING) else os.path.splitext(name)[0]

    val = entries("validation")
    train = entries("training")
    ids = sorted(case_id(e) for e in train)
    held_out = set(case_id(e) for e in val)
    if not val:  # no split given: a seeded 20% by case
        shuffled = list(ids)
        random.Random(0).shuffle(shuffled)
        held_out = set(shuffled[: max(1, round(0.2 * len(ids)))] if len(ids) > 1 else [])
    out = []
    for item in train + [e for e in val if case_id(e) not in ids]:
        cid = case_id(item)
        out.append(CaseEntry(cid, os.path.normpath(os.path.join(root, item["image"])),
                             os.path.normpath(os.path.join(root, item["label"])),
                             "val" if cid in held_out else "train", cid))
    return out


# ---------------------------------------------------------------- checks


def _close(a: Sequence[float], b: Sequence[float], tol: float) -> bool:
    return bool(np.allclose(np.asarray(a, float), np.asarray(b, float), rtol=0.0, atol=tol))


def check_case(case_id: str, image, label, label_names: Optional[Dict[int, str]]) -> Tuple[np.ndarray, List[int]]:
    """Validate one case; return the label map as an unsigned integer array and its nonzero values.

    Raises ValueError (naming the case and the problem) for a bad id, a geometry mismatch, a
    non-integer or negative label, or label values missing from ``label_names``.
    """
    if not isinstance(case_id, str) or not _CASE_ID.match(case_id):
        raise ValueError(f"case id {case_id!r} is not usable as a file name: use letters, digits, '_', '-', '.'")
    img, lab = np.asarray(image.array), np.asarray(label.array)
    if img.ndim != 3:
        raise ValueError(f"case '{case_id}': the volume is {img.ndim}D (shape {img.shape}); a 3D KJI array is needed")
    if lab.shape != img.shape:
        raise ValueError(f"case '{case_id}': label shape {lab.shape} does not match volume shape {img.shape}")
    spacing = np.asarray(image.spacing, float)
    for what, a, b, tol in (("spacing", image.spacing, label.spacing, 1e-4 * spacing.max()),
                            ("origin", image.origin, label.origin, 1e-3 * spacing.min()),
                            ("direction", image.direction, label.direction, 1e-4)):
        if not _close(a, b, tol):
            raise ValueError(f"case '{case_id}': label {what} {tuple(np.round(np.asarray(b, float), 6))} does not "
                             f"match the volume's {tuple(np.round(np.asarray(a, float), 6))}; resample the label "
                             "onto the volume first")
    if not np.issubdtype(lab.dtype, np.integer) and not np.issubdtype(lab.dtype, np.bool_):
        if not np.all(np.isfinite(lab)) or np.any(lab != np.round(lab)):
            raise ValueError(f"case '{case_id}': label map has non-integer values; a label map holds integers")
    values = [int(v) for v in np.unique(lab)]
    if values and values[0] < 0:
        raise ValueError(f"case '{case_id}': label map has negative values ({values[0]})")
    if values and values[-1] > 65535:
        raise ValueError(f"case '{case_id}': label value {values[-1]} is larger than 65535")
    present = [v for v in values if v != 0]
    if label_names is not None:
        unknown = [v for v in present if v not in label_names]
        if unknown:
            known = ", ".join(f"{k}={n}" for k, n in sorted(label_names.items())) or "none"
            raise ValueError(f"case '{case_id}': label values {unknown} are not among the dataset's labels "
                             f"({known}); name them in label_names (--label-names)")
    dtype = np.uint8 if (not values or values[-1] < 256) else np.uint16
    return lab.astype(dtype, copy=False), present


# ---------------------------------------------------------------- export


def _assign_splits(new: List[Tuple[str, str]], existing: List[CaseEntry], val_fraction: float, seed: int,
                   explicit: Optional[Dict[str, str]]) -> Dict[str, str]:
    """Split by group: a group already in the dataset keeps its side; new groups are shuffled
    (seeded) and sent to validation until the whole dataset's share reaches ``val_fraction``."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    explicit = dict(explicit or {})
    group_split = {e.group: e.split for e in existing}
    result: Dict[str, str] = {}
    for cid, group in new:
        if cid in explicit:
            if explicit[cid] not in SPLITS:
                raise ValueError(f"case '{cid}': unknown split '{explicit[cid]}'; choose one of {', '.join(SPLITS)}")
            if group_split.setdefault(group, explicit[cid]) != explicit[cid]:
                raise ValueError(f"case '{cid}' is put in '{explicit[cid]}' but its group '{group}' is already in "
                                 f"'{group_split[group]}': one patient never lands on both sides")
            result[cid] = explicit[cid]
    sizes: Dict[str, int] = {}
    for cid, group in new:
        if cid not in result and group in group_split:
            result[cid] = group_split[group]
        elif cid not in result:
            sizes[group] = sizes.get(group, 0) + 1
    pending = sorted(sizes)
    random.Random(seed).shuffle(pending)
    total = len(existing) + len(new)
    target = int(round(val_fraction * total))
    if val_fraction > 0 and total >= 2:
        target = max(1, target)
    n_val = sum(1 for e in existing if e.split == "val") + sum(1 for s in result.values() if s == "val")
    n_train = sum(1 for e in existing if e.split == "train") + sum(1 for s in result.values() if s == "train")
    remaining = sum(sizes.values())
    chosen: Dict[str, str] = {}
    for group in pending:
        remaining -= sizes[group]
        go_val = n_val < target and (n_train + remaining) > 0
        chosen[group] = "val" if go_val else "train"
        n_val += sizes[group] if go_val else 0
        n_train += 0 if go_val else sizes[group]
    for cid, group in new:
        result.setdefault(cid, chosen.get(group, "train"))
    return result


def _merge_label_names(existing: Dict[int, str], given: Optional[Dict[int, str]]) -> Optional[Dict[int, str]]:
    if given is None:
        return dict(existing) if existing else None
    merged = dict(existing)
    for value, name in given.items():
        value = int(value)
        if value <= 0:
            raise ValueError(f"label value {value} for '{name}': label values are positive integers (0 = background)")
        if value in merged and merged[value] != name:
            raise ValueError(f"label {value} is '{merged[value]}' in the existing dataset, not '{name}'")
        merged[value] = str(name)
    names = list(merged.values())
    if len(set(names)) != len(names) or "background" in names:
        raise ValueError(f"label names must be unique and not 'background': {merged}")
    return merged


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
    if fmt not in FORMATS:
        raise ValueError(f"unknown format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    from .volume_io import Volume, write_volume

    root = os.path.abspath(str(output_dir))
    old = read_dataset(root) if os.path.isfile(os.path.join(root, DATASET_JSON)) else None
    existing = old.cases if old else []
    if old is not None and "samfinetune" not in old.meta:
        raise ValueError(f"{root} holds a dataset not written by SAMFineTune; export into a new folder")
    label_names = _merge_label_names(old.labels if old else {}, label_names)
    cases = list(cases)
    groups = dict(groups or {})
    seen = set(e.case for e in existing)
    summary: Dict[str, Any] = {"dataset": root, "format": fmt, "added": [], "skipped": [], "warnings": []}

    checked = []
    for case_id, image, label in cases:
        if case_id in seen:
            where = "twice in this export" if case_id in {c for c, *_ in checked} else "already in the dataset"
            raise ValueError(f"case '{case_id}' is {where}; an export never rewrites a case: give it another id")
        seen.add(case_id)
        array, present = check_case(case_id, image, label, label_names)
        if not present:
            message = f"case '{case_id}' skipped: its label map is empty (nothing segmented)"
            warnings.warn(message, stacklevel=2)
            summary["skipped"].append({"case": case_id, "reason": "empty label"})
            summary["warnings"].append(message)
            continue
        checked.append((case_id, image, label, array, present))
    if label_names is None:
        label_names = {v: f"label_{v}" for _, _, _, _, present in checked for v in present}
    split_of = _assign_splits([(c[0], str(groups.get(c[0], c[0]))) for c in checked], existing,
                              val_fraction, seed, splits)

    for folder in ("imagesTr", "labelsTr") + (("slices",) if fmt != "msd" else ()):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    records = [dict(e.record) for e in existing]
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
    check_cancel(cancel)
    if fmt != "msd":
        for record in records:
            report(progress, len(checked), len(checked), f"slices of {record['case']}")
            _ensure_slice_index(root, record, axis, window)
        _write_slice_indexes(root, records, label_names, fmt)
    meta = _dataset_json(records, label_names, modality or (old.meta.get("channel_names", {}).get("0") if old else None),
                         name or (old.meta.get("name") if old else None) or os.path.basename(root),
                         old.meta["samfinetune"] if old else {}, fmt, axis, window)
    write_json_atomic(os.path.join(root, DATASET_JSON), meta)
    report(progress, len(checked), len(checked), "done")
    summary.update(cases=len(records), train=sum(r["split"] == "train" for r in records),
                   val=sum(r["split"] == "val" for r in records), labels={str(k): v for k, v in label_names.items()})
    return summary


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
        "samfinetune": {"version": _LAYOUT_VERSION, "formats": formats, "slice_axis": axis, "slice_window": window,
                        "cases": records},
    }


# ---------------------------------------------------------------- slice formats (finetune-SAM CSV, COCO)


def rle_encode(mask: np.ndarray) -> Dict[str, Any]:
    """COCO's uncompressed RLE (column-major run lengths, starting with a background run)."""
    flat = np.asarray(mask, dtype=np.uint8).ravel(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.r_[0, changes, flat.size])
    if flat.size and flat[0]:
        runs = np.r_[0, runs]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(r) for r in runs]}


def rle_decode(rle: Dict[str, Any]) -> np.ndarray:
    rows, cols = rle["size"]
    values = np.zeros(len(rle["counts"]), dtype=np.uint8)
    values[1::2] = 1
    return np.repeat(values, rle["counts"]).reshape((rows, cols), order="F")


def _ensure_slice_index(root: str, record: Dict[str, Any], axis: str, window: str) -> None:
    """Write a case's slice PNGs and its small JSON index once (a later export reuses them)."""
    from .imaging import axis_index, extract_slice, window_volume
    from .volume_io import read_volume

    index_path = os.path.join(root, "slices", record["case"] + ".json")
    if os.path.isfile(index_path):
        return
    os.makedirs(os.path.join(root, "slices", "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "slices", "masks"), exist_ok=True)
    image = read_volume(os.path.join(root, record["image"]))
    label = read_volume(os.path.join(root, record["label"])).array
    scaled = (window_volume(image.array, window) * 255.0 + 0.5).astype(np.uint8)
    other = tuple(a for a in range(3) if a != axis_index(axis))
    entries = []
    for index in np.flatnonzero(label.any(axis=other)):
        stem = f"{record['case']}_{axis}{int(index):04d}"
        plane = extract_slice(label, axis, index)
        image_rel, mask_rel = f"slices/images/{stem}.png", f"slices/masks/{stem}.png"
        _write_png_atomic(extract_slice(scaled, axis, index), os.path.join(root, image_rel))
        _write_png_atomic(plane.astype(np.uint8) if plane.max() < 256 else plane, os.path.join(root, mask_rel))
        annotations = []
        for value in (int(v) for v in np.unique(plane) if v != 0):
            mask = plane == value
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            annotations.append({"category_id": value, "segmentation": rle_encode(mask), "area": int(mask.sum()),
                                "bbox": [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1),
                                         int(rows[-1] - rows[0] + 1)], "iscrowd": 0})
        entries.append({"slice": int(index), "axis": axis, "image": image_rel, "mask": mask_rel,
                        "height": int(plane.shape[0]), "width": int(plane.shape[1]), "annotations": annotations})
    write_json_atomic(index_path, {"case": record["case"], "slices": entries})


def _write_slice_indexes(root: str, records: List[Dict[str, Any]], label_names: Dict[int, str], fmt: str) -> None:
    for split in SPLITS:
        chosen = [r for r in records if r["split"] == split]
        if not chosen and split == "test":
            continue
        slices = []
        for record in chosen:
            with open(os.path.join(root, "slices", record["case"] + ".json"), encoding="utf-8") as handle:
                slices.extend((record["case"], s) for s in json.load(handle)["slices"])
        if fmt == "finetune-sam":
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            for _, entry in slices:
                writer.writerow([entry["image"], entry["mask"]])
            write_text_atomic(os.path.join(root, f"{split}.csv"), buffer.getvalue())
        else:
            images, annotations = [], []
            for number, (case_id, entry) in enumerate(slices, start=1):
                images.append({"id": number, "file_name": entry["image"], "height": entry["height"],
                               "width": entry["width"], "case": case_id, "slice": entry["slice"]})
                for annotation in entry["annotations"]:
                    annotations.append(dict(annotation, id=len(annotations) + 1, image_id=number))
            categories = [{"id": int(v), "name": n} for v, n in sorted(label_names.items())]
            write_json_atomic(os.path.join(root, f"coco_{split}.json"),
                              {"images": images, "annotations": annotations, "categories": categories})


# ---------------------------------------------------------------- per-slice samples


@dataclass
class SliceSample:
    """One 2D training/evaluation sample: a windowed slice, one label's mask on it."""

    case: str
    axis: str
    index: int
    label: int
    image: np.ndarray  # float32 [0,1], (rows, cols)
    mask: np.ndarray  # bool, (rows, cols)
    pixel_spacing: Tuple[float, float]  # (row, column) mm
    thickness: float = 1.0  # mm between slices along ``axis``

    @property
    def box(self) -> Tuple[int, int, int, int]:
        from .imaging import mask_box

        return mask_box(self.mask)


def load_case(entry: CaseEntry):
    from .volume_io import read_volume

    return read_volume(entry.image), read_volume(entry.label)


def case_samples(case_id: str, image, label: np.ndarray, axis: str = "axial", window: str = "auto",
                 labels: Optional[Sequence[int]] = None) -> List[SliceSample]:
    """Every slice along ``axis`` where a label is present, one sample per (slice, label value)."""
    from .imaging import axis_index, extract_slice, slice_pixel_spacing, window_volume

    scaled = window_volume(np.asarray(image.array), window)
    spacing = slice_pixel_spacing(image.spacing, axis)
    thickness = float(image.spacing[2 - axis_index(axis)])
    values = labels if labels is not None else [int(v) for v in np.unique(label) if v != 0]
    other = tuple(a for a in range(3) if a != axis_index(axis))
    out = []
    for value in values:
        present = (label == value).any(axis=other)
        for index in np.flatnonzero(present):
            out.append(SliceSample(case_id, axis, int(index), int(value), extract_slice(scaled, axis, index),
                                   extract_slice(label, axis, index) == value, spacing, thickness))
    return out


def load_samples(dataset, split: str = "train", axis: str = "axial", window: str = "auto",
                 labels: Optional[Sequence[int]] = None, cases: Optional[Sequence[str]] = None) -> List[SliceSample]:
    """Per-slice samples of one split (or of the named ``cases``) of a dataset folder."""
    info = dataset if isinstance(dataset, DatasetInfo) else read_dataset(dataset)
    entries = [info.case(c) for c in cases] if cases is not None else info.split(split)
    out: List[SliceSample] = []
    for entry in entries:
        image, label = load_case(entry)
        out.extend(case_samples(entry.case, image, np.asarray(label.array), axis, window, labels))
    return out


# ---------------------------------------------------------------- command line


def _parse_label_names(text: Optional[str]) -> Optional[Dict[int, str]]:
    if not text:
        return None
    if text.strip().startswith("{"):
        return {int(k): str(v) for k, v in json.loads(text).items()}
    out = {}
    for part in text.split(","):
        value, _, name = part.partition("=")
        if not name:
            raise ValueError(f"--label-names wants 1=spleen,2=liver (or JSON), got '{part}'")
        out[int(value)] = name.strip()
    return out


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
    parser.add_argument("--format", default="msd", choices=FORMATS, help="extra slice format beside the MSD layout")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of cases held out for validation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the case split")
    parser.add_argument("--case-ids", nargs="+", help="case ids (default: file names)")
    parser.add_argument("--groups", nargs="+", help="patient id per case, so one patient stays on one side")
    parser.add_argument("--label-names", help="1=spleen,2=liver or JSON; default label_<value>")
    parser.add_argument("--modality", help="channel name in dataset.json (CT, MRI, US...)")
    parser.add_argument("--axis", default="axial", choices=("axial", "coronal", "sagittal"))
    parser.add_argument("--window", default="auto", help="window for the slice PNGs of csv/coco formats")


def main(args) -> int:
    from .progress import StderrBar

    if len(args.volumes) != len(args.labels):
        raise SystemExit(f"error: {len(args.volumes)} volumes but {len(args.labels)} label files")
    ids = args.case_ids or [_case_id_from_path(p) for p in args.volumes]
    if len(ids) != len(args.volumes) or (args.groups and len(args.groups) != len(ids)):
        raise SystemExit("error: --case-ids and --groups need one value per volume")
    cases = [(cid, read_image_any(v), read_image_any(lab)) for cid, v, lab in zip(ids, args.volumes, args.labels)]
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("ignore")
        summary = export_dataset(cases, args.output, fmt=args.format, val_fraction=args.val_fraction, seed=args.seed,
                                 label_names=_parse_label_names(args.label_names), progress=StderrBar(),
                                 groups=dict(zip(ids, args.groups)) if args.groups else None,
                                 modality=args.modality, axis=args.axis, window=args.window)
    for message in summary["warnings"]:
        print("warning: " + message)
    print(f"{summary['dataset']}: added {len(summary['added'])} case(s); dataset has {summary['cases']} "
          f"({summary['train']} train, {summary['val']} val)")
    return 0
