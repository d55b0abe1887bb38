// int8 products of fastner::rnn_layer_int8_forward (csrc/cpu/rnn.cpp runs its layer loop with
// these in place of the float GEMMs): C[m, n] = beta * C + A[m, K] @ W^T with W quantized once
// per output channel (symmetric, 7-bit: w_q in [-63, 63], scale[n] = max|W[n, :]| / 63) and
// the rows of A quantized on every call (asymmetric, 7-bit: q = clamp(round(a / s) + z, 0,
// 127) with s = (max(a, 0) - min(a, 0)) / 127). The exact arithmetic is
// fastner.reference.quantize_rows_int8 / int8_product; tests/ops/rnn/test_rnn_int8.py compares them.
//
// Why 7 bits on both sides. The AVX2 kernel multiplies u8 by s8 with vpmaddubsw, which adds
// pairs of products into int16 with saturation, then widens with vpmaddwd. On Zen 2 both
// multiplies issue on one pipe and bound the kernel. With u7 activations and s7 weights a
// vpmaddubsw lane is at most 2 * 127 * 63 = 16002, so two of them add in int16 without
// overflow before one vpmaddwd: 3 multiplies per 64 products instead of 4 (measured ~1.3x on
// the op at the tagger shape). Full u8 x s8 would saturate vpmaddubsw (2 * 255 * 127 > 2^15).
// Error of one product vs fp32 on random rows (relative Frobenius): u7 x s8 0.9-1.3%, u7 x s7
// ~1.5%, u8 x s7 1.4%; the CoNLL tagger's F1 moved by less than 0.05 (README numbers).
// Dequantization happens in the kernel's store (the int32 sums never reach memory): out =
// float(acc - z * colsum[n]) * (s * scale[n]), which is what the gate pass then reads.
//
// Non-finite values: a row holding NaN or +-inf is not quantized (its scale would be
// meaningless and its output silently finite); its product is the one float arithmetic gives
// (NaN / +-inf in every column, see multiply), so NaN and inf reach the cells exactly where
// the float32 layer with the dequantized weights has them, in the input, hx / cx, or arising
// in the recurrence. A finite row with a range past float's max is scaled without overflow.
//
// Two kernels, one arithmetic: this AVX2 one (the build's baseline, -march=x86-64-v3) and,
// where the CPU has AVX512-VNNI, rnn_int8_vnni.h's vpdpbusd kernel on the same packed weights
// and quantized rows, bit-identical (7-bit operands keep both exact). On an AMD EPYC Zen 4
// (1 thread) the VNNI kernel took the int8 LSTM layer at the tagger shape from 3.44-3.54 to
// 2.37-2.41 ms (fastner bench --only precision, FASTNER_RNN_INT8=avx2 vs unset).
#pragma once

#include <cstdint>
#include <vector>

namespace fastner::cpu::rnn::int8 {

constexpr int32_t kActivationMax = 127;  // activations are u7: [0, 127]
constexpr int32_t kWeightMax = 63;        // weights are s7: [-63, 63]

// s8 weights W [N, K] (row-major) with per-row scales [N], packed for the kernel: panels of 16
// output channels, K in groups of 4 (what one vpmaddubsw sums in pairs), padded to an even
// number of groups. Raises ValueError for a weight outside [-63, 63] (it could overflow the
// int16 sums). Copies what it needs: w and scale may go once constructed.
class PackedWeights {
 public:
  PackedWeights(const int8_t* w, const float* scale, int64_t n, int64_t k);

  // C[m, n] = beta * C + dequant(quantize_rows(A) @ W^T); A float [m, K] with leading
  // dimension lda, C [m, N] with leading dimension ldc; beta is 0 (C's old contents ignored)
  // or 1. Single-threaded (called inside a direction's task).
  // A row of A holding NaN or +-inf gets the product float arithmetic gives it, whatever its
  // finite entries (add_nonfinite_row), so that non-finite values propagate as in the float
  // layer; a finite row never yields NaN, and +-inf only where its float product overflows.
  void multiply(int64_t m, const float* a, int64_t lda, float beta, float* c, int64_t ldc) const;

 private:
  int8_t weight(int64_t j, int64_t i) const;  // W[j, i] from the packed panels
  // c[j] += NaN where a holds a NaN, or an inf meets W[j, i] = 0, or +inf and -inf terms meet;
  // else the infinite terms' sign (fastner.reference.int8_product_nonfinite).
  void add_nonfinite_row(const float* a, float* c) const;

  int64_t n_, k_, groups_, panels_;
  std::vector<int8_t> packed_;   // [panels, groups, 2, 8, 4]
  std::vector<int32_t> colsum_;  // [panels * 16] sum_k W[n, k] (0 past N)
  std::vector<float> scale_;     // [panels * 16] (0 past N)
};

}  // namespace fastner::cpu::rnn::int8
