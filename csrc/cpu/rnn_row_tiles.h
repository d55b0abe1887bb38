// The row tiles of the recurrent GEMM micro-kernels (rnn_gemm_avx2.h, rnn_gemm_avx512_bf16.cpp,
// rnn_int8_vnni.cpp): m rows in as few tiles of at most max_rows as possible, of near-equal
// height (32 rows at most 6 a tile: 6 6 5 5 5 5, not 6 6 6 6 6 2), since a short tile loads a
// panel of weights for few products. Measured on an AMD EPYC (Zen 2, 1 thread, best of 200):
// float32 at [20..32, 200] x [200, 800] 4-10% faster than full tiles plus a short one.
// Include it before any `#pragma GCC target`: its inline code must stay the baseline's.
#pragma once

#include <cstdint>

namespace fastner::cpu::rnn {

struct RowTiles {
  RowTiles(int64_t m, int64_t max_rows) : count(m > 0 ? (m + max_rows - 1) / max_rows : 0) {
    base = count > 0 ? m / count : 0;
    taller = count > 0 ? m % count : 0;
  }
  // Rows of tile t (0 <= t < count): the first `taller` tiles have one more.
  int64_t height(int64_t t) const { return base + (t < taller ? 1 : 0); }

  int64_t count, base = 0, taller = 0;
};

}  // namespace fastner::cpu::rnn
