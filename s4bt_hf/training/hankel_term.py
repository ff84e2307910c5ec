"""The Hankel penalty's term in the training loss, shared by the Accelerate loop and
`S4DSSTrainer`: on which optimizer steps `hankel_penalty` is evaluated and with what weight.

    every = 1                every step:            λ · Σσ(θ)
    every = k, reuse off     one step in k:         k·λ · Σσ(θ)       (nothing on the others)
    every = k, reuse on      one step in k:         λ · Σσ(θ), and its gradient g = ∇Σσ(θ) is kept;
                             on the k−1 steps after it, a surrogate of value λ · Σσ(θ₀) and
                             gradient λ · g (θ₀: the parameters at the last evaluation)

Why reuse: `every=k` alone regularises markedly less than `every=1` at the same λ (measured:
docs/compression-aware-training.md), most likely because Adam divides a gradient that appears
on one step in k with k times the weight by a second-moment estimate that those spikes inflate.
Reusing the last gradient keeps the penalty's push on every step at 1/k of the cost; the
parameters move little in k steps, so the stale gradient is close to the exact one (the same
Hankel spectra as `every=1` in our runs). The cost between evaluations is one dot product per
SSM tensor.
"""

from __future__ import annotations

import torch

from .hankel_penalty import dss_kernels, hankel_penalty

# the parameters Σσ depends on, per DSS kernel
PENALISED_PARAMETERS = ("log_dt", "log_A_real", "A_imag", "B", "C")


class HankelTerm:
    """`loss_term(model, step)` gives the term to add to the loss at optimizer step `step`
    (0-based: the steps completed before it). With `reuse`, keeps the last evaluation (value and
    gradient); `state_dict`/`load_state_dict` carry it through checkpoints, so a resumed run
    applies the same surrogate as an uninterrupted one; `clear()` drops it (after a reduction the
    parameters have other shapes: the next step evaluates afresh)."""

    def __init__(self, weight: float, every: int = 1, reuse: bool = False):
        self.weight, self.every, self.reuse = float(weight), int(every), bool(reuse)
        self.value: float | None = None
        self.gradients: list[torch.Tensor] | None = None
        self._owners: list[int] | None = None  # ids of the parameters the gradients belong to (this process)

    @property
    def active(self) -> bool:
        return self.weight > 0

    def loss_term(self, model, step: int) -> tuple[torch.Tensor | None, float | None]:
        """(weighted term or None when nothing is due, Σσ if it was evaluated at this step else None)."""
        if not self.active:
            return None, None
        due = step % self.every == 0
        parameters = penalised_parameters(model) if self.reuse else []
        if not parameters:  # no reuse (or nothing trainable for a gradient to reach): the plain rule
            if not due:
                return None, None
            penalty = hankel_penalty(model)
            return (self.weight * self.every) * penalty, penalty.item()
        fresh = None
        if due or not self._fits(parameters):
            penalty = hankel_penalty(model)
            gradients = torch.autograd.grad(penalty, parameters, allow_unused=True)
            self.gradients = [torch.zeros_like(parameter) if gradient is None else gradient.detach()
                              for parameter, gradient in zip(parameters, gradients, strict=True)]
            self._owners = [id(parameter) for parameter in parameters]
            self.value = fresh = penalty.item()
        return self.weight * self._surrogate(parameters), fresh

    def _surrogate(self, parameters) -> torch.Tensor:
        """Value Σσ(θ₀), gradient g: Σσ(θ₀) + ⟨g, θ⟩ − ⟨g, θ⟩ (the last two: one with, one without
        autograd). At an evaluation step θ = θ₀ and this is the penalty's own first-order term."""
        linear = sum((parameter * gradient.to(device=parameter.device, dtype=parameter.dtype)).sum()
                     for parameter, gradient in zip(parameters, self.gradients, strict=True))
        return linear - linear.detach() + self.value

    def _fits(self, parameters) -> bool:
        """Whether the kept gradient belongs to these parameters: same shapes, and the same tensors
        when known (a reduction replaces them; a gradient loaded from a checkpoint is matched by shape)."""
        if self.gradients is None or len(self.gradients) != len(parameters):
            return False
        if self._owners is not None and self._owners != [id(parameter) for parameter in parameters]:
            return False
        return all(gradient.shape == parameter.shape
                   for gradient, parameter in zip(self.gradients, parameters, strict=True))

    def clear(self) -> None:
        self.value, self.gradients, self._owners = None, None, None

    def state_dict(self) -> dict:
        return {"value": self.value, "gradients": self.gradients}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.gradients, self._owners = state["value"], state["gradients"], None


def penalised_parameters(model) -> list[torch.Tensor]:
    """The trainable parameters Σσ depends on, in a fixed order (layer by layer)."""
    return [getattr(kernel, name) for kernel in dss_kernels(model) for name in PENALISED_PARAMETERS
            if getattr(kernel, name).requires_grad]
