// The AVX512_BF16 GEMM of the bf16 layers (see rnn_gemm_avx512_bf16.h). The kernel is compiled
// for AVX-512 + AVX512_BF16 by the pragma below whatever the build's -march, and runs only
// where available() found those at run time. Standard headers come before the pragma, and the
// code under it has internal linkage and uses no standard-library templates: an inline
// function compiled for AVX-512 here and for AVX2 elsewhere would otherwise be merged by the
// linker, and the AVX-512 copy could run on a CPU without it.
#include "cpu/rnn_gemm_avx512_bf16.h"

#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <new>

#include "cpu/cpu_isa.h"
#include "cpu/rnn_row_tiles.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 10
#define FASTNER_RNN_GEMM_AVX512_BF16 1
#endif

namespace fastner::cpu::rnn::avx512_bf16_gemm {
namespace {

// bf16 bits with a denormal (exponent 0) made a zero of its sign: vdpbf16ps reads it so.
inline uint32_t flushed(uint16_t bits) { return (bits & 0x7f80u) == 0 ? (bits & 0x8000u) : bits; }

// pack() one word at a time: any CPU, and B not transposed.
void pack_scalar(const uint16_t* b, int64_t ldb, bool trans_b, int64_t k, int64_t n, int64_t panel_rows,
                 uint32_t* out) {
  const int64_t kp = pairs(k);
  for (int64_t p = 0; p < panels(n); ++p) {
    uint32_t* dst = out + p * panel_rows * 16;
    const int64_t cols = n - p * 16 < 16 ? n - p * 16 : 16;
    for (int64_t i = cols < 16 ? 0 : kp * 16; i < panel_rows * 16; ++i) dst[i] = 0;
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t col = p * 16 + c;
      if (trans_b) {  // column col of op(B) is row col of B: read it once, in order
        const uint16_t* src = b + col * ldb;
        for (int64_t q = 0; q < k / 2; ++q) dst[q * 16 + c] = flushed(src[2 * q]) | flushed(src[2 * q + 1]) << 16;
        if (k % 2 != 0) dst[(kp - 1) * 16 + c] = flushed(src[k - 1]);
      } else {
        for (int64_t q = 0; q < kp; ++q) {
          const uint32_t hi = 2 * q + 1 < k ? flushed(b[(2 * q + 1) * ldb + col]) : 0;
          dst[q * 16 + c] = flushed(b[2 * q * ldb + col]) | hi << 16;
        }
      }
    }
  }
}

}  // namespace

#ifdef FASTNER_RNN_GEMM_AVX512_BF16

#pragma GCC push_options
#pragma GCC diagnostic push
// GCC 12 reports its own _mm512_undefined_* idiom inside the unpack / shuffle intrinsics of
// transpose16x16 as maybe-uninitialized (as rnn.cpp's AVX-512 cells): ~120 lines of every build.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,fma")

namespace {

// Rows per micro-tile and 16-column panels per tile: kRows * kCols = 24 float32 accumulators
// (zmm), plus kCols weight vectors and a broadcast, within the 32 zmm registers: 24
// independent vdpbf16ps chains cover its latency at one per cycle, and each k pair costs
// kRows + kCols = 11 loads for 24 vdpbf16ps. Measured on the project's AMD EPYC (Zen 4, 1
// thread, loaded machine) at [8..32, 200] x [200, 800]: 8 x 3 and 6 x 4 tiles both at
// ~210-225 GFLOP/s (the core's vdpbf16ps peak is ~64 flop/cycle); 8 x 3 gives 32 rows four full
// tiles.
// One row (a batch of one, or a batch's last steps) keeps only kCols chains, but at the
// layers' n it waits on L2 rather than on latency: at [1, 200] x [200, 800] ~107 GFLOP/s (64
// bytes of weights per vdpbf16ps, ~31 bytes a cycle) whether or not its k pairs are split over
// two chains; splitting helped only where the panels fit L1 (n = 48: 106 -> 150), so it is not
// done.
constexpr int kRows = 8;
constexpr int kCols = 3;

// r[c] = row c of a 16 x 16 block of 32-bit words -> r[j] = column j.
inline __attribute__((always_inline)) void transpose16x16(__m512i (&r)[16]) {
  __m512i t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // u[4i + m], 128-bit lane L: rows 4i..4i+3 of column 4L + m.
#pragma GCC unroll 4
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // Column 4L + m: lane L of r[m], r[4 + m], r[8 + m], r[12 + m] (a 4 x 4 transpose of lanes).
#pragma GCC unroll 4
  for (int m = 0; m < 4; ++m) {
    const __m512i v0 = _mm512_shuffle_i32x4(r[m], r[4 + m], 0x44), v1 = _mm512_shuffle_i32x4(r[m], r[4 + m], 0xee);
    const __m512i v2 = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0x44);
    const __m512i v3 = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0xee);
    t[m] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    t[4 + m] = _mm512_shuffle_i32x4(v0, v2, 0xdd);
    t[8 + m] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    t[12 + m] = _mm512_shuffle_i32x4(v1, v3, 0xdd);
  }
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) r[j] = t[j];
}

