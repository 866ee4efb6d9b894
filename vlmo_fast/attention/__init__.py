"""The shared multi-head self-attention of a MoME block (one for all modalities).

Numerics follow the reference: qkv is one Linear without bias plus the bias
cat(q_bias, 0, v_bias); q is scaled by head_dim**-0.5 (in the input dtype, before the
core, for every backend); logits and softmax in fp32; an optional additive bias and a key
padding mask (True = padded key, ignored) are applied to the logits.

The additive bias is either a dense tensor ([L, L], [heads, L, L] or [B, heads, L, L]; a
bool tensor is a mask with True = attend, as in SDPA) or a lazy `RelativeBias` (VLMo's
shared table + the token layout), which FlexAttention reads inside its kernel instead of
materialising [heads, L, L]. Packed input (`packing=PackedSequences`, x [1, T, d])
restricts attention to each sequence. A query whose keys are all blocked (a fully padded
row) gets a zero attention output in every core: finite, and no gradient.

Layout of this subpackage:
  cores.py   the cores reference, sdpa, flash (signature core(q, k, v, attn_bias,
             key_padding_mask, packing) -> out, q/k/v/out [B, H, L, Dh]) and the per-mask cache
  flex.py    the FlexAttention core, its score_mods, block masks and compiled callable
  policy.py  registration with `vlmo_fast.backends` (op "attention"), per-call facts and
             accepts hooks, `register_attention_impl`, `choose_attention_backend`
  checks.py  the mask convention and the input checks
  module.py  `MultiHeadSelfAttention`

Cores (backend names):
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

Automatic choice (no explicit backend): CPU -> reference. CUDA -> flex, sdpa, reference
when there is an additive bias; without one flash, then (packed) flex, then sdpa, reference;
the first that accepts the input runs (see policy.py). A choice that skips the preferred
backend on CUDA warns once with the reason; an explicit request that cannot run this input
raises. What ran is in `backends.last_used()` and the module's repr.
"""
from .checks import check_attention_inputs, normalize_attn_bias
from .cores import AttnBias, attention_flash, attention_reference, attention_sdpa, dense_bias
from .flex import attention_flex, flex_bias_grad_mode
from .module import MultiHeadSelfAttention
from .policy import (AttentionCore, attention_core, attention_facts, choose_attention_backend,
                     register_attention_impl)

__all__ = [
    "MultiHeadSelfAttention", "AttnBias", "attention_reference", "attention_sdpa",
    "attention_flex", "attention_flash", "attention_core", "attention_facts", "AttentionCore",
    "choose_attention_backend", "register_attention_impl", "check_attention_inputs",
    "normalize_attn_bias", "dense_bias", "flex_bias_grad_mode",
]
