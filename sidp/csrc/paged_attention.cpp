// CPU decode attention that reads K/V where they sit in the paged KV cache, so a decode step never
// gathers each sequence's blocks into a padded copy. Built at first use by sidp/model/paged_attention.py.
//
// Written against PyTorch's stable C ABI (torch/csrc/stable), whose headers compile in about a second
// where <torch/extension.h> takes over twenty. The arithmetic uses GCC/Clang vector extensions, which
// the compiler maps onto whatever -march offers (zmm, ymm or NEON registers), and x86 intrinsics for what
// those cannot say: fused multiply-adds, and bf16 dot products on CPUs with AVX512-BF16. On CPUs with AMX,
// bf16 runs on tiles instead: over the rows layout (paged_attention_amx.h) or over a cache kept in the
// tiles' own layout (paged_attention_tiles.h).

#include "exp_nonpositive.h"
#include "library.h"
#include "vectors.h"
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include "amx_tiles.h"
#endif

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

inline float as_float(uint32_t u) { return std::bit_cast<float>(u); }
inline uint32_t as_bits(float f) { return std::bit_cast<uint32_t>(f); }

typedef int32_t ivec __attribute__((vector_size(4 * kLanes)));
typedef uint16_t hvec __attribute__((vector_size(2 * kLanes)));

// Element types of the cache: load() reads kLanes elements as floats, widen() turns n elements into
// floats, store() narrows one result.
struct F32 {
  using T = float;
  static fvec load(const T* p) { return vload(p); }
  static void widen(const T* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
  static void store(float x, T* dst) { *dst = x; }
};

// Zero-extends kLanes uint16 to int32 (vpmovzxwd).
inline ivec load_u16(const uint16_t* p) {
#if defined(__AVX512F__)
  return (ivec)_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
  hvec h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, ivec);
#endif
}

struct BF16 {
  using T = uint16_t;
  // bf16 is the top half of a float, so widening is a zero-extend and a shift (vpmovzxwd + vpslld).
  static fvec load(const T* p) { return (fvec)(load_u16(p) << 16); }
  static void widen(const T* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = as_float(uint32_t(src[i]) << 16);
  }
  static void store(float x, T* dst) { *dst = torch::headeronly::BFloat16(x).x; }  // rounds to nearest even
};

struct F16 {
  using T = uint16_t;
  // Rebias the exponent by multiplying by 2^112, which is also exact for fp16 subnormals; inf and NaN
  // take the other branch. gcc does not vectorise _Float16 -> float, hence the bit arithmetic.
  static fvec load(const T* p) {
    const ivec h = load_u16(p), mag = (h & 0x7fff) << 13, sign = (h & 0x8000) << 16;
    const ivec wide = mag >= (0x7c00 << 13) ? (mag | 0x7f800000) : (ivec)((fvec)mag * 0x1p112f);
    return (fvec)(wide | sign);
  }
  static void widen(const T* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t mag = uint32_t(src[i] & 0x7fffu) << 13;
      const uint32_t sign = uint32_t(src[i] & 0x8000u) << 16;
      const uint32_t wide = mag >= (0x7c00u << 13) ? (mag | 0x7f800000u) : as_bits(as_float(mag) * 0x1p112f);
      dst[i] = as_float(wide | sign);
    }
  }
  static void store(float x, T* dst) { *dst = torch::headeronly::Half(x).x; }
};

// Lane i of fold<w>(a, b): a's lanes when i < kLanes / 2, else b's; each half of the result takes its
// vector's lanes in groups of 2w and adds the group's first w lanes onto its last w.
constexpr int fold_lane(int w, int i) {
  const int j = i % (kLanes / 2);
  return (i < kLanes / 2 ? 0 : kLanes) + j / w * 2 * w + j % w;
}

template <int W, size_t... I>
inline fvec fold(fvec a, fvec b, std::index_sequence<I...>) {
  return __builtin_shufflevector(a, b, fold_lane(W, I)...) +
         __builtin_shufflevector(a, b, (fold_lane(W, I) + W)...);
}

// v holds 2W vectors of partial sums (kLanes of them, one per row, at the first call); returns the
// vector whose lane t is row t's total.
template <int W>
inline fvec fold_rows(fvec* v) {
#pragma GCC unroll 16
  for (int i = 0; i < W; ++i) v[i] = fold<W>(v[2 * i], v[2 * i + 1], std::make_index_sequence<kLanes>());
  if constexpr (W == 1) {
    return v[0];
  } else {
    return fold_rows<W / 2>(v);
  }
}

