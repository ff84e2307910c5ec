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

Gradients. Only eigen/singular VALUES are differentiated, never vectors: dΣσ = tr(Zᵀ dM) with
Z = V diag(sign μ) Vᵀ or U Vᵀ, which do not depend on how a repeated σ's vectors are chosen, so a
repeated σ is harmless. The backward is written by hand (`HankelNuclearNorm`): from the one
`eigh`/SVD of the forward, through the Cholesky factor and the closed-form Gramian to the modes
and residues, in real arithmetic, with no autograd graph over the O(N²) and O(N³) work.
Σσ is not differentiable where some σ = 0 (|μ| has a kink; e.g. a zero
channel, or the unreachable half-states of a real mode): there the gradient is the subgradient
with 0 for that σ (one output) or U_i V_iᵀ for an arbitrary pair of its singular vectors
(two outputs), always finite. A numerically singular P (repeated or real modes) is factored
with the same relative diagonal shift as `balanced_truncate` (`psd_factor`), chosen without
gradient, so value and report agree; gradients through such a factor stay finite but can be
large (the shift is tiny) — clip gradients (the trainers do by default). A channel holding
NaN/Inf parameters gives a NaN penalty (the training loss then shows it) instead of raising,
and no gradient to that channel.

Cost. All layers of one shape go through one batched call, on one thread (`_single_threaded`);
the float64 `eigh` (with vectors, for the backward) is about half of the work, the Cholesky
factor, three batched products and one triangular solve most of the rest
(`bench/bench_hankel_penalty.py`).
"""

from __future__ import annotations

import contextlib

import torch

from ..balanced_truncation import (
    CONTINUOUS,
    DISCRETE,
    TIME_DOMAINS,
    psd_factor,
    real_gram,
)
from ..diagonal_system import gramian_kernel
from ..kernel_s4dss import zoh_discretize


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
    for layer, kernel in enumerate(kernels):
        check_materialized(kernel, f"layer {layer}")
    systems = [channel_systems(kernel, time) for kernel in kernels]
    # layers of one shape (d_state, outputs) go through ONE batched call: fewer, larger LAPACK/BLAS calls
    groups: dict[tuple, list[int]] = {}
    for layer, (_, residues) in enumerate(systems):
        groups.setdefault(tuple(residues.shape[-2:]), []).append(layer)
    means = [None] * len(systems)
    for layers in groups.values():
        norms = hankel_nuclear_norm(torch.cat([systems[layer][0] for layer in layers]),
                                    torch.cat([systems[layer][1] for layer in layers]), time)
        sizes = [systems[layer][0].shape[0] for layer in layers]
        for layer, layer_norms in zip(layers, norms.split(sizes), strict=True):
            means[layer] = layer_norms.mean()
    return sum(means)


def dss_kernels(model) -> list:
    """The DSS kernels of `model` in layer order (by class name: remote-code models have their own classes)."""
    return [module for module in model.modules() if type(module).__name__ == "S4DSSKernel"]


def check_materialized(kernel, where: str = "the DSS layer") -> None:
    """A kernel whose parameters are on the meta device has shapes but no values: refuse it by name
    (the Gramians would otherwise fail deep inside with an unrelated dtype error)."""
    on_meta = [name for name in ("log_dt", "log_A_real", "A_imag", "B", "C") if getattr(kernel, name).is_meta]
    if on_meta:
        raise ValueError(f"hankel_penalty: {where} has its parameters ({', '.join(on_meta)}) on the meta device: "
                         "they have no values (a model built under `torch.device('meta')`). Load or initialise "
                         "the weights first, e.g. `from_pretrained(...)` or `model.to_empty(device='cpu')` "
                         "followed by `model.init_weights()`.")


def channel_hankel_nuclear_norms(kernel, time: str = DISCRETE) -> torch.Tensor:
    """Σ_i σ_i per channel (H,) of one DSS kernel, float64, differentiable."""
    check_materialized(kernel)
    return hankel_nuclear_norm(*channel_systems(kernel, time), time)


def channel_systems(kernel, time: str = DISCRETE):
    """(modes a (H, N), residues w (H, p, N)), complex128 and differentiable: the real systems of
    one DSS kernel's channels in residue form with unit input (`time`: after zero-order hold or not)."""
    with torch.autocast(device_type=kernel.log_dt.device.type, enabled=False):
        log_a_real, a_imag, log_dt = (getattr(kernel, name).to(torch.float64)
                                      for name in ("log_A_real", "A_imag", "log_dt"))
        pairs_in, pairs_out = kernel.B.to(torch.float64), kernel.C.to(torch.float64)
        modes = torch.complex(-torch.exp(log_a_real), a_imag)
        input_vec = torch.complex(pairs_in[..., 0], pairs_in[..., 1])  # (H, N)
        output_rows = torch.complex(pairs_out[..., 0], pairs_out[..., 1]).permute(1, 0, 2)  # (H, p, N)
        if time == CONTINUOUS:
            return modes, output_rows * input_vec.unsqueeze(-2)
        log_a_bar, input_weight = zoh_discretize(modes, log_dt, input_vec)
        return torch.exp(log_a_bar), output_rows * input_weight.unsqueeze(-2)


