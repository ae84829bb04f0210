"""Never loses work: a full disk (ENOSPC) at each write the engine makes into a user's folders, one
step at a time (a dataset export, an adapter folder's swap, training's output, the embedding cache),
leaves what the user had intact and loadable, nothing half-written that looks complete, no
temporary file, and one line that names the problem and what to do."""
import errno
import os
import shutil

import numpy as np
import pytest

from SAMFineTuneLib import adapters, files
from SAMFineTuneLib import dataset as ds
from SAMFineTuneLib.adapter_folders import FolderLock, holds_adapter, sibling, swap_in
from SAMFineTuneLib.dataset import export

from test_adapter_folders import lora_decoder, read_version, write_version  # noqa: F401 (a fixture)
from test_dataset import make_case, tree_digest

FULL = "No space left on device"


class FullDisk:
    """``os.replace`` (or any call it wraps) raising ENOSPC at its ``fail_at``-th call, from then on
    working again (what cleans up must still work); ``calls`` counts the calls (``fail_at`` None:
    count only)."""

    def __init__(self, real, fail_at=None, only=lambda *args: True):
        self.real, self.fail_at, self.only, self.calls = real, fail_at, only, 0

    def __call__(self, *args, **kwargs):
        if self.only(*args):
            self.calls += 1
            if self.calls == self.fail_at:
                raise OSError(errno.ENOSPC, FULL)
        return self.real(*args, **kwargs)


def one_clear_line(error):
    message = str(error)
    assert "\n" not in message and FULL in message and "the disk is full: free some space" in message, message


def leftovers(root):
    """Temporary or second names a write leaves beside its target."""
    return [os.path.join(d, f) for d, dirs, names in os.walk(root) for f in names + dirs
            if ".part" in f or f.endswith((".previous", ".new", ".old"))]


# --- dataset export ------------------------------------------------------------------------------------


def corrected(seed):
    case_id, image, label = make_case(seed)
    array = label.array.copy()
    array[0, 5:12, 6:14] = 1  # one more slice of the structure
    return case_id, image, label.with_array(array)


@pytest.fixture(scope="module")
def dataset_template(tmp_path_factory):
    root = tmp_path_factory.mktemp("template") / "d"
    ds.export_dataset([make_case(s) for s in range(3)], root, fmt="finetune-sam", val_fraction=0.34)
    return root


def export_more(root):
    """An append of a new case and a replaced one, its CSV files rewritten."""
    return ds.export_dataset([make_case(5), corrected(1)], root, replace=["case01"])


def test_a_full_disk_at_any_write_of_an_export_keeps_the_dataset_as_it_was(tmp_path, dataset_template,
                                                                            monkeypatch):
    probe = FullDisk(os.replace)
    shutil.copytree(dataset_template, tmp_path / "probe")
    monkeypatch.setattr(os, "replace", probe)
    export_more(tmp_path / "probe")
    monkeypatch.undo()
    assert probe.calls > 10  # images, labels, slice PNGs and indexes, CSVs, dataset.json
    for step in range(1, probe.calls + 1):
        root = tmp_path / f"d{step}"
        shutil.copytree(dataset_template, root)
        before = tree_digest(root)
        monkeypatch.setattr(os, "replace", FullDisk(os.replace, fail_at=step))
        with pytest.raises(files.WriteError) as caught:
            export_more(root)
        monkeypatch.undo()
        one_clear_line(caught.value)
        after = tree_digest(root)
        kept = {p: h for p, h in before.items() if not p.startswith("slices") and not p.endswith(".csv")}
        assert {p: after.get(p) for p in kept} == kept, f"step {step}: the previous cases or index changed"
        assert not any(p.startswith(("imagesTr/case05", "labelsTr/case05")) for p in after), step
        info = ds.read_dataset(root)  # names no case whose files are missing
        assert [c.case for c in info.cases] == ["case00", "case01", "case02"]
        np.testing.assert_array_equal(ds.load_case(info.case("case01"))[1].array, make_case(1)[2].array)
        assert leftovers(root) == [], step
    assert export_more(root)["added"] == ["case05"]  # and the same export, run again, goes through


