"""An adapter folder replaced as a whole, and one training at a time per folder.

A run rewrites its output folder after every epoch (best adapter, model card, resume state).
Files replaced one by one would let a reader (the Segmenter loading the adapter, the panel
reading the card) see one epoch's tensors with another epoch's card, so a run writes a complete
sibling folder and swaps it in (``replace_folder``):

1. fill ``.NAME.new`` beside the folder NAME (each file atomically, the model card last);
2. rename NAME to ``.NAME.old``;
3. rename ``.NAME.new`` to NAME;
4. delete ``.NAME.old``.

A writer killed between steps 2 and 3 leaves no NAME but two complete folders beside it:
``settle``, run by readers and by the next writer, moves the new one into place (else the old
one), so a reader sees the old adapter or the new one, never a mix. A lock file beside the folder
(``.NAME.lock``, a ``folder_locks.FileLock``: an OS file lock that ends with its process, so a
crash leaves nothing stale) stops two trainings writing one folder at once; the loser's error
names the holder.

A NAME that is a symbolic link (``current`` -> ``adapters/v3``) is swapped at its target: the
link stays a link, and the steps above never rename the link itself.

Torch-free: readers, and the Slicer side (its adapter list, keep learning), import it before any
model loads.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from typing import Callable, Iterable, Optional

from .files import BROWSER_FILES, WriteError, keep_mode, replace_path, write_error
from .folder_locks import FileLock

#: Written last into every complete adapter folder (``adapters.CARD_FILE``).
COMPLETE_MARK = "model_card.json"


def resolved(folder: str) -> str:
    """``folder`` with symbolic links followed: the folder the swap replaces (renaming a link
    would move the link aside and leave the user's folder behind a hidden name)."""
    return os.path.realpath(os.path.abspath(folder))


def sibling(folder: str, kind: str) -> str:
    """``.NAME.<kind>`` beside ``folder`` (links followed): "new", "old", "lock", or keep learning's
    "candidate"."""
    folder = resolved(folder)
    return os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}.{kind}")


def holds_adapter(folder: str) -> bool:
    """Whether ``folder`` holds a complete adapter (its model card is written last)."""
    return os.path.isfile(os.path.join(folder, COMPLETE_MARK))


def _remove(folder: str) -> None:
    if os.path.islink(folder):  # a link's target is not ours to delete
        os.unlink(folder)
    elif os.path.isdir(folder):
        shutil.rmtree(folder)


