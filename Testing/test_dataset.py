"""Training-set export: layout, geometry, splits by case/patient, append, atomicity, bad input.

Needs no model and no data outside the repository (volumes are made here)."""
import argparse
import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from SAMFineTuneLib import dataset as ds
from SAMFineTuneLib.volume_io import Volume, read_volume

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OBLIQUE = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # 90 degrees about z


def make_case(seed, shape=(4, 20, 24), spacing=(0.8, 0.9, 2.5), origin=(-10.0, 5.0, 30.0), direction=OBLIQUE,
              values=(1, 2), empty=False):
    rng = np.random.default_rng(seed)
    image = rng.normal(40, 30, shape).astype(np.int16)
    image[:, :2] = -1000  # air rows: CT-like, so "auto" picks a CT window
    label = np.zeros(shape, np.uint8)
    if not empty:
        label[1:3, 5:12, 6:14] = values[0]
        if len(values) > 1:
            label[2:4, 14:18, 3:9] = values[1]
    return (f"case{seed:02d}", Volume(image, spacing, origin, direction), Volume(label, spacing, origin, direction))


def digest(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def tree_digest(root):
    return {os.path.relpath(os.path.join(d, f), root): digest(os.path.join(d, f))
            for d, _, files in os.walk(root) for f in files}


def test_round_trip_keeps_geometry_labels_and_slices(tmp_path):
    cases = [make_case(s) for s in range(3)]
    summary = ds.export_dataset(cases, tmp_path / "d", label_names={1: "liver", 2: "spleen"}, modality="CT")
    assert summary["added"] == ["case00", "case01", "case02"] and summary["cases"] == 3
    meta = json.loads((tmp_path / "d" / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "liver": 1, "spleen": 2}
    assert meta["channel_names"] == {"0": "CT"} and meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"
    assert len(meta["training"]) + len(meta["validation"]) == 3
    info = ds.read_dataset(tmp_path / "d")
    assert info.labels == {1: "liver", 2: "spleen"}
    for case_id, image, label in cases:
        entry = info.case(case_id)
        assert entry.image.endswith(f"imagesTr/{case_id}_0000.nii.gz")
        assert entry.label.endswith(f"labelsTr/{case_id}.nii.gz")
        back_image, back_label = read_volume(entry.image), read_volume(entry.label)
        np.testing.assert_array_equal(back_image.array, image.array)
        np.testing.assert_array_equal(back_label.array, label.array)
        for vol in (back_image, back_label):
            np.testing.assert_allclose(vol.spacing, image.spacing, atol=1e-6)
            np.testing.assert_allclose(vol.origin, image.origin, atol=1e-6)
            np.testing.assert_allclose(vol.direction, image.direction, atol=1e-6)
    # per-slice samples: one per (slice, label), mask == label slice, geometry carried along
    from SAMFineTuneLib.windows import window_volume

    samples = ds.load_samples(info, cases=["case01"])
    assert [(s.index, s.label) for s in samples] == [(1, 1), (2, 1), (2, 2), (3, 2)]
    _, image, label = cases[1]
    windowed = window_volume(image.array)
    for s in samples:
        np.testing.assert_array_equal(s.mask, label.array[s.index] == s.label)
        np.testing.assert_allclose(s.image, windowed[s.index])
        assert s.pixel_spacing == pytest.approx((0.9, 0.8)) and s.thickness == pytest.approx(2.5)
    assert samples[0].box == (6, 5, 13, 11)
    coronal = ds.load_samples(info, cases=["case01"], axis="coronal", labels=[1])
    assert [s.index for s in coronal] == list(range(5, 12)) and coronal[0].pixel_spacing == pytest.approx((2.5, 0.8))
    assert coronal[0].thickness == pytest.approx(0.9)


def test_split_is_by_case_and_by_patient(tmp_path):
    cases = [make_case(s) for s in range(10)]
    groups = {c[0]: f"patient{i // 2}" for i, c in enumerate(cases)}  # two cases per patient
    ds.export_dataset(cases, tmp_path / "a", val_fraction=0.4, seed=3, groups=groups)
    info = ds.read_dataset(tmp_path / "a")
    sides = {}
    for entry in info.cases:
        sides.setdefault(entry.group, set()).add(entry.split)
    assert all(len(s) == 1 for s in sides.values()), sides
    assert len(info.split("val")) == 4 and len(info.split("train")) == 6
    train = {s.case for s in ds.load_samples(info, split="train")}
    val = {s.case for s in ds.load_samples(info, split="val")}
    assert train and val and not (train & val)
    ds.export_dataset(cases, tmp_path / "b", val_fraction=0.4, seed=3, groups=groups)
    assert [e.split for e in ds.read_dataset(tmp_path / "b").cases] == [e.split for e in info.cases]
    # an explicit split wins; one that splits a patient is refused
    forced = {c[0]: "val" for c in cases[:2]}
    ds.export_dataset(cases[:4], tmp_path / "c", splits=forced, groups=groups)
    assert [e.split for e in ds.read_dataset(tmp_path / "c").cases][:2] == ["val", "val"]
    with pytest.raises(ValueError, match="both sides"):
        ds.export_dataset(cases[:2], tmp_path / "e", splits={"case00": "val", "case01": "train"}, groups=groups)


def test_append_keeps_old_cases_and_patients(tmp_path):
    root = tmp_path / "d"
    first = [make_case(s) for s in range(4)]
    groups = {c[0]: f"p{i}" for i, c in enumerate(first)}
    ds.export_dataset(first, root, val_fraction=0.25, groups=groups)
    before = ds.read_dataset(root)
    hashes = {p: h for p, h in tree_digest(root).items() if p != "dataset.json"}
    # two more cases; case05 belongs to a patient already in the dataset and must join that side
    more = [make_case(4), make_case(5)]
    groups.update(case04="p_new", case05=before.cases[0].group)
    summary = ds.export_dataset(more, root, val_fraction=0.25, groups=groups)
    after = ds.read_dataset(root)
    assert summary["added"] == ["case04", "case05"] and len(after.cases) == 6
    for old in before.cases:
        assert after.case(old.case).split == old.split
    assert after.case("case05").split == before.cases[0].split
    now = tree_digest(root)
    assert all(now[p] == h for p, h in hashes.items())  # nothing rewritten
    with pytest.raises(ValueError, match="already in the dataset"):
        ds.export_dataset([make_case(1)], root)
    with pytest.raises(ValueError, match="twice"):
        ds.export_dataset([make_case(7), make_case(7)], root)
    assert tree_digest(root) == now


def test_a_case_exported_again_is_replaced_only_when_asked_and_only_if_it_changed(tmp_path):
    """The same case exported again after more corrections: its label map is written again, its
    split and patient kept, slice formats follow; unchanged, nothing is written; a case the dataset
    holds is still refused without ``replace``."""
    root = tmp_path / "d"
    cases = [make_case(s) for s in range(4)]
    ds.export_dataset(cases, root, fmt="finetune-sam", val_fraction=0.25, groups={c[0]: "p%d" % i for i, c in
                                                                                 enumerate(cases)})
    before, files = ds.read_dataset(root), tree_digest(root)
    same = ds.export_dataset([make_case(1)], root, replace=["case01"])
    assert (same["added"], same["replaced"], same["unchanged"]) == ([], [], ["case01"])
    assert {p: h for p, h in tree_digest(root).items() if p != "dataset.json"} == {
        p: h for p, h in files.items() if p != "dataset.json"}
    cid, image, label = make_case(1)
    corrected = label.array.copy()
    corrected[0, 5:12, 6:14] = 1  # one more slice of the structure
    summary = ds.export_dataset([(cid, image, Volume(corrected, label.spacing, label.origin, label.direction))],
                                root, replace=["case01"], corrected={"case01": {"axial": [0]}})
    after = ds.read_dataset(root)
    assert (summary["added"], summary["replaced"]) == ([], ["case01"]) and len(after.cases) == 4
    assert [(e.case, e.split, e.group) for e in after.cases] == [(e.case, e.split, e.group) for e in before.cases]
    np.testing.assert_array_equal(ds.load_case(after.case("case01"))[1].array, corrected)
    assert after.case("case01").record["corrected_slices"] == {"axial": [0]}
    rows = [line for line in (root / "train.csv").read_text().splitlines() + (root / "val.csv").read_text()
            .splitlines() if "case01" in line]
    assert len(rows) == 4  # the slices holding the label (1-3), and the one the correction added
    changed = {p for p, h in tree_digest(root).items() if files.get(p) != h}
    assert "labelsTr/case01.nii.gz" in changed and not any("case00" in p or "case02" in p for p in changed)
    with pytest.raises(ValueError, match="already in the dataset"):
        ds.export_dataset([make_case(2)], root)


def test_the_slices_a_person_corrected_stay_with_the_case(tmp_path):
    root = tmp_path / "d"
    ds.export_dataset([make_case(0), make_case(1)], root, corrected={"case00": {"axial": [3, 1], "coronal": []}})
    ds.export_dataset([make_case(2)], root, corrected={"case02": {"sagittal": [5]}})
    found = ds.read_dataset(root)
    assert found.case("case00").record["corrected_slices"] == {"axial": [1, 3]}
    assert "corrected_slices" not in found.case("case01").record
    assert found.case("case02").record["corrected_slices"] == {"sagittal": [5]}


def test_each_case_is_sliced_along_the_axis_it_was_segmented_along(tmp_path):
    root = tmp_path / "d"
    ds.export_dataset([make_case(0), make_case(1)], root, slice_axes={"case01": "coronal"})
    found = ds.read_dataset(root)
    assert found.case("case01").record["slice_axis"] == "coronal" and "slice_axis" not in found.case("case00").record
    assert found.case("case00").slicing_axis() == "axial" and found.case("case01").slicing_axis() == "coronal"
    assert found.case("case01").slicing_axis("sagittal") == "sagittal"  # asked for: every case along it
    samples = ds.load_samples(found, split="all", labels=[1])
    assert {s.axis for s in samples if s.case == "case01"} == {"coronal"}
    assert {s.axis for s in samples if s.case == "case00"} == {"axial"}
    assert sorted(s.index for s in samples if s.case == "case01") == list(range(5, 12))  # label 1 on rows 5-11
    now = tree_digest(root)
    with pytest.raises(ValueError, match="case 'case02': slicing axis 'oblique'"):
        ds.export_dataset([make_case(2)], root, slice_axes={"case02": "oblique"})
    assert tree_digest(root) == now
    found.case("case00").record["slice_axis"] = "diagonal"  # a hand-edited dataset.json
    with pytest.raises(ValueError, match="case 'case00'.*fix its slice_axis"):
        found.case("case00").slicing_axis()


def test_interrupted_export_leaves_previous_dataset_valid(tmp_path):
    root = tmp_path / "d"
    ds.export_dataset([make_case(s) for s in range(3)], root)
    before = tree_digest(root)
    index_bytes = (root / "dataset.json").read_bytes()

    def crash(done, total, message):
        if done == 2:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        ds.export_dataset([make_case(s) for s in range(10, 15)], root, progress=crash)
    assert (root / "dataset.json").read_bytes() == index_bytes
    info = ds.read_dataset(root)
    assert [c.case for c in info.cases] == ["case00", "case01", "case02"]
    assert all(before[p] == h for p, h in tree_digest(root).items() if p in before)
    assert not [f for f in os.listdir(root / "imagesTr") if ".part" in f]
    assert tree_digest(root) == before  # the failed export took away the files it added
    ds.export_dataset([make_case(s) for s in range(10, 15)], root)
    assert len(ds.read_dataset(root).cases) == 8


def test_killed_export_process_leaves_previous_dataset_valid(tmp_path):
    """SIGKILL a real export process in the middle of its writes."""
    root = str(tmp_path / "d")
    ds.export_dataset([make_case(s) for s in range(2)], root)
    before = tree_digest(root)
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from test_dataset import make_case
        from SAMFineTuneLib.dataset import export_dataset
        def slow(done, total, message):
            print(done, flush=True)
            time.sleep(0.3)
        export_dataset([make_case(s, shape=(30, 60, 60)) for s in range(20, 40)], {root!r}, progress=slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if int(line) >= 3:  # three new cases fully written, the fourth under way
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert tree_digest(root)["dataset.json"] == before["dataset.json"]
    info = ds.read_dataset(root)
    assert [c.case for c in info.cases] == ["case00", "case01"]
    for entry in info.cases:
        read_volume(entry.image), read_volume(entry.label)


def test_bad_inputs_are_clear_errors_or_visible_skips(tmp_path):
    cid, image, label = make_case(0)
    with pytest.raises(ValueError, match="label shape"):
        ds.export_dataset([(cid, image, Volume(label.array[:2], label.spacing, label.origin, label.direction))],
                          tmp_path / "a")
    with pytest.raises(ValueError, match="spacing"):
        ds.export_dataset([(cid, image, Volume(label.array, (1.0, 1.0, 1.0), label.origin, label.direction))],
                          tmp_path / "a")
    with pytest.raises(ValueError, match="direction"):
        ds.export_dataset([(cid, image, Volume(label.array, label.spacing, label.origin))], tmp_path / "a")
    with pytest.raises(ValueError, match=r"label values \[2\]"):
        ds.export_dataset([make_case(0)], tmp_path / "a", label_names={1: "liver"})
    with pytest.raises(ValueError, match="non-integer"):
        ds.export_dataset([(cid, image, Volume(label.array * 0.5, label.spacing, label.origin, label.direction))],
                          tmp_path / "a")
    with pytest.raises(ValueError, match="file name"):
        ds.export_dataset([("bad/id", image, label)], tmp_path / "a")
    assert not os.path.exists(tmp_path / "a" / "dataset.json")
    with pytest.raises(ValueError, match="label shape"):  # into folders that do not exist yet: none is left
        ds.export_dataset([(cid, image, Volume(label.array[:2], label.spacing, label.origin, label.direction))],
                          tmp_path / "new" / "sets" / "a")
    assert not os.path.exists(tmp_path / "new")
    with pytest.warns(UserWarning, match="empty"):
        summary = ds.export_dataset([make_case(0), make_case(1, empty=True)], tmp_path / "b")
    assert summary["added"] == ["case00"] and summary["skipped"] == [{"case": "case01", "reason": "empty label"}]
    with pytest.raises(ValueError, match="not a dataset"):
        ds.read_dataset(tmp_path / "nothing")


def test_finetune_sam_csv_and_coco_formats(tmp_path):
    root = tmp_path / "d"
    ds.export_dataset([make_case(s) for s in range(3)], root, fmt="finetune-sam", val_fraction=0.34,
                      label_names={1: "liver", 2: "spleen"})
    info = ds.read_dataset(root)
    rows = {}
    for split in ("train", "val"):
        with open(root / f"{split}.csv") as handle:
            rows[split] = list(csv.reader(handle))
    assert len(rows["train"]) == 2 * 3 and len(rows["val"]) == 3  # slices 1..3 of each case
    import SimpleITK as sitk

    image_path, mask_path = rows["val"][1]
    val_case = info.split("val")[0]
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(root / mask_path)))
    np.testing.assert_array_equal(mask, read_volume(val_case.label).array[2])
    assert sitk.ReadImage(str(root / image_path)).GetSize() == (24, 20)
    # the same dataset, appended in COCO form: old cases get their slices too
    ds.export_dataset([make_case(5)], root, fmt="coco")
    coco = json.loads((root / "coco_train.json").read_text())
    assert {c["name"] for c in coco["categories"]} == {"liver", "spleen"}
    assert len(coco["images"]) == 3 * len(ds.read_dataset(root).split("train"))
    for annotation in coco["annotations"]:
        image = next(i for i in coco["images"] if i["id"] == annotation["image_id"])
        slice_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(root / image["file_name"].replace("images", "masks"))))
        expected = slice_mask == annotation["category_id"]
        np.testing.assert_array_equal(ds.rle_decode(annotation["segmentation"]), expected)
        x, y, w, h = annotation["bbox"]
        assert expected[y:y + h, x:x + w].sum() == expected.sum() == annotation["area"]
    formats = json.loads((root / "dataset.json").read_text())["samfinetune"]["formats"]
    assert set(formats) == {"coco", "finetune-sam", "msd"}


