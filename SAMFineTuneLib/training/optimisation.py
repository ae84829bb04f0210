"""The loss and the learning-rate schedule of a fine-tuning run."""
from __future__ import annotations

import math
from typing import Callable

import torch

from .config import TrainConfig


def loss_function(config: TrainConfig):
    """monai's DiceCE or DiceFocal on the mask logits."""
    from monai.losses import DiceCELoss, DiceFocalLoss

    if config.loss == "dicece":
        return DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")
    return DiceFocalLoss(sigmoid=True, squared_pred=True, reduction="mean")


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
