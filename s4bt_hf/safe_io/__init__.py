"""Safe handling of the folders and files the applications write: one writer per run folder
(`hold_folder`), results written through a staging folder renamed into place (`staged_folder`),
and an output path checked for writability before any work (`require_writable`)."""

from .folder_lock import FolderBusyError, hold_folder
from .staging import staged_folder
from .writable import OutputNotWritableError, require_writable

__all__ = ["FolderBusyError", "OutputNotWritableError", "hold_folder", "require_writable", "staged_folder"]
