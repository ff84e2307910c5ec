"""Whether an output path can be written, found out before any work is done (a probe file, created
and removed at once: permission bits alone say nothing for root or read-only mounts)."""

from __future__ import annotations

import os
import tempfile


class OutputNotWritableError(OSError):
    """The output path cannot be created or written."""


def require_writable(path: str, what: str = "output") -> None:
    """Raise `OutputNotWritableError` naming `path` unless `path` (a file or folder to create or
    fill) can be written: its nearest existing ancestor must be a folder we can create files in.
    Creates nothing that stays."""
    path = os.path.abspath(os.fspath(path))
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if existing != path and not os.path.isdir(existing):
        raise OutputNotWritableError(f"cannot write {what} {path}: {existing} is a file, not a folder")
    folder = existing if os.path.isdir(existing) else os.path.dirname(existing)
    try:
        handle, probe = tempfile.mkstemp(prefix=".s4bt-write-probe-", dir=folder)
    except OSError as error:
        raise OutputNotWritableError(f"cannot write {what} {path}: {folder} is not writable "
                                     f"({error.strerror or error})") from error
    os.close(handle)
    os.remove(probe)
