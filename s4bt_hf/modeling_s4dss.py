"""S4-DSS models: S4 sequence models whose sequence-mixing layers are Diagonal State Space layers.

A DSS layer gives every one of its H channels its own complex diagonal system with N modes
(see `kernel_s4dss.py` for the equations). The real output is `Re(...)` of the complex sum (the
DSS convention), so `d_state` counts complex modes and a layer is exactly a bank of H
single-input systems of order N, which is what balanced truncation reduces.

This file is copied into saved checkpoints (remote code): it imports only torch, transformers
and its sibling modules.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput
from transformers.utils import cached_file
from transformers.utils.generic import can_return_tuple

from .compression import balanced_truncate_model
from .compression_report import REPORT_FILE, CompressionReport
from .configuration_s4dss import S4DSSConfig
from .initialization_s4dss import MODE_INITIALIZERS
from .kernel_s4dss import (
    fft_convolution,
    real_compute_dtype,
    recurrence_step,
    vandermonde_kernel,
    zoh_discretize,
)
from .model_card import is_generated_card, render_model_card

AUTO_MAP = {
    "AutoConfig": "configuration_s4dss.S4DSSConfig",
    "AutoModel": "modeling_s4dss.S4DSSModel",
    "AutoModelForSequenceClassification": "modeling_s4dss.S4DSSForSequenceClassification",
}

# `from_pretrained` arguments that say where and how to fetch files of a checkpoint.
_HUB_OPTIONS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")

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
        self.log_dt = nn.Parameter(torch.empty(d_model))
        self.log_A_real = nn.Parameter(torch.empty(d_model, d_state))
        self.A_imag = nn.Parameter(torch.empty(d_model, d_state))
        self.B = nn.Parameter(torch.empty(d_model, d_state, 2))
        self.C = nn.Parameter(torch.empty(output_rows, d_model, d_state, 2))
        self.D = nn.Parameter(torch.empty(d_model))

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

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, L, H) -> (B, L, H): y = K * u + D u (two-sided K for a bidirectional layer)."""
        dtype = self.compute_dtype()
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            inputs = hidden_states.to(dtype).transpose(1, 2)  # (B, H, L)
            kernel = self.convolution_kernel(inputs.shape[-1])
            outputs = fft_convolution(inputs, kernel) + self.D.to(dtype).unsqueeze(-1) * inputs
        return outputs.transpose(1, 2).to(hidden_states.dtype)

    def initial_state(self, batch_size: int) -> torch.Tensor:
        complex_dtype = torch.complex128 if self.compute_dtype() == torch.float64 else torch.complex64
        return torch.zeros(batch_size, self.d_model, self.d_state, dtype=complex_dtype, device=self.log_dt.device)

    def step(self, inputs: torch.Tensor, state: torch.Tensor):
        """One time step: (B, H) input and (B, H, N) state -> ((B, H) output, new state)."""
        dtype = self.compute_dtype()
        log_a_bar, input_bar, output_vec = self.discrete_system()
        with torch.autocast(device_type=inputs.device.type, enabled=False):
            inputs_c = inputs.to(dtype)
            outputs, new_state = recurrence_step(state, inputs_c, torch.exp(log_a_bar), input_bar, output_vec[0])
            outputs = outputs + self.D.to(dtype) * inputs_c
        return outputs.to(inputs.dtype), new_state


