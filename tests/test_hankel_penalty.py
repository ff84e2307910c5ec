"""The differentiable Hankel penalty: its value against `balanced_truncate`'s report and against
the singular values of the kernel's own Hankel matrix (no Gramian), its gradient against central
finite differences (gradcheck, float64), and finite values and gradients for the hard systems."""

from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch

import s4bt_hf
from s4bt_hf.hankel_penalty import channel_hankel_nuclear_norms, hankel_nuclear_norm

PARAMETERS = ("log_dt", "log_A_real", "A_imag", "B", "C")


def make_model(seed=0, dtype=torch.float32, **overrides):
    fields = dict(d_model=6, n_layers=2, d_state=5, num_labels=2)
    fields.update(overrides)
    torch.manual_seed(seed)
    return s4bt_hf.S4DSSForSequenceClassification(s4bt_hf.S4DSSConfig(**fields)).to(dtype)


def report_penalty(model, time="discrete"):
    """Σ_layers mean_channels Σσ from the σ that balanced truncation reports (rank 1: any rank
    reports all σ of the original)."""
    report = model.balanced_truncate(rank=1, time=time).compression_report
    return sum(np.mean([sum(sigma) for sigma in layer.hankel_singular_values]) for layer in report.layers)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("time", ["discrete", "continuous"])
def test_value_is_the_sum_of_the_reported_hankel_singular_values(bidirectional, time):
    model = make_model(bidirectional=bidirectional, d_state=[5, 3])
    penalty = s4bt_hf.hankel_penalty(model, time=time)
    assert penalty.dtype == torch.float64 and penalty.ndim == 0
    assert penalty.item() == pytest.approx(report_penalty(model, time), rel=2e-7)  # the report keeps 7 digits


def kernel_hankel_nuclear_norm(kernel, channel, size=250):
    """Σσ of one channel from the singular values of the block Hankel matrix [K_{i+j}] of its
    discrete kernel (both output rows stacked): an oracle that never forms a Gramian."""
    kernels = kernel.convolution_kernel(2 * size).detach()[:, channel].numpy()  # (p, 2·size)
    blocks = np.stack([kernels[:, i:i + size] for i in range(size)])  # (size, p, size)
    return scipy.linalg.svdvals(blocks.reshape(-1, size)).sum()


@pytest.mark.parametrize("bidirectional", [False, True])
def test_value_equals_the_nuclear_norm_of_the_kernels_hankel_matrix(bidirectional):
    model = make_model(dtype=torch.float64, bidirectional=bidirectional, n_layers=1, d_model=3, d_state=4)
    kernel = model.s4dss.layers[0].kernel
    with torch.no_grad():
        kernel.log_dt.fill_(np.log(0.5))  # |exp(Δλ)| <= exp(-0.25): the kernel decays below 1e-16 in 250 steps
    values = channel_hankel_nuclear_norms(kernel)
    expected = [kernel_hankel_nuclear_norm(kernel, channel) for channel in range(3)]
    np.testing.assert_allclose(values.detach().numpy(), expected, rtol=1e-8)
    assert s4bt_hf.hankel_penalty(model).item() == pytest.approx(np.mean(expected), rel=1e-8)


def kernel_function(bidirectional, time):
    """The penalty of one layer as a function of its five SSM parameter tensors (for gradcheck)."""
    def function(log_dt, log_a_real, a_imag, input_pairs, output_pairs):
        kernel = SimpleNamespace(log_dt=log_dt, log_A_real=log_a_real, A_imag=a_imag, B=input_pairs, C=output_pairs)
        return channel_hankel_nuclear_norms(kernel, time)
    return function


