"""Where SAMFineTune keeps files and which Python runs its worker.

Files live in the user's folders, never in the install folder:
- cache (worker log, training sets unless the panel names a folder): ``$SAMFINETUNE_CACHE``, else inside
  Slicer the application's cache folder + ``/SAMFineTune``, else the engine's user cache
  folder. The worker is started with ``SAMFINETUNE_CACHE`` set to the same folder and its log
  is put there, so both sides agree.
- adapters library (fine-tuned adapters the user keeps): ``$SAMFINETUNE_ADAPTERS``, else
  ``<cache>/adapters``.
"""

import os
import re
import shutil
import sys

import slicer

from .library import ensureLibraryImportable


def cacheDirectory(create=True):
    path = os.environ.get("SAMFINETUNE_CACHE")
    if not path:
        root = getattr(getattr(slicer, "app", None), "cachePath", None)
        if root:
            path = os.path.join(root, "SAMFineTune")
        else:
            ensureLibraryImportable()
            from SAMFineTuneLib.paths import user_cache_dir

            path = user_cache_dir()
    if create:
        os.makedirs(path, exist_ok=True)
    return path


def adaptersDirectory(create=True):
    path = os.environ.get("SAMFINETUNE_ADAPTERS") or os.path.join(cacheDirectory(create), "adapters")
    if create:
        os.makedirs(path, exist_ok=True)
    return path


def trainingSetFolder(chosen, structureName):
    """The training set exports go to and training reads: the folder the user chose, else one per
    structure in the cache (``<cache>/datasets/<structure>``): a set holds one structure as label
    1, so a second structure exported into the first one's set would be refused. None when neither
    is known."""
    if chosen and str(chosen) not in (".", ""):
        return os.path.abspath(os.path.expanduser(str(chosen)))
    name = folderName(structureName)
    return os.path.join(cacheDirectory(), "datasets", name) if name else None


def folderName(text):
    """``text`` as a plain folder name (runs of other characters than letters, digits, '-' and '_'
    become '_'); "" when nothing is left."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text or "").strip("_")


def adapterFolder(name):
    """The adapters library's folder for the adapter ``name``; a ValueError for a name that is not
    one visible folder name: a path would write outside the library or where its list does not look."""
    name = (name or "").strip()
    if not name or name.startswith(".") or any(sep in name for sep in {"/", os.sep, os.altsep or "/"}):
        raise ValueError("Adapter name %r: give one folder name, such as liver-ct-v1 (no '/', not starting with '.')."
                         % name)
    return os.path.join(adaptersDirectory(), name)


def workerLogPath():
    return os.path.join(cacheDirectory(), "logs", "worker.log")


def workerEnvironment():
    """Environment additions for the worker process (same cache folder as this side)."""
    return {"SAMFINETUNE_CACHE": cacheDirectory()}


def workerPython():
    """The interpreter of the background worker: ``$SAMFINETUNE_WORKER_PYTHON`` when set (a Python
    with the engine's packages, e.g. a separate GPU environment), else Slicer's own PythonSlicer
    inside Slicer (``slicer.util.executePythonModule`` finds it the same way), else this one."""
    chosen = os.environ.get("SAMFINETUNE_WORKER_PYTHON")
    if chosen:
        return chosen
    if hasattr(slicer, "app"):
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable
