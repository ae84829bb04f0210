"""Cases, structures and an on-disk embedding cache for ``bench_accuracy3d.py``.

Cases come from folders in the shared-data layout (``images/``, ``masks/``, ``labels.json``) and
from the synthetic CT (``SAMFineTuneLib.phantom``). A structure is one label, or several labels
merged under one name (the hippocampus' head and body+tail, scored as one hippocampus).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from SAMFineTuneLib.cache import EmbeddingCache
from SAMFineTuneLib.windows import looks_like_ct
from SAMFineTuneLib.phantom import make_ct_phantom
from SAMFineTuneLib.volume_io import Volume, read_volume

#: Structure classes by words in a label's name, first match wins (TotalSegmentator's names).
CLASSES = (
    ("vessel", ("aorta", "vena_cava", "vein", "artery")),
    ("bowel", ("bowel", "duodenum", "colon", "esophagus")),
    ("spine", ("vertebra", "intervertebral", "spinal_cord", "sacrum")),
    ("rib", ("rib", "costal")),
    ("muscle", ("autochthon", "iliopsoas", "gluteus")),
    ("organ", ("spleen", "kidney", "liver", "gallbladder", "stomach", "pancreas", "adrenal", "lung", "bladder",
               "prostate", "thyroid", "heart")),
    ("brain", ("hippocampus",)),
    ("tumour", ("tumour", "tumor")),
    ("synthetic", ("phantom",)),
)


def structure_class(name: str) -> str:
    lowered = name.lower()
    for title, words in CLASSES:
        if any(word in lowered for word in words):
            return title
    return "other"


@dataclass
class Structure:
    name: str
    values: tuple  # label values merged into it
    klass: str
    window: str = "auto"  # what a user would pick: the lung window for a lung on CT


@dataclass
class Case:
    set_name: str
    case_id: str
    image: Volume
    label: Volume
    structures: List[Structure]

    def reference(self, structure: Structure) -> np.ndarray:
        return np.isin(self.label.array, structure.values).astype(np.uint8)


def _label_names(dataset: str, case_id: str) -> Dict[int, str]:
    """{value: name} of one case: labels.json is {value: name} or {case description: {value: name}}."""
    path = os.path.join(dataset, "labels.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as handle:
        raw = json.load(handle)
    tables = [table for key, table in raw.items() if isinstance(table, dict) and key.split(" ")[0] == case_id]
    table = tables[0] if tables else raw
    return {int(k): str(v) for k, v in table.items() if str(k).isdigit() and int(k) > 0}


def _structures(label: np.ndarray, names: Dict[int, str], merge: Sequence[str], parts: bool,
                min_voxels: int) -> List[Structure]:
    values, counts = np.unique(label[label > 0], return_counts=True)
    present = {int(v): int(c) for v, c in zip(values, counts)}
    structures: List[Structure] = []
    merged = set()
    for prefix in merge:
        members = tuple(v for v in sorted(present) if names.get(v, "").lower().startswith(prefix.lower()))
        if len(members) > 1:
            structures.append(Structure(prefix, members, structure_class(prefix)))
            merged.update(members)
    for value in sorted(present, key=lambda v: -present[v]):
        if value in merged and not parts:
            continue
        name = names.get(value, f"label {value}").split(" (")[0]
        structures.append(Structure(name, (value,), structure_class(name)))
    return [s for s in structures if sum(present[v] for v in s.values) >= min_voxels]


def _spread(items: list, count: Optional[int]) -> list:
    """At most ``count`` items spread evenly over the list (first, last and between)."""
    if count is None or len(items) <= count:
        return items
    return [items[int(round(p))] for p in np.linspace(0, len(items) - 1, count)]


def dataset_cases(dataset: str, merge: Sequence[str], parts: bool, min_voxels: int,
                  max_cases: Optional[int], max_structures: Optional[int]) -> Iterator[Case]:
    """The 3D cases of a shared-data folder; the set is named by the folder and the modality."""
    names = sorted(n for n in os.listdir(os.path.join(dataset, "images"))
                   if n.endswith((".nii.gz", ".nii", ".nrrd", ".mha")))
    folder = os.path.basename(os.path.normpath(dataset))
    for name in _spread(names, max_cases):
        case_id = name.split(".")[0]
        image = read_volume(os.path.join(dataset, "images", name))
        label = read_volume(os.path.join(dataset, "masks", name))
        label = label.with_array(np.rint(label.array).astype(np.int32))
        structures = _structures(label.array, _label_names(dataset, case_id), merge, parts, min_voxels)
        ct = looks_like_ct(image.array)
        set_name = f"{folder} {'CT' if ct else 'MR'}"
        for structure in structures:
            structure.window = "lung" if ct and "lung" in structure.name else "auto"
        yield Case(set_name, case_id, image, label, _spread(structures, max_structures))


def phantom_cases() -> Iterator[Case]:
    """The synthetic CT as the tests build it, and as the demo does (finer pixels, another seed)."""
    organ = [Structure("phantom organ", (1,), "synthetic")]
    for case_id, kwargs in (("phantom", {}),
                            ("phantom_demo", dict(shape_kji=(32, 128, 128), spacing_xyz=(1.2, 1.2, 3.0), seed=7))):
        image, label = make_ct_phantom(**kwargs)
        yield Case("synthetic CT", case_id, image, label, organ)


class DiskEmbeddingCache(EmbeddingCache):
    """The engine's in-memory LRU in front of a folder of embeddings, keyed by the engine's own
    cache key (model fingerprint, slice or crop content, resize, window) and the encoder's
    backend and precision, so reruns of an experiment skip the encoder. Float32 as encoded: a
    rounded embedding would move tracked results."""

    def __init__(self, folder: str, tag: str, max_bytes: int = 2 << 30):
        super().__init__(max_bytes)
        self.folder = folder
        self.tag = tag
        self.disk_hits = 0
        os.makedirs(folder, exist_ok=True)

    def _path(self, key) -> str:
        digest = hashlib.sha1((self.tag + repr(key)).encode()).hexdigest()
        return os.path.join(self.folder, digest[:2], digest + ".pt")

    def get(self, key):
        value = super().get(key)
        if value is not None:
            return value
        path = self._path(key)
        if not os.path.isfile(path):
            return None
        value = torch.load(path, weights_only=True)
        self.disk_hits += 1
        super().put(key, value)
        return value

    def put(self, key, value) -> None:
        super().put(key, value)
        path = self._path(key)
        if os.path.isfile(path):
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handle, scratch = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        os.close(handle)
        torch.save(value.detach().cpu().clone(), scratch)
        os.replace(scratch, path)
