"""What a run leaves on disk while it trains: the best epoch's adapter, and after every epoch
``OUTPUT/resume_state.pt``, everything needed to continue (LoRA and optimiser state, scheduler,
random generators, history), which ``resume=True`` picks up after a crash or a cancel."""
from __future__ import annotations

import json
from typing import Any, Dict, Optional

import torch

from .. import adapters
from ..files import atomic_write
from .config import TrainConfig, check_resume


def state_copy(module) -> Optional[Dict[str, Any]]:
    return None if module is None else {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def save_best(output: str, peft_decoder, prompt_encoder, best: Dict[str, Any], card: Dict[str, Any]) -> None:
    """Write the best epoch's adapter (not the current weights) with the card."""
    current = adapters.lora_state(peft_decoder)
    adapters.load_lora_state(peft_decoder, best["lora"], "best epoch")
    current_prompt = state_copy(prompt_encoder)
    if prompt_encoder is not None and best["prompt"] is not None:
        prompt_encoder.load_state_dict(best["prompt"])
    adapters.save_adapter(output, peft_decoder, card, prompt_encoder)
    adapters.load_lora_state(peft_decoder, current, "current epoch")
    if prompt_encoder is not None:
        prompt_encoder.load_state_dict(current_prompt)


def save_resume(path: str, config: TrainConfig, epoch: int, peft_decoder, prompt_encoder, optimizer, scheduler,
                generator, history, best) -> None:
    state = {"config": json.dumps(config.to_dict()), "epoch": epoch, "lora": adapters.lora_state(peft_decoder),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "history": json.dumps(history),
             "best_epoch": best["epoch"], "best_dice": best["dice"], "best_lora": best["lora"]}
    if prompt_encoder is not None:
        state["prompt"] = state_copy(prompt_encoder)
        if best["prompt"] is not None:
            state["best_prompt"] = best["prompt"]
    atomic_write(path, lambda temp: torch.save(state, temp))


def read_resume(path: str, config: TrainConfig) -> Dict[str, Any]:
    """The state saved at ``path`` (tensors only), or a ValueError if the run's settings changed."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    check_resume(json.loads(saved["config"]), config, path)
    return saved


def best_from(saved: Dict[str, Any]) -> Dict[str, Any]:
    """The best epoch recorded in a resume state."""
    return {"epoch": int(saved["best_epoch"]), "dice": float(saved["best_dice"]), "lora": saved["best_lora"],
            "prompt": saved.get("best_prompt")}