def test_export_command_line_with_2d_pngs(tmp_path):
    import SimpleITK as sitk

    paths = []
    for n in range(3):
        image = np.full((30, 40), 80, np.uint8)
        image[10:20, 10:25] = 160
        label = (image > 100).astype(np.uint8)
        for kind, array in (("img", image), ("seg", label)):
            path = str(tmp_path / f"{kind}{n}.png")
            sitk.WriteImage(sitk.GetImageFromArray(array), path)
            paths.append(path)
    parser = argparse.ArgumentParser()
    ds.add_arguments(parser)
    args = parser.parse_args(["--volumes"] + paths[0::2] + ["--labels"] + paths[1::2] +
                             ["--output", str(tmp_path / "d"), "--case-ids", "a", "b", "c", "--label-names", "1=lesion",
                              "--modality", "US"])
    assert ds.main(args) == 0
    info = ds.read_dataset(tmp_path / "d")
    assert [c.case for c in info.cases] == ["a", "b", "c"] and info.labels == {1: "lesion"}
    samples = ds.load_samples(info, split="all")
    assert len(samples) == 3 and samples[0].mask.sum() == 150 and samples[0].box == (10, 10, 24, 19)


def test_export_command_line_mistakes_are_named_before_any_case_is_read(tmp_path):
    from SAMFineTuneLib.cli import main

    args = ["export", "--volumes", str(tmp_path / "absent.nii.gz"), "--labels", str(tmp_path / "absent.nii.gz"),
            "--output", str(tmp_path / "d")]
    with pytest.raises(ValueError, match="--label-names wants 1=spleen,2=liver or JSON"):
        ds.main(_export_args(args[1:] + ["--label-names", "spleen=1"]))
    with pytest.raises(ValueError, match="--label-names wants"):
        ds.main(_export_args(args[1:] + ["--label-names", "{bad json"]))
    with pytest.raises(ValueError, match="2 volumes but 1 label files: give one label file per volume"):
        ds.main(_export_args(args[1:3] + args[2:]))
    assert main(args + ["--case-ids", "a", "b"]) == 2
    assert os.listdir(tmp_path) == []