def hankel_nuclear_norm(modes: torch.Tensor, residues: torch.Tensor, time: str = DISCRETE) -> torch.Tensor:
    """Σ_i σ_i (...,) of the real-output systems with unit input: kernel Re Σ_n w_rn a_n^k.

    Args: modes a (..., N) complex (|a| < 1 discrete, Re a < 0 continuous), residues w (..., p, N)
    complex, p = 1 or 2. Differentiable (`HankelNuclearNorm`; see the module docstring for
    repeated and zero σ)."""
    if time not in TIME_DOMAINS:
        raise ValueError(f"hankel_nuclear_norm: `time` must be one of {TIME_DOMAINS}, got {time!r}.")
    modes, residues = modes.to(torch.complex128), residues.to(torch.complex128)
    batch = torch.broadcast_shapes(modes.shape[:-1], residues.shape[:-2])
    modes = modes.expand(*batch, modes.shape[-1]).reshape(-1, modes.shape[-1])
    residues = residues.expand(*batch, *residues.shape[-2:]).reshape(-1, *residues.shape[-2:])
    with _single_threaded():
        if torch.is_grad_enabled() and (modes.requires_grad or residues.requires_grad):
            total = HankelNuclearNorm.apply(modes, residues, time)
        else:
            total = _nuclear_norm_and_cotangent(modes, residues, time, with_cotangent=False)[0]
    return total.reshape(batch)


class HankelNuclearNorm(torch.autograd.Function):
    """Σσ of systems (B, N) modes and (B, p, N) residues, complex128, with a hand-written backward.

    Forward: the Gramian P (real, 2N x 2N) in closed form, P = L Lᵀ, one `eigh` of Lᵀ S L (p = 1)
    or one SVD of the stacked [Lᵀ S_r L] (p = 2); it keeps the cotangent Z = U sign(μ) Uᵀ (p = 1)
    or U Vᵀ (p = 2): dΣσ = Σ_r tr(Z_rᵀ d(Lᵀ S_r L)), so no eigen/singular-vector derivative and no
    complex autograd through the O(N²) Gramian are needed. Backward, by hand:
        ∂/∂S_r = L Z_rᵀ Lᵀ                                  (residues: its diagonals, O(N²))
        ∂/∂L  = Σ_r S_r L (Z_r + Z_rᵀ),   ∂/∂P = ½ ∂/∂L · L⁻¹  (Σσ depends on P only, not on the
                                                             factor, so Lᵀ ∂/∂L is symmetric)
        ∂/∂a_n from ∂/∂P through κ(a_i, ā_j), κ(a_i, a_j)   (`_modes_gradient`)."""

    @staticmethod
    def forward(ctx, modes, residues, time):
        total, cache = _nuclear_norm_and_cotangent(modes, residues, time, with_cotangent=True)
        ctx.time = time
        ctx.save_for_backward(modes, *cache)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        with _single_threaded():
            return _gradients(grad_total, *ctx.saved_tensors, ctx.time)


