"""Edge export of S4-DSS models (`s4bt export`): the streaming step as ONNX, a `torch.export`
program or an ExecuTorch program, or the whole-sequence forward (dynamic length) as ONNX or a
`torch.export` program, and `load_exported` to run an exported folder from Python
(after validating its export.json and verifying the graph's SHA-256). Not part of the remote code
of checkpoints."""

from .description import ExportFolderError
from .exporter import EXPORT_FORMATS, ExportDependencyError, export_model, require_export_dependencies
from .loader import ExportedStreamingModel, ExportedWholeSequenceModel, load_exported

__all__ = [
    "EXPORT_FORMATS",
    "ExportDependencyError",
    "ExportFolderError",
    "ExportedStreamingModel",
    "ExportedWholeSequenceModel",
    "export_model",
    "load_exported",
    "require_export_dependencies",
]
