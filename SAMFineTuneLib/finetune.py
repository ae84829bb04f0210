"""LoRA fine-tuning of SAM's mask decoder on an exported dataset.

The image encoder stays frozen, so every training and validation slice is encoded once and
its embedding cached on disk in the dataset (``DATASET/.embeddings/<key>.npy``, float16, key
= SHA-256 of the model fingerprint and the preprocessed input, as in the inference cache);
every epoch after that only runs the prompt encoder and the mask decoder. LoRA (peft) wraps
the decoder's attention projections and MLPs; the loss is monai's DiceCE (or DiceFocal) with
an optional IoU-head term; boxes are jittered as a user's boxes are never tight; a positive
point can be added to the box. Training and validation decode as the Segmenter does at
inference (``window_margin``: on a CPU only the image tokens near each box, which makes an
epoch several times faster; on CUDA the whole slice). Each epoch ends with the validation
Dice on the held-out cases: the best adapter is kept, training stops when it has not
improved for ``patience`` epochs. Linear warmup then cosine decay; bf16 autocast on CUDA only; seeded runs reproduce.

After every epoch ``OUTPUT/resume_state.pt`` holds everything needed to continue (LoRA and
optimiser state, scheduler, random generators, history); ``resume=True`` picks it up after a
crash or a cancel.

Multi-GPU: the same command runs under torchrun, one process per GPU::

    torchrun --nproc_per_node 4 -m SAMFineTuneLib train --dataset DATASET --output ADAPTER ...

Each process takes the GPU named by LOCAL_RANK, rank 0 fills the embedding cache first, the
training slices are sharded across processes (equal shards, so the effective batch is
N x --batch-size), DistributedDataParallel averages the LoRA gradients, every process
validates on all held-out cases (so early stopping agrees), and only rank 0 writes the
adapter, the card and the resume state. Without torchrun (WORLD_SIZE unset) nothing of this
runs; CI covers the single-process path.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .adapters import DEFAULT_TARGETS
from .progress import Cancelled, check_cancel, report  # noqa: F401  (Cancelled re-exported)

RESUME_FILE = "resume_state.pt"
LOW_RES = 256
LOSSES = ("dicece", "dicefocal")
# Settings that must not change between a run and its resumption.
_RESUME_KEYS = ("dataset", "model", "checkpoint", "lr", "weight_decay", "batch_size", "lora_rank", "lora_alpha",
                "lora_dropout", "targets", "train_prompt_encoder", "loss", "iou_loss_weight", "box_jitter",
                "point_prompts", "seed", "axis", "window", "labels", "train_cases", "val_cases", "epochs",
                "select_best", "cache_embeddings", "window_margin")


@dataclass
class TrainConfig:
    dataset: str
    output: str
    model: str = "litemedsam"
    checkpoint: Optional[str] = None
    device: str = "auto"
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 8
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    targets: Tuple[str, ...] = DEFAULT_TARGETS
    train_prompt_encoder: bool = False
    loss: str = "dicece"
    iou_loss_weight: float = 0.0  # > 0 also trains the IoU head (MSE to the real IoU)
    box_jitter: float = 0.1  # each box edge moves by U(-j/4, j) x the box side (outward positive)
    point_prompts: float = 0.0  # probability of adding one positive point inside the mask
    warmup: float = 0.1  # share of all steps with linear warmup
    patience: int = 5  # epochs without a better validation Dice before stopping (0 = never stop early)
    select_best: bool = True  # keep the epoch with the best validation Dice; False keeps the last epoch
    min_delta: float = 1e-4
    seed: int = 0
    amp: bool = True  # bf16/fp16 autocast, CUDA only
    resume: bool = False
    axis: str = "axial"
    window: str = "auto"
    labels: Optional[List[int]] = None  # label values to train on; None = all
    train_cases: Optional[List[str]] = None  # None = the dataset's train split
    val_cases: Optional[List[str]] = None  # None = the dataset's val split
    log_every: int = 10  # progress event every N steps
    cache_embeddings: bool = True  # False: re-encode every step (the seeds' loop; benchmarks only)
    final_scores: bool = True  # score base vs adapted (Dice, IoU, HD95, NSD) on the val cases at the end
    # Decode only the image tokens within this many tokens of each (jittered) box, as the Segmenter
    # does at inference: "auto" = its default on the model's device (4 on a CPU, the whole slice on
    # CUDA), None = the whole slice, or a whole number >= 0 (see segmenter.resolve_window_margin).
    window_margin: Union[int, None, str] = "auto"

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["targets"] = list(self.targets)
        return out


# ---------------------------------------------------------------- samples -> tensors (with the embedding cache)


@dataclass
class Prepared:
    """Slices ready for the decoder: embeddings (or encoder inputs), boxes, targets."""

    samples: list
    geometries: list
    boxes: Any  # Tensor[N,4] tight boxes, model-input pixels
    targets: Any  # Tensor[N,256,256] bool, the mask in the decoder's low-res frame
    embeddings: Any = None  # Tensor[N,256,64,64] float16 (cached mode)
    inputs: Any = None  # Tensor[N,3,S,S] (re-encode mode)
    stats: Dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)


def embedding_key(fingerprint: str, model_input) -> str:
    digest = hashlib.sha256(fingerprint.encode("utf-8") + b"|")
    digest.update(np.ascontiguousarray(model_input.detach().cpu().numpy()).tobytes())
    return digest.hexdigest()


def _lowres_target(mask: np.ndarray, geometry, input_size: int):
    """A slice mask in the decoder's low-res frame: resized like the image, padded, at 256x256."""
    import torch
    from torch.nn import functional as F

    tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
    nh, nw = geometry.resized_shape
    tensor = F.interpolate(tensor, size=(nh, nw), mode="bilinear", align_corners=False)
    tensor = F.pad(tensor, (0, input_size - nw, 0, input_size - nh))
    if input_size != LOW_RES:
        tensor = F.interpolate(tensor, size=(LOW_RES, LOW_RES), mode="area")
    return tensor[0, 0] >= 0.5


