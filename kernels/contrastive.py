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

Layers: kernels -> launch configs (BlockConfig chosen from the device's opt-in shared memory,
per arch family) -> launchers (contrastive_forward -> ForwardStats, contrastive_backward_operand;
every launch through common.launch, inside the tensors' CUDA device) -> the two passes as
torch.library custom ops (vlmo_fast::contrastive_fwd/bwd, with fake implementations) ->
ContrastiveFunction (autograd; single process or a rank of a process group) ->
fused_contrastive (what vlmo_fast.losses.contrastive calls). The offline compile of exactly
what the launchers launch is in kernels/compile_matrix.py.

fp16: the gradient tile G is rounded to the input dtype for the second GEMM; fp16's exponent
range would flush G ~ 1e-9 (N = 32k) to zero, so it is scaled by a power of two first.

Numerical safety (logit scales of 100 and beyond): a tile whose statistics span less than
SAFE_SPAN2 (in log2 units) needs ONE exponential per element for both directions, because
exp2(S2 - peak) with a tile-wide shift can neither overflow nor lose a term that matters; a
wider tile (huge scale, unnormalised features) takes the two-exponential path with per-row
and per-column shifts. Both paths are exact up to rounding.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from vlmo_fast.distributed import (all_gather_rows, all_reduce, all_reduce_logsumexp,
                                   reduce_scatter_rows)
from vlmo_fast.env import KERNEL_FLOAT_DTYPES, triton_interpret

from .common import device_facts, launch

# Base-2 units inside the kernels: S2 = S * LOG2E, and LSE = LSE2 * LN2 back in natural units.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# With a single shift per tile, elements more than 126 below the shift flush to zero. Taking the
# shortcut only when every row's and column's own maximum lies within 90 (log2 units) of the
# shift means a flushed term is below 2^-36 of its row's (column's) largest term: invisible in
# fp32 sums. Also 2^90 is far from fp32 overflow (2^128) for the backward's rescale factors.
SAFE_SPAN2 = 90.0




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
    scale2 = tl.exp(tl.load(logit_scale_ptr).to(tl.float32)) * LOG2E
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
        grad_bound_ptr, dx_ptr, dscale_part_ptr,
        n_x, n_y, D, stride_x, stride_y, stride_dx, stride_split, target_offset, cols_per_split,
        SAFE_SPAN: tl.constexpr, FP32_INPUTS: tl.constexpr, EMULATE_DOT: tl.constexpr,
        COMPUTE_DSCALE: tl.constexpr, SCALE_G: tl.constexpr, RESIDENT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_DO: tl.constexpr):
    """RESIDENT: one program covers all of D (BLOCK_K == BLOCK_DO >= D): the row block is
    loaded once and each column tile of Y is loaded once for both S and dX += G @ Y.
    Otherwise the program owns the output features [pid_d * BLOCK_DO, ...) and S is recomputed
    by a loop over D (once per output chunk). Programs along axis 2 split the columns (few
    rows, e.g. one rank's local batch): each writes fp32 partial dX at pid_s * stride_split,
    summed in a fixed order by the launcher."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    col_begin = pid_s * cols_per_split
    col_end = tl.minimum(col_begin + cols_per_split, n_y)
    scale = tl.exp(tl.load(logit_scale_ptr).to(tl.float32))
    scale2 = scale * LOG2E
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < n_x
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = offs_do < D
    x_lse2 = tl.load(x_lse_ptr + offs_m, mask=row_ok, other=0.0) * LOG2E
    x_w = tl.load(x_weight_ptr + offs_m, mask=row_ok, other=0.0)
    x_lse2_lo = tl.min(tl.where(row_ok, x_lse2, float("inf")), axis=0)
    x_lse2_hi = tl.max(tl.where(row_ok, x_lse2, float("-inf")), axis=0)

    acc = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
    dscale_acc = tl.zeros((BLOCK_M,), tl.float32)
    g_scale = 1.0
    if SCALE_G:
        # |G| <= max row weight + max column weight (= grad_bound). fp16 has 5 exponent bits:
        # at N = 32k, G ~ 1e-9 would flush to zero, so G is scaled by a power of two that
        # takes its bound to 2^14 before rounding (exact; undone on the fp32 accumulator).
        bound = tl.load(grad_bound_ptr)
        g_scale = tl.where(bound > 0, tl.exp2(tl.floor(tl.log2(16384.0 / bound))), 1.0)
    if RESIDENT:
        x_block = _load_rows(x_ptr, offs_m, n_x, stride_x, tl.arange(0, BLOCK_K), D)
    for col0 in range(col_begin, col_end, BLOCK_N):
        offs_n = col0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < col_end
        valid = row_ok[:, None] & col_ok[None, :]
        if RESIDENT:
            y_chunk = _load_rows(y_ptr, offs_n, n_y, stride_y, tl.arange(0, BLOCK_K), D)
            s2 = _mma(x_block, tl.trans(y_chunk), tl.zeros((BLOCK_M, BLOCK_N), tl.float32),
                      FP32_INPUTS, EMULATE_DOT) * scale2
        else:
            s2 = _score_tile(x_ptr, y_ptr, offs_m, offs_n, n_x, n_y, D, stride_x, stride_y,
                             scale2, BLOCK_M, BLOCK_N, BLOCK_K, FP32_INPUTS, EMULATE_DOT)
        y_lse2 = tl.load(y_lse_ptr + offs_n, mask=col_ok, other=0.0) * LOG2E
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
        if SCALE_G:
            g = g * g_scale
        acc = _mma(g.to(y_chunk.dtype), y_chunk, acc, FP32_INPUTS, EMULATE_DOT)
    dx = acc * (scale / g_scale)
    tl.store(dx_ptr + pid_s.to(tl.int64) * stride_split
             + offs_m.to(tl.int64)[:, None] * stride_dx + offs_do[None, :],
             dx.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & do_ok[None, :])
    if COMPUTE_DSCALE:
        if pid_d == 0:
            tl.store(dscale_part_ptr + pid_s * tl.num_programs(0) + pid_m,
                     tl.sum(dscale_acc, axis=0) * LN2)


# ----------------------------------------------------------------------------- launch configs

class BlockConfig(NamedTuple):
    """Launch config of one kernel. Not autotuned: the forward's partial buffers depend on
    BLOCK_M and the grid, so the config is chosen up front, from the device's shared memory."""
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    RESIDENT: bool          # BLOCK_K covers all of D: row block loaded once, one dot per tile
    num_warps: int
    num_stages: int
    BLOCK_DO: int = 0       # backward only: output features per program

    def meta(self) -> dict:
        out = self._asdict()
        if not self.BLOCK_DO:
            del out["BLOCK_DO"]
        return out


