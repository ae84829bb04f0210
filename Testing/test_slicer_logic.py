"""SAMFineTuneCoreLogic on real MRML nodes: the one-call API, blocking and non-blocking, with
fake engines (fast, every branch) and with the real LiteMedSAM in-process and in the worker."""
import importlib.util
import os

import numpy as np
import pytest

from slicer_scene import GEOMETRIES, addROI, addVolume, dice, ijkToRAS, scene, slicer  # noqa: F401
from SAMFineTuneMRML import segments
from SAMFineTuneLib.catalogue import CROSSING_DEFAULTS
from SAMFineTuneLib.client import Job
from SAMFineTuneMRML.backends import WorkerBackend
from SAMFineTuneMRML.logic import SAMFineTuneCoreLogic

SHAPE = (6, 20, 24)


def box_mask(shape, box, shrink=1):
    """What the fake engines return: the box shrunk by ``shrink`` voxels in-plane."""
    i0, j0, k0, i1, j1, k1 = box
    out = np.zeros(shape, np.uint8)
    out[k0:k1 + 1, j0 + shrink:j1 + 1 - shrink, i0 + shrink:i1 + 1 - shrink] = 1
    return out


class FakeEngine:
    """In-process backend stand-in: records what it was asked."""

    def __init__(self, fail=None, stats=None):
        self.calls = []
        self.fail = fail
        self.stats = stats or {"seconds": 0.1}

    def segment(self, volumeKey, voxels, spacing, box, options, progress=None, cancel=None):
        array = voxels()
        self.calls.append(dict(shape=array.shape, spacing=spacing, box=box, options=options))
        for done in range(3):
            if progress:
                progress(done, 3, "slice %d" % done)
        if self.fail:
            raise self.fail
        return box_mask(array.shape, box), dict(self.stats)

    def shutdown(self):
        pass


class FakeClient:
    """WorkerClient stand-in with the client's own Job records: each poll moves every job one step
    through ``script``; ``reprompt`` finds the volume a ``segment`` job left under its key, and
    fails as the worker does (``UnknownVolume``) when there is none (clear ``volumes`` to act as a
    worker that restarted or let the volume go)."""

    starts = 1  # how many workers it has started (the backend asks which one holds a volume)

    def __init__(self, script=("running", "running", "done"), crash_on_poll=None):
        self.script, self.crash_on_poll, self.jobs, self.polls = list(script), crash_on_poll, [], 0
        self.volumes = {}

    def submit(self, command, params, arrays=None):
        assert command in ("segment", "reprompt", "refine")
        job = Job("j%d" % len(self.jobs), command, params)
        job.sent = dict(arrays or {})
        if "volume" in job.sent:
            self.volumes[params["volume_key"]] = np.array(job.sent["volume"])
        job.volume, job.steps = self.volumes.get(params.get("volume_key")), list(self.script)
        if job.volume is None:
            job.steps = ["unknown volume"]
        self.jobs.append(job)
        return job

    def cancel(self, job):
        job.cancel_requested = True

    def wait(self, job, progress=None, timeout=None, cancel=None):
        while not job.done:
            self.poll()
            if progress:
                progress(*job.step, job.message)
        if job.state != "done":
            raise RuntimeError(job.error)
        return job.result, job.arrays

    def poll(self, timeout=0.0):
        self.polls += 1
        if self.crash_on_poll and self.polls >= self.crash_on_poll:
            raise RuntimeError("worker process exited with code -9")
        for job in self.jobs:
            if job.done:
                continue
            state = "cancelled" if job.cancel_requested else job.steps.pop(0)
            job.state = state
            job.step = (len(self.script) - len(job.steps), len(self.script))
            job.progress = job.step[0] / job.step[1]
            job.message = "slice %d" % job.step[0]
            if state == "done":
                job.result = {"stats": {"seconds": 0.2}}
                job.arrays = {"mask": box_mask(job.volume.shape, job.params["box"])}
            elif state == "error":
                job.error = "ValueError: the model exploded"
            elif state == "unknown volume":
                job.state = "error"
                job.error = "UnknownVolume: this worker holds no volume %r" % job.params["volume_key"]
        return 1


