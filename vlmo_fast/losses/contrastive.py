"""Image-text contrastive (ITC) loss of VLMo / CLIP: symmetric InfoNCE over the global batch.

    S = exp(logit_scale) * I @ T^T          (logit_scale is the LOG of the scale, never clamped)
    loss = 1/2 * (mean_i CE(S[i, :], i) + mean_j CE(S[:, j], j))

Features are used as given: L2-normalise them first, as VLMo does (the kernels stay exact
for unnormalised features too, just on a slower path).

Backends (`vlmo_fast.backends`, op "contrastive"):
  * "triton": the fused kernels of `vlmo_fast.kernels.contrastive` - one pass over S tiles
    for both directions, O(N) statistics, tiles recomputed in backward. Auto on CUDA.
  * "reference": plain PyTorch that materialises the logits (fp32). Auto on CPU.

Distributed (torch.distributed initialised, world size W > 1, gather enabled):
  * Every rank holds n local pairs; the global batch has N = W * n pairs ordered BY RANK:
    global index = rank * n + local index (the order `all_gather` returns). Local pair i's
    target is global column rank * n + i. All ranks must have the same n.
  * "triton": only the text features are all-gathered. Each rank computes its n x N block of
    S once: complete row LSEs for its images, and partial column LSEs (over its n rows) for
    all N texts, which an all-reduce of two N-vectors (max, then sum of exp) turns into the
    global column LSEs. Backward recomputes the block: d(images) is complete on the owning
    rank; d(texts) for all N texts is reduce-scattered back to the owners.
  * "reference": images AND texts are all-gathered with gradient (open_clip's
    gather_with_grad + local_loss): local image rows against all texts, local text rows
    against all images; the all-gather's backward sums each slice's gradient onto its owner.
  * Both return on every rank the global loss VALUE (identical on all ranks), while the
    gradient is that of this rank's share of it (its rows' and columns' terms). Summed over
    ranks, the gradients equal those of the single-process loss on the concatenated batch:
    per-feature gradients land on the owning rank, logit_scale's add up across ranks.
    Under DDP / DeepSpeed, which AVERAGE gradients over ranks, pass
    `rank_grad_reduction="mean"`: gradients are then pre-multiplied by W.
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backends

OP = "contrastive"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class ContrastiveStats(NamedTuple):
    """Optional outputs of `contrastive_loss(..., return_stats=True)` (all detached).

    row_lse: [n] log-sum-exp of this rank's image rows over all N texts.
    col_lse: [n] log-sum-exp of this rank's text columns over all N images.
    i2t_accuracy / t2i_accuracy: 0-d, fraction of the GLOBAL batch whose argmax is the target.
    backend: the implementation that ran.
    """
    row_lse: Tensor
    col_lse: Tensor
    i2t_accuracy: Tensor
    t2i_accuracy: Tensor
    backend: str


# ----------------------------------------------------------------------------- dispatch

def _triton_available(device: torch.device) -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return None  # the CPU interpreter: correct but slow, meant for tests
    return "needs a CUDA device (or TRITON_INTERPRET=1 for the slow CPU interpreter)"


backends.register(OP, "reference", preference={"cpu": ["reference"], "cuda": ["triton", "reference"],
                                              "default": ["reference"]})
backends.register(OP, "triton", available=_triton_available)


# ----------------------------------------------------------------------------- collectives

class _Dist(NamedTuple):
    group: Optional[object]
    world: int
    rank: int


def _resolve_dist(gather: Union[bool, str], group) -> Optional[_Dist]:
    """None for a plain single-process loss, else the process group to span."""
    if gather not in (True, False, "auto"):
        raise ValueError(f"gather must be True, False or 'auto', got {gather!r}")
    if gather is False or not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size(group)
    if world == 1:
        return None
    return _Dist(group, world, dist.get_rank(group))


def _is_nccl(group) -> bool:
    return dist.get_backend(group) == "nccl"


def _all_gather_rows(x: Tensor, ctx: _Dist) -> Tensor:
    """[n, ...] per rank -> [W * n, ...] in rank order (no autograd)."""
    x = x.contiguous()
    if _is_nccl(ctx.group):
        out = x.new_empty((ctx.world * x.shape[0],) + tuple(x.shape[1:]))
        dist.all_gather_into_tensor(out, x, group=ctx.group)
        return out
    parts = [torch.empty_like(x) for _ in range(ctx.world)]
    dist.all_gather(parts, x, group=ctx.group)
    return torch.cat(parts)


def _reduce_scatter_rows(x: Tensor, ctx: _Dist) -> Tensor:
    """Sum [W * n, ...] over ranks and return this rank's [n, ...] slice (no autograd)."""
    n = x.shape[0] // ctx.world
    x = x.contiguous()
    if _is_nccl(ctx.group):
        out = x.new_empty((n,) + tuple(x.shape[1:]))
        dist.reduce_scatter_tensor(out, x, group=ctx.group)
        return out
    # gloo has no reduce-scatter: all-reduce and keep our slice.
    dist.all_reduce(x, group=ctx.group)
    return x[ctx.rank * n:(ctx.rank + 1) * n].clone()


