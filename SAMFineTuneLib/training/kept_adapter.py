"""How a run ends: which of its adapters is written (a mixin of ``trainer.Trainer``).

The epoch the validation Dice kept, the mean of the last epochs' weights (``average_last``), the
last epoch when it tracks the validation cases better from one ROI (``epoch_choice``), and, when
the adapter kept would lower a validation case too far (``harm_check``), the other epoch weighed
if it would not, else the base model; and the box mode the adapter kept runs by default
(``box_mode_choice``).
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Sequence, Tuple

from . import epoch_choice, harm_check
from .box_mode_choice import choice_text as box_mode_text, choose_box_mode
from .card import per_case_scores
from .optimisation import keeps_epoch
from .samples import cache_dir_for
from .state import load_weights, mean_state
from .tracking_choice import choice_text, choose_tracking


class KeptAdapter:
    """The end-of-run decisions of ``Trainer``, which holds the state they read and set (``best``,
    ``history``, ``recent``, the LoRA-wrapped decoder, the validation slices)."""

    def _scores(self, base: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """The card's scores: base model and adapter on each validation case, reference boxes (the
        base model's taken from ``base``, earlier such scores, where given)."""
        return dict(split="val", cases=self.val_ids, window_margin=self.margin,
                    **per_case_scores(self.model, self.val_set, self.step_module, self.margin, base))

    def _unless_harmful(self, best: Dict[str, Any], card: Dict[str, Any], choice: Optional[Dict[str, Any]],
                        stats: Dict[str, Any], others: Sequence[Tuple[Dict[str, Any], Any]] = ()):
        """(best, card, tracking choice) as they are, or, where ``harm_check`` refuses the adapter
        kept (``card`` holds its scores against the base model's), those of the first of ``others``
        (the epochs the tracking choice passed over, with their choices) it does not refuse, else
        the base model's."""
        config = self.config
        if not (best["epoch"] and config.select_best):  # select_best off: the last epoch, whatever it scores
            return best, card, choice
        harmed = harm_check.worst_case(card["scores"]["per_case"], config.max_case_drop)
        if harmed is None:
            return best, card, choice
        refused = harm_check.record(harmed, best["epoch"], config.max_case_drop)
        other = self._first_harmless(others, card["scores"])
        if other is not None:
            weights, other_choice, scores = other
            refused["written"] = weights["epoch"]
            self.say(harm_check.record_text(refused))
            self.best = weights
            return self.best, dict(self._card(), stats=stats, harm_check=refused, scores=scores,
                                   epoch_choice=dict(card["epoch_choice"], kept=weights["epoch"])), other_choice
        self.say(harm_check.record_text(refused))
        self.best = dict(self.base_weights, epoch=0, dice=self.base_dice)
        load_weights(self.peft_decoder, self.prompt_encoder, self.best, "the base model")
        scores = card["scores"]  # what is written now scores as the base model did
        scores = dict(scores, adapted=scores["base"],
                      per_case=[dict(row, adapted=row["base"]) for row in scores["per_case"]])
        return self.best, dict(self._card(), stats=stats, harm_check=refused, scores=scores), None

    def _first_harmless(self, others: Sequence[Tuple[Dict[str, Any], Any]], scored: Dict[str, Any]):
        """(weights, tracking choice, scores) of the first of ``others`` that ``harm_check``
        passes, loaded into the decoder; None when it refuses them all (or there are none).
        ``scored`` holds the base model's scores already."""
        for weights, choice in others:
            load_weights(self.peft_decoder, self.prompt_encoder, weights, f"epoch {weights['epoch']}")
            scores = self._scores(scored)
            if harm_check.worst_case(scores["per_case"], self.config.max_case_drop) is None:
                return weights, choice, scores
        return None

    def _judge_average(self) -> None:
        """The mean weights of the last ``average_last`` epochs, kept by ``keeps_epoch`` as if they
        were one more epoch after the last (so never unless they beat the base model)."""
        if len(self.recent) < 2:
            return
        epochs = [h["epoch"] for h in self.history[-len(self.recent):]]
        averaged = {"lora": mean_state([s["lora"] for s in self.recent]),
                    "prompt": mean_state([s["prompt"] for s in self.recent])}
        load_weights(self.peft_decoder, self.prompt_encoder, averaged, "averaged epochs")
        val = self._val_dice()
        kept, _ = keeps_epoch(val, [h["val_dice"] for h in self.history], self.base_dice, self.config)
        self.averaged = {"epochs": epochs, "val_dice": val, "kept": kept}
        if kept:
            self.best = dict(averaged, epoch=epochs[-1], dice=val)
        self.card = self._card()
        self.say(f"mean of epochs {epochs[0]}-{epochs[-1]}: val Dice {val:.4f}, "
                 + ("kept" if kept else f"not kept (epoch {self.best['epoch']} is)"))

    def _choose_epoch(self, last: Dict[str, Any]):
        """(the tracking choice of the adapter kept, [(weights, tracking choice) of each adapter
        weighed and passed over]): the epoch kept so far or the ``last`` epoch's weights,
        whichever tracks the validation cases better (``epoch_choice``)."""
        weighed = epoch_choice.candidates(self.history, self.best, last, self.base_dice, self.config)
        pick, choices = epoch_choice.weigh(weighed, self._tracking_choice, self.config.keep_within)
        if len(choices) > 1:
            self.best = weighed[pick]
            self.card = dict(self._card(), epoch_choice=epoch_choice.record(weighed, choices, pick))
            self.say(epoch_choice.record_text(self.card["epoch_choice"]))
        choice = choices[pick]
        if choice is not None:
            self.say(choice_text(choice))
        return choice, [(w, c) for n, (w, c) in enumerate(zip(weighed, choices)) if n != pick]

    def _tracking_choice(self, weights: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """``tracking_choice.choose_tracking`` for the adapter holding ``weights`` (its progress
        messages name the epoch, since two may be weighed)."""
        epoch, progress = weights["epoch"], self.progress
        named = None if progress is None else (lambda done, total, text: progress(done, total,
                                                                                  f"epoch {epoch}: {text}"))
        return choose_tracking(self.model, self._merged(weights), self.prompt_encoder, self.info, self.val_ids,
                               self.config, cache_dir_for(self.info.root), named, self.cancel)

    def _box_mode_choice(self, weights: Dict[str, Any], choice: Dict[str, Any]) -> Dict[str, Any]:
        """``box_mode_choice.choose_box_mode`` for the adapter holding ``weights``, tracked as
        ``choice`` (its tracking choice) says; the training log names the mode chosen."""
        choice = choose_box_mode(self.model, self._merged(weights), self.prompt_encoder, self.info, self.val_ids,
                                 self.config, choice, cache_dir_for(self.info.root), self.progress, self.cancel)
        self.say(box_mode_text(choice))
        return choice

    def _merged(self, weights: Dict[str, Any]):
        """A copy of the decoder with ``weights`` loaded and merged in (they stay loaded)."""
        load_weights(self.peft_decoder, self.prompt_encoder, weights, f"epoch {weights['epoch']}")
        return copy.deepcopy(self.peft_decoder).merge_and_unload().eval()