def make(scene, matrix=None, name="CT"):
    volume = addVolume(np.zeros(SHAPE, np.int16), matrix if matrix is not None else ijkToRAS((1.0, 1.0, 3.0)), name)
    return volume, addROI(scene, volume, (4, 5, 1, 15, 14, 4), name="liver")


def roi_state(roi):
    return (roi.GetID(), tuple(roi.GetCenter()), tuple(roi.GetSize()), roi.GetScene() is not None)


def test_one_call_segment_creates_segmentation_and_segment_named_after_roi(scene):
    volume, roi = make(scene)
    engine = FakeEngine()
    logic = SAMFineTuneCoreLogic(inProcess=engine)
    before = roi_state(roi)
    seen = []
    task = logic.segment(volume, roi, window="400/40", progress=lambda d, t, m: seen.append((d, t)))
    assert task.state == "done" and task.progress == 1.0 and seen == [(0, 3), (1, 3), (2, 3)]
    node = task.segmentationNode
    assert node.GetSegmentation().GetSegment(task.segmentId).GetName() == "liver"
    assert np.array_equal(logic.segmentArray(node, task.segmentId, volume), box_mask(SHAPE, (4, 5, 1, 15, 14, 4)))
    call = engine.calls[0]
    assert call["box"] == (4, 5, 1, 15, 14, 4) and call["spacing"] == (1.0, 1.0, 3.0)
    assert call["options"]["window"] == "400/40" and call["options"]["model"] == "litemedsam"
    assert roi_state(roi) == before and scene.GetNodeByID(roi.GetID()) is roi  # the user's ROI is kept as is
    # The SAM effect's Propagate keeps to the ROI the segment was made from.
    assert segments.sourceRoi(node.GetSegmentation().GetSegment(task.segmentId), scene) is roi


def test_the_message_says_when_tracking_fell_back_to_the_roi_on_every_slice(scene):
    volume, roi = make(scene)
    plain = SAMFineTuneCoreLogic(inProcess=FakeEngine()).segment(volume, roi)
    assert plain.message == "done: %d voxels in 'liver'" % plain.stats["voxels"]
    kept = SAMFineTuneCoreLogic(inProcess=FakeEngine(stats={"fixed_fallback": False})).segment(volume, roi)
    assert kept.message == plain.message
    lost = SAMFineTuneCoreLogic(inProcess=FakeEngine(stats={"fixed_fallback": True})).segment(volume, roi)
    assert lost.message.startswith(plain.message) and "tracking lost the structure" in lost.message
    crossed = SAMFineTuneCoreLogic(inProcess=FakeEngine(stats={"box_mode": "crossed"})).segment(volume, roi)
    assert crossed.message == plain.message + " (crossed boxes)"  # what "auto" ran


def test_options_are_checked_before_anything_runs(scene):
    volume, roi = make(scene)
    engine = FakeEngine()
    logic = SAMFineTuneCoreLogic(inProcess=engine)
    with pytest.raises(TypeError, match="unknown segmentation option.*colour"):
        logic.segment(volume, roi, colour="red")
    with pytest.raises(ValueError, match="needs a checkpoint"):
        logic.segment(volume, roi, model="sam_vit_b")
    assert engine.calls == [] and scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0


def test_anatomical_axis_is_sent_as_the_acquisitions_array_axis(scene):
    volume, roi = make(scene, GEOMETRIES["sagittal"])
    engine = FakeEngine()
    SAMFineTuneCoreLogic(inProcess=engine).segment(volume, roi, axis="axial")
    assert engine.calls[0]["options"]["axis"] == "coronal"  # S runs along j in this volume


