// Elementwise math for the recurrent cells: sigmoid and tanh over a "pack" of values, so the
// cell code is written once for 16 floats (AVX-512), 8 floats (AVX2) and one scalar (tails,
// float64).
//
// Why hand-written: the cells evaluate ~(G*H) transcendental functions per sequence and step;
// scalar std::exp costs ~5-10 ns each, which at the tagger shape would cost more than all the
// GEMMs. The vector versions below (a rational tanh, sigmoid from it; absolute errors <= 2.5e-7)
// run 8 or 16 at a time.
//
// AVX-512: the extension is built for x86-64-v3 (AVX2), so Avx512Pack is compiled under a
// `#pragma GCC target` region and only used by code that checked cpu_has_avx512() at run time
// (see rnn_cells.inc for how the cell passes are compiled once per instruction set).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "cpu/cpu_isa.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FASTNER_RNN_AVX2 1
// GCC's target pragma lets one translation unit hold AVX-512 code next to the AVX2 build.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTNER_RNN_AVX512 1
#endif
#endif

namespace fastner::cpu::rnn {

// One value of type T: the scalar path (float64 everywhere, float32 tails).
template <typename T>
struct ScalarPack {
  using V = T;
  static constexpr int64_t width = 1;
  static V load(const T* p) { return *p; }
  static void store(T* p, V v) { *p = v; }
  static V set1(T x) { return x; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V fma(V a, V b, V c) { return a * b + c; }  // a * b + c
  static V sigmoid(V x) { return T(1) / (T(1) + std::exp(-x)); }
  static V tanh(V x) { return std::tanh(x); }
  static V relu(V x) { return x <= T(0) ? T(0) : x; }  // NaN stays NaN (as torch.relu)
  static V relu_mask(V h, V g) { return h > T(0) ? g : T(0); }  // g where h > 0, else 0
};

// tanh by a rational minimax form of degree 13/6 on [-kTanhLimit, kTanhLimit] (the form Eigen's
// float tanh uses), +-1 beyond: tanh(y) = y p(y^2) / q(y^2), absolute error <= 2.5e-7, the exp
// form's order. Both vector packs evaluate it with these coefficients in this order (Horner,
// one FMA a step, one division), so their tanh and sigmoid agree bit for bit.
constexpr float kTanhLimit = 7.90531110763549805f;
constexpr float kTanhP[7] = {-2.76076847742355e-16f, 2.00018790482477e-13f, -8.60467152213735e-11f,
                             5.12229709037114e-08f,  1.48572235717979e-05f, 6.37261928875436e-04f,
                             4.89352455891786e-03f};
constexpr float kTanhQ[4] = {1.19825839466702e-06f, 1.18534705686654e-04f, 2.26843463243900e-03f,
                             4.89352518554385e-03f};

#ifdef FASTNER_RNN_AVX2
// Eight floats.
struct Avx2Pack {
  using V = __m256;
  static constexpr int64_t width = 8;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }

  // tanh: the rational form above. 16 vector operations and one division, where 1 - 2 /
  // (exp(2x) + 1) took ~23 with its reciprocal. The LSTM cell pass (3 sigmoids, 2 tanh an
  // element) alone, rows of H = 200 in a loop: 780 -> 576 ns a row; inside the layer much less,
  // the pass being bound by its dependency chain (gates -> c -> tanh(c) -> h) more than by its
  // operations: paired in-process A/B, 25 rounds, thread CPU, medians of the paired ratios 1.010
  // (fp32 BiLSTM `lengths=`, B=32, T<=40), 1.011 / 1.033 (int8 tagger predict, random / bucketed
  // batches); AMD Zen 3, 1 thread, 2026-12-07.
  // NaN stays NaN: min / max return their second operand when either is NaN, and the
  // saturation test is false for it.
  static V tanh(V x) {
    const V limit = _mm256_set1_ps(kTanhLimit);
    const V sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0f));
    const V saturated = _mm256_cmp_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), x), limit, _CMP_GE_OQ);
    const V y = _mm256_min_ps(limit, _mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), limit), x));
    const V y2 = _mm256_mul_ps(y, y);
    V p = _mm256_set1_ps(kTanhP[0]);
    for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(y2, p, _mm256_set1_ps(kTanhP[i]));
    p = _mm256_mul_ps(y, p);
    V q = _mm256_set1_ps(kTanhQ[0]);
    for (int i = 1; i < 4; ++i) q = _mm256_fmadd_ps(y2, q, _mm256_set1_ps(kTanhQ[i]));
    return _mm256_blendv_ps(_mm256_div_ps(p, q), _mm256_or_ps(sign, _mm256_set1_ps(1.0f)), saturated);
  }
  // sigmoid(x) = 1/2 + tanh(x / 2) / 2: absolute error <= 1.3e-7, exactly 0 / 1 past |x| 15.8.
  static V sigmoid(V x) {
    const V half = _mm256_set1_ps(0.5f);
    return _mm256_fmadd_ps(half, tanh(_mm256_mul_ps(half, x)), half);
  }
  static V relu(V x) { return _mm256_max_ps(_mm256_setzero_ps(), x); }  // NaN stays NaN (x second)
  static V relu_mask(V h, V g) {
    return _mm256_and_ps(_mm256_cmp_ps(h, _mm256_setzero_ps(), _CMP_GT_OQ), g);
  }
};
#endif

