"""Balanced truncation math against independent oracles: scipy's Lyapunov solvers on the dense
real realisation, the singular values of the Hankel matrix built from the kernel itself, the
a-priori error bound on many random systems, exact reproduction at full rank, and invariance
to the order of the modes."""

import numpy as np
import pytest
import scipy.linalg
import torch

from s4bt_hf.balanced_truncation import (
    CONTINUOUS,
    DISCRETE,
    apply_siso_symmetrizer,
    error_bound,
    fold_conjugate_pairs,
    hankel_singular_values,
    hankel_svd,
    kept_energy,
    psd_factor,
    reachability_gramian,
    real_gramians,
    real_realization,
    reduce_to_modes,
    symmetric_hankel_svd,
)


def random_discrete_systems(count, num_modes, outputs=1, max_radius=0.9, seed=0):
    """Random stable complex diagonal systems (a, b, C) with |a| <= max_radius."""
    generator = torch.Generator().manual_seed(seed)
    radius = max_radius * torch.rand(count, num_modes, generator=generator, dtype=torch.float64) ** 0.5
    angle = 2 * np.pi * torch.rand(count, num_modes, generator=generator, dtype=torch.float64)
    modes = torch.polar(radius, angle)
    input_vec = torch.randn(count, num_modes, generator=generator, dtype=torch.complex128)
    output_vec = torch.randn(count, outputs, num_modes, generator=generator, dtype=torch.complex128)
    return modes, input_vec, output_vec


def random_continuous_systems(count, num_modes, outputs, seed, min_decay, frequency_scale):
    """Random stable complex diagonal continuous-time systems: Re λ in [-1 - min_decay, -min_decay)."""
    generator = torch.Generator().manual_seed(seed)
    modes = torch.complex(-torch.rand(count, num_modes, generator=generator, dtype=torch.float64) - min_decay,
                          frequency_scale * torch.randn(count, num_modes, generator=generator, dtype=torch.float64))
    input_vec = torch.randn(count, num_modes, generator=generator, dtype=torch.complex128)
    output_vec = torch.randn(count, outputs, num_modes, generator=generator, dtype=torch.complex128)
    return modes, input_vec, output_vec


def kernel(modes, residues, length):
    """K[..., p, k] = Re Σ_n residues[..., p, n] modes[..., n]^k, by repeated multiplication
    (so that 0^0 = 1 for padding modes at 0)."""
    steps = torch.cat([torch.ones_like(modes).unsqueeze(-1), modes.unsqueeze(-1).expand(*modes.shape, length - 1)], -1)
    powers = torch.cumprod(steps, dim=-1)
    return torch.einsum("...pn,...nk->...pk", residues, powers).real


def original_kernel(system, length):
    modes, input_vec, output_vec = system
    return kernel(modes, output_vec * input_vec.unsqueeze(-2), length)


@pytest.mark.parametrize("outputs", [1, 2])
def test_discrete_gramians_match_scipy_lyapunov(outputs):
    system = random_discrete_systems(4, 5, outputs=outputs, max_radius=0.99)
    reach, obs = real_gramians(*system, DISCRETE)
    state, input_real, output_real = real_realization(*system)
    for index in range(4):
        a, b, c = state[index].numpy(), input_real[index].numpy(), output_real[index].numpy()
        expected_reach = scipy.linalg.solve_discrete_lyapunov(a, np.outer(b, b))
        expected_obs = scipy.linalg.solve_discrete_lyapunov(a.T, c.T @ c)
        np.testing.assert_allclose(reach[index].numpy(), expected_reach, atol=1e-9 * abs(expected_reach).max())
        np.testing.assert_allclose(obs[index].numpy(), expected_obs, atol=1e-9 * abs(expected_obs).max())


def test_continuous_gramians_match_scipy_lyapunov():
    modes, input_vec, output_vec = random_continuous_systems(3, 4, outputs=2, seed=3, min_decay=0.1,
                                                             frequency_scale=5)
    reach, obs = real_gramians(modes, input_vec, output_vec, CONTINUOUS)
    state, input_real, output_real = real_realization(modes, input_vec, output_vec)
    for index in range(3):
        a, b, c = state[index].numpy(), input_real[index].numpy(), output_real[index].numpy()
        expected_reach = scipy.linalg.solve_continuous_lyapunov(a, -np.outer(b, b))
        expected_obs = scipy.linalg.solve_continuous_lyapunov(a.T, -c.T @ c)
        np.testing.assert_allclose(reach[index].numpy(), expected_reach, atol=1e-10 * abs(expected_reach).max())
        np.testing.assert_allclose(obs[index].numpy(), expected_obs, atol=1e-10 * abs(expected_obs).max())


