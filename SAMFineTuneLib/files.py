"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file the engine writes (volumes, datasets, adapters, embeddings, reports) goes through
here: it is written to a temporary name beside its target and renamed onto it, so a crash or
a cancel leaves what was there before.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable, Optional


def atomic_target(path: str) -> str:
    """A temp file beside ``path`` that keeps the final extension (writers pick format by suffix)."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    name = os.path.basename(path)
    suffix = ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]
    handle, temp = tempfile.mkstemp(prefix="." + name + ".", suffix=".part" + suffix, dir=folder)
    os.close(handle)
    return temp


def atomic_write(path: str, write: Callable[[str], Any]) -> None:
    """``write(temp_path)`` then rename onto ``path``: readers see the old file or the new one."""
    temp = atomic_target(path)
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def atomic_folder(path: str, write: Callable[[str], Any]) -> None:
    """``write(temp_folder)`` then rename the folder onto ``path``: readers see no folder or a
    complete one (files that belong together, such as a model and its description). A folder
    already at ``path`` is kept: another process wrote it first (remove it to replace it)."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    temp = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", suffix=".part", dir=parent)
    try:
        write(temp)
        try:
            os.rename(temp, path)
        except OSError:
            if not os.path.isdir(path):
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def write_text_atomic(path: str, text: str) -> None:
    def write(temp: str) -> None:
        with open(temp, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    atomic_write(path, write)


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
