"""Fine-tuning from the scene: cases found in segmentations, exported with their geometry,
the live loss/Dice table, and the non-blocking train job."""
import itertools
import json
import os

import numpy as np
import pytest
import vtk

from slicer_scene import GEOMETRIES, addVolume, scene, slicer  # noqa: F401
from SAMFineTuneLib.client import Job
from SAMFineTuneMRML import segments, training
from SAMFineTuneMRML.backends import WorkerBackend
from SAMFineTuneMRML.interactive import markCorrected
from SAMFineTuneMRML.logic import SAMFineTuneCoreLogic, describeDevice


SEEDS = itertools.count(1000)


def add_case(logic, name, matrix, filled=True, structure="liver"):
    """A volume of its own voxels (each scan is its own), segmented."""
    voxels = np.random.default_rng(next(SEEDS)).integers(-100, 200, (4, 16, 20)).astype(np.int16)
    volume = addVolume(voxels, matrix, name)
    node = logic.createSegmentation(volume)
    segmentId = segments.ensureSegment(node, segmentName=structure)
    if filled:
        mask = np.zeros((4, 16, 20), np.uint8)
        mask[1:3, 4:10, 5:12] = 1
        segments.writeMaskToSegment(mask, volume, node, segmentId)
    return volume, node, segmentId


def test_find_cases_and_export_keeps_voxels_and_geometry(scene, tmp_path):
    from SAMFineTuneLib.volume_io import read_volume

    logic = SAMFineTuneCoreLogic()
    first = add_case(logic, "CT 1", GEOMETRIES["flipped"])
    second = add_case(logic, "CT 2", GEOMETRIES["oblique"])
    add_case(logic, "CT 3", GEOMETRIES["identity"], filled=False)  # empty segment: not a case
    add_case(logic, "CT 4", GEOMETRIES["identity"], structure="spleen")  # another structure
    cases = training.findCases(scene, "liver")
    assert [c[0].GetName() for c in cases] == ["CT 1", "CT 2"]
    markCorrected(second[1].GetSegmentation().GetSegment(second[2]), "axial", [2, 1])
    summary = logic.exportTrainingSet(cases, str(tmp_path / "set"), "liver", valFraction=0.5)
    from SAMFineTuneLib.dataset import read_dataset

    exported = read_dataset(str(tmp_path / "set"))
    assert exported.case("CT_2").record["corrected_slices"] == {"axial": [1, 2]}
    assert "corrected_slices" not in exported.case("CT_1").record
    assert sorted(summary["added"]) == ["CT_1", "CT_2"]
    meta = json.load(open(tmp_path / "set" / "dataset.json"))
    assert meta["labels"] == {"background": 0, "liver": 1}
    image = read_volume(str(tmp_path / "set" / "imagesTr" / "CT_2_0000.nii.gz"))
    label = read_volume(str(tmp_path / "set" / "labelsTr" / "CT_2.nii.gz"))
    assert np.array_equal(image.array, slicer.util.arrayFromVolume(second[0]))
    assert np.array_equal(label.array, segments.segmentToArray(second[1], second[2], second[0]))
    # LPS geometry of the file = the volume's RAS geometry
    m = GEOMETRIES["oblique"]
    assert np.allclose(image.origin, m[:3, 3] * (-1, -1, 1), atol=1e-4)
    assert np.allclose(np.reshape(image.direction, (3, 3)) * image.spacing,
                       np.diag([-1, -1, 1]) @ m[:3, :3], atol=1e-4)
    with pytest.raises(ValueError, match="No case to export"):
        logic.exportTrainingSet([], str(tmp_path / "set"), "kidney")
    before = json.load(open(tmp_path / "set" / "dataset.json"))
    with pytest.raises(ValueError, match="Unknown slicing axis 'oblique'"):
        logic.exportTrainingSet(cases, str(tmp_path / "other"), "liver", axis="oblique")
    assert not (tmp_path / "other").exists() and json.load(open(tmp_path / "set" / "dataset.json")) == before
    logic.exportTrainingSet(cases, str(tmp_path / "sliced"), "liver", valFraction=0.5, axis="coronal")
    sliced = read_dataset(str(tmp_path / "sliced"))
    # both volumes (flipped, and oblique by 25 and 15 degrees) have j closest to A-P: coronal steps along j
    assert {entry.record["slice_axis"] for entry in sliced.cases} == {"coronal"}
    assert first[0].GetScene() is scene


