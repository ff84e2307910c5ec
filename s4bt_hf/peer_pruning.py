"""The state-pruning criteria of the peers as reduction methods, for comparisons on the same originals:

    "last": LAST (Gwak et al., NeurIPS 2024, arXiv 2411.02824): per-state H∞ norm,
    "aire": AIRE-Prune (Padhy et al., ICLR 2026, arXiv 2602.00534): per-state H2 energy,

each normalised within its layer and cut by one global threshold (`state_scores.py` gives the
equations). Both prune modes: the kept modes keep their original parameters exactly, as in
`modal_truncation`, with no direct term and no retraining.

Two parts, as in the papers:
  - within a layer (`last_pruning`, `aire_pruning`: the method run on a bank of channels at a
    rank r): every channel keeps its r modes of highest score. The layer normalisation is
    monotone, so it does not change this order;
  - between layers (`last_rank_gains`, `aire_rank_gains`, used by `budget=`): the normalised
    scores ŝ_{l,r} of the layer's slots. Keeping every slot with ŝ >= τ (the papers' global
    threshold) keeps a prefix of every layer, as ŝ_{l,r} is non-increasing in r; the τ that
    keeps K slots in all keeps the K largest ŝ, which is what the greedy allocator of
    `rank_budget.allocate_ranks` picks from these gains (every layer keeps its first slot,
    ŝ = 1). `tol=` is not taken: neither paper defines a kept-energy tolerance.

Pure math: tensors in, tensors out. This file is copied into saved checkpoints (remote code).
"""

from __future__ import annotations

import torch

from .diagonal_system import DiagonalSystem, ReducedModes
from .modal_truncation import keep_modes
from .state_scores import prefix_normalized, slot_scores, state_h2_energies, state_hinf_norms


def last_pruning(system: DiagonalSystem, rank: int, *, pad_mode: complex = 0.0,
                 workers: int | None = None) -> ReducedModes:
    """Keep every channel's `rank` modes of largest H∞ norm ‖w‖₂ / (1 - |a|), unchanged (LAST).
    Details: `scores` (..., N) the H∞ norms, `error_bound` Σ over the dropped modes of their H∞
    norm (triangle inequality: it bounds ‖G - G_r‖_∞). `workers`: uniform signature, unused."""
    return _keep_best(system, rank, state_hinf_norms, "error_bound", pad_mode)


def aire_pruning(system: DiagonalSystem, rank: int, *, pad_mode: complex = 0.0,
                 workers: int | None = None) -> ReducedModes:
    """Keep every channel's `rank` modes of largest H2 energy ‖w‖₂² / (1 - |a|²), unchanged
    (AIRE-Prune). Details: `scores` (..., N) the energies, `dropped_energy` their sum over the
    dropped modes. `workers`: uniform signature, unused."""
    return _keep_best(system, rank, state_h2_energies, "dropped_energy", pad_mode)


def _keep_best(system: DiagonalSystem, rank: int, score, dropped_name: str, pad_mode: complex) -> ReducedModes:
    """Each channel's `rank` modes of largest `score(system)`, unchanged; `details[dropped_name]`
    is the sum of the dropped modes' scores."""
    system = system.to_complex128()
    scores = score(system)
    reduced = keep_modes(system, scores, rank, pad_mode=pad_mode)
    reduced.details[dropped_name] = scores.scatter(-1, reduced.details.pop("kept"), 0.0).sum(-1)
    return reduced


def last_rank_gains(system: DiagonalSystem) -> torch.Tensor:
    """LAST score ŝ_r (N,) of each slot of one layer (channels (H, N)): the slot's squared H∞
    norm max_h ‖G_{h,(r)}‖_∞², normalised by the prefix sum (`state_scores.prefix_normalized`)."""
    return prefix_normalized(slot_scores(state_hinf_norms(system.to_complex128()), "max").square())


def aire_rank_gains(system: DiagonalSystem) -> torch.Tensor:
    """AIRE score ŝ_r (N,) of each slot of one layer (channels (H, N)): the slot's H2 energy
    Σ_h ‖G_{h,(r)}‖₂², normalised by the prefix sum (`state_scores.prefix_normalized`)."""
    return prefix_normalized(slot_scores(state_h2_energies(system.to_complex128()), "sum"))