def _gradients(grad_total, modes, residues, factor, cotangent, kernel_h, kernel_s, bad, time):
    """`HankelNuclearNorm.backward`: (∂/∂modes, ∂/∂residues, None)."""
    num_modes, outputs = modes.shape[-1], residues.shape[-2]
    grad_residues = torch.empty_like(residues)
    if outputs == 1:  # Z symmetric: ∂/∂L = 2 S L Z (the 2 is applied to the small result below)
        factor_cotangent = factor @ cotangent
        grad_factor, factor_scale = _apply_symmetrizer(residues[:, 0], factor_cotangent), 2.0
        grad_residues[:, 0] = _symmetrizer_gradient(factor_cotangent, factor, num_modes)
    else:
        grad_factor, factor_scale = torch.zeros_like(factor), 1.0
        for row in range(outputs):
            block = cotangent[:, row * 2 * num_modes:(row + 1) * 2 * num_modes]
            factor_block_t = factor @ block.mT  # L Z_rᵀ
            grad_factor += _apply_symmetrizer(residues[:, row], factor_block_t + factor @ block)
            grad_residues[:, row] = _symmetrizer_gradient(factor_block_t, factor, num_modes)
    # ∂/∂P = ½ ∂/∂L · L⁻¹, symmetrised (P is symmetric; rounding makes the product slightly not):
    # 4 ∂/∂P = X + Xᵀ, X = ∂/∂L · L⁻¹ (the constants are applied to the small result)
    unscaled = torch.linalg.solve_triangular(factor, grad_factor, upper=False, left=False)
    grad_modes = (0.25 * factor_scale) * _modes_gradient(unscaled + unscaled.mT, modes, kernel_h, kernel_s, time)
    # everything above is linear in Z: scale by the incoming gradient last, on the small results.
    # A non-finite system (NaN penalty) sends no gradient: the other channels' gradients stay usable
    scale = torch.where(bad, 0.0, grad_total.to(torch.float64))
    return ((grad_modes * scale[:, None]).masked_fill(bad[:, None], 0.0),
            (grad_residues * scale[:, None, None]).masked_fill(bad[:, None, None], 0.0), None)


def _nuclear_norm_and_cotangent(modes, residues, time, with_cotangent):
    """Σσ (B,) and, with `with_cotangent`, what the backward needs:
    (residues, L, Z, κ(a_i, ā_j), κ(a_i, a_j), bad), non-finite systems replaced by a stand-in."""
    a_i, a_j = modes.unsqueeze(-1), modes.unsqueeze(-2)
    kernel_h, kernel_s = gramian_kernel(a_i, a_j.conj(), time), gramian_kernel(a_i, a_j, time)
    gramian = real_gram(kernel_h, kernel_s, 1.0)  # the reachability Gramian of unit input
    # a non-finite system would make LAPACK fail: compute a harmless stand-in, report NaN for it.
    # For a stable system |P_ij| <= sqrt(P_ii P_jj): a finite diagonal is a finite Gramian.
    bad = ~(torch.isfinite(gramian.diagonal(dim1=-2, dim2=-1)).all(-1) & torch.isfinite(residues).all(-1).all(-1))
    if bool(bad.any()):
        identity = torch.eye(gramian.shape[-1], dtype=gramian.dtype, device=gramian.device)
        gramian = torch.where(bad[..., None, None], identity, gramian)
        residues = torch.where(bad[..., None, None], torch.zeros_like(residues), residues)
    factor = _shifted_factor(gramian)
    blocks = [factor.mT @ _apply_symmetrizer(residues[:, row], factor) for row in range(residues.shape[-2])]
    cotangent = None
    if len(blocks) == 1 and not with_cotangent:
        total = torch.linalg.eigvalsh(blocks[0]).abs().sum(-1)
    elif len(blocks) == 1:
        eigenvalues, eigenvectors = torch.linalg.eigh(blocks[0])
        total = eigenvalues.abs().sum(-1)
        cotangent = (eigenvectors * torch.sign(eigenvalues).unsqueeze(-2)) @ eigenvectors.mT
    elif not with_cotangent:
        total = torch.linalg.svdvals(torch.cat(blocks, dim=-2)).sum(-1)
    else:
        left, sigma, right_t = torch.linalg.svd(torch.cat(blocks, dim=-2), full_matrices=False)
        total = sigma.sum(-1)
        cotangent = left @ right_t
    total = torch.where(bad, torch.full_like(total, float("nan")), total)
    return total, (residues, factor, cotangent, kernel_h, kernel_s, bad)


def _apply_symmetrizer(residues, matrix):
    """S M (`apply_siso_symmetrizer`'s result) in fewer passes over memory: written into one
    buffer with fused multiply-adds, no concatenation."""
    num_modes = residues.shape[-1]
    real, imag = residues.real.unsqueeze(-1), residues.imag.unsqueeze(-1)
    top, bottom = matrix[..., :num_modes, :], matrix[..., num_modes:, :]
    result = torch.empty_like(matrix)
    torch.mul(top, real, out=result[..., :num_modes, :]).addcmul_(bottom, imag, value=-1.0)
    torch.mul(bottom, real, out=result[..., num_modes:, :]).addcmul_(top, imag).neg_()
    return result


