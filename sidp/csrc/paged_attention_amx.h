// Decode attention on AMX tiles, for bf16 caches with head_dim a multiple of 32 and at most 16 query heads
// per KV head: the same contract as attend() in paged_attention.cpp, which includes this file inside its
// namespace after the helpers it shares (Problem, Task, Scratch, the softmax).
//
// Keys stay where the cache holds them: 16 tokens of one KV head are a tile as they lie (a block's rows
// are evenly spaced), multiplied by the group's queries packed once per task. Values are repacked in pairs
// of tokens, as the tile product wants them, and multiplied by the probabilities split into two bf16
// parts (hi + lo), so a probability keeps 16 bits of precision where one bf16 would keep 8: the result
// stays within the float32 path's rounding.
#pragma once

using sidp_tiles::amx_allowed;
using sidp_tiles::kTile;
using sidp_tiles::load_tile_config;

struct AmxScratch {
  std::vector<int64_t> rows;  // the cache row (token slot * row_stride) of each token of the sequence
  std::vector<uint16_t> queries, keys, probs_hi, probs_lo, values, zeros;
  std::vector<float> tile, acc;
  AmxScratch(int64_t max_len, int64_t head_dim)
      : rows(max_len),
        queries(head_dim / 32 * kTile * 32),
        keys(2 * kTile * head_dim),
        probs_hi(kTile * 32),
        probs_lo(kTile * 32),
        values(4 * kTile * 32),
        zeros(head_dim),
        tile(2 * kTile * kTile),
        acc(kTile * 64) {}
};

inline void prefetch_rows(const uint16_t* base, const int64_t* rows, int64_t count, int64_t bytes) {
  for (int64_t t = 0; t < count; ++t) {
    const char* row = reinterpret_cast<const char*>(base + rows[t]);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b);
  }
}

// The keys of tokens [t0, t0 + 16) of one KV head as a tile's rows: where the cache holds them when they
// are one stretch of a block, else copied into `copy`. Returns the rows and their stride in bytes.
inline std::pair<const uint16_t*, int64_t> key_rows(const uint16_t* k, const int64_t* rows, int64_t m,
                                                    int64_t D, int64_t row_stride, uint16_t* copy) {
  if (m == kTile && rows[kTile - 1] == rows[0] + (kTile - 1) * row_stride)
    return {k + rows[0], row_stride * 2};
  for (int64_t t = 0; t < m; ++t) std::memcpy(copy + t * D, k + rows[t], D * 2);
  return {copy, D * 2};
}

