"""Streaming with real tensors only, for export (ONNX, torch.export): ONNX, ExecuTorch and
TFLite have no complex dtypes, so every complex mode x = re + i·im is held as a real pair and
its update x ← Ā x + B̄ u is the 2×2 rotation-scale

    [re]    [Re Ā  -Im Ā] [re]   [Re B̄]
    [im] ←  [Im Ā   Re Ā] [im] + [Im B̄] u,        y = Σ_n (Re C_n re_n - Im C_n im_n) + D u.

The module is a frozen snapshot of an eval-mode model: the discretised system is computed once
(as `streaming_step` computes it, in the SSM compute dtype) and held as buffers that share no
storage with the model, and nothing in it requires a gradient; training or editing the model
later leaves it unchanged. Its forward is `(inputs, *states) -> (output, *new_states)`, with the
mean-pooling sum and count carried in the state, so a runtime only feeds tensors back in. Each
call checks its states (count, shape, dtype, batch size, device) before any arithmetic.

This file is copied into saved checkpoints (remote code): it imports only torch and its siblings.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .validation_s4dss import check_device


class RealStreamingBlock(nn.Module):
    """One residual DSS block, one position at a time, in real arithmetic."""

    def __init__(self, block: nn.Module):
        super().__init__()
        kernel = block.kernel
        self.prenorm = block.prenorm
        self.norm = copy.deepcopy(block.norm)
        self.output_linear = copy.deepcopy(block.output_linear)
        dtype = kernel.compute_dtype()
        with torch.no_grad():
            a_bar, input_bar, output_vec, skip = (t.detach() for t in kernel.compute_step_system())
        # clone(): `.to`/`.real` may return a view of the kernel's own parameters (D always does)
        for name, value in (("a", a_bar), ("b", input_bar), ("c", output_vec)):
            self.register_buffer(f"{name}_re", value.real.to(dtype).clone(memory_format=torch.contiguous_format))
            self.register_buffer(f"{name}_im", value.imag.to(dtype).clone(memory_format=torch.contiguous_format))
        self.register_buffer("d", skip.to(dtype).clone(memory_format=torch.contiguous_format))

    def forward(self, hidden_states: torch.Tensor, state: torch.Tensor):
        """(B, H) input and (B, H, N, 2) state -> ((B, H) output, new state)."""
        normed = self.norm(hidden_states) if self.prenorm else hidden_states
        inputs = normed.to(self.d.dtype)
        column = inputs.unsqueeze(-1)
        real, imag = state[..., 0], state[..., 1]
        new_real = self.a_re * real - self.a_im * imag + self.b_re * column
        new_imag = self.a_im * real + self.a_re * imag + self.b_im * column
        mixed = (self.c_re * new_real - self.c_im * new_imag).sum(-1) + self.d * inputs
        mixed = mixed.to(hidden_states.dtype)
        mixed = nn.functional.glu(self.output_linear(nn.functional.gelu(mixed)), dim=-1)
        hidden_states = hidden_states + mixed
        if not self.prenorm:
            hidden_states = self.norm(hidden_states)
        return hidden_states, torch.stack((new_real, new_imag), dim=-1)


class FrozenModelCopy(nn.Module):
    """What the real-arithmetic copies of a model share (this file's streaming module, the
    whole-sequence module of `s4bt_hf.export`): frozen copies of the encoder (embedding or input
    projection), the blocks (as `block_type`), the final norm and the classifier, and the facts
    of the config that their inputs and outputs need."""

    def copy_parts(self, model: nn.Module, block_type: type[nn.Module]) -> None:
        config = model.config
        backbone = getattr(model, "s4dss", model)
        self.is_classifier = backbone is not model
        self.uses_tokens = bool(config.uses_tokens)
        self.encoder = copy.deepcopy(backbone.embeddings if self.uses_tokens else backbone.input_proj)
        self.blocks = nn.ModuleList(block_type(layer) for layer in backbone.layers)
        self.final_norm = copy.deepcopy(backbone.final_norm)
        self.classifier = copy.deepcopy(model.classifier) if self.is_classifier else None
        self.d_model = config.d_model
        self.input_dim = None if self.uses_tokens else config.input_dim
        self.vocab_size = config.vocab_size if self.uses_tokens else None
        self.check_input_values = bool(getattr(config, "check_input_values", True))

    def freeze(self) -> None:
        self.requires_grad_(False)  # a frozen copy: an optimizer given the model never reaches it
        self.eval()

    @property
    def input_dtype(self) -> torch.dtype:
        return torch.int64 if self.uses_tokens else self.encoder.weight.dtype


class RealStreamingModule(FrozenModelCopy):
    """Real-arithmetic streaming step of an S4-DSS model (backbone or classifier).

    forward(inputs, *states) -> (output, *new_states), where
        inputs   (B,) int64 token ids, or (B, input_dim) floats;
        states   one (B, H, N_l, 2) tensor per layer ((re, im) of every mode), then for a
                 mean-pooling classifier the running sum (B, H) and count (B, 1) of the outputs;
        output   (B, num_labels) logits of the prefix read so far (classifier), or the
                 (B, d_model) hidden state at this position (backbone).
    Build it with `model.streaming_module()`; `initial_state(batch_size)` gives the zero state.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        config = model.config
        if config.bidirectional:
            raise ValueError(
                "A bidirectional model cannot stream (each output reads the whole sequence): "
                "it has `bidirectional=True`."
            )
        if model.training:
            raise ValueError("Streaming runs the model as in inference: call `model.eval()` first.")
        self.copy_parts(model, RealStreamingBlock)
        self.mean_pooling = self.is_classifier and config.pooling == "mean"
        self.d_states = [block.a_re.shape[-1] for block in self.blocks]
        self.freeze()

    @property
    def state_dtype(self) -> torch.dtype:
        return self.blocks[0].d.dtype

    def state_names(self) -> list[str]:
        names = [f"ssm_state_{index}" for index in range(len(self.blocks))]
        return names + (["pooled_sum", "pooled_count"] if self.mean_pooling else [])

    def state_shapes(self, batch_size: int) -> list[tuple[int, ...]]:
        shapes = [(batch_size, self.d_model, num_modes, 2) for num_modes in self.d_states]
        return shapes + ([(batch_size, self.d_model), (batch_size, 1)] if self.mean_pooling else [])

    def state_dtypes(self) -> list[torch.dtype]:
        # the count in the SSM dtype (float32 at least): exact up to 2^24 positions even in a bf16 model
        pooled = [self.encoder.weight.dtype, self.state_dtype] if self.mean_pooling else []
        return [self.state_dtype] * len(self.blocks) + pooled

    def initial_state(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
        device = self.blocks[0].d.device
        return tuple(
            torch.zeros(shape, dtype=dtype, device=device)
            for shape, dtype in zip(self.state_shapes(batch_size), self.state_dtypes(), strict=True)
        )

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        """Inputs of one step (zeros) and the zero state: what exporters trace with."""
        device = self.blocks[0].d.device
        if self.uses_tokens:
            inputs = torch.zeros(batch_size, dtype=torch.int64, device=device)
        else:
            inputs = torch.zeros(batch_size, self.input_dim, dtype=self.input_dtype, device=device)
        return (inputs, *self.initial_state(batch_size))

    def _apply(self, fn, *args, **kwargs):
        self._state_spec = None  # `.to()`, `.double()`, ... change the dtypes and device the states must have
        return super()._apply(fn, *args, **kwargs)

    def state_spec(self) -> tuple[torch.device, list[tuple[str, tuple[int, ...], torch.dtype]]]:
        """(device, [(name, shape without the batch axis, dtype)] of every state), built once."""
        spec = getattr(self, "_state_spec", None)
        if spec is None:
            states = [(name, shape[1:], dtype) for name, shape, dtype in
                      zip(self.state_names(), self.state_shapes(1), self.state_dtypes(), strict=True)]
            spec = self._state_spec = (self.blocks[0].d.device, states)
        return spec

    def check_call(self, inputs, states) -> None:
        """`inputs` and every state must fit this module: the number of states, then each state's
        dtype, device and shape with the batch size of `inputs`. Metadata only (a few µs, and
        compiled away by `torch.export`); with value checks on (`config.check_input_values`, not
        while tracing), the token ids and the pooled count too (one host read each)."""
        device, spec = self.state_spec()
        if len(states) != len(spec):
            names = ", ".join(name for name, *_ in spec)
            raise ValueError(f"The streaming step takes {len(spec)} states ({names}), got {len(states)}; start from "
                             "`initial_state(batch_size)` and feed back every new state.")
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != (1 if self.uses_tokens else 2) or (
            not self.uses_tokens and inputs.shape[1] != self.input_dim
        ):
            wanted = "(batch,) token ids" if self.uses_tokens else f"(batch, {self.input_dim}) values"
            got = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise ValueError(f"`inputs` of one position must be {wanted}, got {got}.")
        if self.uses_tokens == (inputs.is_floating_point() or inputs.is_complex() or inputs.dtype == torch.bool):
            kind = "an integer" if self.uses_tokens else "a floating-point"
            raise TypeError(f"`inputs` must be {kind} tensor, got {inputs.dtype}.")
        if inputs.device != device:
            check_device("inputs", inputs, device)
        batch = inputs.shape[0]
        for index, ((name, shape, dtype), state) in enumerate(zip(spec, states, strict=True)):
            if not isinstance(state, torch.Tensor) or state.shape != (batch, *shape) or state.dtype != dtype:
                got = (f"{state.dtype} of shape {tuple(state.shape)}" if isinstance(state, torch.Tensor)
                       else type(state).__name__)
                what = f"layer {index}" if index < len(self.blocks) else "mean pooling"
                raise ValueError(f"State {index} `{name}` ({what}) must be {dtype} of shape {(batch, *shape)} "
                                 f"(batch {batch}, the batch of `inputs`), got {got}.")
            if state.device != device:
                check_device(name, state, device)
        if self.check_input_values and not torch.compiler.is_compiling():
            if self.uses_tokens and inputs.numel():
                low, high = torch.stack([inputs.min(), inputs.max()]).tolist()
                if low < 0 or high >= self.vocab_size:
                    raise ValueError(f"`inputs` holds token ids outside the vocabulary [0, {self.vocab_size}): "
                                     f"min {low}, max {high}.")
            if self.mean_pooling and states[-1].numel() and (lowest := states[-1].min().item()) < 0:
                raise ValueError(f"State `pooled_count` counts the positions read (>= 0), got {lowest}.")

    def forward(self, inputs: torch.Tensor, *states: torch.Tensor):
        self.check_call(inputs, states)
        hidden_states = self.encoder(inputs if self.uses_tokens else inputs.to(self.encoder.weight.dtype))
        new_states = []
        for block, state in zip(self.blocks, states[:len(self.blocks)], strict=True):
            hidden_states, state = block(hidden_states, state)
            new_states.append(state)
        if self.final_norm is not None:
            hidden_states = self.final_norm(hidden_states)
        if not self.is_classifier:
            return (hidden_states, *new_states)
        if self.mean_pooling:
            pooled_sum = states[len(self.blocks)] + hidden_states
            pooled_count = states[len(self.blocks) + 1] + 1
            new_states += [pooled_sum, pooled_count]
            hidden_states = (pooled_sum / pooled_count).to(pooled_sum.dtype)
        return (self.classifier(hidden_states), *new_states)
