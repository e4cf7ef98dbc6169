// The elementwise parts of a decoder layer, one pass over memory each instead of PyTorch's op-by-op
// chain (a new tensor, and a dispatch, per op): RMSNorm with the residual add before it, SiLU-and-multiply,
// rotary embedding in place, and the KV cache write. Each rounds to the tensor's dtype where the
// op-by-op reference (sidp/model/fused.py) rounds, so the results are that reference's bits up to the
// order of one sum (RMSNorm's mean) and a last-bit difference in exp (SiLU).

#include "exp_nonpositive.h"
#include "library.h"

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

inline float as_float(uint32_t u) { return std::bit_cast<float>(u); }
inline uint32_t as_bits(float f) { return std::bit_cast<uint32_t>(f); }

// Element types: load() widens one element to float, round() narrows one float back.
struct F32 {
  using T = float;
  static float load(T x) { return x; }
  static T round(float x) { return x; }
};
struct BF16 {
  using T = uint16_t;
  static float load(T x) { return as_float(uint32_t(x) << 16); }
  static T round(float x) {  // to nearest even, NaN kept quiet: what PyTorch's bfloat16 conversion does
    const uint32_t u = as_bits(x);
    return x != x ? T(0x7fc0) : T((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
};
struct F16 {
  using T = uint16_t;
  static float load(T x) { return float(std::bit_cast<_Float16>(x)); }
  static T round(float x) { return std::bit_cast<T>(_Float16(x)); }
};

// Runs f(L) with the element type of `dtype`.
template <typename F>
void by_dtype(ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case ScalarType::Float: f(F32{}); break;
    case ScalarType::BFloat16: f(BF16{}); break;
    case ScalarType::Half: f(F16{}); break;
    default: STD_TORCH_CHECK(false, op, ": dtype must be float32, bfloat16 or float16");
  }
}

// Rows of the last dimension, for a tensor of 2 or 3 dimensions whose last one is contiguous: row r of
// a 3-D [A, B, W] tensor sits at (r / B) * stride(0) + (r % B) * stride(1).
struct Rows {
  char* base;
  int64_t count, inner, outer_stride, inner_stride, width;
  Rows(const Tensor& t, const char* op) {
    STD_TORCH_CHECK(t.is_cpu(), op, ": tensors must be on the CPU");
    STD_TORCH_CHECK(t.dim() == 2 || t.dim() == 3, op, ": expected a 2-D or 3-D tensor");
    STD_TORCH_CHECK(t.stride(t.dim() - 1) == 1, op, ": the last dimension must be contiguous");
    base = static_cast<char*>(const_cast<void*>(t.const_data_ptr()));
    width = t.size(t.dim() - 1);
    inner = t.dim() == 3 ? t.size(1) : 1;
    count = t.size(0) * inner;
    outer_stride = t.stride(0);
    inner_stride = t.dim() == 3 ? t.stride(1) : 0;
  }
  template <typename T>
  T* row(int64_t r) const {
    return reinterpret_cast<T*>(base) + (r / inner) * outer_stride + (r % inner) * inner_stride;
  }
};

// Rows are split among threads only when there are enough of them to pay for waking the threads.
template <typename F>
void for_rows(int64_t rows, int64_t width, F&& f) {
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(width, 1));
  torch::stable::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) f(r);
  });
}

// out = weight * round(x * rsqrt(mean(x^2) + eps)), the normalisation in float32 (transformers' order).
template <typename L>
void norm_row(const typename L::T* x, const typename L::T* w, typename L::T* out, int64_t n, float eps) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += L::load(x[i]) * L::load(x[i]);
  const float inv = 1.0f / std::sqrt(sum / float(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = L::round(L::load(w[i]) * L::load(L::round(L::load(x[i]) * inv)));
}

void check_norm(const Tensor& x, const Tensor& weight, const char* op) {
  STD_TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == x.size(x.dim() - 1), op,
                  ": weight must be a contiguous vector as wide as x's rows");
  STD_TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": x and weight must share a dtype");
}

