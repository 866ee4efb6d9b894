"""Triton kernels for the symmetric image-text contrastive (InfoNCE) loss without the N x N matrix.

Notation: rows X (n x D, e.g. this rank's image features), columns Y (m x D, e.g. the global
text features), S = exp(logit_scale) * X @ Y^T. Row i's target column is i + target_offset
(the rank offset in a distributed global batch; rows whose target falls outside [0, m) have
none). Everything inside the kernels is in base-2 units (S2 = S * log2(e)) so that every
exponential is a bare exp2; the launch wrappers convert back to natural units.

Forward (`contrastive_forward`): each program owns a set of row blocks and a range of column
tiles. Every S tile is computed ONCE and feeds both statistics:
  * the row log-sum-exp, kept online in registers (flash-attention style);
  * the column log-sum-exp over this program's rows, merged into a per-program partial
    buffer [programs_along_rows, m] (the program is the only writer of its slice, so no
    atomics). A small reduction over the program axis finishes the column LSE.
The buffer is O(programs * m), i.e. O(N) with the program count bounded by the SM count.

Backward (`contrastive_backward_operand`): recomputes S tiles; called once with (X=img, Y=txt)
for d(img) and d(logit_scale), and once with the roles swapped for d(txt). With per-row and
per-column loss weights w (upstream gradient / 2N),
  dL/dS_ij = w_row_i (softmax_row_ij - [j is target of i]) + w_col_j (softmax_col_ij - [...]),
which is symmetric in the two roles, so one kernel serves both gradients.

Numerical safety (logit scales of 100 and beyond): a tile whose statistics span less than
SAFE_SPAN2 (in log2 units) needs ONE exponential per element for both directions, because
exp2(S2 - peak) with a tile-wide shift can neither overflow nor lose a term that matters; a
wider tile (huge scale, unnormalised features) takes the two-exponential path with per-row
and per-column shifts. Both paths are exact up to rounding.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# With a single shift per tile, elements more than 126 below the shift flush to zero. Taking the
# shortcut only when every row's and column's own maximum lies within 90 (log2 units) of the
# shift means a flushed term is below 2^-36 of its row's (column's) largest term: invisible in
# fp32 sums. Also 2^90 is far from fp32 overflow (2^128) for the backward's rescale factors.
SAFE_SPAN2 = 90.0

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _mma(a, b, acc, FP32_INPUTS: tl.constexpr, EMULATE_DOT: tl.constexpr):
    """acc + a @ b with fp32 accumulation."""
    if EMULATE_DOT:
        # The CPU interpreter multiplies 16-bit floats wrongly; bf16/fp16 products are exact
        # in fp32, so an fp32 product of the upcast tiles matches the tensor-core result.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif FP32_INPUTS:
        # Plain TF32 would put ~1e-3 relative error on logits scaled by up to 100; the
        # 3-pass split keeps fp32 inputs at (nearly) fp32 accuracy on tensor cores.
        return tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _load_rows(ptr, offs_rows, n_rows, stride, offs_k, D):
    """[rows, k] block of a row-major matrix; out-of-range entries read as 0. Row offsets are
    widened to int64: rows * stride passes 2^31 near N = 1M at D = 1024."""
    return tl.load(ptr + offs_rows.to(tl.int64)[:, None] * stride + offs_k[None, :],
                   mask=(offs_rows[:, None] < n_rows) & (offs_k[None, :] < D), other=0.0)


@triton.jit
def _score_tile(x_ptr, y_ptr, offs_m, offs_n, n_x, n_y, D, stride_x, stride_y, scale2,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                FP32_INPUTS: tl.constexpr, EMULATE_DOT: tl.constexpr):
    """S2 tile = scale2 * X[offs_m] @ Y[offs_n]^T, looping over D in BLOCK_K chunks (the
    path for feature dims too wide to keep a row block resident)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = _load_rows(x_ptr, offs_m, n_x, stride_x, offs_k, D)
        y = _load_rows(y_ptr, offs_n, n_y, stride_y, offs_k, D)
        acc = _mma(x, tl.trans(y), acc, FP32_INPUTS, EMULATE_DOT)
    return acc * scale2


