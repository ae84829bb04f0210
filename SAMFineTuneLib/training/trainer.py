"""LoRA fine-tuning of SAM's mask decoder on an exported dataset.

LoRA (peft) wraps the decoder's attention projections and MLPs; the loss is monai's DiceCE
(or DiceFocal) with an optional IoU-head term; every slice is prompted as inference will prompt
it (``prompts``: jittered reference boxes, tracking's boxes, loose ROI rectangles, and empty
targets just past the structure's ends, where tracking must stop); a positive point can be
added to the box. Training and validation decode as the Segmenter does at inference
(``window_margin``: on a CPU only the image tokens near each box, which makes an epoch several
times faster; on CUDA the whole slice) from embeddings cached on disk (``samples``). An epoch is
every training slice once, or ``min_epoch_steps`` when that is more. Each epoch ends with the
validation Dice on the held-out cases: the best adapter is kept, training stops when it has not
improved for ``patience`` epochs; the output folder is replaced as a whole after every epoch,
under a lock (``adapter_folders``). Linear warmup then cosine decay; bf16 autocast on CUDA only;
seeded runs reproduce. A run resumes after a crash or a cancel (``state``) and spreads over GPUs
under torchrun (``distributed``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .. import adapters
from ..adapter_folders import FolderLock, check_output_folder, settle
from ..metrics import mean_dice
from ..progress import check_cancel, report
from . import clicks, distributed
from .boxes import random_points
from .card import model_card
from .config import RESUME_FILE, TrainConfig, check_config
from .decoder_step import DecoderStep
from .eta import Eta
from .kept_adapter import KeptAdapter
from .optimisation import epochs_since_best, iou_head_loss, keeps_epoch, loss_function, lr_schedule
from .prediction import predict_masks
from .prompts import PromptSampler
from .samples import batch_embeddings, cache_dir_for, prepare
from .slices import load_slices, split_cases
from .state import best_from, load_weights, resume_state, run_start, state_copy, write_output
from .tracking_choice import card_tracking


def train(config: TrainConfig, progress=None, cancel=None, log=None, model=None) -> Dict[str, Any]:
    """Fine-tune a LoRA adapter; returns the model card (also written to ``config.output``).

    ``model`` lets a caller that already holds the base model (the worker, tests) reuse it;
    it is not modified. ``progress(done, total, message)`` is called per prepared slice, per
    ``log_every`` steps and per epoch; ``cancel()`` returning True raises ``Cancelled`` (the
    last finished epoch stays resumable).
    """
    return Trainer(config, model=model, progress=progress, cancel=cancel, log=log).fit()


def check_start(config: TrainConfig, device=None) -> Tuple[Any, List[str], List[str], Any, Optional[Dict[str, Any]]]:
    """What a run of ``config`` starts from, all known before the model loads: the dataset, its
    training and validation cases, the decode window on ``device`` (the model's; default
    ``config.device``) and the resume state it continues (None: epoch 1). Or its refusal, a
    ValueError (``state.run_start``), which a caller that loads the model first (the worker) can
    give at once; a refused run leaves the output folder as it was."""
    from ..dataset import read_dataset
    from ..decoding import resolve_window_margin
    from ..models.loader import resolve_device

    check_config(config)
    info = read_dataset(config.dataset)
    unknown = sorted(set(config.labels or ()) - set(info.labels))
    if unknown:
        raise ValueError(f"labels {unknown} are not in dataset {info.root}, which holds "
                         f"{', '.join(f'{value} ({name})' for value, name in sorted(info.labels.items()))}; "
                         "give labels it holds, or none for all")
    train_ids, val_ids = split_cases(config, info)
    margin = resolve_window_margin(config.window_margin, device if device is not None else
                                   resolve_device(config.device))
    saved = run_start(dataclasses.replace(config, window_margin=margin), _cases(train_ids, val_ids))
    return info, train_ids, val_ids, margin, saved


def _cases(train_ids: List[str], val_ids: List[str]) -> Dict[str, List[str]]:
    """The cases a run trains and validates on, as its resume state records them."""
    return {"train": list(train_ids), "val": list(val_ids)}


class Trainer(KeptAdapter):
    """One fine-tuning run in the steps ``fit`` takes: set-up (the constructor: data, slices,
    LoRA, optimiser), ``resume``, then per epoch ``run_epoch`` and ``checkpoint``, and ``finish``.

    ``train_set`` and ``val_set`` are the prepared slices (``samples.Prepared``); a caller may
    give ``train_set`` other embeddings before ``fit`` (say, the encoder run at every step)."""

    def __init__(self, config: TrainConfig, model=None, progress=None, cancel=None, log=None):
        check_config(config)
        self.rank, self.world, local_rank = distributed.ranks()
        config, self._started_group = distributed.start(config, self.world, local_rank)
        self.main_rank = self.rank == 0
        self.progress = progress if self.main_rank else None
        self.cancel = cancel
        self.say = (log if self.main_rank else None) or (lambda text: None)
        self.lock: Optional[FolderLock] = None
        if self.main_rank:  # before any slow work: one run per output folder, and never a user's other files
            settle(config.output)
            check_output_folder(config.output, adapters.ADAPTER_FILES + (RESUME_FILE,))
            self.lock = FolderLock(config.output).acquire()
        try:
            self._set_up(config, model)
        except BaseException:
            self.close()
            raise

    def _set_up(self, config: TrainConfig, model) -> None:
        from ..models import load_model

        # checked before the slow part (under the folder's lock): a refused run leaves the folder as it was
        self.info, self.train_ids, self.val_ids, margin, self.resume_from = check_start(
            config, model.device if model is not None else None)
        self.model = model if model is not None else load_model(config.model, checkpoint=config.checkpoint,
                                                                device=config.device, precision=config.precision,
                                                                backend=config.backend)
        self.device = self.model.device
        adapters.check_targets(self.model.mask_decoder, config.targets)  # before the slow part
        # From here on the config holds the margin and precision really used (card, resume state).
        self.config = dataclasses.replace(config, precision=self.model.precision, window_margin=margin)
        self.margin = self.config.window_margin
        torch.manual_seed(config.seed)
        self._prepare_slices()
        self._build_lora()
        self._build_optimiser()
        self.state_path = os.path.join(config.output, RESUME_FILE)
        self.history: List[Dict[str, Any]] = []
        self.recent: List[Dict[str, Any]] = []  # the last epochs' weights, for the final average
        self.averaged: Optional[Dict[str, Any]] = None
        self.start_epoch = 1
        self.resume_saved: Optional[Dict[str, Any]] = None
        self.base_dice = mean_dice(self.val_set.samples,
                                   predict_masks(self.model, self.val_set, window_margin=self.margin))
        # Epoch 0 is the base model (LoRA starts as the identity): an epoch is kept only if it
        # beats it on the validation cases, so a run on too few cases cannot leave a harmful adapter.
        self.base_weights = self._weights()
        self.best = dict(self.base_weights, epoch=0, dice=self.base_dice if config.select_best else -1.0)

    def close(self) -> None:
        """Release the output folder (``fit`` does when it ends, however it ends)."""
        if self.lock is not None:
            self.lock.release()

    # ------------------------------------------------------------ set-up

    def _prepare_slices(self) -> None:
        """Per-slice samples of both splits, embedded in one pass (rank 0 fills the disk cache
        first), and the prompts each training slice can be given."""
        config, started = self.config, time.monotonic()
        train_samples = load_slices(self.info, self.train_ids, config, ends=True)
        val_samples = load_slices(self.info, self.val_ids, config, ends=False)
        if not any(s.mask.any() for s in train_samples):
            raise ValueError("the training cases hold no labelled slice")
        if not self.main_rank:
            distributed.barrier(self.world)
        self.say(f"preparing {len(train_samples)} training and {len(val_samples)} validation slices")
        both = prepare(self.model, train_samples + val_samples, cache_dir_for(self.info.root), progress=self.progress,
                       cancel=self.cancel, write_cache=self.main_rank)
        if self.main_rank:
            distributed.barrier(self.world)
        split = len(train_samples)
        self.train_set, self.val_set = both.part(slice(0, split)), both.part(slice(split, None))
        self.slice_stats = both.stats
        self.sampler = PromptSampler(self.train_set, config.tracked_prompts, config.roi_prompts, config.box_jitter,
                                     config.roi_margin)
        self.seconds_prepare = time.monotonic() - started

    def _build_lora(self) -> None:
        """A LoRA-wrapped copy of the decoder (and a trainable prompt encoder when asked for)."""
        config, device = self.config, self.device
        self.peft_decoder = adapters.wrap_decoder(self.model.mask_decoder, adapters.lora_config(
            config.lora_rank, config.lora_alpha, config.lora_dropout, config.targets)).to(device)
        self.prompt_encoder = None
        if config.train_prompt_encoder:
            self.prompt_encoder = copy.deepcopy(self.model.prompt_encoder).to(device).requires_grad_(True)
        self.step_module = DecoderStep(self.model, adapters.inner_decoder(self.peft_decoder), self.prompt_encoder)
        self.trainable = [p for p in self.step_module.parameters() if p.requires_grad]
        self.runner = distributed.wrap(self.step_module, device, self.world, config.train_prompt_encoder)

    def _build_optimiser(self) -> None:
        config, device = self.config, self.device
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.lr, weight_decay=config.weight_decay)
        self.epoch_samples = max(len(self.train_set), config.min_epoch_steps * config.batch_size)
        self.per_rank = math.ceil(self.epoch_samples / self.world)
        self.steps_per_epoch = math.ceil(self.per_rank / config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule(self.total_steps,
                                                                                       config.warmup))
        self.generator = torch.Generator().manual_seed(config.seed)
        self.loss_fn = loss_function(config)
        self.use_amp = bool(config.amp and device.type == "cuda")
        self.amp_dtype = torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)

    # ------------------------------------------------------------ the run

    def fit(self) -> Dict[str, Any]:
        """Resume if asked, train until the last epoch or early stopping, finish; the model card.
        The output folder is released however this ends."""
        try:
            config = self.config
            self.resume()
            self.say(f"base model validation Dice {self.base_dice:.4f}; {len(self.trainable)} trainable tensors, "
                     f"{sum(p.numel() for p in self.trainable)} parameters; {self.steps_per_epoch} steps per epoch "
                     f"on {self.sampler.counts()['slices']} slices and {self.sampler.counts()['end_slices']} "
                     "slices past the structure's ends")
            self.card = self._card()
            self.train_started = time.monotonic()
            self.eta = Eta(self.total_steps - (self.start_epoch - 1) * self.steps_per_epoch)
            for epoch in range(self.start_epoch, config.epochs + 1):
                if config.patience and epochs_since_best(self.history, self.base_dice, config) >= config.patience:
                    break
                self.checkpoint(self.run_epoch(epoch))
            return self.finish()
        finally:
            self.close()

    def resume(self) -> None:
        """With ``resume``, continue from the state the last finished epoch saved (read and checked
        by the set-up), if any."""
        config, path, saved = self.config, self.state_path, self.resume_from
        if not config.resume:
            return
        if saved is None:
            self.say(f"nothing to resume in {config.output}: starting from epoch 1")
            return
        load_weights(self.peft_decoder, self.prompt_encoder, saved, path)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        self.history = json.loads(saved["history"])
        self.best = best_from(saved)
        self.recent = list(saved.get("recent", []))
        self.start_epoch = int(saved["epoch"]) + 1
        self.say(f"resuming after epoch {saved['epoch']} from {path}")

    def run_epoch(self, epoch: int) -> Dict[str, Any]:
        """The epoch's training slices (``epoch_order``; this process's shard under torchrun), then
        validation: the epoch's entry of the history."""
        config = self.config
        epoch_start = time.monotonic()
        self.step_module.train()
        order = distributed.shard(self.epoch_order(), self.rank, self.world, self.per_rank)
        losses = []
        steps_start = time.monotonic()
        for step in range(self.steps_per_epoch):
            check_cancel(self.cancel)
            losses.append(self._train_step(order[step * config.batch_size:(step + 1) * config.batch_size]))
            if config.log_every and (step + 1) % config.log_every == 0:
                done = (epoch - 1) * self.steps_per_epoch + step + 1
                report(self.progress, done, self.total_steps, f"epoch {epoch}/{config.epochs} step {step + 1}/"
                       f"{self.steps_per_epoch} loss {losses[-1]:.4f}{self._eta(done)}")
        train_seconds = time.monotonic() - steps_start
        return {"epoch": epoch, "loss": float(np.mean(losses)), "val_dice": self._val_dice(),
                "lr": float(self.scheduler.get_last_lr()[0]), "seconds": round(time.monotonic() - epoch_start, 3),
                "train_seconds": round(train_seconds, 3), "steps": len(losses)}

    def epoch_order(self) -> torch.Tensor:
        """The training slices of one epoch: a random order of all of them, followed by further
        orders while the epoch holds fewer than ``epoch_samples``, cut there."""
        passes = math.ceil(self.epoch_samples / len(self.train_set))
        orders = [torch.randperm(len(self.train_set), generator=self.generator) for _ in range(passes)]
        return torch.cat(orders)[:self.epoch_samples]

    def _val_dice(self) -> float:
        """Mean Dice of the validation slices, each prompted with its reference box."""
        return mean_dice(self.val_set.samples,
                         predict_masks(self.model, self.val_set, self.step_module, window_margin=self.margin))

    def _train_step(self, index: torch.Tensor) -> float:
        """One optimiser step on the training slices at ``index``; returns the loss."""
        config, device, data = self.config, self.device, self.train_set
        embeddings = batch_embeddings(self.model, data, index)
        boxes = self.sampler.draw(index, self.generator).to(device)
        target = data.targets[index].to(device, torch.float32)[:, None]
        points, masks = None, None
        if config.point_prompts > 0 and float(torch.rand(1, generator=self.generator)) < config.point_prompts:
            coords, labels = random_points(data.targets[index], self.generator, self.model.spec.input_size)
            points = (coords.to(device), labels.to(device))
        elif config.click_prompts > 0 and float(torch.rand(1, generator=self.generator)) < config.click_prompts:
            boxes, points, masks = clicks.simulated_user(self.runner, embeddings, boxes, target, self.generator,
                                                         self.model.spec.input_size, self.margin, self.amp_dtype,
                                                         self.use_amp)
        with torch.autocast("cuda", dtype=self.amp_dtype, enabled=self.use_amp):
            logits, iou = self.runner(embeddings, boxes, points, window_margin=self.margin, masks=masks)
        logits, iou = logits.float(), iou.float()
        loss = self.loss_fn(logits, target)
        if config.iou_loss_weight > 0:
            loss = loss + config.iou_loss_weight * iou_head_loss(logits, iou, target)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return float(loss.detach())

    def checkpoint(self, entry: Dict[str, Any]) -> None:
        """Record an epoch: keep its adapter when ``keeps_epoch`` says so, replace the output folder
        (rank 0) with the kept adapter, the card and the resume state, report it."""
        config, epoch = self.config, entry["epoch"]
        kept, _ = keeps_epoch(entry["val_dice"], [h["val_dice"] for h in self.history], self.base_dice, config)
        self.history.append(entry)
        weights = self._weights() if kept or config.average_last > 1 else None
        if config.average_last > 1:
            self.recent = self.recent[-(config.average_last - 1):] + [weights]
        if kept:
            self.best = dict(weights, epoch=epoch, dice=entry["val_dice"])
        self.card = self._card()
        if self.main_rank:
            self.resume_saved = resume_state(config, _cases(self.train_ids, self.val_ids), epoch, self.peft_decoder,
                                             self.prompt_encoder, self.optimizer, self.scheduler, self.generator,
                                             self.history, self.best, self.recent)
            write_output(config.output, self.lock, self.peft_decoder, self.prompt_encoder, self.best, self.card,
                         self.resume_saved)
        done = epoch * self.steps_per_epoch
        report(self.progress, done, self.total_steps, f"epoch {epoch}/{config.epochs}: loss {entry['loss']:.4f}, "
               f"validation Dice {entry['val_dice']:.4f}{self._eta(done)}")
        self.say(f"epoch {epoch}: loss {entry['loss']:.4f} val Dice {entry['val_dice']:.4f} lr {entry['lr']:.2e} "
                 f"({entry['seconds']:.1f}s){self._eta(done)}")

    def finish(self) -> Dict[str, Any]:
        """Back to the kept epoch's adapter (``kept_adapter``); its scores (per validation case, base
        and adapted), its tracking and box-mode choices and the run's statistics in the card, which is written
        with the adapter (rank 0) and returned; where the adapter would lower a validation case too
        far (``harm_check``), the other epoch weighed if it would not, else the base model."""
        last = self._weights()
        self._judge_average()
        config, stats = self.config, self._stats()  # the training's time, not the tracking choice's
        weighing = config.choose_tracking and self.main_rank and self.best["epoch"]
        choice, others = self._choose_epoch(last) if weighing else (None, [])
        best, card = self.best, self.card
        if best["epoch"] == 0 and self.history:
            self.say(f"warning: no epoch beat the base model's validation Dice {self.base_dice:.4f} (best "
                     f"{max(h['val_dice'] for h in self.history):.4f}): the adapter written leaves the base model "
                     "as it is; train on more cases")
        load_weights(self.peft_decoder, self.prompt_encoder, best, "kept epoch")
        card["stats"] = stats
        if config.final_scores and self.main_rank:
            card["scores"] = self._scores()
            best, card, choice = self._unless_harmful(best, card, choice, stats, others)
        if choice is not None:
            choice = self._box_mode_choice(best, choice)
            card["inference"]["tracking"] = card_tracking(choice)
            card["inference"]["box_mode"] = choice["box_mode"]
            card["tracking_choice"] = choice
        elif best["epoch"] == 0:  # the base model's weights: "auto" runs what it runs for the base model
            card["inference"]["box_mode"] = "crossed"
        if self.main_rank:
            write_output(config.output, self.lock, self.peft_decoder, self.prompt_encoder, best, card,
                         self.resume_saved)
        distributed.stop(self.world, self._started_group)
        return card

    def _weights(self) -> Dict[str, Any]:
        """A copy of what trains now: the LoRA tensors and the prompt encoder's state (or None)."""
        return {"lora": adapters.lora_state(self.peft_decoder), "prompt": state_copy(self.prompt_encoder)}

    # ------------------------------------------------------------ reporting

    def _card(self) -> Dict[str, Any]:
        info = self.info
        dataset = {"path": info.root, "train_cases": self.train_ids, "val_cases": self.val_ids,
                   "train_slices": self.sampler.counts()["slices"],
                   "train_end_slices": self.sampler.counts()["end_slices"],
                   "val_slices": len(self.val_set.samples),
                   "labels": {str(k): v for k, v in info.labels.items()}}
        card = model_card(self.config, self.model, dataset, self.history, self.best, self.base_dice,
                          sum(p.numel() for p in self.trainable))
        if self.averaged is not None:
            card["averaged"] = self.averaged
        return card

    def _stats(self) -> Dict[str, Any]:
        # a caller may give the training slices other embeddings (their encoder calls count too)
        stats, swapped = self.slice_stats, self.train_set.stats
        return {"encoder_calls": stats["encoder_calls"] + swapped.get("encoder_calls", 0),
                "cache_hits": stats["cache_hits"], "seconds_prepare": round(self.seconds_prepare, 2),
                "seconds_train": round(time.monotonic() - self.train_started, 2),
                "device": str(self.device), "world_size": self.world}

    def _eta(self, done: int) -> str:
        """", ETA m:ss" of the steps left (validation included in the pace), this run's steps only."""
        return self.eta.text(done - (self.start_epoch - 1) * self.steps_per_epoch)
