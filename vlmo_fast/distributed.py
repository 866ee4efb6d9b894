"""Collectives over a torch.distributed process group: the one place losses, kernels and
training code call them from (this module imports nothing from vlmo_fast, so any layer may
import it).

Rows: every gather and scatter works along dim 0 ("rows") of a tensor and needs the SAME row
count on every rank; the gathered order is by rank (global row = rank * n + local row), the
order `all_gather` returns. Variable row counts are not supported: `check_same_row_count`
says which rank differs (one small all-reduce, a host sync) before a gather would fail or
hang inside the backend.

    world_and_rank(group)               (world size, this rank); (1, 0) without a group
    group_info(group)                   GroupInfo(group, world, rank), or None when there is
                                        nothing to span (not initialised, or one rank)
    all_gather_rows(x)                  [n, ...] per rank -> [W * n, ...], no gradient
    all_gather_rows_with_grad(x)        the same, differentiable: the backward SUMS every
                                        rank's gradient of slice r onto rank r
                                        (open_clip's gather_with_grad)
    reduce_scatter_rows(x)              [W * n, ...] per rank -> the sum over ranks of this
                                        rank's slice [n, ...]
    all_reduce_logsumexp(lse)           per-rank log-sum-exps (over each rank's terms) ->
                                        the log-sum-exp over all ranks' terms
    all_reduce(t, op)                   in place, op "sum" / "max" / "min"
    check_same_row_count(x), barrier()

Without torch.distributed (unavailable or not initialised), or over a group of one rank,
every function is the single-process identity (gathers return x, detached where the function
carries no gradient), so callers need no `if distributed:` branches.

Backends: with NCCL the gathers and the reduce-scatter use one flat output buffer
(`all_gather_into_tensor`, `reduce_scatter_tensor`); gloo has no reduce-scatter, so there it
is an all-reduce of a copy of which this rank keeps its slice (W times the traffic; gloo runs
on CPU and in tests). Gradients of the differentiable gather are summed, not averaged: under
DDP / DeepSpeed, which average gradients over ranks, the caller scales (see
`vlmo_fast.losses.contrastive`'s `rank_grad_reduction`).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

REDUCE_OPS = ("sum", "max", "min")


class GroupInfo(NamedTuple):
    """A process group of more than one rank that this process belongs to."""
    group: Optional[object]   # the torch.distributed group; None = the default (world) group
    world: int
    rank: int


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_and_rank(group=None) -> Tuple[int, int]:
    """(world size, rank of this process) in `group` (None: the default group); (1, 0) when
    torch.distributed is unavailable or not initialised."""
    if not _initialized():
        return 1, 0
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the "
                         f"process group {group!r}")
    return dist.get_world_size(group), rank


def group_info(group=None) -> Optional[GroupInfo]:
    """The group to span, or None when collectives over it are the identity (torch.distributed
    unavailable or not initialised, or a group of one rank)."""
    world, rank = world_and_rank(group)
    return None if world == 1 else GroupInfo(group, world, rank)


def _is_nccl(group) -> bool:
    return dist.get_backend(group) == "nccl"


def all_gather_rows(x: Tensor, group=None) -> Tensor:
    """[n, ...] on every rank -> [world * n, ...] in rank order. No gradient flows through the
    result (see `all_gather_rows_with_grad`); every rank must pass the same shape."""
    info = group_info(group)
    if info is None:
        return x.detach()
    x = x.detach().contiguous()
    if _is_nccl(group):
        out = x.new_empty((info.world * x.shape[0],) + tuple(x.shape[1:]))
        dist.all_gather_into_tensor(out, x, group=group)
        return out
    parts = [torch.empty_like(x) for _ in range(info.world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts)


def reduce_scatter_rows(x: Tensor, group=None) -> Tensor:
    """Sum [world * n, ...] over the ranks of `group` and return this rank's slice
    [n, ...] (rows rank * n to (rank + 1) * n). No autograd; x is left unchanged."""
    info = group_info(group)
    if info is None:
        return x
    if x.dim() == 0 or x.shape[0] % info.world:
        raise ValueError(f"reduce_scatter_rows needs a row count divisible by the world size "
                         f"{info.world}, got shape {tuple(x.shape)}")
    n = x.shape[0] // info.world
    if _is_nccl(group):
        out = x.new_empty((n,) + tuple(x.shape[1:]))
        dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
        return out
    # gloo has no reduce-scatter: all-reduce a copy (never the caller's tensor, which may be
    # an upstream gradient autograd still holds) and keep our slice.
    total = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(total, group=group)
    return total[info.rank * n:(info.rank + 1) * n].clone()


class _GatherRowsWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient of a slice onto its owner."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return all_gather_rows(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return reduce_scatter_rows(grad, ctx.group), None


def all_gather_rows_with_grad(x: Tensor, group=None) -> Tensor:
    """`all_gather_rows` that autograd can go through: the gradient of x is the SUM over ranks
    of each rank's gradient of x's slice of the result (so the gradients of a loss whose
    per-rank parts are summed equal those of the single-process loss on the whole batch)."""
    if group_info(group) is None:
        return x
    return _GatherRowsWithGrad.apply(x, group)


def all_reduce(tensor: Tensor, op: str = "sum", group=None) -> Tensor:
    """Reduce `tensor` over the ranks of `group` IN PLACE with op "sum", "max" or "min";
    returns it (unchanged without a group)."""
    if op not in REDUCE_OPS:
        raise ValueError(f"op must be one of {REDUCE_OPS}, got {op!r}")
    if group_info(group) is None:
        return tensor
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    dist.all_reduce(tensor, op=reduce_op, group=group)
    return tensor


def all_reduce_logsumexp(lse: Tensor, group=None) -> Tensor:
    """log(sum over ranks of exp(lse)) elementwise: merges log-sum-exps each taken over one
    rank's terms into the log-sum-exp over all terms (a max, then a sum of shifted exps; no
    autograd, the input is not modified). -inf on every rank gives -inf, as torch.logsumexp."""
    if group_info(group) is None:
        return lse
    peak = lse.detach().clone()
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    # an infinite peak (all terms -inf, or some +inf) shifts by 0: inf - inf would be NaN
    shift = torch.where(torch.isinf(peak), torch.zeros_like(peak), peak)
    total = torch.exp(lse.detach() - shift)
    dist.all_reduce(total, group=group)
    return shift + torch.log(total)


def check_same_row_count(x: Tensor, group=None, what: str = "rows") -> None:
    """Raise a ValueError on every rank unless all ranks of `group` pass the same number of
    rows (`what` names them in the message). One all-reduce of two integers: a host sync."""
    info = group_info(group)
    if info is None:
        return
    n = x.shape[0]
    sizes = torch.tensor([n, -n], device=x.device, dtype=torch.int64)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=group)
    if int(sizes[0]) != n or int(-sizes[1]) != n:
        raise ValueError(f"every rank must pass the same number of {what}; this rank (rank "
                         f"{info.rank}) has {n}, the ranks range from {int(-sizes[1])} to "
                         f"{int(sizes[0])}")


def barrier(group=None) -> None:
    """Wait for every rank of `group`; nothing to wait for without a process group."""
    if _initialized():
        dist.barrier(group=group)
