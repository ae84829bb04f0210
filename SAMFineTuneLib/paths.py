"""Where the engine keeps files of its own: the user's cache folder (never the install folder),
the worker's log, the embeddings of the datasets it trains on, and the temporary job folders
that carry patient arrays between the client and the worker. Logs and job folders are private to
the user (0600 files, 0700 folders), as are the folders of those embeddings: a log can hold file
names and errors about patient data, a job folder holds the voxels, an embedding is made of them.

Standard library only, so the Slicer side can ask before torch is installed.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
from typing import List, Optional

# Job folders are named samft-<kind>-<owner pid>-<random>, so a later worker can tell whose they are.
JOB_FOLDER_KINDS = ("jobs", "worker")
_JOB_FOLDER = re.compile(r"^samft-(%s)-(\d+)-" % "|".join(JOB_FOLDER_KINDS))


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


def user_cache_dir() -> str:
    """SAMFineTune's folder in the user's cache (``$SAMFINETUNE_CACHE`` when set)."""
    if os.environ.get("SAMFINETUNE_CACHE"):
        return os.environ["SAMFINETUNE_CACHE"]
    if sys.platform.startswith("win"):
        base = os.environ.get("LOCALAPPDATA") or os.path.expanduser("~\\AppData\\Local")
    elif sys.platform == "darwin":
        base = os.path.expanduser("~/Library/Caches")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "SAMFineTune")


def dataset_cache_dir(dataset_root: str) -> str:
    """The user's embedding cache of a dataset: one per dataset, named by a hash of its real path,
    so two datasets never share entries and every path to one dataset (a link, a relative path)
    finds the same entries."""
    digest = hashlib.sha256(os.fsencode(os.path.realpath(dataset_root))).hexdigest()[:16]
    return os.path.join(user_cache_dir(), "embeddings", digest)


def default_log_path() -> str:
    """Where the worker writes its log (library output, warnings, tracebacks) unless told otherwise."""
    return os.path.join(user_cache_dir(), "logs", "worker.log")


def make_private_dir(folder: str) -> str:
    """Create ``folder`` (and missing parents) readable by the user only. An existing folder keeps
    its mode, except the default log folder, which is the engine's own."""
    folder = os.path.abspath(folder)
    missing = []
    probe = folder
    while not os.path.isdir(probe):
        missing.append(probe)
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    if folder == os.path.dirname(default_log_path()):
        _chmod_own(folder, 0o700)
    return folder


def open_private_log(path: str, mode: str = "a", **kwargs):
    """Open a log file for appending, created 0600 (and made 0600 if an earlier version left it
    readable by others), in a private folder."""
    make_private_dir(os.path.dirname(os.path.abspath(path)))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_BINARY", 0), 0o600)
    _chmod_own(path, 0o600, fd)
    return os.fdopen(fd, mode, **kwargs)


def _chmod_own(path: str, mode: int, fd=None) -> None:
    if os.name == "nt":  # Windows: a user's profile folders are private already; chmod sets read-only only
        return
    try:
        if os.stat(path).st_uid != os.getuid():
            return
        if fd is not None:
            os.fchmod(fd, mode)
        else:
            os.chmod(path, mode)
    except OSError:
        pass


def new_job_folder(kind: str) -> str:
    """A private temporary folder for one client's (``jobs``) or one worker's (``worker``) arrays,
    named after this process so that ``sweep_orphan_job_folders`` can tell when its owner died."""
    if kind not in JOB_FOLDER_KINDS:
        raise ValueError(f"unknown job folder kind {kind!r}; one of {JOB_FOLDER_KINDS}")
    return tempfile.mkdtemp(prefix=f"samft-{kind}-{os.getpid()}-")  # mkdtemp: mode 0700


def sweep_orphan_job_folders(root: str = "") -> List[str]:
    """Delete the job folders whose owner process died (a killed Slicer or worker leaves patient
    arrays behind); returns the folders removed. Only the user's own folders are touched."""
    root = root or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    for name in names:
        match = _JOB_FOLDER.match(name)
        if match is None or int(match.group(2)) == os.getpid():
            continue
        path = os.path.join(root, name)
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if not os.path.isdir(path) or os.path.islink(path) or (os.name != "nt" and info.st_uid != os.getuid()):
            continue
        if not process_alive(int(match.group(2)), started_before=info.st_mtime):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
