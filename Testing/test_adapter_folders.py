"""An adapter folder is replaced as a whole, readers never mix two writes, and one run at a time
writes a folder (adapter_folders.py, adapters.read_adapter); no model weights needed."""
import os
import signal
import threading

import pytest

from SAMFineTuneLib import adapters
from SAMFineTuneLib.adapter_folders import FolderLock, check_output_folder, replace_folder, settle, sibling, swap_in

posix_only = pytest.mark.skipif(os.name != "posix", reason="kills a forked writer")


@pytest.fixture(scope="module")
def lora_decoder():
    from SAMFineTuneLib.models import build_mask_decoder

    return adapters.wrap_decoder(build_mask_decoder(), adapters.lora_config(2, 4.0, 0.0, ("q_proj",)))


def write_version(folder, decoder, version, lock=None):
    """The adapter of write ``version``: every LoRA tensor and the card carry the number."""
    for tensor in decoder.parameters():
        if tensor.requires_grad:
            tensor.data.fill_(float(version))
    card = {"format": adapters.CARD_FORMAT, "version": version, "base_model": {"fingerprint": "test"}}
    replace_folder(folder, lambda staging: adapters.save_adapter(staging, decoder, card), lock)


def read_version(folder):
    card, tensors = adapters.read_adapter(folder)
    values = {float(t.flatten()[0]) for t in tensors.values()}
    assert values == {float(card["version"])}, "tensors of one write with the card of another"
    return card["version"]


@posix_only
@pytest.mark.parametrize("kill_after", [0, 1, 2])
def test_a_writer_killed_between_the_swaps_steps_leaves_the_old_or_the_new_adapter(tmp_path, lora_decoder, kill_after):
    """kill_after: the number of folder renames done when the writer is killed (0: staging
    written, 1: the old folder moved aside, 2: the new folder in place, the old not yet deleted)."""
    folder = str(tmp_path / "adapter")
    write_version(folder, lora_decoder, 1)
    pid = os.fork()
    if pid == 0:  # the writer, killed with SIGKILL mid-swap
        try:
            real, renames = os.replace, [0]

            def replace(source, target):
                directory = os.path.isdir(source)
                if directory and renames[0] == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
                real(source, target)
                renames[0] += directory
                if renames[0] == kill_after == 2:
                    os.kill(os.getpid(), signal.SIGKILL)

            os.replace = replace
            write_version(folder, lora_decoder, 2, FolderLock(folder).acquire())
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert os.path.isdir(folder) == (kill_after != 1)  # only between the renames is the name empty
    assert read_version(folder) == (1 if kill_after == 0 else 2)  # the reader settles the folder first
    with FolderLock(folder) as lock:  # the killed writer's lock died with it
        write_version(folder, lora_decoder, 3, lock)
    assert read_version(folder) == 3
    assert not any(os.path.exists(sibling(folder, kind)) for kind in ("new", "old"))


def test_readers_never_mix_two_writes(tmp_path, lora_decoder):
    folder = str(tmp_path / "adapter")
    write_version(folder, lora_decoder, 1)
    done = threading.Event()

    def writer():
        with FolderLock(folder) as lock:
            for version in range(2, 40):
                write_version(folder, lora_decoder, version, lock)
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    seen = []
    while not done.is_set():
        seen.append(read_version(folder))
    thread.join()
    assert seen == sorted(seen) and read_version(folder) == 39


def test_one_writer_per_folder_and_the_error_names_it(tmp_path):
    folder = str(tmp_path / "adapter")
    with FolderLock(folder):
        with pytest.raises(ValueError, match=f"being written by another run \\(training by process {os.getpid()} "):
            FolderLock(folder).acquire(wait_s=0.1)
        with pytest.raises(RuntimeError, match="needs the lock"):
            replace_folder(folder, lambda staging: None, FolderLock(folder))
    FolderLock(folder).acquire().release()  # free again once released


