"""Which decoder a ``Segmenter`` decodes with: the base model's, or an adapter's with its LoRA
merged, and what that adapter's card asks of segmentation.

An adapter replaces only the mask decoder (and the prompt encoder where it was trained), never
the image encoder, so embeddings cached under one adapter stay valid under any other.
"""
from __future__ import annotations

from typing import ContextManager, Dict, Optional

from . import tracking
from .catalogue import BASE_BOX_MODE, card_box_mode
from .models import SamModel, decoding_with


class AdapterSlot:
    """The adapter in use on one model (``path``; None: the base model) and its card's choices:
    ``multimask`` (the output token it learned; None: the model's own), ``clicks`` (whether it
    learned to answer clicks), ``tracking`` (``TrackingOptions`` overrides) and ``box_mode``."""

    def __init__(self, model: SamModel):
        self.model = model
        self.base_decoder = model.mask_decoder
        self.base_prompt_encoder = getattr(model, "prompt_encoder", None)
        self.path: Optional[str] = None
        self.multimask: Optional[bool] = None
        self.clicks = False
        self.tracking: Dict[str, object] = {}
        self.box_mode = BASE_BOX_MODE

    def set(self, adapter_dir: Optional[str]) -> None:
        """Put the adapter in ``adapter_dir`` in place (None: the base model). A failing adapter
        leaves the one in use as it was."""
        if adapter_dir is None:
            self._use(None, self.base_decoder, self.base_prompt_encoder, {}, {}, BASE_BOX_MODE)
            return
        from .adapters import load_adapter

        current = self.path
        self.model.mask_decoder = self.base_decoder  # merge onto the base, never onto another adapter
        try:
            peft_decoder, prompt_encoder, card = load_adapter(self.model, adapter_dir)
            overrides = tracking.card_overrides(card, adapter_dir)
            box_mode = card_box_mode(card, adapter_dir)
        except BaseException:
            self.set(current)
            raise
        decoder = peft_decoder.merge_and_unload().to(self.model.device).eval().requires_grad_(False)
        self._use(adapter_dir, decoder, prompt_encoder or self.base_prompt_encoder, card, overrides, box_mode)

    def _use(self, path: Optional[str], decoder, prompt_encoder, card: Dict, overrides: Dict[str, object],
             box_mode: str) -> None:
        self.model.mask_decoder, self.model.prompt_encoder = decoder, prompt_encoder
        inference = card.get("inference", {})
        self.path = path
        self.multimask = inference.get("multimask")  # an adapter is trained on one output token
        self.clicks = bool(inference.get("clicks"))
        self.tracking = overrides  # the tracking margin chosen on its validation cases (training.tracking_choice)
        self.box_mode = box_mode

    @property
    def base_in_place(self) -> bool:
        """Whether the base model's decoder decodes now: not while an adapter is in use, nor while
        training tries a decoder of its own (``models.decoding_with``)."""
        return self.model.mask_decoder is self.base_decoder

    def base_decoding(self) -> ContextManager[None]:
        """The base model's decoder in place for a block, whatever is in use around it."""
        return decoding_with(self.model, self.base_decoder, self.base_prompt_encoder)
