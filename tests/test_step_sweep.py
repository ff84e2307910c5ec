"""Every reduction method over steps Δ from 1e-6 to 1e9 (issue 18, item 3a): finite weights, and a
kernel error within a bound computed by a float64 dense oracle (scipy: expm for the zero-order
hold, Lyapunov solvers for Gramians and ℓ2/L2 norms), independent of the package's closed forms.

With Re λ = -0.5 and Δ near 1470 the discrete modes exp(Δλ) are float64 subnormals: they have
decayed to nothing within one step. The channels at the end of the sweep are made of such modes
only (and of modes that underflow to exactly 0)."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from s4bt_hf import S4DSSConfig, S4DSSForSequenceClassification

DECADE_STEPS = [10.0 ** power for power in range(-6, 10)]
VANISHING_STEPS = [1400.0, 1440.0, 1470.0, 1490.0, 2000.0]  # exp(-0.5 Δ): normal, 3 subnormals, 0
STEPS = DECADE_STEPS + VANISHING_STEPS
RANK = 2
METHODS = [("balanced_truncation", {}), ("singular_perturbation", {}), ("modal_truncation", {}),
           ("modal_truncation", {"match_dc": True}), ("h2", {})]


def _model(bidirectional, dtype=torch.float64):
    torch.manual_seed(0)
    config = S4DSSConfig(input_dim=2, d_model=len(STEPS), n_layers=1, d_state=6, num_labels=2,
                         bidirectional=bidirectional)
    model = S4DSSForSequenceClassification(config).to(dtype).eval()
    kernel = model.base_model.layers[0].kernel
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        kernel.log_dt.copy_(torch.log(torch.tensor(STEPS, dtype=torch.float64)))
        decay = 0.05 + torch.rand(kernel.log_A_real.shape, generator=generator, dtype=torch.float64)
        decay[len(DECADE_STEPS):] = 0.5
        kernel.log_A_real.copy_(torch.log(decay))
        kernel.B.copy_(torch.randn(kernel.B.shape, generator=generator, dtype=torch.float64))
    return model


def _calibration(length=64):
    generator = torch.Generator().manual_seed(3)
    return [{"input_values": torch.randn(2, length, 2, generator=generator, dtype=torch.float64)}]


# ----------------------------------------------------------------------------- the dense oracle


def _channel(kernel, channel):
    """Continuous real realisation (A, B, C rows (p, 2N), D, Δ) of one channel, from the stored
    parameters read as float64."""
    with torch.no_grad():
        modes = torch.complex(-torch.exp(kernel.log_A_real[channel].double()), kernel.A_imag[channel].double()).numpy()
        input_vec = torch.view_as_complex(kernel.B[channel].double().contiguous()).numpy()
        output_vec = torch.view_as_complex(kernel.C[:, channel].double().contiguous()).numpy()
        skip, step = float(kernel.D[channel]), math.exp(float(kernel.log_dt[channel]))
    real, imag = np.diag(modes.real), np.diag(modes.imag)
    state = np.block([[real, -imag], [imag, real]])
    return state, np.concatenate([input_vec.real, input_vec.imag]), np.hstack([output_vec.real, -output_vec.imag]), \
        skip, step


def _zero_order_hold(state, input_vec, step):
    """(Ā, B̄) = (e^{AΔ}, ∫_0^Δ e^{As} ds B) from one expm of the augmented matrix."""
    size = len(state)
    augmented = np.zeros((size + 1, size + 1))
    augmented[:size, :size], augmented[:size, size] = state * step, input_vec * step
    exponential = scipy.linalg.expm(augmented)
    return exponential[:size, :size], exponential[:size, size]


def _psd_root(gramian):
    values, vectors = np.linalg.eigh((gramian + gramian.T) / 2)
    return vectors * np.sqrt(np.clip(values, 0.0, None))


def _hankel_singular_values(state, input_vec, output_rows, discrete):
    if discrete:
        reach = scipy.linalg.solve_discrete_lyapunov(state, np.outer(input_vec, input_vec))
        obs = scipy.linalg.solve_discrete_lyapunov(state.T, output_rows.T @ output_rows)
    else:
        reach = scipy.linalg.solve_continuous_lyapunov(state, -np.outer(input_vec, input_vec))
        obs = scipy.linalg.solve_continuous_lyapunov(state.T, -output_rows.T @ output_rows)
    return np.linalg.svd(_psd_root(obs).T @ _psd_root(reach), compute_uv=False)


def _discrete_error(original, reduced, bidirectional):
    """ℓ2 norm over all lags and rows of the layer's kernel error, D at lag 0 of the forward row:
    row 0 is h_0 = D + C B̄, h_k = C Ā^k B̄; the backward row is C Ā^k B̄, k >= 0."""
    (a1, b1, c1, d1, step), (a2, b2, c2, d2, _) = original, reduced
    a_bar1, b_bar1 = _zero_order_hold(a1, b1, step)
    a_bar2, b_bar2 = _zero_order_hold(a2, b2, step)
    a_bar, b_bar = scipy.linalg.block_diag(a_bar1, a_bar2), np.concatenate([b_bar1, b_bar2])
    rows = np.hstack([c1, -c2])
    reach = scipy.linalg.solve_discrete_lyapunov(a_bar, np.outer(b_bar, b_bar))
    lag0 = rows[0] @ b_bar + d1 - d2
    later = rows[0] @ a_bar
    squared = lag0 ** 2 + later @ reach @ later
    if bidirectional:
        squared += rows[1] @ reach @ rows[1]
    return math.sqrt(max(squared, 0.0)), (a_bar1, b_bar1)


def _discrete_norm(original, bidirectional):
    zero = (np.zeros((0, 0)), np.zeros(0), np.zeros((original[2].shape[0], 0)), original[3], original[4])
    return _discrete_error(original, zero, bidirectional)[0]


def _continuous_bound(original, reduced, rows):
    """Bound on the ℓ2 error of the zero-order-hold kernels of two continuous systems, from the
    continuous error e(t) = g(t) - g_r(t) and the direct-term change d = D_r - D (row 0):
        ‖K - K_r‖ <= sqrt(Δ) ‖e‖_L2 + |d|                      (Cauchy-Schwarz on each step),
        ‖K - K_r‖ <= |E(0) - d| + ∫_Δ^∞ |e| + sqrt(Δ) ‖e‖_L2(t >= Δ)   (lag 0, then the rest),
    with E(0) = ∫ e the DC error; per row, combined over rows. Returns (bound, DC error over rows)."""
    (a1, b1, c1, d1, step), (a2, b2, c2, d2, _) = original, reduced
    state, input_vec = scipy.linalg.block_diag(a1, a2), np.concatenate([b1, b2])
    output_rows = np.hstack([c1, -c2])
    reach = scipy.linalg.solve_continuous_lyapunov(state, -np.outer(input_vec, input_vec))
    bounds, dc_errors = [], []
    for row in range(rows):
        direct = (d2 - d1) if row == 0 else 0.0
        l2 = math.sqrt(max(output_rows[row] @ reach @ output_rows[row], 0.0))
        dc = -output_rows[row] @ np.linalg.solve(state, input_vec) - direct
        # e after Δ, mode by mode: |w| e^{Re λ t} with w = c·b (the residues of both systems)
        tail = 0.0
        for a, b, c in ((a1, b1, c1), (a2, b2, c2)):
            modes, residues = _modes_and_residues(a, b, c[row:row + 1])
            fade = np.exp(modes.real * step) * np.abs(residues[0])
            tail += (fade / -modes.real).sum() + math.sqrt(step) * (fade / np.sqrt(-2 * modes.real)).sum()
        bounds.append(min(math.sqrt(step) * l2 + abs(direct), abs(dc) + tail))
        dc_errors.append(dc)
    return math.sqrt(sum(b * b for b in bounds)), math.sqrt(sum(e * e for e in dc_errors))


def _modes_and_residues(state, input_vec, output_rows):
    """Complex modes (N,) and residues w = c·b (p, N) of a real realisation in the [Re; Im] layout."""
    half = len(state) // 2
    modes = np.diag(state)[:half] + 1j * np.diag(state[half:, :half])
    residues = (output_rows[:, :half] - 1j * output_rows[:, half:]) * (input_vec[:half] + 1j * input_vec[half:])
    return modes, residues


def _modal_scores(state, input_vec, output_rows, discrete):
    modes, residues = _modes_and_residues(state, input_vec, output_rows)
    weight = np.sqrt((np.abs(residues) ** 2).sum(0))
    return weight / ((1 - np.abs(modes)) if discrete else -modes.real)


# ----------------------------------------------------------------------------- the sweep


@pytest.fixture(scope="module", params=[False, True], ids=["unidirectional", "bidirectional"])
def sweep(request):
    bidirectional = request.param
    model = _model(bidirectional)
    results = {}
    for time in ("discrete", "continuous"):
        for method, options in METHODS:
            for refit in (False, True):
                results[time, method, tuple(options.items()), refit] = model.reduce(
                    method, RANK, time=time, calibration_data=_calibration() if refit else None, **options)
    return bidirectional, model, results


@pytest.mark.parametrize("time", ["discrete", "continuous"])
@pytest.mark.parametrize("method, options", METHODS, ids=[m + ("+dc" if o else "") for m, o in METHODS])
def test_every_step_gives_finite_weights_within_the_oracle_bound(sweep, time, method, options):
    bidirectional, model, results = sweep
    rows = 2 if bidirectional else 1
    compressed = results[time, method, tuple(options.items()), False]
    for name, parameter in compressed.named_parameters():
        assert torch.isfinite(parameter).all(), name
    report = compressed.compression_report.layers[0]
    original_kernel, kernel = model.base_model.layers[0].kernel, compressed.base_model.layers[0].kernel
    reference = results[time, "balanced_truncation", (), False].base_model.layers[0].kernel
    for channel, step in enumerate(STEPS):
        original, reduced = _channel(original_kernel, channel), _channel(kernel, channel)
        error, (a_bar, b_bar) = _discrete_error(original, reduced, bidirectional)
        norm = _discrete_norm(original, bidirectional)
        slack = 1e-6 * norm + 1e-12
        state, input_vec, output_rows = original[:3]
        where = f"{method}{options} {time} channel {channel} Δ={step:g}"
        if time == "discrete":
            discrete_rows = output_rows
            if method == "singular_perturbation":  # the proper realisation: row C Ā for a lag-0 row
                discrete_rows = np.vstack([output_rows[:1] @ a_bar, output_rows[1:]])
            if method == "modal_truncation":
                scores = np.sort(_modal_scores(a_bar, b_bar, output_rows, discrete=True))
                bound = scores[: len(scores) - RANK].sum() * (2 if options else 1)
            elif method == "h2":  # never worse than balanced truncation of the same rank
                bound = _discrete_error(original, _channel(reference, channel), bidirectional)[0]
            else:
                sigma = _hankel_singular_values(a_bar, b_bar, discrete_rows, discrete=True)
                kept = report.details["kept_states"][channel]
                bound = 2 * sigma[kept:].sum()
            assert error <= bound + slack, (where, error, bound, norm)
        else:
            bound, dc_error = _continuous_bound(original, reduced, rows)
            assert error <= bound * (1 + 1e-6) + slack, (where, error, bound, norm)
            if method == "modal_truncation":  # a-priori: Σ dropped |w|/|Re λ| bounds every ZOH kernel
                scores = np.sort(_modal_scores(state, input_vec, output_rows, discrete=False))
                assert error <= scores[: len(scores) - RANK].sum() * (2 if options else 1) + slack, where
            elif method != "h2":  # the DC error is within the a-priori 2 Σ_{i>m} σ_i (exactly 0 for SP)
                sigma = _hankel_singular_values(state, input_vec, output_rows, discrete=False)
                kept = report.details["kept_states"][channel]
                assert dc_error <= 2 * sigma[kept:].sum() * (1 + 1e-6) + slack, (where, dc_error)


@pytest.mark.parametrize("time", ["discrete", "continuous"])
@pytest.mark.parametrize("method, options", METHODS, ids=[m + ("+dc" if o else "") for m, o in METHODS])
def test_every_step_with_refit_gives_finite_weights_and_no_worse_output(sweep, time, method, options):
    _, _, results = sweep
    compressed = results[time, method, tuple(options.items()), True]
    for name, parameter in compressed.named_parameters():
        assert torch.isfinite(parameter).all(), name
    refit = compressed.compression_report.layers[0].refit
    before, after = np.array(refit["error_before"]), np.array(refit["error_after"])
    assert np.isfinite(after).all()
    # the refit minimises ‖y - Xθ‖² + α‖θ - θ₀‖², so it never ends above its start θ₀
    assert np.all(after <= before + 1e-6), (method, time, before, after)


@pytest.mark.parametrize("time", ["discrete", "continuous"])
def test_every_step_in_a_float32_model_gives_finite_weights_and_outputs(time):
    """The same sweep stored in float32 (vanished modes as Δ Re λ = -800, whose exp is 0 in float32
    too): finite parameters and finite outputs for every method."""
    model = _model(bidirectional=False, dtype=torch.float32)
    inputs = _calibration()[0]["input_values"].float()
    for method, options in METHODS:
        compressed = model.reduce(method, RANK, time=time, **options)
        for name, parameter in compressed.named_parameters():
            assert parameter.dtype == torch.float32 and torch.isfinite(parameter).all(), (method, name)
        with torch.no_grad():
            assert torch.isfinite(compressed(input_values=inputs).logits).all(), method
