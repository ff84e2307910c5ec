"""The whole-sequence forward of an eval-mode S4-DSS model in real arithmetic, for export with a
dynamic batch AND length (ONNX, `torch.export`): ONNX has no complex dtypes, and the FFT that the
eager forward uses is complex in torch. Every complex number here is a (re, im) pair of reals.

Each DSS layer's convolution is the exact chunked recurrence of `s4bt_hf/real_convolution_s4dss.py`
(a Toeplitz matmul inside chunks of fixed size T, a blocked diagonal scan across them), computed
from a frozen snapshot of the layer's discretised system; the math lives there because the model's
own forward uses it too while `torch.export` traces it (transformers' exporters).

Not part of the remote code of checkpoints: only `s4bt_hf.export` imports it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

# the math moved to the remote code (the model's forward uses it while exporting); its names stay importable here
from ..real_convolution_s4dss import (  # noqa: F401
    MIN_CHUNK,
    SCAN_BLOCK,
    SCAN_LEVELS,
    diagonal_scan,
    real_causal_convolution,
    real_convolution,
    real_powers,
)
from ..real_convolution_s4dss import real_convolution_chunk as whole_sequence_chunk
from ..streaming_real import FrozenModelCopy
from .exporter import GRAPH_FILES, _dtype_name, model_description, runtime_versions


class RealSequenceKernel(nn.Module):
    """One DSS layer's convolution y = K * u + D u on (B, L, H), from a frozen snapshot of its
    discretised system as real buffers: log ā = Δλ (H, N) and W = C·B̄ (c, H, N) as (re, im)."""

    def __init__(self, kernel: nn.Module):
        super().__init__()
        dtype = kernel.compute_dtype()
        with torch.no_grad():
            log_a_bar, input_bar, output_vec = (t.detach() for t in kernel.discrete_system())
            weights = output_vec * input_bar  # (c, H, N)
        self.bidirectional = weights.shape[0] == 2
        self.chunk = whole_sequence_chunk(kernel.d_state)
        # clone(): `.real`/`.to` may be views of the kernel's own parameters
        for name, value in (("log_a", log_a_bar), ("w", weights)):
            self.register_buffer(f"{name}_re", value.real.to(dtype).clone(memory_format=torch.contiguous_format))
            self.register_buffer(f"{name}_im", value.imag.to(dtype).clone(memory_format=torch.contiguous_format))
        self.register_buffer("d", kernel.D.detach().to(dtype).clone(memory_format=torch.contiguous_format))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, L, H) -> (B, L, H), in the SSM compute dtype."""
        inputs = inputs.to(self.d.dtype)
        return self.d * inputs + real_convolution(
            inputs, self.log_a_re, self.log_a_im, self.w_re, self.w_im, self.chunk)


