"""Image-text contrastive (ITC) loss of VLMo / CLIP: symmetric InfoNCE over the global batch.

    S = exp(logit_scale) * I @ T^T          (logit_scale is the LOG of the scale)
    loss = 1/2 * (mean_i CE(S[i, :], i) + mean_j CE(S[:, j], j))

Features are used as given: L2-normalise them first, as VLMo does (the kernels stay exact
for unnormalised features too, just on a slower path).

The scale: VLMo's reference never clamps logit_scale; CLIP / open_clip clamp it to
[0, log(100)] after every optimiser step. By default nothing is clamped here either (VLMo);
`max_logit_scale=math.log(100)` clamps it on the way in, CLIP style (no gradient above the
bound). exp(logit_scale) is computed in fp32, so logit_scale must stay <= log(float32 max)
~ 88.72: above that the scale is not representable and the loss would be NaN; such a value
raises a ValueError on the CPU and fails an asynchronous device assertion on CUDA (no host
sync). Below it the loss of normalised features is finite (fp32 logits up to ~3.4e38).
With non-finite features the loss is NaN and so are the reported accuracies (an argmax over
NaN would otherwise still "hit" some targets); the trainer is where non-finite losses are
detected.

Backends (`vlmo_fast.backends`, op "contrastive"):
  * "triton": the fused kernels of `vlmo_fast.kernels.contrastive` - one pass over S tiles
    for both directions, O(N) statistics, tiles recomputed in backward.
  * "chunked": plain PyTorch over tiles of S with its own autograd.Function
    (`vlmo_fast.losses.contrastive_chunked`): O(N) memory on any device.
  * "reference": plain PyTorch that materialises the logits (fp32).
  Automatic choice: Triton on CUDA; otherwise (CPU, or CUDA without Triton) the reference
  while its materialised matrices fit `VLMO_FAST_CONTRASTIVE_REFERENCE_MAX_MB` (default
  REFERENCE_MAX_MB: 1 MiB on CPU, i.e. N up to ~200, 1 GiB elsewhere), else chunked.
  Plug-ins: `backends.register("contrastive", name, fn, available=, accepts=, preference=)`
  (facts: n, n_global, dim, dtype) with every backend's signature
      fn(img [n, D], txt [n, D], logit_scale, group, want_stats)
          -> (share, row_lse [n], col_lse [n], i2t_accuracy, t2i_accuracy)
  logit_scale: one value, already bounded; group: None (single process) or the
  `vlmo_fast.distributed.GroupInfo` whose global batch (below) the loss spans; share: this
  rank's share of the loss (its rows' and its columns' cross-entropies, each / 2N), with
  gradients; the four statistics (detached, global accuracies) are read only when
  want_stats, else may be None. The dispatcher makes the global value and the rank
  reduction from the share.

Distributed (torch.distributed initialised, world size W > 1, gather enabled):
  * Every rank holds n local pairs; the global batch has N = W * n pairs ordered BY RANK:
    global index = rank * n + local index (the order `all_gather` returns). Local pair i's
    target is global column rank * n + i. All ranks must have the same n.
  * "triton" and "chunked": only the text features are all-gathered. Each rank computes its n x N block of
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

import math
import numbers
from typing import Dict, List, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backends
from ..distributed import (GroupInfo, all_gather_rows_with_grad, all_reduce, check_same_row_count,
                           group_info)
from ..env import KERNEL_FLOAT_DTYPES, env_choice, triton_available

OP = "contrastive"
# log of the largest float32: exp(logit_scale) above this is +inf and the loss NaN.
LOG_FLOAT32_MAX = math.log(torch.finfo(torch.float32).max)
# Automatic choice: the reference materialises (for fwd+bwd) about three fp32 n x N matrices
# per direction; above this many MiB of them the chunked backend runs instead. On CPU the
# chunked backend is already faster from N ~ 256 (4 GEMMs instead of 6, cache-sized tiles;
# benchmarks/results/contrastive-cpu.md), so the CPU budget is tiny; on a GPU without Triton
# the reference's large cuBLAS GEMMs win until memory is the problem.
REFERENCE_MAX_MB = {"cpu": 1.0, "default": 1024.0}


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

def reference_materialised_mb(facts: Dict) -> Optional[float]:
    """MiB of n x N fp32 matrices the reference keeps for a fwd+bwd of a call with these
    `resolve` facts (logits, log-softmax and its gradient, both directions); None if unknown."""
    n, n_global = facts.get("n"), facts.get("n_global")
    if n is None or n_global is None:
        return None
    return 2 * 3 * 4 * n * n_global / 2**20


def _reference_max_mb(device_type: str) -> float:
    raw = env_choice("VLMO_FAST_CONTRASTIVE_REFERENCE_MAX_MB")
    if raw is None:
        return REFERENCE_MAX_MB.get(device_type, REFERENCE_MAX_MB["default"])
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"environment variable VLMO_FAST_CONTRASTIVE_REFERENCE_MAX_MB={raw!r}: "
                         f"expected a non-negative number of MiB")
    return value


def _auto_order(device_type: str):
    """Preference for one device type: Triton first on CUDA (the native path), then the
    reference for small batches and the chunked backend where the N x N matrices are big
    (or, on CUDA, where Triton cannot run)."""
    def order(facts: Dict) -> List[str]:
        mb = reference_materialised_mb(facts)
        big = mb is not None and mb > _reference_max_mb(device_type)
        tail = ["chunked", "reference"] if big else ["reference", "chunked"]
        return (["triton"] + tail) if device_type == "cuda" else tail
    return order


# ----------------------------------------------------------------------------- process group

def _resolve_dist(gather: Union[bool, str], group) -> Optional[GroupInfo]:
    """None for a plain single-process loss, else the process group to span."""
    if gather not in (True, False, "auto"):
        raise ValueError(f"gather must be True, False or 'auto', got {gather!r}")
    return None if gather is False else group_info(group)


def _global_value(share: Tensor, dctx: Optional[GroupInfo], grad_multiplier: float) -> Tensor:
    """A tensor whose value is the sum of `share` over ranks and whose gradient is
    grad_multiplier * d(share): the global loss for logging, this rank's part for backward."""
    if dctx is None:
        return share
    total = all_reduce(share.detach().clone(), "sum", dctx.group)
    scaled = share * grad_multiplier
    return scaled + (total - scaled.detach())


