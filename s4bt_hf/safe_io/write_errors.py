"""A failed write, whoever reports it. A full disk reaches us as Python's `OSError`, as safetensors'
`SafetensorError` ("... I/O error: No space left on device (os error 28)") or as a `RuntimeError`
of torch.save's zip writer ("PytorchStreamWriter failed writing file ...", "[enforce fail at
inline_container.cc ...] unexpected pos ..."), which names no errno."""

from __future__ import annotations

import errno
import os
import re

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # (EFBIG, "File too large", says itself what happened)
_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_TORCH_WRITER = ("PytorchStreamWriter", "inline_container")


def as_write_error(error: BaseException) -> OSError | None:
    """The OSError of a failed write (`errno` set when the writer says it), or None if `error` is
    not a failed write."""
    if isinstance(error, OSError):
        return error
    text = str(error)
    if type(error).__name__ == "SafetensorError":
        found = _OS_ERROR.search(text)
        if found is None:
            return None
        code = int(found.group(1))
        return OSError(code, os.strerror(code))
    if isinstance(error, RuntimeError) and any(marker in text for marker in _TORCH_WRITER):
        return OSError(None, "torch.save could not write the file (is the disk full?)")
    return None


def describe(error: OSError) -> str:
    """`error`'s reason in words, a full disk said so."""
    reason = error.strerror or str(error)
    if error.errno in DISK_FULL and "disk is full" not in reason:
        reason += " (the disk is full)"
    return reason
