// float32 products with 16-bit weights, for CPUs that do not multiply bf16 (or fp16) in hardware.
//
// y = x w^T (+ bias) with x float32 [M, K] and w bf16 or fp16 [N, K], as stored: each thread widens a
// panel of w (16 outputs on AVX2, 32 on AVX-512, by up to 256 k) to float32 in a buffer that stays in its
// L1 cache, and multiplies every row of x by it there, kRows rows at a time in registers. The float32
// copy of the weight that PyTorch's products would need is never written to memory, and the weight is
// read at 2 bytes per element. Sums are float32 with fused multiply-adds, in k order within a panel of
// 256 k, one panel after another: a float32 GEMM's rounding, not PyTorch's order.

#include "library.h"
#include "vectors.h"

#include <algorithm>
#include <bit>
#include <cstdint>
#include <optional>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

constexpr int64_t kRows = kRegisters == 32 ? 12 : 6;  // 2 x kRows sums + 2 weight vectors + 1 broadcast

inline float widen(uint16_t v, bool f16) {
  return f16 ? float(std::bit_cast<_Float16>(v)) : std::bit_cast<float>(uint32_t(v) << 16);
}

constexpr int64_t kCols = 2 * kLanes;  // outputs of a panel
constexpr int64_t kDepth = 256;        // k of a panel: kCols x kDepth floats fill half of a 32 KiB L1 on AVX2

struct Problem {
  const float* x;      // [M, K], rows x_stride apart
  const uint16_t* w;   // [N, K], rows w_stride apart
  const float* bias;   // [N] or null
  float* y;            // [M, N]
  int64_t M, N, K, x_stride, w_stride;
  bool f16;
};

inline __m256 widen8(const uint16_t* p, bool f16) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return f16 ? _mm256_cvtph_ps(v) : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

// r[i][j] <- r[j][i] for 8 vectors of 8 floats.
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// Outputs n0 .. n0 + cols of w, k0 .. k0 + depth, as float32 [depth][kCols] (columns past `cols` zero):
// 8 outputs by 8 k at a time, widened and transposed in registers.
void widen_panel(const Problem& p, int64_t n0, int64_t cols, int64_t k0, int64_t depth, float* panel) {
  if (cols < kCols) std::fill(panel, panel + depth * kCols, 0.0f);
  const uint16_t* w = p.w + n0 * p.w_stride + k0;
  int64_t c = 0;
  for (; c + 8 <= cols; c += 8) {
    int64_t k = 0;
    for (; k + 8 <= depth; k += 8) {
      __m256 r[8];
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) r[i] = widen8(w + (c + i) * p.w_stride + k, p.f16);
      transpose8(r);
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) _mm256_store_ps(panel + (k + i) * kCols + c, r[i]);
    }
    for (; k < depth; ++k)
      for (int64_t i = 0; i < 8; ++i) panel[k * kCols + c + i] = widen(w[(c + i) * p.w_stride + k], p.f16);
  }
  for (; c < cols; ++c)
    for (int64_t k = 0; k < depth; ++k) panel[k * kCols + c] = widen(w[c * p.w_stride + k], p.f16);
}

// Rows m0 .. m0 + R of x, k0 .. k0 + depth, times a widened panel: y[m][n0 ..] = (first ? 0 : y) + sums
// (+ bias when last). Only `cols` outputs are stored.
template <int64_t R>
void multiply(const Problem& p, int64_t m0, int64_t n0, int64_t cols, int64_t k0, int64_t depth,
              const float* panel, bool first, bool last) {
  fvec lo[R], hi[R];  // the sums of outputs n0 .. n0 + kLanes, and of the kLanes after them
#pragma GCC unroll 16
  for (int64_t r = 0; r < R; ++r) lo[r] = hi[r] = fvec{};
  const float* x = p.x + m0 * p.x_stride + k0;
  const int64_t stride = p.x_stride;
#pragma GCC unroll 4
  for (int64_t k = 0; k < depth; ++k) {
    const fvec w0 = vload(panel + k * kCols), w1 = vload(panel + k * kCols + kLanes);
#pragma GCC unroll 16
    for (int64_t r = 0; r < R; ++r) {
      const fvec a = splat(x[r * stride + k]);
      lo[r] = fmadd(a, w0, lo[r]);
      hi[r] = fmadd(a, w1, hi[r]);
    }
  }
  const float* bias = last && p.bias ? p.bias + n0 : nullptr;
  if (cols == kCols) {
#pragma GCC unroll 16
    for (int64_t r = 0; r < R; ++r) {
      float* y = p.y + (m0 + r) * p.N + n0;
      fvec a = lo[r], b = hi[r];
      if (!first) a = vload(y) + a, b = vload(y + kLanes) + b;
      if (bias) a = a + vload(bias), b = b + vload(bias + kLanes);
      vstore(y, a);
      vstore(y + kLanes, b);
    }
    return;
  }
  alignas(64) float out[R][kCols];
#pragma GCC unroll 16
  for (int64_t r = 0; r < R; ++r) vstore(out[r], lo[r]), vstore(out[r] + kLanes, hi[r]);
  for (int64_t r = 0; r < R; ++r) {
    float* y = p.y + (m0 + r) * p.N + n0;
    for (int64_t c = 0; c < cols; ++c) {
      const float v = first ? out[r][c] : y[c] + out[r][c];
      y[c] = bias ? v + bias[c] : v;
    }
  }
}

