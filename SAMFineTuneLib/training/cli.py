"""The ``train`` command: ``python -m SAMFineTuneLib train --dataset DATASET --output ADAPTER ...``."""
from __future__ import annotations

import os

from ..catalogue import CLICK_TRAINING_SHARE, LOSSES
from ..cli_args import (add_axis_argument, add_decode_window_argument, add_encoder_arguments, add_model_arguments,
                        add_window_argument)
from .config import TrainConfig


def add_arguments(parser) -> None:
    defaults = TrainConfig(dataset="", output="")
    parser.add_argument("--dataset", required=True, help="dataset folder written by 'export'")
    parser.add_argument("--output", required=True, help="adapter folder (safetensors + model_card.json)")
    add_model_arguments(parser)
    add_encoder_arguments(parser)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--min-epoch-steps", type=int, default=defaults.min_epoch_steps,
                        help="an epoch is every training slice once or this many steps, whichever is more, so "
                             "that a few cases are learnt as long as ten (0: one pass)")
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
    parser.add_argument("--click-prompts", type=float, default=defaults.click_prompts,
                        help="share of steps that train clicks: a simulated user clicks where the decode is wrong "
                             f"(the adapter then answers clicks when correcting a slice; the panel uses "
                             f"{CLICK_TRAINING_SHARE})")
    parser.add_argument("--tracked-prompts", type=float, default=defaults.tracked_prompts,
                        help="share of training slices prompted with tracking's box (a neighbour's mask box + margin)")
    parser.add_argument("--roi-prompts", type=float, default=defaults.roi_prompts,
                        help="share of training slices prompted with the structure's loose ROI rectangle")
    parser.add_argument("--roi-margin", type=float, default=defaults.roi_margin,
                        help="ROI prompts: each edge moves out by up to this fraction of the ROI's side")
    parser.add_argument("--end-slices", type=int, default=defaults.end_slices,
                        help="slices past each end of the structure trained to come back empty (tracking stops)")
    parser.add_argument("--no-tracking-choice", action="store_true",
                        help="keep the default tracking margin instead of choosing one for the adapter on the "
                             "validation cases from one ROI (a few seconds per case)")
    parser.add_argument("--average-last", type=int, default=defaults.average_last,
                        help="the adapter is the mean weights of the last N epochs when they validate as well "
                             "as an epoch would be kept (1: the kept epoch alone)")
    parser.add_argument("--max-case-drop", type=float, default=defaults.max_case_drop,
                        help="the adapter is written only if no validation case's Dice falls more than this below "
                             "the base model's; else the other epoch the tracking choice weighed, if it "
                             "passes, or the base model is")
    parser.add_argument("--warmup", type=float, default=defaults.warmup, help="share of steps with linear warmup")
    parser.add_argument("--patience", type=int, default=defaults.patience, help="early stopping (0 = off)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT/resume_state.pt")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the adapter OUTPUT already holds (a new run refuses such a folder otherwise)")
    add_axis_argument(parser, defaults.axis, "slice direction of every case; default: each case's own (the axis "
                                             "it was segmented along, recorded at export), else axial")
    add_window_argument(parser, defaults.window)
    parser.add_argument("--labels", nargs="+", type=int, help="label values to train on (default all)")
    add_decode_window_argument(
        parser, "train and validate decoding only the image tokens within N tokens (1/64 of the slice) of each box, "
                "as the segmenter does at inference; full decodes the whole slice; auto = 4 on CPU (several times "
                "faster), full on CUDA")


def config_from_args(args) -> TrainConfig:
    return TrainConfig(dataset=args.dataset, output=args.output, model=args.model, checkpoint=args.checkpoint,
                       device=args.device, precision=args.precision, backend=args.backend, epochs=args.epochs,
                       min_epoch_steps=args.min_epoch_steps, lr=args.lr, weight_decay=args.weight_decay,
                       batch_size=args.batch_size, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                       lora_dropout=args.lora_dropout, targets=tuple(args.targets),
                       train_prompt_encoder=args.train_prompt_encoder, loss=args.loss,
                       iou_loss_weight=args.iou_loss_weight, box_jitter=args.box_jitter,
                       point_prompts=args.point_prompts, click_prompts=args.click_prompts,
                       tracked_prompts=args.tracked_prompts,
                       roi_prompts=args.roi_prompts, roi_margin=args.roi_margin, end_slices=args.end_slices,
                       warmup=args.warmup, patience=args.patience, seed=args.seed, average_last=args.average_last,
                       max_case_drop=args.max_case_drop,
                       amp=not args.no_amp, resume=args.resume, overwrite=args.overwrite, axis=args.axis,
                       window=args.window,
                       labels=args.labels, window_margin=args.decode_window,
                       choose_tracking=not args.no_tracking_choice)


def main(args) -> int:
    from ..progress import StderrBar
    from .card import kept_text
    from .trainer import train

    bar = StderrBar()
    card = train(config_from_args(args), progress=bar, log=bar.line)
    if int(os.environ.get("RANK", "0")) == 0:
        scores = card.get("scores", {})
        print(f"adapter written to {os.path.abspath(args.output)} ({kept_text(card)} kept)")
        for name in ("base", "adapted"):
            if name in scores:
                row = scores[name]
                print(f"{name:8s} Dice {row['dice']:.4f}  IoU {row['iou']:.4f}  HD95 {row['hd95']:.2f} mm  "
                      f"NSD {row['nsd']:.4f}")
    return 0
