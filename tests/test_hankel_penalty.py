"""The differentiable Hankel penalty: its value against `balanced_truncate`'s report and against
the singular values of the kernel's own Hankel matrix (no Gramian), its gradient against central
finite differences (gradcheck, float64) and its hand-written backward (`HankelNuclearNorm`)
against gradcheck and plain autograd through the dense route, and finite values and gradients
for the hard systems."""

from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch

import s4bt_hf
from s4bt_hf.balanced_truncation import apply_siso_symmetrizer, reachability_gramian
from s4bt_hf.training.hankel_penalty import (
    HankelNuclearNorm,
    _apply_symmetrizer,
    channel_hankel_nuclear_norms,
    hankel_nuclear_norm,
)

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


def kernel_hankel_nuclear_norm(kernel, channel, size=100):
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
        kernel.log_dt.fill_(0.0)  # Δ = 1, |exp(Δλ)| <= exp(-0.5): the kernel falls below 1e-21 within 100 steps
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


def random_systems(count, num_modes, outputs, time, seed=0):
    """Stable modes (discrete |a| in [0.3, 0.95], continuous Re a in [-1.5, -0.1]) and residues, complex128."""
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.rand(2, count, num_modes, dtype=torch.float64, generator=generator)
    if time == "discrete":
        modes = torch.polar(0.3 + 0.65 * uniform[0], 3.0 * uniform[1])
    else:
        modes = torch.complex(-0.1 - 1.4 * uniform[0], 3.0 * uniform[1])
    residues = torch.randn(count, outputs, num_modes, dtype=torch.complex128, generator=generator)
    return modes, residues


@pytest.mark.parametrize("outputs, time", [(1, "discrete"), (2, "discrete"), (1, "continuous"), (2, "continuous")])
def test_hand_written_backward_passes_gradcheck(outputs, time):
    """`HankelNuclearNorm`'s backward against central finite differences (complex inputs: both
    the real and the imaginary directions), on a batch of 2 systems."""
    modes, residues = random_systems(2, 3, outputs, time)
    inputs = (modes.requires_grad_(True), residues.requires_grad_(True))
    assert torch.autograd.gradcheck(lambda a, w: HankelNuclearNorm.apply(a, w, time), inputs,
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


def autograd_reference(modes, residues, time):
    """Σσ by plain autograd through the dense float64 route (Gramian, Cholesky, eigvalsh/svdvals),
    an independent oracle for the hand-written backward at sizes where finite differences are slow."""
    factor = torch.linalg.cholesky(reachability_gramian(modes, torch.ones_like(modes), time))
    blocks = [factor.mT @ apply_siso_symmetrizer(residues[:, row], factor) for row in range(residues.shape[-2])]
    if len(blocks) == 1:
        return torch.linalg.eigvalsh(blocks[0]).abs().sum(-1)
    return torch.linalg.svdvals(torch.cat(blocks, dim=-2)).sum(-1)


@pytest.mark.parametrize("outputs, time", [(1, "discrete"), (2, "discrete"), (1, "continuous")])
def test_hand_written_backward_matches_autograd_through_the_dense_route(outputs, time):
    modes, residues = random_systems(4, 12, outputs, time, seed=1)
    weights = torch.rand(4, dtype=torch.float64)  # a non-uniform incoming gradient
    results = []
    for function in (lambda a, w: HankelNuclearNorm.apply(a, w, time), lambda a, w: autograd_reference(a, w, time)):
        inputs = (modes.clone().requires_grad_(True), residues.clone().requires_grad_(True))
        value = function(*inputs)
        (value * weights).sum().backward()
        results.append((value.detach(), inputs[0].grad, inputs[1].grad))
    for ours, reference in zip(*results, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-12 * reference.abs().max().item())


def test_fused_symmetrizer_equals_the_shared_one():
    modes, residues = random_systems(3, 5, 1, "discrete")
    matrix = torch.randn(3, 10, 7, dtype=torch.float64)
    torch.testing.assert_close(_apply_symmetrizer(residues[:, 0], matrix),
                               apply_siso_symmetrizer(residues[:, 0], matrix), rtol=0, atol=1e-15)


def test_the_thread_count_is_restored():
    threads = torch.get_num_threads()
    s4bt_hf.hankel_penalty(make_model()).backward()
    assert torch.get_num_threads() == threads
