"""Preprocessing of real-valued sequences (time series, signals) for S4-DSS models: per-channel
normalisation fitted on training data, padding and truncation, attention masks, and the
(B, L) -> (B, L, C) layout the models read as `input_values`.

Saved beside the model as `preprocessor_config.json` (the statistics travel with the checkpoint)
and loaded by `AutoFeatureExtractor`, also as remote code. This file is copied into saved
checkpoints: it imports only numpy (a transformers dependency), torch and transformers.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import BatchFeature, SequenceFeatureExtractor

# A channel whose values are (almost) constant on the training data is centred but not scaled:
# dividing by a vanishing spread would blow rounding noise up to unit size.
MIN_STD = 1e-8


class S4DSSFeatureExtractor(SequenceFeatureExtractor):
    r"""Turns raw sequences into the `input_values` (B, L, C) and `attention_mask` (B, L) of an
    S4-DSS model with `input_dim = C = feature_size`.

    Accepted inputs (numpy, torch or nested lists): one sequence of shape (L,) (one channel) or
    (L, C); a batch as a list of such sequences, lengths may differ (ragged); a (B, L, C) array; a
    (B, L) array for one channel. With one channel a 2-D array is a batch of B sequences, except an
    (L, 1) array, which is one sequence.

    Every value is normalised per channel, `(x - mean[c]) / std[c]`, with the statistics set by
    `fit` on training data (or given); without them (`mean=None`) values pass unchanged. Padded
    positions hold `padding_value` and have mask 0; the models ignore them.

    Args:
        feature_size: channels per position (the model's `input_dim`).
        sampling_rate: samples per unit of time; recorded for pipelines (a call with another rate
            is refused rather than silently resampled).
        padding_value: value at padded positions.
        mean, std: per-channel statistics (lists of `feature_size` floats), or None.
    """

    model_input_names = ["input_values", "attention_mask"]

    def __init__(self, feature_size: int = 1, sampling_rate: int = 1, padding_value: float = 0.0,
                 mean: list[float] | None = None, std: list[float] | None = None,
                 return_attention_mask: bool = True, **kwargs):
        if not isinstance(feature_size, int) or isinstance(feature_size, bool) or feature_size < 1:
            raise ValueError(f"S4DSSFeatureExtractor: `feature_size` must be a positive int, got {feature_size!r}.")
        super().__init__(feature_size=feature_size, sampling_rate=sampling_rate, padding_value=padding_value,
                         return_attention_mask=return_attention_mask, **kwargs)
        self.mean, self.std = _check_statistics(mean, std, feature_size)

    # ------------------------------------------------------------------ statistics
    def fit(self, sequences) -> S4DSSFeatureExtractor:
        """Set `mean` and `std` per channel from `sequences` (any accepted batch form; the
        training split only): the mean and the population standard deviation over every position
        of every sequence, accumulated in float64. Returns self."""
        arrays = self._as_sequences(sequences)
        values = np.concatenate(arrays, axis=0)  # (total positions, C)
        mean = values.mean(axis=0)
        std = values.std(axis=0)
        self.mean = [float(value) for value in mean]
        self.std = [float(value) if value > MIN_STD else 1.0 for value in std]
        return self

    def normalize(self, sequence: np.ndarray) -> np.ndarray:
        """(L, C) float64 -> (x - mean) / std per channel (unchanged without statistics)."""
        if self.mean is None:
            return sequence
        return (sequence - np.asarray(self.mean)) / np.asarray(self.std)

    # ------------------------------------------------------------------ the call
    def __call__(self, raw_sequences, padding=True, max_length: int | None = None, truncation: bool = False,
                 pad_to_multiple_of: int | None = None, return_attention_mask: bool | None = None,
                 return_tensors=None, sampling_rate: int | None = None, **kwargs) -> BatchFeature:
        """Normalise, pad (`padding=True`/"longest", "max_length" or False) and truncate
        (`truncation=True` with `max_length`) a sequence or a batch; returns a `BatchFeature` with
        `input_values` (B, L, C) float32 and `attention_mask` (B, L) (1 valid, 0 padded)."""
        if kwargs:
            raise TypeError(f"S4DSSFeatureExtractor got unexpected arguments: {', '.join(sorted(kwargs))}.")
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ValueError(f"S4DSSFeatureExtractor: the input's sampling rate {sampling_rate} differs from the "
                             f"{self.sampling_rate} the model was trained with; resample the input first.")
        arrays = [self.normalize(sequence).astype(np.float32) for sequence in self._as_sequences(raw_sequences)]
        # SequenceFeatureExtractor.pad pads 1-D arrays for one channel and (L, C) arrays otherwise
        one_channel = self.feature_size == 1
        features = BatchFeature({"input_values": [array[:, 0] if one_channel else array for array in arrays]})
        padded = self.pad(features, padding=padding, max_length=max_length, truncation=truncation,
                          pad_to_multiple_of=pad_to_multiple_of, return_attention_mask=return_attention_mask)
        values = padded["input_values"]
        if isinstance(values, np.ndarray) and values.dtype != object:  # padded: one (B, L[, C]) array
            padded["input_values"] = values[..., None] if one_channel else values
        else:  # not padded: one array per sequence
            padded["input_values"] = [np.asarray(value).reshape(len(value), -1) for value in values]
        return BatchFeature(dict(padded), tensor_type=return_tensors)

    def _as_sequences(self, raw) -> list[np.ndarray]:
        """The accepted input forms as a list of float64 (L, C) arrays, each checked. The form is
        read from the nesting depth: 1 is one (L,) sequence; 2 is one (L, C) sequence when C > 1,
        and with one channel a batch of (L,) sequences (an (L, 1) one is one sequence); 3 is a
        batch of (L, C) sequences."""
        if isinstance(raw, torch.Tensor):
            raw = raw.detach().cpu().numpy()
        if not isinstance(raw, (np.ndarray, list, tuple)):
            raise TypeError(f"S4DSSFeatureExtractor: expected a sequence or a batch (numpy array, torch tensor or "
                            f"list), got {type(raw).__name__}.")
        if len(raw) == 0:
            raise ValueError("S4DSSFeatureExtractor: got no sequence (an empty input).")
        depth = _depth(raw)
        one_sequence = depth == 1 or (depth == 2 and (self.feature_size > 1 or all(len(row) == 1 for row in raw)))
        if depth > 3 or (depth == 3 and self.feature_size == 1 and not all(len(row[0]) == 1 for row in raw)):
            raise ValueError(f"S4DSSFeatureExtractor: input nested {depth} deep is neither a sequence (L,) / "
                             f"(L, {self.feature_size}) nor a batch of them.")
        items = [raw] if one_sequence else list(raw)
        return [self._checked(item, index) for index, item in enumerate(items)]

    def _checked(self, item, index: int) -> np.ndarray:
        if isinstance(item, torch.Tensor):
            item = item.detach().cpu().numpy()
        try:
            array = np.asarray(item, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise ValueError(f"S4DSSFeatureExtractor: sequence {index} holds a non-numeric value or channels of "
                             f"different lengths ({error}).") from None
        if array.ndim == 1:
            array = array[:, None]
        if array.ndim != 2 or array.shape[1] != self.feature_size:
            raise ValueError(f"S4DSSFeatureExtractor: sequence {index} has shape {tuple(np.shape(item))}; expected "
                             f"(L, {self.feature_size})" + (" or (L,)" if self.feature_size == 1 else "") + ".")
        if array.shape[0] == 0:
            raise ValueError(f"S4DSSFeatureExtractor: sequence {index} is empty (length 0).")
        finite = np.isfinite(array)
        if not finite.all():
            position, channel = np.argwhere(~finite)[0]
            raise ValueError(f"S4DSSFeatureExtractor: sequence {index} holds {array[position, channel]} at position "
                             f"{position}, channel {channel}; only finite values can be normalised.")
        return array


def _depth(value) -> int:
    """Nesting depth along the first elements: 0 for a number, 1 for a flat sequence, ..."""
    depth = 0
    while isinstance(value, (list, tuple, np.ndarray, torch.Tensor)):
        if isinstance(value, (np.ndarray, torch.Tensor)):
            return depth + value.ndim
        if len(value) == 0:
            return depth + 1
        value, depth = value[0], depth + 1
    return depth


def _check_statistics(mean, std, feature_size: int):
    """(mean, std) as lists of `feature_size` finite floats, std > 0; or (None, None)."""
    if mean is None and std is None:
        return None, None
    if mean is None or std is None:
        raise ValueError("S4DSSFeatureExtractor: give both `mean` and `std` (or neither).")
    mean, std = (np.asarray(value, dtype=np.float64).reshape(-1) for value in (mean, std))
    if mean.shape != (feature_size,) or std.shape != (feature_size,):
        raise ValueError(f"S4DSSFeatureExtractor: `mean` and `std` need {feature_size} values (one per channel), "
                         f"got {mean.size} and {std.size}.")
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        raise ValueError("S4DSSFeatureExtractor: `mean` must be finite and `std` finite and positive.")
    return [float(value) for value in mean], [float(value) for value in std]
