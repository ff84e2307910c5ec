"""Configuration of the S4-DSS model (S4 built from Diagonal State Space layers).

This file is copied verbatim into every saved checkpoint (remote code), so it imports only
`transformers` and the standard library.
"""

from __future__ import annotations

import difflib
import math
import warnings
from dataclasses import fields

from transformers import PreTrainedConfig

SSM_INITS = ("skew_hippo", "s4d_lin", "s4d_inv", "random")
NORMS = ("layer", "batch")
POOLINGS = ("mean", "last")
# Keywords transformers takes or writes besides the dataclass fields: `PreTrainedConfig` pops or
# stores them, and configs saved by transformers 4 carry its former arguments and generation
# parameters. Never a misspelt S4-DSS field, though some are close to one (bos_token_id, torch_dtype).
_TRANSFORMERS_KEYWORDS = frozenset("""
    torch_dtype num_labels name_or_path _name_or_path _commit_hash output_attentions attn_implementation
    _attn_implementation _attn_implementation_internal experts_implementation _experts_implementation_internal
    per_layer_config rope_scaling rope_theta rope_parameters auto_map model_type transformers_version
    torchscript use_bfloat16 tf_legacy_loss pruned_heads tie_word_embeddings is_decoder cross_attention_hidden_size
    add_cross_attention tie_encoder_decoder finetuning_task tokenizer_class prefix bos_token_id eos_token_id
    sep_token_id decoder_start_token_id task_specific_params gradient_checkpointing
    max_length min_length do_sample early_stopping num_beams num_beam_groups diversity_penalty temperature top_k
    top_p typical_p epsilon_cutoff eta_cutoff repetition_penalty encoder_repetition_penalty length_penalty
    no_repeat_ngram_size encoder_no_repeat_ngram_size bad_words_ids num_return_sequences output_scores
    return_dict_in_generate forced_bos_token_id forced_eos_token_id remove_invalid_values
    exponential_decay_length_penalty suppress_tokens begin_suppress_tokens use_cache num_assistant_tokens
    num_assistant_tokens_schedule assistant_confidence_threshold assistant_lookbehind target_lookbehind
""".split())


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class S4DSSConfig(PreTrainedConfig):
    r"""Configuration of an S4 model whose sequence-mixing layers are DSS layers.

    Each of the `d_model` channels of a DSS layer is its own single-input linear system with
    `d_state` complex diagonal modes (the DSS convention: `d_state` counts complex modes, and the
    layer's real output is `Re(...)` of the complex sum, not `2 Re`).

    Args:
        vocab_size (`int`, *optional*):
            Number of token ids; the model then reads `input_ids` through an embedding. Give either
            this or `input_dim`, not both.
        input_dim (`int`, *optional*):
            Width of real-valued inputs `input_values` of shape `(batch, length, input_dim)`, read
            through a linear encoder (1 for pixel sequences). Defaults to 1 when `vocab_size` is unset.
        d_model (`int`, defaults to 128): number of channels H (alias `hidden_size`).
        n_layers (`int`, defaults to 4): number of residual DSS blocks (alias `num_hidden_layers`).
        d_state (`int` or `list[int]`, defaults to 64): complex diagonal modes per channel, one value
            for all layers or one per layer (a compressed model can have per-layer ranks).
        init (`str`, defaults to `"skew_hippo"`): initialisation of the modes: `"skew_hippo"` (DSS),
            `"s4d_lin"`, `"s4d_inv"` or `"random"`.
        dt_min, dt_max (`float`, defaults to 1e-3, 1e-1): range of the log-uniform step size Δ.
        bidirectional (`bool`, defaults to False): two-sided kernel (no streaming).
        norm (`str`, defaults to `"layer"`): `"layer"` (LayerNorm) or `"batch"` (BatchNorm over the
            valid positions). `"layer"` needs `d_model` >= 2 (over one channel it outputs 0 for every input).
        prenorm (`bool`, defaults to True): normalise before (True) or after (False) each block.
        dropout (`float`, defaults to 0.0): dropout probability inside the blocks.
        pooling (`str`, defaults to `"mean"`): `"mean"` over valid positions or `"last"` valid position.
        ssm_lr (`float`, defaults to 1e-3): learning rate of the SSM dynamics (modes, step, input vector).
        ssm_weight_decay (`float`, defaults to 0.0): weight decay of the SSM dynamics.
        initializer_range (`float`, defaults to 0.02): std of the embedding / linear initialisation.
        layer_norm_eps (`float`, defaults to 1e-5): epsilon of the norms.
        pad_token_id (`int`, *optional*): padding token id of a token model.
        check_input_values (`bool`, defaults to True): run the checks that read input values back to the
            host (ids inside the vocabulary, a 0/1 attention mask with a valid position per sequence, labels
            in range). Each is a synchronisation on an accelerator; set False for training at scale. Shape,
            dtype and device checks always run; under `torch.compile`/`torch.export` the value checks are
            skipped.

    `num_labels` and `problem_type` are the standard sequence-classification fields.
    """

    model_type = "s4dss"
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers"}

    vocab_size: int | None = None
    input_dim: int | None = None
    d_model: int = 128
    n_layers: int = 4
    d_state: int | list[int] = 64
    init: str = "skew_hippo"
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    bidirectional: bool = False
    norm: str = "layer"
    prenorm: bool = True
    dropout: float = 0.0
    pooling: str = "mean"
    ssm_lr: float = 1e-3
    ssm_weight_decay: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = None
    check_input_values: bool = True

    def __post_init__(self, **kwargs):
        _warn_misspelt_keywords(self, kwargs)
        if self.vocab_size is None and self.input_dim is None:
            self.input_dim = 1
        if isinstance(self.d_state, tuple):
            self.d_state = list(self.d_state)
        self.check_s4dss_fields()
        super().__post_init__(**kwargs)
        self.check_s4dss_fields()  # `num_labels` is known only now

    @property
    def layer_d_states(self) -> list[int]:
        """Complex modes per channel of every layer."""
        if isinstance(self.d_state, list):
            return list(self.d_state)
        return [self.d_state] * self.n_layers

    @property
    def uses_tokens(self) -> bool:
        return self.vocab_size is not None

    def check_s4dss_fields(self) -> None:
        """Raise a `ValueError`/`TypeError` naming the first field that cannot describe a model."""
        if self.vocab_size is not None and self.input_dim is not None:
            raise ValueError(
                "S4DSSConfig: give either `vocab_size` (token inputs) or `input_dim` (real-valued inputs), "
                f"not both (got vocab_size={self.vocab_size}, input_dim={self.input_dim})."
            )
        for name in ("vocab_size", "input_dim"):
            value = getattr(self, name)
            if value is not None:
                _require_positive_int(name, value)
        _require_positive_int("d_model", self.d_model)
        _require_positive_int("n_layers", self.n_layers)
        if isinstance(self.d_state, list):
            if len(self.d_state) != self.n_layers:
                raise ValueError(
                    f"S4DSSConfig: `d_state` lists {len(self.d_state)} per-layer values but `n_layers` is "
                    f"{self.n_layers}."
                )
            for layer, value in enumerate(self.d_state):
                _require_positive_int(f"d_state[{layer}]", value)
        else:
            _require_positive_int("d_state", self.d_state)
        _require_choice("init", self.init, SSM_INITS)
        _require_choice("norm", self.norm, NORMS)
        if self.norm == "layer" and self.d_model == 1:  # (x - mean(x)) over one channel is 0 for every input
            raise ValueError("S4DSSConfig: `norm`='layer' with `d_model`=1 normalises over a single channel, which "
                             "outputs 0 whatever the input: the model would ignore its input. Use norm='batch' or "
                             "d_model >= 2.")
        _require_choice("pooling", self.pooling, POOLINGS)
        for name in ("dt_min", "dt_max", "initializer_range", "layer_norm_eps"):
            _require_finite(name, getattr(self, name), minimum_exclusive=0.0)
        if self.dt_min > self.dt_max:
            raise ValueError(f"S4DSSConfig: `dt_min` ({self.dt_min}) must not exceed `dt_max` ({self.dt_max}).")
        for name in ("ssm_lr", "ssm_weight_decay"):
            _require_finite(name, getattr(self, name), minimum_inclusive=0.0)
        _require_finite("dropout", self.dropout, minimum_inclusive=0.0)
        if self.dropout >= 1.0:
            raise ValueError(f"S4DSSConfig: `dropout` must be in [0, 1), got {self.dropout}.")
        for name in ("bidirectional", "prenorm", "check_input_values"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"S4DSSConfig: `{name}` must be a bool, got {getattr(self, name)!r}.")
        num_labels = len(self.id2label) if getattr(self, "id2label", None) is not None else None
        if num_labels is not None and num_labels < 1:
            raise ValueError("S4DSSConfig: `num_labels` must be at least 1 (a classifier with no outputs), got "
                             f"{num_labels}.")
        if self.pad_token_id is not None:
            if self.vocab_size is None:
                raise ValueError("S4DSSConfig: `pad_token_id` needs token inputs (`vocab_size`).")
            if not _is_int(self.pad_token_id) or not 0 <= self.pad_token_id < self.vocab_size:
                raise ValueError(
                    f"S4DSSConfig: `pad_token_id` must be an id in [0, {self.vocab_size}), got {self.pad_token_id!r}."
                )


