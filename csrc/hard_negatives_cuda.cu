// CUDA kernel of vlmo_fast::hard_negatives (schema and CPU kernel: hard_negatives.cpp).
//
// Gumbel-max: argmax_j (logit_j + G_j) over the allowed columns, G_j standard Gumbel noise, is
// distributed exactly as softmax(logits) renormalised over those columns. So one read of each
// logit, no max/normalisation pass and no weight matrix: one thread block per row, each thread
// keeps its best (key, column) over a strided slice, then a block reduction. The noise comes
// from the counter-based hash of (seed, stream, global row, column) in hard_negatives.h.
//
// No host synchronisation: the seed may be a device tensor (read by the kernel), problems are
// reported as negative codes in the output (the Python wrapper asserts on them asynchronously).
// The CPU kernel draws by inverse CDF instead, so CPU and CUDA agree in distribution, not in
// the individual draws.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs cuSPARSE headers
#include <torch/library.h>

#include <cuda_runtime.h>

#include <limits>

#include "hard_negatives.h"

namespace vlmo_fast {
namespace hardneg {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Standard Gumbel noise from 32 random bits.
// v = (bits + 1/2) 2^-32 rounded toward zero stays in (0, 1) (never 0 or 1) and keeps full
// relative precision near 0, the end that produces the large noise values which decide rare
// winners. E = -log(1 - v) is Exp(1); log1pf keeps it accurate for small v, where a fast
// __logf(1 - v) would have an absolute error comparable to E itself (--use_fast_math maps
// logf to __logf but leaves log1pf alone). G = -log(E); here __logf's small absolute error
// is harmless.
__device__ __forceinline__ float gumbel_from_bits(uint32_t bits) {
  const float v = fmaf(__uint2float_rz(bits), 0x1p-32f, 0x1p-33f);
  const float e = -log1pf(-v);
  return -__logf(e);
}

// (key, column) with the larger key wins; equal keys go to the smaller column, so the result
// does not depend on which thread saw which column. Column -1 means "nothing yet".
__device__ __forceinline__ bool beats(float key, int64_t col, float best_key, int64_t best_col) {
  if (col < 0) return false;
  if (best_col < 0) return true;
  return key > best_key || (key == best_key && col < best_col);
}

// Everything a kernel needs to know about one call, passed by value.
template <typename scalar_t>
struct RowsArgs {
  const scalar_t* logits;
  int64_t rows, n, stride0, stride1;
  const bool* mask;  // nullptr: no exclude_mask
  int64_t mask_stride0, mask_stride1;
  const int64_t* positive;
  int64_t positive_stride;
  const int64_t* seed_on_device;  // nullptr: use seed_value
  uint64_t seed_value;
  int64_t row_offset;
  uint64_t stream;
  int64_t* out;
};

// Per-thread state of the scan over one row: the best (key, column) so far and whether a
// NaN/+inf was seen. Columns must be offered in increasing order (strict > keeps the first).
struct RowScan {
  float best_key = -INFINITY;
  int64_t best_col = -1;
  int nonfinite = 0;