# The interpreter (tests): small tiles keep it fast and span many tiles at tiny N; D <= 64 takes
# the resident path and wider D the D-loop path, so tests reach both.
def _interpreter_config(padded_d: int, backward: bool) -> BlockConfig:
    resident = padded_d <= 64
    return BlockConfig(16, 16, padded_d if resident else 32, resident, 1, 1,
                       (padded_d if resident else min(256, padded_d)) if backward else 0)


def _forward_candidates(padded_d: int, fp32: bool, arch: int) -> list:
    """GPU configs in order of preference; the first whose shared memory fits the device is
    used. All of them compile without register spills on the arches of the compile matrix
    (benchmarks/results/compile-matrix.md): fp32 (3-pass TF32 splits both operands in
    registers) streams D in 32-wide chunks instead of keeping the row block resident."""
    if fp32:
        return [BlockConfig(64, 64, 32, False, 8, 2)] if arch >= 90 else \
            [BlockConfig(64, 32, 32, False, 4, 2)]
    res = []
    if padded_d <= 256:
        # Row block (128 x D) resident; Y tiles stream through the stages.
        res = [BlockConfig(128, 64, padded_d, True, 8, 3), BlockConfig(128, 64, padded_d, True, 8, 2),
               BlockConfig(64, 64, padded_d, True, 4, 2)]
    return res + [BlockConfig(128, 64, 64, False, 8, 3), BlockConfig(128, 64, 64, False, 8, 2),
                  BlockConfig(64, 64, 64, False, 4, 2)]


