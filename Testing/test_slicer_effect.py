"""The SAM Segment Editor effect without the Slicer application: its gestures and prompts, its
talk with the worker (the voxels sent once, a lost volume sent again), the corrected-slice tags,
and the effect file itself imported with stand-ins for Qt and the Segment Editor."""
import os
import sys
import types

import numpy as np
import pytest

from slicer_scene import GEOMETRIES, MODULE_DIR, addVolume, scene, slicer  # noqa: F401
from fake_worker import FakeWorkerClient
from SAMFineTuneMRML import geometry, interactive, segments
from SAMFineTuneMRML.backends import WorkerBackend
from SAMFineTuneMRML.logic import SAMFineTuneCoreLogic

SHAPE = (6, 20, 24)


def test_gestures_and_prompts_per_slice():
    assert interactive.gesture((10, 10), (12, 11)) == ("point", True)
    assert interactive.gesture((10, 10), (10, 10), shift=True) == ("point", False)
    assert interactive.gesture((10, 10), (10, 10), right=True) == ("point", False)
    assert interactive.gesture((10, 10), (30, 40)) == ("box", None)
    prompts = interactive.Prompts()
    assert prompts.add("axial", 3, point=(4, 5))
    assert not prompts.add("axial", 3, point=(6, 7), positive=False)
    assert not prompts.add("axial", 3, box=(9, 8, 1, 2))
    assert prompts.points == [(4.0, 5.0, True), (6.0, 7.0, False)] and prompts.box == (1, 2, 9, 8)
    assert prompts.add("axial", 4, point=(1, 1))  # another slice starts afresh
    assert prompts.points == [(1.0, 1.0, True)] and prompts.box is None


def test_corrected_slices_are_kept_on_the_segment(scene):
    volume = addVolume(np.zeros(SHAPE, np.float32), GEOMETRIES["identity"])
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segments.prepareSegmentation(node, volume)
    segment = node.GetSegmentation().GetSegment(segments.ensureSegment(node, segmentName="liver"))
    assert interactive.correctedSlices(segment) == {}
    interactive.markCorrected(segment, "axial", [3, 1])
    interactive.markCorrected(segment, "coronal", [12])
    interactive.markCorrected(segment, "axial", [3, 4])
    assert interactive.correctedSlices(segment) == {"axial": {1, 3, 4}, "coronal": {12}}
    import vtk

    tag = vtk.reference("")
    assert segment.GetTag(interactive.CORRECTED_TAG, tag) and str(tag) == "axial:1,3,4;coronal:12"


def test_propagation_keeps_to_the_roi_the_segment_came_from_when_the_slice_lies_in_it(scene):
    volume = addVolume(np.zeros(SHAPE, np.float32), GEOMETRIES["identity"])
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segments.prepareSegmentation(node, volume)
    segmentId = segments.ensureSegment(node, segmentName="liver")
    segment = node.GetSegmentation().GetSegment(segmentId)
    assert segments.sourceRoi(segment, scene) is None
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    segments.rememberSourceRoi(node, segmentId, roi)
    assert segments.sourceRoi(segment, scene) is roi
    box = (4, 5, 1, 15, 14, 4)  # i0, j0, k0, i1, j1, k1
    assert interactive.propagationBox(box, "axial", 3) == box
    assert interactive.propagationBox(box, "axial", 5) is None  # a slice beyond the ROI: carried past it
    assert interactive.propagationBox(box, "coronal", 14) == box
    assert interactive.propagationBox(box, "coronal", 4) is None
    assert interactive.propagationBox(box, "sagittal", 4) == box
    assert interactive.propagationBox(box, "sagittal", 16) is None
    assert interactive.propagationBox(None, "axial", 3) is None
    scene.RemoveNode(roi)
    assert segments.sourceRoi(segment, scene) is None


class RefineClient(FakeWorkerClient):
    """Answers refine/propagate jobs; forgets its volumes when ``forget`` is set."""

    def __init__(self):
        FakeWorkerClient.__init__(self)
        self.volumes, self.forget = {}, False

    def received(self, job):
        if "volume" in job.sent:
            self.volumes[job.params["volume_key"]] = job.sent["volume"]

    def answer(self, job):
        if self.forget or job.params["volume_key"] not in self.volumes:
            self.forget = False
            self.volumes.clear()
            job.state, job.error = "error", "UnknownVolume: the worker holds no volume %r" % job.params["volume_key"]
            return
        shape = self.volumes[job.params["volume_key"]].shape
        plane = np.zeros(np.delete(shape, 0), np.uint8)
        plane[2:6, 3:9] = 1
        job.state, job.result = "done", {"iou": 0.9}
        job.arrays = {"mask": plane}


