// The AMX-INT8 product (see rnn_int8_amx.h). As in rnn_int8_vnni.cpp, standard headers come
// before the target pragma, and amx_selected() is compiled for the baseline.
#include "cpu/rnn_int8_amx.h"

#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cpu/cpu_isa.h"
#include "cpu/rnn_int8_vnni.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 11
#define FASTNER_RNN_INT8_AMX 1
#endif

namespace fastner::cpu::rnn::int8 {

bool amx_selected() {
#ifdef FASTNER_RNN_INT8_AMX
  static const bool selected = [] {
    if (!vnni_selected() || !amx_tiles()) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("amx-int8") != 0;
  }();
  return selected;
#else
  return false;
#endif
}

#ifdef FASTNER_RNN_INT8_AMX

}  // namespace fastner::cpu::rnn::int8

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-int8,avx512f,avx512bw,avx512dq,avx512vl,fma")

#include "cpu/rnn_int8_store.h"  // under the pragma: its functions are AVX-512 code

namespace fastner::cpu::rnn::int8 {

namespace {

constexpr int64_t kPanel = 16;       // output channels per panel: a C tile's 16 int32 columns
constexpr int64_t kTileBytes = 1024;  // 16 rows x 64 bytes: every tile here

// The panels' bytes and where a B tile may be read whole. A panel's last tile of k holds
// groups % 16 groups when that is not 0; the tile reads 16 rows anyway, and the rows past the
// panel's groups (the next panel's, or the column sums and scales after the last panel) meet
// Q's zero columns past K: exact zeros in the int32 sums. Only a read that would run past the
// packed tensor's end goes through a zero-padded copy.
struct Panels {
  const int8_t* packed;
  int64_t stride;     // bytes a panel: groups * 64
  const int8_t* end;  // the packed tensor's end (the scales close it: rnn_int8.h)