def _symmetrizer_gradient(factor_block_t, factor, num_modes):
    """∂Σσ/∂w (complex: ∂/∂Re w + i ∂/∂Im w) from T = L Z_rᵀ Lᵀ = ∂Σσ/∂S_r, given L Z_rᵀ. Only
    the entries of T where S = [[diag Re w, -diag Im w], [-diag Im w, -diag Re w]] is non-zero are
    needed, each a row-by-row dot product: T_ij = Σ_k (L Z_rᵀ)_ik L_jk."""
    top, bottom = slice(0, num_modes), slice(num_modes, 2 * num_modes)

    def entries(rows, cols):
        return (factor_block_t[:, rows] * factor[:, cols]).sum(-1)

    grad_real = entries(top, top) - entries(bottom, bottom)
    grad_imag = -(entries(top, bottom) + entries(bottom, top))
    return torch.complex(grad_real, grad_imag)


def _modes_gradient(grad_gramian, modes, kernel_h, kernel_s, time):
    """∂Σσ/∂a (complex, PyTorch's convention ∂/∂Re a + i ∂/∂Im a) from the symmetric ∂Σσ/∂P
    (both scaled by the same constant).

    P = ½ [[Re(K_h + K_s), Im(K_s - K_h)], [Im(K_s + K_h), Re(K_h - K_s)]] (`real_gram`) with
    K_h = κ(a_i, ā_j), K_s = κ(a_i, a_j), so dΣσ = Re Σ conj(C_h) dK_h + conj(C_s) dK_s with
    C_h = ½(G11 + G22) + ½ i (G21 - G12), C_s = ½(G11 - G22) + ½ i (G12 + G21) (G: the blocks of
    ∂Σσ/∂P; C_h Hermitian, C_s symmetric). With ∂κ(x, y)/∂x = κ² y (discrete) or κ² (continuous),
    and E = conj(C) κ², dΣσ = Re Σ_n r_n da_n,  r = 2 (E_h ā + E_s a) (discrete) or
    2 (E_h 1 + E_s 1) (continuous); the gradient is conj(r)."""
    num_modes = modes.shape[-1]
    top, bottom = slice(0, num_modes), slice(num_modes, 2 * num_modes)
    g11, g12 = grad_gramian[:, top, top], grad_gramian[:, top, bottom]
    g21, g22 = grad_gramian[:, bottom, top], grad_gramian[:, bottom, bottom]
    weight_h = torch.complex(g11 + g22, g12 - g21) * (kernel_h * kernel_h)  # 2 conj(C_h) K_h²
    weight_s = torch.complex(g11 - g22, -(g12 + g21)) * (kernel_s * kernel_s)  # 2 conj(C_s) K_s²
    if time == CONTINUOUS:
        rates = weight_h.sum(-1) + weight_s.sum(-1)
    else:
        rates = (weight_h @ modes.conj().unsqueeze(-1) + weight_s @ modes.unsqueeze(-1)).squeeze(-1)
    return rates.conj()


@contextlib.contextmanager
def _single_threaded():
    """The penalty runs on one thread: its work is many small matrices (LAPACK/BLAS one matrix per
    call) and element-wise passes over ~1e5-element arrays, where a second thread mostly waits on
    the first (measured on 2 shared cores: eigh 4-5x the CPU time, the whole penalty 3-6x the
    wall time of one thread, `bench/bench_hankel_penalty.py`). CPU only."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _shifted_factor(gramian: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of the PSD `gramian`, with `psd_factor`'s relative shift where it is
    numerically singular (the shift is a constant: Σσ's gradient is that of the shifted P)."""
    factor, info = torch.linalg.cholesky_ex(gramian)
    if not bool((info != 0).any()):
        return factor
    _, shift = psd_factor(gramian)
    scale = gramian.diagonal(dim1=-2, dim2=-1).amax(-1)
    identity = torch.eye(gramian.shape[-1], dtype=gramian.dtype, device=gramian.device)
    return torch.linalg.cholesky_ex(gramian + (shift * scale)[..., None, None] * identity)[0]
