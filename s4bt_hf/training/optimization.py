"""Optimizer parameter groups of the S4 recipe, usable with any torch optimizer, Accelerate or
the transformers `Trainer`."""

from __future__ import annotations

import math

from torch import nn

from ..modeling_s4dss import SSM_DYNAMICS_PARAMETER_NAMES


def ssm_param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """Split `model`'s trainable parameters into three optimizer groups, each parameter in
    exactly one:

    1. everything else: `lr`, `weight_decay` (first, so loggers that read group 0 show the main lr);
    2. norm parameters and biases: `lr`, no weight decay;
    3. SSM dynamics (`log_dt`, `log_A_real`, `A_imag`, `B` of every DSS kernel): `config.ssm_lr`,
       `config.ssm_weight_decay`.

    Grouping is by parameter name and module, never by attributes on Parameter objects (those are
    lost by `from_pretrained` and `.to()`). Empty groups are dropped.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "ssm_lr"):
        raise TypeError("ssm_param_groups needs an S4-DSS model (a module whose `config` has `ssm_lr`).")
    for name, value in (("lr", lr), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"ssm_param_groups: `{name}` must be a number, got {value!r}.")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"ssm_param_groups: `{name}` must be finite and >= 0, got {value}.")
    ssm, no_decay, decay = [], [], []
    for module in model.modules():
        # class names, not isinstance: a model loaded with trust_remote_code has its own copies
        # of these classes
        module_kind = type(module).__name__
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if module_kind == "S4DSSKernel" and param_name in SSM_DYNAMICS_PARAMETER_NAMES:
                ssm.append(param)
            elif isinstance(module, (nn.LayerNorm, nn.modules.batchnorm._NormBase)) or param_name == "bias":
                no_decay.append(param)
            else:
                decay.append(param)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "no_decay"},
        {"params": ssm, "lr": config.ssm_lr, "weight_decay": config.ssm_weight_decay, "name": "ssm"},
    ]
    return [group for group in groups if group["params"]]
