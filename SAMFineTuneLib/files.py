"""Atomic, checked file writes: a reader sees the old file or the new one,
never half of one, and a write that did not land completely is an error, not a success.

Every file the engine writes (volumes, datasets, adapters, embeddings, reports) goes through
``atomic_write``: it is written to a temporary name beside its target, flushed to the disk,
checked (its size, and whatever ``verify`` reads back: SimpleITK, for one, does not raise when
the disk fills), and only then renamed onto the target. A full disk, a file-size limit or a
cancel leaves what was there before. Folder locks: ``folder_locks`` (an OS lock on a file
naming its holder; a dataset's inside it, an adapter's beside it, ``adapter_folders``).

Standard library only, so the Slicer side can import it before torch is installed.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import tempfile
import time
from typing import Any, Callable, List, Optional

from .progress import Cancelled

#: What file browsers leave in any folder they show: never a user's work.
BROWSER_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})


class WriteError(OSError):
    """A file could not be written completely; its target was left as it was."""

    def __init__(self, message: str, code: int = errno.EIO):
        super().__init__(code, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def atomic_target(path: str) -> str:
    """A temp file beside ``path`` that keeps the final extension (writers pick format by suffix)."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    name = os.path.basename(path)
    suffix = ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]
    return _create_beside(folder, "." + name + ".", ".part" + suffix, _new_file)


def _new_file(path: str) -> None:
    # Mode 0o666 as open() asks: the kernel applies the umask (or the folder's default ACL) itself,
    # so the umask is never read (os.umask sets it too, process-wide, racing other threads).
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666))


