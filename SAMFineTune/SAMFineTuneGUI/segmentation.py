"""The panel's segmentation section: ROIs, Segment, Cancel, Undo, and Correct with clicks."""

import logging

import qt
import slicer
from SAMFineTuneMRML import geometry
from SAMFineTuneMRML.interactive import EFFECT_NAME

from . import dependencies
from .combos import refillCombo


def segmentEditor():
    return slicer.modules.segmenteditor.widgetRepresentation().self().editor


class SegmentationSection:
    def __init__(self, panel):
        self.panel = panel
        self.ui = panel.ui
        self.tasks = []
        ui = self.ui
        ui.segmentationSelector.currentNodeChanged.connect(lambda node: self.refreshTargetSegments())
        ui.placeRoiAroundViewButton.clicked.connect(self.onPlaceRoiAroundView)
        ui.drawRoiButton.clicked.connect(self.onDrawRoi)
        ui.segmentButton.clicked.connect(self.onSegment)
        ui.cancelButton.clicked.connect(self.onCancel)
        ui.undoButton.clicked.connect(self.onUndo)
        ui.correctButton.clicked.connect(self.onCorrect)
        panel.logic.saveStateForUndoHook = self.saveSegmentEditorUndoState

    @property
    def busy(self):
        return any(not task.finished for task in self.tasks)

    def updateGUI(self, p):
        self.refreshTargetSegments()
        ready = bool(p.inputVolume) and bool(p.rois) and not self.busy
        self.ui.segmentButton.enabled = ready
        self.ui.segmentButton.toolTip = ("Segment the checked ROIs" if ready
                                         else "Select a volume and check at least one ROI")
        self.ui.cancelButton.enabled = self.busy

    def refreshTargetSegments(self):
        p = self.panel.parameters
        choices = [("", "(new segment, named after the ROI)")]
        node = self.ui.segmentationSelector.currentNode()
        if node is not None:
            segmentation = node.GetSegmentation()
            for index in range(segmentation.GetNumberOfSegments()):
                segmentId = segmentation.GetNthSegmentID(index)
                choices.append((segmentId, segmentation.GetSegment(segmentId).GetName()))
        if not refillCombo(self.ui.targetSegmentComboBox, choices, p.targetSegment if p else "") and p:
            p.targetSegment = ""  # the segment is gone: the list shows a new segment, and so does the setting

    # ------------------------------------------------------------ ROIs

    def newRoi(self, baseName="SAM ROI"):
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", slicer.mrmlScene.GenerateUniqueName(baseName))
        roi.CreateDefaultDisplayNodes()
        return roi

    def onPlaceRoiAroundView(self):
        volume = self.panel.parameters.inputVolume
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
        roi = self.newRoi()
        geometry.placeRoiAroundBox(roi, volume, box)
        self.ui.roiSelector.setCheckState(roi, qt.Qt.Checked)

    def onDrawRoi(self):
        roi = self.newRoi()
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
            editor = segmentEditor()
            if editor.mrmlSegmentEditorNode() is None:
                return
            if editor.segmentationNode() is not segmentationNode:
                editor.setSegmentationNode(segmentationNode)
                editor.setSourceVolumeNode(volumeNode)
            editor.saveStateForUndo()
        except Exception as exc:  # the Segment Editor is optional here; our own Undo still works
            logging.debug("Segment Editor undo state not saved: %s", exc)

    def onSegment(self):
        if not dependencies.ensure(self.ui):
            return
        p = self.panel.parameters
        rois = [roi for roi in p.rois if roi is not None]
        if p.segmentation is None:
            p.segmentation = self.panel.logic.createSegmentation(p.inputVolume)
        targetSegment = p.targetSegment if len(rois) == 1 and p.targetSegment else None
        try:
            self.tasks = self.panel.logic.segmentROIs(p.inputVolume, rois, p.segmentation,
                                                      segmentIds=[targetSegment] * len(rois), waitForCompletion=False,
                                                      **self.panel.segmentOptions())
        except Exception as exc:
            self.tasks = []
            slicer.util.errorDisplay("Cannot segment: %s" % exc)
            return
        warnings = [task.warning for task in self.tasks if task.warning]
        self.ui.statusLabel.text = "\n".join(["Starting..."] + warnings)
        self.ui.progressBar.value = 0
        self.panel.startPolling()

    def onCancel(self):
        for task in self.tasks:
            task.cancel()
        self.ui.statusLabel.text = "Cancelling..."

    def onUndo(self):
        node = self.panel.parameters.segmentation
        if node is not None and self.panel.logic.undo(node):
            self.ui.statusLabel.text = "Last result undone."
        self.refreshTargetSegments()

    def onCorrect(self):
        """Open the Segment Editor's SAM effect on the segment just produced."""
        done = [task for task in self.tasks if task.state == "done"]
        if not done:
            return
        task = done[-1]
        slicer.util.selectModule("SegmentEditor")
        editor = segmentEditor()
        editor.setSegmentationNode(task.segmentationNode)
        editor.setSourceVolumeNode(task.volumeNode)
        editor.setCurrentSegmentID(task.segmentId)
        editor.setActiveEffectByName(EFFECT_NAME)

    def poll(self):
        """Advance the jobs; True while any runs."""
        if not self.tasks:
            return False
        for task in self.tasks:
            task.poll()
        self.ui.progressBar.value = int(100 * sum(task.progress for task in self.tasks) / len(self.tasks))
        lines = ["%s: %s" % (task.roiNode.GetName(), task.error or task.message) for task in self.tasks]
        lines += [task.warning for task in self.tasks if task.warning]
        self.ui.statusLabel.text = "\n".join(lines)
        if not self.busy:
            self.ui.undoButton.enabled = self.ui.correctButton.enabled = any(t.state == "done" for t in self.tasks)
            self.refreshTargetSegments()
        return self.busy
