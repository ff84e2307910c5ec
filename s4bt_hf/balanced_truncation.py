"""Square-root balanced truncation of banks of diagonal linear systems with real output.

Pure math: tensors in, tensors out, batched over leading axes (one system per channel), always
in float64 / complex128 whatever dtype the caller holds.

The systems. A DSS channel with complex modes a (N,), input vector b (N,) and output rows
C (p, N) (p = 1, or 2 for a bidirectional layer: forward and backward kernels sharing the modes)
computes the real kernel

    discrete time:    K_k = Re(C diag(a)^k b),          k = 0, 1, ...
    continuous time:  g(t) = Re(C exp(diag(a) t) b),    t >= 0.

Writing x = x_r + i x_i, this is the real 2N-state system with state [x_r; x_i]

    A = [[Re a, -Im a], [Im a, Re a]],   B = [Re b; Im b],   C_real = [Re C, -Im C],

and that real system is the one balanced here (balancing the complex N-state system instead
would balance an operator the layer does not compute). With one output (p = 1) its Hankel
operator is symmetric; `symmetric_hankel_svd` uses that to need one Gramian and an
eigendecomposition instead of two Gramians and an SVD. Reducing it to m real states and
diagonalising gives conjugate pairs (μ, μ̄), each held by ONE complex mode of the layer with
residue 2·c·b, and real poles, each needing a mode of its own; so `rank` r complex modes hold
m = 2r real states when no real pole appears, and fewer otherwise (`reduce_to_modes`).

The discrete-time kernel K_k is the impulse response (Markov parameters h_{k+1}) of the
standard system (A, B, C_real), so the classical a-priori bound applies to the whole kernel:

    ‖G - G_m‖_∞ ≤ 2 Σ_{i>m} σ_i        (σ: Hankel singular values of the real system),

where G is the transfer function of u ↦ K * u. For one input this also bounds the kernel
itself: ‖K - K_m‖_ℓ2 (all k >= 0, all output rows) ≤ ‖G - G_m‖_∞ ≤ 2 Σ_{i>m} σ_i, and every
length-L kernel error is at most that. In continuous time the same bound holds for the
continuous transfer function (the layer then discretises the reduced system with its Δ).

References:
    B. C. Moore, "Principal component analysis in linear systems: controllability,
    observability, and model reduction", IEEE Trans. Automatic Control 26(1), 1981 (balanced
    truncation). A. J. Laub, M. T. Heath, C. C. Paige, R. C. Ward, "Computation of system
    balancing transformations and other applications of simultaneous diagonalization
    algorithms", IEEE Trans. Automatic Control 32(2), 1987, and M. S. Tombs, I. Postlethwaite,
    "Truncated balanced realization of a stable non-minimal state-space system", Int. J.
    Control 46(4), 1987 (the square-root method: Cholesky factors of the Gramians and the SVD of
    their product, no balancing transform inverted). D. F. Enns, "Model reduction with balanced
    realizations: an error bound and a frequency weighted generalization", IEEE CDC 1984, and
    K. Glover, "All optimal Hankel-norm approximations of linear multivariable systems and their
    L∞-error bounds", Int. J. Control 39(6), 1984 (the bound 2 Σ_{i>m} σ_i; Al-Saggaf and
    Franklin, IEEE TAC 1987, for discrete time).

Example (one channel of 8 discrete modes reduced to 2 complex modes; the ℓ2 error of the
kernel stays below the a-priori bound):

    >>> import torch
    >>> from s4bt_hf.balanced_truncation import hankel_singular_values, reduce_to_modes
    >>> g = torch.Generator().manual_seed(0)
    >>> modes = torch.polar(0.3 + 0.65 * torch.rand(1, 8, dtype=torch.float64, generator=g),
    ...                     3 * torch.rand(1, 8, dtype=torch.float64, generator=g))
    >>> b = torch.ones(1, 8, dtype=torch.complex128)
    >>> c = torch.randn(1, 1, 8, dtype=torch.complex128, generator=g)
    >>> sigma = hankel_singular_values(modes, b, c)          # (1, 16): the real 16-state system
    >>> reduced = reduce_to_modes(modes, b, c, rank=2)       # 2 complex modes hold 4 real states
    >>> lags = torch.arange(2000, dtype=torch.float64)
    >>> full = ((c[0, 0] * b[0]).unsqueeze(-1) * modes[0].unsqueeze(-1) ** lags).sum(0).real
    >>> small = (reduced.residues[0, 0].unsqueeze(-1) * reduced.modes[0].unsqueeze(-1) ** lags).sum(0).real
    >>> bool(torch.linalg.norm(full - small) <= 2 * sigma[0, 4:].sum())
    True
"""

