"""A case exported again is told from a new one by its voxels, whatever its grid (a registered
volume is the same patient), also in datasets whose records keep no fingerprints (written by
earlier versions): their stored files stand in, read only where a volume of their shape is asked
about, and the record gains the fingerprints when the dataset is next written."""
import json
import math

import numpy as np

from SAMFineTuneLib import dataset as ds
from SAMFineTuneLib import volume_io
from SAMFineTuneLib.dataset import checks, export
from SAMFineTuneLib.volume_io import Volume, read_volume

from test_dataset import make_case, tree_digest

# An oblique grid whose numbers float32 does not hold: what a round trip through NIfTI rounds.
ANGLE = 0.3
TILTED = (math.cos(ANGLE), -math.sin(ANGLE), 0.0, math.sin(ANGLE), math.cos(ANGLE), 0.0, 0.0, 0.0, 1.0)


def tilted_case(seed):
    return make_case(seed, spacing=(0.7031, 0.7031, 2.5), origin=(-175.3, -211.7, 33.1), direction=TILTED)


def old_format(root):
    """``root``'s dataset.json as an earlier version wrote it: records without fingerprints."""
    meta = json.loads((root / "dataset.json").read_text())
    for record in meta["samfinetune"]["cases"]:
        del record["fingerprints"]
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return meta


def records(root):
    return {r["case"]: r for r in json.loads((root / "dataset.json").read_text())["samfinetune"]["cases"]}


def test_a_stored_case_does_not_reproduce_its_fingerprint_but_matches_as_stored(tmp_path):
    ds.export_dataset([make_case(0), tilted_case(1)], tmp_path / "d")
    for case_id, image, _ in (make_case(0), tilted_case(1)):
        path = str(tmp_path / "d" / "imagesTr" / f"{case_id}_0000.nii.gz")
        stored = read_volume(path)
        assert checks.volume_fingerprint(stored.array, stored) != checks.volume_fingerprint(image.array, image)
        assert checks.stored_as(image.array, image, path)
        other = make_case(7)[1]  # another patient on the same grid
        assert not checks.stored_as(other.array, Volume(other.array, image.spacing, image.origin, image.direction),
                                    path)
        moved = Volume(image.array, image.spacing, tuple(o + 0.5 for o in image.origin), image.direction)
        assert not checks.stored_as(image.array, moved, path)
        assert not checks.stored_as(image.array.astype(np.float32), image, path)  # another voxel type


def test_an_old_records_case_exported_again_is_kept_and_gains_its_fingerprints(tmp_path):
    root = tmp_path / "d"
    cases = [make_case(0), tilted_case(1), make_case(2), make_case(3)]
    ds.export_dataset(cases, root, val_fraction=0.25)
    old_format(root)
    before = tree_digest(root)
    summary = ds.export_dataset([tilted_case(1)], root, replace=["case01"])
    assert (summary["added"], summary["replaced"], summary["unchanged"]) == ([], [], ["case01"])
    assert {p: h for p, h in tree_digest(root).items() if p != "dataset.json"} == {
        p: h for p, h in before.items() if p != "dataset.json"}  # no case file written again
    found = records(root)
    _, image, label = tilted_case(1)
    assert found["case01"]["fingerprints"] == {"image": checks.volume_fingerprint(image.array, image),
                                               "label": checks.volume_fingerprint(label.array, image),
                                               "voxels": checks.voxel_fingerprint(image.array)}
    assert not any("fingerprints" in found[c] for c in ("case00", "case02", "case03"))
    assert len(ds.read_dataset(root).cases) == 4
    # corrected further: written again under its id, split kept
    corrected = make_case(2)[2].array.copy()
    corrected[0, 5:12, 6:14] = 1
    _, image, label = make_case(2)
    summary = ds.export_dataset([("case02", image, label.with_array(corrected))], root, replace=["case02"])
    assert summary["replaced"] == ["case02"] and records(root)["case02"]["split"] == found["case02"]["split"]
    assert "fingerprints" in records(root)["case02"]


