"""An adapter folder is replaced as a whole, readers never mix two writes, and one run at a time
writes a folder (training/folders.py, adapters.read_adapter); no model weights needed."""
import os
import signal
import threading

import pytest

from SAMFineTuneLib import adapters
from SAMFineTuneLib.training.folders import FolderLock, check_output_folder, replace_folder, settle, sibling

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