def test_existing_segment_other_segments_and_undo(scene):
    volume, roi = make(scene)
    logic = SAMFineTuneCoreLogic(inProcess=FakeEngine())
    node = logic.createSegmentation(volume)
    keep = segments.ensureSegment(node, segmentName="kidney")
    kidney = np.zeros(SHAPE, np.uint8)
    kidney[2:5, 10:18, 10:20] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(kidney, node, keep, volume)
    target = segments.ensureSegment(node, segmentName="organ")
    old = np.zeros(SHAPE, np.uint8)
    old[0, 0:3, 0:3] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(old, node, target, volume)
    task = logic.segment(volume, roi, node, segmentId=target)
    assert task.segmentId == target and node.GetSegmentation().GetNumberOfSegments() == 2
    expected = old | box_mask(SHAPE, (4, 5, 1, 15, 14, 4))
    assert np.array_equal(logic.segmentArray(node, target, volume), expected)
    assert np.array_equal(logic.segmentArray(node, keep, volume), kidney)
    assert logic.undo(node)
    assert np.array_equal(logic.segmentArray(node, target, volume), old)
    assert np.array_equal(logic.segmentArray(node, keep, volume), kidney)


def test_engine_error_leaves_the_scene_as_it_was(scene):
    volume, roi = make(scene)
    logic = SAMFineTuneCoreLogic(inProcess=FakeEngine(fail=RuntimeError("CUDA out of memory")))
    node = logic.createSegmentation(volume)
    with pytest.raises(RuntimeError, match="out of memory"):
        logic.segment(volume, roi, node)
    assert node.GetSegmentation().GetNumberOfSegments() == 0  # the segment made for the result is gone
    assert not logic.undo(node)  # nothing was written, nothing to undo


def test_cancel_in_blocking_mode_returns_a_cancelled_task(scene):
    from SAMFineTuneLib.progress import Cancelled

    volume, roi = make(scene)
    task = SAMFineTuneCoreLogic(inProcess=FakeEngine(fail=Cancelled("stop"))).segment(volume, roi)
    assert task.state == "cancelled"
    assert task.segmentationNode.GetSegmentation().GetSegment(task.segmentId) is None


def test_clipped_roi_warning_reaches_the_task(scene):
    volume, _ = make(scene)
    roi = addROI(scene, center=(20.0, 10.0, 6.0), size=(12.0, 12.0, 6.0), name="edge")
    engine = FakeEngine()
    task = SAMFineTuneCoreLogic(inProcess=engine).segment(volume, roi)
    assert task.roiBox.clipped and "edge" in task.warning
    assert engine.calls[0]["box"][3] == SHAPE[2] - 1


def test_an_adapter_that_learned_another_window_is_named_on_the_status_line(scene, tmp_path):
    import json

    volume, roi = make(scene)  # zeros: not CT, so "auto" is the percentile window on it
    adapter = tmp_path / "liver-v1"
    adapter.mkdir()
    (adapter / "model_card.json").write_text(json.dumps({"inference": {"window": "auto"}}))
    logic = SAMFineTuneCoreLogic(inProcess=FakeEngine())
    task = logic.segment(volume, roi, adapter=str(adapter), window="abdomen")
    assert task.state == "done" and "liver-v1 was trained with the 'auto' window" in task.warning
    assert "choose 'auto'" in task.warning
    assert logic.segment(volume, roi, adapter=str(adapter), window="auto").warning is None
    assert logic.segment(volume, roi, adapter=str(adapter), window="percentile").warning is None
    assert logic.segment(volume, roi, window="abdomen").warning is None
    (adapter / "model_card.json").write_text(json.dumps({"inference": {"window": "400/40"}}))
    assert logic.segment(volume, roi, adapter=str(adapter), window="abdomen").warning is None
    (adapter / "model_card.json").write_text("{not json")  # the engine names a bad card when it loads it
    assert logic.segment(volume, roi, adapter=str(adapter), window="abdomen").warning is None