inline fvec exp_nonpositive(fvec x) {
  return exp_of_nonpositive(x, [](fvec n) { return (fvec)((__builtin_convertvector(n, ivec) + 127) << 23); });
}

// Turns n scores into unnormalised probabilities in place; returns their sum. n is a multiple of kLanes
// and the padding holds -inf.
inline float softmax_numerators(float* s, int64_t n) {
  fvec mx = splat(-INFINITY);
  for (int64_t i = 0; i < n; i += kLanes) {
    const fvec x = vload(s + i);
    mx = x > mx ? x : mx;
  }
  float top = mx[0];
  for (int l = 1; l < kLanes; ++l) top = std::max(top, mx[l]);
  fvec sum = {};
  for (int64_t i = 0; i < n; i += kLanes) {
    const fvec e = exp_nonpositive(vload(s + i) - top);
    vstore(s + i, e);
    sum += e;
  }
  float total = 0.0f;
  for (int l = 0; l < kLanes; ++l) total += sum[l];
  return total;
}

struct Problem {
  const void* q;  // a sequence's heads contiguous, sequences q_stride elements apart
  const void* k;
  const void* v;
  void* out;
  const int32_t* block_tables;
  const int32_t* context_lens;
  int64_t num_heads, num_kv_heads, head_dim, block_size, max_blocks, q_stride;
  float scale;
};

