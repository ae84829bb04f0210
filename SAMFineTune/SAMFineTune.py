"""SAM Fine-Tune: Segment Anything slice by slice inside ROI boxes, and LoRA fine-tuning.

Thin module file: the MRML work is in ``SAMFineTuneMRML`` (runs without the application, so
it is tested in CI with slicer-core), the engine in ``SAMFineTuneLib`` (plain Python, run in a
background worker process). Nothing heavy is imported here: the module loads without torch
and without a GUI (``--no-main-window``).
"""

import logging
import os
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

from SAMFineTuneMRML import deps, geometry, training  # noqa: E402
from SAMFineTuneMRML.logic import (MODEL_CHOICES, WINDOW_CHOICES, SAMFineTuneCoreLogic,  # noqa: E402
                                   describeDevice, ensureLibraryImportable)

ensureLibraryImportable()


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
            "Segment a structure inside a box (Markups ROI) with Segment Anything (LiteMedSAM by default, "
            "SAM ViT-B/L/H or MedSAM from a checkpoint), slice by slice, in a background process. Correct the "
            "result with the Segment Editor, export the corrected cases to a training set and fine-tune a LoRA "
            "adapter that the next case uses. The same logic works from the Python console "
            "(<code>slicer.util.getModuleLogic('SAMFineTune').segment(volume, roi)</code>) and in batch runs "
            "(<code>SAMFineTune/batch.py</code>).")
        self.parent.acknowledgementText = (
            "Uses Segment Anything (Meta AI), MedSAM and LiteMedSAM (Bo Wang lab), MONAI and PEFT.")
        iconPath = resourcePath("Icons/SAMFineTune.png")
        if os.path.exists(iconPath):
            self.parent.icon = qt.QIcon(iconPath)


@parameterNodeWrapper
class SAMFineTuneParameterNode:
    """Everything the panel remembers; saved with the scene."""

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    segmentation: slicer.vtkMRMLSegmentationNode
    targetSegment: str = ""  # segment ID, "" = a new segment named after the ROI
    rois: list[slicer.vtkMRMLMarkupsROINode]
    model: str = "litemedsam"
    checkpoint: str = ""
    adapter: str = ""  # adapter folder, "" = none
    device: str = "auto"
    window: str = "auto"
    customWindow: str = "400/40"
    axis: str = "axial"
    boxMode: str = "tracked"
    keepLargest: bool = True
    fillHoles: bool = True
    structureName: str = ""
    datasetDir: str = ""
    epochs: Annotated[int, WithinRange(1, 1000)] = 20
    adapterName: str = ""


# Combo boxes whose items carry the parameter's value as item data.
_COMBOS = {"model": "modelComboBox", "adapter": "adapterComboBox", "device": "deviceComboBox",
           "window": "windowComboBox", "axis": "axisComboBox", "boxMode": "boxModeComboBox",
           "targetSegment": "targetSegmentComboBox"}


class SAMFineTuneWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
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
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SAMFineTune.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SAMFineTuneLogic()
        self.logic.saveStateForUndoHook = self.saveSegmentEditorUndoState

        self._fillCombo(self.ui.modelComboBox, MODEL_CHOICES)
        self._fillCombo(self.ui.windowComboBox, WINDOW_CHOICES)
        self._fillCombo(self.ui.deviceComboBox, [("auto", "auto"), ("cpu", "CPU"), ("cuda", "GPU (CUDA)")])
        self._fillCombo(self.ui.axisComboBox, [(a, a) for a in ("axial", "coronal", "sagittal")])
        self._fillCombo(self.ui.boxModeComboBox, [("tracked", "tracked (box follows the structure)"),
                                                  ("fixed", "fixed (ROI box on every slice)")])
        self.refreshAdapters()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        for name, comboName in _COMBOS.items():
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
        self.ui.installDependenciesButton.clicked.connect(lambda: self.ensureDependencies(force=True))
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
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

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

    _parameterNodeGuiTag = None

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            if self._parameterNodeGuiTag:
                self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectParametersToGui({
                "inputVolume": self.ui.inputVolumeSelector,
                "segmentation": self.ui.segmentationSelector,
                "checkpoint": self.ui.checkpointPathLineEdit,
                "customWindow": self.ui.customWindowLineEdit,
                "keepLargest": self.ui.keepLargestCheckBox,
                "fillHoles": self.ui.fillHolesCheckBox,
                "structureName": self.ui.structureNameLineEdit,
                "datasetDir": self.ui.datasetPathLineEdit,
                "epochs": self.ui.epochsSpinBox,
                "adapterName": self.ui.adapterNameLineEdit,
            })
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
        value = getattr(self.ui, _COMBOS[name]).currentData
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
            for name, comboName in _COMBOS.items():
                self._selectData(getattr(self.ui, comboName), getattr(p, name))
            checked = set(node.GetID() for node in p.rois if node is not None)
            for index in range(self.ui.roiSelector.nodeCount()):
                node = self.ui.roiSelector.nodeFromIndex(index)
                state = qt.Qt.Checked if node.GetID() in checked else qt.Qt.Unchecked
                if self.ui.roiSelector.checkState(node) != state:
                    self.ui.roiSelector.setCheckState(node, state)
            self.ui.checkpointPathLineEdit.enabled = p.model != "litemedsam"
            self.ui.customWindowLineEdit.enabled = p.window == "custom"
            busy = any(not task.finished for task in self.tasks)
            ready = bool(p.inputVolume) and bool(p.rois) and not busy
            self.ui.segmentButton.enabled = ready
            self.ui.segmentButton.toolTip = ("Segment the checked ROIs" if ready else
                                             "Select a volume and check at least one ROI")
            self.ui.cancelButton.enabled = busy
            training_busy = self.trainingTask is not None and not self.trainingTask.finished
            self.ui.trainButton.enabled = bool(p.datasetDir) and bool(p.adapterName) and not training_busy
            self.ui.cancelTrainingButton.enabled = training_busy
            self.ui.exportButton.enabled = bool(p.datasetDir)
        finally:
            self._updatingGUI = False

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
        return dict(model=p.model, checkpoint=p.checkpoint or None, adapter=p.adapter or None, device=p.device,
                    axis=p.axis, window=p.customWindow if p.window == "custom" else p.window,
                    box_mode=p.boxMode, keep_largest=p.keepLargest, fill_holes=p.fillHoles)

    # ------------------------------------------------------------ dependencies

    def updateDependenciesStatus(self):
        missing = deps.describeMissing()
        self.ui.dependenciesLabel.text = ("Not installed yet: %s." % missing) if missing else ""
        self.ui.dependenciesLabel.visible = bool(missing)
        self.ui.installDependenciesButton.visible = bool(missing)
        return not missing

    def ensureDependencies(self, force=False):
        """Install what is missing, after the user agrees. Returns True when all is there."""
        missing = deps.describeMissing()
        if not missing:
            return True
        if not slicer.util.confirmOkCancelDisplay(
                "SAM Fine-Tune needs Python packages that are not installed yet:\n\n%s\n\nInstall them now? "
                "This downloads about 1-3 GB and can take several minutes." % missing,
                windowTitle="Install dependencies"):
            return False
        dialog = slicer.util.createProgressDialog(labelText="Installing dependencies...", maximum=0)
        try:
            slicer.app.processEvents()
            if deps.missingTorch():
                dialog.labelText = "Installing PyTorch (through the PyTorch extension)..."
                slicer.app.processEvents()
                deps.installTorch(askConfirmation=False)
            dialog.labelText = "Installing %s..." % ", ".join(deps.missingPackages()) if deps.missingPackages() else ""
            slicer.app.processEvents()
            deps.installPackages()
        except Exception as exc:
            slicer.util.errorDisplay("Installing the dependencies failed: %s" % exc, detailedText=str(exc))
            return False
        finally:
            dialog.close()
            self.updateDependenciesStatus()
        return not deps.describeMissing()

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
        self.tasks = []
        try:
            for roi in rois:
                self.tasks.append(self.logic.segment(p.inputVolume, roi, p.segmentation, segmentId=targetSegment,
                                                     waitForCompletion=False, backend="worker",
                                                     **self.segmentOptions()))
        except Exception as exc:
            for task in self.tasks:
                task.cancel()
            slicer.util.errorDisplay("Cannot segment: %s" % exc)
            self.tasks = []
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
            for task in self.tasks:
                task.poll()
            self.ui.progressBar.value = int(100 * sum(task.progress for task in self.tasks) / len(self.tasks))
            lines = ["%s: %s" % (task.roiNode.GetName(), task.error or task.message) for task in self.tasks]
            lines += [task.warning for task in self.tasks if task.warning]
            self.ui.statusLabel.text = "\n".join(lines)
            if all(task.finished for task in self.tasks):
                self.ui.undoButton.enabled = any(task.state == "done" for task in self.tasks)
                self.refreshTargetSegments()
        if self.infoTask is not None and self.infoTask.poll() is False:
            self.ui.deviceInfoLabel.text = "Device: " + (describeDevice(self.infoTask.result) if self.infoTask.state == "done"
                                                         else (self.infoTask.error or self.infoTask.state))
            self.infoTask = None
        if self.trainingTask is not None and not self.trainingTask.finished:
            self.trainingTask.poll()
        if self.trainingTask is not None:
            self.ui.trainingProgressBar.value = int(100 * self.trainingTask.progress)
            self.ui.trainingStatusLabel.text = self.trainingTask.error or self.trainingTask.message
        busy = (any(not task.finished for task in self.tasks) or self.infoTask is not None
                or (self.trainingTask is not None and not self.trainingTask.finished))
        if not busy:
            self.timer.stop()
        self.updateGUIFromParameterNode()

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
                summary = self.logic.exportTrainingSet(cases, self._parameterNode.datasetDir, name)
        except Exception as exc:
            slicer.util.errorDisplay("Export failed: %s" % exc)
            return
        self.ui.trainingStatusLabel.text = ("Added %d case(s) to %s (%s train, %s val)%s" % (
            len(summary.get("added", [])), summary.get("dataset", self._parameterNode.datasetDir), summary.get("train"),
            summary.get("val"), "".join("\n" + w for w in summary.get("warnings", []))))

    def onTrain(self):
        if not self.ensureDependencies():
            return
        p = self._parameterNode
        self.curve = training.TrainingCurve(slicer.mrmlScene, "SAMFineTune " + p.adapterName)
        self.ui.trainingTableView.setMRMLTableNode(self.curve.table)
        slicer.modules.plots.logic().ShowChartInLayout(self.curve.chart)
        curve = self.curve

        def onEvent(message):
            curve.addFromMessage(str(message.get("message", "")))

        try:
            self.trainingTask = self.logic.train(p.datasetDir, name=p.adapterName, waitForCompletion=False,
                                                 onEvent=onEvent, onFinished=self.onTrainingFinished,
                                                 model=p.model, checkpoint=p.checkpoint or None, device=p.device,
                                                 epochs=p.epochs)
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
        ScriptedLoadableModuleLogic.__init__(self)
        SAMFineTuneCoreLogic.__init__(self)

    def getParameterNode(self):
        return SAMFineTuneParameterNode(ScriptedLoadableModuleLogic.getParameterNode(self))