def _create_beside(folder: str, prefix: str, suffix: str, create: Callable[[str], None]) -> str:
    """``create`` a new, unused name in ``folder``. tempfile's mkstemp/mkdtemp would make it
    private (0600/0700), and the rename would carry that onto files others must read."""
    for _ in range(100):
        path = os.path.join(folder, prefix + secrets.token_hex(4) + suffix)
        try:
            create(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary name", folder)


def keep_mode(temp: str, path: str) -> None:
    """Give ``temp`` (a file or folder) the mode of the one it replaces (a group-shared dataset
    stays shared); nothing there yet: the mode ``temp`` was created with stands."""
    if os.path.exists(path):
        shutil.copymode(path, temp)


def atomic_write(path: str, write: Callable[[str], Any], verify: Optional[Callable[[str], None]] = None) -> None:
    """``write(temp_path)``, flush it to the disk, ``verify(temp_path)`` (raise if the file is not
    what was meant: cut short, unreadable), then rename onto ``path``: readers see the old file or
    the new one. Any failure to write is a ``WriteError`` naming ``path``; the target is untouched."""
    path = os.fspath(path)
    try:
        temp = atomic_target(path)
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        write(temp)
        _flush_to_disk(temp)
        if verify is not None:
            verify(temp)
        keep_mode(temp, path)
        replace_path(temp, path)
    except BaseException as exc:
        error = None  # judged before the temp file goes, while a full disk is still full
        if _is_write_failure(exc):
            error = write_error(path, exc)
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if error is not None:
            # A writer's own exception (torch, safetensors) keeps its traceback as the cause.
            raise error from (None if isinstance(exc, (OSError, ValueError)) else exc)
        raise
    _sync_folder(os.path.dirname(os.path.abspath(path)))


#: Waits (s) before each further try of a rename that Windows refused: a virus scanner or search
#: indexer opens a file just written for a moment, and a file another process has open cannot be
#: renamed over there. Elsewhere a refused rename is final.
REPLACE_RETRIES = (0.05, 0.1, 0.2, 0.4, 0.8) if os.name == "nt" else ()
_HELD_OPEN = (32, 33)  # Windows' sharing and lock violations: another process has the file open


def replace_path(source: str, target: str) -> None:
    """``os.replace``, tried again after each of ``REPLACE_RETRIES`` while it is refused
    (PermissionError); the last refusal is raised."""
    for wait in REPLACE_RETRIES:
        try:
            os.replace(source, target)
            return
        except PermissionError:
            time.sleep(wait)
    os.replace(source, target)


def _is_write_failure(exc: BaseException) -> bool:
    """Whether ``exc`` from a writer means the file did not land. Writers report a full disk or a
    file-size limit in their own ways (torch: RuntimeError, safetensors: SafetensorError, a plain
    Exception named so); any other error is a bug and keeps its own type and traceback, as do a
    cancel, this module's own errors and a missing input (FileNotFoundError)."""
    if isinstance(exc, (WriteError, FileNotFoundError, Cancelled)):
        return False
    return isinstance(exc, (OSError, ValueError, RuntimeError)) or type(exc).__name__ == "SafetensorError"


def write_error(path: str, exc: BaseException) -> WriteError:
    """One line naming ``path``, what went wrong and what to do. A ValueError is a read-back that
    found the file short: the writer said nothing, so the likely causes are named here. Also for
    a write of several files (an adapter folder) that failed on one of them."""
    if isinstance(exc, OSError):
        reason, code = exc.strerror or str(exc), exc.errno or errno.EIO
    else:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        reason, code = f"the file came out incomplete ({first_line})", errno.EIO
    if code == errno.EIO:
        code = _likely_cause(os.path.dirname(os.path.abspath(path)))
    hint = {errno.ENOSPC: "the disk is full: free some space", errno.EFBIG: "the file is over this process's "
            "file-size limit (ulimit -f)", errno.EACCES: "choose a folder you can write to", errno.EROFS: "choose a "
            "folder you can write to", errno.EPERM: "choose a folder you can write to"}.get(code, "check the disk")
    if getattr(exc, "winerror", None) in _HELD_OPEN:
        hint = "another program has the file open: close it there (or wait for a virus scan to end) and try again"
    return WriteError(f"could not write {path}: {reason}; {hint} (any previous file there is unchanged)", code)


def _likely_cause(folder: str) -> int:
    """Why a writer that reports nothing may have written short: a full disk or a file-size limit."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            return errno.EFBIG
    except (ImportError, OSError, ValueError):
        pass
    try:
        disk = os.statvfs(folder)
        if disk.f_bavail * disk.f_frsize < (1 << 20):
            return errno.ENOSPC
    except (AttributeError, OSError):
        pass
    return errno.EIO


def _flush_to_disk(path: str) -> None:
    """fsync a file another library wrote and closed, so a crash after the rename cannot leave
    the new name on an empty file."""
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_folder(folder: str) -> None:
    """Make the rename itself durable (POSIX; Windows has no directory handles to sync)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a folder; the file itself is on disk
        pass
    finally:
        os.close(fd)


def atomic_folder(path: str, write: Callable[[str], Any]) -> None:
    """``write(temp_folder)`` then rename the folder onto ``path``: readers see no folder or a
    complete one (files that belong together, such as a model and its description). A folder
    already at ``path`` is kept: another process wrote it first (remove it to replace it)."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    temp = _create_beside(parent, "." + os.path.basename(path) + ".", ".part", lambda name: os.mkdir(name, 0o777))
    try:
        write(temp)
        try:
            os.rename(temp, path)
        except OSError:
            if not os.path.isdir(path):
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def remove_folder_whole(path: str) -> bool:
    """Remove the cache folder ``path`` as one step for everyone else: it is renamed aside to a
    hidden name first, so another process sees the whole folder or none (a read it cuts short is a
    miss), then deleted. False (and the folder left be) where the rename fails: another process
    removed it first, or a file in it is held open where that forbids renaming (Windows)."""
    parent, name = os.path.split(os.path.abspath(path))
    aside = os.path.join(parent, f".{name}.{secrets.token_hex(4)}.removing")
    try:
        os.rename(path, aside)
    except OSError:
        return False
    shutil.rmtree(aside, ignore_errors=True)  # what stays (a file held open) is hidden, left to the next sweep
    return True


#: Names Windows keeps for devices, also with an ending ("nul.txt", "COM1.nii.gz"): a file or folder
#: so named is the device, on any drive, so a dataset or adapter copied there would break.
WINDOWS_DEVICE_NAMES = frozenset({"CON", "PRN", "AUX", "NUL"} | {f"{kind}{n}" for kind in ("COM", "LPT")
                                                               for n in range(10)})


def windows_device_name(name: str) -> bool:
    """Whether Windows takes the file or folder name ``name`` for a device (``WINDOWS_DEVICE_NAMES``)."""
    return name.split(".")[0].strip().upper() in WINDOWS_DEVICE_NAMES


def mark_used(folder: str, marker: str) -> None:
    """Date a cache folder's use now (its ``marker`` file's modification time, which ``last_used``
    reads); a cache this process cannot write keeps the date of its last write."""
    try:
        os.utime(os.path.join(folder, marker))
    except OSError:
        pass


def last_used(folder: str, marker: str) -> float:
    """When a cache folder was last used: the later modification time of the folder (an entry
    added) and of its ``marker`` file (``mark_used``); 0 when neither can be read."""
    times = []
    for path in (folder, os.path.join(folder, marker)):
        try:
            times.append(os.stat(path, follow_symlinks=False).st_mtime)
        except OSError:
            pass
    return max(times, default=0.0)


def sweep_folders(root: str, stale: Callable[[str, str], bool]) -> List[str]:
    """Remove each folder directly under ``root`` (never a link) for which ``stale(name, path)``
    holds, as one step for everyone else (``remove_folder_whole``). Returns the names removed; a
    missing ``root`` holds none."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    removed = []
    for name in names:
        path = os.path.join(root, name)
        if not os.path.islink(path) and os.path.isdir(path) and stale(name, path) and remove_folder_whole(path):
            removed.append(name)
    return removed