// pack() for B^T (the layers' weights W [n, k], rows of k bf16): a pair of k is already one
// 32-bit word of W's row, so a panel is a transpose of 16 rows' words, 16 x 16 words at a time
// in registers (the word-at-a-time loop stores with a 64-byte stride: ~27 us for W_hh at H =
// 200 on Zen 4, a sixth of a one-sentence bf16 LSTM call; this way ~9 us).
void pack_transposed(const uint16_t* b, int64_t ldb, int64_t k, int64_t n, int64_t panel_rows, uint32_t* out) {
  const int64_t kp = pairs(k), whole = k / 2;  // pairs; pairs with both halves in the row
  const __m512i exponent = _mm512_set1_epi16(0x7f80), sign = _mm512_set1_epi16(static_cast<short>(0x8000));
  for (int64_t p = 0; p < panels(n); ++p) {
    uint32_t* dst = out + p * panel_rows * 16;
    const int64_t cols = n - p * 16 < 16 ? n - p * 16 : 16;
    for (int64_t i = kp * 16; i < panel_rows * 16; ++i) dst[i] = 0;
    for (int64_t q0 = 0; q0 < kp; q0 += 16) {
      const int64_t left = whole - q0;
      const __mmask16 mask = left >= 16 ? 0xffff : left > 0 ? static_cast<__mmask16>((1u << left) - 1) : 0;
      __m512i r[16];
#pragma GCC unroll 16
      for (int c = 0; c < 16; ++c)
        r[c] = c < cols ? _mm512_maskz_loadu_epi32(mask, b + (p * 16 + c) * ldb + 2 * q0) : _mm512_setzero_si512();
      transpose16x16(r);
      const int64_t rows = kp - q0 < 16 ? kp - q0 : 16;
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) {
        if (j < rows) {
          // bf16 denormals to zeros of their sign, in both halves of every word
          const __mmask32 normal = _mm512_test_epi16_mask(r[j], exponent);
          _mm512_store_si512(dst + (q0 + j) * 16, _mm512_mask_blend_epi16(normal, _mm512_and_si512(r[j], sign), r[j]));
        }
      }
    }
    if (k % 2 != 0)  // the last pair's high half is the zero padding, not the next row's first
      for (int64_t c = 0; c < cols; ++c) dst[(kp - 1) * 16 + c] = flushed(b[(p * 16 + c) * ldb + k - 1]);
  }
}

