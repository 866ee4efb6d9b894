"""The shared multi-head self-attention of a MoME block (one for all modalities).

Numerics follow the reference: qkv is one Linear without bias plus the bias
cat(q_bias, 0, v_bias); q is scaled by head_dim**-0.5 (in the input dtype, before the
core, for every backend); logits and softmax in fp32; an optional additive bias and a key
padding mask (True = padded key, ignored) are applied to the logits.

The additive bias is either a dense tensor ([heads, L, L] or [B, heads, L, L], for use as a
drop-in block elsewhere) or a lazy `RelativeBias` (VLMo's shared table + the token layout),
which FlexAttention reads inside its kernel instead of materialising [heads, L, L].
Packed input (`packing=PackedSequences`, x [1, T, d]) restricts attention to each sequence.

Attention cores (op "attention" of `vlmo_fast.backends`), all with the signature
    core(q, k, v, attn_bias, key_padding_mask, packing) -> out, q/k/v/out [B, H, L, Dh]:

  "reference"  materialised fp32 logits + bias + -inf on padded / other-sequence keys, fp32
               softmax. Always available; the automatic choice on CPU (fastest there for
               the test sizes, and exact).
  "sdpa"       F.scaled_dot_product_attention. Without bias and padding it can use the flash
               kernel; with them the bias and mask become one dense float mask in q's dtype.
  "flex"       FlexAttention: score_mod looks the bias up from the shared table per (query,
               key) pair, a block mask skips padded keys and other sequences. Compiled
               (torch.compile, cached) on CUDA; on CPU the dense math path of the same
               operator runs (slow, for tests: it checks the score_mod and block mask).
  "flash"      flash-attn's flash_attn_varlen_func on the unpadded tokens (fp16/bf16, CUDA,
               flash-attn installed); only without an additive bias (absolute-position
               presets such as base_plus).

Automatic choice (no explicit backend): CPU -> reference. CUDA -> flex when there is an
additive bias; without one flash, then (packed) flex, then sdpa. A choice that skips the
preferred backend on CUDA warns once with the reason; an explicit request that cannot run
this input raises. What ran is in `backends.last_used()` and the module's repr.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
import weakref
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backends
from .embeddings import RelativeBias
from .packing import PackedSequences

AttnBias = Union[Tensor, RelativeBias, None]


def _dense_bias(attn_bias: AttnBias) -> Optional[Tensor]:
    return attn_bias.materialize() if isinstance(attn_bias, RelativeBias) else attn_bias


# -- reference -------------------------------------------------------------------------------
def attention_reference(q: Tensor, k: Tensor, v: Tensor, attn_bias: AttnBias = None,
                        key_padding_mask: Optional[Tensor] = None,
                        packing: Optional[PackedSequences] = None) -> Tensor:
    """q, k, v: [B, H, L, Dh], q already scaled. Returns [B, H, L, Dh] in q's dtype."""
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 logits (fp64 stays fp64 for gradcheck)
    logits = q.to(acc) @ k.to(acc).transpose(-2, -1)
    if attn_bias is not None:
        logits = logits + _dense_bias(attn_bias).to(acc)
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    if packing is not None:
        logits = logits.masked_fill(~packing.same_sequence(), float("-inf"))
    probs = logits.softmax(dim=-1).to(v.dtype)
    return probs @ v


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
    bias = _dense_bias(attn_bias)
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
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)


# -- FlexAttention ---------------------------------------------------------------------------
def _flex_module():
    try:
        import torch.nn.attention.flex_attention as flex
    except ImportError:
        return None
    if not all(hasattr(flex, n) for n in ("flex_attention", "create_block_mask", "BlockMask")):
        return None
    return flex


def _flex_available(device: torch.device) -> Optional[str]:
    if _flex_module() is None:
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
        _COMPILED_FLEX = torch.compile(_flex_module().flex_attention)
    return _COMPILED_FLEX


class _TensorKeyedCache:
    """Derived data of the last few key padding masks (same tensor object, same version):
    all layers of a forward pass share one mask tensor, so a block mask or an unpadding
    index is built once per forward instead of once per layer. A handful of entries, so
    passes that alternate masks (pairs, then texts) do not rebuild every time."""

    def __init__(self, size: int = 4):
        self._size = size
        self._entries = []            # [(weakref to mask, version, data)], newest last

    def get(self, t: Tensor) -> dict:
        for i, (ref, version, data) in enumerate(self._entries):
            if ref() is t and version == t._version:
                self._entries.append(self._entries.pop(i))
                return data
        self._entries = [e for e in self._entries if e[0]() is not None][-(self._size - 1):]
        data: dict = {}
        self._entries.append((weakref.ref(t), t._version, data))
        return data


