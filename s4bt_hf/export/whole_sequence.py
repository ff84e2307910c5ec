"""The whole-sequence forward of an eval-mode S4-DSS model in real arithmetic, for export with a
dynamic batch AND length (ONNX, `torch.export`): ONNX has no complex dtypes, and the FFT that the
eager forward uses is complex in torch. Every complex number here is a (re, im) pair of reals.

Each DSS layer's causal convolution y = K * u, K_k = Re Σ_n W_n ā_n^k (W = C·B̄, ā = exp(Δλ)),
is computed exactly by a chunked recurrence with a fixed chunk T, so that the graph only holds
matmuls, exp, cos and sin whatever the length:

    inside a chunk:   a (T, T) lower-triangular Toeplitz matrix of K_0..K_{T-1};
    between chunks:   the state s_n at each chunk end, S_c = ā^T S_{c-1} + Σ_j ā^{T-1-j} u_{c,j},
                      a linear recurrence over the L/T chunks (`diagonal_scan`), read out as
                      Re Σ_n W_n ā_n^{t+1} S_{c-1,n} at position t of chunk c.

The powers ā^k = exp(k Re Δλ) (cos(k Im Δλ) + i sin(k Im Δλ)) are computed from the real and
imaginary parts of Δλ. A bidirectional layer's backward kernel is the same causal convolution run
on the reversed sequence, shifted by one position (it sees only later positions).

Not part of the remote code of checkpoints: only `s4bt_hf.export` imports it.
"""

from __future__ import annotations

import copy
import importlib

import torch
from torch import nn

from .exporter import GRAPH_FILES, _dtype_name, model_description

# scan of the chunk-end states: blocks of SCAN_BLOCK chunks, SCAN_LEVELS levels, then one dense
# lower-triangular matrix over what remains (about L / (T · SCAN_BLOCK^SCAN_LEVELS) + 2 steps: 2 at
# L = 16384 with T = 32, 34 at L = 2^20), so the cost stays O(L) for any length a graph gets.
# Small blocks waste the least padding on short sequences: 4 x 5 levels ran 1.3-1.7x faster than
# 16 x 2 on a 128-channel, N = 64 layer at L = 784 and 4096 (2 CPU threads), 1.2x at 16384.
SCAN_BLOCK = 4
SCAN_LEVELS = 5
MIN_CHUNK = 32


def whole_sequence_chunk(num_modes: int) -> int:
    """The chunk T: the power of two >= max(MIN_CHUNK, 2N), so that the Toeplitz block costs about
    what the state matmuls cost (the rule of `kernel_s4dss.convolution_chunk`, without a length)."""
    return max(MIN_CHUNK, 1 << max(0, 2 * num_modes - 1).bit_length())


def real_powers(log_re: torch.Tensor, log_im: torch.Tensor, exponents: torch.Tensor):
    """ā^k = exp(k Re log ā) (cos(k Im log ā), sin(k Im log ā)) for every k in `exponents` (K,).

    Args: log_re, log_im (...) real. Returns (re, im), each (..., K).
    """
    angle = log_im.unsqueeze(-1) * exponents
    scale = torch.exp(log_re.unsqueeze(-1) * exponents)
    return scale * torch.cos(angle), scale * torch.sin(angle)


def _lower_triangular_powers(log_re, log_im, size, device, dtype):
    """M[..., i, j] = ā^{i-j} for i >= j, 0 above the diagonal: (re, im), each (..., size, size)."""
    index = torch.arange(size, device=device)
    lag = index.unsqueeze(1) - index.unsqueeze(0)  # [i, j] = i - j
    power_re, power_im = real_powers(log_re, log_im, lag.clamp(min=0).to(dtype).reshape(-1))
    shape = (*log_re.shape, size, size)
    causal = lag >= 0
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(causal, power_re.reshape(shape), zero), torch.where(causal, power_im.reshape(shape), zero)


def _pad_to_multiple(values: torch.Tensor, block: int) -> torch.Tensor:
    """Zero-pad the last axis to a multiple of `block` with at least one extra block (a causal
    recurrence: a zero tail changes no earlier output). Returns (padded, number of blocks).

    The extra block keeps the block count >= 2 for every length, so `torch.export` never meets a
    size-1 axis (where broadcasting would take another path) and traces one graph for all lengths;
    ceil-division rather than `-n % block` keeps its symbolic shapes simple."""
    num_blocks = (values.shape[-1] + block - 1) // block + 1
    return nn.functional.pad(values, (0, num_blocks * block - values.shape[-1])), num_blocks