@triton.jit
def _contrastive_fwd_kernel(
        x_ptr, y_ptr, logit_scale_ptr,
        row_lse_part_ptr, row_max_part_ptr, diag_ptr, col_lse_part_ptr, col_max_part_ptr,
        n_x, n_y, D, stride_x, stride_y, target_offset, cols_per_split,
        SAFE_SPAN: tl.constexpr, TRACK_MAX: tl.constexpr, FP32_INPUTS: tl.constexpr,
        EMULATE_DOT: tl.constexpr, RESIDENT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """RESIDENT: BLOCK_K covers all of D, so the row block is loaded once and each S tile is
    one dot whose column-tile loads the compiler pipelines across the column loop."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    programs_r = tl.num_programs(0)
    scale2 = tl.exp(tl.load(logit_scale_ptr).to(tl.float32)) * 1.4426950408889634
    col_begin = pid_c * cols_per_split
    col_end = tl.minimum(col_begin + cols_per_split, n_y)
    num_row_blocks = tl.cdiv(n_x, BLOCK_M)
    neg_inf = float("-inf")

    for row_block in range(pid_r, num_row_blocks, programs_r):
        offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < n_x
        run_max = tl.full((BLOCK_M,), neg_inf, tl.float32)
        run_sum = tl.zeros((BLOCK_M,), tl.float32)
        diag = tl.zeros((BLOCK_M,), tl.float32)
        if RESIDENT:
            x_block = _load_rows(x_ptr, offs_m, n_x, stride_x, tl.arange(0, BLOCK_K), D)
        for col0 in range(col_begin, col_end, BLOCK_N):
            offs_n = col0 + tl.arange(0, BLOCK_N)
            col_ok = offs_n < col_end
            valid = row_ok[:, None] & col_ok[None, :]
            if RESIDENT:
                y_block = _load_rows(y_ptr, offs_n, n_y, stride_y, tl.arange(0, BLOCK_K), D)
                s2 = _mma(x_block, tl.trans(y_block), tl.zeros((BLOCK_M, BLOCK_N), tl.float32),
                          FP32_INPUTS, EMULATE_DOT) * scale2
            else:
                s2 = _score_tile(x_ptr, y_ptr, offs_m, offs_n, n_x, n_y, D, stride_x, stride_y,
                                 scale2, BLOCK_M, BLOCK_N, BLOCK_K, FP32_INPUTS, EMULATE_DOT)
            s2 = tl.where(valid, s2, neg_inf)
            tile_row_max = tl.max(s2, axis=1)
            tile_col_max = tl.max(s2, axis=0)
            new_max = tl.maximum(run_max, tile_row_max)
            # Padded rows keep -inf; a finite stand-in keeps their (discarded) sums NaN-free.
            new_max_safe = tl.where(row_ok, new_max, 0.0)
            peak = tl.max(tile_row_max, axis=0)
            row_span = peak - tl.min(tl.where(row_ok, tile_row_max, peak), axis=0)
            col_span = peak - tl.min(tl.where(col_ok, tile_col_max, peak), axis=0)
            if tl.maximum(row_span, col_span) < SAFE_SPAN:
                # One exponential per element serves the row AND the column sums.
                e = tl.exp2(s2 - peak)
                row_sum = tl.sum(e, axis=1) * tl.exp2(tl.where(row_ok, peak - new_max_safe, 0.0))
                tile_col_lse = peak + tl.log2(tl.where(col_ok, tl.sum(e, axis=0), 1.0))
            else:
                row_sum = tl.sum(tl.exp2(s2 - new_max_safe[:, None]), axis=1)
                col_shift = tl.where(col_ok, tile_col_max, 0.0)
                col_sum = tl.sum(tl.exp2(s2 - col_shift[None, :]), axis=0)
                tile_col_lse = col_shift + tl.log2(tl.where(col_ok, col_sum, 1.0))
            run_sum = run_sum * tl.exp2(run_max - new_max_safe) + row_sum
            run_max = new_max
            is_target = (offs_n[None, :] == offs_m[:, None] + target_offset) & valid
            diag += tl.sum(tl.where(is_target, s2, 0.0), axis=1)

            # Merge this tile's column LSE into the program's partial (buffer starts at -inf).
            part = col_lse_part_ptr + pid_r.to(tl.int64) * n_y + offs_n
            old = tl.load(part, mask=col_ok, other=0.0)
            hi = tl.maximum(old, tile_col_lse)
            hi_safe = tl.where(hi == neg_inf, 0.0, hi)
            merged = hi_safe + tl.log2(tl.exp2(old - hi_safe) + tl.exp2(tile_col_lse - hi_safe))
            tl.store(part, tl.where(hi == neg_inf, neg_inf, merged), mask=col_ok)
            if TRACK_MAX:
                part_max = col_max_part_ptr + pid_r.to(tl.int64) * n_y + offs_n
                old_max = tl.load(part_max, mask=col_ok, other=0.0)
                tl.store(part_max, tl.maximum(old_max, tile_col_max), mask=col_ok)

        row_lse = run_max + tl.log2(tl.where(row_ok, run_sum, 1.0))
        tl.store(row_lse_part_ptr + pid_c * n_x + offs_m, row_lse, mask=row_ok)
        if TRACK_MAX:
            tl.store(row_max_part_ptr + pid_c * n_x + offs_m, run_max, mask=row_ok)
        target = offs_m + target_offset
        has_target = row_ok & (target >= col_begin) & (target < col_end)
        tl.store(diag_ptr + offs_m, diag, mask=has_target)


@triton.jit
def _contrastive_bwd_kernel(
        x_ptr, y_ptr, logit_scale_ptr, x_lse_ptr, y_lse_ptr, x_weight_ptr, y_weight_ptr,
        dx_ptr, dscale_part_ptr,
        n_x, n_y, D, stride_x, stride_y, stride_dx, target_offset,
        SAFE_SPAN: tl.constexpr, FP32_INPUTS: tl.constexpr, EMULATE_DOT: tl.constexpr,
        COMPUTE_DSCALE: tl.constexpr, RESIDENT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_DO: tl.constexpr):
    """RESIDENT: one program covers all of D (BLOCK_K == BLOCK_DO >= D): the row block is
    loaded once and each column tile of Y is loaded once for both S and dX += G @ Y.
    Otherwise the program owns the output features [pid_d * BLOCK_DO, ...) and S is recomputed
    by a loop over D (once per output chunk)."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    scale = tl.exp(tl.load(logit_scale_ptr).to(tl.float32))
    scale2 = scale * 1.4426950408889634
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < n_x
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = offs_do < D
    x_lse2 = tl.load(x_lse_ptr + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    x_w = tl.load(x_weight_ptr + offs_m, mask=row_ok, other=0.0)
    x_lse2_lo = tl.min(tl.where(row_ok, x_lse2, float("inf")), axis=0)
    x_lse2_hi = tl.max(tl.where(row_ok, x_lse2, float("-inf")), axis=0)

    acc = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
    dscale_acc = tl.zeros((BLOCK_M,), tl.float32)
    if RESIDENT:
        x_block = _load_rows(x_ptr, offs_m, n_x, stride_x, tl.arange(0, BLOCK_K), D)
    for col0 in range(0, n_y, BLOCK_N):
        offs_n = col0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < n_y
        valid = row_ok[:, None] & col_ok[None, :]
        if RESIDENT:
            y_chunk = _load_rows(y_ptr, offs_n, n_y, stride_y, tl.arange(0, BLOCK_K), D)
            s2 = _mma(x_block, tl.trans(y_chunk), tl.zeros((BLOCK_M, BLOCK_N), tl.float32),
                      FP32_INPUTS, EMULATE_DOT) * scale2
        else:
            s2 = _score_tile(x_ptr, y_ptr, offs_m, offs_n, n_x, n_y, D, stride_x, stride_y,
                             scale2, BLOCK_M, BLOCK_N, BLOCK_K, FP32_INPUTS, EMULATE_DOT)
        y_lse2 = tl.load(y_lse_ptr + offs_n, mask=col_ok, other=0.0) * 1.4426950408889634
        y_w = tl.load(y_weight_ptr + offs_n, mask=col_ok, other=0.0)
        lo = tl.minimum(x_lse2_lo, tl.min(tl.where(col_ok, y_lse2, float("inf")), axis=0))
        hi = tl.maximum(x_lse2_hi, tl.max(tl.where(col_ok, y_lse2, float("-inf")), axis=0))
        if hi - lo < SAFE_SPAN:
            # S2 <= both LSEs, so exp2(S2 - lo) <= 2^SAFE_SPAN: one exponential, two rescales.
            e = tl.exp2(s2 - lo)
            x_coef = x_w * tl.exp2(lo - x_lse2)
            y_coef = y_w * tl.exp2(lo - y_lse2)
            g = e * (x_coef[:, None] + y_coef[None, :])
        else:
            g = (x_w[:, None] * tl.exp2(s2 - x_lse2[:, None])
                 + y_w[None, :] * tl.exp2(s2 - y_lse2[None, :]))
        is_target = offs_n[None, :] == offs_m[:, None] + target_offset
        g = tl.where(is_target, g - (x_w[:, None] + y_w[None, :]), g)
        g = tl.where(valid, g, 0.0)
        if COMPUTE_DSCALE:
            # dS/dlogit_scale = S, so dL/dlogit_scale = sum(dL/dS * S).
            dscale_acc += tl.sum(g * s2, axis=1)
        if not RESIDENT:
            y_chunk = _load_rows(y_ptr, offs_n, n_y, stride_y, offs_do, D)
        # Like flash-attention's dS, G is rounded to the input dtype for the tensor cores.
        acc = _mma(g.to(y_chunk.dtype), y_chunk, acc, FP32_INPUTS, EMULATE_DOT)
    dx = acc * scale
    tl.store(dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dx + offs_do[None, :],
             dx.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & do_ok[None, :])
    if COMPUTE_DSCALE:
        if pid_d == 0:
            tl.store(dscale_part_ptr + pid_m, tl.sum(dscale_acc, axis=0) * 0.6931471805599453)


# ----------------------------------------------------------------------------- launch wrappers

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _forward_blocks(D: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Launch config. Not autotuned: the partial buffers' shape depends on BLOCK_M and the
    grid, so the config is chosen up front. The GPU choices are reasoned (SMEM and register
    budgets of an H100), not yet measured."""
    padded_d = max(16, triton.next_power_of_2(D))
    if device.type != "cuda" or _interpreting():
        # Small tiles keep the interpreter fast and span many tiles even at tiny N; D <= 64
        # takes the resident path, wider D the D-loop path, so tests reach both.
        resident = padded_d <= 64
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=padded_d if resident else 32, RESIDENT=resident,
                    num_warps=1, num_stages=1)
    if dtype == torch.float32:
        resident = padded_d <= 128
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=padded_d if resident else 32, RESIDENT=resident,
                    num_warps=8, num_stages=2)
    if padded_d <= 256:
        # X block (128 x D) stays in shared memory; Y tiles stream through 3 stages.
        return dict(BLOCK_M=128, BLOCK_N=128 if padded_d <= 128 else 64, BLOCK_K=padded_d,
                    RESIDENT=True, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, RESIDENT=False, num_warps=8, num_stages=3)


def _backward_blocks(D: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Like `_forward_blocks`. BLOCK_DO (output features per program) bounds the fp32
    register accumulator [BLOCK_M, BLOCK_DO]; D > BLOCK_DO recomputes S once per chunk."""
    padded_d = max(16, triton.next_power_of_2(D))
    if device.type != "cuda" or _interpreting():
        resident = padded_d <= 64
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=padded_d if resident else 32,
                    BLOCK_DO=padded_d if resident else min(256, padded_d), RESIDENT=resident,
                    num_warps=1, num_stages=1)
    if dtype == torch.float32:
        resident = padded_d <= 128
        # tf32x3 splits each operand in registers: smaller output chunks avoid spills.
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=padded_d if resident else 32,
                    BLOCK_DO=padded_d if resident else 64, RESIDENT=resident, num_warps=8, num_stages=2)
    if padded_d <= 256:
        return dict(BLOCK_M=128 if padded_d <= 128 else 64, BLOCK_N=64, BLOCK_K=padded_d,
                    BLOCK_DO=padded_d, RESIDENT=True, num_warps=8, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_DO=256, RESIDENT=False, num_warps=8, num_stages=2)


def _program_budget(device: torch.device) -> int:
    if device.type == "cuda" and not _interpreting():
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _check_operands(x: torch.Tensor, y: torch.Tensor, logit_scale: torch.Tensor) -> None:
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected rows [n, D] and columns [m, D], got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dtype != y.dtype or x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"rows/columns must share a dtype in {SUPPORTED_DTYPES}, got {x.dtype}, {y.dtype}")
    if x.stride(1) != 1 or y.stride(1) != 1:
        raise ValueError("rows and columns must have unit stride along the feature dimension")
    if logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must hold one value, got shape {tuple(logit_scale.shape)}")