def _export_args(argv):
    parser = argparse.ArgumentParser()
    ds.add_arguments(parser)
    return parser.parse_args(argv)


def test_monai_reads_the_dataset(tmp_path):
    from monai.data import load_decathlon_datalist

    ds.export_dataset([make_case(s) for s in range(5)], tmp_path / "d")
    train = load_decathlon_datalist(str(tmp_path / "d" / "dataset.json"), data_list_key="training")
    val = load_decathlon_datalist(str(tmp_path / "d" / "dataset.json"), data_list_key="validation")
    assert len(train) == 4 and len(val) == 1 and all(os.path.isfile(e["image"]) for e in train + val)


def test_a_second_demo_run_replaces_only_the_demos_own_dataset(tmp_path):
    from SAMFineTuneLib.demo import DEMO_DATASET, _clear_earlier_demo_dataset

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ds.export_dataset([make_case(0), make_case(1)], ours, name=DEMO_DATASET)
    ds.export_dataset([make_case(0), make_case(1)], theirs, name="a user's set")
    _clear_earlier_demo_dataset(str(ours))
    assert not ours.exists()
    before = tree_digest(theirs)
    with pytest.raises(ValueError, match="exists and is not a dataset the demo wrote; choose another --output"):
        _clear_earlier_demo_dataset(str(theirs))
    assert tree_digest(theirs) == before
    _clear_earlier_demo_dataset(str(tmp_path / "none"))  # nothing there: nothing to do