  __device__ __forceinline__ void offer(float v, int64_t col, bool excluded, int64_t pos,
                                        uint64_t key) {
    nonfinite |= !(v < INFINITY);
    if (col != pos && v > -INFINITY && !excluded) {
      const float k = v + gumbel_from_bits(element_bits(key, static_cast<uint32_t>(col)));
      if (best_col < 0 || k > best_key) {
        best_key = k;
        best_col = col;
      }
    }
  }
};

// Columns first, start, start + step, ... of one row into `scan`. Loads are issued kUnroll at
// a time ahead of the arithmetic so each thread keeps several memory requests in flight (this
// matters when few rows leave the GPU at low occupancy).
constexpr int kUnroll = 4;
template <typename scalar_t>
__device__ __forceinline__ void scan_columns(const RowsArgs<scalar_t>& a, int64_t row,
                                             int64_t start, int64_t step, int64_t pos,
                                             uint64_t key, RowScan& scan) {
  const scalar_t* x = a.logits + row * a.stride0;
  const bool* m = a.mask != nullptr ? a.mask + row * a.mask_stride0 : nullptr;
  int64_t j = start;
  for (; j + (kUnroll - 1) * step < a.n; j += kUnroll * step) {
    float v[kUnroll];
    bool excluded[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      v[u] = static_cast<float>(x[(j + u * step) * a.stride1]);
      excluded[u] = m != nullptr && m[(j + u * step) * a.mask_stride1];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) scan.offer(v[u], j + u * step, excluded[u], pos, key);
  }
  for (; j < a.n; j += step) {
    scan.offer(static_cast<float>(x[j * a.stride1]), j,
               m != nullptr && m[j * a.mask_stride1], pos, key);
  }
}

template <typename scalar_t>
__device__ __forceinline__ uint64_t key_of_row(const RowsArgs<scalar_t>& a, int64_t row) {
  const uint64_t seed =
      a.seed_on_device != nullptr ? static_cast<uint64_t>(*a.seed_on_device) : a.seed_value;
  return row_key(seed, a.stream, static_cast<uint64_t>(a.row_offset + row));
}

__device__ __forceinline__ int64_t result_code(const RowScan& scan) {
  return scan.nonfinite ? kNonFinite : (scan.best_col < 0 ? kNoCandidate : scan.best_col);
}

// Rows with contiguous (or any) column stride: one block per row, the threads split the
// columns, a warp-shuffle then shared-memory reduction combines them.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) gumbel_argmax_rows(RowsArgs<scalar_t> a) {
  const int64_t row = blockIdx.x;
  const int64_t pos = a.positive[row * a.positive_stride];
  if (pos < 0 || pos >= a.n) {  // uniform across the block: every thread returns here
    if (threadIdx.x == 0) a.out[row] = kPositiveOutOfRange;
    return;
  }
  RowScan scan;
  scan_columns(a, row, threadIdx.x, kThreads, pos, key_of_row(a, row), scan);

  scan.nonfinite = __syncthreads_or(scan.nonfinite);
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other_key = __shfl_down_sync(0xFFFFFFFFu, scan.best_key, offset);
    const int64_t other_col = __shfl_down_sync(0xFFFFFFFFu, scan.best_col, offset);
    if (beats(other_key, other_col, scan.best_key, scan.best_col)) {
      scan.best_key = other_key;
      scan.best_col = other_col;
    }
  }
  __shared__ float warp_key[kWarps];
  __shared__ int64_t warp_col[kWarps];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) {
    warp_key[warp] = scan.best_key;
    warp_col[warp] = scan.best_col;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) {
      if (beats(warp_key[w], warp_col[w], scan.best_key, scan.best_col)) {
        scan.best_key = warp_key[w];
        scan.best_col = warp_col[w];
      }
    }
    a.out[row] = result_code(scan);
  }
}

// Rows that are strided in memory while columns are adjacent: a transposed view such as the
// text->image direction read from the columns of the image->text matrix (stride0 == 1). A
// block takes 32 rows, lane i of every warp row i, so each load instruction of a warp reads 32
// neighbouring addresses; the warps split the columns and combine through shared memory. It
// computes the same keys as gumbel_argmax_rows, hence the same samples as on a contiguous copy.
constexpr int kRowsPerBlockT = 32;
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) gumbel_argmax_rows_transposed(RowsArgs<scalar_t> a) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlockT + lane;
  const bool active = row < a.rows;
  const int64_t pos = active ? a.positive[row * a.positive_stride] : 0;
  const bool pos_ok = active && pos >= 0 && pos < a.n;
  RowScan scan;
  if (pos_ok) scan_columns(a, row, warp, kWarps, pos, key_of_row(a, row), scan);

  __shared__ float part_key[kWarps][kRowsPerBlockT];
  __shared__ int64_t part_col[kWarps][kRowsPerBlockT];
  __shared__ int part_nonfinite[kWarps][kRowsPerBlockT];
  part_key[warp][lane] = scan.best_key;
  part_col[warp][lane] = scan.best_col;
  part_nonfinite[warp][lane] = scan.nonfinite;
  __syncthreads();
  if (warp == 0 && active) {
    for (int w = 1; w < kWarps; ++w) {
      scan.nonfinite |= part_nonfinite[w][lane];
      if (beats(part_key[w][lane], part_col[w][lane], scan.best_key, scan.best_col)) {
        scan.best_key = part_key[w][lane];
        scan.best_col = part_col[w][lane];
      }
    }
    a.out[row] = pos_ok ? result_code(scan) : kPositiveOutOfRange;
  }
}