def test_on_ct_the_auto_window_is_the_abdomen_window_an_adapter_learned(scene, tmp_path):
    import json

    ct = np.full(SHAPE, -1000, np.int16)
    volume = addVolume(ct, ijkToRAS((1.0, 1.0, 3.0)), "CT")
    roi = addROI(scene, volume, (4, 5, 1, 15, 14, 4), name="liver")
    adapter = tmp_path / "liver-v1"
    adapter.mkdir()
    (adapter / "model_card.json").write_text(json.dumps({"inference": {"window": "abdomen"}}))
    logic = SAMFineTuneCoreLogic(inProcess=FakeEngine())
    assert logic.segment(volume, roi, adapter=str(adapter), window="auto").warning is None
    assert "trained with the 'abdomen' window" in logic.segment(volume, roi, adapter=str(adapter),
                                                               window="lung").warning
    assert "segmentation uses 'percentile'" in logic.segment(volume, roi, adapter=str(adapter),
                                                            window="percentile").warning


def test_several_rois_give_several_segments_in_one_segmentation(scene):
    volume, roi = make(scene)
    other = addROI(scene, volume, (1, 1, 0, 6, 6, 2), name="spleen")
    tasks = SAMFineTuneCoreLogic(inProcess=FakeEngine()).segmentROIs(volume, [roi, other])
    node = tasks[0].segmentationNode
    assert tasks[1].segmentationNode is node
    names = sorted(node.GetSegmentation().GetSegment(t.segmentId).GetName() for t in tasks)
    assert names == ["liver", "spleen"]


def test_non_blocking_task_polls_the_worker_and_writes_at_the_end(scene):
    volume, roi = make(scene)
    client = FakeClient()
    logic = SAMFineTuneCoreLogic(inProcess=FakeEngine(), worker=WorkerBackend(client=client))
    finished = []
    task = logic.segment(volume, roi, waitForCompletion=False, onFinished=finished.append)
    job = client.jobs[0]
    assert job.params["box"] == [4, 5, 1, 15, 14, 4] and job.params["spacing"] == [1.0, 1.0, 3.0]
    assert job.volume.shape == SHAPE
    assert task.state == "queued"
    assert task.poll() and task.state == "running" and 0 < task.progress < 1
    assert not segments.segmentToArray(task.segmentationNode, task.segmentId, volume).any()  # not yet
    assert task.poll()
    assert not task.poll() and task.state == "done" and finished == [task]
    assert np.array_equal(segments.segmentToArray(task.segmentationNode, task.segmentId, volume),
                          box_mask(SHAPE, (4, 5, 1, 15, 14, 4)))
    assert not task.poll()  # finished tasks stay finished


@pytest.mark.parametrize("script,crash,state", [(("running", "error"), None, "error"),
                                                (("running", "running", "done"), 2, "error")])
def test_worker_error_or_crash_leaves_the_scene_as_it_was(scene, script, crash, state):
    volume, roi = make(scene)
    client = FakeClient(script, crash_on_poll=crash)
    logic = SAMFineTuneCoreLogic(worker=WorkerBackend(client=client))
    task = logic.segment(volume, roi, waitForCompletion=False)
    while task.poll():
        pass
    assert task.state == state and task.error
    assert task.segmentationNode.GetSegmentation().GetSegment(task.segmentId) is None


def test_cancel_a_non_blocking_task(scene):
    volume, roi = make(scene)
    client = FakeClient(("running",) * 10 + ("done",))
    logic = SAMFineTuneCoreLogic(worker=WorkerBackend(client=client))
    task = logic.segment(volume, roi, waitForCompletion=False)
    task.poll()
    task.cancel()
    assert not task.poll() and task.state == "cancelled"
    assert task.segmentationNode.GetSegmentation().GetSegment(task.segmentId) is None