def prepare(model, samples: Sequence, cache_dir: Optional[str], encode: bool = True, progress=None, cancel=None,
            write_cache: bool = True) -> Prepared:
    """Geometry, boxes and targets of each sample, plus its embedding (from ``cache_dir`` when
    there, else from the encoder, then stored) or, with ``encode=False``, its encoder input."""
    import torch

    from .imaging import SliceGeometry, to_model_input

    size = model.spec.input_size
    geometries, boxes, targets, embeddings, inputs = [], [], [], [], []
    stats = {"encoder_calls": 0, "cache_hits": 0}
    memo: Dict[str, Any] = {}
    if cache_dir and write_cache:
        os.makedirs(cache_dir, exist_ok=True)
    for n, sample in enumerate(samples):
        check_cancel(cancel)
        report(progress, n, len(samples), f"preparing slice {n + 1}/{len(samples)} ({sample.case})")
        geometry = SliceGeometry(tuple(sample.image.shape), tuple(sample.pixel_spacing), size)
        geometries.append(geometry)
        boxes.append(geometry.box_to_model(sample.box))
        targets.append(_lowres_target(sample.mask, geometry, size))
        x = to_model_input(sample.image, geometry, model.spec)
        if not encode:
            inputs.append(x)
            continue
        key = embedding_key(model.fingerprint, x)
        if key not in memo:
            memo[key] = _cached_embedding(model, x, key, cache_dir, stats, write_cache)
        embeddings.append(memo[key])
    report(progress, len(samples), len(samples), "slices ready")
    return Prepared(list(samples), geometries, torch.tensor(boxes, dtype=torch.float32),
                    torch.stack(targets) if targets else torch.zeros(0, LOW_RES, LOW_RES, dtype=torch.bool),
                    torch.stack(embeddings) if embeddings else None, torch.stack(inputs) if inputs else None, stats)


def _cached_embedding(model, x, key: str, cache_dir: Optional[str], stats: Dict[str, int], write_cache: bool):
    import torch

    path = os.path.join(cache_dir, key + ".npy") if cache_dir else None
    if path and os.path.isfile(path):
        try:
            stats["cache_hits"] += 1
            return torch.from_numpy(np.load(path))
        except (ValueError, OSError):  # a damaged file: encode again
            stats["cache_hits"] -= 1
    with torch.no_grad():
        embedding = model.encode(x[None])[0].to("cpu", torch.float16)
    stats["encoder_calls"] += 1
    if path and write_cache:
        from .dataset import atomic_write

        atomic_write(path, lambda temp: np.save(temp, embedding.numpy()))
    return embedding


