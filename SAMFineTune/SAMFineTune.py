"""SAM Fine-Tune: Segment Anything slice by slice inside ROI boxes, and LoRA fine-tuning.

Thin module file: the MRML work is in ``SAMFineTuneMRML`` (runs without the application, so
it is tested in CI with slicer-core), the engine in ``SAMFineTuneLib`` (plain Python, run in a
background worker process). Nothing heavy is imported here: the module loads without torch
and without a GUI (``--no-main-window``). This file stays valid Python 3.9, so that an older
Slicer (5.8 ships Python 3.9) shows why the module cannot run instead of failing to load.
"""

import os
import sys
import unittest
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
    from SAMFineTuneMRML import deps, options  # noqa: E402
    from SAMFineTuneMRML.logic import SAMFineTuneCoreLogic, describeDevice  # noqa: E402
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
        self.parent.dependencies = ["Segmentations"]  # the SAM effect is a Segment Editor effect
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
        if not UNSUPPORTED and hasattr(slicer, "app"):
            slicer.app.connect("startupCompleted()", registerEditorEffect)


#: The Segment Editor effect this module registers ("SAM": clicks, boxes, propagation).
EFFECT_SOURCE = os.path.join(_MODULE_DIR, "SAMFineTuneEffect", "SegmentEditorEffect.py")


def registerEditorEffect():
    """Register the SAM effect with the Segment Editor (as Slicer's ScriptedSegmentEditorEffect template does)."""
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    instance = effects.qSlicerSegmentEditorScriptedEffect(None)
    instance.setPythonSource(EFFECT_SOURCE.replace("\\", "/"))
    instance.self().register()


@parameterNodeWrapper
class SAMFineTuneParameterNode:
    """Everything the panel remembers; saved with the scene."""

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    segmentation: slicer.vtkMRMLSegmentationNode
    targetSegment: str = ""  # segment ID, "" = a new segment named after the ROI
    rois: list[slicer.vtkMRMLMarkupsROINode]
    model: str = "litemedsam"
    checkpoint: str = ""  # "" = none, as is "." (how a pathlib parameter stores an empty path)
    adapter: str = ""  # adapter folder, "" = none
    device: str = "auto"
    backend: str = "auto"
    precision: str = "auto"
    window: str = "auto"
    customWindow: str = "400/40"
    axis: str = "axial"
    boxMode: str = "auto"
    keepLargest: bool = True
    fillHoles: bool = True
    zoom: bool = False
    triplanar: bool = False
    structureName: str = ""
    datasetDir: str = ""  # "" = one training set per structure in the user's folder (paths.trainingSetFolder)
    epochs: Annotated[int, WithinRange(1, 1000)] = 6  # the engine's (catalogue.TRAINING_DEFAULTS), checked by a test
    adapterName: str = ""
    keepLearning: bool = False  # opt-in: retrain after every keepLearningEvery exported cases
    keepLearningEvery: Annotated[int, WithinRange(1, 100)] = 3
    learnClicks: bool = False  # train with simulated clicks (training.clicks): the adapter then answers clicks


#: Parameters bound to widgets by the parameter-node wrapper (``connectParametersToGui``).
GUI_BINDINGS = {
    "inputVolume": "inputVolumeSelector",
    "segmentation": "segmentationSelector",
    "customWindow": "customWindowLineEdit",
    "keepLargest": "keepLargestCheckBox",
    "fillHoles": "fillHolesCheckBox",
    "zoom": "zoomCheckBox",
    "triplanar": "triplanarCheckBox",
    "structureName": "structureNameLineEdit",
    "epochs": "epochsSpinBox",
    "adapterName": "adapterNameLineEdit",
    "keepLearning": "keepLearningCheckBox",
    "keepLearningEvery": "keepLearningSpinBox",
    "learnClicks": "learnClicksCheckBox",
}
#: Combo boxes whose items carry the parameter's value as item data, kept in step by the panel.
COMBO_BINDINGS = {"model": "modelComboBox", "adapter": "adapterComboBox", "device": "deviceComboBox",
                  "backend": "backendComboBox", "precision": "precisionComboBox",
                  "window": "windowComboBox", "axis": "axisComboBox", "boxMode": "boxModeComboBox",
                  "targetSegment": "targetSegmentComboBox"}