def _logsumexp_rows_chunked(part: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """logsumexp over dim 0 of a [P, m] buffer, a column chunk at a time so the temporary
    that torch.logsumexp allocates stays small at m = 1M."""
    out = torch.empty(part.shape[1], device=part.device, dtype=torch.float32)
    for c0 in range(0, part.shape[1], chunk):
        out[c0:c0 + chunk] = torch.logsumexp(part[:, c0:c0 + chunk], dim=0)
    return out


def contrastive_forward(x: torch.Tensor, y: torch.Tensor, logit_scale: torch.Tensor,
                        target_offset: int = 0, track_max: bool = False,
                        max_programs: Optional[int] = None) -> dict:
    """One pass over S = exp(logit_scale) X Y^T. Returns natural-unit fp32 vectors:
    row_lse [n] (complete over all m columns), diag [n] (S_i,target(i); 0 where no target),
    col_lse [m] (over THIS call's rows only: the caller merges across ranks), and with
    track_max also row_max [n], col_max [m] (for accuracy)."""
    _check_operands(x, y, logit_scale)
    n, D = x.shape
    m = y.shape[0]
    dev = x.device
    cfg = _forward_blocks(D, x.dtype, dev)
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    budget = max_programs or _program_budget(dev)
    row_blocks = triton.cdiv(n, block_m)
    col_tiles = triton.cdiv(m, block_n)
    programs_r = min(row_blocks, budget)
    # Few row blocks (small n) would idle most SMs: split the columns across extra programs.
    splits_wanted = max(1, min(col_tiles, budget // programs_r))
    tiles_per_split = triton.cdiv(col_tiles, splits_wanted)
    splits = triton.cdiv(col_tiles, tiles_per_split)
    f32 = dict(device=dev, dtype=torch.float32)
    row_lse_part = torch.empty(splits, n, **f32)
    row_max_part = torch.empty(splits, n, **f32) if track_max else row_lse_part
    diag = torch.zeros(n, **f32)
    col_lse_part = torch.full((programs_r, m), float("-inf"), **f32)
    col_max_part = torch.full((programs_r, m), float("-inf"), **f32) if track_max else col_lse_part
    ls = logit_scale.detach().reshape(1).to(torch.float32)
    _contrastive_fwd_kernel[(programs_r, splits)](
        x, y, ls, row_lse_part, row_max_part, diag, col_lse_part, col_max_part,
        n, m, D, x.stride(0), y.stride(0), target_offset, tiles_per_split * block_n,
        SAFE_SPAN=SAFE_SPAN2, TRACK_MAX=track_max, FP32_INPUTS=x.dtype == torch.float32,
        EMULATE_DOT=_interpreting(), **cfg)
    out = {
        # Partials are base-2 LSEs: convert to natural units before merging with logsumexp.
        "row_lse": torch.logsumexp(row_lse_part.mul_(LN2), dim=0) if splits > 1 else row_lse_part[0] * LN2,
        "diag": diag * LN2,
        "col_lse": (_logsumexp_rows_chunked(col_lse_part.mul_(LN2)) if programs_r > 1
                    else col_lse_part[0] * LN2),
    }
    if track_max:
        out["row_max"] = row_max_part.amax(dim=0) * LN2
        out["col_max"] = col_max_part.amax(dim=0) * LN2
    return out


def contrastive_backward_operand(x: torch.Tensor, y: torch.Tensor, logit_scale: torch.Tensor,
                                 x_lse: torch.Tensor, y_lse: torch.Tensor,
                                 x_weight: torch.Tensor, y_weight: torch.Tensor,
                                 target_offset: int = 0, compute_dscale: bool = False,
                                 out_dtype: Optional[torch.dtype] = None
                                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """dX = exp(logit_scale) * G @ Y with G = dL/dS recomputed tile by tile from the final
    LSEs (natural units) and the per-row / per-column loss weights; optionally also
    dL/dlogit_scale = sum(G * S) (an fp32 0-d tensor). dX has x's dtype unless out_dtype."""
    _check_operands(x, y, logit_scale)
    n, D = x.shape
    m = y.shape[0]
    dev = x.device
    cfg = _backward_blocks(D, x.dtype, dev)
    block_m, block_do = cfg["BLOCK_M"], cfg["BLOCK_DO"]
    dx = torch.empty(x.shape, device=dev, dtype=out_dtype or x.dtype)
    row_blocks = triton.cdiv(n, block_m)
    dscale_part = torch.zeros(row_blocks, device=dev, dtype=torch.float32)
    f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731
    ls = logit_scale.detach().reshape(1).to(torch.float32)
    _contrastive_bwd_kernel[(row_blocks, triton.cdiv(D, block_do))](
        x, y, ls, f32(x_lse), f32(y_lse), f32(x_weight), f32(y_weight), dx, dscale_part,
        n, m, D, x.stride(0), y.stride(0), dx.stride(0), target_offset,
        SAFE_SPAN=SAFE_SPAN2, FP32_INPUTS=x.dtype == torch.float32, EMULATE_DOT=_interpreting(),
        COMPUTE_DSCALE=compute_dscale, **cfg)
    return dx, (dscale_part.sum() if compute_dscale else None)


def compile_for(target_arch: int = 90, D: int = 256, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Compile both kernels ahead of time for an NVIDIA arch (no GPU needed: triton ships
    ptxas) with the launch configs a CUDA device would use. Returns kernel name ->
    {"shared": bytes}. Catches compile errors the CPU interpreter never sees."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptr = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[dtype]
    ints = ("n_x", "n_y", "D", "stride_x", "stride_y", "target_offset")
    fwd_sig = {"x_ptr": ptr, "y_ptr": ptr, "logit_scale_ptr": "*fp32", "row_lse_part_ptr": "*fp32",
               "row_max_part_ptr": "*fp32", "diag_ptr": "*fp32", "col_lse_part_ptr": "*fp32",
               "col_max_part_ptr": "*fp32", **{k: "i32" for k in ints + ("cols_per_split",)}}
    bwd_sig = {"x_ptr": ptr, "y_ptr": ptr, "logit_scale_ptr": "*fp32", "x_lse_ptr": "*fp32",
               "y_lse_ptr": "*fp32", "x_weight_ptr": "*fp32", "y_weight_ptr": "*fp32", "dx_ptr": ptr,
               "dscale_part_ptr": "*fp32", **{k: "i32" for k in ints + ("stride_dx",)}}
    cuda = torch.device("cuda")
    common = dict(SAFE_SPAN=SAFE_SPAN2, FP32_INPUTS=dtype == torch.float32, EMULATE_DOT=False)
    out = {}
    for fn, sig, cfg, extra in (
            (_contrastive_fwd_kernel, fwd_sig, _forward_blocks(D, dtype, cuda), dict(TRACK_MAX=True)),
            (_contrastive_bwd_kernel, bwd_sig, _backward_blocks(D, dtype, cuda), dict(COMPUTE_DSCALE=True))):
        opts = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
        consts = dict(common, **extra, **cfg)
        src = ASTSource(fn=fn, signature=dict(sig, **{c: "constexpr" for c in consts}), constexprs=consts)
        compiled = triton.compile(src, target=GPUTarget("cuda", target_arch, 32), options=opts)
        out[fn.__name__] = {"shared": compiled.metadata.shared}
    return out
