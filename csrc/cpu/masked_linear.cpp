// masked_linear, CPU: a Linear over the rows a mask marks, bias elsewhere (schema and
// conventions: csrc/fastner.cpp; reference: fastner.reference.masked_linear; wrapper:
// fastner/ops/linear.py).
//
// Why a kernel: the tagger's emission layer maps each token's encoder output [2H = 400] to
// K = 17 tag scores. torch runs that as nonzero + index_select + addmm + index_copy_ over a
// bias-filled output (five ops, the padding rows skipped), and MKL's sgemm with 17 output
// columns ran at 14-19 GMAC/s on AMD Zen 3 (1 thread: 150-210 us for a batch's 425 tokens,
// 280-410 us with the other four ops, ~9% of an int8 tagger call). Here one pass reads the
// marked rows in place and writes every output row: 4 rows x 3 vectors of 8 columns per
// micro-kernel, 12 FMA accumulators (the standalone kernel: 83 us for those 425 tokens).
//
// Layouts: input [B, T, I] read through its strides (rows with a unit stride in place, else
// from a contiguous copy held for the call); weight [K, I] repacked per call as weight^T
// [I, Kp] with Kp = K rounded up to 8 (zeros past K: 38 KB at the tagger's shape); output
// [B, T, K] contiguous. float64 runs the same loops on scalars (correct, not tuned).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "checks.h"

namespace fastner::cpu::masked_linear {
namespace {

using at::Tensor;

constexpr int64_t kRows = 4;   // rows of input per micro-kernel
constexpr int64_t kLanes = 8;  // float32 columns per vector (AVX2: the build's x86-64-v3 baseline)
constexpr int64_t kVecs = 3;   // column vectors per micro-kernel: 4 x 3 accumulators + 3 weights

// out[r][c0, c0 + 8 * NV) = bias + rows[r] @ wt[:, c0...] for MR rows (columns past K dropped).
// wt: [I, Kp] with Kp a multiple of 8; bias: [Kp], zeros past K.
template <int MR, int NV>
inline void micro_kernel(const float* const* rows, int64_t I, const float* wt, int64_t Kp, const float* bias,
                         float* const* out, int64_t K, int64_t c0) {
  __m256 acc[MR][NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const __m256 b = _mm256_loadu_ps(bias + c0 + kLanes * v);
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) acc[r][v] = b;
  }
  for (int64_t i = 0; i < I; ++i) {
    __m256 w[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) w[v] = _mm256_loadu_ps(wt + i * Kp + c0 + kLanes * v);
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(rows[r] + i);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(a, w[v], acc[r][v]);
    }
  }
  // Fully unrolled stores: an accumulator indexed at run time would live in memory, and GCC
  // then stores all twelve on every iteration above (3x slower, measured).
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const int64_t c = c0 + kLanes * v, n = std::min<int64_t>(kLanes, K - c);
      if (n == kLanes) {
        _mm256_storeu_ps(out[r] + c, acc[r][v]);
      } else {
        alignas(32) float lanes[kLanes];
        _mm256_store_ps(lanes, acc[r][v]);
        std::copy_n(lanes, n, out[r] + c);
      }
    }
  }
}

template <int MR>
void rows_times_weight(const float* const* rows, int64_t I, const float* wt, int64_t Kp, const float* bias,
                       float* const* out, int64_t K) {
  for (int64_t c0 = 0; c0 < Kp; c0 += kVecs * kLanes) {
    switch (std::min<int64_t>(kVecs, (Kp - c0) / kLanes)) {
      case 3: micro_kernel<MR, 3>(rows, I, wt, Kp, bias, out, K, c0); break;
      case 2: micro_kernel<MR, 2>(rows, I, wt, Kp, bias, out, K, c0); break;
      default: micro_kernel<MR, 1>(rows, I, wt, Kp, bias, out, K, c0); break;
    }
  }
}

// The marked rows [begin, end) of `rows` / `out`: blocks of kRows, then single rows.
void project_avx2(const float* const* rows, float* const* out, int64_t begin, int64_t end, int64_t I, const float* wt,
             int64_t Kp, const float* bias, int64_t K) {
  int64_t r = begin;
  for (; r + kRows <= end; r += kRows) rows_times_weight<kRows>(rows + r, I, wt, Kp, bias, out + r, K);
  for (; r < end; ++r) rows_times_weight<1>(rows + r, I, wt, Kp, bias, out + r, K);
}

// float64: the same sums, one at a time.
template <typename scalar_t>
void project_scalar(const scalar_t* const* rows, scalar_t* const* out, int64_t begin, int64_t end, int64_t I,
                    const scalar_t* wt, int64_t Kp, const scalar_t* bias, int64_t K) {
  for (int64_t r = begin; r < end; ++r)
    for (int64_t k = 0; k < K; ++k) {
      scalar_t sum = bias[k];
      for (int64_t i = 0; i < I; ++i) sum += rows[r][i] * wt[i * Kp + k];
      out[r][k] = sum;
    }
}