// RMSNorm of each row of x (2-D or 3-D, rows contiguous) into a new contiguous tensor.
Tensor rms_norm(Tensor x, Tensor weight, double eps) {
  const Rows in(x, "rms_norm");
  check_norm(x, weight, "rms_norm");
  Tensor out = torch::stable::new_empty(x, x.sizes());
  const Rows o(out, "rms_norm");
  by_dtype(x.scalar_type(), "rms_norm", [&](auto l) {
    using L = decltype(l);
    using T = typename L::T;
    const T* w = static_cast<const T*>(weight.const_data_ptr());
    for_rows(in.count, in.width,
             [&](int64_t r) { norm_row<L>(in.row<T>(r), w, o.row<T>(r), in.width, float(eps)); });
  });
  return out;
}

// residual += delta (rounded, as a separate add would), then returns RMSNorm(residual).
Tensor add_rms_norm_(Tensor residual, Tensor delta, Tensor weight, double eps) {
  STD_TORCH_CHECK(residual.dim() == 2 && residual.is_contiguous(), "add_rms_norm_: residual must be a "
                  "contiguous [rows, hidden] tensor");
  const Rows res(residual, "add_rms_norm_"), d(delta, "add_rms_norm_");
  STD_TORCH_CHECK(delta.scalar_type() == residual.scalar_type() && d.count == res.count && d.width == res.width,
                  "add_rms_norm_: delta must have residual's shape and dtype");
  check_norm(residual, weight, "add_rms_norm_");
  Tensor out = torch::stable::empty_like(residual);
  const Rows o(out, "add_rms_norm_");
  by_dtype(residual.scalar_type(), "add_rms_norm_", [&](auto l) {
    using L = decltype(l);
    using T = typename L::T;
    const T* w = static_cast<const T*>(weight.const_data_ptr());
    for_rows(res.count, res.width, [&](int64_t r) {
      T* h = res.row<T>(r);
      const T* e = d.row<T>(r);
#pragma omp simd
      for (int64_t i = 0; i < res.width; ++i) h[i] = L::round(L::load(h[i]) + L::load(e[i]));
      norm_row<L>(h, w, o.row<T>(r), res.width, float(eps));
    });
  });
  return out;
}

inline float exp_nonpositive(float x) {
  return exp_of_nonpositive(x, [](float n) { return as_float(uint32_t(int32_t(n) + 127) << 23); });
}

// silu(g) = g / (1 + e^-g), written with e^-|g| so that the exponential never overflows.
inline float silu(float g) {
  const float e = exp_nonpositive(-std::fabs(g));
  return (g >= 0.0f ? g : g * e) / (1.0f + e);
}

// [rows, 2F] (gate then up, as the fused projection returns them) -> round(round(silu(gate)) * up).
Tensor silu_and_mul(Tensor gate_up) {
  const Rows in(gate_up, "silu_and_mul");
  STD_TORCH_CHECK(gate_up.dim() == 2 && in.width % 2 == 0, "silu_and_mul: expected [rows, 2 * ffn]");
  const int64_t F = in.width / 2;
  Tensor out = torch::stable::new_empty(gate_up, {gate_up.size(0), F});
  const Rows o(out, "silu_and_mul");
  by_dtype(gate_up.scalar_type(), "silu_and_mul", [&](auto l) {
    using L = decltype(l);
    using T = typename L::T;
    for_rows(in.count, in.width, [&](int64_t r) {
      const T* g = in.row<T>(r);
      T* y = o.row<T>(r);
#pragma omp simd
      for (int64_t i = 0; i < F; ++i) y[i] = L::round(L::load(L::round(silu(L::load(g[i])))) * L::load(g[F + i]));
    });
  });
  return out;
}

// x = x * cos + rotate_half(x) * sin in place, for every head of every token; cos and sin [tokens, D].
template <typename L>
void rotate(const Rows& x, const Rows& cos, const Rows& sin) {
  using T = typename L::T;
  const int64_t half = x.width / 2;
  for_rows(x.count, x.width, [&](int64_t r) {
    T* v = x.row<T>(r);
    const int64_t token = r / x.inner;
    const T* c = cos.row<T>(token);
    const T* s = sin.row<T>(token);
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float a = L::load(v[i]), b = L::load(v[half + i]);
      const float lo = L::load(L::round(a * L::load(c[i]))) + L::load(L::round(-b * L::load(s[i])));
      const float hi = L::load(L::round(b * L::load(c[half + i]))) + L::load(L::round(a * L::load(s[half + i])));
      v[i] = L::round(lo);
      v[half + i] = L::round(hi);
    }
  });
}

