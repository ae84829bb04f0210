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
(``.NAME.lock``, held with an OS file lock that ends with its process, so a crash leaves nothing
stale) stops two trainings writing one folder at once; the loser's error names the holder.

Torch-free: readers import it before any model loads.
"""
from __future__ import annotations

import os
import shutil
import socket
import time
from typing import Callable, Iterable, Optional

#: Written last into every complete adapter folder (``adapters.CARD_FILE``).
COMPLETE_MARK = "model_card.json"


def sibling(folder: str, kind: str) -> str:
    """``.NAME.<kind>`` beside ``folder``: "new", "old" or "lock"."""
    folder = os.path.abspath(folder)
    return os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}.{kind}")


def _complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, COMPLETE_MARK))


def _remove(folder: str) -> None:
    if os.path.isdir(folder):
        shutil.rmtree(folder)


class FolderLock:
    """The lock of one output folder (``.NAME.lock`` beside it). ``acquire`` raises a ValueError
    naming the process that holds it; the lock ends with ``release`` or with the process."""

    def __init__(self, folder: str, purpose: str = "training"):
        self.folder = os.path.abspath(folder)
        self.path = sibling(self.folder, "lock")
        self.purpose = purpose
        self.handle = None

    def try_acquire(self) -> bool:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        if not _lock_file(handle):
            handle.close()
            return False
        handle.seek(0)
        handle.truncate()
        handle.write(f"{self.purpose} by process {os.getpid()} on {socket.gethostname()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self.handle = handle
        return True

    def holder(self) -> str:
        try:
            with open(self.path, encoding="utf-8") as handle:
                return handle.read().strip() or "an unknown process"
        except OSError:
            return "an unknown process"

    def acquire(self, wait_s: float = 2.0) -> "FolderLock":
        """Take the lock, waiting up to ``wait_s`` (a reader settling the folder holds it briefly)."""
        deadline = time.monotonic() + wait_s
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                raise ValueError(f"adapter folder {self.folder} is being written by another run ({self.holder()}); "
                                 "wait for it to finish, cancel it, or train into another folder")
            time.sleep(0.05)
        return self

    def release(self) -> None:
        if self.handle is not None:
            _unlock_file(self.handle)
            self.handle.close()
            self.handle = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _lock_file(handle) -> bool:
    """A non-blocking exclusive OS lock on an open file: False when another holder has it."""
    try:
        if os.name == "nt":
            import msvcrt

            handle.seek(1 << 20)  # a byte past the holder's text, which others still read
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _unlock_file(handle) -> None:
    if os.name == "nt":
        import msvcrt

        handle.seek(1 << 20)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def check_output_folder(folder: str, allowed: Iterable[str]) -> None:
    """A ValueError unless ``folder`` is missing, empty, or holds only an adapter's ``allowed``
    files: the swap replaces the whole folder, which must never take a user's other files."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"output {folder} is a file; give a folder for the adapter")
    if not os.path.isdir(folder):
        return
    foreign = sorted(set(os.listdir(folder)) - set(allowed))
    if foreign:
        raise ValueError(f"output folder {folder} holds files that are not an adapter's ({', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}); train into an empty folder or an adapter folder")


def settle(folder: str, wait_s: float = 2.0) -> None:
    """Finish a swap that a killed writer left half done: with no ``folder`` but a complete
    ``.new`` (else ``.old``) beside it, move that one into place. A live writer (holding the
    lock) is mid-swap: wait up to ``wait_s`` for its folder to appear instead."""
    folder = os.path.abspath(folder)
    if os.path.isdir(folder):
        return
    lock = FolderLock(folder, "settling an interrupted write")
    deadline = time.monotonic() + wait_s
    while not lock.try_acquire():
        if os.path.isdir(folder) or time.monotonic() >= deadline:
            return
        time.sleep(0.02)
    try:
        _settle_locked(folder)
    finally:
        lock.release()


def _settle_locked(folder: str) -> None:
    if os.path.isdir(folder):
        return
    for candidate in (sibling(folder, "new"), sibling(folder, "old")):
        if _complete(candidate):
            os.replace(candidate, folder)
            return


def replace_folder(folder: str, fill: Callable[[str], None], lock: Optional[FolderLock] = None) -> None:
    """``fill(staging)`` writes the folder's new contents (the model card last), then the staging
    folder replaces ``folder`` (steps in the module docstring). The caller holds ``lock``."""
    if lock is not None and lock.handle is None:
        raise RuntimeError(f"replace_folder needs the lock of {folder} held")
    folder = os.path.abspath(folder)
    new, old = sibling(folder, "new"), sibling(folder, "old")
    _settle_locked(folder)
    _remove(new)
    _remove(old)
    os.makedirs(new)
    fill(new)
    if os.path.isdir(folder):
        os.replace(folder, old)
    os.replace(new, folder)
    _remove(old)
