"""H2-optimal reduction of banks of diagonal systems: minimise, per system, the H2 norm of the
error, ‖K - K_r‖² = Σ_rows Σ_k (K_k - K_r,k)² (discrete: exactly the layer's kernel error over
all lags; continuous: the L2 norm of the impulse-response error), over reduced systems of
`rank` complex modes in the layer's own form K_r,k = Re Σ_j v_j μ_j^k.

Variable projection. For fixed modes μ the error is quadratic in the real coefficients
θ = [Re v; Im v] (Re(v μ^k) = Re v Re μ^k - Im v Im μ^k), so the optimal residues solve

    M θ = c,   M = Σ_k f_k f_kᵀ,   c = Σ_k f_k K_k,   f_k = [Re μ^k; -Im μ^k],

with M and c in closed form from κ (`gramian_kernel`):  M is the real Gram of z = μ^k
(`real_gram`), c_i = ½ Re S_i and c_{r+i} = -½ Im S_i with S_i = Σ_n w_n κ(μ_i, a_n) + w̄_n κ(μ_i, ā_n),
and the error is  J(μ) = ‖K‖² - 2 cᵀθ + θᵀMθ  (θ from M + εI: a small ridge keeps the
residues bounded where modes nearly coincide).  J(μ) is then minimised over the modes by
L-BFGS (autograd through the closed forms), with the modes parametrised as

    discrete  μ = exp(-exp(ν) + iφ)   (|μ| < 1),      continuous  λ = -exp(ν) + iφ   (Re λ < 0),

so every iterate is strictly stable. The start is the balanced truncation of the same rank;
already its modes with optimal residues are no worse than it. The iteration stops at
convergence — when `_CHECK_EVERY` L-BFGS iterations lower the summed relative error
Σ_h ‖K_h - K_r,h‖² / ‖K_h‖² of the best iterates by less than `_RELATIVE_TOLERANCE` of itself, or
L-BFGS's own tolerances stop it — or after `max_iterations` iterations (at most
`MAX_ITERATIONS`), whichever comes first. Each system keeps the best iterate it saw, and a
system whose H2 error (measured again on the closed form of the error system, not on J) is not
below balanced truncation's keeps the balanced result (`fell_back`).

Pure math: tensors in, tensors out. This file is copied into saved checkpoints (remote code).
"""

from __future__ import annotations

import torch

from .balanced_truncation import _truncate_flat, real_gram
from .diagonal_system import (
    DISCRETE,
    DiagonalSystem,
    ReducedModes,
    error_h2_norm_squared,
    gramian_kernel,
    reduce_in_chunks,
    residue_h2_norm_squared,
)

# Relative ridge on M. Nearly repeated or nearly real modes make M nearly singular, and the exact
# least-squares residues then grow without bound (two close modes imitating a double pole, with
# residues of 1e4 that cancel): the ridge keeps the residues of the size float32 storage holds.
_RIDGE = 1e-8
# Squared errors below this fraction of ‖K‖² are at the rounding level of the closed forms.
_EXACT = 1e-12
# Convergence: every _CHECK_EVERY iterations the summed relative error of the best iterates must
# have dropped by _RELATIVE_TOLERANCE of itself, or the iteration stops. Near the optimum L-BFGS
# creeps (modes drifting towards 0 or the unit circle for gains of 1e-6), so a tighter stop costs
# thousands of evaluations for digits no report shows.
_CHECK_EVERY = 10
_RELATIVE_TOLERANCE = 1e-4
# The iteration stops at convergence long before this; a larger request is a mistake.
MAX_ITERATIONS = 10_000