def _backward_candidates(padded_d: int, fp32: bool, arch: int) -> list:
    """Like `_forward_candidates`. BLOCK_DO bounds the fp32 register accumulator
    [BLOCK_M, BLOCK_DO]; D > BLOCK_DO recomputes S once per output chunk."""
    if fp32:
        return [BlockConfig(64, 64, 32, False, 8, 2, 64)] if arch >= 90 else \
            [BlockConfig(32, 64, 32, False, 4, 2, 64)]
    res = []
    if padded_d <= 256:
        # sm_90 keeps a 128-row block at D <= 128; mma.sync (sm_8x) spills there at 128 rows.
        rows = 128 if (padded_d <= 128 and arch >= 90) else 64
        res = [BlockConfig(rows, 64, padded_d, True, 8, 2, padded_d),
               BlockConfig(64, 32, padded_d, True, 4, 2, padded_d)]
    return res + [BlockConfig(64, 64, 64, False, 8, 2, 256), BlockConfig(64, 32, 64, False, 4, 2, 128)]


def estimate_shared_memory(cfg: BlockConfig, element_size: int, backward: bool, arch: int,
                           fp32: bool = False) -> int:
    """Upper estimate of a config's shared memory in bytes, per arch family: sm_90 (wgmma)
    reads both operands from shared memory, sm_8x (mma.sync) keeps the resident row block in
    registers but converts the fp32 S tile's layout through shared memory; the 3-pass TF32
    split stages part of its hi/lo copies (x1.5). tests/test_compile_matrix.py checks every
    estimate against the compiled kernel on sm_80/86/90."""
    m, n, k = cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_K
    if cfg.RESIDENT:
        operands = ((m * k if arch >= 90 else 0) + cfg.num_stages * n * k) * element_size
    else:
        operands = cfg.num_stages * (m + n) * k * element_size
    if backward:
        # G (rounded to the input dtype) and, when D is chunked, the Y chunk feed the 2nd GEMM.
        operands += (m * n + (0 if cfg.RESIDENT else n * cfg.BLOCK_DO)) * element_size
    if fp32:
        operands += operands // 2
    scratch = m * n * 4 if arch < 90 else 0
    return operands + scratch + 1024


# Configs a device rejected at launch (OutOfResources: the estimate was wrong for an arch the
# compile matrix does not cover): (device, backward, padded D, dtype) -> how many to skip.
_REJECTED: dict = {}


def _configs(D: int, dtype: torch.dtype, device: torch.device, backward: bool) -> list:
    """Configs to try in order: the candidates whose estimated shared memory fits the
    device, then the rest (smallest last), minus any the device already rejected."""
    padded_d = max(16, triton.next_power_of_2(D))
    facts = device_facts(device)
    if facts is None:
        return [_interpreter_config(padded_d, backward)]
    fp32 = dtype == torch.float32
    candidates = (_backward_candidates if backward else _forward_candidates)(padded_d, fp32, facts.arch)
    size = torch.empty((), dtype=dtype).element_size()
    fits = [c for c in candidates
            if estimate_shared_memory(c, size, backward, facts.arch, fp32) <= facts.shared_memory]
    ordered = fits + [c for c in candidates if c not in fits]
    skip = _REJECTED.get((str(device), backward, padded_d, dtype), 0)
    return ordered[min(skip, len(ordered) - 1):]