def diagonal_scan(x_re, x_im, log_re, log_im, levels: int = SCAN_LEVELS, block: int = SCAN_BLOCK):
    """s_m = ā s_{m-1} + x_m (s_{-1} = 0) along the last axis, for a complex ā per group.

    Blocks of `block` steps: inside each block one matmul by the lower-triangular matrix of
    ā^{i-j}; the block-end states follow the same recurrence with ā^block (a recursive call,
    `levels` deep, then one dense matrix over all remaining steps), and reach position t of the
    next block as ā^{t+1} times the entering state.

    Args: x_re, x_im (G, B, M) real; log_re, log_im (G,) real, the parts of log ā (Re < 0).
    Returns: (s_re, s_im), each (G, B, M).
    """
    groups, batch, length = x_re.shape
    dtype, device = x_re.dtype, x_re.device
    if levels == 0:
        matrix_re, matrix_im = _lower_triangular_powers(log_re, log_im, length, device, dtype)
        # s_i = Σ_j M[i, j] x_j:  (G, B, M) @ (G, M, M)^T
        matrix_re, matrix_im = matrix_re.transpose(1, 2), matrix_im.transpose(1, 2)
        return x_re @ matrix_re - x_im @ matrix_im, x_re @ matrix_im + x_im @ matrix_re
    (x_re, num_blocks), (x_im, _) = _pad_to_multiple(x_re, block), _pad_to_multiple(x_im, block)
    x_re, x_im = x_re.reshape(groups, batch * num_blocks, block), x_im.reshape(groups, batch * num_blocks, block)
    matrix_re, matrix_im = _lower_triangular_powers(log_re, log_im, block, device, dtype)
    matrix_re, matrix_im = matrix_re.transpose(1, 2), matrix_im.transpose(1, 2)
    local_re = x_re @ matrix_re - x_im @ matrix_im
    local_im = x_re @ matrix_im + x_im @ matrix_re
    # S_c = ā^T S_{c-1} + local_c[T-1] over the chunks; the state entering chunk c is S_{c-1}
    ends_re = local_re[..., -1].reshape(groups, batch, num_blocks)
    ends_im = local_im[..., -1].reshape(groups, batch, num_blocks)
    end_re, end_im = diagonal_scan(ends_re, ends_im, log_re * block, log_im * block, levels - 1, block)
    enter_re = nn.functional.pad(end_re, (1, 0))[..., :num_blocks].reshape(groups, batch * num_blocks, 1)
    enter_im = nn.functional.pad(end_im, (1, 0))[..., :num_blocks].reshape(groups, batch * num_blocks, 1)
    offsets = torch.arange(1, block + 1, device=device, dtype=dtype)
    carry_re, carry_im = real_powers(log_re, log_im, offsets)  # ā^{t+1}, (G, T)
    carry_re, carry_im = carry_re.unsqueeze(1), carry_im.unsqueeze(1)
    s_re = local_re + carry_re * enter_re - carry_im * enter_im
    s_im = local_im + carry_re * enter_im + carry_im * enter_re
    padded = num_blocks * block
    return s_re.reshape(groups, batch, padded)[..., :length], s_im.reshape(groups, batch, padded)[..., :length]