@pytest.mark.parametrize("outputs", [1, 2])
def test_hankel_singular_values_equal_singular_values_of_the_kernel_hankel_matrix(outputs):
    """σ_i are the singular values of the block Hankel matrix [K_{i+j}] of the real kernel: an
    oracle that never sees a Gramian."""
    system = random_discrete_systems(3, 6, outputs=outputs, max_radius=0.85, seed=1)
    sigma = hankel_singular_values(*system, DISCRETE)
    size = 300  # 0.85^600 is far below float64 resolution
    kernels = original_kernel(system, 2 * size).numpy()  # (3, p, 2·size)
    for index in range(3):
        blocks = np.stack([kernels[index][:, i:i + size] for i in range(size)])  # (size, p, size)
        hankel = blocks.reshape(size * outputs, size)
        expected = scipy.linalg.svdvals(hankel)[: sigma.shape[-1]]
        np.testing.assert_allclose(sigma[index].numpy(), expected, rtol=1e-7, atol=1e-10 * expected[0])


def test_continuous_hankel_singular_values_match_scipy_square_root():
    modes, input_vec, output_vec = random_continuous_systems(2, 5, outputs=1, seed=5, min_decay=0.05,
                                                             frequency_scale=3)
    sigma = hankel_singular_values(modes, input_vec, output_vec, CONTINUOUS)
    state, input_real, output_real = real_realization(modes, input_vec, output_vec)
    for index in range(2):
        a, b, c = state[index].numpy(), input_real[index].numpy(), output_real[index].numpy()
        reach = scipy.linalg.solve_continuous_lyapunov(a, -np.outer(b, b))
        obs = scipy.linalg.solve_continuous_lyapunov(a.T, -c.T @ c)
        expected = np.sqrt(np.sort(np.abs(scipy.linalg.eigvals(reach @ obs)))[::-1])
        np.testing.assert_allclose(sigma[index].numpy(), expected, rtol=1e-6, atol=1e-9 * expected[0])


@pytest.mark.parametrize("outputs", [1, 2])
@pytest.mark.parametrize("seed", range(4))
def test_reduced_kernel_error_stays_within_the_a_priori_bound(outputs, seed):
    system = random_discrete_systems(40, 8, outputs=outputs, max_radius=0.95, seed=seed)
    full = original_kernel(system, 1500)  # 0.95^1500 ~ 1e-34: the whole kernel
    for rank in (1, 2, 3, 5, 7):
        reduced = reduce_to_modes(*system, rank)
        error = (full - kernel(reduced.modes, reduced.residues, 1500)).square().sum((-1, -2)).sqrt()
        bound = reduced.details["error_bound"]
        assert torch.all(error <= bound * (1 + 1e-8) + 1e-10), (rank, error, bound)
        assert torch.all(reduced.modes.abs() < 1)
        assert torch.all(reduced.details["kept_states"] <= 2 * rank)
        # the bound is the tail of the Hankel singular values beyond the kept states
        positions = torch.arange(16)
        kept, sigma = reduced.details["kept_states"], reduced.details["hankel_singular_values"]
        tail = torch.where(positions >= kept.unsqueeze(-1), sigma, 0.0)
        torch.testing.assert_close(reduced.details["error_bound"], 2 * tail.sum(-1))


@pytest.mark.parametrize("outputs", [1, 2])
@pytest.mark.parametrize("time", [DISCRETE, CONTINUOUS])
def test_full_rank_reproduces_the_kernel(time, outputs):
    system = random_discrete_systems(10, 6, outputs=outputs, max_radius=0.9, seed=7)
    modes, input_vec, output_vec = system
    if time == CONTINUOUS:  # the same systems as continuous-time ones: λ = log a
        modes = torch.log(modes)
    reduced = reduce_to_modes(modes, input_vec, output_vec, 6, time=time)
    if time == CONTINUOUS:
        expected = kernel(torch.exp(modes), output_vec * input_vec.unsqueeze(-2), 200)
        # same continuous system, sampled without a hold: compare the impulse responses
        actual = kernel(torch.exp(reduced.modes), reduced.residues, 200)
    else:
        expected = original_kernel(system, 200)
        actual = kernel(reduced.modes, reduced.residues, 200)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-8)
    assert not reduced.padding.any()