def test_clicks_send_the_voxels_once_and_again_to_a_worker_that_lost_them(scene):
    volume = addVolume(np.random.default_rng(0).normal(size=SHAPE).astype(np.float32), GEOMETRIES["identity"], "CT")
    client = RefineClient()
    session = interactive.InteractiveSession(SAMFineTuneCoreLogic(worker=WorkerBackend(client=client)), volume)
    masks = []
    options = {"model": "litemedsam", "window": "auto"}
    first = session.refine("axial", 2, [(4.0, 5.0, True)], options=options, reset=True,
                           onMask=lambda mask, result: masks.append(mask))
    while first.poll():
        pass
    second = session.refine("axial", 2, [(4.0, 5.0, True), (9.0, 9.0, False)], options=options,
                            onMask=lambda mask, result: masks.append(mask))
    while second.poll():
        pass
    assert [("volume" in job.sent) for job in client.jobs] == [True, False]
    assert client.jobs[1].params["points"] == [[4.0, 5.0, 1], [9.0, 9.0, 0]] and not client.jobs[1].params["reset"]
    assert client.jobs[0].params["spacing"] == [1.0, 1.0, 1.0] and client.jobs[0].params["index"] == 2
    client.forget = True  # the worker restarted or let the volume go
    third = session.refine("axial", 3, [(1.0, 1.0, True)], options=options,
                           onMask=lambda mask, result: masks.append(mask))
    while third.poll():
        pass
    assert third.state == "done" and [("volume" in job.sent) for job in client.jobs[2:]] == [False, True]
    assert len(masks) == 3 and all(mask.shape == SHAPE[1:] for mask in masks)
    with pytest.raises(ValueError, match="at least one point or a box"):
        session.refine("axial", 2, [], options=options)
    with pytest.raises(ValueError, match="needs a checkpoint"):
        session.refine("axial", 2, [(1, 1, True)], options={"model": "sam_vit_b"})
    with pytest.raises(ValueError, match="empty"):
        session.propagate("axial", 2, np.zeros(SHAPE[1:], np.uint8), options=options)
    plane = np.zeros(SHAPE[1:], np.uint8)
    plane[3:6, 4:8] = 1
    carried = session.propagate("axial", 2, plane, locked=[4], box=(1, 2, 0, 20, 18, 5), options=options,
                                onMask=lambda mask, result: masks.append(mask))
    while carried.poll():
        pass
    assert client.jobs[-1].command == "propagate" and client.jobs[-1].params["box"] == [1, 2, 0, 20, 18, 5]
    assert client.jobs[-1].params["locked"] == [4] and "locked_masks" not in client.jobs[-1].sent
    other = np.zeros(SHAPE[1:], bool)
    other[2:4, 2:4] = True
    filled = session.propagate("axial", 2, plane, locked={4: other, 0: plane}, options=options)
    while filled.poll():
        pass
    assert client.jobs[-1].params["locked"] == [0, 4]  # the masks in the order of the slices named
    assert np.array_equal(client.jobs[-1].sent["locked_masks"], np.stack([plane, other]).astype(np.uint8))
    # the ROI the segment came from goes with a click, so that the worker windows the slice as the
    # segmentation did; without one the worker windows the volume
    assert "roi" not in client.jobs[0].params
    clicked = session.refine("axial", 2, [(4.0, 5.0, True)], options=options, roi=(1, 2, 0, 20, 18, 5))
    while clicked.poll():
        pass
    assert client.jobs[-1].command == "refine" and client.jobs[-1].params["roi"] == [1, 2, 0, 20, 18, 5]


# ----------------------------------------------------------------- the effect file, with stand-ins


def load_effect(monkeypatch):
    qt = types.ModuleType("qt")
    qt.QIcon = lambda *a: ("icon",) + a
    monkeypatch.setitem(sys.modules, "qt", qt)
    editor_effects = types.ModuleType("SegmentEditorEffects")

    class Abstract:
        def __init__(self, scriptedEffect):
            self.scriptedEffect = scriptedEffect

        def xyToRas(self, xy, viewWidget):
            return [float(xy[0]), float(xy[1]), 0.0]

    editor_effects.AbstractScriptedSegmentEditorEffect = Abstract
    monkeypatch.setitem(sys.modules, "SegmentEditorEffects", editor_effects)
    path = os.path.join(MODULE_DIR, "SAMFineTuneEffect", "SegmentEditorEffect.py")
    module = types.ModuleType("SegmentEditorEffect")
    module.__file__ = path
    exec(compile(open(path).read(), path, "exec"), module.__dict__)
    return module


class Interactor:
    def __init__(self, xy, shift=False, key=""):
        self.xy, self.shift, self.key = xy, shift, key

    def GetEventPosition(self):
        return self.xy

    def GetShiftKey(self):
        return self.shift

    def GetControlKey(self):
        return False

    def GetAltKey(self):
        return False

    def GetKeySym(self):
        return self.key