from __future__ import annotations

import torch

from .diagonal_system import (
    CONTINUOUS,
    DISCRETE,
    TIME_DOMAINS,
    DiagonalSystem,
    ReducedModes,
    flush_vanished_modes,
    gramian_kernel,
    reduce_in_chunks,
)

__all__ = ["CONTINUOUS", "DISCRETE", "TIME_DOMAINS", "ReducedModes", "balanced_truncation", "gramian_kernel",
           "hankel_singular_values", "reduce_to_modes"]

# Gramians are PSD; a numerically singular one is factored with the smallest diagonal shift
# (relative to its largest diagonal entry) from this ladder that makes Cholesky succeed.
_CHOLESKY_SHIFTS = (0.0, 1e-15, 1e-13, 1e-11, 1e-9, 1e-7)
# Hankel singular values below this fraction of σ_1 are rounding noise: their states are dropped.
_NEGLIGIBLE_SIGMA = 1e-12
def real_gram(hermitian: torch.Tensor, symmetric: torch.Tensor, imag_sign: float) -> torch.Tensor:
    """Gram matrix of the real vector [Re z; s·Im z] from S = E[z z^H] and S̃ = E[z z^T]:
        E[Re z Re zᵀ] = ½ Re(S + S̃),   E[Im z Im zᵀ] = ½ Re(S - S̃),
        E[Re z Im zᵀ] = ½ (Im S̃ - Im S),  E[Im z Re zᵀ] = ½ (Im S̃ + Im S).
    Differentiable when its inputs require gradients (`hankel_penalty`); otherwise written in
    place into one buffer (faster, no autograd)."""
    if torch.is_grad_enabled() and (hermitian.requires_grad or symmetric.requires_grad):
        top = torch.cat([hermitian.real + symmetric.real, imag_sign * (symmetric.imag - hermitian.imag)], -1)
        bottom = torch.cat([imag_sign * (symmetric.imag + hermitian.imag), hermitian.real - symmetric.real], -1)
        return 0.5 * torch.cat([top, bottom], -2)
    size = hermitian.shape[-1]
    gram = hermitian.real.new_empty((*hermitian.shape[:-2], 2 * size, 2 * size))
    torch.add(hermitian.real, symmetric.real, alpha=1.0, out=gram[..., :size, :size])
    torch.sub(hermitian.real, symmetric.real, out=gram[..., size:, size:])
    torch.sub(symmetric.imag, hermitian.imag, out=gram[..., :size, size:])
    torch.add(symmetric.imag, hermitian.imag, out=gram[..., size:, :size])
    gram[..., :size, size:] *= imag_sign
    gram[..., size:, :size] *= imag_sign
    return gram.mul_(0.5)


def reachability_gramian(modes: torch.Tensor, input_vec: torch.Tensor, time: str) -> torch.Tensor:
    """Controllability Gramian P (..., 2N, 2N) of the real realisation, in closed form (no
    Lyapunov solver):  P = Σ_k A^k B Bᵀ (Aᵀ)^k  (discrete)  or  ∫ e^{At} B Bᵀ e^{Aᵀt} dt  (continuous),
    built from the complex moments E[x x^H]_ij = b_i b̄_j κ(a_i, ā_j) and E[x xᵀ]_ij = b_i b_j κ(a_i, a_j),
    κ = `gramian_kernel`.  Args: modes a (..., N), input_vec b (..., N), complex."""
    a_i, a_j = modes.unsqueeze(-1), modes.unsqueeze(-2)
    b_i, b_j = input_vec.unsqueeze(-1), input_vec.unsqueeze(-2)
    hermitian = b_i * b_j.conj() * gramian_kernel(a_i, a_j.conj(), time)
    symmetric = b_i * b_j * gramian_kernel(a_i, a_j, time)
    return real_gram(hermitian, symmetric, 1.0)


