"""Nothing lost: a write that does not land completely (full disk, file-size limit, read-only
folder) is an error naming the file, and what was there before stays as it was; two exports
never write one dataset at once. SimpleITK does not raise on a short write, so these run the
real writers in subprocesses under a file-size limit (``RLIMIT_FSIZE``) or on a tiny tmpfs."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from SAMFineTuneLib import dataset as ds
from SAMFineTuneLib import files, folder_locks
from SAMFineTuneLib.phantom import bounding_box, make_ct_phantom
from SAMFineTuneLib.volume_io import Volume, read_volume, write_volume

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, PYTHONPATH=ROOT, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")

resource = pytest.importorskip("resource")  # POSIX


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def limited(args, limit_bytes: int):
    """Run ``args`` with files capped at ``limit_bytes`` (writes beyond fail with EFBIG)."""
    def cap():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(args, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600, preexec_fn=cap)


def on_tiny_tmpfs(tmp_path, script: str, size: str = "256k", readonly: bool = False):
    """Run a Python script with a fresh tmpfs of ``size`` mounted at tmp_path/mnt (read-only if
    asked), in a user and mount namespace; skips where the machine does not allow one."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    options = f"size={size}" + (",ro" if readonly else "")
    if shutil.which("unshare") is None:
        pytest.skip("no unshare here")
    mount_and_run = f'mount -t tmpfs -o {options} tmpfs "$0" && exec "$1" -c "$2"'
    done = subprocess.run(["unshare", "-r", "-m", "sh", "-c", mount_and_run, str(mount), sys.executable, script],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    if done.returncode != 0 and ("unshare:" in done.stderr or "mount:" in done.stderr):
        pytest.skip(f"no private tmpfs here: {done.stderr.strip()}")
    return done, mount


def noise_volume(seed: int, shape=(48, 64, 64)) -> Volume:
    """Random float voxels: they do not compress, so the file is well over the limits below."""
    return Volume(np.random.default_rng(seed).normal(size=shape).astype(np.float32), (0.8, 0.8, 2.0))


# --- short writes ------------------------------------------------------------------------------


def test_a_cut_write_is_an_error_and_keeps_the_previous_file(tmp_path):
    target, png = tmp_path / "mask.nii.gz", tmp_path / "slice.png"
    write_volume(noise_volume(0, (4, 16, 16)), str(target))
    png.write_bytes(b"an earlier slice")
    before = digest(target)
    code = f"""
        import numpy as np
        from SAMFineTuneLib.dataset import slice_formats
        from SAMFineTuneLib.volume_io import Volume, write_volume
        noise = np.random.default_rng(1).normal(size=(48, 64, 64)).astype(np.float32)
        for write in (lambda: write_volume(Volume(noise), {str(target)!r}),
                      lambda: slice_formats._write_png_atomic((noise[0] * 80).astype(np.uint8), {str(png)!r})):
            try:
                write()
            except Exception as error:
                print(type(error).__name__ + ":", error)
    """
    done = limited([sys.executable, "-c", textwrap.dedent(code)], 3_000)
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"WriteError: could not write {target}: the file came out "
                                                   "incomplete"), done
    assert lines[1].startswith(f"WriteError: could not write {png}: File too large"), done
    assert all("file-size limit" in line for line in lines)
    assert digest(target) == before and png.read_bytes() == b"an earlier slice"
    assert sorted(os.listdir(tmp_path)) == ["mask.nii.gz", "slice.png"]  # no temp file left either


def test_export_under_a_file_size_limit_fails_and_keeps_the_dataset(tmp_path):
    root = tmp_path / "d"
    ds.export_dataset([make_case(s) for s in range(2)], root, val_fraction=0.5)
    index = (root / "dataset.json").read_bytes()
    paths = []
    for n in range(2):
        label = Volume(np.ones((48, 64, 64), np.uint8), (0.8, 0.8, 2.0))
        for kind, volume in (("img", noise_volume(n)), ("lab", label)):
            paths.append(str(tmp_path / f"{kind}{n}.nii.gz"))
            write_volume(volume, paths[-1])
    done = limited([sys.executable, "-m", "SAMFineTuneLib", "export", "--volumes", *paths[0::2],
                    "--labels", *paths[1::2], "--output", str(root), "--case-ids", "big0", "big1"], 100_000)
    assert done.returncode == 1 and "added" not in done.stdout, done
    last = done.stderr.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith(f"error: could not write {root}/imagesTr/big0") and "file-size limit" in last
    assert "Traceback" not in done.stderr
    assert (root / "dataset.json").read_bytes() == index
    info = ds.read_dataset(root)
    assert [c.case for c in info.cases] == ["case00", "case01"]
    for entry in info.cases:
        read_volume(entry.image), read_volume(entry.label)