def write_text_atomic(path: str, text: str) -> None:
    data = text.encode("utf-8")

    def write(temp: str) -> None:
        with open(temp, "wb") as handle:
            handle.write(data)

    def verify(temp: str) -> None:
        if os.path.getsize(temp) != len(data):
            raise ValueError(f"{os.path.getsize(temp)} of {len(data)} bytes landed")

    atomic_write(path, write, verify)


def write_json_atomic(path: str, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=False) + "\n")


def existing_path(path: Optional[str], what: str, folder: bool = False) -> Optional[str]:
    """``path`` made absolute if it names an existing file (or ``folder``); None for None or "";
    else a clear error naming ``what`` was not found."""
    if path in (None, ""):
        return None
    if not isinstance(path, str):
        raise ValueError(f"{what} must be a path string, got {type(path).__name__}")
    if not (os.path.isdir(path) if folder else os.path.isfile(path)):
        raise FileNotFoundError(f"{what} not found: {path}")
    return os.path.abspath(path)


def check_output_file(path: str, what: str) -> str:
    """``path`` made absolute once it is sure a file can be written there: its folder exists and
    takes new files, and ``path`` is not a folder. Checked before slow work, so a bad output is
    refused at once rather than after the computation."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a folder; give a file name")
    if not os.path.isdir(folder):
        kind = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        raise ValueError(f"the folder of {what} {path} {kind}; create it or choose another")
    check_writable_folder(folder, what)
    return path


def check_writable_folder(folder: str, what: str) -> None:
    """Create and remove a temporary file in ``folder``: the one test that answers for read-only
    mounts, ACLs and full quotas alike (permission bits do not)."""
    try:
        handle, probe = tempfile.mkstemp(prefix=".samft-probe-", dir=folder)
    except OSError as exc:
        raise WriteError(f"cannot write {what} in {folder}: {exc.strerror or exc}; choose a folder you can "
                         "write to", exc.errno or errno.EACCES) from None
    os.close(handle)
    os.unlink(probe)


def missing_folders(folder: str) -> List[str]:
    """The folders ``os.makedirs(folder)`` would create, outermost first: what a refused write
    removes again (``remove_if_empty``), so it leaves no trace."""
    missing = []
    while folder and not os.path.exists(folder):
        missing.insert(0, folder)
        parent = os.path.dirname(folder)
        folder = parent if parent != folder else ""
    return missing


def remove_if_empty(folders: List[str]) -> None:
    """Remove ``folders`` (``missing_folders``' list), innermost first, each only while empty."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            os.rmdir(folder)  # fails, as meant, once anything is in it