def test_blocking_through_the_worker_backend(scene):
    volume, roi = make(scene)
    client = FakeClient()
    logic = SAMFineTuneCoreLogic(worker=WorkerBackend(client=client))
    seen = []
    task = logic.segment(volume, roi, runIn="worker", progress=lambda d, t, m: seen.append(d))
    assert task.state == "done" and seen and client.polls >= 3
    with pytest.raises(ValueError, match="background worker"):
        logic.segment(volume, roi, waitForCompletion=False, runIn="inprocess")


# ----------------------------------------------------------------- the real engine

def make_phantom(slices):
    from SAMFineTuneLib.phantom import bounding_box, make_ct_phantom

    ct, label = make_ct_phantom(shape_kji=(slices, 96, 96), spacing_xyz=(1.0, 1.0, 4.0))
    return ct, label, bounding_box(label.array, (2, 2, 0))


@pytest.mark.slow
@pytest.mark.in_process
def test_litemedsam_in_process_matches_the_known_label(scene):
    pytest.importorskip("torch", reason="in-process runs need torch in this Python; the worker tests cover the rest")
    ct, label, box = make_phantom(5)  # the organ on 4 slices
    volume = addVolume(ct.array, GEOMETRIES["flipped"] @ np.diag([1.0 / 0.8, 1.0 / 0.8, 4.0 / 2.5, 1.0]), "CT")
    roi = addROI(scene, volume, box, name="organ")
    task = SAMFineTuneCoreLogic().segment(volume, roi, device="cpu")
    result = segments.segmentToArray(task.segmentationNode, task.segmentId, volume)
    assert task.stats["encoded"] == 4 + 2 * len(CROSSING_DEFAULTS["planes"])  # the default: crossed boxes
    assert dice(result, label.array) > 0.85


@pytest.mark.slow
def test_litemedsam_in_the_worker_process_non_blocking(scene, tmp_path, monkeypatch):
    import time

    if importlib.util.find_spec("torch") is None and not os.environ.get("SAMFINETUNE_WORKER_PYTHON"):
        pytest.skip("no torch here and no $SAMFINETUNE_WORKER_PYTHON for the worker")

    ct, label, box = make_phantom(3)  # the organ on 2 slices
    monkeypatch.setenv("SAMFINETUNE_CACHE", str(tmp_path))
    volume = addVolume(ct.array, ijkToRAS((1.0, 1.0, 4.0)), "CT")
    roi = addROI(scene, volume, box, name="organ")
    logic = SAMFineTuneCoreLogic()
    logic.worker.client.env["OMP_NUM_THREADS"] = "1"
    try:
        task = logic.segment(volume, roi, device="cpu", waitForCompletion=False)
        deadline = time.time() + 240
        while task.poll() and time.time() < deadline:
            time.sleep(0.1)
        assert task.state == "done", task.error
        result = segments.segmentToArray(task.segmentationNode, task.segmentId, volume)
        assert dice(result, label.array) > 0.85
    finally:
        logic.shutdown()


def test_rois_of_one_volume_send_its_voxels_once(scene):
    volume, roi = make(scene)
    others = [addROI(scene, volume, (1, 1, 0, 6, 6, 2), name="spleen"), addROI(scene, volume, (8, 8, 2, 12, 12, 5),
                                                                               name="kidney")]
    client = FakeClient()
    logic = SAMFineTuneCoreLogic(inProcess=FakeEngine(), worker=WorkerBackend(client=client))
    tasks = logic.segmentROIs(volume, [roi] + others, waitForCompletion=False)
    assert [job.command for job in client.jobs] == ["segment", "reprompt", "reprompt"]
    assert len({job.params["volume_key"] for job in client.jobs}) == 1
    while any(task.poll() for task in tasks):
        pass
    assert [task.state for task in tasks] == ["done"] * 3
    for task in tasks:
        assert np.array_equal(logic.segmentArray(task.segmentationNode, task.segmentId, volume),
                              box_mask(SHAPE, task.roiBox.box))


