"""The objects every reduction method works on: a bank of diagonal real-output linear systems
(`DiagonalSystem`, one system per channel) and the reduced modes a method returns
(`ReducedModes`), plus the closed forms they share (DC gain, H2 norms) and the
chunked, threaded map that runs a method over many channels.

A system with complex modes a (N,), input vector b (N,) and output rows C (p, N) computes the
real kernel

    discrete time:    K_k = Re(C diag(a)^k b),          k = 0, 1, ...
    continuous time:  g(t) = Re(C exp(diag(a) t) b),    t >= 0,

the residue form of which is K_k = Re Σ_n w_n a_n^k with residues w = C ⊙ b.

Pure math: tensors in, tensors out. This file is copied into saved checkpoints (remote code):
it imports only torch.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

DISCRETE = "discrete"
CONTINUOUS = "continuous"
TIME_DOMAINS = (DISCRETE, CONTINUOUS)

# Systems reduced together: small enough to stay in cache, large enough to amortise overhead.
_CHUNK_SIZE = 64
# A discrete mode below the smallest normal float64 has decayed to nothing within one step (e.g.
# exp(Δλ) with Δ Re λ < -708): it contributes w at lag 0 and less than |w|·2.2e-308 at every later
# lag, below float64 resolution. As a subnormal it has lost its digits and overflows every
# division by it (1/a, phase a/|a|), so it is taken as exactly 0 (`flush_vanished_modes`).
VANISHED_MAGNITUDE = torch.finfo(torch.float64).tiny


def gramian_kernel(x: torch.Tensor, y: torch.Tensor, time: str) -> torch.Tensor:
    """Element-wise solution kernel of the diagonal Lyapunov/Stein equations:
    discrete  κ(x, y) = Σ_k x^k y^k = 1 / (1 - x y);  continuous  κ(x, y) = ∫ e^{(x+y)t} dt = -1 / (x + y)."""
    denominator = 1.0 - x * y if time == DISCRETE else -(x + y)
    # 1/z = conj(z)/|z|^2: real arithmetic, much faster than torch's complex division
    return denominator.conj() / (denominator.real.square() + denominator.imag.square())


@dataclass(frozen=True)
class DiagonalSystem:
    """A bank of diagonal systems, batched over leading axes (usually one per channel).

    modes a (..., N) complex: discrete |a| < 1, or continuous Re a < 0;
    input_vec b (..., N) complex;
    output_vec C (..., p, N) complex: p = 1, or 2 for a bidirectional DSS layer (forward and
        backward kernels sharing the modes);
    time: `"discrete"` or `"continuous"`;
    first_lags: per output row, the lag its kernel K_0 acts at in that row's own time direction
        (0: the DSS forward kernel, which includes the current input; 1: the backward kernel,
        which starts one step away). Only methods that produce a direct term need it.
    """

    modes: torch.Tensor
    input_vec: torch.Tensor
    output_vec: torch.Tensor
    time: str = DISCRETE
    first_lags: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.time not in TIME_DOMAINS:
            raise ValueError(f"`time` must be one of {TIME_DOMAINS}, got {self.time!r}.")
        if self.input_vec.shape != self.modes.shape:
            raise ValueError(f"input_vec has shape {tuple(self.input_vec.shape)}, modes {tuple(self.modes.shape)}.")
        if self.output_vec.dim() != self.modes.dim() + 1 or (
            self.output_vec.shape[:-2] != self.modes.shape[:-1] or self.output_vec.shape[-1] != self.modes.shape[-1]
        ):
            raise ValueError(f"output_vec must have shape (..., p, N) = (..., p, {self.modes.shape[-1]}) for modes "
                             f"{tuple(self.modes.shape)}, got {tuple(self.output_vec.shape)}.")
        lags = self.first_lags if self.first_lags is not None else (0,) + (1,) * (self.num_outputs - 1)
        if len(lags) != self.num_outputs or any(lag not in (0, 1) for lag in lags):
            raise ValueError(f"first_lags must hold 0 or 1 for each of the {self.num_outputs} output rows, "
                             f"got {self.first_lags!r}.")
        object.__setattr__(self, "first_lags", tuple(int(lag) for lag in lags))

    @property
    def num_modes(self) -> int:
        return self.modes.shape[-1]

    @property
    def num_outputs(self) -> int:
        return self.output_vec.shape[-2]

    @property
    def batch_shape(self) -> torch.Size:
        return self.modes.shape[:-1]

    def to_complex128(self) -> DiagonalSystem:
        """The same systems in complex128, vanished discrete modes exactly 0 (`flush_vanished_modes`):
        the form every reduction method works on."""
        modes, input_vec, output_vec = (t.to(torch.complex128) for t in (self.modes, self.input_vec, self.output_vec))
        return DiagonalSystem(flush_vanished_modes(modes, self.time), input_vec, output_vec, time=self.time,
                              first_lags=self.first_lags)

    def flatten(self) -> DiagonalSystem:
        """The same systems stacked along one leading axis."""
        return DiagonalSystem(self.modes.reshape(-1, self.num_modes), self.input_vec.reshape(-1, self.num_modes),
                              self.output_vec.reshape(-1, self.num_outputs, self.num_modes), time=self.time,
                              first_lags=self.first_lags)

    def select(self, index) -> DiagonalSystem:
        """The systems at `index` of the (single) leading axis."""
        return DiagonalSystem(self.modes[index], self.input_vec[index], self.output_vec[index], time=self.time,
                              first_lags=self.first_lags)

    def residues(self) -> torch.Tensor:
        """w = C ⊙ b (..., p, N): the kernel is Re Σ_n w_n a_n^k."""
        return self.output_vec * self.input_vec.unsqueeze(-2)

    def dc_gain(self) -> torch.Tensor:
        """Gain for a constant input (..., p): Σ_k K_k = Re Σ_n w_n / (1 - a_n) (discrete),
        ∫ g = Re Σ_n -w_n / a_n (continuous)."""
        return modal_dc_gain(self.modes, self.residues(), self.time).sum(-1)

    def h2_norm_squared(self) -> torch.Tensor:
        """Σ over output rows of Σ_k K_k² (discrete) or ∫ g(t)² dt (continuous), (...,), in closed form."""
        return residue_h2_norm_squared(self.modes, self.residues(), self.time)


def flush_vanished_modes(modes: torch.Tensor, time: str) -> torch.Tensor:
    """Discrete modes with |a| < `VANISHED_MAGNITUDE` set to exactly 0 (continuous modes unchanged).

    At a = 0 every closed form is exact: κ(0, y) = 1 (`gramian_kernel`), the mode is a one-step
    state whose kernel is w at lag 0 and 0 after, its Hankel singular values and residues follow
    from the Gramians as for any other mode. The kernel changes by less than |w|·2.2e-308 per lag."""
    if time != DISCRETE:
        return modes
    return torch.where(modes.abs() < VANISHED_MAGNITUDE, torch.zeros_like(modes), modes)


def modal_dc_gain(modes: torch.Tensor, residues: torch.Tensor, time: str) -> torch.Tensor:
    """Per-mode DC gain (..., p, N): Re w_n / (1 - a_n) (discrete) or Re -w_n / a_n (continuous)."""
    denominator = (1.0 - modes) if time == DISCRETE else -modes
    return (residues / denominator.unsqueeze(-2)).real


def residue_h2_norm_squared(modes: torch.Tensor, residues: torch.Tensor, time: str) -> torch.Tensor:
    """Σ_rows ‖Re Σ_n w_n a_n^k‖² over all lags (or the L2 integral in continuous time):
        ½ Re Σ_{n,m} (w_n w_m κ(a_n, a_m) + w_n w̄_m κ(a_n, ā_m)),   κ = `gramian_kernel`.
    Args: modes (..., N), residues (..., p, N). Returns (...,) real, clamped at 0 (rounding)."""
    same = gramian_kernel(modes.unsqueeze(-1), modes.unsqueeze(-2), time)
    conjugate = gramian_kernel(modes.unsqueeze(-1), modes.conj().unsqueeze(-2), time)
    rows_same = torch.einsum("...pn,...pm->...nm", residues, residues)
    rows_conjugate = torch.einsum("...pn,...pm->...nm", residues, residues.conj())
    value = 0.5 * (rows_same * same + rows_conjugate * conjugate).real.sum((-2, -1))
    return value.clamp_min(0.0)


def error_h2_norm_squared(system: DiagonalSystem, reduced_modes: torch.Tensor, reduced_residues: torch.Tensor,
                          feedthrough: torch.Tensor | None = None) -> torch.Tensor:
    """‖K - K_r‖² over all lags and output rows (discrete: the ℓ2 norm of the layer's kernel error;
    continuous: the L2 norm of the impulse-response error) of a reduced system given by its
    modes (..., r) and residues (..., p, r), from the closed form of the error system (the
    original and the reduced modes stacked, residues w and -w_r). A discrete `feedthrough`
    (..., p) added to the lag-0 term of each row's kernel counts as an error of that size."""
    modes = torch.cat([system.modes, reduced_modes.to(system.modes.dtype)], -1)
    residues = torch.cat([system.residues(), -reduced_residues.to(system.modes.dtype)], -1)
    value = residue_h2_norm_squared(modes, residues, system.time)
    if feedthrough is not None and system.time == DISCRETE:
        # (K_0 - K_r0 - d)² - (K_0 - K_r0)² for every row
        lag0 = residues.sum(-1).real
        value = value + ((lag0 - feedthrough).square() - lag0.square()).sum(-1)
    return value.clamp_min(0.0)