// The query heads of KV heads [kv_begin, kv_end) of sequence `seq`.
struct Task {
  int64_t seq, kv_begin, kv_end;
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Per-thread buffers, indexed by query head. Scores rows have kLanes floats of slack, so that a run's
// scores are stored as one vector whatever its length.
struct Scratch {
  int64_t width, len_stride;
  std::vector<float> q, rows, zeros, scores, acc, inv_sum;  // zeros: a row of zeros in any element type
  Scratch(int64_t heads, int64_t head_dim, int64_t max_len)
      : width(round_up(head_dim, kLanes)), len_stride(round_up(max_len, kLanes) + kLanes), q(heads * width),
        rows(kLanes * width), zeros(width), scores(heads * len_stride), acc(heads * width), inv_sum(heads) {}
};

// Calls f(start, m, first_row) for each run of up to kLanes tokens of the sequence that share a cache
// block; first_row points at the run's first token, KV head 0. Blocks are scattered, beyond what the
// hardware prefetcher guesses, so the next run's rows of the task's KV heads are requested while this
// one is worked on.
template <typename T, typename F>
void for_each_run(const T* cache, const Problem& p, const Task& task, int64_t n, F&& f) {
  const int64_t bs = p.block_size, row_stride = p.num_kv_heads * p.head_dim;
  const int32_t* table = p.block_tables + task.seq * p.max_blocks;
  const int64_t skip = task.kv_begin * p.head_dim * int64_t(sizeof(T));
  const int64_t span = (task.kv_end - task.kv_begin) * p.head_dim * int64_t(sizeof(T));
  auto run_at = [&](int64_t start, int64_t& m) {
    const int64_t in_block = start % bs;
    m = std::min({int64_t{kLanes}, bs - in_block, n - start});
    return cache + (table[start / bs] * bs + in_block) * row_stride;
  };
  int64_t m = 0, next_m = 0;
  for (int64_t start = 0; start < n; start += m) {
    const T* first = run_at(start, m);
    if (start + m < n) {
      const T* next = run_at(start + m, next_m);
      for (int64_t t = 0; t < next_m; ++t) {
        const auto* row = reinterpret_cast<const char*>(next + t * row_stride) + skip;
        for (uintptr_t line = uintptr_t(row) & ~uintptr_t{63}; line < uintptr_t(row + span); line += 64)
          __builtin_prefetch(reinterpret_cast<const void*>(line));
      }
    }
    f(start, m, first);
  }
}

// How many partial sums per query head fit beside the N heads' own vectors and one loaded vector: a power of
// two, at most kLanes.
template <int N>
constexpr int sums_per_head() {
  int k = kLanes;
  while (k > 1 && N * k + N + 1 > kRegisters) k /= 2;
  return k;
}

// For each of N query heads g (its q at q + g * q_stride): scores[g] gets, in lane t, the dot product of q with
// row t (t < m), `width` elements each. Rows are taken sums_per_head<N>() at a time, so that each loaded
// vector of a row serves all N heads and each q vector all those rows; rows past m read `zeros`. Summing each
// row's vector on its own would cost as much again as the multiplies; folding a head's rows together costs
// about three instructions per row.
template <int N, typename R>
inline void block_scores(const float* q, int64_t q_stride, const typename R::T* rows, int64_t stride, int64_t m,
                         int64_t width, const typename R::T* zeros, fvec* scores) {
  constexpr int K = sums_per_head<N>();
  fvec part[N][kLanes];
  for (int t0 = 0; t0 < kLanes; t0 += K) {
    if (t0 >= m) {  // a run's last rows: their lanes are overwritten or never read
      for (int g = 0; g < N; ++g)
        for (int t = 0; t < K; ++t) part[g][t0 + t] = fvec{};
      continue;
    }
    const typename R::T* row[K];
    for (int t = 0; t < K; ++t) row[t] = t0 + t < m ? rows + (t0 + t) * stride : zeros;
    fvec acc[N][K] = {};
    for (int64_t c = 0; c < width; c += kLanes) {
      fvec qv[N];
      for (int g = 0; g < N; ++g) qv[g] = vload(q + g * q_stride + c);
#pragma GCC unroll 16
      for (int t = 0; t < K; ++t) {
        const fvec x = R::load(row[t] + c);
        for (int g = 0; g < N; ++g) acc[g][t] = fmadd(qv[g], x, acc[g][t]);
      }
    }
    for (int g = 0; g < N; ++g)
      for (int t = 0; t < K; ++t) part[g][t0 + t] = acc[g][t];
  }
  for (int g = 0; g < N; ++g) scores[g] = fold_rows<kLanes / 2>(part[g]);
}

#if defined(__AVX512BF16__)
constexpr bool kDotBf16 = true;

// block_scores for bf16 q and rows, head_dim a multiple of 32: vdpbf16ps multiplies pairs of bf16 where
// they lie, without widening them first. Products of two bf16 are exact in float32; only the order of the
// additions differs from the widened path.
inline fvec block_scores_bf16(const uint16_t* q, const uint16_t* rows, int64_t stride, int64_t m,
                              int64_t D) {
  fvec part[kLanes];
#pragma GCC unroll 16
  for (int t = 0; t < kLanes; ++t) {
    __m512 acc = _mm512_setzero_ps();
    if (t < m)
      for (int64_t c = 0; c < D; c += 32)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q + c),
                               (__m512bh)_mm512_loadu_si512(rows + t * stride + c));
    part[t] = (fvec)acc;
  }
  return fold_rows<kLanes / 2>(part);
}
#else
constexpr bool kDotBf16 = false;
inline fvec block_scores_bf16(const uint16_t*, const uint16_t*, int64_t, int64_t, int64_t) { return fvec{}; }
#endif

// For each of N query heads g: acc[g] += sum over t < m of w[g][t] * rows[t], sums_per_head<N>() vectors of
// each row at a time, so that each loaded vector serves all N heads and each weight all those vectors.
template <int N, typename R>
inline void accumulate(float* acc, int64_t acc_stride, const float* w, int64_t w_stride,
                       const typename R::T* rows, int64_t stride, int64_t m, int64_t width) {
  constexpr int K = sums_per_head<N>();
  for (int64_t c0 = 0; c0 < width; c0 += K * kLanes) {
    const int k = int(std::min<int64_t>(K, (width - c0) / kLanes));
    fvec a[N][K];
    for (int g = 0; g < N; ++g)
      for (int j = 0; j < K; ++j) a[g][j] = j < k ? vload(acc + g * acc_stride + c0 + j * kLanes) : fvec{};
    for (int64_t t = 0; t < m; ++t) {
      fvec wt[N];
      for (int g = 0; g < N; ++g) wt[g] = splat(w[g * w_stride + t]);
#pragma GCC unroll 16
      for (int j = 0; j < K; ++j) {
        if (j >= k) break;
        const fvec x = R::load(rows + t * stride + c0 + j * kLanes);
        for (int g = 0; g < N; ++g) a[g][j] = fmadd(wt[g], x, a[g][j]);
      }
    }
    for (int g = 0; g < N; ++g)
      for (int j = 0; j < k; ++j) vstore(acc + g * acc_stride + c0 + j * kLanes, a[g][j]);
  }
}

