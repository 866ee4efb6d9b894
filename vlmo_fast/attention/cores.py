"""The attention cores that materialise nothing special: reference, SDPA, flash-attn.

Every core has the signature
    core(q, k, v, attn_bias, key_padding_mask, packing) -> out
with q/k/v/out [B, H, L, Dh] (q already scaled), attn_bias a dense additive float tensor
([H, L, L] or [B, H, L, L]) or a lazy `RelativeBias` or None, key_padding_mask [B, L] bool
(True = padded key) or None, packing a `PackedSequences` or None.

A query whose keys are all blocked (a fully padded sequence, or a bool mask row without a
True) attends to nothing: its output is zero in every core (as SDPA and flash-attn do),
never NaN, and it contributes no gradient.
"""
from __future__ import annotations

import importlib.util
import weakref
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..embeddings import RelativeBias
from ..packing import PackedSequences, cu_seqlens_from_counts

AttnBias = Union[Tensor, RelativeBias, None]


def dense_bias(attn_bias: AttnBias) -> Optional[Tensor]:
    """The bias as a dense tensor (materialises a lazy `RelativeBias`)."""
    return attn_bias.materialize() if isinstance(attn_bias, RelativeBias) else attn_bias


class TensorKeyedCache:
    """Derived data of the last few key padding masks (same tensor object, same version):
    all layers of a forward pass share one mask tensor, so a block mask or an unpadding
    index is built once per forward instead of once per layer. A handful of entries, so
    passes that alternate masks (pairs, then texts) do not rebuild every time. Under
    torch.compile nothing is cached (the compiled graph is the cache)."""

    def __init__(self, size: int = 4):
        self._size = size
        self._entries = []            # [(weakref to mask, version, data)], newest last

    def clear(self) -> None:
        """Forget every entry (benchmarks time a cold build this way)."""
        self._entries.clear()

    def get(self, t: Tensor) -> dict:
        if torch.compiler.is_compiling():
            return {}
        for i, (ref, version, data) in enumerate(self._entries):
            if ref() is t and version == t._version:
                self._entries.append(self._entries.pop(i))
                return data
        self._entries = [e for e in self._entries if e[0]() is not None][-(self._size - 1):]
        data: dict = {}
        self._entries.append((weakref.ref(t), t._version, data))
        return data


PADDING_CACHE = TensorKeyedCache()