def test_without_hard_links_a_replaced_case_is_copied_first_or_the_export_refused(tmp_path, dataset_template,
                                                                                 monkeypatch):
    """A file system without hard links (FAT, some network shares): the previous files of a case
    written again are copied aside; where that copy finds the disk full, nothing is written."""
    def no_links(*args):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    root = tmp_path / "d"
    shutil.copytree(dataset_template, root)
    before = tree_digest(root)
    monkeypatch.setattr(shutil, "copy2", FullDisk(shutil.copy2, fail_at=2))
    with pytest.raises(files.WriteError) as caught:
        export_more(root)
    one_clear_line(caught.value)
    assert tree_digest(root) == before and leftovers(root) == []
    monkeypatch.setattr(shutil, "copy2", shutil.copy2.real)
    monkeypatch.setattr(export, "write_json_atomic", FullDisk(files.write_json_atomic, fail_at=1))  # dataset.json
    with pytest.raises(OSError):
        export_more(root)  # the case written again, then dataset.json not: the previous files copied back
    np.testing.assert_array_equal(ds.load_case(ds.read_dataset(root).case("case01"))[1].array, make_case(1)[2].array)
    assert leftovers(root) == []


# --- adapter folders -------------------------------------------------------------------------------------


def test_a_full_disk_at_any_step_of_an_adapter_swap_keeps_the_previous_adapter(tmp_path, lora_decoder, monkeypatch):
    folder = str(tmp_path / "adapter")
    write_version(folder, lora_decoder, 1)
    probe = FullDisk(os.replace)
    monkeypatch.setattr(os, "replace", probe)
    write_version(folder, lora_decoder, 2)
    monkeypatch.undo()
    assert probe.calls == 5  # safetensors, config, card, the folder aside, the new one in place
    for step in range(1, probe.calls + 1):
        monkeypatch.setattr(os, "replace", FullDisk(os.replace, fail_at=step))
        with pytest.raises(files.WriteError) as caught:
            with FolderLock(folder) as lock:
                write_version(folder, lora_decoder, 10 + step, lock)
        monkeypatch.undo()
        one_clear_line(caught.value)
        assert read_version(folder) == 2, step
        assert sorted(os.listdir(tmp_path)) == ["adapter"], step  # no staging folder, no lock left
        assert leftovers(tmp_path) == []


def test_a_full_disk_while_swapping_in_a_candidate_keeps_both(tmp_path, lora_decoder, monkeypatch):
    folder, candidate = str(tmp_path / "adapter"), str(tmp_path / ".adapter.candidate")
    write_version(folder, lora_decoder, 1)
    write_version(candidate, lora_decoder, 2)
    monkeypatch.setattr(shutil, "copy2", FullDisk(shutil.copy2, fail_at=1))
    with pytest.raises(files.WriteError) as caught:
        swap_in(folder, candidate)
    one_clear_line(caught.value)
    assert str(caught.value).startswith(f"could not write {folder}: ")
    assert read_version(folder) == 1 and read_version(candidate) == 2
    assert not os.path.exists(sibling(folder, "new")) and leftovers(tmp_path) == []


def test_a_full_disk_at_a_training_checkpoint_keeps_the_last_epochs_folder(tmp_path, lora_decoder, monkeypatch):
    import torch

    from SAMFineTuneLib.training.state import RESUME_FILE, write_output

    folder = str(tmp_path / "adapter")
    write_version(folder, lora_decoder, 1)
    best = {"lora": adapters.lora_state(lora_decoder), "prompt": None}
    card = {"format": adapters.CARD_FORMAT, "version": 1, "base_model": {"fingerprint": "test"}}
    for fail in ("save", "replace"):
        real = torch.save if fail == "save" else os.replace
        monkeypatch.setattr(torch if fail == "save" else os, fail, FullDisk(real, fail_at=1))
        with pytest.raises(files.WriteError) as caught, FolderLock(folder) as lock:
            write_output(folder, lock, lora_decoder, None, best, dict(card, version=7), {"epoch": 7})
        monkeypatch.undo()
        one_clear_line(caught.value)
        assert read_version(folder) == 1 and holds_adapter(folder)
        assert not os.path.exists(os.path.join(folder, RESUME_FILE)) and leftovers(tmp_path) == []


# --- the embedding cache ---------------------------------------------------------------------------------


def test_a_full_disk_while_caching_an_embedding_keeps_the_cache(tmp_path, monkeypatch):
    import torch

    from SAMFineTuneLib.training.samples import read_embedding, write_embedding

    embedding = torch.ones(256, 64, 64)
    write_embedding(str(tmp_path), "first", embedding)
    monkeypatch.setattr(np, "save", FullDisk(np.save, fail_at=1))
    with pytest.raises(files.WriteError) as caught:
        write_embedding(str(tmp_path), "second", embedding * 2)
    one_clear_line(caught.value)
    assert os.listdir(tmp_path) == ["first.npy"] and read_embedding(str(tmp_path), "second") is None
    assert torch.equal(read_embedding(str(tmp_path), "first").float(), embedding)