@pytest.mark.slow
def test_segment_under_a_file_size_limit_fails_and_keeps_the_previous_mask(tmp_path):
    ct, label = make_ct_phantom((4, 48, 48))
    volume, output = str(tmp_path / "ct.nii.gz"), tmp_path / "mask.nii.gz"
    write_volume(ct, volume)
    write_volume(label, str(output))  # the previous good mask
    before = digest(output)
    box = bounding_box(label.array, (2, 2, 0))
    done = limited([sys.executable, "-m", "SAMFineTuneLib", "segment", "--volume", volume, "--box", *map(str, box),
                    "--output", str(output), "--device", "cpu", "--quiet"], 100)  # an empty mask takes 130
    assert done.returncode == 1 and done.stdout == "", done
    assert f"error: could not write {output}" in done.stderr and "Traceback" not in done.stderr
    assert digest(output) == before


def test_export_onto_a_full_disk_fails_and_keeps_the_dataset(tmp_path):
    script = textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {TESTS!r})
        from test_writes import make_case, noise_volume
        from SAMFineTuneLib import dataset as ds
        root = os.path.join({str(tmp_path / "mnt")!r}, "d")
        ds.export_dataset([make_case(0), make_case(1)], root, val_fraction=0.5)
        index = open(os.path.join(root, "dataset.json"), "rb").read()
        big = [("big%d" % n, noise_volume(n), make_case(n, shape=(48, 64, 64), spacing=(0.8, 0.8, 2.0))[2])
               for n in range(2)]
        try:
            ds.export_dataset(big, root)
            outcome = "exported"
        except Exception as error:
            outcome = type(error).__name__ + ": " + str(error)
        unchanged = open(os.path.join(root, "dataset.json"), "rb").read() == index
        print(json.dumps({{"outcome": outcome, "unchanged": unchanged,
                          "cases": [c.case for c in ds.read_dataset(root).cases]}}))
    """)
    done, _ = on_tiny_tmpfs(tmp_path, script)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["outcome"].startswith("WriteError: could not write"), report
    assert "the disk is full" in report["outcome"], report
    assert report["unchanged"] and report["cases"] == ["case00", "case01"]


# --- refused before any work -----------------------------------------------------------------


def test_outputs_that_cannot_be_written_are_refused_before_the_model_loads(tmp_path):
    ct, label = make_ct_phantom((4, 32, 32))
    volume = str(tmp_path / "ct.nii.gz")
    write_volume(ct, volume)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder").mkdir()
    # a checkpoint that does not exist: had the model loaded first, that would be the error
    model = ["--model", "medsam", "--checkpoint", str(tmp_path / "absent.pth"), "--quiet"]
    for output, expected in ((tmp_path / "a_file" / "m.nii.gz", "is a file, not a folder"),
                             (tmp_path / "a_folder", "is a folder; give a file name")):
        done = subprocess.run([sys.executable, "-m", "SAMFineTuneLib", "segment", "--volume", volume, "--box",
                               "1", "1", "0", "9", "9", "1", "--output", str(output), *model], capture_output=True,
                              text=True, env=ENV, cwd=ROOT, timeout=600)
        assert done.returncode == 2 and expected in done.stderr and "Traceback" not in done.stderr, done.stderr
    done = subprocess.run([sys.executable, "-m", "SAMFineTuneLib", "export", "--volumes", volume, "--labels", volume,
                           "--output", str(tmp_path / "a_file")], capture_output=True, text=True, env=ENV, cwd=ROOT,
                          timeout=600)
    assert done.returncode == 2 and "is a file; choose a folder" in done.stderr and "Traceback" not in done.stderr


def test_a_read_only_folder_is_refused_before_the_model_loads(tmp_path):
    ct, _ = make_ct_phantom((4, 32, 32))
    volume = str(tmp_path / "ct.nii.gz")
    write_volume(ct, volume)
    script = textwrap.dedent(f"""
        import subprocess, sys
        for args in (["segment", "--volume", {volume!r}, "--box", "1", "1", "0", "9", "9", "1", "--output",
                      {str(tmp_path / "mnt" / "m.nii.gz")!r}, "--model", "medsam", "--checkpoint", "/absent.pth"],
                     ["export", "--volumes", {volume!r}, "--labels", {volume!r},
                      "--output", {str(tmp_path / "mnt")!r}]):
            done = subprocess.run([sys.executable, "-m", "SAMFineTuneLib", *args], capture_output=True, text=True)
            print(done.returncode, done.stderr.strip().replace(chr(10), " | "))
    """)
    done, _ = on_tiny_tmpfs(tmp_path, script, readonly=True)
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2, done
    for line in lines:
        assert line.startswith("1 error: cannot write") and "Read-only file system" in line, line
        assert "Traceback" not in line and "|" not in line  # one line


# --- one writer per folder -----------------------------------------------------------------


def make_case(seed, shape=(4, 20, 24), spacing=(0.8, 0.9, 2.5)):
    rng = np.random.default_rng(seed)
    image = rng.normal(40, 30, shape).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    label[1:3, 5:12, 6:14] = 1
    return f"case{seed:02d}", Volume(image, spacing), Volume(label, spacing)


def test_two_exports_never_write_one_folder_at_once(tmp_path):
    root = tmp_path / "d"
    ds.export_dataset([make_case(s) for s in range(2)], root)
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {TESTS!r})
        from test_writes import make_case
        from SAMFineTuneLib.dataset import export_dataset
        def slow(done, total, message):
            print(done, flush=True)
            time.sleep(0.5)
        export_dataset([make_case(s) for s in range(20, 30)], {str(root)!r}, progress=slow)
    """)
    other = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert other.stdout.readline().strip() == "0"  # the other export is writing
        with pytest.raises(folder_locks.FolderBusy,
                           match=rf"being written by another process \(export by process {other.pid} on "):
            ds.export_dataset([make_case(30)], root)
        other.send_signal(signal.SIGKILL)  # it dies holding the lock
    finally:
        other.wait(timeout=60)
        other.stdout.close()
    assert os.path.exists(root / folder_locks.LOCK_FILE)
    ds.export_dataset([make_case(30)], root)  # the dead process's lock ended with it
    assert [c.case for c in ds.read_dataset(root).cases] == ["case00", "case01", "case30"]
    assert not os.path.exists(root / folder_locks.LOCK_FILE)


