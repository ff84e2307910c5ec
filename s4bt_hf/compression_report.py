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


# Per-method values of the balanced methods, kept at the top level of a layer's JSON before
# reports had a per-method part: `from_dict` moves them into `details`.
_LEGACY_DETAILS = ("hankel_singular_values", "kept_states", "kept_energy", "error_bound", "max_cholesky_shift",
                   "max_eigenvector_condition")


@dataclass
class LayerCompression:
    """One DSS layer. Per-channel lists have one entry per channel (d_model).

    The common part is measured the same way for every method; `details` holds what only some
    methods have, e.g. for the balanced methods `hankel_singular_values` (channels, 2 · original
    d_state, descending), `kept_states`, `kept_energy` (Σ kept σ / Σ σ), `error_bound`
    (2 Σ_{i > kept} σ_i), for `modal_truncation` its `error_bound` (Σ of the dropped modes'
    H∞ scores), for `h2` the H2 errors of the result and of balanced truncation."""

    layer: int
    original_d_state: int
    rank: int
    kernel_error: list[float]  # ‖K - K_r‖_2 over the report's kernel length and all outputs (skip D included)
    kernel_norm: list[float]  # ‖K‖_2 over the same
    padded_modes: list[int]  # modes holding nothing (fewer states than modes)
    adjusted_modes: list[int]  # modes moved to be representable (stability), see `adjustments`
    adjustments: list[str] = field(default_factory=list)
    dc_gain_error: list[float] = field(default_factory=list)  # |Σ_k K_k + D - (Σ_k K_r,k + D_r)|
    details: dict = field(default_factory=dict)
    # data-aware refit: relative output error of the layer on the calibration data, per channel
    refit: dict | None = None

    @property
    def hankel_singular_values(self):
        return self.details.get("hankel_singular_values")

    @property
    def kept_states(self):
        return self.details.get("kept_states")

    @property
    def kept_energy(self):
        return self.details.get("kept_energy")

    @property
    def error_bound(self):
        return self.details.get("error_bound")

    @property
    def max_cholesky_shift(self):
        return self.details.get("max_cholesky_shift")

    @property
    def max_eigenvector_condition(self):
        return self.details.get("max_eigenvector_condition")

    @property
    def layer_kept_energy(self) -> float | None:
        """Kept Hankel energy of the whole layer: Σ_channels Σ kept σ / Σ_channels Σ σ (balanced
        methods only)."""
        if self.hankel_singular_values is None or self.kept_states is None:
            return None
        total = sum(sum(values) for values in self.hankel_singular_values)
        kept = sum(sum(values[:count]) for values, count in zip(self.hankel_singular_values, self.kept_states,
                                                                  strict=True))
        return kept / total if total > 0 else 1.0

    @property
    def max_relative_kernel_error(self) -> float:
        ratios = [error / norm for error, norm in zip(self.kernel_error, self.kernel_norm, strict=True) if norm > 0]
        return max(ratios, default=0.0)

    @classmethod
    def from_dict(cls, data: dict) -> LayerCompression:
        data = dict(data)
        details = dict(data.pop("details", None) or {})
        for name in _LEGACY_DETAILS:
            if name in data:
                details[name] = data.pop(name)
        return cls(**data, details=details)


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
    options: dict = field(default_factory=dict)  # the method's options
    # `budget=` of `model.reduce`: {"budget", "modes_per_channel", "ranks"} (+ "threshold": methods "last", "aire")
    budget: dict | None = None
    wall_seconds: float | None = None
    # reduced during training: {"step", "total_steps", "schedule"} (`training.ReductionSchedule`)
    training: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CompressionReport:
        data = dict(data)
        data["layers"] = [LayerCompression.from_dict(layer) for layer in data["layers"]]
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
        method = self.method.replace("_", " ")
        options = ", ".join(f"{key}={value}" for key, value in self.options.items())
        lines = [
            f"{method[0].upper() + method[1:]}{f' ({options})' if options else ''} of the {self.time}-time system "
            f"of every channel; kernel errors (skip D included) measured over {self.kernel_length} steps, at "
            "compression time (before any retraining).",
            "",
            f"- SSM parameters: {self.ssm_parameters_before:,} → {self.ssm_parameters_after:,}",
            f"- total parameters: {self.total_parameters_before:,} → {self.total_parameters_after:,}",
        ]
        if self.budget is not None:
            threshold = self.budget.get("threshold")  # `last`/`aire`: the global threshold of their scores
            lines.append(f"- rank budget {self.budget['budget']}: ranks {self.budget['ranks']} per layer"
                         + ("" if threshold is None else f" (global score threshold {threshold:.4g})"))
        lines += [
            "",
            "| layer | modes before → after | kept Hankel energy | max a-priori bound | max kernel error "
            "| max relative kernel error | max DC gain error | padded / adjusted modes |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for layer in self.layers:
            energy = layer.layer_kept_energy
            bound = layer.error_bound
            lines.append(
                f"| {layer.layer} | {layer.original_d_state} → {layer.rank} "
                f"| {'—' if energy is None else f'{energy:.4f}'} | {'—' if not bound else f'{max(bound):.3g}'} "
                f"| {max(layer.kernel_error):.3g} | {layer.max_relative_kernel_error:.3g} "
                f"| {max(layer.dc_gain_error, default=0.0):.3g} "
                f"| {sum(layer.padded_modes)} / {sum(layer.adjusted_modes)} |"
            )
        refits = [layer for layer in self.layers if layer.refit is not None]
        if refits:
            lines += ["", "Output maps refit on calibration data (relative output error of each layer, mean over "
                      "channels, before → after): " + "; ".join(
                          f"layer {layer.layer}: {layer.refit['mean_error_before']:.3g} → "
                          f"{layer.refit['mean_error_after']:.3g}" for layer in refits)]
        if self.training is not None:
            lines += ["", f"Reduced during training, after optimizer step {self.training['step']} of "
                      f"{self.training['total_steps']} (schedule {self.training['schedule']}); the numbers above are "
                      "from that moment, and the model trained on at the reduced size afterwards."]
        notes = [note for layer in self.layers for note in layer.adjustments]
        if notes:
            lines += ["", "Adjusted modes:", *[f"- {note}" for note in notes]]
        return "\n".join(lines)
