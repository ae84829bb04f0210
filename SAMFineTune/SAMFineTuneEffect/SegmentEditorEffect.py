"""The "SAM" Segment Editor effect: correct the selected segment with clicks and boxes, slice by
slice, and re-propagate it from a corrected slice.

Each click is one decode by the background worker on the slice's cached embedding, written
into the selected segment the way every Segment Editor effect writes (the editable area,
intensity range and "modify other segments" settings apply) and undoable with the editor's Undo.
The model, adapter and window are the SAM Fine-Tune module's.
"""

import logging
import os

import qt
import slicer
import vtk
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

from SAMFineTuneMRML import geometry, interactive, segments, slices

#: The key that forgets the slice's prompts: Escape, Space, z, y, i, q, w and the digits are the
#: Segment Editor's own shortcuts, and x is what Slicer's Draw effect uses to take back its points.
FORGET_KEY = "x"

HELP = """<html>Correct the selected segment with Segment Anything, one slice at a time.<p><ul style="margin: 0">
<li><b>Left click:</b> add a positive point (this is part of the structure).</li>
<li><b>Shift + left click</b> or <b>right click:</b> add a negative point (this is not).</li>
<li><b>Left drag:</b> draw a box around the structure on this slice.</li>
<li><b>x:</b> forget this slice's points and box (the segment stays as it is). <b>Escape</b> leaves the effect;
a click or propagation still running then stops and writes nothing.</li>
<li><b>Propagate:</b> fill the slices between the slices you corrected, each from the box between theirs,
and track the structure on from the outermost ones through the volume, without touching the slices you
corrected; inside the ROI the segment was made from, when the slice you corrected last lies in it. The
segment remembers its corrected slices, so Propagate also works on corrections made before.</li>
<li><b>Ctrl+Z</b> (the editor's Undo) takes back one click or one propagation.</li>
</ul><p>Every click refines the slice where you click, starting from the previous click's result on it.
The editor's masking settings apply: the editable area, the intensity range and whether other segments may
be overwritten. The model, adapter and window are those of the SAM Fine-Tune module; an adapter trained with
"also learn to answer clicks" answers the clicks itself.</html>"""


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    def __init__(self, scriptedEffect):
        scriptedEffect.name = interactive.EFFECT_NAME
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.session = None
        self.prompts = interactive.Prompts()
        self.lastSlice = None
        self.tasks = []
        self.press = None  # (view widget, press xy, shift) while the left button is down
        # A right press the effect took: its release is taken too, or the view would see a
        # right click (its context menu) whenever the mouse had not moved since an earlier press.
        self.rightPressed = False
        self.timer = None

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "SegmentEditorEffect.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        return HELP

    # ------------------------------------------------------------ options

    def setupOptionsFrame(self):
        self.startFromSegmentCheckBox = qt.QCheckBox("Start from the segment")
        self.startFromSegmentCheckBox.checked = True
        self.startFromSegmentCheckBox.toolTip = ("The first click on a slice refines what the segment already holds "
                                                 "there; unchecked, it starts from nothing.")
        self.scriptedEffect.addOptionsWidget(self.startFromSegmentCheckBox)
        self.propagateButton = qt.QPushButton("Propagate from the corrected slices")
        self.propagateButton.toolTip = ("Fill the slices between corrected slices from the boxes between theirs, "
                                        "and track the structure on from the outermost ones (corrected slices stay).")
        self.propagateButton.connect("clicked()", self.onPropagate)
        self.scriptedEffect.addOptionsWidget(self.propagateButton)
        self.statusLabel = qt.QLabel("Click on the structure in a slice view.")
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

    def setStatus(self, text):
        self.statusLabel.text = text

    def activate(self):
        self.prompts.clear()
        self.session = None

    def deactivate(self):
        self.prompts.clear()
        self.dropTasks()

    def cleanup(self):
        """Called by Slicer before the effect is deleted: a connected timer would keep it alive."""
        self.dropTasks()
        if self.timer is not None:
            self.timer.timeout.disconnect(self.poll)
            self.timer = None

    def dropTasks(self):
        """Stop following the running jobs, and cancel them: their results are not written."""
        for task in self.tasks:
            task.cancel()
        self.tasks = []
        if self.timer is not None:
            self.timer.stop()

    # ------------------------------------------------------------ the module's logic and settings

    def moduleLogic(self):
        return slicer.util.getModuleLogic("SAMFineTune")

    def options(self):
        import SAMFineTune

        return SAMFineTune.segmentOptions(self.moduleLogic().getParameterNode())

    def ensureSession(self):
        volume = self.scriptedEffect.parameterSetNode().GetSourceVolumeNode()
        if self.session is None or self.session.volumeNode is not volume:
            self.session = interactive.InteractiveSession(self.moduleLogic(), volume)
        return self.session

    # ------------------------------------------------------------ mouse and keys

    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        if viewWidget.className() != "qMRMLSliceWidget":
            return False
        xy = callerInteractor.GetEventPosition()
        shift, other = callerInteractor.GetShiftKey(), callerInteractor.GetControlKey() or callerInteractor.GetAltKey()
        if eventId == vtk.vtkCommand.LeftButtonPressEvent and not other:
            self.press = (viewWidget, xy, shift)
            return True
        if eventId == vtk.vtkCommand.LeftButtonReleaseEvent and self.press is not None:
            pressWidget, pressXY, pressShift = self.press
            self.press = None
            if pressWidget is viewWidget:
                self.onGesture(viewWidget, pressXY, xy, pressShift, right=False)
            return True
        if eventId == vtk.vtkCommand.RightButtonPressEvent and not other:
            self.rightPressed = True
            self.onGesture(viewWidget, xy, xy, shift, right=True)
            return True
        if eventId == vtk.vtkCommand.RightButtonReleaseEvent and self.rightPressed:
            self.rightPressed = False
            return True
        if eventId == vtk.vtkCommand.KeyPressEvent and callerInteractor.GetKeySym() == FORGET_KEY:
            self.prompts.clear()
            self.setStatus("Points and box of this slice forgotten.")
            return True
        return False

    def onGesture(self, viewWidget, pressXY, releaseXY, shift, right):
        kind, positive = interactive.gesture(pressXY, releaseXY, shift, right)
        try:
            session = self.ensureSession()
            volume = session.volumeNode
            axis = slices.sliceNodeAxis(viewWidget.sliceLogic().GetSliceNode(), volume)
            index, point = slices.rasToSlicePoint(self.xyToRas(releaseXY, viewWidget), volume, axis)
            if kind == "box":
                _, start = slices.rasToSlicePoint(self.xyToRas(pressXY, viewWidget), volume, axis)
                fresh = self.prompts.add(axis, index, box=start + point)
            else:
                fresh = self.prompts.add(axis, index, point=point, positive=positive)
            self.refine(session, axis, index, fresh)
        except ValueError as exc:
            self.setStatus(str(exc))

    # ------------------------------------------------------------ engine jobs

    def currentSlice(self, axis, index):
        parameters = self.scriptedEffect.parameterSetNode()
        return slices.segmentSlice(parameters.GetSegmentationNode(), parameters.GetSelectedSegmentID(),
                                   self.session.volumeNode, axis, index)

    def sourceRoiBox(self, session):
        """The IJK box of the ROI the selected segment was made from, on the session's volume; None
        without one; ``geometry.roiToIJKBox``'s ValueError where it was moved off the volume."""
        roiNode = segments.sourceRoi(self.selectedSegment(), slicer.mrmlScene)
        return None if roiNode is None else geometry.roiToIJKBox(roiNode, session.volumeNode).box

    def clickRoiBox(self, session):
        """``sourceRoiBox`` for a click, which only takes its window from the ROI: one moved off the
        volume leaves the click windowing the volume as a whole rather than refusing it."""
        try:
            return self.sourceRoiBox(session)
        except ValueError:
            return None

    def refine(self, session, axis, index, fresh):
        start = None
        if fresh and self.startFromSegmentCheckBox.checked:
            current = self.currentSlice(axis, index)
            start = current if current.any() else None
        self.setStatus("SAM: slice %d (%s)..." % (index, axis))
        target = self.selectedTarget()
        task = session.refine(axis, index, self.prompts.points, self.prompts.box, startMask=start, reset=fresh,
                              options=self.options(), roi=self.clickRoiBox(session),
                              onMask=lambda mask, result: self.applySlices(target, axis, {index: mask}, corrected=True))
        self.follow(task)
        self.lastSlice = (axis, index)

    def onPropagate(self):
        corrections = interactive.correctedSlices(self.selectedSegment())
        start = interactive.propagationStart(corrections, self.lastSlice)
        if start is None:
            self.setStatus("Correct a slice first (click on the structure), then propagate from it.")
            return
        axis, index = start
        try:
            session = self.ensureSession()
            corrected = corrections.get(axis, set()) - {index}
            locked = {i: self.currentSlice(axis, i) for i in corrected}  # their masks: the gaps are filled between them
            target = self.selectedTarget()
            task = session.propagate(axis, index, self.currentSlice(axis, index), locked=locked,
                                     box=interactive.propagationBox(self.sourceRoiBox(session), axis, index),
                                     options=self.options(),
                                     onMask=lambda mask, result: self.applySlices(
                                         target, axis, {i: mask.take(i, axis=slices.arrayAxis(axis))
                                                for i in result.get("slices", []) if i not in locked}))
        except ValueError as exc:
            self.setStatus(str(exc))
            return
        self.setStatus("Propagating from slice %d (%s)..." % (index, axis))
        self.follow(task)

    def follow(self, task):
        self.tasks.append(task)
        if self.timer is None:
            self.timer = qt.QTimer()
            self.timer.setInterval(30)
            self.timer.timeout.connect(self.poll)
        self.timer.start()

    def poll(self):
        for task in list(self.tasks):
            if not task.poll():
                self.tasks.remove(task)
                if task.state != "done":
                    self.setStatus("SAM: %s" % (task.error or task.state))
        if not self.tasks:
            self.timer.stop()

    # ------------------------------------------------------------ writing

    def selectedTarget(self):
        """(segmentation node ID, segment ID) selected now: a result is written only where it was asked for."""
        parameters = self.scriptedEffect.parameterSetNode()
        segmentation = parameters.GetSegmentationNode()
        return (segmentation.GetID() if segmentation is not None else None, parameters.GetSelectedSegmentID())

    def selectedSegment(self):
        parameters = self.scriptedEffect.parameterSetNode()
        return parameters.GetSegmentationNode().GetSegmentation().GetSegment(parameters.GetSelectedSegmentID())

    def modify(self, labelmap, mode, extent):
        """``slices.writeSlices``'s writer: the editor's own modification (masking, overwrite mode),
        within ``extent`` (the overload taking a QList<int> of 6, as Slicer's Smoothing effect calls it
        in 5.10 and 5.12: the editor then masks and writes the clicked slices, not the whole volume)."""
        self.scriptedEffect.modifySelectedSegmentByLabelmap(labelmap, mode, [int(v) for v in extent])

    def applySlices(self, target, axis, planes, corrected=False):
        """Write the slices (one undo step) into the segment they were asked for (``target``, from
        ``selectedTarget``), honouring the editor's masking settings."""
        if target != self.selectedTarget():
            self.setStatus("Another segment was selected while SAM worked: nothing written. Click again.")
            return
        if not planes:
            self.setStatus("Nothing to change: the structure was not found beyond the corrected slices.")
            return
        parameters = self.scriptedEffect.parameterSetNode()
        self.scriptedEffect.saveStateForUndo()
        slices.writeSlices(self.modify, planes, self.session.volumeNode, parameters.GetSegmentationNode(), axis,
                           reference=self.scriptedEffect.defaultModifierLabelmap())
        if corrected:
            interactive.markCorrected(self.selectedSegment(), axis, planes)
        self.setStatus("SAM: %d slice(s) updated (%s)." % (len(planes), axis))
        logging.debug("SAM effect wrote %s slices %s", axis, sorted(planes))
