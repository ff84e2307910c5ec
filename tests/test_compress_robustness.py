"""`balanced_truncate` on bad input (readable errors, original untouched) and on numerically hard
systems (real, repeated, zero, nearly marginal and aliased modes, Hankel singular values over
many orders of magnitude): always a finite, strictly stable model whose measured kernel error
stays within the reported a-priori bound."""

import math

import pytest
import torch

from s4bt_hf import S4DSSConfig, S4DSSForSequenceClassification
from s4bt_hf.balanced_truncation import reduce_to_modes
from s4bt_hf.initialization_s4dss import skew_hippo_modes

CHOLESKY_SHIFTS = (0.0, 1e-15, 1e-13, 1e-11, 1e-9, 1e-7)


def _build(dtype=torch.float32, seed=0, **overrides):
    fields = {"input_dim": 2, "d_model": 8, "n_layers": 2, "d_state": 6, "num_labels": 3}
    fields.update(overrides)
    torch.manual_seed(seed)
    model = S4DSSForSequenceClassification(S4DSSConfig(**fields))
    generator = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=generator))
    return model.to(dtype).eval()


def _inputs(dtype, batch=2, length=20, seed=7):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, 2, generator=generator, dtype=torch.float64).to(dtype)


def _snapshot(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _assert_unchanged(before, model):
    after = model.state_dict()
    assert set(after) == set(before)
    for name, tensor in before.items():
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=0, equal_nan=True, msg=name)
    assert model.compression_report is None


def _complex_normal(*shape, generator):
    return torch.complex(torch.randn(*shape, generator=generator, dtype=torch.float64),
                         torch.randn(*shape, generator=generator, dtype=torch.float64))


def _set_channel(kernel, channel, modes, input_vec, output_vec, dt):
    """Write one channel's continuous modes λ (N,), b (N,), output rows C (p, N) and step Δ."""
    with torch.no_grad():
        kernel.log_A_real[channel] = torch.log(-modes.real)
        kernel.A_imag[channel] = modes.imag
        kernel.B[channel] = torch.view_as_real(input_vec.to(torch.complex128))
        kernel.C[:, channel] = torch.view_as_real(output_vec.to(torch.complex128))
        kernel.log_dt[channel] = math.log(dt)


def _discrete_modes(kernel):
    """exp(Δλ) of the stored parameters, in float64."""
    with torch.no_grad():
        modes = torch.complex(-torch.exp(kernel.log_A_real.double()), kernel.A_imag.double())
        return torch.exp(torch.exp(kernel.log_dt.double()).unsqueeze(-1) * modes)


def _assert_sound(model, compressed, length=1024, slack=1e-6):
    """Finite parameters and logits, every reduced discrete mode strictly inside the unit circle,
    and every channel's kernel error (measured here, independently) within the reported bound."""
    for name, parameter in compressed.named_parameters():
        assert torch.isfinite(parameter).all(), f"{name} holds NaN/Inf"
    with torch.no_grad():
        logits = compressed(input_values=_inputs(compressed.dtype)).logits
    assert torch.isfinite(logits).all()
    report = compressed.compression_report
    for original, layer, layer_report in zip(model.base_model.layers, compressed.base_model.layers, report.layers,
                                             strict=True):
        magnitude = _discrete_modes(layer.kernel).abs()
        assert (magnitude < 1).all(), magnitude.max().item()
        with torch.no_grad():
            old = original.kernel.convolution_kernel(length).double()
            new = layer.kernel.convolution_kernel(length).double()
        assert torch.isfinite(new).all()
        error = (old - new).square().sum((0, 2)).sqrt()
        norm = old.square().sum((0, 2)).sqrt()
        bound = torch.tensor(layer_report.error_bound, dtype=torch.float64)
        assert torch.isfinite(bound).all()
        excess = error - bound - slack * norm - 1e-9
        assert (excess <= 0).all(), (layer_report.layer, error.tolist(), bound.tolist())
        sigma = torch.tensor(layer_report.hankel_singular_values, dtype=torch.float64)
        assert torch.isfinite(sigma).all() and (sigma >= 0).all()
    return report


# ----------------------------------------------------------------------------- bad arguments


