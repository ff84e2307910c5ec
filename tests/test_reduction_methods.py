"""The reduction methods beside balanced truncation, on banks of diagonal systems, against
independent oracles: a dense scipy balancing + residualisation for singular perturbation,
scipy Lyapunov solutions for H2 norms, long kernel sums, frequency responses on a grid, and a
brute-force search for the rank budget."""

import itertools

import numpy as np
import pytest
import scipy.linalg
import torch
from test_balanced_truncation import kernel, random_continuous_systems, random_discrete_systems

from s4bt_hf.balanced_truncation import balanced_truncation, real_realization
from s4bt_hf.diagonal_system import CONTINUOUS, DISCRETE, DiagonalSystem, error_h2_norm_squared, modal_dc_gain
from s4bt_hf.h2_reduction import h2_optimal, optimal_residues
from s4bt_hf.modal_truncation import modal_truncation
from s4bt_hf.rank_budget import allocate_ranks, discarded_energy, rank_gains
from s4bt_hf.reduction_methods import REDUCTION_METHODS
from s4bt_hf.singular_perturbation import singular_perturbation

FREQUENCIES = np.linspace(0.0, np.pi, 41)


def layer_response(modes, residues, feedthrough, first_lags, points, time):
    """Frequency response (..., p, F) of reduced systems in the layer's form: row ρ is
    z^{-lag_ρ} Σ_k Re(w μ^k) z^{-k} + d_ρ (discrete) or Σ Re-part terms + d_ρ (continuous)."""
    modes, residues = modes.numpy()[..., None, :, None], residues.numpy()[..., :, :, None]
    if time == DISCRETE:
        inverse = 1.0 / points
        terms = 0.5 * (residues / (1 - modes * inverse) + residues.conj() / (1 - modes.conj() * inverse))
        response = terms.sum(-2) * inverse ** np.array(first_lags).reshape(-1, 1)
    else:
        terms = 0.5 * (residues / (points - modes) + residues.conj() / (points - modes.conj()))
        response = terms.sum(-2)
    return response + feedthrough.numpy()[..., None]


def dense_proper_system(modes, input_vec, output_vec, first_lags, time):
    """Real (A, B, C, D) of one system: the layer's map as a proper system (discrete lag-0 rows:
    C A and direct term C B), written independently of the package from the real realisation."""
    state, real_input, real_output = (t.numpy() for t in real_realization(modes, input_vec, output_vec))
    rows, direct = [], []
    for row, lag in enumerate(first_lags):
        if time == DISCRETE and lag == 0:
            rows.append(real_output[row] @ state)
            direct.append(real_output[row] @ real_input)
        else:
            rows.append(real_output[row])
            direct.append(0.0)
    return state, real_input, np.stack(rows), np.array(direct)


def dense_singular_perturbation(a, b, c, d, order, time):
    """Square-root balancing with scipy, then the residualisation formulas on the dense balanced system."""
    if time == DISCRETE:
        reach = scipy.linalg.solve_discrete_lyapunov(a, np.outer(b, b))
        obs = scipy.linalg.solve_discrete_lyapunov(a.T, c.T @ c)
    else:
        reach = scipy.linalg.solve_continuous_lyapunov(a, -np.outer(b, b))
        obs = scipy.linalg.solve_continuous_lyapunov(a.T, -c.T @ c)
    lower_c, lower_o = np.linalg.cholesky(reach), np.linalg.cholesky(obs)
    u, sigma, vt = np.linalg.svd(lower_o.T @ lower_c)
    transform = lower_c @ vt.T / np.sqrt(sigma)
    inverse = (u / np.sqrt(sigma)).T @ lower_o.T
    a, b, c = inverse @ a @ transform, inverse @ b, c @ transform
    a11, a12, a21, a22 = a[:order, :order], a[:order, order:], a[order:, :order], a[order:, order:]
    steady = np.eye(len(a22)) - a22 if time == DISCRETE else -a22
    solve = np.linalg.solve
    return (a11 + a12 @ solve(steady, a21), b[:order] + a12 @ solve(steady, b[order:]),
            c[:, :order] + c[:, order:] @ solve(steady, a21), d + c[:, order:] @ solve(steady, b[order:]))