# -- reference -------------------------------------------------------------------------------
def attention_reference(q: Tensor, k: Tensor, v: Tensor, attn_bias: AttnBias = None,
                        key_padding_mask: Optional[Tensor] = None,
                        packing: Optional[PackedSequences] = None) -> Tensor:
    """q, k, v: [B, H, L, Dh], q already scaled. Returns [B, H, L, Dh] in q's dtype.
    Logits and softmax in fp32 (fp64 stays fp64, for gradcheck)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    logits = q.to(acc) @ k.to(acc).transpose(-2, -1)
    masked = attn_bias is not None or key_padding_mask is not None or packing is not None
    if attn_bias is not None:
        logits = logits + dense_bias(attn_bias).to(acc)
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    if packing is not None:
        logits = logits.masked_fill(~packing.same_sequence(), float("-inf"))
    if not masked:
        return logits.softmax(dim=-1).to(v.dtype) @ v
    # A row with every key blocked would be softmax(all -inf) = NaN: give it zero weights.
    blocked = logits.amax(dim=-1, keepdim=True) == float("-inf")
    probs = logits.masked_fill(blocked, 0.0).softmax(dim=-1).masked_fill(blocked, 0.0)
    return probs.to(v.dtype) @ v


# -- SDPA ------------------------------------------------------------------------------------
def attention_sdpa(q: Tensor, k: Tensor, v: Tensor, attn_bias: AttnBias = None,
                   key_padding_mask: Optional[Tensor] = None,
                   packing: Optional[PackedSequences] = None) -> Tensor:
    """F.scaled_dot_product_attention with the bias and masks folded into attn_mask.

    Numerics: SDPA takes a float mask only in q's dtype, so in bf16/fp16 the bias is rounded
    to that dtype before it is added, and its kernels (flash, mem-efficient, cuDNN, math)
    may compute the softmax with a different accumulation order than the fp32 reference:
    expect bf16-level differences (tests use bf16 tolerances), exact agreement only in fp32.
    """
    bias = dense_bias(attn_bias)
    empty_rows = None
    if key_padding_mask is not None:
        # Fully padded sequences: let them attend to every key (no -inf row reaches a kernel
        # that might turn it into NaN) and zero their output below.
        empty_rows = key_padding_mask.all(dim=1)
        key_padding_mask = key_padding_mask & ~empty_rows[:, None]
    if bias is None and packing is None:
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]  # True = attend
    else:
        length = q.shape[-2]
        mask = torch.zeros((1, 1, length, length), dtype=q.dtype, device=q.device)
        if bias is not None:
            mask = mask + bias.to(q.dtype)
        if key_padding_mask is not None:
            mask = mask.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        if packing is not None:
            mask = mask.masked_fill(~packing.same_sequence(), float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    if empty_rows is not None:
        out = out.masked_fill(empty_rows[:, None, None, None], 0.0)
    return out


# -- flash-attn ------------------------------------------------------------------------------
def _flash_varlen():
    from flash_attn import flash_attn_varlen_func
    return flash_attn_varlen_func


def flash_available(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return "flash-attn runs on CUDA only"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed (pip install vlmo_fast[flash])"
    return None


def unpadded_layout(key_padding_mask: Tensor) -> Tuple[Tensor, Tensor, int]:
    """(indices of real tokens in the flattened [B*L], int32 cu_seqlens, max_seqlen), cached
    per mask. max_seqlen is a host int (flash-attn's API): one sync per forward, not per layer.
    A fully padded row is a zero-length sequence (its output stays zero)."""
    cache = PADDING_CACHE.get(key_padding_mask)
    if "unpad" not in cache:
        real = ~key_padding_mask
        counts = real.sum(1, dtype=torch.int32)
        cu = cu_seqlens_from_counts(counts)
        # under torch.compile no host sync: the padded length is a valid upper bound
        max_len = real.shape[1] if torch.compiler.is_compiling() else int(counts.max())
        cache["unpad"] = (real.reshape(-1).nonzero().squeeze(1), cu, max_len)
    return cache["unpad"]


def attention_flash(q: Tensor, k: Tensor, v: Tensor, attn_bias: AttnBias = None,
                    key_padding_mask: Optional[Tensor] = None,
                    packing: Optional[PackedSequences] = None) -> Tensor:
    """flash_attn_varlen_func over the real tokens only. Padded query rows come back as zeros
    (the reference gives them an average over the real keys; nothing downstream reads them)."""
    if attn_bias is not None:
        raise ValueError("the flash backend cannot add an attention bias (flash-attn has no "
                         "arbitrary additive bias); use flex or sdpa for relative-bias presets")
    varlen = _flash_varlen()
    b, h, length, dh = q.shape
    tokens = lambda t: t.transpose(1, 2).reshape(b * length, h, dh)   # [B*L, H, Dh]
    if packing is not None:
        out = varlen(tokens(q), tokens(k), tokens(v), packing.cu_seqlens, packing.cu_seqlens,
                     packing.max_seqlen, packing.max_seqlen, 0.0, softmax_scale=1.0, causal=False)
        return out.view(b, length, h, dh).transpose(1, 2)
    if key_padding_mask is None:
        cu = torch.arange(0, (b + 1) * length, length, dtype=torch.int32, device=q.device)
        out = varlen(tokens(q), tokens(k), tokens(v), cu, cu, length, length, 0.0,
                     softmax_scale=1.0, causal=False)
        return out.view(b, length, h, dh).transpose(1, 2)
    keep, cu, max_len = unpadded_layout(key_padding_mask)
    sel = lambda t: tokens(t).index_select(0, keep)
    out = varlen(sel(q), sel(k), sel(v), cu, cu, max(max_len, 1), max(max_len, 1), 0.0,
                 softmax_scale=1.0, causal=False)
    full = out.new_zeros(b * length, h, dh).index_copy(0, keep, out)
    return full.view(b, length, h, dh).transpose(1, 2)
