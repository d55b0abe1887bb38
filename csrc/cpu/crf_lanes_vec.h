// Vector types and math of the CRF lane kernels (crf_lanes_impl.h), written once for a vector of
// FASTNER_LANES floats and compiled once per instruction set through crf_lanes_impl.h (same
// rules: internal linkage only, no standard-library templates, included after every standard
// header the including .cpp needs).
#ifndef FASTNER_LANES
#error "define FASTNER_LANES (8 or 16) before including crf_lanes_vec.h"
#endif

namespace fastner::cpu::crf {
namespace lanes {
namespace {
constexpr int W = FASTNER_LANES;
typedef float V __attribute__((vector_size(4 * W)));
typedef int32_t I __attribute__((vector_size(4 * W)));
typedef double D __attribute__((vector_size(8 * W)));
// The low half of V's lanes (a 256-bit vector with AVX-512): what a step runs on once every lane
// of the upper half is idle (Zen 4 executes a 512-bit operation as two 256-bit halves, so a half
// vector costs half as much there).
constexpr int H = W / 2;
typedef float VH __attribute__((vector_size(4 * H)));

// Below this a step's normaliser no longer bounds the underflow loss: take the exact path.
constexpr float kSafe = 1e-20f;
constexpr float kInf = __builtin_inff();
constexpr int64_t kAlign = 4 * W;  // bytes

inline V splat(float x) { return V{} + x; }
inline V select(I mask, V a, V b) { return mask ? a : b; }
inline V vmax(V a, V b) { return a > b ? a : b; }  // maxps: NaN in a is skipped, as in the scalar scan
inline VH vmax(VH a, VH b) { return a > b ? a : b; }

// a + b computed as a * one + b by a fused multiply-add (one: 1.0f in every lane, from
// ones<U>()): the same float as a + b (a * 1 is exact, and one rounding follows), on the FMA units.
// Zen 4 runs additions and maxima on the same two pipes and FMAs on two others, so the max-plus
// steps' (add, max) pairs go twice as fast this way (512 bits: 0.27 against 0.55 ns a pair,
// measured); elsewhere FMAs and additions cost alike.
template <typename U>
inline U add_on_fma(U a, U one, U b) {
  if constexpr (sizeof(U) == 64) {
    return (U)_mm512_fmadd_ps((__m512)a, (__m512)one, (__m512)b);
  } else if constexpr (sizeof(U) == 32) {
    return (U)_mm256_fmadd_ps((__m256)a, (__m256)one, (__m256)b);
  } else {
    static_assert(sizeof(U) == 16);
    return (U)_mm_fmadd_ps((__m128)a, (__m128)one, (__m128)b);
  }
}

// x in every lane of a U, by a broadcast. (U{} + x is an addition, 0 + x, which the compiler may
// not drop since 0 + -0 is +0: a scalar add and a register broadcast per use.)
template <typename U>
inline U broadcast(const float& x) {
  if constexpr (sizeof(U) == 64) {
    return (U)_mm512_set1_ps(x);
  } else if constexpr (sizeof(U) == 32) {
    return (U)_mm256_set1_ps(x);
  } else {
    static_assert(sizeof(U) == 16);
    return (U)_mm_set1_ps(x);
  }
}

// 1.0f in every lane, opaque to the compiler: it would otherwise fold a * 1 + b back into an
// addition.
template <typename U>
inline U ones() {
  U one = U{} + 1.0f;
  __asm__("" : "+v"(one));
  return one;
}

// The low lanes of a vector (its first sizeof(U) bytes: U = V or VH from a V), and the store
// back into them.
template <typename U, typename Full>
inline U low_lanes(const Full& v) {
  static_assert(sizeof(U) <= sizeof(Full));
  U u;
  __builtin_memcpy(&u, &v, sizeof(U));
  return u;
}
template <typename U, typename Full>
inline void store_low_lanes(Full& v, U u) {
  static_assert(sizeof(U) <= sizeof(Full));
  __builtin_memcpy(&v, &u, sizeof(U));
}

inline V* aligned(float* scratch) {
  const uintptr_t p = reinterpret_cast<uintptr_t>(scratch);
  return reinterpret_cast<V*>((p + kAlign - 1) / kAlign * kAlign);
}

// exp(x) for x <= 0 or NaN (the kernels exponentiate scores minus their maximum): 0 below
// -87, NaN for NaN; otherwise the polynomial of crf_math.h's fast_exp. (Written again here
// rather than shared: crf_math.h's inline functions are compiled for AVX2 in crf.cpp, and this
// file must not share an inline function with it; see the top of the file.)
inline V vexp_nonpositive(V x) {
  const V c = x < -87.0f ? splat(-87.0f) : x;
  const V n = (c * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  V r = c - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  const V r2 = r * r;
  V p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  return x < -87.0f ? V{} : p * (V)bits;
}

// log(x) for normal positive x (the callers pass normalisers they checked to be >= kSafe;
// other lanes get an unspecified value that is selected away).
inline V vlog(V x) {
  const I bits = (I)x;
  I exponent = ((bits >> 23) & 0xff) - 126;
  V m = (V)((bits & 0x007fffff) | 0x3f000000);
  const I small = m < 0.707106781186547524f;
  exponent = small ? exponent - 1 : exponent;
  m = small ? m + m - 1.0f : m - 1.0f;
  const V e = __builtin_convertvector(exponent, V);
  const V z = m * m;
  V y = splat(7.0376836292e-2f);
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

// base[index[l]] in lane l.
inline V gather(const float* base, I index) {
#if FASTNER_LANES == 16
  return (V)_mm512_i32gather_ps((__m512i)index, base, 4);
#else
  return (V)_mm256_i32gather_ps(base, (__m256i)index, 4);
#endif
}

// Reductions over K vectors with four independent chains (a step's critical path).
inline V max_of(const V* v, int64_t K) {
  V m0 = splat(-kInf), m1 = m0, m2 = m0, m3 = m0;
  int64_t j = 0;
  for (; j + 4 <= K; j += 4) {
    m0 = vmax(v[j], m0);
    m1 = vmax(v[j + 1], m1);
    m2 = vmax(v[j + 2], m2);
    m3 = vmax(v[j + 3], m3);
  }
  for (; j < K; ++j) m0 = vmax(v[j], m0);
  return vmax(vmax(m0, m1), vmax(m2, m3));
}

inline V dot(const V* a, const V* b, int64_t K) {
  V s0{}, s1{}, s2{}, s3{};
  int64_t j = 0;
  for (; j + 4 <= K; j += 4) {
    s0 += a[j] * b[j];
    s1 += a[j + 1] * b[j + 1];
    s2 += a[j + 2] * b[j + 2];
    s3 += a[j + 3] * b[j + 3];
  }
  for (; j < K; ++j) s0 += a[j] * b[j];
  return (s0 + s1) + (s2 + s3);
}

// In-register transpose of a W x W block: in[r] holds row r, afterwards out[c] holds column c.
// A block of W tags of W sequences is W contiguous loads (or stores) plus this, against W
// gathers (or scatters), which cost ~11 (~16) cycles each on the machines measured.
#if FASTNER_LANES == 16
inline void transpose(const V* in, V* out) {
  __m512 a[16], b[16];
  for (int r = 0; r < 16; r += 2) {
    a[r] = _mm512_unpacklo_ps((__m512)in[r], (__m512)in[r + 1]);
    a[r + 1] = _mm512_unpackhi_ps((__m512)in[r], (__m512)in[r + 1]);
  }
  for (int r = 0; r < 16; r += 4) {
    for (int k = 0; k < 2; ++k) {
      const __m512d x = _mm512_castps_pd(a[r + k]), y = _mm512_castps_pd(a[r + 2 + k]);
      b[r + 2 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(x, y));
      b[r + 2 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(x, y));
    }
  }
  // b[4R + m]: 128-bit lane q holds rows 4R .. 4R + 3 of column 4q + m. Gather the lanes.
  for (int r = 0; r < 4; ++r) {
    const __m512 lo0 = _mm512_shuffle_f32x4(b[r], b[r + 4], 0x88);
    const __m512 hi0 = _mm512_shuffle_f32x4(b[r], b[r + 4], 0xdd);
    const __m512 lo1 = _mm512_shuffle_f32x4(b[r + 8], b[r + 12], 0x88);
    const __m512 hi1 = _mm512_shuffle_f32x4(b[r + 8], b[r + 12], 0xdd);
    out[r] = (V)_mm512_shuffle_f32x4(lo0, lo1, 0x88);
    out[r + 8] = (V)_mm512_shuffle_f32x4(lo0, lo1, 0xdd);
    out[r + 4] = (V)_mm512_shuffle_f32x4(hi0, hi1, 0x88);
    out[r + 12] = (V)_mm512_shuffle_f32x4(hi0, hi1, 0xdd);
  }
}
#else
inline void transpose(const V* in, V* out) {
  __m256 a[8], b[8];
  for (int r = 0; r < 8; r += 2) {
    a[r] = _mm256_unpacklo_ps((__m256)in[r], (__m256)in[r + 1]);
    a[r + 1] = _mm256_unpackhi_ps((__m256)in[r], (__m256)in[r + 1]);
  }
  for (int r = 0; r < 8; r += 4) {
    for (int k = 0; k < 2; ++k) {
      b[r + 2 * k] = _mm256_shuffle_ps(a[r + k], a[r + 2 + k], 0x44);
      b[r + 2 * k + 1] = _mm256_shuffle_ps(a[r + k], a[r + 2 + k], 0xee);
    }
  }
  for (int r = 0; r < 4; ++r) {
    out[r] = (V)_mm256_permute2f128_ps(b[r], b[r + 4], 0x20);
    out[r + 4] = (V)_mm256_permute2f128_ps(b[r], b[r + 4], 0x31);
  }
}
#endif

// Sum of the lanes in a fixed order (halving the vector), so results do not depend on threads.
inline float lane_sum(V v) {
#if FASTNER_LANES == 16
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256((__m512)v),
                                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd((__m512)v), 1)));
#else
  const __m256 half = (__m256)v;
#endif
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

}  // namespace
}  // namespace lanes
}  // namespace fastner::cpu::crf
