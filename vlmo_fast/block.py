"""MoMEBlock: the drop-in Mixture-of-Modality-Experts transformer block.

    x = x + drop_path(gamma_1 * MSA(LN1(x)))          # one attention shared by all tokens
    x = x + drop_path(gamma_2 * FFN_e(LN2_e(x)))       # expert e = modality_ids per token

Routing is by the integer tensor `modality_ids` [B, L] (0 vision, 1 language, 2
vision-language): any interleaving and any text length work, there is no fixed split.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .attention import AttnBias, MultiHeadSelfAttention
from .mome import MoMEFeedForward
from .packing import PackedSequences


def drop_path_keep_scale(batch: int, drop_prob: float, device, dtype=torch.float32) -> Tensor:
    """Per-sample stochastic-depth scale: 0 (dropped) or 1/keep_prob, shape [batch]."""
    keep = 1.0 - drop_prob
    return torch.empty(batch, device=device, dtype=dtype).bernoulli_(keep).div_(keep)


class MoMEBlock(nn.Module):
    """Shared self-attention + per-modality expert FFNs, pre-LN.

    Args:
        dim: hidden size. num_heads: attention heads.
        num_experts: 2 (vision, language) or 3 (+ vision-language).
        mlp_ratio: expert hidden size = dim * mlp_ratio.
        layer_scale_init: initial value of gamma_1/gamma_2 (None: no layer scale).
        drop_path: stochastic-depth probability of this block.
        ffn_backend / attn_backend: None or "auto" for automatic choice, or a backend name
            (see `vlmo_fast.backend_report()`).

    forward(x [B, L, dim], modality_ids [B, L] int, key_padding_mask [B, L] bool (True = pad),
            attn_bias [heads, L, L] or [B, heads, L, L] or a lazy `RelativeBias`,
            packing `PackedSequences` for x [1, T, dim] holding several sequences back to
            back, each attending only to itself) -> [B, L, dim]
    Drop path draws one keep/drop per sample, or per packed sequence when packing is given.
    """

    def __init__(self, dim: int, num_heads: int, num_experts: int = 3, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, layer_scale_init: Optional[float] = 0.1,
                 drop_path: float = 0.0, eps: float = 1e-6, ffn_backend: Optional[str] = None,
                 attn_backend: Optional[str] = None):
        super().__init__()
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        self.dim, self.num_experts, self.drop_path = dim, num_experts, drop_path
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = MultiHeadSelfAttention(dim, num_heads, qkv_bias=qkv_bias, backend=attn_backend)
        self.mlp = MoMEFeedForward(dim, int(dim * mlp_ratio), num_experts, eps=eps, backend=ffn_backend)
        if layer_scale_init is not None:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        else:
            self.register_parameter("gamma_1", None)
            self.register_parameter("gamma_2", None)

    def forward(self, x: Tensor, modality_ids: Tensor, key_padding_mask: Optional[Tensor] = None,
                attn_bias: AttnBias = None, packing: Optional[PackedSequences] = None) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError("x must be a 3-D tensor [batch, length, dim], got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if x.shape[-1] != self.dim:
            raise ValueError(f"x has hidden size {x.shape[-1]} but the block was built with dim={self.dim}")
        weight = self.norm1.weight
        if x.dtype != weight.dtype or x.device != weight.device:
            raise TypeError(f"x is {x.dtype} on {x.device} but the block's weights are "
                            f"{weight.dtype} on {weight.device}")

        if not isinstance(modality_ids, Tensor) or tuple(modality_ids.shape) != tuple(x.shape[:2]):
            raise ValueError(f"modality_ids must be a tensor of shape [batch, length] = "
                             f"{tuple(x.shape[:2])}, got "
                             f"{tuple(modality_ids.shape) if isinstance(modality_ids, Tensor) else type(modality_ids).__name__}")

        drop = self.training and self.drop_path > 0.0
        branch = self.attn(self.norm1(x), attn_bias=attn_bias, key_padding_mask=key_padding_mask,
                           packing=packing)
        if self.gamma_1 is not None:
            branch = branch * self.gamma_1
        if drop:  # independent draws for the two branches, as two DropPath modules would do
            branch = branch * self._keep_scale(x, packing, x.dtype)[..., None]
        x = x + branch

        token_scale = None
        if drop:
            token_scale = self._keep_scale(x, packing, torch.float32)
        # residual, gamma_2 and the drop-path scale are fused into the FFN op
        return self.mlp(x, modality_ids, gamma=self.gamma_2, drop_path_scale=token_scale)

    def _keep_scale(self, x: Tensor, packing: Optional[PackedSequences], dtype) -> Tensor:
        """Stochastic-depth scale per token [B, L]: one draw per sample, or per packed
        sequence (a pack is one row holding many samples)."""
        if packing is None:
            return drop_path_keep_scale(x.shape[0], self.drop_path, x.device, dtype)[:, None].expand(x.shape[:2])
        per_sequence = drop_path_keep_scale(packing.num_sequences, self.drop_path, x.device, dtype)
        return per_sequence[packing.document_ids][None]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, drop_path={self.drop_path}"
