"""What would break on Windows, checked on any platform: text files opened with their encoding
(Windows' default is the ANSI code page), torchrun's backend without NCCL, a worker's process
tree killed without psutil, and case ids that Windows' (and macOS') file names cannot tell apart."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from SAMFineTuneLib import dataset as ds
from SAMFineTuneLib.client import connections
from SAMFineTuneLib.volume_io import Volume

ROOT = Path(__file__).resolve().parents[1]
# (function name, index of its mode argument) for the calls that open a file, as the code calls them
OPENERS = {"open": 1, "fdopen": 1, "open_private_log": 1, "NamedTemporaryFile": 0, "TemporaryFile": 0}


def _text_opens_without_encoding(source: str):
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
        keywords = {keyword.arg: keyword.value for keyword in node.keywords}
        if name in ("read_text", "write_text") and "encoding" not in keywords:
            yield node.lineno
        if name not in OPENERS or "encoding" in keywords or None in keywords:
            continue
        if isinstance(node.func, ast.Attribute) and node.func.attr == "open":
            if getattr(node.func.value, "id", None) == "os":
                continue  # os.open: a descriptor, no text layer
        index = OPENERS[name]
        mode = keywords.get("mode", node.args[index] if len(node.args) > index else None)
        if mode is None or not (isinstance(mode, ast.Constant) and "b" in str(mode.value)):
            yield node.lineno


def test_every_file_opened_as_text_names_its_encoding():
    """open() without encoding= reads and writes the ANSI code page on Windows (cp1252, ...), not UTF-8."""
    found = [f"{path.relative_to(ROOT).as_posix()}:{line}"
             for folder in ("SAMFineTuneLib", "SAMFineTune") for path in sorted((ROOT / folder).rglob("*.py"))
             for line in _text_opens_without_encoding(path.read_text(encoding="utf-8"))]
    assert not found, f"text-mode opens without encoding=: {found}"


def test_the_encoding_check_finds_what_it_looks_for():
    source = "open(p)\nopen(p, 'w')\nopen(p, 'rb')\nopen(p, encoding='utf-8')\nos.fdopen(fd, 'a')\nP.read_text()\n"
    assert list(_text_opens_without_encoding(source)) == [1, 2, 5, 6]


def test_torchrun_takes_gloo_where_torch_has_no_nccl(monkeypatch):
    torch = pytest.importorskip("torch")
    import torch.distributed as dist

    from SAMFineTuneLib.training import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)  # torch's Windows builds
    assert distributed.backend() == "gloo"
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    assert distributed.backend() == "nccl"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.backend() == "gloo"


def test_without_psutil_windows_kills_the_launchers_whole_tree(monkeypatch):
    """Inside Slicer the worker's pid is PythonSlicer.exe, a launcher: killing it alone leaves its Python."""
    calls, killed = [], []
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil -> ImportError
    monkeypatch.setattr(connections.os, "name", "nt")
    monkeypatch.setattr(connections.subprocess, "run", lambda args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.setattr(connections.os, "kill", lambda pid, sig: killed.append(pid))
    connections.kill_process_tree(4321)
    assert [args for args, _ in calls] == [["taskkill", "/F", "/T", "/PID", "4321"]] and not killed
    assert calls[0][1]["creationflags"] == getattr(subprocess, "CREATE_NO_WINDOW", 0)

    def missing(args, **kwargs):
        raise FileNotFoundError(args[0])

    monkeypatch.setattr(connections.subprocess, "run", missing)
    connections.kill_process_tree(4321)
    assert killed == [4321]


def test_without_psutil_elsewhere_the_process_is_killed_as_before(monkeypatch):
    killed = []
    monkeypatch.setitem(sys.modules, "psutil", None)
    monkeypatch.setattr(connections.os, "name", "posix")
    monkeypatch.setattr(connections.os, "kill", lambda pid, sig: killed.append(pid))
    connections.kill_process_tree(4321)
    assert killed == [4321]


def _case(name, seed):
    import numpy as np

    image = np.random.default_rng(seed).normal(40, 30, (3, 16, 16)).astype(np.int16)
    label = np.zeros(image.shape, np.uint8)
    label[1, 4:9, 5:11] = 1
    spacing, origin, direction = (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)
    return name, Volume(image, spacing, origin, direction), Volume(label, spacing, origin, direction)


def test_case_ids_differing_only_in_case_are_refused(tmp_path):
    """On Windows and macOS imagesTr/ct_0000.nii.gz is CT_0000.nii.gz: the second case would overwrite the first."""
    root = tmp_path / "set"
    with pytest.raises(ValueError, match="differ only in upper and lower case"):
        ds.export_dataset([_case("CT", 0), _case("ct", 1)], root)
    assert not os.path.exists(root / "dataset.json")
    ds.export_dataset([_case("CT", 0)], root, val_fraction=0.0)
    with pytest.raises(ValueError, match="'ct' and case 'CT' differ only"):
        ds.export_dataset([_case("ct", 1)], root, val_fraction=0.0)
    assert [case.case for case in ds.read_dataset(root).cases] == ["CT"]


def test_a_slice_index_cannot_name_a_file_outside_its_dataset_with_backslashes(tmp_path):
    """Windows reads "slices/..\\x" as a path out of slices/: such an entry (a dataset from elsewhere,
    edited) deletes nothing. Here '\\' is a plain character, so the files sit inside slices/."""
    import json

    from SAMFineTuneLib.dataset import slice_formats

    (tmp_path / "slices").mkdir()
    kept = [tmp_path / "slices" / "..\\dataset.json", tmp_path / "slices" / "a\\..\\..\\b.png"]
    for path in kept:
        path.write_text("keep", encoding="utf-8")
    (tmp_path / "slices" / "own.png").write_text("png", encoding="utf-8")
    entries = [{"image": "slices/..\\dataset.json", "mask": "slices/a\\..\\..\\b.png"}, {"image": "slices/own.png"}]
    (tmp_path / "slices" / "c1.json").write_text(json.dumps({"slices": entries}), encoding="utf-8")
    slice_formats.remove_slice_index(str(tmp_path), "c1")
    assert all(path.exists() for path in kept)
    assert not (tmp_path / "slices" / "own.png").exists() and not (tmp_path / "slices" / "c1.json").exists()


def test_a_path_the_code_page_cannot_spell_does_not_end_a_finished_command(monkeypatch):
    """Windows writes redirected stdout in the ANSI code page, strictly: print("...\\u0416...") would raise."""
    import io

    from SAMFineTuneLib import cli

    out = io.TextIOWrapper(io.BytesIO(), encoding="cp1252")
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(cli.os, "name", "posix")
    cli.printable_output()
    assert out.errors == "strict"  # elsewhere left as it is
    monkeypatch.setattr(cli.os, "name", "nt")
    cli.printable_output()
    print("adapter written to C:\\\u0416\\adapter")
    out.flush()
    assert out.buffer.getvalue().rstrip() == b"adapter written to C:\\\\u0416\\adapter"
