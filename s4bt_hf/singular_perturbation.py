"""Balanced singular perturbation (balanced residualisation) of banks of diagonal systems.

Balance the real realisation exactly as balanced truncation does, then, instead of dropping
the states x₂ with the small Hankel singular values, hold them at their steady state. For the
balanced system  x⁺ = A x + B u,  y = C x + D u  partitioned as [x₁; x₂]:

    discrete  (x₂ = A₂₁ x₁ + A₂₂ x₂ + B₂ u):   E = I - A₂₂
    continuous (0 = A₂₁ x₁ + A₂₂ x₂ + B₂ u):   E = -A₂₂

    A_r = A₁₁ + A₁₂ E⁻¹ A₂₁,   B_r = B₁ + A₁₂ E⁻¹ B₂,
    C_r = C₁ + C₂ E⁻¹ A₂₁,     D_r = D + C₂ E⁻¹ B₂.

The reduced system has the same gain for a constant input (G_r(1) = G(1) in discrete time,
G_r(0) = G(0) in continuous time) and the balanced-truncation bound ‖G - G_r‖_∞ ≤ 2 Σ_{i>m} σ_i.

Which system is balanced. A DSS forward kernel acts at lag 0: in discrete time its layer is
G(z) = Σ_k K_k z^{-k} + D, whose state-space form with state s_t = x_{t-1} is
(ā, b̄, C ā, C b̄ + D): output row C ā instead of C (`first_lags` = 0). A backward kernel starts
one step away and is strictly proper in its own time direction: row C (`first_lags` = 1).
Residualising that proper system gives a causal direct term; the reduced residues are mapped
back to the layer's form (a lag-0 row's residue w becomes w / μ, and its K_0 moves into the
feedthrough), so `feedthrough` is exactly what the layer's skip D gains. Continuous-time
systems are strictly proper; their direct term goes to D as well (zero-order hold keeps D).

States with σ at rounding level (`numerical_rank`) are removed first by truncation (they carry
nothing); the balanced realisation is never formed beyond them, so Σ^{-1/2} stays bounded.

Pure math: tensors in, tensors out. This file is copied into saved checkpoints (remote code).
"""

from __future__ import annotations

import torch

from .balanced_truncation import (
    balanced_details,
    balancing_factors,
    diagonalize,
    fold_conjugate_pairs,
    modes_needed,
    numerical_rank,
    project_system,
    truncation_projectors,
)
from .diagonal_system import DISCRETE, VANISHED_MAGNITUDE, DiagonalSystem, ReducedModes, reduce_in_chunks


def residualize(state: torch.Tensor, input_vec: torch.Tensor, output_vec: torch.Tensor, order: int, time: str):
    """Singular perturbation of real systems (A (..., M, M), B (..., M), C (..., p, M)) to their
    first `order` states: returns (A_r, B_r, C_r, direct term C₂ E⁻¹ B₂ (..., p)), see the module."""
    a11, a12 = state[..., :order, :order], state[..., :order, order:]
    a21, a22 = state[..., order:, :order], state[..., order:, order:]
    identity = torch.eye(a22.shape[-1], dtype=a22.dtype, device=a22.device)
    steady = identity - a22 if time == DISCRETE else -a22
    right_hand = torch.cat([a21, input_vec[..., order:].unsqueeze(-1)], -1)
    solved = torch.linalg.solve(steady, right_hand)  # E⁻¹ [A₂₁, B₂]
    from_state, from_input = solved[..., :order], solved[..., order]
    c1, c2 = output_vec[..., :order], output_vec[..., order:]
    return (
        a11 + a12 @ from_state,
        input_vec[..., :order] + (a12 @ from_input.unsqueeze(-1)).squeeze(-1),
        c1 + c2 @ from_state,
        (c2 @ from_input.unsqueeze(-1)).squeeze(-1),
    )


def singular_perturbation(system: DiagonalSystem, rank: int, *, pad_mode: complex = 0.0,
                          workers: int | None = None) -> ReducedModes:
    """Balanced singular perturbation of every system to `rank` complex modes (m = 2·rank real
    states, fewer where the reduced real poles need more modes, as in balanced truncation).
    Details as `balanced_truncation`'s (`hankel_singular_values` of the balanced realisation —
    the proper one for lag-0 rows in discrete time —, `kept_states`, `error_bound`,
    `cholesky_shift`, `eigenvector_condition`)."""
    return reduce_in_chunks(lambda piece: _residualize_flat(piece, rank, pad_mode), system, workers)