def test_export_reports_each_case_and_a_cancel_leaves_the_set_as_it_was(scene, tmp_path):
    """The panel shows a dialog while large CTs are read and written; its Cancel stops between cases."""
    from SAMFineTuneLib.progress import Cancelled

    logic = SAMFineTuneCoreLogic()
    cases = [add_case(logic, "CT %d" % n, GEOMETRIES["identity"]) for n in (1, 2, 3)]
    voxels = slicer.util.arrayFromVolume(cases[0][0]).copy()
    seen = []
    logic.exportTrainingSet(cases[:2], str(tmp_path / "set"), "liver", valFraction=0.5,
                            progress=lambda done, total, message: seen.append((done, total, message)))
    assert ("reading case CT 1" in [m for _, _, m in seen] and "writing case CT_2" in [m for _, _, m in seen]
            and all(0 <= done <= total == 2 for done, total, _ in seen))
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "set").rglob("*"))
    meta = json.load(open(tmp_path / "set" / "dataset.json"))
    calls = []
    with pytest.raises(Cancelled):  # while reading the cases
        logic.exportTrainingSet(cases, str(tmp_path / "set"), "liver", progress=lambda *a: calls.append(a),
                                cancel=lambda: len(calls) >= 1)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "set").rglob("*")) == before
    assert json.load(open(tmp_path / "set" / "dataset.json")) == meta
    calls = []
    with pytest.raises(Cancelled):  # after two of three cases were written into a new set
        logic.exportTrainingSet(cases, str(tmp_path / "new"), "liver", progress=lambda *a: calls.append(a),
                                cancel=lambda: len(calls) >= 5)
    assert calls[-1][2] == "writing case CT_2" and not (tmp_path / "new").exists()
    assert np.array_equal(slicer.util.arrayFromVolume(cases[0][0]), voxels)  # exported from a view, untouched


def test_exporting_again_updates_the_cases_the_set_holds_and_adds_the_others(scene, tmp_path):
    """The panel exports every case in the scene: one exported before comes back corrected further
    (written again), unchanged (left alone), or beside a volume of another patient of the same name
    (a case of its own), never refused, never taking over another case."""
    from SAMFineTuneLib.dataset import load_case, read_dataset

    logic = SAMFineTuneCoreLogic()
    dataset = str(tmp_path / "set")
    first = add_case(logic, "CT 1", GEOMETRIES["flipped"])
    summary = logic.exportTrainingSet(training.findCases(scene, "liver"), dataset, "liver", valFraction=0.5)
    assert summary["added"] == ["CT_1"]
    again = logic.exportTrainingSet(training.findCases(scene, "liver"), dataset, "liver", valFraction=0.5)
    assert (again["added"], again["replaced"], again["unchanged"]) == ([], [], ["CT_1"])
    mask = segments.segmentToArray(first[1], first[2], first[0]).astype(np.uint8)
    mask[0, 4:10, 5:12] = 1  # the user corrects one more slice
    segments.writeMaskToSegment(mask, first[0], first[1], first[2])
    other = add_case(logic, "CT 1", GEOMETRIES["oblique"])  # another patient's series, the same name
    summary = logic.exportTrainingSet(training.findCases(scene, "liver"), dataset, "liver", valFraction=0.5)
    assert (summary["added"], summary["replaced"]) == (["CT_1_2"], ["CT_1"])
    info = read_dataset(dataset)
    assert np.array_equal(load_case(info.case("CT_1"))[1].array, mask)
    assert np.array_equal(load_case(info.case("CT_1_2"))[1].array,
                          segments.segmentToArray(other[1], other[2], other[0]))


