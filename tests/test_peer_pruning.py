"""The peers' state-pruning criteria as reduction methods ("last": LAST's per-state H∞ norm,
"aire": AIRE-Prune's per-state H2 energy), against independent float64 oracles: each score from
a dense frequency grid or a long kernel sum, the layer normalisation by hand, the global
threshold's rank allocation by brute force over every rank combination, the kept modes' original
parameters bit for bit, and the methods through `model.reduce`, `ReductionSchedule` and
`s4bt compress`."""

import itertools
import json

import numpy as np
import pytest
import scipy.integrate
import torch
from test_balanced_truncation import random_continuous_systems, random_discrete_systems

import s4bt_hf
from s4bt_hf.diagonal_system import CONTINUOUS, DISCRETE, DiagonalSystem
from s4bt_hf.peer_pruning import aire_pruning, aire_rank_gains, last_pruning, last_rank_gains
from s4bt_hf.reduction_methods import check_method_options
from s4bt_hf.state_scores import prefix_normalized, slot_scores, state_h2_energies, state_hinf_norms
from s4bt_hf.training import ReductionSchedule
from s4bt_hf.training.reduction_schedule import reduce_during_training


def bank(time, outputs, seed=0, count=4, num_modes=6):
    if time == DISCRETE:
        modes, input_vec, output_vec = random_discrete_systems(count, num_modes, outputs=outputs, max_radius=0.9,
                                                               seed=seed)
    else:
        modes, input_vec, output_vec = random_continuous_systems(count, num_modes, outputs, seed=seed, min_decay=0.2,
                                                                 frequency_scale=3)
    return DiagonalSystem(modes, input_vec, output_vec, time)


# ----------------------------------------------------------------------------- the scores


@pytest.mark.parametrize("outputs", [1, 2])
def test_hinf_norm_is_the_peak_of_each_state_on_a_dense_frequency_grid(outputs):
    """Discrete state: impulse response w a^k (k >= 0), so G(e^{iω}) = w / (1 - a e^{-iω}); its
    peak over ω of the row vector's 2-norm, on 2^20 points, is ‖w‖₂ / (1 - |a|)."""
    system = bank(DISCRETE, outputs, seed=1)
    omega = np.linspace(-np.pi, np.pi, 2 ** 20, endpoint=False)
    modes, residues = system.modes.numpy(), system.residues().numpy()
    ours = state_hinf_norms(system).numpy()
    for channel, mode in itertools.product(range(modes.shape[0]), range(modes.shape[1])):
        gain = np.abs(1.0 / (1.0 - modes[channel, mode] * np.exp(-1j * omega)))
        peak = np.linalg.norm(residues[channel, :, mode]) * gain.max()
        assert peak <= ours[channel, mode] * (1 + 1e-12)
        np.testing.assert_allclose(peak, ours[channel, mode], rtol=1e-6)


def test_hinf_norm_continuous_on_a_dense_frequency_grid():
    """Continuous state: G(iω) = w / (iω - a), peak ‖w‖₂ / |Re a| at ω = Im a."""
    system = bank(CONTINUOUS, 2, seed=2)
    modes, residues = system.modes.numpy(), system.residues().numpy()
    ours = state_hinf_norms(system).numpy()
    for channel, mode in itertools.product(range(modes.shape[0]), range(modes.shape[1])):
        pole = modes[channel, mode]
        omega = pole.imag + np.linspace(-5, 5, 2 ** 20) * abs(pole.real)
        peak = np.linalg.norm(residues[channel, :, mode]) * np.abs(1.0 / (1j * omega - pole)).max()
        np.testing.assert_allclose(peak, ours[channel, mode], rtol=1e-6)


@pytest.mark.parametrize("outputs", [1, 2])
def test_h2_energy_is_a_4000_step_kernel_sum(outputs):
    """Σ_k Σ_rows |w a^k|² over 4000 steps (|a| <= 0.9: the tail is below 1e-300)."""
    system = bank(DISCRETE, outputs, seed=3)
    modes, residues = system.modes.numpy(), system.residues().numpy()
    powers = modes[..., None] ** np.arange(4000)  # (H, N, K)
    samples = residues[..., None] * powers[:, None]  # (H, p, N, K)
    expected = (np.abs(samples) ** 2).sum((1, 3))
    np.testing.assert_allclose(state_h2_energies(system).numpy(), expected, rtol=1e-12)