def test_a_worker_that_cannot_take_the_voxels_again_leaves_the_scene_as_it_was(scene):
    volume, roi = make(scene)
    client = FakeClient()
    logic = SAMFineTuneCoreLogic(worker=WorkerBackend(client=client))
    first = logic.segment(volume, roi, runIn="worker")
    client.volumes.clear()  # the worker let the volume go, and now refuses a new upload

    def refuse(command, params, arrays=None):
        raise OSError("No space left on device")

    task = logic.segment(volume, roi, segmentationNode=first.segmentationNode, waitForCompletion=False)
    client.submit = refuse
    while task.poll():
        pass
    assert task.state == "error" and "No space left on device" in task.error
    assert np.array_equal(logic.segmentArray(first.segmentationNode, first.segmentId, volume),
                          box_mask(SHAPE, (4, 5, 1, 15, 14, 4)))


def test_the_voxels_go_to_the_worker_once_until_they_change(scene):
    """A 512 x 512 x 600 CT is 300 MB: Segment clicks, other ROIs and the SAM effect's clicks name
    the copy the worker holds, and send the voxels again only once they change or the worker lost them."""
    from SAMFineTuneMRML import interactive

    volume, roi = make(scene)
    client = FakeClient()
    logic = SAMFineTuneCoreLogic(worker=WorkerBackend(client=client))

    def segmentAndCheck(**kwargs):
        task = logic.segment(volume, roi, **kwargs)
        while task.poll():
            pass
        assert task.state == "done"
        assert np.array_equal(logic.segmentArray(task.segmentationNode, task.segmentId, volume),
                              box_mask(SHAPE, (4, 5, 1, 15, 14, 4)))
        assert np.array_equal(client.volumes[client.jobs[-1].params["volume_key"]], slicer.util.arrayFromVolume(volume))

    def sent():
        return [(job.command, "volume" in job.sent) for job in client.jobs]

    segmentAndCheck(waitForCompletion=False)
    segmentAndCheck(waitForCompletion=False)
    click = interactive.InteractiveSession(logic, volume).submit("refine", {"axis": "axial", "index": 2})
    click.state = "cancelled"  # only what it carried matters here
    assert sent() == [("segment", True), ("reprompt", False), ("refine", False)]
    assert len({job.params["volume_key"] for job in client.jobs}) == 1
    slicer.util.arrayFromVolume(volume)[2, 8, 8] = 100  # the user edited the voxels: they go again
    slicer.util.arrayFromVolumeModified(volume)
    segmentAndCheck(waitForCompletion=False)
    assert sent()[-1] == ("segment", True) and len({job.params["volume_key"] for job in client.jobs}) == 2
    for kwargs in ({"waitForCompletion": False}, {"runIn": "worker"}):
        client.volumes.clear()  # the worker restarted or let the volume go
        segmentAndCheck(**kwargs)
        assert sent()[-2:] == [("reprompt", False), ("segment", True)]
        assert client.jobs[-2].state == "error" and client.jobs[-2].error.startswith("UnknownVolume")
    client.volumes.clear()
    task = logic.segment(volume, roi, waitForCompletion=False)
    client.poll()  # the worker answered UnknownVolume; then the user cancelled, before the panel read it
    task.cancel()
    while task.poll():
        pass
    assert task.state == "error" and sent()[-1] == ("reprompt", False)  # a cancelled job is not sent again


def test_a_bad_roi_among_several_leaves_the_scene_as_it_was(scene):
    volume, roi = make(scene)
    unplaced = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "unplaced")
    engine = FakeEngine()
    logic = SAMFineTuneCoreLogic(inProcess=engine)
    with pytest.raises(ValueError, match="unplaced.*not placed"):
        logic.segmentROIs(volume, [roi, unplaced])
    assert engine.calls == [] and scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0
    node = logic.createSegmentation(volume)
    with pytest.raises(ValueError, match="unplaced"):
        logic.segmentROIs(volume, [roi, unplaced], node)
    assert node.GetSegmentation().GetNumberOfSegments() == 0


