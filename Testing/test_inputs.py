"""Corrupt input is refused, not segmented: image files cut short, NaN and infinite voxels, a box
with nothing in it; each with one line naming the file or parameter, before any model loads."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from SAMFineTuneLib import dataset as ds
from SAMFineTuneLib.volume_io import Volume, read_image_any, read_volume, write_volume

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
# A model that cannot load here (its checkpoint does not exist): an error about the input proves
# the input was checked before the model.
UNLOADABLE = ["--model", "medsam", "--checkpoint", "/absent/medsam.pth", "--quiet"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "SAMFineTuneLib", *args], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=600)


def segment(volume_path, output, box=("2", "2", "0", "20", "20", "3")):
    return run_cli("segment", "--volume", str(volume_path), "--box", *box, "--output", str(output), *UNLOADABLE)


def ct_like(shape=(6, 32, 32), dtype=np.int16, seed=0) -> Volume:
    return Volume(np.random.default_rng(seed).integers(-500, 500, shape).astype(dtype), (0.7, 0.7, 3.0))


def one_line_error(done, *words):
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for word in words:
        assert word in lines[0], lines[0]


# --- files cut short -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii"])
def test_a_truncated_nifti_is_refused(tmp_path, name):
    path = tmp_path / name
    write_volume(ct_like((48, 32, 32)), str(path))
    data = path.read_bytes()
    cut = tmp_path / ("cut_" + name)  # as an interrupted copy leaves it
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=rf"cut_{name} is cut short: its header promises 98304 bytes of voxels"):
        read_volume(str(cut))
    with pytest.raises(ValueError, match="is cut short"):
        read_image_any(str(cut))
    assert read_volume(str(path)).array.shape == (48, 32, 32)  # the whole file reads fine
    one_line_error(segment(cut, tmp_path / "m.nii.gz"), str(cut), "is cut short")
    assert not (tmp_path / "m.nii.gz").exists()


def test_a_multi_member_gzip_nifti_reads(tmp_path):
    """gzip files may hold several members (bgzip, pigz -i); the size check must not refuse them."""
    path = tmp_path / "ct.nii"
    volume = ct_like((8, 16, 16))
    write_volume(volume, str(path))
    data = path.read_bytes()
    joined = tmp_path / "ct.nii.gz"
    joined.write_bytes(gzip.compress(data[:1000]) + gzip.compress(data[1000:]))
    np.testing.assert_array_equal(read_volume(str(joined)).array, volume.array)


def _empty_along_k(tmp_path, name):
    """A file whose header gives 0 voxels along k (as an empty image's export leaves it)."""
    import SimpleITK as sitk

    path = tmp_path / name
    if name.endswith((".nii", ".nii.gz")):
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 8, 8), np.int16)), str(tmp_path / "full.nii"))
        data = bytearray((tmp_path / "full.nii").read_bytes()[:352])
        data[46:48] = (0).to_bytes(2, "little")  # dim[3], the size along k
        path.write_bytes(gzip.compress(bytes(data)) if name.endswith(".gz") else bytes(data))
    elif name.endswith(".nrrd"):
        path.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 8 8 0\nencoding: raw\nendian: little\n\n")
    else:
        path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 8 8 0\nElementType = MET_SHORT\n"
                        "ElementDataFile = LOCAL\n")
    return path


@pytest.mark.parametrize("name", ["empty.nii", "empty.nii.gz", "empty.nrrd", "empty.mha"])
def test_a_file_with_an_empty_axis_is_named_with_that_axis_not_as_cut_short(tmp_path, name):
    """A NIfTI header with a size of 0 was reported as a file cut short (SimpleITK reads it as one
    slice); the other formats as unreadable or as an empty volume."""
    path = _empty_along_k(tmp_path, name)
    for read in (read_volume, read_image_any):
        with pytest.raises(ValueError) as caught:
            read(str(path))
        text = str(caught.value)
        assert text.startswith(f"{path} holds no voxels: its size along axis k is 0"), text
        assert "save or export the volume again" in text and "cut short" not in text and "\n" not in text
    if name == "empty.nii.gz":
        one_line_error(segment(path, tmp_path / "m.nii.gz"), str(path), "size along axis k is 0")


# --- NaN and infinite voxels ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nan.nii.gz", "nan.nii", "nan.nrrd", "nan.mha"])
def test_nan_and_inf_voxels_are_refused_with_counts(tmp_path, name):
    array = ct_like(dtype=np.float32).array
    array[1, 2, :3] = np.nan
    array[2, 5, 5] = np.inf
    path = tmp_path / name
    write_volume(Volume(array, (0.7, 0.7, 3.0)), str(path))
    with pytest.raises(ValueError, match=rf"{name} has 3 NaN and 1 infinite voxels \(of 6144\)"):
        read_volume(str(path))
    one_line_error(segment(path, tmp_path / "m.nii.gz"), "3 NaN and 1 infinite voxels")


def test_nan_in_an_exported_image_is_refused(tmp_path):
    image = ct_like(dtype=np.float32)
    image.array[0, 0, 0] = np.nan
    label = Volume(np.ones(image.array.shape, np.uint8), image.spacing)
    with pytest.raises(ValueError, match=r"case 'c0': the volume has 1 NaN voxels"):
        ds.export_dataset([("c0", image, label)], tmp_path / "d")
    assert not (tmp_path / "d").exists()


# --- a box with nothing in it ---------------------------------------------------------------