// scores[h][t] = scale * (q_h . k_t) for the query heads h of KV head kvh, 32 tokens at a time: tiles 0
// and 1 accumulate 16 tokens by 16 heads each, from 16 tokens' keys (32 dims) in tiles 2 and 3 and the
// queries in pairs of dims in tile 4. Two independent products per step keep the tile unit busy.
inline void amx_scores(const Problem& p, AmxScratch& a, Scratch& s, const uint16_t* q, int64_t kvh,
                       int64_t n) {
  const int64_t D = p.head_dim, G = p.num_heads / p.num_kv_heads, row_stride = p.num_kv_heads * D;
  const uint16_t* k = static_cast<const uint16_t*>(p.k) + kvh * D;
  uint16_t* packed = a.queries.data();
  std::fill(a.queries.begin(), a.queries.end(), 0);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d)
      packed[d / 32 * 512 + d % 32 / 2 * 32 + g * 2 + d % 2] = q[(kvh * G + g) * D + d];
  // Lane t of a gather reads row t of a stored 16x16 float tile.
  const __m512i row =
      _mm512_set_epi32(240, 224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64, 48, 32, 16, 0);
  for (int64_t t0 = 0; t0 < n; t0 += 2 * kTile) {
    const int64_t* rows = a.rows.data() + t0;
    if (t0 + 2 * kTile < n)
      prefetch_rows(k, rows + 2 * kTile, std::min(2 * kTile, n - t0 - 2 * kTile), D * 2);
    const auto [first, first_stride] =
        key_rows(k, rows, std::min(kTile, n - t0), D, row_stride, a.keys.data());
    // Past the context, the second tile repeats the first; its scores land in the rows' slack.
    const auto [second, second_stride] = t0 + kTile < n
                                             ? key_rows(k, rows + kTile, std::min(kTile, n - t0 - kTile), D,
                                                        row_stride, a.keys.data() + kTile * D)
                                             : std::pair{first, first_stride};
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t c = 0; c < D; c += 32) {
      _tile_loadd(4, packed + c / 32 * 512, 64);
      _tile_loadd(2, first + c, first_stride);
      _tile_loadd(3, second + c, second_stride);
      _tile_dpbf16ps(0, 2, 4);
      _tile_dpbf16ps(1, 3, 4);
    }
    _tile_stored(0, a.tile.data(), 64);
    _tile_stored(1, a.tile.data() + kTile * kTile, 64);
    for (int64_t g = 0; g < G; ++g) {  // column g of each tile
      const __m512i column = _mm512_add_epi32(row, _mm512_set1_epi32(int(g)));
      float* scores = s.scores.data() + (kvh * G + g) * s.len_stride + t0;
      vstore(scores, (fvec)_mm512_i32gather_ps(column, a.tile.data(), 4) * p.scale);
      vstore(scores + kTile, (fvec)_mm512_i32gather_ps(column, a.tile.data() + kTile * kTile, 4) * p.scale);
    }
  }
}

// Two bf16 whose sum is x to 16 bits: hi rounds x, lo rounds what hi missed.
inline void split_bf16(const float* x, uint16_t* hi, uint16_t* lo) {
  const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
  const __m512i h = (__m512i)_mm512_cvtne2ps_pbh(x1, x0);
  const __m512 h0 =
      _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)), 16));
  const __m512 h1 =
      _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(h, 1)), 16));
  _mm512_storeu_si512(hi, h);
  _mm512_storeu_si512(lo, (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(x1, h1), _mm512_sub_ps(x0, h0)));
}

// Tiles 0-3 (16 heads by 16 dims each) += the probabilities in tiles 4 and 5 (hi, lo) times the values of
// `width` dims: those of dims [16j, 16j + 16) a tile at values + j * step, rows `stride` bytes apart.
inline void accumulate_values(const uint16_t* values, int64_t step, int64_t stride, int64_t width) {
#define SIDP_DIMS16(j)                            \
  if (width > 16 * (j)) {                         \
    _tile_loadd(6, values + (j) * step, stride);  \
    _tile_dpbf16ps(j, 4, 6);                      \
    _tile_dpbf16ps(j, 5, 6);                      \
  }
  SIDP_DIMS16(0) SIDP_DIMS16(1) SIDP_DIMS16(2) SIDP_DIMS16(3)
#undef SIDP_DIMS16
}

// out[h0 + g], dims [d0, d0 + width) = tiles 0-3's row g / the head's softmax sum, rounded to bf16, for
// the G heads from h0; `acc` holds the 16 rows of 64 floats on the way.
inline void store_values(float* acc, const Scratch& s, int64_t h0, int64_t G, int64_t D, int64_t d0,
                         int64_t width, uint16_t* out) {
  _tile_stored(0, acc, 256);
  _tile_stored(1, acc + 16, 256);
  _tile_stored(2, acc + 32, 256);
  _tile_stored(3, acc + 48, 256);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < width; ++d)
      BF16::store(acc[g * 64 + d] * s.inv_sum[h0 + g], out + (h0 + g) * D + d0 + d);
}

