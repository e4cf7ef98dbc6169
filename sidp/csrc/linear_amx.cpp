// bf16 matrix products for few rows on AMX tiles, reading the weight oneDNN packed for its own products.
//
// y = x w^T (+ bias) with x [M, K] and w [N, K]. oneDNN (3.x, AMX) packs a bf16 weight in blocks of 32
// output rows, each block K pairs of k by 32 rows by 2 (`sidp.model.linear._amx_reads` checks this once
// per shape and keeps oneDNN's own products where it differs): 16 pairs of k by 16 rows are a tile's right
// operand as they lie, and 16 rows of x by 32 k are its left operand as they lie. oneDNN's products spend
// more per call outside the arithmetic and stall on the weight's reads; with few rows, a decode step's,
// this one streams the weight ahead of the tiles instead (docs/BENCHMARKS.md has the measurements).

#include "library.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include "amx_tiles.h"

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

using sidp_tiles::amx_allowed;
using sidp_tiles::load_tile_config;

constexpr int64_t kRows = sidp_tiles::kTile;  // rows of a tile
constexpr int64_t kBlock = 32;                 // output rows of a packed block: two tiles' columns

struct Problem {
  const uint16_t *x, *w, *bias;  // x [M, K] (rows x_stride apart), w packed, bias [N] or null
  uint16_t* y;                   // [M, N]
  int64_t M, N, K, x_stride;
};

// 16 rows of x as a tile's left operand: where they lie, `stride` elements apart.
struct XTile {
  const uint16_t* rows;
  int64_t stride;
};

// x's tiles x0 (and x1 when kX is 2) times packed block `block` (32 columns): tile 4 + 2i + h holds row r
// of tile xi by column 16h + c at row r, column c, stored to `out` as [16 kX][32] floats. Tiles 0-1 hold x,
// 2-3 the weight. `next`, when set, is the block after the next one, prefetched into L2 while the tiles
// work: the hardware alone leaves the weight's reads waiting on memory between products.
template <int kX>
void multiply(const Problem& p, XTile x0, XTile x1, const uint16_t* block, const uint16_t* next, float* out) {
  _tile_zero(4);
  _tile_zero(5);
  if constexpr (kX > 1) {
    _tile_zero(6);
    _tile_zero(7);
  }
  const int64_t steps = p.K / 32;
  for (int64_t s = 0; s < steps; ++s) {
    if (next)  // a block is K cache lines: 32 per step
      for (int64_t l = 0; l < 32; ++l)
        _mm_prefetch(reinterpret_cast<const char*>(next + (s * 32 + l) * 32), _MM_HINT_T1);
    const uint16_t* b = block + s * 16 * 2 * kBlock;  // 16 pairs of k by 32 rows by 2
    _tile_loadd(0, x0.rows + s * 32, x0.stride * 2);
    _tile_loadd(2, b, 4 * kBlock);
    _tile_dpbf16ps(4, 0, 2);
    _tile_loadd(3, b + 32, 4 * kBlock);
    _tile_dpbf16ps(5, 0, 3);
    if constexpr (kX > 1) {
      _tile_loadd(1, x1.rows + s * 32, x1.stride * 2);
      _tile_dpbf16ps(6, 1, 2);
      _tile_dpbf16ps(7, 1, 3);
    }
  }
  _tile_stored(4, out, 4 * kBlock);
  _tile_stored(5, out + kRows, 4 * kBlock);
  if constexpr (kX > 1) {
    _tile_stored(6, out + kRows * kBlock, 4 * kBlock);
    _tile_stored(7, out + kRows * kBlock + kRows, 4 * kBlock);
  }
}

// out [rows][32] floats: y[m0 + r][n0 + c] before the bias; writes them (+ bias) rounded to bf16.
void write_rows(const Problem& p, const float* out, int64_t m0, int64_t rows, int64_t n0) {
  __m512 b[2];
  for (int h = 0; h < 2; ++h)
    b[h] = p.bias ? _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256(
                        reinterpret_cast<const __m256i*>(p.bias + n0 + h * kRows)))
                  : _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r)
    for (int h = 0; h < 2; ++h) {
      const __m512 v = _mm512_add_ps(_mm512_load_ps(out + r * kBlock + h * kRows), b[h]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p.y + (m0 + r) * p.N + n0 + h * kRows),
                          (__m256i)_mm512_cvtneps_pbh(v));
    }
}

