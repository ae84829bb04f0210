"""Which side of the split each new case goes to: by group (patient), never by slice."""
from __future__ import annotations

import random
from typing import Dict, List, Optional, Tuple

from ..catalogue import SPLITS
from .index import CaseEntry


def assign_splits(new: List[Tuple[str, str]], existing: List[CaseEntry], val_fraction: float, seed: int,
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