@pytest.mark.parametrize("bidirectional, time", [(False, "discrete"), (True, "discrete"), (False, "continuous")])
def test_gradient_matches_central_finite_differences(bidirectional, time):
    model = make_model(dtype=torch.float64, bidirectional=bidirectional, n_layers=1, d_model=2, d_state=3)
    kernel = model.s4dss.layers[0].kernel
    inputs = tuple(getattr(kernel, name).detach().clone().requires_grad_(True) for name in PARAMETERS)
    assert torch.autograd.gradcheck(kernel_function(bidirectional, time), inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradients_reach_every_ssm_parameter_of_every_layer():
    model = make_model()
    s4bt_hf.hankel_penalty(model).backward()
    for name, parameter in model.named_parameters():
        reached = parameter.grad is not None and bool(parameter.grad.abs().sum() > 0)
        assert reached == (".kernel." in name and name.rsplit(".", 1)[-1] in PARAMETERS), name


def finite_penalty_and_gradient(model):
    penalty = s4bt_hf.hankel_penalty(model)
    penalty.backward()
    assert torch.isfinite(penalty)
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert torch.isfinite(parameter.grad).all(), name
    return penalty


@pytest.mark.parametrize("bidirectional", [False, True])
def test_repeated_modes_give_the_value_of_the_merged_system_and_finite_gradients(bidirectional):
    """Two equal modes hold one state's worth of system (P is singular): the value is that of the
    system with the two merged (residues added), the gradient is finite."""
    model = make_model(dtype=torch.float64, bidirectional=bidirectional, n_layers=1, d_model=3, d_state=4)
    kernel = model.s4dss.layers[0].kernel
    with torch.no_grad():
        for name in ("log_A_real", "A_imag", "B"):
            getattr(kernel, name)[:, 1] = getattr(kernel, name)[:, 0]
    penalty = finite_penalty_and_gradient(model)
    modes = torch.complex(-torch.exp(kernel.log_A_real), kernel.A_imag).detach()
    log_a_bar, input_bar = s4bt_hf.kernel_s4dss.zoh_discretize(modes, kernel.log_dt.detach(),
                                                               torch.view_as_complex(kernel.B.detach()))
    residues = torch.view_as_complex(kernel.C.detach()).permute(1, 0, 2) * input_bar.unsqueeze(-2)
    merged = torch.cat([residues[..., :1] + residues[..., 1:2], residues[..., 2:]], -1)
    expected = hankel_nuclear_norm(torch.exp(log_a_bar[:, 1:]), merged).mean()
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-6)


def test_modes_at_the_unit_circle_and_real_modes_stay_finite():
    model = make_model(n_layers=1, d_model=4, d_state=4, dtype=torch.float64)
    kernel = model.s4dss.layers[0].kernel
    with torch.no_grad():
        kernel.log_A_real[0] = -25.0  # Re λ ≈ -1e-11: |exp(Δλ)| ≈ 1 - 1e-13
        kernel.A_imag[1] = 0.0  # real modes: half the real states are unreachable (σ = 0)
    penalty = finite_penalty_and_gradient(model)
    assert penalty.item() == pytest.approx(report_penalty(model), rel=1e-5)


def test_a_zero_channel_contributes_zero_with_zero_gradient():
    model = make_model(n_layers=1, d_model=4, d_state=4, dtype=torch.float64)
    kernel = model.s4dss.layers[0].kernel
    with torch.no_grad():
        kernel.C[:, 2] = 0.0
        kernel.B[3] = 0.0
    values = channel_hankel_nuclear_norms(kernel)
    assert values[2].item() == 0.0 and values[3].item() == 0.0 and (values[:2] > 0).all()
    finite_penalty_and_gradient(model)
    # Σσ has a kink at σ = 0: the subgradient 0 is used, so nothing pushes the zero channels
    assert kernel.A_imag.grad[2:].abs().max() == 0 and kernel.log_dt.grad[2:].abs().max() == 0


def test_non_finite_parameters_give_nan_not_an_error():
    model = make_model(n_layers=1)
    with torch.no_grad():
        model.s4dss.layers[0].kernel.A_imag[0, 0] = float("nan")
    assert torch.isnan(s4bt_hf.hankel_penalty(model))


def test_float32_and_bfloat16_models_are_computed_in_float64():
    model = make_model()
    expected = s4bt_hf.hankel_penalty(model.to(torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = s4bt_hf.hankel_penalty(model.to(torch.float32))
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="time"):
        s4bt_hf.hankel_penalty(make_model(), time="laplace")
    with pytest.raises(TypeError, match="no DSS layers"):
        s4bt_hf.hankel_penalty(torch.nn.Linear(2, 2))
