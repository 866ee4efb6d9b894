// vlmo_fast::hard_negatives: the op schema, its CPU kernel and its Meta (shape-only) kernel.
//
// For every row r of `logits` [B, N] draw one column j != positive[r] (and not excluded by
// `exclude_mask`) with probability softmax(logits[r]) renormalised over the allowed columns.
//
// CPU algorithm (one random number per row, one exp per element, rows in parallel):
//   1. copy the row into a per-thread float buffer (any dtype, any stride), counting NaN/+inf;
//   2. set excluded entries and the positive to -inf, take the max over what is left;
//   3. replace each entry by exp(entry - max), summing per chunk of kChunk columns;
//   4. u * total picks a chunk from the chunk sums, then a column by a running sum inside it.
// Only a row-sized buffer per thread is written, never a B x N weight matrix; the buffer stays
// in L2, so the logits are read from memory once. The result depends only on the row's data
// and its counter-based random number, hence not on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "hard_negatives.h"

// The hot loops below are written as fixed 16-lane blocks so the compiler vectorises them;
// target_clones builds AVX2+FMA and AVX-512 variants next to the baseline and picks one at
// load time, so the wheel stays portable. Results may differ in the last bits between such
// variants (FMA contraction) but never between thread counts on one machine.
// (GCC 12+ only: older compilers may not know the x86-64-v3/v4 level names; they get the
// baseline build, which is correct, just slower.)
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && \
    defined(__linux__)
#define VLMO_VECTOR_CLONES \
  __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define VLMO_VECTOR_CLONES
#endif

