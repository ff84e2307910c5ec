"""The DSS kernel against independent float64 oracles: a direct sum for the Vandermonde product,
a direct convolution for the FFT, scipy's matrix exponential for zero-order hold and an explicit
recurrence for the whole layer."""

import numpy as np
import pytest
import scipy.linalg
import torch

from s4bt_hf.kernel_s4dss import fft_convolution, vandermonde_kernel, zoh_discretize
from s4bt_hf.modeling_s4dss import S4DSSKernel


def random_stable_system(channels, modes, generator, output_rows=1):
    """Random (λ, log Δ, b, C) in float64 with Re λ < 0."""
    real = -torch.rand(channels, modes, generator=generator, dtype=torch.float64) - 0.05
    imag = 20 * torch.randn(channels, modes, generator=generator, dtype=torch.float64)
    log_dt = torch.empty(channels, dtype=torch.float64).uniform_(np.log(1e-3), np.log(1e-1), generator=generator)
    input_vec = torch.randn(channels, modes, dtype=torch.complex128, generator=generator)
    output_vec = torch.randn(output_rows, channels, modes, dtype=torch.complex128, generator=generator)
    return torch.complex(real, imag), log_dt, input_vec, output_vec


def kernel_module(channels, modes, bidirectional, seed=0):
    """An S4DSSKernel in float64 with random stable parameters."""
    generator = torch.Generator().manual_seed(seed)
    module = S4DSSKernel(channels, modes, bidirectional).double()
    modes_, log_dt, input_vec, output_vec = random_stable_system(
        channels, modes, generator, output_rows=2 if bidirectional else 1
    )
    with torch.no_grad():
        module.log_dt.copy_(log_dt)
        module.log_A_real.copy_(torch.log(-modes_.real))
        module.A_imag.copy_(modes_.imag)
        module.B.copy_(torch.view_as_real(input_vec))
        module.C.copy_(torch.view_as_real(output_vec))
        module.D.copy_(torch.randn(channels, dtype=torch.float64, generator=generator))
    return module


