"""AdamW parameter groups (the one weight-decay rule of `vlmo_fast.optim`, layer-wise lr decay on
top of it) and the warmup + decay learning-rate schedule."""
from __future__ import annotations

import math
import re
from typing import Dict, List, Optional

import torch
from torch import nn

from ..optim import is_decayed, no_weight_decay_names

SCHEDULES = ("cosine", "linear", "constant")
# parameters of a VLMo that form layer 0 (below the first block), for layer-wise lr decay
EMBEDDING_PREFIXES = ("text_embeddings.", "token_type_embeddings.", "patch_embed.", "cls_token",
                      "pos_embed", "rel_pos_bias.")


def param_groups(module: nn.Module, weight_decay: float) -> List[Dict]:
    """AdamW groups of the TRAINABLE parameters: decayed weights and the rest, by the one
    weight-decay rule (`vlmo_fast.optim.is_decayed` over every submodule's `no_weight_decay()`)."""
    return layer_decay_param_groups(module, None, weight_decay)


def layer_id(name: str, depth: int) -> int:
    """Layer of a VLMo parameter name (relative to the VLMo): 0 embeddings, 1 + i for
    blocks.i, depth + 1 for everything above (final norm, pooler, heads)."""
    if name.startswith(EMBEDDING_PREFIXES):
        return 0
    m = re.match(r"blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    return depth + 1


def layer_decay_param_groups(step_module: nn.Module, lr: Optional[float], weight_decay: float, *,
                             head_lr_mult: float = 1.0, layer_decay: float = 1.0,
                             backbone_prefix: str = "model.") -> List[Dict]:
    """AdamW groups of the trainable parameters of a step module: the weight-decay rule, and
    (with `lr` given) a learning rate per group on top of it.

    lr None: two groups, "decay" and "no_decay", taking the optimizer's lr.
    lr given: the head (`step_module.head_parameter_names()`) gets lr * head_lr_mult; the VLMo
    at `backbone_prefix` gets BEiT's layer-wise decay, lr * layer_decay ** (depth + 1 - layer)
    (`layer_id`: embeddings 0, blocks 1..depth, final norm / pooler / heads depth + 1); each
    group records its "lr_scale"."""
    if lr is not None and (lr <= 0 or head_lr_mult <= 0 or not 0 < layer_decay <= 1):
        raise ValueError(f"need lr > 0, head_lr_mult > 0 and layer_decay in (0, 1], got {lr}, "
                         f"{head_lr_mult}, {layer_decay}")
    no_decay = no_weight_decay_names(step_module)
    depth = None
    if lr is not None:
        backbone = step_module.get_submodule(backbone_prefix.rstrip(".")) if backbone_prefix else step_module
        depth = backbone.config.depth
    heads = set(getattr(step_module, "head_parameter_names", lambda: [])())
    groups: Dict[tuple, Dict] = {}
    for name, p in step_module.named_parameters():
        if not p.requires_grad:
            continue
        decay = is_decayed(name, p, no_decay)
        suffix = "decay" if decay else "no_decay"
        if lr is None:
            key, extra = (suffix,), {"name": suffix}
        else:
            if name in heads:
                scale, layer = head_lr_mult, "head"
            elif name.startswith(backbone_prefix):
                layer = layer_id(name[len(backbone_prefix):], depth)
                scale = layer_decay ** (depth + 1 - layer)
            else:   # step-module parameters outside the VLMo (e.g. the MIM head): top layer
                scale, layer = 1.0, depth + 1
            key = (layer, decay)
            extra = {"lr": lr * scale, "lr_scale": scale,
                     "name": f"{'head' if layer == 'head' else f'layer{layer}'}_{suffix}"}
        group = groups.setdefault(key, {"params": [], "weight_decay": weight_decay if decay else 0.0, **extra})
        group["params"].append(p)
    if not groups:
        raise ValueError("no trainable parameters: every parameter has requires_grad=False")
    if lr is None:   # decayed weights first (the order checkpoints of earlier versions hold)
        return [groups[k] for k in (("decay",), ("no_decay",)) if k in groups]
    return list(groups.values())


def lr_lambda(total_steps: int, warmup_steps: int, schedule: str = "cosine", min_ratio: float = 0.0):
    """Multiplier of the peak lr at optimizer step s: linear warmup over warmup_steps, then
    cosine or linear decay to min_ratio at total_steps (the reference: warmup + linear)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if total_steps < 1 or warmup_steps < 0:
        raise ValueError(f"need total_steps >= 1 and warmup_steps >= 0, got {total_steps}, {warmup_steps}")

    def fn(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return fn


def build_optimizer(module: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.98), eps: float = 1e-8):
    """torch AdamW over the trainable parameters (VLMo's betas (0.9, 0.98), eps 1e-8)."""
    return torch.optim.AdamW(param_groups(module, weight_decay), lr=lr, betas=tuple(betas), eps=eps)
