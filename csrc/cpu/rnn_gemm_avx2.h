// fastner's own AVX2 GEMM for the recurrent kernels: C[m, n] = A[m, k] @ B[k, n] (+ C), A and C
// float32 row-major, B pre-packed once per layer call into panels of 16 columns, stored as
// float32 or as bfloat16 (the bf16 layers' weights; widened to float32 in registers by a
// shift or a mask, so the products and the accumulation are float32). For bf16 weights the
// caller first rounds A's rows to bf16 (round_rows_to_bf16), so that this kernel computes what
// the AVX512_BF16 kernel does (rnn_gemm_avx512_bf16.h: it serves the bf16 layers where the CPU
// has vdpbf16ps; this one elsewhere).
//
// Why our own: MKL's packed sgemm, which the kernels used alone before, takes its slower paths
// on AMD CPUs; measured on an AMD EPYC (Zen 2, AVX2, 1 thread, in-process at first use, loaded
// machine) at [32, 200] x [200, 800] this kernel ran at 76-81 GFLOP/s against MKL packed 58-60,
// at [512, 130] x [130, 800] 68-86 against 60-73 (rnn_gemm.h chooses between them per machine
// by measurement). bf16 panels halve the bytes of W_hh (640 KB float32 at H = 200, more than a
// Zen 2 core's 512 KB L2; 320 KB in bf16), but the widening costs two integer ops per row of
// 16: on Zen 2 the bf16 layers ran within ~5% of the float32 ones (measured before the rounding
// of A's rows was added; it costs m * k operations against the product's m * k * n).
//
// Panel layout, panel p = columns [16p, 16p + 16), k rows of 16 values (zeros past n):
//   float32: row kk is B[kk][16p + c] for c = 0..15 (two 8-float loads).
//   bf16: row kk is 8 32-bit words, word c = bf16(B[kk][16p + c]) << 16 | bf16(B[kk][16p + 8 + c]):
//     word & 0xffff0000 is column c as a float32, word << 16 is column 8 + c (one load, two
//     integer ops, no shuffle).
// Micro-tile: up to 6 rows x 16 columns in 12 ymm accumulators; panel-outer order so that a
// panel (k * 64 bytes, 12.8 KB at k = 200) stays in L1 while every row block of A passes.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/rnn_row_tiles.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FASTNER_RNN_GEMM_AVX2 1
#endif

namespace fastner::cpu::rnn::avx2_gemm {

constexpr int64_t kPanel = 16;  // columns per panel
constexpr int64_t kRows = 6;    // rows per micro-tile

inline int64_t panels(int64_t n) { return (n + kPanel - 1) / kPanel; }

// Elements of the packed B (of type float or uint16_t = bf16 bits).
inline int64_t packed_size(int64_t k, int64_t n) { return panels(n) * k * kPanel; }

// x rounded to bf16 and widened back (the bf16 layers' rounding of the products' left
// operand, the one vcvtne2ps2bf16 does and rnn_gemm_avx512_bf16.h describes): a denormal
// becomes a zero of its sign, NaN stays NaN (quiet), the rest round to nearest even (as
// torch's .to(torch.bfloat16)).
inline float round_to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    u = (u | 0x00400000u) & 0xffff0000u;  // quiet NaN, payload truncated
  } else if ((u & 0x7f800000u) == 0) {
    u &= 0x80000000u;  // zero or denormal: signed zero
  } else {
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  }
  float out;
  std::memcpy(&out, &u, 4);
  return out;
}

// bf16 bits with a denormal made a zero of its sign (vdpbf16ps reads its inputs so; the bf16
// panels below are packed flushed so that both kernels multiply the same weights).
inline uint16_t flush_bf16_denormal(uint16_t bits) {
  return (bits & 0x7f80u) == 0 ? static_cast<uint16_t>(bits & 0x8000u) : bits;
}

#ifdef FASTNER_RNN_GEMM_AVX2
// r[i] = row i of an 8 x 8 block of 32-bit values -> r[j] = column j (rows 0..7 of it). Used
// on floats here and on groups of 4 int8 weights by the int8 packing (rnn_int8.cpp).
inline void transpose8x8(__m256 (&r)[8]) {
  __m256 t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  // r[j] (j < 4) now holds column j of rows 0-3 in its low half and column 4 + j in its high
  // half; r[4 + j] the same of rows 4-7.
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm256_permute2f128_ps(r[j], r[4 + j], 0x20);
    t[4 + j] = _mm256_permute2f128_ps(r[j], r[4 + j], 0x31);
  }
  for (int j = 0; j < 8; ++j) r[j] = t[j];
}

