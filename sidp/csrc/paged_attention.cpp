// CPU decode attention that reads K/V where they sit in the paged KV cache, so a decode step never
// gathers each sequence's blocks into a padded copy. Built at first use by sidp/model/paged_attention.py.
//
// Written against PyTorch's stable C ABI (torch/csrc/stable): its headers compile in about a second,
// where <torch/extension.h> takes over twenty. The inner loops are plain C++ that gcc vectorises under
// -O3 -march=native -fopenmp-simd; keep them free of calls and branches so it still does.

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

inline float as_float(uint32_t u) { return std::bit_cast<float>(u); }
inline uint32_t as_bits(float f) { return std::bit_cast<uint32_t>(f); }

// Widen one cache row to float. Each returns a pointer to D floats: fp32 rows are used in place.
struct F32 {
  using T = float;
  static const float* row(const T* src, float* /*buf*/, int64_t /*n*/) { return src; }
  static void store(float x, T* dst) { *dst = x; }
};

struct BF16 {
  using T = uint16_t;
  // bf16 is the top half of a float, so widening is a zero-extend and a shift (vpmovzxwd + vpslld).
  static const float* row(const T* __restrict src, float* __restrict buf, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = as_float(uint32_t(src[i]) << 16);
    return buf;
  }
  static void store(float x, T* dst) { *dst = torch::headeronly::BFloat16(x).x; }  // rounds to nearest even
};

struct F16 {
  using T = uint16_t;
  // Rebias the exponent by multiplying by 2^112, which is also exact for fp16 subnormals; inf and NaN
  // take the other branch. gcc does not vectorise _Float16 -> float, hence the bit arithmetic.
  static const float* row(const T* __restrict src, float* __restrict buf, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t mag = uint32_t(src[i] & 0x7fffu) << 13;
      const uint32_t sign = uint32_t(src[i] & 0x8000u) << 16;
      const uint32_t widened = mag >= (0x7c00u << 13) ? (mag | 0x7f800000u) : as_bits(as_float(mag) * 0x1p112f);
      buf[i] = as_float(widened | sign);
    }
    return buf;
  }
  static void store(float x, T* dst) { *dst = torch::headeronly::Half(x).x; }
};

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// e^x for x <= 0 as 2^n * e^r, |r| <= ln2/2, with a degree-7 Taylor polynomial for e^r (truncation
// error < 1e-8, so within a couple of ulp of expf). libm's expf only vectorises under -ffast-math, and
// one exp per (token, head) would otherwise cost as much as the whole K pass.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);  // e^-87 is negligible next to the max term's 1, and keeps 2^n a normal float
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 in two parts: n * hi is exact
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * as_float(uint32_t(int32_t(n) + 127) << 23);
}

// Turns scores into unnormalised probabilities in place; returns their sum.
inline float softmax_numerators(float* __restrict s, int64_t n) {
  float mx = s[0];
  for (int64_t i = 1; i < n; ++i) mx = std::max(mx, s[i]);
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    s[i] = exp_nonpositive(s[i] - mx);
    sum += s[i];
  }
  return sum;
}

struct Problem {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  const int32_t* block_tables;
  const int32_t* context_lens;
  int64_t num_heads, num_kv_heads, head_dim, block_size, max_blocks;
  float scale;
};

// Per-thread buffers, sized for the longest sequence in the batch.
struct Scratch {
  std::vector<float> q, row, scores, acc, inv_sum;
  Scratch(int64_t group, int64_t head_dim, int64_t max_len)
      : q(group * head_dim), row(head_dim), scores(group * max_len), acc(group * head_dim), inv_sum(group) {}
};

