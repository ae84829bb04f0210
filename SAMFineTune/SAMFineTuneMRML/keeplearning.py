"""Keep learning (opt-in): retrain in the background after every few exported cases, and keep
the adapter in use until a new one scores better on the validation cases.

Retraining on every submitted case is what users of other tools complain about (the GPU busy,
results changing under them), so it runs only after ``every`` new cases, one run at a time.
A run trains a candidate beside the adapter in use, scores both on the same validation cases,
and swaps the candidate in only when its validation Dice is higher, scored as
``comparison_roi_margin`` says (from one ROI where the cases hold structures tracking follows):
the validation Dice with the reference's box on every slice says little about how an adapter
tracks (docs/finetuning.md, "Which epoch is kept").
"""

import shutil

from SAMFineTuneLib.adapter_folders import holds_adapter, sibling, swap_in

from .options import MODEL_KEYS, comparison_roi_margin
from .tasks import Task

#: A candidate replaces the adapter in use only when its validation Dice is higher by at least this.
MIN_GAIN = 0.001


def validationDice(card):
    """The adapted model's mean validation Dice from a model card (None when it was not scored)."""
    return ((card or {}).get("scores") or {}).get("adapted", {}).get("dice")


class LearningRun:
    """One retraining: train the candidate, score the adapter in use and the candidate, keep the
    better one. ``state``: "training", "scoring", then "kept" (the candidate replaced it),
    "discarded" or "failed"; ``message`` says what happened."""

    def __init__(self, logic, dataset, adapter, config):
        self.logic, self.dataset, self.adapter, self.config = logic, dataset, adapter, dict(config)
        # A hidden sibling, so the adapter list never offers a half-trained candidate; it is this
        # run's own: one a killed earlier run left is replaced, not refused.
        self.candidate = sibling(adapter, "candidate")
        shutil.rmtree(self.candidate, ignore_errors=True)
        self.task = logic.train(dataset, output=self.candidate, waitForCompletion=False, overwrite=True, **self.config)
        self.state, self.message, self.card = "training", "training a candidate adapter", None
        self.scores, self.roiMargin = [], None

    @property
    def finished(self):
        return self.state in ("kept", "discarded", "failed")

    def poll(self):
        """Advance the run; True while it goes on."""
        if self.finished or self.task.poll():
            return not self.finished
        if self.task.state != "done":
            return self.end("failed", "retraining %s: %s" % (self.task.state, self.task.error or ""))
        if self.state == "training":
            self.card = (self.task.result or {}).get("card") or {}
            if not holds_adapter(self.adapter):
                return self.keep("no adapter in use yet")
            self.roiMargin = comparison_roi_margin(self.card)
            self.state = "scoring"
            return self.score(self.adapter, "the adapter in use")
        self.scores.append((((self.task.result or {}).get("report") or {}).get("mean") or {}).get("adapted", {})
                           .get("dice"))
        if len(self.scores) == 1 and self.fromRoi:
            return self.score(self.candidate, "the new adapter")
        current = self.scores[0]
        new = self.scores[1] if len(self.scores) > 1 else validationDice(self.card)
        if new is not None and (current is None or new > current + MIN_GAIN):
            return self.keep("validation Dice from %s %.3f, the adapter in use %s" % (self.prompt, new,
                                                                                     _text(current)))
        shutil.rmtree(self.candidate, ignore_errors=True)
        return self.end("discarded", "kept the adapter in use (validation Dice from %s %s) over the new one (%s)"
                        % (self.prompt, _text(current), _text(new)))

    @property
    def fromRoi(self):
        """Whether the adapters are weighed from one ROI (else with the reference box on every slice)."""
        return self.roiMargin is not None

    @property
    def prompt(self):
        return "one ROI" if self.fromRoi else "reference boxes"

    def score(self, adapter, which):
        """Evaluate ``adapter`` on the validation cases in the worker, from one ROI or with boxes."""
        self.message = "scoring %s on the validation cases from %s" % (which, self.prompt)
        params = {k: v for k, v in self.config.items() if k in MODEL_KEYS}
        request = dict(params, dataset=self.dataset, adapter=adapter)
        if self.fromRoi:
            request["roi_margin"] = self.roiMargin
        self.task = Task(self.logic.worker.submit("evaluate", request), self.logic.worker.client)
        return True

    def keep(self, why):
        try:
            swap_in(self.adapter, self.candidate)
        except (OSError, ValueError) as exc:  # a training into the adapter's folder holds its lock, a full disk
            return self.end("failed", "the new adapter (%s) could not replace %s: %s" % (self.candidate, self.adapter,
                                                                                        exc))
        return self.end("kept", "new adapter in use: " + why)

    def end(self, state, message):
        self.state, self.message = state, message
        return False


def _text(value):
    return "%.3f" % value if value is not None else "unscored"


class KeepLearning:
    """Counts exported cases and starts a LearningRun after every ``every`` of them (one at a time)."""

    def __init__(self, logic, every=3):
        self.logic = logic
        self.every = int(every)
        self.pending = 0
        self.run = None

    def exported(self, count, dataset, adapter, **config):
        """Note ``count`` newly exported cases; returns the run it started, if any."""
        self.pending += int(count)
        if self.pending < self.every or (self.run is not None and not self.run.finished):
            return None
        self.pending = 0
        self.run = LearningRun(self.logic, dataset, adapter, config)
        return self.run
