// The AVX512-VNNI int8 product (see rnn_int8_vnni.h). Standard headers come before the target
// pragma so that nothing they define inline is compiled for AVX-512 (see crf_lanes_impl.h on
// linkage); vnni_selected() is compiled for the baseline, since it runs on every CPU.
#include "cpu/rnn_int8_vnni.h"

#include "cpu/rnn_int8.h"

#include <c10/util/Exception.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/cpu_isa.h"
#include "cpu/rnn_row_tiles.h"

namespace fastner::cpu::rnn::int8 {

bool vnni_selected() {
  static const bool selected = [] {
    // FASTNER_RNN_INT8=avx2 forces the AVX2 kernel for the int8 products alone (comparisons
    // and tests; FASTNER_CPU_ISA=avx2 also changes the cell passes).
    if (env_forces_avx2("FASTNER_RNN_INT8", "VNNI where the CPU has it")) return false;
#if defined(__GNUC__) && defined(__x86_64__)
    return isa() == Isa::AVX512 && __builtin_cpu_supports("avx512vnni");
#else
    return false;
#endif
  }();
  return selected;
}

}  // namespace fastner::cpu::rnn::int8

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma")

#include "cpu/rnn_int8_store.h"  // under the pragma: its functions are AVX-512 code

namespace fastner::cpu::rnn::int8 {

namespace {

constexpr int64_t kPanel = 16;      // output channels per panel: one zmm of int32 sums
constexpr int64_t kGroupBytes = 64;  // a panel's 16 channels x 4 k of one group
constexpr int kMaxRows = 6;          // rows of Q per tile
constexpr int kMaxPanels = 4;        // panels per tile: 6 x 4 = 24 of the 32 zmm registers

// No standard-library templates under the target pragma: an inline function compiled here for
// AVX-512 and elsewhere for the baseline could be merged by the linker into the AVX-512 copy.
inline int64_t smaller(int64_t a, int64_t b) { return a < b ? a : b; }

// acc[r][p] = sum over groups of Q row r (4 u8 a group, broadcast) . panel p's group (16
// channels x 4 s8): one vpdpbusd per row and panel and group. Loops over r and p unrolled so
// that the accumulators stay in registers.
template <int MR, int NP>
inline void tile_sums(const uint8_t* q, int64_t width, const int8_t* panel, int64_t panel_stride, int64_t groups,
                      __m512i (&acc)[kMaxRows][kMaxPanels]) {
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) acc[r][p] = _mm512_setzero_si512();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i w[NP];
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) w[p] = _mm512_loadu_si512(panel + p * panel_stride + g * kGroupBytes);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t four;
      std::memcpy(&four, q + r * width + 4 * g, 4);
      const __m512i a = _mm512_set1_epi32(four);
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) acc[r][p] = _mm512_dpbusd_epi32(acc[r][p], a, w[p]);
    }
  }
}

// Dequantizes the tile into C's columns [0, cols) (cols <= NP * 16): store_dequantized, the
// AVX2 kernel's store operation for operation, so both kernels give the same bits.
template <int MR, int NP>
inline void tile_store(__m512i (&acc)[kMaxRows][kMaxPanels], const float* row_scale, const int32_t* row_zero,
                       const int32_t* colsum, const float* wscale, float beta, float* c, int64_t ldc, int64_t cols) {
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const __m512i z = _mm512_set1_epi32(row_zero[r]);
    const __m512 s = _mm512_set1_ps(row_scale[r]);
    float* dst = c + r * ldc;
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) {
      const int64_t n = smaller(kPanel, cols - p * kPanel);
      if (n <= 0) break;
      const __mmask16 lanes = n == kPanel ? __mmask16(0xffff) : __mmask16((1u << n) - 1u);
      store_dequantized(acc[r][p], z, s, colsum + p * kPanel, wscale + p * kPanel, beta, dst + p * kPanel, lanes);
    }
  }
}

template <int MR, int NP>
void tile(int64_t r0, int64_t p0, const uint8_t* q, int64_t width, const float* row_scale, const int32_t* row_zero,
          const int8_t* packed, const int32_t* colsum, const float* wscale, int64_t groups, int64_t n, float beta,
          float* c, int64_t ldc) {
  __m512i acc[kMaxRows][kMaxPanels];
  const int64_t panel_stride = groups * kGroupBytes;
  tile_sums<MR, NP>(q + r0 * width, width, packed + p0 * panel_stride, panel_stride, groups, acc);
  tile_store<MR, NP>(acc, row_scale + r0, row_zero + r0, colsum + p0 * kPanel, wscale + p0 * kPanel, beta,
                     c + r0 * ldc + p0 * kPanel, ldc, n - p0 * kPanel);
}

