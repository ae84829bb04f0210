"""One process at a time writes a dataset folder: a lock file inside it records its holder (pid,
host, purpose, time), so the next writer's error names who holds it, and a lock its holder left
by dying is taken over (``process_alive``, the record's host and age).

Standard library only, so the Slicer side can import it before torch is installed.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from typing import Iterator, Optional

from .files import WriteError

LOCK_FILE = ".samfinetune.lock"
#: A lock file whose record is still unreadable after this long was left by a process that died
#: between creating it and writing its record; a younger one belongs to a holder still writing it.
UNREADABLE_LOCK_STALE_S = 10.0


class FolderBusy(WriteError):
    """Another process holds the folder's lock."""

    def __init__(self, message: str):
        super().__init__(message, errno.EBUSY)


def process_alive(pid: int, started_before: Optional[float] = None) -> bool:
    """Whether process ``pid`` runs, and (with psutil, when ``started_before`` is given) is the same
    process that was there at that time rather than a later one that reused its number."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            created = psutil.Process(pid).create_time()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return False
        except psutil.AccessDenied:
            return True
        return started_before is None or created <= started_before + 1.0
    if os.name == "nt":
        return True  # cannot tell without psutil: assume the owner is alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def folder_lock(folder: str, purpose: str) -> Iterator[str]:
    """Hold ``folder``'s lock file while writing into it; another process that holds it makes this a
    ``FolderBusy`` error naming that process. A lock left by a process that died is taken over.
    Yields the lock file's path."""
    path = os.path.join(os.path.abspath(folder), LOCK_FILE)
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose, "time": time.time()})
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            holder = _lock_holder(path)
            if holder is None and _written_lately(path):
                raise FolderBusy(f"{folder} is being written by another process (it is taking the lock {path}); "
                                 f"wait for it to finish, or delete {path} if no process is writing there") from None
            if holder is not None and _holder_alive(holder):
                raise FolderBusy(_busy_message(folder, path, holder)) from None
            if holder != {}:  # {}: released meanwhile; else the holder died and its lock is stale
                _remove_stale_lock(path, holder)
            continue
        except OSError as exc:
            raise WriteError(f"cannot write in {folder}: {exc.strerror or exc}; choose a folder you can write to",
                             exc.errno or errno.EACCES) from None
        identity = _identity(os.fstat(fd))
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(record)
        break
    else:
        raise FolderBusy(f"could not take the lock {path}: other processes keep taking it; try again")
    try:
        yield path
    finally:
        _release_own_lock(path, identity, record)


def _identity(info: os.stat_result) -> tuple:
    return info.st_dev, info.st_ino


def _written_lately(path: str) -> bool:
    """Whether ``path`` was written less than ``UNREADABLE_LOCK_STALE_S`` ago (False once it is gone)."""
    try:
        return time.time() - os.stat(path).st_mtime < UNREADABLE_LOCK_STALE_S
    except OSError:
        return False


def _release_own_lock(path: str, identity: tuple, record: str) -> None:
    """Delete the lock file only while it is still this holder's (same file, same record): another
    process that took it over (judging this one dead) keeps its lock."""
    try:
        with open(path, encoding="utf-8") as handle:
            if _identity(os.fstat(handle.fileno())) != identity or handle.read() != record:
                return
        os.unlink(path)
    except OSError:
        pass


def _lock_holder(path: str) -> Optional[dict]:
    """The lock's record; None when it is unreadable (a holder that died while writing it)."""
    for _ in range(5):
        try:
            with open(path, encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return {}  # released meanwhile: try again
        except (OSError, ValueError):
            time.sleep(0.05)  # being written this very moment
    return None


def _remove_stale_lock(path: str, holder: Optional[dict]) -> None:
    """Move the stale lock aside and delete it, unless it turns out to be another process's fresh
    lock (taken between our look and the move): that one goes back."""
    aside = f"{path}.stale-{os.getpid()}"
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    if _lock_holder(aside) not in (holder, None):
        with contextlib.suppress(OSError):
            os.link(aside, path)  # never replaces a lock taken since
    with contextlib.suppress(OSError):
        os.unlink(aside)


def _holder_alive(holder: dict) -> bool:
    if not holder:
        return False
    if holder.get("host") != socket.gethostname():
        return True  # another machine (shared folder): cannot tell, so it holds the lock
    try:
        return process_alive(int(holder["pid"]), float(holder.get("time", 0.0)) or None)
    except (KeyError, TypeError, ValueError):
        return False


def _busy_message(folder: str, path: str, holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("time", 0.0))))
    return (f"{folder} is being written by another process (pid {holder.get('pid')} on {holder.get('host')}, "
            f"{holder.get('purpose', 'a write')} since {since}); wait for it to finish, or delete {path} if "
            "that process is gone")