def test_a_released_lock_is_deleted_and_a_lock_file_nobody_holds_is_no_lock(tmp_path):
    path = tmp_path / folder_locks.LOCK_FILE
    with folder_locks.folder_lock(str(tmp_path), "export"):
        assert path.exists()
        with pytest.raises(folder_locks.FolderBusy, match=rf"\(export by process {os.getpid()} on .*wait for it"):
            with folder_locks.folder_lock(str(tmp_path), "another export", wait_s=0.1):
                pass
    assert not path.exists()
    path.write_text("export by process 1 on elsewhere, since 2026-01-01 00:00:00\n")  # left by a crash
    with folder_locks.folder_lock(str(tmp_path), "export"):
        assert path.read_text().startswith(f"export by process {os.getpid()} ")
    assert not path.exists()


def test_a_folder_the_lock_cannot_be_made_in_is_one_line_saying_so(tmp_path):
    blocked = tmp_path / "a file" / "dataset"  # a file stands where a folder on the way belongs
    (tmp_path / "a file").write_text("not a folder")
    with pytest.raises(files.WriteError, match=f"cannot write in {blocked}: .*choose a folder you can write to"):
        with folder_locks.folder_lock(str(blocked), "export"):
            pass
    assert (tmp_path / "a file").read_text() == "not a folder"


# --- modes and writers' own errors -------------------------------------------------------------


