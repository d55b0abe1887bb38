// The AMX-BF16 GEMM of the bf16 layers (see rnn_gemm_amx_bf16.h). The tile code is compiled for
// AMX + AVX-512 by the pragma below whatever the build's -march and runs only where available()
// found them at run time; as in rnn_gemm_avx512_bf16.cpp, standard headers come first and the
// code under the pragma has internal linkage.
#include "cpu/rnn_gemm_amx_bf16.h"

#include <immintrin.h>

#include <cstdint>
#include <cstdlib>

#include "cpu/cpu_isa.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 11
#define FASTNER_RNN_GEMM_AMX_BF16 1
#endif

namespace fastner::cpu::rnn::amx_bf16_gemm {

#ifdef FASTNER_RNN_GEMM_AMX_BF16

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl")

namespace {

// Adds (or writes) `rows` rows of a 16 x 16 float32 tile stored at `tile` into C's columns
// under `cols`: the C tiles that overhang C's last row or column go through a buffer.
inline void write_partial(const float* tile, int64_t rows, __mmask16 cols, bool accumulate, float* c, int64_t ldc) {
  for (int64_t r = 0; r < rows; ++r) {
    __m512 v = _mm512_load_ps(tile + 16 * r);
    if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(cols, c + r * ldc));
    _mm512_mask_storeu_ps(c + r * ldc, cols, v);
  }
}

inline __mmask16 column_mask(int64_t cols) {
  return cols >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << cols) - 1);
}

// The GCC tile intrinsics take the tile number as a literal (it is pasted into the asm), so
// each of the four C tiles is spelt out: start it (C itself when the tile lies inside C and
// accumulates, else zeros), and store it (into C directly when it lies inside, else through
// `buffer` and write_partial).
#define FASTNER_AMX_START(T, inside, at)                      \
  do {                                                        \
    if ((inside) && accumulate) {                             \
      _tile_loadd(T, (at), ldc * 4);                          \
    } else {                                                  \
      _tile_zero(T);                                          \
    }                                                         \
  } while (0)
#define FASTNER_AMX_STORE(T, inside, at, rows, cols)                                   \
  do {                                                                                 \
    if (inside) {                                                                      \
      _tile_stored(T, (at), ldc * 4);                                                  \
    } else {                                                                           \
      _tile_stored(T, buffer, 64);                                                     \
      write_partial(buffer, (rows), column_mask(cols), accumulate, (at), ldc);         \
    }                                                                                  \
  } while (0)

