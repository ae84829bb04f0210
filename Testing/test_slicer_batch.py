"""The batch script under plain Python with slicer-core: real files in, .seg.nrrd out, and the
way Slicer's --python-script runs it (exec in __main__ with __file__ set).

Where this Python has no torch (the Slicer-side run on Python 3.12), the engine runs in the
background worker under ``$SAMFINETUNE_WORKER_PYTHON``, as it does inside Slicer."""
import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from slicer_scene import MODULE_DIR, addROI, addVolume, dice, ijkToRAS, scene  # noqa: F401
from SAMFineTuneMRML import storage
from SAMFineTuneMRML.segments import segmentToArray

SCRIPTS_DIR = os.path.join(MODULE_DIR, "SAMFineTuneScripts")
BATCH = os.path.join(SCRIPTS_DIR, "batch.py")
sys.path.insert(0, SCRIPTS_DIR)
import batch  # noqa: E402  (importing runs nothing)

HAVE_TORCH = importlib.util.find_spec("torch") is not None


def engine_args(worker):
    """The engine in this process, which needs torch here, or in the background worker, which needs
    a Python with torch: this one or ``$SAMFINETUNE_WORKER_PYTHON``."""
    if worker and not HAVE_TORCH and not os.environ.get("SAMFINETUNE_WORKER_PYTHON"):
        pytest.skip("no torch here and no $SAMFINETUNE_WORKER_PYTHON for the worker")
    if not worker and not HAVE_TORCH:
        pytest.skip("no torch here for the engine in this process (the worker runs are the other tests')")
    return ["--worker"] if worker else []


def run_batch(args, tmp_path, slicer_style=False):
    env = dict(os.environ, OMP_NUM_THREADS="1", SAMFINETUNE_CACHE=str(tmp_path / "cache"))
    # the engine of this checkout, as the extension ships it beside the module (not another install's)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(MODULE_DIR), env.get("PYTHONPATH")) if p)
    if slicer_style:  # what ctkAbstractPythonManager.executeFile does for --python-script
        code = ("import sys; sys.argv = [%r] + %r; g = {'__name__': '__main__', '__file__': %r}; "
                "exec(open(%r).read(), g)" % (BATCH, ["--"] + args, BATCH, BATCH))
        command = [sys.executable, "-c", code]
    else:
        command = [sys.executable, BATCH] + args
    return subprocess.run(command, capture_output=True, text=True, timeout=400, cwd=str(tmp_path), env=env)


def test_roi_pairing_rules():
    assert batch.pairROIs(["a", "b"], ["ra", "rb"]) == [["ra"], ["rb"]]
    assert batch.pairROIs(["a", "b"], ["r1,r2"]) == [["r1", "r2"], ["r1", "r2"]]
    assert batch.pairROIs(["a"], ["r1", "r2,r3"]) == [["r1", "r2", "r3"]]
    with pytest.raises(ValueError, match="3 volumes but 2"):
        batch.pairROIs(["a", "b", "c"], ["r1", "r2"])
    used = set()
    assert batch.uniqueOutput("/o", "ct", used) == "/o/ct.seg.nrrd"
    assert batch.uniqueOutput("/o", "ct", used) == "/o/ct_2.seg.nrrd"
    # Windows and macOS file names ignore case: CT.nrrd would overwrite ct.seg.nrrd
    assert batch.uniqueOutput("/o", "CT", used) == "/o/CT_3.seg.nrrd"


def test_a_failed_save_keeps_the_file_there_and_a_failed_load_leaves_no_nodes(scene, tmp_path):
    target = tmp_path / "ct.nrrd"
    storage.saveVolume(addVolume(np.ones((2, 3, 4), np.int16)), str(target))
    saved = target.read_bytes()
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "no voxels")  # nothing to write
    with pytest.raises(OSError, match="no voxels"):
        storage.saveVolume(empty, str(target))
    assert target.read_bytes() == saved and sorted(os.listdir(tmp_path)) == ["ct.nrrd"]
    (tmp_path / "broken.nrrd").write_text("NRRD0004\nnot a header\n")
    nodes = scene.GetNumberOfNodes()
    with pytest.raises(ValueError, match="broken.nrrd"):
        storage.loadVolume(str(tmp_path / "broken.nrrd"))
    assert scene.GetNumberOfNodes() == nodes  # neither the volume nor its storage node stays


@pytest.fixture
def case(scene, tmp_path):
    """A phantom CT (organ on 2 slices) as .nrrd, an ROI around the organ and one partly outside."""
    from SAMFineTuneLib.phantom import bounding_box, make_ct_phantom

    ct, label = make_ct_phantom(shape_kji=(3, 96, 96), spacing_xyz=(1.0, 1.0, 4.0))
    matrix = ijkToRAS((1.0, 1.0, 4.0), np.diag([-1.0, -1.0, 1.0]), (50.0, 40.0, -10.0))
    volume = addVolume(ct.array, matrix, "phantom")
    organ = addROI(scene, volume, bounding_box(label.array, (2, 2, 0)), name="organ")
    edge = addROI(scene, volume, (80, 40, 0, 110, 60, 2), name="edge")  # i beyond 95: clipped
    paths = {"volume": str(tmp_path / "phantom.nrrd"), "organ": str(tmp_path / "organ.mrk.json"),
             "edge": str(tmp_path / "edge.mrk.json")}
    storage.saveVolume(volume, paths["volume"])
    storage.saveROI(organ, paths["organ"])
    storage.saveROI(edge, paths["edge"])
    scene.Clear(0)
    return paths, label.array