def cache_dir_for(dataset_root: str) -> str:
    from .dataset import EMBEDDING_DIR

    return os.path.join(dataset_root, EMBEDDING_DIR)


# ---------------------------------------------------------------- decoding and prediction


def _decoder_step_module(model, decoder, prompt_encoder):
    """An nn.Module holding only what trains (for DDP), decoding through the model's path.

    ``forward(embeddings, boxes, points=None, window_margin=None)`` returns low-res logits
    [B,1,256,256] and the predicted IoU [B]. With ``window_margin`` each sample decodes only the
    image tokens within that many tokens of its own box (``models.token_windows`` of that box
    alone, as the Segmenter decodes a lone slice; samples whose windows have the same size share
    one decoder batch), also when points are given: the window follows the box, and a training
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
    import torch
    from torch import nn

    from .models import paste_windows, predict_masks_batched, token_windows

    class DecoderStep(nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = decoder
            self.prompt_encoder = prompt_encoder
            self._model = [model]  # a list: not registered, so the frozen encoder is not a DDP parameter

        def forward(self, embeddings: torch.Tensor, boxes: torch.Tensor, points=None,
                    window_margin: Optional[int] = None):
            base = self._model[0]
            if points is None and self.prompt_encoder is None and window_margin is None:
                return base.decode(embeddings, boxes, decoder=self.decoder)
            encoder = self.prompt_encoder if self.prompt_encoder is not None else base.prompt_encoder
            boxes = boxes.reshape(-1, 1, 4)
            sparse, dense = encoder(points=points, boxes=boxes, masks=None)
            pe = encoder.get_dense_pe()
            if window_margin is None:
                masks, iou = predict_masks_batched(self.decoder, embeddings, pe, sparse, dense)
                return masks[:, :1], iou[:, 0]
            windows = [token_windows(box, base.spec.input_size, window_margin)[0] for box in boxes]
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
                low, score = predict_masks_batched(self.decoder, embeddings[pick], pe, sparse[pick], dense[pick],
                                                   group)
                order += members
                masks.append(paste_windows(low[:, :1], group))
                iou.append(score[:, 0])
            back = torch.argsort(torch.tensor(order, device=embeddings.device))
            return torch.cat(masks)[back], torch.cat(iou)[back]

    return DecoderStep()


def predict_masks(model, prepared: Prepared, step=None, batch_size: int = 16, box_margin: float = 0.0,
                  window_margin: Optional[int] = None) -> List[np.ndarray]:
    """Binary masks in slice pixels for every prepared sample, prompted with its tight box, or
    with the box grown by ``box_margin`` x its side on every edge (a user's loose box).

    ``window_margin``: decode only the tokens this close to each box (None: the whole slice);
    give base and adapted decoders the same margin to compare them."""
    import torch

    step = step or _decoder_step_module(model, model.mask_decoder, None)
    boxes = prepared.boxes
    if box_margin:
        boxes = _clip_boxes(_grow_boxes(boxes, torch.full(boxes.shape, float(box_margin))), _limits(prepared), boxes)
    out: List[np.ndarray] = []
    was_training = step.training
    step.eval()
    with torch.no_grad():
        for start in range(0, len(prepared), batch_size):
            index = slice(start, start + batch_size)
            embeddings = _batch_embeddings(model, prepared, torch.arange(len(prepared))[index])
            low, _ = step(embeddings, boxes[index].to(embeddings.device), window_margin=window_margin)
            logits = model.upscale_logits(low.float())
            for n, geometry in enumerate(prepared.geometries[index]):
                out.append(geometry.logits_to_slice(logits[n, 0]) > 0)
    step.train(was_training)
    return out


def _batch_embeddings(model, prepared: Prepared, index):
    import torch

    if prepared.embeddings is not None:
        return prepared.embeddings[index].to(model.device, torch.float32)
    with torch.no_grad():  # re-encode mode: the encoder runs every time (frozen)
        prepared.stats["encoder_calls"] = prepared.stats.get("encoder_calls", 0) + len(index)
        return model.encode(prepared.inputs[index])


def case_dice(prepared: Prepared, predictions: Sequence[np.ndarray]) -> Dict[str, float]:
    """Dice per (case, label) over all its slices (a 3D Dice), keyed 'case' or 'case:label'."""
    totals: Dict[str, List[int]] = {}
    labels = {s.label for s in prepared.samples}
    for sample, pred in zip(prepared.samples, predictions):
        key = sample.case if len(labels) == 1 else f"{sample.case}:{sample.label}"
        entry = totals.setdefault(key, [0, 0])
        entry[0] += 2 * int(np.logical_and(pred, sample.mask).sum())
        entry[1] += int(pred.sum()) + int(sample.mask.sum())
    return {k: (inter / total if total else 1.0) for k, (inter, total) in totals.items()}


def mean_dice(prepared: Prepared, predictions: Sequence[np.ndarray]) -> float:
    scores = case_dice(prepared, predictions)
    return float(np.mean(list(scores.values()))) if scores else float("nan")


# ---------------------------------------------------------------- training pieces


def _limits(prepared: Prepared):
    """(rows, cols) of each sample's image inside the padded model input."""
    import torch

    return torch.tensor([g.resized_shape for g in prepared.geometries], dtype=torch.float32).reshape(-1, 2)


def _grow_boxes(boxes, fractions):
    """Move each edge outward by ``fractions`` x the box side (negative = inward)."""
    import torch

    size = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], dim=1).repeat(1, 2)
    return boxes + fractions * size * torch.tensor([-1.0, -1.0, 1.0, 1.0])


