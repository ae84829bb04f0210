"""Fine-tuning SAM's mask decoder with LoRA, and the decoder step training and evaluation share.

- ``config``: ``TrainConfig`` and its checks;
- ``samples``: slices as decoder-ready tensors, with the embedding disk cache;
- ``decoder_step`` and ``prediction``: decoding prepared slices (windowed as at inference),
  their masks and per-case scores, for the base model or an adapted decoder;
- ``boxes``: box jitter and loose boxes, positive points;
- ``trainer``: ``train`` and its ``Trainer`` (set-up, resume, epoch, checkpoint, finish), with
  ``optimisation`` (loss, schedule), ``state`` (best adapter, resume state), ``card`` (the
  model card) and ``distributed`` (torchrun);
- ``cli``: the ``train`` command.

    from SAMFineTuneLib.training import TrainConfig, train
    card = train(TrainConfig(dataset="DATASET", output="ADAPTER", epochs=10))
"""
from ..progress import Cancelled
from .boxes import box_limits, jitter_boxes, loose_boxes, random_points
from .cli import add_arguments, config_from_args, main
from .config import RESUME_FILE, TrainConfig, check_config
from .decoder_step import DecoderStep
from .prediction import predict_masks, score_prepared
from .samples import LOW_RES, Prepared, batch_embeddings, cache_dir_for, cache_fingerprint, embedding_key, prepare
from .trainer import Trainer, train

__all__ = [
    "Cancelled", "DecoderStep", "LOW_RES", "Prepared", "RESUME_FILE", "TrainConfig", "Trainer", "add_arguments",
    "batch_embeddings", "box_limits", "cache_dir_for", "cache_fingerprint", "check_config", "config_from_args",
    "embedding_key", "jitter_boxes", "loose_boxes", "main", "predict_masks", "prepare", "random_points",
    "score_prepared", "train",
]