class FolderLock(FileLock):
    """The lock of one output folder (``.NAME.lock`` beside it). ``acquire`` raises a ValueError
    naming the process that holds it; the lock ends with ``release`` or with the process."""

    def __init__(self, folder: str, purpose: str = "training"):
        self.folder = os.path.abspath(folder)
        super().__init__(sibling(self.folder, "lock"), purpose)

    def acquire(self, wait_s: float = 2.0) -> "FolderLock":
        """Take the lock, waiting up to ``wait_s`` (a reader settling the folder holds it briefly)."""
        def busy(holder: str) -> ValueError:
            return ValueError(f"adapter folder {self.folder} is being written by another run ({holder}); "
                              "wait for it to finish, cancel it, or train into another folder")

        super().acquire(wait_s, busy)
        return self

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_output_folder(folder: str, allowed: Iterable[str]) -> None:
    """A ValueError unless ``folder`` is missing, empty, or holds only an adapter's ``allowed``
    files: the swap replaces the whole folder, which must never take a user's other files."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"output {folder} is a file; give a folder for the adapter")
    if not os.path.isdir(folder):
        return
    foreign = sorted(set(os.listdir(folder)) - set(allowed) - BROWSER_FILES)
    if foreign:
        raise ValueError(f"output folder {folder} holds files that are not an adapter's ({', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}); train into an empty folder or an adapter folder")


def settle(folder: str, wait_s: float = 2.0) -> None:
    """Finish a swap that a killed writer left half done: with no ``folder`` but a complete
    ``.new`` (else ``.old``) beside it, move that one into place. A live writer (holding the
    lock) is mid-swap: wait up to ``wait_s`` for its folder to appear instead. With neither
    beside it there is nothing to finish, and nothing is created (readers call this with paths
    that may be mistyped)."""
    folder = resolved(folder)
    if os.path.isdir(folder) or not any(os.path.lexists(sibling(folder, kind)) for kind in ("new", "old")):
        return
    lock = FolderLock(folder, "settling an interrupted write")
    deadline = time.monotonic() + wait_s
    while not _try_acquire_quietly(lock):
        if os.path.isdir(folder) or time.monotonic() >= deadline:
            return
        time.sleep(0.02)
    try:
        _settle_locked(folder)
    finally:
        lock.release()


def _try_acquire_quietly(lock: FolderLock) -> bool:
    """``lock.try_acquire()``, False where the lock file cannot be created (a read-only library):
    the reader then reads what is there."""
    try:
        return lock.try_acquire()
    except OSError:
        return False


def _settle_locked(folder: str) -> None:
    if os.path.isdir(folder):
        return
    for candidate in (sibling(folder, "new"), sibling(folder, "old")):
        if holds_adapter(candidate):
            replace_path(candidate, folder)
            return


def replace_folder(folder: str, fill: Callable[[str], None], lock: Optional[FolderLock] = None) -> None:
    """``fill(staging)`` writes the folder's new contents (the model card last), then the staging
    folder replaces ``folder`` (steps in the module docstring). The caller holds ``lock``. A step
    that fails (a full disk) leaves ``folder`` as it was, removes the staging folder and is a
    ``files.WriteError`` of one line saying what to do."""
    if lock is not None and lock.handle is None:
        raise RuntimeError(f"replace_folder needs the lock of {folder} held")
    folder = resolved(folder)
    new, old = sibling(folder, "new"), sibling(folder, "old")
    _settle_locked(folder)
    _remove(new)
    _remove(old)
    try:
        os.makedirs(new)
        fill(new)
        _swap(folder, new, old)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            _remove(new)
        if isinstance(exc, OSError) and not isinstance(exc, (WriteError, FileNotFoundError)):
            raise write_error(folder, exc) from None
        raise
    with contextlib.suppress(OSError):  # the new folder is in place; a later writer or settle removes the rest
        _remove(old)


def _swap(folder: str, new: str, old: str) -> None:
    """Steps 2 and 3: ``folder`` aside to ``old``, ``new`` into place; put back when the second fails."""
    if os.path.isdir(folder):
        keep_mode(new, folder)
        replace_path(folder, old)
    try:
        replace_path(new, folder)
    except OSError:
        if os.path.isdir(old) and not os.path.lexists(folder):
            replace_path(old, folder)
        raise


def swap_in(folder: str, complete: str) -> None:
    """Put the complete adapter folder ``complete`` (a candidate trained beside the adapter in
    use) where ``folder`` is, under ``folder``'s lock and by ``replace_folder``'s steps, then remove
    ``complete``: a training into ``folder`` at the same time is refused (ValueError naming it), and
    a crash leaves the old adapter or the new one. The files are copied, not renamed, so a
    ``folder`` that links to another disk is swapped all the same."""
    if not holds_adapter(complete):
        raise ValueError(f"{complete} holds no complete adapter ({COMPLETE_MARK} missing); train it again")
    with FolderLock(folder, "replacing the adapter") as lock:
        replace_folder(folder, lambda staging: _copy_adapter(complete, staging), lock)
    _remove(complete)


def _copy_adapter(source: str, target: str) -> None:
    """The files of the adapter folder ``source`` into ``target``, its model card last."""
    for name in sorted(os.listdir(source), key=lambda name: name == COMPLETE_MARK):
        path = os.path.join(source, name)
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(target, name))
        else:
            shutil.copy2(path, os.path.join(target, name))
