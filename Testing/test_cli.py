"""The command line: end to end on a small phantom in a real subprocess; its refusals of bad input,
which come before any model loads, through ``cli.main`` in this process."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from SAMFineTuneLib.phantom import bounding_box, make_ct_phantom
from SAMFineTuneLib.volume_io import Volume, read_volume, write_volume

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "SAMFineTuneLib", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    angle = np.deg2rad(20)
    direction = (np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, 1)
    ct, label = make_ct_phantom(shape_kji=(8, 64, 64), spacing_xyz=(1.7, 1.7, 5.0), direction=direction, seed=1)
    path = str(folder / "ct.nii.gz")
    write_volume(ct, path)
    return path, label


@pytest.mark.slow
def test_segment_writes_a_mask_with_the_volume_geometry(small_ct, tmp_path):
    path, label = small_ct
    box = bounding_box(label.array, (3, 3, 0))
    out = str(tmp_path / "mask.nii.gz")
    done = run_cli("segment", "--volume", path, "--box", *map(str, box), "--output", out, "--device", "cpu")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["voxels"] > 0 and "encoding slice" in done.stderr  # progress bar on stderr
    assert summary["box_mode"] == "crossed"  # what the default ran for the base model
    mask, source = read_volume(out), read_volume(path)
    assert mask.array.shape == source.array.shape
    np.testing.assert_allclose(mask.spacing, source.spacing)
    np.testing.assert_allclose(mask.origin, source.origin, atol=1e-5)
    np.testing.assert_allclose(mask.direction, source.direction, atol=1e-6)
    overlap = 2 * np.logical_and(mask.array, label.array).sum() / (mask.array.sum() + label.array.sum())
    assert overlap > 0.85


def test_bad_input_is_a_clear_error_and_writes_nothing(small_ct, tmp_path):
    path, _ = small_ct
    out = tmp_path / "never.nii.gz"
    done = run_cli("segment", "--volume", path, "--box", "0", "0", "0", "10", "10", "40", "--output", str(out),
                   "--device", "cpu", "--quiet")
    assert done.returncode == 2 and "box is outside the volume along k: 0..40, valid 0..7" in done.stderr
    assert not out.exists() and "Traceback" not in done.stderr
    done = run_cli("segment", "--volume", str(tmp_path / "missing.nii.gz"), "--box", *["0"] * 6,
                   "--output", str(out))
    assert done.returncode == 2 and "volume file not found" in done.stderr


def test_help_explains_every_option():
    done = run_cli("segment", "--help")
    assert done.returncode == 0
    for option in ("--volume", "--box", "--output", "--model", "--checkpoint", "--axis", "--window", "--device",
                   "--box-mode", "lung", "tracked", "--decode-window", "--compile", "--precision", "bf16"):
        assert option in done.stdout


def test_decode_window_takes_auto_full_or_a_token_count(small_ct, tmp_path):
    from SAMFineTuneLib.cli_args import window_margin_arg

    assert window_margin_arg("auto") == "auto" and window_margin_arg("full") is None and window_margin_arg("3") == 3
    path, _ = small_ct
    done = run_cli("segment", "--volume", path, "--box", *["0"] * 6, "--output", str(tmp_path / "m.nii.gz"),
                   "--decode-window", "wide")
    assert done.returncode == 2 and "expected auto, full or a whole number of tokens, got 'wide'" in done.stderr


def test_precision_choices_are_checked(small_ct, tmp_path):
    path, _ = small_ct
    done = run_cli("segment", "--volume", path, "--box", *["0"] * 6, "--output", str(tmp_path / "m.nii.gz"),
                   "--precision", "half")
    assert done.returncode == 2 and "invalid choice: 'half'" in done.stderr


@pytest.mark.slow
def test_refine_clicks_a_slice_and_propagates_it(small_ct, tmp_path):
    """A positive click on the organ of an empty mask, then --propagate: the organ comes out on the
    clicked slice and beyond it, in the volume's geometry."""
    path, label = small_ct
    k = int(np.argmax(label.array.sum(axis=(1, 2))))
    js, is_ = np.nonzero(label.array[k])
    click = f"{int(np.median(is_))},{int(np.median(js))},{k},+1"
    out = str(tmp_path / "fixed.nii.gz")
    ks, js, is_ = np.nonzero(label.array)
    roi = [is_.min() - 2, js.min() - 2, max(0, ks.min() - 1), is_.max() + 2, js.max() + 2, ks.max()]
    done = run_cli("refine", "--volume", path, "--points", click, "--output", out, "--device", "cpu", "--propagate",
                   "--roi", *[str(int(v)) for v in roi])
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["corrected"] == [k] and summary["propagated"] and k not in summary["propagated"]
    assert roi[2] <= min(summary["propagated"]) and max(summary["propagated"]) <= roi[5]
    mask = read_volume(out).array
    assert not mask[:, :, :roi[0]].any() and not mask[:, :roi[1]].any()
    overlap = 2 * np.logical_and(mask[k], label.array[k]).sum() / (mask[k].sum() + label.array[k].sum())
    assert overlap > 0.5 and mask[summary["propagated"]].any()


