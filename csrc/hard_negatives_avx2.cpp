// The AVX2+FMA build of the sampler's chunk primitives (csrc/hard_negatives_vec.h), selected at
// load time by hard_negatives.cpp when the CPU supports both. This whole translation unit is
// compiled for AVX2 (the target pragma must precede every include so that ATen's intrinsics and
// Vectorized<float> methods are built for it); it defines nothing but the primitives, which live
// in their own namespaces (vlmo_fast::hardneg::avx2, at::vec::AVX2), so no AVX2 code is reachable
// from the baseline path.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 9 && \
    !defined(VLMO_FAST_NO_AVX2)
#define VLMO_BUILD_AVX2 1
#pragma GCC target("avx2,fma,f16c")
// The pragma enables the instructions but not the feature macros that headers test (sleef.h
// declares its AVX2 functions only under __AVX__/__AVX2__): define them for this file alone.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
// ATen's headers pass __m256 values by value in lambdas: GCC's ABI note about that is moot
// inside one AVX2-only file.
#pragma GCC diagnostic ignored "-Wpsabi"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define VLMO_VEC_NAMESPACE avx2
#endif

#include "hard_negatives_vec.h"

namespace vlmo_fast {
namespace hardneg {

const ChunkOps* avx2_chunk_ops() {
#if defined(VLMO_BUILD_AVX2)
  return avx2::chunk_ops("avx2");
#else
  return nullptr;  // not built for this compiler / architecture: the portable table runs
#endif
}

}  // namespace hardneg
}  // namespace vlmo_fast
