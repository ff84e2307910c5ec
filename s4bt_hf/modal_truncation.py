"""Modal truncation of banks of diagonal systems: keep, per system, the modes that matter most,
unchanged; no balancing, no eigendecomposition.

Score of mode n (its H∞ norm, the peak gain of Re Σ_rows w_n a_n^k over frequency, bounded by):

    discrete:    s_n = ‖w_n‖₂ / (1 - |a_n|)       (‖·‖₂ over the output rows)
    continuous:  s_n = ‖w_n‖₂ / |Re a_n|

Why H∞ and not H2: the dropped modes' scores add up to an a-priori bound on the error, as
balanced truncation's 2 Σ σ does — ‖G - G_r‖_∞ ≤ Σ_{dropped} s_n (triangle inequality) —, and a
mode close to the unit circle (a long memory the H2 score would undervalue) keeps a high score.

`match_dc=True` (modal singular perturbation) moves the dropped modes' gain for a constant input,
Re Σ_dropped w_n / (1 - a_n) (continuous: Re Σ -w_n / a_n), into the direct term, so that the
reduced layer keeps every channel's DC gain; the bound is then 2 Σ_{dropped} s_n.

Pure math: tensors in, tensors out. This file is copied into saved checkpoints (remote code).
"""

from __future__ import annotations

import torch

from .diagonal_system import DiagonalSystem, ReducedModes, modal_dc_gain
from .state_scores import state_hinf_norms


def modal_scores(system: DiagonalSystem) -> torch.Tensor:
    """H∞ score of every mode (..., N), see the module (`state_scores.state_hinf_norms`)."""
    return state_hinf_norms(system)


def modal_truncation(system: DiagonalSystem, rank: int, *, match_dc: bool = False, pad_mode: complex = 0.0,
                     workers: int | None = None) -> ReducedModes:
    """Keep the `rank` modes with the largest H∞ score per system (see the module). `workers` is
    accepted for a uniform signature; the method is cheap enough to run in one pass.
    Details: `scores` (..., N), `error_bound` (Σ dropped scores, doubled with `match_dc`)."""
    del workers
    system = system.to_complex128()
    scores = modal_scores(system)
    reduced = keep_modes(system, scores, rank, match_dc=match_dc, pad_mode=pad_mode)
    dropped_score = scores.scatter(-1, reduced.details.pop("kept"), 0.0).sum(-1)
    reduced.details["error_bound"] = dropped_score * (2.0 if match_dc else 1.0)
    return reduced


def keep_modes(system: DiagonalSystem, scores: torch.Tensor, rank: int, *, match_dc: bool = False,
               pad_mode: complex = 0.0) -> ReducedModes:
    """The `rank` modes of largest `scores` (..., N) of every system of `system` (complex128), with
    their modes and residues exactly as they are (ties: the earlier mode). `match_dc` puts the
    dropped modes' DC gain into the direct term. Details: `scores`, `kept` (..., rank) indices."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    kept, dropped = order[..., :rank], order[..., rank:]
    residues = system.residues()
    modes = system.modes.gather(-1, kept)
    kept_residues = residues.gather(-1, kept.unsqueeze(-2).expand(*residues.shape[:-1], kept.shape[-1]))
    # nothing held by a mode of zero residue (a zero channel): mark it as padding
    padding = kept_residues.abs().sum(-2) == 0
    modes = torch.where(padding, torch.full_like(modes, pad_mode), modes)
    feedthrough = residues.real.new_zeros(residues.shape[:-1])
    if match_dc:
        gains = modal_dc_gain(system.modes, residues, system.time)
        feedthrough = gains.gather(-1, dropped.unsqueeze(-2).expand(*gains.shape[:-1], dropped.shape[-1])).sum(-1)
    return ReducedModes(modes=modes, residues=kept_residues, padding=padding, feedthrough=feedthrough,
                        details={"scores": scores, "kept": kept})
