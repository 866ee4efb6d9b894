"""MoMEBlock: the drop-in Mixture-of-Modality-Experts transformer block.

    x = x + drop_path(gamma_1 * MSA(LN1(x)))          # one attention shared by all tokens
    x = x + drop_path(gamma_2 * FFN_e(LN2_e(x)))       # expert e = modality_ids per token

Routing is by the integer tensor `modality_ids` [B, L] (0 vision, 1 language, 2
vision-language): any interleaving and any text length work, there is no fixed split.

`attention="per_modality"` (the paper's Table 7 ablation) gives the block a second attention,
`attn_text`, for language tokens (`attn` then serves vision tokens): each token is projected
by its own modality's weights and all tokens attend jointly. Which copy a token uses is
`token_modality` (0 vision, 1 language), since VL-expert tokens (modality_ids 2) have none.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .env import autocast_dtype
from .attention import AttnBias, MultiHeadSelfAttention
from .attention.module import per_modality_attention
from .config import ATTENTION_MODES
from .mome import LANGUAGE, VISION, MoMEFeedForward
from .packing import PackedSequences


def drop_path_keep_scale(batch: int, drop_prob: float, device, dtype=torch.float32) -> Tensor:
    """Per-sample stochastic-depth scale: 0 (dropped) or 1/keep_prob, shape [batch]."""
    keep = 1.0 - drop_prob
    return torch.empty(batch, device=device, dtype=dtype).bernoulli_(keep).div_(keep)


def _describe(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


class MoMEBlock(nn.Module):
    """Shared self-attention + per-modality expert FFNs, pre-LN (timm `Block` style).

    Args:
        dim: hidden size. num_heads: attention heads.
        num_experts: 2 (vision, language) or 3 (+ vision-language).
        mlp_ratio: expert hidden size = dim * mlp_ratio.
        qkv_bias: learnable q and v biases (k has none, as in BEiT/VLMo).
        layer_scale_init: initial value of gamma_1/gamma_2 (None: no layer scale).
        drop_path: stochastic-depth probability of this block.
        eps: LayerNorm epsilon.
        attention: "shared" (one attention for every token, VLMo) or "per_modality" (a vision
            attention `attn` and a language attention `attn_text`, see the module docstring).
        ffn_backend / attn_backend: None or "auto" for automatic choice, or a backend name
            (see `vlmo_fast.backend_report()`).
        device / dtype: factory kwargs for every parameter (e.g. device="meta" for deferred
            init; then `to_empty(device=...)` and `reset_parameters()` or `load_state_dict`).

    Works under torch.compile(fullgraph=True), autocast (GEMMs in the autocast dtype, norms
    and attention logits in fp32), any float dtype (fp64 falls back to the reference
    paths), DDP/FSDP, and meta-device init. Weight decay: see `no_weight_decay()` and
    `vlmo_fast.param_groups_weight_decay`.
    """

    def __init__(self, dim: int, num_heads: int, num_experts: int = 3, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, layer_scale_init: Optional[float] = 0.1,
                 drop_path: float = 0.0, eps: float = 1e-6, ffn_backend: Optional[str] = None,
                 attn_backend: Optional[str] = None, device=None, dtype=None, attention: str = "shared"):
        super().__init__()
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.num_experts, self.drop_path = dim, num_experts, drop_path
        self.layer_scale_init = layer_scale_init
        self.norm1 = nn.LayerNorm(dim, eps=eps, **factory)
        self.attn = MultiHeadSelfAttention(dim, num_heads, qkv_bias=qkv_bias, backend=attn_backend,
                                           **factory)
        self.mlp = MoMEFeedForward(dim, int(dim * mlp_ratio), num_experts, eps=eps, backend=ffn_backend,
                                   **factory)
        if layer_scale_init is not None:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale_init), **factory))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale_init), **factory))
        else:
            self.register_parameter("gamma_1", None)
            self.register_parameter("gamma_2", None)
        # registered last: the shared block's module order, hence its initialisation, is unchanged
        self.register_module("attn_text", MultiHeadSelfAttention(
            dim, num_heads, qkv_bias=qkv_bias, backend=attn_backend, **factory)
            if attention == "per_modality" else None)

    @property
    def attention(self) -> str:
        return "shared" if self.attn_text is None else "per_modality"

    def reset_parameters(self, std: Optional[float] = None) -> None:
        """Re-initialise every parameter (deferred init after `to_empty`): LayerNorms 1/0,
        attention Linears truncated normal with `std` (nn.Linear's default init when None),
        experts truncated normal (std or 0.02), biases 0, layer scales `layer_scale_init`."""
        self.norm1.reset_parameters()
        self.attn.reset_parameters(std)
        self.mlp.reset_parameters(0.02 if std is None else std)
        if self.gamma_1 is not None:
            nn.init.constant_(self.gamma_1, float(self.layer_scale_init))
            nn.init.constant_(self.gamma_2, float(self.layer_scale_init))
        if self.attn_text is not None:
            self.attn_text.reset_parameters(std)

    def no_weight_decay(self) -> set:
        """Names (relative to this block) that AdamW should not decay: norms, biases, layer
        scales, and the expert bank's stacked norms/biases (2-D, so `ndim <= 1` misses them)."""
        present = dict(self.named_parameters())
        names = {n for n in ("norm1.weight", "norm1.bias", "attn.proj.bias", "attn.q_bias",
                             "attn.v_bias", "attn_text.proj.bias", "attn_text.q_bias",
                             "attn_text.v_bias", "gamma_1", "gamma_2") if n in present}
        return names | {f"mlp.{n}" for n in self.mlp.no_weight_decay()}

    def forward(self, x: Tensor, modality_ids: Tensor, key_padding_mask: Optional[Tensor] = None,
                attn_bias: AttnBias = None, packing: Optional[PackedSequences] = None,
                token_modality: Optional[Tensor] = None) -> Tensor:
        """One block.

        Args:
            x: [B, L, dim] tokens (float; under autocast any float dtype).
            modality_ids: [B, L] integer expert per token (0 vision, 1 language, 2 VL).
            key_padding_mask: [B, L] bool, True = padded key (ignored by attention). A row
                that is entirely padded gets a zero attention output: its tokens stay finite
                and do not affect other rows.
            attn_bias: float [L, L] / [heads, L, L] / [B, heads, L, L] added to the logits,
                a bool mask of those shapes (True = attend, as in SDPA), or a lazy
                `RelativeBias` (VLMo's shared relative-position table).
            packing: `PackedSequences` when x is [1, T, dim] holding several sequences back
                to back, each attending only to itself.
            token_modality: [B, L] integer, 0 vision / 1 language: which attention weights
                each token uses in a per-modality block (default: modality_ids, which must
                then hold no VL id). A shared-attention block checks its shape only.
        Returns:
            [B, L, dim] in x's dtype. Drop path (training) draws one keep/drop per sample, or
            per packed sequence when packing is given.
        """
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"x must be a 3-D tensor [batch, length, dim], got {_describe(x)}")
        if x.shape[-1] != self.dim:
            raise ValueError(f"x has hidden size {x.shape[-1]} but the block was built with dim={self.dim}")
        weight = self.norm1.weight
        autocast = autocast_dtype(x) is not None
        if x.device != weight.device or (x.dtype != weight.dtype and not autocast):
            raise TypeError(f"x is {x.dtype} on {x.device} but the block's weights are "
                            f"{weight.dtype} on {weight.device}")
        if not isinstance(modality_ids, Tensor) or tuple(modality_ids.shape) != tuple(x.shape[:2]):
            raise ValueError(f"modality_ids must be a tensor of shape [batch, length] = "
                             f"{tuple(x.shape[:2])}, got {_describe(modality_ids)}")

        if token_modality is not None and (not isinstance(token_modality, Tensor)
                                           or tuple(token_modality.shape) != tuple(x.shape[:2])):
            raise ValueError(f"token_modality must be a tensor of shape [batch, length] = "
                             f"{tuple(x.shape[:2])}, got {_describe(token_modality)}")

        drop = self.training and self.drop_path > 0.0
        if self.attn_text is None:
            branch = self.attn(self.norm1(x), attn_bias=attn_bias, key_padding_mask=key_padding_mask,
                               packing=packing)
        else:
            is_text = _is_text(modality_ids if token_modality is None else token_modality,
                               "modality_ids" if token_modality is None else "token_modality")
            branch = per_modality_attention(self.attn, self.attn_text, self.norm1(x), is_text,
                                            attn_bias=attn_bias, key_padding_mask=key_padding_mask,
                                            packing=packing)
        if self.gamma_1 is not None:
            branch = branch * self.gamma_1
        if drop:  # independent draws for the two branches, as two DropPath modules would do
            branch = branch * self._keep_scale(x, packing, branch.dtype)[..., None]
        x = x + branch.to(x.dtype) if autocast else x + branch

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
        extra = ", attention=per_modality" if self.attn_text is not None else ""
        return f"dim={self.dim}, num_experts={self.num_experts}, drop_path={self.drop_path}{extra}"


def _is_text(token_modality: Tensor, name: str) -> Tensor:
    """[B, L] bool: the tokens a per-modality block projects with its language attention.
    Every id must be 0 (vision) or 1 (language): a VL-expert id (2) names no attention."""
    if token_modality.dtype == torch.bool or token_modality.is_floating_point() or token_modality.is_complex():
        raise TypeError(f"{name} must be an integer tensor (0 vision, 1 language), got {token_modality.dtype}")
    if token_modality.numel() and not torch.compiler.is_compiling():
        valid = (token_modality == VISION) | (token_modality == LANGUAGE)
        message = (f"a per-modality attention block needs each token's modality, 0 (vision) or 1 "
                   f"(language), in {name}"
                   + ("; vision-language tokens (id 2) must pass token_modality" if name == "modality_ids" else ""))
        if token_modality.device.type == "cpu":
            if not bool(valid.all()):
                raise ValueError(message)
        else:   # no host sync on the accelerator: checked on the device
            torch._assert_async(valid.all(), message)
    return token_modality == LANGUAGE