// pack() for float32 B^T (every weight of the recurrent layers: W [n, k] row-major, op(B) =
// W^T): 8 rows of W by 8 k at a time, transposed in registers, so that the panel's rows are
// written whole. The plain loop wrote one float at a time with a 64-byte stride and was a
// third of a one-sentence LSTM call (perf, 1 thread, B = 1, 15 tokens; see the commit).
inline void pack_transposed_f32(const float* b, int64_t ldb, int64_t k, int64_t n, float* out) {
  for (int64_t p = 0; p * kPanel < n; ++p) {
    float* dst = out + p * k * kPanel;
    const int64_t cols = std::min(kPanel, n - p * kPanel);
    if (cols < kPanel) std::fill_n(dst, k * kPanel, 0.0f);
    int64_t c0 = 0;
    for (; c0 + 8 <= cols; c0 += 8) {
      const float* src = b + (p * kPanel + c0) * ldb;
      int64_t kk = 0;
      for (; kk + 8 <= k; kk += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ldb + kk);
        transpose8x8(r);
        for (int j = 0; j < 8; ++j) _mm256_storeu_ps(dst + (kk + j) * kPanel + c0, r[j]);
      }
      for (; kk < k; ++kk)
        for (int64_t c = 0; c < 8; ++c) dst[kk * kPanel + c0 + c] = src[c * ldb + kk];
    }
    for (int64_t c = c0; c < cols; ++c) {
      const float* src = b + (p * kPanel + c) * ldb;
      for (int64_t kk = 0; kk < k; ++kk) dst[kk * kPanel + c] = src[kk];
    }
  }
}
#endif

// Packs op(B)[k, n] (B row-major with leading dimension ldb; op(B) = B^T when trans_b) whose
// elements are float (W = float) or bf16 bits (W = uint16_t, denormals flushed to signed zeros)
// into `out` (packed_size(k, n) elements of W).
template <typename W>
void pack(const W* b, int64_t ldb, bool trans_b, int64_t k, int64_t n, W* out) {
#ifdef FASTNER_RNN_GEMM_AVX2
  if constexpr (sizeof(W) == 4) {
    if (trans_b) return pack_transposed_f32(b, ldb, k, n, out);
  }
#endif
  auto value = [](W w) -> W {
    if constexpr (sizeof(W) == 2) return flush_bf16_denormal(w);
    return w;
  };
  auto at = [&](int64_t kk, int64_t col) -> W { return value(trans_b ? b[col * ldb + kk] : b[kk * ldb + col]); };
  // Position of column c (0..15) within a packed row of the panel.
  auto slot = [](int64_t c) -> int64_t {
    if constexpr (sizeof(W) == 4) return c;
    // bf16: word c' = (hi: column c', lo: column 8 + c'); little endian: lo half first.
    return c < 8 ? 2 * c + 1 : 2 * (c - 8);
  };
  for (int64_t p = 0; p < panels(n); ++p) {
    W* dst = out + p * k * kPanel;
    const int64_t cols = std::min(kPanel, n - p * kPanel);
    if (cols < kPanel) std::fill_n(dst, k * kPanel, W(0));
    if (trans_b) {  // rows of B are columns of op(B): read each row once, in order
      for (int64_t c = 0; c < cols; ++c) {
        const W* src = b + (p * kPanel + c) * ldb;
        const int64_t s = slot(c);
        for (int64_t kk = 0; kk < k; ++kk) dst[kk * kPanel + s] = value(src[kk]);
      }
    } else {
      for (int64_t kk = 0; kk < k; ++kk)
        for (int64_t c = 0; c < cols; ++c) dst[kk * kPanel + slot(c)] = at(kk, p * kPanel + c);
    }
  }
}

#ifdef FASTNER_RNN_GEMM_AVX2

// The two 8-float halves (columns c and 8 + c) of packed row kk.
inline void load_row(const float* row, __m256& lo, __m256& hi) {
  lo = _mm256_loadu_ps(row);
  hi = _mm256_loadu_ps(row + 8);
}
inline void load_row(const uint16_t* row, __m256& lo, __m256& hi) {
  const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
  lo = _mm256_castsi256_ps(_mm256_and_si256(words, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  hi = _mm256_castsi256_ps(_mm256_slli_epi32(words, 16));
}

// out[r, :k] = round_to_bf16(A[r, :k]) for the m rows of A (leading dimension lda; out's is k):
// the bf16 panels' left operand, so that this kernel multiplies what vdpbf16ps does.
inline void round_rows_to_bf16(int64_t m, int64_t k, const float* a, int64_t lda, float* out) {
  const __m256i magnitude = _mm256_set1_epi32(0x7fffffff), infinity = _mm256_set1_epi32(0x7f800000);
  const __m256i smallest_normal = _mm256_set1_epi32(0x00800000), quiet = _mm256_set1_epi32(0x00400000);
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i bias = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1);
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t r = 0; r < m; ++r) {
    const float* src = a + r * lda;
    float* dst = out + r * k;
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
      const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
      const __m256i abs = _mm256_and_si256(u, magnitude);
      const __m256i nan = _mm256_cmpgt_epi32(abs, infinity);
      const __m256i tiny = _mm256_cmpgt_epi32(smallest_normal, abs);  // zero or denormal
      __m256i v = _mm256_add_epi32(u, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(u, 16), one)));
      v = _mm256_blendv_epi8(v, _mm256_or_si256(u, quiet), nan);
      v = _mm256_blendv_epi8(v, _mm256_and_si256(u, sign), tiny);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_and_si256(v, high));
    }
    for (; i < k; ++i) dst[i] = round_to_bf16(src[i]);
  }
}