@pytest.mark.parametrize("length", [1, 2, 7, 64, 101])
def test_vandermonde_kernel_matches_direct_sum(length):
    generator = torch.Generator().manual_seed(length)
    log_a_bar = torch.complex(-torch.rand(3, 5, dtype=torch.float64, generator=generator),
                              3 * torch.randn(3, 5, dtype=torch.float64, generator=generator))
    weights = torch.randn(2, 3, 5, dtype=torch.complex128, generator=generator)
    kernel = vandermonde_kernel(log_a_bar, weights, length)
    steps = np.arange(length)
    expected = np.real(
        np.einsum("chn,hnk->chk", weights.numpy(), np.exp(log_a_bar.numpy()[..., None] * steps))
    )
    assert kernel.shape == (2, 3, length)
    np.testing.assert_allclose(kernel.numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("length", [1, 5, 37, 64])
@pytest.mark.parametrize("two_sided", [False, True])
def test_fft_convolution_matches_direct_convolution(length, two_sided):
    generator = torch.Generator().manual_seed(length)
    inputs = torch.randn(2, 3, length, dtype=torch.float64, generator=generator)
    kernel = torch.randn(2 if two_sided else 1, 3, length, dtype=torch.float64, generator=generator)
    result = fft_convolution(inputs, kernel).numpy()
    u, k = inputs.numpy(), kernel.numpy()
    expected = np.zeros_like(u)
    for t in range(length):
        for s in range(length):
            if s <= t:
                expected[..., t] += k[0, :, t - s] * u[..., s]
            elif two_sided:
                expected[..., t] += k[1, :, s - t - 1] * u[..., s]
    np.testing.assert_allclose(result, expected, rtol=1e-10, atol=1e-11)


def test_zoh_matches_matrix_exponential():
    """B̄ = ∫_0^Δ e^{λ s} ds · b, from the exponential of the augmented matrix [[λ, b], [0, 0]] Δ."""
    generator = torch.Generator().manual_seed(1)
    modes, log_dt, input_vec, _ = random_stable_system(4, 3, generator)
    log_a_bar, input_bar = zoh_discretize(modes, log_dt, input_vec)
    for h in range(4):
        dt = float(np.exp(log_dt[h].item()))
        for n in range(3):
            augmented = np.array([[modes[h, n].item(), input_vec[h, n].item()], [0, 0]], dtype=complex) * dt
            exponential = scipy.linalg.expm(augmented)
            assert abs(np.exp(log_a_bar[h, n].item()) - exponential[0, 0]) < 1e-12
            assert abs(input_bar[h, n].item() - exponential[0, 1]) < 1e-12


def explicit_recurrence(module, inputs, reverse=False, row=0):
    """y_t = Re(C x_t) with x_t = Ā x_{t-1} + B̄ u_t, in numpy complex128 from scipy's ZOH.
    With `reverse`, run over the reversed sequence and read each state before it absorbs u_t."""
    modes = (-torch.exp(module.log_A_real) + 1j * module.A_imag).detach().numpy()
    dt = torch.exp(module.log_dt).detach().numpy()
    input_vec = torch.view_as_complex(module.B.detach()).numpy()
    output_vec = torch.view_as_complex(module.C.detach()[row]).numpy()
    a_bar = np.exp(dt[:, None] * modes)
    input_bar = (a_bar - 1) / modes * input_vec
    u = inputs.numpy()  # (B, L, H)
    batch, length, channels = u.shape
    state = np.zeros((batch, channels, modes.shape[1]), dtype=complex)
    outputs = np.zeros_like(u)
    order = range(length - 1, -1, -1) if reverse else range(length)
    for t in order:
        if reverse:
            outputs[:, t] = np.real((state * output_vec).sum(-1))
            state = a_bar * state + input_bar * u[:, t, :, None]
        else:
            state = a_bar * state + input_bar * u[:, t, :, None]
            outputs[:, t] = np.real((state * output_vec).sum(-1))
    return outputs


@pytest.mark.parametrize("length", [1, 33, 64])
def test_layer_convolution_equals_recurrence_float64(length):
    module = kernel_module(channels=4, modes=6, bidirectional=False)
    inputs = torch.randn(2, length, 4, dtype=torch.float64)
    expected = explicit_recurrence(module, inputs) + module.D.detach().numpy() * inputs.numpy()
    np.testing.assert_allclose(module(inputs).detach().numpy(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("length", [1, 29, 64])
def test_bidirectional_layer_equals_forward_plus_shifted_backward_recurrence(length):
    module = kernel_module(channels=3, modes=5, bidirectional=True, seed=3)
    inputs = torch.randn(2, length, 3, dtype=torch.float64)
    expected = (
        explicit_recurrence(module, inputs, row=0)
        + explicit_recurrence(module, inputs, reverse=True, row=1)
        + module.D.detach().numpy() * inputs.numpy()
    )
    np.testing.assert_allclose(module(inputs).detach().numpy(), expected, rtol=1e-10, atol=1e-10)


def test_kernel_memory_stays_bounded_at_length_16384():
    """Autograd must not keep an H x N x L Vandermonde tensor: every tensor saved for backward
    stays far below H·N·L elements, and the kernel still matches the closed form."""
    channels, modes, length = 8, 64, 16384
    module = S4DSSKernel(channels, modes, bidirectional=True)
    with torch.no_grad():
        module.log_dt.fill_(np.log(1e-3))
        module.log_A_real.fill_(np.log(0.5))
        module.A_imag.copy_(torch.linspace(0, 1000, modes).expand(channels, modes))
        module.B.normal_()
        module.C.normal_()
    saved_sizes = []

    def record(tensor):
        saved_sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(record, lambda tensor: tensor):
        kernel = module.convolution_kernel(length)
    kernel.sum().backward()
    assert max(saved_sizes) * 16 < channels * modes * length
    log_a_bar, input_bar, output_vec = (t.detach().to(torch.complex128) for t in module.discrete_system())
    for k in (0, 1, 4097, length - 1):
        expected = (output_vec * input_bar * torch.exp(k * log_a_bar)).sum(-1).real
        torch.testing.assert_close(kernel[:, :, k].double(), expected, rtol=2e-4, atol=2e-4)
    assert module.A_imag.grad is not None and torch.isfinite(module.A_imag.grad).all()


def test_kernel_runs_in_float32_under_bf16_autocast():
    module = kernel_module(channels=4, modes=6, bidirectional=False).float()
    inputs = torch.randn(2, 40, 4)
    reference = module(inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kernel = module.convolution_kernel(40)
        output = module(inputs.bfloat16())
    assert kernel.dtype == torch.float32
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output.float(), reference, rtol=2e-2, atol=5e-2)