// C[R row tiles, P panels] (=|+=) A's row tiles @ B's panels, R, P in {1, 2}: `rows` (1..16R)
// of C's rows and `cols` (1..16P) of its columns are real; A's scratch has whole tiles of rows
// (zeros past m), so the overhanging rows compute garbage-free zeros that are not written.
template <int R, int P>
void block(int64_t k_tiles, const uint32_t* a, int64_t a_row_words, const uint32_t* b, int64_t panel_words,
           int64_t rows, int64_t cols, bool accumulate, float* c, int64_t ldc) {
  alignas(64) float buffer[16 * 16];
  const bool rows0 = rows >= 16, rows1 = rows >= 32, cols0 = cols >= 16, cols1 = cols >= 32;
  float* c01 = c + 16;
  float* c10 = c + 16 * ldc;
  float* c11 = c10 + 16;
  FASTNER_AMX_START(0, rows0 && cols0, c);
  if constexpr (P > 1) FASTNER_AMX_START(1, rows0 && cols1, c01);
  if constexpr (R > 1) FASTNER_AMX_START(2, rows1 && cols0, c10);
  if constexpr (R > 1 && P > 1) FASTNER_AMX_START(3, rows1 && cols1, c11);
  const int64_t a_stride = a_row_words * 4;
  for (int64_t t = 0; t < k_tiles; ++t) {
    _tile_loadd(4, a + 16 * t, a_stride);
    if constexpr (R > 1) _tile_loadd(5, a + 16 * a_row_words + 16 * t, a_stride);
    _tile_loadd(6, b + 256 * t, 64);
    if constexpr (P > 1) _tile_loadd(7, b + panel_words + 256 * t, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (P > 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (R > 1) _tile_dpbf16ps(2, 5, 6);
    if constexpr (R > 1 && P > 1) _tile_dpbf16ps(3, 5, 7);
  }
  const int64_t rows_low = rows < 16 ? rows : 16, cols_low = cols < 16 ? cols : 16;
  FASTNER_AMX_STORE(0, rows0 && cols0, c, rows_low, cols_low);
  if constexpr (P > 1) FASTNER_AMX_STORE(1, rows0 && cols1, c01, rows_low, cols - 16);
  if constexpr (R > 1) FASTNER_AMX_STORE(2, rows1 && cols0, c10, rows - 16, cols_low);
  if constexpr (R > 1 && P > 1) FASTNER_AMX_STORE(3, rows1 && cols1, c11, rows - 16, cols - 16);
}

#undef FASTNER_AMX_START
#undef FASTNER_AMX_STORE

// Panel pairs outer, row-tile pairs inner: a pair of panels (2 x 7 KB at k = 200) stays in L1
// while A's rows pass (14 KB at m = 32, the recurrent product).
void multiply_rounded(int64_t m, int64_t n, int64_t k_tiles, const uint32_t* a, int64_t a_row_words,
                      const uint32_t* packed, bool accumulate, float* c, int64_t ldc) {
  // Tiles 0-3: C's 2 x 2 block of 16 x 16 float32; 4-5: two row tiles of A (16 rows x 16 pairs of
  // k); 6-7: two panels of B (16 pairs of k x 16 columns).
  static const AmxTileConfig config;
  _tile_loadconfig(&config);  // per call: other code on this thread (oneDNN) may configure its own
  // GCC's tileloadd asm names no memory operand: this barrier keeps the stores of A's scratch
  // (and of C by the caller) before the tile loads that read them.
  __asm__ volatile("" ::: "memory");
  const int64_t panel_words = k_tiles * 256;
  for (int64_t col = 0; col < n; col += 32) {
    const int64_t cols = n - col < 32 ? n - col : 32;
    const uint32_t* b = packed + (col / 16) * panel_words;
    for (int64_t row = 0; row < m; row += 32) {
      const int64_t rows = m - row < 32 ? m - row : 32;
      const uint32_t* at = a + row * a_row_words;
      float* ct = c + row * ldc + col;
      if (rows > 16) {
        if (cols > 16) {
          block<2, 2>(k_tiles, at, a_row_words, b, panel_words, rows, cols, accumulate, ct, ldc);
        } else {
          block<2, 1>(k_tiles, at, a_row_words, b, panel_words, rows, cols, accumulate, ct, ldc);
        }
      } else if (cols > 16) {
        block<1, 2>(k_tiles, at, a_row_words, b, panel_words, rows, cols, accumulate, ct, ldc);
      } else {
        block<1, 1>(k_tiles, at, a_row_words, b, panel_words, rows, cols, accumulate, ct, ldc);
      }
    }
  }
  _tile_release();
}

}  // namespace

#pragma GCC pop_options

#endif  // FASTNER_RNN_GEMM_AMX_BF16

bool available() {
#ifdef FASTNER_RNN_GEMM_AMX_BF16
  static const bool yes = [] {
    if (!amx_tiles() || !avx512_bf16_gemm::available()) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("amx-bf16") != 0;
  }();
  return yes;
#else
  return false;
#endif
}

void pack(const uint16_t* b, int64_t ldb, bool trans_b, int64_t k, int64_t n, uint32_t* out) {
  avx512_bf16_gemm::pack_rows(b, ldb, trans_b, k, n, panel_rows(k), out);
}

void multiply(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const uint32_t* packed, bool accumulate,
              float* c, int64_t ldc) {
#ifdef FASTNER_RNN_GEMM_AMX_BF16
  if (m <= 0 || n <= 0) return;
  const int64_t row_words = panel_rows(k), padded_m = (m + 15) / 16 * 16;
  uint32_t* rounded = avx512_bf16_gemm::row_scratch(padded_m * row_words);
  avx512_bf16_gemm::round_rows(m, k, a, lda, rounded, row_words);
  for (int64_t i = m * row_words; i < padded_m * row_words; ++i) rounded[i] = 0;
  multiply_rounded(m, n, row_words / 16, rounded, row_words, packed, accumulate, c, ldc);
#else
  (void)m, (void)n, (void)k, (void)a, (void)lda, (void)packed, (void)accumulate, (void)c, (void)ldc;
  std::abort();  // callers check available()
#endif
}

}  // namespace fastner::cpu::rnn::amx_bf16_gemm
