"""The decoder step that training and evaluation share: prompt encoder and mask decoder on
cached embeddings, decoding windowed as the Segmenter does at inference."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..models import paste_windows, predict_masks_batched, token_windows


class DecoderStep(nn.Module):
    """An nn.Module holding only what trains (for DDP), decoding through the model's path.

    ``decoder`` is the mask decoder to run (the model's, or a LoRA-wrapped copy) and
    ``prompt_encoder`` a trained prompt encoder, or None for the model's own.
    ``forward(embeddings, boxes, points=None, window_margin=None, masks=None)`` returns low-res
    logits [B,1,256,256] and the predicted IoU [B]; ``masks`` are earlier low-res logits given as
    SAM's mask prompt (a click corrects them, ``clicks``). With ``window_margin`` each sample
    decodes only the image tokens within that many tokens of its own box (``models.token_windows``
    of that box alone, as the Segmenter decodes a lone slice; samples whose windows have the same
    size share one decoder batch), also when points are given: the window follows the box, and a training
    point lies inside the target, hence inside the window. Sizing every window of a batch to its
    largest box, as one ``SamModel.decode`` call does, would decode about twice the tokens on
    mixed training batches (BUSI, batches of 4: 44% of the grid vs 22%).

    Outside its window a mask holds the constant ``models.OUTSIDE_WINDOW_LOGIT``, which carries
    no gradient: the loss still sees the whole 256x256 frame, which is right as long as the
    window holds the whole target (the outside is then background in both). It does unless an
    edge of the prompt box cuts into the target by more than ``window_margin`` tokens: box
    jitter moves an edge inwards by at most ``box_jitter``/4 x the box side (default 0.1: 2.5%,
    at most 6.4 px of the 256 px low-res frame), well inside the default 4-token margin (16 px
    at 256; test_finetune checks it on the phantom). A much larger jitter, or margin 0, can
    leave target pixels outside the window: they count as misses that no gradient can fix.
    """

    def __init__(self, model, decoder: nn.Module, prompt_encoder: Optional[nn.Module] = None):
        super().__init__()
        self.decoder = decoder
        self.prompt_encoder = prompt_encoder
        self._model = [model]  # a list: not registered, so the frozen encoder is not a DDP parameter

    def forward(self, embeddings: torch.Tensor, boxes: torch.Tensor, points=None,
                window_margin: Optional[int] = None, masks: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        base = self._model[0]
        if points is None and masks is None and self.prompt_encoder is None and window_margin is None:
            return base.decode(embeddings, boxes, decoder=self.decoder)
        encoder = self.prompt_encoder if self.prompt_encoder is not None else base.prompt_encoder
        boxes = boxes.reshape(-1, 1, 4)
        sparse, dense = encoder(points=points, boxes=boxes, masks=masks)
        pe = encoder.get_dense_pe()
        if window_margin is None:
            masks, iou = predict_masks_batched(self.decoder, embeddings, pe, sparse, dense)
            return masks[:, :1], iou[:, 0]
        windows = [token_windows(box, base.spec.input_size, window_margin)[0] for box in boxes]
        return self._decode_windows(embeddings, pe, sparse, dense, windows)

    def _decode_windows(self, embeddings, pe, sparse, dense, windows) -> Tuple[torch.Tensor, torch.Tensor]:
        """Each sample in its own window; samples whose windows have one size decode together."""
        groups: Dict[Tuple[int, int], List[int]] = {}
        for n, (r0, r1, c0, c1) in enumerate(windows):
            groups.setdefault((r1 - r0, c1 - c0), []).append(n)
        order, masks, iou = [], [], []
        for members in groups.values():
            if len(members) == 1:  # a view: indexing would copy the 64x64 grids (dense is an expanded view)
                pick = slice(members[0], members[0] + 1)
            else:
                pick = torch.tensor(members, device=embeddings.device)
            group = [windows[n] for n in members]
            low, score = predict_masks_batched(self.decoder, embeddings[pick], pe, sparse[pick], dense[pick], group)
            order += members
            masks.append(paste_windows(low[:, :1], group))
            iou.append(score[:, 0])
        back = torch.argsort(torch.tensor(order, device=embeddings.device))
        return torch.cat(masks)[back], torch.cat(iou)[back]