def test_h2_energy_continuous_is_the_integral_of_the_impulse_response():
    system = bank(CONTINUOUS, 2, seed=4, count=2, num_modes=3)
    modes, residues = system.modes.numpy(), system.residues().numpy()
    ours = state_h2_energies(system).numpy()
    for channel, mode in itertools.product(range(2), range(3)):
        weight = np.linalg.norm(residues[channel, :, mode]) ** 2
        value, _ = scipy.integrate.quad(lambda t, a=modes[channel, mode], w=weight: w * abs(np.exp(a * t)) ** 2,
                                        0, np.inf, epsabs=1e-13, epsrel=1e-11)
        np.testing.assert_allclose(ours[channel, mode], value, rtol=1e-8)


def test_slot_scores_and_prefix_normalisation_by_hand():
    scores = torch.tensor([[3.0, 1.0, 2.0], [0.5, 4.0, 1.0]], dtype=torch.float64)
    # channel 0 sorted: 3 2 1, channel 1 sorted: 4 1 0.5
    assert slot_scores(scores, "max").tolist() == [4.0, 2.0, 1.0]
    assert slot_scores(scores, "sum").tolist() == [7.0, 3.0, 1.5]
    torch.testing.assert_close(prefix_normalized(torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)),
                               torch.tensor([1.0, 2.0 / 6.0, 1.0 / 7.0], dtype=torch.float64), rtol=0, atol=1e-16)
    torch.testing.assert_close(prefix_normalized(torch.tensor([7.0, 3.0, 1.5], dtype=torch.float64)),
                               torch.tensor([1.0, 0.3, 1.5 / 11.5], dtype=torch.float64), rtol=0, atol=1e-16)
    # a layer that holds nothing scores 0, not NaN
    assert prefix_normalized(torch.zeros(3, dtype=torch.float64)).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="combine"):
        slot_scores(scores, "mean")


def numpy_slot_gains(modes, residues, method):
    """The papers' layer-normalised slot scores, written independently in numpy: per channel the
    state scores sorted descending; slot r = max of squared H∞ norms (LAST) or sum of energies
    (AIRE) over channels; ŝ_r = s_r / Σ_{j<=r} s_j."""
    weight = (np.abs(residues) ** 2).sum(-2)
    if method == "last":
        per_state = weight / (1 - np.abs(modes)) ** 2
        slots = np.sort(per_state, -1)[:, ::-1].max(0)
    else:
        per_state = weight / (1 - np.abs(modes) ** 2)
        slots = np.sort(per_state, -1)[:, ::-1].sum(0)
    return slots / np.cumsum(slots)


@pytest.mark.parametrize("method, gains", [("last", last_rank_gains), ("aire", aire_rank_gains)])
def test_layer_gains_match_an_independent_computation(method, gains):
    system = bank(DISCRETE, 2, seed=5, count=5, num_modes=7)
    expected = numpy_slot_gains(system.modes.numpy(), system.residues().numpy(), method)
    ours = gains(system).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-12)
    assert ours[0] == 1.0 and np.all(np.diff(ours) <= 0)  # ŝ_1 = 1, non-increasing: a threshold keeps a prefix


# ----------------------------------------------------------------------------- one bank at a rank


@pytest.mark.parametrize("method, pruning, score", [("last", last_pruning, state_hinf_norms),
                                                    ("aire", aire_pruning, state_h2_energies)])
def test_each_channel_keeps_its_best_modes_unchanged(method, pruning, score):
    system = bank(DISCRETE, 2, seed=6, count=6, num_modes=6)
    scores = score(system).numpy()
    for rank in (1, 3, 6):
        reduced = pruning(system, rank)
        assert torch.equal(reduced.feedthrough, torch.zeros_like(reduced.feedthrough))
        for channel in range(6):
            best = np.argsort(-scores[channel], kind="stable")[:rank]
            torch.testing.assert_close(reduced.modes[channel], system.modes[channel, best], rtol=0, atol=0)
            torch.testing.assert_close(reduced.residues[channel], system.residues()[channel][:, best], rtol=0, atol=0)