class SAMFineTuneTest(ScriptedLoadableModuleTest):
    """Reload and Test: a synthetic CT with a known organ label, an ROI around it, LiteMedSAM,
    Dice against the label; undo; the ROI node is kept."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_roi_box_round_trip()
        self.setUp()
        self.test_segment_phantom_with_litemedsam()

    def test_roi_box_round_trip(self):
        import numpy as np

        volume = slicer.util.addVolumeFromArray(np.zeros((8, 30, 40), np.int16),
                                                np.array([[-0.8, 0, 0, 10], [0, -0.8, 0, 20], [0, 0, 2.5, -5], [0, 0, 0, 1]]))
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
        geometry.placeRoiAroundBox(roi, volume, (5, 6, 2, 20, 25, 6))
        self.assertEqual(geometry.roiToIJKBox(roi, volume).box, (5, 6, 2, 20, 25, 6))

    def test_segment_phantom_with_litemedsam(self):
        import numpy as np

        missing = deps.describeMissing()
        self.assertEqual(missing, "", "install the dependencies first (module panel, Install dependencies): " + missing)
        from SAMFineTuneLib.phantom import bounding_box, make_ct_phantom

        self.delayDisplay("Synthetic CT with a known organ")
        ct, label = make_ct_phantom(shape_kji=(5, 96, 96), spacing_xyz=(1.0, 1.0, 4.0))
        volume = slicer.util.addVolumeFromArray(ct.array, np.diag([1.0, 1.0, 4.0, 1.0]), name="SAMFineTunePhantom")
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "organ")
        geometry.placeRoiAroundBox(roi, volume, bounding_box(label.array, (2, 2, 0)))

        self.delayDisplay("Segmenting with LiteMedSAM")
        logic = SAMFineTuneLogic()
        task = logic.segment(volume, roi)
        result = logic.segmentArray(task.segmentationNode, task.segmentId, volume)
        truth = label.array > 0
        dice = 2.0 * np.logical_and(result, truth).sum() / (result.sum() + truth.sum())
        self.delayDisplay("Dice %.3f" % dice)
        self.assertGreater(dice, 0.85)
        self.assertIs(slicer.mrmlScene.GetNodeByID(roi.GetID()), roi)  # the user's ROI is kept

        self.assertTrue(logic.undo(task.segmentationNode))
        self.assertFalse(logic.segmentArray(task.segmentationNode, task.segmentId, volume).any())
        self.delayDisplay("Test passed")
