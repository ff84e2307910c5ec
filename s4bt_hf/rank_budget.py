"""Model-wide rank budgets: split a total number of modes between the layers so that the
discarded Hankel energy of the whole model is smallest.

Layer l at rank r (complex modes per channel, 2r real states) discards
    E_l(r) = Σ_channels Σ_{i > 2r} σ_i,
and one more mode keeps g_l(r) = E_l(r-1) - E_l(r) = Σ_channels (σ_{2r-1} + σ_{2r}) more. The σ
are sorted, so g_l is non-increasing in r: the problem  min Σ_l E_l(r_l)  s.t.  Σ_l r_l <= K,
1 <= r_l <= N_l  is separable and convex, and giving each next mode to the layer with the
largest g_l (greedy) is optimal. Every layer has the same number of channels, so a mode costs
the same everywhere. (Real poles can make a reduction keep fewer than 2r states; the allocation
uses the 2r that the rank allows.)

This file is copied into saved checkpoints (remote code): it imports only torch.
"""

from __future__ import annotations

import torch


def rank_gains(sigma: torch.Tensor) -> torch.Tensor:
    """g(r) for r = 1 .. N from the Hankel singular values (channels, 2N) of one layer: (N,)."""
    per_state = sigma.sum(0)
    return per_state.reshape(-1, 2).sum(-1)


def discarded_energy(sigma: torch.Tensor, rank: int) -> float:
    """E(r) = Σ_channels Σ_{i > 2r} σ_i of one layer."""
    return float(sigma[:, 2 * rank:].sum())


def allocate_ranks(gains: list[torch.Tensor], total: int) -> list[int]:
    """Ranks r_l (>= 1, <= len(gains[l])) with Σ r_l <= `total` minimising Σ_l E_l(r_l) (greedy,
    optimal for non-increasing gains; ties go to the earlier layer)."""
    limits = [len(gain) for gain in gains]
    if total < len(gains) or total > sum(limits):
        raise ValueError(f"a budget of {total} modes per channel cannot give every one of {len(gains)} layers "
                         f"between 1 and its {limits} modes.")
    ranks = [1] * len(gains)
    for _ in range(total - len(gains)):
        best, best_gain = None, None
        for layer, gain in enumerate(gains):
            if ranks[layer] < limits[layer] and (best is None or float(gain[ranks[layer]]) > best_gain):
                best, best_gain = layer, float(gain[ranks[layer]])
        ranks[best] += 1
    return ranks


def modes_for_budget(budget, *, d_model: int, original_states: list[int], output_rows: int,
                     ssm_parameters: int) -> int:
    """Σ_l r_l (modes per channel, summed over layers) a budget allows.

    `budget` is an int, the total number of complex modes of the model (Σ_l d_model · r_l), or a
    float in (0, 1], a fraction of the SSM parameters (each mode of each channel costs
    4 + 2·output_rows real parameters: mode, input vector, output vectors; Δ and D stay)."""
    layers = len(original_states)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"`budget` must be an int (total complex modes) or a float in (0, 1] (fraction of the SSM "
                        f"parameters), got {budget!r}.")
    if isinstance(budget, int):
        total = budget // d_model
        smallest, largest = layers * d_model, sum(original_states) * d_model
        if not smallest <= budget <= largest:
            raise ValueError(f"`budget`={budget} modes must lie between one mode per channel per layer "
                             f"({layers} layers x {d_model} channels = {smallest}) and the model's {largest}.")
        return total
    if not 0 < budget <= 1:
        raise ValueError(f"a float `budget` is the fraction of SSM parameters to keep, in (0, 1]; got {budget!r}.")
    fixed = 2 * d_model * layers  # Δ and D of every channel
    per_mode = d_model * (4 + 2 * output_rows)
    total = int((budget * ssm_parameters - fixed) // per_mode)
    if total < layers:
        raise ValueError(f"`budget`={budget} of the SSM parameters ({budget * ssm_parameters:.0f} of "
                         f"{ssm_parameters}) is less than one mode per channel per layer needs "
                         f"({fixed + per_mode * layers}).")
    return min(total, sum(original_states))
