"""One writer per folder: an OS lock (`fcntl.flock`) on `<folder>/.lock`, held while the writer
runs. The kernel releases it when the holder's process ends, crashed or killed, so a lock is
never stale. The lock file itself stays: deleting it on release would let two later writers lock
two different files."""

from __future__ import annotations

import contextlib
import os

try:
    import fcntl
except ImportError:  # not POSIX: no lock (the folder is unprotected, as before)
    fcntl = None

LOCK_FILE = ".lock"


class FolderBusyError(RuntimeError):
    """Another process is writing the folder."""


@contextlib.contextmanager
def hold_folder(folder: str, what: str = "run"):
    """Create `folder` if needed and hold its lock for the `with` block; raises `FolderBusyError`
    at once (no waiting) if another process holds it."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FolderBusyError(f"{folder} is in use by another {what} (it holds {path}); wait for it to "
                                      "finish or choose another folder") from None
        yield path
    finally:
        os.close(handle)  # releases the flock


def is_held(path: str) -> bool:
    """Whether a live process holds the flock on the file at `path` (False if it is absent)."""
    if fcntl is None:
        return True  # cannot tell: assume it is in use
    try:
        handle = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(handle)
    return False