# ----------------------------------------------------------------------------- reference

def _contrastive_reference(img: Tensor, txt: Tensor, logit_scale: Tensor, dctx: Optional[GroupInfo],
                           want_stats: bool) -> tuple:
    """This rank's share of the loss with materialised fp32 logits (n x N, both directions)."""
    n = img.shape[0]
    world, rank = (dctx.world, dctx.rank) if dctx else (1, 0)
    total = n * world
    img32, txt32 = img.float(), txt.float()
    if dctx is None:
        img_all, txt_all = img32, txt32
    else:
        img_all = all_gather_rows_with_grad(img32, dctx.group)
        txt_all = all_gather_rows_with_grad(txt32, dctx.group)
    scale = logit_scale.float().reshape(()).exp()
    logits_i2t = scale * img32 @ txt_all.t()       # local images x global texts
    logits_t2i = scale * txt32 @ img_all.t()       # local texts x global images
    target = torch.arange(n, device=img.device) + rank * n
    # Divide before summing: at scales near float32's limit the per-pair terms are finite
    # but their sum would not be.
    share = ((F.cross_entropy(logits_i2t, target, reduction="none") / (2 * total)).sum()
             + (F.cross_entropy(logits_t2i, target, reduction="none") / (2 * total)).sum())
    if not want_stats:
        return share, None, None, None, None
    with torch.no_grad():
        hits = torch.stack([(logits_i2t.argmax(1) == target).sum(),
                            (logits_t2i.argmax(1) == target).sum()]).float()
        if dctx is not None:
            all_reduce(hits, "sum", dctx.group)
        return (share, logits_i2t.logsumexp(1), logits_t2i.logsumexp(1), hits[0] / total,
                hits[1] / total)


# ----------------------------------------------------------------------------- chunked, fused

def _contrastive_chunked(img: Tensor, txt: Tensor, logit_scale: Tensor, dctx: Optional[GroupInfo],
                         want_stats: bool) -> tuple:
    """This rank's share of the loss over tiles of S in plain PyTorch (contrastive_chunked.py)."""
    from .contrastive_chunked import ChunkedContrastiveFunction
    return ChunkedContrastiveFunction.apply(img, txt, logit_scale, dctx, want_stats)


def _fused_contrastive(img: Tensor, txt: Tensor, logit_scale: Tensor, dctx: Optional[GroupInfo],
                       want_stats: bool) -> tuple:
    """This rank's share of the loss through the Triton kernels (`ContrastiveFunction` in
    kernels/contrastive.py; imported lazily so that triton loads only when used)."""
    from ..kernels.contrastive import fused_contrastive
    return fused_contrastive(img, txt, logit_scale, dctx, want_stats)