def dense_response(a, b, c, d, points):
    identity = np.eye(len(a))
    return np.stack([c @ np.linalg.solve(point * identity - a, b) + d for point in points], -1)


def systems(time, outputs, seed=0, count=5, num_modes=5):
    if time == DISCRETE:
        return random_discrete_systems(count, num_modes, outputs=outputs, max_radius=0.9, seed=seed)
    return random_continuous_systems(count, num_modes, outputs, seed=seed, min_decay=0.2, frequency_scale=3)


def grid(time):
    return np.exp(1j * FREQUENCIES) if time == DISCRETE else 1j * np.tan(FREQUENCIES / 2.01) * 4


@pytest.mark.parametrize("time", [DISCRETE, CONTINUOUS])
@pytest.mark.parametrize("outputs", [1, 2])
def test_singular_perturbation_matches_dense_scipy_residualisation(time, outputs):
    modes, input_vec, output_vec = systems(time, outputs)
    bank = DiagonalSystem(modes, input_vec, output_vec, time)
    for rank in (1, 2, 3):
        reduced = singular_perturbation(bank, rank)
        points = grid(time)
        ours = layer_response(reduced.modes, reduced.residues, reduced.feedthrough, bank.first_lags, points, time)
        for index in range(modes.shape[0]):
            order = int(reduced.details["kept_states"][index])
            dense = dense_proper_system(modes[index], input_vec[index], output_vec[index], bank.first_lags, time)
            expected = dense_response(*dense_singular_perturbation(*dense, order, time), points)
            scale = np.abs(dense_response(*dense, points)).max()
            np.testing.assert_allclose(ours[index], expected, atol=1e-8 * scale)


@pytest.mark.parametrize("time", [DISCRETE, CONTINUOUS])
@pytest.mark.parametrize("outputs", [1, 2])
def test_singular_perturbation_keeps_the_dc_gain_and_the_bound(time, outputs):
    modes, input_vec, output_vec = systems(time, outputs, seed=4, count=12, num_modes=8)
    bank = DiagonalSystem(modes, input_vec, output_vec, time)
    points = grid(time)
    dense = [dense_proper_system(modes[i], input_vec[i], output_vec[i], bank.first_lags, time) for i in range(12)]
    original = np.stack([dense_response(*system, points) for system in dense])
    for rank in (1, 2, 4, 6):
        reduced = singular_perturbation(bank, rank)
        ours = layer_response(reduced.modes, reduced.residues, reduced.feedthrough, bank.first_lags, points, time)
        # the DC gain (z = 1, s = 0: the first grid point) of every row, exactly
        np.testing.assert_allclose(ours[..., 0], original[..., 0], rtol=1e-9, atol=1e-10)
        # ‖G - G_r‖_∞ over the grid (both rows as one vector) within 2 Σ_{i>m} σ_i
        peak = np.sqrt((np.abs(ours - original) ** 2).sum(-2)).max(-1)
        assert np.all(peak <= reduced.details["error_bound"].numpy() * (1 + 1e-8) + 1e-10)


@pytest.mark.parametrize("method", sorted(REDUCTION_METHODS))
@pytest.mark.parametrize("time", [DISCRETE, CONTINUOUS])
@pytest.mark.parametrize("outputs", [1, 2])
def test_full_order_reproduces_the_system(method, time, outputs):
    modes, input_vec, output_vec = systems(time, outputs, seed=7, count=4, num_modes=5)
    bank = DiagonalSystem(modes, input_vec, output_vec, time)
    reduced = REDUCTION_METHODS[method](bank, 5)
    points = grid(time)
    ours = layer_response(reduced.modes, reduced.residues, reduced.feedthrough, bank.first_lags, points, time)
    original = layer_response(modes, bank.residues(), torch.zeros(4, outputs, dtype=torch.float64),
                              bank.first_lags, points, time)
    np.testing.assert_allclose(ours, original, atol=1e-8 * np.abs(original).max())


