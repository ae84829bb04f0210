"""The last check before an adapter is written: it must not make a validation case much worse.

Epochs are kept by the mean validation Dice, and on a few validation cases one large gain can
outweigh real harm to another: on BUSI (2D ultrasound, 5 training and 5 validation images) an
adapter raised the validation mean from 0.899 to 0.913 on the strength of one image (+0.18) while
lowering another by 0.09, and scored 0.046 below the base model on 10 test images
(docs/finetuning.md, "BUSI and prostate"). So an adapter whose worst validation case falls more
than ``max_case_drop`` below the base model is not written. The other epoch the tracking choice
weighed is, when it passes (a hippocampus training on one case kept its last epoch as the better
tracker, which lowered a validation case by 0.067, where the epoch the validation Dice had kept
tracked nearly as well); otherwise the base model, as when no epoch beats it.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence


def worst_case(per_case: Sequence[Dict[str, Any]], max_drop: float) -> Optional[Dict[str, Any]]:
    """The row of ``card.per_case_scores`` whose adapted Dice falls furthest below the base
    model's, when it falls by more than ``max_drop``; None otherwise."""
    drops = [(row["base"]["dice"] - row["adapted"]["dice"], row) for row in per_case
             if _finite(row["base"]["dice"]) and _finite(row["adapted"]["dice"])]
    if not drops:
        return None
    drop, row = max(drops, key=lambda pair: pair[0])
    return row if drop > max_drop else None


def _finite(value) -> bool:
    return value is not None and math.isfinite(float(value))


def record(row: Dict[str, Any], epoch: int, max_drop: float) -> Dict[str, Any]:
    """The card's record of a refused adapter."""
    return {"epoch_refused": epoch, "case": row["case"], "label": row["label"], "base_dice": float(row["base"]["dice"]),
            "adapted_dice": float(row["adapted"]["dice"]), "max_case_drop": max_drop}


def record_text(entry: Dict[str, Any]) -> str:
    """The training log's warning for ``record``'s entry ("written": the epoch written instead)."""
    written = (f"epoch {entry['written']}'s adapter, which does not, is written instead" if entry.get("written")
               else "the adapter written leaves the base model as it is; train on more cases")
    return (f"warning: epoch {entry['epoch_refused']}'s adapter lowers validation case {entry['case']} from Dice "
            f"{entry['base_dice']:.3f} to {entry['adapted_dice']:.3f}, more than {entry['max_case_drop']} below the "
            f"base model: {written}")
