// e^x for x <= 0, shared by the kernels: for a float, or a GCC vector of floats. It is 2^n * e^r with
// |r| <= ln2/2 and a degree-7 Taylor polynomial for e^r (truncation error < 1e-8, so within a couple of
// ulp of expf); libm's expf only vectorises under -ffast-math. Below -87 the result would leave float's
// normal range; it is returned as 0, which padding relies on. No branch, so that loops calling it
// vectorise. `pow2` turns n (a float holding an integer) into 2^n, for the same V.
#pragma once

template <typename V, typename Pow2>
inline V exp_of_nonpositive(V x, Pow2 pow2) {
  const V low = V{} - 87.0f;
  const V y = x < low ? low : x;
  const V n = (y * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // 1.5 * 2^23 rounds to integer
  const V r = (y - n * 0.693359375f) + n * 2.12194440e-4f;            // ln2 in two parts: n * hi is exact
  V p = V{} + 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return x < low ? V{} : p * pow2(n);
}