// Calls f(std::integral_constant<int, N>{}, h) for the query heads [h, h + G) of one KV head, N = 4 at a time
// (fewer for the last): a count fixed at compile time, so that their sums stay in registers.
template <typename F>
inline void four_heads_at_a_time(int64_t h, int64_t G, F&& f) {
  for (int64_t end = h + G; h < end; h += 4) {
    switch (std::min<int64_t>(4, end - h)) {
      case 1: f(std::integral_constant<int, 1>{}, h); break;
      case 2: f(std::integral_constant<int, 2>{}, h); break;
      case 3: f(std::integral_constant<int, 3>{}, h); break;
      default: f(std::integral_constant<int, 4>{}, h); break;
    }
  }
}

// The scores of query heads [h0, h0 + G) of one KV head for the run of m rows at `start`.
template <typename R>
void scores_group(Scratch& s, int64_t h0, int64_t G, int64_t start, const typename R::T* rows, int64_t stride,
                  int64_t m, float scale) {
  const int64_t W = s.width, ls = s.len_stride;
  const auto* zeros = reinterpret_cast<const typename R::T*>(s.zeros.data());
  four_heads_at_a_time(h0, G, [&](auto n, int64_t h) {
    fvec sc[n];
    block_scores<n, R>(s.q.data() + h * W, W, rows, stride, m, W, zeros, sc);
    for (int g = 0; g < n; ++g) vstore(s.scores.data() + (h + g) * ls + start, sc[g] * scale);
  });
}

// The values of query heads [h0, h0 + G) of one KV head for the run of m rows at `start`.
template <typename R>
void accumulate_group(Scratch& s, int64_t h0, int64_t G, int64_t start, const typename R::T* rows,
                      int64_t stride, int64_t m) {
  const int64_t W = s.width, ls = s.len_stride;
  four_heads_at_a_time(h0, G, [&](auto n, int64_t h) {
    accumulate<n, R>(s.acc.data() + h * W, W, s.scores.data() + h * ls + start, ls, rows, stride, m, W);
  });
}

// Calls f(element_type, rows, stride) on the m rows of one KV head starting at `first`: the cache's own
// rows when the head fills whole vectors, else F32 rows widened into s.rows and zero-padded to s.width.
template <typename L, typename F>
void with_rows(const typename L::T* first, int64_t row_stride, int64_t m, int64_t D, Scratch& s, F&& f) {
  if (D == s.width) return f(L{}, first, row_stride);
  for (int64_t t = 0; t < m; ++t) L::widen(first + t * row_stride, s.rows.data() + t * s.width, D);
  f(F32{}, static_cast<const float*>(s.rows.data()), s.width);
}

