"""Optimizer parameter groups that know the MoME expert bank's stacked tensors.

timm's `param_groups_weight_decay` skips weight decay for 1-D parameters and names listed by
the model's `no_weight_decay()`. The MoME expert norms and biases are stacked per expert
(2-D: [experts, dim]), so the `ndim <= 1` rule alone would decay them. This helper applies
timm's rule plus the `no_weight_decay()` names of EVERY submodule (so a `MoMEBlock` inside
any model is handled), and returns the same two groups timm does.

Experts that receive no token in a step get a zero gradient (a stacked tensor cannot hold
`None` for one expert). AdamW still updates them that step: its momentum keeps moving
them and decoupled weight decay shrinks the decayed ones (fc1/fc2 weights), exactly as for
an nn.Linear whose gradient was zeroed with `zero_grad(set_to_none=False)`. In VLMo every
expert sees tokens in every pretraining step (images, texts and pairs), so this only
matters for single-modality fine-tuning: freeze the unused experts there (e.g.
`requires_grad_(False)` on the whole bank and train a copy) or use a plain SGD.
"""
from __future__ import annotations

from typing import Dict, Iterable, List

from torch import nn


def no_weight_decay_names(model: nn.Module) -> set:
    """Full parameter names that `no_weight_decay()` of `model` or of any submodule lists."""
    names = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            names |= {f"{prefix}.{n}" if prefix else n for n in fn()}
    return names


def param_groups_weight_decay(model: nn.Module, weight_decay: float = 1e-5,
                              skip: Iterable[str] = ()) -> List[Dict]:
    """[{params: no-decay, weight_decay: 0}, {params: decay, weight_decay}] for AdamW.

    No decay (`is_decayed`): parameters with ndim <= 1, names ending in ".bias", names listed
    by any submodule's `no_weight_decay()`, and names in `skip` (full names, as timm's
    `no_weight_decay_list`). Frozen parameters (requires_grad False) are left out."""
    skip = set(skip) | no_weight_decay_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if is_decayed(name, param, skip) else no_decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": weight_decay}]


def is_decayed(name: str, param: nn.Parameter, no_decay: set) -> bool:
    """THE weight-decay rule (timm's): no decay for parameters with ndim <= 1, names ending in
    ".bias" and the names in `no_decay` (`no_weight_decay_names` of the model). Every optimizer
    grouping in vlmo_fast (pretraining, fine-tuning with layer-wise lr decay) asks this."""
    return not (param.ndim <= 1 or name.endswith(".bias") or name in no_decay)
