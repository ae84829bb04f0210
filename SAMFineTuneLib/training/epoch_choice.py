"""Which epoch's adapter a run keeps in the end: of the epoch the validation Dice kept and the last
epoch, the one that tracks the validation cases better from one ROI.

After each epoch the trainer keeps the latest one within ``keep_within`` of the best validation
Dice with the reference's box on every slice (``optimisation.keeps_epoch``), a quick measure that
says little about tracking: on a few training cases that Dice can peak at an early epoch whose
adapter tracks far worse than the converged last one. Inference starts from one ROI, and the
tracking choice (``tracking_choice.choose_tracking``) segments the validation cases from one ROI
anyway, so when the last epoch is another one and also beats the base model, it is run for both,
and the later is kept unless the earlier tracks better by more than ``keep_within``, the same
tolerance the validation Dice is weighed with (docs/finetuning.md, "Which epoch is kept").
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .config import TrainConfig


def candidates(history: Sequence[Dict[str, Any]], kept: Dict[str, Any], last_weights: Dict[str, Any],
               base_dice: float, config: TrainConfig) -> List[Dict[str, Any]]:
    """The adapters weighed: ``kept`` (weights with "epoch" and "dice"), and the last epoch run
    (``last_weights``, its validation Dice from ``history``) when it is not the one kept and beats
    the base model as ``keeps_epoch`` asks."""
    if not history or history[-1]["epoch"] == kept["epoch"] or not config.select_best:
        return [kept]
    last = history[-1]
    if last["val_dice"] <= base_dice + config.min_delta:
        return [kept]
    return [kept, dict(last_weights, epoch=last["epoch"], dice=last["val_dice"])]


def tracked_dice(choice: Optional[Dict[str, Any]]) -> Optional[float]:
    """The mean 3D Dice from one ROI at the margin a tracking choice chose; None without a choice."""
    return None if choice is None else float(choice["dice"][str(choice["min_margin_px"])])


def better_tracker(choices: Sequence[Optional[Dict[str, Any]]], within: float) -> int:
    """The index of the latest choice (they come in the order of their epochs) whose tracked
    validation Dice lies within ``within`` of the best, as ``keeps_epoch`` weighs the validation
    Dice: the first when any has nothing to track (2D images)."""
    scores = [tracked_dice(choice) for choice in choices]
    if any(score is None for score in scores):
        return 0
    return max(n for n, score in enumerate(scores) if score >= max(scores) - within)


def weigh(weighed: Sequence[Dict[str, Any]], track: Callable[[Dict[str, Any]], Optional[Dict[str, Any]]],
          within: float) -> Tuple[int, List[Optional[Dict[str, Any]]]]:
    """The index of the adapter kept among ``weighed`` and the tracking choices (``track`` of each
    one's weights) it was judged by. Where the first has none (2D images: nothing to track), no
    other would have one, so they are not run."""
    choices = [track(weighed[0])]
    if choices[0] is not None:
        choices += [track(weights) for weights in weighed[1:]]
    return better_tracker(choices, within), choices


def record(weighed: Sequence[Dict[str, Any]], choices: Sequence[Optional[Dict[str, Any]]], pick: int) -> Dict[str, Any]:
    """The card's record of the choice: the epochs weighed with their tracked validation Dice, and the one kept."""
    return {"tracked_dice": {str(w["epoch"]): tracked_dice(c) for w, c in zip(weighed, choices)},
            "by_validation_dice": weighed[0]["epoch"], "kept": weighed[pick]["epoch"]}


def record_text(entry: Dict[str, Any]) -> str:
    """The training log's line for ``record``'s entry."""
    scores = ", ".join(f"epoch {epoch} {dice:.3f}" for epoch, dice in entry["tracked_dice"].items())
    return f"epoch {entry['kept']} kept: it tracks the validation cases better from one ROI (3D Dice {scores})"
