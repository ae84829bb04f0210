"""Where SAMFineTune keeps files and which Python runs its worker.

Files live in the user's folders, never in the install folder:
- the user's own results, which nothing may delete (training sets unless the panel names a
  folder, the adapters library): ``$SAMFINETUNE_DATA``, else ``SAMFineTune`` in the user's
  Documents folder, where Slicer keeps its DICOM database; the adapters library may be moved
  on its own (``$SAMFINETUNE_ADAPTERS``).
- cache (worker log, embeddings, converted encoders): ``$SAMFINETUNE_CACHE``, else the engine's
  user cache folder (``SAMFineTuneLib.paths.user_cache_dir``), inside Slicer too. The worker is
  started with ``SAMFINETUNE_CACHE`` set to the same folder and its log is put there, so both
  sides agree.

Neither is in Slicer's own cache folder: its "Clear cache" empties it (5.10), and Slicer 5.12 trims
it to its size limit at every start, whole folders oldest first (vtkCacheManager::PruneCache).
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
        ensureLibraryImportable()
        from SAMFineTuneLib.paths import user_cache_dir

        path = user_cache_dir()
    if create:
        os.makedirs(path, exist_ok=True)
    return path


def dataDirectory(create=True):
    """The user's SAMFineTune folder for what they keep (module docstring)."""
    path = os.environ.get("SAMFINETUNE_DATA")
    if not path:
        documents = None
        try:
            import qt

            documents = qt.QStandardPaths.writableLocation(qt.QStandardPaths.DocumentsLocation)
        except ImportError:  # Slicer's classes without its Qt (tests, a plain Python)
            pass
        path = os.path.join(documents or os.path.join(os.path.expanduser("~"), "Documents"), "SAMFineTune")
    if create:
        os.makedirs(path, exist_ok=True)
    return path


def adaptersDirectory(create=True):
    path = os.environ.get("SAMFINETUNE_ADAPTERS") or os.path.join(dataDirectory(create), "adapters")
    if create:
        os.makedirs(path, exist_ok=True)
    return path


def trainingSetFolder(chosen, structureName):
    """The training set exports go to and training reads: the folder the user chose, else one per
    structure in the user's folder (``<data>/datasets/<structure>``): a set holds one structure as
    label 1, so a second structure exported into the first one's set would be refused. None when
    neither is known."""
    if chosen and str(chosen) not in (".", ""):
        return os.path.abspath(os.path.expanduser(str(chosen)))
    name = folderName(structureName)
    return os.path.join(dataDirectory(), "datasets", name) if name else None


def folderName(text):
    """``text`` as a plain folder name (runs of other characters than letters, digits, '-' and '_'
    become '_'); "" when nothing is left. A name Windows keeps for a device ("CON", "aux") gets
    "_case" after it, on every system, so that a scene or a set made on one opens on another."""
    ensureLibraryImportable()
    from SAMFineTuneLib.files import windows_device_name

    name = re.sub(r"[^A-Za-z0-9_-]+", "_", text or "").strip("_")
    return name + "_case" if windows_device_name(name) else name


def adapterFolder(name):
    """The adapters library's folder for the adapter ``name``; a ValueError for a name that is not
    one visible folder name: a path would write outside the library or where its list does not look."""
    name = (name or "").strip()
    if not name or name.startswith(".") or any(sep in name for sep in {"/", os.sep, os.altsep or "/"}):
        raise ValueError("Adapter name %r: give one folder name, such as liver-ct-v1 (no '/', not starting with '.')."
                         % name)
    if os.name == "nt" and not windowsFolderName(name):
        raise ValueError("Adapter name %r: Windows takes no folder named so (none of < > : \" | ? * \\, no '.' at "
                         "the end, not CON, NUL, COM1...); give a name such as liver-ct-v1." % name)
    return os.path.join(adaptersDirectory(), name)


def windowsFolderName(name):
    """Whether Windows can create a folder ``name``: it refuses < > : " | ? * \\ and control
    characters, drops a final '.' or space, and takes CON, NUL, COM1... for devices."""
    ensureLibraryImportable()
    from SAMFineTuneLib.files import windows_device_name

    return not (re.search(r'[<>:"|?*\\\x00-\x1f]', name) or name.endswith((".", " ")) or windows_device_name(name))


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
