"""S4-DSS models: S4 sequence models whose sequence-mixing layers are Diagonal State Space layers.

A DSS layer gives every one of its H channels its own complex diagonal system with N modes
(see `kernel_s4dss.py` for the equations). The real output is `Re(...)` of the complex sum (the
DSS convention), so `d_state` counts complex modes and a layer is exactly a bank of H
single-input systems of order N, which is what balanced truncation reduces.

The input checks live in `validation_s4dss.py`, saving/loading/pushing in `hub_s4dss.py`. This
file is copied into saved checkpoints (remote code): it imports only torch, transformers and its
sibling modules (which travel with it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput
from transformers.utils.generic import can_return_tuple

from .compression import balanced_truncate_model, reduce_model
from .configuration_s4dss import S4DSSConfig
from .hub_s4dss import S4DSSHubMixin
from .initialization_s4dss import MODE_INITIALIZERS
from .kernel_s4dss import (
    chunked_convolution,
    convolution_chunk,
    fft_convolution,
    real_compute_dtype,
    recurrence_step,
    vandermonde_kernel,
    zoh_discretize,
)
from .model_card import derived_card_info
from .real_convolution_s4dss import real_convolution, real_convolution_chunk, real_discrete_system
from .shrink_search import shrink_model
from .streaming_real import RealStreamingModule
from .validation_s4dss import (
    check_attention_mask,
    check_device,
    check_tensor,
    check_token_ids,
    classification_loss,
    keep_valid,
    prepare_labels,
    value_checks_enabled,
)

# Parameters of the SSM dynamics (modes, step, input vector): they get `config.ssm_lr` and
# `config.ssm_weight_decay`. Matched by name, because attributes set on Parameter objects do not
# survive `from_pretrained`.
SSM_DYNAMICS_PARAMETER_NAMES = ("log_dt", "log_A_real", "A_imag", "B")


def _complex_view(real_pairs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., 2) real storage -> (...) complex tensor in the compute precision `dtype`."""
    return torch.view_as_complex(real_pairs.to(dtype).contiguous())