BAD_ARGUMENTS = [
    ({"rank": 0}, ValueError, r"`rank` must be in \[1, d_state=6\]"),
    ({"rank": -2}, ValueError, r"`rank` must be in \[1, d_state=6\]"),
    ({"rank": 7}, ValueError, r"d_state=6\] for layer 0, got 7"),
    ({"rank": [2, 7]}, ValueError, r"d_state=6\] for layer 1, got 7"),
    ({"rank": 2.5}, TypeError, r"`rank` must be an int"),
    ({"rank": 3.0}, TypeError, r"`rank` must be an int"),
    ({"rank": True}, TypeError, r"`rank` must be an int"),
    ({"rank": "3"}, TypeError, r"`rank` must be an int"),
    ({"rank": [2, "3"]}, TypeError, r"`rank` must be an int"),
    ({"rank": [2]}, ValueError, r"`rank` lists 1 values for 2 layers"),
    ({"rank": [2, 2, 2]}, ValueError, r"`rank` lists 3 values for 2 layers"),
    ({"rank": 3, "tol": 0.9}, ValueError, r"exactly one of `rank`.*or `tol`"),
    ({}, ValueError, r"exactly one of `rank`.*or `tol`"),
    ({"tol": 0}, ValueError, r"`tol`.*\(0, 1\]"),
    ({"tol": 1.5}, ValueError, r"`tol`.*\(0, 1\]"),
    ({"tol": -0.1}, ValueError, r"`tol`.*\(0, 1\]"),
    ({"tol": float("nan")}, ValueError, r"`tol`.*\(0, 1\]"),
    ({"tol": True}, ValueError, r"`tol`"),
    ({"tol": "0.9"}, ValueError, r"`tol`"),
    ({"rank": 2, "time": "sideways"}, ValueError, r"`time` must be one of.*sideways"),
    ({"rank": 2, "kernel_length": 0}, ValueError, r"`kernel_length` must be a positive int"),
    ({"rank": 2, "kernel_length": 10.0}, ValueError, r"`kernel_length` must be a positive int"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_ARGUMENTS, ids=[repr(case[0]) for case in BAD_ARGUMENTS])
def test_bad_arguments_raise_and_leave_the_model_untouched(kwargs, error, message):
    model = _build()
    before = _snapshot(model)
    with pytest.raises(error, match=message):
        model.balanced_truncate(**kwargs)
    _assert_unchanged(before, model)
    assert model.config.d_state == 6


# ----------------------------------------------------------------------------- bad parameters

NON_FINITE_ENTRIES = {  # one entry of channel 3 of each kernel parameter
    "log_dt": (3,),
    "log_A_real": (3, 2),
    "A_imag": (3, 4),
    "B": (3, 1, 1),
    "C": (0, 3, 5, 0),
    "D": (3,),
}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", list(NON_FINITE_ENTRIES))
def test_non_finite_kernel_parameter_names_layer_and_channel(name, value):
    model = _build()
    with torch.no_grad():
        getattr(model.s4dss.layers[1].kernel, name)[NON_FINITE_ENTRIES[name]] = value
    before = _snapshot(model)
    with pytest.raises(ValueError, match="NaN or Inf") as info:
        model.balanced_truncate(rank=2)
    message = str(info.value)
    assert "layer 1" in message and "channel 3" in message and f"`{name}`" in message, message
    _assert_unchanged(before, model)
    with pytest.raises(ValueError, match=r"layer 1, channel 3"):
        model.balanced_truncate(tol=0.9)


def test_non_finite_backward_output_row_names_the_channel():
    model = _build(bidirectional=True)
    with torch.no_grad():
        model.s4dss.layers[1].kernel.C[1, 3, 0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"layer 1, channel 3: parameter `C`"):
        model.balanced_truncate(rank=2)


@pytest.mark.parametrize("log_a_real", [float("-inf"), -800.0, -60.0], ids=["-inf", "underflow", "marginal"])
def test_unstable_channel_in_an_edited_checkpoint(tmp_path, log_a_real):
    """Re λ = -exp(log_A_real) that is 0 (or so small that |exp(Δλ)| rounds to 1) has no
    finite Gramian: the error names the layer and channel."""
    model = _build()
    with torch.no_grad():
        model.s4dss.layers[0].kernel.log_A_real[2, 1] = log_a_real
    model.save_pretrained(tmp_path)
    loaded = S4DSSForSequenceClassification.from_pretrained(tmp_path).eval()
    assert loaded.s4dss.layers[0].kernel.log_A_real[2, 1].item() == log_a_real
    before = _snapshot(loaded)
    with pytest.raises(ValueError, match=r"layer 0, channel 2\b"):
        loaded.balanced_truncate(rank=3)
    with pytest.raises(ValueError, match=r"layer 0, channel 2\b"):
        loaded.balanced_truncate(tol=0.5)
    _assert_unchanged(before, loaded)


def test_checkpoint_with_infinitely_fast_mode_fails_readably(tmp_path):
    """log_A_real so large that Re λ overflows (a float32 model's forward then holds -inf):
    either compression gives a sound model or the error names the layer and channel."""
    model = _build(dtype=torch.float64)
    with torch.no_grad():
        model.s4dss.layers[0].kernel.log_A_real[2, 1] = 800.0
    try:
        compressed = model.balanced_truncate(rank=3)
    except ValueError as error:
        assert "layer 0" in str(error) and "channel 2" in str(error), str(error)
    else:
        _assert_sound(model, compressed)


# ----------------------------------------------------------------------------- hard systems, model API


def _hard_model(num_modes, channels=4, seed=0, dtype=torch.float64):
    """A one-layer model whose channels the tests overwrite (float64 by default: the measured
    kernel error is then compared with the bound without float32 rounding)."""
    return _build(dtype=dtype, seed=seed, d_model=channels, n_layers=1, d_state=num_modes)


# float32 models: the stored parameters and the kernels are rounded, so the bound gets more slack
DTYPES = pytest.mark.parametrize("dtype, slack", [(torch.float64, 1e-6), (torch.float32, 1e-3)],
                                 ids=["float64", "float32"])


def test_real_original_modes_with_complex_input_vectors():
    generator = torch.Generator().manual_seed(1)
    model = _hard_model(6)
    kernel = model.s4dss.layers[0].kernel
    decay = -torch.logspace(-1, 0.5, 6, dtype=torch.float64)
    all_real = torch.complex(decay, torch.zeros(6, dtype=torch.float64))
    half_real = torch.complex(decay, torch.tensor([0.0, 0.0, 0.0, 2.0, 5.0, 9.0], dtype=torch.float64))
    repeated_real = torch.complex(torch.full((6,), -0.3, dtype=torch.float64), torch.zeros(6, dtype=torch.float64))
    for channel, modes in enumerate((all_real, half_real, repeated_real, all_real)):
        _set_channel(kernel, channel, modes, _complex_normal(6, generator=generator),
                     _complex_normal(1, 6, generator=generator), dt=0.05 * (channel + 1))
    for rank in (1, 2, 3, 6):
        report = _assert_sound(model, model.balanced_truncate(rank=rank))
        layer = report.layers[0]
        assert all(kept <= 2 * rank for kept in layer.kept_states)
        # identical real modes with complex b, c: a one-state real system (one mode, the rest padding)
        assert layer.kept_states[2] == 1 and layer.padded_modes[2] == rank - 1, (layer.kept_states, layer.padded_modes)
    full = model.balanced_truncate(rank=6).compression_report.layers[0]
    norm = torch.tensor(full.kernel_norm)
    assert (torch.tensor(full.kernel_error) <= 1e-8 * norm).all(), full.kernel_error


@DTYPES
def test_modes_next_to_the_unit_circle(dtype, slack):
    """|exp(Δλ)| within 1e-9 of 1: Re λ = -1e-6 and Δ = 1e-3."""
    generator = torch.Generator().manual_seed(2)
    model = _hard_model(6, dtype=dtype)
    kernel = model.s4dss.layers[0].kernel
    slow = torch.complex(torch.full((6,), -1e-6, dtype=torch.float64),
                         torch.tensor([0.0, 0.5, 1.0, 2.0, 4.0, 8.0], dtype=torch.float64))
    mixed = torch.complex(torch.tensor([-1e-6, -0.5, -0.5, -2.0, -1e-6, -0.1], dtype=torch.float64),
                          torch.tensor([3.0, 1.0, 7.0, 0.0, 0.0, 20.0], dtype=torch.float64))
    for channel, modes in enumerate((slow, mixed, slow, mixed)):
        _set_channel(kernel, channel, modes, _complex_normal(6, generator=generator),
                     _complex_normal(1, 6, generator=generator), dt=1e-3)
    magnitude = _discrete_modes(kernel).abs()
    assert (1 - magnitude).min() < 2e-9 and (magnitude < 1).all()
    for rank in (1, 2, 4, 6):
        _assert_sound(model, model.balanced_truncate(rank=rank), slack=slack)


def test_repeated_identical_modes():
    """Every mode identical: a 2-state real system in a 12-state realisation (singular Gramians)."""
    generator = torch.Generator().manual_seed(3)
    model = _hard_model(6)
    kernel = model.s4dss.layers[0].kernel
    same = torch.full((6,), complex(-0.5, 3.0), dtype=torch.complex128)
    for channel in range(4):
        _set_channel(kernel, channel, same, _complex_normal(6, generator=generator),
                     _complex_normal(1, 6, generator=generator), dt=0.05)
    for rank in (1, 3, 6):
        compressed = model.balanced_truncate(rank=rank)
        report = _assert_sound(model, compressed)
        layer = report.layers[0]
        sigma = torch.tensor(layer.hankel_singular_values, dtype=torch.float64)
        assert (sigma[:, 2:] <= 1e-12 * sigma[:, :1]).all()  # a 2-state system
        # (states of σ at rounding level may be kept, but they carry nothing)
        assert all(padded >= rank - 2 for padded in layer.padded_modes), layer.padded_modes
        # one complex mode holds the whole channel
        assert max(layer.kernel_error) <= 1e-10 * max(layer.kernel_norm)


@pytest.mark.parametrize("zero", ["C", "B"])
def test_zero_channel(zero):
    """A channel with C = 0 (or B = 0) computes the zero kernel: its Hankel singular values are
    0, every reduced mode is padding, and the reduced kernel is exactly 0."""
    model = _hard_model(6)
    kernel = model.s4dss.layers[0].kernel
    with torch.no_grad():
        if zero == "C":
            kernel.C[:, 1].zero_()
        else:
            kernel.B[1].zero_()
    for rank in (1, 3, 6):
        compressed = model.balanced_truncate(rank=rank)
        report = _assert_sound(model, compressed)
        layer = report.layers[0]
        with torch.no_grad():
            reduced_kernel = compressed.s4dss.layers[0].kernel.convolution_kernel(64)
        assert torch.equal(reduced_kernel[:, 1], torch.zeros_like(reduced_kernel[:, 1]))
        # the impulse response is the skip D alone, kept exactly
        skip = abs(float(kernel.D[1]))
        assert layer.kernel_norm[1] == pytest.approx(skip, rel=1e-6) and layer.kernel_error[1] == 0
        assert layer.error_bound[1] == 0 and layer.dc_gain_error[1] == 0
        assert layer.hankel_singular_values[1] == [0.0] * 12, layer.hankel_singular_values[1][:3]
        assert layer.padded_modes[1] == rank and layer.kept_states[1] == 0, (layer.padded_modes, layer.kept_states)
        assert layer.adjusted_modes[1] == 0
        # the other channels still hold their systems
        assert all(padded < rank for index, padded in enumerate(layer.padded_modes) if index != 1)


def test_whole_zero_layer_with_tol():
    model = _hard_model(6)
    with torch.no_grad():
        model.s4dss.layers[0].kernel.C.zero_()
    compressed = model.balanced_truncate(tol=0.9)
    report = _assert_sound(model, compressed)
    assert report.layers[0].rank == 1
    assert report.layers[0].layer_kept_energy == 1.0


@DTYPES
def test_aliased_skew_hippo_modes(dtype, slack):
    """Skew-HiPPO N=64 at Δ = 0.1: Δ·Im λ far beyond π, so the discrete modes alias."""
    generator = torch.Generator().manual_seed(4)
    model = _hard_model(64, channels=2, dtype=dtype)
    kernel = model.s4dss.layers[0].kernel
    modes = skew_hippo_modes(64)
    assert 0.1 * modes.imag.max() > 10 * math.pi
    for channel in range(2):
        _set_channel(kernel, channel, modes, torch.ones(64, dtype=torch.complex128),
                     _complex_normal(1, 64, generator=generator) * math.sqrt(0.5), dt=0.1)
    for rank in (4, 16):
        _assert_sound(model, model.balanced_truncate(rank=rank, kernel_length=512), length=512, slack=slack)


def test_reduced_real_poles_found_and_handled():
    """Random channels whose reduced eigenvalues come out real (odd kept states or padding)."""
    found = 0
    for seed in range(6):
        generator = torch.Generator().manual_seed(100 + seed)
        model = _hard_model(5, seed=seed)
        kernel = model.s4dss.layers[0].kernel
        for channel in range(4):
            modes = torch.complex(-torch.rand(5, generator=generator, dtype=torch.float64) * 2 - 0.01,
                                  torch.rand(5, generator=generator, dtype=torch.float64) * 0.3)
            _set_channel(kernel, channel, modes, _complex_normal(5, generator=generator),
                         _complex_normal(1, 5, generator=generator), dt=0.2)
        for rank in (1, 2, 3):
            layer = _assert_sound(model, model.balanced_truncate(rank=rank)).layers[0]
            found += sum(kept % 2 == 1 or padded > 0 for kept, padded in zip(layer.kept_states, layer.padded_modes,
                                                                             strict=True))
            assert all(kept <= 2 * rank for kept in layer.kept_states)
    assert found > 0


@DTYPES
def test_hankel_singular_values_over_many_orders_of_magnitude(dtype, slack):
    """Modes with very different decay and residues from 1 down to 1e-16: σ spans ~16 decades."""
    model = _hard_model(8, channels=2, dtype=dtype)
    kernel = model.s4dss.layers[0].kernel
    modes = torch.complex(-torch.logspace(-2, 2, 8, dtype=torch.float64),
                          torch.linspace(0, 6, 8, dtype=torch.float64))
    residues = torch.logspace(0, -16, 8, dtype=torch.float64).to(torch.complex128)
    _set_channel(kernel, 0, modes, torch.ones(8, dtype=torch.complex128), residues.unsqueeze(0), dt=0.1)
    _set_channel(kernel, 1, modes.flip(0), residues, torch.ones(1, 8, dtype=torch.complex128), dt=0.1)
    for rank in (1, 3, 5, 8):
        report = _assert_sound(model, model.balanced_truncate(rank=rank), slack=slack)
        layer = report.layers[0]
        sigma = torch.tensor(layer.hankel_singular_values, dtype=torch.float64)
        assert sigma[0, 0] / sigma[0, -1] > 1e12 and sigma[1, 0] / sigma[1, -1] > 1e12
        assert layer.max_cholesky_shift in CHOLESKY_SHIFTS
        assert math.isfinite(layer.max_eigenvector_condition)


# ----------------------------------------------------------------------------- hard systems, reduce_to_modes


def _kernel(modes, residues, length):
    """Re Σ residues · modes^k over k < length; modes (..., N), residues (..., p, N)."""
    steps = modes.unsqueeze(-1).expand(*modes.shape, length - 1)
    powers = torch.cat([torch.ones_like(modes).unsqueeze(-1), steps], -1).cumprod(-1)  # (..., N, L)
    return (residues @ powers).real


def test_reduce_to_modes_with_hankel_singular_values_spanning_16_decades():
    magnitudes = torch.logspace(-3, -1e-3, 10, dtype=torch.float64).flip(0)  # 0.998 .. 0.001
    phases = torch.linspace(0, 3, 10, dtype=torch.float64)
    modes = torch.polar(magnitudes, phases).unsqueeze(0)
    input_vec = torch.ones_like(modes)
    output_vec = torch.logspace(0, -18, 10, dtype=torch.float64).to(torch.complex128).view(1, 1, 10)
    for rank in (1, 2, 4, 6, 10):
        result = reduce_to_modes(modes, input_vec, output_vec, rank)
        sigma = result.details["hankel_singular_values"]
        assert torch.isfinite(sigma).all() and (sigma >= 0).all()
        assert sigma[0, 0] / sigma[0, sigma[0] > 0].min() > 1e14
        details = result.details
        for tensor in (result.modes, result.residues, details["error_bound"], details["eigenvector_condition"]):
            assert torch.isfinite(tensor).all()
        assert result.details["cholesky_shift"].item() in CHOLESKY_SHIFTS
        assert (result.modes.abs() < 1).all()
        original = _kernel(modes, input_vec.unsqueeze(-2) * output_vec, 4000)
        reduced = _kernel(result.modes, result.residues, 4000)
        error = (original - reduced).square().sum((-2, -1)).sqrt()
        norm = original.square().sum((-2, -1)).sqrt()
        bound = result.details["error_bound"]
        assert (error <= bound + 1e-7 * norm).all(), (rank, error, bound)


def test_reduce_to_modes_zero_system_is_exactly_zero():
    modes = torch.polar(torch.tensor([[0.9, 0.5, 0.2]], dtype=torch.float64),
                        torch.tensor([[0.1, 1.0, 2.0]], dtype=torch.float64))
    for input_vec, output_vec in (
        (torch.ones_like(modes), torch.zeros(1, 1, 3, dtype=torch.complex128)),
        (torch.zeros_like(modes), torch.ones(1, 2, 3, dtype=torch.complex128)),
    ):
        result = reduce_to_modes(modes, input_vec, output_vec, rank=2, pad_mode=0.25)
        sigma = result.details["hankel_singular_values"]
        assert torch.equal(sigma, torch.zeros_like(sigma))
        assert result.details["kept_states"].tolist() == [0] and result.padding.all()
        assert torch.equal(result.residues, torch.zeros_like(result.residues))
        assert (result.modes == 0.25).all()
        assert result.details["error_bound"].tolist() == [0.0]


# ----------------------------------------------------------------------------- last guard of the write-back


def _poisoned(method, channels, factor):
    """`method` with the residues of `channels` multiplied by `factor` (NaN, or an overflow)."""
    def reduce(system, rank, **options):
        result = method(system, rank, **options)
        result.residues[channels] = result.residues[channels] * factor
        return result
    reduce.__signature__ = __import__("inspect").signature(method)
    return reduce


@pytest.mark.parametrize("factor, dtype, names", [(float("nan"), torch.float64, "NaN"),
                                                   (1e80, torch.float32, "float32")], ids=["nan", "float32-overflow"])
def test_write_back_never_stores_non_finite_parameters(monkeypatch, factor, dtype, names):
    """Whatever a method returns, `reduce` stores no NaN or Inf: it raises naming the layer, the
    parameter, every channel concerned (and the dtype), and the model is left as it was."""
    from s4bt_hf import reduction_methods
    from s4bt_hf.balanced_truncation import balanced_truncation

    monkeypatch.setitem(reduction_methods.REDUCTION_METHODS, "balanced_truncation",
                        _poisoned(balanced_truncation, [2, 5], factor))
    model = _build(dtype=dtype)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"layer 0, channel\(s\) \[2, 5\]: the reduction gives parameter `[BC]`") \
            as info:
        model.reduce("balanced_truncation", 2)
    assert names in str(info.value) and "nothing was returned" in str(info.value)
    _assert_unchanged(before, model)


def test_refit_never_stores_non_finite_parameters(monkeypatch):
    """The same guard after the data-aware refit: a NaN it would write is refused by name."""
    from s4bt_hf import compression

    refit = compression.refit_output_maps

    def poisoned_refit(original, reduced, batches):
        errors = refit(original, reduced, batches)
        with torch.no_grad():
            reduced.s4dss.layers[1].kernel.C[0, 3, 1, 0] = float("nan")
        return errors

    monkeypatch.setattr(compression, "refit_output_maps", poisoned_refit)
    model = _build()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"layer 1, channel\(s\) \[3\]: the refit gives parameter `C` NaN or Inf.*"
                                         r"without `calibration_data`"):
        model.reduce("modal_truncation", 2, calibration_data={"input_values": _inputs(torch.float32)})
    _assert_unchanged(before, model)