void run(const Problem& p) {
  // x's last rows short of a tile are copied into a zeroed tile-high stretch: a tile reads 16 rows.
  const int64_t full = p.M / kRows * kRows, tail = p.M - full, tiles = (p.M + kRows - 1) / kRows;
  std::vector<uint16_t> padded(tail ? kRows * p.K + 32 : 0, 0);
  const uintptr_t aligned = (reinterpret_cast<uintptr_t>(padded.data()) + 63) & ~uintptr_t(63);
  uint16_t* tail_x = reinterpret_cast<uint16_t*>(aligned);
  for (int64_t r = 0; r < tail; ++r) std::memcpy(tail_x + r * p.K, p.x + (full + r) * p.x_stride, p.K * 2);
  const auto x_tile = [&](int64_t i) {
    return i * kRows < full ? XTile{p.x + i * kRows * p.x_stride, p.x_stride} : XTile{tail_x, p.K};
  };
  const int64_t blocks = p.N / kBlock, block_size = kBlock * p.K;
  // Each thread takes a run of blocks, and multiplies each by every row of x, two tiles at a time, while
  // it is in cache.
  torch::stable::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    load_tile_config();
    alignas(64) float out[2 * kRows * kBlock];
    for (int64_t nb = begin; nb < end; ++nb) {
      const uint16_t* block = p.w + nb * block_size;
      for (int64_t i = 0; i < tiles; i += 2) {
        const uint16_t* next = i == 0 && nb + 2 < end ? block + 2 * block_size : nullptr;
        if (i + 1 < tiles)
          multiply<2>(p, x_tile(i), x_tile(i + 1), block, next, out);
        else
          multiply<1>(p, x_tile(i), x_tile(i), block, next, out);
        write_rows(p, out, i * kRows, std::min(2 * kRows, p.M - i * kRows), nb * kBlock);
      }
    }
    _tile_release();
  });
}

// y = x w^T + bias for bf16 x [M, K] (rows contiguous) and the bf16 weight [N, K] that oneDNN packed,
// at address `weight` (N a multiple of 32, K of 32); bias, when given, is bf16 [N] and added before
// the sum is rounded.
Tensor linear_amx(Tensor x, int64_t weight, int64_t N, std::optional<Tensor> bias) {
  STD_TORCH_CHECK(x.is_cpu() && x.scalar_type() == ScalarType::BFloat16 && x.dim() == 2 && x.stride(1) == 1,
                  "linear_amx: x must be a bfloat16 CPU matrix with contiguous rows");
  const int64_t M = x.size(0), K = x.size(1);
  STD_TORCH_CHECK(K % 32 == 0 && N % kBlock == 0 && N > 0, "linear_amx: K and N must be multiples of 32");
  STD_TORCH_CHECK(weight != 0 && weight % 64 == 0, "linear_amx: the packed weight's address must be 64-byte aligned");
  STD_TORCH_CHECK(amx_allowed(), "linear_amx: Linux did not grant this process AMX's tile registers");
  const uint16_t* b = nullptr;
  if (bias.has_value()) {
    STD_TORCH_CHECK(bias->scalar_type() == ScalarType::BFloat16 && bias->is_contiguous() && bias->numel() == N,
                    "linear_amx: bias must be a contiguous bfloat16 [N]");
    b = static_cast<const uint16_t*>(bias->const_data_ptr());
  }
  Tensor y = torch::stable::new_empty(x, {M, N});
  if (M > 0)
    run({static_cast<const uint16_t*>(x.const_data_ptr()), reinterpret_cast<const uint16_t*>(weight), b,
         static_cast<uint16_t*>(y.mutable_data_ptr()), M, N, K, x.stride(0)});
  return y;
}

}  // namespace

SIDP_LIBRARY_FRAGMENT(SIDP_NS, m) {
  m.def("linear_amx(Tensor x, int weight, int N, Tensor? bias) -> Tensor");
}

SIDP_LIBRARY_IMPL(SIDP_NS, CPU, m) { m.impl("linear_amx", TORCH_BOX(&linear_amx)); }

#endif