// The task's query heads: one pass over its keys, then one over its values, each reading every row of its
// KV heads once however large the group. L is the cache's element type; Q that of q and out (L's, or F32
// where the model computes in float32 over a 16-bit cache).
template <typename L, typename Q = L>
void attend(const Problem& p, const Task& task, Scratch& s) {
  using T = typename L::T;
  using QT = typename Q::T;
  const int64_t D = p.head_dim, W = s.width, G = p.num_heads / p.num_kv_heads, ls = s.len_stride;
  const int64_t n = p.context_lens[task.seq], n_pad = round_up(n, kLanes);
  const int64_t row_stride = p.num_kv_heads * D;  // between consecutive tokens of one block
  const int64_t h0 = task.kv_begin * G, h1 = task.kv_end * G;  // the task's query heads
  const QT* q = static_cast<const QT*>(p.q) + task.seq * p.q_stride;
  for (int64_t h = h0; h < h1; ++h) Q::widen(q + h * D, s.q.data() + h * W, D);

  for_each_run(static_cast<const T*>(p.k), p, task, n, [&](int64_t start, int64_t m, const T* first) {
    auto scores = [&](int64_t h) { return s.scores.data() + h * ls + start; };
    for (int64_t kvh = task.kv_begin; kvh < task.kv_end; ++kvh) {
      const T* rows = first + kvh * D;
      if constexpr (kDotBf16 && std::is_same_v<L, BF16> && std::is_same_v<Q, BF16>) {
        if (D % 32 == 0) {
          for (int64_t h = kvh * G; h < (kvh + 1) * G; ++h)
            vstore(scores(h), block_scores_bf16(q + h * D, rows, row_stride, m, D) * p.scale);
          continue;
        }
      }
      with_rows<L>(rows, row_stride, m, D, s, [&](auto r, const auto* x, int64_t stride) {
        scores_group<decltype(r)>(s, kvh * G, G, start, x, stride, m, p.scale);
      });
    }
  });

  for (int64_t h = h0; h < h1; ++h) {
    float* sh = s.scores.data() + h * ls;
    std::fill(sh + n, sh + n_pad, -INFINITY);
    s.inv_sum[h] = 1.0f / softmax_numerators(sh, n_pad);
  }

  std::fill(s.acc.begin() + h0 * W, s.acc.begin() + h1 * W, 0.0f);
  for_each_run(static_cast<const T*>(p.v), p, task, n, [&](int64_t start, int64_t m, const T* first) {
    for (int64_t kvh = task.kv_begin; kvh < task.kv_end; ++kvh)
      with_rows<L>(first + kvh * D, row_stride, m, D, s, [&](auto r, const auto* x, int64_t stride) {
        accumulate_group<decltype(r)>(s, kvh * G, G, start, x, stride, m);
      });
  });

  QT* out = static_cast<QT*>(p.out) + task.seq * p.num_heads * D;
  for (int64_t h = h0; h < h1; ++h)
    for (int64_t d = 0; d < D; ++d) Q::store(s.acc[h * W + d] * s.inv_sum[h], out + h * D + d);
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include "paged_attention_amx.h"
#include "paged_attention_tiles.h"

// Whether bf16 attention can run on AMX tiles here: 16 query heads per KV head at most, head_dim in pairs
// of tile rows, and tiles the OS lets this process use.
inline bool on_amx(const Problem& p) {
  return p.num_heads / p.num_kv_heads <= kTile && p.head_dim % 32 == 0 && amx_allowed();
}
inline bool tiles_layout_runs() { return amx_allowed(); }
#else
struct AmxScratch {
  AmxScratch(int64_t, int64_t) {}
};
inline bool on_amx(const Problem&) { return false; }
inline bool tiles_layout_runs() { return false; }
inline void attend_amx(const Problem&, const Task&, Scratch&, AmxScratch&) {}
struct TilesLayoutScratch {
  TilesLayoutScratch(int64_t, int64_t) {}
};
inline void attend_tiles_layout(const Problem&, const Task&, Scratch&, TilesLayoutScratch&) {}
#endif

// Calls attend(task, scratch, more) for every task of the batch, where each thread has its own Scratch and
// `More` (the AMX kernels' buffers, built from head_dim and max_len).
template <typename More, typename Attend>
void for_each_task(const Problem& p, int64_t batch, int64_t max_len, Attend&& attend) {
  const int64_t threads = torch::stable::get_num_threads();
  // A task walks its sequence's blocks once for all KV heads, reading each block's rows as one run. With
  // too few sequences to keep every thread busy, each KV head is a task of its own.
  const int64_t splits = batch < 4 * threads ? p.num_kv_heads : 1, tasks = batch * splits;
  // Threads take tasks in turn, so that one slowed down (a long context, a busy core) holds up no other.
  // No exception may leave this callback (it crosses a C ABI).
  std::atomic<int64_t> next{0};
  torch::stable::parallel_for(0, std::min(threads, tasks), 1, [&](int64_t, int64_t) {
    Scratch scratch(p.num_heads, p.head_dim, max_len);
    More more(max_len, p.head_dim);
    for (int64_t i = next++; i < tasks; i = next++) {
      const int64_t part = i % splits;
      attend(Task{i / splits, part * p.num_kv_heads / splits, (part + 1) * p.num_kv_heads / splits}, scratch,
             more);
    }
  });
}

template <typename L, typename Q = L>
void run(const Problem& p, int64_t batch, int64_t max_len) {
  if (std::is_same_v<L, BF16> && std::is_same_v<Q, BF16> && on_amx(p))
    return for_each_task<AmxScratch>(p, batch, max_len, [&](const Task& task, Scratch& s, AmxScratch& a) {
      attend_amx(p, task, s, a);
    });
  struct None {
    None(int64_t, int64_t) {}
  };
  for_each_task<None>(p, batch, max_len, [&](const Task& task, Scratch& s, None&) { attend<L, Q>(p, task, s); });
}

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& tables,
                  const Tensor& lens) {
  STD_TORCH_CHECK(q.is_cpu() && k.is_cpu() && v.is_cpu() && tables.is_cpu() && lens.is_cpu(),
                  "paged_decode_attention: all tensors must be on the CPU");
  STD_TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.dim() == 4 && tables.dim() == 2 && lens.dim() == 1,
                  "paged_decode_attention: expected q [B,H,D], caches [N,bs,Hkv,D], block_tables [B,M], "
                  "context_lens [B]");
  STD_TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && tables.is_contiguous() && lens.is_contiguous(),
                  "paged_decode_attention: caches, block_tables and context_lens must be contiguous");
  // q may be rows of a wider tensor (the fused QKV projection): each sequence's heads must be contiguous.
  STD_TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2) && q.stride(0) >= q.size(1) * q.size(2),
                  "paged_decode_attention: q's heads must be contiguous within each sequence's row");
  STD_TORCH_CHECK(v.scalar_type() == k.scalar_type() &&
                      (q.scalar_type() == k.scalar_type() || q.scalar_type() == ScalarType::Float),
                  "paged_decode_attention: k_cache and v_cache must share a dtype, and q have it or be float32");
  STD_TORCH_CHECK(tables.scalar_type() == ScalarType::Int && lens.scalar_type() == ScalarType::Int,
                  "paged_decode_attention: block_tables and context_lens must be int32");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(2);
  for (int64_t i = 0; i < 4; ++i)
    STD_TORCH_CHECK(k.size(i) == v.size(i), "paged_decode_attention: k_cache and v_cache shapes differ");
  STD_TORCH_CHECK(k.size(3) == D && Hkv > 0 && H % Hkv == 0,
                  "paged_decode_attention: head_dim must match and num_heads be a multiple of num_kv_heads");
  STD_TORCH_CHECK(tables.size(0) == B && lens.size(0) == B,
                  "paged_decode_attention: block_tables and context_lens need one row per sequence");
}