namespace vlmo_fast {
namespace hardneg {
namespace {

constexpr int64_t kLanes = 16;
// Columns per chunk of the two-level inverse-CDF search: small enough that the final linear
// scan is short, large enough that the chunk-sum array is tiny (N / 256 doubles).
constexpr int64_t kChunk = 256;
constexpr float kInf = std::numeric_limits<float>::infinity();

// exp(x) for x in [-inf, 0] (arguments are logit - row max). Branch-free so that it vectorises:
// x = n ln2 + r with |r| <= ln2/2, exp(r) by its degree-6 Taylor polynomial (relative error
// < 2e-7, about one float ulp), 2^n written straight into the exponent bits. Below -87 the true
// value is under the smallest normal float and, being at most 2^-126 times the row's largest
// weight, cannot change a draw: return an exact 0, which also makes -inf entries weightless.
inline float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f;  // ln 2 split so that n * kLn2Hi is exact
  constexpr float kLn2Lo = 1.42860682030941723212e-6f;
  constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const bool underflow = !(x >= -87.0f);      // also true for -inf
  const float xc = underflow ? -87.0f : x;
  const float shifted = xc * kLog2e + kRoundMagic;
  const float n = shifted - kRoundMagic;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // n is in [-126, 0] here, so (n + 127) << 23 is the bit pattern of the normal float 2^n.
  int32_t n_int;
  std::memcpy(&n_int, &shifted, sizeof(n_int));
  n_int -= 0x4B400000;  // bits of kRoundMagic: what is left is n (two's complement)
  const int32_t scale_bits = (n_int + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  return underflow ? 0.0f : p * scale;
}

// Number of NaN or +inf entries (comparisons with NaN are false, so !(v < inf) catches both).
VLMO_VECTOR_CLONES
int64_t count_nonfinite(const float* buf, int64_t n) {
  int32_t lanes[kLanes] = {0};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += !(buf[j + l] < kInf);
  int64_t count = 0;
  for (; j < n; ++j) count += !(buf[j] < kInf);
  for (int64_t l = 0; l < kLanes; ++l) count += lanes[l];
  return count;
}

VLMO_VECTOR_CLONES
float row_max(const float* buf, int64_t n) {
  float lanes[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lanes[l] = -kInf;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] = buf[j + l] > lanes[l] ? buf[j + l] : lanes[l];
  float m = -kInf;
  for (; j < n; ++j) m = buf[j] > m ? buf[j] : m;
  for (int64_t l = 0; l < kLanes; ++l) m = lanes[l] > m ? lanes[l] : m;
  return m;
}

// buf[j] <- exp(buf[j] - shift) and chunk_sums[c] <- sum of chunk c. Float accumulation over
// at most kChunk / kLanes = 16 terms per lane, double across lanes and chunks.
VLMO_VECTOR_CLONES
void exp_and_chunk_sums(float* buf, int64_t n, float shift, double* chunk_sums) {
  for (int64_t begin = 0, c = 0; begin < n; begin += kChunk, ++c) {
    const int64_t end = std::min(n, begin + kChunk);
    float lanes[kLanes] = {0.0f};
    int64_t j = begin;
    for (; j + kLanes <= end; j += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) {
        const float w = exp_nonpositive(buf[j + l] - shift);
        buf[j + l] = w;
        lanes[l] += w;
      }
    double sum = 0.0;
    for (; j < end; ++j) {
      buf[j] = exp_nonpositive(buf[j] - shift);
      sum += buf[j];
    }
    for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
    chunk_sums[c] = sum;
  }
}

// Inverse CDF over the weights in `buf` with the uniform `u` in [0, 1).
int64_t pick_by_cumulative_weight(const float* buf, int64_t n, const double* chunk_sums,
                                  int64_t num_chunks, double u) {
  double total = 0.0;
  for (int64_t c = 0; c < num_chunks; ++c) total += chunk_sums[c];
  double target = u * total;
  // Same summation order as `total`, so this stops inside the array whenever target < total.
  double before = 0.0;
  int64_t chunk = 0;
  for (; chunk < num_chunks; ++chunk) {
    if (before + chunk_sums[chunk] > target) break;
    before += chunk_sums[chunk];
  }
  if (chunk == num_chunks) {
    // u * total rounded up to total: the draw belongs at the very end of the distribution.
    chunk = num_chunks - 1;
    while (chunk > 0 && !(chunk_sums[chunk] > 0.0)) --chunk;
    before = 0.0;
    target = std::numeric_limits<double>::infinity();
  }
  const int64_t begin = chunk * kChunk;
  const int64_t end = std::min(n, begin + kChunk);
  int64_t last_positive = -1;
  for (int64_t j = begin; j < end; ++j) {
    if (buf[j] > 0.0f) {
      before += buf[j];
      last_positive = j;
      if (before > target) return j;
    }
  }
  // The chunk sum and this running sum round differently; the few ulps of difference can leave
  // the target just past the last weight of the chosen chunk, which is then the right column.
  return last_positive;
}

template <typename scalar_t>
void sample_rows(const at::Tensor& logits, const int64_t* positive, int64_t positive_stride,
                 const bool* mask, int64_t mask_stride0, int64_t mask_stride1, uint64_t seed,
                 int64_t row_offset, int64_t stream, int64_t* out) {
  const int64_t rows = logits.size(0);
  const int64_t n = logits.size(1);
  const int64_t stride0 = logits.stride(0);
  const int64_t stride1 = logits.stride(1);
  const scalar_t* data = logits.const_data_ptr<scalar_t>();
  const int64_t num_chunks = (n + kChunk - 1) / kChunk;
  // One task per thread when rows are long; group short rows so each task has ~64k columns.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t first, int64_t last) {
    std::vector<float> buf(static_cast<size_t>(n));
    std::vector<double> chunk_sums(static_cast<size_t>(num_chunks));
    for (int64_t r = first; r < last; ++r) {
      const int64_t pos = positive[r * positive_stride];
      if (pos < 0 || pos >= n) {
        out[r] = kPositiveOutOfRange;
        continue;
      }
      const scalar_t* row = data + r * stride0;
      if (stride1 == 1) {
        for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<float>(row[j]);
      } else {
        for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<float>(row[j * stride1]);
      }
      if (count_nonfinite(buf.data(), n) != 0) {
        out[r] = kNonFinite;
        continue;
      }
      if (mask != nullptr) {
        const bool* mask_row = mask + r * mask_stride0;
        for (int64_t j = 0; j < n; ++j)
          buf[j] = mask_row[j * mask_stride1] ? -kInf : buf[j];
      }
      buf[pos] = -kInf;
      // The max over allowed entries only: a dominant positive must not push every allowed
      // weight below float range.
      const float m = row_max(buf.data(), n);
      if (m == -kInf) {
        out[r] = kNoCandidate;
        continue;
      }
      exp_and_chunk_sums(buf.data(), n, m, chunk_sums.data());
      const uint64_t key = row_key(seed, static_cast<uint64_t>(stream),
                                   static_cast<uint64_t>(row_offset + r));
      out[r] = pick_by_cumulative_weight(buf.data(), n, chunk_sums.data(), num_chunks,
                                         row_uniform(key));
    }
  });
}

}  // namespace

