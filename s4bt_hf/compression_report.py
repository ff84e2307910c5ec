"""What balanced truncation did to a model: Hankel singular values, kept energy, a-priori
bounds and measured kernel errors per layer and channel, parameter counts before and after.
Saved as `compression_report.json` beside the weights and summarised in the model card.

This file is copied into saved checkpoints (remote code): it imports only the standard library.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

REPORT_FILE = "compression_report.json"


@dataclass
class LayerCompression:
    """One DSS layer. Per-channel lists have one entry per channel (d_model)."""

    layer: int
    original_d_state: int
    rank: int
    hankel_singular_values: list[list[float]]  # (channels, 2 · original_d_state), descending
    kept_states: list[int]  # real states kept (2 · rank unless real poles or numerical rank)
    kept_energy: list[float]  # Σ kept σ / Σ σ
    error_bound: list[float]  # 2 Σ_{i > kept} σ_i
    kernel_error: list[float]  # ‖K - K_r‖_2 over the report's kernel length and all outputs
    kernel_norm: list[float]  # ‖K‖_2 over the same
    padded_modes: list[int]  # modes holding nothing (fewer states than modes)
    adjusted_modes: list[int]  # modes moved to be representable (stability), see `adjustments`
    adjustments: list[str] = field(default_factory=list)
    max_cholesky_shift: float = 0.0
    max_eigenvector_condition: float = 1.0

    @property
    def layer_kept_energy(self) -> float:
        """Kept Hankel energy of the whole layer: Σ_channels Σ kept σ / Σ_channels Σ σ."""
        total = sum(sum(values) for values in self.hankel_singular_values)
        kept = sum(sum(values[:count]) for values, count in zip(self.hankel_singular_values, self.kept_states,
                                                                  strict=True))
        return kept / total if total > 0 else 1.0

    @property
    def max_relative_kernel_error(self) -> float:
        ratios = [error / norm for error, norm in zip(self.kernel_error, self.kernel_norm, strict=True) if norm > 0]
        return max(ratios, default=0.0)


@dataclass
class CompressionReport:
    """The whole model: settings, layers, parameter counts."""

    time: str
    kernel_length: int
    layers: list[LayerCompression]
    ssm_parameters_before: int
    ssm_parameters_after: int
    total_parameters_before: int
    total_parameters_after: int
    method: str = "balanced_truncation"
    tol: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CompressionReport:
        data = dict(data)
        data["layers"] = [LayerCompression(**layer) for layer in data["layers"]]
        return cls(**data)

    def save(self, directory: str | os.PathLike) -> str:
        path = os.path.join(directory, REPORT_FILE)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> CompressionReport:
        with open(os.path.join(directory, REPORT_FILE), encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))

    def summary_markdown(self) -> str:
        """A table of the layers for the model card."""
        lines = [
            f"Balanced truncation ({self.time}-time system of every channel), kernel errors measured over "
            f"{self.kernel_length} steps, at compression time (before any retraining).",
            "",
            f"- SSM parameters: {self.ssm_parameters_before:,} → {self.ssm_parameters_after:,}",
            f"- total parameters: {self.total_parameters_before:,} → {self.total_parameters_after:,}",
            "",
            "| layer | modes before → after | kept Hankel energy | max a-priori bound | max kernel error "
            "| max relative kernel error | padded / adjusted modes |",
            "|---|---|---|---|---|---|---|",
        ]
        for layer in self.layers:
            lines.append(
                f"| {layer.layer} | {layer.original_d_state} → {layer.rank} | {layer.layer_kept_energy:.4f} "
                f"| {max(layer.error_bound):.3g} | {max(layer.kernel_error):.3g} "
                f"| {layer.max_relative_kernel_error:.3g} | {sum(layer.padded_modes)} / {sum(layer.adjusted_modes)} |"
            )
        notes = [note for layer in self.layers for note in layer.adjustments]
        if notes:
            lines += ["", "Adjusted modes:", *[f"- {note}" for note in notes]]
        return "\n".join(lines)