template <typename scalar_t>
void project(const scalar_t* const* rows, scalar_t* const* out, int64_t begin, int64_t end, int64_t I,
             const scalar_t* wt, int64_t Kp, const scalar_t* bias, int64_t K) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    project_avx2(rows, out, begin, end, I, wt, Kp, bias, K);
  } else {
    project_scalar(rows, out, begin, end, I, wt, Kp, bias, K);
  }
}

Tensor masked_linear_cpu(const Tensor& input_in, const Tensor& mask_in, const Tensor& weight_in,
                         const c10::optional<Tensor>& bias_in) {
  const char* op = "masked_linear";
  const char* owner = "the input's";
  TORCH_CHECK_VALUE(input_in.dim() == 3, op, ": input must be [B, T, I], got ", input_in.dim(), " dimensions");
  const auto dtype = input_in.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble, op, ": input must be float32 or float64, got ",
                    dtype);
  TORCH_CHECK_VALUE(input_in.device().is_cpu(), op, ": input must be on the CPU here, got ", input_in.device());
  const int64_t B = input_in.size(0), T = input_in.size(1), I = input_in.size(2);
  checks::like(op, "mask", mask_in, {B, T}, at::kBool, input_in.device(), owner);
  TORCH_CHECK_VALUE(weight_in.dim() == 2 && weight_in.size(1) == I, op, ": weight must be [K, I] with I = ", I,
                    ", got ", weight_in.sizes());
  const int64_t K = weight_in.size(0);
  checks::like(op, "weight", weight_in, {K, I}, dtype, input_in.device(), owner);
  if (bias_in.has_value()) checks::like(op, "bias", *bias_in, {K}, dtype, input_in.device(), owner);

  Tensor output = at::empty({B, T, K}, input_in.options().memory_format(at::MemoryFormat::Contiguous));
  if (B * T * K == 0) return output;
  // Held for the whole call: the loops read through these tensors' data pointers.
  const Tensor input = input_in.stride(2) == 1 ? input_in : input_in.contiguous();
  const Tensor mask = mask_in.contiguous(), weight = weight_in.contiguous();
  const Tensor bias = bias_in.has_value() ? bias_in->contiguous() : Tensor();

  AT_DISPATCH_FLOATING_TYPES(dtype, "masked_linear", [&] {
    const int64_t Kp = (K + kLanes - 1) / kLanes * kLanes;
    std::vector<scalar_t> wt(I * Kp, scalar_t(0)), padded_bias(Kp, scalar_t(0));  // weight^T [I, Kp]
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    for (int64_t k = 0; k < K; ++k)
      for (int64_t i = 0; i < I; ++i) wt[i * Kp + k] = w[k * I + i];
    if (bias.defined()) std::copy_n(bias.const_data_ptr<scalar_t>(), K, padded_bias.begin());

    // The marked rows' addresses and their output rows; unmarked rows get the bias now.
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    const int64_t s0 = input.stride(0), s1 = input.stride(1);
    const bool* marked = mask.const_data_ptr<bool>();
    scalar_t* out = output.data_ptr<scalar_t>();
    std::vector<const scalar_t*> rows;
    std::vector<scalar_t*> out_rows;
    rows.reserve(B * T);
    out_rows.reserve(B * T);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) {
        scalar_t* o = out + (b * T + t) * K;
        if (marked[b * T + t]) {
          rows.push_back(in + b * s0 + t * s1);
          out_rows.push_back(o);
        } else {
          std::copy_n(padded_bias.data(), K, o);
        }
      }
    const int64_t M = static_cast<int64_t>(rows.size());
    // Blocks of kRows rows; ~I * Kp multiply-adds a row: grains of at least ~100k of them.
    const int64_t blocks = (M + kRows - 1) / kRows;
    const int64_t grain = std::max<int64_t>(1, 100000 / std::max<int64_t>(1, kRows * I * Kp));
    at::parallel_for(0, blocks, grain, [&](int64_t first, int64_t last) {
      const int64_t begin = first * kRows, end = std::min(M, last * kRows);
      project(rows.data(), out_rows.data(), begin, end, I, wt.data(), Kp, padded_bias.data(), K);
    });
  });
  return output;
}

}  // namespace
}  // namespace fastner::cpu::masked_linear

TORCH_LIBRARY_IMPL(fastner, CPU, m) {
  m.impl("masked_linear", &fastner::cpu::masked_linear::masked_linear_cpu);
}