@dataclass
class ReducedModes:
    """What every reduction method returns for a batch of systems (leading axes ...).

    modes (..., r) complex: the reduced modes, in the system's time domain;
    residues (..., p, r) complex: the reduced kernel is Re Σ_j residues_j modes_j^k, each row in
        the layout of the original (row p's K_0 at the same lag as the original's);
    padding (..., r) bool: modes holding nothing (residue 0);
    feedthrough (..., p) real: a direct term to add to the layer's skip D (0 for truncations;
        the steady state of the discarded part for singular perturbation);
    details: per-method values, each a tensor with the leading axes ... (e.g. Hankel singular
        values, kept states and the a-priori bound of the balanced methods, H2 errors of `h2`).
    """

    modes: torch.Tensor
    residues: torch.Tensor
    padding: torch.Tensor
    feedthrough: torch.Tensor
    details: dict[str, torch.Tensor] = field(default_factory=dict)


def concatenate_reduced(results: list[ReducedModes]) -> ReducedModes:
    """Stack results of consecutive chunks along the leading axis."""
    def cat(name):
        return torch.cat([getattr(result, name) for result in results])

    names = results[0].details.keys()
    return ReducedModes(modes=cat("modes"), residues=cat("residues"), padding=cat("padding"),
                        feedthrough=cat("feedthrough"),
                        details={name: torch.cat([result.details[name] for result in results]) for name in names})


def reduce_in_chunks(reduce_flat, system: DiagonalSystem, workers: int | None = None) -> ReducedModes:
    """Run `reduce_flat(flat_system) -> ReducedModes` over the systems in chunks on `workers`
    threads (default: torch's thread count), each with single-threaded LAPACK (faster than
    threaded LAPACK on small matrices), in complex128; results reshaped to the batch shape."""
    batch_shape = system.batch_shape
    flat = system.to_complex128().flatten()
    workers = workers or torch.get_num_threads()
    count = flat.modes.shape[0]
    chunk = max(1, min(_CHUNK_SIZE, -(-count // workers)))
    pieces = [flat.select(slice(start, start + chunk)) for start in range(0, count, chunk)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(reduce_flat, pieces))
    finally:
        torch.set_num_threads(threads)
    merged = concatenate_reduced(results)

    def shaped(value):
        return value.reshape((*batch_shape, *value.shape[1:]))

    return ReducedModes(modes=shaped(merged.modes), residues=shaped(merged.residues), padding=shaped(merged.padding),
                        feedthrough=shaped(merged.feedthrough),
                        details={name: shaped(value) for name, value in merged.details.items()})
