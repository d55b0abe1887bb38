// The AVX512-VNNI product of the int8 recurrent layers: the same packed weights, quantized rows
// and dequantization as the AVX2 kernel of rnn_int8.cpp (see rnn_int8.h), with vpdpbusd
// (four u8 x s8 products added into each int32 lane in one instruction) on 16 output channels
// per zmm register. The int32 sums are exact in both kernels (u7 x s7, no saturation either
// way) and the store does the same float operations, so the two give bit-identical products:
// a model answers the same on any x86-64 CPU (tests/ops/rnn/test_rnn_int8.py compares them).
//
// Chosen at run time where fastner::cpu::isa() is AVX-512 and the CPU has avx512_vnni
// (Intel since Cascade Lake / Ice Lake, AMD since Zen 4); FASTNER_CPU_ISA=avx2 forces the AVX2
// kernel, and FASTNER_RNN_INT8=avx2 forces it for the int8 products alone. Compiled for
// AVX-512 by a pragma in rnn_int8_vnni.cpp whatever the build's -march.
#pragma once

#include <cstdint>

namespace fastner::cpu::rnn::int8 {

// Whether this process runs the VNNI kernel (decided once).
bool vnni_selected();

// C[m, n] (=, or += when beta is 1) dequant(Q @ W^T): Q [m, width] the quantized rows (u7,
// zeros past K), row_scale / row_zero [m] their scales and zero points; packed, colsum and
// wscale PackedWeights' panels [panels, groups, 16 channels x 4], column sums and scales
// (zero past n). Only where vnni_selected().
void multiply_vnni(int64_t m, const uint8_t* q, int64_t width, const float* row_scale, const int32_t* row_zero,
                   const int8_t* packed, const int32_t* colsum, const float* wscale, int64_t groups, int64_t panels,
                   int64_t n, float beta, float* c, int64_t ldc);

// rnn_int8.cpp's quantize_row on 16 lanes, bit for bit (the same row_quantization, the same
// float operations per element, min / max exact in any order): one row of A [k] -> q [width]
// (u7, zeros past k), its scale and zero point; false (q zeros, scale 1, zero point 0) for a
// row holding NaN or +-inf. Only where vnni_selected() (the AVX-512 kernels' rows).
bool quantize_row_avx512(const float* a, int64_t k, uint8_t* q, int64_t width, float* scale, int32_t* zero);

}  // namespace fastner::cpu::rnn::int8