def scipy_h2_norm_squared(modes, residues, feedthrough, time):
    """Σ_k K_k² (discrete, with the direct term at lag 0) or ∫ g² (continuous), from the dense
    real realisation with scipy's Lyapunov solvers: ‖·‖² = C P Cᵀ (+ d²)."""
    unit = torch.ones_like(modes)
    state, real_input, real_output = (t.numpy() for t in real_realization(modes, unit, residues))
    if time == DISCRETE:
        gram = scipy.linalg.solve_discrete_lyapunov(state, np.outer(real_input, real_input))
        # K_k = C A^k B: lag 0 is C B, which the feedthrough d adds to
        lag0 = real_output @ real_input
        value = np.trace(real_output @ gram @ real_output.T) - (lag0 ** 2).sum() + ((lag0 + feedthrough) ** 2).sum()
        return value
    gram = scipy.linalg.solve_continuous_lyapunov(state, -np.outer(real_input, real_input))
    return np.trace(real_output @ gram @ real_output.T)


@pytest.mark.parametrize("time", [DISCRETE, CONTINUOUS])
@pytest.mark.parametrize("outputs", [1, 2])
def test_h2_is_never_worse_than_balanced_truncation(time, outputs):
    modes, input_vec, output_vec = systems(time, outputs, seed=11, count=10, num_modes=8)
    bank = DiagonalSystem(modes, input_vec, output_vec, time)
    for rank in (1, 2, 4):
        balanced = balanced_truncation(bank, rank)
        optimal = h2_optimal(bank, rank, max_iterations=30)
        for index in range(10):
            def error(result, index=index):
                combined = torch.cat([modes[index], result.modes[index]])
                residues = torch.cat([bank.residues()[index], -result.residues[index]], -1)
                return scipy_h2_norm_squared(combined, residues, np.zeros(outputs), time)

            ours, reference = error(optimal), error(balanced)
            assert ours <= reference * (1 + 1e-9) + 1e-12, (rank, index, ours, reference)
            np.testing.assert_allclose(optimal.details["h2_error"][index].item() ** 2, ours, rtol=1e-6, atol=1e-12)
            np.testing.assert_allclose(optimal.details["h2_error_balanced"][index].item() ** 2, reference,
                                       rtol=1e-6, atol=1e-12)
        assert torch.all(optimal.modes.abs() < 1) if time == DISCRETE else torch.all(optimal.modes.real < 0)
        # a real improvement somewhere: the iteration does something
        assert (optimal.details["h2_error"] < optimal.details["h2_error_balanced"] * (1 - 1e-3)).any()


def test_h2_error_closed_form_matches_long_kernel_sums():
    modes, input_vec, output_vec = systems(DISCRETE, 2, seed=3, count=6, num_modes=6)
    bank = DiagonalSystem(modes, input_vec, output_vec)
    reduced = h2_optimal(bank, 2, max_iterations=10)
    samples = kernel(modes, bank.residues(), 4000) - kernel(reduced.modes, reduced.residues, 4000)
    torch.testing.assert_close(error_h2_norm_squared(bank, reduced.modes, reduced.residues),
                               samples.square().sum((-2, -1)), rtol=1e-7, atol=1e-12)


def test_optimal_residues_are_a_least_squares_optimum():
    """Perturbing the variable-projection residues in any direction increases the kernel error."""
    modes, input_vec, output_vec = systems(DISCRETE, 1, seed=5, count=3, num_modes=6)
    bank = DiagonalSystem(modes, input_vec, output_vec)
    reduced_modes = modes[:, :3] * 0.9
    residues, error = optimal_residues(bank, reduced_modes, torch.ones(3, 3, dtype=torch.bool))
    torch.testing.assert_close(error, error_h2_norm_squared(bank, reduced_modes, residues), rtol=1e-9, atol=1e-12)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        step = 1e-3 * torch.randn(residues.shape, generator=generator, dtype=torch.complex128)
        assert torch.all(error_h2_norm_squared(bank, reduced_modes, residues + step) > error)