def real_causal_convolution(inputs, log_re, log_im, weight_re, weight_im, chunk: int):
    """y_t = Σ_{j<=t} K_{t-j} u_j with K_k = Re Σ_n W_n ā_n^k, in real arithmetic (see the module
    docstring): O(B·H·L·(T + 4N)) multiply-adds for chunk T, any length.

    Args: inputs u (B, L, H); log_re, log_im (H, N) the parts of log ā = Δλ; weight_re, weight_im
    (H, N) the parts of W = C·B̄; chunk T. Returns: (B, L, H).
    """
    batch, length, channels = inputs.shape
    num_modes = log_re.shape[-1]
    dtype, device = inputs.dtype, inputs.device
    blocks, num_chunks = _pad_to_multiple(inputs.permute(2, 0, 1), chunk)  # (H, B, C*T)
    blocks = blocks.reshape(channels, batch * num_chunks, chunk)  # rows ordered (batch, chunk)
    offsets = torch.arange(chunk, device=device, dtype=dtype)
    power_re, power_im = real_powers(log_re, log_im, offsets)  # ā^t, (H, N, T)

    kernel = (weight_re.unsqueeze(-1) * power_re - weight_im.unsqueeze(-1) * power_im).sum(1)  # K_0..K_{T-1}
    lags = torch.arange(chunk, device=device)
    lag = lags.unsqueeze(0) - lags.unsqueeze(1)  # [j, t] = t - j
    toeplitz = torch.where(lag >= 0, kernel[:, lag.clamp(min=0)], torch.zeros((), dtype=dtype, device=device))
    outputs = blocks @ toeplitz  # in-chunk part, (H, B*C, T)

    # chunk-end states Σ_j ā^{T-1-j} u_j, then the recurrence over chunks, per (channel, mode)
    local_re = (blocks @ power_re.flip(-1).transpose(1, 2)).reshape(channels, batch, num_chunks, num_modes)
    local_im = (blocks @ power_im.flip(-1).transpose(1, 2)).reshape(channels, batch, num_chunks, num_modes)
    local_re = local_re.permute(0, 3, 1, 2).reshape(channels * num_modes, batch, num_chunks)  # (H*N, B, C)
    local_im = local_im.permute(0, 3, 1, 2).reshape(channels * num_modes, batch, num_chunks)
    end_re, end_im = diagonal_scan(local_re, local_im, (log_re * chunk).reshape(-1), (log_im * chunk).reshape(-1))
    # the state entering chunk c is the state at the end of chunk c-1
    rows = batch * num_chunks
    enter_re = nn.functional.pad(end_re, (1, 0))[..., :num_chunks].reshape(channels, num_modes, rows).transpose(1, 2)
    enter_im = nn.functional.pad(end_im, (1, 0))[..., :num_chunks].reshape(channels, num_modes, rows).transpose(1, 2)
    # readout Re Σ_n W_n ā_n^{t+1} S_n:  R = W ā^{t+1}
    step_re, step_im = real_powers(log_re, log_im, offsets + 1)
    readout_re = weight_re.unsqueeze(-1) * step_re - weight_im.unsqueeze(-1) * step_im  # (H, N, T)
    readout_im = weight_re.unsqueeze(-1) * step_im + weight_im.unsqueeze(-1) * step_re
    outputs = outputs + enter_re @ readout_re - enter_im @ readout_im  # (H, B*C, T)
    return outputs.reshape(channels, batch, num_chunks * chunk)[..., :length].permute(1, 2, 0)


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
        outputs = self.d * inputs + real_causal_convolution(
            inputs, self.log_a_re, self.log_a_im, self.w_re[0], self.w_im[0], self.chunk)
        if self.bidirectional:
            # y_t += Σ_{s>t} K1_{s-t-1} u_s: the causal convolution of the reversed sequence, one position later
            backward = real_causal_convolution(
                inputs.flip(1), self.log_a_re, self.log_a_im, self.w_re[1], self.w_im[1], self.chunk)
            outputs = outputs + nn.functional.pad(backward, (0, 0, 1, 0))[:, :-1].flip(1)
        return outputs


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


class WholeSequenceModule(nn.Module):
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
        config = model.config
        backbone = getattr(model, "s4dss", model)
        self.is_classifier = backbone is not model
        self.uses_tokens = bool(config.uses_tokens)
        self.encoder = copy.deepcopy(backbone.embeddings if self.uses_tokens else backbone.input_proj)
        self.blocks = nn.ModuleList(RealSequenceBlock(layer) for layer in backbone.layers)
        self.final_norm = copy.deepcopy(backbone.final_norm)
        self.classifier = copy.deepcopy(model.classifier) if self.is_classifier else None
        self.pooling = config.pooling if self.is_classifier else None
        self.d_model = config.d_model
        self.input_dim = None if self.uses_tokens else config.input_dim
        self.vocab_size = config.vocab_size if self.uses_tokens else None
        self.num_labels = config.num_labels if self.is_classifier else None
        self.check_input_values = bool(getattr(config, "check_input_values", True))
        self.requires_grad_(False)
        self.eval()

    @property
    def input_dtype(self) -> torch.dtype:
        return torch.int64 if self.uses_tokens else self.encoder.weight.dtype

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
    versions = {"torch": torch.__version__}
    if format == "onnx":
        for name in ("onnx", "onnxscript", "onnxruntime"):
            versions[name] = importlib.import_module(name).__version__
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
        "versions": versions,
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