def test_a_second_demo_run_replaces_only_the_demos_own_adapter(tmp_path):
    """Decided from the adapter's card, before any work: the demo's dataset may be gone meanwhile."""
    from SAMFineTuneLib.demo import _earlier_demo_adapter

    adapter, dataset = tmp_path / "adapter", tmp_path / "dataset"
    assert not _earlier_demo_adapter(str(adapter), str(dataset))  # nothing there yet
    adapter.mkdir()
    (adapter / "model_card.json").write_text(json.dumps({"dataset": {"path": str(dataset)}}))
    assert _earlier_demo_adapter(str(adapter), str(dataset))
    (adapter / "model_card.json").write_text(json.dumps({"dataset": {"path": "/a/users/set"}}))
    with pytest.raises(ValueError, match="holds an adapter the demo did not train; choose another --output"):
        _earlier_demo_adapter(str(adapter), str(dataset))


def coco_images(root):
    return [image for split in ("train", "val")
            for image in json.loads((root / f"coco_{split}.json").read_text())["images"]]


def test_slice_pngs_follow_the_axis_and_the_files_they_were_made_from(tmp_path):
    import SimpleITK as sitk
    from SAMFineTuneLib.volume_io import write_volume

    root = tmp_path / "d"
    ds.export_dataset([make_case(0), make_case(1)], root, fmt="coco")
    kept = (root / "slices" / "case00.json").read_bytes()
    ds.export_dataset([make_case(2)], root, fmt="coco")  # nothing changed: case00's slices are reused
    assert (root / "slices" / "case00.json").read_bytes() == kept
    # a label map edited by hand: its case's slices are made again from it
    label_path = root / "labelsTr" / "case01.nii.gz"
    edited = read_volume(str(label_path))
    edited.array[:] = 0
    edited.array[0, 2:4, 2:4] = 1
    write_volume(edited, str(label_path))
    os.utime(label_path, ns=(1, 1))
    ds.export_dataset([make_case(3)], root, fmt="coco")
    assert [(i["slice"]) for i in coco_images(root) if i["case"] == "case01"] == [0]
    mask = next(i for i in coco_images(root) if i["case"] == "case01")["file_name"].replace("images", "masks")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(root / mask))), edited.array[0])
    # another axis on append: every case is sliced along it, no PNG of the old axis is left
    ds.export_dataset([make_case(4)], root, fmt="coco", axis="sagittal")
    assert json.loads((root / "dataset.json").read_text())["samfinetune"]["slice_axis"] == "sagittal"
    assert {i["file_name"].split("_")[-1][:-8] for i in coco_images(root)} == {"sagittal"}
    assert {i["case"] for i in coco_images(root)} == {f"case0{n}" for n in range(5)}
    assert not [f for f in os.listdir(root / "slices" / "images") if "axial" in f]


