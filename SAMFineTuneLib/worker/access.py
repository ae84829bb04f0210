"""Which files on the worker's machine a conversation may name.

A stdio worker belongs to the process that started it, which can read and write those files
anyway: any path goes. A TCP server may be reached by other users of the machine (every user
can reach 127.0.0.1), so by default it takes no paths at all: arrays travel on the socket.
With ``serve --data-root DIR`` it takes paths inside DIR (relative ones are taken from DIR),
resolved with symbolic links followed, so a link cannot lead out. A refused path gets the same
answer whether or not it exists, so the answer tells nothing about the rest of the disk.
"""
from __future__ import annotations

import os
from typing import Any, Optional


class PathAccess:
    """``PathAccess(any_path=True)`` (stdio), ``PathAccess()`` (TCP: none), ``PathAccess(root)`` (inside root)."""

    def __init__(self, root: Optional[str] = None, any_path: bool = False):
        self.root = os.path.realpath(root) if root else None
        self.any_path = any_path

    def describe(self) -> str:
        if self.any_path:
            return "any path"
        return f"paths inside {self.root}" if self.root else "no paths"

    def resolve(self, value: Any, what: str) -> Optional[str]:
        """The path to use for parameter ``what``; None for None or ""; PermissionError if this
        conversation may not name it."""
        if value in (None, ""):
            return None
        if not isinstance(value, str):
            raise ValueError(f"{what} must be a path string, got {type(value).__name__}")
        if self.any_path:
            return value
        if self.root is None:
            raise PermissionError(f"{what}: this server takes no file paths from its clients (arrays travel on "
                                  "the connection); its operator can start it with 'serve --data-root DIR' to "
                                  "allow paths inside DIR")
        resolved = os.path.realpath(os.path.join(self.root, value))
        if resolved != self.root and not resolved.startswith(self.root.rstrip(os.sep) + os.sep):
            raise PermissionError(f"{what} {value!r} is not inside the server's data root; give a path inside it "
                                  "(relative paths are taken from the data root)")
        return resolved
