// One float vector as wide as the target's registers, and the few operations on it that the kernels share:
// GCC/Clang vector extensions, which the compiler maps onto whatever -march offers (zmm, ymm or NEON
// registers), and an x86 intrinsic for what those cannot say, the fused multiply-add.
#pragma once

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>

namespace {

// Generic vectors wider than the registers are split by gcc through the stack, which made an AVX2 build
// ten times slower.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kRegisters = 32;
#elif defined(__AVX__)
constexpr int kLanes = 8;
constexpr int kRegisters = 16;
#else
constexpr int kLanes = 4;  // SSE, NEON
constexpr int kRegisters = 16;
#endif
typedef float fvec __attribute__((vector_size(4 * kLanes)));

inline fvec splat(float x) { return x - fvec{}; }  // x - 0 is x, so no add is emitted

inline fvec vload(const float* p) {
  fvec v;
  std::memcpy(&v, p, sizeof v);  // an unaligned vector load
  return v;
}
inline void vstore(float* p, fvec v) { std::memcpy(p, &v, sizeof v); }

// a * b + c, rounded once where the target has FMA; the reference's matrix products round that way too.
inline fvec fmadd(fvec a, fvec b, fvec c) {
#if defined(__AVX512F__)
  return (fvec)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
  return (fvec)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

}  // namespace