def _all_reduce_logsumexp(lse: Tensor, ctx: _Dist) -> Tensor:
    """Merge per-rank log-sum-exps (each over that rank's rows) into the global one."""
    peak = lse.clone()
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=ctx.group)
    total = torch.exp(lse - peak)
    dist.all_reduce(total, group=ctx.group)
    return peak + torch.log(total)


def _check_equal_local_batch(n: int, device: torch.device, ctx: _Dist) -> None:
    sizes = torch.tensor([n, -n], device=device, dtype=torch.int64)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=ctx.group)
    if int(sizes[0]) != n or int(-sizes[1]) != n:
        raise ValueError(f"every rank must pass the same number of pairs; this rank has {n}, "
                         f"the ranks range from {int(-sizes[1])} to {int(sizes[0])}")


class _GatherRowsWithGrad(torch.autograd.Function):
    """all_gather whose backward sums each rank's gradient for a slice onto its owner."""

    @staticmethod
    def forward(ctx, x: Tensor, dctx: _Dist) -> Tensor:
        ctx.dctx = dctx
        return _all_gather_rows(x, dctx)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _reduce_scatter_rows(grad, ctx.dctx), None


def _global_value(share: Tensor, dctx: Optional[_Dist], grad_multiplier: float) -> Tensor:
    """A tensor whose value is the sum of `share` over ranks and whose gradient is
    grad_multiplier * d(share): the global loss for logging, this rank's part for backward."""
    if dctx is None:
        return share
    total = share.detach().clone()
    dist.all_reduce(total, group=dctx.group)
    scaled = share * grad_multiplier
    return scaled + (total - scaled.detach())


# ----------------------------------------------------------------------------- reference

def _contrastive_reference(img: Tensor, txt: Tensor, logit_scale: Tensor, dctx: Optional[_Dist],
                           want_stats: bool) -> Tuple[Tensor, Optional[tuple]]:
    """This rank's share of the loss with materialised fp32 logits (n x N, both directions)."""
    n = img.shape[0]
    world, rank = (dctx.world, dctx.rank) if dctx else (1, 0)
    total = n * world
    img32, txt32 = img.float(), txt.float()
    if dctx is None:
        img_all, txt_all = img32, txt32
    else:
        img_all = _GatherRowsWithGrad.apply(img32, dctx)
        txt_all = _GatherRowsWithGrad.apply(txt32, dctx)
    scale = logit_scale.float().reshape(()).exp()
    logits_i2t = scale * img32 @ txt_all.t()       # local images x global texts
    logits_t2i = scale * txt32 @ img_all.t()       # local texts x global images
    target = torch.arange(n, device=img.device) + rank * n
    share = (F.cross_entropy(logits_i2t, target, reduction="sum")
             + F.cross_entropy(logits_t2i, target, reduction="sum")) / (2 * total)
    stats = None
    if want_stats:
        with torch.no_grad():
            hits = torch.stack([(logits_i2t.argmax(1) == target).sum(),
                                (logits_t2i.argmax(1) == target).sum()]).float()
            if dctx is not None:
                dist.all_reduce(hits, group=dctx.group)
            stats = (logits_i2t.logsumexp(1), logits_t2i.logsumexp(1), hits[0] / total, hits[1] / total)
    return share, stats


# ----------------------------------------------------------------------------- fused (triton)

def _fused_contrastive(img: Tensor, txt: Tensor, logit_scale: Tensor, dctx: Optional[_Dist],
                       want_stats: bool):
    """This rank's share of the loss through the Triton kernels (`ContrastiveFunction` in
    kernels/contrastive.py; imported lazily so that triton loads only when used)."""
    from ..kernels.contrastive import fused_contrastive
    return fused_contrastive(img, txt, logit_scale, dctx, want_stats)


# ----------------------------------------------------------------------------- public API