// A bad length or block id would read outside the cache, so check the entries the kernel will use.
int64_t check_tables(const Tensor& tables, const Tensor& lens, int64_t num_blocks, int64_t block_size) {
  const int64_t B = lens.size(0), M = tables.size(1);
  const int32_t* len = lens.const_data_ptr<int32_t>();
  const int32_t* table = tables.const_data_ptr<int32_t>();
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) {
    STD_TORCH_CHECK(len[b] >= 1 && len[b] <= M * block_size, "paged_decode_attention: context_lens[", b,
                    "] = ", len[b], " is not in [1, ", M * block_size, "]");
    for (int64_t j = 0; j * block_size < len[b]; ++j)
      STD_TORCH_CHECK(table[b * M + j] >= 0 && table[b * M + j] < num_blocks,
                      "paged_decode_attention: block_tables[", b, ", ", j, "] = ", table[b * M + j],
                      " is not a block of the cache");
    max_len = std::max<int64_t>(max_len, len[b]);
  }
  return max_len;
}

Tensor paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables,
                              Tensor context_lens, double scale) {
  check_inputs(q, k_cache, v_cache, block_tables, context_lens);
  const int64_t max_len = check_tables(block_tables, context_lens, k_cache.size(0), k_cache.size(1));
  Tensor out = torch::stable::empty_like(q);
  const Problem p{q.const_data_ptr(),
                  k_cache.const_data_ptr(),
                  v_cache.const_data_ptr(),
                  out.mutable_data_ptr(),
                  block_tables.const_data_ptr<int32_t>(),
                  context_lens.const_data_ptr<int32_t>(),
                  q.size(1),
                  k_cache.size(2),
                  q.size(2),
                  k_cache.size(1),
                  block_tables.size(1),
                  q.stride(0),
                  static_cast<float>(scale)};
  const int64_t B = q.size(0);
  const bool wide = q.scalar_type() != k_cache.scalar_type();  // float32 q and out over a 16-bit cache
  switch (k_cache.scalar_type()) {
    case ScalarType::Float: run<F32>(p, B, max_len); break;
    case ScalarType::BFloat16: wide ? run<BF16, F32>(p, B, max_len) : run<BF16>(p, B, max_len); break;
    case ScalarType::Half: wide ? run<F16, F32>(p, B, max_len) : run<F16>(p, B, max_len); break;
    default: STD_TORCH_CHECK(false, "paged_decode_attention: dtype must be float32, bfloat16 or float16");
  }
  return out;
}

