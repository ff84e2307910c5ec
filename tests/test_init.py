"""Initialisations: Skew-HiPPO against an independent dense eigen-computation, the S4D formulas,
and what `_init_weights` writes into every DSS kernel."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from s4bt_hf import S4DSSConfig, S4DSSModel
from s4bt_hf.initialization_s4dss import random_modes, s4d_inv_modes, s4d_lin_modes, skew_hippo_modes


def hippo_legs_normal_part_eigenvalues(num_modes):
    """Eigenvalues of HiPPO-LegS A + P Pᵀ (a general non-symmetric eig of the dense 2N x 2N
    matrix), keeping those with positive imaginary part. A_nk = -sqrt((2n+1)(2k+1)) for n > k,
    -(n+1) for n = k; P_n = sqrt(n + 1/2)."""
    size = 2 * num_modes
    n = np.arange(size)
    scale = np.sqrt(2 * n + 1)
    legs = -np.tril(np.outer(scale, scale), k=-1) - np.diag(n + 1.0)
    low_rank = np.sqrt(n + 0.5)
    eigenvalues = scipy.linalg.eigvals(legs + np.outer(low_rank, low_rank))
    positive = eigenvalues[eigenvalues.imag > 0]
    return positive[np.argsort(-positive.imag)]


@pytest.mark.parametrize("num_modes", [1, 4, 32, 64])
def test_skew_hippo_matches_dense_eigendecomposition(num_modes):
    modes = skew_hippo_modes(num_modes).numpy()
    expected = hippo_legs_normal_part_eigenvalues(num_modes)
    assert modes.shape == expected.shape == (num_modes,)
    np.testing.assert_allclose(modes.real, -0.5, atol=1e-12)
    np.testing.assert_allclose(expected.real, -0.5, atol=1e-8)
    np.testing.assert_allclose(modes.imag, expected.imag, rtol=1e-9)


def test_skew_hippo_check_values():
    omegas = skew_hippo_modes(32).imag.numpy()
    np.testing.assert_allclose(omegas[:4], [1303.27, 433.03, 258.15, 182.62], atol=0.01)
    np.testing.assert_allclose(omegas[-4:], [2.63, 1.70, 0.91, 0.26], atol=0.01)


def test_s4d_formulas():
    lin = s4d_lin_modes(5)
    np.testing.assert_allclose(lin.imag.numpy(), math.pi * np.arange(5))
    inv = s4d_inv_modes(32)  # S4D's d_state 64: 1283.4, 414.2, 240.4, ..., 0.32
    np.testing.assert_allclose(inv.imag.numpy()[:3], [1283.43, 414.23, 240.39], atol=0.01)
    assert abs(inv.imag[-1].item() - 0.3234) < 1e-3
    for modes in (lin, inv):
        np.testing.assert_allclose(modes.real.numpy(), -0.5)
    random = random_modes(100, torch.Generator().manual_seed(0))
    assert (random.real < 0).all() and (random.real >= -1).all() and (random.imag >= 0).all()


@pytest.mark.parametrize("init", ["skew_hippo", "s4d_lin", "s4d_inv", "random"])
def test_init_weights_fill_every_kernel(init):
    torch.manual_seed(0)
    config = S4DSSConfig(d_model=64, n_layers=2, d_state=[8, 4], init=init, dt_min=1e-3, dt_max=1e-1)
    model = S4DSSModel(config)
    for layer, num_modes in zip(model.layers, [8, 4], strict=True):
        kernel = layer.kernel
        modes = kernel.modes(torch.float64)
        assert modes.shape == (64, num_modes)
        assert (modes.real < 0).all()
        if init != "random":
            expected = {"skew_hippo": skew_hippo_modes, "s4d_lin": s4d_lin_modes, "s4d_inv": s4d_inv_modes}[init]
            torch.testing.assert_close(modes, expected(num_modes).expand(64, num_modes), rtol=1e-6, atol=1e-5)
        dt = torch.exp(kernel.log_dt.double())
        assert (dt >= 1e-3 * (1 - 1e-6)).all() and (dt <= 1e-1 * (1 + 1e-6)).all()
        # log-uniform: log Δ spreads over most of [log 1e-3, log 1e-1]
        assert (torch.log10(dt).max() - torch.log10(dt).min()) > 1.5
        torch.testing.assert_close(kernel.B[..., 0], torch.ones(64, num_modes))
        torch.testing.assert_close(kernel.B[..., 1], torch.zeros(64, num_modes))
        assert abs(kernel.C.pow(2).sum(-1).mean().item() - 1.0) < 0.2  # E|C|^2 = 1
        assert torch.isfinite(kernel.D).all() and kernel.D.std() > 0.5


def test_init_is_reproducible_with_seed():
    config = S4DSSConfig(vocab_size=11, d_model=8, n_layers=1, d_state=4)
    torch.manual_seed(5)
    first = S4DSSModel(config).state_dict()
    torch.manual_seed(5)
    second = S4DSSModel(config).state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)