class S4DSSKernel(nn.Module):
    """The diagonal SSM of one DSS layer: H channels, N complex modes each.

    Stored as real tensors (Adam treats each real and imaginary part as its own coordinate):
        log_dt (H,)          Δ_h = exp(log_dt_h)
        log_A_real (H, N)    Re λ = -exp(log_A_real) < 0, so every mode is stable
        A_imag (H, N)        Im λ
        B (H, N, 2)          input vector b (real, imaginary)
        C (c, H, N, 2)       output vectors, c = 2 for a bidirectional layer (forward, backward)
        D (H,)               skip term
    The SSM math always runs in float32 (float64 for a float64 model), even under autocast.
    """

    def __init__(self, d_model: int, d_state: int, bidirectional: bool):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.bidirectional = bidirectional
        output_rows = 2 if bidirectional else 1
        # float32 (float64 in a float64 model) however the model is built: `from_config(dtype=bf16)`
        # and a bf16 default dtype would otherwise round the modes (the kernel moved by 25 %)
        dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        self.log_dt = nn.Parameter(torch.empty(d_model, dtype=dtype))
        self.log_A_real = nn.Parameter(torch.empty(d_model, d_state, dtype=dtype))
        self.A_imag = nn.Parameter(torch.empty(d_model, d_state, dtype=dtype))
        self.B = nn.Parameter(torch.empty(d_model, d_state, 2, dtype=dtype))
        self.C = nn.Parameter(torch.empty(output_rows, d_model, d_state, 2, dtype=dtype))
        self.D = nn.Parameter(torch.empty(d_model, dtype=dtype))

    def compute_dtype(self) -> torch.dtype:
        return real_compute_dtype(self.log_dt.dtype)

    def modes(self, dtype: torch.dtype) -> torch.Tensor:
        """λ = -exp(log_A_real) + i A_imag, (H, N) complex."""
        return torch.complex(-torch.exp(self.log_A_real.to(dtype)), self.A_imag.to(dtype))

    def discrete_system(self):
        """(log Ā, B̄, C) of the zero-order-hold system, in the compute precision."""
        dtype = self.compute_dtype()
        log_a_bar, input_bar = zoh_discretize(
            self.modes(dtype), self.log_dt.to(dtype), _complex_view(self.B, dtype)
        )
        return log_a_bar, input_bar, _complex_view(self.C, dtype)

    def convolution_kernel(self, length: int) -> torch.Tensor:
        """K[c, h, k] = Re Σ_n C[c,h,n] B̄[h,n] Ā[h,n]^k, shape (c, H, L)."""
        log_a_bar, input_bar, output_vec = self.discrete_system()
        return vandermonde_kernel(log_a_bar, output_vec * input_bar, length)

    # "auto": the measured cost rule of `convolution_chunk` picks FFT or chunked recurrence per
    # call; "fft" / "chunked" force one (same outputs, to rounding). Not saved with the model.
    convolution: str = "auto"

    def convolve(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, L, H) -> (B, L, H): y = K * u + D u, by FFT or by chunked recurrence."""
        length = inputs.shape[1]
        if self.convolution not in ("auto", "fft", "chunked"):
            raise ValueError(f"`convolution` must be 'auto', 'fft' or 'chunked', got {self.convolution!r}.")
        if torch.compiler.is_exporting():
            # transformers' exporters trace this forward: ONNX has no complex dtypes, and the choice
            # below reads the length as a Python int, which pins the graph to the traced length
            system = real_discrete_system(self.log_dt, self.log_A_real, self.A_imag, self.B, self.C, inputs.dtype)
            convolved = real_convolution(inputs, *system, real_convolution_chunk(self.d_state))
            return self.D.to(inputs.dtype) * inputs + convolved
        chunk = None
        if not self.bidirectional and self.convolution != "fft":
            chunk = convolution_chunk(self.d_state, length, force=self.convolution == "chunked")
        skip = self.D.to(inputs.dtype)
        if chunk is None:
            transposed = inputs.transpose(1, 2)  # (B, H, L)
            outputs = fft_convolution(transposed, self.convolution_kernel(length)) + skip.unsqueeze(-1) * transposed
            return outputs.transpose(1, 2)
        log_a_bar, input_bar, output_vec = self.discrete_system()
        # the contiguous skip term first: the sum then comes out contiguous in (B, L, H)
        return skip * inputs + chunked_convolution(inputs, log_a_bar, output_vec[0] * input_bar, chunk)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, L, H) -> (B, L, H): y = K * u + D u (two-sided K for a bidirectional layer)."""
        dtype = self.compute_dtype()
        if hidden_states.shape[0] == 0:  # the FFT refuses empty batches
            return hidden_states * 0
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            outputs = self.convolve(hidden_states.to(dtype))
        return outputs.to(hidden_states.dtype)

    def initial_state(self, batch_size: int) -> torch.Tensor:
        # A new stream rebuilds the step system, so even edits the version counters miss
        # (`param.data[...] = ...`) are seen from the next `init_streaming_state` on.
        self._step_cache = None
        complex_dtype = torch.complex128 if self.compute_dtype() == torch.float64 else torch.complex64
        return torch.zeros(batch_size, self.d_model, self.d_state, dtype=complex_dtype, device=self.log_dt.device)

    def step_system(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Ā, B̄, C, D) of the recurrence: (H, N) complex ×3 (C: forward row) and (H,) real.

        Discretising costs an exp and a division per mode, far more than the step itself, so the
        result is cached and rebuilt whenever a parameter changes: the key holds each parameter's
        identity, storage, dtype, device and autograd version counter, which every in-place update
        through the parameter (optimizer steps, `load_state_dict`, `copy_`) increments. When
        autograd is recording for a trainable kernel, the system is computed afresh so gradients
        reach the parameters.
        """
        parameters = (self.log_dt, self.log_A_real, self.A_imag, self.B, self.C, self.D)
        if torch.is_grad_enabled() and any(parameter.requires_grad for parameter in parameters):
            return self.compute_step_system()
        try:
            key = tuple((id(p), p.data_ptr(), p._version, p.dtype, p.device) for p in parameters)
        except RuntimeError:  # inference tensors (a model built under inference_mode) have no version
            return self.compute_step_system()
        cache = getattr(self, "_step_cache", None)
        if cache is None or cache[0] != key:
            # normal tensors even under inference_mode, so the cache also serves later no-grad calls
            with torch.inference_mode(False), torch.no_grad():
                cache = (key, self.compute_step_system())
            self._step_cache = cache
        return cache[1]

    def compute_step_system(self):
        """`step_system` without the cache (differentiable)."""
        dtype = self.compute_dtype()
        log_a_bar, input_bar, output_vec = self.discrete_system()
        return torch.exp(log_a_bar), input_bar, output_vec[0], self.D.to(dtype)

    def step(self, inputs: torch.Tensor, state: torch.Tensor):
        """One time step: (B, H) input and (B, H, N) state -> ((B, H) output, new state)."""
        a_bar, input_bar, output_vec, skip = self.step_system()
        with torch.autocast(device_type=inputs.device.type, enabled=False):
            inputs_c = inputs.to(skip.dtype)
            outputs, new_state = recurrence_step(state, inputs_c, a_bar, input_bar, output_vec)
            outputs = outputs + skip * inputs_c
        return outputs.to(inputs.dtype), new_state


class S4DSSBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the channel axis of (B, L, H) tensors whose batch statistics use only the
    valid positions of `mask`, so padding never changes a valid output. In eval mode it is the
    fixed affine map  (x - running_mean) / sqrt(running_var + eps) · weight + bias."""

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.training and hidden_states.shape[0] > 0:  # an empty batch has no statistics
            flat = hidden_states.reshape(-1, hidden_states.shape[-1])
            if mask is None:
                count = torch.tensor(flat.shape[0], dtype=flat.dtype, device=flat.device)
                mean = flat.mean(0)
                var = ((flat - mean) ** 2).mean(0)
            else:  # selection, not multiplication: a NaN at a padded position stays out of the statistics
                valid = mask.reshape(-1, 1)
                count = valid.sum().to(flat.dtype)
                flat = keep_valid(flat, valid)  # before any arithmetic: NaN would reach the gradients
                mean = flat.sum(0) / count
                var = keep_valid((flat - mean) ** 2, valid).sum(0) / count
            with torch.no_grad():
                unbiased = var * count / torch.clamp(count - 1, min=1)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), self.momentum)
                self.num_batches_tracked.add_(1)
        else:
            mean, var = self.running_mean, self.running_var
        return (hidden_states - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class S4DSSBlock(GradientCheckpointingLayer):
    """Residual DSS block:  z = norm(x) (pre-norm) -> DSS conv + D -> GELU -> dropout
    -> Linear(H, 2H) + GLU -> dropout -> x + z -> norm (post-norm)."""

    def __init__(self, config: S4DSSConfig, layer_idx: int):
        super().__init__()
        self.prenorm = config.prenorm
        self.norm = _make_norm(config)
        self.kernel = S4DSSKernel(config.d_model, config.layer_d_states[layer_idx], config.bidirectional)
        self.dropout = nn.Dropout(config.dropout)
        self.output_linear = nn.Linear(config.d_model, 2 * config.d_model)

    def _mix(self, normed: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        """Everything after the SSM: position-wise, so the streaming step shares it."""
        mixed = self.dropout(nn.functional.gelu(mixed))
        return self.dropout(nn.functional.glu(self.output_linear(mixed), dim=-1))

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        normed = _apply_norm(self.norm, hidden_states, mask) if self.prenorm else hidden_states
        normed = keep_valid(normed, mask)  # padded positions feed nothing into the SSM, in either direction
        hidden_states = hidden_states + self._mix(normed, self.kernel(normed))
        return hidden_states if self.prenorm else _apply_norm(self.norm, hidden_states, mask)

    def step(self, hidden_states: torch.Tensor, state: torch.Tensor):
        """(B, H) input of one position -> ((B, H) output, new SSM state)."""
        normed = _apply_norm(self.norm, hidden_states, None) if self.prenorm else hidden_states
        mixed, state = self.kernel.step(normed, state)
        hidden_states = hidden_states + self._mix(normed, mixed)
        return (hidden_states if self.prenorm else _apply_norm(self.norm, hidden_states, None)), state


def _make_norm(config: S4DSSConfig) -> nn.Module:
    if config.norm == "batch":
        return S4DSSBatchNorm(config.d_model, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)


def _apply_norm(norm: nn.Module, hidden_states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if isinstance(norm, S4DSSBatchNorm):
        return norm(hidden_states, mask)
    return norm(hidden_states)


@dataclass
class S4DSSStreamingState:
    """State of a streaming (recurrent) pass: one (B, H, N_l) complex SSM state per layer, the
    number of positions consumed, and the running sum of outputs for mean pooling."""

    ssm_states: tuple[torch.Tensor, ...]
    steps: int = 0
    pooled_sum: torch.Tensor | None = None


class S4DSSPreTrainedModel(S4DSSHubMixin, PreTrainedModel):
    config_class = S4DSSConfig
    config: S4DSSConfig
    base_model_prefix = "s4dss"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["S4DSSBlock"]
    _keep_in_fp32_modules_strict = ["kernel"]
    # The loss is a plain mean: the Trainer must scale it for gradient accumulation itself.
    accepts_loss_kwargs = False

    def __init__(self, config: S4DSSConfig, *inputs, **kwargs):
        config.check_s4dss_fields()  # attributes may have been edited after construction
        super().__init__(config, *inputs, **kwargs)
        self.main_input_name = "input_ids" if config.uses_tokens else "input_values"

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, S4DSSKernel):
            config = self.config
            channels, num_modes = module.d_model, module.d_state
            log_dt = torch.rand(channels, dtype=torch.float64)
            log_dt = log_dt * (math.log(config.dt_max) - math.log(config.dt_min)) + math.log(config.dt_min)
            init.copy_(module.log_dt, log_dt)
            modes = MODE_INITIALIZERS[config.init](num_modes).expand(channels, num_modes)
            init.copy_(module.log_A_real, torch.log(-modes.real))
            init.copy_(module.A_imag, modes.imag)
            input_vec = torch.zeros(channels, num_modes, 2, dtype=torch.float64)
            input_vec[..., 0] = 1.0
            init.copy_(module.B, input_vec)
            # complex standard normal: E|C|^2 = 1
            init.normal_(module.C, mean=0.0, std=math.sqrt(0.5))
            init.normal_(module.D, mean=0.0, std=1.0)

    def balanced_truncate(self, rank=None, *, tol=None, time: str = "discrete", kernel_length: int = 1024,
                          workers: int | None = None):
        """Compress every DSS layer by balanced truncation; returns a NEW model of the same class.

        Each channel of each layer is the real-output linear system the layer computes (by
        default the discrete-time system after zero-order hold; `time="continuous"` balances
        the continuous-time system instead). It is balanced, truncated to its largest Hankel
        singular values, re-diagonalised and stored as `rank` complex diagonal modes. A
        bidirectional layer's channel is one input with two outputs (forward and backward
        kernels), balanced together so the modes stay shared.

        Args:
            rank (`int` or `list[int]`): complex modes per channel after compression (the unit of
                `config.d_state`), for all layers or one value per layer; 1 <= rank <= d_state.
            tol (`float` in (0, 1]): instead of `rank`, the smallest rank per layer whose kept
                Hankel energy (Σ kept σ / Σ σ over the layer's channels) reaches `tol`.
            time (`str`): `"discrete"` (default) or `"continuous"`.
            kernel_length (`int`): length over which the report measures the kernel error.
            workers (`int`): threads for the reduction (default: torch's thread count).

        The new model has the same device and dtypes, `config.d_state` = the ranks, every
        non-SSM weight (and each channel's step Δ and skip D) unchanged, and a
        `compression_report` (`CompressionReport`) that `save_pretrained` writes as JSON. For the
        discrete-time system the a-priori bound 2 Σ_{i>m} σ_i (m real states kept) bounds the
        ℓ2 norm of each channel's whole kernel error, both output rows together.
        """
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ValueError(f"balanced_truncate: `workers` must be a positive int or None, got {workers!r}.")
        compressed = balanced_truncate_model(self, rank, tol=tol, time=time, kernel_length=kernel_length,
                                             workers=workers)
        compressed.card_info = derived_card_info(self)
        return compressed

    def reduce(self, method: str = "balanced_truncation", rank=None, *, tol=None, budget=None,
               time: str = "discrete", kernel_length: int = 1024, workers: int | None = None,
               calibration_data=None, **method_options):
        """Compress every DSS layer with a model-reduction `method`; returns a NEW model of the same
        class (this one is never modified), with `config.d_state` = the ranks and a
        `compression_report`.

        Methods (each channel of each layer is the real-output linear system it computes):
            `"balanced_truncation"`: see `balanced_truncate`.
            `"singular_perturbation"`: balanced residualisation; keeps every channel's DC gain
                (Σ_k K_k + D) exactly, same a-priori bound 2 Σ_{i>m} σ_i; its direct term goes into D.
            `"modal_truncation"`: keeps each channel's `rank` modes with the largest H∞ score
                |w|/(1 - |ā|), unchanged; option `match_dc=True` moves the dropped modes' DC gain
                into D (modal singular perturbation).
            `"h2"`: minimises each channel's H2 (kernel ℓ2) error from the balanced truncation of the
                same rank, never worse than it; option `max_iterations` (L-BFGS, default 50, at
                most 10000; it stops earlier at convergence).
            `"last"`, `"aire"`: the peers' state pruning (LAST: H∞ norm |w|/(1 - |ā|) of each state;
                AIRE-Prune: its H2 energy |w|²/(1 - |ā|²)): each channel keeps its `rank` best modes,
                unchanged; `budget` splits the states by the paper's layer-normalised scores and one
                global threshold. No `tol`.

        Args:
            rank (`int` or `list[int]`), tol (`float`): as in `balanced_truncate` (tol picks ranks
                from the Hankel singular values, whatever the method).
            budget (`int` or `float`): instead, a model-wide size — an int is the total number of
                complex modes (Σ_layers d_model · rank), a float in (0, 1] a fraction of the SSM
                parameters — split between the layers to minimise the discarded Hankel energy
                (`"last"`, `"aire"`: by their layer-normalised scores, one global threshold).
            time (`str`): `"discrete"` (default) or `"continuous"` system.
            kernel_length (`int`): length over which the report measures the kernel error.
            workers (`int`): threads for the reduction (default: torch's thread count).
            calibration_data (a batch, a `dict` of tensors or numpy arrays, or any iterable of them, e.g.
                a `DataLoader`): batches the model takes; if
                given, each channel's output vectors C and skip D are refit by least squares so that
                every reduced layer reproduces the original layer's output on its real inputs.
            **method_options: options of the method (see above).
        """
        compressed = reduce_model(self, method, rank, tol=tol, budget=budget, time=time, kernel_length=kernel_length,
                                  workers=workers, calibration_data=calibration_data, **method_options)
        compressed.card_info = derived_card_info(self)
        return compressed

    def shrink(self, validation_data, max_drop: float = 0.005, *, methods=None, refit=False, calibration_data=None,
               metric: str | None = None, log=None, **reduce_options):
        """The smallest reduced model (fewest SSM states) whose validation metric is within `max_drop`
        of this model's; a NEW model (this one is never modified), with a `shrink_report` recording
        every candidate evaluated (and, if one was found, the chosen reduction's `compression_report`).

        The search tries model-wide budgets (`reduce(method, budget=...)`) of every method, by
        bisection assuming a larger budget is never worse: about log2(n_layers · d_state) + 1
        evaluations for the first method, one more for each method that cannot beat the best so far.

        Args:
            validation_data: a batch with `labels` (a dict of tensors or numpy arrays) or any iterable
                of them (a `DataLoader`): what the candidates are judged on.
            max_drop (`float`): the tolerance: accuracy, F1 or exact match may fall by at most
                `max_drop` (0.005 = half a point); loss, MSE or MAE may grow by at most this fraction.
            methods (`str` or list): reduction methods to search (default: all of `REDUCTION_METHODS`).
            refit (`bool` or list of `bool`): with the data-aware refit (needs `calibration_data`,
                training batches as in `reduce`), without, or both (`[False, True]`).
            metric (`str`): default by the problem type: accuracy (single-label), f1 (multi-label),
                mse (regression); or one of accuracy, f1, exact_match, loss, mse, mae.
            log: a callable receiving one line per candidate (e.g. `print`).
            **reduce_options: passed to every `reduce` (e.g. `time="continuous"`).
        """
        shrunk = shrink_model(self, validation_data, max_drop, methods=methods, refit=refit,
                              calibration_data=calibration_data, metric=metric, log=log, **reduce_options)
        shrunk.card_info = derived_card_info(self)
        return shrunk

    # ------------------------------------------------------------------ input checks
    def _check_streaming_state(self, state, hidden_states: torch.Tensor) -> None:
        """`state` must fit this model and the input: one (batch, d_model, d_state) state per layer in
        the kernel's complex dtype and on its device, and a non-negative step count. Metadata only."""
        if not isinstance(state, S4DSSStreamingState):
            raise TypeError(f"`state` must be an S4DSSStreamingState from this model's `init_streaming_state`, got "
                            f"{type(state).__name__}.")
        layer_states = state.ssm_states
        if not isinstance(layer_states, (tuple, list)) or len(layer_states) != len(self.layers):
            got = f"{len(layer_states)} layer states" if isinstance(layer_states, (tuple, list)) else (
                type(layer_states).__name__)
            raise ValueError(f"`state` does not fit this model: it has {len(self.layers)} layers, the state holds "
                             f"{got}; use this model's `init_streaming_state`.")
        batch = hidden_states.shape[0]
        for index, (layer, layer_state) in enumerate(zip(self.layers, layer_states, strict=True)):
            kernel = layer.kernel
            expected = (batch, kernel.d_model, kernel.d_state)
            dtype = torch.complex128 if kernel.compute_dtype() == torch.float64 else torch.complex64
            name = f"state.ssm_states[{index}]"
            if not isinstance(layer_state, torch.Tensor):
                raise TypeError(f"`{name}` (layer {index}) must be a tensor, got {type(layer_state).__name__}.")
            shape = tuple(layer_state.shape)
            if shape[1:] == expected[1:] and shape[0] != batch:
                raise ValueError(f"`{name}` (layer {index}) holds {shape[0]} sequences but the input has {batch}.")
            if shape != expected:
                raise ValueError(
                    f"`state` does not fit this model: layer {index} holds a state of shape {shape}, expected "
                    f"{expected} (batch, d_model, d_state); use this model's `init_streaming_state`."
                )
            if layer_state.dtype != dtype:
                raise TypeError(f"`{name}` (layer {index}) must be {dtype}, got {layer_state.dtype}.")
            device = kernel.log_dt.device
            if layer_state.device != device:
                check_device(name, layer_state, device)
        steps = state.steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"`state.steps` counts the positions consumed: a non-negative int, got {steps!r}.")

    def _check_streaming_allowed(self) -> None:
        if self.config.bidirectional:
            raise ValueError("Streaming needs a unidirectional model: this one has `bidirectional=True`.")
        if self.training:
            raise ValueError("Streaming runs the model as in inference: call `model.eval()` first.")


class S4DSSModel(S4DSSPreTrainedModel):
    """The S4-DSS backbone: encoder (embedding for `input_ids`, linear for `input_values`) ->
    `n_layers` residual DSS blocks -> final norm (pre-norm models)."""

    def __init__(self, config: S4DSSConfig):
        super().__init__(config)
        if config.uses_tokens:
            self.embeddings = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_token_id)
        else:
            self.input_proj = nn.Linear(config.input_dim, config.d_model)
        self.layers = nn.ModuleList([S4DSSBlock(config, i) for i in range(config.n_layers)])
        self.final_norm = _make_norm(config) if config.prenorm else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings if self.config.uses_tokens else None

    def set_input_embeddings(self, value):
        if not self.config.uses_tokens:
            raise ValueError("This S4-DSS model reads `input_values`; it has no token embedding.")
        self.embeddings = value

    def _encode(self, input_ids, input_values, inputs_embeds, sequence_axis: bool, attention_mask=None):
        """Check the one given input and its mask, and map the input to (B, [L,] H) hidden states.
        Returns (hidden states, mask as bool (B, L) or None). Padded positions of the input are set
        to 0 by selection before the encoder, so nothing there reaches a valid output or a gradient."""
        given = [name for name, value in (("input_ids", input_ids), ("input_values", input_values),
                                          ("inputs_embeds", inputs_embeds)) if value is not None]
        if len(given) != 1:
            raise ValueError(
                "Pass exactly one of `input_ids`, `input_values` or `inputs_embeds`"
                + (f"; got {', '.join(given)}." if given else "; got none.")
            )
        lead = "(batch, length" if sequence_axis else "(batch"
        config = self.config
        check_values = value_checks_enabled(config)
        rank = 3 if sequence_axis else 2
        if inputs_embeds is not None:
            check_tensor("inputs_embeds", inputs_embeds, rank, floating=True, device=self._weight_device("layers"))
            if inputs_embeds.shape[-1] != config.d_model:
                raise ValueError(
                    f"`inputs_embeds` must have shape {lead}, {config.d_model}), got {tuple(inputs_embeds.shape)}."
                )
            mask = self._mask_for(attention_mask, inputs_embeds, sequence_axis, check_values)
            return keep_valid(inputs_embeds, mask), mask
        if input_ids is not None:
            if not config.uses_tokens:
                raise ValueError(
                    f"This model reads real-valued `input_values` {lead}, {config.input_dim}), not `input_ids`."
                )
            check_tensor("input_ids", input_ids, rank - 1, floating=False, device=self._weight_device("embeddings"))
            if check_values:
                check_token_ids(input_ids, config.vocab_size)
            mask = self._mask_for(attention_mask, input_ids, sequence_axis, check_values)
            return keep_valid(self.embeddings(input_ids), mask), mask
        if config.uses_tokens:
            raise ValueError(f"This model reads token `input_ids` {lead}), not `input_values`.")
        check_tensor("input_values", input_values, rank, floating=True, device=self._weight_device("input_proj"))
        if input_values.shape[-1] != config.input_dim:
            raise ValueError(
                f"`input_values` must have shape {lead}, {config.input_dim}), got {tuple(input_values.shape)}"
                + (" (add a trailing axis with `.unsqueeze(-1)`)." if config.input_dim == 1 else ".")
            )
        mask = self._mask_for(attention_mask, input_values, sequence_axis, check_values)
        return self.input_proj(keep_valid(input_values, mask).to(self.input_proj.weight.dtype)), mask

    def _mask_for(self, attention_mask, inputs: torch.Tensor, sequence_axis: bool, check_values: bool):
        if not sequence_axis:
            return None
        return check_attention_mask(attention_mask, inputs.shape[:2], inputs.device, check_values)

    def _weight_device(self, module_name: str) -> torch.device | None:
        """Device of the first weight of the submodule that reads an input (None if it has none)."""
        module = getattr(self, module_name, None)
        parameter = next(iter(module.parameters()), None) if module is not None else None
        return None if parameter is None else parameter.device

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        input_values: torch.FloatTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> BaseModelOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, length)`): token ids (models with `vocab_size`).
            input_values (`torch.FloatTensor` of shape `(batch, length, input_dim)`): real-valued
                inputs, e.g. pixel sequences (models with `input_dim`).
            inputs_embeds (`torch.FloatTensor` of shape `(batch, length, d_model)`): bypass the encoder.
            attention_mask (`torch.Tensor` of shape `(batch, length)`): 1 for valid, 0 for padded
                positions; a padded position never changes the output at a valid one.
            output_hidden_states (`bool`): also return the input of every block and the final output.
            token_type_ids: accepted and ignored (the model has no segment embeddings; BERT-style
                tokenizers and the text-classification pipeline pass it).
        """
        hidden_states, mask = self._encode(input_ids, input_values, inputs_embeds, sequence_axis=True,
                                           attention_mask=attention_mask)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        all_hidden_states = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = layer(hidden_states, mask)
        if self.final_norm is not None:
            hidden_states = _apply_norm(self.final_norm, hidden_states, mask)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=all_hidden_states)

    # ------------------------------------------------------------------ streaming
    def init_streaming_state(self, batch_size: int) -> S4DSSStreamingState:
        """Zero state for `streaming_step` (unidirectional models in eval mode)."""
        self._check_streaming_allowed()
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
        return S4DSSStreamingState(ssm_states=tuple(layer.kernel.initial_state(batch_size) for layer in self.layers))

    def streaming_step(
        self, state: S4DSSStreamingState, input_ids=None, input_values=None, inputs_embeds=None
    ) -> tuple[torch.Tensor, S4DSSStreamingState]:
        """Consume one position per sequence: `input_ids` (B,), `input_values` (B, input_dim) or
        `inputs_embeds` (B, d_model). Returns the (B, d_model) output at that position, equal to
        `forward(...).last_hidden_state[:, t]` over the whole sequence, and the new state (the
        given state is not modified)."""
        self._check_streaming_allowed()
        hidden_states, _ = self._encode(input_ids, input_values, inputs_embeds, sequence_axis=False)
        self._check_streaming_state(state, hidden_states)
        new_states = []
        for layer, layer_state in zip(self.layers, state.ssm_states, strict=True):
            hidden_states, layer_state = layer.step(hidden_states, layer_state)
            new_states.append(layer_state)
        if self.final_norm is not None:
            hidden_states = _apply_norm(self.final_norm, hidden_states, None)
        return hidden_states, S4DSSStreamingState(tuple(new_states), state.steps + 1, state.pooled_sum)

    def streaming_module(self) -> RealStreamingModule:
        """A frozen copy of this eval-mode model's streaming step with only real tensors (each
        complex mode as a (re, im) pair): what `s4bt_hf.export` exports. See `RealStreamingModule`."""
        return RealStreamingModule(self)


class S4DSSForSequenceClassification(S4DSSPreTrainedModel):
    """S4-DSS backbone, pooling over the valid positions (`config.pooling`: mean or last), and a
    linear classifier. The loss follows `config.problem_type` like every transformers
    `*ForSequenceClassification` model (regression, single-label, multi-label)."""

    def __init__(self, config: S4DSSConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.s4dss = S4DSSModel(config)
        self.classifier = nn.Linear(config.d_model, config.num_labels)
        self.post_init()

    def get_input_embeddings(self):
        return self.s4dss.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.s4dss.set_input_embeddings(value)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        input_values: torch.FloatTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        r"""
        Inputs as in [`S4DSSModel.forward`] (`token_type_ids` accepted and ignored).

        labels (`torch.Tensor`, *optional*): class ids `(batch,)` for single-label classification,
            floats `(batch,)`/`(batch, num_labels)` for regression, 0/1 floats `(batch, num_labels)`
            for multi-label classification.
        """
        outputs = self.s4dss(
            input_ids=input_ids,
            input_values=input_values,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        mask = None if attention_mask is None else attention_mask != 0  # validated by the backbone
        logits = self.classifier(_pool(hidden_states, mask, self.config.pooling))
        loss = None
        if labels is not None:
            # the problem type is decided once, here, and the labels cast to what its loss needs
            problem, labels = prepare_labels(labels, logits, self.config.problem_type,
                                             value_checks_enabled(self.config))
            if self.config.problem_type is None and not torch.compiler.is_compiling():
                self.config.problem_type = problem  # recorded as every transformers classifier does
            loss = classification_loss(problem, logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)

    # ------------------------------------------------------------------ streaming
    def init_streaming_state(self, batch_size: int) -> S4DSSStreamingState:
        return self.s4dss.init_streaming_state(batch_size)

    def streaming_step(
        self, state: S4DSSStreamingState, input_ids=None, input_values=None, inputs_embeds=None
    ) -> tuple[torch.Tensor, S4DSSStreamingState]:
        """Consume one position per sequence and return the logits of the prefix read so far
        (equal to `forward` on that prefix), with the new state. Pooling is incremental."""
        pooled_sum = getattr(state, "pooled_sum", None)
        hidden_states, state = self.s4dss.streaming_step(state, input_ids, input_values, inputs_embeds)
        if self.config.pooling == "mean":
            self._check_pooled_sum(pooled_sum, state.steps - 1, hidden_states)
            pooled_sum = hidden_states if state.pooled_sum is None else state.pooled_sum + hidden_states
            state = S4DSSStreamingState(state.ssm_states, state.steps, pooled_sum)
            pooled = pooled_sum / state.steps
        else:
            pooled = hidden_states
        return self.classifier(pooled), state

    @staticmethod
    def _check_pooled_sum(pooled_sum, steps: int, hidden_states: torch.Tensor) -> None:
        """Mean pooling: the running sum is None before the first position, then (batch, d_model)."""
        if pooled_sum is None and steps == 0:
            return
        if pooled_sum is None or steps == 0:
            raise ValueError(f"`state.pooled_sum` is {'None' if pooled_sum is None else 'set'} after {steps} steps: "
                             "a mean-pooling state from this classifier's `init_streaming_state` has a sum exactly "
                             "when it has read a position.")
        expected = tuple(hidden_states.shape)
        if not isinstance(pooled_sum, torch.Tensor) or tuple(pooled_sum.shape) != expected or (
            pooled_sum.dtype != hidden_states.dtype
        ):
            got = (f"{pooled_sum.dtype} of shape {tuple(pooled_sum.shape)}" if isinstance(pooled_sum, torch.Tensor)
                   else type(pooled_sum).__name__)
            raise ValueError(f"`state.pooled_sum` must be {hidden_states.dtype} of shape {expected} "
                             f"(batch, d_model), got {got}.")
        check_device("state.pooled_sum", pooled_sum, hidden_states.device)

    def streaming_module(self) -> RealStreamingModule:
        """A frozen copy of this eval-mode classifier's streaming step with only real tensors,
        mean pooling carried in the state: what `s4bt_hf.export` exports. See `RealStreamingModule`."""
        return RealStreamingModule(self)


def _pool(hidden_states: torch.Tensor, mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """Mean over valid positions, or the last valid position, of (B, L, H) -> (B, H)."""
    if mask is None:
        return hidden_states.mean(1) if pooling == "mean" else hidden_states[:, -1]
    if pooling == "mean":
        count = mask.sum(1, keepdim=True).to(hidden_states.dtype)
        return keep_valid(hidden_states, mask).sum(1) / count
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, positions, -1).max(dim=1).values
    return hidden_states[torch.arange(hidden_states.shape[0], device=mask.device), last]


__all__ = [
    "S4DSSForSequenceClassification",
    "S4DSSModel",
    "S4DSSPreTrainedModel",
    "S4DSSStreamingState",
]