def test_a_failed_export_leaves_no_slices_for_a_later_case_of_the_same_id(tmp_path, monkeypatch):
    from SAMFineTuneLib.dataset import export as export_module

    root = tmp_path / "d"
    ds.export_dataset([make_case(0), make_case(1)], root, fmt="coco")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(export_module, "write_slice_indexes", full_disk)
        with pytest.raises(OSError, match="No space"):
            ds.export_dataset([make_case(2)], root, fmt="coco")
    assert [c.case for c in ds.read_dataset(root).cases] == ["case00", "case01"]
    assert not (root / "imagesTr" / "case02_0000.nii.gz").exists()
    # the same id again with a corrected label: the structure on slice 0 only
    cid, image, label = make_case(2)
    label.array[:] = 0
    label.array[0, 3:9, 4:10] = 1
    ds.export_dataset([(cid, image, label)], root, fmt="coco")
    index = json.loads((root / "slices" / "case02.json").read_text())
    assert [s["slice"] for s in index["slices"]] == [0]
    assert sorted(i["slice"] for i in coco_images(root) if i["case"] == "case02") == [0]
    # a slice index of a case dataset.json does not list is removed with its PNGs
    stray = root / "slices" / "images" / "ghost_axial0001.png"
    stray.write_bytes(b"png")
    (root / "slices" / "ghost.json").write_text(json.dumps({"case": "ghost", "slices": [
        {"slice": 1, "image": "slices/images/ghost_axial0001.png", "mask": "slices/masks/none.png"}]}))
    ds.export_dataset([make_case(3)], root, fmt="coco")
    assert not stray.exists() and not (root / "slices" / "ghost.json").exists()


