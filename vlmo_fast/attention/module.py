"""`MultiHeadSelfAttention`: the shared attention of a MoME block (one for all modalities)."""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backends
from ..env import autocast_dtype
from ..packing import PackedSequences
from .checks import check_attention_inputs, normalize_attn_bias
from .cores import AttnBias
from .policy import OP, choose_attention_backend


class MultiHeadSelfAttention(nn.Module):
    """qkv = one Linear without bias + cat(q_bias, 0, v_bias) (VLMo/BEiT); q scaled by
    head_dim**-0.5 before the core; the core is chosen per call (see `vlmo_fast.attention`).

    forward(x [B, L, dim], attn_bias=None, key_padding_mask=None, packing=None) -> [B, L, dim]
    Masks: key_padding_mask True = padded key; a bool attn_bias True = attend (SDPA's
    convention), a float attn_bias is added to the logits. A query whose keys are all
    blocked gets a zero attention output (so a fully padded row stays finite).
    Under autocast the projections run in the autocast dtype (as nn.Linear) and the core in
    that dtype with its own numerics (fp32 logits in the reference).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: Optional[str] = None,
                 device=None, dtype=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.backend = backend
        self.last_backend: Optional[str] = None   # the core that ran last (shown in repr)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False, **factory)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim, **factory))
            self.v_bias = nn.Parameter(torch.zeros(dim, **factory))
        else:
            self.register_parameter("q_bias", None)
            self.register_parameter("v_bias", None)
        self.proj = nn.Linear(dim, dim, **factory)

    def reset_parameters(self, std: Optional[float] = None) -> None:
        """Linear weights: truncated normal with `std`, or nn.Linear's default init when
        None; every bias zero (q_bias, v_bias, proj.bias)."""
        for linear in (self.qkv, self.proj):
            if std is None:
                linear.reset_parameters()
            else:
                nn.init.trunc_normal_(linear.weight, std=std)
        nn.init.zeros_(self.proj.bias)
        if self.q_bias is not None:
            nn.init.zeros_(self.q_bias)
            nn.init.zeros_(self.v_bias)

    def forward(self, x: Tensor, attn_bias: AttnBias = None,
                key_padding_mask: Optional[Tensor] = None,
                packing: Optional[PackedSequences] = None) -> Tensor:
        attn_bias = normalize_attn_bias(attn_bias, x, self.num_heads)
        check_attention_inputs(x, self.num_heads, attn_bias, key_padding_mask, packing)
        q, k, v = self.project_qkv(x)
        return self.proj(self.attend(q, k, v, attn_bias, key_padding_mask, packing))

    def project_qkv(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """q (already scaled by head_dim**-0.5), k, v, each [B, H, L, Dh], of x [B, L, dim]."""
        b, length, _ = x.shape
        bias = None
        if self.q_bias is not None:
            # k has no bias: the zeros are a constant, not a parameter.
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).view(b, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                  # each [B, H, L, Dh]
        return q * self.scale, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, attn_bias: AttnBias,
               key_padding_mask: Optional[Tensor], packing: Optional[PackedSequences]) -> Tensor:
        """The attention core chosen for this input over q/k/v [B, H, L, Dh] (a bias already
        normalised and checked, as `forward` does) -> [B, L, dim], heads merged, before the
        output projection."""
        b, _, length, _ = q.shape
        name = choose_attention_backend(self.backend, q, attn_bias, packing)
        if not torch.compiler.is_compiling():
            self.last_backend = name
        core = backends.implementation(OP, name)   # every core in the native convention
        device_type = q.device.type
        with torch.autocast(device_type, enabled=False) if autocast_dtype(q) is not None \
                else contextlib.nullcontext():
            # the core keeps its own numerics on the autocast-dtype q/k/v
            out = core(q, k, v, attn_bias, key_padding_mask, packing)
        return out.transpose(1, 2).reshape(b, length, self.dim)

    def extra_repr(self) -> str:
        ran = f", last ran: {self.last_backend}" if self.last_backend else ""
        return f"dim={self.dim}, num_heads={self.num_heads}, backend={self.backend or 'auto'}{ran}"


def per_modality_attention(vision: MultiHeadSelfAttention, language: MultiHeadSelfAttention, x: Tensor,
                           is_text: Tensor, attn_bias: AttnBias = None,
                           key_padding_mask: Optional[Tensor] = None,
                           packing: Optional[PackedSequences] = None) -> Tensor:
    """Self-attention with one set of weights per modality (VLMo's Table 7 ablation): each
    token's q, k, v and output projection use `language`'s weights where `is_text` [B, L]
    is True and `vision`'s elsewhere; every token then attends to every (unmasked) token of
    its sequence, whatever its modality, in ONE core call (`vision`'s backend choice).

    Both projections run on every token and a select keeps the token's own (no host sync,
    packing and torch.compile work as in the shared attention); the other modality's copy
    gets an exactly zero gradient from that token. The price is twice the projection FLOPs:
    this is an ablation, not a fast path."""
    if language.num_heads != vision.num_heads or language.dim != vision.dim:
        raise ValueError(f"per-modality attention needs two attentions of one size: vision dim "
                         f"{vision.dim} x {vision.num_heads} heads, language dim {language.dim} x "
                         f"{language.num_heads} heads")
    if not isinstance(is_text, Tensor) or is_text.dtype != torch.bool \
            or tuple(is_text.shape) != tuple(x.shape[:2]):
        got = f"{is_text.dtype} {tuple(is_text.shape)}" if isinstance(is_text, Tensor) else type(is_text).__name__
        raise ValueError(f"is_text must be a bool tensor of shape [batch, length] = {tuple(x.shape[:2])}, "
                         f"got {got}")
    attn_bias = normalize_attn_bias(attn_bias, x, vision.num_heads)
    check_attention_inputs(x, vision.num_heads, attn_bias, key_padding_mask, packing)
    text_heads = is_text[:, None, :, None]                          # [B, 1, L, 1] over [B, H, L, Dh]
    q, k, v = (torch.where(text_heads, t, v_) for v_, t in zip(vision.project_qkv(x), language.project_qkv(x)))
    out = vision.attend(q, k, v, attn_bias, key_padding_mask, packing)
    return torch.where(is_text[..., None], language.proj(out), vision.proj(out))