def test_a_set_written_without_fingerprints_keeps_one_case_per_volume(scene, tmp_path):
    """A set an earlier version exported (records without fingerprints): its volumes exported again
    from the panel are those cases, told by their stored images, never second copies (CT_1_2) that
    could land in the other split; a volume of another patient with the same name is a new case."""
    from SAMFineTuneLib.dataset import read_dataset

    logic = SAMFineTuneCoreLogic()
    dataset = tmp_path / "set"
    first = add_case(logic, "CT 1", GEOMETRIES["flipped"])
    add_case(logic, "CT 2", GEOMETRIES["oblique"])
    logic.exportTrainingSet(training.findCases(scene, "liver"), str(dataset), "liver", valFraction=0.5)
    meta = json.loads((dataset / "dataset.json").read_text())
    for record in meta["samfinetune"]["cases"]:
        del record["fingerprints"]
    (dataset / "dataset.json").write_text(json.dumps(meta))
    again = logic.exportTrainingSet(training.findCases(scene, "liver"), str(dataset), "liver", valFraction=0.5)
    assert (again["added"], again["replaced"], sorted(again["unchanged"])) == ([], [], ["CT_1", "CT_2"])
    assert all(e.record["fingerprints"] for e in read_dataset(str(dataset)).cases)  # written back
    meta = json.loads((dataset / "dataset.json").read_text())
    del meta["samfinetune"]["cases"][0]["fingerprints"]  # CT_1 without, CT_2 with
    (dataset / "dataset.json").write_text(json.dumps(meta))
    mask = segments.segmentToArray(first[1], first[2], first[0]).astype(np.uint8)
    mask[0, 4:10, 5:12] = 1  # corrected further
    segments.writeMaskToSegment(mask, first[0], first[1], first[2])
    add_case(logic, "CT 1", GEOMETRIES["identity"])  # another series named so
    summary = logic.exportTrainingSet(training.findCases(scene, "liver"), str(dataset), "liver", valFraction=0.5)
    assert (summary["added"], summary["replaced"], summary["unchanged"]) == (["CT_1_2"], ["CT_1"], ["CT_2"])
    info = read_dataset(str(dataset))
    assert sorted(e.case for e in info.cases) == ["CT_1", "CT_1_2", "CT_2"]
    assert info.case("CT_1").split == meta["samfinetune"]["cases"][0]["split"]


def test_a_moved_volume_exported_again_is_its_case_on_its_new_grid(scene, tmp_path):
    """Registered, or a transform hardened: the same scan on another grid is the case the set
    holds, written again there, never a second case of the same patient."""
    from SAMFineTuneLib.dataset import read_dataset
    from SAMFineTuneLib.volume_io import read_volume

    logic = SAMFineTuneCoreLogic()
    dataset = tmp_path / "set"
    volume, node, segmentId = add_case(logic, "CT 1", GEOMETRIES["flipped"])
    add_case(logic, "CT 2", GEOMETRIES["oblique"])
    logic.exportTrainingSet(training.findCases(scene, "liver"), str(dataset), "liver", valFraction=0.5)
    mask = segments.segmentToArray(node, segmentId, volume).astype(np.uint8)
    volume.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(GEOMETRIES["anisotropic"]))
    segments.writeMaskToSegment(mask, volume, node, segmentId)  # the segmentation moved with it
    summary = logic.exportTrainingSet(training.findCases(scene, "liver"), str(dataset), "liver", valFraction=0.5)
    assert (summary["added"], summary["replaced"], summary["unchanged"]) == ([], ["CT_1"], ["CT_2"])
    assert sorted(e.case for e in read_dataset(str(dataset)).cases) == ["CT_1", "CT_2"]
    stored = read_volume(str(dataset / "imagesTr" / "CT_1_0000.nii.gz"))
    assert np.allclose(stored.spacing, (0.6, 0.9, 5.0), atol=1e-4)

def test_finding_cases_holds_on_to_no_segmentation(scene):
    """A segmentation the user deletes after an export must be freed, labelmaps and all."""
    logic = SAMFineTuneCoreLogic()
    _, node, _ = add_case(logic, "CT 1", GEOMETRIES["identity"])
    held = node.GetReferenceCount()
    for _ in range(3):
        assert len(training.findCases(scene, "liver")) == 1
    assert node.GetReferenceCount() == held


def test_training_curve_table_and_plot_from_trainer_messages(scene):
    curve = training.TrainingCurve(scene, "run")
    assert curve.addFromMessage("epoch 1: loss 0.5000 val Dice 0.7000 lr 1.00e-03 (2.0s)")
    assert not curve.addFromMessage("epoch 1/5: loss 0.5000, validation Dice 0.7000")  # same epoch twice
    assert curve.addFromMessage("epoch 2/5: loss 0.4000, validation Dice 0.7500")
    assert not curve.addFromMessage("preparing slice 3/10 (CT_1)")
    assert curve.rows() == [(1.0, 0.5, 0.7), (2.0, 0.4, 0.75)]
    assert curve.chart.GetNumberOfPlotSeriesNodes() == 2
    assert curve.chart.GetNthPlotSeriesNode(1).GetTableNode() is curve.table
    # Slicer's plot view draws nothing from a string or bit column (qMRMLPlotView.cxx, 5.10 and 5.12).
    table = curve.table.GetTable()
    for name in curve.COLUMNS:
        assert table.GetColumnByName(name).GetDataType() not in (vtk.VTK_STRING, vtk.VTK_BIT), name
    assert curve.numericColumns()


