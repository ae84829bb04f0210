"""Every option SAMFineTune offers, defined once: models, windows, axes, box modes, devices,
encoder backends and precisions, and the defaults of a segmentation.

The panel, the Slicer-side logic, ``batch.py``, the worker and the command line all read their
choices and defaults from here. It imports only the standard library, so Slicer can import it
before torch is installed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple


@dataclass(frozen=True)
class ModelSpec:
    """What differs between SAM variants: encoder, input size and intensity normalisation."""

    name: str
    title: str  # as the panel lists it
    input_size: int
    normalisation: str  # "unit": [0,1] per channel (MedSAM family); "imagenet": SAM's pixel mean/std on 0..255
    encoder: str  # "tiny_vit" or a segment-anything registry key (vit_b, vit_l, vit_h)
    needs_checkpoint: bool
    multimask_default: bool  # MedSAM-family decoders were trained single-mask; SAM picks among three
    # SAM's decoder learned clicks; the MedSAM family's was trained on boxes alone and answers a click
    # with nothing useful, so there a click edits the box instead (refinement).
    point_prompts: bool


MODEL_SPECS: Dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("litemedsam", "LiteMedSAM (built in, CPU friendly)", 256, "unit", "tiny_vit", False, False, False),
        ModelSpec("medsam", "MedSAM (checkpoint)", 1024, "unit", "vit_b", True, False, False),
        ModelSpec("sam_vit_b", "SAM ViT-B (checkpoint)", 1024, "imagenet", "vit_b", True, True, True),
        ModelSpec("sam_vit_l", "SAM ViT-L (checkpoint)", 1024, "imagenet", "vit_l", True, True, True),
        ModelSpec("sam_vit_h", "SAM ViT-H (checkpoint)", 1024, "imagenet", "vit_h", True, True, True),
    )
}
DEFAULT_MODEL = "litemedsam"


def get_spec(name: str) -> ModelSpec:
    if name not in MODEL_SPECS:
        raise ValueError(f"unknown model '{name}'; choose one of: {', '.join(MODEL_SPECS)}")
    return MODEL_SPECS[name]


#: Intensity windows as (width, level) in Hounsfield units.
WINDOW_PRESETS: Dict[str, Tuple[float, float]] = {
    "lung": (1500.0, -600.0),
    "mediastinum": (350.0, 50.0),
    "abdomen": (400.0, 40.0),
    "bone": (1800.0, 400.0),
    "brain": (80.0, 40.0),
}
#: Every window name the engine takes (besides "W/L" numbers such as "400/40"), with its label.
WINDOWS: Dict[str, str] = {
    "auto": "auto (abdomen on CT; otherwise around the ROI, or as an adapter learned)",
    **{name: name for name in WINDOW_PRESETS},
    "percentile": "percentile (0.5-99.5% of the volume, MRI)",
    "roi": "around the ROI (0.5-99.5% of its neighbourhood, MRI)",
}
#: How far the "roi" window's neighbourhood reaches past the ROI on each side, as a share of its
#: extent (rounded to a power of two voxels, ``windows.roi_neighbourhood``).
ROI_WINDOW_CONTEXT = 0.5

#: Slicing axis -> the array axis of a KJI volume it steps along.
AXES: Dict[str, int] = {"axial": 0, "coronal": 1, "sagittal": 2}

#: How one ROI prompts each slice. "auto" is crossed boxes for the base model, which scored highest
#: on the 3D accuracy benchmark at every ROI margin, and with an adapter the mode its training chose
#: on its validation cases (``training.box_mode_choice``): crossed boxes (their planes decoded by the
#: base model) scored higher with hippocampus adapters of 1 case, about as tracked boxes with those
#: of 5 and 10 (docs/accuracy.md).
BOX_MODES: Dict[str, str] = {
    "auto": "auto (crossed; with an adapter, the one its training chose)",
    "tracked": "tracked (box follows the structure)",
    "fixed": "fixed (ROI box on every slice)",
    "crossed": "crossed (boxes from planes across the ROI)",
}


def check_box_mode(box_mode: str) -> None:
    """A box mode that is not in ``BOX_MODES`` is refused with the ones there are."""
    if box_mode not in BOX_MODES:
        raise ValueError(f"unknown box mode '{box_mode}'; choose one of: {', '.join(BOX_MODES)}")


#: What "auto" box mode runs for the base model (docs/accuracy.md, "Crossed boxes").
BASE_BOX_MODE = "crossed"
#: The box modes training chooses between for an adapter, the first where its card names none.
ADAPTER_BOX_MODES = ("tracked", "crossed")


def card_box_mode(card: Dict, adapter_dir: str) -> str:
    """The box mode an adapter's card asks "auto" to run (``inference.box_mode``), tracked where it
    names none; a ValueError naming the adapter for anything else."""
    asked = card.get("inference", {}).get("box_mode", ADAPTER_BOX_MODES[0])
    if asked not in ADAPTER_BOX_MODES:
        raise ValueError(f"adapter {adapter_dir}: its model card sets box mode {asked!r} (inference.box_mode), "
                         f"which is not one of {', '.join(ADAPTER_BOX_MODES)}; remove it or train the adapter again")
    return asked


#: The crossed box mode (``crossing``): where the planes along each other axis cross the ROI, as
#: fractions of its extent there, put on a grid about ``grid`` times finer than that extent (so a
#: nudged box reuses them), how many pixels each slice's box is grown by (chosen on the 3D accuracy
#: benchmark, docs/accuracy.md), and the fewest slices a ROI must span for planes across it to show
#: a structure's run (on fewer, such a plane is a line or two of pixels, and the ROI is tracked).
CROSSING_DEFAULTS: Dict[str, Any] = {"planes": (1 / 3, 2 / 3), "grid": 6, "grow_px": 2, "min_slices": 3}

DEVICES: Dict[str, str] = {"auto": "auto (GPU when there is one)", "cpu": "CPU", "cuda": "GPU (CUDA)"}

#: The image encoder's number format: auto = bf16 on CUDA, float32 on a CPU.
PRECISIONS: Tuple[str, ...] = ("auto", "float32", "bf16")
#: Who runs the image encoder, with its label: auto = OpenVINO on a CPU where it is installed (the
#: same embeddings as PyTorch to 2e-6, 2-3x faster), PyTorch on CUDA; openvino runs on a CPU only.
BACKENDS: Dict[str, str] = {
    "auto": "auto (OpenVINO on a CPU, PyTorch on a GPU)",
    "torch": "PyTorch",
    "openvino": "OpenVINO (CPU)",
}

#: How the engine runs a model, besides which one: the decode window ("auto": 4 tokens around
#: each box on a CPU, the whole slice on CUDA; None: the whole slice; or a whole number of
#: tokens), the image encoder's precision and backend, and whether it is compiled.
ENGINE_DEFAULTS: Dict[str, Any] = {"window_margin": "auto", "precision": "auto", "backend": "auto",
                                   "compile": False}

#: What a segmentation takes besides the volume and its box, and the defaults (names as in
#: ``Segmenter.segment``, the worker protocol and the Slicer-side logic).
SEGMENT_DEFAULTS: Dict[str, Any] = {
    "model": DEFAULT_MODEL,
    "checkpoint": None,
    "adapter": None,
    "device": "auto",
    "precision": ENGINE_DEFAULTS["precision"],
    "backend": ENGINE_DEFAULTS["backend"],
    "axis": "axial",
    "window": "auto",
    "box_mode": "auto",
    "keep_largest": True,
    "fill_holes": True,
    "zoom": False,
    "triplanar": False,
}

#: Prompt options a user may turn on, with their labels (the panel's tooltips), both off by default
#: (docs/accuracy.md): zoom lost on the 3D accuracy benchmark; tri-planar won on it but for vessels,
#: at about three times the encoding, more than the default mode may cost.
PROMPT_OPTIONS: Dict[str, str] = {
    "zoom": "encode a crop around the ROI (twice its size) instead of the whole slice, "
            "so a small structure reaches the encoder larger",
    "triplanar": "segment along all three axes and keep the voxels two of them agree on: "
                 "more accurate from the base model on most structures, at about three times the encoding",
}

#: How tracked boxes start and follow a structure (``tracking.TrackingOptions``, whose docstring
#: says what each one does), chosen on the 3D accuracy benchmark (docs/accuracy.md).
TRACKING_DEFAULTS: Dict[str, Any] = {
    "margin": 0.05,
    "min_margin_px": 2,
    "min_area_fraction": 0.02,
    "max_growth": 2.0,
    "min_overlap": 0.3,
    "max_intensity_shift": 0.15,
    "intensity_spread": 1.5,
    "seed_candidates": 5,
    "seed_span": (0.1, 0.9),
    "seed_shrink": (),
    "seed_refine": 0,
    "seed_area_weight": 0.0,
    "fixed_fallback": 0.0,
    "mask_prompt": False,
    "min_score": None,
    "patience": 0,
    "own_box_px": 0,
    "smooth_mm": 0.0,
}

#: Dataset splits, by case (and patient): training, validation (early stopping, scores) and test.
SPLITS: Tuple[str, ...] = ("train", "val", "test")
#: Slice formats an export writes beside the MSD/nnU-Net layout (which it always writes).
EXPORT_FORMATS: Tuple[str, ...] = ("msd", "finetune-sam", "coco")
#: Fine-tuning losses (monai's DiceCE or DiceFocal on the mask logits).
LOSSES: Tuple[str, ...] = ("dicece", "dicefocal")
#: The share of training steps that simulate clicks when a user asks an adapter to learn them
#: (``train --click-prompts``, the panel's "learn to answer clicks"); see docs/finetuning.md.
CLICK_TRAINING_SHARE = 0.5
#: Fine-tuning defaults chosen on the hippocampus benchmark (docs/finetuning.md, "Choosing the
#: defaults"): the prompts tracking asks with (shares of tracked boxes and loose ROIs, slices past
#: each end) lifted Dice from one ROI far more than they cost with reference boxes; the best epoch
#: came at 3-6 of 6; LoRA dropout cost 15% of a CPU step and was not needed; a learning rate of
#: 3e-3 beat 1e-3 in 3 of 3 draws (1e-2 diverged, 3e-4 learned too little); loose ROIs on 0.45
#: of the steps instead of 0.3 gained 0.015 from one ROI, most on the weakest draws, for 0.008 with
#: reference boxes, over 9 trainings; keeping the latest epoch within 0.01 of the best validation
#: Dice instead of the best gained 0.013 from one ROI over 6 trainings (the last epoch in all). An
#: epoch of at least 36 steps (10 hippocampus cases give 37-38), so that a few cases are learnt as
#: long as ten: one ROI rose in every draw, 0.341 -> 0.594 on 1 case, 0.572 -> 0.745 on 3, 0.726 -> 0.751 on 5.
#: An adapter that lowers a validation case by more than 0.05 is not written (``training.harm_check``).
TRAINING_DEFAULTS: Dict[str, Any] = {"epochs": 6, "lr": 3e-3, "lora_dropout": 0.0, "tracked_prompts": 0.3,
                                     "roi_prompts": 0.45, "end_slices": 2, "keep_within": 0.01, "max_case_drop": 0.05,
                                     "average_last": 1, "min_epoch_steps": 36}
#: The tracking margins (``TrackingOptions.min_margin_px``) tried for a trained adapter on its
#: validation cases, the default first (``training.tracking_choice``; docs/finetuning.md).
ADAPTER_TRACKING_MARGINS_PX: Tuple[int, ...] = (TRACKING_DEFAULTS["min_margin_px"], 3, 4, 6)
#: How an adapter trained on loose ROIs tracks (``TrackingOptions``; docs/finetuning.md): its seed
#: candidates ranked by predicted IoU x mask area, which kept tracking off the wrong tissue
#: (``seed_area_weight``); and below a 3D Dice of ``fixed_fallback`` between its tracked result and
#: its answer to the ROI on every slice, the latter, above it what both keep; then each kept slice
#: decoded again with its own mask's box grown by ``own_box_px`` (the prompt it was trained best on);
#: the result's surface smoothed in 3D by ``smooth_mm`` (kept unless it lowers the validation Dice);
#: and the intensity stop rule without the structure's spread (``intensity_spread``): such an
#: adapter learnt where a structure ends, and with the wider rule it scored lower from one ROI
#: (0.827 -> 0.823 on 30 hippocampus test cases: 15 lower, none higher).
ADAPTER_ROI_TRACKING: Dict[str, float] = {"seed_area_weight": 1.0, "fixed_fallback": 0.5, "own_box_px": 2,
                                          "smooth_mm": 1.0, "intensity_spread": 0.0}
#: Voxels between a structure and the ROI it is segmented from when an adapter is judged from
#: one ROI (a user draws it a little loose): the benchmarks' default and the tracking choice's.
VALIDATION_ROI_MARGIN = 3


def comparison_roi_margin(card: Dict[str, Any]) -> Optional[int]:
    """How a retrained adapter is weighed against the one in use on its validation cases (its
    model ``card``): from one ROI (this margin), as inference starts, where its run chose a
    tracking margin, so those cases hold structures tracking follows; None, the reference box on
    every slice, where it did not (2D images)."""
    return VALIDATION_ROI_MARGIN if card.get("tracking_choice") else None


#: The options that identify a loaded model: a change among them means loading another one (the
#: encoder's precision and backend are part of the loaded model).
MODEL_KEYS: Tuple[str, ...] = ("model", "checkpoint", "device", "precision", "backend")