def observability_gramian(modes: torch.Tensor, output_vec: torch.Tensor, time: str) -> torch.Tensor:
    """Observability Gramian Q (..., 2N, 2N) of the real realisation: Q = Σ_k (Aᵀ)^k C_realᵀ C_real A^k
    (or the integral), the Gram of z = [Re ẑ; -Im ẑ] with ẑ = (C a^k)ᵀ, from the moments
    Σ_r C̄_ri C_rj κ(ā_i, a_j) and Σ_r C_ri C_rj κ(a_i, a_j).  Args: output_vec C (..., p, N)."""
    a_i, a_j = modes.unsqueeze(-1), modes.unsqueeze(-2)
    hermitian = (output_vec.mT @ output_vec.conj()) * gramian_kernel(a_i, a_j.conj(), time)
    symmetric = (output_vec.mT @ output_vec) * gramian_kernel(a_i, a_j, time)
    return real_gram(hermitian, symmetric, -1.0)


def real_gramians(modes: torch.Tensor, input_vec: torch.Tensor, output_vec: torch.Tensor, time: str):
    """(P, Q): `reachability_gramian` and `observability_gramian` of the system (a, b, C)."""
    return reachability_gramian(modes, input_vec, time), observability_gramian(modes, output_vec, time)


def real_realization(modes: torch.Tensor, input_vec: torch.Tensor, output_vec: torch.Tensor):
    """Dense real (A, B, C_real) of the system (for tests and small problems):
    A = [[Re a, -Im a], [Im a, Re a]], B = [Re b; Im b], C_real = [Re C, -Im C]."""
    real, imag = torch.diag_embed(modes.real), torch.diag_embed(modes.imag)
    state = torch.cat([torch.cat([real, -imag], -1), torch.cat([imag, real], -1)], -2)
    return (
        state,
        torch.cat([input_vec.real, input_vec.imag], -1),
        torch.cat([output_vec.real, -output_vec.imag], -1),
    )


def psd_factor(gramian: torch.Tensor):
    """Lower-triangular L with L Lᵀ = G + δ·max(diag G)·I, δ the smallest shift of
    `_CHOLESKY_SHIFTS` for which Cholesky succeeds (0 for every numerically definite G).
    Returns (L, δ per system). The shift only affects Hankel singular values below about
    sqrt(δ)·σ_1; the bound computed from them then over-estimates, never under-estimates.
    A zero Gramian (an unreachable or unobservable system) gets the zero factor."""
    factor, info = torch.linalg.cholesky_ex(gramian)
    shift = torch.zeros(gramian.shape[:-2], dtype=gramian.dtype, device=gramian.device)
    pending = info != 0
    if not pending.any():  # the common case: every Gramian numerically definite
        return factor, shift
    factor[pending] = 0.0
    scale = gramian.diagonal(dim1=-2, dim2=-1).amax(-1)
    pending &= scale != 0  # a PSD matrix with a zero diagonal is zero: zero factor, no shift
    identity = torch.eye(gramian.shape[-1], dtype=gramian.dtype, device=gramian.device)
    for delta in _CHOLESKY_SHIFTS[1:]:
        if not pending.any():
            break
        shifted = gramian[pending] + (delta * scale[pending])[..., None, None] * identity
        lower, info = torch.linalg.cholesky_ex(shifted)
        done = info == 0
        indices = pending.nonzero(as_tuple=True)
        chosen = tuple(index[done] for index in indices)
        factor[chosen] = lower[done]
        shift[chosen] = delta
        pending[chosen] = False
    if pending.any():
        raise ValueError("A Gramian is not positive semi-definite (non-finite or unstable system).")
    return factor, shift


def hankel_svd(reach_factor: torch.Tensor, obs_factor: torch.Tensor):
    """σ_i = singular values of L_oᵀ L_c (never sqrt(eig(P Q)), which can go negative or
    complex). Returns (U, σ, Vᵀ) of that product, σ descending."""
    return torch.linalg.svd(obs_factor.mT @ reach_factor)


