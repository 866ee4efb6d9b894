"""The Mixture-of-Modality-Experts feed-forward: E expert FFNs, each with its own LayerNorm,
routed per token by `modality_ids`.

    out[t] = x[t] + drop_path_scale[t] * gamma * FFN_e(LN_e(x[t])),   e = modality_ids[t]
    FFN_e(z) = GELU(z @ fc1_weight[e] + fc1_bias[e]) @ fc2_weight[e] + fc2_bias[e]

Expert weights are stored stacked so grouped kernels take them as they are:
norm_weight/norm_bias [E, d], fc1_weight [E, d, h], fc1_bias [E, h], fc2_weight [E, h, d],
fc2_bias [E, d]. Note fc*_weight are (in, out): the transpose of nn.Linear's (out, in).

`mome_ffn` is the functional entry point; `MoMEFeedForward` the module. Both go through
`vlmo_fast.backends.resolve("ffn", ...)`. Backends:

  "triton"      grouped Triton kernels (kernels/mome_ffn.py): device-side counting sort, one
                launch per GEMM for all experts, fused epilogues, no host sync. Auto on CUDA.
  "grouped_mm"  tokens sorted once, both GEMMs as torch._grouped_mm (bf16 CUTLASS on sm90+;
                other dtypes fall back to a per-group loop inside torch). Next on CUDA; auto
                on CPU (fp32 and bf16 work there; measured on 2 cores at T=1024, d=768,
                h=3072, fp32: fwd 176 vs 310 ms, fwd+bwd 638 vs 1090 ms for "reference").
  "reference"   per-expert index_select / index_copy loop (host sync through nonzero); the
                semantics every other backend is tested against.

Each backend also says which inputs it takes (`accepts` in `vlmo_fast.backends`): triton and
grouped_mm take fp32/bf16/fp16 (grouped_mm only bf16 under torch.compile, whose tracer
lacks its fp32 path), so fp64 and compiled fp32 run on the next backend that accepts them,
ultimately the reference. Under autocast the GEMMs run in the autocast dtype (`mome_ffn`).

Override per module (`MoMEFeedForward(..., backend=)`), per call (`mome_ffn(..., backend=)`),
process-wide (`vlmo_fast.set_backend("ffn", name)`) or with VLMO_FAST_FFN_BACKEND; what ran
is in `vlmo_fast.backends.last_used()` and the module's repr.
A new implementation with mome_ffn_reference's signature plugs in with
`register_ffn_impl(name, fn, ...)`, i.e. `backends.register("ffn", name, fn, ...)`: the
dispatch calls whatever function the registry holds for the chosen name.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backends
from .env import (INTEGER_DTYPES, KERNEL_FLOAT_DTYPES, autocast_dtype, compile_time_constant,
                  triton_available)

VISION, LANGUAGE, VISION_LANGUAGE = 0, 1, 2
MODALITY_NAMES = ("vision", "language", "vision-language")


def check_modality_ids(modality_ids: Tensor, x: Tensor, num_experts: int) -> None:
    """Validate routing ids against the tokens `x` [..., d] and the number of experts."""
    if not isinstance(modality_ids, Tensor):
        raise TypeError(f"modality_ids must be a torch.Tensor, got {type(modality_ids).__name__}")
    if modality_ids.dtype not in INTEGER_DTYPES:
        raise TypeError(f"modality_ids must be an integer tensor, got dtype {modality_ids.dtype}")
    if tuple(modality_ids.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"modality_ids must have shape {tuple(x.shape[:-1])} (the token dims of x "
                         f"{tuple(x.shape)}), got {tuple(modality_ids.shape)}")
    if modality_ids.device != x.device:
        raise ValueError(f"modality_ids is on {modality_ids.device} but x is on {x.device}")
    if modality_ids.numel() == 0 or torch.compiler.is_compiling():
        return  # under torch.compile: no host sync in the graph (the range is not checked)
    if modality_ids.device.type == "cpu":
        lo, hi = int(modality_ids.min()), int(modality_ids.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"modality_ids must be in [0, {num_experts - 1}] for a block with "
                             f"{num_experts} experts ({', '.join(MODALITY_NAMES[:num_experts])}); "
                             f"got values in [{lo}, {hi}]")
    else:
        # No host sync on the accelerator: the check runs on the device and raises there.
        torch._assert_async(((modality_ids >= 0) & (modality_ids < num_experts)).all(),
                            f"modality_ids must be in [0, {num_experts - 1}]")


def mome_ffn_reference(x: Tensor, modality_ids: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                       fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor, fc2_bias: Tensor,
                       gamma: Optional[Tensor] = None, drop_path_scale: Optional[Tensor] = None,
                       eps: float = 1e-6) -> Tensor:
    """Per-expert loop over masked tokens (index_select / index_copy): the plain reference.
    Every token must be routed: an id outside [0, E) raises (even when the caller skipped
    validation), since the loop would silently leave such a token without its FFN."""
    d = x.shape[-1]
    flat = x.reshape(-1, d)
    ids = modality_ids.reshape(-1)
    branch = torch.zeros_like(flat)
    routed = 0
    for e in range(norm_weight.shape[0]):
        rows = (ids == e).nonzero().squeeze(1)
        routed = routed + rows.shape[0]   # host ints (nonzero already synced), symbolic under compile
        z = F.layer_norm(flat.index_select(0, rows), (d,), norm_weight[e], norm_bias[e], eps)
        hid = F.gelu(torch.addmm(fc1_bias[e], z, fc1_weight[e]))
        branch = branch.index_copy(0, rows, torch.addmm(fc2_bias[e], hid, fc2_weight[e]))
    message = (f"modality_ids route some tokens to none of the {norm_weight.shape[0]} experts: "
               f"every id must be in [0, {norm_weight.shape[0] - 1}]")
    torch._check(routed == flat.shape[0], lambda: message)
    if gamma is not None:
        branch = branch * gamma
    if drop_path_scale is not None:
        branch = branch * drop_path_scale.reshape(-1, 1).to(branch.dtype)
    return (flat + branch).reshape(x.shape)


def _routing(ids: Tensor, num_experts: int):
    """Stable sort of flat ids and int32 cumulative group ends, without a host sync."""
    perm = torch.argsort(ids, stable=True)
    counts = (ids.unsqueeze(1) == torch.arange(num_experts, device=ids.device)).sum(0)
    return perm, counts.cumsum(0).to(torch.int32)


def _pad_last(t: Tensor, dims, multiple: int) -> Tensor:
    """Zero-pad the trailing `len(dims)` dims of t up to multiples of `multiple`."""
    pad = []
    for size in reversed(dims):
        pad += [0, (-size) % multiple]
    return F.pad(t, pad) if any(pad) else t


def mome_ffn_grouped_mm(x: Tensor, modality_ids: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                        fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor,
                        fc2_bias: Tensor, gamma: Optional[Tensor] = None,
                        drop_path_scale: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
    """Sort tokens by expert once, then both FFN GEMMs as `torch._grouped_mm` (one call each).

    Per-row LN weights and biases are gathered by expert id; autograd does the backward.
    `_grouped_mm` needs 16-byte aligned strides: odd d/h are zero-padded (exact: padded
    columns are 0 through LN weight 0, GELU(0) = 0 and zero weight rows)."""
    d = x.shape[-1]
    num_experts, h = fc1_bias.shape
    flat = x.reshape(-1, d)
    ids = modality_ids.reshape(-1)
    perm, offs = _routing(ids, num_experts)
    if not torch.compiler.is_compiling() and flat.shape[0]:
        # an id outside [0, E) would leave its token out of every group (no host sync on CUDA)
        torch._assert_async(offs[-1] == flat.shape[0],
                            f"modality_ids route some tokens to none of the {num_experts} experts: "
                            f"every id must be in [0, {num_experts - 1}]")
    ids_sorted = ids.index_select(0, perm)
    z = F.layer_norm(flat.index_select(0, perm), (d,), eps=eps)
    z = z * norm_weight.index_select(0, ids_sorted) + norm_bias.index_select(0, ids_sorted)
    mult = 16 // x.element_size()
    z = _pad_last(z, (d,), mult)
    w1, w2 = _pad_last(fc1_weight, (d, h), mult), _pad_last(fc2_weight, (h, d), mult)
    b1 = _pad_last(fc1_bias, (h,), mult)
    act = F.gelu(torch._grouped_mm(z, w1, offs) + b1.index_select(0, ids_sorted))
    branch = torch._grouped_mm(act, w2, offs)[:, :d] + fc2_bias.index_select(0, ids_sorted)
    if gamma is not None:
        branch = branch * gamma
    if drop_path_scale is not None:
        branch = branch * drop_path_scale.reshape(-1).index_select(0, perm).unsqueeze(1).to(branch.dtype)
    # index_add writes each token once; its backward is an index_select (a contiguous grad,
    # which _grouped_mm's backward requires).
    return flat.index_add(0, perm, branch).reshape(x.shape)


def _grouped_mm_available(device: torch.device) -> Optional[str]:
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
        return "torch._grouped_mm needs sm90+ on CUDA"
    return None


def _grouped_mm_accepts(facts: dict) -> Optional[str]:
    dtype = facts.get("dtype")
    if dtype is not None and dtype not in KERNEL_FLOAT_DTYPES:
        return f"torch._grouped_mm takes fp32/bf16/fp16, got {dtype}"
    if facts.get("compiling") and dtype not in (None, torch.bfloat16):
        # its meta kernel (used when tracing) accepts bf16 only, although eager runs fp32
        return f"torch._grouped_mm cannot be traced by torch.compile for {dtype} (bf16 only)"
    return None


def _triton_accepts(facts: dict) -> Optional[str]:
    dtype = facts.get("dtype")
    if dtype is not None and dtype not in KERNEL_FLOAT_DTYPES:
        return f"the Triton FFN kernels take fp32/bf16/fp16, got {dtype}"
    return None


def mome_ffn_triton(x: Tensor, modality_ids: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                    fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor, fc2_bias: Tensor,
                    gamma: Optional[Tensor] = None, drop_path_scale: Optional[Tensor] = None,
                    eps: float = 1e-6, recompute_preact: Optional[bool] = None) -> Tensor:
    """The grouped Triton path (kernels, launchers and autograd in kernels/mome_ffn.py; see
    `vlmo_fast.kernels.mome_ffn.mome_ffn_triton`). Imported lazily: triton only when used."""
    from .kernels import mome_ffn as kernel  # noqa: PLC0415
    return kernel.mome_ffn_triton(x, modality_ids, norm_weight, norm_bias, fc1_weight, fc1_bias,
                                  fc2_weight, fc2_bias, gamma, drop_path_scale, eps,
                                  recompute_preact)


backends.register("ffn", "reference", mome_ffn_reference, preference={
    "cuda": ["triton", "grouped_mm", "reference"],
    "cpu": ["grouped_mm", "reference"],
    "default": ["reference"]})
backends.register("ffn", "grouped_mm", mome_ffn_grouped_mm, available=_grouped_mm_available,
                  accepts=_grouped_mm_accepts)
backends.register("ffn", "triton", mome_ffn_triton, available=triton_available,
                  accepts=_triton_accepts)


def register_ffn_impl(name: str, fn: Callable, available=backends.always_available, preference=None,
                      accepts: Optional[Callable[[dict], Optional[str]]] = None) -> None:
    """Plug an implementation with mome_ffn_reference's signature into the dispatch (the
    same as `backends.register("ffn", name, fn, ...)`). `available(device)` /
    `accepts(facts)` return None or why it cannot run; the facts of an FFN call are dtype,
    compiling, autocast (see `backends.register`)."""
    if not callable(fn):   # fn=None would mean "update" to backends.register
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    backends.register("ffn", name, fn, available=available, accepts=accepts, preference=preference)


@compile_time_constant
def _resolve(requested: Optional[str], device: torch.device, facts_items: tuple) -> str:
    # a compile-time constant: torch.compile traces only the chosen implementation
    return backends.resolve("ffn", requested, device, **dict(facts_items))


def mome_ffn(x: Tensor, modality_ids: Tensor, norm_weight: Tensor, norm_bias: Tensor,
             fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor, fc2_bias: Tensor,
             gamma: Optional[Tensor] = None, drop_path_scale: Optional[Tensor] = None,
             eps: float = 1e-6, backend: Optional[str] = None, validate: bool = True) -> Tensor:
    """x + drop_path_scale * gamma * FFN_{modality_ids}(LN_{modality_ids}(x)) for x [..., d].

    Under autocast (like nn.Linear) the expert GEMMs run in the autocast dtype with the
    chosen backend: x and the expert weights are cast to it, LayerNorm statistics stay fp32
    inside every backend, and the result keeps x's dtype (the branch is added back to the
    un-rounded x). fp64 input runs on the first backend that takes it (the reference)."""
    num_experts, d = norm_weight.shape
    if x.shape[-1] != d:
        raise ValueError(f"x has hidden size {x.shape[-1]} but the experts expect {d}")
    low_dtype = autocast_dtype(x)
    if x.device != fc1_weight.device or (low_dtype is None and x.dtype != fc1_weight.dtype):
        raise TypeError(f"x is {x.dtype} on {x.device} but the expert weights are "
                        f"{fc1_weight.dtype} on {fc1_weight.device}; cast the input or the module")
    if validate:
        check_modality_ids(modality_ids, x, num_experts)
    if drop_path_scale is not None and drop_path_scale.shape != modality_ids.shape:
        raise ValueError(f"drop_path_scale must have the token shape {tuple(modality_ids.shape)}, "
                         f"got {tuple(drop_path_scale.shape)}")
    run_dtype = low_dtype or x.dtype
    facts = (("autocast", low_dtype is not None), ("compiling", torch.compiler.is_compiling()),
             ("dtype", run_dtype))
    impl = backends.implementation("ffn", _resolve(backend, x.device, facts))
    if low_dtype is None:
        return impl(x, modality_ids, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight,
                    fc2_bias, gamma, drop_path_scale, eps)
    cast = lambda t: None if t is None else t.to(low_dtype)   # noqa: E731
    x_low = cast(x)
    with torch.autocast(x.device.type, enabled=False):
        out = impl(x_low, modality_ids, *map(cast, (norm_weight, norm_bias, fc1_weight, fc1_bias,
                                                    fc2_weight, fc2_bias, gamma)),
                   drop_path_scale, eps)
    if x.dtype == low_dtype:
        return out
    # the backend fused the residual in the low dtype; keep x's own precision on the stream
    return x + (out.to(x.dtype) - x_low.to(x.dtype))


class MoMEFeedForward(nn.Module):
    """The expert bank of one block: E (LayerNorm -> fc1 -> GELU -> fc2) experts, stacked."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, eps: float = 1e-6,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if hidden_dim < 1:
            raise ValueError(f"hidden_dim must be >= 1 (dim * mlp_ratio), got {hidden_dim}")
        fk = {"device": device, "dtype": dtype}
        self.dim, self.hidden_dim, self.num_experts, self.eps = dim, hidden_dim, num_experts, eps
        self.backend = backend  # None/"auto": backends.resolve decides per call
        self.norm_weight = nn.Parameter(torch.ones(num_experts, dim, **fk))
        self.norm_bias = nn.Parameter(torch.zeros(num_experts, dim, **fk))
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, dim, hidden_dim, **fk))
        self.fc1_bias = nn.Parameter(torch.zeros(num_experts, hidden_dim, **fk))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, hidden_dim, dim, **fk))
        self.fc2_bias = nn.Parameter(torch.zeros(num_experts, dim, **fk))
        self.reset_parameters()

    def no_weight_decay(self) -> set:
        """Names (relative to this module) that AdamW should not decay: the stacked expert
        norms and biases are 2-D, so the usual `ndim <= 1` rule would decay them."""
        return {"norm_weight", "norm_bias", "fc1_bias", "fc2_bias"}

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.trunc_normal_(self.fc1_weight, std=std)
        nn.init.trunc_normal_(self.fc2_weight, std=std)
        for p in (self.fc1_bias, self.fc2_bias, self.norm_bias):
            nn.init.zeros_(p)
        nn.init.ones_(self.norm_weight)

    def forward(self, x: Tensor, modality_ids: Tensor, gamma: Optional[Tensor] = None,
                drop_path_scale: Optional[Tensor] = None) -> Tensor:
        return mome_ffn(x, modality_ids, self.norm_weight, self.norm_bias, self.fc1_weight,
                        self.fc1_bias, self.fc2_weight, self.fc2_bias, gamma, drop_path_scale,
                        self.eps, backend=self.backend)

    def expert_forward(self, x: Tensor, expert: int) -> Tensor:
        """FFN_e(LN_e(x)) for one expert on all of x (no residual): routing tests and export."""
        z = F.layer_norm(x, (self.dim,), self.norm_weight[expert], self.norm_bias[expert], self.eps)
        return F.gelu(z @ self.fc1_weight[expert] + self.fc1_bias[expert]) @ self.fc2_weight[expert] \
            + self.fc2_bias[expert]

    def extra_repr(self) -> str:
        # What ran last for this device type (process-wide, from the dispatch registry).
        last = backends.last_used().get(f"ffn@{self.fc1_weight.device.type}")
        return (f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts} "
                f"({', '.join(MODALITY_NAMES[:self.num_experts])}), backend={self.backend or 'auto'}"
                + (f" (last ran: {last})" if last else ""))
