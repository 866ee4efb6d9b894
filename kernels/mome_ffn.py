"""Triton kernels of the grouped MoME feed-forward (all experts in one launch per GEMM).

Data flow (T tokens, E <= 3 experts, hidden d, inner h; "sorted" = grouped by expert):

  forward                                           backward
  route        ids -> perm, offsets  (2 launches)   gather_grad  dOut -> dY (sorted, scaled), dgamma
  gather_ln    x[perm] -> z, mean, rstd             wgrad        dW2, db2 = A_e^T dY_e, sum dY_e
  gemm GELU    z @ W1[e] + b1 -> H (opt), A         gemm DGELU   dH = (dY @ W2[e]^T) * gelu'(H)
  gemm RESID   out[perm] = x + s * (A @ W2[e] + b2) wgrad        dW1, db1 = z_e^T dH_e, sum dH_e
                                                    gemm PLAIN   dz = dH @ W1[e]^T
                                                    ln_bwd       dx[perm] = dOut + LN'(dz); dLN w/b

`perm[p]` is the token at sorted position p; `offsets[e]:offsets[e+1]` are expert e's sorted
rows. A grouped GEMM launches ceil(T/BLOCK_M) + E - 1 row tiles (an upper bound on
sum_e ceil(count_e/BLOCK_M) that needs no host sync) and each program finds its expert and
row range from `offsets` (E scalar loads); programs past the last real tile return at once.
Because the tile map is derived in the kernel, BLOCK_M can be autotuned freely.

Layers of this file: kernels -> launch configs (autotune tables pruned per arch: no config
that spills or overflows shared memory is ever timed) -> launchers (route, gather_layernorm,
grouped_gemm, ...; every launch through common.launch, inside the tensors' CUDA device) ->
the forward and backward passes as torch.library custom ops (vlmo_fast::mome_ffn_fwd/bwd, with
fake implementations, so torch.compile(fullgraph=True) traces through them) -> MoMEFFNFunction
(autograd) -> mome_ffn_triton (the entry point vlmo_fast.mome forwards to). The register and
shared-memory budgets the pruning applies, and the offline compile of exactly what these
launchers launch (through `mome_ffn_forward` / `mome_ffn_backward` and AUTOTUNE_PRUNES), live
in kernels/compile_matrix.py, which measures the compiled kernels against those budgets.

Triton APIs used exist in 3.6 and 3.8: tl.dot(acc=, input_precision=), tl.erf, tl.cumsum,
constexpr globals, masked loads/stores (cache_modifier=".cg"), tl.atomic_add(sem=, scope=),
tl.debug_barrier, triton.autotune(prune_configs_by=). Offline compiling (compile_matrix) uses
3.8 internals and runs only where the compile matrix runs. With TRITON_INTERPRET=1 the kernels
run on the CPU (tests) with fixed small blocks; on CUDA the GEMMs are autotuned. fp32 inputs
use the 3-pass TF32 split on tensor cores (~fp32 accuracy; plain TF32 when
torch.backends.cuda.matmul.allow_tf32 is set).
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from vlmo_fast.env import env_flag, triton_interpret

from .common import device_facts, launch
from .compile_matrix import operand_shared_memory, tile_registers, within_tile_budgets

# The interpreter is chosen when triton.jit decorates, i.e. at import time of this module.
INTERPRET = triton_interpret()

# Epilogues of the grouped GEMM (constexpr so the kernels compare against the names).
EPI_PLAIN = tl.constexpr(0)      # C = acc
EPI_GELU = tl.constexpr(1)       # H = acc + bias; C = gelu(H); optionally keep H
EPI_DGELU = tl.constexpr(2)      # C = acc * gelu'(H), H kept from forward or recomputed here
EPI_RESIDUAL = tl.constexpr(3)   # out[perm[p]] = x[perm[p]] + gamma * dps[perm[p]] * (acc + bias)


# Exact (erf) GELU, as VLMo uses; constants are 1/sqrt(2) and 1/sqrt(2*pi).
@triton.jit
def _gelu(h):
    return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))


@triton.jit
def _gelu_grad(h):
    cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
    return cdf + h * tl.exp(-0.5 * h * h) * 0.3989422804014327


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc += a @ b. UPCAST: the CPU interpreter (triton 3.8) multiplies bf16 operands wrongly,
    so there they go through fp32 (exact: a bf16 x bf16 product fits in fp32)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _expert_of_rows(rows, offsets_ptr, NUM_EXPERTS: tl.constexpr):
    """Expert index of sorted rows: the number of expert starts at or before each row."""
    e = tl.zeros(rows.shape, dtype=tl.int32)
    for j in tl.static_range(1, NUM_EXPERTS):
        e += (rows >= tl.load(offsets_ptr + j)).to(tl.int32)
    return e


# --------------------------------------------------------------------------------------
# Routing: a stable counting sort over many programs, in two launches. Each program owns
# BLOCK consecutive tokens: the first kernel writes its per-expert counts, the second finds
# its tokens' slots from the counts of all blocks (expert starts) and of the blocks before it
# (its base within each expert), plus the rank inside the block: stable and deterministic.
# --------------------------------------------------------------------------------------
@triton.jit
def _route_count_kernel(ids_ptr, counts_ptr, T, E_PAD: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    tok = pid * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + tok, mask=tok < T, other=-1).to(tl.int32)
    counts = tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    tl.store(counts_ptr + pid * E_PAD + experts, counts)


@triton.jit
def _route_scatter_kernel(ids_ptr, counts_ptr, perm_ptr, offsets_ptr, T, num_blocks,
                          NUM_EXPERTS: tl.constexpr, E_PAD: tl.constexpr, BLOCK: tl.constexpr,
                          SCAN: tl.constexpr):
    pid = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    total = tl.zeros([E_PAD], dtype=tl.int32)
    before = tl.zeros([E_PAD], dtype=tl.int32)
    for b0 in range(0, num_blocks, SCAN):  # SCAN blocks' counts per step
        blocks = b0 + tl.arange(0, SCAN)
        c = tl.load(counts_ptr + blocks[:, None] * E_PAD + experts[None, :],
                    mask=(blocks < num_blocks)[:, None], other=0)
        total += tl.sum(c, axis=0)
        before += tl.sum(tl.where((blocks < pid)[:, None], c, 0), axis=0)
    ends = tl.cumsum(total, axis=0)
    if pid == 0:
        tl.store(offsets_ptr + 1 + experts, ends, mask=experts < NUM_EXPERTS)
        tl.store(offsets_ptr + experts, tl.zeros([E_PAD], dtype=tl.int32), mask=experts == 0)
    base = ends - total + before
    tok = pid * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + tok, mask=tok < T, other=-1).to(tl.int32)
    onehot = (ids[:, None] == experts[None, :]).to(tl.int32)
    rank = tl.cumsum(onehot, axis=0) - onehot
    slot = tl.sum(onehot * (base[None, :] + rank), axis=1)
    tl.store(perm_ptr + slot, tok, mask=tok < T)


# --------------------------------------------------------------------------------------
# Gather into expert order + that expert's LayerNorm.
# --------------------------------------------------------------------------------------
@triton.jit
def _gather_ln_kernel(x_ptr, perm_ptr, offsets_ptr, w_ptr, b_ptr, z_ptr, mean_ptr, rstd_ptr,
                      T, D, stride_x, stride_z, eps,
                      NUM_EXPERTS: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < T
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    m = row_ok[:, None] & col_ok[None, :]
    tok = tl.load(perm_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    e = _expert_of_rows(rows, offsets_ptr, NUM_EXPERTS)
    x = tl.load(x_ptr + tok[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(m, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    w = tl.load(w_ptr + e[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + e[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
    z = xc * rstd[:, None] * w + b
    tl.store(z_ptr + rows.to(tl.int64)[:, None] * stride_z + cols[None, :],
             z.to(z_ptr.dtype.element_ty), mask=m)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


# --------------------------------------------------------------------------------------
# Grouped GEMM: C[rows of e] = A[rows of e] @ B[e] with a fused epilogue, one launch.
# --------------------------------------------------------------------------------------
@triton.jit
def _grouped_gemm_kernel(
        a_ptr, b_ptr, c_ptr, offsets_ptr,
        bias_ptr, aux_ptr,                 # aux: H (GELU: written if STORE_AUX; DGELU: read)
        perm_ptr, x_ptr, gamma_ptr, dps_ptr,       # RESIDUAL only
        a2_ptr, b2_ptr,                    # DGELU with RECOMPUTE: H = A2 @ B2[e] + bias
        T, N, K,
        stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm,
        stride_auxm, stride_xm, stride_a2m, stride_b2e, stride_b2k,
        T_BUCKET,                          # autotune key only: configs differ by token count
        NUM_EXPERTS: tl.constexpr, EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr,
        STORE_AUX: tl.constexpr, RECOMPUTE: tl.constexpr, HAS_GAMMA: tl.constexpr,
        HAS_DPS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # One grid axis (x: up to 2^31 - 1 programs; y would cap row tiles at 65,535). Column
    # tiles vary fastest, so programs running together share their row tile of A.
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // tiles_n
    pid_n = tl.program_id(0) % tiles_n
    # Tile -> (expert, first row): walk the E groups' tile counts.
    expert = -1
    row_start = 0
    row_end = 0
    tiles_before = 0
    for e in tl.static_range(NUM_EXPERTS):
        g_start = tl.load(offsets_ptr + e)
        g_end = tl.load(offsets_ptr + e + 1)
        g_tiles = tl.cdiv(g_end - g_start, BLOCK_M)
        inside = (pid_m >= tiles_before) & (pid_m < tiles_before + g_tiles)
        expert = tl.where(inside, e, expert)
        row_start = tl.where(inside, g_start + (pid_m - tiles_before) * BLOCK_M, row_start)
        row_end = tl.where(inside, g_end, row_end)
        tiles_before += g_tiles
    if expert < 0:
        return  # past the last real tile (the grid is an upper bound)

    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    rows64 = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    expert64 = expert.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_ptrs = a_ptr + rows64[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + expert64 * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    for k in range(0, K, BLOCK_K):
        k_ok = (k + ks) < K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _mma(a, b, acc, DOT_PRECISION, UPCAST)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    mask = row_ok[:, None] & col_ok[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert64 * N + cols, mask=col_ok, other=0.0).to(tl.float32)
    if EPILOGUE == EPI_PLAIN:
        tl.store(c_ptr + rows64[:, None] * stride_cm + cols[None, :],
                 acc.to(c_ptr.dtype.element_ty), mask=mask)
    elif EPILOGUE == EPI_GELU:
        h = acc + bias[None, :]
        if STORE_AUX:
            tl.store(aux_ptr + rows64[:, None] * stride_auxm + cols[None, :],
                     h.to(aux_ptr.dtype.element_ty), mask=mask)
        tl.store(c_ptr + rows64[:, None] * stride_cm + cols[None, :],
                 _gelu(h).to(c_ptr.dtype.element_ty), mask=mask)
    elif EPILOGUE == EPI_DGELU:
        if RECOMPUTE:
            # Second K loop over the same rows: H = z @ W1[e] + b1 (costs 2*T*d*h FLOPs,
            # saves writing and reading the T x h pre-activation).
            h = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            a2_ptrs = a2_ptr + rows64[:, None] * stride_a2m + ks[None, :]
            b2_ptrs = b2_ptr + expert64 * stride_b2e + ks[:, None] * stride_b2k + cols[None, :]
            for k in range(0, K, BLOCK_K):
                k_ok = (k + ks) < K
                a2 = tl.load(a2_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b2 = tl.load(b2_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                h = _mma(a2, b2, h, DOT_PRECISION, UPCAST)
                a2_ptrs += BLOCK_K
                b2_ptrs += BLOCK_K * stride_b2k
            h = h + bias[None, :]
            # Round like the forward did, so both modes see the same H.
            h = h.to(aux_ptr.dtype.element_ty).to(tl.float32)
        else:
            h = tl.load(aux_ptr + rows64[:, None] * stride_auxm + cols[None, :],
                        mask=mask, other=0.0).to(tl.float32)
        tl.store(c_ptr + rows64[:, None] * stride_cm + cols[None, :],
                 (acc * _gelu_grad(h)).to(c_ptr.dtype.element_ty), mask=mask)
    else:  # EPI_RESIDUAL
        y = acc + bias[None, :]
        if STORE_AUX:  # the un-scaled branch, kept for the gamma gradient
            tl.store(aux_ptr + rows64[:, None] * stride_auxm + cols[None, :],
                     y.to(aux_ptr.dtype.element_ty), mask=mask)
        # Round the branch to the activation dtype before the residual add, as an unfused
        # bf16 implementation does.
        y = y.to(c_ptr.dtype.element_ty).to(tl.float32)
        tok = tl.load(perm_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        if HAS_GAMMA:
            gamma = tl.load(gamma_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            y = y * gamma[None, :]
        if HAS_DPS:
            y = y * tl.load(dps_ptr + tok, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        x = tl.load(x_ptr + tok[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
        tl.store(c_ptr + tok[:, None] * stride_cm + cols[None, :],
                 (x.to(tl.float32) + y).to(c_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------
# Weight gradient per expert: dW[e] = X_e^T @ G_e (a reduction over e's rows), db[e] = sum G_e.
# The row reduction may be split (SPLIT > 1): an expert of `count` rows is cut into
# n = clamp(count // min_chunk, 1, SPLIT) contiguous chunks of ceil(count / n) rows, one
# program each per dW tile, so one large expert (the vision expert holds ~83 % of an
# image-text batch) fills the GPU's SMs instead of a few waves of full-length tiles. Every
# program derives n and its expert's workspace slots from `offsets` (no host sync); programs
# past n return at once. Multi-chunk experts: each chunk stores its fp32 partial tile in its
# slot and increments the (expert, tile) counter (acq_rel); the one that arrives last sums
# all n slots in the fixed order 0..n-1 (so dW does not depend on arrival order), writes dW
# and db, and resets the counter to 0 (the launch stays idempotent: the autotuner re-runs it
# on the same buffers).
# --------------------------------------------------------------------------------------
@triton.jit
def _wgrad_chunks(offsets_ptr, expert, min_chunk, NUM_EXPERTS: tl.constexpr, SPLIT: tl.constexpr):
    """(row chunks of `expert`, its first workspace slot): slots are packed over the experts
    split in more than one chunk, so at most min(E * SPLIT, T // min_chunk) exist."""
    n_chunks = 1
    slot = 0
    for e in tl.static_range(NUM_EXPERTS):
        count = tl.load(offsets_ptr + e + 1) - tl.load(offsets_ptr + e)
        n = tl.minimum(tl.maximum(count // min_chunk, 1), SPLIT)
        n_chunks = tl.where(e == expert, n, n_chunks)
        slot += tl.where((e < expert) & (n > 1), n, 0)
    return n_chunks, slot


@triton.jit
def _wgrad_store(dw_ptr, db_ptr, expert, pid_m, rm, rn, KD, ND, dw, dbias, HAS_BIAS: tl.constexpr):
    e64 = expert.to(tl.int64)
    tl.store(dw_ptr + e64 * KD * ND + rm[:, None] * ND + rn[None, :],
             dw.to(dw_ptr.dtype.element_ty), mask=(rm < KD)[:, None] & (rn < ND)[None, :])
    if HAS_BIAS:
        tl.store(db_ptr + e64 * ND + rn, dbias.to(db_ptr.dtype.element_ty),
                 mask=(rn < ND) & (pid_m == 0))


@triton.jit
def _wgrad_fixup(part_ptr, db_part_ptr, dw_ptr, db_ptr, expert, slot, n_chunks, pid_m, rn, KD, ND,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dW tile (and db) = sum of the n_chunks partials in slot order. Even the calling
    program's own partial is read back (not taken from its accumulator, which is dead by
    now), from L2 (.cg: L1 is not coherent across SMs), in slabs of <= 32 rows: two fp32
    slabs and their addresses stay far below the accumulator's registers."""
    SLAB: tl.constexpr = 32 if BLOCK_M > 32 else BLOCK_M
    rn_ok = rn < ND
    for i in tl.static_range(BLOCK_M // SLAB):
        rm = pid_m * BLOCK_M + i * SLAB + tl.arange(0, SLAB)
        tile = rm[:, None] * ND + rn[None, :]
        tile_ok = (rm < KD)[:, None] & rn_ok[None, :]
        total = tl.zeros((SLAB, BLOCK_N), dtype=tl.float32)
        for j in range(n_chunks):
            total += tl.load(part_ptr + (slot + j).to(tl.int64) * KD * ND + tile, mask=tile_ok,
                             other=0.0, cache_modifier=".cg")
        tl.store(dw_ptr + expert.to(tl.int64) * KD * ND + tile, total.to(dw_ptr.dtype.element_ty),
                 mask=tile_ok)
    if HAS_BIAS:
        bias_ok = rn_ok & (pid_m == 0)
        total_bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for j in range(n_chunks):
            total_bias += tl.load(db_part_ptr + (slot + j).to(tl.int64) * ND + rn, mask=bias_ok,
                                  other=0.0, cache_modifier=".cg")
        tl.store(db_ptr + expert.to(tl.int64) * ND + rn, total_bias.to(db_ptr.dtype.element_ty),
                 mask=bias_ok)


@triton.jit
def _grouped_wgrad_kernel(x_ptr, g_ptr, dw_ptr, db_ptr, offsets_ptr,
                          part_ptr, db_part_ptr, sem_ptr,   # SPLIT > 1: partials, counters
                          KD, ND, stride_xm, stride_gm, min_chunk, T_BUCKET,
                          NUM_EXPERTS: tl.constexpr, HAS_BIAS: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                          MAX_SPLIT: tl.constexpr, SPLIT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # The workspace holds the partials of at most MAX_SPLIT chunks per expert.
    tl.static_assert(SPLIT <= MAX_SPLIT)
    pid = tl.program_id(0)              # dW tile (the large axis: x allows 2^31 - 1)
    expert = tl.program_id(1) // SPLIT
    chunk = tl.program_id(1) % SPLIT
    tiles_n = tl.cdiv(ND, BLOCK_N)
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n
    start = tl.load(offsets_ptr + expert)
    end = tl.load(offsets_ptr + expert + 1)
    if SPLIT > 1:
        n_chunks, slot = _wgrad_chunks(offsets_ptr, expert, min_chunk, NUM_EXPERTS, SPLIT)
        if chunk >= n_chunks:
            return
        chunk_rows = tl.cdiv(end - start, n_chunks)
        start = start + chunk * chunk_rows
        end = tl.minimum(end, start + chunk_rows)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)   # rows of dW: features of X
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)   # cols of dW: features of G
    rm_ok = rm < KD
    rn_ok = rn < ND
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r in range(start, end, BLOCK_K):
        rr = (r + ks).to(tl.int64)
        r_ok = (r + ks) < end
        xt = tl.load(x_ptr + rr[None, :] * stride_xm + rm[:, None],
                     mask=rm_ok[:, None] & r_ok[None, :], other=0.0)
        g = tl.load(g_ptr + rr[:, None] * stride_gm + rn[None, :],
                    mask=r_ok[:, None] & rn_ok[None, :], other=0.0)
        acc = _mma(xt, g, acc, DOT_PRECISION, UPCAST)
        if HAS_BIAS:
            dbias += tl.sum(g.to(tl.float32), axis=0)
    if SPLIT > 1:
        if n_chunks > 1:
            tile = rm[:, None] * ND + rn[None, :]
            tile_ok = rm_ok[:, None] & rn_ok[None, :]
            bias_ok = rn_ok & (pid_m == 0)
            own = (slot + chunk).to(tl.int64)
            tl.store(part_ptr + own * KD * ND + tile, acc, mask=tile_ok)
            if HAS_BIAS:
                tl.store(db_part_ptr + own * ND + rn, dbias, mask=bias_ok)
            # Every thread's partial stores before the counter's release (one thread of the
            # program does the atomic); the last arrival's acquire makes all chunks' visible.
            tl.debug_barrier()
            counter = sem_ptr + expert * (tl.cdiv(KD, BLOCK_M) * tiles_n) + pid
            arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if arrived == n_chunks - 1:
                tl.debug_barrier()
                _wgrad_fixup(part_ptr, db_part_ptr, dw_ptr, db_ptr, expert, slot, n_chunks, pid_m,
                             rn, KD, ND, HAS_BIAS, BLOCK_M, BLOCK_N)
                tl.store(counter, 0)
        else:
            _wgrad_store(dw_ptr, db_ptr, expert, pid_m, rm, rn, KD, ND, acc, dbias, HAS_BIAS)
    else:
        _wgrad_store(dw_ptr, db_ptr, expert, pid_m, rm, rn, KD, ND, acc, dbias, HAS_BIAS)


# --------------------------------------------------------------------------------------
# Backward gather: dY[p] = dOut[perm[p]] * dps * gamma (sorted), and partial dgamma sums.
# Each program walks CHUNKS blocks of ROWS rows so that the partial-sum buffers stay small
# (<= ~1k programs) whatever T is. Only dgamma's [BLOCK_D] sum is carried across blocks;
# gamma is re-read per block (an L1 hit) rather than held, ~10 registers fewer in the loop.
# --------------------------------------------------------------------------------------
@triton.jit
def _gather_grad_kernel(dout_ptr, perm_ptr, gamma_ptr, dps_ptr, y_ptr, dy_ptr, dgamma_part_ptr,
                        T, D, stride_do, stride_y, stride_dy, CHUNKS,
                        HAS_GAMMA: tl.constexpr, HAS_DPS: tl.constexpr, NEED_DGAMMA: tl.constexpr,
                        ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    dgamma = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for c in range(CHUNKS):
        rows = (pid * CHUNKS + c) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < T
        m = row_ok[:, None] & col_ok[None, :]
        tok = tl.load(perm_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        g = tl.load(dout_ptr + tok[:, None] * stride_do + cols[None, :], mask=m,
                    other=0.0).to(tl.float32)
        if HAS_DPS:
            g = g * tl.load(dps_ptr + tok, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        if NEED_DGAMMA:
            y = tl.load(y_ptr + rows.to(tl.int64)[:, None] * stride_y + cols[None, :],
                        mask=m, other=0.0).to(tl.float32)
            dgamma += tl.sum(g * y, axis=0)
        if HAS_GAMMA:
            g = g * tl.load(gamma_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(dy_ptr + rows.to(tl.int64)[:, None] * stride_dy + cols[None, :],
                 g.to(dy_ptr.dtype.element_ty), mask=m)
    if NEED_DGAMMA:
        tl.store(dgamma_part_ptr + pid * D + cols, dgamma, mask=col_ok)


# --------------------------------------------------------------------------------------
# LayerNorm backward + residual, scattered back to token order; per-expert dLN partials.
# Each program owns CHUNKS * ROWS consecutive sorted rows and walks them expert by expert
# (sorted rows of one expert are contiguous), so one expert's LN weight row and two [BLOCK_D]
# fp32 partial sums are live at a time, each row block is reduced to them as it is read, and
# the partials are summed in a fixed order. (Holding [E, BLOCK_D] sums for every expert
# across the row loop cost ~120 more registers once a program walked several blocks.)
# --------------------------------------------------------------------------------------
@triton.jit
def _ln_bwd_scatter_kernel(dz_ptr, x_ptr, dout_ptr, perm_ptr, offsets_ptr, w_ptr, mean_ptr,
                           rstd_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
                           T, D, stride_dz, stride_x, stride_do, stride_dx, CHUNKS,
                           NUM_EXPERTS: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    first = pid * CHUNKS * ROWS
    last = tl.minimum(first + CHUNKS * ROWS, T)
    for j in range(NUM_EXPERTS):
        lo = tl.maximum(tl.load(offsets_ptr + j), first)
        hi = tl.minimum(tl.load(offsets_ptr + j + 1), last)
        w = tl.load(w_ptr + j * D + cols, mask=col_ok, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
        db = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for start in range(lo, hi, ROWS):
            rows = start + tl.arange(0, ROWS)
            row_ok = rows < hi
            m = row_ok[:, None] & col_ok[None, :]
            tok = tl.load(perm_ptr + rows, mask=row_ok, other=0).to(tl.int64)
            dz = tl.load(dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + cols[None, :],
                         mask=m, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + tok[:, None] * stride_x + cols[None, :], mask=m,
                        other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            xhat = tl.where(m, (x - mean[:, None]) * rstd[:, None], 0.0)
            # The dLN sums before dx: dz's tile dies at gx (summed after the dx store, dz,
            # xhat, gx and dout were live together: 166-200 registers instead of 128-150).
            dw += tl.sum(dz * xhat, axis=0)
            db += tl.sum(dz, axis=0)
            gx = dz * w[None, :]
            c1 = tl.sum(gx * xhat, axis=1) / D
            c2 = tl.sum(gx, axis=1) / D
            dx = (gx - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
            dout = tl.load(dout_ptr + tok[:, None] * stride_do + cols[None, :], mask=m, other=0.0)
            tl.store(dx_ptr + tok[:, None] * stride_dx + cols[None, :],
                     (dout.to(tl.float32) + dx).to(dx_ptr.dtype.element_ty), mask=m)
        part = (pid * NUM_EXPERTS + j) * D + cols   # zeros where the expert has no row here
        tl.store(dw_part_ptr + part, dw, mask=col_ok)
        tl.store(db_part_ptr + part, db, mask=col_ok)


# --------------------------------------------------------------------------------------
# Launch configuration.
# --------------------------------------------------------------------------------------
def _configs(table) -> List[triton.Config]:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps,
                          num_stages=stages) for bm, bn, bk, warps, stages in table]


def _gemm_configs() -> List[triton.Config]:
    # H100 bf16: 128-row tiles for large groups, 64 for small token counts; 3-4 stages.
    return _configs([(128, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
                     (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 256, 64, 8, 3),
                     (128, 128, 32, 4, 4)])


# fp32 inputs run the 3-pass TF32 split: both operands split into hi/lo parts in registers,
# so tiles hold fewer accumulator registers per thread, and K steps are half as deep (the
# same bytes per stage as the 16-bit configs). 64x64 tiles take 8 warps: with 4, mma.sync
# (sm_8x) reaches 255 registers and spills in the fp32-output epilogue.
_FP32_TABLE = [(128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 8, 3), (32, 64, 32, 4, 3)]


def _fp32_configs() -> List[triton.Config]:
    return _configs(_FP32_TABLE)


_WGRAD_TABLE = [(128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4),
                (128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (128, 256, 32, 8, 3)]
# Row splits of the wgrad reduction timed besides 1 (where the T bucket allows splitting).
WGRAD_SPLITS = (2, 4)


def _wgrad_configs() -> List[triton.Config]:
    """Each 16-bit and fp32 tile config unsplit, then split in WGRAD_SPLITS chunks."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": split},
                          num_warps=warps, num_stages=stages)
            for split in (1,) + WGRAD_SPLITS
            for bm, bn, bk, warps, stages in _WGRAD_TABLE + _FP32_TABLE]


def _config_key(cfg: triton.Config) -> tuple:
    kw = cfg.kwargs
    return kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], cfg.num_warps, cfg.num_stages


def _live_tiles(epilogue: int) -> int:
    """fp32 [BLOCK_M, BLOCK_N] tiles live at once in the epilogue: dGELU holds the gradient
    accumulator and H (a second accumulator when recomputed, a loaded tile otherwise); GELU
    holds H and GELU(H)."""
    return 2 if epilogue in (EPI_DGELU, EPI_GELU) else 1


def _prune(configs, arch: int, element_size: int, live_tiles: int) -> List[triton.Config]:
    """The table for the input width (16-bit or the fp32 split), then the configs within the
    register and shared-memory budgets of compile_matrix; never empty (the smallest tile)."""
    fp32 = element_size == 4
    fp32_keys = set(_FP32_TABLE)
    pool = [c for c in configs if (_config_key(c) in fp32_keys) == fp32] or list(configs)
    kept = [c for c in pool if within_tile_budgets(c, arch, element_size, live_tiles)]
    return kept or [min(pool, key=lambda c: (tile_registers(c),
                                             operand_shared_memory(c, element_size)))]


def prune_gemm_configs(configs, arch: int, element_size: int, EPILOGUE=0, **_) -> List[triton.Config]:
    """Configs the autotuner may time for one grouped-GEMM variant on `arch`: the table for
    the input width, no register spills (epilogue tiles within compile_matrix's
    TILE_REGISTER_BUDGET), operand tiles within the arch's shared memory. Never empty."""
    return _prune(configs, arch, element_size, _live_tiles(int(EPILOGUE)))


def prune_wgrad_configs(configs, arch: int, element_size: int, MAX_SPLIT=1, **_
                        ) -> List[triton.Config]:
    """As prune_gemm_configs (one live tile: the split's fixup sums partials into one tile),
    keeping only row splits the launch's workspace holds (MAX_SPLIT)."""
    return _prune([c for c in configs if c.kwargs.get("SPLIT", 1) <= int(MAX_SPLIT)], arch,
                  element_size, 1)


def _autotune_prune(prune, tensor_arg: str):
    """Adapter to triton.autotune's early_config_prune(configs, named_args, **kwargs)."""
    def early_config_prune(configs, named_args, **kwargs):
        t = named_args[tensor_arg]
        facts = device_facts(t.device)
        return prune(configs, facts.arch if facts else 90, t.element_size(), **kwargs)
    return early_config_prune


# Small fixed blocks under the interpreter (16 is tl.dot's minimum) keep tests fast and
# exercise multi-tile groups and ragged edges at tiny shapes.
_INTERP_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}
# The wgrad splits expert rows in up to 3 chunks of >= 8 rows there, so the CPU tests run the
# partial/counter/fixup path (tests also run SPLIT=1).
_INTERP_WGRAD = dict(_INTERP_BLOCKS, SPLIT=3)
_INTERP_MIN_CHUNK = 8


def _quick_bench(fn, quantiles=None):
    # Short tuning runs (the default 25 + 100 ms per config adds minutes over a benchmark's
    # many shapes); the kernels are idempotent, so re-running them while tuning is harmless.
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


if INTERPRET:
    _gemm = _grouped_gemm_kernel
    _wgrad = _grouped_wgrad_kernel
else:
    _gemm = triton.autotune(_gemm_configs() + _fp32_configs(), key=["N", "K", "T_BUCKET", "EPILOGUE", "RECOMPUTE"],
                            prune_configs_by={"early_config_prune": _autotune_prune(
                                prune_gemm_configs, "a_ptr")},
                            do_bench=_quick_bench, cache_results=True)(_grouped_gemm_kernel)
    _wgrad = triton.autotune(_wgrad_configs(), key=["KD", "ND", "T_BUCKET"],
                             prune_configs_by={"early_config_prune": _autotune_prune(
                                 prune_wgrad_configs, "x_ptr")},
                             do_bench=_quick_bench, cache_results=True)(_grouped_wgrad_kernel)
# The pruning rule of each autotuned kernel (the compile matrix compiles what it keeps).
AUTOTUNE_PRUNES = {_gemm: prune_gemm_configs, _wgrad: prune_wgrad_configs}


def _launch_meta(kernel_blocks: dict) -> dict:
    return dict(kernel_blocks) if INTERPRET else {}


def _t_bucket(t: int) -> int:
    """Token-count bucket for the autotune key (a new T within a bucket reuses the config)."""
    return 1 << max(10, min(16, math.ceil(math.log2(max(t, 1)))))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's matmul setting: TF32 when allowed, else the 3-pass TF32 split
    # (tensor cores at ~fp32 accuracy, as the contrastive kernels do) instead of "ieee" FMA
    # loops, which are slower and spill.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3"
    return "tf32"


def _row_block(d: int) -> Tuple[int, int]:
    block_d = triton.next_power_of_2(d)
    return max(1, min(64, 4096 // block_d)), block_d


def _row_warps(block_d: int) -> int:
    return 8 if block_d >= 2048 else 4


# --------------------------------------------------------------------------------------
# Host-side launchers (shape bookkeeping only; no device->host reads). Each launch goes
# through common.launch, which enters the tensors' CUDA device.
# --------------------------------------------------------------------------------------
# Tokens per routing program: large enough that the counts stay a small buffer (T / 1024
# blocks x E_PAD), small enough to spread T = 16k over 16 SMs instead of one.
ROUTE_BLOCK = 1024
ROUTE_SCAN = 128     # block counts read per step when a program sums the counts before it


def route(ids: Tensor, num_experts: int) -> Tuple[Tensor, Tensor]:
    """Stable counting sort of flat ids [T] -> (perm [T] int32, offsets [E+1] int32)."""
    t = ids.numel()
    perm = torch.empty(t, dtype=torch.int32, device=ids.device)
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=ids.device)
    block = 128 if INTERPRET else ROUTE_BLOCK
    e_pad = max(2, triton.next_power_of_2(num_experts))
    blocks = max(1, triton.cdiv(t, block))
    counts = torch.empty((blocks, e_pad), dtype=torch.int32, device=ids.device)
    launch(_route_count_kernel, (blocks,), ids, counts, t, E_PAD=e_pad, BLOCK=block, num_warps=4)
    launch(_route_scatter_kernel, (blocks,), ids, counts, perm, offsets, t, blocks,
           NUM_EXPERTS=num_experts, E_PAD=e_pad, BLOCK=block,
           SCAN=16 if INTERPRET else ROUTE_SCAN, num_warps=4)
    return perm, offsets


def gather_layernorm(x: Tensor, perm: Tensor, offsets: Tensor, weight: Tensor, bias: Tensor,
                     eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    t, d = x.shape
    z = torch.empty((t, d), dtype=x.dtype, device=x.device)
    mean = torch.empty(t, dtype=torch.float32, device=x.device)
    rstd = torch.empty(t, dtype=torch.float32, device=x.device)
    rows, block_d = _row_block(d)
    launch(_gather_ln_kernel, (triton.cdiv(t, rows),),
           x, perm, offsets, weight, bias, z, mean, rstd, t, d, x.stride(0), z.stride(0), eps,
           NUM_EXPERTS=weight.shape[0], ROWS=rows, BLOCK_D=block_d, num_warps=_row_warps(block_d))
    return z, mean, rstd


def grouped_gemm(a: Tensor, b: Tensor, offsets: Tensor, epilogue: int, *,
                 out: Optional[Tensor] = None, out_dtype: Optional[torch.dtype] = None,
                 bias: Optional[Tensor] = None, aux: Optional[Tensor] = None,
                 store_aux: bool = False, perm: Optional[Tensor] = None,
                 x: Optional[Tensor] = None, gamma: Optional[Tensor] = None,
                 dps: Optional[Tensor] = None, recompute_from: Optional[Tuple[Tensor, Tensor]] = None
                 ) -> Tensor:
    """C[rows of e] = a[rows of e] @ b[e] (+ epilogue) for every expert in one launch.

    a: [T, K] sorted rows; b: [E, K, N] (any strides: a transposed view is fine);
    EPI_RESIDUAL writes into `out` ([T, N], token order) at rows perm[p]."""
    t, k = a.shape
    num_experts, kb, n = b.shape
    if kb != k:
        raise ValueError(f"grouped_gemm: a is {tuple(a.shape)} but b is {tuple(b.shape)} "
                         f"(expected b [E, {k}, N])")
    if out is None:
        out = torch.empty((t, n), dtype=out_dtype or a.dtype, device=a.device)
    dummy = out
    a2, b2 = recompute_from if recompute_from is not None else (dummy, dummy.unsqueeze(0))
    if x is None:
        x = dummy

    def grid(meta):
        # ceil(T/BM) + E - 1 bounds sum_e ceil(count_e/BM) for any split of T rows.
        return ((triton.cdiv(t, meta["BLOCK_M"]) + num_experts - 1) * triton.cdiv(n, meta["BLOCK_N"]),)

    launch(_gemm, grid,
           a, b, out, offsets,
           bias if bias is not None else dummy, aux if aux is not None else dummy,
           perm if perm is not None else offsets, x, gamma if gamma is not None else dummy,
           dps if dps is not None else dummy, a2, b2,
           t, n, k,
           a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), out.stride(0),
           aux.stride(0) if aux is not None else 0, x.stride(0), a2.stride(0), b2.stride(0),
           b2.stride(1), _t_bucket(t),
           NUM_EXPERTS=num_experts, EPILOGUE=int(epilogue), HAS_BIAS=bias is not None,
           STORE_AUX=store_aux, RECOMPUTE=recompute_from is not None,
           HAS_GAMMA=gamma is not None, HAS_DPS=dps is not None,
           DOT_PRECISION=_dot_precision(a.dtype), UPCAST=INTERPRET, **_launch_meta(_INTERP_BLOCKS))
    return out


# Rows of a chunk of a split wgrad reduction, at least: its fp32 partial tile (written, then
# read back once) stays small next to the chunk's MMA work (2048 rows x a 128x128 tile: 64 KB
# of partial per 67 MFLOP), and the workspace stays within min(E * SPLIT, T // 2048) slots.
WGRAD_MIN_CHUNK = 2048


class WgradBuffers(NamedTuple):
    """Outputs and the split workspace of one grouped_wgrad launch (tests read the partials)."""
    dw: Tensor              # [E, KD, ND]
    db: Optional[Tensor]    # [E, ND]
    partials: Tensor        # [slots, KD, ND] fp32 (chunk partials of the split experts), or [0]
    bias_partials: Tensor   # [slots, ND] fp32, or [0]
    counters: Tensor        # [E, tiles] int32, all 0 again after the launch, or [0]


def _wgrad_min_chunk() -> int:
    return _INTERP_MIN_CHUNK if INTERPRET else WGRAD_MIN_CHUNK


def _wgrad_max_split(t: int) -> int:
    """The largest SPLIT the launch for T rows may run (and its workspace holds). On CUDA a
    function of the autotune key's T bucket, as the pruned configs must be: every T of a
    bucket above 2 * WGRAD_MIN_CHUNK has enough rows to split an expert; smaller T runs
    unsplit configs only and allocates no workspace."""
    if INTERPRET:
        return _INTERP_WGRAD["SPLIT"]
    return max(WGRAD_SPLITS) if _t_bucket(t) > 2 * WGRAD_MIN_CHUNK else 1


def _wgrad_max_tiles(kd: int, nd: int) -> int:
    """dW tiles per expert of the launch config with the most (sizes the counters)."""
    blocks = [_INTERP_WGRAD] if INTERPRET else [c.kwargs for c in _wgrad.configs]
    return max(triton.cdiv(kd, b["BLOCK_M"]) * triton.cdiv(nd, b["BLOCK_N"]) for b in blocks)


def grouped_wgrad(x: Tensor, g: Tensor, offsets: Tensor, num_experts: int, with_bias: bool,
                  dtype: torch.dtype) -> Tuple[Tensor, Optional[Tensor]]:
    """dW[e] = x_e^T @ g_e  ([E, Kx, Ng]) and db[e] = sum_rows g_e ([E, Ng])."""
    out = grouped_wgrad_buffers(x, g, offsets, num_experts, with_bias, dtype)
    return out.dw, out.db


def grouped_wgrad_buffers(x: Tensor, g: Tensor, offsets: Tensor, num_experts: int,
                          with_bias: bool, dtype: torch.dtype) -> WgradBuffers:
    """grouped_wgrad, also returning the split workspace. Partials of expert e's chunk c are
    at slot sum(n_e' for e' < e with n_e' > 1) + c, n_e = clamp(count_e // min_chunk, 1,
    SPLIT), for experts with n_e > 1. The counters are allocated zeroed per call (no state
    shared with other calls, e.g. on other streams), and the last chunk of each tile sets its
    counter back to 0, so re-running the launch on the same buffers (as the autotuner does
    while timing configs) counts from 0 again."""
    t, kd = x.shape
    nd = g.shape[1]
    dw = torch.empty((num_experts, kd, nd), dtype=dtype, device=x.device)
    db = torch.empty((num_experts, nd), dtype=dtype, device=x.device) if with_bias else dw
    max_split = _wgrad_max_split(t)
    min_chunk = _wgrad_min_chunk()
    slots = min(num_experts * max_split, t // min_chunk) if max_split > 1 else 0
    f32 = dict(dtype=torch.float32, device=x.device)
    # An expert splits only with >= 2 * min_chunk rows, so slots < 2 means nothing splits.
    split = slots >= 2
    partials = torch.empty((slots, kd, nd) if split else (0,), **f32)
    bias_partials = torch.empty((slots, nd) if split else (0,), **f32)
    counters = torch.zeros((num_experts, _wgrad_max_tiles(kd, nd)) if split else (0,),
                           dtype=torch.int32, device=x.device)

    def grid(meta):
        return (triton.cdiv(kd, meta["BLOCK_M"]) * triton.cdiv(nd, meta["BLOCK_N"]),
                num_experts * meta["SPLIT"])

    launch(_wgrad, grid, x, g, dw, db, offsets, partials, bias_partials, counters,
           kd, nd, x.stride(0), g.stride(0), min_chunk, _t_bucket(t),
           NUM_EXPERTS=num_experts, HAS_BIAS=with_bias, DOT_PRECISION=_dot_precision(x.dtype),
           UPCAST=INTERPRET, MAX_SPLIT=max_split, **_launch_meta(_INTERP_WGRAD))
    return WgradBuffers(dw, db if with_bias else None, partials, bias_partials, counters)


# Cap on programs of the reducing kernels: enough to fill an H100 several times over while
# keeping the fp32 partial buffers (programs x E x d) a few MB.
MAX_REDUCTION_PROGRAMS = 1024


def _reduction_grid(t: int, rows: int) -> Tuple[int, int]:
    """(programs, row blocks per program) for the kernels that emit per-program partial sums."""
    blocks = max(1, triton.cdiv(t, rows))
    chunks = triton.cdiv(blocks, MAX_REDUCTION_PROGRAMS)
    return triton.cdiv(blocks, chunks), chunks


def gather_grad(dout: Tensor, perm: Tensor, gamma: Optional[Tensor], dps: Optional[Tensor],
                y: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """dY (sorted, scaled by dps and gamma, in dout's dtype) and dgamma (fp32) if y is given."""
    t, d = dout.shape
    dy = torch.empty((t, d), dtype=dout.dtype, device=dout.device)
    rows, block_d = _row_block(d)
    programs, chunks = _reduction_grid(t, rows)
    part = torch.empty((programs, d), dtype=torch.float32, device=dout.device) if y is not None else dy
    launch(_gather_grad_kernel, (programs,),
           dout, perm, gamma if gamma is not None else dout, dps if dps is not None else dout,
           y if y is not None else dout, dy, part, t, d, dout.stride(0),
           y.stride(0) if y is not None else 0, dy.stride(0), chunks,
           HAS_GAMMA=gamma is not None, HAS_DPS=dps is not None, NEED_DGAMMA=y is not None,
           ROWS=rows, BLOCK_D=block_d, num_warps=_row_warps(block_d))
    return dy, (part.sum(0) if y is not None else None)


def layernorm_backward_scatter(dz: Tensor, x: Tensor, dout: Tensor, perm: Tensor,
                               offsets: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor
                               ) -> Tuple[Tensor, Tensor, Tensor]:
    """dx (token order) = dout + LN_e'(dz); dLN weight/bias [E, d] in fp32."""
    t, d = x.shape
    num_experts = weight.shape[0]
    dx = torch.empty((t, d), dtype=x.dtype, device=x.device)
    rows, block_d = _row_block(d)
    programs, chunks = _reduction_grid(t, rows)
    dw_part = torch.empty((programs, num_experts, d), dtype=torch.float32, device=x.device)
    db_part = torch.empty_like(dw_part)
    launch(_ln_bwd_scatter_kernel, (programs,),
           dz, x, dout, perm, offsets, weight, mean, rstd, dx, dw_part, db_part,
           t, d, dz.stride(0), x.stride(0), dout.stride(0), dx.stride(0), chunks,
           NUM_EXPERTS=num_experts, ROWS=rows, BLOCK_D=block_d, num_warps=_row_warps(block_d))
    return dx, dw_part.sum(0), db_part.sum(0)


# --------------------------------------------------------------------------------------
# Forward and backward passes, as torch.library custom ops: opaque to torch.compile (which
# sees their fake implementations, so `torch.compile(fullgraph=True)` traces through the
# MoME FFN without a graph break) and callable eagerly like any torch op.
# --------------------------------------------------------------------------------------
class MoMESaved(NamedTuple):
    """What the forward keeps for the backward (preact/branch are empty when not kept)."""
    perm: Tensor        # [T] int32: token at each sorted position
    offsets: Tensor     # [E + 1] int32: expert e's sorted rows are offsets[e]:offsets[e+1]
    z: Tensor           # [T, d] LN_e(x) in sorted order
    mean: Tensor        # [T] fp32
    rstd: Tensor        # [T] fp32
    preact: Tensor      # [T, h] fc1 pre-activation, or [0] when recomputed in backward
    act: Tensor         # [T, h] GELU(preact)
    branch: Tensor      # [T, d] un-scaled FFN output, or [0] when gamma needs no gradient


class MoMEGrads(NamedTuple):
    """Gradients of the backward op (empty [0] tensors where not requested)."""
    x: Tensor
    norm_weight: Tensor
    norm_bias: Tensor
    fc1_weight: Tensor
    fc1_bias: Tensor
    fc2_weight: Tensor
    fc2_bias: Tensor
    gamma: Tensor


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def mome_ffn_forward(x: Tensor, ids: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                     fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor, fc2_bias: Tensor,
                     gamma: Optional[Tensor], dps: Optional[Tensor], eps: float,
                     keep_preact: bool, keep_branch: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor,
                                                                    Tensor, Tensor, Tensor, Tensor,
                                                                    Tensor]:
    """The forward pass the op vlmo_fast::mome_ffn_fwd runs: (out, *MoMESaved). Called
    directly on meta tensors by the compile matrix to record its launches."""
    num_experts = norm_weight.shape[0]
    perm, offsets = route(ids, num_experts)
    z, mean, rstd = gather_layernorm(x, perm, offsets, norm_weight, norm_bias, eps)
    t, h = x.shape[0], fc1_weight.shape[2]
    preact = torch.empty((t, h), dtype=x.dtype, device=x.device) if keep_preact else None
    act = grouped_gemm(z, fc1_weight, offsets, EPI_GELU, bias=fc1_bias, aux=preact,
                       store_aux=keep_preact)
    out = torch.empty_like(x)
    branch = torch.empty_like(x) if keep_branch else None
    grouped_gemm(act, fc2_weight, offsets, EPI_RESIDUAL, out=out, bias=fc2_bias, aux=branch,
                 store_aux=keep_branch, perm=perm, x=x, gamma=gamma, dps=dps)
    return (out, perm, offsets, z, mean, rstd, preact if keep_preact else _empty(x), act,
            branch if keep_branch else _empty(x))


_mome_ffn_fwd_op = torch.library.custom_op("vlmo_fast::mome_ffn_fwd", mome_ffn_forward,
                                           mutates_args=())


@_mome_ffn_fwd_op.register_fake
def _(x, ids, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, dps,
      eps, keep_preact, keep_branch):
    t, d = x.shape
    h = fc1_weight.shape[2]
    i32 = dict(dtype=torch.int32, device=x.device)
    f32 = dict(dtype=torch.float32, device=x.device)
    return (torch.empty_like(x), x.new_empty(t, **i32), x.new_empty(norm_weight.shape[0] + 1, **i32),
            torch.empty_like(x), x.new_empty(t, **f32), x.new_empty(t, **f32),
            x.new_empty(t, h) if keep_preact else _empty(x), x.new_empty(t, h),
            torch.empty_like(x) if keep_branch else _empty(x))


def mome_ffn_backward(dout: Tensor, x: Tensor, perm: Tensor, offsets: Tensor, z: Tensor,
                     mean: Tensor, rstd: Tensor, preact: Tensor, act: Tensor, branch: Tensor,
                     norm_weight: Tensor, fc1_weight: Tensor, fc1_bias: Tensor,
                     fc2_weight: Tensor, gamma: Optional[Tensor], dps: Optional[Tensor],
                     recompute_preact: bool, need_input: bool, need_fc1: bool, need_fc2: bool,
                     need_gamma: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                Tensor, Tensor]:
    """The backward pass the op vlmo_fast::mome_ffn_bwd runs: MoMEGrads. need_input: x or
    the LN parameters need a gradient (they come from one kernel)."""
    num_experts = norm_weight.shape[0]
    dy, dgamma = gather_grad(dout, perm, gamma, dps, branch if need_gamma else None)
    dw2 = db2 = dw1 = db1 = dx = dnw = dnb = None
    if need_fc2:
        dw2, db2 = grouped_wgrad(act, dy, offsets, num_experts, True, fc2_weight.dtype)
    if need_input or need_fc1:
        recompute = (z, fc1_weight) if recompute_preact else None
        dh = grouped_gemm(dy, fc2_weight.transpose(1, 2), offsets, EPI_DGELU,
                          aux=None if recompute_preact else preact,
                          bias=fc1_bias if recompute_preact else None, recompute_from=recompute)
        if need_fc1:
            dw1, db1 = grouped_wgrad(z, dh, offsets, num_experts, True, fc1_weight.dtype)
        if need_input:
            dz = grouped_gemm(dh, fc1_weight.transpose(1, 2), offsets, EPI_PLAIN,
                              out_dtype=torch.float32)
            dx, dnw, dnb = layernorm_backward_scatter(dz, x, dout, perm, offsets, norm_weight,
                                                      mean, rstd)
            dnw, dnb = dnw.to(norm_weight.dtype), dnb.to(norm_weight.dtype)
    dgamma = dgamma.to(gamma.dtype) if (need_gamma and gamma is not None) else None
    # Custom-op outputs may not alias each other: a fresh empty tensor per absent gradient.
    return tuple(_empty(x) if g is None else g for g in (dx, dnw, dnb, dw1, db1, dw2, db2, dgamma))


_mome_ffn_bwd_op = torch.library.custom_op("vlmo_fast::mome_ffn_bwd", mome_ffn_backward,
                                           mutates_args=())


@_mome_ffn_bwd_op.register_fake
def _(dout, x, perm, offsets, z, mean, rstd, preact, act, branch, norm_weight, fc1_weight,
      fc1_bias, fc2_weight, gamma, dps, recompute_preact, need_input, need_fc1, need_fc2,
      need_gamma):
    pick = lambda need, like: torch.empty_like(like) if need else _empty(x)  # noqa: E731
    return (pick(need_input, x), pick(need_input, norm_weight), pick(need_input, norm_weight),
            pick(need_fc1, fc1_weight), pick(need_fc1, fc1_bias), pick(need_fc2, fc2_weight),
            pick(need_fc2, fc2_weight[:, 0]), pick(need_gamma and gamma is not None, gamma))


class MoMEFFNFunction(torch.autograd.Function):
    """Autograd of the grouped Triton MoME FFN (forward/backward are the custom ops above;
    torch.compile traces this Function and sees the ops through their fake implementations).

    apply(x [T, d], ids [T], norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight,
          fc2_bias, gamma [d] or None, dps [T] fp32 or None, eps, recompute_preact, keep_branch)
    """

    @staticmethod
    def forward(ctx, x, ids, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight,
                fc2_bias, gamma, dps, eps, recompute_preact, keep_branch):
        out, *saved = torch.ops.vlmo_fast.mome_ffn_fwd(
            x, ids, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma,
            dps, eps, not recompute_preact, keep_branch)
        ctx.save_for_backward(x, *saved, norm_weight, fc1_weight, fc1_bias, fc2_weight, gamma, dps)
        ctx.recompute_preact = recompute_preact
        return out

    @staticmethod
    def backward(ctx, dout):
        x, *rest = ctx.saved_tensors
        saved = MoMESaved(*rest[:8])
        norm_weight, fc1_weight, fc1_bias, fc2_weight, gamma, dps = rest[8:]
        need = ctx.needs_input_grad
        need_input = need[0] or need[2] or need[3]
        need_fc1, need_fc2 = need[4] or need[5], need[6] or need[7]
        need_gamma = gamma is not None and need[8]
        grads = MoMEGrads(*torch.ops.vlmo_fast.mome_ffn_bwd(
            dout.contiguous(), x, *saved, norm_weight, fc1_weight, fc1_bias, fc2_weight, gamma,
            dps, ctx.recompute_preact, need_input, need_fc1, need_fc2, need_gamma))
        when = lambda flag, grad: grad if flag else None  # noqa: E731
        return (when(need[0], grads.x), None, when(need[2], grads.norm_weight),
                when(need[3], grads.norm_bias), when(need[4], grads.fc1_weight),
                when(need[5], grads.fc1_bias), when(need[6], grads.fc2_weight),
                when(need[7], grads.fc2_bias), when(need_gamma, grads.gamma),
                None, None, None, None)


def mome_ffn_triton(x: Tensor, modality_ids: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                    fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor, fc2_bias: Tensor,
                    gamma: Optional[Tensor] = None, drop_path_scale: Optional[Tensor] = None,
                    eps: float = 1e-6, recompute_preact: Optional[bool] = None) -> Tensor:
    """The grouped Triton path: 4 launches forward (route, gather+LN, fc1, fc2), no host sync.

    recompute_preact: False keeps the fc1 pre-activation [T, h] for dGELU (default, set
    process-wide with VLMO_FAST_MOME_RECOMPUTE=1); True recomputes it inside the backward
    dGELU GEMM (+2*T*d*h FLOPs, -T*h*2 elements of memory traffic and storage).
    drop_path_scale receives no gradient (it is a sampled constant)."""
    if recompute_preact is None:
        recompute_preact = env_flag("VLMO_FAST_MOME_RECOMPUTE")
    d = x.shape[-1]
    flat = x.reshape(-1, d)
    if flat.shape[0] == 0:
        return x.clone()
    flat = flat if flat.stride(-1) == 1 else flat.contiguous()
    ids = modality_ids.reshape(-1)
    ids = ids if ids.is_contiguous() else ids.contiguous()
    if gamma is not None:
        gamma = gamma.expand(d)
        gamma = gamma if gamma.is_contiguous() else gamma.contiguous()
    dps = None
    if drop_path_scale is not None:
        dps = drop_path_scale.detach().reshape(-1).to(torch.float32).contiguous()
    weights = [t.contiguous() for t in (norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight,
                                        fc2_bias)]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in [flat, gamma, *weights]):
        keep_branch = gamma is not None and gamma.requires_grad
        out = MoMEFFNFunction.apply(flat, ids, *weights, gamma, dps, eps, bool(recompute_preact),
                                    keep_branch)
    else:  # inference: no autograd node, and neither H nor the branch is stored
        out = torch.ops.vlmo_fast.mome_ffn_fwd(flat, ids, *weights, gamma, dps, eps, False, False)[0]
    return out.reshape(x.shape)