def test_refine_checks_its_clicks_before_the_model_loads(small_ct, tmp_path, capsys):
    path, _ = small_ct
    out = tmp_path / "never.nii.gz"
    done = cli_in_process(capsys, "refine", "--volume", path, "--points", "5,5,30,+1", "--output", str(out),
                          "--model", "nope")
    assert done.returncode == 2 and "invalid choice: 'nope'" in done.stderr
    done = cli_in_process(capsys, "refine", "--volume", path, "--points", "5,5,30,+1", "--output", str(out))
    assert done.returncode == 2 and "the click (5, 5, 30) lies outside the volume's (64, 64, 8) voxels" in done.stderr
    done = cli_in_process(capsys, "refine", "--volume", path, "--points", "5,5,3", "--output", str(out))
    assert done.returncode == 2 and "a click is I,J,K,+1 or I,J,K,-1" in done.stderr
    roi = ["10", "10", "2", "40", "40", "5"]
    done = cli_in_process(capsys, "refine", "--volume", path, "--points", "20,20,3,+1", "--output", str(out),
                          "--roi", *roi[:5], "9")
    assert done.returncode == 2 and "box is outside the volume along k: 2..9, valid 0..7" in done.stderr
    done = cli_in_process(capsys, "refine", "--volume", path, "--points", "20,20,7,+1", "--output", str(out),
                          "--propagate", "--roi", *roi)
    assert done.returncode == 2 and "propagation from slice 7 between slices 2 and 5 inside the ROI" in done.stderr
    ct = read_volume(path)  # a mask of the same shape on another grid would be taken voxel for voxel
    moved = tuple(value + 3.0 for value in ct.origin)
    for shifted, what in ((Volume(np.zeros(ct.array.shape, np.uint8), ct.spacing, moved, ct.direction), "origin"),
                          (Volume(np.zeros((4, 64, 64), np.uint8), ct.spacing, ct.origin, ct.direction), "shape")):
        write_volume(shifted, str(tmp_path / "mask.nii.gz"))
        done = cli_in_process(capsys, "refine", "--volume", path, "--mask", str(tmp_path / "mask.nii.gz"),
                              "--points", "20,20,3,+1", "--output", str(out), *UNLOADABLE)
        one_line(done, f"the mask {tmp_path / 'mask.nii.gz'} {what}", "does not match the volume's")
    assert not out.exists()


def test_a_click_or_a_box_off_the_volume_is_refused_before_torch_is_imported(small_ct, tmp_path):
    """Importing torch and the engine takes seconds: a mistyped click or box is told at once."""
    path, _ = small_ct
    code = ("import sys\nfrom SAMFineTuneLib.cli import main\ntry:\n    code = main(sys.argv[1:])\nfinally:\n"
            "    print('torch imported:', 'torch' in sys.modules, file=sys.stderr)\nsys.exit(code)")
    for command, error in ((["refine", "--points", "5,5,30,+1"], "the click (5, 5, 30) lies outside"),
                           (["segment", "--box", "0", "0", "0", "10", "10", "40"], "box is outside the volume")):
        done = subprocess.run([sys.executable, "-c", code, *command, "--volume", path, "--output",
                               str(tmp_path / "m.nii.gz")], capture_output=True, text=True, cwd=ROOT, timeout=120,
                              env=dict(os.environ, PYTHONPATH=ROOT))
        assert done.returncode == 2 and error in done.stderr, done.stderr
        assert done.stderr.strip().splitlines()[-1] == "torch imported: False"
    assert os.listdir(tmp_path) == []


# A model that cannot load here: an error about the input proves it was checked before the model.
UNLOADABLE = ["--model", "medsam", "--checkpoint", "/absent/medsam.pth"]


def one_line(done, *words):
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_a_mistyped_option_is_one_line_pointing_at_help(small_ct, tmp_path, capsys):
    path, _ = small_ct
    done = cli_in_process(capsys, "segment", "--volume", path, "--box", "0", "0", "0", "5", "5", "--output",
                          str(tmp_path / "m.nrrd"))
    one_line(done, "argument --box: expected 6 arguments", "segment --help")
    done = cli_in_process(capsys, "train", "--dataset", str(tmp_path), "--output", str(tmp_path / "a"), "--window",
                          "soft")
    one_line(done, "argument --window: unknown window 'soft'")


def test_the_output_is_checked_before_the_model_loads(small_ct, tmp_path, capsys):
    path, _ = small_ct
    before = open(path, "rb").read()
    for command in (["segment", "--box", *["2"] * 3, *["6"] * 3, "--quiet"], ["refine", "--points", "5,5,2,+1"]):
        done = cli_in_process(capsys, *command, "--volume", path, "--output", path, *UNLOADABLE)
        one_line(done, "is the input", "give another output name")
        done = cli_in_process(capsys, *command, "--volume", path, "--output", str(tmp_path / "mask.png"), *UNLOADABLE)
        one_line(done, "end its name with .nii.gz")
        done = cli_in_process(capsys, *command, "--volume", path, "--output", str(tmp_path / "m.nii.gz"), "--adapter",
                              path, *UNLOADABLE)
        one_line(done, "is a file; give the adapter folder")
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == []


def cli_in_process(capsys, *args):
    """``python -m SAMFineTuneLib`` run in this process: the return code and what it printed."""
    from SAMFineTuneLib.cli import main

    try:
        code = main(list(args))
    except SystemExit as exit:
        code = exit.code
    printed = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, printed.out, printed.err)


def test_a_value_starting_with_a_minus_goes_to_its_option(capsys, tmp_path):
    """``--window -400/40`` was taken for an unknown option ('expected one argument'); any option's
    value may start with '-', while a missing value and a mistyped option stay errors."""
    from SAMFineTuneLib.cli import build_parser

    segment = ["segment", "--volume", str(tmp_path / "ct.nii.gz"), "--box", *["0"] * 6,
               "--output", str(tmp_path / "m.nii.gz")]
    for window in (["--window", "-400/40"], ["--window=-400/40"]):
        one_line(cli_in_process(capsys, *segment, *window),
                 "argument --window: window width must be positive, got -400 in '-400/40'")
    one_line(cli_in_process(capsys, "demo", "--epochs", "-1e3"), "argument --epochs: expected a whole number >= 1, "
                                                                 "got '-1e3'")
    refine = ["refine", "--volume", "ct.nii.gz", "--output", "m.nii.gz", "--points", "5,5,2,+1", "-4,5,6,-1",
              "--window", "1500/-600", "--roi", "-1", "0", "0", "9", "9", "9"]
    args = build_parser(refine).parse_args(refine)
    assert args.points == [(5, 5, 2, True), (-4, 5, 6, False)] and args.window == "1500/-600"
    assert args.roi == [-1, 0, 0, 9, 9, 9]
    one_line(cli_in_process(capsys, *segment, "--window", "--quiet"), "argument --window: expected one argument")
    one_line(cli_in_process(capsys, *segment, "--wndow", "-400/40"), "unrecognized arguments: --wndow -400/40")
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links")
def test_an_output_is_refused_only_where_writing_it_would_overwrite_the_input(capsys, tmp_path):
    """A write replaces the name it is given (``files.atomic_write`` renames onto it): a link or a
    hard link to the input is replaced, the input kept; the input's own name, or a link the input
    goes through, would change what the input reads."""
    from SAMFineTuneLib.volume_io import check_volume_output

    ct = tmp_path / "ct.nii.gz"
    write_volume(Volume(np.arange(4 * 8 * 8, dtype=np.int16).reshape(4, 8, 8)), str(ct))
    before = ct.read_bytes()
    os.symlink("ct.nii.gz", tmp_path / "link.nii.gz")
    os.symlink("link.nii.gz", tmp_path / "link2.nii.gz")
    os.link(ct, tmp_path / "hard.nii.gz")
    (tmp_path / "elsewhere.nii.gz").write_bytes(b"another file")
    os.symlink("elsewhere.nii.gz", tmp_path / "other.nii.gz")
    for given, output, how in (("ct", "ct", ":"), ("link", "ct", ", through a link:"),
                               ("link2", "link", ", through a link:"), ("link2", "link2", ":")):
        done = cli_in_process(capsys, "segment", "--box", *["2"] * 3, *["6"] * 3, "--quiet", "--volume",
                              str(tmp_path / f"{given}.nii.gz"), "--output", str(tmp_path / f"{output}.nii.gz"),
                              *UNLOADABLE)
        one_line(done, f"the output mask {tmp_path / output}.nii.gz is the input {tmp_path / given}.nii.gz{how} "
                       "writing it would overwrite the input; give another output name")
    mask = Volume(np.ones((4, 8, 8), np.uint8))
    for output in ("link", "hard", "other"):
        path = tmp_path / f"{output}.nii.gz"
        assert check_volume_output(str(path), "the output mask", inputs=[str(ct)]) == str(path)
        write_volume(mask, str(path))
        assert not path.is_symlink() and read_volume(str(path)).array.all()
    assert ct.read_bytes() == before and (tmp_path / "elsewhere.nii.gz").read_bytes() == b"another file"


def test_the_server_and_the_demo_refuse_numbers_and_paths_that_cannot_work(tmp_path):
    """Before any socket, model or case: a port outside 0-65535 was a traceback from bind(); the
    demo's epochs and cases were refused after seconds of encoding, and a file as its output folder
    with an errno."""
    for port in ("-5", "99999", "x"):
        one_line(run_cli("serve", "--port", port), "argument --port: expected a whole number from 0 to 65535")
    for option in ("--epochs", "--train-cases"):
        one_line(run_cli("demo", option, "0", "--output", str(tmp_path / "demo")), f"argument {option}", ">= 1")
    (tmp_path / "a file").write_text("mine")
    one_line(run_cli("demo", "--output", str(tmp_path / "a file")), "is a file; give a folder")
    assert sorted(os.listdir(tmp_path)) == ["a file"] and (tmp_path / "a file").read_text() == "mine"
