"""Which attention core runs: registration with `vlmo_fast.backends` (op "attention"), the
per-call facts the choice depends on, and the plug-in point `register_attention_impl`.

The choice is made by `backends.resolve` like every other op's, so `backend_report()`,
`last_used()`, `set_backend("attention", ...)` and VLMO_FAST_ATTENTION_BACKEND tell the
truth. Facts of a call (see `attention_facts`): dtype, head_dim, bias ("none", "dense",
"relative"), packed, needs_grad, compiling. Automatic order: CPU -> reference. CUDA -> with
a bias: flex, sdpa, reference; without: flash, (packed: flex,) sdpa, reference. Each core
says in its `accepts` hook which inputs it cannot take (flash: no bias, fp16/bf16 only,
head_dim <= 256), so the first core that accepts the input runs; an explicit request that
cannot take it raises.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from torch import Tensor

from .. import backends
from ..env import compile_time_constant
from ..embeddings import RelativeBias
from ..packing import PackedSequences
from .cores import (AttnBias, attention_flash, attention_reference, attention_sdpa, dense_bias,
                    flash_available)
from .flex import attention_flex, flex_available

OP = "attention"


@dataclass(frozen=True)
class AttentionCore:
    fn: Callable
    # native: takes a lazy RelativeBias and `packing`; else fn(q, k, v, dense_bias, key_padding_mask)
    native: bool


class _DenseBiasCore:
    """A 5-argument core (q, k, v, dense bias, key_padding_mask) in the native calling
    convention that the dispatch uses for every core: the lazy bias is materialised first and
    packing (which its `accepts` refuses) is dropped."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, attn_bias: AttnBias,
                 key_padding_mask: Optional[Tensor], packing: Optional[PackedSequences]) -> Tensor:
        return self.fn(q, k, v, dense_bias(attn_bias), key_padding_mask)


def attention_facts(q: Tensor, attn_bias: AttnBias, packing: Optional[PackedSequences]) -> dict:
    """What the backend choice may depend on, for q [B, H, L, Dh] (all host values)."""
    if attn_bias is None:
        bias, bias_grad = "none", False
    elif isinstance(attn_bias, RelativeBias):
        bias, bias_grad = "relative", attn_bias.source.relative_position_bias_table.requires_grad
    else:
        bias, bias_grad = "dense", attn_bias.requires_grad
    return dict(dtype=q.dtype, head_dim=q.shape[-1], bias=bias, packed=packing is not None,
                needs_grad=torch.is_grad_enabled() and (q.requires_grad or bias_grad),
                compiling=torch.compiler.is_compiling(), device_type=q.device.type)


def _cuda_order(facts: dict) -> List[str]:
    if facts.get("bias", "none") != "none":
        return ["flex", "sdpa", "reference"]
    if "bias" not in facts:     # no input known (backend_report): every candidate
        return ["flash", "flex", "sdpa", "reference"]
    return ["flash"] + (["flex"] if facts.get("packed") else []) + ["sdpa", "reference"]


def _flash_accepts(facts: dict) -> Optional[str]:
    if facts.get("bias", "none") != "none":
        return "flash-attn cannot add the attention bias (relative position bias)"
    dtype = facts.get("dtype")
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn needs fp16/bf16 inputs, got {dtype}"
    if facts.get("head_dim", 0) > 256:
        return f"flash-attn supports head_dim <= 256, got {facts['head_dim']}"
    return None


def _flex_accepts(facts: dict) -> Optional[str]:
    if facts.get("device_type") == "cpu" and facts.get("needs_grad"):
        if facts.get("compiling"):
            return "FlexAttention has no compiled CPU backward (torch.compile on CPU: inference only)"
        if importlib.util.find_spec("torch._higher_order_ops.flex_attention") is None:
            return "this torch has no CPU backward for FlexAttention"
    return None


def _not_packed(name: str) -> Callable[[dict], Optional[str]]:
    def accepts(facts: dict) -> Optional[str]:
        if facts.get("packed"):
            return f"backend {name!r} does not support packed sequences"
        return None
    return accepts


def register_attention_impl(name: str, fn: Callable, available=backends.always_available,
                            preference=None, accepts: Optional[Callable[[dict], Optional[str]]] = None,
                            native: bool = False) -> None:
    """Plug in an attention core (`backends.register("attention", name, ...)` with the
    5-argument form adapted to the native calling convention).

    Default (native=False): called as fn(q, k, v, attn_bias, key_padding_mask) with q/k/v
    [B, H, L, Dh] (q scaled), a dense float bias tensor or None, key_padding_mask [B, L]
    bool (True = padded) or None; packed input is refused for it. native=True: called with
    the built-in cores' signature fn(q, k, v, attn_bias, key_padding_mask, packing), the
    bias possibly a lazy `RelativeBias`. `available(device)` / `accepts(facts)` return None or
    the reason it cannot run (facts: see `attention_facts`); `preference` as in
    `backends.register` (e.g. {"cuda": ["mine", "flex", "sdpa", "reference"]})."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    checks = [a for a in (accepts, None if native else _not_packed(name)) if a is not None]

    def accepts_all(facts: dict) -> Optional[str]:
        for check in checks:
            reason = check(facts)
            if reason is not None:
                return reason
        return None
    backends.register(OP, name, fn if native else _DenseBiasCore(fn), available=available,
                      accepts=accepts_all if checks else None, preference=preference)


register_attention_impl("reference", attention_reference, native=True,
                        preference={"default": ["reference"], "cpu": ["reference"], "cuda": _cuda_order})
register_attention_impl("sdpa", attention_sdpa, native=True)
register_attention_impl("flex", attention_flex, flex_available, accepts=_flex_accepts, native=True)
register_attention_impl("flash", attention_flash, flash_available, accepts=_flash_accepts, native=True)


def attention_core(name: str) -> AttentionCore:
    """The registered core `name` (its function and whether it takes lazy biases / packing)."""
    fn = backends.implementation(OP, name)
    if isinstance(fn, _DenseBiasCore):
        return AttentionCore(fn.fn, native=False)
    return AttentionCore(fn, native=True)


@compile_time_constant
def _resolve(requested: Optional[str], device: torch.device, facts_items: tuple) -> str:
    # A compile-time constant: torch.compile traces the chosen core only (the choice reads
    # environment variables and registries, which dynamo need not trace).
    return backends.resolve(OP, requested, device, **dict(facts_items))


def choose_attention_backend(requested: Optional[str], q: Tensor, attn_bias: AttnBias,
                             packing: Optional[PackedSequences]) -> str:
    """The attention core for this input (explicit request, override, env, or the automatic
    order; see the module docstring). Records what ran in `backends.last_used()`."""
    facts = attention_facts(q, attn_bias, packing)
    return _resolve(requested, q.device, tuple(sorted(facts.items())))