  const int8_t* tile(int64_t p, int64_t t, int8_t* copy) const {
    const int8_t* src = packed + p * stride + t * kTileBytes;
    if (end - src >= kTileBytes) return src;
    const int64_t inside = packed + (p + 1) * stride - src;  // this panel's bytes in the tile
    std::memcpy(copy, src, static_cast<size_t>(inside));
    std::memset(copy + inside, 0, static_cast<size_t>(kTileBytes - inside));
    // The tile load that reads the copy is an asm naming no memory operand: keep the stores.
    __asm__ volatile("" : : "r"(copy) : "memory");
    return copy;
  }
};

struct Rows {
  const uint8_t* q;
  int64_t width;
  const float* scale;
  const int32_t* zero;
};

// Dequantizes `rows` rows of a 16 x 16 int32 tile stored at `sums` into C's columns under
// `lanes` (store_dequantized: the VNNI and AVX2 kernels' store).
void store_tile(const int32_t* sums, int64_t rows, const float* row_scale, const int32_t* row_zero,
                const int32_t* colsum, const float* wscale, float beta, float* c, int64_t ldc, int64_t cols) {
  const __mmask16 lanes = cols >= kPanel ? __mmask16(0xffff) : __mmask16((1u << cols) - 1u);
  for (int64_t r = 0; r < rows; ++r) {
    store_dequantized(_mm512_load_si512(sums + 16 * r), _mm512_set1_epi32(row_zero[r]), _mm512_set1_ps(row_scale[r]),
                      colsum, wscale, beta, c + r * ldc, lanes);
  }
}

// C's rows [r0, r0 + 16R) (`rows` of them real) x panels [p0, p0 + P) (`cols` columns real):
// the int32 sums on tiles, then each tile stored through a buffer and dequantized. The GCC tile
// intrinsics take tile numbers as literals, hence the spelt-out R / P cases.
template <int R, int P>
void block(const Rows& q, const Panels& b, int64_t k_tiles, int64_t r0, int64_t p0, int64_t rows, int64_t cols,
           const int32_t* colsum, const float* wscale, float beta, float* c, int64_t ldc) {
  alignas(64) int8_t copy[2][kTileBytes];
  _tile_zero(0);
  if constexpr (P > 1) _tile_zero(1);
  if constexpr (R > 1) _tile_zero(2);
  if constexpr (R > 1 && P > 1) _tile_zero(3);
  const uint8_t* a = q.q + r0 * q.width;
  for (int64_t t = 0; t < k_tiles; ++t) {
    _tile_loadd(4, a + 64 * t, q.width);
    if constexpr (R > 1) _tile_loadd(5, a + 16 * q.width + 64 * t, q.width);
    _tile_loadd(6, b.tile(p0, t, copy[0]), 64);
    if constexpr (P > 1) _tile_loadd(7, b.tile(p0 + 1, t, copy[1]), 64);
    _tile_dpbusd(0, 4, 6);
    if constexpr (P > 1) _tile_dpbusd(1, 4, 7);
    if constexpr (R > 1) _tile_dpbusd(2, 5, 6);
    if constexpr (R > 1 && P > 1) _tile_dpbusd(3, 5, 7);
  }
  alignas(64) int32_t sums[4][16 * 16];
  _tile_stored(0, sums[0], 64);
  if constexpr (P > 1) _tile_stored(1, sums[1], 64);
  if constexpr (R > 1) _tile_stored(2, sums[2], 64);
  if constexpr (R > 1 && P > 1) _tile_stored(3, sums[3], 64);
  for (int i = 0; i < R; ++i) {
    const int64_t tile_rows = rows - 16 * i < 16 ? rows - 16 * i : 16;
    for (int j = 0; j < P; ++j) {
      const int64_t tile_cols = cols - 16 * j < 16 ? cols - 16 * j : 16;
      if (tile_rows <= 0 || tile_cols <= 0) continue;
      const int64_t row = r0 + 16 * i, col = (p0 + j) * kPanel;
      store_tile(sums[2 * i + j], tile_rows, q.scale + row, q.zero + row, colsum + col, wscale + col, beta,
                 c + row * ldc + col, ldc, tile_cols);
    }
  }
}

}  // namespace

void multiply_amx(int64_t m, const uint8_t* q, int64_t width, const float* row_scale, const int32_t* row_zero,
                  const int8_t* packed, const int32_t* colsum, const float* wscale, int64_t groups, int64_t panels,
                  int64_t n, float beta, float* c, int64_t ldc) {
  if (m <= 0 || panels <= 0) return;
  // Tiles 0-3: C's 2 x 2 block of int32 sums; 4-5: two row tiles of Q (16 rows x 64 k); 6-7: two
  // panels' B (16 groups x 16 channels x 4 k).
  static const AmxTileConfig config;
  _tile_loadconfig(&config);  // per call: other code on this thread (oneDNN) may configure its own
  // GCC's tileloadd asm names no memory operand: this barrier keeps the caller's stores of Q
  // before the tile loads that read them.
  __asm__ volatile("" ::: "memory");
  const Rows rows{q, width, row_scale, row_zero};
  const Panels b{packed, groups * 64, reinterpret_cast<const int8_t*>(wscale + panels * kPanel)};
  const int64_t k_tiles = width / 64;
  // Panel pairs outer, row-tile pairs inner: a pair of panels (2 x 3.2 KB at K = 200) stays in
  // L1 while Q's rows pass.
  for (int64_t p0 = 0; p0 < panels; p0 += 2) {
    const int64_t cols = n - p0 * kPanel < 2 * kPanel ? n - p0 * kPanel : 2 * kPanel;
    const bool two_panels = p0 + 1 < panels;
    for (int64_t r0 = 0; r0 < m; r0 += 32) {
      const int64_t count = m - r0 < 32 ? m - r0 : 32;
      if (count > 16) {
        if (two_panels) {
          block<2, 2>(rows, b, k_tiles, r0, p0, count, cols, colsum, wscale, beta, c, ldc);
        } else {
          block<2, 1>(rows, b, k_tiles, r0, p0, count, cols, colsum, wscale, beta, c, ldc);
        }
      } else if (two_panels) {
        block<1, 2>(rows, b, k_tiles, r0, p0, count, cols, colsum, wscale, beta, c, ldc);
      } else {
        block<1, 1>(rows, b, k_tiles, r0, p0, count, cols, colsum, wscale, beta, c, ldc);
      }
    }
  }
  _tile_release();
}

#pragma GCC pop_options

#else  // !FASTNER_RNN_INT8_AMX

void multiply_amx(int64_t, const uint8_t*, int64_t, const float*, const int32_t*, const int8_t*, const int32_t*,
                  const float*, int64_t, int64_t, int64_t, float, float*, int64_t) {
  std::abort();  // callers check amx_selected()
}

#endif  // FASTNER_RNN_INT8_AMX

}  // namespace fastner::cpu::rnn::int8