def test_modal_truncation_keeps_the_highest_scores_and_its_bound():
    modes, input_vec, output_vec = systems(DISCRETE, 2, seed=9, count=8, num_modes=7)
    bank = DiagonalSystem(modes, input_vec, output_vec)
    points = grid(DISCRETE)
    original = layer_response(modes, bank.residues(), torch.zeros(8, 2, dtype=torch.float64), bank.first_lags,
                              points, DISCRETE)
    # independent score: the peak gain of each single mode on a fine grid is below |w|/(1-|a|) ...
    for rank in (1, 3, 5):
        for match_dc in (False, True):
            reduced = modal_truncation(bank, rank, match_dc=match_dc)
            kept = set()
            for index in range(8):
                kept_modes = {complex(mode) for mode in reduced.modes[index]}
                assert kept_modes <= {complex(mode) for mode in modes[index]}
                kept.add(len(kept_modes))
                scores = (bank.residues()[index].abs().square().sum(0).sqrt() / (1 - modes[index].abs())).numpy()
                threshold = np.sort(scores)[-rank]
                assert all(scores[list(modes[index].numpy()).index(mode)] >= threshold for mode in kept_modes)
            ours = layer_response(reduced.modes, reduced.residues, reduced.feedthrough, bank.first_lags, points,
                                  DISCRETE)
            peak = np.sqrt((np.abs(ours - original) ** 2).sum(-2)).max(-1)
            assert np.all(peak <= reduced.details["error_bound"].numpy() * (1 + 1e-9))
            if match_dc:
                np.testing.assert_allclose(ours[..., 0], original[..., 0], rtol=1e-9, atol=1e-10)
            else:
                assert torch.equal(reduced.feedthrough, torch.zeros_like(reduced.feedthrough))


def hard_bank(time):
    """Real modes, modes within 1e-4 of the stability boundary, repeated modes and a zero channel."""
    if time == DISCRETE:
        modes = torch.tensor([[0.5, -0.3, 0.8 + 0.1j, 0.2j, 0.7],
                              [0.9999 * np.exp(0.3j), 0.9999 * np.exp(-1.1j), 0.5, 0.99990, 0.2 + 0.2j],
                              [0.6 + 0.3j, 0.6 + 0.3j, 0.6 + 0.3j, 0.1, 0.1],
                              [0.5, 0.4j, 0.3, 0.2, 0.1]], dtype=torch.complex128)
    else:
        modes = torch.tensor([[-1.0, -0.3, -0.8 + 1j, -0.2 + 2j, -0.7],
                              [-1e-4 + 1j, -1e-4 - 3j, -0.5, -1e-4, -0.2 + 0.2j],
                              [-0.6 + 0.3j, -0.6 + 0.3j, -0.6 + 0.3j, -0.1, -0.1],
                              [-0.5, -0.4 + 1j, -0.3, -0.2, -0.1]], dtype=torch.complex128)
    generator = torch.Generator().manual_seed(2)
    input_vec = torch.randn(4, 5, generator=generator, dtype=torch.complex128)
    output_vec = torch.randn(4, 2, 5, generator=generator, dtype=torch.complex128)
    output_vec[3] = 0
    return DiagonalSystem(modes, input_vec, output_vec, time)


@pytest.mark.parametrize("method", sorted(REDUCTION_METHODS))
@pytest.mark.parametrize("time", [DISCRETE, CONTINUOUS])
def test_hard_systems_give_finite_stable_results(method, time):
    bank = hard_bank(time)
    for rank in (1, 2, 5):
        reduced = REDUCTION_METHODS[method](bank, rank)
        for tensor in (reduced.modes, reduced.residues, reduced.feedthrough):
            assert torch.isfinite(tensor).all(), (method, rank)
        live = ~reduced.padding
        if time == DISCRETE:
            assert torch.all(reduced.modes.abs()[live] < 1)
        else:
            assert torch.all(reduced.modes.real[live] < 0)
        # the zero channel stays exactly zero
        assert torch.equal(reduced.residues[3], torch.zeros_like(reduced.residues[3]))
        assert torch.equal(reduced.feedthrough[3], torch.zeros_like(reduced.feedthrough[3]))


def test_budget_allocation_is_optimal_by_brute_force():
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        layers = 3
        sizes = [3, 4, 2]
        sigmas = [torch.rand(2, 2 * size, generator=generator, dtype=torch.float64) ** (trial % 3 + 1)
                  for size in sizes]
        sigmas = [sigma.sort(-1, descending=True).values for sigma in sigmas]
        gains = [rank_gains(sigma) for sigma in sigmas]
        for total in range(layers, sum(sizes) + 1):
            ranks = allocate_ranks(gains, total)
            assert sum(ranks) <= total and all(1 <= r <= n for r, n in zip(ranks, sizes, strict=True))
            ours = sum(discarded_energy(sigma, r) for sigma, r in zip(sigmas, ranks, strict=True))
            best = min(
                sum(discarded_energy(sigma, r) for sigma, r in zip(sigmas, combination, strict=True))
                for combination in itertools.product(*(range(1, n + 1) for n in sizes))
                if sum(combination) <= total
            )
            assert ours == pytest.approx(best, rel=1e-12, abs=1e-12), (trial, total, ranks)
    with pytest.raises(ValueError, match="budget of 2 modes"):
        allocate_ranks(gains, 2)


