"""The slice formats an export can add beside the MSD layout: slice PNGs indexed by a CSV
(finetune-SAM) or by COCO JSON with RLE masks (finestSAM)."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from typing import Any, Dict, Iterable, List, Optional

import numpy as np

from ..catalogue import SPLITS
from ..files import write_json_atomic, write_text_atomic


def _write_png_atomic(array: np.ndarray, path: str) -> None:
    import SimpleITK as sitk

    from ..volume_io import write_image

    write_image(sitk.GetImageFromArray(np.ascontiguousarray(array)), path, compress=False)


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


def slice_outputs(fmt: str) -> List[str]:
    """The files beside ``dataset.json`` that hold format ``fmt``'s index, one per split."""
    return [f"{split}.csv" if fmt == "finetune-sam" else f"coco_{split}.json" for split in SPLITS]


def _index_path(root: str, case: str) -> str:
    return os.path.join(root, "slices", case + ".json")


def _read_index(path: str) -> Optional[Dict[str, Any]]:
    """A case's slice index, or None when it is missing or not one (cut short, edited)."""
    try:
        with open(path, encoding="utf-8") as handle:
            index = json.load(handle)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return index if isinstance(index, dict) and isinstance(index.get("slices"), list) else None


def _made_from(root: str, record: Dict[str, Any], axis: str, window: str) -> Dict[str, Any]:
    """What a case's slices are made from. The files are known by size and modification time, not
    by a hash: this is checked for every case on every export, and hashing would read the whole
    dataset each time; a listed case's files change only when an export replaces the case, or by hand."""
    def stamp(rel: str) -> List[int]:
        info = os.stat(os.path.join(root, rel))
        return [int(info.st_size), int(info.st_mtime_ns)]

    return {"axis": axis, "window": window, "image": stamp(record["image"]), "label": stamp(record["label"])}


def remove_slice_index(root: str, case: str) -> None:
    """Delete a case's slice index and the PNGs it lists (only those under ``slices/``)."""
    path = _index_path(root, case)
    for entry in (_read_index(path) or {}).get("slices", []):
        for rel in (entry.get(key) for key in ("image", "mask")) if isinstance(entry, dict) else ():
            # Windows takes '\\' for a separator too: "slices/..\\x" would leave the dataset there.
            if isinstance(rel, str) and rel.startswith("slices/") and ".." not in rel.replace("\\", "/").split("/"):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(root, rel))
    with contextlib.suppress(OSError):
        os.remove(path)


def remove_unlisted_slice_indexes(root: str, listed: Iterable[str]) -> None:
    """Delete the slice indexes (and PNGs) of case ids ``dataset.json`` does not list: left by an
    export that failed, they would otherwise be taken for a later case of the same id."""
    folder = os.path.join(root, "slices")
    keep = set(listed)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    for name in sorted(names):
        if name.endswith(".json") and name[:-5] not in keep and os.path.isfile(os.path.join(folder, name)):
            remove_slice_index(root, name[:-5])


def ensure_slice_index(root: str, record: Dict[str, Any], axis: str, window: str) -> None:
    """Write a case's slice PNGs and its small JSON index, unless the index there was made from
    the same files along the same axis with the same window (then a later export reuses it)."""
    index_path = _index_path(root, record["case"])
    made_from = _made_from(root, record, axis, window)
    old = _read_index(index_path)
    if old is not None and old.get("made_from") == made_from:
        return
    remove_slice_index(root, record["case"])  # another label or axis may hold other slices
    os.makedirs(os.path.join(root, "slices", "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "slices", "masks"), exist_ok=True)
    entries = _write_slices(root, record, axis, window)
    write_json_atomic(index_path, {"case": record["case"], "made_from": made_from, "slices": entries})


def _write_slices(root: str, record: Dict[str, Any], axis: str, window: str) -> List[Dict[str, Any]]:
    """The PNGs of every slice of the case holding a label along ``axis``; their index entries.
    On failure the PNGs written so far go: with no index to list them, nothing would remove them."""
    from ..imaging import slices_holding
    from ..windows import window_volume
    from ..volume_io import read_volume

    image = read_volume(os.path.join(root, record["image"]))
    label = read_volume(os.path.join(root, record["label"])).array
    scaled = (window_volume(image.array, window) * 255.0 + 0.5).astype(np.uint8)
    made: List[str] = []
    try:
        return [_write_slice(root, record["case"], scaled, label, axis, int(index), made)
                for index in slices_holding(label, axis)]
    except BaseException:
        for path in made:
            with contextlib.suppress(OSError):
                os.remove(path)
        raise


def _write_slice(root: str, case: str, scaled: np.ndarray, label: np.ndarray, axis: str, index: int,
                 made: List[str]) -> Dict[str, Any]:
    """One slice's image and mask PNGs (their paths appended to ``made``) and its index entry."""
    from ..imaging import extract_slice, label_values

    stem = f"{case}_{axis}{index:04d}"
    plane = extract_slice(label, axis, index)
    image_rel, mask_rel = f"slices/images/{stem}.png", f"slices/masks/{stem}.png"
    for rel, array in ((image_rel, extract_slice(scaled, axis, index)),
                       (mask_rel, plane.astype(np.uint8) if plane.max() < 256 else plane)):
        _write_png_atomic(array, os.path.join(root, rel))
        made.append(os.path.join(root, rel))
    annotations = []
    for value in label_values(plane):
        mask = plane == value
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        annotations.append({"category_id": value, "segmentation": rle_encode(mask), "area": int(mask.sum()),
                            "bbox": [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1),
                                     int(rows[-1] - rows[0] + 1)], "iscrowd": 0})
    return {"slice": index, "axis": axis, "image": image_rel, "mask": mask_rel,
            "height": int(plane.shape[0]), "width": int(plane.shape[1]), "annotations": annotations}


def write_slice_indexes(root: str, records: List[Dict[str, Any]], label_names: Dict[int, str], fmt: str) -> None:
    for split, output in zip(SPLITS, slice_outputs(fmt)):
        chosen = [r for r in records if r["split"] == split]
        if not chosen and split == "test":
            continue
        slices = []
        for record in chosen:
            with open(_index_path(root, record["case"]), encoding="utf-8") as handle:
                slices.extend((record["case"], s) for s in json.load(handle)["slices"])
        if fmt == "finetune-sam":
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            for _, entry in slices:
                writer.writerow([entry["image"], entry["mask"]])
            write_text_atomic(os.path.join(root, output), buffer.getvalue())
        else:
            images, annotations = [], []
            for number, (case_id, entry) in enumerate(slices, start=1):
                images.append({"id": number, "file_name": entry["image"], "height": entry["height"],
                               "width": entry["width"], "case": case_id, "slice": entry["slice"]})
                for annotation in entry["annotations"]:
                    annotations.append(dict(annotation, id=len(annotations) + 1, image_id=number))
            categories = [{"id": int(v), "name": n} for v, n in sorted(label_names.items())]
            write_json_atomic(os.path.join(root, output),
                              {"images": images, "annotations": annotations, "categories": categories})