def _clip_boxes(boxes, limits, fallback):
    """Keep boxes inside the image; a box squeezed below one pixel falls back to ``fallback``."""
    import torch

    out = boxes.clone()
    out[:, 0::2] = torch.minimum(out[:, 0::2].clamp(min=0.0), limits[:, 1:2])
    out[:, 1::2] = torch.minimum(out[:, 1::2].clamp(min=0.0), limits[:, 0:1])
    wide = (out[:, 2] - out[:, 0] >= 1.0) & (out[:, 3] - out[:, 1] >= 1.0)
    return torch.where(wide[:, None], out, fallback)


def _jitter_boxes(boxes, limits, amount: float, generator):
    """Move each edge by U(-amount/4, amount) x the box side, outward positive, inside the image."""
    import torch

    if amount <= 0:
        return boxes
    fractions = (torch.rand(boxes.shape, generator=generator) * 1.25 - 0.25) * amount
    return _clip_boxes(_grow_boxes(boxes, fractions), limits, boxes)


def _random_points(targets, generator, input_size: int):
    """One positive point per sample, drawn inside its target mask, in model-input pixels."""
    import torch

    coords = torch.zeros(targets.shape[0], 1, 2)
    scale = input_size / LOW_RES
    for n in range(targets.shape[0]):
        inside = torch.nonzero(targets[n])
        if len(inside):
            y, x = inside[int(torch.randint(len(inside), (1,), generator=generator))].tolist()
            coords[n, 0] = torch.tensor([(x + 0.5) * scale, (y + 0.5) * scale])
    return coords, torch.ones(targets.shape[0], 1, dtype=torch.int64)


def _loss_function(config: TrainConfig):
    from monai.losses import DiceCELoss, DiceFocalLoss

    if config.loss == "dicece":
        return DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")
    return DiceFocalLoss(sigmoid=True, squared_pred=True, reduction="mean")