def eval_norm(norm: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The block norm in eval mode: LayerNorm, or BatchNorm's fixed affine map
    (x - running_mean) / sqrt(running_var + eps) · weight + bias (it reads no mask then)."""
    if isinstance(norm, nn.BatchNorm1d):
        return (hidden_states - norm.running_mean) * torch.rsqrt(norm.running_var + norm.eps) * norm.weight + norm.bias
    return norm(hidden_states)


class RealSequenceBlock(nn.Module):
    """One residual DSS block over the whole sequence, as `S4DSSBlock.forward` in eval mode."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.prenorm = block.prenorm
        self.norm = copy.deepcopy(block.norm)
        self.kernel = RealSequenceKernel(block.kernel)
        self.output_linear = copy.deepcopy(block.output_linear)

    def forward(self, hidden_states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        normed = eval_norm(self.norm, hidden_states) if self.prenorm else hidden_states
        normed = torch.where(valid, normed, torch.zeros((), dtype=normed.dtype, device=normed.device))
        mixed = self.kernel(normed).to(hidden_states.dtype)
        mixed = nn.functional.glu(self.output_linear(nn.functional.gelu(mixed)), dim=-1)
        hidden_states = hidden_states + mixed
        return hidden_states if self.prenorm else eval_norm(self.norm, hidden_states)


class WholeSequenceModule(FrozenModelCopy):
    """Real-arithmetic whole-sequence forward of an eval-mode S4-DSS model (backbone or classifier,
    uni- or bidirectional): a frozen copy, nothing requires a gradient, no complex tensor.

    forward(inputs, attention_mask) -> output, where
        inputs          (B, L) int64 token ids, or (B, L, input_dim) floats;
        attention_mask  (B, L), 1 for valid and 0 for padded positions (a padded position never
                        changes a valid output), every sequence with at least one valid position;
        output          (B, num_labels) logits (classifier), or the (B, L, d_model) last hidden
                        state (backbone), equal to the model's `forward` to float rounding.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if model.training:
            raise ValueError("The whole-sequence module runs the model as in inference: call `model.eval()` first.")
        self.copy_parts(model, RealSequenceBlock)
        self.pooling = model.config.pooling if self.is_classifier else None
        self.num_labels = model.config.num_labels if self.is_classifier else None
        self.freeze()

    @property
    def output_dtype(self) -> torch.dtype:
        return self.encoder.weight.dtype

    def example_inputs(self, batch_size: int = 2, length: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs to trace with: zeros (or token 0) and an all-valid mask."""
        device = self.encoder.weight.device
        if self.uses_tokens:
            inputs = torch.zeros(batch_size, length, dtype=torch.int64, device=device)
        else:
            inputs = torch.zeros(batch_size, length, self.input_dim, dtype=self.input_dtype, device=device)
        return inputs, torch.ones(batch_size, length, dtype=torch.int64, device=device)

    def check_call(self, inputs, attention_mask) -> None:
        """Shapes and dtypes (metadata, compiled away by `torch.export`); with value checks on and not
        while tracing, the token ids' range and the mask's values too."""
        rank = 2 if self.uses_tokens else 3
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != rank or (
            not self.uses_tokens and inputs.shape[-1] != self.input_dim
        ):
            wanted = "(batch, length) token ids" if self.uses_tokens else f"(batch, length, {self.input_dim}) values"
            got = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise ValueError(f"`inputs` must be {wanted}, got {got}.")
        if self.uses_tokens == (inputs.is_floating_point() or inputs.is_complex() or inputs.dtype == torch.bool):
            kind = "an integer" if self.uses_tokens else "a floating-point"
            raise TypeError(f"`inputs` must be {kind} tensor, got {inputs.dtype}.")
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(inputs.shape[:2]):
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else (
                type(attention_mask).__name__)
            raise ValueError(f"`attention_mask` must have shape {tuple(inputs.shape[:2])} (batch, length), got {got}.")
        if attention_mask.is_complex():
            raise TypeError(f"`attention_mask` must hold real 0/1 values, got {attention_mask.dtype}.")
        if not self.check_input_values or torch.compiler.is_compiling() or not inputs.numel():
            return
        if self.uses_tokens:
            low, high = torch.stack([inputs.min(), inputs.max()]).tolist()
            if low < 0 or high >= self.vocab_size:
                raise ValueError(f"`inputs` holds token ids outside the vocabulary [0, {self.vocab_size}): "
                                 f"min {low}, max {high}.")
        check_mask_values(attention_mask)

    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.check_call(inputs, attention_mask)
        valid = (attention_mask != 0).unsqueeze(-1)  # (B, L, 1)
        if self.uses_tokens:
            # padded ids are read as id 0 (they may be anything), then zeroed like every padded input
            hidden_states = self.encoder(torch.where(valid.squeeze(-1), inputs, torch.zeros_like(inputs)))
            hidden_states = torch.where(valid, hidden_states, torch.zeros((), dtype=hidden_states.dtype))
        else:
            inputs = torch.where(valid, inputs, torch.zeros((), dtype=inputs.dtype))
            hidden_states = self.encoder(inputs.to(self.encoder.weight.dtype))
        for block in self.blocks:
            hidden_states = block(hidden_states, valid)
        if self.final_norm is not None:
            hidden_states = eval_norm(self.final_norm, hidden_states)
        if not self.is_classifier:
            return hidden_states
        if self.pooling == "mean":
            kept = torch.where(valid, hidden_states, torch.zeros((), dtype=hidden_states.dtype))
            pooled = kept.sum(1) / valid.sum(1).to(hidden_states.dtype)
        else:  # the last valid position
            positions = torch.arange(hidden_states.shape[1], device=hidden_states.device)
            last = torch.where(valid.squeeze(-1), positions, -1).max(dim=1).values
            pooled = torch.gather(hidden_states, 1, last.reshape(-1, 1, 1).expand(-1, 1, hidden_states.shape[-1]))
            pooled = pooled.squeeze(1)
        return self.classifier(pooled)


def check_mask_values(attention_mask) -> None:
    """An attention mask holds only 0 and 1, and every sequence at least one 1 (as the model requires)."""
    mask = torch.as_tensor(attention_mask)
    if mask.numel() == 0:
        return
    zero_or_one, every_row_valid = torch.stack([((mask == 0) | (mask == 1)).all(), (mask != 0).any(dim=1).all()]
                                               ).tolist()
    if not zero_or_one:
        raise ValueError("`attention_mask` must hold only 0 (padding) and 1 (valid position).")
    if not every_row_valid:
        raise ValueError("Every sequence needs at least one valid position in `attention_mask`.")


# ---------------------------------------------------------------------------------------- export
TRACE_LENGTH = 40  # any length traces the same graph (see `_pad_to_multiple`)
CHECK_LENGTHS = (1, 37, 300)  # lengths compared against eager right after export, batch 2 (one row padded)
FOLD_LIMIT = 1024  # largest constant (elements) the ONNX optimiser may fold into an initializer
CHECK_TOLERANCE = 1e-3  # relative to the largest eager output; the export is refused beyond it


def output_name(module: WholeSequenceModule) -> str:
    return "logits" if module.is_classifier else "last_hidden_state"


def whole_sequence_program(module: WholeSequenceModule):
    """`torch.export` program of `module` with a dynamic batch and length (>= 1 each). Guards that
    the tracer cannot prove symbolically (true for every length) become runtime assertions rather
    than a specialisation to the traced length."""
    batch, length = torch.export.Dim("batch", min=1), torch.export.Dim("length", min=1)
    return torch.export.export(
        module, module.example_inputs(2, TRACE_LENGTH), dynamic_shapes=({0: batch, 1: length}, {0: batch, 1: length}),
        prefer_deferred_runtime_asserts_over_guards=True,
    )


def export_whole_sequence_onnx(module: WholeSequenceModule, path: str) -> int:
    """Write the ONNX graph (inputs, attention_mask) -> output; returns its opset.

    The exporter's default optimisation folds the power tables computed from the modes into
    initializers: for a 128-channel, N = 64 layer the file grew to 7.7 MB against 0.85 MB when only
    constants of at most FOLD_LIMIT elements are folded, at the same onnxruntime speed (it computes
    those tables from the modes in the graph)."""
    import onnxscript.optimizer

    program = torch.onnx.export(
        whole_sequence_program(module), dynamo=True, input_names=["inputs", "attention_mask"],
        output_names=[output_name(module)], optimize=False, verbose=False,
    )
    onnxscript.optimizer.optimize_ir(program.model, output_size_limit=FOLD_LIMIT)
    program.save(path)
    return max(int(entry.version) for entry in program.model_proto.opset_import if entry.domain in ("", "ai.onnx"))


def describe_whole_sequence(model, module: WholeSequenceModule, format: str, opset) -> dict:
    """The export.json description of a whole-sequence graph."""
    config = model.config
    inputs = [
        {"name": "inputs", "shape": ["batch", "length"] + ([] if module.uses_tokens else [module.input_dim]),
         "dtype": _dtype_name(module.input_dtype),
         "meaning": "token ids of every position" if module.uses_tokens else "input values of every position"},
        {"name": "attention_mask", "shape": ["batch", "length"], "dtype": "int64",
         "meaning": "1 for a valid position, 0 for padding; every sequence needs one valid position"},
    ]
    if module.is_classifier:
        output = {"name": "logits", "shape": ["batch", config.num_labels],
                  "meaning": f"logits of the whole sequence ({config.pooling} pooling over the valid positions)"}
    else:
        output = {"name": "last_hidden_state", "shape": ["batch", "length", config.d_model],
                  "meaning": "hidden state at every position (padded positions: not meaningful)"}
    output["dtype"] = _dtype_name(module.output_dtype)
    return {
        "format": format,
        "mode": "whole_sequence",
        "graph": GRAPH_FILES[format],
        "int8_graph": None,
        "int8_scope": None,
        "opset": opset,
        "call": "(inputs, attention_mask) -> output; any batch size and length (>= 1)",
        "inputs": inputs,
        "outputs": [output],
        "model": model_description(model, module, [block.kernel.log_a_re.shape[-1] for block in module.blocks],
                                   bidirectional=bool(config.bidirectional)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "chunk": [block.kernel.chunk for block in module.blocks],
        "versions": runtime_versions(format),
    }


def check_against_eager(model, module: WholeSequenceModule, folder: str, description: dict) -> dict:
    """Run the exported graph through `load_exported`'s runner next to the eager model at
    CHECK_LENGTHS (batch 2, the second sequence padded over its last third); refuse the export if
    the relative error exceeds CHECK_TOLERANCE."""
    from .loader import ExportedWholeSequenceModel

    runner = ExportedWholeSequenceModel(folder, description, description["graph"], trust_pickle=True)
    generator = torch.Generator().manual_seed(0)
    key = "input_ids" if module.uses_tokens else "input_values"
    worst, largest = 0.0, 0.0
    for length in CHECK_LENGTHS:
        if module.uses_tokens:
            inputs = torch.randint(0, model.config.vocab_size, (2, length), generator=generator)
        else:
            inputs = torch.randn(2, length, module.input_dim, generator=generator, dtype=module.input_dtype)
        mask = torch.ones(2, length, dtype=torch.int64)
        mask[1, length - length // 3:] = 0
        with torch.no_grad():
            outputs = model(**{key: inputs}, attention_mask=mask)
        expected = outputs.logits if module.is_classifier else outputs.last_hidden_state[mask.bool()]
        exported = runner(inputs, mask)
        exported = exported if module.is_classifier else exported[mask.bool()]
        worst = max(worst, float((exported.to(expected.dtype) - expected).abs().max()))
        largest = max(largest, float(expected.abs().max()))
    result = {"lengths": list(CHECK_LENGTHS), "batch": 2, "max_abs_error": worst, "max_abs_output": largest}
    if not worst <= CHECK_TOLERANCE * max(largest, 1e-30):
        raise ValueError(f"The exported whole-sequence graph disagrees with the eager model: max abs error {worst:.3g} "
                         f"for outputs up to {largest:.3g} (tolerance {CHECK_TOLERANCE:g} relative); nothing was "
                         "written.")
    return result


def card_section(description: dict) -> str:
    """The model card's section on the exported graph."""
    rows = "\n".join(f"| `{entry['name']}` | {tuple(entry['shape'])} | {entry['dtype']} | {entry['meaning']} |"
                     for entry in description["inputs"] + description["outputs"])
    check = description["check"]
    return (
        "\n## Exported whole-sequence forward\n\n"
        f"`{description['graph']}` ({description['format']}) runs the model on whole sequences: "
        f"`{description['call']}`. Real arithmetic only (no complex tensors); the SSM convolution is a chunked "
        "recurrence, so any length runs in one graph.\n\n"
        "| tensor | shape | dtype | meaning |\n|---|---|---|---|\n" + rows + "\n\n"
        f"Checked against the eager model at lengths {check['lengths']}: max abs error {check['max_abs_error']:.2e}. "
        "Full description: `export.json`.\n"
    )