def test_the_two_criteria_differ():
    """A slow mode of small residue against a fast one of larger residue: H∞ ‖w‖/(1-|a|) prefers
    the slow one, the H2 energy ‖w‖²/(1-|a|²) the fast one (so each test above can tell them apart)."""
    modes = torch.tensor([[0.99, 0.5]], dtype=torch.complex128)
    system = DiagonalSystem(modes, torch.tensor([[0.1, 1.0]], dtype=torch.complex128),
                            torch.ones(1, 1, 2, dtype=torch.complex128))
    # H∞: 0.1/0.01 = 10 > 1/0.5 = 2;  H2: 0.01/0.0199 ≈ 0.50 < 1/0.75 ≈ 1.33
    assert last_pruning(system, 1).modes.tolist() == [[0.99]]
    assert aire_pruning(system, 1).modes.tolist() == [[0.5]]


# ----------------------------------------------------------------------------- whole models


def tiny_model(d_model=3, n_layers=3, d_state=4, bidirectional=False, seed=0):
    torch.manual_seed(seed)
    config = s4bt_hf.S4DSSConfig(input_dim=2, num_labels=2, d_model=d_model, n_layers=n_layers, d_state=d_state,
                                 bidirectional=bidirectional)
    model = s4bt_hf.S4DSSForSequenceClassification(config).to(torch.float64)
    with torch.no_grad():  # spread the residues and decays so that no two scores tie
        for layer in model.s4dss.layers:
            layer.kernel.log_dt.uniform_(-2.0, -0.5)
            layer.kernel.B.normal_()
            layer.kernel.C.normal_()
    return model.eval()


def kernel_states(kernel):
    """(ā (H, N), w (H, p, N)) in numpy from the kernel's parameters, by ZOH: ā = exp(Δλ),
    B̄ = (ā - 1)/λ · B, w = C B̄ (written here, not taken from the package)."""
    with torch.no_grad():
        dt = np.exp(kernel.log_dt.numpy())[:, None]
        modes = -np.exp(kernel.log_A_real.numpy()) + 1j * kernel.A_imag.numpy()
        input_vec = kernel.B[..., 0].numpy() + 1j * kernel.B[..., 1].numpy()
        output_vec = kernel.C[..., 0].numpy() + 1j * kernel.C[..., 1].numpy()  # (p, H, N)
    discrete = np.exp(dt * modes)
    input_bar = (discrete - 1) / modes * input_vec
    return discrete, np.transpose(output_vec, (1, 0, 2)) * input_bar[:, None, :]


