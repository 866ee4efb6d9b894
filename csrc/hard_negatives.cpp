// vlmo_fast::hard_negatives: the op schema, its CPU kernel and its Meta (shape-only) kernel.
//
// For every row r of `logits` [B, N] draw one column j != positive[r] (and not excluded by
// `exclude_mask`) with probability softmax(logits[r]) renormalised over the allowed columns.
//
// CPU algorithm: ONE pass over the row's memory, one random number per row, rows in parallel.
//   Columns are visited in chunks of kChunk (2 KB of floats). One vector pass per chunk sums
//   exp(value - shift); the shift is the row's running max, raised (and the running total
//   rescaled, online-softmax style) only when a chunk's max exceeds it by more than kMaxLead.
//   A sum above e^kMaxLead (or NaN) is the cheap sign of that or of a NaN/+inf in the chunk: only
//   then is the chunk's max taken and the chunk redone (a handful of times per row).
//   Excluded entries and the positive count as -inf. Each chunk's sum is kept with its shift.
//   The exponentials are ATen Vectorized<float>::exp_u20 (relative error < 4e-7; AVX2+FMA when
//   the CPU has them, see hard_negatives_vec.h). Afterwards u * total (u uniform, the row's
//   only random number) picks a chunk from the rescaled chunk sums, and only that chunk is read
//   again to find the column.
// Nothing of size B x N, or even N, is written. fp64 rows subtract the running max in fp64
// before rounding to float (a common offset of 1e10 keeps its differences); other dtypes are
// rounded to float first. The result depends only on the row's data and its counter-based
// random number, hence not on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "hard_negatives.h"

#define VLMO_VEC_NAMESPACE portable
#include "hard_negatives_vec.h"
#undef VLMO_VEC_NAMESPACE

namespace vlmo_fast {
namespace hardneg {
namespace {

// Columns per chunk: 2 KB of floats, a multiple of every vector width. Small enough to stay in
// L1 between the passes over it, large enough that per-chunk bookkeeping is noise and the
// chunk tables are tiny (N / 512 entries).
constexpr int64_t kChunk = 512;
constexpr float kInf = std::numeric_limits<float>::infinity();

// Chosen once per process. VLMO_FAST_CPU_VECTOR=portable forces the baseline build (tests,
// and a way out should a machine misreport its AVX2 support).
const ChunkOps* select_chunk_ops() {
  const char* forced = std::getenv("VLMO_FAST_CPU_VECTOR");
  if (forced != nullptr && std::strcmp(forced, "portable") == 0) {
    return portable::chunk_ops("portable");
  }
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  const ChunkOps* fast = avx2_chunk_ops();
  if (fast != nullptr && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return fast;
  }
#endif
  return portable::chunk_ops("portable");
}

const ChunkOps& chunk_ops() {
  static const ChunkOps* ops = select_chunk_ops();
  return *ops;
}

// One row as the sampler sees it. acc_t is the precision of the max and of the subtraction
// that precedes rounding to float: double for fp64 logits, float otherwise.
template <typename scalar_t>
struct RowView {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const scalar_t* row;
  int64_t stride;
  const bool* mask;  // nullptr: no exclude_mask
  int64_t mask_stride;
  int64_t positive;

  // Float contiguous rows without a mask are read in place, except for the chunk holding the
  // positive; everything else goes through the per-thread chunk buffer.
  bool direct(int64_t begin, int64_t len) const {
    return std::is_same_v<scalar_t, float> && stride == 1 && mask == nullptr &&
           (positive < begin || positive >= begin + len);
  }
  bool excluded(int64_t j) const {
    return j == positive || (mask != nullptr && mask[j * mask_stride]);
  }
  acc_t value(int64_t j) const { return static_cast<acc_t>(row[j * stride]); }
};

// Chunk [begin, begin + len) through the per-thread buffer: floats with excluded entries at
// -inf (for fp64 rows nothing is written here: see shifted_chunk). Sets *finite = false on a
// NaN/+inf anywhere in the chunk (excluded entries included, as in hard_negative_row_codes) and
// returns the max over allowed entries in acc_t.
template <typename scalar_t>
typename RowView<scalar_t>::acc_t copy_chunk(const RowView<scalar_t>& v, int64_t begin,
                                             int64_t len, float* buf, bool* finite) {
  using acc_t = typename RowView<scalar_t>::acc_t;
  bool ok = true;
  acc_t best = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < len; ++j) {
    const acc_t x = v.value(begin + j);
    ok = ok && (x < std::numeric_limits<acc_t>::infinity());
    const bool skip = v.excluded(begin + j);
    best = (!skip && x > best) ? x : best;
    if constexpr (!std::is_same_v<acc_t, double>) buf[j] = skip ? -kInf : x;
  }
  *finite = ok;
  return best;
}

// For fp64 rows: buf[j] = float(value - shift) (excluded: -inf), so the float exponentials see
// differences computed in double.
template <typename scalar_t>
void shifted_chunk(const RowView<scalar_t>& v, int64_t begin, int64_t len, double shift,
                   float* buf) {
  for (int64_t j = 0; j < len; ++j)
    buf[j] = v.excluded(begin + j) ? -kInf : static_cast<float>(v.value(begin + j) - shift);
}

template <typename scalar_t>
int64_t sample_row(const RowView<scalar_t>& v, int64_t n, double u, float* buf, float* weights,
                   double* chunk_sums, double* chunk_shifts) {
  using acc_t = typename RowView<scalar_t>::acc_t;
  constexpr bool kWide = std::is_same_v<acc_t, double>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const ChunkOps& ops = chunk_ops();
  const int64_t num_chunks = (n + kChunk - 1) / kChunk;
  // The exponentials are taken against `shift`, which only moves up when a chunk's max
  // exceeds it by more than kMaxLead (online rescaling, rare: a handful of times per row), so
  // most chunks need one fused pass. `total` is the sum so far relative to the current shift.
  acc_t shift = kNegInf;
  double total = 0.0;
  auto raise_shift = [&](acc_t chunk_max) {
    if (chunk_max > shift && (shift == kNegInf || chunk_max > shift + kMaxLead)) {
      total = shift == kNegInf ? 0.0 : total * std::exp(static_cast<double>(shift) - chunk_max);
      shift = chunk_max;
      return true;
    }
    return false;
  };
  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t begin = c * kChunk;
    const int64_t len = std::min(kChunk, n - begin);
    bool finite = true;
    double sum = 0.0;
    if (v.direct(begin, len)) {
      const float* values = reinterpret_cast<const float*>(v.row) + begin;
      if (shift == kNegInf) {
        const float chunk_max = ops.max_and_finite(values, len, &finite);
        if (!finite) return kNonFinite;
        raise_shift(chunk_max);
        if (shift != kNegInf) sum = ops.exp_sum(values, len, static_cast<float>(shift));
      } else {
        // The common case: one pass (load, subtract, exp, add) against the running shift.
        sum = ops.exp_sum(values, len, static_cast<float>(shift));
        if (!(sum <= kSumLimit)) {
          const float chunk_max = ops.max_and_finite(values, len, &finite);
          if (!finite) return kNonFinite;
          if (raise_shift(chunk_max)) sum = ops.exp_sum(values, len, static_cast<float>(shift));
        }
      }
    } else {
      const acc_t chunk_max = copy_chunk(v, begin, len, buf, &finite);
      if (!finite) return kNonFinite;
      raise_shift(chunk_max);
      if (chunk_max != kNegInf) {
        if constexpr (kWide) {
          shifted_chunk(v, begin, len, shift, buf);
          sum = ops.exp_sum(buf, len, 0.0f);
        } else {
          sum = ops.exp_sum(buf, len, shift);
        }
      }
    }
    chunk_sums[c] = sum;
    chunk_shifts[c] = static_cast<double>(shift);
    total += sum;
  }
  if (shift == kNegInf) return kNoCandidate;