def apply_siso_symmetrizer(residues: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """S M for the symmetrizer of a single-input single-output system in residue form.

    With unit input (b = 1, output row w = c ⊙ b: the same kernel Re Σ_n w_n a_n^k) the real
    realisation has B = [1; 0] and C_real = [Re w, -Im w]. The block matrix
        S = [[diag Re w, -diag Im w], [-diag Im w, -diag Re w]]   (symmetric)
    satisfies S A = Aᵀ S and S B = C_realᵀ, so the observability matrix is O = Rᵀ S (R: the
    reachability matrix) and the Gramians are tied by Q = S P S: one Gramian suffices.
    Args: residues w (..., N) complex, matrix M (..., 2N, k) real."""
    num_modes = residues.shape[-1]
    real, imag = residues.real.unsqueeze(-1), residues.imag.unsqueeze(-1)
    top, bottom = matrix[..., :num_modes, :], matrix[..., num_modes:, :]
    return torch.cat([real * top - imag * bottom, -imag * top - real * bottom], dim=-2)


def symmetric_hankel_product(reach_factor: torch.Tensor, residues: torch.Tensor):
    """(L_cᵀ S L_c, L_o = S L_c) for a single-input single-output system in residue form (unit
    input): with Q = S P S (`apply_siso_symmetrizer`), L_o = S L_c is a factor of Q and the
    product L_oᵀ L_c = L_cᵀ S L_c is symmetric (the Hankel operator of a SISO system is)."""
    obs_factor = apply_siso_symmetrizer(residues, reach_factor)
    return reach_factor.mT @ obs_factor, obs_factor


def symmetric_hankel_svd(reach_factor: torch.Tensor, residues: torch.Tensor):
    """`hankel_svd` of a single-input single-output system in residue form (unit input), from a
    symmetric eigendecomposition instead of an SVD.

    The product L_oᵀ L_c = L_cᵀ S L_c is symmetric (`symmetric_hankel_product`). Its
    eigendecomposition
        L_cᵀ S L_c = U diag(μ) Uᵀ   gives its SVD   U |μ| (U sign μ)ᵀ,   σ_i = |μ_i|,
    as accurate as the SVD (absolute error ~ ε σ_1) at about half the cost.
    Returns (U, σ, Vᵀ, L_o), σ descending, in the layout of `hankel_svd` plus the factor L_o."""
    product, obs_factor = symmetric_hankel_product(reach_factor, residues)
    eigenvalues, eigenvectors = torch.linalg.eigh(product)
    order = eigenvalues.abs().argsort(dim=-1, descending=True)
    eigenvalues = eigenvalues.gather(-1, order)
    left = eigenvectors.gather(-1, order.unsqueeze(-2).expand_as(eigenvectors))
    sign = torch.where(eigenvalues < 0, -1.0, 1.0).to(left.dtype)
    return left, eigenvalues.abs(), (left * sign.unsqueeze(-2)).mT, obs_factor


def truncation_projectors(reach_factor, obs_factor, left, sigma, right_t, order: int):
    """Square-root projectors from the leading `order` singular triplets only (the full
    balancing transform is never formed or inverted):
        V_m = L_c V_{:, :m} Σ_m^{-1/2},   W_m = L_o U_{:, :m} Σ_m^{-1/2},   W_mᵀ V_m = I."""
    scale = sigma[..., :order].rsqrt().unsqueeze(-2)
    right = reach_factor @ right_t[..., :order, :].mT * scale
    left = obs_factor @ left[..., :order] * scale
    return right, left


def project_system(modes, input_vec, output_vec, right, left):
    """Reduced real system  A_r = W_mᵀ A V_m,  B_r = W_mᵀ B,  C_r = C_real V_m, using the
    block-diagonal structure of A (no dense 2N x 2N product)."""
    num_modes = modes.shape[-1]
    top, bottom = right[..., :num_modes, :], right[..., num_modes:, :]
    real, imag = modes.real.unsqueeze(-1), modes.imag.unsqueeze(-1)
    state_times_right = torch.cat([real * top - imag * bottom, imag * top + real * bottom], dim=-2)
    real_input = torch.cat([input_vec.real, input_vec.imag], -1)
    real_output = torch.cat([output_vec.real, -output_vec.imag], -1)
    return left.mT @ state_times_right, (left.mT @ real_input.unsqueeze(-1)).squeeze(-1), real_output @ right


def diagonalize(state: torch.Tensor, input_vec: torch.Tensor, output_vec: torch.Tensor):
    """Re-diagonalise a real reduced system: A_r = X diag(μ) X⁻¹, so the kernel is
    Σ_i (C_r X)_i (X⁻¹ B_r)_i μ_i^k. Real input gives exact conjugate pairs and exactly real
    eigenvalues (LAPACK's real eigensolver). Returns (μ (..., m), residues w = (C_r X) ⊙ (X⁻¹ B_r)
    (..., p, m), Frobenius condition number ‖X‖_F ‖X⁻¹‖_F)."""
    eigenvalues, eigenvectors = torch.linalg.eig(state)
    inverse = torch.linalg.inv(eigenvectors)
    input_modal = (inverse @ input_vec.to(inverse.dtype).unsqueeze(-1)).squeeze(-1)
    output_modal = output_vec.to(eigenvectors.dtype) @ eigenvectors
    condition = torch.linalg.matrix_norm(eigenvectors) * torch.linalg.matrix_norm(inverse)
    return eigenvalues, output_modal * input_modal.unsqueeze(-2), condition


def modes_needed(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Complex layer modes needed to hold a real system with these eigenvalues: one per
    conjugate pair, one per real eigenvalue."""
    return (eigenvalues.imag >= 0).sum(-1)


def fold_conjugate_pairs(eigenvalues: torch.Tensor, residues: torch.Tensor, rank: int, pad_mode: complex):
    """Write a real system's modal form as `rank` complex modes read out with Re(·):
    a pair (μ, μ̄) with residues (w, w̄) becomes mode μ with residue 2w (Re(2wμ^k) = wμ^k + w̄μ̄^k),
    a real eigenvalue μ keeps residue Re(w); unused modes get `pad_mode` with residue 0.
    Needs `modes_needed(eigenvalues) <= rank` for every system.
    Returns (modes (..., rank), residues (..., p, rank), padding mask (..., rank))."""
    upper = eigenvalues.imag > 0
    real = eigenvalues.imag == 0
    weight = torch.where(upper, 2.0, torch.where(real, 1.0, 0.0)).to(residues.dtype)
    folded = residues * weight.unsqueeze(-2)
    folded = torch.where(real.unsqueeze(-2), folded.real.to(folded.dtype), folded)
    # kept modes first (largest residue first), dropped lower halves of pairs last
    key = torch.where(upper | real, folded.abs().sum(-2), torch.full_like(eigenvalues.real, -1.0))
    order = key.argsort(dim=-1, descending=True)
    eigenvalues = eigenvalues.gather(-1, order)
    folded = folded.gather(-1, order.unsqueeze(-2).expand_as(folded))
    kept = (upper | real).gather(-1, order)
    count = eigenvalues.shape[-1]
    if count < rank:  # fewer states than modes: pad
        pad = rank - count
        eigenvalues = torch.cat([eigenvalues, eigenvalues.new_full((*eigenvalues.shape[:-1], pad), pad_mode)], -1)
        folded = torch.cat([folded, folded.new_zeros((*folded.shape[:-1], pad))], -1)
        kept = torch.cat([kept, kept.new_zeros((*kept.shape[:-1], pad))], -1)
    eigenvalues, folded, kept = eigenvalues[..., :rank], folded[..., :rank], kept[..., :rank]
    eigenvalues = torch.where(kept, eigenvalues, torch.full_like(eigenvalues, pad_mode))
    return eigenvalues, torch.where(kept.unsqueeze(-2), folded, torch.zeros_like(folded)), ~kept


def error_bound(sigma: torch.Tensor, kept_states: torch.Tensor) -> torch.Tensor:
    """A-priori bound 2 Σ_{i > m} σ_i of balanced truncation to m real states."""
    positions = torch.arange(sigma.shape[-1], device=sigma.device)
    return 2.0 * torch.where(positions >= kept_states.unsqueeze(-1), sigma, 0.0).sum(-1)


def balanced_truncation(system: DiagonalSystem, rank: int, *, pad_mode: complex = 0.0,
                        workers: int | None = None) -> ReducedModes:
    """Balanced truncation of a bank of real-output diagonal systems to `rank` complex modes each.

    Per system: Gramians of the real realisation (`real_gramians`), factors (`psd_factor`),
    Hankel singular values (`hankel_svd`; with one output p = 1 the system is written with unit
    input and goes through `symmetric_hankel_svd`: one Gramian, one symmetric eigendecomposition,
    the same σ and triplets), projection to m real states from the leading m triplets
    (`truncation_projectors`, `project_system`), re-diagonalisation (`diagonalize`) and folding
    of conjugate pairs into complex modes (`fold_conjugate_pairs`). m starts at
    min(2·rank, numerical rank) and is lowered one state at a time for the systems whose
    reduced real poles would need more than `rank` modes.

    The balanced system is the strictly proper (a, b, C) whose Markov parameters are the
    kernel (`first_lags` play no part). Padding modes (when fewer than `rank` modes are needed)
    get `pad_mode` and residue 0. Details: `hankel_singular_values` (..., 2N), `kept_states`,
    `error_bound` (2 Σ_{i>m} σ_i), `cholesky_shift`, `eigenvector_condition`.
    """
    return reduce_in_chunks(lambda piece: _truncate_flat(piece, rank, pad_mode), system, workers)


def reduce_to_modes(
    modes: torch.Tensor,
    input_vec: torch.Tensor,
    output_vec: torch.Tensor,
    rank: int,
    time: str = DISCRETE,
    pad_mode: complex = 0.0,
    workers: int | None = None,
) -> ReducedModes:
    """`balanced_truncation` of the systems (modes (..., N) with |a| < 1 (discrete) or
    Re a < 0 (continuous), input_vec (..., N), output_vec (..., p, N)), any float/complex dtype
    (computed in complex128)."""
    if time not in TIME_DOMAINS:
        raise ValueError(f"`time` must be one of {TIME_DOMAINS}, got {time!r}.")
    return balanced_truncation(DiagonalSystem(modes, input_vec, output_vec, time), rank, pad_mode=pad_mode,
                               workers=workers)


def residue_form(input_vec: torch.Tensor, output_vec: torch.Tensor):
    """(b, C) -> (1, C ⊙ b): the same kernel Re Σ_n C_rn b_n a_n^k, realised with unit input
    (a diagonal state scaling; an unreachable mode b_n = 0 becomes an unobservable one)."""
    return torch.ones_like(input_vec), output_vec * input_vec.unsqueeze(-2)


def balancing_factors(modes, input_vec, output_vec, time: str):
    """Gramian factors and the SVD of L_oᵀ L_c (`hankel_svd`); a single-output system goes
    through its symmetric form (`symmetric_hankel_svd`), which needs one Gramian and one
    symmetric eigendecomposition. Returns (input_vec, output_vec, L_c, L_o, U, σ, Vᵀ, Cholesky
    shift), the system in the realisation the factors belong to."""
    if output_vec.shape[-2] == 1:
        input_vec, output_vec = residue_form(input_vec, output_vec)
        reach_factor, shift = psd_factor(reachability_gramian(modes, input_vec, time))
        left, sigma, right_t, obs_factor = symmetric_hankel_svd(reach_factor, output_vec[..., 0, :])
        return input_vec, output_vec, reach_factor, obs_factor, left, sigma, right_t, shift
    reach_factor, reach_shift = psd_factor(reachability_gramian(modes, input_vec, time))
    obs_factor, obs_shift = psd_factor(observability_gramian(modes, output_vec, time))
    left, sigma, right_t = hankel_svd(reach_factor, obs_factor)
    return input_vec, output_vec, reach_factor, obs_factor, left, sigma, right_t, torch.maximum(reach_shift, obs_shift)


def numerical_rank(sigma: torch.Tensor) -> torch.Tensor:
    """States whose σ is above rounding level (σ_i > 1e-12 σ_1): the others carry nothing and
    cannot be scaled by Σ^{-1/2}."""
    return (sigma > sigma[:, :1] * _NEGLIGIBLE_SIGMA).sum(-1)


def _truncate_flat(system: DiagonalSystem, rank: int, pad_mode: complex) -> ReducedModes:
    """`balanced_truncation` for systems stacked along one leading axis."""
    modes, time = system.modes, system.time
    count = modes.shape[0]
    input_vec, output_vec, reach_factor, obs_factor, left, sigma, right_t, shift = balancing_factors(
        modes, system.input_vec, system.output_vec, time
    )
    kept = torch.clamp(numerical_rank(sigma), max=2 * rank)
    reduced_modes = modes.new_full((count, rank), pad_mode)
    residues = modes.new_zeros((count, output_vec.shape[-2], rank))
    padding = torch.ones((count, rank), dtype=torch.bool)
    condition = sigma.new_ones(count)
    pending = kept > 0
    # column i of V_m, W_m depends on the i-th triplet only: the projectors for fewer states are
    # leading columns of these (so the 2N x 2N factors are never indexed again)
    right_all, left_all = truncation_projectors(
        reach_factor, obs_factor, left, sigma.clamp_min(torch.finfo(sigma.dtype).tiny), right_t, int(kept.max())
    )
    while pending.any():
        for order in kept[pending].unique().tolist():
            select = (pending & (kept == order)).nonzero().squeeze(-1)
            state, reduced_in, reduced_out = project_system(
                modes[select], input_vec[select], output_vec[select],
                right_all[select, :, :order], left_all[select, :, :order]
            )
            eigenvalues, modal_residues, cond = diagonalize(state, reduced_in, reduced_out)
            fits = modes_needed(eigenvalues) <= rank
            done = select[fits]
            reduced_modes[done], residues[done], padding[done] = fold_conjugate_pairs(
                eigenvalues[fits], modal_residues[fits], rank, pad_mode
            )
            condition[done] = cond[fits]
            pending[done] = False
            kept[select[~fits]] -= 1  # one real pole too many: keep one state less
    return ReducedModes(
        modes=reduced_modes,
        residues=residues,
        padding=padding,
        feedthrough=sigma.new_zeros((count, output_vec.shape[-2])),
        details=balanced_details(sigma, kept, shift, condition),
    )


def balanced_details(sigma, kept, shift, condition) -> dict:
    """The per-system details of the balanced methods: σ, the real states kept, the a-priori
    bound 2 Σ_{i>m} σ_i, the Cholesky shift and the re-diagonalisation's condition number."""
    return {
        "hankel_singular_values": sigma,
        "kept_states": kept,
        "error_bound": error_bound(sigma, kept),
        "cholesky_shift": shift,
        "eigenvector_condition": condition,
    }


def hankel_singular_values(modes, input_vec, output_vec, time: str = DISCRETE) -> torch.Tensor:
    """Hankel singular values (..., 2N), descending, of the real-output systems (see
    `reduce_to_modes` for the arguments), computed in float64: the singular values of L_oᵀ L_c,
    for one output the |eigenvalues| of the symmetric L_cᵀ S L_c (`symmetric_hankel_product`)."""
    modes, input_vec, output_vec = (t.to(torch.complex128) for t in (modes, input_vec, output_vec))
    modes = flush_vanished_modes(modes, time)
    if output_vec.shape[-2] == 1:
        input_vec, output_vec = residue_form(input_vec, output_vec)
        reach_factor = psd_factor(reachability_gramian(modes, input_vec, time))[0]
        product = symmetric_hankel_product(reach_factor, output_vec[..., 0, :])[0]
        return torch.linalg.eigvalsh(product).abs().sort(dim=-1, descending=True).values
    reach, obs = real_gramians(modes, input_vec, output_vec, time)
    return torch.linalg.svdvals(psd_factor(obs)[0].mT @ psd_factor(reach)[0])


def kept_energy(sigma: torch.Tensor, kept_states: torch.Tensor) -> torch.Tensor:
    """Fraction of Hankel energy kept: Σ_{i<=m} σ_i / Σ_i σ_i (1 for a zero system)."""
    positions = torch.arange(sigma.shape[-1], device=sigma.device)
    total = sigma.sum(-1)
    kept = torch.where(positions < kept_states.unsqueeze(-1), sigma, 0.0).sum(-1)
    return torch.where(total > 0, kept / total.clamp_min(torch.finfo(sigma.dtype).tiny), torch.ones_like(total))