// All query heads of KV head `kvh` for sequence `b`: one pass over its keys, then one over its values,
// so each cached row is read once however large the group.
template <typename L>
void attend(const Problem& p, int64_t b, int64_t kvh, Scratch& s) {
  using T = typename L::T;
  const int64_t D = p.head_dim, G = p.num_heads / p.num_kv_heads, bs = p.block_size;
  const int64_t n = p.context_lens[b];
  const int64_t row_stride = p.num_kv_heads * D;  // between consecutive tokens of one block
  const int32_t* table = p.block_tables + b * p.max_blocks;
  const int64_t first_head = b * p.num_heads + kvh * G;

  const T* q = static_cast<const T*>(p.q) + first_head * D;
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = L::row(q + g * D, s.row.data(), D);
    for (int64_t d = 0; d < D; ++d) s.q[g * D + d] = qg[d] * p.scale;
  }

  const T* k = static_cast<const T*>(p.k);
  for (int64_t start = 0; start < n; start += bs) {
    const T* block = k + (table[start / bs] * bs * p.num_kv_heads + kvh) * D;
    for (int64_t t = 0, m = std::min(bs, n - start); t < m; ++t) {
      const float* kr = L::row(block + t * row_stride, s.row.data(), D);
      for (int64_t g = 0; g < G; ++g) s.scores[g * n + start + t] = dot(s.q.data() + g * D, kr, D);
    }
  }

  for (int64_t g = 0; g < G; ++g) s.inv_sum[g] = 1.0f / softmax_numerators(s.scores.data() + g * n, n);

  std::fill(s.acc.begin(), s.acc.end(), 0.0f);
  const T* v = static_cast<const T*>(p.v);
  for (int64_t start = 0; start < n; start += bs) {
    const T* block = v + (table[start / bs] * bs * p.num_kv_heads + kvh) * D;
    for (int64_t t = 0, m = std::min(bs, n - start); t < m; ++t) {
      const float* vr = L::row(block + t * row_stride, s.row.data(), D);
      for (int64_t g = 0; g < G; ++g) {
        const float w = s.scores[g * n + start + t];
        float* __restrict acc = s.acc.data() + g * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[d] += w * vr[d];
      }
    }
  }

  T* out = static_cast<T*>(p.out) + first_head * D;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) L::store(s.acc[g * D + d] * s.inv_sum[g], out + g * D + d);
}

template <typename L>
void run(const Problem& p, int64_t batch, int64_t max_len) {
  const int64_t group = p.num_heads / p.num_kv_heads;
  // Tasks are (sequence, kv head) pairs; no exception may leave this callback (it crosses a C ABI).
  torch::stable::parallel_for(0, batch * p.num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch(group, p.head_dim, max_len);
    for (int64_t i = begin; i < end; ++i) attend<L>(p, i / p.num_kv_heads, i % p.num_kv_heads, scratch);
  });
}

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& tables, const Tensor& lens) {
  STD_TORCH_CHECK(q.is_cpu() && k.is_cpu() && v.is_cpu() && tables.is_cpu() && lens.is_cpu(),
                  "paged_decode_attention: all tensors must be on the CPU");
  STD_TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.dim() == 4 && tables.dim() == 2 && lens.dim() == 1,
                  "paged_decode_attention: expected q [B,H,D], caches [N,bs,Hkv,D], block_tables [B,M], "
                  "context_lens [B]");
  STD_TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && tables.is_contiguous() &&
                      lens.is_contiguous(),
                  "paged_decode_attention: all tensors must be contiguous");
  STD_TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                  "paged_decode_attention: q, k_cache and v_cache must share a dtype");
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

Tensor paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens,
                              double scale) {
  check_inputs(q, k_cache, v_cache, block_tables, context_lens);
  const int64_t max_len = check_tables(block_tables, context_lens, k_cache.size(0), k_cache.size(1));
  Tensor out = torch::stable::empty_like(q);
  const Problem p{q.const_data_ptr(), k_cache.const_data_ptr(), v_cache.const_data_ptr(), out.mutable_data_ptr(),
                  block_tables.const_data_ptr<int32_t>(), context_lens.const_data_ptr<int32_t>(),
                  q.size(1), k_cache.size(2), q.size(2), k_cache.size(1), block_tables.size(1),
                  static_cast<float>(scale)};
  switch (q.scalar_type()) {
    case ScalarType::Float: run<F32>(p, q.size(0), max_len); break;
    case ScalarType::BFloat16: run<BF16>(p, q.size(0), max_len); break;
    case ScalarType::Half: run<F16>(p, q.size(0), max_len); break;
    default: STD_TORCH_CHECK(false, "paged_decode_attention: dtype must be float32, bfloat16 or float16");
  }
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(sidp, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(sidp, CPU, m) {
  m.impl("paged_decode_attention", TORCH_BOX(&paged_decode_attention));
}
