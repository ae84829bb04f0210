"""What a run leaves on disk while it trains: after every epoch one folder (replaced as a whole,
``folders.replace_folder``) with the kept epoch's adapter, its model card, and
``OUTPUT/resume_state.pt``, everything needed to continue (LoRA and optimiser state, scheduler,
random generators, history, the cases it trains and validates on), which ``resume=True`` picks up
after a crash or a cancel. ``run_start`` checks what a run would start from before any slow work."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

import torch

from .. import adapters
from ..adapter_folders import holds_adapter, replace_folder
from ..files import atomic_write
from .config import RESUME_FILE, TrainConfig, check_resume


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


def resume_state(config: TrainConfig, cases: Dict[str, List[str]], epoch: int, peft_decoder, prompt_encoder,
                 optimizer, scheduler, generator, history, best, recent) -> Dict[str, Any]:
    """Everything a resumed run needs after ``epoch`` (tensors and strings only: weights_only loads),
    ``cases`` the training and validation cases the run resolved ({"train": [...], "val": [...]}),
    ``recent`` the last epochs' weights the final average takes."""
    state = {"config": json.dumps(config.to_dict()), "cases": json.dumps(cases), "epoch": epoch,
             "lora": adapters.lora_state(peft_decoder),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "history": json.dumps(history),
             "best_epoch": best["epoch"], "best_dice": best["dice"], "best_lora": best["lora"], "recent": recent}
    if prompt_encoder is not None:
        state["prompt"] = state_copy(prompt_encoder)
        if best["prompt"] is not None:
            state["best_prompt"] = best["prompt"]
    return state


def run_start(config: TrainConfig, cases: Dict[str, List[str]]) -> Optional[Dict[str, Any]]:
    """The resume state a run continues from (None: it starts at epoch 1), checked before any slow
    work so that a refused run leaves the folder as it was: a ValueError when the state cannot be
    continued (``read_resume``), or when the folder holds an adapter that a new run would replace
    with its first epoch and ``overwrite`` was not asked for."""
    path = os.path.join(config.output, RESUME_FILE)
    if config.resume and os.path.isfile(path):
        return read_resume(path, config, cases)
    if config.overwrite or not holds_adapter(config.output):
        return None
    if config.resume:
        raise ValueError(f"{config.output} holds an adapter but no {RESUME_FILE} to continue its run: give another "
                         "output, or --overwrite to replace it")
    raise ValueError(f"{config.output} already holds an adapter: give another output, --resume to continue its run, "
                     "or --overwrite to replace it")


def read_resume(path: str, config: TrainConfig, cases: Dict[str, List[str]]) -> Dict[str, Any]:
    """The state saved at ``path`` (tensors only), or a ValueError if it does not read back, the
    run's settings changed or it trained and validated on other ``cases`` (its best Dice would be
    another validation set's)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        settings = json.loads(saved["config"])
        recorded = json.loads(saved["cases"]) if "cases" in saved else None
    except Exception as exc:  # a damaged file fails in the zip, pickle or JSON reader, each with its own error
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"cannot resume from {path}: it does not read back ({reason}); start the run again "
                         "without --resume (with --overwrite), or give another output") from None
    check_resume(settings, config, path)
    if recorded != cases:
        raise ValueError(f"cannot resume from {path}: the dataset changed since that run "
                         f"({_cases_change(recorded, cases)}); start a new run (without --resume, with --overwrite) "
                         "or give another output")
    return saved


def _cases_change(recorded: Optional[Dict[str, Any]], cases: Dict[str, List[str]]) -> str:
    """Which case lists differ, with their sizes (the lists themselves may be long)."""
    if not isinstance(recorded, dict):
        return "the state records no case lists"
    return ", ".join(f"{name} cases changed ({len(recorded.get(key) or [])} -> {len(cases[key])})"
                     for key, name in (("train", "training"), ("val", "validation")) if recorded.get(key) != cases[key])


def best_from(saved: Dict[str, Any]) -> Dict[str, Any]:
    """The kept epoch recorded in a resume state."""
    return {"epoch": int(saved["best_epoch"]), "dice": float(saved["best_dice"]), "lora": saved["best_lora"],
            "prompt": saved.get("best_prompt")}
