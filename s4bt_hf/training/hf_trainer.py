"""The transformers `Trainer` with the S4 optimizer parameter groups.

`S4DSSTrainer` is a `transformers.Trainer` whose optimizer has the three groups of
`ssm_param_groups`: the main weights (`args.learning_rate`, `args.weight_decay`), norms and biases
(`args.learning_rate`, no weight decay) and the SSM dynamics (`config.ssm_lr`,
`config.ssm_weight_decay`). Everything else (optimizer class from `args.optim` with its betas,
epsilon, fused settings and `optim_args`, the scheduler, which scales each group from its own
initial lr, checkpoints and resume, evaluation) is the stock Trainer's.

Gradient accumulation is correct because the model sets `accepts_loss_kwargs = False`: its loss
is a per-batch mean, so the Trainer divides it by `gradient_accumulation_steps` itself.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_optimizer import is_optimizer_factory
from transformers.trainer_utils import unwrap_peft_model

from ..optimization import ssm_param_groups

# Optimizer kwargs with which `get_optimizer_cls_and_kwargs` says that the optimizer builds its own
# parameter groups (GaLore/Apollo: "params", LOMO: "model", layer-wise: "optimizer_dict").
_SELF_GROUPING_KWARGS = ("params", "model", "optimizer_dict")


def _is_s4dss_model(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    # class names, not isinstance: a model loaded with trust_remote_code has its own classes
    return hasattr(config, "ssm_lr") and any(type(m).__name__ == "S4DSSKernel" for m in model.modules())


class S4DSSTrainer(Trainer):
    """`transformers.Trainer` for S4-DSS models: the optimizer uses the S4 parameter groups.

    Use it exactly like `Trainer`. The optimizer class and its kwargs come from
    `TrainingArguments` (`optim`, `adam_beta1/2`, `adam_epsilon`, `optim_args`) or from the
    `optimizer_cls_and_kwargs` argument; only the parameter groups differ. The main group comes
    first, so the logged `learning_rate` is the main one. `optimizers=(optimizer, scheduler)`
    still takes precedence, as in `Trainer`.

    Raises `TypeError` if the model is not an S4-DSS model (e.g. a model with no DSS kernels).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.model is not None and self.optimizer is None:
            self._s4dss_model(self.model)  # fail now rather than when training starts

    def _s4dss_model(self, model: nn.Module) -> nn.Module:
        """The S4-DSS model inside `model` (which may be wrapped by accelerate, DDP, FSDP or PEFT)."""
        unwrapped = unwrap_peft_model(self.accelerator.unwrap_model(model))
        if not _is_s4dss_model(unwrapped):
            raise TypeError(
                f"S4DSSTrainer trains S4-DSS models (S4DSSForSequenceClassification, S4DSSModel), got "
                f"{type(unwrapped).__name__}: it has no DSS kernels or its config has no `ssm_lr`. "
                "Use transformers.Trainer for other models."
            )
        return unwrapped

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """Build `self.optimizer` over `ssm_param_groups(model, args.learning_rate, args.weight_decay)`,
        unless an optimizer was already given or built."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        groups = ssm_param_groups(self._s4dss_model(opt_model), self.args.learning_rate, self.args.weight_decay)

        # The optimizer must hold the parameters the (possibly wrapped) model trains: true unless a
        # wrapper replaced them (e.g. FSDP1 with flat parameters, use_orig_params=False).
        grouped = {id(param) for group in groups for param in group["params"]}
        trainable = {id(param) for param in opt_model.parameters() if param.requires_grad}
        if grouped != trainable:
            raise RuntimeError(
                "S4DSSTrainer: the wrapped model's trainable parameters are not those of the model inside it "
                f"({len(trainable)} trainable, {len(grouped)} grouped); with FSDP use `use_orig_params=True` "
                "or FSDP2."
            )

        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs = dict(optimizer_kwargs)  # never mutate the caller's dict
        optimizer_kwargs.pop("lr", None)  # each group has its own
        if is_optimizer_factory(optimizer_cls) or any(key in optimizer_kwargs for key in _SELF_GROUPING_KWARGS):
            raise ValueError(
                f"S4DSSTrainer: optim={self.args.optim!r} builds its own parameter groups and cannot take the "
                "S4 groups; choose a standard optimizer such as 'adamw_torch'."
            )
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer


__all__ = ["S4DSSTrainer"]