backends.register(OP, "reference", _contrastive_reference,
                  preference={"cpu": _auto_order("cpu"), "cuda": _auto_order("cuda"),
                              "default": _auto_order("default")})
backends.register(OP, "triton", _fused_contrastive, available=triton_available)
backends.register(OP, "chunked", _contrastive_chunked)


# ----------------------------------------------------------------------------- public API

def _validate(img, txt, logit_scale, check_finite: bool) -> None:
    for name, t in (("image_features", img), ("text_features", txt), ("logit_scale", logit_scale)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("image_features", img), ("text_features", txt)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(t.shape)}")
        if t.dtype not in KERNEL_FLOAT_DTYPES:
            raise TypeError(f"{name} has unsupported dtype {t.dtype}; expected one of "
                            f"{[str(d) for d in KERNEL_FLOAT_DTYPES]}")
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


def _check_max_logit_scale(max_logit_scale) -> Optional[float]:
    if max_logit_scale is None:
        return None
    if (isinstance(max_logit_scale, bool) or not isinstance(max_logit_scale, numbers.Real)
            or not math.isfinite(max_logit_scale) or max_logit_scale > LOG_FLOAT32_MAX):
        raise ValueError(f"max_logit_scale must be None or a finite number <= {LOG_FLOAT32_MAX:.4f} "
                         f"(log of the largest float32; CLIP uses math.log(100)), got "
                         f"{max_logit_scale!r}")
    return float(max_logit_scale)


def _bounded_logit_scale(logit_scale: Tensor, max_logit_scale: Optional[float]) -> Tensor:
    """Clamp (when asked) and check that exp(logit_scale) is a finite float32: a clear error
    instead of a NaN loss. CPU: ValueError; CUDA: asynchronous device assertion (no sync)."""
    if max_logit_scale is not None:
        logit_scale = logit_scale.clamp(max=max_logit_scale)
    message = (f"logit_scale must be finite and <= {LOG_FLOAT32_MAX:.4f} (the log of the largest "
               f"float32): exp(logit_scale) is the fp32 scale of the logits and beyond that the "
               f"loss is NaN. VLMo does not clamp it; CLIP clamps it at log(100): pass "
               f"max_logit_scale=math.log(100) to do the same")
    if logit_scale.device.type == "cpu":
        value = float(logit_scale.detach().reshape(()))
        if not value <= LOG_FLOAT32_MAX or math.isnan(value):
            raise ValueError(f"{message}; got {value!r}")
    else:
        # NaN compares false, so it fails the assertion too.
        torch._assert_async((logit_scale.detach().reshape(()) <= LOG_FLOAT32_MAX), message)
    return logit_scale


def _accuracy_or_nan(acc: Tensor, *lses: Tensor) -> Tensor:
    """NaN instead of an accuracy when any log-sum-exp is not finite (NaN/inf features): an
    argmax over NaN logits would still count some rows as hits. Any non-finite feature reaches
    a row or column LSE on every rank (rows span all texts, columns all images), so this local
    rule gives the same answer on all ranks."""
    finite = torch.stack([torch.isfinite(x).all() for x in lses]).all()
    return torch.where(finite, acc, torch.full_like(acc, float("nan")))


