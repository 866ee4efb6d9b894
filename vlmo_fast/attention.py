"""The shared multi-head self-attention of a MoME block (one for all modalities).

Numerics follow the reference: qkv is one Linear without bias plus the bias
cat(q_bias, 0, v_bias); q is scaled by head_dim**-0.5; logits and softmax in fp32; an
optional additive bias (the relative position bias, [heads, L, L] or [B, heads, L, L]) and
a key padding mask (True = padded key, ignored) are applied to the logits.

The attention core goes through `vlmo_fast.backends.resolve("attention", ...)`; the
materialised fp32 "reference" is always available.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backends


def attention_reference(q: Tensor, k: Tensor, v: Tensor, attn_bias: Optional[Tensor] = None,
                        key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """q, k, v: [B, H, L, Dh], q already scaled. Returns [B, H, L, Dh] in q's dtype."""
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 logits (fp64 stays fp64 for gradcheck)
    logits = q.to(acc) @ k.to(acc).transpose(-2, -1)
    if attn_bias is not None:
        logits = logits + attn_bias.to(acc)
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    probs = logits.softmax(dim=-1).to(v.dtype)
    return probs @ v


backends.register("attention", "reference", preference={"default": ["reference"]})
_IMPLS = {"reference": attention_reference}


def register_attention_impl(name: str, fn, available=backends._always, preference=None) -> None:
    """Plug an attention core with attention_reference's signature into the dispatch."""
    _IMPLS[name] = fn
    backends.register("attention", name, available, preference)


def check_attention_inputs(x: Tensor, num_heads: int, attn_bias: Optional[Tensor],
                           key_padding_mask: Optional[Tensor]) -> None:
    b, length, _ = x.shape
    if key_padding_mask is not None:
        if key_padding_mask.shape != (b, length):
            raise ValueError(f"key_padding_mask must have shape [batch, length] = {(b, length)}, "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (True marks padded keys), "
                            f"got {key_padding_mask.dtype}")
        if key_padding_mask.device != x.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, x on {x.device}")
    if attn_bias is not None:
        ok = attn_bias.shape in ((num_heads, length, length), (b, num_heads, length, length),
                                 (1, num_heads, length, length))
        if not ok:
            raise ValueError(f"attn_bias must have shape [heads, L, L] = {(num_heads, length, length)} "
                             f"or [batch, heads, L, L], got {tuple(attn_bias.shape)}")
        if attn_bias.device != x.device:
            raise ValueError(f"attn_bias is on {attn_bias.device}, x on {x.device}")


class MultiHeadSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: Optional[str] = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.register_parameter("q_bias", None)
            self.register_parameter("v_bias", None)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_bias: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None) -> Tensor:
        b, length, _ = x.shape
        check_attention_inputs(x, self.num_heads, attn_bias, key_padding_mask)
        bias = None
        if self.q_bias is not None:
            # k has no bias: the zeros are a constant, not a parameter.
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).view(b, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                  # each [B, H, L, Dh]
        q = q * self.scale
        name = backends.resolve("attention", self.backend, x.device)
        out = _IMPLS[name](q, k, v, attn_bias, key_padding_mask)
        return self.proj(out.transpose(1, 2).reshape(b, length, self.dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, backend={self.backend or 'auto'}"
