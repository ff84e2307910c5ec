"""h2 stops at convergence and bounds `max_iterations`; `hankel_penalty` names a meta-device
model (issue 18, item 6)."""

import time

import pytest
import torch

from s4bt_hf import S4DSSConfig, S4DSSForSequenceClassification
from s4bt_hf.h2_reduction import MAX_ITERATIONS
from s4bt_hf.training.hankel_penalty import channel_hankel_nuclear_norms, hankel_penalty


def _build(d_model, d_state, bidirectional=False):
    torch.manual_seed(0)
    config = S4DSSConfig(input_dim=2, d_model=d_model, n_layers=1, d_state=d_state, num_labels=2,
                         bidirectional=bidirectional)
    return S4DSSForSequenceClassification(config).eval()


def _same_model(first, second):
    for (name, one), two in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        torch.testing.assert_close(one, two, rtol=0, atol=0, msg=name)


def test_a_huge_max_iterations_on_a_tiny_model_returns_the_default_result_quickly():
    """The tiny model converges within the default 50 iterations: the largest allowed
    max_iterations spends no more evaluations and gives the same model, bit for bit."""
    model = _build(4, 8, bidirectional=True)
    default = model.reduce("h2", 1)
    started = time.perf_counter()
    huge = model.reduce("h2", 1, max_iterations=MAX_ITERATIONS)
    assert time.perf_counter() - started < 20
    _same_model(default, huge)
    details = huge.compression_report.layers[0].details
    assert details["evaluations"] == default.compression_report.layers[0].details["evaluations"] < 60


def test_the_iteration_stops_at_convergence_far_below_max_iterations():
    """A model that is still improving at 50 iterations: the largest max_iterations stops where the
    summed relative error stops dropping (before this stop: 40953 evaluations, 311 s), and is
    never worse than the default."""
    model = _build(16, 8)
    default = model.reduce("h2", 4)
    huge = model.reduce("h2", 4, max_iterations=MAX_ITERATIONS)
    details, default_details = huge.compression_report.layers[0].details, default.compression_report.layers[0].details
    assert details["evaluations"] < 2000
    relative = torch.tensor(details["h2_error"]) / torch.tensor(huge.compression_report.layers[0].kernel_norm)
    relative_default = (torch.tensor(default_details["h2_error"])
                        / torch.tensor(default.compression_report.layers[0].kernel_norm))
    # each channel keeps its best iterate: the sum the iteration minimises only goes down
    assert relative.square().sum() <= relative_default.square().sum() * (1 + 1e-6)


@pytest.mark.parametrize("value", [MAX_ITERATIONS + 1, 10**6, -1])
def test_max_iterations_outside_its_range_is_refused(value):
    with pytest.raises(ValueError, match=rf"method 'h2': option `max_iterations` must be an integer in "
                                         rf"\[0, {MAX_ITERATIONS}\], got {value}"):
        _build(4, 4).reduce("h2", 2, max_iterations=value)


@pytest.mark.parametrize("value", [2.5, True])
def test_max_iterations_of_another_type_is_refused(value):
    with pytest.raises(TypeError, match=rf"method 'h2': option `max_iterations` must be an int, got {value!r}"):
        _build(4, 4).reduce("h2", 2, max_iterations=value)


def test_hankel_penalty_names_a_meta_device_model():
    with torch.device("meta"):
        model = S4DSSForSequenceClassification(S4DSSConfig(input_dim=2, d_model=4, n_layers=2, d_state=4,
                                                           num_labels=2))
    with pytest.raises(ValueError, match=r"hankel_penalty: layer 0 has its parameters \(log_dt, log_A_real, A_imag, "
                                         r"B, C\) on the meta device"):
        hankel_penalty(model)
    with pytest.raises(ValueError, match=r"on the meta device"):
        channel_hankel_nuclear_norms(model.base_model.layers[1].kernel)
    # the way out the message gives works
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.isfinite(hankel_penalty(model))