// The rows of A[m, k] (leading dimension lda) rounded to bf16 (vcvtne2ps2bf16: RNE, denormals
// to signed zeros, NaN quiet) into out: row r at out + r * kp words, pairs of k per word, the
// high half of the last word zero when k is odd (the masked load reads zeros past k).
void round_rows_avx512(int64_t m, int64_t k, const float* a, int64_t lda, uint32_t* out, int64_t kp) {
  for (int64_t r = 0; r < m; ++r) {
    const float* src = a + r * lda;
    uint16_t* dst = reinterpret_cast<uint16_t*>(out + r * kp);
    for (int64_t i = 0; i < 2 * kp; i += 32) {
      const int64_t left = k - i;  // may be < 32, even <= 0 past an odd k's padding element
      const __mmask16 lo_mask = left >= 16 ? 0xffff : left > 0 ? static_cast<__mmask16>((1u << left) - 1) : 0;
      const __mmask16 hi_mask =
          left >= 32 ? 0xffff : left > 16 ? static_cast<__mmask16>((1u << (left - 16)) - 1) : 0;
      const __m512 lo = _mm512_maskz_loadu_ps(lo_mask, src + i);
      const __m512 hi = _mm512_maskz_loadu_ps(hi_mask, src + i + 16);
      const __m512i words = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // lo -> elements 0..15
      const int64_t store = 2 * kp - i < 32 ? 2 * kp - i : 32;
      const __mmask32 store_mask = store >= 32 ? 0xffffffffu : static_cast<__mmask32>((1u << store) - 1);
      _mm512_mask_storeu_epi16(dst + i, store_mask, words);
    }
  }
}

// C[R rows, C panels] (=|+=) bf16 A[R rows] @ panels; the last panel's columns under
// last_mask. a: R rows of kp words (stride kp); panel j at panel + j * panel_words. Every loop
// over r and j is unrolled so that the R * C accumulators live in registers.
template <int R, int C>
inline __attribute__((always_inline)) void tile(int64_t kp, const uint32_t* a, const uint32_t* panel,
                                                int64_t panel_words, float* c, int64_t ldc, bool accumulate,
                                                __mmask16 last_mask) {
  __m512 acc[R][C];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
    for (int j = 0; j < C; ++j) {
      const __mmask16 mask = j == C - 1 ? last_mask : 0xffff;
      acc[r][j] = accumulate ? _mm512_maskz_loadu_ps(mask, c + r * ldc + 16 * j) : _mm512_setzero_ps();
    }
  }
  for (int64_t q = 0; q < kp; ++q) {
    __m512bh w[C];
#pragma GCC unroll 16
    for (int j = 0; j < C; ++j)
      w[j] = (__m512bh)_mm512_load_si512(panel + j * panel_words + q * 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * kp + q]));
#pragma GCC unroll 16
      for (int j = 0; j < C; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], x, w[j]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
    for (int j = 0; j < C; ++j) {
      if (j == C - 1 && last_mask != 0xffff) {
        _mm512_mask_storeu_ps(c + r * ldc + 16 * j, last_mask, acc[r][j]);
      } else {
        _mm512_storeu_ps(c + r * ldc + 16 * j, acc[r][j]);
      }
    }
  }
}

// The row tiles of one block of C panels: near-equal heights of at most kRows (20 rows: 7 7 6,
// not 8 8 4: a short tile reloads the panels for few products).
template <int C>
void column_block(int64_t m, int64_t kp, const uint32_t* a, const uint32_t* panel, int64_t panel_words, float* c,
                  int64_t ldc, bool accumulate, __mmask16 last_mask) {
  const RowTiles tiles(m, kRows);
  int64_t i = 0;
  for (int64_t t = 0; t < tiles.count; ++t) {
    const int64_t rows = tiles.height(t);
    const uint32_t* at = a + i * kp;
    float* ct = c + i * ldc;
    switch (rows) {
      case 8: tile<8, C>(kp, at, panel, panel_words, ct, ldc, accumulate, last_mask); break;
      case 7: tile<7, C>(kp, at, panel, panel_words, ct, ldc, accumulate, last_mask); break;
      case 6: tile<6, C>(kp, at, panel, panel_words, ct, ldc, accumulate, last_mask); break;
      case 5: tile<5, C>(kp, at, panel, panel_words, ct, ldc, accumulate, last_mask); break;
      case 4: tile<4, C>(kp, at, panel, panel_words, ct, ldc, accumulate, last_mask); break;
      case 3: tile<3, C>(kp, at, panel, panel_words, ct, ldc, accumulate, last_mask); break;
      case 2: tile<2, C>(kp, at, panel, panel_words, ct, ldc, accumulate, last_mask); break;
      default: tile<1, C>(kp, at, panel, panel_words, ct, ldc, accumulate, last_mask); break;
    }
    i += rows;
  }
}