def _validate(img, txt, logit_scale, check_finite: bool) -> None:
    for name, t in (("image_features", img), ("text_features", txt), ("logit_scale", logit_scale)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("image_features", img), ("text_features", txt)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has unsupported dtype {t.dtype}; expected one of "
                            f"{[str(d) for d in SUPPORTED_DTYPES]}")
    if img.shape[0] != txt.shape[0]:
        raise ValueError(f"image_features has N={img.shape[0]} rows but text_features has "
                         f"N={txt.shape[0]}: pairs must match one to one")
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"image_features has D={img.shape[1]} but text_features has D={txt.shape[1]}")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"empty features: image_features has shape {tuple(img.shape)}")
    if img.dtype != txt.dtype:
        raise TypeError(f"image_features ({img.dtype}) and text_features ({txt.dtype}) must share a dtype")
    if img.device != txt.device or logit_scale.device != img.device:
        raise ValueError(f"image_features ({img.device}), text_features ({txt.device}) and "
                         f"logit_scale ({logit_scale.device}) must be on one device")
    if logit_scale.numel() != 1 or not logit_scale.is_floating_point():
        raise ValueError(f"logit_scale must be a single floating-point value (the LOG of the "
                         f"scale), got shape {tuple(logit_scale.shape)} dtype {logit_scale.dtype}")
    if check_finite:
        # A host sync on the accelerator: opt-in for debugging.
        for name, t in (("image_features", img), ("text_features", txt), ("logit_scale", logit_scale)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains non-finite values (inf or NaN)")


def contrastive_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor, *,
                     gather: Union[bool, str] = "auto", group=None, backend: Optional[str] = None,
                     return_stats: bool = False, check_finite: bool = False,
                     rank_grad_reduction: str = "sum"):
    """Symmetric image-text InfoNCE: 1/2 (mean_i CE(S[i,:], i) + mean_j CE(S[:,j], j)),
    S = exp(logit_scale) * image_features @ text_features^T over the global batch.

    image_features, text_features: [n, D] matched pairs (this rank's), float32/bfloat16/float16.
    logit_scale: one value, the log of the scale (VLMo/CLIP init log(1/0.07)); gets a gradient.
    gather: "auto" spans `group` (default world) when torch.distributed is initialised with
        more than one rank; False keeps the loss local; without torch.distributed it is always
        the plain single-process loss.
    backend: "triton" | "reference" | None/"auto" (see `vlmo_fast.backends`).
    return_stats: also return a `ContrastiveStats` (LSEs, accuracies, backend).
    check_finite: raise if any input is inf/NaN (and, on CUDA, check equal per-rank batch);
        costs a host sync.
    rank_grad_reduction: "sum" (gradients summed over ranks give the global gradient) or
        "mean" (for DDP/DeepSpeed gradient averaging: gradients pre-multiplied by world size).
    Returns the global loss (fp32 0-d), or (loss, stats).
    """
    _validate(image_features, text_features, logit_scale, check_finite)
    if rank_grad_reduction not in ("sum", "mean"):
        raise ValueError(f"rank_grad_reduction must be 'sum' or 'mean', got {rank_grad_reduction!r}")
    dctx = _resolve_dist(gather, group)
    if dctx is not None and (image_features.device.type == "cpu" or check_finite):
        _check_equal_local_batch(image_features.shape[0], image_features.device, dctx)
    name = backends.resolve(OP, backend, image_features.device)
    if name == "triton":
        share, row_lse, col_lse, i2t, t2i = _fused_contrastive(
            image_features.contiguous(), text_features.contiguous(), logit_scale, dctx, return_stats)
        stats = (row_lse, col_lse, i2t, t2i) if return_stats else None
    else:
        share, stats = _contrastive_reference(image_features, text_features, logit_scale, dctx,
                                              return_stats)
    multiplier = float(dctx.world) if (dctx is not None and rank_grad_reduction == "mean") else 1.0
    loss = _global_value(share, dctx, multiplier)
    if not return_stats:
        return loss
    return loss, ContrastiveStats(*(t.detach() for t in stats), backend=name)


def contrastive_loss_reference(image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                               **kwargs):
    """`contrastive_loss` forced onto the plain PyTorch backend."""
    return contrastive_loss(image_features, text_features, logit_scale, backend="reference", **kwargs)


class ContrastiveLoss(nn.Module):
    """Module form of `contrastive_loss`. Owns a learnable `logit_scale` (init log(1/temperature),
    never clamped) unless `learn_logit_scale=False`, in which case pass it to forward()."""

    def __init__(self, init_temperature: float = 0.07, learn_logit_scale: bool = True, *,
                 gather: Union[bool, str] = "auto", group=None, backend: Optional[str] = None,
                 check_finite: bool = False, rank_grad_reduction: str = "sum"):
        super().__init__()
        if learn_logit_scale:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        else:
            self.register_parameter("logit_scale", None)
        self.gather, self.group, self.backend = gather, group, backend
        self.check_finite, self.rank_grad_reduction = check_finite, rank_grad_reduction

    def forward(self, image_features: Tensor, text_features: Tensor,
                logit_scale: Optional[Tensor] = None, return_stats: bool = False):
        if logit_scale is None:
            if self.logit_scale is None:
                raise ValueError("logit_scale is required: this ContrastiveLoss was built with "
                                 "learn_logit_scale=False")
            logit_scale = self.logit_scale
        return contrastive_loss(image_features, text_features, logit_scale, gather=self.gather,
                                group=self.group, backend=self.backend, return_stats=return_stats,
                                check_finite=self.check_finite,
                                rank_grad_reduction=self.rank_grad_reduction)

    def extra_repr(self) -> str:
        return f"gather={self.gather!r}, backend={self.backend!r}"
