"""What the panel follows while the engine works: a task around one engine job.

A task's state, progress, message and error are its job's (``SAMFineTuneLib.client.Job``: the
worker client keeps it up to date, or the logic does for work run in this process); the task
adds what happens on the Slicer side at the end, such as writing the mask into a segment, and
an error there overrides the job's success. ``onFinished(task)`` is called once at the end.
A job the worker refused because it no longer holds the volume (``backends.lostVolume``) is
sent once more with the voxels (``resend``), and the task follows that job instead.
"""

import numpy as np

from . import segments
from .backends import lostVolume
from .library import ensureLibraryImportable

ensureLibraryImportable()
from SAMFineTuneLib.client import FINAL_STATES, Job  # noqa: E402


def localJob(command, params=None):
    """A job record for work done in this process (blocking runs), advanced by ``reportProgress``."""
    return Job("local", command, dict(params or {}))


class Task:
    def __init__(self, job, client=None, onFinished=None, onEvent=None, resend=None):
        self.job = job
        self.client = client  # None: the logic advances the job itself
        self.onFinished = onFinished
        self.resend = resend  # () -> the job again with the voxels, once
        self._outcome = None  # (state, message, error) when the Slicer side overrides the job's end
        self._concluded = False  # the job has ended and its Slicer-side completion has run
        if onEvent is not None:
            job.on_event = onEvent

    @property
    def state(self):
        if self._outcome:
            return self._outcome[0]
        if self.job.state in FINAL_STATES and not self._concluded:
            return "running"  # ended in the worker, not yet written here
        return self.job.state

    @property
    def finished(self):
        return self._concluded

    @property
    def progress(self):
        return 1.0 if self.state == "done" else float(self.job.progress or 0.0)

    @property
    def message(self):
        return self._outcome[1] if self._outcome else (self.job.message or self.job.state)

    @property
    def error(self):
        return self._outcome[2] if self._outcome else self.job.error

    @property
    def result(self):
        return self.job.result

    def reportProgress(self, done, total, message=""):
        """Progress of work run in this process (the engine's progress callback)."""
        self.job.state = "running"
        self.job.step = (int(done), int(total))
        self.job.progress = float(done) / total if total else 0.0
        self.job.message = message or "%d/%d" % (done, total)

    def poll(self):
        """Read the worker's events; conclude when the job has ended. True while it runs."""
        if self._concluded:
            return False
        try:
            self.client.poll()
        except Exception as exc:  # the client failed itself: the scene is left as it was
            self.fail("The background worker failed: %s" % exc)
            return False
        if not self.job.done:
            return True
        self.conclude()
        return not self._concluded  # a task may go on with another job (a retry)

    def conclude(self):
        """The job has ended: run the Slicer-side completion of a success, then ``onFinished``;
        or, when the worker no longer held the volume, follow the job sent again with it."""
        if self.resend is not None and self.job.state == "error" and lostVolume(self.job.error):
            resend, self.resend, onEvent = self.resend, None, self.job.on_event
            try:
                self.job = resend()
            except Exception as exc:  # the worker could not be reached again: the scene stays as it was
                self.fail("The background worker failed: %s" % exc)
                return
            self.job.on_event = onEvent
            return
        self._concluded = True
        if self.job.state == "done":
            try:
                self.complete(self.job.result or {}, self.job.arrays or {})
            except Exception as exc:
                self._outcome = ("error", "could not use the result", str(exc))
        if self.state != "done":
            self.abandon()
        if self.onFinished is not None:
            self.onFinished(self)

    def complete(self, result, arrays):
        """What a successful job means on the Slicer side (nothing by default)."""

    def abandon(self):
        """Undo what preparing the task changed in the scene, after an error or a cancel."""

    def finishHere(self, state, result=None, arrays=None, error=None):
        """End a job run in this process, then conclude as a worker's job would."""
        job = self.job
        job.state, job.result, job.arrays, job.error = state, result, arrays or {}, error
        job.message = {"done": "done", "cancelled": "cancelled"}.get(state, error or state)
        self.conclude()

    def fail(self, error):
        self._outcome = ("error", "failed", error)
        self._concluded = True
        self.abandon()
        if self.onFinished is not None:
            self.onFinished(self)

    def cancel(self):
        """Ask the job to stop; nothing is written, and nothing is sent again."""
        self.resend = None
        if self.client is not None and not self.finished:
            self.client.cancel(self.job)


class SegmentTask(Task):
    """One ROI -> one segment. Besides Task's fields: the volume, ROI and segmentation nodes, the
    segment written, ``roiBox`` (geometry.RoiBox, with its clipping warning), the options sent
    to the engine (and ``optionsWarning``, what the user should know about them), and the
    engine's ``stats`` once done."""

    def __init__(self, logic, volumeNode, roiNode, segmentationNode, segmentId, roiBox, options, onFinished=None,
                 createdSegment=False, optionsWarning=None):
        Task.__init__(self, localJob("segment"), onFinished=onFinished)
        self.createdSegment = createdSegment  # made for this task: removed again if nothing is written
        self.logic = logic
        self.volumeNode = volumeNode
        self.roiNode = roiNode
        self.segmentationNode = segmentationNode
        self.segmentId = segmentId
        self.roiBox = roiBox
        self.options = options
        self.optionsWarning = optionsWarning
        self.stats = {}

    @property
    def warning(self):
        found = [self.roiBox.warning if self.roiBox is not None else None, self.optionsWarning]
        return "\n".join(text for text in found if text) or None

    @property
    def message(self):
        if self.state == "done" and not self._outcome:
            done = "done: %d voxels in '%s'" % (self.stats.get("voxels", 0), self.segmentName())
            if self.stats.get("box_mode"):  # what ran: "auto" depends on the adapter, crossed may fall back
                done += " (%s boxes)" % self.stats["box_mode"]
            if self.stats.get("fixed_fallback"):
                # The user should check this one: tracking followed something else (TrackingOptions.fixed_fallback).
                done += " (tracking lost the structure, so this is the adapter's answer to the ROI on every slice)"
            return done
        return Task.message.fget(self)

    def attach(self, job, client, resend=None):
        """Follow a worker job from now on (``resend``: as for ``Task``)."""
        job.on_event = self.job.on_event
        self.job, self.client, self.resend = job, client, resend
        return self

    def complete(self, result, arrays):
        """Write the mask (one undoable step)."""
        mask = arrays["mask"]
        self.logic.writeMask(mask, self.volumeNode, self.segmentationNode, self.segmentId, self.roiBox.box)
        segments.rememberSourceRoi(self.segmentationNode, self.segmentId, self.roiNode)
        self.stats = dict(result.get("stats") or {}, voxels=int(np.count_nonzero(mask)))

    def abandon(self):
        segmentation = self.segmentationNode.GetSegmentation()
        if self.createdSegment and segmentation.GetSegment(self.segmentId) is not None \
                and not self.logic.segmentArray(self.segmentationNode, self.segmentId, self.volumeNode).any():
            segmentation.RemoveSegment(self.segmentId)

    def segmentName(self):
        segment = self.segmentationNode.GetSegmentation().GetSegment(self.segmentId)
        return segment.GetName() if segment is not None else self.segmentId