class TrainClient:
    starts = 1  # how many workers it has started (the backend asks which one holds a volume)

    def __init__(self):
        self.submitted = []

    def submit(self, command, params, arrays=None):
        job = Job("j%d" % len(self.submitted), command, params)
        self.submitted.append(job)
        return job

    def poll(self, timeout=0.0):
        for job in self.submitted:
            for epoch, state in ((1, "running"), (2, "done")):
                if job.state in ("queued", "running") and job.progress < epoch / 2.0:
                    if job.on_event:
                        message = "epoch %d: loss 0.%d val Dice 0.8" % (epoch, 5 - epoch)
                        job.on_event({"event": "log", "message": message})
                    job.state, job.progress = state, epoch / 2.0
                    if state == "done":
                        job.result = {"card": {"best_epoch": 2}}
                    break


def test_non_blocking_training_feeds_the_curve_and_reports_the_adapter(scene, tmp_path, monkeypatch):
    monkeypatch.setenv("SAMFINETUNE_ADAPTERS", str(tmp_path / "adapters"))
    client = TrainClient()
    logic = SAMFineTuneCoreLogic(worker=WorkerBackend(client=client))
    curve = training.TrainingCurve(scene)
    finished = []
    task = logic.train(str(tmp_path / "set"), name="liver-v1", waitForCompletion=False, epochs=2, model="litemedsam",
                       onEvent=lambda m: curve.addFromMessage(m["message"]), onFinished=finished.append)
    job = client.submitted[0]
    assert job.command == "train" and job.params["epochs"] == 2
    assert job.params["output"] == str(tmp_path / "adapters" / "liver-v1") == task.output
    while task.poll():
        pass
    assert task.state == "done" and finished == [task] and task.result["card"]["best_epoch"] == 2
    assert [row[0] for row in curve.rows()] == [1.0, 2.0]
    for name in ("liver-v1", ".liver-v1.old", ".liver-v2.candidate"):  # the hidden ones are a swap's, keep learning's
        os.makedirs(tmp_path / "adapters" / name)
        open(tmp_path / "adapters" / name / "model_card.json", "w").write("{}")
    os.makedirs(tmp_path / "adapters" / "unfinished")
    assert logic.listAdapters() == [("liver-v1", task.output)]
    with pytest.raises(ValueError, match="name"):
        logic.train(str(tmp_path / "set"), waitForCompletion=False)
    for name in ("../outside", "liver/v2", ".hidden", "  "):  # outside the library, or where its list does not look
        with pytest.raises(ValueError, match="Adapter name|Give the adapter a name"):
            logic.train(str(tmp_path / "set"), name=name, waitForCompletion=False)
    assert len(client.submitted) == 1 and not (tmp_path / "outside").exists()


def test_device_line_from_worker_info():
    gib = 2.0 ** 30
    line = describeDevice({"device": "cuda", "cuda_name": "NVIDIA H200", "torch": "2.14.1",
                           "memory": {"gpu_total": 140 * gib, "gpu_free": 100 * gib}})
    assert line == "GPU NVIDIA H200, 140.0 GiB (100.0 GiB free); torch 2.14.1"
    cpu = {"device": "cpu", "torch": "2.14.1", "memory": {"ram_total": 24 * gib}}
    assert describeDevice(cpu).startswith("CPU, 24.0")
    assert "cannot be imported" in describeDevice({"error": "torch cannot be imported here: x"})