  // Inverse CDF with the row's one uniform: first the chunk, each chunk's sum brought to the
  // final shift (a factor <= 1: shifts never decrease)...
  const double final_shift = static_cast<double>(shift);
  double target = u * total;
  double before = 0.0;
  int64_t chunk = 0;
  for (; chunk < num_chunks; ++chunk) {
    const double w = chunk_sums[chunk] * std::exp(chunk_shifts[chunk] - final_shift);
    if (before + w > target) break;
    before += w;
  }
  if (chunk == num_chunks) {
    // u * total rounded up to the total: the draw belongs at the very end of the distribution.
    chunk = num_chunks - 1;
    while (chunk > 0 && !(chunk_sums[chunk] * std::exp(chunk_shifts[chunk] - final_shift) > 0.0))
      --chunk;
    target = std::numeric_limits<double>::infinity();
  }
  // ... then the column inside it, in the chunk's own frame (the exponentials it summed).
  const int64_t begin = chunk * kChunk;
  const int64_t len = std::min(kChunk, n - begin);
  const double local_target = (target - before) / std::exp(chunk_shifts[chunk] - final_shift);
  if constexpr (kWide) {
    shifted_chunk(v, begin, len, chunk_shifts[chunk], buf);
    ops.exp_to(buf, len, 0.0f, weights);
  } else {
    const float* values = reinterpret_cast<const float*>(v.row) + begin;
    if (!v.direct(begin, len)) {
      bool finite;
      copy_chunk(v, begin, len, buf, &finite);
      values = buf;
    }
    ops.exp_to(values, len, static_cast<float>(chunk_shifts[chunk]), weights);
  }
  double acc = 0.0;
  int64_t last_positive = -1;
  for (int64_t j = 0; j < len; ++j) {
    if (weights[j] > 0.0f) {
      acc += weights[j];
      last_positive = begin + j;
      if (acc > local_target) return begin + j;
    }
  }
  // The chunk sum and this running sum round differently; the few ulps of difference can leave
  // the target just past the chunk's last weight, which is then the right column.
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
    std::vector<float> buf(static_cast<size_t>(kChunk));
    std::vector<float> weights(static_cast<size_t>(kChunk));
    std::vector<double> chunk_sums(static_cast<size_t>(num_chunks));
    std::vector<double> chunk_shifts(static_cast<size_t>(num_chunks));
    for (int64_t r = first; r < last; ++r) {
      const int64_t pos = positive[r * positive_stride];
      if (pos < 0 || pos >= n) {
        out[r] = kPositiveOutOfRange;
        continue;
      }
      const RowView<scalar_t> view{data + r * stride0, stride1,
                                   mask != nullptr ? mask + r * mask_stride0 : nullptr,
                                   mask_stride1, pos};
      const uint64_t key = row_key(seed, static_cast<uint64_t>(stream),
                                   static_cast<uint64_t>(row_offset + r));
      out[r] = sample_row(view, n, row_uniform(key), buf.data(), weights.data(),
                          chunk_sums.data(), chunk_shifts.data());
    }
  });
}

}  // namespace

// Which vectorised chunk primitives this process uses ("avx2" or "portable"), for benchmarks.
const char* cpu_vector_path() { return chunk_ops().name; }

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