def test_output_folders_holding_other_files_are_refused(tmp_path):
    check_output_folder(str(tmp_path / "missing"), adapters.ADAPTER_FILES)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / adapters.CARD_FILE).write_text("{}")
    (tmp_path / "adapter" / ".DS_Store").write_text("a file browser's")  # not the user's work
    check_output_folder(str(tmp_path / "adapter"), adapters.ADAPTER_FILES)
    (tmp_path / "adapter" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files that are not an adapter's \(notes.txt\)"):
        check_output_folder(str(tmp_path / "adapter"), adapters.ADAPTER_FILES)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_output_folder(str(tmp_path / "file"), adapters.ADAPTER_FILES)


def test_settle_leaves_a_missing_folder_missing_when_nothing_was_written(tmp_path):
    settle(str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()
    with pytest.raises(ValueError, match="not a SAMFineTune adapter"):
        adapters.read_model_card(str(tmp_path / "never"))


def test_a_damaged_tensor_file_is_a_clear_error(tmp_path, lora_decoder):
    folder = str(tmp_path / "adapter")
    write_version(folder, lora_decoder, 1)
    path = os.path.join(folder, adapters.ADAPTER_FILE)
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match=f"{path} is not a readable safetensors file .*train the adapter again"):
        adapters.read_adapter(folder)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links")
def test_a_symlinked_output_folder_is_replaced_at_its_target_run_after_run(tmp_path, lora_decoder):
    (tmp_path / "adapters" / "v3").mkdir(parents=True)
    link = tmp_path / "current"
    os.symlink(tmp_path / "adapters" / "v3", link)
    for version in (1, 2):  # the first run into the link, and the next one
        settle(str(link))
        check_output_folder(str(link), adapters.ADAPTER_FILES)
        with FolderLock(str(link)) as lock:
            write_version(str(link), lora_decoder, version, lock)
            write_version(str(link), lora_decoder, version, lock)  # a run rewrites its folder every epoch
        assert os.path.islink(link) and read_version(str(link)) == version
        assert sorted(os.listdir(tmp_path)) == ["adapters", "current"]
        assert os.listdir(tmp_path / "adapters") == ["v3"]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links")
def test_a_link_left_beside_the_folder_is_unlinked_and_its_target_kept(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    os.symlink(tmp_path / "mine", sibling(str(tmp_path / "adapter"), "new"))
    with FolderLock(str(tmp_path / "adapter")) as lock:
        replace_folder(str(tmp_path / "adapter"), lambda staging: None, lock)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert sorted(os.listdir(tmp_path)) == ["adapter", "mine"]


def test_reading_a_mistyped_adapter_path_creates_nothing(tmp_path):
    typo = tmp_path / "no such" / "dir" / "my adapter"
    with pytest.raises(ValueError, match="not a SAMFineTune adapter"):
        adapters.read_model_card(str(typo))
    with pytest.raises(ValueError, match="not a SAMFineTune adapter"):
        adapters.read_adapter(str(typo), attempts=1)
    settle(str(tmp_path / "never"))
    assert os.listdir(tmp_path) == []


def test_a_released_lock_leaves_no_file_and_no_folder_it_made(tmp_path):
    folder = str(tmp_path / "typo" / "adapters" / "new")
    first = FolderLock(folder).acquire()
    second = FolderLock(folder)
    assert not second.try_acquire()
    first.release()
    assert os.listdir(tmp_path) == []  # a run that failed before writing leaves nothing
    assert second.try_acquire()  # the lock is free again, on a new file
    assert not FolderLock(folder).try_acquire()
    os.makedirs(folder)  # the run wrote its folder: the folders stay
    second.release()
    assert os.listdir(tmp_path / "typo" / "adapters") == ["new"]


def test_a_damaged_model_card_is_a_clear_error(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    card = folder / adapters.CARD_FILE
    for text in ('{"format": "samfinetune-lora-de', "[1, 2]", "\udcff"):
        card.write_bytes(text.encode("utf-8", "surrogateescape"))
        with pytest.raises(ValueError, match=f"{card} is not a (readable )?model card .*train the adapter again or "
                                             "choose another adapter$"):
            adapters.read_model_card(str(folder))


def test_a_replaced_adapter_folder_keeps_its_mode(tmp_path, lora_decoder):
    folder = str(tmp_path / "adapter")
    write_version(folder, lora_decoder, 1)
    os.chmod(folder, 0o2770)  # shared with the lab's group
    write_version(folder, lora_decoder, 2)
    assert os.stat(folder).st_mode & 0o7777 == 0o2770 and read_version(folder) == 2


def test_a_candidate_is_swapped_in_whole_and_an_unfinished_one_is_refused(tmp_path, lora_decoder):
    adapter, candidate = str(tmp_path / "liver"), sibling(str(tmp_path / "liver"), "candidate")
    write_version(adapter, lora_decoder, 1)
    os.makedirs(candidate)
    open(os.path.join(candidate, "adapter_model.safetensors"), "wb").write(b"half written")
    with pytest.raises(ValueError, match="no complete adapter"):
        swap_in(adapter, candidate)
    assert adapters.read_adapter(adapter)[0]["version"] == 1
    write_version(candidate, lora_decoder, 2)
    swap_in(adapter, candidate)
    card, state = adapters.read_adapter(adapter)
    assert card["version"] == 2 and all(float(t.flatten()[0]) == 2.0 for t in state.values())
    assert sorted(os.listdir(tmp_path)) == ["liver"]  # no candidate, lock or staging folder left
