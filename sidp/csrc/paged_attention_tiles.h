// Decode attention on AMX tiles over a cache laid out for them (sidp/model/kv_cache.py): each block's keys
// and values of one KV head are one stretch of memory, keys as [D/2][block_size][2] (pairs of dims, a
// tile's right operand for scores), values as [block_size/2][D][2] (pairs of tokens, the right operand for
// the weighted sum). A tile then loads 16 rows that lie one after another, and nothing is repacked on the
// way. Included by paged_attention.cpp after what it shares (Problem, Task, Scratch, the softmax,
// split_bf16). Block sizes are multiples of 16; head_dim a multiple of 32; at most 16 query heads per KV
// head.
#pragma once

// Tiles 0-3: float32 sums, 16 rows by 16 (scores in tile 0; values' 64 dims in 0-3). Tile 1: 16 queries'
// 32 dims. Tile 7: 16 dim pairs of 16 tokens' keys. Tiles 4, 5: 16 heads' probabilities (hi, lo) of 16
// tokens. Tile 6: 8 token pairs of 16 dims of values.
inline void load_tiles_layout_config() {
  sidp_tiles::TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = kTile;
    c.colsb[t] = 64;
  }
  c.colsb[4] = c.colsb[5] = 32;
  c.rows[6] = kTile / 2;
  _tile_loadconfig(&c);
}

constexpr int64_t kAhead = 32;     // tokens between what is prefetched and what is multiplied
constexpr int64_t kPairRow = 128;  // a row of the last values' copy: 64 dims of two tokens

struct TilesLayoutScratch {
  std::vector<uint16_t> queries, probs_hi, probs_lo, values;
  std::vector<float> tile, acc;
  TilesLayoutScratch(int64_t, int64_t head_dim)
      : queries(kTile * head_dim),
        probs_hi(kTile * kTile),
        probs_lo(kTile * kTile),
        values(kTile / 2 * kPairRow),
        tile(kTile * kTile),
        acc(kTile * 64) {}
};

// The task's query heads, one KV head at a time: scores 16 tokens at a time, the softmax, then the values.
inline void attend_tiles_layout(const Problem& p, const Task& task, Scratch& s, TilesLayoutScratch& a) {
  const int64_t D = p.head_dim, G = p.num_heads / p.num_kv_heads, bs = p.block_size, Hkv = p.num_kv_heads;
  const int64_t n = p.context_lens[task.seq], n16 = round_up(n, kTile), ls = s.len_stride;
  const int32_t* table = p.block_tables + task.seq * p.max_blocks;
  const uint16_t* q = static_cast<const uint16_t*>(p.q) + task.seq * p.q_stride;
  const uint16_t* k = static_cast<const uint16_t*>(p.k);
  const uint16_t* v = static_cast<const uint16_t*>(p.v);
  uint16_t* out = static_cast<uint16_t*>(p.out) + task.seq * p.num_heads * D;
  // Where tokens [t, t + 16) of KV head kvh start: their block's stretch, and the offset within it.
  auto stretch = [&](int64_t t, int64_t kvh) { return (table[t / bs] * Hkv + kvh) * bs * D; };
  load_tiles_layout_config();
  for (int64_t kvh = task.kv_begin; kvh < task.kv_end; ++kvh) {
    std::fill(a.queries.begin(), a.queries.end(), 0);  // rows past the group stay zero
    std::memcpy(a.queries.data(), q + kvh * G * D, G * D * 2);
    for (int64_t t0 = 0; t0 < n; t0 += kTile) {
      if (t0 + kAhead < n) {  // the keys kAhead tokens on: D/2 rows of 64 bytes
        const char* next = reinterpret_cast<const char*>(k + stretch(t0 + kAhead, kvh) + (t0 + kAhead) % bs * 2);
        for (int64_t r = 0; r < D / 2; ++r) __builtin_prefetch(next + r * bs * 4);
      }
      const uint16_t* keys = k + stretch(t0, kvh) + t0 % bs * 2;
      _tile_zero(0);
      for (int64_t c = 0; c < D; c += 32) {
        _tile_loadd(1, a.queries.data() + c, D * 2);
        _tile_loadd(7, keys + c / 2 * bs * 2, bs * 4);
        _tile_dpbf16ps(0, 1, 7);
      }
      _tile_stored(0, a.tile.data(), 64);
      for (int64_t g = 0; g < G; ++g)
        vstore(s.scores.data() + (kvh * G + g) * ls + t0, vload(a.tile.data() + g * kTile) * p.scale);
    }
    for (int64_t h = kvh * G; h < (kvh + 1) * G; ++h) {
      float* sh = s.scores.data() + h * ls;
      std::fill(sh + n, sh + round_up(n, kLanes), -INFINITY);
      s.inv_sum[h] = 1.0f / softmax_numerators(sh, round_up(n, kLanes));
    }
    std::fill(a.probs_hi.begin(), a.probs_hi.end(), 0);
    std::fill(a.probs_lo.begin(), a.probs_lo.end(), 0);
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
      const int64_t width = std::min<int64_t>(64, D - d0);
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t t0 = 0; t0 < n16; t0 += kTile) {
        for (int64_t g = 0; g < G; ++g) {  // 32 probabilities split (a row's slack covers t0 + 32), 16 kept
          alignas(64) uint16_t hi[32], lo[32];
          split_bf16(s.scores.data() + (kvh * G + g) * ls + t0, hi, lo);
          std::memcpy(a.probs_hi.data() + g * kTile, hi, kTile * 2);
          std::memcpy(a.probs_lo.data() + g * kTile, lo, kTile * 2);
        }
        if (t0 + kAhead < n) {  // the values kAhead tokens on: 8 rows of `width` pairs
          const char* next =
              reinterpret_cast<const char*>(v + stretch(t0 + kAhead, kvh) + (t0 + kAhead) % bs / 2 * D * 2 + d0 * 2);
          for (int64_t r = 0; r < kTile / 2; ++r)
            for (int64_t b = 0; b < width * 4; b += 64) __builtin_prefetch(next + r * D * 4 + b);
        }
        const uint16_t* values = v + stretch(t0, kvh) + t0 % bs / 2 * D * 2 + d0 * 2;
        int64_t stride = D * 4;
        if (t0 + kTile > n) {  // past the context the cache holds whatever was there: zeros instead
          std::fill(a.values.begin(), a.values.end(), 0);
          for (int64_t t = t0; t < n; ++t)
            for (int64_t d = 0; d < width; ++d)
              a.values[(t - t0) / 2 * kPairRow + d * 2 + t % 2] = values[(t - t0) / 2 * D * 2 + d * 2 + t % 2];
          values = a.values.data();
          stride = kPairRow * 2;
        }
        _tile_loadd(4, a.probs_hi.data(), 32);
        _tile_loadd(5, a.probs_lo.data(), 32);
        accumulate_values(values, 32, stride, width);
      }
      store_values(a.acc.data(), s, kvh * G, G, D, d0, width, out);
    }
  }
  _tile_release();
}
