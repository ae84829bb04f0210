"""Where the engine keeps files of its own: the user's cache folder, never the install folder.

Standard library only, so the Slicer side can ask before torch is installed.
"""
from __future__ import annotations

import os
import sys


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


def default_log_path() -> str:
    """Where the worker writes its log (library output, warnings, tracebacks) unless told otherwise."""
    return os.path.join(user_cache_dir(), "logs", "worker.log")