// C[R rows, cols] (=|+=) A[R rows, k] @ panel, R <= kRows, cols <= 16. Every loop over r is
// unrolled so that the 2R accumulators live in registers (a loop left rolled makes GCC keep
// them on the stack: half the rate).
template <int R, typename W>
inline void tile(int64_t k, const float* a, int64_t lda, const W* panel, float* c, int64_t ldc, bool accumulate,
                 int64_t cols) {
  __m256 acc[R][2];
  const bool whole = cols == kPanel;
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    acc[r][0] = accumulate && whole ? _mm256_loadu_ps(c + r * ldc) : _mm256_setzero_ps();
    acc[r][1] = accumulate && whole ? _mm256_loadu_ps(c + r * ldc + 8) : _mm256_setzero_ps();
  }
  int64_t kk = 0;
  if constexpr (R <= 2) {
    // One or two rows give 2R accumulators, each a chain of dependent FMAs: at a latency of 4
    // cycles and two FMA pipes that keeps a quarter (R = 1) or half of the pipes busy. Rows of
    // k split over `chains` more accumulators, added at the end. Measured on an AMD EPYC Zen 4
    // (1 thread): fastner.nn.LSTM, B=1, 15 tokens, 611 -> see the commit. (Changes the order of
    // the float additions for m <= 2 only; the reference comparisons have float tolerance.)
    constexpr int chains = R == 1 ? 4 : 2;
    __m256 part[chains][R][2];  // chain j sums the rows kk = j (mod chains); chain 0 starts at acc
#pragma GCC unroll 4
    for (int j = 0; j < chains; ++j)
#pragma GCC unroll 2
      for (int r = 0; r < R; ++r)
        for (int h = 0; h < 2; ++h) part[j][r][h] = j == 0 ? acc[r][h] : _mm256_setzero_ps();
    for (; kk + chains <= k; kk += chains) {
#pragma GCC unroll 4
      for (int j = 0; j < chains; ++j) {
        __m256 lo, hi;
        load_row(panel + (kk + j) * kPanel, lo, hi);
#pragma GCC unroll 2
        for (int r = 0; r < R; ++r) {
          const __m256 x = _mm256_broadcast_ss(a + r * lda + kk + j);
          part[j][r][0] = _mm256_fmadd_ps(x, lo, part[j][r][0]);
          part[j][r][1] = _mm256_fmadd_ps(x, hi, part[j][r][1]);
        }
      }
    }
#pragma GCC unroll 2
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < 2; ++h) {
        __m256 sum = part[0][r][h];
#pragma GCC unroll 4
        for (int j = 1; j < chains; ++j) sum = _mm256_add_ps(sum, part[j][r][h]);
        acc[r][h] = sum;
      }
  }
  for (; kk < k; ++kk) {
    __m256 lo, hi;
    load_row(panel + kk * kPanel, lo, hi);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_broadcast_ss(a + r * lda + kk);
      acc[r][0] = _mm256_fmadd_ps(x, lo, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(x, hi, acc[r][1]);
    }
  }
  if (whole) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(c + r * ldc, acc[r][0]);
      _mm256_storeu_ps(c + r * ldc + 8, acc[r][1]);
    }
    return;
  }
  alignas(32) float part[R][kPanel];  // the last panel's valid columns only
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    _mm256_store_ps(part[r], acc[r][0]);
    _mm256_store_ps(part[r] + 8, acc[r][1]);
  }
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < cols; ++j) c[r * ldc + j] = accumulate ? c[r * ldc + j] + part[r][j] : part[r][j];
}

// C[m, n] = A[m, k] @ packed B (+ C when accumulate); single-threaded.
template <typename W>
void multiply(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const W* packed, bool accumulate,
              float* c, int64_t ldc) {
  if (m <= 0) return;
  for (int64_t p = 0; p < panels(n); ++p) {
    const W* panel = packed + p * k * kPanel;
    const int64_t cols = std::min(kPanel, n - p * kPanel);
    float* cp = c + p * kPanel;
    const RowTiles tiles(m, kRows);
    int64_t i = 0;
    for (int64_t t = 0; t < tiles.count; ++t) {
      const int64_t rows = tiles.height(t);
      const float* at = a + i * lda;
      float* ct = cp + i * ldc;
      switch (rows) {
        case 6: tile<6>(k, at, lda, panel, ct, ldc, accumulate, cols); break;
        case 5: tile<5>(k, at, lda, panel, ct, ldc, accumulate, cols); break;
        case 4: tile<4>(k, at, lda, panel, ct, ldc, accumulate, cols); break;
        case 3: tile<3>(k, at, lda, panel, ct, ldc, accumulate, cols); break;
        case 2: tile<2>(k, at, lda, panel, ct, ldc, accumulate, cols); break;
        default: tile<1>(k, at, lda, panel, ct, ldc, accumulate, cols); break;
      }
      i += rows;
    }
  }
}

#endif  // FASTNER_RNN_GEMM_AVX2

inline bool available() {
#ifdef FASTNER_RNN_GEMM_AVX2
  return true;
#else
  return false;
#endif
}

}  // namespace fastner::cpu::rnn::avx2_gemm