def _reject(D: int, dtype: torch.dtype, device: torch.device, backward: bool) -> None:
    key = (str(device), backward, max(16, triton.next_power_of_2(D)), dtype)
    _REJECTED[key] = _REJECTED.get(key, 0) + 1


def forward_config(D: int, dtype: torch.dtype, device: torch.device) -> BlockConfig:
    return _configs(D, dtype, device, backward=False)[0]


def backward_config(D: int, dtype: torch.dtype, device: torch.device) -> BlockConfig:
    return _configs(D, dtype, device, backward=True)[0]


def _with_fallback(run, D: int, dtype: torch.dtype, device: torch.device, backward: bool):
    """run(cfg) with the preferred config; if the device refuses it (shared memory beyond its
    limit), remember that and run with the next one."""
    from triton.runtime.errors import OutOfResources
    configs = _configs(D, dtype, device, backward)
    for i, cfg in enumerate(configs):
        try:
            return run(cfg)
        except OutOfResources:
            if i == len(configs) - 1:
                raise
            _reject(D, dtype, device, backward)


def _program_budget(device: torch.device) -> int:
    facts = device_facts(device)
    return 2 * facts.sm_count if facts is not None else 4


def _check_operands(x: Tensor, y: Tensor, logit_scale: Tensor) -> None:
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected rows [n, D] and columns [m, D], got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dtype != y.dtype or x.dtype not in KERNEL_FLOAT_DTYPES:
        raise TypeError(f"rows/columns must share a dtype in {KERNEL_FLOAT_DTYPES}, got {x.dtype}, {y.dtype}")
    if x.stride(1) != 1 or y.stride(1) != 1:
        raise ValueError("rows and columns must have unit stride along the feature dimension")
    if logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must hold one value, got shape {tuple(logit_scale.shape)}")
    if x.device != y.device:
        raise ValueError(f"rows are on {x.device} but columns on {y.device}")


def _logsumexp_rows_chunked(part: Tensor, chunk: int = 1 << 16) -> Tensor:
    """logsumexp over dim 0 of a [P, m] buffer, a column chunk at a time so the temporary
    that torch.logsumexp allocates stays small at m = 1M."""
    out = torch.empty(part.shape[1], device=part.device, dtype=torch.float32)
    for c0 in range(0, part.shape[1], chunk):
        out[c0:c0 + chunk] = torch.logsumexp(part[:, c0:c0 + chunk], dim=0)
    return out


# ----------------------------------------------------------------------------- launchers

class ForwardStats(NamedTuple):
    """Natural-unit fp32 statistics of one pass over S (row_max/col_max empty [0] unless
    tracked)."""
    row_lse: Tensor     # [n] complete over all m columns
    diag: Tensor        # [n] S[i, target(i)]; 0 where row i has no target
    col_lse: Tensor     # [m] over THIS call's rows only (the caller merges across ranks)
    row_max: Tensor     # [n]
    col_max: Tensor     # [m]


def contrastive_forward(x: Tensor, y: Tensor, logit_scale: Tensor, target_offset: int = 0,
                        track_max: bool = False, max_programs: Optional[int] = None) -> ForwardStats:
    """One pass over S = exp(logit_scale) X Y^T (see the module docstring)."""
    _check_operands(x, y, logit_scale)
    return _with_fallback(lambda cfg: _forward(x, y, logit_scale, target_offset, track_max,
                                               max_programs, cfg),
                          x.shape[1], x.dtype, x.device, backward=False)


