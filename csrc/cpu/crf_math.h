// Elementwise math for the per-sequence CRF kernels (csrc/cpu/crf_sequence.h), written branch-free so that loops
// calling it under `#pragma omp simd` vectorise (AVX2 with -march=x86-64-v3).
//
// Why not std::exp / std::log: without -ffast-math gcc cannot vectorise them (glibc declares its
// SIMD variants only under __FAST_MATH__), and -ffast-math would also assume no infinities, which
// the kernels rely on (-inf transitions forbid paths). float gets Cephes-style polynomials
// (about 1 ulp); double keeps the libm functions (it is the precision path, not the fast one).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace fastner::cpu::crf {

template <typename scalar_t>
inline scalar_t neg_inf() {
  return -std::numeric_limits<scalar_t>::infinity();
}

inline float bits_to_float(int32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline int32_t float_to_bits(float value) {
  int32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

// exp(x) for any float x: 0 below -87 (where the result would be denormal; the kernels only add
// such terms to sums dominated by larger ones), +inf above 88.7, exact 1 at 0.
inline float fast_exp(float x) {
  const float clamped = x < -87.0f ? -87.0f : (x > 88.5f ? 88.5f : x);
  // Round to nearest by the 1.5 * 2^23 trick (vectorises, unlike nearbyint without fast-math).
  const float shifter = 12582912.0f;
  const float n = (clamped * 1.44269504088896341f + shifter) - shifter;
  float r = clamped - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const float scale = bits_to_float((static_cast<int32_t>(n) + 127) << 23);
  const float y = p * scale;
  return x < -87.0f ? 0.0f : (x > 88.7f ? std::numeric_limits<float>::infinity() : y);
}

// log(x) for normal positive x (the kernels call it only on sums they have checked to be at
// least crf_tiny<float>(); other inputs give an unspecified finite value, never a trap).
inline float fast_log(float x) {
  const int32_t bits = float_to_bits(x);
  int32_t exponent = ((bits >> 23) & 0xff) - 126;
  float m = bits_to_float((bits & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  exponent = small ? exponent - 1 : exponent;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float e = static_cast<float>(exponent);
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  return (m + y) + e * 0.693359375f;
}

inline double fast_exp(double x) { return std::exp(x); }
inline double fast_log(double x) { return std::log(x); }

// Below this a scaled sum has lost (or may lose) precision to underflow: the kernels recompute
// such entries by an exact log-sum-exp from the log-space values.
template <typename scalar_t>
constexpr scalar_t crf_tiny();
template <>
constexpr float crf_tiny<float>() {
  return 1e-30f;
}
template <>
constexpr double crf_tiny<double>() {
  return 1e-290;
}

// A scaled normaliser at least this large keeps the fast path's relative error at rounding level
// even after the rows below crf_tiny are left out of it.
template <typename scalar_t>
constexpr scalar_t crf_safe();
template <>
constexpr float crf_safe<float>() {
  return 1e-20f;
}
template <>
constexpr double crf_safe<double>() {
  return 1e-200;
}

}  // namespace fastner::cpu::crf

// ---- vectors ----------------------------------------------------------------------------------
// GCC vector extensions: one 256-bit register of scalar_t (8 floats or 4 doubles), with an
// integer vector of the same lane count for masks. The kernels pad K to a multiple of 8 so that
// every row is a whole number of vectors for both types.
namespace fastner::cpu::crf {

template <typename scalar_t>
struct Simd;

template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
  static constexpr int N = 8;
};

template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(32)));
  typedef int64_t I __attribute__((vector_size(32)));
  static constexpr int N = 4;
};

template <typename V, typename scalar_t>
inline V load(const scalar_t* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename V, typename scalar_t>
inline void store(scalar_t* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

template <typename V, typename scalar_t>
inline V splat(scalar_t x) {
  return V{} + x;
}

template <typename V>
inline V vmax(V a, V b) {
  return a > b ? a : b;
}

template <typename V>
inline auto hmax(V v) -> std::remove_reference_t<decltype(v[0])> {
  auto m = v[0];
  for (unsigned n = 1; n < sizeof v / sizeof v[0]; ++n) m = v[n] > m ? v[n] : m;
  return m;
}

template <typename V>
inline auto hsum(V v) -> std::remove_reference_t<decltype(v[0])> {
  auto s = v[0];
  for (unsigned n = 1; n < sizeof v / sizeof v[0]; ++n) s += v[n];
  return s;
}

// fast_exp / fast_log on a whole vector (same contracts as the scalar versions above).
inline Simd<float>::V exp_v(Simd<float>::V x) {
  using V = Simd<float>::V;
  using I = Simd<float>::I;
  const V lo = splat<V>(-87.0f), hi = splat<V>(88.5f);
  V c = x < lo ? lo : x;
  c = c > hi ? hi : c;
  const V shifter = splat<V>(12582912.0f);
  const V n = (c * 1.44269504088896341f + shifter) - shifter;
  V r = c - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  const V r2 = r * r;
  V p = splat<V>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  V y = p * (V)bits;
  y = x < lo ? V{} : y;
  y = x > 88.7f ? splat<V>(std::numeric_limits<float>::infinity()) : y;
  return y;
}

inline Simd<float>::V log_v(Simd<float>::V x) {
  using V = Simd<float>::V;
  using I = Simd<float>::I;
  const I bits = (I)x;
  I exponent = ((bits >> 23) & 0xff) - 126;
  const I mbits = (bits & 0x007fffff) | 0x3f000000;
  V m = (V)mbits;
  const auto small = m < 0.707106781186547524f;
  exponent = small ? exponent - 1 : exponent;
  m = small ? m + m - 1.0f : m - 1.0f;
  const V e = __builtin_convertvector(exponent, V);
  const V z = m * m;
  V y = splat<V>(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  return (m + y) + e * 0.693359375f;
}

inline Simd<double>::V exp_v(Simd<double>::V x) {
  Simd<double>::V y;
  for (int n = 0; n < 4; ++n) y[n] = std::exp(x[n]);
  return y;
}

inline Simd<double>::V log_v(Simd<double>::V x) {
  Simd<double>::V y;
  for (int n = 0; n < 4; ++n) y[n] = std::log(x[n]);
  return y;
}

}  // namespace fastner::cpu::crf