void rotary_(Tensor q, Tensor k, Tensor cos, Tensor sin) {
  const Rows rq(q, "rotary_"), rk(k, "rotary_"), c(cos, "rotary_"), s(sin, "rotary_");
  STD_TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && cos.dim() == 2 && sin.dim() == 2,
                  "rotary_: expected q [T, H, D], k [T, Hkv, D], cos and sin [T, D]");
  STD_TORCH_CHECK(k.size(0) == q.size(0) && cos.size(0) == q.size(0) && sin.size(0) == q.size(0) &&
                      rk.width == rq.width && c.width == rq.width && s.width == rq.width && rq.width % 2 == 0,
                  "rotary_: q, k, cos and sin disagree on tokens or head_dim");
  const ScalarType dtype = q.scalar_type();
  STD_TORCH_CHECK(k.scalar_type() == dtype && cos.scalar_type() == dtype && sin.scalar_type() == dtype,
                  "rotary_: q, k, cos and sin must share a dtype");
  by_dtype(dtype, "rotary_", [&](auto l) {
    using L = decltype(l);
    rotate<L>(rq, c, s);
    rotate<L>(rk, c, s);
  });
}

template <typename S, typename C>
void copy_row(const typename S::T* from, typename C::T* to, int64_t n) {
  if constexpr (std::is_same_v<S, C>) {
    std::memcpy(to, from, n * sizeof(*to));
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) to[i] = C::round(S::load(from[i]));
  }
}

// What both cache writes require of k and v ([tokens, Hkv, D] rows of one dtype), the caches (one dtype)
// and slots (one per token, each among the cache's `total`).
void check_write(const Rows& rk, const Rows& rv, const Tensor& k, const Tensor& v, const Tensor& slots,
                 int64_t heads, int64_t D, int64_t total, const Tensor& k_cache, const Tensor& v_cache,
                 const char* op) {
  STD_TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.size(1) == heads && v.size(1) == heads && rk.width == D &&
                      rv.width == D && k.size(0) == slots.size(0) && v.size(0) == slots.size(0),
                  op, ": k and v must be [tokens, Hkv, D] with one slot per token");
  STD_TORCH_CHECK(v.scalar_type() == k.scalar_type() && v_cache.scalar_type() == k_cache.scalar_type(), op,
                  ": k and v must share a dtype, and so must the caches");
  const int64_t* slot = slots.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < slots.size(0); ++t)
    STD_TORCH_CHECK(slot[t] >= 0 && slot[t] < total, op, ": slot ", slot[t], " is outside the cache");
}

// k_cache, v_cache [blocks, block_size, Hkv, D]: token t's K/V rows go to flat slot slots[t].
void cache_write_(Tensor k_cache, Tensor v_cache, Tensor slots, Tensor k, Tensor v) {
  STD_TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4 &&
                      v_cache.dim() == 4 && slots.is_contiguous() && slots.scalar_type() == ScalarType::Long,
                  "cache_write_: caches must be contiguous [blocks, block_size, Hkv, D], slots int64");
  const Rows rk(k, "cache_write_"), rv(v, "cache_write_");
  const int64_t heads = k_cache.size(2), D = k_cache.size(3);
  check_write(rk, rv, k, v, slots, heads, D, k_cache.size(0) * k_cache.size(1), k_cache, v_cache, "cache_write_");
  const int64_t* slot = slots.const_data_ptr<int64_t>();
  // K/V may come wider than the cache stores them (float32 activations, bf16 cache): narrowed on the way.
  by_dtype(k.scalar_type(), "cache_write_", [&](auto from) {
    by_dtype(k_cache.scalar_type(), "cache_write_", [&](auto to) {
      using S = decltype(from);
      using C = decltype(to);
      auto* kc = static_cast<typename C::T*>(k_cache.mutable_data_ptr());
      auto* vc = static_cast<typename C::T*>(v_cache.mutable_data_ptr());
      for_rows(rk.count, D, [&](int64_t r) {  // r = token * heads + head
        const int64_t at = (slot[r / heads] * heads + r % heads) * D;
        copy_row<S, C>(rk.row<typename S::T>(r), kc + at, D);
        copy_row<S, C>(rv.row<typename S::T>(r), vc + at, D);
      });
    });
  });
}