def test_a_segmentation_kept_as_surfaces_is_refused_before_anything_runs(scene):
    volume, roi = make(scene)
    engine = FakeEngine()
    logic = SAMFineTuneCoreLogic(inProcess=engine)
    node = logic.createSegmentation(volume)
    node.GetSegmentation().SetSourceRepresentationName("Closed surface")  # as a segmentation imported from a model
    with pytest.raises(ValueError, match="keeps its segments as 'Closed surface'.*Binary labelmap"):
        logic.segment(volume, roi, node)
    assert engine.calls == [] and node.GetSegmentation().GetNumberOfSegments() == 0


def test_a_failed_result_keeps_a_segment_that_was_there(scene):
    volume, roi = make(scene)
    logic = SAMFineTuneCoreLogic(inProcess=FakeEngine(fail=RuntimeError("boom")))
    node = logic.createSegmentation(volume)
    target = segments.ensureSegment(node, segmentName="liver")
    with pytest.raises(RuntimeError, match="boom"):
        logic.segment(volume, roi, node)
    assert node.GetSegmentation().GetSegment(target) is not None


def test_inside_slicer_blocking_work_runs_in_the_worker(scene, monkeypatch, tmp_path):
    import types

    from SAMFineTuneMRML import paths

    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(cachePath=str(tmp_path / "slicer-cache")), raising=False)
    monkeypatch.delenv("SAMFINETUNE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "user-cache"))
    mine = paths.cacheDirectory()
    volume, roi = make(scene)
    engine, client = FakeEngine(), FakeClient()
    logic = SAMFineTuneCoreLogic(inProcess=engine, worker=WorkerBackend(client=client))
    task = logic.segment(volume, roi)
    assert task.state == "done" and engine.calls == [] and [job.command for job in client.jobs] == ["segment"]
    assert paths.workerLogPath() == os.path.join(mine, "logs", "worker.log")
    monkeypatch.setattr(paths.shutil, "which",
                        lambda name: "/slicer/bin/PythonSlicer" if name == "PythonSlicer" else None)
    monkeypatch.delenv("SAMFINETUNE_WORKER_PYTHON", raising=False)
    assert paths.workerPython() == "/slicer/bin/PythonSlicer"
    monkeypatch.setenv("SAMFINETUNE_WORKER_PYTHON", "/envs/gpu/bin/python")
    assert paths.workerPython() == "/envs/gpu/bin/python"
    client = WorkerBackend().client
    assert client.python == "/envs/gpu/bin/python" and client.log_path == paths.workerLogPath()
    assert client.reader == "poll"  # no reader thread: it would only run while Slicer runs Python
    assert client.env["SAMFINETUNE_CACHE"] == mine


def test_on_windows_an_adapter_name_windows_cannot_make_a_folder_of_is_refused_at_once(monkeypatch, tmp_path):
    """Else the lock file, then the folder, fail with 'invalid argument' once training starts, or
    "liver." becomes the folder "liver" (Windows drops a final dot)."""
    from SAMFineTuneMRML import paths

    monkeypatch.setenv("SAMFINETUNE_ADAPTERS", str(tmp_path))
    assert paths.adapterFolder("liver: v2") == os.path.join(str(tmp_path), "liver: v2")  # elsewhere a name like any
    monkeypatch.setattr(paths.os, "name", "nt")
    for name in ("liver: v2", "liver?", "liver.", "NUL", "com1.old", 'a"b', "a|b", "a<b"):
        with pytest.raises(ValueError, match="Windows takes no folder named so"):
            paths.adapterFolder(name)
    for name in ("liver-ct-v1", "liver v2", "console", "nullify", "liver.v2"):
        assert paths.adapterFolder(name) == os.path.join(str(tmp_path), name)
