"""`calibration_data` of the data-aware refit (issue 18, item 3b; issue 16, item 4): batches with
NaN/Inf at valid positions, batches that overflow a layer, and empty batches are refused naming
the batch, the model untouched; any iterable of batches (a DataLoader, a generator) and numpy
values are accepted and give the same model as a list of tensors."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from s4bt_hf import S4DSSConfig, S4DSSForSequenceClassification


def _build():
    torch.manual_seed(0)
    config = S4DSSConfig(input_dim=2, d_model=6, n_layers=2, d_state=4, num_labels=3)
    return S4DSSForSequenceClassification(config).eval()


def _batches(count=3, batch=4, length=24):
    generator = torch.Generator().manual_seed(3)
    return [{"input_values": torch.randn(batch, length, 2, generator=generator),
             "attention_mask": torch.ones(batch, length, dtype=torch.long)} for _ in range(count)]


def _snapshot(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _assert_unchanged(before, model):
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0, equal_nan=True, msg=name)


def _assert_same_model(first, second):
    for (name, one), two in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        torch.testing.assert_close(one, two, rtol=0, atol=0, msg=name)


def _poison(value):
    batches = _batches()
    batches[1]["input_values"][2, 5, 1] = value
    return batches


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_values_are_refused_naming_the_batch(value):
    model = _build()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"`calibration_data` batch 1: `input_values` holds NaN or Inf at valid "
                                         r"positions \(first at index \(2, 5, 1\)\)"):
        model.reduce("balanced_truncation", 2, calibration_data=_poison(value))
    _assert_unchanged(before, model)


def test_non_finite_values_at_padded_positions_are_ignored():
    """Padded positions never reach the model: garbage there gives the model of zeros there."""
    model = _build()
    clean, dirty = _batches(), _poison(float("nan"))
    for batches in (clean, dirty):
        batches[1]["attention_mask"][2, 5:] = 0
    clean[1]["input_values"][2, 5, 1] = 0.0
    _assert_same_model(model.reduce("balanced_truncation", 2, calibration_data=clean),
                       model.reduce("balanced_truncation", 2, calibration_data=dirty))


def test_values_that_overflow_a_layer_are_refused_naming_the_batch_and_layer():
    model = _build()
    batches = _batches()
    batches[2]["input_values"] = batches[2]["input_values"] * 1e37  # finite, but the float32 layers overflow
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"`calibration_data` batch 2: the input or output of DSS layer 0 overflows"):
        model.reduce("modal_truncation", 2, calibration_data=batches)
    _assert_unchanged(before, model)


def test_an_empty_batch_is_refused_naming_it():
    model = _build()
    batches = _batches()
    batches[1] = {key: value[:0] for key, value in batches[1].items()}
    with pytest.raises(ValueError, match=r"batch 1: `input_values` holds no sequence \(batch size 0"):
        model.reduce("balanced_truncation", 2, calibration_data=batches)


class _Sequences(Dataset):
    def __init__(self, batches):
        self.items = [{key: value[row] for key, value in batch.items()} for batch in batches
                      for row in range(len(batch["input_values"]))]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def test_any_iterable_of_batches_and_numpy_values_are_accepted():
    model = _build()
    batches = _batches()
    expected = model.reduce("balanced_truncation", 2, calibration_data=batches)
    loader = DataLoader(_Sequences(batches), batch_size=4, shuffle=False)
    numpy_batches = [{key: value.numpy() for key, value in batch.items()} for batch in batches]
    for data in (loader, (batch for batch in batches), numpy_batches, tuple(batches)):
        _assert_same_model(model.reduce("balanced_truncation", 2, calibration_data=data), expected)
    one = {key: np.asarray(value) for key, value in batches[0].items()}
    _assert_same_model(model.reduce("balanced_truncation", 2, calibration_data=one),
                       model.reduce("balanced_truncation", 2, calibration_data=batches[0]))


@pytest.mark.parametrize("data, message", [
    (torch.zeros(2, 5, 2), r"must be a batch .* or an iterable of such batches .* got Tensor"),
    ("batches", r"got str"),
    ([{"input_values": "abc"}], r"batch 0: `input_values` must be a torch.Tensor or an array, got str"),
    ([{"input_values": np.array(["a", "b"])}], r"batch 0: `input_values` cannot be read as a tensor"),
])
def test_what_is_not_a_batch_is_named(data, message):
    with pytest.raises(TypeError, match=message):
        _build().reduce("balanced_truncation", 2, calibration_data=data)


def test_a_meta_device_model_is_refused_by_name():
    import s4bt_hf

    with torch.device("meta"):
        model = s4bt_hf.S4DSSForSequenceClassification(s4bt_hf.S4DSSConfig(input_dim=1, d_model=4, n_layers=1,
                                                                           d_state=4, num_labels=2))
    with pytest.raises(ValueError, match=r"not materialised \(on the meta device: classifier, s4dss"):
        model.reduce("balanced_truncation", rank=2)
