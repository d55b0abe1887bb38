// The AMX-INT8 product of the int8 recurrent layers (Intel Xeon since Sapphire Rapids): the
// same packed weights, quantized rows and dequantizing store as the VNNI and AVX2 kernels (see
// rnn_int8.h), with tdpbusd: a 16 x 64 tile of quantized rows (u7) times 64 k of a panel
// (16 of its groups: a panel's groups are 64-byte rows of 16 channels x 4 k, a B tile's rows as
// they lie) into 16 x 16 exact int32 sums, 16,384 multiply-adds an instruction against 64 for a
// vpdpbusd. The sums are exact in every kernel and the store is the same (rnn_int8_store.h), so
// all three give the same bits (tests/ops/rnn/test_rnn_int8.py compares them).
//
// Chosen at run time where vnni_selected() (so FASTNER_RNN_INT8=avx2 still forces the AVX2
// kernel), fastner::cpu::amx_tiles() (FASTNER_CPU_ISA=avx512 leaves AMX out) and the CPU has
// AMX-INT8.
#pragma once

#include <cstdint>

namespace fastner::cpu::rnn::int8 {

// Whether this process runs the AMX kernel (decided once).
bool amx_selected();

// The row width (bytes) of the quantized rows the AMX kernel reads: whole tiles of 64 k.
inline int64_t amx_width(int64_t groups) { return (groups * 4 + 63) / 64 * 64; }

// multiply_vnni's product (rnn_int8_vnni.h) on AMX tiles: Q's rows amx_width(groups) bytes
// apart, zeros past K, and its rows padded with zeros to a multiple of 16 (the tiles read them;
// their products are not stored). Only where amx_selected().
void multiply_amx(int64_t m, const uint8_t* q, int64_t width, const float* row_scale, const int32_t* row_zero,
                  const int8_t* packed, const int32_t* colsum, const float* wscale, int64_t groups, int64_t panels,
                  int64_t n, float beta, float* c, int64_t ldc);

}  // namespace fastner::cpu::rnn::int8