def optimal_residues(system: DiagonalSystem, modes: torch.Tensor, active: torch.Tensor):
    """(residues (..., p, r), J (...,)): the residues of the given reduced modes that minimise
    the H2 error, and that error (variable projection, see the module). Inactive modes get
    residue 0."""
    rank = modes.shape[-1]
    time = system.time
    same = gramian_kernel(modes.unsqueeze(-1), modes.unsqueeze(-2), time)
    hermitian = gramian_kernel(modes.unsqueeze(-1), modes.conj().unsqueeze(-2), time)
    gram = real_gram(hermitian, same, -1.0)
    mask = torch.cat([active, active], -1).to(gram.dtype)
    scale = gram.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(torch.finfo(gram.dtype).tiny)
    identity = torch.eye(2 * rank, dtype=gram.dtype, device=gram.device)
    gram = gram * mask.unsqueeze(-1) * mask.unsqueeze(-2) + torch.diag_embed(1.0 - mask)
    regularised = gram + (_RIDGE * scale)[..., None, None] * identity
    residues = system.residues()  # (..., p, N)
    cross = (residues.unsqueeze(-2) * gramian_kernel(modes.unsqueeze(-1), system.modes.unsqueeze(-2), time)
             .unsqueeze(-3)).sum(-1)
    cross = cross + (residues.conj().unsqueeze(-2)
                     * gramian_kernel(modes.unsqueeze(-1), system.modes.conj().unsqueeze(-2), time)
                     .unsqueeze(-3)).sum(-1)  # S (..., p, r)
    right_hand = 0.5 * torch.cat([cross.real, -cross.imag], -1) * mask.unsqueeze(-2)  # (..., p, 2r)
    theta = torch.linalg.solve(regularised.unsqueeze(-3), right_hand.unsqueeze(-1)).squeeze(-1)
    # the error of these residues, ‖K‖² - 2 cᵀθ + θᵀMθ (with the ridge, θ is not the exact optimum)
    quadratic = (theta * (gram.unsqueeze(-3) @ theta.unsqueeze(-1)).squeeze(-1)).sum((-2, -1))
    error = residue_h2_norm_squared(system.modes, residues, time) - 2 * (right_hand * theta).sum((-2, -1)) + quadratic
    return torch.complex(theta[..., :rank], theta[..., rank:]), error


def _modes_from(log_decay: torch.Tensor, phase: torch.Tensor, time: str) -> torch.Tensor:
    if time == DISCRETE:
        return torch.polar(torch.exp(-torch.exp(log_decay)), phase)
    return torch.complex(-torch.exp(log_decay), phase)


def _parameters_of(modes: torch.Tensor, time: str):
    if time == DISCRETE:
        magnitude = modes.abs().clamp(min=1e-300, max=1.0 - 1e-16)
        return torch.log(-torch.log(magnitude)), modes.angle()
    return torch.log(-modes.real), modes.imag


def h2_optimal(system: DiagonalSystem, rank: int, *, max_iterations: int = 50, pad_mode: complex = 0.0,
               workers: int | None = None) -> ReducedModes:
    """H2-optimal reduction of every system to `rank` complex modes (see the module), started
    from balanced truncation. Details: `h2_error` and `h2_error_balanced` (ℓ2/L2 norms of the
    error of the result and of balanced truncation), `fell_back` (1 where the balanced result
    was kept), `evaluations` (objective evaluations spent on the system's chunk), and the
    balanced start's `hankel_singular_values`."""
    if (isinstance(max_iterations, bool) or not isinstance(max_iterations, int)
            or not 0 <= max_iterations <= MAX_ITERATIONS):
        raise ValueError(f"h2: `max_iterations` must be an int in [0, {MAX_ITERATIONS}] (the L-BFGS iteration stops "
                         f"at convergence, usually within a few hundred iterations), got {max_iterations!r}.")
    return reduce_in_chunks(lambda piece: _h2_flat(piece, rank, max_iterations, pad_mode), system, workers)