def _schedule(total_steps: int, warmup_share: float) -> Callable[[int], float]:
    warmup = max(1, int(round(warmup_share * total_steps))) if warmup_share > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _distributed():
    """(rank, world size, local rank) under torchrun, else (0, 1, 0)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def _check_config(config: TrainConfig) -> None:
    if config.loss not in LOSSES:
        raise ValueError(f"unknown loss '{config.loss}'; choose one of: {', '.join(LOSSES)}")
    for name in ("epochs", "batch_size", "lora_rank"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    if not config.lr > 0:
        raise ValueError(f"learning rate must be > 0, got {config.lr}")
    if not 0.0 <= config.point_prompts <= 1.0:
        raise ValueError(f"point_prompts is a probability in [0, 1], got {config.point_prompts}")
    from .segmenter import check_window_margin

    check_window_margin(config.window_margin)


def checkpoint_digest(path: Optional[str]) -> Optional[str]:
    if not path:
        return None
    from .models import file_sha256

    return file_sha256(path)


# ---------------------------------------------------------------- train


def train(config: TrainConfig, progress=None, cancel=None, log=None, model=None) -> Dict[str, Any]:
    """Fine-tune a LoRA adapter; returns the model card (also written to ``config.output``).

    ``model`` lets a caller that already holds the base model (the worker, tests) reuse it;
    it is not modified. ``progress(done, total, message)`` is called per prepared slice, per
    ``log_every`` steps and per epoch; ``cancel()`` returning True raises ``Cancelled`` (the
    last finished epoch stays resumable).
    """
    import torch

    from . import adapters
    from .dataset import load_samples, read_dataset
    from .models import load_model

    _check_config(config)
    rank, world, local_rank = _distributed()
    started_group = False
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            started_group = True
        if torch.cuda.is_available():
            config = dataclasses.replace(config, device=f"cuda:{local_rank}")
    main_rank = rank == 0
    progress = progress if main_rank else None
    say = (log if main_rank else None) or (lambda text: None)
    info = read_dataset(config.dataset)
    train_ids = list(config.train_cases) if config.train_cases is not None else [c.case for c in info.split("train")]
    val_ids = list(config.val_cases) if config.val_cases is not None else [c.case for c in info.split("val")]
    if not train_ids:
        raise ValueError(f"dataset {info.root} has no training cases")
    if not val_ids:
        raise ValueError(f"dataset {info.root} has no validation cases: export with --val-fraction > 0")
    if set(train_ids) & set(val_ids):
        raise ValueError(f"cases on both sides of the split: {sorted(set(train_ids) & set(val_ids))}")
    if model is None:
        model = load_model(config.model, checkpoint=config.checkpoint, device=config.device)
    device = model.device
    # From here on the config holds the margin really used (card, resume state, resume check).
    from .segmenter import resolve_window_margin

    config = dataclasses.replace(config, window_margin=resolve_window_margin(config.window_margin, device))
    margin = config.window_margin
    torch.manual_seed(config.seed)

    t0 = time.monotonic()
    cache = cache_dir_for(info.root) if config.cache_embeddings else None
    train_samples = load_samples(info, axis=config.axis, window=config.window, labels=config.labels, cases=train_ids)
    val_samples = load_samples(info, axis=config.axis, window=config.window, labels=config.labels, cases=val_ids)
    if not train_samples:
        raise ValueError("the training cases hold no labelled slice")
    if world > 1 and not main_rank:
        torch.distributed.barrier()  # rank 0 fills the on-disk cache first
    say(f"preparing {len(train_samples)} training and {len(val_samples)} validation slices")
    prep_train = prepare(model, train_samples, cache, encode=config.cache_embeddings, progress=progress,
                         cancel=cancel, write_cache=main_rank)
    prep_val = prepare(model, val_samples, cache_dir_for(info.root), progress=progress, cancel=cancel,
                       write_cache=main_rank)
    if world > 1 and main_rank:
        torch.distributed.barrier()
    t_prepare = time.monotonic() - t0

    peft_decoder = adapters.wrap_decoder(model.mask_decoder, adapters.lora_config(
        config.lora_rank, config.lora_alpha, config.lora_dropout, config.targets)).to(device)
    prompt_encoder = None
    if config.train_prompt_encoder:
        prompt_encoder = copy.deepcopy(model.prompt_encoder).to(device).requires_grad_(True)
    step_module = _decoder_step_module(model, adapters.inner_decoder(peft_decoder), prompt_encoder)
    trainable = [p for p in step_module.parameters() if p.requires_grad]
    runner = step_module
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda" else None,
                                         find_unused_parameters=config.train_prompt_encoder)
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    per_rank = math.ceil(len(prep_train) / world)
    steps_per_epoch = math.ceil(per_rank / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total_steps, config.warmup))
    generator = torch.Generator().manual_seed(config.seed)
    loss_fn = _loss_function(config)
    use_amp = bool(config.amp and device.type == "cuda")
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    limits = _limits(prep_train)

    state_path = os.path.join(config.output, RESUME_FILE)
    history: List[Dict[str, Any]] = []
    best = {"epoch": 0, "dice": -1.0, "lora": adapters.lora_state(peft_decoder), "prompt": None}
    start_epoch = 1
    base_dice = mean_dice(prep_val, predict_masks(model, prep_val, window_margin=margin))
    if config.resume and os.path.isfile(state_path):
        saved = torch.load(state_path, map_location="cpu", weights_only=True)
        _check_resume(json.loads(saved["config"]), config, state_path)
        adapters.load_lora_state(peft_decoder, saved["lora"], state_path)
        if prompt_encoder is not None:
            prompt_encoder.load_state_dict(saved["prompt"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        history = json.loads(saved["history"])
        best = {"epoch": int(saved["best_epoch"]), "dice": float(saved["best_dice"]), "lora": saved["best_lora"],
                "prompt": saved.get("best_prompt")}
        start_epoch = int(saved["epoch"]) + 1
        say(f"resuming after epoch {saved['epoch']} from {state_path}")
    elif config.resume:
        say(f"nothing to resume in {config.output}: starting from epoch 1")
    say(f"base model validation Dice {base_dice:.4f}; {len(trainable)} trainable tensors, "
        f"{sum(p.numel() for p in trainable)} parameters; {steps_per_epoch} steps per epoch")

    card = _card(config, model, info, train_ids, val_ids, history, best, base_dice, len(train_samples),
                 len(val_samples), sum(p.numel() for p in trainable))
    t_train = time.monotonic()
    stale = sum(1 for h in history if h["epoch"] > best["epoch"])
    for epoch in range(start_epoch, config.epochs + 1):
        if config.patience and stale >= config.patience:
            break
        epoch_start = time.monotonic()
        step_module.train()
        order = torch.randperm(len(prep_train), generator=generator)
        if world > 1:  # equal-length shards, padded by wrapping around
            order = torch.cat([order, order[: per_rank * world - len(order)]])[rank::world]
        losses = []
        steps_start = time.monotonic()
        for step in range(steps_per_epoch):
            check_cancel(cancel)
            index = order[step * config.batch_size:(step + 1) * config.batch_size]
            embeddings = _batch_embeddings(model, prep_train, index)
            boxes = _jitter_boxes(prep_train.boxes[index], limits[index], config.box_jitter, generator)
            target = prep_train.targets[index].to(device, torch.float32)[:, None]
            points = None
            if config.point_prompts > 0 and float(torch.rand(1, generator=generator)) < config.point_prompts:
                coords, labels = _random_points(prep_train.targets[index], generator, model.spec.input_size)
                points = (coords.to(device), labels.to(device))
            with torch.autocast("cuda", dtype=amp_dtype, enabled=use_amp):
                logits, iou = runner(embeddings, boxes.to(device), points, window_margin=margin)
            logits, iou = logits.float(), iou.float()
            loss = loss_fn(logits, target)
            if config.iou_loss_weight > 0:
                with torch.no_grad():
                    hard = (logits > 0).float()
                    inter = (hard * target).flatten(1).sum(1)
                    union = ((hard + target) > 0).float().flatten(1).sum(1)
                    real_iou = inter / union.clamp(min=1.0)
                loss = loss + config.iou_loss_weight * torch.nn.functional.mse_loss(iou, real_iou)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses.append(float(loss.detach()))
            done = (epoch - 1) * steps_per_epoch + step + 1
            if config.log_every and (step + 1) % config.log_every == 0:
                report(progress, done, total_steps, f"epoch {epoch}/{config.epochs} step {step + 1}/"
                                                    f"{steps_per_epoch} loss {losses[-1]:.4f}")
        train_seconds = time.monotonic() - steps_start
        val = mean_dice(prep_val, predict_masks(model, prep_val, step_module, window_margin=margin))
        entry = {"epoch": epoch, "loss": float(np.mean(losses)), "val_dice": val,
                 "lr": float(scheduler.get_last_lr()[0]), "seconds": round(time.monotonic() - epoch_start, 3),
                 "train_seconds": round(train_seconds, 3)}
        history.append(entry)
        improved = val > best["dice"] + config.min_delta or not config.select_best
        stale = 0 if improved else stale + 1
        if improved:
            best = {"epoch": epoch, "dice": val, "lora": adapters.lora_state(peft_decoder),
                    "prompt": _state_copy(prompt_encoder)}
        card = _card(config, model, info, train_ids, val_ids, history, best, base_dice, len(train_samples),
                     len(val_samples), sum(p.numel() for p in trainable))
        if main_rank:
            if improved:
                _save_best(config.output, peft_decoder, prompt_encoder, best, card)
            _save_resume(state_path, config, epoch, peft_decoder, prompt_encoder, optimizer, scheduler, generator,
                         history, best)
        report(progress, epoch * steps_per_epoch, total_steps,
               f"epoch {epoch}/{config.epochs}: loss {entry['loss']:.4f}, validation Dice {val:.4f}")
        say(f"epoch {epoch}: loss {entry['loss']:.4f} val Dice {val:.4f} lr {entry['lr']:.2e} "
            f"({entry['seconds']:.1f}s)")
    if best["dice"] < base_dice:
        say(f"warning: the best epoch's validation Dice {best['dice']:.4f} is below the base model's "
            f"{base_dice:.4f}; more data or other settings may help")
    adapters.load_lora_state(peft_decoder, best["lora"], "best epoch")
    if prompt_encoder is not None and best["prompt"] is not None:
        prompt_encoder.load_state_dict(best["prompt"])
    card["stats"] = {"encoder_calls": prep_train.stats.get("encoder_calls", 0) + prep_val.stats["encoder_calls"],
                     "cache_hits": prep_train.stats.get("cache_hits", 0) + prep_val.stats["cache_hits"],
                     "seconds_prepare": round(t_prepare, 2), "seconds_train": round(time.monotonic() - t_train, 2),
                     "device": str(device), "world_size": world}
    if config.final_scores and main_rank:
        from .evaluate import score_prepared

        step_module.eval()
        card["scores"] = {"split": "val", "cases": val_ids,
                          "window_margin": margin,
                          "base": score_prepared(model, prep_val, window_margin=margin)["mean"],
                          "adapted": score_prepared(model, prep_val, step_module, window_margin=margin)["mean"]}
    if main_rank:
        _save_best(config.output, peft_decoder, prompt_encoder, best, card)
    if world > 1:
        torch.distributed.barrier()
        if started_group:
            torch.distributed.destroy_process_group()
    return card


def _state_copy(module) -> Optional[Dict[str, Any]]:
    return None if module is None else {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _save_best(output: str, peft_decoder, prompt_encoder, best: Dict[str, Any], card: Dict[str, Any]) -> None:
    """Write the best epoch's adapter (not the current weights) with the card."""
    from . import adapters

    current = adapters.lora_state(peft_decoder)
    adapters.load_lora_state(peft_decoder, best["lora"], "best epoch")
    current_prompt = _state_copy(prompt_encoder)
    if prompt_encoder is not None and best["prompt"] is not None:
        prompt_encoder.load_state_dict(best["prompt"])
    adapters.save_adapter(output, peft_decoder, card, prompt_encoder)
    adapters.load_lora_state(peft_decoder, current, "current epoch")
    if prompt_encoder is not None:
        prompt_encoder.load_state_dict(current_prompt)