// Tokens t (even) and t + 1 of one KV head into the tiles layout: for keys, each pair of dims of both
// tokens as 8 bytes; for values, the two rows interleaved (a0 b0 a1 b1 ...), 32 dims at a time.
inline void write_token_pair(uint16_t* keys, uint16_t* values, const uint16_t* ka, const uint16_t* kb,
                             const uint16_t* va, const uint16_t* vb, int64_t D, int64_t bs) {
  for (int64_t i = 0; i < D / 2; ++i) {
    uint16_t four[4] = {ka[2 * i], ka[2 * i + 1], kb[2 * i], kb[2 * i + 1]};
    std::memcpy(keys + i * bs * 2, four, 8);
  }
  typedef uint16_t u16x32 __attribute__((vector_size(64)));
  for (int64_t c = 0; c < D; c += 32) {
    u16x32 a, b;
    std::memcpy(&a, va + c, 64);
    std::memcpy(&b, vb + c, 64);
    const u16x32 low = __builtin_shufflevector(a, b, 0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39, 8,
                                               40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47);
    const u16x32 high = __builtin_shufflevector(a, b, 16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23,
                                                55, 24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63);
    std::memcpy(values + c * 2, &low, 64);
    std::memcpy(values + c * 2 + 32, &high, 64);
  }
}

// k_tiles [blocks, Hkv, D/2, block_size, 2] and v_tiles [blocks, Hkv, block_size/2, D, 2], the layout AMX
// tiles read (sidp/model/kv_cache.py): token t's K/V rows go to flat slot slots[t], each element where that
// layout keeps it.
void cache_write_tiles_(Tensor k_tiles, Tensor v_tiles, Tensor slots, Tensor k, Tensor v) {
  STD_TORCH_CHECK(k_tiles.is_contiguous() && v_tiles.is_contiguous() && k_tiles.dim() == 5 && v_tiles.dim() == 5 &&
                      slots.is_contiguous() && slots.scalar_type() == ScalarType::Long,
                  "cache_write_tiles_: caches must be contiguous [N, Hkv, D/2, bs, 2] and [N, Hkv, bs/2, D, 2], "
                  "slots int64");
  const int64_t heads = k_tiles.size(1), D = k_tiles.size(2) * 2, bs = k_tiles.size(3);
  STD_TORCH_CHECK(k_tiles.size(4) == 2 && v_tiles.size(0) == k_tiles.size(0) && v_tiles.size(1) == heads &&
                      v_tiles.size(2) * 2 == bs && v_tiles.size(3) == D && v_tiles.size(4) == 2,
                  "cache_write_tiles_: the two caches' shapes disagree");
  const Rows rk(k, "cache_write_tiles_"), rv(v, "cache_write_tiles_");
  check_write(rk, rv, k, v, slots, heads, D, k_tiles.size(0) * bs, k_tiles, v_tiles, "cache_write_tiles_");
  const int64_t* slot = slots.const_data_ptr<int64_t>();
  const bool same = k.scalar_type() == k_tiles.scalar_type() && k_tiles.element_size() == 2;
  by_dtype(k.scalar_type(), "cache_write_tiles_", [&](auto from) {
    by_dtype(k_tiles.scalar_type(), "cache_write_tiles_", [&](auto to) {
      using S = decltype(from);
      using C = decltype(to);
      auto* kc = static_cast<typename C::T*>(k_tiles.mutable_data_ptr());
      auto* vc = static_cast<typename C::T*>(v_tiles.mutable_data_ptr());
      const int64_t tokens = slots.size(0);
      // Two tokens of one pair (an even slot and the next) arrive together in a prefill: their keys are
      // then stored 8 bytes at a time and their values as whole interleaved rows. A pair is written by
      // the thread that has its first token.
      auto pairs_with_next = [&](int64_t i) {
        return same && slot[i] % 2 == 0 && i + 1 < tokens && slot[i + 1] == slot[i] + 1;
      };
      for_rows(tokens, heads * D, [&](int64_t i) {
        if (same && slot[i] % 2 == 1 && i > 0 && pairs_with_next(i - 1)) return;
        const int64_t t = slot[i] % bs, block = slot[i] / bs;
        for (int64_t h = 0; h < heads; ++h) {
          const int64_t stretch = (block * heads + h) * bs * D, r = i * heads + h;
          typename C::T* keys = kc + stretch + t * 2;  // dims d and d + 1 together, rows bs * 2 apart
          typename C::T* values = vc + stretch + t / 2 * D * 2 + t % 2;  // every other element
          const typename S::T* kr = rk.row<typename S::T>(r);
          const typename S::T* vr = rv.row<typename S::T>(r);
          if constexpr (std::is_same_v<S, C> && sizeof(typename C::T) == 2) {
            if (pairs_with_next(i)) {
              write_token_pair(keys, values, kr, rk.row<typename S::T>(r + heads), vr,
                               rv.row<typename S::T>(r + heads), D, bs);
              continue;
            }
          }
          for (int64_t d = 0; d < D; ++d) {
            keys[d / 2 * bs * 2 + d % 2] = C::round(S::load(kr[d]));
            values[d * 2] = C::round(S::load(vr[d]));
          }
        }
      });
    });
  });
}

