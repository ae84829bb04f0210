"""The panel's fine-tuning section: export corrected cases, train an adapter, follow its curve."""

import slicer
from SAMFineTuneMRML import options, training

from . import dependencies


class FineTuningSection:
    def __init__(self, panel):
        self.panel = panel
        self.ui = panel.ui
        self.task = None
        self.curve = None
        self.ui.exportButton.clicked.connect(self.onExport)
        self.ui.trainButton.clicked.connect(self.onTrain)
        self.ui.cancelTrainingButton.clicked.connect(self.onCancel)

    @property
    def busy(self):
        return self.task is not None and not self.task.finished

    def updateGUI(self, p):
        datasetChosen = bool(options.optionalPath(p.datasetDir))
        self.ui.trainButton.enabled = datasetChosen and bool(p.adapterName) and not self.busy
        self.ui.cancelTrainingButton.enabled = self.busy
        self.ui.exportButton.enabled = datasetChosen

    def structureName(self):
        p = self.panel.parameters
        if p.structureName:
            return p.structureName
        node = p.segmentation
        segment = node.GetSegmentation().GetSegment(p.targetSegment) if node is not None and p.targetSegment else None
        return segment.GetName() if segment is not None else ""

    def onExport(self):
        name = self.structureName()
        if not name:
            slicer.util.errorDisplay("Type the structure (segment name) to export.")
            return
        try:
            with slicer.util.WaitCursor():
                cases = training.findCases(slicer.mrmlScene, name)
                summary = self.panel.logic.exportTrainingSet(cases, options.optionalPath(self.panel.parameters.datasetDir),
                                                             name)
        except Exception as exc:
            slicer.util.errorDisplay("Export failed: %s" % exc)
            return
        self.ui.trainingStatusLabel.text = ("Added %d case(s) to %s (%s train, %s val)%s" % (
            len(summary.get("added", [])), summary.get("dataset"), summary.get("train"), summary.get("val"),
            "".join("\n" + w for w in summary.get("warnings", []))))

    def onTrain(self):
        if not dependencies.ensure(self.ui):
            return
        p = self.panel.parameters
        curve = self.curve = training.TrainingCurve(slicer.mrmlScene, "SAMFineTune " + p.adapterName)
        self.ui.trainingTableView.setMRMLTableNode(curve.table)
        slicer.modules.plots.logic().ShowChartInLayout(curve.chart)
        engine = self.panel.segmentOptions()
        try:
            self.task = self.panel.logic.train(
                options.optionalPath(p.datasetDir), name=p.adapterName, waitForCompletion=False,
                onEvent=lambda message: curve.addFromMessage(str(message.get("message", ""))),
                onFinished=self.onFinished, model=engine["model"], checkpoint=engine["checkpoint"],
                device=engine["device"], epochs=p.epochs)
        except Exception as exc:
            slicer.util.errorDisplay("Cannot start training: %s" % exc)
            return
        self.panel.startPolling()

    def onCancel(self):
        if self.task is not None:
            self.task.cancel()

    def onFinished(self, task):
        if task.state == "done":
            self.panel.refreshAdapters()
            self.panel.parameters.adapter = task.output
            self.ui.trainingStatusLabel.text = "Adapter '%s' ready and selected." % self.panel.parameters.adapterName

    def poll(self):
        """Advance the training job; True while it runs."""
        if self.task is None:
            return False
        self.task.poll()
        self.ui.trainingProgressBar.value = int(100 * self.task.progress)
        self.ui.trainingStatusLabel.text = self.task.error or self.task.message
        return self.busy