class SliceWidget:
    def className(self):
        return "qMRMLSliceWidget"


def test_the_effect_file_maps_mouse_and_keys_to_prompts(monkeypatch):
    import vtk

    module = load_effect(monkeypatch)
    effect = module.SegmentEditorEffect(types.SimpleNamespace())
    assert effect.scriptedEffect.name == "SAM" and effect.scriptedEffect.perSegment
    for words in ("Left click", "Shift", "right click", "drag", "Escape", "Propagate", "Ctrl+Z", "overwritten"):
        assert words in effect.helpText(), words
    gestures = []
    effect.onGesture = lambda widget, press, release, shift, right: gestures.append((press, release, shift, right))
    view = SliceWidget()
    events = [(vtk.vtkCommand.LeftButtonPressEvent, Interactor((10, 10))),
              (vtk.vtkCommand.LeftButtonReleaseEvent, Interactor((11, 10))),
              (vtk.vtkCommand.LeftButtonPressEvent, Interactor((10, 10), shift=True)),
              (vtk.vtkCommand.LeftButtonReleaseEvent, Interactor((10, 10))),
              (vtk.vtkCommand.RightButtonPressEvent, Interactor((5, 6))),
              (vtk.vtkCommand.RightButtonReleaseEvent, Interactor((5, 6))),
              (vtk.vtkCommand.LeftButtonPressEvent, Interactor((1, 1))),
              (vtk.vtkCommand.LeftButtonReleaseEvent, Interactor((40, 30)))]
    assert all(effect.processInteractionEvents(interactor, event, view) for event, interactor in events)
    assert gestures == [((10, 10), (11, 10), False, False), ((10, 10), (10, 10), True, False),
                        ((5, 6), (5, 6), False, True), ((1, 1), (40, 30), False, False)]
    effect.prompts.add("axial", 1, point=(1, 1))
    effect.statusLabel = types.SimpleNamespace(text="")
    # Escape is the Segment Editor's own shortcut (it leaves the effect): the effect forgets with x
    assert not effect.processInteractionEvents(Interactor((0, 0), key="Escape"), vtk.vtkCommand.KeyPressEvent, view)
    assert effect.prompts.slice == ("axial", 1)
    assert effect.processInteractionEvents(Interactor((0, 0), key="x"), vtk.vtkCommand.KeyPressEvent, view)
    assert effect.prompts.slice is None and "forgotten" in effect.statusLabel.text
    assert not effect.processInteractionEvents(Interactor((0, 0)), vtk.vtkCommand.MouseMoveEvent, view)
    # a right release whose press the effect did not take (Ctrl+right: the view's zoom) is the view's
    assert not effect.processInteractionEvents(Interactor((0, 0)), vtk.vtkCommand.RightButtonReleaseEvent, view)


class Selection:
    """The Segment Editor's parameter set node, as far as the effect reads it."""

    def __init__(self, segmentationID, segmentID):
        self.segmentation = types.SimpleNamespace(GetID=lambda: segmentationID)
        self.segmentID = segmentID

    def GetSegmentationNode(self):
        return self.segmentation

    def GetSelectedSegmentID(self):
        return self.segmentID


def test_clicks_and_propagation_name_the_roi_the_selected_segment_came_from(monkeypatch, scene):
    module = load_effect(monkeypatch)
    volume = addVolume(np.zeros(SHAPE, np.float32), GEOMETRIES["identity"])
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segments.prepareSegmentation(node, volume)
    segmentId = segments.ensureSegment(node, segmentName="liver")
    selection = types.SimpleNamespace(GetSegmentationNode=lambda: node, GetSelectedSegmentID=lambda: segmentId)
    effect = module.SegmentEditorEffect(types.SimpleNamespace(parameterSetNode=lambda: selection))
    session = types.SimpleNamespace(volumeNode=volume)
    assert effect.sourceRoiBox(session) is effect.clickRoiBox(session) is None  # segmented without a ROI
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenter(9.5, 7.5, 2.5)
    roi.SetSize(8.0, 6.0, 2.0)
    segments.rememberSourceRoi(node, segmentId, roi)
    assert effect.sourceRoiBox(session) == effect.clickRoiBox(session) == (6, 5, 2, 13, 10, 3)
    assert geometry.roiToIJKBox(roi, volume).box == (6, 5, 2, 13, 10, 3)
    roi.SetCenter(500.0, 500.0, 500.0)  # moved off the volume: the clicks still work, on the volume's window,
    assert effect.clickRoiBox(session) is None  # and a propagation says where the ROI went
    with pytest.raises(ValueError, match="lies entirely outside volume"):
        effect.sourceRoiBox(session)