def test_result_does_not_depend_on_the_order_of_the_modes():
    system = random_discrete_systems(6, 8, outputs=2, seed=11)
    permutation = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    shuffled = (system[0][:, permutation], system[1][:, permutation], system[2][..., permutation])
    first, second = reduce_to_modes(*system, 3), reduce_to_modes(*shuffled, 3)
    torch.testing.assert_close(first.details["hankel_singular_values"], second.details["hankel_singular_values"],
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(kernel(first.modes, first.residues, 300), kernel(second.modes, second.residues, 300),
                               rtol=0, atol=1e-8)


def test_real_poles_use_a_mode_each_and_pairs_share_one():
    """A real system with one conjugate pair and two real poles needs three complex modes."""
    eigenvalues = torch.tensor([[0.5 + 0.3j, 0.5 - 0.3j, 0.2 + 0j, -0.4 + 0j]], dtype=torch.complex128)
    residues = torch.tensor([[[1 + 2j, 1 - 2j, 3 + 0j, -1 + 0j]]], dtype=torch.complex128)
    modes, folded, padding = fold_conjugate_pairs(eigenvalues, residues, rank=4, pad_mode=0.0)
    torch.testing.assert_close(kernel(modes, folded, 50), kernel(eigenvalues, residues, 50))
    assert padding.tolist() == [[False, False, False, True]]
    assert torch.all(folded[padding.unsqueeze(-2).expand_as(folded)] == 0)


def test_systems_of_real_poles_never_need_more_modes_than_the_rank():
    """Real poles cost a mode each: the kept real states are lowered until they fit `rank` modes."""
    generator = torch.Generator().manual_seed(2)
    modes = (torch.rand(5, 6, generator=generator, dtype=torch.float64) * 1.8 - 0.9).to(torch.complex128)
    input_vec = torch.randn(5, 6, generator=generator, dtype=torch.float64).to(torch.complex128)
    output_vec = torch.randn(5, 1, 6, generator=generator, dtype=torch.float64).to(torch.complex128)
    reduced = reduce_to_modes(modes, input_vec, output_vec, 2)
    assert torch.all(reduced.details["kept_states"] <= 4)
    assert torch.all(reduced.details["kept_states"] < 4)  # 4 real states would be 4 real poles here: too many
    assert torch.all((~reduced.padding).sum(-1) <= 2)
    full = original_kernel((modes, input_vec, output_vec), 600)
    error = (full - kernel(reduced.modes, reduced.residues, 600)).square().sum((-1, -2)).sqrt()
    assert torch.all(error <= reduced.details["error_bound"] * (1 + 1e-8) + 1e-10)


def test_kept_energy_and_bound_formulas():
    sigma = torch.tensor([[4.0, 2.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    kept = torch.tensor([2, 1])
    torch.testing.assert_close(kept_energy(sigma, kept), torch.tensor([0.75, 1.0], dtype=torch.float64))
    torch.testing.assert_close(error_bound(sigma, kept), torch.tensor([4.0, 0.0], dtype=torch.float64))


def residue_form_system(count, num_modes, seed, time=DISCRETE):
    """Random single-output systems written with unit input: (a, 1, w) with w = c ⊙ b."""
    modes, input_vec, output_vec = random_discrete_systems(count, num_modes, outputs=1, max_radius=0.95, seed=seed)
    if time == CONTINUOUS:
        modes = torch.log(modes)
    return modes, torch.ones_like(input_vec), output_vec * input_vec.unsqueeze(-2)


@pytest.mark.parametrize("time", [DISCRETE, CONTINUOUS])
def test_siso_symmetrizer_ties_the_two_gramians(time):
    """S A = Aᵀ S and S B = C_realᵀ on the dense real realisation, hence Q = S P S (scipy's
    Lyapunov solution for Q)."""
    modes, input_vec, output_vec = residue_form_system(4, 5, seed=21, time=time)
    state, input_real, output_real = real_realization(modes, input_vec, output_vec)
    identity = torch.eye(10, dtype=torch.float64).expand(4, 10, 10)
    symmetrizer = apply_siso_symmetrizer(output_vec[:, 0], identity)
    torch.testing.assert_close(symmetrizer, symmetrizer.mT, rtol=0, atol=0)
    torch.testing.assert_close(symmetrizer @ state, state.mT @ symmetrizer, rtol=0, atol=1e-14)
    torch.testing.assert_close((symmetrizer @ input_real.unsqueeze(-1)).squeeze(-1), output_real[:, 0], rtol=0,
                               atol=1e-15)
    reach = reachability_gramian(modes, input_vec, time).numpy()
    for index in range(4):
        a, c = state[index].numpy(), output_real[index].numpy()
        if time == DISCRETE:
            expected_obs = scipy.linalg.solve_discrete_lyapunov(a.T, c.T @ c)
        else:
            expected_obs = scipy.linalg.solve_continuous_lyapunov(a.T, -c.T @ c)
        tied = symmetrizer[index].numpy() @ reach[index] @ symmetrizer[index].numpy()
        np.testing.assert_allclose(tied, expected_obs, atol=1e-9 * abs(expected_obs).max())


def test_symmetric_hankel_svd_is_the_svd_of_the_factor_product():
    """U diag(σ) Vᵀ = L_oᵀ L_c with L_o = S L_c, orthonormal U and V, and σ equal to the
    singular values from the general two-Gramian route (`hankel_svd`)."""
    modes, input_vec, output_vec = residue_form_system(6, 7, seed=22)
    reach_factor = psd_factor(reachability_gramian(modes, input_vec, DISCRETE))[0]
    left, sigma, right_t, obs_factor = symmetric_hankel_svd(reach_factor, output_vec[:, 0])
    product = obs_factor.mT @ reach_factor
    torch.testing.assert_close(left @ torch.diag_embed(sigma) @ right_t, product, rtol=0,
                               atol=1e-12 * float(sigma.max()))
    identity = torch.eye(14, dtype=torch.float64).expand(6, 14, 14)
    torch.testing.assert_close(left.mT @ left, identity, rtol=0, atol=1e-12)
    torch.testing.assert_close(right_t @ right_t.mT, identity, rtol=0, atol=1e-12)
    assert torch.all(sigma[:, :-1] >= sigma[:, 1:])
    _, obs = real_gramians(modes, input_vec, output_vec, DISCRETE)
    _, general_sigma, _ = hankel_svd(reach_factor, psd_factor(obs)[0])
    torch.testing.assert_close(sigma, general_sigma, rtol=0, atol=1e-12 * float(sigma.max()))


@pytest.mark.parametrize("seed", range(3))
def test_single_output_route_equals_the_general_two_gramian_route(seed):
    """A single-output system goes through the symmetric route; the same system with an extra
    all-zero output row goes through two Gramians and an SVD. HSVs, bound and reduced kernel agree."""
    modes, input_vec, output_vec = random_discrete_systems(12, 8, outputs=1, max_radius=0.95, seed=30 + seed)
    padded_output = torch.cat([output_vec, torch.zeros_like(output_vec)], dim=-2)
    for rank in (2, 3, 5):
        symmetric = reduce_to_modes(modes, input_vec, output_vec, rank)
        general = reduce_to_modes(modes, input_vec, padded_output, rank)
        scale = float(general.details["hankel_singular_values"].max())
        torch.testing.assert_close(symmetric.details["hankel_singular_values"],
                                   general.details["hankel_singular_values"], rtol=0, atol=1e-11 * scale)
        assert torch.equal(symmetric.details["kept_states"], general.details["kept_states"])
        torch.testing.assert_close(symmetric.details["error_bound"], general.details["error_bound"], rtol=1e-8,
                                   atol=1e-11 * scale)
        torch.testing.assert_close(kernel(symmetric.modes, symmetric.residues, 400),
                                   kernel(general.modes, general.residues, 400)[..., :1, :], rtol=0, atol=1e-7)


@pytest.mark.parametrize("outputs", [1, 2])
@pytest.mark.parametrize("bad_modes", [[1.2 + 0.3j, 1.1 - 0.2j], [1.2 + 0j, 0.5 + 0.1j], [float("nan"), 0.5 + 0j]],
                         ids=["all-unstable", "one-unstable", "nan"])
def test_unstable_or_non_finite_systems_raise_instead_of_returning_a_zero_system(bad_modes, outputs):
    """Called directly (the model checks its channels first), the math refuses systems whose
    Gramians do not exist: every |a| > 1 makes the diagonal of P negative, which must not be
    mistaken for the zero Gramian of an unreachable system."""
    modes = torch.tensor([bad_modes], dtype=torch.complex128)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        reduce_to_modes(modes, torch.ones_like(modes), torch.ones(1, outputs, 2, dtype=torch.complex128), 1)