def test_adapter_scores_become_a_table_and_a_case_is_compared_with_and_without_it(scene, tmp_path):
    from SAMFineTuneMRML import comparison

    logic = SAMFineTuneCoreLogic()
    cases = []
    for n in range(2):
        volume, node, segmentId = add_case(logic, "CT %d" % n, GEOMETRIES["flipped"])
        cases.append((volume, node, segmentId))
    logic.exportTrainingSet(cases, str(tmp_path / "set"), "liver", valFraction=0.5)
    card = {"scores": {"per_case": [{"case": "CT_1", "base": {"dice": 0.5}, "adapted": {"dice": 0.75}}]}}
    table = comparison.scoresTable(scene, card)
    assert table.GetNumberOfRows() == 1 and table.GetCellText(0, 0) == "CT_1"
    assert table.GetTable().GetValue(0, 2).ToDouble() == 0.75
    assert comparison.trackingSummary(card) == ""  # trained on a 2D set: nothing chosen
    card.update(inference={"tracking": {"min_margin_px": 6, "seed_area_weight": 1.0}},
                tracking_choice={"dice": {"2": 0.5, "6": 0.781}, "structures": 5})
    assert comparison.trackingSummary(card) == ("It tracks with a 6 px margin and seeds by predicted IoU x mask area. "
                                                "From one ROI it scored 3D Dice 0.781 on 5 validation structures.")
    card["inference"]["tracking"].update(seed_area_weight=0.0, fixed_fallback=0.5)
    assert comparison.trackingSummary(card) == (
        "It tracks with a 6 px margin and seeds by predicted IoU, and takes the ROI on every slice where tracking "
        "disagrees with it (3D Dice below 0.50). From one ROI it scored 3D Dice 0.781 on 5 validation structures.")
    card["inference"]["tracking"].update(own_box_px=2)
    assert comparison.trackingSummary(card).endswith(
        "(3D Dice below 0.50). Each slice it keeps is decoded again with its own box grown by 2 px. From one ROI it "
        "scored 3D Dice 0.781 on 5 validation structures.")
    card["inference"]["tracking"].update(smooth_mm=1.0)
    assert comparison.trackingSummary(card).endswith(
        "grown by 2 px. Its result is smoothed in 3D by 1 mm. From one ROI it scored 3D Dice 0.781 on 5 validation "
        "structures.")
    card["epoch_choice"] = {"tracked_dice": {"3": 0.699, "6": 0.784}, "by_validation_dice": 3, "kept": 3}
    assert comparison.trackingSummary(card).endswith("on 5 validation structures.")  # the epoch chosen by Dice
    card["epoch_choice"]["kept"] = 6
    assert comparison.trackingSummary(card).endswith(
        "on 5 validation structures. Epoch 6 is kept, not epoch 3 (best Dice with reference boxes): from one ROI it "
        "scored 0.784 against 0.699.")
    card["inference"]["box_mode"] = "crossed"
    card["tracking_choice"].update(dice_crossed=0.802, dice_tracked=0.784)
    assert comparison.trackingSummary(card).endswith(
        "against 0.699. Box mode auto runs crossed boxes with it (3D Dice 0.802 from one ROI, tracked 0.784).")
    card["inference"]["box_mode"] = "tracked"
    card["tracking_choice"].update(dice_crossed=0.701)
    assert comparison.trackingSummary(card).endswith(
        "Box mode auto runs tracked boxes with it (3D Dice 0.784 from one ROI, crossed 0.701).")

    client = TrainClient()
    logic = SAMFineTuneCoreLogic(worker=WorkerBackend(client=client))
    with pytest.raises(ValueError, match="holds no model_card.json"):
        comparison.compareOnCase(logic, str(tmp_path / "set"), "CT_1", str(tmp_path / "adapter"))
    assert client.submitted == [] and scene.GetNodesByClass("vtkMRMLScalarVolumeNode").GetNumberOfItems() == 2
    os.makedirs(tmp_path / "adapter")
    (tmp_path / "adapter" / "model_card.json").write_text("{}")
    node, tasks = comparison.compareOnCase(logic, str(tmp_path / "set"), "CT_1", str(tmp_path / "adapter"),
                                           model="litemedsam")
    assert [job.params["adapter"] for job in client.submitted] == [None, str(tmp_path / "adapter")]
    box = tasks[0].roiBox.box
    assert box == (2, 1, 0, 14, 12, 3)  # the label (i 5-11, j 4-9, k 1-2) grown by 3 in-plane, 1 slice
    names = [node.GetSegmentation().GetNthSegment(n).GetName() for n in range(3)]
    assert names == ["reference", "base", "adapted"]
    reference = segments.segmentToArray(node, node.GetSegmentation().GetSegmentIdBySegmentName("reference"),
                                        tasks[0].volumeNode)
    assert reference.sum() == 2 * 6 * 7
    half = reference.copy()
    half[2] = False  # the label's first slice only
    for task, mask in zip(tasks, (half, reference)):
        task.finishHere("done", {"stats": {}}, {"mask": mask.astype(np.uint8)})
    assert comparison.diceAgainstReference(tasks[0]) == pytest.approx(2 * 42 / (84 + 42))
    assert comparison.diceAgainstReference(tasks[1]) == 1.0
    with pytest.raises(KeyError, match="CT_9"):
        comparison.compareOnCase(logic, str(tmp_path / "set"), "CT_9", None)


