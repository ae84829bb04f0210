"""SAM Fine-Tune: Segment Anything slice by slice inside ROI boxes, and LoRA fine-tuning.

Thin module file: the MRML work is in ``SAMFineTuneMRML`` (runs without the application, so
it is tested in CI with slicer-core), the engine in ``SAMFineTuneLib`` (plain Python, run in a
background worker process). Nothing heavy is imported here: the module loads without torch
and without a GUI (``--no-main-window``). This file stays valid Python 3.9, so that an older
Slicer (5.8 ships Python 3.9) shows why the module cannot run instead of failing to load.
"""

import logging
import os
import pathlib
import sys
from typing import Annotated

import qt
import slicer
import vtk
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
if _MODULE_DIR not in sys.path:
    sys.path.insert(0, _MODULE_DIR)

#: Why this Slicer cannot run the module ("" when it can): the engine's packages need Python 3.10+.
UNSUPPORTED = "" if sys.version_info >= (3, 10) else (
    "SAM Fine-Tune needs 3D Slicer 5.10 or later (Python 3.10 or later); this Slicer runs Python %d.%d. "
    "Install a current Slicer from download.slicer.org." % sys.version_info[:2])

if not UNSUPPORTED:
    from SAMFineTuneMRML import deps, geometry, options, training  # noqa: E402
    from SAMFineTuneMRML.logic import SAMFineTuneCoreLogic, describeDevice  # noqa: E402
    from SAMFineTuneMRML.paths import cacheDirectory  # noqa: E402
else:
    SAMFineTuneCoreLogic = object


def resourcePath(relativePath):
    """Resources/ next to the module when installed, one folder up in the source tree."""
    for base in (_MODULE_DIR, os.path.dirname(_MODULE_DIR)):
        path = os.path.join(base, "Resources", relativePath)
        if os.path.exists(path):
            return path
    return os.path.join(_MODULE_DIR, "Resources", relativePath)


