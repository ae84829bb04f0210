"""Where SAMFineTune keeps files: always in the user's folders, never in the install folder.

- cache (worker log, exported training sets by default): ``$SAMFINETUNE_CACHE``, else inside
  Slicer the application's user cache folder + ``/SAMFineTune``, else the engine's
  ``paths.user_cache_dir()`` (the platform cache folder + ``/SAMFineTune``). The worker is
  started with ``SAMFINETUNE_CACHE`` set to the same folder, so both sides agree.
- adapters library (fine-tuned adapters the user keeps): ``$SAMFINETUNE_ADAPTERS``, else
  ``<cache>/adapters``.
"""

import os

import slicer


def cacheDirectory(create=True):
    path = os.environ.get("SAMFINETUNE_CACHE")
    if not path:
        app = getattr(slicer, "app", None)
        root = getattr(app, "cachePath", None) if app is not None else None
        if root:
            path = os.path.join(root, "SAMFineTune")
        else:
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


def workerEnvironment():
    """Environment additions for the worker process (same cache folder as this side)."""
    return {"SAMFINETUNE_CACHE": cacheDirectory()}
