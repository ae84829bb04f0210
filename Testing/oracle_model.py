"""A stand-in for a SAM model whose answer is known: it segments whatever is brighter than
mid-grey inside the box. Fast, and exact enough to check every coordinate transform."""
import uuid

import torch
from torch import nn
from torch.nn import functional as F

from SAMFineTuneLib.models import MODEL_SPECS


class OracleModel(nn.Module):
    def __init__(self, input_size=256, point_prompts=False):
        super().__init__()
        base = MODEL_SPECS["litemedsam"]
        self.spec = type(base)(**{**base.__dict__, "input_size": input_size, "point_prompts": point_prompts})
        self.fingerprint = "oracle:" + uuid.uuid4().hex
        self.anchor = nn.Parameter(torch.zeros(1))
        self.mask_decoder = nn.Identity()
        self.encode_calls = 0
        self.last_boxes = None
        self.decode_log = []  # (boxes, window_margin) of every decode call
        self.compiled_batch = None

    @property
    def device(self):
        return self.anchor.device

    def encode(self, images):
        self.encode_calls += images.shape[0]
        # Keep full resolution in the "embedding" so thresholding is pixel-exact.
        return images[:, :1].clone()

    def decode(self, embeddings, boxes, multimask=False, decoder=None, window_margin=None):
        # Its answer never leaves the box, so a window around the box changes nothing.
        self.last_boxes = boxes.clone()
        self.decode_log.append((boxes.shape[0], window_margin))
        logits = (embeddings - 0.5) * 20.0
        size = self.spec.input_size
        x = torch.arange(size, dtype=torch.float32) + 0.5
        inside_x = (x[None, :] >= boxes[:, 0:1]) & (x[None, :] <= boxes[:, 2:3])
        inside_y = (x[None, :] >= boxes[:, 1:2]) & (x[None, :] <= boxes[:, 3:4])
        inside = inside_y[:, :, None] & inside_x[:, None, :]
        logits = torch.where(inside[:, None], logits, torch.full_like(logits, -20.0))
        # Like SAM, most confident when the box is tight around what it segments.
        filled = (logits > 0).flatten(1).sum(1).float() / inside.flatten(1).sum(1).clamp(min=1).float()
        return logits, filled

    def decode_best(self, embeddings, boxes, group, multimask=False, window_margin=None):
        logits, score = self.decode(embeddings, boxes, multimask, window_margin=window_margin)
        place = score.reshape(-1, group).argmax(dim=1)
        rows = torch.arange(place.shape[0]) * group + place
        return logits[rows], score[rows], place

    def upscale_logits(self, low_res):
        size = self.spec.input_size
        if low_res.shape[-1] == size:
            return low_res
        return F.interpolate(low_res, size=(size, size), mode="bilinear", align_corners=False)

    def decode_prompts(self, embedding, points=None, box=None, mask_input=None, multimask=False, window=None):
        """Bright pixels inside the box, or within 12 pixels of the positive points, less those
        within 4 pixels of a negative point: what a click should do, exactly."""
        size = self.spec.input_size
        self.decode_log.append(("prompts", points, box, mask_input is not None, window))
        bright = embedding[0, 0] > 0.5
        yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
        region = torch.zeros_like(bright)
        if box is not None:
            x0, y0, x1, y1 = box.reshape(4).tolist()
            region |= (xx >= x0) & (xx <= x1) & (yy >= y0) & (yy <= y1)
        coords, labels = points if points is not None else (torch.zeros(1, 0, 2), torch.zeros(1, 0))
        for (x, y), label in zip(coords[0].tolist(), labels[0].tolist()):
            near = (xx - x - 0.5) ** 2 + (yy - y - 0.5) ** 2
            if label == 1:
                region |= near <= 12 ** 2
            else:
                region &= near > 4 ** 2
                bright = bright & (near > 4 ** 2)
        logits = torch.where(region & bright, 20.0, -20.0)[None, None]
        return logits, torch.ones(1)
