"""A differentiable Hankel nuclear norm of every DSS layer: the regulariser of compression-aware
training (add `λ · hankel_penalty(model)` to the loss and the Hankel singular values decay, so
balanced truncation afterwards loses little).

For every channel, the real system the layer computes (the one `balanced_truncate` reduces, see
`balanced_truncation.py`) is written in residue form with unit input: modes a, output rows
w_r = c_r ⊙ b̄ (discrete time after zero-order hold; continuous: λ and c_r ⊙ b). Its
reachability Gramian P then depends on the modes only and is positive definite for distinct,
non-real modes, so a zero or tiny input/output vector never reaches a square root. With
P = L Lᵀ (Cholesky) and the symmetrizer S_r of output row r (`apply_siso_symmetrizer`, Q_r = S_r P S_r):

    one output   (unidirectional):  Σ σ_i = Σ |eig(Lᵀ S L)|              (symmetric: `eigvalsh`)
    two outputs  (bidirectional):   Σ σ_i = nuclear norm of [Lᵀ S_1 L; Lᵀ S_2 L]   (`svdvals`)

(the stacked matrix M has Mᵀ M = Lᵀ Q L, Q = Q_1 + Q_2, so its singular values are the Hankel
singular values; no factor of Q is needed). Everything runs in float64/complex128 whatever the
model's dtype, outside autocast.

Gradients. Only eigen/singular VALUES are differentiated, never vectors: the backward passes are
V diag(sign μ) Vᵀ and U Vᵀ, which do not depend on how a repeated σ's vectors are chosen, so a
repeated σ is harmless. Σσ is not differentiable where some σ = 0 (|μ| has a kink; e.g. a zero
channel, or the unreachable half-states of a real mode): there the gradient is the subgradient
with 0 for that σ (`eigvalsh` route) or U_i V_iᵀ for an arbitrary pair of its singular vectors
(`svdvals` route), always finite. A numerically singular P (repeated or real modes) is factored
with the same relative diagonal shift as `balanced_truncate` (`psd_factor`), chosen without
gradient, so value and report agree; gradients through such a factor stay finite but can be
large (the shift is tiny) — clip gradients (the trainers do by default). A channel holding
NaN/Inf parameters gives a NaN penalty (the training loss then shows it) instead of raising.
"""

from __future__ import annotations

import contextlib

import torch

from .balanced_truncation import (
    CONTINUOUS,
    DISCRETE,
    TIME_DOMAINS,
    apply_siso_symmetrizer,
    psd_factor,
    reachability_gramian,
    symmetric_hankel_product,
)
from .kernel_s4dss import zoh_discretize


def hankel_penalty(model, time: str = DISCRETE) -> torch.Tensor:
    """Σ over DSS layers of the mean over channels of Σ_i σ_i (the Hankel nuclear norm of each
    channel's real system, the σ that `balanced_truncate` reports), a float64 scalar tensor with
    gradients to every layer's `log_dt`, `log_A_real`, `A_imag`, `B` and `C`.

    Args:
        model: an S4-DSS model (or a module holding `S4DSSKernel`s, e.g. wrapped by DDP).
        time: `"discrete"` (default; the system after zero-order hold) or `"continuous"`.
    """
    if time not in TIME_DOMAINS:
        raise ValueError(f"hankel_penalty: `time` must be one of {TIME_DOMAINS}, got {time!r}.")
    kernels = dss_kernels(model)
    if not kernels:
        raise TypeError(f"hankel_penalty: {type(model).__name__} holds no DSS layers (S4DSSKernel modules).")
    return sum(channel_hankel_nuclear_norms(kernel, time).mean() for kernel in kernels)


def dss_kernels(model) -> list:
    """The DSS kernels of `model` in layer order (by class name: remote-code models have their own classes)."""
    return [module for module in model.modules() if type(module).__name__ == "S4DSSKernel"]


