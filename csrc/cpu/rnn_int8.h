// int8 products of fastner::rnn_layer_int8_forward (csrc/cpu/rnn.cpp runs its layer loop with
// these in place of the float GEMMs): C[m, n] = beta * C + A[m, K] @ W^T with W quantized once
// per output channel (symmetric s8, scale[n] = max|W[n, :]| / 127) and the rows of A quantized
// on every call (asymmetric, 7-bit: q = clamp(round(a / s) + z, 0, 127) with s = (max(a, 0) -
// min(a, 0)) / 127). The exact arithmetic is fastner.reference.quantize_rows_int8 /
// int8_product; tests/test_rnn_int8.py compares the two.
//
// Why 7-bit activations: the AVX2 kernel multiplies u8 by s8 with vpmaddubsw, which adds pairs
// of products into int16 with saturation. 127 * 127 * 2 = 32258 fits; 255 * 127 * 2 does not.
// Measured (tests' shapes, relative Frobenius error of the product vs fp32 on random rows):
// u7 activations x s8 weights 0.9-1.3%, u8 x s7 1.4%, so the bit is dropped on the activations.
// Dequantization happens in the kernel's store (the int32 sums never reach memory): out =
// float(acc - z * colsum[n]) * s * scale[n], which is what the gate pass then reads.
//
// AVX2 only (the build's baseline, -march=x86-64-v3): on VNNI / AVX-512 machines this same
// kernel runs (a VNNI variant could not be tested on the machines this was written on).
#pragma once

#include <cstdint>
#include <vector>

namespace fastner::cpu::rnn::int8 {

constexpr int32_t kActivationMax = 127;  // activations are u7: [0, 127]

// s8 weights W [N, K] (row-major) with per-row scales [N], packed for the kernel: panels of 16
// output channels, K in groups of 4 (what one vpmaddubsw + vpmaddwd sums). Copies what it
// needs: w and scale may go once constructed.
class PackedWeights {
 public:
  PackedWeights(const int8_t* w, const float* scale, int64_t n, int64_t k);

  // C[m, n] = beta * C + dequant(quantize_rows(A) @ W^T); A float [m, K] with leading
  // dimension lda, C [m, N] with leading dimension ldc; beta is 0 (C's old contents ignored)
  // or 1. Single-threaded (called inside a direction's task).
  void multiply(int64_t m, const float* a, int64_t lda, float beta, float* c, int64_t ldc) const;

 private:
  int64_t n_, k_, groups_, panels_;
  std::vector<int8_t> packed_;   // [panels, groups, 2, 8, 4]
  std::vector<int32_t> colsum_;  // [panels * 16] sum_k W[n, k] (0 past N)
  std::vector<float> scale_;     // [panels * 16] (0 past N)
};

}  // namespace fastner::cpu::rnn::int8
