// The per-element logic of the CUDA sampler (hard_negatives_cuda.cu), written once for host
// and device so that the CPU test hook (gumbel_scan_cpu.cpp, op vlmo_fast::_gumbel_scan) runs
// the same decisions on the CPU: the Gumbel noise, the skip of elements that cannot win, the
// (key, column) order and the merge of partial results over column chunks.
//
// Keys are kept in `acc_t`: double for fp64 logits (rows that differ by 1e-6 on top of 1e10
// keep their differences), float otherwise.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "hard_negatives.h"

namespace vlmo_fast {
namespace hardneg {

template <typename scalar_t>
using key_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Standard Gumbel noise from 32 random bits.
// v = (bits + 1/2) 2^-32 rounded toward zero stays in (0, 1) (never 0 or 1) and keeps full
// relative precision near 0, the end that produces the large noise values which decide rare
// winners. E = -log(1 - v) is Exp(1); log1pf keeps it accurate for small v, where a fast
// __logf(1 - v) would have an absolute error comparable to E itself (--use_fast_math maps
// logf to __logf but leaves log1pf alone). G = -log(E); here __logf's small absolute error
// is harmless. The host version (tests) rounds the same way; its logarithms may differ from
// the device's in the last bits, so host and device agree in law, not draw for draw.
VLMO_HOST_DEVICE float gumbel_from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  const float v = fmaf(__uint2float_rz(bits), 0x1p-32f, 0x1p-33f);
  const float e = -log1pf(-v);
  return -__logf(e);
#else
  // uint32 -> float toward zero: keep the top 24 significant bits (then the conversion is exact)
  uint32_t kept = bits;
  if (bits >= (1u << 24)) {
    int shift = 0;
    while ((bits >> shift) >= (1u << 24)) ++shift;
    kept = (bits >> shift) << shift;
  }
  const float v = std::fma(static_cast<float>(kept), 0x1p-32f, 0x1p-33f);
  const float e = -std::log1p(-v);
  return -std::log(e);
#endif
}

// An upper bound of gumbel_from_bits: the largest noise comes from the smallest v = 2^-33
// (bits = 0), E ~= 2^-33, G ~= 33 ln 2 = 22.873; 23 leaves ~0.13 for the approximate device
// logarithm (its error there is ~1e-5). An element whose logit v has v + kGumbelMax <= the
// current best key cannot win: its key v + G rounds to at most fl(v + kGumbelMax).
constexpr float kGumbelMax = 23.0f;

// (key, column) with the larger key wins; equal keys go to the smaller column, so the result
// does not depend on which thread or chunk saw which column. Column -1 means "nothing yet".
template <typename acc_t>
VLMO_HOST_DEVICE bool beats(acc_t key, int64_t col, acc_t best_key, int64_t best_col) {
  if (col < 0) return false;
  if (best_col < 0) return true;
  return key > best_key || (key == best_key && col < best_col);
}

// The scan state of one thread (or one chunk) over some columns of one row: the best (key,
// column) so far and whether a NaN/+inf was seen. Columns must be offered in increasing
// order (strict > keeps the first of equal keys, as `beats` would).
template <typename acc_t>
struct RowScan {
  acc_t best_key = -static_cast<acc_t>(INFINITY);
  int64_t best_col = -1;
  int nonfinite = 0;

  // SKIP = false is the plain Gumbel-max; the test hook checks both give the same draws.
  // `floor`: a key some other scan of the same row already holds (e.g. the warp's best at its
  // last exchange), or -inf. An element below it cannot be the row's winner.
  template <bool SKIP = true>
  VLMO_HOST_DEVICE void offer(acc_t v, int64_t col, bool excluded, int64_t pos, uint64_t key,
                              acc_t floor = -static_cast<acc_t>(INFINITY)) {
    nonfinite |= !(v < static_cast<acc_t>(INFINITY));
    if (col == pos || !(v > -static_cast<acc_t>(INFINITY)) || excluded) return;
    // The hash and two logarithms are most of the per-element cost: skip them when the
    // element cannot win. Against this scan's own best, ties keep the earlier (smaller)
    // column, so <= suffices; against another scan's key the tie could go either way by
    // column, so < keeps the element whenever it could tie.
    const acc_t reach = v + static_cast<acc_t>(kGumbelMax);
    if (SKIP && ((best_col >= 0 && reach <= best_key) || reach < floor)) return;
    const acc_t k = v + static_cast<acc_t>(gumbel_from_bits(element_bits(key, static_cast<uint32_t>(col))));
    if (best_col < 0 || k > best_key) {
      best_key = k;
      best_col = col;
    }
  }

  // Fold in another scan's result (another thread's or chunk's columns).
  VLMO_HOST_DEVICE void merge(acc_t key, int64_t col, int other_nonfinite) {
    nonfinite |= other_nonfinite;
    if (beats(key, col, best_key, best_col)) {
      best_key = key;
      best_col = col;
    }
  }

  VLMO_HOST_DEVICE int64_t result() const {
    return nonfinite ? kNonFinite : (best_col < 0 ? kNoCandidate : best_col);
  }
};

// Column chunks of a split scan: chunk c of `chunks` covers [begin, end) of n columns.
VLMO_HOST_DEVICE int64_t chunk_begin(int64_t n, int64_t chunks, int64_t c) {
  return (n * c) / chunks;
}

}  // namespace hardneg
}  // namespace vlmo_fast