def channel_hankel_nuclear_norms(kernel, time: str = DISCRETE) -> torch.Tensor:
    """Σ_i σ_i per channel (H,) of one DSS kernel, float64, differentiable."""
    with torch.autocast(device_type=kernel.log_dt.device.type, enabled=False):
        log_a_real, a_imag, log_dt = (getattr(kernel, name).to(torch.float64)
                                      for name in ("log_A_real", "A_imag", "log_dt"))
        pairs_in, pairs_out = kernel.B.to(torch.float64), kernel.C.to(torch.float64)
        modes = torch.complex(-torch.exp(log_a_real), a_imag)
        input_vec = torch.complex(pairs_in[..., 0], pairs_in[..., 1])  # (H, N)
        output_rows = torch.complex(pairs_out[..., 0], pairs_out[..., 1]).permute(1, 0, 2)  # (H, p, N)
        if time == CONTINUOUS:
            system_modes, input_weight = modes, input_vec
        else:
            log_a_bar, input_weight = zoh_discretize(modes, log_dt, input_vec)
            system_modes = torch.exp(log_a_bar)
        return hankel_nuclear_norm(system_modes, output_rows * input_weight.unsqueeze(-2), time)


def hankel_nuclear_norm(modes: torch.Tensor, residues: torch.Tensor, time: str = DISCRETE) -> torch.Tensor:
    """Σ_i σ_i (...,) of the real-output systems with unit input: kernel Re Σ_n w_rn a_n^k.

    Args: modes a (..., N) complex (|a| < 1 discrete, Re a < 0 continuous), residues w (..., p, N)
    complex, p = 1 or 2. Differentiable (see the module docstring for repeated and zero σ)."""
    modes, residues = modes.to(torch.complex128), residues.to(torch.complex128)
    gramian = reachability_gramian(modes, torch.ones_like(modes), time)
    # a non-finite system would make LAPACK fail: compute a harmless stand-in, report NaN for it
    bad = ~(torch.isfinite(gramian).all(-1).all(-1) & torch.isfinite(residues).all(-1).all(-1))
    identity = torch.eye(gramian.shape[-1], dtype=gramian.dtype, device=gramian.device)
    gramian = torch.where(bad[..., None, None], identity, gramian)
    residues = torch.where(bad[..., None, None], torch.zeros_like(residues), residues)
    factor = _differentiable_factor(gramian)
    if residues.shape[-2] == 1:
        product = symmetric_hankel_product(factor, residues[..., 0, :])[0]
        with _single_threaded_lapack():
            total = torch.linalg.eigvalsh(product).abs().sum(-1)
    else:
        stacked = torch.cat([factor.mT @ apply_siso_symmetrizer(residues[..., row, :], factor)
                             for row in range(residues.shape[-2])], dim=-2)
        with _single_threaded_lapack():
            total = torch.linalg.svdvals(stacked).sum(-1)
    return torch.where(bad, torch.full_like(total, float("nan")), total)


@contextlib.contextmanager
def _single_threaded_lapack():
    """Batched eigen/singular value decompositions of small matrices run one matrix per call:
    with several threads, LAPACK's threads wait on each other (measured on 2 busy cores: 10-40x
    slower than one thread, `bench/bench_hankel_penalty.py`). CPU only."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _differentiable_factor(gramian: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of the PSD `gramian`, with `psd_factor`'s relative shift (chosen without
    gradient) where it is numerically singular; the factorisation itself is differentiated."""
    factor, info = torch.linalg.cholesky_ex(gramian)
    if not bool((info != 0).any()):
        return factor
    with torch.no_grad():
        _, shift = psd_factor(gramian.detach())
        scale = gramian.detach().diagonal(dim1=-2, dim2=-1).amax(-1)
    identity = torch.eye(gramian.shape[-1], dtype=gramian.dtype, device=gramian.device)
    return torch.linalg.cholesky_ex(gramian + (shift * scale)[..., None, None] * identity)[0]
