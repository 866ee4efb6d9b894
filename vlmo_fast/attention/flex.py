"""The FlexAttention core: the relative bias is looked up from the shared table inside the
kernel (score_mod, never [H, L, L]); a block mask skips padded keys and other sequences.

Compiled (torch.compile, one cached callable) on CUDA; on CPU the dense math path of the
same operator runs (slow, for tests: it checks the score_mod and block mask). The caches
here (compiled callable, score_mods, block masks per mask tensor / pack) exist so that the
compiled graphs are reused across layers and steps.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from ..embeddings import RelativeBias
from ..env import env_choice
from ..packing import PackedSequences
from .cores import PADDING_CACHE, AttnBias


def flex_module():
    try:
        import torch.nn.attention.flex_attention as flex
    except ImportError:
        return None
    if not all(hasattr(flex, n) for n in ("flex_attention", "create_block_mask", "BlockMask")):
        return None
    return flex


def flex_available(device: torch.device) -> Optional[str]:
    if flex_module() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    if device.type not in ("cuda", "cpu"):
        return f"FlexAttention is wired up for CUDA and CPU here, not {device.type}"
    return None


_COMPILED_FLEX = None
_FLEX_RECOMPILE_LIMIT = 64


def _compiled_flex() -> Callable:
    # One compiled callable for the process: dynamo caches a graph per input signature, so
    # layers with the same shapes reuse it, and lengths that change between steps (packed
    # totals, text lengths) switch it to dynamic shapes after the first change.
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        # All variants (padded / packed / no mask, bias kind, grad or not, per-batch codes)
        # are guard sets of the SAME frame; past dynamo's recompile limit (8 by default) it
        # would silently run flex_attention uncompiled, i.e. the dense unfused path. Raise
        # the limit (never lower it) so a training run's handful of variants stay compiled.
        import torch._dynamo as dynamo
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo.config, knob) and getattr(dynamo.config, knob) < _FLEX_RECOMPILE_LIMIT:
                backends.logger.info("vlmo_fast: raising torch._dynamo.config.%s to %d for the "
                                     "compiled FlexAttention variants", knob, _FLEX_RECOMPILE_LIMIT)
                setattr(dynamo.config, knob, _FLEX_RECOMPILE_LIMIT)
        _COMPILED_FLEX = torch.compile(flex_module().flex_attention)
    return _COMPILED_FLEX


def flex_block_mask(batch: int, length: int, key_padding_mask: Optional[Tensor],
                    packing: Optional[PackedSequences], device: torch.device):
    """Block mask skipping padded keys / other sequences, cached per forward; None = dense."""
    if key_padding_mask is None and packing is None:
        return None
    cache = packing.cache if packing is not None else PADDING_CACHE.get(key_padding_mask)
    key = ("flex_block_mask", device.type)
    if key not in cache:
        flex = flex_module()
        if packing is not None:
            docs = packing.document_ids

            def same_sequence(b, h, q_idx, kv_idx):
                return docs[q_idx] == docs[kv_idx]
            cache[key] = flex.create_block_mask(same_sequence, 1, None, length, length, device=device)
        else:
            pad = key_padding_mask

            def real_key(b, h, q_idx, kv_idx):
                return ~pad[b, kv_idx]
            cache[key] = flex.create_block_mask(real_key, batch, None, length, length, device=device)
    return cache[key]


# How the relative-bias gradient is accumulated in the compiled backward. FlexAttention
# scatters a captured buffer's gradient with atomic adds; with ONE shared [H, N] column
# block every (query, key) pair of every sequence adds into the same few rows (the two
# cross-modal scalars, the CLS rows), which serialises the atomics. "per_sequence" gives the
# kernel one copy per batch row / packed sequence ([S, H, N], a few MB), so atomics only
# collide inside one sequence; autograd then sums the copies into the table. The forward
# without grad always reads the shared block (smallest working set).
BIAS_GRAD_MODES = ("per_sequence", "shared")


def flex_bias_grad_mode() -> str:
    """VLMO_FAST_FLEX_BIAS_GRAD (read per call): "per_sequence" (default) or "shared"."""
    mode = env_choice("VLMO_FAST_FLEX_BIAS_GRAD", "per_sequence")
    if mode not in BIAS_GRAD_MODES:
        raise ValueError(f"VLMO_FAST_FLEX_BIAS_GRAD must be one of {BIAS_GRAD_MODES}, got {mode!r}")
    return mode


def _score_mod_relative(codes_per_batch: bool, copies: str, rule: Callable):
    """score_mod(score, b, h, q, kv, columns, codes[, docs]): adds the table row that the pair's
    (query, key) codes select. columns: [H, N] (copies "shared"), [B, H, N] ("batch") or
    [num_sequences, H, N] ("sequence"). Built once per variant, so compiled graphs are reused."""
    def score_mod(score, b, h, q_idx, kv_idx, columns, codes, *docs):
        if codes_per_batch:
            row = rule(codes[b, q_idx], codes[b, kv_idx])
        else:
            row = rule(codes[q_idx], codes[kv_idx])
        if copies == "batch":
            return score + columns[b, h, row]
        if copies == "sequence":
            return score + columns[docs[0][q_idx], h, row]
        return score + columns[h, row]
    return score_mod


_SCORE_MODS: Dict[tuple, Callable] = {}


def _score_mod_dense(bias_per_batch: bool):
    if bias_per_batch:
        def score_mod(score, b, h, q_idx, kv_idx, bias):
            return score + bias[b, h, q_idx, kv_idx]
    else:
        def score_mod(score, b, h, q_idx, kv_idx, bias):
            return score + bias[h, q_idx, kv_idx]
    return score_mod


def flex_score_mod(attn_bias: AttnBias, batch: int,
                   packing: Optional[PackedSequences]) -> Tuple[Optional[Callable], tuple]:
    """(score_mod taking its tensors as trailing arguments, those tensors)."""
    if attn_bias is None:
        return None, ()
    if isinstance(attn_bias, RelativeBias):
        codes = attn_bias.codes()
        src = attn_bias.source
        # [H, N] contiguous per layer: a kernel program gathers from one head's row; the copy
        # is tiny (num_distances x heads) and its backward accumulates into the shared table.
        columns = attn_bias.columns().contiguous()
        copies, extra = "shared", ()
        wants_grad = torch.is_grad_enabled() and columns.requires_grad
        if wants_grad and flex_bias_grad_mode() == "per_sequence":
            if packing is not None:
                copies, extra = "sequence", (packing.document_ids,)
                columns = columns.unsqueeze(0).expand(packing.num_sequences, -1, -1).contiguous()
            elif batch > 1:
                copies = "batch"
                columns = columns.unsqueeze(0).expand(batch, -1, -1).contiguous()
        key = ("relative", codes.dim() == 2, copies, src.grid_size, src.text_len)
        if key not in _SCORE_MODS:
            _SCORE_MODS[key] = _score_mod_relative(codes.dim() == 2, copies, src.pair_index)
        return _SCORE_MODS[key], (columns, codes) + extra
    per_batch = attn_bias.dim() == 4
    if per_batch and attn_bias.shape[0] == 1:
        attn_bias, per_batch = attn_bias[0], False
    key = ("dense", per_batch)
    if key not in _SCORE_MODS:
        _SCORE_MODS[key] = _score_mod_dense(per_batch)
    return _SCORE_MODS[key], (attn_bias,)


def _flex_hop_dense(q, k, v, score_mod, buffers, block_mask, flex):
    """The FlexAttention operator's own math path, called directly so that its backward runs
    on CPU (the public flex_attention refuses CPU inputs that require grad). Private torch
    API: used on CPU only, for tests; CUDA always goes through the public compiled API."""
    from torch._higher_order_ops.flex_attention import flex_attention as flex_hop
    if block_mask is None:
        block_mask = flex._create_empty_block_mask(q, k)
    if score_mod is None:
        score_mod, buffers = (lambda score, b, h, q_idx, kv_idx: score), ()
    options = flex._apply_kernel_options(q, k, v, False, None, None)
    return flex_hop(q, k, v, score_mod, block_mask.as_tuple(), 1.0, options, tuple(buffers), ())[0]


def attention_flex(q: Tensor, k: Tensor, v: Tensor, attn_bias: AttnBias = None,
                   key_padding_mask: Optional[Tensor] = None,
                   packing: Optional[PackedSequences] = None) -> Tensor:
    """FlexAttention; the relative bias is looked up in the kernel (never [H, L, L])."""
    flex = flex_module()
    b, _, length, _ = q.shape
    if length == 0:
        raise ValueError("the flex attention backend needs at least one token per sequence "
                         "(got length 0); FlexAttention cannot build a block mask over no keys")
    block_mask = flex_block_mask(b, length, key_padding_mask, packing, q.device)
    score_mod, buffers = flex_score_mod(attn_bias, b, packing)
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        return _flex_hop_dense(q, k, v, score_mod, buffers, block_mask, flex)
    return flex_compiled_call(q, k, v, score_mod, buffers, block_mask)


def flex_compiled_call(q, k, v, score_mod, buffers, block_mask):
    """The public compiled flex_attention; the score_mod's tensors are closed over (dynamo
    lifts them to kernel inputs, and the backward scatters their gradients)."""
    bound = None
    if score_mod is not None:
        def bound(score, b, h, q_idx, kv_idx):
            return score_mod(score, b, h, q_idx, kv_idx, *buffers)
    flex = flex_module().flex_attention if torch.compiler.is_compiling() else _compiled_flex()
    return flex(q, k, v, score_mod=bound, block_mask=block_mask, scale=1.0)
