"""Initial diagonal modes λ of a DSS layer, in the DSS convention (N complex modes, real
output Re(...)). Every formula returns a float64 complex tensor of shape (N,).

This file is copied into saved checkpoints (remote code): it imports only torch.
"""

from __future__ import annotations

import math

import torch


def skew_hippo_modes(num_modes: int) -> torch.Tensor:
    """Skew-HiPPO (Gupta et al., DSS): λ_n = -1/2 + i ω_n.

    With M the 2N x 2N strictly lower-triangular matrix M_ij = sqrt((2i+1)(2j+1)) (i > j), the
    skew-symmetric part S = (M - Mᵀ)/2 has eigenvalues ±i ω_n; the N with positive imaginary
    part are kept. (HiPPO-LegS + P Pᵀ = -I/2 + S, so this is the normal part of S4's matrix.)
    Computed as the eigenvalues of the Hermitian matrix -iS in float64; returned by descending ω.
    """
    size = 2 * num_modes
    scale = torch.sqrt(2.0 * torch.arange(size, dtype=torch.float64) + 1.0)
    lower = torch.tril(scale.unsqueeze(1) * scale.unsqueeze(0), diagonal=-1)
    skew = (lower - lower.T) / 2
    omegas = torch.linalg.eigvalsh(-1j * skew.to(torch.complex128))  # real, ascending
    positive = omegas.flip(0)[:num_modes]
    return torch.complex(torch.full_like(positive, -0.5), positive)


def s4d_lin_modes(num_modes: int) -> torch.Tensor:
    """S4D-Lin: λ_n = -1/2 + i π n,  n = 0 .. N-1."""
    n = torch.arange(num_modes, dtype=torch.float64)
    return torch.complex(torch.full_like(n, -0.5), math.pi * n)


def s4d_inv_modes(num_modes: int) -> torch.Tensor:
    """S4D-Inv: λ_n = -1/2 + i (M/π)(M/(2n+1) - 1),  n = 0 .. N-1, with M = 2N.

    S4D's state size M counts conjugate pairs (M/2 complex modes), so our N complex modes
    correspond to M = 2N in its formula.
    """
    n = torch.arange(num_modes, dtype=torch.float64)
    size = 2.0 * num_modes
    return torch.complex(torch.full_like(n, -0.5), (size / math.pi) * (size / (2 * n + 1) - 1))


def random_modes(num_modes: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random modes (the DSS ablation, kept stable): Re λ ~ -U(1e-4, 1), Im λ ~ N · U(0, 1)."""
    real = -(torch.rand(num_modes, dtype=torch.float64, generator=generator) * (1 - 1e-4) + 1e-4)
    imag = num_modes * torch.rand(num_modes, dtype=torch.float64, generator=generator)
    return torch.complex(real, imag)


MODE_INITIALIZERS = {
    "skew_hippo": skew_hippo_modes,
    "s4d_lin": s4d_lin_modes,
    "s4d_inv": s4d_inv_modes,
    "random": random_modes,
}