// acc[g][d] = sum_t e[g][t] v_t[d] for the query heads of KV head kvh, 64 dims at a time in tiles 0-3 (16
// heads by 16 dims each); tiles 4 and 5 hold 32 tokens' probabilities (hi, lo), tile 6 their values in
// pairs of tokens. Writes out[h] = acc[g] / sum_h, rounded to bf16.
inline void amx_values(const Problem& p, AmxScratch& a, Scratch& s, int64_t kvh, int64_t n, uint16_t* out) {
  const int64_t D = p.head_dim, G = p.num_heads / p.num_kv_heads, n32 = round_up(n, 32);
  const uint16_t* v = static_cast<const uint16_t*>(p.v) + kvh * D;
  // Output lane i of a pair: row a's dim i/2 for even i, row b's for odd (b's lanes are numbered from 32).
  alignas(64) int16_t interleave[2][32];
  for (int i = 0; i < 32; ++i) {
    interleave[0][i] = int16_t((i % 2 ? 32 : 0) + i / 2);
    interleave[1][i] = int16_t(interleave[0][i] + 16);
  }
  const __m512i low = _mm512_load_si512(interleave[0]), high = _mm512_load_si512(interleave[1]);
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    const int64_t width = std::min<int64_t>(64, D - d0);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t t0 = 0; t0 < n32; t0 += 32) {
      if (t0 + 32 < n)
        prefetch_rows(v + d0, a.rows.data() + t0 + 32, std::min<int64_t>(32, n - t0 - 32), width * 2);
      for (int64_t g = 0; g < G; ++g)
        split_bf16(s.scores.data() + (kvh * G + g) * s.len_stride + t0, a.probs_hi.data() + g * 32,
                   a.probs_lo.data() + g * 32);
      for (int64_t r = 0; r < kTile; ++r) {
        const int64_t ta = t0 + 2 * r, tb = ta + 1;
        const uint16_t* va = ta < n ? v + a.rows[ta] + d0 : a.zeros.data();
        const uint16_t* vb = tb < n ? v + a.rows[tb] + d0 : a.zeros.data();
        for (int64_t c = 0; c < width; c += 32) {
          const __m512i x = _mm512_loadu_si512(va + c), y = _mm512_loadu_si512(vb + c);
          _mm512_storeu_si512(a.values.data() + (c / 16 * kTile + r) * 32,
                              _mm512_permutex2var_epi16(x, low, y));
          _mm512_storeu_si512(a.values.data() + ((c / 16 + 1) * kTile + r) * 32,
                              _mm512_permutex2var_epi16(x, high, y));
        }
      }
      _tile_loadd(4, a.probs_hi.data(), 64);
      _tile_loadd(5, a.probs_lo.data(), 64);
      accumulate_values(a.values.data(), 512, 64, width);
    }
    store_values(a.acc.data(), s, kvh * G, G, D, d0, width, out);
  }
}

// attend() for bf16 on AMX: every score, then the softmax, then every value, one KV head at a time.
inline void attend_amx(const Problem& p, const Task& task, Scratch& s, AmxScratch& a) {
  const int64_t D = p.head_dim, G = p.num_heads / p.num_kv_heads, bs = p.block_size;
  const int64_t n = p.context_lens[task.seq], n32 = round_up(n, 32), row_stride = p.num_kv_heads * D;
  const int32_t* table = p.block_tables + task.seq * p.max_blocks;
  for (int64_t t = 0; t < n; ++t) a.rows[t] = (table[t / bs] * bs + t % bs) * row_stride;
  const uint16_t* q = static_cast<const uint16_t*>(p.q) + task.seq * p.q_stride;
  load_tile_config();
  for (int64_t kvh = task.kv_begin; kvh < task.kv_end; ++kvh) amx_scores(p, a, s, q, kvh, n);
  for (int64_t h = task.kv_begin * G; h < task.kv_end * G; ++h) {
    float* sh = s.scores.data() + h * s.len_stride;
    std::fill(sh + n, sh + n32, -INFINITY);
    s.inv_sum[h] = 1.0f / softmax_numerators(sh, n32);
  }
  uint16_t* out = static_cast<uint16_t*>(p.out) + task.seq * p.num_heads * D;
  for (int64_t kvh = task.kv_begin; kvh < task.kv_end; ++kvh) amx_values(p, a, s, kvh, n, out);
  _tile_release();
}