// q [B, H, D] bf16; k_tiles [N, Hkv, D/2, bs, 2] and v_tiles [N, Hkv, bs/2, D, 2], the cache in the tiles'
// layout (sidp/model/kv_cache.py); the rest as paged_decode_attention.
Tensor paged_decode_attention_tiles(Tensor q, Tensor k_tiles, Tensor v_tiles, Tensor block_tables,
                                    Tensor context_lens, double scale) {
  STD_TORCH_CHECK(k_tiles.dim() == 5 && v_tiles.dim() == 5 && q.dim() == 3,
                  "paged_decode_attention_tiles: expected q [B,H,D], k [N,Hkv,D/2,bs,2], v [N,Hkv,bs/2,D,2]");
  const int64_t N = k_tiles.size(0), Hkv = k_tiles.size(1), D = q.size(2), bs = k_tiles.size(3);
  STD_TORCH_CHECK(k_tiles.size(2) * 2 == D && k_tiles.size(4) == 2 && v_tiles.size(0) == N &&
                      v_tiles.size(1) == Hkv && v_tiles.size(2) * 2 == bs && v_tiles.size(3) == D &&
                      v_tiles.size(4) == 2,
                  "paged_decode_attention_tiles: cache shapes do not match q's head_dim or each other");
  STD_TORCH_CHECK(k_tiles.is_contiguous() && v_tiles.is_contiguous() && block_tables.is_contiguous() &&
                      context_lens.is_contiguous(),
                  "paged_decode_attention_tiles: caches, block_tables and context_lens must be contiguous");
  STD_TORCH_CHECK(q.scalar_type() == ScalarType::BFloat16 && k_tiles.scalar_type() == ScalarType::BFloat16 &&
                      v_tiles.scalar_type() == ScalarType::BFloat16,
                  "paged_decode_attention_tiles: q and the caches must be bfloat16");
  STD_TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == D && q.stride(0) >= q.size(1) * D,
                  "paged_decode_attention_tiles: q's heads must be contiguous within each sequence's row");
  STD_TORCH_CHECK(block_tables.scalar_type() == ScalarType::Int && context_lens.scalar_type() == ScalarType::Int &&
                      block_tables.dim() == 2 && context_lens.dim() == 1 && block_tables.size(0) == q.size(0) &&
                      context_lens.size(0) == q.size(0),
                  "paged_decode_attention_tiles: block_tables [B, M] and context_lens [B], int32");
  STD_TORCH_CHECK(Hkv > 0 && q.size(1) % Hkv == 0 && q.size(1) / Hkv <= 16 && D % 32 == 0 && bs % 16 == 0,
                  "paged_decode_attention_tiles: needs at most 16 query heads per KV head, head_dim a multiple "
                  "of 32 and block_size of 16");
  STD_TORCH_CHECK(tiles_layout_runs(),
                  "paged_decode_attention_tiles: this CPU path has no AMX tiles");
  const int64_t max_len = check_tables(block_tables, context_lens, N, bs);
  Tensor out = torch::stable::empty_like(q);
  const Problem p{q.const_data_ptr(), k_tiles.const_data_ptr(), v_tiles.const_data_ptr(), out.mutable_data_ptr(),
                  block_tables.const_data_ptr<int32_t>(), context_lens.const_data_ptr<int32_t>(), q.size(1), Hkv, D,
                  bs, block_tables.size(1), q.stride(0), static_cast<float>(scale)};
  for_each_task<TilesLayoutScratch>(p, q.size(0), max_len, [&](const Task& task, Scratch& s, TilesLayoutScratch& a) {
    attend_tiles_layout(p, task, s, a);
  });
  return out;
}

}  // namespace

SIDP_LIBRARY_FRAGMENT(SIDP_NS, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale) -> Tensor");
  m.def("paged_decode_attention_tiles(Tensor q, Tensor k_tiles, Tensor v_tiles, Tensor block_tables, "
        "Tensor context_lens, float scale) -> Tensor");
}

SIDP_LIBRARY_IMPL(SIDP_NS, CPU, m) {
  m.impl("paged_decode_attention", TORCH_BOX(&paged_decode_attention));
  m.impl("paged_decode_attention_tiles", TORCH_BOX(&paged_decode_attention_tiles));
}
