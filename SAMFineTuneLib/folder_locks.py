"""One writer at a time per folder: an exclusive OS lock on a lock file (``FileLock``). The OS
ends the lock with its holder's process, so a writer that crashed or was killed leaves nothing
stale to take over; the file names its holder (purpose, process, host, time), so the next
writer's error says who is writing. A dataset keeps its lock inside its folder (``folder_lock``);
an adapter folder, which is replaced whole, beside it (``adapter_folders.FolderLock``).

Standard library only, so the Slicer side can import it before torch is installed.
"""
from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
from typing import Callable, Iterator, List

from .files import WriteError, missing_folders, remove_if_empty

LOCK_FILE = ".samfinetune.lock"


class FolderBusy(WriteError):
    """Another process holds the folder's lock."""

    def __init__(self, message: str):
        super().__init__(message, errno.EBUSY)


class FileLock:
    """The lock file ``path`` (created with the folders it needs), held by ``acquire`` until
    ``release`` or the end of the process."""

    def __init__(self, path: str, purpose: str):
        self.path = os.path.abspath(path)
        self.purpose = purpose
        self.handle = None
        self.created: List[str] = []  # folders made for the lock file, removed with it if still empty

    def try_acquire(self) -> bool:
        """Take the lock if it is free; a ``files.WriteError`` where the lock file cannot be made."""
        folder = os.path.dirname(self.path)
        created = missing_folders(folder)
        try:
            os.makedirs(folder, exist_ok=True)
            handle = open(self.path, "a+", encoding="utf-8")
        except FileNotFoundError:  # a holder releasing the lock removed the folder just made: look again
            return False
        except OSError as exc:
            raise WriteError(f"cannot write in {folder}: {exc.strerror or exc}; choose a folder you can write to",
                             exc.errno or errno.EACCES) from None
        if not _lock_file(handle) or not _same_file(handle, self.path):
            handle.close()  # held, or a file its holder deleted on release (the lock lives on a new one)
            return False
        self.created = created
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

    def acquire(self, wait_s: float, busy: Callable[[str], Exception]) -> "FileLock":
        """Take the lock, waiting up to ``wait_s`` (a holder may be about to release it); then
        ``busy(holder)`` is raised."""
        deadline = time.monotonic() + wait_s
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                raise busy(self.holder())
            time.sleep(0.05)
        return self

    def release(self) -> None:
        """Unlock and delete the lock file (and the folders made for it, if nothing else went
        there): a writer leaves nothing. Waiting processes check that the file they lock is still
        the one at the path, so deleting it cannot hand the lock to two."""
        if self.handle is None:
            return
        mine = _same_file(self.handle, self.path)
        if mine and os.name != "nt":  # POSIX: delete while holding; Windows cannot delete an open file
            _unlink(self.path)
        _unlock_file(self.handle)
        self.handle.close()
        self.handle = None
        if mine and os.name == "nt":
            _unlink(self.path)
        remove_if_empty(self.created)
        self.created = []


@contextlib.contextmanager
def folder_lock(folder: str, purpose: str, wait_s: float = 0.5) -> Iterator[str]:
    """Hold ``folder``'s lock file (``LOCK_FILE`` inside it) while writing into it; another process
    that holds it makes this a ``FolderBusy`` error naming that process. Yields the lock file's path."""
    def busy(holder: str) -> FolderBusy:
        return FolderBusy(f"{folder} is being written by another process ({holder}); wait for it to finish")

    lock = FileLock(os.path.join(os.path.abspath(folder), LOCK_FILE), purpose).acquire(wait_s, busy)
    try:
        yield lock.path
    finally:
        lock.release()


def _same_file(handle, path: str) -> bool:
    try:
        here, there = os.fstat(handle.fileno()), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


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