def test_every_slice_format_of_the_dataset_is_kept_up_to_date(tmp_path):
    root = tmp_path / "d"
    ds.export_dataset([make_case(0), make_case(1)], root, fmt="coco", axis="coronal")
    ds.export_dataset([make_case(2)], root, fmt="finetune-sam")
    ds.export_dataset([make_case(3), make_case(4)], root)  # MSD only
    meta = json.loads((root / "dataset.json").read_text())["samfinetune"]
    assert meta["formats"] == ["coco", "finetune-sam", "msd"]
    assert {i["case"] for i in coco_images(root)} == {f"case0{n}" for n in range(5)}
    assert meta["slice_axis"] == "coronal"  # the dataset's axis, as none was asked for
    assert {i["file_name"].split("_")[-1][:-8] for i in coco_images(root)} == {"coronal"}
    rows = [row for split in ("train", "val") for row in csv.reader(open(root / f"{split}.csv"))]
    assert len(rows) == len(coco_images(root)) and {os.path.basename(r[0]).split("_")[0] for r in rows} == {
        f"case0{n}" for n in range(5)}


def test_an_export_never_writes_over_files_it_did_not_write(tmp_path):
    from SAMFineTuneLib.volume_io import write_volume

    # a folder with the user's own files and no dataset.json
    theirs = tmp_path / "theirs"
    (theirs / "imagesTr").mkdir(parents=True)
    write_volume(Volume(np.full((4, 4, 4), 7, np.int16)), str(theirs / "imagesTr" / "case00_0000.nii.gz"))
    before = tree_digest(theirs)
    with pytest.raises(ValueError, match=f"^{theirs} is not empty .* export into an empty folder or an existing"):
        ds.export_dataset([make_case(0), make_case(1)], theirs)
    assert tree_digest(theirs) == before and sorted(os.listdir(theirs)) == ["imagesTr"]
    # an existing dataset with a file it does not list, where a new case would go
    root = tmp_path / "d"
    ds.export_dataset([make_case(0), make_case(1)], root)
    write_volume(Volume(np.full((4, 4, 4), 7, np.int16)), str(root / "labelsTr" / "case02.nii.gz"))
    (root / "coco_val.json").write_text("{}")
    before = tree_digest(root)
    with pytest.raises(ValueError, match="already holds labelsTr/case02.nii.gz, which dataset.json does not list"):
        ds.export_dataset([make_case(2)], root)
    with pytest.raises(ValueError, match="already holds coco_val.json, which dataset.json does not list"):
        ds.export_dataset([make_case(3)], root, fmt="coco")
    assert tree_digest(root) == before
    # a first export that fails leaves an empty folder, so it can simply be run again
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / ".DS_Store").write_bytes(b"")  # what a file browser leaves does not make a folder not empty

    def crash(done, total, message):
        if message.startswith("slices of"):
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        ds.export_dataset([make_case(0), make_case(1)], fresh, fmt="coco", progress=crash)
    assert os.listdir(fresh) == [".DS_Store"]
    ds.export_dataset([make_case(0), make_case(1)], fresh, fmt="coco")
    assert len(coco_images(fresh)) == 6