def _save_resume(path: str, config: TrainConfig, epoch: int, peft_decoder, prompt_encoder, optimizer, scheduler,
                 generator, history, best) -> None:
    import torch

    from . import adapters

    state = {"config": json.dumps(config.to_dict()), "epoch": epoch, "lora": adapters.lora_state(peft_decoder),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "history": json.dumps(history),
             "best_epoch": best["epoch"], "best_dice": best["dice"], "best_lora": best["lora"]}
    if prompt_encoder is not None:
        state["prompt"] = _state_copy(prompt_encoder)
        if best["prompt"] is not None:
            state["best_prompt"] = best["prompt"]
    from .dataset import atomic_write

    atomic_write(path, lambda temp: torch.save(state, temp))


def _check_resume(saved: Dict[str, Any], config: TrainConfig, path: str) -> None:
    now = config.to_dict()
    changed = [k for k in _RESUME_KEYS if k != "epochs" and saved.get(k) != now.get(k)]
    if changed:
        raise ValueError(f"cannot resume from {path}: settings changed since it was written: " +
                         ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in changed))


def _card(config: TrainConfig, model, info, train_ids, val_ids, history, best, base_dice, n_train, n_val,
          n_params) -> Dict[str, Any]:
    import torch

    from .adapters import CARD_FORMAT

    return {
        "format": CARD_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "base_model": {"name": model.spec.name, "fingerprint": model.fingerprint,
                       "checkpoint": getattr(model, "checkpoint", None) or config.checkpoint,
                       "checkpoint_sha256": model.fingerprint.split(":", 1)[-1]},
        "dataset": {"path": info.root, "train_cases": train_ids, "val_cases": val_ids,
                    "train_slices": n_train, "val_slices": n_val,
                    "labels": {str(k): v for k, v in info.labels.items()}},
        "hyperparameters": config.to_dict(),
        "lora": {"rank": config.lora_rank, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
                 "targets": list(config.targets), "trainable_parameters": n_params,
                 "prompt_encoder_trained": config.train_prompt_encoder},
        "inference": {"axis": config.axis, "window": config.window, "multimask": False,
                      "window_margin": config.window_margin},
        "history": history,
        "base_val_dice": base_dice,
        "best_epoch": best["epoch"],
        "best_val_dice": best["dice"] if best["epoch"] else None,
        "software": {"torch": torch.__version__, "peft": _version("peft"), "monai": _version("monai")},
    }


