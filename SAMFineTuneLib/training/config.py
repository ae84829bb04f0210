"""What a fine-tuning run takes (``TrainConfig``), its checks, and which settings a resumed run
must share with the run it continues."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

from ..adapters import DEFAULT_TARGETS
from ..catalogue import DEFAULT_MODEL, ENGINE_DEFAULTS, LOSSES, SEGMENT_DEFAULTS, TRAINING_DEFAULTS

RESUME_FILE = "resume_state.pt"
#: Settings about the output folder, not the adapter (left out of ``TrainConfig.to_dict``).
RUN_CONTROL = ("resume", "overwrite")
# Settings that must not change between a run and its resumption.
RESUME_KEYS = ("dataset", "model", "checkpoint", "lr", "weight_decay", "batch_size", "lora_rank", "lora_alpha",
               "lora_dropout", "targets", "train_prompt_encoder", "loss", "iou_loss_weight", "box_jitter",
               "point_prompts", "click_prompts", "tracked_prompts", "roi_prompts", "roi_margin", "end_slices",
               "seed", "axis", "window", "labels", "train_cases", "val_cases", "epochs", "min_epoch_steps",
               "select_best", "keep_within", "average_last", "window_margin")


@dataclass
class TrainConfig:
    dataset: str
    output: str
    model: str = DEFAULT_MODEL
    checkpoint: Optional[str] = None
    device: str = SEGMENT_DEFAULTS["device"]
    precision: str = ENGINE_DEFAULTS["precision"]  # the image encoder's, for the embedding step
    backend: str = ENGINE_DEFAULTS["backend"]  # who runs the image encoder (auto: OpenVINO on a CPU)
    epochs: int = TRAINING_DEFAULTS["epochs"]
    # An epoch is every training slice once, or this many steps when that is more (the slices
    # again in a new order): a few cases get as many steps as ten would.
    min_epoch_steps: int = TRAINING_DEFAULTS["min_epoch_steps"]
    lr: float = TRAINING_DEFAULTS["lr"]
    weight_decay: float = 0.01
    batch_size: int = 8
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = TRAINING_DEFAULTS["lora_dropout"]
    targets: Tuple[str, ...] = DEFAULT_TARGETS
    train_prompt_encoder: bool = False
    loss: str = LOSSES[0]
    iou_loss_weight: float = 0.0  # > 0 also trains the IoU head (MSE to the real IoU)
    box_jitter: float = 0.1  # each box edge moves by U(-j/4, j) x the box side (outward positive)
    point_prompts: float = 0.0  # probability of adding one positive point inside the mask
    # Share of steps on which a simulated user clicks where the decode is wrong and the adapter
    # learns from the corrected decode (training/clicks.py); an adapter trained so answers
    # clicks itself in refine (its card says so), also on box-trained models.
    click_prompts: float = 0.0
    # The prompts inference asks with (training/prompts.py): shares of the slices holding the
    # structure prompted with tracking's box (a neighbour's mask box + the tracking margin) and
    # with the structure's ROI rectangle grown by U(0, roi_margin) x its side per edge; the rest
    # get jittered reference boxes. end_slices: slices past each end trained to come back empty.
    tracked_prompts: float = TRAINING_DEFAULTS["tracked_prompts"]
    roi_prompts: float = TRAINING_DEFAULTS["roi_prompts"]
    roi_margin: float = 0.2
    end_slices: int = TRAINING_DEFAULTS["end_slices"]
    warmup: float = 0.1  # share of all steps with linear warmup
    patience: int = 5  # epochs without a better validation Dice before stopping (0 = never stop early)
    # Keep the latest epoch whose validation Dice is within keep_within of the best so far and
    # beats the base model's (epoch 0; training/optimisation.keeps_epoch), and at the end the last
    # epoch over it unless it tracks the validation cases better by more than keep_within
    # (training/epoch_choice.py); False: the last epoch (or the mean of the last ``average_last``).
    select_best: bool = True
    keep_within: float = TRAINING_DEFAULTS["keep_within"]
    # The adapter kept is written only if no validation case's Dice falls more than this below the
    # base model's; else the other epoch the tracking choice weighed, if it passes, or the base
    # model is (training/harm_check.py; with ``select_best`` and ``final_scores``).
    max_case_drop: float = TRAINING_DEFAULTS["max_case_drop"]
    # The mean LoRA weights of the last ``average_last`` epochs run, judged by the same rule as one
    # more epoch after the last (1: no average). On hippocampus (docs/finetuning.md) the mean of
    # the last three lifted the weakest training's one-ROI Dice and lowered the best ones': opt-in.
    average_last: int = TRAINING_DEFAULTS["average_last"]
    min_delta: float = 1e-4
    seed: int = 0
    amp: bool = True  # bf16/fp16 autocast, CUDA only
    resume: bool = False
    # A run that does not resume refuses an output folder that already holds an adapter (a user's
    # finished one would be replaced by the first epoch's) unless told to replace it.
    overwrite: bool = False
    # None: each case along the axis it was segmented along (``CaseEntry.slicing_axis``), else axial.
    axis: Optional[str] = None
    window: str = SEGMENT_DEFAULTS["window"]
    labels: Optional[List[int]] = None  # label values to train on; None = all
    train_cases: Optional[List[str]] = None  # None = the dataset's train split
    val_cases: Optional[List[str]] = None  # None = the dataset's val split
    log_every: int = 10  # progress event every N steps
    final_scores: bool = True  # score base vs adapted (Dice, IoU, HD95, NSD) on the val cases at the end
    # At the end, choose the tracking margin the adapter is used with on the val cases, from one
    # ROI (training/tracking_choice.py); the card then carries it to the Segmenter.
    choose_tracking: bool = True
    # Decode only the image tokens within this many tokens of each (jittered) box, as the Segmenter
    # does at inference: "auto" = its default on the model's device (4 on a CPU, the whole slice on
    # CUDA), None = the whole slice, or a whole number >= 0 (see decoding.resolve_window_margin).
    window_margin: Union[int, None, str] = ENGINE_DEFAULTS["window_margin"]

    def to_dict(self) -> Dict[str, Any]:
        """How the run trains (its model card's hyperparameters): without ``resume`` and
        ``overwrite``, which say what a run may do with its folder."""
        out = {key: value for key, value in dataclasses.asdict(self).items() if key not in RUN_CONTROL}
        out["targets"] = list(self.targets)
        return out


def check_config(config: TrainConfig) -> None:
    """A ValueError naming the first bad setting, before anything loads."""
    if config.loss not in LOSSES:
        raise ValueError(f"unknown loss '{config.loss}'; choose one of: {', '.join(LOSSES)}")
    if str(config.window).strip().lower() == "roi":
        raise ValueError("window 'roi' follows each ROI, and training windows whole volumes: train with 'auto' or "
                         "'percentile' (the adapter then segments with the volume's percentiles)")
    for name in ("epochs", "batch_size", "lora_rank", "average_last"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    for name in ("lr", "lora_alpha"):
        if not 0 < getattr(config, name) < math.inf:
            raise ValueError(f"{name} must be a number > 0, got {getattr(config, name)}")
    for name in ("weight_decay", "box_jitter", "iou_loss_weight", "patience"):
        if not 0 <= getattr(config, name) < math.inf:
            raise ValueError(f"{name} must be a number >= 0, got {getattr(config, name)}")
    if not 0.0 <= config.lora_dropout < 1.0:
        raise ValueError(f"lora_dropout is a probability in [0, 1), got {config.lora_dropout}")
    for name in ("warmup", "point_prompts", "click_prompts", "tracked_prompts", "roi_prompts"):
        if not 0.0 <= getattr(config, name) <= 1.0:
            raise ValueError(f"{name} is a share in [0, 1], got {getattr(config, name)}")
    if config.tracked_prompts + config.roi_prompts > 1.0:
        raise ValueError(f"tracked_prompts + roi_prompts must be <= 1 (the rest are reference boxes), got "
                         f"{config.tracked_prompts} + {config.roi_prompts}")
    if config.keep_within < 0:
        raise ValueError(f"keep_within must be >= 0, got {config.keep_within}")
    if config.max_case_drop < 0:
        raise ValueError(f"max_case_drop must be >= 0, got {config.max_case_drop}")
    if config.min_epoch_steps < 0:
        raise ValueError(f"min_epoch_steps must be >= 0, got {config.min_epoch_steps}")
    if config.roi_margin < 0 or config.end_slices < 0:
        raise ValueError(f"roi_margin and end_slices must be >= 0, got {config.roi_margin} and {config.end_slices}")
    from ..decoding import check_window_margin

    check_window_margin(config.window_margin)


def check_resume(saved: Dict[str, Any], config: TrainConfig, path: str) -> None:
    """A ValueError listing the settings that differ from the run saved at ``path``."""
    now = config.to_dict()
    changed = [k for k in RESUME_KEYS if k != "epochs" and saved.get(k) != now.get(k)]
    if changed:
        raise ValueError(f"cannot resume from {path}: settings changed since it was written: " +
                         ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in changed) +
                         "; give the saved values again, or start a new run (without --resume, with --overwrite)")
