"""Per-state importance scores of banks of diagonal systems, and the layer normalisation the
state-pruning papers put on them before one global threshold (LAST: Gwak et al., NeurIPS 2024,
arXiv 2411.02824; AIRE-Prune: Padhy et al., ICLR 2026, arXiv 2602.00534).

State n of a channel is the complex first-order subsystem with residues w_n = C_n b_n (p output rows):

    discrete:    G_n(z) = w_n / (1 - a_n z⁻¹)      impulse response w_n a_n^k,   k >= 0
    continuous:  G_n(s) = w_n / (s - a_n)          impulse response w_n e^{a_n t}, t >= 0

(the layer's real kernel is the real part of their sum, as in `diagonal_system.py`).

Scores (each the paper's, for our single-input channels: ‖C_i‖‖B_i‖ = ‖w_i‖₂):
    H∞ norm (LAST): |1 - a e^{-iω}| is smallest, 1 - |a|, at e^{iω} = a/|a|, so
        ‖G_n‖_∞ = ‖w_n‖₂ / (1 - |a_n|)           continuous: ‖w_n‖₂ / |Re a_n|  (at ω = Im a_n)
    H2 energy (AIRE-Prune): Σ_k ‖w_n‖₂² |a_n|^{2k}, so
        ‖G_n‖₂² = ‖w_n‖₂² / (1 - |a_n|²)          continuous: ‖w_n‖₂² / (-2 Re a_n)

A layer holds one state size for all its channels, so a state that can be pruned is a *slot*:
the r-th best mode of every channel (each channel ordered by its own score). The layer is the
block-diagonal system of its channels, and the slot's subsystem is block-diagonal too, so
    its H∞ norm is max_channels ‖G_{h,(r)}‖_∞,   its H2 energy Σ_channels ‖G_{h,(r)}‖₂².
Both are non-increasing in r.

Layer normalisation (LAMP-like, both papers): with a layer's slot scores s_1 >= s_2 >= ... the slot
at position r scores
    ŝ_r = s_r / Σ_{j <= r} s_j,
its share of the energy of the layer truncated just after it. ŝ_1 = 1 and ŝ is non-increasing,
so one global threshold keeps a prefix of every layer (a rank). LAST normalises the squared
H∞ norms (s = ‖G‖_∞², as in the authors' code); AIRE-Prune the energies. The AIRE-Prune paper
says its scores are "normalised layer-wise"; the exact form was not available to us, and the
LAST form above (a prefix sum over the layer's sorted scores) is used for it as well.

Pure math: tensors in, tensors out. This file is copied into saved checkpoints (remote code).
"""

from __future__ import annotations

import torch

from .diagonal_system import DISCRETE, DiagonalSystem


def state_hinf_norms(system: DiagonalSystem) -> torch.Tensor:
    """‖G_n‖_∞ of every state (..., N): ‖w_n‖₂ / (1 - |a_n|) (discrete), ‖w_n‖₂ / |Re a_n| (continuous)."""
    weight = system.residues().abs().square().sum(-2).sqrt()
    damping = (1.0 - system.modes.abs()) if system.time == DISCRETE else -system.modes.real
    return weight / damping


def state_h2_energies(system: DiagonalSystem) -> torch.Tensor:
    """‖G_n‖₂² of every state (..., N): ‖w_n‖₂² / (1 - |a_n|²) (discrete), ‖w_n‖₂² / (-2 Re a_n) (continuous)."""
    energy = system.residues().abs().square().sum(-2)
    damping = (1.0 - system.modes.abs().square()) if system.time == DISCRETE else -2.0 * system.modes.real
    return energy / damping


def slot_scores(scores: torch.Tensor, combine: str) -> torch.Tensor:
    """Scores (N,) of a layer's slots from its channels' state scores (H, N): each channel sorted
    descending, then slot r = max over channels (`combine="max"`, an H∞ norm) or the sum
    (`combine="sum"`, an H2 energy) of the channels' r-th scores."""
    ordered = scores.sort(dim=-1, descending=True).values
    if combine == "max":
        return ordered.max(0).values
    if combine == "sum":
        return ordered.sum(0)
    raise ValueError(f"`combine` must be 'max' or 'sum', got {combine!r}.")


def prefix_normalized(scores: torch.Tensor) -> torch.Tensor:
    """ŝ_r = s_r / Σ_{j <= r} s_j along the last axis of non-negative, descending `scores`; 0 where
    the prefix sum is 0 (a layer whose states all hold nothing)."""
    prefix = scores.cumsum(-1)
    return torch.where(prefix > 0, scores / torch.where(prefix > 0, prefix, torch.ones_like(prefix)),
                       torch.zeros_like(scores))
