"""AdamW parameter groups (what is decayed) and the warmup + decay learning-rate schedule."""
from __future__ import annotations

import math
from typing import Dict, List

import torch
from torch import nn

# never decayed (besides every 0-/1-d tensor: biases, norms, layer scales, logit scales)
NO_DECAY_SUFFIXES = ("cls_token", "pos_embed", "relative_position_bias_table", "logit_scale",
                     "norm_weight", "norm_bias", "fc1_bias", "fc2_bias", "mask_token", "gamma_1", "gamma_2")
SCHEDULES = ("cosine", "linear", "constant")


def param_groups(module: nn.Module, weight_decay: float) -> List[Dict]:
    """Two AdamW groups of the TRAINABLE parameters only: decayed weights and the rest
    (biases, norms, layer scales, the bias table, CLS/positions, logit scales, mask token)."""
    decay, no_decay = [], []
    model_no_decay = set()
    inner = getattr(module, "model", None)
    if inner is not None and hasattr(inner, "no_weight_decay"):
        model_no_decay = {"model." + n for n in inner.no_weight_decay()}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() <= 1 or name in model_no_decay or name.endswith(NO_DECAY_SUFFIXES):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    if not groups:
        raise ValueError("no trainable parameters: every parameter has requires_grad=False")
    return groups


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
