// The dequantizing store of the AVX-512 int8 kernels (rnn_int8_vnni.cpp, rnn_int8_amx.cpp): 16
// exact int32 sums of one row -> float, the AVX2 kernel's store (rnn_int8.cpp `store`)
// operation for operation, so that all three give the same bits. Include it only under an
// AVX-512 target pragma: its functions are static so that no copy compiled for AVX-512 can be
// merged with a baseline one.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace fastner::cpu::rnn::int8 {

// dst[lanes] (=, or += when beta is 1) float(sums - z * colsum) * (s * wscale): z, s the row's
// zero point and scale (broadcast), colsum / wscale the 16 channels' column sums and scales.
static inline __attribute__((always_inline)) void store_dequantized(__m512i sums, __m512i z, __m512 s,
                                                                     const int32_t* colsum, const float* wscale,
                                                                     float beta, float* dst, __mmask16 lanes) {
  const __m512i adj = _mm512_sub_epi32(sums, _mm512_mullo_epi32(z, _mm512_loadu_si512(colsum)));
  // s * scale first: a huge row's s times the integer sum could overflow where the result does not.
  const __m512 factor = _mm512_mul_ps(s, _mm512_loadu_ps(wscale));
  const __m512 sum = _mm512_cvtepi32_ps(adj);
  const __m512 v = beta != 0.0f ? _mm512_fmadd_ps(sum, factor, _mm512_maskz_loadu_ps(lanes, dst))
                                : _mm512_mul_ps(sum, factor);
  _mm512_mask_storeu_ps(dst, lanes, v);
}

}  // namespace fastner::cpu::rnn::int8