def test_propagate_sends_every_other_corrected_slice_with_its_mask_read_from_the_segment(monkeypatch, scene):
    """The worker fills the slices between corrections from their masks, so Propagate reads each
    corrected slice of the axis from the segment, as the editor shows it, beside the one it starts from."""
    module = load_effect(monkeypatch)
    volume = addVolume(np.zeros(SHAPE, np.float32), GEOMETRIES["identity"])
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segments.prepareSegmentation(node, volume)
    segmentId = segments.ensureSegment(node, segmentName="liver")
    painted = np.zeros(SHAPE, np.uint8)
    painted[1, 3:6, 4:9] = 1
    painted[4, 5:12, 6:15] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(painted, node, segmentId, volume)
    interactive.markCorrected(node.GetSegmentation().GetSegment(segmentId), "axial", [1, 4])
    interactive.markCorrected(node.GetSegmentation().GetSegment(segmentId), "coronal", [7])
    selection = types.SimpleNamespace(GetSegmentationNode=lambda: node, GetSelectedSegmentID=lambda: segmentId)
    effect = module.SegmentEditorEffect(types.SimpleNamespace(parameterSetNode=lambda: selection))
    asked = []
    effect.session = types.SimpleNamespace(volumeNode=volume,
                                           propagate=lambda *args, **kwargs: asked.append((args, kwargs)) or "task")
    effect.ensureSession, effect.options, effect.follow = lambda: effect.session, lambda: {}, lambda task: None
    effect.statusLabel = types.SimpleNamespace(text="")
    effect.lastSlice = ("axial", 1)
    effect.onPropagate()
    (axis, index, start), given = asked[0][0], asked[0][1]
    assert (axis, index) == ("axial", 1) and np.array_equal(start > 0, painted[1] > 0)
    assert sorted(given["locked"]) == [4] and np.array_equal(given["locked"][4] > 0, painted[4] > 0)
    assert "Propagating from slice 1" in effect.statusLabel.text
    effect.lastSlice = None  # the effect opened anew: the segment remembers its corrections
    effect.onPropagate()
    (axis, index, start), given = asked[1][0], asked[1][1]
    assert (axis, index) == ("axial", 4) and sorted(given["locked"]) == [1]


def test_propagation_starts_from_the_slice_corrected_last_or_else_from_what_the_segment_remembers():
    corrected = {"axial": {3, 9}, "coronal": {12}}
    assert interactive.propagationStart(corrected, ("axial", 3)) == ("axial", 3)
    assert interactive.propagationStart(corrected, ("coronal", 12)) == ("coronal", 12)
    # a slice corrected on another segment, or none in this effect: the last of the axis with the most
    assert interactive.propagationStart(corrected, ("axial", 5)) == ("axial", 9)
    assert interactive.propagationStart(corrected) == ("axial", 9)
    assert interactive.propagationStart({"sagittal": {2}, "coronal": {7}}) == ("coronal", 7)
    assert interactive.propagationStart({}) is None and interactive.propagationStart({}, ("axial", 3)) is None


def test_a_result_is_written_only_into_the_segment_it_was_asked_for(monkeypatch):
    module = load_effect(monkeypatch)
    saved = []
    selection = Selection("vtkMRMLSegmentationNode1", "liver")
    effect = module.SegmentEditorEffect(types.SimpleNamespace(parameterSetNode=lambda: selection,
                                                              saveStateForUndo=lambda: saved.append(1)))
    effect.statusLabel = types.SimpleNamespace(text="")
    asked = effect.selectedTarget()
    assert asked == ("vtkMRMLSegmentationNode1", "liver")
    selection.segmentID = "spleen"  # the user picked another segment while the worker decoded
    effect.applySlices(asked, "axial", {3: np.ones((4, 4), bool)}, corrected=True)
    assert not saved and "nothing written" in effect.statusLabel.text
    selection.segmentID = "liver"  # the same segment ID in another segmentation
    selection.segmentation = types.SimpleNamespace(GetID=lambda: "vtkMRMLSegmentationNode2")
    effect.applySlices(asked, "axial", {3: np.ones((4, 4), bool)})
    assert not saved


def test_leaving_or_deleting_the_effect_cancels_its_jobs_and_lets_go_of_its_timer(monkeypatch):
    module = load_effect(monkeypatch)
    effect = module.SegmentEditorEffect(types.SimpleNamespace())
    cancelled, events = [], []
    effect.tasks = [types.SimpleNamespace(cancel=lambda n=n: cancelled.append(n)) for n in range(2)]
    effect.timer = types.SimpleNamespace(stop=lambda: events.append("stop"),
                                         timeout=types.SimpleNamespace(disconnect=lambda slot: events.append(slot)))
    effect.prompts.add("axial", 2, point=(1, 1))
    effect.deactivate()
    assert cancelled == [0, 1] and effect.tasks == [] and events == ["stop"] and effect.prompts.slice is None
    timer = effect.timer
    effect.cleanup()
    assert effect.timer is None and events[-1] == effect.poll and timer is not None

