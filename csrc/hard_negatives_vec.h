// Vectorised per-chunk primitives of the CPU hard-negative sampler (hard_negatives.cpp), written
// once with ATen's at::vec::Vectorized<float> and compiled twice:
//   - in hard_negatives.cpp for the baseline target (namespace vlmo_fast::hardneg::portable),
//   - in hard_negatives_avx2.cpp with AVX2+FMA enabled (namespace vlmo_fast::hardneg::avx2),
// the way ATen compiles its own CPU kernels once per CPU_CAPABILITY. hard_negatives.cpp picks the
// AVX2 table at load time when the CPU has AVX2 and FMA, so the wheel stays portable.
//
// Include with VLMO_VEC_NAMESPACE defined (and, for AVX2, CPU_CAPABILITY / CPU_CAPABILITY_AVX2
// and the target pragma set before any other include).
#pragma once

#include <cstdint>

namespace vlmo_fast {
namespace hardneg {

// The primitives a chunk of float values needs; one table per compiled CPU capability.
struct ChunkOps {
  // Max over x[0, n) and whether every value was < +inf (false on NaN or +inf).
  float (*max_and_finite)(const float* x, int64_t n, bool* all_finite);
  // sum_j exp(x[j] - shift) (-inf entries weigh 0); float lanes, double result. Exact for
  // x <= shift + kMaxLead; a NaN or +inf in x gives a NaN or a sum above kSumLimit.
  double (*exp_sum)(const float* x, int64_t n, float shift);
  // out[j] = exp(x[j] - shift): the same exponentials exp_sum adds up.
  void (*exp_to)(const float* x, int64_t n, float shift, float* out);
  const char* name;
};

// How far a chunk's max may exceed the shift its exponentials were taken against before the
// chunk is redone with a new shift (e^64 ~ 6e27 times 512 columns stays far inside float).
// A chunk sum above kSumLimit = e^kMaxLead is the cheap sign that this may have happened (the
// sum is at least exp(max - shift)), or that the chunk holds a NaN/+inf (exp_u20 clamps its
// argument, so those give a NaN or a huge sum): only then is the chunk's max computed.
constexpr float kMaxLead = 64.0f;
constexpr double kSumLimit = 6.235149080811617e27;  // e^64

// The AVX2 table, or nullptr when hard_negatives_avx2.cpp was built without it (other compilers
// or architectures). Defined in hard_negatives_avx2.cpp.
const ChunkOps* avx2_chunk_ops();

// The table this process uses: "avx2" or "portable" (hard_negatives.cpp; exposed as
// vlmo_fast._C.cpu_vector_path() for benchmarks and bug reports).
const char* cpu_vector_path();

}  // namespace hardneg
}  // namespace vlmo_fast

#if defined(VLMO_VEC_NAMESPACE)
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <limits>

namespace vlmo_fast {
namespace hardneg {
namespace VLMO_VEC_NAMESPACE {

using Vec = at::vec::Vectorized<float>;
constexpr float kVecInf = std::numeric_limits<float>::infinity();

// The last partial vector of a chunk, padded with -inf (weightless, never the max).
inline Vec load_tail(const float* x, int64_t count) {
  alignas(64) float padded[Vec::size()];
  for (int64_t l = 0; l < Vec::size(); ++l) padded[l] = l < count ? x[l] : -kVecInf;
  return Vec::loadu(padded);
}

inline float max_and_finite(const float* x, int64_t n, bool* all_finite) {
  const Vec inf(kVecInf);
  Vec best(-kVecInf);
  Vec ok(0.0f);
  ok = ok == ok;  // all lanes true
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec v = Vec::loadu(x + j);
    ok = ok & (v < inf);  // NaN compares false too
    best = at::vec::maximum(best, v);
  }
  if (j < n) {
    const Vec v = load_tail(x + j, n - j);
    ok = ok & (v < inf);
    best = at::vec::maximum(best, v);
  }
  alignas(64) float lanes[Vec::size()];
  alignas(64) float flags[Vec::size()];
  best.store(lanes);
  ok.store(flags);
  float m = -kVecInf;
  bool finite = true;
  for (int64_t l = 0; l < Vec::size(); ++l) {
    m = lanes[l] > m ? lanes[l] : m;
    finite = finite && flags[l] != 0.0f;  // true lanes hold all-ones bits (a NaN pattern)
  }
  *all_finite = finite;
  return m;
}

inline double exp_sum(const float* x, int64_t n, float shift) {
  const Vec s(shift);
  Vec acc(0.0f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) acc = acc + (Vec::loadu(x + j) - s).exp_u20();
  if (j < n) acc = acc + (load_tail(x + j, n - j) - s).exp_u20();
  alignas(64) float lanes[Vec::size()];
  acc.store(lanes);
  double total = 0.0;
  for (int64_t l = 0; l < Vec::size(); ++l) total += lanes[l];
  return total;
}

inline void exp_to(const float* x, int64_t n, float shift, float* out) {
  const Vec s(shift);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) (Vec::loadu(x + j) - s).exp_u20().store(out + j);
  if (j < n) (load_tail(x + j, n - j) - s).exp_u20().store(out + j, n - j);
}

inline const ChunkOps* chunk_ops(const char* name) {
  static const ChunkOps ops{&max_and_finite, &exp_sum, &exp_to, name};
  return &ops;
}

}  // namespace VLMO_VEC_NAMESPACE
}  // namespace hardneg
}  // namespace vlmo_fast
#endif  // VLMO_VEC_NAMESPACE