def _forward(x: Tensor, y: Tensor, logit_scale: Tensor, target_offset: int, track_max: bool,
             max_programs: Optional[int], cfg: BlockConfig) -> ForwardStats:
    n, D = x.shape
    m = y.shape[0]
    dev = x.device
    budget = max_programs or _program_budget(dev)
    row_blocks = triton.cdiv(n, cfg.BLOCK_M)
    col_tiles = triton.cdiv(m, cfg.BLOCK_N)
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
    launch(_contrastive_fwd_kernel, (programs_r, splits),
           x, y, ls, row_lse_part, row_max_part, diag, col_lse_part, col_max_part,
           n, m, D, x.stride(0), y.stride(0), target_offset, tiles_per_split * cfg.BLOCK_N,
           SAFE_SPAN=SAFE_SPAN2, TRACK_MAX=track_max, FP32_INPUTS=x.dtype == torch.float32,
           EMULATE_DOT=triton_interpret(), **cfg.meta())
    ln2 = LN2.value
    # Partials are base-2 LSEs: convert to natural units before merging with logsumexp.
    row_lse = torch.logsumexp(row_lse_part.mul_(ln2), dim=0) if splits > 1 else row_lse_part[0] * ln2
    col_lse = (_logsumexp_rows_chunked(col_lse_part.mul_(ln2)) if programs_r > 1
               else col_lse_part[0] * ln2)
    return ForwardStats(row_lse, diag * ln2, col_lse,
                        row_max_part.amax(dim=0) * ln2 if track_max else diag.new_empty(0),
                        col_max_part.amax(dim=0) * ln2 if track_max else diag.new_empty(0))


def contrastive_backward_operand(x: Tensor, y: Tensor, logit_scale: Tensor, x_lse: Tensor,
                                 y_lse: Tensor, x_weight: Tensor, y_weight: Tensor,
                                 target_offset: int = 0, compute_dscale: bool = False,
                                 out_dtype: Optional[torch.dtype] = None,
                                 max_programs: Optional[int] = None
                                 ) -> Tuple[Tensor, Optional[Tensor]]:
    """dX = exp(logit_scale) * G @ Y with G = dL/dS recomputed tile by tile from the final
    LSEs (natural units) and the per-row / per-column loss weights; optionally also
    dL/dlogit_scale = sum(G * S) (an fp32 0-d tensor). dX has x's dtype unless out_dtype.
    When the row blocks alone would leave SMs idle (n small against m, as for one rank's
    rows against the global batch), the columns are split across programs too."""
    _check_operands(x, y, logit_scale)
    return _with_fallback(lambda cfg: _backward(x, y, logit_scale, x_lse, y_lse, x_weight, y_weight,
                                                target_offset, compute_dscale, out_dtype,
                                                max_programs, cfg),
                          x.shape[1], x.dtype, x.device, backward=True)


