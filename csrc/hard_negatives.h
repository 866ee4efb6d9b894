// Shared by the CPU (hard_negatives.cpp) and CUDA (hard_negatives_cuda.cu) samplers of the op
// vlmo_fast::hard_negatives: result codes and the counter-based random numbers.
//
// Randomness is a pure function of (seed, stream, global row, column): no generator state is
// advanced inside the kernels, so a result does not depend on the thread count, the launch
// configuration or the order rows are visited in, and a seed reproduces it exactly.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

#if defined(__CUDACC__)
#define VLMO_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define VLMO_HOST_DEVICE inline
#endif

namespace vlmo_fast {
namespace hardneg {

// Negative outputs mark rows that could not be sampled; the Python wrapper turns them into
// errors (on CUDA without a host sync, see vlmo_fast/hard_negatives.py). When a row has several
// problems the most basic one wins: positive out of range, then non-finite logits, then no
// allowed candidate.
constexpr int64_t kNoCandidate = -1;         // every candidate excluded or at -inf
constexpr int64_t kNonFinite = -2;           // NaN or +inf somewhere in the row
constexpr int64_t kPositiveOutOfRange = -3;  // positive index not in [0, N)

// The splitmix64 output function (a bijective 64-bit mixer with full avalanche).
VLMO_HOST_DEVICE uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// A 32-bit bijective mixer (xorshift-multiply, the "lowbias32" constants); the CUDA kernel
// uses it per element because 64-bit multiplies cost several instructions on the GPU.
VLMO_HOST_DEVICE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352DU;
  x ^= x >> 15;
  x *= 0x846CA68BU;
  x ^= x >> 16;
  return x;
}

// One 64-bit key per (seed, stream, global row). `stream` separates the two directions
// (image->text and text->image) drawn with one seed; the global row index (local row plus the
// rank's row offset) keeps ranks that share a seed from drawing the same numbers.
VLMO_HOST_DEVICE uint64_t row_key(uint64_t seed, uint64_t stream, uint64_t global_row) {
  const uint64_t seeded = mix64(seed ^ (stream * 0xD6E8FEB86659FD93ULL));
  return mix64(seeded + global_row * 0x9E3779B97F4A7C15ULL + 0x632BE59BD9B4E019ULL);
}

// Uniform in [0, 1) with 53 random bits: the single number the CPU inverse-CDF draw needs.
VLMO_HOST_DEVICE double row_uniform(uint64_t key) {
  return static_cast<double>(mix64(key) >> 11) * 0x1.0p-53;
}

// 32 random bits for element `col` of the row with key `key`. For a fixed row the map
// col -> bits is a bijection, so two columns never share their noise.
VLMO_HOST_DEVICE uint32_t element_bits(uint64_t key, uint32_t col) {
  const uint32_t h = mix32((col * 0x9E3779B9U) ^ static_cast<uint32_t>(key));
  return mix32(h + static_cast<uint32_t>(key >> 32));
}

// Shape, dtype and device checks shared by the CPU, CUDA and Meta kernels (defined in
// hard_negatives.cpp).
void check_hard_negative_args(const at::Tensor& logits, const at::Tensor& positive,
                              const std::optional<at::Tensor>& exclude_mask,
                              const at::Tensor& seed);

}  // namespace hardneg
}  // namespace vlmo_fast
