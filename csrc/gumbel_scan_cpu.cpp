// Test hook: vlmo_fast::_gumbel_scan runs the CUDA sampler's decisions (gumbel_scan.h: noise,
// skip of elements that cannot win, key order, merge over threads and column chunks) on the
// CPU, structured as the kernel is: `threads` strided scans per column chunk, merged, then the
// chunks merged in order. No GPU is needed to check that the skip and the column split leave
// every draw unchanged and that fp64 keys keep fp64 differences. Not a sampler to use: the op
// vlmo_fast::hard_negatives is (its CPU kernel draws by inverse CDF, one pass).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "gumbel_scan.h"
#include "hard_negatives.h"

namespace vlmo_fast {
namespace hardneg {
namespace {

constexpr int64_t kUnroll = 4;  // as hard_negatives_cuda.cu's scan_columns
constexpr int64_t kWarp = 32;

// One row as the CUDA row kernel scans it: `threads` lanes per column chunk in warps of 32
// (fewer if threads < 32) that exchange their best keys before each group of kUnroll
// elements while the warp's last lane still has a full group, then a tail without exchange;
// lanes, then chunks, merged in order.
template <typename scalar_t, bool SKIP>
int64_t scan_row(const scalar_t* x, int64_t stride1, const bool* m, int64_t mask_stride1,
                 int64_t n, int64_t pos, uint64_t key, int64_t chunks, int64_t threads) {
  using acc_t = key_t<scalar_t>;
  if (pos < 0 || pos >= n) return kPositiveOutOfRange;
  auto offer = [&](RowScan<acc_t>& scan, int64_t j, acc_t floor) {
    scan.template offer<SKIP>(static_cast<acc_t>(x[j * stride1]), j,
                              m != nullptr && m[j * mask_stride1], pos, key, floor);
  };
  const int64_t warp = std::min(kWarp, threads);
  RowScan<acc_t> row;
  std::vector<RowScan<acc_t>> lanes(static_cast<size_t>(warp));
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t begin = chunk_begin(n, chunks, c), end = chunk_begin(n, chunks, c + 1);
    for (int64_t w0 = 0; w0 < threads; w0 += warp) {
      const int64_t width = std::min(warp, threads - w0);
      std::fill(lanes.begin(), lanes.end(), RowScan<acc_t>{});
      acc_t floor = -static_cast<acc_t>(INFINITY);
      int64_t g = 0;  // group index: lane l's group starts at begin + w0 + l + g * kUnroll * threads
      for (;; ++g) {
        const int64_t last = begin + w0 + (width - 1) + g * kUnroll * threads;
        if (!(last + (kUnroll - 1) * threads < end)) break;
        floor = -static_cast<acc_t>(INFINITY);
        for (int64_t l = 0; l < width; ++l) {
          if (lanes[l].best_col >= 0 && lanes[l].best_key > floor) floor = lanes[l].best_key;
        }
        for (int64_t l = 0; l < width; ++l) {
          for (int64_t u = 0; u < kUnroll; ++u) {
            offer(lanes[l], begin + w0 + l + g * kUnroll * threads + u * threads, SKIP ? floor : -static_cast<acc_t>(INFINITY));
          }
        }
      }
      for (int64_t l = 0; l < width; ++l) {
        for (int64_t j = begin + w0 + l + g * kUnroll * threads; j < end; j += threads) {
          offer(lanes[l], j, SKIP ? floor : -static_cast<acc_t>(INFINITY));
        }
        row.merge(lanes[l].best_key, lanes[l].best_col, lanes[l].nonfinite);
      }
    }
  }
  return row.result();
}

at::Tensor gumbel_scan_cpu(const at::Tensor& logits, const at::Tensor& positive,
                           const std::optional<at::Tensor>& exclude_mask, int64_t seed,
                           int64_t row_offset, int64_t stream, int64_t chunks, int64_t threads,
                           bool skip) {
  const at::Tensor seed_tensor = at::tensor({seed}, at::kLong);
  check_hard_negative_args(logits, positive, exclude_mask, seed_tensor);
  TORCH_CHECK(logits.device().is_cpu(), "_gumbel_scan: CPU tensors only (a test hook)");
  TORCH_CHECK(chunks >= 1 && chunks <= std::max<int64_t>(1, logits.size(1)),
              "_gumbel_scan: chunks must be in [1, N], got ", chunks);
  TORCH_CHECK(threads >= 1, "_gumbel_scan: threads must be >= 1, got ", threads);
  TORCH_CHECK(row_offset >= 0, "_gumbel_scan: row_offset must be >= 0, got ", row_offset);
  at::Tensor out = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  const bool* mask = exclude_mask.has_value() ? exclude_mask->const_data_ptr<bool>() : nullptr;
  const int64_t* pos = positive.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "_gumbel_scan", [&] {
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    int64_t* o = out.mutable_data_ptr<int64_t>();
    for (int64_t r = 0; r < logits.size(0); ++r) {
      const uint64_t key = row_key(static_cast<uint64_t>(seed), static_cast<uint64_t>(stream),
                                   static_cast<uint64_t>(row_offset + r));
      const scalar_t* row = x + r * logits.stride(0);
      const bool* m = mask != nullptr ? mask + r * exclude_mask->stride(0) : nullptr;
      const int64_t m1 = mask != nullptr ? exclude_mask->stride(1) : 0;
      const int64_t p = pos[r * positive.stride(0)];
      o[r] = skip ? scan_row<scalar_t, true>(row, logits.stride(1), m, m1, logits.size(1), p, key,
                                             chunks, threads)
                  : scan_row<scalar_t, false>(row, logits.stride(1), m, m1, logits.size(1), p, key,
                                              chunks, threads);
    }
  });
  return out;
}

}  // namespace
}  // namespace hardneg
}  // namespace vlmo_fast

TORCH_LIBRARY_FRAGMENT(vlmo_fast, m) {
  m.def(
      "_gumbel_scan(Tensor logits, Tensor positive, Tensor? exclude_mask, int seed, "
      "int row_offset=0, int stream=0, int chunks=1, int threads=256, bool skip=True) -> Tensor");
}

TORCH_LIBRARY_IMPL(vlmo_fast, CPU, m) {
  m.impl("_gumbel_scan", &vlmo_fast::hardneg::gumbel_scan_cpu);
}