@pytest.mark.parametrize("method", ["last", "aire"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_global_threshold_allocation_against_brute_force(method, bidirectional):
    """For every budget: the ranks are the combination (Σ r_l = K, 1 <= r_l <= N) that keeps the
    largest total of normalised slot scores, found by trying all of them; and they are one global
    threshold: every kept slot scores at least every dropped one (the report's threshold between)."""
    model = tiny_model(bidirectional=bidirectional)
    gains = [numpy_slot_gains(*kernel_states(layer.kernel), method) for layer in model.s4dss.layers]
    sizes = [len(gain) for gain in gains]
    for total in range(len(sizes), sum(sizes) + 1):
        reduced = model.reduce(method, budget=total * 3)
        ranks = reduced.config.layer_d_states
        assert sum(ranks) == total and reduced.compression_report.budget["ranks"] == ranks
        best = max((combination for combination in itertools.product(*(range(1, n + 1) for n in sizes))
                    if sum(combination) == total),
                   key=lambda combination: sum(gain[:r].sum() for gain, r in zip(gains, combination, strict=True)))
        assert list(best) == ranks, (total, best, ranks)
        kept = np.concatenate([gain[:r] for gain, r in zip(gains, ranks, strict=True)])
        dropped = np.concatenate([gain[r:] for gain, r in zip(gains, ranks, strict=True)])
        threshold = reduced.compression_report.budget["threshold"]
        np.testing.assert_allclose(threshold, kept.min(), rtol=1e-12)
        assert dropped.size == 0 or kept.min() >= dropped.max()
        assert f"global score threshold {threshold:.4g}" in reduced.compression_report.summary_markdown()


def test_budget_allocations_of_the_two_criteria_and_balanced_truncation_differ():
    """Each method splits the budget by its own scores (a test that would catch the Hankel path)."""
    model = tiny_model(n_layers=3, d_state=6, seed=3)
    allocations = {method: tuple(model.reduce(method, budget=9 * 3).config.layer_d_states)
                   for method in ("last", "aire", "balanced_truncation")}
    assert len(set(allocations.values())) > 1, allocations


@pytest.mark.parametrize("method", ["last", "aire"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_rank_keeps_the_top_modes_and_their_parameters_bit_for_bit(method, bidirectional):
    model = tiny_model(d_model=4, n_layers=2, d_state=6, bidirectional=bidirectional, seed=1)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    reduced = model.reduce(method, rank=[2, 4])
    for name, tensor in model.state_dict().items():  # the original is untouched
        assert torch.equal(tensor, before[name]), name
    for rank, original, new in zip((2, 4), model.s4dss.layers, reduced.s4dss.layers, strict=True):
        modes, residues = kernel_states(original.kernel)
        weight = (np.abs(residues) ** 2).sum(-2)
        scores = (np.sqrt(weight) / (1 - np.abs(modes)) if method == "last" else weight / (1 - np.abs(modes) ** 2))
        for channel in range(4):
            best = np.argsort(-scores[channel], kind="stable")[:rank]
            for slot, index in enumerate(best):
                for name in ("log_A_real", "A_imag", "B"):
                    assert torch.equal(getattr(new.kernel, name)[channel, slot],
                                       getattr(original.kernel, name)[channel, index]), (name, channel, slot)
                assert torch.equal(new.kernel.C[:, channel, slot], original.kernel.C[:, channel, index])
        assert torch.equal(new.kernel.D, original.kernel.D) and torch.equal(new.kernel.log_dt, original.kernel.log_dt)
    report = reduced.compression_report
    assert report.method == method and report.budget is None
    assert torch.isfinite(reduced(input_values=torch.randn(2, 20, 2, dtype=torch.float64)).logits).all()


@pytest.mark.parametrize("method", ["last", "aire"])
def test_a_parameter_fraction_budget_is_hit(method):
    model = tiny_model(d_model=4, n_layers=3, d_state=8)
    for fraction in (0.3, 0.5, 0.8):
        report = model.reduce(method, budget=fraction).compression_report
        assert report.ssm_parameters_after <= fraction * report.ssm_parameters_before
        # one more mode per channel in any layer would exceed it: 4 channels x (4 + 2) parameters
        assert report.ssm_parameters_after + 4 * 6 > fraction * report.ssm_parameters_before


def test_bad_options_are_refused_with_one_clear_error():
    model = tiny_model()
    for method in ("last", "aire"):
        with pytest.raises(ValueError, match=f"method '{method}' takes `rank` or `budget`.*not `tol`"):
            model.reduce(method, tol=0.9)
        with pytest.raises(TypeError, match=f"method '{method}' does not take option.*match_dc"):
            model.reduce(method, rank=2, match_dc=True)
        with pytest.raises(ValueError, match="ReductionSchedule: method .*not `tol`"):
            ReductionSchedule(at=1, method=method, tol=0.9)
        with pytest.raises(ValueError, match="`rank` must be in"):
            model.reduce(method, rank=5)
        assert check_method_options(method, {}) == {}


@pytest.mark.parametrize("method", ["last", "aire"])
def test_reduction_schedule_reduces_in_place_like_model_reduce(method):
    model = tiny_model(d_state=4)
    reference = model.reduce(method, budget=7 * 3)
    schedule = ReductionSchedule(at=1, method=method, budget=7 * 3)
    reduce_during_training(model, schedule, step=1, total_steps=3)
    assert model.config.layer_d_states == reference.config.layer_d_states
    assert all(torch.equal(value, model.state_dict()[name]) for name, value in reference.state_dict().items())
    assert model.compression_report.method == method


def test_cli_compress_with_the_peer_methods(tmp_path, capsys):
    from s4bt_hf.cli import main

    tiny_model().save_pretrained(tmp_path / "model")
    for method, size in (("last", ["--rank", "2"]), ("aire", ["--budget", "21"])):
        output = tmp_path / method
        assert main(["compress", "--model", str(tmp_path / "model"), "--output", str(output), "--method", method,
                     *size]) == 0
        saved = json.loads((output / "config.json").read_text())
        report = json.loads((output / "compression_report.json").read_text())
        assert report["method"] == method
        assert saved["d_state"] == 2 if method == "last" else sum(saved["d_state"]) == 7
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "--model", str(tmp_path / "model"), "--output", str(tmp_path / "c"), "--method", "last",
              "--tol", "0.9"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(error.strip().splitlines()) == 1 and "not `tol`" in error
    assert not (tmp_path / "c").exists()