// Checks shared by every backend of the op (device-independent, no data access); declared in
// hard_negatives.h for the CUDA kernel.
void check_hard_negative_args(const at::Tensor& logits, const at::Tensor& positive,
                              const std::optional<at::Tensor>& exclude_mask,
                              const at::Tensor& seed) {
  TORCH_CHECK(logits.dim() == 2, "hard_negatives: logits must be 2-D [rows, candidates], got ",
              logits.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()),
              "hard_negatives: logits must be floating point, got ", logits.scalar_type());
  TORCH_CHECK(positive.dim() == 1 && positive.size(0) == logits.size(0),
              "hard_negatives: positive must have shape [", logits.size(0),
              "] (one index per row of logits), got ", positive.sizes());
  TORCH_CHECK(positive.scalar_type() == at::kLong,
              "hard_negatives: positive must be int64, got ", positive.scalar_type());
  TORCH_CHECK(positive.device() == logits.device(), "hard_negatives: positive is on ",
              positive.device(), " but logits is on ", logits.device());
  if (exclude_mask.has_value()) {
    TORCH_CHECK(exclude_mask->scalar_type() == at::kBool,
                "hard_negatives: exclude_mask must be bool, got ", exclude_mask->scalar_type());
    TORCH_CHECK(exclude_mask->sizes() == logits.sizes(), "hard_negatives: exclude_mask must have "
                "the shape of logits ", logits.sizes(), ", got ", exclude_mask->sizes());
    TORCH_CHECK(exclude_mask->device() == logits.device(), "hard_negatives: exclude_mask is on ",
                exclude_mask->device(), " but logits is on ", logits.device());
  }
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong,
              "hard_negatives: seed must be a one-element int64 tensor, got ", seed.scalar_type(),
              " with ", seed.numel(), " elements");
  TORCH_CHECK(seed.device().is_cpu() || seed.device() == logits.device(),
              "hard_negatives: seed must be on the CPU or on the device of logits (",
              logits.device(), "), got ", seed.device());
}

namespace {

at::Tensor hard_negatives_cpu(const at::Tensor& logits, const at::Tensor& positive,
                              const std::optional<at::Tensor>& exclude_mask,
                              const at::Tensor& seed, int64_t row_offset, int64_t stream) {
  check_hard_negative_args(logits, positive, exclude_mask, seed);
  TORCH_CHECK(logits.device().is_cpu(), "hard_negatives (CPU kernel): logits must be on the CPU");
  TORCH_CHECK(row_offset >= 0, "hard_negatives: row_offset must be >= 0, got ", row_offset);
  at::Tensor out = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  if (logits.size(0) == 0) return out;
  const uint64_t seed_value = static_cast<uint64_t>(seed.item<int64_t>());
  const bool* mask = exclude_mask.has_value() ? exclude_mask->const_data_ptr<bool>() : nullptr;
  const int64_t mask_stride0 = exclude_mask.has_value() ? exclude_mask->stride(0) : 0;
  const int64_t mask_stride1 = exclude_mask.has_value() ? exclude_mask->stride(1) : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "hard_negatives_cpu", [&] {
    sample_rows<scalar_t>(logits, positive.const_data_ptr<int64_t>(), positive.stride(0), mask,
                          mask_stride0, mask_stride1, seed_value, row_offset, stream,
                          out.mutable_data_ptr<int64_t>());
  });
  return out;
}

// Shapes only, so torch.compile / FakeTensor tracing can pass through the op.
at::Tensor hard_negatives_meta(const at::Tensor& logits, const at::Tensor& positive,
                               const std::optional<at::Tensor>& exclude_mask,
                               const at::Tensor& seed, int64_t row_offset, int64_t stream) {
  check_hard_negative_args(logits, positive, exclude_mask, seed);
  return at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
}

}  // namespace
}  // namespace hardneg
}  // namespace vlmo_fast

// TORCH_LIBRARY_FRAGMENT rather than TORCH_LIBRARY: other csrc/ files may add ops to the same
// `vlmo_fast` namespace.
TORCH_LIBRARY_FRAGMENT(vlmo_fast, m) {
  m.def(
      "hard_negatives(Tensor logits, Tensor positive, Tensor? exclude_mask, Tensor seed, "
      "int row_offset=0, int stream=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(vlmo_fast, CPU, m) {
  m.impl("hard_negatives", &vlmo_fast::hardneg::hard_negatives_cpu);
}

TORCH_LIBRARY_IMPL(vlmo_fast, Meta, m) {
  m.impl("hard_negatives", &vlmo_fast::hardneg::hard_negatives_meta);
}
