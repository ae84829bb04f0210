"""What a run leaves on disk while it trains: after every epoch one folder (replaced as a whole,
``folders.replace_folder``) with the kept epoch's adapter, its model card, and
``OUTPUT/resume_state.pt``, everything needed to continue (LoRA and optimiser state, scheduler,
random generators, history), which ``resume=True`` picks up after a crash or a cancel."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

import torch

from .. import adapters
from ..files import atomic_write
from .config import RESUME_FILE, TrainConfig, check_resume
from .folders import replace_folder


def state_copy(module) -> Optional[Dict[str, Any]]:
    return None if module is None else {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def mean_state(states: List[Optional[Dict[str, torch.Tensor]]]) -> Optional[Dict[str, torch.Tensor]]:
    """The element-wise mean of same-shaped state dicts (None when there are none)."""
    if not states or states[0] is None:
        return None
    return {k: torch.stack([s[k] for s in states]).mean(0) if states[0][k].is_floating_point() else states[-1][k]
            for k in states[0]}


def load_weights(peft_decoder, prompt_encoder, weights: Dict[str, Any], source: str) -> None:
    """Put ``weights`` ({"lora", "prompt"}: a kept epoch, an average, a copy of the current ones)
    into the LoRA decoder and, when one trains and the weights hold it, the prompt encoder."""
    adapters.load_lora_state(peft_decoder, weights["lora"], source)
    if prompt_encoder is not None and weights["prompt"] is not None:
        prompt_encoder.load_state_dict(weights["prompt"])


def write_output(output: str, lock, peft_decoder, prompt_encoder, best: Dict[str, Any], card: Dict[str, Any],
                 resume: Optional[Dict[str, Any]]) -> None:
    """Replace the output folder with the kept epoch's adapter (not the current weights), the card
    and the resume state: a reader sees the previous epoch's folder or this one, whole."""
    current = {"lora": adapters.lora_state(peft_decoder), "prompt": state_copy(prompt_encoder)}

    def fill(folder: str) -> None:
        if resume is not None:
            atomic_write(os.path.join(folder, RESUME_FILE), lambda temp: torch.save(resume, temp))
        adapters.save_adapter(folder, peft_decoder, card, prompt_encoder)  # the card last: the folder is complete

    load_weights(peft_decoder, prompt_encoder, best, "kept epoch")
    try:
        replace_folder(output, fill, lock)
    finally:
        load_weights(peft_decoder, prompt_encoder, current, "current epoch")


def resume_state(config: TrainConfig, epoch: int, peft_decoder, prompt_encoder, optimizer, scheduler, generator,
                 history, best, recent) -> Dict[str, Any]:
    """Everything a resumed run needs after ``epoch`` (tensors and strings only: weights_only loads),
    ``recent`` the last epochs' weights the final average takes."""
    state = {"config": json.dumps(config.to_dict()), "epoch": epoch, "lora": adapters.lora_state(peft_decoder),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "history": json.dumps(history),
             "best_epoch": best["epoch"], "best_dice": best["dice"], "best_lora": best["lora"], "recent": recent}
    if prompt_encoder is not None:
        state["prompt"] = state_copy(prompt_encoder)
        if best["prompt"] is not None:
            state["best_prompt"] = best["prompt"]
    return state


def read_resume(path: str, config: TrainConfig) -> Dict[str, Any]:
    """The state saved at ``path`` (tensors only), or a ValueError if the run's settings changed."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    check_resume(json.loads(saved["config"]), config, path)
    return saved


def best_from(saved: Dict[str, Any]) -> Dict[str, Any]:
    """The kept epoch recorded in a resume state."""
    return {"epoch": int(saved["best_epoch"]), "dice": float(saved["best_dice"]), "lora": saved["best_lora"],
            "prompt": saved.get("best_prompt")}