def proper_output_rows(system: DiagonalSystem) -> torch.Tensor:
    """Output rows of the balanced realisation: C ā for the discrete rows whose kernel starts at
    lag 0 (the state is the previous step's), C otherwise."""
    if system.time != DISCRETE:
        return system.output_vec
    lag0 = torch.tensor([lag == 0 for lag in system.first_lags], device=system.modes.device).view(-1, 1)
    return torch.where(lag0, system.output_vec * system.modes.unsqueeze(-2), system.output_vec)


def _residualize_flat(system: DiagonalSystem, rank: int, pad_mode: complex) -> ReducedModes:
    modes, time = system.modes, system.time
    count, outputs = modes.shape[0], system.num_outputs
    input_vec, output_vec, reach_factor, obs_factor, left, sigma, right_t, shift = balancing_factors(
        modes, system.input_vec, proper_output_rows(system), time
    )
    minimal = numerical_rank(sigma)  # the balanced realisation holds these states
    kept = torch.clamp(minimal, max=2 * rank)
    reduced_modes = modes.new_full((count, rank), pad_mode)
    residues = modes.new_zeros((count, outputs, rank))
    padding = torch.ones((count, rank), dtype=torch.bool)
    feedthrough = sigma.new_zeros((count, outputs))
    condition = sigma.new_ones(count)
    lag0 = torch.tensor([time == DISCRETE and lag == 0 for lag in system.first_lags]).view(1, -1, 1)
    original_lag0 = system.residues().sum(-1).real  # K_0 of every row
    right_all, left_all = truncation_projectors(
        reach_factor, obs_factor, left, sigma.clamp_min(torch.finfo(sigma.dtype).tiny), right_t, int(minimal.max())
    )
    pending = kept > 0
    while pending.any():
        for size, order in torch.stack([minimal, kept], -1)[pending].unique(dim=0).tolist():
            select = (pending & (minimal == size) & (kept == order)).nonzero().squeeze(-1)
            balanced = project_system(modes[select], input_vec[select], output_vec[select],
                                      right_all[select, :, :size], left_all[select, :, :size])
            state, reduced_in, reduced_out, direct = residualize(*balanced, order, time)
            eigenvalues, modal_residues, cond = diagonalize(state, reduced_in, reduced_out)
            # a lag-0 row's residue w becomes w/μ in the layer's form (below): a pole at 0 holding
            # a lag-1 term has no such form, so that order is not usable either
            at_zero = (eigenvalues.abs() < VANISHED_MAGNITUDE).unsqueeze(-2)
            delay = (at_zero & (modal_residues != 0) & lag0).any((-2, -1))
            fits = (modes_needed(eigenvalues) <= rank) & ~delay
            done = select[fits]
            eigenvalues, modal_residues, direct = eigenvalues[fits], modal_residues[fits], direct[fits]
            # a lag-0 row of the proper system: C_r μ^{k-1} B_r at lag k >= 1 is (w/μ) μ^k in the
            # layer's form. Its direct term D + K_0 + C₂E⁻¹B₂ is split into the layer's new K_0
            # (Re Σ w/μ) and D, so D gains K_0 + C₂E⁻¹B₂ - Re Σ w/μ.
            safe = torch.where(modal_residues == 0, torch.ones_like(modal_residues), eigenvalues.unsqueeze(-2))
            layer_residues = torch.where(lag0, modal_residues / safe, modal_residues)
            moved = torch.where(lag0[..., 0], original_lag0[done] - layer_residues.sum(-1).real, 0.0)
            feedthrough[done] = direct + moved
            reduced_modes[done], residues[done], padding[done] = fold_conjugate_pairs(
                eigenvalues, layer_residues, rank, pad_mode)
            condition[done], pending[done] = cond[fits], False
            kept[select[~fits]] -= 1  # one real pole too many (or a delay): keep one state less
            pending &= kept > 0
    # a system with no state above rounding level (e.g. every mode vanished within one step: a
    # kernel at lag 0 only) is residualised whole: D_r = D + C E⁻¹ B is its DC gain, and every
    # row's gain goes to the skip (zero for a zero system)
    empty = kept == 0
    feedthrough[empty] = system.dc_gain()[empty]
    return ReducedModes(modes=reduced_modes, residues=residues, padding=padding, feedthrough=feedthrough,
                        details=balanced_details(sigma, kept, shift, condition))