using TileFn = void (*)(int64_t, int64_t, const uint8_t*, int64_t, const float*, const int32_t*, const int8_t*,
                        const int32_t*, const float*, int64_t, int64_t, float, float*, int64_t);

template <int MR>
constexpr TileFn tile_for(int np) {
  return np == 4 ? &tile<MR, 4> : np == 3 ? &tile<MR, 3> : np == 2 ? &tile<MR, 2> : &tile<MR, 1>;
}

TileFn tile_fn(int rows, int np) {
  switch (rows) {
    case 6: return tile_for<6>(np);
    case 5: return tile_for<5>(np);
    case 4: return tile_for<4>(np);
    case 3: return tile_for<3>(np);
    case 2: return tile_for<2>(np);
    default: return tile_for<1>(np);
  }
}

// The lanes of 16 that lie below n (none for n <= 0).
inline __mmask16 lanes_below(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1u);
}

}  // namespace

bool quantize_row_avx512(const float* a, int64_t k, uint8_t* q, int64_t width, float* scale, int32_t* zero) {
  __m512 lo_lanes = _mm512_setzero_ps(), hi_lanes = _mm512_setzero_ps();  // min(.., 0), max(.., 0)
  __mmask16 nan = 0;  // lanes that saw a NaN (min / max drop NaNs)
  for (int64_t i = 0; i < k; i += 16) {
    const __m512 x = _mm512_maskz_loadu_ps(lanes_below(k - i), a + i);  // lanes past k: 0, no change
    lo_lanes = _mm512_min_ps(lo_lanes, x);
    hi_lanes = _mm512_max_ps(hi_lanes, x);
    nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  }
  const float lo = _mm512_reduce_min_ps(lo_lanes), hi = _mm512_reduce_max_ps(hi_lanes);
  if (nan != 0 || !__builtin_isfinite(lo) || !__builtin_isfinite(hi)) {
    *scale = 1.0f;
    *zero = 0;
    std::memset(q, 0, static_cast<size_t>(width));
    return false;
  }
  const RowQuantization row = row_quantization(lo, hi);
  *scale = row.scale;
  *zero = row.zero;
  const __m512 inv = _mm512_set1_ps(row.inverse);
  const __m512i z = _mm512_set1_epi32(row.zero), none = _mm512_setzero_si512(), top = _mm512_set1_epi32(kActivationMax);
  for (int64_t i = 0; i < width; i += 16) {  // lanes past k, up to width: zeros
    const __mmask16 lanes = lanes_below(k - i);
    __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, a + i), inv));  // round to nearest even
    v = _mm512_maskz_mov_epi32(lanes, _mm512_min_epi32(_mm512_max_epi32(_mm512_add_epi32(v, z), none), top));
    _mm_mask_storeu_epi8(q + i, lanes_below(width - i), _mm512_cvtepi32_epi8(v));
  }
  return true;
}

void multiply_vnni(int64_t m, const uint8_t* q, int64_t width, const float* row_scale, const int32_t* row_zero,
                   const int8_t* packed, const int32_t* colsum, const float* wscale, int64_t groups, int64_t panels,
                   int64_t n, float beta, float* c, int64_t ldc) {
  if (m <= 0 || panels <= 0) return;
  const RowTiles tiles(m, kMaxRows);
  // Panel blocks outer: a block's weights (4 panels x groups x 64 bytes, 12.8 KB at K = 200)
  // stay in L1 while every row tile passes over them.
  for (int64_t p0 = 0; p0 < panels; p0 += kMaxPanels) {
    const int np = static_cast<int>(smaller(kMaxPanels, panels - p0));
    int64_t r0 = 0;
    for (int64_t t = 0; t < tiles.count; ++t) {
      const int rows = static_cast<int>(tiles.height(t));
      tile_fn(rows, np)(r0, p0, q, width, row_scale, row_zero, packed, colsum, wscale, groups, n, beta, c, ldc);
      r0 += rows;
    }
  }
}

}  // namespace fastner::cpu::rnn::int8

#pragma GCC pop_options
