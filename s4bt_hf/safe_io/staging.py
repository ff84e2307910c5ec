"""Write a result folder completely, then rename it into place: a reader never sees a half-written
result, and a failure leaves nothing at the destination.

The staging folder is a hidden sibling of the destination, `.s4bt-staging-<name>-<random>`, so the
rename stays on one file system. Its writer holds a lock (`folder_lock.is_held`) on the file
`<staging folder>.lock` beside it (not inside: the staging folder holds only the result); a
staging folder whose lock nobody holds was left by a killed writer, and the next staged write
into the same parent folder removes it."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time

from .folder_lock import fcntl, is_held

PREFIX = ".s4bt-staging-"
LEGACY_PREFIXES = (".s4bt-export-",)  # written by versions before this helper (no lock beside them)
UNLOCKED_GRACE_SECONDS = 60  # a staging folder without its lock file this young may be one being created


def staging_prefix(destination: str) -> str:
    return f"{PREFIX}{os.path.basename(os.path.normpath(destination))}-"


def remove_stale_staging(destination: str) -> list[str]:
    """Remove the staging folders beside `destination` (any destination's, and legacy ones) that no
    live writer holds, with their lock files; returns the removed folders."""
    parent = os.path.dirname(os.path.abspath(destination))
    if not os.path.isdir(parent):
        return []
    removed = []
    for name in sorted(os.listdir(parent)):
        path = os.path.join(parent, name)
        if not name.startswith((PREFIX, *LEGACY_PREFIXES)) or name.endswith(".lock") or not os.path.isdir(path) \
                or os.path.islink(path):
            continue
        lock = path + ".lock"
        if os.path.exists(lock):
            if is_held(lock):
                continue
        elif time.time() - os.path.getmtime(path) < UNLOCKED_GRACE_SECONDS:
            continue
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock)
        removed.append(path)
    return removed


@contextlib.contextmanager
def staged_folder(destination):
    """Yield a new empty staging folder; when the block ends without an error, rename it to
    `destination` (which must not exist, or be an empty folder); on an error remove it.

        with staged_folder("runs/model-r16") as staging:
            model.save_pretrained(staging)
    """
    destination = os.path.abspath(os.fspath(destination))
    parent = os.path.dirname(destination)
    os.makedirs(parent, exist_ok=True)
    remove_stale_staging(destination)
    staging = tempfile.mkdtemp(prefix=staging_prefix(destination), dir=parent)
    lock_path = staging + ".lock"
    lock = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield staging
        if os.path.isdir(destination) and not os.path.islink(destination):
            os.rmdir(destination)  # empty (the caller checked); fails rather than overwrite if filled since
        os.rename(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        os.close(lock)
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock_path)