_PADDING_CACHE = _TensorKeyedCache()


def _flex_block_mask(batch: int, length: int, key_padding_mask: Optional[Tensor],
                     packing: Optional[PackedSequences], device: torch.device):
    """Block mask skipping padded keys / other sequences, cached per forward; None = dense."""
    if key_padding_mask is None and packing is None:
        return None
    cache = packing.cache if packing is not None else _PADDING_CACHE.get(key_padding_mask)
    key = ("flex_block_mask", device.type)
    if key not in cache:
        flex = _flex_module()
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
FLEX_BIAS_GRAD_COPIES = os.environ.get("VLMO_FAST_FLEX_BIAS_GRAD", "per_sequence")


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


def _flex_score_mod(attn_bias: AttnBias, batch: int,
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
        if FLEX_BIAS_GRAD_COPIES not in ("shared", "per_sequence"):
            raise ValueError("VLMO_FAST_FLEX_BIAS_GRAD / attention.FLEX_BIAS_GRAD_COPIES must be "
                             f"'shared' or 'per_sequence', got {FLEX_BIAS_GRAD_COPIES!r}")
        wants_grad = torch.is_grad_enabled() and columns.requires_grad
        if wants_grad and FLEX_BIAS_GRAD_COPIES == "per_sequence":
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
    flex = _flex_module()
    b, _, length, _ = q.shape
    block_mask = _flex_block_mask(b, length, key_padding_mask, packing, q.device)
    score_mod, buffers = _flex_score_mod(attn_bias, b, packing)
    if q.device.type == "cpu":
        return _flex_hop_dense(q, k, v, score_mod, buffers, block_mask, flex)
    return _flex_compiled_call(q, k, v, score_mod, buffers, block_mask)


def _flex_compiled_call(q, k, v, score_mod, buffers, block_mask):
    """The public compiled flex_attention; the score_mod's tensors are closed over (dynamo
    lifts them to kernel inputs, and the backward scatters their gradients)."""
    bound = None
    if score_mod is not None:
        def bound(score, b, h, q_idx, kv_idx):
            return score_mod(score, b, h, q_idx, kv_idx, *buffers)
    return _compiled_flex()(q, k, v, score_mod=bound, block_mask=block_mask, scale=1.0)


# -- flash-attn ------------------------------------------------------------------------------
def _flash_varlen():
    from flash_attn import flash_attn_varlen_func
    return flash_attn_varlen_func


def _flash_available(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return "flash-attn runs on CUDA only"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed (pip install vlmo_fast[flash])"
    return None


def _unpadded_layout(key_padding_mask: Tensor) -> Tuple[Tensor, Tensor, int]:
    """(indices of real tokens in the flattened [B*L], int32 cu_seqlens, max_seqlen), cached
    per mask. max_seqlen is a host int (flash-attn's API): one sync per forward, not per layer."""
    cache = _PADDING_CACHE.get(key_padding_mask)
    if "unpad" not in cache:
        real = ~key_padding_mask
        counts = real.sum(1, dtype=torch.int32)
        cu = torch.zeros(counts.shape[0] + 1, dtype=torch.int32, device=counts.device)
        cu[1:] = counts.cumsum(0)
        cache["unpad"] = (real.reshape(-1).nonzero().squeeze(1), cu, int(counts.max()))
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
    keep, cu, max_len = _unpadded_layout(key_padding_mask)
    sel = lambda t: tokens(t).index_select(0, keep)
    out = varlen(sel(q), sel(k), sel(v), cu, cu, max_len, max_len, 0.0, softmax_scale=1.0, causal=False)
    full = out.new_zeros(b * length, h, dh).index_copy(0, keep, out)
    return full.view(b, length, h, dh).transpose(1, 2)


# -- registry and choice ---------------------------------------------------------------------
backends.register("attention", "reference",
                  preference={"default": ["reference"], "cpu": ["reference"],
                              "cuda": ["flex", "sdpa", "reference"]})
backends.register("attention", "sdpa")
backends.register("attention", "flex", _flex_available)
backends.register("attention", "flash", _flash_available)
_IMPLS: Dict[str, Callable] = {"reference": attention_reference, "sdpa": attention_sdpa,
                               "flex": attention_flex, "flash": attention_flash}
# Cores that understand lazy biases and packing; others get a dense bias and no packing.
_NATIVE = set(_IMPLS)


def register_attention_impl(name: str, fn, available=backends._always, preference=None) -> None:
    """Plug in an attention core. It is called as fn(q, k, v, attn_bias, key_padding_mask)
    with q/k/v [B, H, L, Dh] (q scaled) and a dense bias tensor or None; packed input is
    refused for it (add `packing` support and it can be made native)."""
    _IMPLS[name] = fn
    backends.register("attention", name, available, preference)


def _unsupported(name: str, q: Tensor, attn_bias: AttnBias, packing) -> Optional[str]:
    """Why backend `name` cannot run this particular input (None: it can)."""
    if name == "flash":
        if attn_bias is not None:
            return "flash-attn cannot add the attention bias (relative position bias)"
        if q.dtype not in (torch.float16, torch.bfloat16):
            return f"flash-attn needs fp16/bf16 inputs, got {q.dtype}"
        if q.shape[-1] > 256:
            return f"flash-attn supports head_dim <= 256, got {q.shape[-1]}"
    if name == "flex" and q.device.type == "cpu" and torch.is_grad_enabled() \
            and (q.requires_grad or isinstance(attn_bias, (Tensor, RelativeBias))):
        if importlib.util.find_spec("torch._higher_order_ops.flex_attention") is None:
            return "this torch has no CPU backward for FlexAttention"
    if name not in _NATIVE and packing is not None:
        return f"backend {name!r} does not support packed sequences"
    return None


_WARNED_FALLBACK: set = set()


def _explicit_request(requested: Optional[str]) -> Optional[str]:
    override = getattr(backends._OPS.get("attention"), "override", None)
    for name in (requested, override, os.environ.get("VLMO_FAST_ATTENTION_BACKEND")):
        if name not in (None, "", backends.AUTO):
            return name
    return None


def choose_attention_backend(requested: Optional[str], q: Tensor, attn_bias: AttnBias,
                             packing: Optional[PackedSequences]) -> str:
    """The attention core for this input (see the module docstring for the policy)."""
    device = q.device
    if _explicit_request(requested) is not None:
        name = backends.resolve("attention", requested, device)  # raises if unusable on device
        reason = _unsupported(name, q, attn_bias, packing)
        if reason is not None:
            raise ValueError(f"attention backend {name!r} was requested but cannot run this "
                             f"input: {reason}")
        return name
    if device.type != "cuda":
        order = ["reference"]
    elif attn_bias is not None:
        order = ["flex", "sdpa", "reference"]
    else:
        order = ["flash"] + (["flex"] if packing is not None else []) + ["sdpa", "reference"]
    reasons = []
    for name in order:
        reason = backends.available_backends("attention", device).get(name) \
            or _unsupported(name, q, attn_bias, packing)
        if reason is None:
            if reasons and device.type == "cuda" and (order[0], name) not in _WARNED_FALLBACK:
                _WARNED_FALLBACK.add((order[0], name))
                warnings.warn(f"vlmo_fast: attention falls back to {name!r} on {device}: "
                              + "; ".join(reasons), RuntimeWarning, stacklevel=4)
            return backends.resolve("attention", name, device)   # records it in last_used()
        reasons.append(f"{name}: {reason}")
    raise RuntimeError("no usable attention backend: " + "; ".join(reasons))


# -- input checks ----------------------------------------------------------------------------
def check_attention_inputs(x: Tensor, num_heads: int, attn_bias: AttnBias,
                           key_padding_mask: Optional[Tensor],
                           packing: Optional[PackedSequences] = None) -> None:
    b, length, _ = x.shape
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.shape != (b, length):
            raise ValueError(f"key_padding_mask must have shape [batch, length] = {(b, length)}, "
                             f"got {tuple(getattr(key_padding_mask, 'shape', ()))}")
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
        self.last_backend: Optional[str] = None   # the core that ran last (shown in repr)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.register_parameter("q_bias", None)
            self.register_parameter("v_bias", None)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_bias: AttnBias = None,
                key_padding_mask: Optional[Tensor] = None,
                packing: Optional[PackedSequences] = None) -> Tensor:
        b, length, _ = x.shape
        check_attention_inputs(x, self.num_heads, attn_bias, key_padding_mask, packing)
        bias = None
        if self.q_bias is not None:
            # k has no bias: the zeros are a constant, not a parameter.
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).view(b, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                  # each [B, H, L, Dh]
        q = q * self.scale
        name = choose_attention_backend(self.backend, q, attn_bias, packing)
        self.last_backend = name
        if name in _NATIVE:
            out = _IMPLS[name](q, k, v, attn_bias, key_padding_mask, packing)
        else:
            out = _IMPLS[name](q, k, v, _dense_bias(attn_bias), key_padding_mask)
        return self.proj(out.transpose(1, 2).reshape(b, length, self.dim))

    def extra_repr(self) -> str:
        ran = f", last ran: {self.last_backend}" if self.last_backend else ""
        return f"dim={self.dim}, num_heads={self.num_heads}, backend={self.backend or 'auto'}{ran}"