class SAMFineTune(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SAM Fine-Tune"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["SAMFineTune developers"]
        self.parent.helpText = (
            ("<b>%s</b><br>" % UNSUPPORTED if UNSUPPORTED else "")
            + "Segment a structure inside a box (Markups ROI) with Segment Anything (LiteMedSAM by default, "
            "SAM ViT-B/L/H or MedSAM from a checkpoint), slice by slice, in a background process. Correct the "
            "result with the Segment Editor, export the corrected cases to a training set and fine-tune a LoRA "
            "adapter that the next case uses. The same logic works from the Python console "
            "(<code>slicer.util.getModuleLogic('SAMFineTune').segment(volume, roi)</code>) and in batch runs "
            "(<code>SAMFineTuneScripts/batch.py</code>). Supported: 3D Slicer 5.10 and later.")
        self.parent.acknowledgementText = (
            "Uses Segment Anything (Meta AI), MedSAM and LiteMedSAM (Bo Wang lab), MONAI and PEFT.")
        iconPath = resourcePath("Icons/SAMFineTune.png")
        if os.path.exists(iconPath):
            self.parent.icon = qt.QIcon(iconPath)


@parameterNodeWrapper
class SAMFineTuneParameterNode:
    """Everything the panel remembers; saved with the scene. Paths are ``pathlib.Path``: the
    parameter-node GUI connectors bind a ctkPathLineEdit to nothing else (Slicer 5.10/5.12,
    ``Base/Python/slicer/parameterNodeWrapper/guiConnectors.py``); an empty path reads as '.'."""

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    segmentation: slicer.vtkMRMLSegmentationNode
    targetSegment: str = ""  # segment ID, "" = a new segment named after the ROI
    rois: list[slicer.vtkMRMLMarkupsROINode]
    model: str = "litemedsam"
    checkpoint: pathlib.Path
    adapter: str = ""  # adapter folder, "" = none
    device: str = "auto"
    window: str = "auto"
    customWindow: str = "400/40"
    axis: str = "axial"
    boxMode: str = "tracked"
    keepLargest: bool = True
    fillHoles: bool = True
    structureName: str = ""
    datasetDir: pathlib.Path
    epochs: Annotated[int, WithinRange(1, 1000)] = 20
    adapterName: str = ""


#: Parameters bound to widgets by the parameter-node wrapper (``connectParametersToGui``).
GUI_BINDINGS = {
    "inputVolume": "inputVolumeSelector",
    "segmentation": "segmentationSelector",
    "checkpoint": "checkpointPathLineEdit",
    "customWindow": "customWindowLineEdit",
    "keepLargest": "keepLargestCheckBox",
    "fillHoles": "fillHolesCheckBox",
    "structureName": "structureNameLineEdit",
    "datasetDir": "datasetPathLineEdit",
    "epochs": "epochsSpinBox",
    "adapterName": "adapterNameLineEdit",
}
#: Combo boxes whose items carry the parameter's value as item data, kept in step by the panel.
COMBO_BINDINGS = {"model": "modelComboBox", "adapter": "adapterComboBox", "device": "deviceComboBox",
                  "window": "windowComboBox", "axis": "axisComboBox", "boxMode": "boxModeComboBox",
                  "targetSegment": "targetSegmentComboBox"}


class SAMFineTuneWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingGUI = False
        self.tasks = []
        self.trainingTask = None
        self.infoTask = None
        self.curve = None
        self.timer = None

    def resourcePath(self, relativePath):
        return resourcePath(relativePath)

    # ------------------------------------------------------------ set-up

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        if UNSUPPORTED:
            label = qt.QLabel(UNSUPPORTED)
            label.wordWrap = True
            self.layout.addWidget(label)
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SAMFineTune.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SAMFineTuneLogic()
        self.logic.saveStateForUndoHook = self.saveSegmentEditorUndoState

        self._fillCombo(self.ui.modelComboBox, options.MODEL_CHOICES)
        self._fillCombo(self.ui.windowComboBox, options.WINDOW_CHOICES)
        self._fillCombo(self.ui.deviceComboBox, options.DEVICE_CHOICES)
        self._fillCombo(self.ui.axisComboBox, options.AXIS_CHOICES)
        self._fillCombo(self.ui.boxModeComboBox, options.BOX_MODE_CHOICES)
        self.refreshAdapters()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        for name, comboName in COMBO_BINDINGS.items():
            getattr(self.ui, comboName).currentIndexChanged.connect(lambda index, name=name: self._onComboChanged(name))
        self.ui.roiSelector.checkedNodesChanged.connect(self._onRoisChanged)
        self.ui.segmentationSelector.currentNodeChanged.connect(lambda node: self.refreshTargetSegments())
        self.ui.placeRoiAroundViewButton.clicked.connect(self.onPlaceRoiAroundView)
        self.ui.drawRoiButton.clicked.connect(self.onDrawRoi)
        self.ui.refreshAdaptersButton.clicked.connect(self.refreshAdapters)
        self.ui.checkDeviceButton.clicked.connect(self.onCheckDevice)
        self.ui.segmentButton.clicked.connect(self.onSegment)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self.ui.undoButton.clicked.connect(self.onUndo)
        self.ui.installDependenciesButton.clicked.connect(self.ensureDependencies)
        self.ui.exportButton.clicked.connect(self.onExport)
        self.ui.trainButton.clicked.connect(self.onTrain)
        self.ui.cancelTrainingButton.clicked.connect(self.onCancelTraining)

        self.timer = qt.QTimer()
        self.timer.setInterval(100)
        self.timer.timeout.connect(self.onPoll)

        self.updateDependenciesStatus()
        self.initializeParameterNode()

    def cleanup(self):
        self.removeObservers()
        if self.timer is not None:
            self.timer.stop()
        if self.logic is not None:
            self.logic.shutdown()

    def enter(self):
        if not UNSUPPORTED:
            self.initializeParameterNode()

    def exit(self):
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if volume:
                self._parameterNode.inputVolume = volume
        if not options.optionalPath(self._parameterNode.datasetDir):
            self._parameterNode.datasetDir = pathlib.Path(cacheDirectory(), "datasets")

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            if self._parameterNodeGuiTag:
                self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
                self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectParametersToGui(
                {name: getattr(self.ui, widget) for name, widget in GUI_BINDINGS.items()})
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self.updateGUIFromParameterNode()

    # ------------------------------------------------------------ GUI <-> parameter node

    @staticmethod
    def _fillCombo(combo, choices):
        combo.clear()
        for value, text in choices:
            combo.addItem(text, value)

    @staticmethod
    def _selectData(combo, value):
        index = combo.findData(value)
        if index >= 0 and index != combo.currentIndex:
            combo.setCurrentIndex(index)

    def _onComboChanged(self, name):
        if self._updatingGUI or not self._parameterNode:
            return
        value = getattr(self.ui, COMBO_BINDINGS[name]).currentData
        setattr(self._parameterNode, name, value if value is not None else "")

    def _onRoisChanged(self):
        if self._updatingGUI or not self._parameterNode:
            return
        self._parameterNode.rois = list(self.ui.roiSelector.checkedNodes())

    def updateGUIFromParameterNode(self, caller=None, event=None):
        if not self._parameterNode or self._updatingGUI:
            return
        self._updatingGUI = True
        try:
            p = self._parameterNode
            self.refreshTargetSegments()
            for name, comboName in COMBO_BINDINGS.items():
                self._selectData(getattr(self.ui, comboName), getattr(p, name))
            self._showCheckedRois(p.rois)
            self.ui.checkpointPathLineEdit.enabled = options.MODEL_SPECS[p.model].needs_checkpoint
            self.ui.customWindowLineEdit.enabled = p.window == options.CUSTOM_WINDOW
            self._updateButtons(p)
        finally:
            self._updatingGUI = False

    def _showCheckedRois(self, rois):
        checked = set(node.GetID() for node in rois if node is not None)
        for index in range(self.ui.roiSelector.nodeCount()):
            node = self.ui.roiSelector.nodeFromIndex(index)
            state = qt.Qt.Checked if node.GetID() in checked else qt.Qt.Unchecked
            if self.ui.roiSelector.checkState(node) != state:
                self.ui.roiSelector.setCheckState(node, state)

    def _updateButtons(self, p):
        busy = any(not task.finished for task in self.tasks)
        ready = bool(p.inputVolume) and bool(p.rois) and not busy
        self.ui.segmentButton.enabled = ready
        self.ui.segmentButton.toolTip = "Segment the checked ROIs" if ready else "Select a volume and check at least one ROI"
        self.ui.cancelButton.enabled = busy
        trainingBusy = self.trainingTask is not None and not self.trainingTask.finished
        datasetChosen = bool(options.optionalPath(p.datasetDir))
        self.ui.trainButton.enabled = datasetChosen and bool(p.adapterName) and not trainingBusy
        self.ui.cancelTrainingButton.enabled = trainingBusy
        self.ui.exportButton.enabled = datasetChosen

    def refreshTargetSegments(self):
        combo = self.ui.targetSegmentComboBox
        wasBlocked = combo.blockSignals(True)
        current = self._parameterNode.targetSegment if self._parameterNode else ""
        choices = [("", "(new segment, named after the ROI)")]
        node = self.ui.segmentationSelector.currentNode()
        if node is not None:
            segmentation = node.GetSegmentation()
            for index in range(segmentation.GetNumberOfSegments()):
                segmentId = segmentation.GetNthSegmentID(index)
                choices.append((segmentId, segmentation.GetSegment(segmentId).GetName()))
        self._fillCombo(combo, choices)
        self._selectData(combo, current)
        combo.blockSignals(wasBlocked)

    def refreshAdapters(self):
        current = self._parameterNode.adapter if self._parameterNode else ""
        wasBlocked = self.ui.adapterComboBox.blockSignals(True)
        self._fillCombo(self.ui.adapterComboBox, [("", "none (base model)")] + [
            (path, name) for name, path in self.logic.listAdapters()])
        self._selectData(self.ui.adapterComboBox, current)
        self.ui.adapterComboBox.blockSignals(wasBlocked)

    def segmentOptions(self):
        p = self._parameterNode
        return dict(model=p.model, checkpoint=options.optionalPath(p.checkpoint), adapter=p.adapter or None,
                    device=p.device, axis=p.axis, box_mode=p.boxMode, keep_largest=p.keepLargest,
                    fill_holes=p.fillHoles,
                    window=p.customWindow if p.window == options.CUSTOM_WINDOW else p.window)

    # ------------------------------------------------------------ dependencies

    def updateDependenciesStatus(self):
        missing = deps.describeMissing()
        self.ui.dependenciesLabel.text = ("Not installed yet: %s." % missing) if missing else ""
        self.ui.dependenciesLabel.visible = bool(missing)
        self.ui.installDependenciesButton.visible = bool(missing)
        return not missing

    def ensureDependencies(self):
        """Install what is missing, after the user agrees. True when everything is there."""
        needed = deps.missing()
        if not needed:
            return True
        if not slicer.util.confirmOkCancelDisplay(
                "SAM Fine-Tune needs Python packages that are not installed yet:\n\n%s\n\nInstall them now? "
                "This downloads about 1-3 GB and can take several minutes." % "\n".join(map(deps.describe, needed)),
                windowTitle="Install dependencies"):
            return False
        try:
            with slicer.util.WaitCursor():
                deps.install()
        except Exception as exc:
            slicer.util.errorDisplay("Installing the dependencies failed: %s" % exc, detailedText=str(exc))
            return False
        finally:
            self.updateDependenciesStatus()
        stale = deps.importedAlready(needed)
        if stale and slicer.util.confirmYesNoDisplay(
                "Installed. Slicer has loaded older versions of %s: restart Slicer now to use the new ones?"
                % ", ".join(stale), windowTitle="Restart Slicer"):
            slicer.util.restart()
        return not deps.missing()

    # ------------------------------------------------------------ ROIs

    def _newRoi(self, baseName="SAM ROI"):
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", slicer.mrmlScene.GenerateUniqueName(baseName))
        roi.CreateDefaultDisplayNodes()
        return roi

    def onPlaceRoiAroundView(self):
        volume = self._parameterNode.inputVolume
        if volume is None:
            slicer.util.errorDisplay("Select the volume first.")
            return
        sliceNode = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
        xyToRAS = sliceNode.GetXYToRAS()
        dims = sliceNode.GetDimensions()
        corners = [xyToRAS.MultiplyPoint((x, y, 0, 1))[:3] for x in (0, dims[0] - 1) for y in (0, dims[1] - 1)]
        try:
            box = geometry.viewRegionBox(volume, corners)
        except ValueError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        roi = self._newRoi()
        geometry.placeRoiAroundBox(roi, volume, box)
        self.ui.roiSelector.setCheckState(roi, qt.Qt.Checked)

    def onDrawRoi(self):
        roi = self._newRoi()
        self.ui.roiSelector.setCheckState(roi, qt.Qt.Checked)
        selectionNode = slicer.app.applicationLogic().GetSelectionNode()
        selectionNode.SetReferenceActivePlaceNodeClassName("vtkMRMLMarkupsROINode")
        selectionNode.SetActivePlaceNodeID(roi.GetID())
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        interaction.SetPlaceModePersistence(0)
        interaction.SetCurrentInteractionMode(interaction.Place)

    # ------------------------------------------------------------ segmentation

    def saveSegmentEditorUndoState(self, segmentationNode, volumeNode):
        """Save the state in the Segment Editor's own history too, so that Ctrl+Z there undoes
        the result. The editor is switched to this segmentation (where the user corrects it next)."""
        try:
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
            if editor.mrmlSegmentEditorNode() is None:
                return
            if editor.segmentationNode() is not segmentationNode:
                editor.setSegmentationNode(segmentationNode)
                editor.setSourceVolumeNode(volumeNode)
            editor.saveStateForUndo()
        except Exception as exc:  # the Segment Editor is optional here; our own Undo still works
            logging.debug("Segment Editor undo state not saved: %s", exc)

    def onSegment(self):
        if not self.ensureDependencies():
            return
        p = self._parameterNode
        rois = [roi for roi in p.rois if roi is not None]
        if p.segmentation is None:
            p.segmentation = self.logic.createSegmentation(p.inputVolume)
        targetSegment = p.targetSegment if len(rois) == 1 and p.targetSegment else None
        try:
            self.tasks = self.logic.segmentROIs(p.inputVolume, rois, p.segmentation, segmentIds=[targetSegment] * len(rois),
                                                waitForCompletion=False, **self.segmentOptions())
        except Exception as exc:
            self.tasks = []
            slicer.util.errorDisplay("Cannot segment: %s" % exc)
            return
        warnings = [task.warning for task in self.tasks if task.warning]
        self.ui.statusLabel.text = "\n".join(["Starting..."] + warnings)
        self.ui.progressBar.value = 0
        self.timer.start()
        self.updateGUIFromParameterNode()

    def onCancel(self):
        for task in self.tasks:
            task.cancel()
        self.ui.statusLabel.text = "Cancelling..."

    def onUndo(self):
        node = self._parameterNode.segmentation
        if node is not None and self.logic.undo(node):
            self.ui.statusLabel.text = "Last result undone."
        self.refreshTargetSegments()

    def onPoll(self):
        if self.tasks:
            self._pollSegmentation()
        if self.infoTask is not None and not self.infoTask.poll():
            info = self.infoTask
            self.ui.deviceInfoLabel.text = "Device: " + (describeDevice(info.result) if info.state == "done"
                                                         else (info.error or info.state))
            self.infoTask = None
        if self.trainingTask is not None:
            self.trainingTask.poll()
            self.ui.trainingProgressBar.value = int(100 * self.trainingTask.progress)
            self.ui.trainingStatusLabel.text = self.trainingTask.error or self.trainingTask.message
        busy = (any(not task.finished for task in self.tasks) or self.infoTask is not None
                or (self.trainingTask is not None and not self.trainingTask.finished))
        if not busy:
            self.timer.stop()
        self.updateGUIFromParameterNode()

    def _pollSegmentation(self):
        for task in self.tasks:
            task.poll()
        self.ui.progressBar.value = int(100 * sum(task.progress for task in self.tasks) / len(self.tasks))
        lines = ["%s: %s" % (task.roiNode.GetName(), task.error or task.message) for task in self.tasks]
        lines += [task.warning for task in self.tasks if task.warning]
        self.ui.statusLabel.text = "\n".join(lines)
        if all(task.finished for task in self.tasks):
            self.ui.undoButton.enabled = any(task.state == "done" for task in self.tasks)
            self.refreshTargetSegments()

    def onCheckDevice(self):
        if not self.ensureDependencies():
            return
        self.ui.deviceInfoLabel.text = "Device: starting the worker..."
        self.infoTask = self.logic.deviceInfo()
        self.timer.start()

    # ------------------------------------------------------------ fine-tuning

    def structureName(self):
        p = self._parameterNode
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
                summary = self.logic.exportTrainingSet(cases, options.optionalPath(self._parameterNode.datasetDir), name)
        except Exception as exc:
            slicer.util.errorDisplay("Export failed: %s" % exc)
            return
        self.ui.trainingStatusLabel.text = ("Added %d case(s) to %s (%s train, %s val)%s" % (
            len(summary.get("added", [])), summary.get("dataset"), summary.get("train"), summary.get("val"),
            "".join("\n" + w for w in summary.get("warnings", []))))

    def onTrain(self):
        if not self.ensureDependencies():
            return
        p = self._parameterNode
        self.curve = training.TrainingCurve(slicer.mrmlScene, "SAMFineTune " + p.adapterName)
        self.ui.trainingTableView.setMRMLTableNode(self.curve.table)
        slicer.modules.plots.logic().ShowChartInLayout(self.curve.chart)
        curve = self.curve
        try:
            self.trainingTask = self.logic.train(
                options.optionalPath(p.datasetDir), name=p.adapterName, waitForCompletion=False,
                onEvent=lambda message: curve.addFromMessage(str(message.get("message", ""))),
                onFinished=self.onTrainingFinished, model=p.model, checkpoint=options.optionalPath(p.checkpoint),
                device=p.device, epochs=p.epochs)
        except Exception as exc:
            slicer.util.errorDisplay("Cannot start training: %s" % exc)
            return
        self.timer.start()
        self.updateGUIFromParameterNode()

    def onCancelTraining(self):
        if self.trainingTask is not None:
            self.trainingTask.cancel()

    def onTrainingFinished(self, task):
        if task.state == "done":
            self.refreshAdapters()
            self._parameterNode.adapter = task.output
            self.ui.trainingStatusLabel.text = "Adapter '%s' ready and selected." % self._parameterNode.adapterName


class SAMFineTuneLogic(ScriptedLoadableModuleLogic, SAMFineTuneCoreLogic):
    """MRML <-> engine; usable from the Python console::

        logic = slicer.util.getModuleLogic("SAMFineTune")
        task = logic.segment(volumeNode, roiNode)            # blocking, LiteMedSAM, new segmentation
        task = logic.segment(volumeNode, roiNode, segmentationNode, window="lung", box_mode="fixed")
        logic.undo(task.segmentationNode)

    See SAMFineTuneMRML.logic.SAMFineTuneCoreLogic for everything it does.
    """

    def __init__(self):
        if UNSUPPORTED:
            raise RuntimeError(UNSUPPORTED)
        # ScriptedLoadableModuleLogic.__init__ calls super().__init__(), which is the core
        # logic's in this class's MRO: one call initialises both.
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return SAMFineTuneParameterNode(ScriptedLoadableModuleLogic.getParameterNode(self))


class SAMFineTuneTest(ScriptedLoadableModuleTest):
    """Reload and Test: the installation check of ``Testing/slicer_smoke.py`` (segment a synthetic CT
    in the worker, undo, export two cases, train one epoch, chart), with the panel filled."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_smoke()

    def test_smoke(self):
        if UNSUPPORTED:
            self.skipTest(UNSUPPORTED)
        missing = deps.describeMissing()
        if missing:
            self.skipTest("SAM Fine-Tune's Python packages are not installed (%s): open the module and press "
                          "'Install dependencies', then run the test again." % missing)
        from SAMFineTuneMRML.smoke import SmokeRun

        logic = SAMFineTuneLogic()
        try:
            SmokeRun(logic, slicer.mrmlScene, say=self.delayDisplay, fillPanel=fillPanel).run()
        finally:
            logic.shutdown()


def fillPanel(volumeNode, roiNode):
    """Open the module panel and fill its parameter node (used by the smoke test)."""
    slicer.util.selectModule("SAMFineTune")
    widget = slicer.util.getModuleWidget("SAMFineTune")
    parameters = widget.logic.getParameterNode()
    parameters.inputVolume = volumeNode
    parameters.rois = [roiNode]
    parameters.window = "auto"
    slicer.app.processEvents()
    if not widget.ui.segmentButton.enabled:
        raise AssertionError("the panel's Segment button stays disabled with a volume and an ROI chosen")