def _backward(x, y, logit_scale, x_lse, y_lse, x_weight, y_weight, target_offset: int,
              compute_dscale: bool, out_dtype: Optional[torch.dtype], max_programs: Optional[int],
              cfg: BlockConfig) -> Tuple[Tensor, Optional[Tensor]]:
    n, D = x.shape
    m = y.shape[0]
    dev = x.device
    out_dtype = out_dtype or x.dtype
    row_blocks = triton.cdiv(n, cfg.BLOCK_M)
    d_chunks = triton.cdiv(D, cfg.BLOCK_DO)
    col_tiles = triton.cdiv(m, cfg.BLOCK_N)
    budget = max_programs or _program_budget(dev)
    splits_wanted = max(1, min(col_tiles, budget // (row_blocks * d_chunks)))
    tiles_per_split = triton.cdiv(col_tiles, splits_wanted)
    splits = triton.cdiv(col_tiles, tiles_per_split)
    if splits > 1:
        dx = torch.empty((splits, n, D), device=dev, dtype=torch.float32)
        stride_split, stride_dx = dx.stride(0), dx.stride(1)
    else:
        dx = torch.empty(x.shape, device=dev, dtype=out_dtype)
        stride_split, stride_dx = 0, dx.stride(0)
    dscale_part = torch.zeros(splits * row_blocks, device=dev, dtype=torch.float32)
    f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731
    x_weight, y_weight = f32(x_weight), f32(y_weight)
    scale_g = x.dtype == torch.float16
    # Bound on |G| for the fp16 scaling (a device scalar: no host sync).
    grad_bound = ((x_weight.abs().amax() + y_weight.abs().amax()).reshape(1) if scale_g
                  else dscale_part)
    ls = logit_scale.detach().reshape(1).to(torch.float32)
    launch(_contrastive_bwd_kernel, (row_blocks, d_chunks, splits),
           x, y, ls, f32(x_lse), f32(y_lse), x_weight, y_weight, grad_bound, dx, dscale_part,
           n, m, D, x.stride(0), y.stride(0), stride_dx, stride_split, target_offset,
           tiles_per_split * cfg.BLOCK_N,
           SAFE_SPAN=SAFE_SPAN2, FP32_INPUTS=x.dtype == torch.float32,
           EMULATE_DOT=triton_interpret(), COMPUTE_DSCALE=compute_dscale, SCALE_G=scale_g,
           **cfg.meta())
    if splits > 1:
        dx = dx.sum(0).to(out_dtype)  # fixed-order reduction: deterministic
    return dx, (dscale_part.sum() if compute_dscale else None)


# ----------------------------------------------------------------------------- custom ops + autograd
# The two passes as torch.library custom ops: torch.compile sees their fake implementations
# (no graph break), eager calls run the launchers above.

@torch.library.custom_op("vlmo_fast::contrastive_fwd", mutates_args=())
def _contrastive_fwd_op(x: Tensor, y: Tensor, logit_scale: Tensor, target_offset: int,
                        track_max: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(contrastive_forward(x, y, logit_scale, target_offset=target_offset,
                                     track_max=track_max))


@_contrastive_fwd_op.register_fake
def _(x, y, logit_scale, target_offset, track_max):
    n, m = x.shape[0], y.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    return (x.new_empty(n, **f32), x.new_empty(n, **f32), x.new_empty(m, **f32),
            x.new_empty(n if track_max else 0, **f32), x.new_empty(m if track_max else 0, **f32))


@torch.library.custom_op("vlmo_fast::contrastive_bwd", mutates_args=())
def _contrastive_bwd_op(x: Tensor, y: Tensor, logit_scale: Tensor, x_lse: Tensor, y_lse: Tensor,
                        x_weight: Tensor, y_weight: Tensor, target_offset: int,
                        compute_dscale: bool, fp32_out: bool) -> Tuple[Tensor, Tensor]:
    dx, dscale = contrastive_backward_operand(
        x, y, logit_scale, x_lse, y_lse, x_weight, y_weight, target_offset=target_offset,
        compute_dscale=compute_dscale, out_dtype=torch.float32 if fp32_out else None)
    return dx, (dscale if dscale is not None else dx.new_empty(0, dtype=torch.float32))


@_contrastive_bwd_op.register_fake
def _(x, y, logit_scale, x_lse, y_lse, x_weight, y_weight, target_offset, compute_dscale,
      fp32_out):
    dx = x.new_empty(x.shape, dtype=torch.float32 if fp32_out else x.dtype)
    return dx, x.new_empty(() if compute_dscale else (0,), dtype=torch.float32)


class ContrastiveFunction(torch.autograd.Function):
    """This rank's share of the symmetric InfoNCE loss through the kernels above.

    apply(img [n, D], txt [n, D], logit_scale, dctx, want_stats) -> (share, row_lse [n],
    local col_lse [n], i2t accuracy, t2i accuracy). dctx: None (single process; traceable by
    torch.compile) or the `vlmo_fast.distributed.GroupInfo` to span, through whose collectives
    only the text features are all-gathered, column LSEs are merged with an all-reduce, and
    d(texts) is reduce-scattered back to the owners.
    """

    @staticmethod
    def forward(ctx, img: Tensor, txt: Tensor, logit_scale: Tensor, dctx, want_stats: bool):
        n = img.shape[0]
        world, rank = (dctx.world, dctx.rank) if dctx is not None else (1, 0)
        total, offset = n * world, rank * n
        txt_all = all_gather_rows(txt, dctx.group) if dctx is not None else txt
        fwd = ForwardStats(*torch.ops.vlmo_fast.contrastive_fwd(img, txt_all, logit_scale, offset,
                                                               want_stats))
        col_lse = fwd.col_lse
        if dctx is not None:
            col_lse = all_reduce_logsumexp(col_lse, dctx.group)
        local_col_lse = col_lse[offset:offset + n].clone()
        share = (fwd.row_lse.sum() + local_col_lse.sum() - 2 * fwd.diag.sum()) / (2 * total)
        if want_stats:
            col_max = fwd.col_max
            if dctx is not None:
                col_max = all_reduce(col_max, "max", dctx.group)
            # diag comes from the very tile the maxima saw, so a correct row compares equal.
            hits = torch.stack([(fwd.diag >= fwd.row_max).sum(),
                                (fwd.diag >= col_max[offset:offset + n]).sum()]).float()
            if dctx is not None:
                hits = all_reduce(hits, "sum", dctx.group)
            i2t_acc, t2i_acc = hits[0] / total, hits[1] / total
        else:
            i2t_acc, t2i_acc = share.new_zeros(()), share.new_zeros(())
        ctx.save_for_backward(img, txt_all, logit_scale, fwd.row_lse, col_lse)
        ctx.dctx, ctx.total, ctx.offset = dctx, total, offset
        ctx.mark_non_differentiable(fwd.row_lse, local_col_lse, i2t_acc, t2i_acc)
        return share, fwd.row_lse, local_col_lse, i2t_acc, t2i_acc

    @staticmethod
    def backward(ctx, grad_share: Tensor, *_unused):
        img, txt_all, logit_scale, row_lse, col_lse = ctx.saved_tensors
        dctx, total, offset = ctx.dctx, ctx.total, ctx.offset
        n = img.shape[0]
        g = grad_share.reshape(1).float()
        # dL/dS_ij = w_row_i (p_row - [target]) + w_col_j (p_col - [target]), where each weight
        # is the upstream gradient of the rank OWNING that row / column over 2N.
        row_weight = (g / (2 * total)).expand(n)
        if dctx is None:
            col_weight = (g / (2 * total)).expand(total)
        else:
            col_weight = (all_gather_rows(g, dctx.group) / (2 * total)).repeat_interleave(n)
        need_img, need_txt, need_scale = ctx.needs_input_grad[:3]
        d_img = d_txt = d_scale = None
        if need_img or need_scale:
            d_img, d_scale = torch.ops.vlmo_fast.contrastive_bwd(
                img, txt_all, logit_scale, row_lse, col_lse, row_weight, col_weight, offset,
                need_scale, False)
            d_scale = d_scale.reshape(logit_scale.shape).to(logit_scale.dtype) if need_scale else None
        if need_txt:
            # Partial gradients of ALL N texts from this rank's rows: accumulate and sum over
            # ranks in fp32 so bf16 rounding happens once, on the owner.
            d_txt_all, _ = torch.ops.vlmo_fast.contrastive_bwd(
                txt_all, img, logit_scale, col_lse, row_lse, col_weight, row_weight, -offset,
                False, dctx is not None)
            d_txt = (reduce_scatter_rows(d_txt_all, dctx.group).to(img.dtype) if dctx is not None
                     else d_txt_all)
        return (d_img if need_img else None), d_txt, d_scale, None, None


def fused_contrastive(img: Tensor, txt: Tensor, logit_scale: Tensor, dctx=None,
                      want_stats: bool = False):
    """Entry point of the loss module: ContrastiveFunction on contiguous features."""
    return ContrastiveFunction.apply(img.contiguous(), txt.contiguous(), logit_scale, dctx,
                                     want_stats)
