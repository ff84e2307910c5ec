"""Edge export of S4-DSS models (`s4bt export`): the streaming step as ONNX, a `torch.export`
program or an ExecuTorch program, and `load_exported` to run an exported folder from Python.
Not part of the remote code of checkpoints."""

from .exporter import EXPORT_FORMATS, ExportDependencyError, export_model, require_export_dependencies
from .loader import ExportedStreamingModel, load_exported

__all__ = [
    "EXPORT_FORMATS",
    "ExportDependencyError",
    "ExportedStreamingModel",
    "export_model",
    "load_exported",
    "require_export_dependencies",
]
