// CUDA kernel of vlmo_fast::hard_negatives (schema and CPU kernel: hard_negatives.cpp).
//
// Gumbel-max: argmax_j (logit_j + G_j) over the allowed columns, G_j standard Gumbel noise, is
// distributed exactly as softmax(logits) renormalised over those columns. So one read of each
// logit, no max/normalisation pass and no weight matrix. The noise comes from the
// counter-based hash of (seed, stream, global row, column) in hard_negatives.h; the scan logic
// (noise, skip, key order, merge) is in gumbel_scan.h, shared with a CPU test hook.
//
// Per element the hash and two logarithms dominate (~75 instructions): they are skipped when
// the logit cannot win, i.e. when logit + (the noise's upper bound) does not exceed the best
// key so far; the draws are unchanged. With the ITC logit scale's range (|logit| up to the
// scale, ~14 at init, up to 100) most elements of a row are skipped once training has
// separated the scores. Keys are double for fp64 logits, float otherwise.
//
// Launch: rows are split across blocks (one row per block, or 32 rows per block for a
// transposed view so that each warp load reads 32 neighbouring addresses); when that gives too
// few blocks for the GPU (e.g. 32 blocks for 1,024 transposed rows on 132 SMs), the columns are
// split too (grid.y chunks of >= kMinChunkColumns): each chunk writes a partial (key, column,
// non-finite flag) per row and a small kernel merges them in chunk order with the same total
// order, so the result is identical to the unsplit scan.
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

#include <algorithm>
#include <limits>

#include "gumbel_scan.h"
#include "hard_negatives.h"

namespace vlmo_fast {
namespace hardneg {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

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
  // Column chunks (grid.y). chunks > 1: the result of chunk c for row r goes to
  // part_*[c * rows + r] and merge_chunks writes `out`.
  int64_t chunks;
  key_t<scalar_t>* part_key;
  int64_t* part_col;
  int* part_nonfinite;
};

// Largest key among the warp's lanes (each lane's best so far; -inf where none).
template <typename acc_t>
__device__ __forceinline__ acc_t warp_best(acc_t key) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const acc_t other = __shfl_xor_sync(0xFFFFFFFFu, key, offset);
    key = other > key ? other : key;
  }
  return key;
}

// Columns first, start, start + step, ... (< end) of one row into `scan`. Loads are issued
// kUnroll at a time ahead of the arithmetic so each thread keeps several memory requests in
// flight (this matters when few rows leave the GPU at low occupancy).
// WARP_ROW: the 32 lanes of the warp scan the same row (adjacent columns); before each group
// of kUnroll elements they exchange their best keys, so every lane skips against the warp's
// best rather than its own (several times fewer hashes on wide logit ranges). The main loop
// runs while the warp's LAST lane still has kUnroll elements, so all lanes take the same
// number of iterations and the shuffle sees the full warp; the tail keeps the last floor.
constexpr int kUnroll = 4;
template <typename scalar_t, bool WARP_ROW>
__device__ __forceinline__ void scan_columns(const RowsArgs<scalar_t>& a, int64_t row,
                                             int64_t start, int64_t end, int64_t step,
                                             int64_t pos, uint64_t key,
                                             RowScan<key_t<scalar_t>>& scan) {
  using acc_t = key_t<scalar_t>;
  const scalar_t* x = a.logits + row * a.stride0;
  const bool* m = a.mask != nullptr ? a.mask + row * a.mask_stride0 : nullptr;
  const int64_t to_last_lane = WARP_ROW ? 31 - static_cast<int64_t>(threadIdx.x % 32) : 0;
  acc_t floor = -static_cast<acc_t>(INFINITY);
  int64_t j = start;
  for (; j + to_last_lane + (kUnroll - 1) * step < end; j += kUnroll * step) {
    if constexpr (WARP_ROW) floor = warp_best(scan.best_key);
    acc_t v[kUnroll];
    bool excluded[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      v[u] = static_cast<acc_t>(x[(j + u * step) * a.stride1]);
      excluded[u] = m != nullptr && m[(j + u * step) * a.mask_stride1];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) scan.offer(v[u], j + u * step, excluded[u], pos, key, floor);
  }
  for (; j < end; j += step) {
    scan.offer(static_cast<acc_t>(x[j * a.stride1]), j, m != nullptr && m[j * a.mask_stride1],
               pos, key, floor);
  }
}