def contrastive_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor, *,
                     gather: Union[bool, str] = "auto", group=None, backend: Optional[str] = None,
                     return_stats: bool = False, check_finite: bool = False,
                     rank_grad_reduction: str = "sum", max_logit_scale: Optional[float] = None):
    """Symmetric image-text InfoNCE: 1/2 (mean_i CE(S[i,:], i) + mean_j CE(S[:,j], j)),
    S = exp(logit_scale) * image_features @ text_features^T over the global batch.

    image_features, text_features: [n, D] matched pairs (this rank's), float32/bfloat16/float16.
    logit_scale: one value, the log of the scale (VLMo/CLIP init log(1/0.07)); gets a gradient.
        Must be <= log(float32 max) ~ 88.72 (ValueError on CPU, device assertion on CUDA).
    gather: "auto" spans `group` (default world) when torch.distributed is initialised with
        more than one rank; False keeps the loss local; without torch.distributed it is always
        the plain single-process loss.
    backend: "triton" | "chunked" | "reference" | None/"auto" (see `vlmo_fast.backends`).
    return_stats: also return a `ContrastiveStats` (LSEs, accuracies, backend); accuracies
        are NaN when the features are not finite.
    check_finite: raise if any input is inf/NaN (and, on CUDA, check equal per-rank batch);
        costs a host sync.
    rank_grad_reduction: "sum" (gradients summed over ranks give the global gradient) or
        "mean" (for DDP/DeepSpeed gradient averaging: gradients pre-multiplied by world size).
    max_logit_scale: None (VLMo: never clamped) or an upper bound applied to logit_scale
        before use (CLIP: math.log(100)); no gradient flows to logit_scale above it.
    Returns the global loss (fp32 0-d), or (loss, stats).
    """
    _validate(image_features, text_features, logit_scale, check_finite)
    if rank_grad_reduction not in ("sum", "mean"):
        raise ValueError(f"rank_grad_reduction must be 'sum' or 'mean', got {rank_grad_reduction!r}")
    logit_scale = _bounded_logit_scale(logit_scale, _check_max_logit_scale(max_logit_scale))
    dctx = _resolve_dist(gather, group)
    if dctx is not None and (image_features.device.type == "cpu" or check_finite):
        check_same_row_count(image_features, dctx.group, what="pairs")
    n, dim = image_features.shape
    name = backends.resolve(OP, backend, image_features.device, n=n,
                            n_global=n * (dctx.world if dctx is not None else 1), dim=dim,
                            dtype=image_features.dtype)
    out = backends.implementation(OP, name)(image_features, text_features, logit_scale, dctx,
                                            return_stats)
    if not isinstance(out, (tuple, list)) or len(out) != 5:
        raise TypeError(f"contrastive backend {name!r} returned {type(out).__name__}; expected a "
                        f"5-tuple (share, row_lse, col_lse, i2t_accuracy, t2i_accuracy)")
    share, *stats = out
    multiplier = float(dctx.world) if (dctx is not None and rank_grad_reduction == "mean") else 1.0
    loss = _global_value(share, dctx, multiplier)
    if not return_stats:
        return loss
    row_lse, col_lse, i2t, t2i = (t.detach() for t in stats)
    i2t, t2i = (_accuracy_or_nan(acc, row_lse, col_lse) for acc in (i2t, t2i))
    return loss, ContrastiveStats(row_lse, col_lse, i2t, t2i, backend=name)


def contrastive_loss_reference(image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                               **kwargs):
    """`contrastive_loss` forced onto the plain PyTorch backend."""
    return contrastive_loss(image_features, text_features, logit_scale, backend="reference", **kwargs)


def _initial_logit_scale(init_temperature) -> float:
    if (isinstance(init_temperature, bool) or not isinstance(init_temperature, numbers.Real)
            or not math.isfinite(init_temperature) or init_temperature <= 0):
        raise ValueError(f"init_temperature must be a positive finite number (VLMo/CLIP: 0.07), "
                         f"got {init_temperature!r}")
    value = math.log(1.0 / init_temperature)
    if value > LOG_FLOAT32_MAX:
        raise ValueError(f"init_temperature={init_temperature!r} gives logit_scale {value:.2f} > "
                         f"{LOG_FLOAT32_MAX:.2f}: its exp is beyond float32")
    return value


class ContrastiveLoss(nn.Module):
    """Module form of `contrastive_loss`. Owns a learnable `logit_scale` (init log(1/temperature),
    clamped only if `max_logit_scale` is given) unless
    `learn_logit_scale=False`, in which case pass it to forward()."""

    def __init__(self, init_temperature: float = 0.07, learn_logit_scale: bool = True, *,
                 gather: Union[bool, str] = "auto", group=None, backend: Optional[str] = None,
                 check_finite: bool = False, rank_grad_reduction: str = "sum",
                 max_logit_scale: Optional[float] = None):
        super().__init__()
        init = _initial_logit_scale(init_temperature)
        self.max_logit_scale = _check_max_logit_scale(max_logit_scale)
        if learn_logit_scale:
            # shape [1], not 0-d: DeepSpeed cannot broadcast or partition 0-d parameters
            self.logit_scale = nn.Parameter(torch.full((1,), init))
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
                                rank_grad_reduction=self.rank_grad_reduction,
                                max_logit_scale=self.max_logit_scale)

    def extra_repr(self) -> str:
        return (f"gather={self.gather!r}, backend={self.backend!r}, "
                f"max_logit_scale={self.max_logit_scale!r}")
