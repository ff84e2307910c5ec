"""Safe handling of the folders and files the applications write: one writer per run folder
(`hold_folder`), results written through a staging folder renamed into place (`staged_folder`),
an output path checked for writability before any work (`require_writable`), and a failed
write recognised whoever reports it (`as_write_error`)."""

from .folder_lock import FolderBusyError, hold_folder
from .staging import staged_folder
from .writable import OutputNotWritableError, require_writable
from .write_errors import as_write_error, describe

__all__ = ["FolderBusyError", "OutputNotWritableError", "as_write_error", "describe", "hold_folder",
           "require_writable", "staged_folder"]
