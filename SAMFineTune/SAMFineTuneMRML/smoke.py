"""The end-to-end check of an installation: segment, undo, export, train, chart.

The same steps run in three places: ``Testing/slicer_smoke.py`` inside a real Slicer, the
module's self-test (Reload and Test), and CI on slicer-core without the application. Each step
prints what it did and raises ``SmokeFailure`` (or the engine's own error) on the first problem.
The engine runs in the background worker, as it does for the panel.
"""

import os
import tempfile

import numpy as np

from . import geometry, segments, training
from .library import ensureLibraryImportable

ensureLibraryImportable()
from SAMFineTuneLib.adapter_folders import holds_adapter  # noqa: E402
from SAMFineTuneLib.metrics import dice_score  # noqa: E402

#: Dice the built-in model reaches on the synthetic CT's organ (about 0.95 measured).
MIN_DICE = 0.85


class SmokeFailure(AssertionError):
    pass


def check(condition, message):
    if not condition:
        raise SmokeFailure(message)


def addPhantom(scene, name, seed=0):
    """A synthetic CT with a known organ as a volume node, an ROI around the organ, and the label."""
    import slicer
    from SAMFineTuneLib.phantom import bounding_box, make_ct_phantom

    ct, label = make_ct_phantom(shape_kji=(5, 96, 96), spacing_xyz=(1.0, 1.0, 4.0), seed=seed)
    volume = slicer.util.addVolumeFromArray(ct.array, np.diag([1.0, 1.0, 4.0, 1.0]), name=name)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name + " organ")
    geometry.placeRoiAroundBox(roi, volume, bounding_box(label.array, (2, 2, 0)))
    return volume, roi, label.array


class SmokeRun:
    """The steps, in order; ``run()`` does them all. ``say`` prints each step's outcome."""

    def __init__(self, logic, scene, say=print, workFolder=None, fillPanel=None):
        self.logic = logic
        self.scene = scene
        self.say = say
        self.workFolder = workFolder or tempfile.mkdtemp(prefix="samfinetune-smoke-")
        self.fillPanel = fillPanel  # inside Slicer: fills the module panel's parameter node
        self.volume = self.roi = self.label = self.task = None

    def run(self):
        for step in (self.stepScene, self.stepPanel, self.stepSegment, self.stepUndo, self.stepExport,
                     self.stepTrain):
            step()
        self.say("smoke test passed")

    def stepScene(self):
        self.volume, self.roi, self.label = addPhantom(self.scene, "SAMFineTuneSmoke")
        self.say("1. synthetic CT %s with an ROI around its organ" % (self.label.shape[::-1],))

    def stepPanel(self):
        if self.fillPanel is None:
            self.say("2. module panel: skipped (no Slicer application)")
            return
        self.fillPanel(self.volume, self.roi)
        self.say("2. module panel opened and its parameters filled")

    def stepSegment(self):
        self.task = self.logic.segment(self.volume, self.roi, runIn="worker")
        check(self.task.state == "done", "segmentation ended '%s': %s" % (self.task.state, self.task.error))
        result = self.logic.segmentArray(self.task.segmentationNode, self.task.segmentId, self.volume)
        score = dice_score(result, self.label)
        check(score > MIN_DICE, "Dice %.3f against the known organ is below %.2f" % (score, MIN_DICE))
        check(self.scene.GetNodeByID(self.roi.GetID()) is self.roi, "the ROI node was removed")
        self.say("3. segmented in the background worker: Dice %.3f against the known organ" % score)

    def stepUndo(self):
        node, segmentId = self.task.segmentationNode, self.task.segmentId
        check(self.logic.undo(node), "nothing to undo after a result")
        check(not self.logic.segmentArray(node, segmentId, self.volume).any(), "undo left voxels in the segment")
        self.say("4. undo: the segment is empty again")

    def stepExport(self):
        for n in range(2):
            volume, _, label = addPhantom(self.scene, "SAMFineTuneSmokeCase%d" % n, seed=n + 1)
            node = self.logic.createSegmentation(volume)
            segmentId = segments.ensureSegment(node, segmentName="organ")
            segments.writeMaskToSegment(label, volume, node, segmentId)
        cases = training.findCases(self.scene, "organ")
        check(len(cases) == 2, "found %d cases of 'organ', expected 2" % len(cases))
        self.dataset = os.path.join(self.workFolder, "dataset")
        summary = self.logic.exportTrainingSet(cases, self.dataset, "organ", valFraction=0.5, axis="axial")
        check(len(summary["added"]) == 2, "export added %s" % summary["added"])
        from SAMFineTuneLib.dataset import read_dataset

        axes = [entry.record.get("slice_axis") for entry in read_dataset(self.dataset).cases]
        check(axes == ["axial", "axial"], "the exported cases record the slicing axes %s, expected axial" % axes)
        self.say("5. exported 2 cases to %s (%d train, %d val)" % (self.dataset, summary["train"], summary["val"]))

    def stepTrain(self):
        curve = training.TrainingCurve(self.scene, "SAMFineTuneSmoke training")
        output = os.path.join(self.workFolder, "adapter")
        card = self.logic.train(self.dataset, output=output, runIn="worker", epochs=1, batch_size=4,
                                log=curve.addFromMessage, final_scores=False)
        check(card and [h["epoch"] for h in card.get("history", [])] == [1], "training returned %r" % (card,))
        check(holds_adapter(output), "no model card in %s" % output)
        check(len(curve.rows()) == 1, "the chart's table has %d rows, expected 1 epoch" % len(curve.rows()))
        check(curve.numericColumns(), "the chart's table has non-numeric columns: the plot would stay empty")
        self.say("6. trained one epoch (loss %.3f, validation Dice %.3f); adapter in %s"
                 % (curve.rows()[0][1], curve.rows()[0][2], output))