def _version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


# ---------------------------------------------------------------- command line


def add_arguments(parser) -> None:
    defaults = TrainConfig(dataset="", output="")
    parser.add_argument("--dataset", required=True, help="dataset folder written by 'export'")
    parser.add_argument("--output", required=True, help="adapter folder (safetensors + model_card.json)")
    parser.add_argument("--model", default=defaults.model, help="base model (litemedsam, medsam, sam_vit_b, ...)")
    parser.add_argument("--checkpoint", help="checkpoint file of the base model (not needed for litemedsam)")
    parser.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:1")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lora-rank", type=int, default=defaults.lora_rank)
    parser.add_argument("--lora-alpha", type=float, default=defaults.lora_alpha)
    parser.add_argument("--lora-dropout", type=float, default=defaults.lora_dropout)
    parser.add_argument("--targets", nargs="+", default=list(defaults.targets), help="decoder Linear layers for LoRA")
    parser.add_argument("--train-prompt-encoder", action="store_true", help="also train the prompt encoder")
    parser.add_argument("--loss", default=defaults.loss, choices=LOSSES)
    parser.add_argument("--iou-loss-weight", type=float, default=defaults.iou_loss_weight)
    parser.add_argument("--box-jitter", type=float, default=defaults.box_jitter)
    parser.add_argument("--point-prompts", type=float, default=defaults.point_prompts,
                        help="probability of adding a positive point to a training box")
    parser.add_argument("--warmup", type=float, default=defaults.warmup, help="share of steps with linear warmup")
    parser.add_argument("--patience", type=int, default=defaults.patience, help="early stopping (0 = off)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT/resume_state.pt")
    parser.add_argument("--axis", default=defaults.axis, choices=("axial", "coronal", "sagittal"))
    parser.add_argument("--window", default=defaults.window)
    parser.add_argument("--labels", nargs="+", type=int, help="label values to train on (default all)")
    from .segment_cli import window_margin_arg

    parser.add_argument("--decode-window", type=window_margin_arg, default=defaults.window_margin,
                        metavar="auto|full|N",
                        help="train and validate decoding only the image tokens within N tokens (1/64 of the slice) "
                             "of each box, as the segmenter does at inference; full decodes the whole slice; "
                             "auto = 4 on CPU (several times faster), full on CUDA")