#ifdef FASTNER_RNN_AVX512
#pragma GCC push_options
#pragma GCC diagnostic push
// GCC 12 reports its own _mm512_undefined_ps() idiom as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f")
// Sixteen floats: Avx2Pack's arithmetic, operation for operation (its tanh and sigmoid), so the
// cell passes agree bit for bit on AVX2 and AVX-512 CPUs (tests/ops/rnn/test_rnn_int8.py: an
// int8 layer's outputs equal on every kernel set). Until 2026-12-07 this pack kept Cephes' exp
// polynomial (sigmoid = 1 / (1 + exp(-x)), tanh = 1 - 2 / (exp(2x) + 1), 1/x by rcp14 and a
// Newton step). The LSTM cell math alone, 465 rows of H = 192 in a loop, old and new alternated
// in one process (60 pairs): 140 -> 118 us, paired median 1.19x, Intel Emerald Rapids, 1 thread;
// in the layer, where the pass is about a sixth of an int8 LSTM's time, the change was within
// the host's run-to-run swings.
struct Avx512Pack {
  using V = __m512;
  static constexpr int64_t width = 16;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }

  // tanh: Avx2Pack::tanh on 16 lanes (the rational form above). NaN stays NaN (x goes second
  // to min / max, and the saturation test is false for it).
  static V tanh(V x) {
    const V limit = _mm512_set1_ps(kTanhLimit);
    const __mmask16 saturated = _mm512_cmp_ps_mask(_mm512_abs_ps(x), limit, _CMP_GE_OQ);
    const V y = _mm512_min_ps(limit, _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), limit), x));
    const V y2 = _mm512_mul_ps(y, y);
    V p = _mm512_set1_ps(kTanhP[0]);
    for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(y2, p, _mm512_set1_ps(kTanhP[i]));
    p = _mm512_mul_ps(y, p);
    V q = _mm512_set1_ps(kTanhQ[0]);
    for (int i = 1; i < 4; ++i) q = _mm512_fmadd_ps(y2, q, _mm512_set1_ps(kTanhQ[i]));
    // +-1 with x's sign (integer and / or: plain AVX-512 F has no float logic ops)
    const __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MIN));
    const V one = _mm512_castsi512_ps(_mm512_or_si512(sign, _mm512_castps_si512(_mm512_set1_ps(1.0f))));
    return _mm512_mask_blend_ps(saturated, _mm512_div_ps(p, q), one);
  }
  // sigmoid(x) = 1/2 + tanh(x / 2) / 2 (Avx2Pack::sigmoid).
  static V sigmoid(V x) {
    const V half = _mm512_set1_ps(0.5f);
    return _mm512_fmadd_ps(half, tanh(_mm512_mul_ps(half, x)), half);
  }
  static V relu(V x) { return _mm512_max_ps(_mm512_setzero_ps(), x); }  // NaN stays NaN (x second)
  static V relu_mask(V h, V g) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(h, _mm512_setzero_ps(), _CMP_GT_OQ), g);
  }
};
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

// Whether the cell passes may use Avx512Pack: this build compiled them and the one CPU probe
// (csrc/cpu/cpu_isa.h; FASTNER_CPU_ISA=avx2 forces AVX2) chose AVX-512.
inline bool cpu_has_avx512() {
#ifdef FASTNER_RNN_AVX512
  return cpu::isa() == cpu::Isa::AVX512;
#else
  return false;
#endif
}

}  // namespace fastner::cpu::rnn