// The first index of each row's largest value (of its first NaN, if it has one): what torch.max(dim=-1)
// returns, over 2-D logits in their own dtype, so greedy sampling needs no float32 copy of them.
template <typename L>
int64_t argmax_row(const typename L::T* x, int64_t n) {
  // One running maximum per lane: gcc does not vectorise a max reduction without -ffast-math.
  constexpr int64_t kLanes = 16;
  float lane_top[kLanes];
  int lane_nans[kLanes] = {};
  std::fill(lane_top, lane_top + kLanes, -INFINITY);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      const float v = L::load(x[i + j]);
      lane_top[j] = v > lane_top[j] ? v : lane_top[j];
      lane_nans[j] += v != v;
    }
  }
  float top = -INFINITY;
  int nans = 0;
  for (; i < n; ++i) {
    const float v = L::load(x[i]);
    top = v > top ? v : top;
    nans += v != v;
  }
  for (int64_t j = 0; j < kLanes; ++j) {
    top = lane_top[j] > top ? lane_top[j] : top;
    nans += lane_nans[j];
  }
  if (nans) {
    for (i = 0; i < n; ++i)
      if (L::load(x[i]) != L::load(x[i])) return i;
  }
  constexpr int64_t kChunk = 64;  // find the chunk that holds it with vector compares, then the index
  for (i = 0; i + kChunk <= n; i += kChunk) {
    int found = 0;
#pragma omp simd reduction(+ : found)
    for (int64_t j = i; j < i + kChunk; ++j) found += L::load(x[j]) == top;
    if (found) break;
  }
  for (; i < n; ++i)
    if (L::load(x[i]) == top) return i;
  return 0;  // not reached: some value equals top
}

Tensor greedy_argmax(Tensor logits) {
  STD_TORCH_CHECK(logits.is_cpu() && logits.dim() == 2 && logits.is_contiguous() && logits.size(1) > 0,
                  "greedy_argmax: expected contiguous 2-D logits on the CPU");
  const int64_t rows = logits.size(0), width = logits.size(1);
  Tensor out = torch::stable::new_empty(logits, {rows}, ScalarType::Long);
  int64_t* index = out.mutable_data_ptr<int64_t>();
  by_dtype(logits.scalar_type(), "greedy_argmax", [&](auto l) {
    using L = decltype(l);
    const auto* x = static_cast<const typename L::T*>(logits.const_data_ptr());
    for_rows(rows, width, [&](int64_t r) { index[r] = argmax_row<L>(x + r * width, width); });
  });
  return out;
}

}  // namespace

SIDP_LIBRARY_FRAGMENT(SIDP_NS, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm_(Tensor(a!) residual, Tensor delta, Tensor weight, float eps) -> Tensor");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
  m.def("rotary_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin) -> ()");
  m.def("cache_write_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, Tensor k, Tensor v) -> ()");
  m.def("cache_write_tiles_(Tensor(a!) k_tiles, Tensor(b!) v_tiles, Tensor slots, Tensor k, Tensor v) -> ()");
  m.def("greedy_argmax(Tensor logits) -> Tensor");
}

SIDP_LIBRARY_IMPL(SIDP_NS, CPU, m) {
  m.impl("rms_norm", TORCH_BOX(&rms_norm));
  m.impl("add_rms_norm_", TORCH_BOX(&add_rms_norm_));
  m.impl("silu_and_mul", TORCH_BOX(&silu_and_mul));
  m.impl("rotary_", TORCH_BOX(&rotary_));
  m.impl("cache_write_", TORCH_BOX(&cache_write_));
  m.impl("cache_write_tiles_", TORCH_BOX(&cache_write_tiles_));
  m.impl("greedy_argmax", TORCH_BOX(&greedy_argmax));
}
