"""One SAM variant as a module: image encoder + prompt encoder + mask decoder, with batched
encoding and decoding, and the encoder's speed-ups set up by its own methods."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..catalogue import BACKENDS, PRECISIONS, ModelSpec
from ..progress import CancelFn
from .decoding import (CPU_DECODE_TOKENS, chosen_masks, chosen_token, paste_windows, run_transformer, token_windows,
                       upscale_masks)
from .registry import EMBED_SIZE, build_image_encoder, build_mask_decoder, build_prompt_encoder


# How a fingerprint of random weights (``build_model(pretrained=False)``) starts after the model's name.
RANDOM_WEIGHTS = "random-"


def check_encoder_options(precision: str, backend: str, device: torch.device) -> None:
    """A ValueError naming the problem unless the encoder can run in ``precision`` on ``backend``
    on ``device`` (checked before any weights load)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}'; choose one of: {', '.join(PRECISIONS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend '{backend}'; choose one of: {', '.join(BACKENDS)}")
    if backend == "openvino" and device.type != "cpu":
        raise ValueError(f"the openvino backend runs on the CPU only, not on {device.type}; use --device cpu or "
                         "--backend torch (or auto)")


class SamModel(nn.Module):
    """Encoder + prompt encoder + mask decoder of one SAM variant, with batched encode/decode.

    Built as segment-anything builds it (float32, eager); ``accelerate`` and ``configure_encoder``
    (``loader.load_model`` calls both) set up the speed-ups, ``compile_encoder`` compiles.
    ``checkpoint`` is the weights file it was loaded from (None: built-in or random weights).
    """

    def __init__(self, spec: ModelSpec, fingerprint: str, checkpoint: Optional[str] = None):
        super().__init__()
        self.spec = spec
        self.fingerprint = fingerprint
        self.checkpoint = checkpoint
        self.image_encoder = build_image_encoder(spec)
        self.prompt_encoder = build_prompt_encoder(spec.input_size)
        self.mask_decoder = build_mask_decoder()
        self.compiled_batch: Optional[int] = None
        self.channels_last = False  # the encoder's memory format (accelerate on CUDA, bf16 on a CPU)
        self.encoder_dtype = torch.float32  # bf16 for bf16 weights on a CPU
        self.openvino_encoder = None  # an openvino_encoder.OpenVinoEncoder: backend "openvino"
        self.precision = "float32"  # the encoder's: "bf16" is autocast on CUDA, bf16 weights on a CPU
        self._dense_pe: Optional[Tuple[nn.Module, torch.Tensor]] = None

    @property
    def backend(self) -> str:
        """Who runs the image encoder (BACKENDS)."""
        return "torch" if self.openvino_encoder is None else "openvino"

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------ setting up the encoder

    def accelerate(self) -> None:
        """The speed-ups that keep the encoder's output (to float rounding): batch norms folded into
        their convolutions on every device, and on CUDA fused attention and channels-last memory
        (``acceleration``). Call it once the model is on its device."""
        from .. import acceleration

        acceleration.fold_batch_norms(self.image_encoder)
        if self.device.type == "cuda":
            acceleration.prepare_for_cuda(self.image_encoder)
            self.channels_last = True

    def configure_encoder(self, precision: str = "auto", backend: str = "torch",
                          cancel: Optional[CancelFn] = None) -> None:
        """The encoder's number format (PRECISIONS: auto = bf16 on CUDA, float32 on a CPU) and who
        runs it ("torch" or "openvino"; ``loader.resolve_backend`` picks for "auto"). bf16 is autocast
        on CUDA, bf16 weights in channels-last memory on a CPU; ``openvino`` converts the encoder for
        this CPU, or reads the conversion back from the user's cache folder (``openvino_encoder``);
        ``cancel()`` is asked while it converts."""
        check_encoder_options(precision, backend, self.device)
        if backend == "auto":
            raise ValueError("configure_encoder takes the backend to use; loader.resolve_backend picks one for 'auto'")
        on_cpu = self.device.type == "cpu"
        on_cuda = self.device.type == "cuda"
        self.precision = "bf16" if precision == "bf16" or (precision == "auto" and on_cuda) else "float32"
        if backend == "openvino":
            from ..openvino_encoder import OpenVinoEncoder

            weights = None if self.fingerprint.split(":", 1)[-1].startswith(RANDOM_WEIGHTS) else self.fingerprint
            self.openvino_encoder = OpenVinoEncoder(self.image_encoder, self.spec.input_size, self.precision,
                                                    fingerprint=weights, cancel=cancel)
        elif on_cpu and self.precision == "bf16":
            from ..acceleration import prepare_for_cpu

            prepare_for_cpu(self.image_encoder)
            self.encoder_dtype = torch.bfloat16
            self.channels_last = True

    def compile_encoder(self, batch_size: int) -> None:
        """torch.compile the encoder for batches of ``batch_size``.

        On a CPU inductor freezes the weights (pre-packs them for oneDNN) and fuses the element-wise
        work between the convolutions and matrix products, which is where its gain there comes
        from; it needs a C++ compiler, so a missing one is named here rather than failing inside
        the first slice.
        """
        if self.backend != "torch":
            raise ValueError(f"compiling applies to the torch backend; this model's encoder runs on {self.backend}, "
                             "which compiles it already")
        if self.compiled_batch is None:
            options = None
            if self.device.type == "cpu":
                from .. import acceleration

                if not acceleration.cpp_compiler():
                    raise ValueError("compiling the encoder on a CPU needs a C++ compiler (g++, clang++ or MSVC's "
                                     "cl) on the PATH, and none was found; run without compiling")
                options = {"freezing": True}
            self.image_encoder.compile(dynamic=False, options=options)
        self.compiled_batch = int(batch_size)

    # ------------------------------------------------------------ encoding

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B,3,S,S], already normalised for this model -> embeddings [B,256,64,64] (float32)."""
        from ..acceleration import pad_batch

        if self.openvino_encoder is not None:
            return self.openvino_encoder(images)
        count = images.shape[0]
        images = images.to(self.device, self.encoder_dtype)
        step = self.compiled_batch or count
        autocast = self.device.type == "cuda" and self.precision == "bf16"
        out = []
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            for start in range(0, count, step):
                chunk = images[start:start + step]
                if self.compiled_batch:
                    chunk = pad_batch(chunk, step)  # before the layout change, so every batch has one layout
                if self.channels_last:
                    chunk = chunk.contiguous(memory_format=torch.channels_last)
                embeddings = self.image_encoder(chunk)[:min(step, count - start)]
                out.append(embeddings.to(torch.float32, memory_format=torch.contiguous_format))
        return torch.cat(out) if len(out) > 1 else out[0]

    # ------------------------------------------------------------ decoding

    def dense_pe(self) -> torch.Tensor:
        """The prompt encoder's positional encoding of the token grid, made once per prompt
        encoder and device (recomputing its sin/cos grid cost ~1.5 ms, a tenth of a windowed
        decode). Made outside inference mode, so training may use it too."""
        encoder = self.prompt_encoder
        device = encoder.pe_layer.positional_encoding_gaussian_matrix.device
        cached = self._dense_pe
        if cached is None or cached[0] is not encoder or cached[1].device != device:
            with torch.inference_mode(False), torch.no_grad():
                cached = (encoder, encoder.get_dense_pe().contiguous(memory_format=torch.channels_last))
            self._dense_pe = cached
        return cached[1]

    def _decode_tokens(self, embeddings, boxes, decoder, window_margin):
        """Prompt encoding, windows and the decoder's transformer for one box per image."""
        decoder = self.mask_decoder if decoder is None else decoder
        embeddings = embeddings.to(self.device)
        boxes = boxes.to(self.device, torch.float32).reshape(-1, 1, 4)
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes, masks=None)
        windows = None if window_margin is None else token_windows(boxes, self.spec.input_size, window_margin)
        step = boxes.shape[0]
        if self.device.type == "cpu":  # a few images per call: see CPU_DECODE_TOKENS
            r0, r1, c0, c1 = windows[0] if windows else (0, EMBED_SIZE, 0, EMBED_SIZE)
            step = max(1, CPU_DECODE_TOKENS // ((r1 - r0) * (c1 - c0)))
        parts = [run_transformer(decoder, embeddings[n:n + step] if embeddings.shape[0] > 1 else embeddings,
                                 self.dense_pe(), sparse[n:n + step], dense[n:n + step],
                                 windows[n:n + step] if windows else None)
                 for n in range(0, boxes.shape[0], step)]
        hs, image_tokens, iou = parts[0] if len(parts) == 1 else (torch.cat(outputs) for outputs in zip(*parts))
        return decoder, hs, image_tokens, iou, windows

    def decode(
        self,
        embeddings: torch.Tensor,
        boxes: torch.Tensor,
        multimask: bool = False,
        decoder: Optional[nn.Module] = None,
        window_margin: Optional[int] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """One box per image -> (low-res logits [B,1,256,256], predicted IoU [B]).

        ``decoder`` lets training pass a LoRA-wrapped copy without touching the base model.
        ``window_margin`` decodes only the image tokens within that many tokens of each box
        (a token is 1/64 of the input's side). The decoder's cost grows with the tokens it
        sees, so a box on a fifth of the slice decodes 3-4x faster on a CPU; the prompt tokens
        then attend to the box's surroundings only, which moves some boundary pixels (docs/performance.md
        has the measured agreement). Pixels outside the window come back as
        background.
        """
        decoder, hs, image_tokens, iou, windows = self._decode_tokens(embeddings, boxes, decoder, window_margin)
        return chosen_masks(decoder, hs, image_tokens, iou, multimask, windows)

    def decode_best(
        self,
        embeddings: torch.Tensor,
        boxes: torch.Tensor,
        group: int,
        multimask: bool = False,
        window_margin: Optional[int] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Boxes in consecutive groups of ``group`` -> the most confident decode of each group:
        (low-res logits [G,1,256,256], predicted IoU [G], its place in the group [G]).

        Equal to ``decode`` followed by picking the highest IoU in each group, but only the kept
        masks are upscaled (about a third of a decode each): tracking's seed keeps one of five
        candidate slices.
        """
        if boxes.reshape(-1, 4).shape[0] % group:
            raise ValueError(f"{boxes.reshape(-1, 4).shape[0]} boxes do not split into groups of {group}")
        decoder, hs, image_tokens, iou, windows = self._decode_tokens(embeddings, boxes, None, window_margin)
        token = chosen_token(iou, multimask)
        score = iou.gather(1, token[:, None])[:, 0]
        place = score.reshape(-1, group).argmax(dim=1)
        rows = torch.arange(place.shape[0], device=place.device) * group + place
        masks = upscale_masks(decoder, hs[rows], image_tokens[rows], token[rows])
        if windows is not None:
            masks = paste_windows(masks, [windows[n] for n in rows.tolist()])
        return masks, score[rows], place

    def decode_prompts(
        self,
        embedding: torch.Tensor,
        points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        box: Optional[torch.Tensor] = None,
        mask_input: Optional[torch.Tensor] = None,
        multimask: bool = False,
        window: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """One image with any of SAM's prompts -> (low-res logits [1,1,256,256], predicted IoU [1]).

        ``points``: (coordinates [1,N,2] in model-input pixels, labels [1,N]: 1 positive, 0
        negative); ``box`` [1,4]; ``mask_input``: low-res logits [1,1,256,256] (a previous
        decode, SAM's iterative-click prompt). ``window`` [1,4] (model-input pixels) decodes only
        the tokens near it, margin ``EMBED_SIZE // 8``, as ``decode`` does for a box: a click costs
        a fraction of a whole-slice decode on a CPU.
        """
        device = self.device
        points = None if points is None else (points[0].to(device, torch.float32), points[1].to(device))
        box = None if box is None else box.to(device, torch.float32).reshape(-1, 1, 4)
        mask_input = None if mask_input is None else mask_input.to(device, torch.float32)
        sparse, dense = self.prompt_encoder(points=points, boxes=box, masks=mask_input)
        windows = None if window is None else token_windows(window.reshape(-1, 4), self.spec.input_size,
                                                            EMBED_SIZE // 8)
        decoder = self.mask_decoder
        hs, image_tokens, iou = run_transformer(decoder, embedding.to(device), self.dense_pe(), sparse, dense, windows)
        return chosen_masks(decoder, hs, image_tokens, iou, multimask, windows)

    def upscale_logits(self, low_res: torch.Tensor) -> torch.Tensor:
        """Low-res decoder logits -> logits at the model's padded input size."""
        size = self.spec.input_size
        if low_res.shape[-1] == size:
            return low_res
        return F.interpolate(low_res, size=(size, size), mode="bilinear", align_corners=False)
