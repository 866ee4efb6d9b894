"""The Mixture-of-Modality-Experts feed-forward: E expert FFNs, each with its own LayerNorm,
routed per token by `modality_ids`.

    out[t] = x[t] + drop_path_scale[t] * gamma * FFN_e(LN_e(x[t])),   e = modality_ids[t]
    FFN_e(z) = GELU(z @ fc1_weight[e] + fc1_bias[e]) @ fc2_weight[e] + fc2_bias[e]

Expert weights are stored stacked so grouped kernels take them as they are:
norm_weight/norm_bias [E, d], fc1_weight [E, d, h], fc1_bias [E, h], fc2_weight [E, h, d],
fc2_bias [E, d]. Note fc*_weight are (in, out): the transpose of nn.Linear's (out, in).

`mome_ffn` is the functional entry point; `MoMEFeedForward` the module. Both go through
`vlmo_fast.backends.resolve("ffn", ...)`; "reference" (a per-expert loop) is always there.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backends

VISION, LANGUAGE, VISION_LANGUAGE = 0, 1, 2
MODALITY_NAMES = ("vision", "language", "vision-language")


def check_modality_ids(modality_ids: Tensor, x: Tensor, num_experts: int) -> None:
    """Validate routing ids against the tokens `x` [..., d] and the number of experts."""
    if not isinstance(modality_ids, Tensor):
        raise TypeError(f"modality_ids must be a torch.Tensor, got {type(modality_ids).__name__}")
    if modality_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"modality_ids must be an integer tensor, got dtype {modality_ids.dtype}")
    if tuple(modality_ids.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"modality_ids must have shape {tuple(x.shape[:-1])} (the token dims of x "
                         f"{tuple(x.shape)}), got {tuple(modality_ids.shape)}")
    if modality_ids.device != x.device:
        raise ValueError(f"modality_ids is on {modality_ids.device} but x is on {x.device}")
    if modality_ids.numel() == 0:
        return
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
    """Per-expert loop over masked tokens (index_select / index_copy): the plain reference."""
    d = x.shape[-1]
    flat = x.reshape(-1, d)
    ids = modality_ids.reshape(-1)
    branch = torch.zeros_like(flat)
    for e in range(norm_weight.shape[0]):
        rows = (ids == e).nonzero().squeeze(1)
        z = F.layer_norm(flat.index_select(0, rows), (d,), norm_weight[e], norm_bias[e], eps)
        hid = F.gelu(torch.addmm(fc1_bias[e], z, fc1_weight[e]))
        branch = branch.index_copy(0, rows, torch.addmm(fc2_bias[e], hid, fc2_weight[e]))
    if gamma is not None:
        branch = branch * gamma
    if drop_path_scale is not None:
        branch = branch * drop_path_scale.reshape(-1, 1).to(branch.dtype)
    return (flat + branch).reshape(x.shape)


backends.register("ffn", "reference", preference={"cpu": ["reference"], "cuda": ["reference"],
                                                 "default": ["reference"]})
_IMPLS = {"reference": mome_ffn_reference}


def register_ffn_impl(name: str, fn, available=backends._always, preference=None) -> None:
    """Plug an implementation with mome_ffn_reference's signature into the dispatch."""
    _IMPLS[name] = fn
    backends.register("ffn", name, available, preference)


def mome_ffn(x: Tensor, modality_ids: Tensor, norm_weight: Tensor, norm_bias: Tensor,
             fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor, fc2_bias: Tensor,
             gamma: Optional[Tensor] = None, drop_path_scale: Optional[Tensor] = None,
             eps: float = 1e-6, backend: Optional[str] = None, validate: bool = True) -> Tensor:
    """x + drop_path_scale * gamma * FFN_{modality_ids}(LN_{modality_ids}(x)) for x [..., d]."""
    num_experts, d = norm_weight.shape
    if x.shape[-1] != d:
        raise ValueError(f"x has hidden size {x.shape[-1]} but the experts expect {d}")
    if x.dtype != fc1_weight.dtype or x.device != fc1_weight.device:
        raise TypeError(f"x is {x.dtype} on {x.device} but the expert weights are "
                        f"{fc1_weight.dtype} on {fc1_weight.device}; cast the input or the module")
    if validate:
        check_modality_ids(modality_ids, x, num_experts)
    if drop_path_scale is not None and drop_path_scale.shape != modality_ids.shape:
        raise ValueError(f"drop_path_scale must have the token shape {tuple(modality_ids.shape)}, "
                         f"got {tuple(drop_path_scale.shape)}")
    name = backends.resolve("ffn", backend, x.device)
    return _IMPLS[name](x, modality_ids, norm_weight, norm_bias, fc1_weight, fc1_bias,
                        fc2_weight, fc2_bias, gamma, drop_path_scale, eps)


class MoMEFeedForward(nn.Module):
    """The expert bank of one block: E (LayerNorm -> fc1 -> GELU -> fc2) experts, stacked."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, eps: float = 1e-6,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
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
        return (f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts} "
                f"({', '.join(MODALITY_NAMES[:self.num_experts])}), backend={self.backend or 'auto'}")
