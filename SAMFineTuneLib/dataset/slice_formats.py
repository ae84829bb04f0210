"""The slice formats an export can add beside the MSD layout: slice PNGs indexed by a CSV
(finetune-SAM) or by COCO JSON with RLE masks (finestSAM)."""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Any, Dict, List

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


def ensure_slice_index(root: str, record: Dict[str, Any], axis: str, window: str) -> None:
    """Write a case's slice PNGs and its small JSON index once (a later export reuses them)."""
    from ..imaging import extract_slice, slices_holding
    from ..windows import window_volume
    from ..volume_io import read_volume

    index_path = os.path.join(root, "slices", record["case"] + ".json")
    if os.path.isfile(index_path):
        return
    os.makedirs(os.path.join(root, "slices", "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "slices", "masks"), exist_ok=True)
    image = read_volume(os.path.join(root, record["image"]))
    label = read_volume(os.path.join(root, record["label"])).array
    scaled = (window_volume(image.array, window) * 255.0 + 0.5).astype(np.uint8)
    entries = []
    for index in slices_holding(label, axis):
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


def write_slice_indexes(root: str, records: List[Dict[str, Any]], label_names: Dict[int, str], fmt: str) -> None:
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
