"""Input, mask and label checks of the S4-DSS models, and the one place that decides the
classification problem type and its loss.

Two kinds of checks:
- metadata checks (type, rank, dtype, width, device, batch size): free, always on;
- value checks (ids inside the vocabulary, a 0/1 mask with a valid position per row, labels in
  range): they read values back to the host, a synchronisation on an accelerator. They run
  unless `config.check_input_values` is False, and never while `torch.compile` or
  `torch.export` traces the model (the traced graph must not branch on tensor values).

This file is copied into saved checkpoints (remote code): it imports only torch.
"""

from __future__ import annotations

import torch

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def value_checks_enabled(config) -> bool:
    """Whether the value checks run now (see the module docstring)."""
    return bool(getattr(config, "check_input_values", True)) and not torch.compiler.is_compiling()


def check_tensor(name: str, value, rank: int, floating: bool, device: torch.device | None) -> None:
    """Type, rank, dtype, non-empty length and device of one input; no value is read."""
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
    check_device(name, value, device)


def check_device(name: str, value: torch.Tensor, device: torch.device | None) -> None:
    """`value` must be on the model's `device` (None, or a model on `meta` with offloading hooks: no check)."""
    if device is None or device.type == "meta":
        return
    if value.device.type != device.type or (
        device.index is not None and value.device.index is not None and value.device.index != device.index
    ):
        raise ValueError(f"`{name}` is on device {value.device} but the model is on {device}; move it with "
                         f"`.to({str(device)!r})`.")


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Value check: every id in [0, vocab_size) (one host read)."""
    if input_ids.numel() == 0:
        return
    low, high = torch.stack([input_ids.min(), input_ids.max()]).tolist()
    if low < 0 or high >= vocab_size:
        raise ValueError(f"`input_ids` holds ids outside the vocabulary [0, {vocab_size}): min {low}, max {high}.")


def check_attention_mask(attention_mask, batch_and_length, device, check_values: bool) -> torch.Tensor | None:
    """Validate a (B, L) mask of 1 (valid) and 0 (padding) and return it as a bool tensor, or None
    when the value checks found every position valid (the cheaper unmasked path)."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"`attention_mask` must be a torch.Tensor, got {type(attention_mask).__name__}.")
    if tuple(attention_mask.shape) != tuple(batch_and_length):
        raise ValueError(
            f"`attention_mask` must have shape {tuple(batch_and_length)} (batch, length), "
            f"got {tuple(attention_mask.shape)}."
        )
    if attention_mask.is_complex():
        raise TypeError(f"`attention_mask` must hold real 0/1 values, got {attention_mask.dtype}.")
    check_device("attention_mask", attention_mask, device)
    valid = attention_mask != 0
    if not check_values or valid.numel() == 0:
        return valid
    # one host read for the three facts
    zero_or_one, every_row_valid, all_valid = torch.stack([
        ((attention_mask == 0) | (attention_mask == 1)).all(), valid.any(dim=1).all(), valid.all()
    ]).tolist()
    if not zero_or_one:
        raise ValueError("`attention_mask` must hold only 0 (padding) and 1 (valid position).")
    if not every_row_valid:
        raise ValueError("Every sequence needs at least one valid position in `attention_mask`.")
    return None if all_valid else valid


def keep_valid(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`values` (B, L, ...) with padded positions set to 0 by selection, so that NaN, Inf or huge
    values there cannot reach a valid output (0 · NaN would be NaN)."""
    if mask is None:
        return values
    mask = mask.reshape(mask.shape + (1,) * (values.dim() - mask.dim()))
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))


def resolve_problem_type(problem_type: str | None, num_labels: int, labels: torch.Tensor) -> str:
    """The loss a classifier computes, decided once: `config.problem_type` if set, otherwise
    regression for one label, single-label classification for integer labels of any width
    (int64, int32, int16, uint8, ...), multi-label classification for float or bool labels."""
    if problem_type is not None:
        if problem_type not in PROBLEM_TYPES:
            raise ValueError(f"`config.problem_type` must be one of {PROBLEM_TYPES} or None, got {problem_type!r}.")
        return problem_type
    if num_labels == 1:
        return "regression"
    if not labels.is_floating_point() and not labels.is_complex() and labels.dtype != torch.bool:
        return "single_label_classification"
    return "multi_label_classification"


def prepare_labels(labels, logits: torch.Tensor, problem_type: str | None, check_values: bool):
    """Check `labels` against `logits` (B, num_labels) and cast them to what the loss needs.
    Returns (problem type, labels on the logits' device)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"`labels` must be a torch.Tensor, got {type(labels).__name__}.")
    if labels.is_complex():
        raise TypeError(f"`labels` must be real, got {labels.dtype}.")
    batch, num_labels = logits.shape
    if batch == 0:
        raise ValueError("`labels` were given for an empty batch (0 sequences): there is no loss to compute.")
    problem = resolve_problem_type(problem_type, num_labels, labels)
    labels = labels.to(logits.device)
    if problem == "single_label_classification":
        if labels.is_floating_point() or labels.dtype == torch.bool or labels.shape != (batch,):
            raise ValueError(
                f"Single-label classification needs integer `labels` of shape ({batch},), "
                f"got {labels.dtype} {tuple(labels.shape)}."
            )
        if check_values:
            low, high = torch.stack([labels.min(), labels.max()]).tolist()
            if low < 0 or high >= num_labels:
                raise ValueError(f"`labels` must be class ids in [0, {num_labels}), got min {low}, max {high}.")
        return problem, labels.long()
    allowed = {(batch, num_labels)} | ({(batch,)} if num_labels == 1 and problem == "regression" else set())
    if tuple(labels.shape) not in allowed:
        expected = " or ".join(str(shape) for shape in sorted(allowed))
        raise ValueError(f"{problem} needs `labels` of shape {expected}, got {tuple(labels.shape)}.")
    labels = labels.to(logits.dtype)
    if check_values:
        if problem == "multi_label_classification":
            inside = bool(((labels >= 0) & (labels <= 1)).all())  # NaN fails both comparisons
            if not inside:
                raise ValueError("Multi-label classification needs `labels` in [0, 1] (targets of a sigmoid); got "
                                 f"values from {labels.min().item()} to {labels.max().item()}.")
        elif not bool(torch.isfinite(labels).all()):
            raise ValueError("Regression `labels` must be finite (they hold NaN or Inf).")
    return problem, labels


def classification_loss(problem: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean loss of a batch, as every transformers `*ForSequenceClassification` computes it."""
    if problem == "single_label_classification":
        return torch.nn.functional.cross_entropy(logits, labels)
    if problem == "multi_label_classification":
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    if logits.shape[-1] == 1:
        return torch.nn.functional.mse_loss(logits.squeeze(-1), labels.reshape(-1))
    return torch.nn.functional.mse_loss(logits, labels)


def per_sample_loss(problem: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) loss of each sample, whose mean is `classification_loss` (for evaluation sums)."""
    if problem == "single_label_classification":
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    if problem == "multi_label_classification":
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(-1)
    if logits.shape[-1] == 1:
        return (logits.squeeze(-1) - labels.reshape(-1)) ** 2
    return ((logits - labels) ** 2).mean(-1)