template <typename scalar_t>
__device__ __forceinline__ uint64_t key_of_row(const RowsArgs<scalar_t>& a, int64_t row) {
  const uint64_t seed =
      a.seed_on_device != nullptr ? static_cast<uint64_t>(*a.seed_on_device) : a.seed_value;
  return row_key(seed, a.stream, static_cast<uint64_t>(a.row_offset + row));
}

// A row's scan over this block's column chunk is done: write the result, or the chunk's
// partial when the columns are split. Rows whose positive is out of range are left to
// merge_chunks in the split case.
template <typename scalar_t>
__device__ __forceinline__ void finish_row(const RowsArgs<scalar_t>& a, int64_t row, bool pos_ok,
                                           const RowScan<key_t<scalar_t>>& scan) {
  if (a.chunks == 1) {
    a.out[row] = pos_ok ? scan.result() : kPositiveOutOfRange;
  } else if (pos_ok) {
    const int64_t slot = static_cast<int64_t>(blockIdx.y) * a.rows + row;
    a.part_key[slot] = scan.best_key;
    a.part_col[slot] = scan.best_col;
    a.part_nonfinite[slot] = scan.nonfinite;
  }
}

// Rows with contiguous (or any) column stride: one block per row (and column chunk), the
// threads split the columns, a warp-shuffle then shared-memory reduction combines them.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) gumbel_argmax_rows(RowsArgs<scalar_t> a) {
  using acc_t = key_t<scalar_t>;
  const int64_t row = blockIdx.x;
  const int64_t pos = a.positive[row * a.positive_stride];
  if (pos < 0 || pos >= a.n) {  // uniform across the block: every thread returns here
    if (threadIdx.x == 0) finish_row(a, row, false, RowScan<acc_t>{});
    return;
  }
  const int64_t begin = chunk_begin(a.n, a.chunks, blockIdx.y);
  const int64_t end = chunk_begin(a.n, a.chunks, blockIdx.y + 1);
  RowScan<acc_t> scan;
  scan_columns<scalar_t, true>(a, row, begin + threadIdx.x, end, kThreads, pos,
                               key_of_row(a, row), scan);

  scan.nonfinite = __syncthreads_or(scan.nonfinite);
  for (int offset = 16; offset > 0; offset >>= 1) {
    const acc_t other_key = __shfl_down_sync(0xFFFFFFFFu, scan.best_key, offset);
    const int64_t other_col = __shfl_down_sync(0xFFFFFFFFu, scan.best_col, offset);
    scan.merge(other_key, other_col, 0);
  }
  __shared__ acc_t warp_key[kWarps];
  __shared__ int64_t warp_col[kWarps];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) {
    warp_key[warp] = scan.best_key;
    warp_col[warp] = scan.best_col;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) scan.merge(warp_key[w], warp_col[w], 0);
    finish_row(a, row, true, scan);
  }
}

// Rows that are strided in memory while columns are adjacent: a transposed view such as the
// text->image direction read from the columns of the image->text matrix (stride0 == 1). A
// block takes 32 rows (and a column chunk), lane i of every warp row i, so each load
// instruction of a warp reads 32 neighbouring addresses; the warps split the columns and
// combine through shared memory. It computes the same keys as gumbel_argmax_rows, hence the
// same samples as on a contiguous copy.
constexpr int kRowsPerBlockT = 32;
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) gumbel_argmax_rows_transposed(RowsArgs<scalar_t> a) {
  using acc_t = key_t<scalar_t>;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlockT + lane;
  const bool active = row < a.rows;
  const int64_t pos = active ? a.positive[row * a.positive_stride] : 0;
  const bool pos_ok = active && pos >= 0 && pos < a.n;
  const int64_t begin = chunk_begin(a.n, a.chunks, blockIdx.y);
  const int64_t end = chunk_begin(a.n, a.chunks, blockIdx.y + 1);
  RowScan<acc_t> scan;
  // lanes hold different rows here: no exchange between them
  if (pos_ok) {
    scan_columns<scalar_t, false>(a, row, begin + warp, end, kWarps, pos, key_of_row(a, row),
                                  scan);
  }

  __shared__ acc_t part_key[kWarps][kRowsPerBlockT];
  __shared__ int64_t part_col[kWarps][kRowsPerBlockT];
  __shared__ int part_nonfinite[kWarps][kRowsPerBlockT];
  part_key[warp][lane] = scan.best_key;
  part_col[warp][lane] = scan.best_col;
  part_nonfinite[warp][lane] = scan.nonfinite;
  __syncthreads();
  if (warp == 0 && active) {
    for (int w = 1; w < kWarps; ++w) {
      scan.merge(part_key[w][lane], part_col[w][lane], part_nonfinite[w][lane]);
    }
    finish_row(a, row, pos_ok, scan);
  }
}

