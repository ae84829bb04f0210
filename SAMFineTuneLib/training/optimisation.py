"""The loss, the learning-rate schedule and the choice of the epoch kept, of a fine-tuning run."""
from __future__ import annotations

import math
from typing import Callable, Sequence, Tuple

import torch

from .config import TrainConfig


def loss_function(config: TrainConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """monai's DiceCE or DiceFocal on the mask logits [B,1,H,W], with the Dice term averaged over
    the samples whose target holds the structure.

    A slice past the structure's end has an empty target, whose Dice is 0/0: monai smooths it
    into a loss near 1 whatever the prediction, with no gradient to speak of, so it would only
    scale the batch's Dice down. Those samples learn from the per-pixel term (BCE or focal) alone;
    a batch without them gets exactly monai's DiceCELoss / DiceFocalLoss (reduction "mean")."""
    from monai.losses import DiceLoss, FocalLoss

    dice = DiceLoss(sigmoid=True, squared_pred=True, reduction="none")
    pixel = torch.nn.BCEWithLogitsLoss() if config.loss == "dicece" else FocalLoss(use_softmax=False)

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        filled = target.flatten(1).any(dim=1)
        per_sample = dice(logits, target).flatten()
        dice_term = per_sample[filled].mean() if bool(filled.any()) else per_sample.sum() * 0.0
        return dice_term + pixel(logits, target)

    return loss


def iou_head_loss(logits: torch.Tensor, iou: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE of the decoder's predicted IoU to the real IoU of its thresholded mask."""
    with torch.no_grad():
        hard = (logits > 0).float()
        inter = (hard * target).flatten(1).sum(1)
        union = ((hard + target) > 0).float().flatten(1).sum(1)
        real_iou = inter / union.clamp(min=1.0)
    return torch.nn.functional.mse_loss(iou, real_iou)


def lr_schedule(total_steps: int, warmup_share: float) -> Callable[[int], float]:
    """Linear warmup over ``warmup_share`` of the steps, then cosine decay to 5%."""
    warmup = max(1, int(round(warmup_share * total_steps))) if warmup_share > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def keeps_epoch(val_dice: float, earlier: Sequence[float], base_dice: float, config: TrainConfig) -> Tuple[bool, bool]:
    """(keep this epoch's adapter, it set a new best) for an epoch's validation Dice after the
    ``earlier`` epochs'. The learning rate decays to nearly nothing by the last epoch, and a
    converged adapter tracks from one ROI better than an earlier one whose reference-box Dice on a
    few validation cases is a little higher (docs/finetuning.md, "Which epoch is kept"): so the
    latest epoch within ``keep_within`` of the best so far is kept, provided it beats the base
    model (epoch 0), which keeps a run on data SAM already segments well harmless."""
    if not config.select_best:
        return True, True
    best = max([base_dice, *earlier])
    improved = val_dice > best + config.min_delta
    beats_base = val_dice > base_dice + config.min_delta
    return beats_base and val_dice >= max(best, val_dice) - config.keep_within, improved


def epochs_since_best(history: Sequence[dict], base_dice: float, config: TrainConfig) -> int:
    """How many epochs of ``history`` came after the last new best (early stopping's count, as
    ``keeps_epoch`` counts it)."""
    if not config.select_best:
        return 0
    since = 0
    for n, entry in enumerate(history):
        since = 0 if keeps_epoch(entry["val_dice"], [h["val_dice"] for h in history[:n]], base_dice, config)[1] \
            else since + 1
    return since