at::Tensor hard_negatives_cuda(const at::Tensor& logits, const at::Tensor& positive,
                               const std::optional<at::Tensor>& exclude_mask,
                               const at::Tensor& seed, int64_t row_offset, int64_t stream) {
  check_hard_negative_args(logits, positive, exclude_mask, seed);
  TORCH_CHECK(logits.is_cuda(), "hard_negatives (CUDA kernel): logits must be on a CUDA device");
  TORCH_CHECK(row_offset >= 0, "hard_negatives: row_offset must be >= 0, got ", row_offset);
  TORCH_CHECK(logits.size(1) <= (int64_t{1} << 32),
              "hard_negatives (CUDA kernel): at most 2^32 candidates per row, got ",
              logits.size(1));
  TORCH_CHECK(logits.size(0) <= std::numeric_limits<int32_t>::max(),
              "hard_negatives (CUDA kernel): at most 2^31-1 rows, got ", logits.size(0));
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor out = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  if (logits.size(0) == 0) return out;

  // A CPU seed is read here (no device sync); a device seed is read by the kernel, so drawing
  // it from a CUDA generator costs no sync either.
  const int64_t* seed_on_device = seed.is_cuda() ? seed.const_data_ptr<int64_t>() : nullptr;
  const uint64_t seed_value = seed.is_cuda() ? 0 : static_cast<uint64_t>(seed.item<int64_t>());
  const bool* mask = exclude_mask.has_value() ? exclude_mask->const_data_ptr<bool>() : nullptr;
  const int64_t mask_stride0 = exclude_mask.has_value() ? exclude_mask->stride(0) : 0;
  const int64_t mask_stride1 = exclude_mask.has_value() ? exclude_mask->stride(1) : 0;
  const cudaStream_t cuda_stream = c10::cuda::getCurrentCUDAStream();
  // Columns adjacent in memory while rows are not: the transposed-view kernel keeps loads
  // coalesced.
  const bool transposed = logits.stride(0) == 1 && logits.stride(1) != 1 && logits.size(0) > 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "hard_negatives_cuda", [&] {
    RowsArgs<scalar_t> args{logits.const_data_ptr<scalar_t>(), logits.size(0), logits.size(1),
                            logits.stride(0), logits.stride(1), mask, mask_stride0,
                            mask_stride1, positive.const_data_ptr<int64_t>(),
                            positive.stride(0), seed_on_device, seed_value, row_offset,
                            static_cast<uint64_t>(stream), out.mutable_data_ptr<int64_t>()};
    if (transposed) {
      const dim3 grid(static_cast<unsigned int>((logits.size(0) + kRowsPerBlockT - 1) /
                                                kRowsPerBlockT));
      gumbel_argmax_rows_transposed<scalar_t><<<grid, kThreads, 0, cuda_stream>>>(args);
    } else {
      const dim3 grid(static_cast<unsigned int>(logits.size(0)));
      gumbel_argmax_rows<scalar_t><<<grid, kThreads, 0, cuda_stream>>>(args);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace hardneg
}  // namespace vlmo_fast

TORCH_LIBRARY_IMPL(vlmo_fast, CUDA, m) {
  m.impl("hard_negatives", &vlmo_fast::hardneg::hard_negatives_cuda);
}