@pytest.mark.parametrize("method", sorted(REDUCTION_METHODS))
@pytest.mark.parametrize("outputs", [1, 2])
def test_vanished_discrete_modes_are_exact_zeros(method, outputs):
    """Discrete modes below the smallest normal float64 (exp(Δλ) with Δ Re λ < -708: decayed
    within one step) are exactly 0 for every method: the same finite result as with zeros, and
    a system of only such modes is its lag-0 term, reduced exactly."""
    generator = torch.Generator().manual_seed(5)
    input_vec = torch.randn(3, 4, generator=generator, dtype=torch.complex128)
    output_vec = torch.randn(3, outputs, 4, generator=generator, dtype=torch.complex128)
    zeros = torch.zeros(3, 4, dtype=torch.complex128)
    zeros[0, :2] = torch.tensor([0.5, 0.3 + 0.4j])  # channel 0 mixes live and vanished modes
    subnormal = zeros.clone()
    subnormal[1:] = torch.polar(torch.full((2, 4), 6.2e-320, dtype=torch.float64),
                                torch.rand(2, 4, generator=generator, dtype=torch.float64) * 6)
    subnormal[0, 2:] = 1e-315
    results = [REDUCTION_METHODS[method](DiagonalSystem(modes, input_vec, output_vec), 2)
               for modes in (subnormal, zeros)]
    for name in ("modes", "residues", "feedthrough"):
        assert torch.isfinite(getattr(results[0], name)).all(), name
        torch.testing.assert_close(getattr(results[0], name), getattr(results[1], name), rtol=1e-12, atol=1e-14)
    if method in ("modal_truncation", "last", "aire"):
        return  # keep 2 of the 4 modes unchanged by design (checked elsewhere)
    # channels 1 and 2: every row's kernel is K_0 = Re Σ w alone, reduced exactly (one state at 0)
    lag0 = DiagonalSystem(zeros, input_vec, output_vec).residues()[1:].sum(-1).real
    kept = results[1].residues[1:].sum(-1).real + results[1].feedthrough[1:]
    torch.testing.assert_close(kept, lag0, rtol=1e-10, atol=1e-12)


def test_singular_perturbation_never_writes_a_delay_as_a_lag0_mode(monkeypatch):
    """A reduced pole at 0 on a lag-0 row holds a pure one-step delay, which the layer's form
    w/μ cannot hold: that order is not used (one state less, as for a real pole too many), instead
    of dividing by zero. Forced here by zeroing the smallest eigenvalue of every reduction of
    more than one state; the result then keeps one state, and still the DC gain."""
    from s4bt_hf import singular_perturbation as module

    original = module.diagonalize

    def with_a_pole_at_zero(state, input_vec, output_vec):
        eigenvalues, residues, condition = original(state, input_vec, output_vec)
        if state.shape[-1] > 1:
            smallest = eigenvalues.abs().argmin(-1, keepdim=True)
            eigenvalues = eigenvalues.scatter(-1, smallest, torch.zeros_like(smallest, dtype=eigenvalues.dtype))
        return eigenvalues, residues, condition

    monkeypatch.setattr(module, "diagonalize", with_a_pole_at_zero)
    bank = DiagonalSystem(*systems(DISCRETE, 1, seed=3, count=4, num_modes=5), DISCRETE)
    reduced = singular_perturbation(bank, 2)
    assert torch.equal(reduced.details["kept_states"], torch.ones(4, dtype=torch.int64))
    for tensor in (reduced.modes, reduced.residues, reduced.feedthrough):
        assert torch.isfinite(tensor).all()
    gain = modal_dc_gain(reduced.modes, reduced.residues, DISCRETE).sum(-1) + reduced.feedthrough
    torch.testing.assert_close(gain, bank.dc_gain(), rtol=1e-9, atol=1e-10)