def test_a_flat_box_is_an_error_and_a_nearly_flat_one_a_warning(tmp_path):
    zeros = tmp_path / "zeros.nii.gz"
    write_volume(Volume(np.zeros((6, 32, 32), np.int16)), str(zeros))
    one_line_error(segment(zeros, tmp_path / "m.nii.gz"), "every voxel inside the box [2, 2, 0, 20, 20, 3]",
                   "is 0: there is nothing to segment")
    from SAMFineTuneLib.input_checks import check_contrast

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no numpy warning on the way
        with pytest.raises(ValueError, match="is 1e\\+30: there is nothing to segment"):
            check_contrast(np.full((4, 16, 16), 1e30, np.float32), (0, 0, 0, 15, 15, 3))
        with pytest.raises(ValueError, match="lies between"):
            check_contrast(np.full((4, 16, 16), 1e30) * (1 + 1e-9 * np.arange(16)), None)
    almost = np.zeros((4, 32, 32), np.int16)
    almost[1, 10, 10] = 100
    assert "of the voxels inside the box" in check_contrast(almost, (0, 0, 0, 31, 31, 3))[0]
    assert check_contrast(ct_like().array, (0, 0, 0, 31, 31, 5)) == []


def test_refine_checks_the_contrast_of_its_clicked_slices_as_segment_does_its_box(tmp_path):
    """Before the model loads; and the volume as segment checks it (values beyond float32)."""
    volume = ct_like()
    volume.array[2] = 0
    write_volume(volume, str(tmp_path / "ct.nii.gz"))
    done = run_cli("refine", "--volume", str(tmp_path / "ct.nii.gz"), "--points", "5,5,1,+1", "9,9,2,-1",
                   "--output", str(tmp_path / "m.nii.gz"), *UNLOADABLE[:-1])
    one_line_error(done, f"every voxel inside the clicked axial slice 2 of {tmp_path / 'ct.nii.gz'} is 0",
                   "nothing to segment; check that the click is on the right volume")
    write_volume(Volume(ct_like().array * 1e300, (0.7, 0.7, 3.0)), str(tmp_path / "huge.nrrd"))
    done = run_cli("refine", "--volume", str(tmp_path / "huge.nrrd"), "--points", "5,5,1,+1",
                   "--output", str(tmp_path / "m.nii.gz"), *UNLOADABLE[:-1])
    one_line_error(done, "beyond 3.4e+38", "rescale")
    assert sorted(os.listdir(tmp_path)) == ["ct.nii.gz", "huge.nrrd"]


def test_a_sheared_grid_and_values_beyond_float32_are_refused(tmp_path):
    """NIfTI cannot store a sheared grid: the mask would be written rotated off the volume."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(ct_like().array)
    image.SetDirection((1, 0.5, 0, 0, 1, 0, 0, 0, 1))
    sitk.WriteImage(image, str(tmp_path / "sheared.nrrd"))
    one_line_error(segment(tmp_path / "sheared.nrrd", tmp_path / "m.nii.gz"), "non-orthogonal direction matrix")
    write_volume(Volume(ct_like().array * 1e300, (0.7, 0.7, 3.0)), str(tmp_path / "huge.nrrd"))
    one_line_error(segment(tmp_path / "huge.nrrd", tmp_path / "m.nii.gz"), "beyond 3.4e+38", "rescale")
    write_volume(ct_like(), str(tmp_path / "ct.nii.gz"))
    done = run_cli("refine", "--volume", str(tmp_path / "ct.nii.gz"), "--points", "5,5,2,+1", "--mask",
                   str(tmp_path / "absent.nii.gz"), "--output", str(tmp_path / "m.nii.gz"), *UNLOADABLE[:-1])
    one_line_error(done, "mask file not found")
    assert sorted(os.listdir(tmp_path)) == ["ct.nii.gz", "huge.nrrd", "sheared.nrrd"]


# --- datasets and checkpoints -----------------------------------------------------------------


def test_a_corrupt_dataset_json_is_named(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "dataset.json").write_text('{"name": "x", "training": [')
    with pytest.raises(ValueError, match=r"d/dataset.json is not valid JSON .*restore it"):
        ds.read_dataset(root)
    image = tmp_path / "i.nii.gz"
    write_volume(ct_like(), str(image))
    done = run_cli("export", "--volumes", str(image), "--labels", str(image), "--output", str(root))
    one_line_error(done, str(root / "dataset.json"), "is not valid JSON")


def test_a_one_case_dataset_warns_that_training_needs_more(tmp_path):
    image = tmp_path / "i.nii.gz"
    label = tmp_path / "l.nii.gz"
    write_volume(ct_like(), str(image))
    write_volume(Volume((ct_like().array > 300).astype(np.uint8), (0.7, 0.7, 3.0)), str(label))
    done = run_cli("export", "--volumes", str(image), "--labels", str(label), "--output", str(tmp_path / "d"))
    assert done.returncode == 0, done.stderr
    assert "warning: the dataset has 1 case(s) and none held out for validation" in done.stdout
    assert "export at least one more case" in done.stdout
    summary = json.loads((tmp_path / "d" / "dataset.json").read_text())
    assert len(summary["training"]) == 1 and summary["validation"] == []


def test_a_checkpoint_holding_objects_is_refused_without_torch_advice(tmp_path):
    torch = pytest.importorskip("torch")
    from SAMFineTuneLib.models.checkpoints import read_state_dict

    import argparse

    path = tmp_path / "pickled.pth"  # training scripts often save their arguments beside the weights
    torch.save({"model": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=0.1)}, str(path))
    with pytest.raises(ValueError) as caught:
        read_state_dict(str(path))
    text = str(caught.value)
    assert str(path) in text and "holds Python objects besides tensors (argparse.Namespace)" in text
    assert "state_dict()" in text
    assert "weights_only" not in text and "\n" not in text
    cut = tmp_path / "cut.pth"
    torch.save({"w": torch.zeros(1000)}, str(cut))
    cut.write_bytes(cut.read_bytes()[:200])
    with pytest.raises(ValueError, match="may be incomplete"):
        read_state_dict(str(cut))