#: Path parameters, text bound by the panel: Slicer's connectors bind a ctkPathLineEdit only to a
#: pathlib type (Slicer 5.10/5.12 ``parameterNodeWrapper/guiConnectors.py``), whose unset value shows '.'.
PATH_BINDINGS = {"checkpoint": "checkpointPathLineEdit", "datasetDir": "datasetPathLineEdit"}


def segmentOptions(p):
    """The engine's options from the panel's parameter node (the panel and the SAM effect use them).
    Tri-planar is for the base model (``Segmenter.segment`` refuses it with an adapter), so with an
    adapter selected the panel greys its box out and leaves it out."""
    return dict(model=p.model, checkpoint=options.optionalPath(p.checkpoint), adapter=p.adapter or None,
                device=p.device, backend=p.backend, precision=p.precision, axis=p.axis, box_mode=p.boxMode,
                keep_largest=p.keepLargest, fill_holes=p.fillHoles, zoom=p.zoom,
                triplanar=p.triplanar and not p.adapter,
                window=p.customWindow if p.window == options.CUSTOM_WINDOW else p.window)


class SAMFineTuneWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: keeps the parameter node and the widgets in step, and polls the sections' jobs
    (segmentation, fine-tuning, device check) from one timer."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.parameters = None
        self._parameterNodeGuiTag = None
        self._updatingGUI = False
        self.sections = []
        self.infoTask = None
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
        from SAMFineTuneGUI import dependencies
        from SAMFineTuneGUI.combos import fillCombo
        from SAMFineTuneGUI.finetuning import FineTuningSection
        from SAMFineTuneGUI.segmentation import SegmentationSection

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SAMFineTune.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SAMFineTuneLogic()
        for combo, choices in (("modelComboBox", options.MODEL_CHOICES), ("windowComboBox", options.WINDOW_CHOICES),
                               ("deviceComboBox", options.DEVICE_CHOICES), ("axisComboBox", options.AXIS_CHOICES),
                               ("boxModeComboBox", options.BOX_MODE_CHOICES),
                               ("backendComboBox", options.BACKEND_CHOICES),
                               ("precisionComboBox", options.PRECISION_CHOICES)):
            fillCombo(getattr(self.ui, combo), choices)
        self.ui.backendComboBox.toolTip = options.BACKEND_HELP
        self.ui.precisionComboBox.toolTip = options.PRECISION_HELP
        self.ui.zoomCheckBox.toolTip = options.PROMPT_OPTIONS["zoom"]
        self.ui.triplanarCheckBox.toolTip = options.PROMPT_OPTIONS["triplanar"]
        self.refreshAdapters()
        self.sections = [SegmentationSection(self), FineTuningSection(self)]

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        for name, comboName in COMBO_BINDINGS.items():
            combo = getattr(self.ui, comboName)
            combo.currentIndexChanged.connect(lambda _, name=name, combo=combo: self.onEdited(name, combo.currentData))
        for name, editName in PATH_BINDINGS.items():
            getattr(self.ui, editName).currentPathChanged.connect(lambda path, name=name: self.onEdited(name, path))
        self.ui.roiSelector.checkedNodesChanged.connect(self.onRoisChanged)
        self.ui.refreshAdaptersButton.clicked.connect(self.refreshAdapters)
        self.ui.checkDeviceButton.clicked.connect(self.onCheckDevice)
        self.ui.installDependenciesButton.clicked.connect(lambda: dependencies.ensure(self.ui))

        self.timer = qt.QTimer()
        self.timer.setInterval(100)
        self.timer.timeout.connect(self.onPoll)
        dependencies.showStatus(self.ui)
        self.initializeParameterNode()

    def cleanup(self):
        self.setParameterNode(None)
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
        if not self.parameters.inputVolume:
            volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if volume:
                self.parameters.inputVolume = volume

    def setParameterNode(self, inputParameterNode):
        if self.parameters:
            if self._parameterNodeGuiTag is not None:  # the first binding's tag is 0
                self.parameters.disconnectGui(self._parameterNodeGuiTag)
                self._parameterNodeGuiTag = None
            self.removeObserver(self.parameters, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.parameters = inputParameterNode
        if self.parameters:
            self._parameterNodeGuiTag = self.parameters.connectParametersToGui(
                {name: getattr(self.ui, widget) for name, widget in GUI_BINDINGS.items()})
            self.addObserver(self.parameters, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self.updateGUIFromParameterNode()

    # ------------------------------------------------------------ GUI <-> parameter node

    def onEdited(self, name, value):
        """A combo box or path edited by hand: into the parameter node (None, no item, as "")."""
        if not self._updatingGUI and self.parameters:
            setattr(self.parameters, name, value if value is not None else "")

    def onRoisChanged(self):
        if not self._updatingGUI and self.parameters:
            self.parameters.rois = list(self.ui.roiSelector.checkedNodes())

    def updateGUIFromParameterNode(self, caller=None, event=None):
        from SAMFineTuneGUI.combos import selectData
        from SAMFineTuneGUI.pathedits import showPath

        if not self.parameters or self._updatingGUI:
            return
        self._updatingGUI = True
        try:
            p = self.parameters
            for section in self.sections:
                section.updateGUI(p)
            for name, comboName in COMBO_BINDINGS.items():
                selectData(getattr(self.ui, comboName), getattr(p, name))
            for name, editName in PATH_BINDINGS.items():
                showPath(getattr(self.ui, editName), getattr(p, name))
            self.showCheckedRois(p.rois)
            self.ui.checkpointPathLineEdit.enabled = options.MODEL_SPECS[p.model].needs_checkpoint
            self.ui.customWindowLineEdit.enabled = p.window == options.CUSTOM_WINDOW
            self.ui.triplanarCheckBox.enabled = not p.adapter
        finally:
            self._updatingGUI = False

    def showCheckedRois(self, rois):
        checked = set(node.GetID() for node in rois if node is not None)
        for index in range(self.ui.roiSelector.nodeCount()):
            node = self.ui.roiSelector.nodeFromIndex(index)
            state = qt.Qt.Checked if node.GetID() in checked else qt.Qt.Unchecked
            if self.ui.roiSelector.checkState(node) != state:
                self.ui.roiSelector.setCheckState(node, state)

    def refreshAdapters(self):
        from SAMFineTuneGUI.combos import refillCombo

        choices = [("", "none (base model)")] + [(path, name) for name, path in self.logic.listAdapters()]
        refillCombo(self.ui.adapterComboBox, choices, self.parameters.adapter if self.parameters else "")

    def segmentOptions(self):
        return segmentOptions(self.parameters)

    # ------------------------------------------------------------ jobs

    def startPolling(self):
        self.timer.start()
        self.updateGUIFromParameterNode()

    def onPoll(self):
        busy = [section.poll() for section in self.sections]
        if self.infoTask is not None and not self.infoTask.poll():
            info = self.infoTask
            self.ui.deviceInfoLabel.text = "Device: " + (describeDevice(info.result) if info.state == "done"
                                                         else (info.error or info.state))
            self.infoTask = None
        if not any(busy) and self.infoTask is None:
            self.timer.stop()
        self.updateGUIFromParameterNode()

    def onCheckDevice(self):
        from SAMFineTuneGUI import dependencies

        if not dependencies.ensure(self.ui):
            return
        self.ui.deviceInfoLabel.text = "Device: starting the worker..."
        self.infoTask = self.logic.deviceInfo()
        self.startPolling()


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
        """Reload and Test calls this outside a test runner, where a skip would read as a failure."""
        self.setUp()
        try:
            self.test_smoke()
        except unittest.SkipTest as skipped:
            slicer.util.infoDisplay("SAM Fine-Tune's self-test was skipped: %s" % skipped, windowTitle="SAM Fine-Tune")

    def test_smoke(self):
        if UNSUPPORTED:
            self.skipTest(UNSUPPORTED)
        missing = deps.describeMissing()
        if missing:
            self.skipTest("SAM Fine-Tune's Python packages are not installed (%s): open the module and press "
                          "'Install dependencies', then run the test again." % missing)
        from SAMFineTuneGUI.selftest import fillPanel
        from SAMFineTuneMRML.smoke import SmokeRun

        logic = SAMFineTuneLogic()
        try:
            SmokeRun(logic, slicer.mrmlScene, say=self.delayDisplay, fillPanel=fillPanel).run()
        finally:
            logic.shutdown()

