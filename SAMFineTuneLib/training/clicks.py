"""Training an adapter to answer clicks, as a user corrects a slice (``refinement.refine_slice``).

SAM learned clicks by simulating a user during training: decode, click where the result is
most wrong, decode again with the click and the previous logits as the mask prompt, and learn
from the last decode. The MedSAM family was trained on boxes alone, so its point embeddings
mean nothing on medical images; an adapter trained this way gives them a meaning. Each click is
``refinement.simulated_click`` (the deepest point of the largest error region: positive where
the structure was missed, negative where the mask leaked), taken on the low-res frame the loss
is computed in; the box of the last decode is the sampled one edited by the clicks
(``refinement.edited_box``), which is what ``refine_slice`` gives a model whose adapter learned
clicks, so training and inference ask the same question.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch

from ..refinement import Point, click_to_model, edited_box, simulated_click
from .samples import LOW_RES

#: Most clicks simulated on one training slice (SAM's recipe: a few rounds of one click each).
MAX_CLICKS = 3


def next_clicks(logits: torch.Tensor, targets: torch.Tensor, clicks: List[List[Point]]) -> List[List[Point]]:
    """Each sample's clicks so far plus the next one on its low-res logits [B,1,256,256] against its
    target [B,1,256,256] (low-res pixels); an exact mask gets no new click."""
    predicted = (logits[:, 0] > 0).cpu().numpy()
    wanted = (targets[:, 0] > 0.5).cpu().numpy()
    out = []
    for mask, target, earlier in zip(predicted, wanted, clicks):
        click = simulated_click(mask, target)
        out.append(earlier + ([click] if click is not None else []))
    return out


def clicked_boxes(logits: torch.Tensor, boxes: torch.Tensor, clicks: List[List[Point]],
                  input_size: int) -> torch.Tensor:
    """The sampled boxes [B,4] (model-input pixels) edited by each sample's clicks, as
    ``refinement`` edits the box around the mask being corrected."""
    scale = input_size / LOW_RES
    predicted = (logits[:, 0] > 0).cpu().numpy()
    out = boxes.clone()
    for n, (mask, box, points) in enumerate(zip(predicted, boxes.tolist(), clicks)):
        x0, y0, x1, y1 = (int(round(v / scale)) for v in box)
        low_box = (x0, y0, max(x0, x1 - 1), max(y0, y1 - 1))  # model-input edges -> inclusive pixels
        edited: Optional[Tuple[int, int, int, int]] = edited_box(mask, points, mask.shape, lambda _: low_box)
        if edited is not None:
            x0, y0, x1, y1 = edited
            out[n] = torch.tensor([x0 * scale, y0 * scale, (x1 + 1) * scale, (y1 + 1) * scale])
    return out


def as_points(clicks: List[List[Point]], input_size: int, device) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """Clicks in low-res pixels -> SAM's (coordinates [B,K,2] in model-input pixels, labels [B,K]);
    samples with fewer clicks are padded with SAM's "no point" label -1. None without any click."""
    most = max((len(c) for c in clicks), default=0)
    if most == 0:
        return None
    scale = input_size / LOW_RES
    coords = np.zeros((len(clicks), most, 2), np.float32)
    labels = np.full((len(clicks), most), -1, np.int64)
    for n, points in enumerate(clicks):
        for k, (x, y, positive) in enumerate(points):
            coords[n, k] = click_to_model(x, y, scale, scale)
            labels[n, k] = int(positive)
    return torch.from_numpy(coords).to(device), torch.from_numpy(labels).to(device)


def simulated_user(runner, embeddings: torch.Tensor, boxes: torch.Tensor, target: torch.Tensor, generator,
                   input_size: int, window_margin, amp_dtype, use_amp: bool):
    """A simulated user's clicks on a training batch: 1 to ``MAX_CLICKS`` rounds, each decoded by
    ``runner`` (the trainer's decoder step) without gradients from the last; the prompts (box,
    points, mask prompt) of the decode that trains."""
    rounds = int(torch.randint(1, MAX_CLICKS + 1, (1,), generator=generator))
    made: List[List[Point]] = [[] for _ in range(len(boxes))]
    points, prompt_boxes, logits = None, boxes, None
    with torch.no_grad(), torch.autocast("cuda", dtype=amp_dtype, enabled=use_amp):
        for _ in range(rounds):
            logits = runner(embeddings, prompt_boxes, points, window_margin=window_margin, masks=logits)[0].float()
            made = next_clicks(logits, target, made)
            prompt_boxes = clicked_boxes(logits, boxes, made, input_size).to(boxes.device)
            points = as_points(made, input_size, boxes.device)
    return prompt_boxes, points, logits
