// The bf16 layers' GEMM on CPUs with AMX-BF16 (Intel Sapphire Rapids and later):
// C[m, n] = bf16(A)[m, k] @ B[k, n] (+ C), the same arithmetic as the AVX512_BF16 kernel
// (rnn_gemm_avx512_bf16.h: A rounded to bf16 per product, bf16 denormals as zeros, exact
// products, float32 sums; tdpbf16ps also flushes denormal results and sums in its own order).
// One tdpbf16ps multiplies a 16 x 32 bf16 tile of A by a 32 x 16 tile of B into a 16 x 16
// float32 tile: 8,192 multiply-adds, against 32 for a vdpbf16ps.
//
// Layout: B packed as the AVX512_BF16 kernel packs it (panels of 16 columns, a pair of k per
// 32-bit word, rows of 64 bytes: exactly a B tile's rows), with each panel's rows padded with
// zeros to a multiple of 16 pairs, so that every tile of k is whole; A's rows are rounded per
// call into a per-thread scratch of the same pairing and padding, rows padded to 16.
#pragma once

#include <cstdint>

#include "cpu/rnn_gemm_avx512_bf16.h"

namespace fastner::cpu::rnn::amx_bf16_gemm {

// Whether multiply() may run: this build compiled it (GCC >= 11 on x86-64),
// fastner::cpu::amx_tiles() (AVX-512, AMX-TILE, tile state granted, FASTNER_CPU_ISA not capping
// it), the CPU has AMX-BF16, and avx512_bf16_gemm::available() (its rounding of A). Decided once.
bool available();

// Rows of 16 words a packed panel: pairs(k) rounded up to a tile's 16.
inline int64_t panel_rows(int64_t k) { return (avx512_bf16_gemm::pairs(k) + 15) / 16 * 16; }

// 32-bit words of the packed B.
inline int64_t packed_size(int64_t k, int64_t n) { return avx512_bf16_gemm::panels(n) * panel_rows(k) * 16; }

// Packs op(B)[k, n] (bf16 bits; op(B) = B^T when trans_b) into `out` (packed_size words).
void pack(const uint16_t* b, int64_t ldb, bool trans_b, int64_t k, int64_t n, uint32_t* out);

// C[m, n] = bf16(A)[m, k] @ packed B (+ C when accumulate); single-threaded; only where
// available().
void multiply(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const uint32_t* packed, bool accumulate,
              float* c, int64_t ldc);

}  // namespace fastner::cpu::rnn::amx_bf16_gemm
