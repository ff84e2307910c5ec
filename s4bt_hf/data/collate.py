"""Batch collation for the data tasks.

:class:`PadCollator` turns a list of examples (dicts, as a ``Dataset`` or a ``DataLoader`` yields them) into a
batch of tensors. Variable-length ``input_ids`` are right-padded to the longest sequence in the batch (or a
multiple of ``pad_to_multiple_of``) with an ``attention_mask`` of 1 for real tokens and 0 for padding;
``input_values`` of equal shape are stacked, and (L, C) sequences of different lengths padded like the
ids, with a mask. A ``label`` entry (the ``datasets`` convention) becomes ``labels``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["PadCollator", "dataset_batches"]


class PadCollator:
    """Collate examples with ``input_ids`` (lists or 1-D tensors of different lengths) or ``input_values``
    (equal-shape arrays) and ``labels`` into tensors.

    Returns ``input_ids`` (long, ``(B, L_max)``, right-padded with ``pad_token_id``) and ``attention_mask``
    (long, 1 valid / 0 pad), or ``input_values`` (stacked, or zero-padded with an ``attention_mask`` when the
    lengths differ; integer values become float32), plus ``labels``
    (long) when the examples carry them. Float labels (e.g. multi-label targets) keep their float dtype. Other
    keys are ignored.
    """

    def __init__(self, pad_token_id: int = 0, pad_to_multiple_of: int | None = None):
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __repr__(self) -> str:
        return f"PadCollator(pad_token_id={self.pad_token_id}, pad_to_multiple_of={self.pad_to_multiple_of})"

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        batch: dict[str, torch.Tensor] = {}
        first = examples[0]
        if "input_ids" in first:
            batch.update(self._pad([example["input_ids"] for example in examples]))
        elif "input_values" in first:
            batch.update(self._pad_values([torch.as_tensor(example["input_values"]) for example in examples]))
        else:
            raise KeyError(f"examples need an 'input_ids' or an 'input_values' entry; they have "
                           f"{', '.join(map(repr, first)) or 'none'}")
        label_key = "labels" if "labels" in first else "label" if "label" in first else None  # `datasets` says label
        if label_key is not None:
            labels = torch.as_tensor([_as_label(example[label_key]) for example in examples])
            batch["labels"] = labels if torch.is_floating_point(labels) else labels.long()
        return batch

    def _pad_values(self, sequences: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Equal shapes are stacked (no mask: every position is valid); (L, C) sequences of
        different lengths are right-padded with zeros, with an `attention_mask`."""
        sequences = [sequence if torch.is_floating_point(sequence) else sequence.float() for sequence in sequences]
        if all(sequence.shape == sequences[0].shape for sequence in sequences) and not self.pad_to_multiple_of:
            return {"input_values": torch.stack(sequences)}
        length = max(len(sequence) for sequence in sequences)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        values = sequences[0].new_zeros((len(sequences), length, *sequences[0].shape[1:]))
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            values[row, : len(sequence)] = sequence
            attention_mask[row, : len(sequence)] = 1
        return {"input_values": values, "attention_mask": attention_mask}

    def _pad(self, sequences: list[Any]) -> dict[str, torch.Tensor]:
        tensors = [torch.as_tensor(sequence, dtype=torch.long).reshape(-1) for sequence in sequences]
        length = max(len(tensor) for tensor in tensors)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(tensors), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(tensors), length), dtype=torch.long)
        for row, tensor in enumerate(tensors):
            input_ids[row, : len(tensor)] = tensor
            attention_mask[row, : len(tensor)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def _as_label(label: Any) -> Any:
    if isinstance(label, torch.Tensor):
        return label.tolist()
    return label


def dataset_batches(split, batch_size: int, collate, samples: int | None = None, labels: bool = True) -> list[dict]:
    """The first `samples` examples of `split` (all by default) as collated model batches, with or
    without their `labels` (what `reduce(calibration_data=...)` and `shrink(validation_data)` take)."""
    chosen = split if samples is None else split.select(range(min(samples, len(split))))
    batches = []
    for start in range(0, len(chosen), batch_size):
        batch = collate([chosen[index] for index in range(start, min(start + batch_size, len(chosen)))])
        batches.append(batch if labels else {key: value for key, value in batch.items() if key != "labels"})
    return batches
