"""The panel's fine-tuning section: export corrected cases, train an adapter and follow its curve,
see its scores per validation case, compare one case with and without it, keep learning."""

import os

import qt
import slicer
from SAMFineTuneMRML import comparison, options, training
from SAMFineTuneMRML.keeplearning import KeepLearning
from SAMFineTuneMRML.paths import adapterFolder, folderName, trainingSetFolder

from . import dependencies
from .combos import refillCombo


class FineTuningSection:
    def __init__(self, panel):
        self.panel = panel
        self.ui = panel.ui
        self.task = None
        self.curve = None
        self.card = None
        self.comparisons = []
        self.learning = KeepLearning(panel.logic)
        self.ui.exportButton.clicked.connect(self.onExport)
        self.ui.trainButton.clicked.connect(self.onTrain)
        self.ui.cancelTrainingButton.clicked.connect(self.onCancel)
        self.ui.compareButton.clicked.connect(self.onCompare)

    @property
    def busy(self):
        return self.task is not None and not self.task.finished

    def updateGUI(self, p):
        datasetKnown = bool(options.optionalPath(p.datasetDir) or folderName(self.structureName()))
        self.ui.trainButton.enabled = datasetKnown and bool(self.adapterName()) and not self.busy
        self.ui.cancelTrainingButton.enabled = self.busy
        self.ui.exportButton.enabled = datasetKnown
        self.ui.compareButton.enabled = self.card is not None and self.ui.compareCaseComboBox.count > 0
        self.ui.keepLearningSpinBox.enabled = p.keepLearning

    def structureName(self):
        p = self.panel.parameters
        if p.structureName:
            return p.structureName
        node = p.segmentation
        segment = node.GetSegmentation().GetSegment(p.targetSegment) if node is not None and p.targetSegment else None
        return segment.GetName() if segment is not None else ""

    def trainingSet(self):
        return trainingSetFolder(self.panel.parameters.datasetDir, self.structureName())

    def adapterName(self):
        """The name typed, else the structure's: keep learning and Train need one."""
        return self.panel.parameters.adapterName.strip() or folderName(self.structureName())

    def trainConfig(self):
        p = self.panel.parameters
        return options.trainingOptions(self.panel.segmentOptions(), p.epochs, p.learnClicks)

    # ------------------------------------------------------------ export, keep learning

    def onExport(self):
        p = self.panel.parameters
        name = self.structureName()
        if not name:
            slicer.util.errorDisplay("Type the structure (segment name) to export.")
            return
        from SAMFineTuneLib.progress import Cancelled

        dataset = self.trainingSet()
        try:
            summary = self.exportWithProgress(name, dataset, p.axis)
        except Cancelled:
            self.ui.trainingStatusLabel.text = "Export cancelled: the training set is as it was."
            return
        except Exception as exc:
            slicer.util.errorDisplay("Export failed: %s" % exc)
            return
        added, replaced = len(summary.get("added", [])), len(summary.get("replaced", []))
        text = "Added %d case(s) to %s, updated %d, unchanged %d (%s train, %s val)%s" % (
            added, summary.get("dataset"), replaced, len(summary.get("unchanged", [])), summary.get("train"),
            summary.get("val"), "".join("\n" + w for w in summary.get("warnings", [])))
        if p.keepLearning:
            text += "\nKeep learning: %s" % self.keepLearning(added + replaced, dataset)
        self.ui.trainingStatusLabel.text = text

    def exportWithProgress(self, name, dataset, axis):
        """The scene's cases of ``name`` exported into ``dataset`` under a progress dialog: reading and
        writing a large CT takes seconds a case, and the dialog's Cancel stops between cases, leaving
        the training set as it was (a progress dialog as Slicer's DICOMBrowser.py loads series).
        The dialog is application-modal, set before it shows (Qt ignores a change while it is
        visible): the export reads the volumes' own voxels, so nothing may edit or delete a volume
        while the events the dialog needs are processed."""
        dialog = qt.QProgressDialog(slicer.util.mainWindow())
        dialog.setWindowModality(qt.Qt.ApplicationModal)  # as DICOMSendDialog.py sets its own
        dialog.windowTitle, dialog.labelText = "Export", "Finding the cases"
        dialog.maximum, dialog.minimumDuration = 100, 0
        dialog.show()

        def progress(done, total, message=""):
            dialog.labelText = message
            dialog.value = int(100 * done / total) if total else 0
            slicer.app.processEvents()

        try:
            with slicer.util.WaitCursor():
                cases = training.findCases(slicer.mrmlScene, name)
                return self.panel.logic.exportTrainingSet(cases, dataset, name, axis=axis, progress=progress,
                                                          cancel=lambda: dialog.wasCanceled)
        finally:
            dialog.close()

    def keepLearning(self, count, dataset):
        """Note ``count`` exported (or updated) cases; what keep learning does about them."""
        p = self.panel.parameters
        try:
            adapter = adapterFolder(self.adapterName())
        except ValueError as exc:
            return str(exc)
        self.learning.every = p.keepLearningEvery
        run = self.learning.exported(count, dataset, adapter, **self.trainConfig())  # a correction teaches too
        if run is None:
            return "%d exported case(s) wait for the next retraining (after every %d)." % (self.learning.pending,
                                                                                        p.keepLearningEvery)
        self.panel.startPolling()
        return run.message + "."

    # ------------------------------------------------------------ training

    def onTrain(self):
        if not dependencies.ensure(self.ui):
            return
        name = self.adapterName()
        try:
            output = adapterFolder(name)
        except ValueError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        overwrite = name in dict(self.panel.logic.listAdapters())
        if overwrite and not slicer.util.confirmYesNoDisplay(
                "An adapter named '%s' exists. Train a new one in its place? It is replaced when the first "
                "epoch is written; to keep it, choose No and give another name." % name,
                windowTitle="Replace the adapter?"):
            return
        curve = self.curve = training.TrainingCurve(slicer.mrmlScene, "SAMFineTune " + name)
        self.ui.trainingTableView.setMRMLTableNode(curve.table)
        slicer.modules.plots.logic().ShowChartInLayout(curve.chart)
        try:
            self.task = self.panel.logic.train(
                self.trainingSet(), output=output, waitForCompletion=False,
                onEvent=lambda message: curve.addFromMessage(str(message.get("message", ""))),
                onFinished=self.onFinished, overwrite=overwrite, **self.trainConfig())
        except Exception as exc:
            slicer.util.errorDisplay("Cannot start training: %s" % exc)
            return
        self.panel.startPolling()

    def onCancel(self):
        if self.task is not None:
            self.task.cancel()

    def onFinished(self, task):
        if task.state != "done":
            return
        self.panel.refreshAdapters()
        self.panel.parameters.adapter = task.output
        self.card = (task.result or {}).get("card") or {}
        self.ui.scoresTableView.setMRMLTableNode(comparison.scoresTable(slicer.mrmlScene, self.card))
        cases = [row["case"] for row in (self.card.get("scores") or {}).get("per_case") or []]
        refillCombo(self.ui.compareCaseComboBox, [(case, case) for case in cases], cases[0] if cases else "")
        self.ui.trainingStatusLabel.text = " ".join(filter(None, [
            "Adapter '%s' ready and selected." % os.path.basename(task.output),
            comparison.trackingSummary(self.card)]))

    # ------------------------------------------------------------ comparison

    def onCompare(self):
        case = self.ui.compareCaseComboBox.currentData
        engine = self.panel.segmentOptions()
        try:
            _, self.comparisons = comparison.compareOnCase(
                self.panel.logic, self.trainingSet(), case,
                self.panel.parameters.adapter or None, **{k: v for k, v in engine.items() if k != "adapter"})
        except Exception as exc:
            slicer.util.errorDisplay("Cannot compare: %s" % exc)
            return
        self.ui.trainingStatusLabel.text = "Segmenting %s with and without the adapter..." % case
        self.panel.startPolling()

    def pollComparison(self):
        for task in self.comparisons:
            task.poll()
        if any(not task.finished for task in self.comparisons):
            return True
        lines = ["%s: %s" % (task.segmentName(), "Dice %.3f" % comparison.diceAgainstReference(task)
                             if task.state == "done" else task.error or task.state) for task in self.comparisons]
        self.ui.trainingStatusLabel.text = "Compared against the reference: " + ", ".join(lines)
        self.comparisons = []
        return False

    # ------------------------------------------------------------ polling

    def poll(self):
        """Advance training, a comparison and a keep-learning run; True while any goes on."""
        busy = False
        if self.task is not None:
            self.task.poll()
            self.ui.trainingProgressBar.value = int(100 * self.task.progress)
            self.ui.trainingStatusLabel.text = self.task.error or self.task.message
            busy = self.busy
        if self.comparisons:
            busy = self.pollComparison() or busy
        run = self.learning.run
        if run is not None and not run.finished:
            if not run.poll():
                self.panel.refreshAdapters()
                self.ui.trainingStatusLabel.text = "Keep learning: %s." % run.message
            busy = busy or not run.finished
        return busy
