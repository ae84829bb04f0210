"""The dataset index: ``dataset.json`` read back as cases with their files, labels and splits
(ours, or any MSD/nnU-Net one with a ``training`` list)."""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..catalogue import AXES, SEGMENT_DEFAULTS, SPLITS
from ..files import windows_device_name

DATASET_JSON = "dataset.json"
EMBEDDING_DIR = ".embeddings"
FILE_ENDING = ".nii.gz"
LAYOUT_VERSION = 1
#: A case id a dataset holds: a plain file name on every system (its files and slice index are named
#: after it), never a path (``plain_case_id``).
CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def plain_case_id(case: Any) -> bool:
    """Whether ``case`` can name a case's files on every system: ``CASE_ID``, and no name Windows
    keeps for a device (``files.windows_device_name``: "CON", "nul.1")."""
    return isinstance(case, str) and bool(CASE_ID.match(case)) and not windows_device_name(case)


@dataclass
class CaseEntry:
    case: str
    image: str  # absolute paths
    label: str
    split: str
    group: str
    record: Dict[str, Any] = field(default_factory=dict)

    def slicing_axis(self, axis: Optional[str] = None) -> str:
        """The axis this case is sliced along: ``axis`` when one is asked for, else the one the
        case was segmented along (``slice_axis``, recorded at export), else axial. Training and
        scoring slice a case as it was segmented: on a volume acquired in another plane the
        same anatomical axis lies along another array axis."""
        chosen = axis or self.record.get("slice_axis") or SEGMENT_DEFAULTS["axis"]
        check_slice_axis(self.case, chosen, "; fix its slice_axis in dataset.json or export it again")
        return chosen


def check_slice_axis(case: str, axis: str, remedy: str = "") -> None:
    """A ValueError naming the case when ``axis`` is not one the engine slices along."""
    if axis not in AXES:
        raise ValueError(f"case {case!r}: slicing axis {axis!r} is not one of {', '.join(AXES)}{remedy}")


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
    try:
        with open(index, encoding="utf-8") as handle:
            meta = json.load(handle)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{index} is not valid JSON ({exc}); restore it from a backup or export the dataset "
                         "again") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{index} holds a {type(meta).__name__}, not a dataset description; restore it from a "
                         "backup or export the dataset again")
    try:
        labels = _labels_from_json(meta.get("labels", {}))
        ours = meta.get("samfinetune", {}).get("cases")
        if ours is not None:
            cases = [_our_case(root, record) for record in ours]
        else:
            cases = _foreign_cases(root, meta)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ValueError(f"{index} does not describe a dataset as expected ({type(exc).__name__}: {exc}); restore "
                         "it from a backup or export the dataset again") from None
    for entry in cases:
        for file in (entry.image, entry.label):
            if not os.path.isfile(file):
                raise ValueError(f"dataset {root} lists {file} for case '{entry.case}', but the file is missing")
    return DatasetInfo(root, labels, cases, meta)


def _our_case(root: str, record: Dict[str, Any]) -> CaseEntry:
    """One record of ours; a ValueError for a case id that is not a plain file name or a file
    outside the dataset: an export writes every case's slice index and files after its id, so a
    dataset.json from elsewhere must not make it write (or training read) outside the folder."""
    case = record["case"]
    if not plain_case_id(case):
        raise ValueError(f"case id {case!r} is not a plain file name")
    image, label = (_inside(root, record[key], case) for key in ("image", "label"))
    return CaseEntry(case, image, label, record["split"], record.get("group", case), record)


def _inside(root: str, relative: Any, case: str) -> str:
    path = os.path.normpath(os.path.join(root, relative if isinstance(relative, str) else ""))
    if not isinstance(relative, str) or os.path.isabs(relative) or os.path.commonpath([root, path]) != root:
        raise ValueError(f"case {case!r} names the file {relative!r}, which lies outside the dataset")
    return path


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