@pytest.mark.parametrize("field, value", [("case", "../../outside"), ("case", "sub/case"),
                                          ("image", "../outside_0000.nii.gz"), ("label", "/tmp/elsewhere.nii.gz")])
def test_a_dataset_naming_files_outside_itself_is_refused_before_anything_is_written(tmp_path, field, value):
    """A dataset.json from elsewhere (a shared set) must not make an export write, nor training read,
    outside the dataset's folder: every case's slice index and files are named after its id."""
    root = tmp_path / "shared" / "set"
    ds.export_dataset([make_case(0), make_case(1)], root, fmt="finetune-sam")
    meta = json.loads((root / "dataset.json").read_text())
    meta["samfinetune"]["cases"][1][field] = value
    (root / "dataset.json").write_text(json.dumps(meta))
    before = tree_digest(tmp_path)
    with pytest.raises(ValueError, match=r"outside the dataset|not a plain file name") as refused:
        ds.read_dataset(root)
    assert value in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(ValueError, match=r"outside the dataset|not a plain file name"):
        ds.export_dataset([make_case(2)], root, fmt="finetune-sam")
    assert tree_digest(tmp_path) == before


def test_a_case_id_windows_keeps_for_a_device_is_refused(tmp_path):
    """labelsTr/CON.nii.gz is the console on Windows, wherever the set is copied."""
    _, image, label = make_case(0)
    for case_id in ("CON", "nul", "com1.2", "LPT9"):
        with pytest.raises(ValueError, match="not usable as a file name.*CON or NUL"):
            ds.export_dataset([(case_id, image, label)], tmp_path / "d")
    assert ds.export_dataset([("CONTRAST_1", image, label)], tmp_path / "d")["added"] == ["CONTRAST_1"]