def test_old_records_name_the_same_volume_and_never_another(tmp_path, monkeypatch):
    root = tmp_path / "d"
    ds.export_dataset([make_case(0), tilted_case(1), make_case(2, shape=(5, 20, 24))], root)
    old_format(root)
    reads = []
    real = volume_io.read_volume
    monkeypatch.setattr(volume_io, "read_volume", lambda path, *a: reads.append(path) or real(path, *a))
    known = checks.KnownCases.of(str(root))
    assert known.case_of(tilted_case(1)[1]) == "case01"
    assert [p.rsplit("/", 1)[1] for p in reads] == ["case00_0000.nii.gz", "case01_0000.nii.gz"]  # of its shape
    reads.clear()
    assert known.case_of(make_case(8)[1]) is None  # another patient, same shape as case00 and case01
    assert [p.rsplit("/", 1)[1] for p in reads] == ["case00_0000.nii.gz", "case01_0000.nii.gz"]
    reads.clear()
    assert known.case_of(make_case(9, shape=(6, 20, 24))[1]) is None and reads == []  # no record of that shape
    image = make_case(0)[1]
    assert known.case_of(image) == "case00" and known.case_of(image, taken={"case00"}) is None


def test_the_cases_named_by_the_caller_are_not_read_or_hashed_again(tmp_path, monkeypatch):
    root = tmp_path / "d"
    ds.export_dataset([make_case(0), make_case(1)], root)
    hashed, read = [], []
    real_print, real_read = checks.volume_fingerprint, export.read_dataset
    monkeypatch.setattr(checks, "volume_fingerprint", lambda *a: hashed.append(a[0].dtype) or real_print(*a))
    monkeypatch.setattr(export, "read_dataset", lambda *a: read.append(1) or real_read(*a))
    known = checks.KnownCases.of(str(root))
    cases = [make_case(1), make_case(2)]
    assert [known.case_of(image) for _, image, _ in cases] == ["case01", None]
    summary = ds.export_dataset(cases, root, replace=["case01"], known=known)
    assert summary["unchanged"] == ["case01"] and summary["added"] == ["case02"]
    assert hashed.count(np.int16) == 2 and read == []  # each image hashed once, dataset.json read once
    (root / "dataset.json").write_text((root / "dataset.json").read_text() + " ")  # changed meanwhile
    ds.export_dataset([make_case(3)], root, known=known)
    assert read == [1]


def test_a_moved_volume_is_its_case_written_again_on_its_new_grid(tmp_path):
    """Registered, or a transform hardened: the same voxels on another grid are the same patient,
    whether its record keeps fingerprints or not; another patient of that shape is not."""
    root = tmp_path / "d"
    ds.export_dataset([make_case(0), make_case(1), make_case(2)], root, val_fraction=0.34)
    split = records(root)["case01"]["split"]
    _, image, label = make_case(1)
    moved = (Volume(image.array, (0.85, 0.9, 3.0), (2.0, -4.0, 31.5), TILTED),
             Volume(label.array, (0.85, 0.9, 3.0), (2.0, -4.0, 31.5), TILTED))
    for written_by in ("this version", "an earlier version"):
        if written_by == "an earlier version":
            ds.export_dataset([("case01", image, label)], root, replace=["case01"])  # back where it was
            old_format(root)
        known = checks.KnownCases.of(str(root))
        assert known.case_of(moved[0]) == "case01" and known.case_of(make_case(7)[1]) is None, written_by
        summary = ds.export_dataset([("case01", *moved)], root, replace=["case01"], known=known)
        assert summary["replaced"] == ["case01"] and len(ds.read_dataset(root).cases) == 3, written_by
        stored = read_volume(str(root / "imagesTr" / "case01_0000.nii.gz"))
        assert np.allclose(stored.origin, (2.0, -4.0, 31.5), atol=1e-4) and records(root)["case01"]["split"] == split