def test_written_files_follow_the_umask_and_keep_a_replaced_files_mode(tmp_path):
    mode = lambda path: os.stat(path).st_mode & 0o777
    previous = os.umask(0o002)  # a lab that shares its datasets with the group
    try:
        files.write_text_atomic(str(tmp_path / "new.json"), "{}")
        files.atomic_folder(str(tmp_path / "model"), lambda temp: None)
    finally:
        os.umask(previous)
    assert mode(tmp_path / "new.json") == 0o664 and mode(tmp_path / "model") == 0o775
    (tmp_path / "shared.json").write_text("{}")
    os.chmod(tmp_path / "shared.json", 0o640)
    files.write_json_atomic(str(tmp_path / "shared.json"), {"a": 1})
    assert mode(tmp_path / "shared.json") == 0o640 and json.loads((tmp_path / "shared.json").read_text()) == {"a": 1}


class SafetensorError(Exception):
    """safetensors' own error type, a plain Exception under that name."""


def test_a_writers_io_error_is_a_one_line_write_error_but_a_cancel_or_a_bug_passes_through(tmp_path):
    from SAMFineTuneLib.progress import Cancelled

    target = tmp_path / "state.pt"
    target.write_bytes(b"the previous state")
    for error in (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 832 vs 726\nframe #0"),
                  SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")):
        def write(temp, error=error):
            open(temp, "wb").write(b"half")
            raise error

        with pytest.raises(files.WriteError) as caught:
            files.atomic_write(str(target), write)
        message = str(caught.value)
        assert message.startswith(f"could not write {target}: the file came out incomplete (") and "\n" not in message
        assert str(error).splitlines()[0] in message
    for error in (Cancelled("cancelled by the user"), KeyboardInterrupt(), KeyError("a bug in the writer")):
        with pytest.raises(type(error)):
            files.atomic_write(str(target), lambda temp, error=error: (_ for _ in ()).throw(error))
    assert target.read_bytes() == b"the previous state" and os.listdir(tmp_path) == ["state.pt"]


def test_torch_and_safetensors_under_a_file_size_limit_give_write_errors(tmp_path):
    code = f"""
        import torch
        from safetensors.torch import save_file
        from SAMFineTuneLib.files import atomic_write
        tensors = {{"w": torch.zeros(200_000)}}
        for name, write in (("state.pt", lambda temp: torch.save(tensors, temp)),
                            ("adapter.safetensors", lambda temp: save_file(tensors, temp))):
            try:
                atomic_write({str(tmp_path)!r} + "/" + name, write)
            except Exception as error:
                print(type(error).__name__ + ":", str(error).replace(chr(10), " | "))
    """
    done = limited([sys.executable, "-c", textwrap.dedent(code)], 100_000)
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2, done
    for line, name in zip(lines, ("state.pt", "adapter.safetensors")):
        assert line.startswith(f"WriteError: could not write {tmp_path}/{name}: "), line
        assert "file-size limit" in line and "|" not in line, line
    assert os.listdir(tmp_path) == []


def test_a_rename_refused_for_a_moment_is_tried_again_and_one_refused_for_good_leaves_the_target(tmp_path,
                                                                                                monkeypatch):
    """Windows refuses a rename while a virus scanner or another process has either file open."""
    target = tmp_path / "dataset.json"
    target.write_text("old")
    real, refusals = os.replace, []

    def refused(times):
        def rename(source, destination):
            if len(refusals) < times:
                refusals.append(destination)
                raise PermissionError(13, "The process cannot access the file because it is being used")
            real(source, destination)
        return rename

    monkeypatch.setattr(files, "REPLACE_RETRIES", (0.0, 0.0))
    monkeypatch.setattr(os, "replace", refused(2))
    files.write_text_atomic(str(target), "new")
    assert target.read_text() == "new" and len(refusals) == 2
    refusals.clear()
    monkeypatch.setattr(os, "replace", refused(3))
    with pytest.raises(files.WriteError, match="dataset.json"):
        files.write_text_atomic(str(target), "newer")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["dataset.json"]
    held = PermissionError(13, "The process cannot access the file because it is being used by another process")
    held.winerror = 32  # what Windows adds to the refusal
    said = str(files.write_error(str(target), held))
    assert "another program has the file open: close it there" in said and "\n" not in said