template <int64_t R = kRows>
void multiply_rows(const Problem& p, int64_t m0, int64_t rows, int64_t n0, int64_t cols, int64_t k0,
                   int64_t depth, const float* panel, bool first, bool last) {
  if constexpr (R > 0) {
    if (rows == R) return multiply<R>(p, m0, n0, cols, k0, depth, panel, first, last);
    multiply_rows<R - 1>(p, m0, rows, n0, cols, k0, depth, panel, first, last);
  }
}

void run(const Problem& p) {
  const int64_t panels = (p.N + kCols - 1) / kCols;
  // Each thread takes a run of panels and, k deep at a time, multiplies every row of x by each.
  torch::stable::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float panel[kDepth * kCols];
    for (int64_t n = begin; n < end; ++n) {
      const int64_t n0 = n * kCols, cols = std::min(kCols, p.N - n0);
      int64_t k0 = 0;
      do {  // at least once, so that K = 0 still writes y (zeros, or the bias)
        const int64_t depth = std::min(kDepth, p.K - k0);
        widen_panel(p, n0, cols, k0, depth, panel);
        for (int64_t m0 = 0; m0 < p.M; m0 += kRows)
          multiply_rows(p, m0, std::min(kRows, p.M - m0), n0, cols, k0, depth, panel, k0 == 0,
                        k0 + depth == p.K);
        k0 += depth;
      } while (k0 < p.K);
    }
  });
}

// y = x w^T + bias: x float32 [M, K] with contiguous rows, w bf16 or fp16 [N, K] with contiguous rows,
// bias (optional) [N] in w's dtype, widened before it is added.
Tensor linear_widened(Tensor x, Tensor w, std::optional<Tensor> bias) {
  STD_TORCH_CHECK(x.is_cpu() && x.scalar_type() == ScalarType::Float && x.dim() == 2 && x.stride(1) == 1,
                  "linear_widened: x must be a float32 CPU matrix with contiguous rows");
  const ScalarType dtype = w.scalar_type();
  STD_TORCH_CHECK(w.is_cpu() && w.dim() == 2 && w.stride(1) == 1 &&
                      (dtype == ScalarType::BFloat16 || dtype == ScalarType::Half),
                  "linear_widened: w must be a bfloat16 or float16 CPU matrix with contiguous rows");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  STD_TORCH_CHECK(w.size(1) == K, "linear_widened: x has ", K, " columns, w ", w.size(1));
  Tensor y = torch::stable::new_empty(x, {M, N});
  std::vector<float> wide_bias;
  if (bias.has_value()) {
    STD_TORCH_CHECK(bias->scalar_type() == dtype && bias->dim() == 1 && bias->numel() == N &&
                        bias->stride(0) == 1,
                    "linear_widened: bias must be a contiguous [N] in w's dtype");
    const auto* from = static_cast<const uint16_t*>(bias->const_data_ptr());
    wide_bias.resize(N);
    for (int64_t n = 0; n < N; ++n) wide_bias[n] = widen(from[n], dtype == ScalarType::Half);
  }
  const float* b = bias.has_value() ? wide_bias.data() : nullptr;
  if (M > 0 && N > 0)
    run({x.const_data_ptr<float>(), static_cast<const uint16_t*>(w.const_data_ptr()), b,
         y.mutable_data_ptr<float>(), M, N, K, x.stride(0), w.stride(0), dtype == ScalarType::Half});
  return y;
}

}  // namespace

SIDP_LIBRARY_FRAGMENT(SIDP_NS, m) { m.def("linear_widened(Tensor x, Tensor w, Tensor? bias) -> Tensor"); }

SIDP_LIBRARY_IMPL(SIDP_NS, CPU, m) { m.impl("linear_widened", TORCH_BOX(&linear_widened)); }

#endif
