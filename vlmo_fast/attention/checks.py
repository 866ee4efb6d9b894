"""Input checks of the shared attention, and the one mask convention.

Mask convention (everywhere in vlmo_fast): `key_padding_mask` [B, L] bool, True = padded key
(ignored), as nn.MultiheadAttention's; a bool `attn_bias` follows SDPA's `attn_mask`:
True = attend, False = blocked (it becomes an additive 0 / -inf bias); a float `attn_bias`
is added to the logits. A dense bias may be [L, L], [heads, L, L], or [B or 1, heads or 1,
L, L]. Checks read shapes, dtypes and devices only (no host sync), so they run under
torch.compile too.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..embeddings import RelativeBias
from ..packing import PackedSequences
from .cores import AttnBias


def _shape(t) -> tuple:
    return tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__


def normalize_attn_bias(attn_bias: AttnBias, x: Tensor, num_heads: int) -> AttnBias:
    """A dense bias as float [heads, L, L] or [B, heads, L, L] (views where possible); a bool
    mask (True = attend) as an additive 0 / -inf float bias. Lazy biases pass unchanged."""
    if attn_bias is None or isinstance(attn_bias, RelativeBias):
        return attn_bias
    if not isinstance(attn_bias, Tensor):
        raise TypeError(f"attn_bias must be a Tensor or a RelativeBias, got {type(attn_bias).__name__}")
    b, length, _ = x.shape
    if attn_bias.dtype == torch.bool:
        acc = torch.promote_types(x.dtype, torch.float32)
        attn_bias = torch.zeros(attn_bias.shape, dtype=acc, device=attn_bias.device) \
            .masked_fill(~attn_bias, float("-inf"))
    elif not attn_bias.is_floating_point():
        raise TypeError("attn_bias must be a float tensor (added to the logits) or a bool mask "
                        f"(True = attend), got {attn_bias.dtype}")
    shape = tuple(attn_bias.shape)
    if shape == (length, length):
        return attn_bias.expand(num_heads, length, length)
    if shape == (num_heads, length, length):
        return attn_bias
    if len(shape) == 4 and shape[0] in (1, b) and shape[1] in (1, num_heads) and shape[2:] == (length, length):
        return attn_bias.expand(shape[0], num_heads, length, length)
    raise ValueError(f"attn_bias must have shape [L, L], [heads, L, L] = {(num_heads, length, length)} "
                     f"or [batch, heads, L, L] (batch and heads may be 1), got {shape}")


def check_attention_inputs(x: Tensor, num_heads: int, attn_bias: AttnBias,
                           key_padding_mask: Optional[Tensor],
                           packing: Optional[PackedSequences] = None) -> None:
    b, length, _ = x.shape
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.shape != (b, length):
            raise ValueError(f"key_padding_mask must have shape [batch, length] = {(b, length)}, "
                             f"got {_shape(key_padding_mask)}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (True marks padded keys), "
                            f"got {key_padding_mask.dtype}")
        if key_padding_mask.device != x.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, x on {x.device}")
    if packing is not None:
        if not isinstance(packing, PackedSequences):
            raise TypeError(f"packing must be a vlmo_fast.packing.PackedSequences, got "
                            f"{type(packing).__name__}")
        packing.check(x)
        if key_padding_mask is not None:
            raise ValueError("packed sequences carry no padding: drop padded tokens when packing "
                             "(key_padding_mask must be None with packing)")
    if isinstance(attn_bias, RelativeBias):
        if attn_bias.num_heads != num_heads:
            raise ValueError(f"the relative bias table has {attn_bias.num_heads} heads per layer, "
                             f"the attention has {num_heads}")
        if attn_bias.length != length or (attn_bias.is_text.dim() == 2 and attn_bias.is_text.shape[0] != b):
            raise ValueError(f"the relative bias layout covers {tuple(attn_bias.is_text.shape)} tokens, "
                             f"x has [batch, length] = {(b, length)}")
        if attn_bias.device != x.device or attn_bias.is_text.device != x.device:
            raise ValueError(f"the relative bias is on {attn_bias.device}, x on {x.device}")
    elif attn_bias is not None:
        if not isinstance(attn_bias, Tensor):
            raise TypeError(f"attn_bias must be a Tensor or a RelativeBias, got {type(attn_bias).__name__}")
        if attn_bias.device != x.device:
            raise ValueError(f"attn_bias is on {attn_bias.device}, x on {x.device}")
