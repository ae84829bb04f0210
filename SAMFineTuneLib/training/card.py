"""The model card written beside every adapter: base model, data, settings, history, and the
base and adapted scores on every validation case."""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

import torch

from ..adapters import CARD_FORMAT
from ..metrics import paired_cases
from .config import TrainConfig
from .prediction import score_prepared


def model_card(config: TrainConfig, model, dataset: Dict[str, Any], history: List[Dict[str, Any]],
               best: Dict[str, Any], base_dice: float, n_params: int) -> Dict[str, Any]:
    """The card of a run so far; ``dataset`` is its "dataset" section (path, cases, slices, labels)."""
    return {
        "format": CARD_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "base_model": {"name": model.spec.name, "fingerprint": model.fingerprint,
                       "checkpoint": getattr(model, "checkpoint", None) or config.checkpoint,
                       "checkpoint_sha256": model.fingerprint.split(":", 1)[-1]},
        "dataset": dataset,
        "hyperparameters": config.to_dict(),
        "lora": {"rank": config.lora_rank, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
                 "targets": list(config.targets), "trainable_parameters": n_params,
                 "prompt_encoder_trained": config.train_prompt_encoder},
        "inference": {"axis": config.axis, "window": config.window, "multimask": False,
                      "window_margin": config.window_margin, "clicks": config.click_prompts > 0},
        "history": history,
        "base_val_dice": base_dice,
        "best_epoch": best["epoch"],
        "best_val_dice": best["dice"] if best["epoch"] else None,
        "software": {"torch": torch.__version__, "peft": _version("peft"), "monai": _version("monai")},
    }


def kept_text(card: Dict[str, Any]) -> str:
    """What the adapter in a card holds: "epoch N", "the mean of epochs A-B", or the base model."""
    refused = card.get("harm_check")
    if refused:
        why = f"epoch {refused['epoch_refused']} lowered validation case {refused['case']} too far"
        return f"epoch {refused['written']} ({why})" if refused.get("written") else f"the base model ({why})"
    averaged = card.get("averaged") or {}
    if averaged.get("kept"):
        return f"the mean of epochs {averaged['epochs'][0]}-{averaged['epochs'][-1]}"
    return f"epoch {card['best_epoch']}" if card.get("best_epoch") else "the base model (no epoch beat it)"


def _version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def per_case_scores(model, prepared, step, window_margin, base: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Base and adapted (``step``) scores of the validation slices, each prompted with its
    reference box: {"base": means, "adapted": means, "per_case": [{"case", "label", "slices",
    "base": {dice, iou, hd95, nsd}, "adapted": {...}}]}, the rows the panel's table shows. The
    base model's are taken from ``base`` (earlier such scores of the same slices) where given."""
    runs = {"base": _base_run(base) if base else score_prepared(model, prepared, window_margin=window_margin),
            "adapted": score_prepared(model, prepared, step, window_margin=window_margin)}
    return {"base": runs["base"]["mean"], "adapted": runs["adapted"]["mean"], "per_case": paired_cases(runs)}


def _base_run(scores: Dict[str, Any]) -> Dict[str, Any]:
    """The base model's run (as ``score_prepared`` returns it) inside ``per_case_scores``' scores."""
    return {"mean": scores["base"], "cases": [dict(row["base"], case=row["case"], label=row["label"],
                                                   slices=row["slices"]) for row in scores["per_case"]]}