class S4DSSBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the channel axis of (B, L, H) tensors whose batch statistics use only the
    valid positions of `mask`, so padding never changes a valid output. In eval mode it is the
    fixed affine map  (x - running_mean) / sqrt(running_var + eps) · weight + bias."""

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.training:
            flat = hidden_states.reshape(-1, hidden_states.shape[-1])
            weights = (
                torch.ones(flat.shape[0], 1, dtype=flat.dtype, device=flat.device)
                if mask is None
                else mask.reshape(-1, 1).to(flat.dtype)
            )
            count = weights.sum()
            mean = (flat * weights).sum(0) / count
            var = (((flat - mean) ** 2) * weights).sum(0) / count
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
        if mask is not None:  # padded positions feed nothing into the SSM, in either direction
            normed = normed * mask.unsqueeze(-1).to(normed.dtype)
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


class S4DSSPreTrainedModel(PreTrainedModel):
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

    # Set by `balanced_truncate` (and read back by `from_pretrained`): what the compression did.
    compression_report: CompressionReport | None = None

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also writes the configuration and modeling code with a full `auto_map`, so that
        `AutoModel`/`AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)`
        work where `s4bt_hf` is not installed, and the compression report of a compressed model
        (`compression_report.json`)."""
        self.config.auto_map = dict(AUTO_MAP)
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            report_path = os.path.join(save_directory, REPORT_FILE)
            if self.compression_report is not None:
                self.compression_report.save(save_directory)
            elif os.path.exists(report_path):  # left by a compressed model saved here before
                os.remove(report_path)
            self._write_model_card(save_directory)
        return result

    def _write_model_card(self, save_directory) -> None:
        """README.md from the MODEL_CARD.md template, unless the folder holds a card someone wrote."""
        path = os.path.join(save_directory, "README.md")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                if not is_generated_card(handle.read()):
                    return
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(render_model_card(self))

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
                    private: bool | None = None, token: str | bool | None = None, max_shard_size="50GB",
                    create_pr: bool = False, revision: str | None = None, tags: list[str] | None = None):
        """`PreTrainedModel.push_to_hub` with this package's model card (architecture and
        compression report) instead of the generic one; a card already on the Hub that was not
        generated by this package is kept."""
        from huggingface_hub import HfApi, ModelCard
        from huggingface_hub.errors import EntryNotFoundError

        repo_id = HfApi(token=token).create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        try:
            existing = ModelCard.load(repo_id, token=token)
        except EntryNotFoundError:
            existing = None
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, max_shard_size=max_shard_size)
            if existing is not None and not is_generated_card(existing.content):
                existing.save(os.path.join(folder, "README.md"))
            elif tags:
                with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as handle:
                    handle.write(render_model_card(self, tags=tags))
            return self._upload_modified_files(
                folder,
                repo_id,
                files_timestamps={},
                commit_message=commit_message,
                token=token,
                create_pr=create_pr,
                revision=revision,
                commit_description=commit_description,
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, plus the compression report of a compressed
        checkpoint (`compression_report.json`, from a folder or a Hub repo)."""
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        hub_options = {name: kwargs[name] for name in _HUB_OPTIONS if name in kwargs}
        report_path = cached_file(str(pretrained_model_name_or_path), REPORT_FILE,
                                  _raise_exceptions_for_missing_entries=False,
                                  _raise_exceptions_for_connection_errors=False, **hub_options)
        if report_path is not None:
            model.compression_report = CompressionReport.load(os.path.dirname(report_path))
        return model

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
        return balanced_truncate_model(self, rank, tol=tol, time=time, kernel_length=kernel_length,
                                       workers=workers)

    # ------------------------------------------------------------------ input checks
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

    def _encode(self, input_ids, input_values, inputs_embeds, sequence_axis: bool) -> torch.Tensor:
        """Check the one given input and map it to (B, [L,] H) hidden states."""
        given = [name for name, value in (("input_ids", input_ids), ("input_values", input_values),
                                          ("inputs_embeds", inputs_embeds)) if value is not None]
        if len(given) != 1:
            raise ValueError(
                "Pass exactly one of `input_ids`, `input_values` or `inputs_embeds`"
                + (f"; got {', '.join(given)}." if given else "; got none.")
            )
        lead = "(batch, length" if sequence_axis else "(batch"
        config = self.config
        if inputs_embeds is not None:
            _check_tensor("inputs_embeds", inputs_embeds, 3 if sequence_axis else 2, floating=True)
            if inputs_embeds.shape[-1] != config.d_model:
                raise ValueError(
                    f"`inputs_embeds` must have shape {lead}, {config.d_model}), got {tuple(inputs_embeds.shape)}."
                )
            return inputs_embeds
        if input_ids is not None:
            if not config.uses_tokens:
                raise ValueError(
                    f"This model reads real-valued `input_values` {lead}, {config.input_dim}), not `input_ids`."
                )
            _check_tensor("input_ids", input_ids, 2 if sequence_axis else 1, floating=False)
            if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= config.vocab_size):
                raise ValueError(
                    f"`input_ids` holds ids outside the vocabulary [0, {config.vocab_size}): "
                    f"min {int(input_ids.min())}, max {int(input_ids.max())}."
                )
            return self.embeddings(input_ids)
        if config.uses_tokens:
            raise ValueError(f"This model reads token `input_ids` {lead}), not `input_values`.")
        _check_tensor("input_values", input_values, 3 if sequence_axis else 2, floating=True)
        if input_values.shape[-1] != config.input_dim:
            raise ValueError(
                f"`input_values` must have shape {lead}, {config.input_dim}), got {tuple(input_values.shape)}"
                + (" (add a trailing axis with `.unsqueeze(-1)`)." if config.input_dim == 1 else ".")
            )
        return self.input_proj(input_values.to(self.input_proj.weight.dtype))

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        input_values: torch.FloatTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
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
        """
        hidden_states = self._encode(input_ids, input_values, inputs_embeds, sequence_axis=True)
        mask = _check_attention_mask(attention_mask, hidden_states.shape[:2])
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
        if not isinstance(state, S4DSSStreamingState) or len(state.ssm_states) != len(self.layers):
            raise ValueError("`state` must come from this model's `init_streaming_state`.")
        hidden_states = self._encode(input_ids, input_values, inputs_embeds, sequence_axis=False)
        if hidden_states.shape[0] != state.ssm_states[0].shape[0]:
            raise ValueError(
                f"The state holds {state.ssm_states[0].shape[0]} sequences but the input has {hidden_states.shape[0]}."
            )
        new_states = []
        for layer, layer_state in zip(self.layers, state.ssm_states, strict=True):
            hidden_states, layer_state = layer.step(hidden_states, layer_state)
            new_states.append(layer_state)
        if self.final_norm is not None:
            hidden_states = _apply_norm(self.final_norm, hidden_states, None)
        return hidden_states, S4DSSStreamingState(tuple(new_states), state.steps + 1, state.pooled_sum)


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
    ) -> SequenceClassifierOutput:
        r"""
        Inputs as in [`S4DSSModel.forward`].

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
            labels = self._check_labels(labels, logits)
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)

    def _check_labels(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"`labels` must be a torch.Tensor, got {type(labels).__name__}.")
        batch, num_labels = logits.shape
        problem = self.config.problem_type
        if problem is None:
            if num_labels == 1:
                problem = "regression"
            elif not labels.is_floating_point():
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        if problem == "single_label_classification":
            if labels.is_floating_point() or labels.is_complex() or labels.shape != (batch,):
                raise ValueError(
                    f"Single-label classification needs integer `labels` of shape ({batch},), "
                    f"got {labels.dtype} {tuple(labels.shape)}."
                )
            if int(labels.min()) < 0 or int(labels.max()) >= num_labels:
                raise ValueError(
                    f"`labels` must be class ids in [0, {num_labels}), got min {int(labels.min())}, "
                    f"max {int(labels.max())}."
                )
            return labels
        allowed = {(batch, num_labels)} | ({(batch,)} if num_labels == 1 and problem == "regression" else set())
        if tuple(labels.shape) not in allowed:
            expected = " or ".join(str(shape) for shape in sorted(allowed))
            raise ValueError(f"{problem} needs `labels` of shape {expected}, got {tuple(labels.shape)}.")
        return labels.to(logits.dtype)

    # ------------------------------------------------------------------ streaming
    def init_streaming_state(self, batch_size: int) -> S4DSSStreamingState:
        return self.s4dss.init_streaming_state(batch_size)

    def streaming_step(
        self, state: S4DSSStreamingState, input_ids=None, input_values=None, inputs_embeds=None
    ) -> tuple[torch.Tensor, S4DSSStreamingState]:
        """Consume one position per sequence and return the logits of the prefix read so far
        (equal to `forward` on that prefix), with the new state. Pooling is incremental."""
        hidden_states, state = self.s4dss.streaming_step(state, input_ids, input_values, inputs_embeds)
        if self.config.pooling == "mean":
            pooled_sum = hidden_states if state.pooled_sum is None else state.pooled_sum + hidden_states
            state = S4DSSStreamingState(state.ssm_states, state.steps, pooled_sum)
            pooled = pooled_sum / state.steps
        else:
            pooled = hidden_states
        return self.classifier(pooled), state


def _check_tensor(name: str, value, rank: int, floating: bool) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}.")
    if value.dim() != rank:
        raise ValueError(f"`{name}` must have {rank} dimensions, got shape {tuple(value.shape)}.")
    if floating and not value.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got {value.dtype}.")
    if not floating and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"`{name}` must be an integer tensor, got {value.dtype}.")
    if rank >= 2 and value.shape[1] == 0:
        raise ValueError(f"`{name}` holds sequences of length 0.")


def _check_attention_mask(attention_mask, batch_and_length) -> torch.Tensor | None:
    """Validate a (B, L) 0/1 mask; None when every position is valid."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"`attention_mask` must be a torch.Tensor, got {type(attention_mask).__name__}.")
    if tuple(attention_mask.shape) != tuple(batch_and_length):
        raise ValueError(
            f"`attention_mask` must have shape {tuple(batch_and_length)} (batch, length), "
            f"got {tuple(attention_mask.shape)}."
        )
    valid = attention_mask != 0
    if not torch.all((attention_mask == 0) | (attention_mask == 1)):
        raise ValueError("`attention_mask` must hold only 0 (padding) and 1 (valid position).")
    if not torch.all(valid.any(dim=1)):
        raise ValueError("Every sequence needs at least one valid position in `attention_mask`.")
    return None if torch.all(valid) else valid


def _pool(hidden_states: torch.Tensor, mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """Mean over valid positions, or the last valid position, of (B, L, H) -> (B, H)."""
    if mask is None:
        return hidden_states.mean(1) if pooling == "mean" else hidden_states[:, -1]
    if pooling == "mean":
        weights = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(1) / weights.sum(1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, positions, -1).max(dim=1).values
    return hidden_states[torch.arange(hidden_states.shape[0], device=mask.device), last]


__all__ = [
    "S4DSSForSequenceClassification",
    "S4DSSModel",
    "S4DSSPreTrainedModel",
    "S4DSSStreamingState",
]