def _iterate(optimizer, objective, max_iterations: int, best_total) -> None:
    """L-BFGS steps of at most `_CHECK_EVERY` iterations (its history carries over from one step to
    the next) until `max_iterations` iterations are spent or the summed relative error of the
    best iterates, `best_total()`, stopped dropping by `_RELATIVE_TOLERANCE` of itself."""
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    previous = None
    while state.get("n_iter", 0) < max_iterations:
        spent = state.get("n_iter", 0)
        chunk = min(_CHECK_EVERY, max_iterations - spent)
        optimizer.param_groups[0].update(max_iter=chunk, max_eval=chunk * 5 // 4)
        try:
            optimizer.step(objective)
        except (RuntimeError, ValueError, ZeroDivisionError):
            return  # a line search that broke down: every system keeps the best iterate it saw
        current = best_total()
        if state.get("n_iter", 0) == spent:  # L-BFGS's own tolerances: converged
            return
        if previous is not None and previous - current <= _RELATIVE_TOLERANCE * previous:
            return
        previous = current


def _h2_flat(system: DiagonalSystem, rank: int, max_iterations: int, pad_mode: complex) -> ReducedModes:
    start = _truncate_flat(system, rank, pad_mode)
    time = system.time
    active = ~start.padding
    norm = residue_h2_norm_squared(system.modes, system.residues(), time)
    balanced_error = error_h2_norm_squared(system, start.modes, start.residues)
    # a balanced result already exact to rounding (full order) cannot be improved: keep it
    exact = balanced_error <= _EXACT * norm
    weight = torch.where(~exact, 1.0 / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0)
    # padding modes are held out of the fit; they only need a valid placeholder (stable in both domains)
    placeholder = 0.5 if time == DISCRETE else -0.5
    log_decay, phase = _parameters_of(torch.where(active, start.modes, placeholder), time)
    log_decay, phase = log_decay.clone().requires_grad_(True), phase.clone().requires_grad_(True)
    best_error = torch.full_like(norm, float("inf"))
    best_modes = start.modes.clone()
    evaluations = [0]

    def objective():
        optimizer.zero_grad()
        with torch.enable_grad():
            modes = _modes_from(log_decay, phase, time)
            _, error = optimal_residues(system, modes, active)
            with torch.no_grad():
                better = torch.isfinite(error) & (error < best_error)
                best_error[better] = error[better]
                best_modes[better] = modes[better]
            evaluations[0] += 1
            # relative errors: every system weighs the same; a zero system contributes nothing
            total = (torch.nan_to_num(error, nan=0.0, posinf=0.0) * weight).sum()
            total.backward()
        for parameter in (log_decay, phase):  # an overflowing iterate must not poison the line search
            parameter.grad = torch.nan_to_num(parameter.grad, nan=0.0, posinf=0.0, neginf=0.0)
        return total

    optimizer = torch.optim.LBFGS([log_decay, phase], lr=1.0, max_iter=_CHECK_EVERY, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-12, tolerance_change=1e-15)
    if max_iterations > 0 and bool(active.any()) and bool((weight > 0).any()):
        _iterate(optimizer, objective, max_iterations, lambda: float((best_error * weight).sum()))
    else:
        objective()
    with torch.no_grad():
        modes = torch.where(active, best_modes, torch.full_like(best_modes, pad_mode))
        residues, _ = optimal_residues(system, modes, active)
        error = error_h2_norm_squared(system, modes, residues)
        fell_back = ~(error <= balanced_error) | ~torch.isfinite(error) | exact
        modes = torch.where(fell_back.unsqueeze(-1), start.modes, modes)
        residues = torch.where(fell_back[:, None, None], start.residues, residues)
        error = torch.where(fell_back, balanced_error, error)
    return ReducedModes(
        modes=modes,
        residues=residues,
        padding=start.padding,
        feedthrough=start.feedthrough,
        details={
            "h2_error": error.sqrt(),
            "h2_error_balanced": balanced_error.sqrt(),
            "fell_back": fell_back.to(torch.int64),
            "evaluations": torch.full_like(fell_back, evaluations[0], dtype=torch.int64),
            "hankel_singular_values": start.details["hankel_singular_values"],
        },
    )