def config_from_args(args) -> TrainConfig:
    return TrainConfig(dataset=args.dataset, output=args.output, model=args.model, checkpoint=args.checkpoint,
                       device=args.device, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                       batch_size=args.batch_size, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                       lora_dropout=args.lora_dropout, targets=tuple(args.targets),
                       train_prompt_encoder=args.train_prompt_encoder, loss=args.loss,
                       iou_loss_weight=args.iou_loss_weight, box_jitter=args.box_jitter,
                       point_prompts=args.point_prompts, warmup=args.warmup, patience=args.patience, seed=args.seed,
                       amp=not args.no_amp, resume=args.resume, axis=args.axis, window=args.window,
                       labels=args.labels, window_margin=args.decode_window)


def main(args) -> int:
    import sys

    from .progress import StderrBar

    card = train(config_from_args(args), progress=StderrBar(), log=lambda text: print(text, file=sys.stderr))
    if int(os.environ.get("RANK", "0")) == 0:
        scores = card.get("scores", {})
        print(f"adapter written to {os.path.abspath(args.output)} (best epoch {card['best_epoch']})")
        for name in ("base", "adapted"):
            if name in scores:
                row = scores[name]
                print(f"{name:8s} Dice {row['dice']:.4f}  IoU {row['iou']:.4f}  HD95 {row['hd95']:.2f} mm  "
                      f"NSD {row['nsd']:.4f}")
    return 0