@pytest.mark.slow
@pytest.mark.parametrize("slicer_style", [pytest.param(False, id="python", marks=pytest.mark.in_process),
                                          pytest.param(True, id="python-script-worker")])
def test_batch_segments_and_writes_seg_nrrd(case, tmp_path, scene, slicer_style):
    paths, label = case
    out = tmp_path / "out"
    result = run_batch(["--volumes", paths["volume"], "--rois", paths["organ"] + "," + paths["edge"],
                        "--output", str(out), "--device", "cpu"] + engine_args(worker=slicer_style),
                       tmp_path, slicer_style)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[1/1]" in result.stdout and re.search(r" (\d+)/\1 organ:", result.stdout)  # progress on stdout
    assert "warning: ROI 'edge' extends outside" in result.stdout
    written = out / "phantom.seg.nrrd"
    assert written.is_file() and "1 of 1 volumes segmented" in result.stdout
    volume = storage.loadVolume(paths["volume"])
    segmentation = storage.loadSegmentation(str(written))
    ids = {segmentation.GetSegmentation().GetSegment(segmentation.GetSegmentation().GetNthSegmentID(n)).GetName():
           segmentation.GetSegmentation().GetNthSegmentID(n) for n in range(2)}
    assert set(ids) == {"organ", "edge"}
    organ = segmentToArray(segmentation, ids["organ"], volume)
    assert dice(organ, label) > 0.8


def test_batch_failures_give_a_non_zero_exit_and_a_message(case, tmp_path):
    paths, _ = case
    missing = run_batch(["--volumes", paths["volume"], str(tmp_path / "nope.nrrd"), "--rois", paths["organ"],
                         "--output", str(tmp_path / "out"), "--model", "sam_vit_b"], tmp_path)
    assert missing.returncode == 1
    assert "needs a checkpoint" in missing.stdout and "volume file not found" in missing.stdout
    assert "0 of 2 volumes segmented" in missing.stdout
    bad = run_batch(["--volumes", "a.nrrd", "b.nrrd", "c.nrrd", "--rois", "r1", "r2", "--output", "o"], tmp_path)
    assert bad.returncode == 2 and "3 volumes but 2" in bad.stdout
    usage = run_batch(["--rois", "r1"], tmp_path)
    assert usage.returncode == 2 and "--volumes" in usage.stderr


def test_triplanar_with_an_adapter_is_refused_before_any_volume_loads(case, tmp_path, capsys):
    paths, _ = case
    status = batch.main(["--volumes", paths["volume"], "--rois", paths["organ"], "--output", str(tmp_path / "out"),
                         "--adapter", str(tmp_path / "adapter"), "--triplanar"])
    said = capsys.readouterr().out
    assert status == 2 and "tri-planar voting is for the base model" in said and "segmented" not in said
    assert not (tmp_path / "out").exists()


def test_an_unexpected_error_still_quits_slicer_with_a_failing_status(tmp_path):
    """Slicer quits after ``--python-script`` only when the script calls ``slicer.util.exit``: an
    error outside the per-volume handling (here the output folder is a file) must still reach it."""
    blocked = tmp_path / "out"
    blocked.write_text("a file where the output folder should go")
    args = ["--", "--volumes", "ct.nrrd", "--rois", "roi.mrk.json", "--output", str(blocked)]
    code = ("import sys, slicer; slicer.app = object(); "
            "slicer.util.exit = lambda status: print('slicer.util.exit(%%d)' %% status, flush=True); "
            "sys.argv = [%r] + %r; exec(open(%r).read(), {'__name__': '__main__', '__file__': %r})"
            % (BATCH, args, BATCH, BATCH))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.path.dirname(MODULE_DIR),
                                                                   os.environ.get("PYTHONPATH")) if p))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=str(tmp_path), env=env)
    assert "slicer.util.exit(1)" in done.stdout, done.stdout + done.stderr
    assert "error: " in done.stdout and str(blocked) in done.stdout
    assert blocked.read_text().startswith("a file")


def test_batch_takes_the_engines_own_option_names():
    """A user who learned the options on the command line (``segment``) finds them in the batch script."""
    import argparse

    from SAMFineTuneLib.segment_cli import add_segment_arguments

    segment = argparse.ArgumentParser()
    add_segment_arguments(segment)
    engine = {option for action in segment._actions for option in action.option_strings}
    ours = {option for action in batch.buildParser()._actions for option in action.option_strings}
    shared = {"--model", "--checkpoint", "--device", "--adapter", "--axis", "--window", "--box-mode",
              "--no-largest-component", "--no-fill-holes", "--precision", "--backend"}
    assert shared <= engine and shared <= ours, sorted(shared - (engine & ours))


def test_a_batch_usage_mistake_is_one_line_naming_the_option(capsys):
    """As on the command line: a window given as ``--window -400/40`` reaches the window's own check
    (a width must be positive) instead of argparse's 'expected one argument', in one line."""
    with pytest.raises(SystemExit) as stopped:
        batch.buildParser().parse_args(["--volumes", "a.nrrd", "--rois", "a.mrk.json", "--output", "out",
                                        "--window", "-400/40"])
    assert stopped.value.code == 2
    said = capsys.readouterr().err.strip()
    assert "\n" not in said and "--window" in said and "width must be positive" in said, said