def test_training_takes_the_panels_model_and_window_not_its_anatomical_axis():
    from SAMFineTuneMRML import options

    panel = options.checkOptions({"window": "400/40", "axis": "coronal", "device": "cpu"})
    config = options.trainingOptions(panel, epochs=3, learnClicks=True)
    assert config["window"] == "400/40" and config["device"] == "cpu" and config["epochs"] == 3
    assert "axis" not in config and config["click_prompts"] == options.CLICK_TRAINING_SHARE
    assert set(options.MODEL_KEYS) <= set(config)
    assert options.trainingOptions(panel, epochs=1, learnClicks=False)["click_prompts"] == 0.0


def test_a_case_id_differs_from_the_sets_ids_in_more_than_case(scene):
    """Windows and macOS file names ignore case: a new case "ct" would write over case "CT"'s files."""
    used = {"CT"}
    assert training.caseId(addVolume(np.zeros((2, 3, 4), np.int16), name="ct"), used) == "ct_2"
    assert training.caseId(addVolume(np.zeros((2, 3, 4), np.int16), name="Ct"), used) == "Ct_3"
    assert used == {"CT", "ct_2", "Ct_3"}
    assert training.caseId(addVolume(np.zeros((2, 3, 4), np.int16), name="aux"), used) == "aux_case"


@pytest.mark.slow
def test_cases_segmented_in_the_worker_are_not_encoded_again_by_their_training(scene, tmp_path, monkeypatch):
    """The panel's path: each case segmented from its ROI in the real worker, the result kept as
    the user's segment, exported, and trained on in the same worker: training reads the slices the
    worker encoded instead of encoding them again. So the exported files hold the voxels the panel
    sent, training takes the panel's window, and slices each case along the array axis its
    segmentation took (on the sagittal acquisition, axial is another array axis)."""
    import importlib.util

    from SAMFineTuneLib.phantom import bounding_box, make_ct_phantom
    from SAMFineTuneMRML import geometry, options

    if importlib.util.find_spec("torch") is None and not os.environ.get("SAMFINETUNE_WORKER_PYTHON"):
        pytest.skip("no torch here and no $SAMFINETUNE_WORKER_PYTHON for the worker")
    monkeypatch.setenv("SAMFINETUNE_CACHE", str(tmp_path / "cache"))
    # Fixed boxes encode every slice of the ROI, so every slice of the segment is encoded (training's
    # slices past the segment's ends, which may lie past the ROI, are left out: end_slices=0).
    panel = options.checkOptions({"window": "abdomen", "axis": "axial", "box_mode": "fixed", "device": "cpu"})
    logic = SAMFineTuneCoreLogic()
    logic.worker.client.env["OMP_NUM_THREADS"] = "2"
    try:
        for n, name in enumerate(("flipped", "oblique", "sagittal")):
            ct, label = make_ct_phantom(shape_kji=(5, 64, 64), spacing_xyz=(1.0, 1.0, 4.0), seed=n + 1)
            volume = addVolume(ct.array.astype(np.int16), GEOMETRIES[name], "case %d" % n)
            roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "organ")
            geometry.placeRoiAroundBox(roi, volume, bounding_box(label.array, (2, 2, 1)))
            task = logic.segment(volume, roi, runIn="worker", **panel)
            assert task.state == "done", task.error
        cases = training.findCases(scene, "organ")
        assert len(cases) == 3
        logic.exportTrainingSet(cases, str(tmp_path / "set"), "organ", valFraction=0.34, axis=panel["axis"])
        card = logic.train(str(tmp_path / "set"), output=str(tmp_path / "adapter"), runIn="worker", batch_size=4,
                           end_slices=0, final_scores=False, choose_tracking=False,
                           **options.trainingOptions(panel, 1, False))
    finally:
        logic.shutdown()
    assert card["stats"]["cache_hits"] > 0 and card["stats"]["encoder_calls"] == 0, card["stats"]