// Panel-outer: a block of kCols panels (kp * kCols * 64 bytes, 19.2 KB at k = 200) stays in L1
// while every row tile of A passes.
void multiply_rounded(int64_t m, int64_t n, int64_t kp, const uint32_t* a, const uint32_t* packed, bool accumulate,
                      float* c, int64_t ldc) {
  const int64_t np = panels(n), panel_words = kp * 16;
  const __mmask16 tail_mask = n % 16 == 0 ? 0xffff : static_cast<__mmask16>((1u << (n % 16)) - 1);
  for (int64_t p = 0; p < np; p += kCols) {
    const int64_t count = np - p < kCols ? np - p : kCols;
    const __mmask16 last_mask = p + count == np ? tail_mask : 0xffff;
    const uint32_t* panel = packed + p * panel_words;
    float* cp = c + p * 16;
    switch (count) {
      case 3: column_block<3>(m, kp, a, panel, panel_words, cp, ldc, accumulate, last_mask); break;
      case 2: column_block<2>(m, kp, a, panel, panel_words, cp, ldc, accumulate, last_mask); break;
      default: column_block<1>(m, kp, a, panel, panel_words, cp, ldc, accumulate, last_mask); break;
    }
  }
}

}  // namespace

#pragma GCC diagnostic pop
#pragma GCC pop_options

#endif  // FASTNER_RNN_GEMM_AVX512_BF16

uint32_t* row_scratch(int64_t words) {
  struct Buffer {
    uint32_t* data = nullptr;
    int64_t size = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buffer;
  if (buffer.size < words) {
    const int64_t rounded = (words + 15) / 16 * 16;
    void* fresh = std::aligned_alloc(64, static_cast<size_t>(rounded) * 4);
    if (fresh == nullptr) throw std::bad_alloc();
    std::free(buffer.data);
    buffer.data = static_cast<uint32_t*>(fresh);
    buffer.size = rounded;
  }
  return buffer.data;
}

void pack(const uint16_t* b, int64_t ldb, bool trans_b, int64_t k, int64_t n, uint32_t* out) {
  pack_rows(b, ldb, trans_b, k, n, pairs(k), out);
}

void pack_rows(const uint16_t* b, int64_t ldb, bool trans_b, int64_t k, int64_t n, int64_t panel_rows, uint32_t* out) {
#ifdef FASTNER_RNN_GEMM_AVX512_BF16
  if (trans_b && available()) return pack_transposed(b, ldb, k, n, panel_rows, out);
#endif
  pack_scalar(b, ldb, trans_b, k, n, panel_rows, out);
}

void round_rows(int64_t m, int64_t k, const float* a, int64_t lda, uint32_t* out, int64_t row_words) {
#ifdef FASTNER_RNN_GEMM_AVX512_BF16
  round_rows_avx512(m, k, a, lda, out, row_words);
#else
  (void)m, (void)k, (void)a, (void)lda, (void)out, (void)row_words;
  std::abort();  // callers check available()
#endif
}

bool available() {
#ifdef FASTNER_RNN_GEMM_AVX512_BF16
  static const bool yes = [] {
    if (isa() != Isa::AVX512) return false;  // FASTNER_CPU_ISA=avx2, or no AVX-512 F/DQ/BW/VL
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  }();
  return yes;
#else
  return false;
#endif
}

void multiply(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const uint32_t* packed, bool accumulate,
              float* c, int64_t ldc) {
#ifdef FASTNER_RNN_GEMM_AVX512_BF16
  if (m <= 0 || n <= 0) return;
  const int64_t kp = pairs(k);
  uint32_t* rounded = row_scratch(m * kp);
  round_rows_avx512(m, k, a, lda, rounded, kp);
  multiply_rounded(m, n, kp, rounded, packed, accumulate, c, ldc);
#else
  (void)m, (void)n, (void)k, (void)a, (void)lda, (void)packed, (void)accumulate, (void)c, (void)ldc;
  std::abort();  // callers check available()
#endif
}

}  // namespace fastner::cpu::rnn::avx512_bf16_gemm
