"""The model card written beside every adapter: base model, data, settings, history, scores."""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

import torch

from ..adapters import CARD_FORMAT
from .config import TrainConfig


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
                      "window_margin": config.window_margin},
        "history": history,
        "base_val_dice": base_dice,
        "best_epoch": best["epoch"],
        "best_val_dice": best["dice"] if best["epoch"] else None,
        "software": {"torch": torch.__version__, "peft": _version("peft"), "monai": _version("monai")},
    }


def _version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None
