"""The "chunked" backend of the contrastive loss: O(N) memory on any device, in plain PyTorch.

Same loss, same semantics as the Triton path (see `vlmo_fast.losses.contrastive`): both
directions, learnable logit scale, the global batch with only the texts all-gathered, column
log-sum-exps merged across ranks, text gradients reduce-scattered back to their owners, the
same statistics. The n x N similarity block of this rank is never materialised: it is visited
in tiles of `block_rows x block_cols`

    forward:  S_tile = (exp(logit_scale) * I)[rows] @ T[cols]^T, then per tile
              row LSE  <- logaddexp(row LSE, logsumexp(S_tile, 1))   (running over column tiles)
              col LSE  <- logaddexp(col LSE, logsumexp(S_tile, 0))   (running over row tiles)
              the target logits (the "diagonal") are read from the tile that holds them;
    backward: each tile is recomputed and turned into
              G = w_row * softmax_row(S) + w_col * softmax_col(S) - (w_row + w_col) [target]
              dA += G @ T,  dT += G^T @ A       (A = exp(logit_scale) * I)
              d logit_scale = sum(G * S) = <A, dA>, so it needs no extra pass over the tiles.

Work: 4 GEMMs of 2 n N D FLOPs (1 forward, 3 backward) against 6 for the materialising
reference, and the same four exp passes over the n x N elements; memory: the fp32 copies of
the features and their gradients plus a few tiles (O((n + N) D + tile)).

Why this lives in vlmo_fast/losses/ and not in kernels/: kernels/ holds Triton kernels with
their launchers and autograd Functions; this backend is torch.mm and element-wise torch ops on
tiles (no Triton, no compiled code), so it runs wherever PyTorch runs: CPU, GPUs without
Triton, and batches whose N x N matrix does not fit anywhere.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..distributed import all_gather_rows, all_reduce, all_reduce_logsumexp, reduce_scatter_rows

# Tile shape: 4096 x 1024 fp32 = 16 MiB per tile buffer (three are live at once). Each tile
# costs ~15 torch ops forward and ~11 backward, each a parallel region with its own thread
# barrier: on CPU, smaller tiles (1024 x 1024) were as fast on an idle machine but several
# times slower on a loaded one; larger ones only add memory. GEMMs of 4096 x D x 1024 run near
# the matmul peak. (benchmarks/bench_contrastive.py measures time and peak RSS.)
BLOCK_ROWS = 4096
BLOCK_COLS = 1024


def _target_span(r0: int, r1: int, c0: int, c1: int, offset: int):
    """Rows [lo, hi) (local indices) whose target column (row + offset) lies in tile
    rows [r0, r1) x columns [c0, c1); None when the tile holds no target."""
    lo, hi = max(r0, c0 - offset), min(r1, c1 - offset)
    return (lo, hi) if lo < hi else None


class ChunkedContrastiveFunction(torch.autograd.Function):
    """This rank's share of the contrastive loss over column/row tiles (module docstring).

    forward(img [n, D], txt [n, D], logit_scale (1 value), dctx (None or the
    `vlmo_fast.distributed.GroupInfo` to span), want_stats, block_rows=None, block_cols=None
    (None: the module's BLOCK_ROWS / BLOCK_COLS)) ->
    (share, row_lse [n], col_lse [n] (this rank's columns, global), i2t_acc, t2i_acc).
    """

    @staticmethod
    def forward(ctx, img: Tensor, txt: Tensor, logit_scale: Tensor, dctx, want_stats: bool,
                block_rows: Optional[int] = None, block_cols: Optional[int] = None):
        # Read the module constants per call (tests shrink them to cover tile edges).
        block_rows = int(block_rows or BLOCK_ROWS)
        block_cols = int(block_cols or BLOCK_COLS)
        if block_rows < 1 or block_cols < 1:
            raise ValueError(f"block_rows and block_cols must be >= 1, got {block_rows}, {block_cols}")
        n = img.shape[0]
        world, rank = (dctx.world, dctx.rank) if dctx is not None else (1, 0)
        total, offset = n * world, rank * n
        txt_all = all_gather_rows(txt, dctx.group) if dctx is not None else txt
        scale = logit_scale.detach().float().reshape(()).exp()
        a = img.detach().float() * scale              # scaled images: S = a @ t^T
        t = txt_all.detach().float()
        row_lse = a.new_full((n,), float("-inf"))
        col_lse = a.new_empty((total,))
        diag = a.new_empty((n,))
        row_max = a.new_full((n,), float("-inf")) if want_stats else None
        col_max = a.new_empty((total,)) if want_stats else None
        for c0 in range(0, total, block_cols):
            c1 = min(total, c0 + block_cols)
            t_cols = t[c0:c1]
            col_acc = None
            col_max_acc = None
            for r0 in range(0, n, block_rows):
                r1 = min(n, r0 + block_rows)
                s = torch.mm(a[r0:r1], t_cols.t())
                row_lse[r0:r1] = torch.logaddexp(row_lse[r0:r1], torch.logsumexp(s, 1))
                tile_col = torch.logsumexp(s, 0)
                col_acc = tile_col if col_acc is None else torch.logaddexp(col_acc, tile_col)
                span = _target_span(r0, r1, c0, c1, offset)
                if span is not None:
                    lo, hi = span
                    diag[lo:hi] = s[lo - r0:hi - r0, lo + offset - c0:hi + offset - c0].diagonal()
                if want_stats:
                    row_max[r0:r1] = torch.maximum(row_max[r0:r1], s.amax(1))
                    tile_max = s.amax(0)
                    col_max_acc = tile_max if col_max_acc is None else torch.maximum(col_max_acc,
                                                                                     tile_max)
            col_lse[c0:c1] = col_acc
            if want_stats:
                col_max[c0:c1] = col_max_acc
        if dctx is not None:
            col_lse = all_reduce_logsumexp(col_lse, dctx.group)
        local_col_lse = col_lse[offset:offset + n].clone()
        # Sum of per-pair cross-entropies (each >= 0): no cancellation between large sums, and
        # divided first so that terms near float32's limit do not overflow in the sum.
        share = ((row_lse - diag) / (2 * total)).sum() + ((local_col_lse - diag) / (2 * total)).sum()

        if want_stats:
            if dctx is not None:
                all_reduce(col_max, "max", dctx.group)
            # diag was read from the tiles the maxima saw: a correct row compares equal.
            hits = torch.stack([(diag >= row_max).sum(),
                                (diag >= col_max[offset:offset + n]).sum()]).float()
            if dctx is not None:
                all_reduce(hits, "sum", dctx.group)
            i2t_acc, t2i_acc = hits[0] / total, hits[1] / total
        else:
            i2t_acc, t2i_acc = share.new_zeros(()), share.new_zeros(())

        ctx.save_for_backward(img, txt_all, logit_scale, row_lse, col_lse)
        ctx.dctx, ctx.total, ctx.offset = dctx, total, offset
        ctx.blocks = (block_rows, block_cols)
        ctx.mark_non_differentiable(row_lse, local_col_lse, i2t_acc, t2i_acc)
        return share, row_lse, local_col_lse, i2t_acc, t2i_acc

    @staticmethod
    def backward(ctx, grad_share: Tensor, *_unused):
        img, txt_all, logit_scale, row_lse, col_lse = ctx.saved_tensors
        dctx, total, offset = ctx.dctx, ctx.total, ctx.offset
        block_rows, block_cols = ctx.blocks
        need_img, need_txt, need_scale = ctx.needs_input_grad[:3]
        n = img.shape[0]
        g = grad_share.detach().reshape(1).float()
        # dL/dS_ij = w_row (p_row - [target]) + w_col_j (p_col - [target]); each weight is the
        # upstream gradient of the rank OWNING that row / column over 2N.
        w_row = g / (2 * total)
        if dctx is None:
            w_col = w_row.expand(total)
        else:
            w_col = (all_gather_rows(g, dctx.group) / (2 * total)).repeat_interleave(n)
        scale = logit_scale.detach().float().reshape(()).exp()
        a = img.detach().float() * scale
        t = txt_all.detach().float()
        want_a = need_img or need_scale
        d_a = torch.zeros_like(a) if want_a else None
        d_t = torch.zeros_like(t) if need_txt else None
        for c0 in range(0, total, block_cols):
            c1 = min(total, c0 + block_cols)
            t_cols, col_lse_c, w_col_c = t[c0:c1], col_lse[c0:c1], w_col[c0:c1]
            for r0 in range(0, n, block_rows):
                r1 = min(n, r0 + block_rows)
                s = torch.mm(a[r0:r1], t_cols.t())
                grad = torch.sub(s, row_lse[r0:r1, None]).exp_().mul_(w_row)
                grad.add_(s.sub_(col_lse_c).exp_().mul_(w_col_c))
                span = _target_span(r0, r1, c0, c1, offset)
                if span is not None:
                    lo, hi = span
                    grad[lo - r0:hi - r0, lo + offset - c0:hi + offset - c0].diagonal().sub_(
                        w_row + w_col_c[lo + offset - c0:hi + offset - c0])
                if want_a:
                    d_a[r0:r1].addmm_(grad, t_cols)
                if need_txt:
                    d_t[c0:c1].addmm_(grad.t(), a[r0:r1])
        d_img = d_txt = d_scale = None
        if need_img:
            d_img = (d_a * scale).to(img.dtype)
        if need_scale:
            # sum_ij G_ij S_ij = sum_i <a_i, (G @ T)_i> = <A, dA>
            d_scale = (a * d_a).sum().reshape(logit_scale.shape).to(logit_scale.dtype)
        if need_txt:
            d_txt = (reduce_scatter_rows(d_t, dctx.group) if dctx is not None else d_t).to(img.dtype)
        return d_img, d_txt, d_scale, None, None, None, None