def _warn_misspelt_keywords(config, keywords) -> None:
    """Warn for each keyword that is no field but close to one (`d_modle`): transformers would keep
    it as an attribute that nothing reads while the field it meant keeps its default."""
    known = [field.name for field in fields(config)] + list(config.attribute_map) + ["num_labels"]
    for keyword in keywords:
        if keyword in known or keyword in _TRANSFORMERS_KEYWORDS:
            continue
        close = difflib.get_close_matches(keyword, known, n=1)
        if close:
            warnings.warn(f"S4DSSConfig: unknown keyword `{keyword}`; did you mean `{close[0]}`? `{keyword}` is kept "
                          f"as an attribute that the model never reads, and `{close[0]}` keeps its value.",
                          UserWarning, stacklevel=4)


def _require_positive_int(name: str, value) -> None:
    if not _is_int(value):
        raise TypeError(f"S4DSSConfig: `{name}` must be an int, got {value!r}.")
    if value <= 0:
        raise ValueError(f"S4DSSConfig: `{name}` must be positive, got {value}.")


def _require_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"S4DSSConfig: `{name}` must be one of {choices}, got {value!r}.")


def _require_finite(name, value, minimum_exclusive=None, minimum_inclusive=None) -> None:
    if not _is_number(value):
        raise TypeError(f"S4DSSConfig: `{name}` must be a number, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"S4DSSConfig: `{name}` must be finite, got {value}.")
    if minimum_exclusive is not None and value <= minimum_exclusive:
        raise ValueError(f"S4DSSConfig: `{name}` must be > {minimum_exclusive}, got {value}.")
    if minimum_inclusive is not None and value < minimum_inclusive:
        raise ValueError(f"S4DSSConfig: `{name}` must be >= {minimum_inclusive}, got {value}.")


__all__ = ["S4DSSConfig"]