// Split columns: one thread per row folds the chunks' partials in chunk order.
template <typename scalar_t>
__global__ void merge_chunks(RowsArgs<scalar_t> a) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= a.rows) return;
  const int64_t pos = a.positive[row * a.positive_stride];
  if (pos < 0 || pos >= a.n) {
    a.out[row] = kPositiveOutOfRange;
    return;
  }
  RowScan<key_t<scalar_t>> scan;
  for (int64_t c = 0; c < a.chunks; ++c) {
    const int64_t slot = c * a.rows + row;
    scan.merge(a.part_key[slot], a.part_col[slot], a.part_nonfinite[slot]);
  }
  a.out[row] = scan.result();
}

// Enough blocks to fill the GPU twice over: columns are split into chunks of at least
// kMinChunkColumns when the row blocks alone are fewer than that.
constexpr int64_t kMinChunkColumns = 2048;
constexpr int64_t kMaxChunks = 64;

int64_t column_chunks(int64_t row_blocks, int64_t n, int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t wanted = (2 * static_cast<int64_t>(sms) + row_blocks - 1) / row_blocks;
  return std::max<int64_t>(1, std::min({wanted, n / kMinChunkColumns, kMaxChunks}));
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
  const int64_t rows = logits.size(0);
  // Columns adjacent in memory while rows are not: the transposed-view kernel keeps loads
  // coalesced.
  const bool transposed = logits.stride(0) == 1 && logits.stride(1) != 1 && rows > 1;
  const int64_t row_blocks = transposed ? (rows + kRowsPerBlockT - 1) / kRowsPerBlockT : rows;
  const int64_t chunks = column_chunks(row_blocks, logits.size(1), logits.get_device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "hard_negatives_cuda", [&] {
    using acc_t = key_t<scalar_t>;
    at::Tensor part_key, part_col, part_nonfinite;
    if (chunks > 1) {
      const auto opts = logits.options();
      part_key = at::empty({chunks, rows}, opts.dtype(c10::CppTypeToScalarType<acc_t>::value));
      part_col = at::empty({chunks, rows}, opts.dtype(at::kLong));
      part_nonfinite = at::empty({chunks, rows}, opts.dtype(at::kInt));
    }
    RowsArgs<scalar_t> args{logits.const_data_ptr<scalar_t>(), rows, logits.size(1),
                            logits.stride(0), logits.stride(1), mask, mask_stride0,
                            mask_stride1, positive.const_data_ptr<int64_t>(),
                            positive.stride(0), seed_on_device, seed_value, row_offset,
                            static_cast<uint64_t>(stream), out.mutable_data_ptr<int64_t>(),
                            chunks,
                            chunks > 1 ? part_key.mutable_data_ptr<acc_t>() : nullptr,
                            chunks > 1 ? part_col.mutable_data_ptr<int64_t>() : nullptr,
                            chunks > 1 ? part_nonfinite.mutable_data_ptr<int>() : nullptr};
    const dim3 grid(static_cast<unsigned int>(row_blocks), static_cast<unsigned int>(chunks));
    if (transposed) {
      gumbel_argmax_rows_transposed<scalar_t><<<grid, kThreads, 0, cuda_stream>>>(args);
    } else {
      gumbel_argmax_rows<scalar_t><<<grid, kThreads, 0, cuda_stream>>>(args);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (chunks > 1) {
      const unsigned int merge_blocks = static_cast<unsigned int>((rows + kThreads - 1) / kThreads);
      merge_chunks<scalar_t><<<merge_blocks, kThreads, 0, cuda_stream>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

}  // namespace
}  // namespace hardneg
}  // namespace vlmo_fast

TORCH_LIBRARY_IMPL(vlmo_fast, CUDA, m) {
  m.impl("hard_negatives", &vlmo_fast::hardneg::hard_negatives_cuda);
}
