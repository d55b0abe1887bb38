// Dropout masks, CPU. Schema and conventions: csrc/fastner.cpp (dropout_mask); reference:
// fastner.reference.dropout_mask; wrapper: fastner/ops/dropout.py; used by
// fastner.models.Dropout (the tagger's three dropouts).
//
// Why a kernel: the tagger drew its masks with torch.rand (torch's CPU generator, a Mersenne
// twister, one draw an element, single-threaded): 7.5% of a default training step at 2 threads
// (900 calls, 213 us each, in 300 steps on Zen 2; profiler times). Here each element takes 32 bits of a
// counter-based generator, splitmix64 (Steele, Lea & Flood, OOPSLA 2014): draw i is a pure
// function of (seed, i), so the mask is reproducible from the seed alone and the reference
// computes the same bits with torch integer ops.
//
// The mask: element j (row-major) is kept, with the value 1 / (1 - p), when the 32-bit word
// u_j >= round(p * 2^32), else 0; u_j is the low (j even) or high (j odd) half of
// splitmix64(seed, j / 2). So P(keep) = 1 - round(p * 2^32) / 2^32 (p rounded to 2^-32).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace fastner::cpu::dropout {
namespace {

using at::Tensor;

// splitmix64's i-th output for `seed` (the generator's state after i + 1 steps, mixed).
inline uint64_t splitmix64(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

template <typename scalar_t>
void fill_mask(scalar_t* out, int64_t n, uint64_t seed, uint64_t threshold, scalar_t kept) {
  // Blocks of 256 draws in two passes: the draws alone (a loop gcc vectorizes: ~1 ns an element
  // on Zen 2, where one loop drawing and storing stayed scalar at 5 ns), then the stores.
  // One thread: splitting among threads was slower at every size measured (Zen 2 KVM guest,
  // 2 threads: 124,000 elements 142 us on one thread, 341 us in two; 2M elements 2.5 vs 5.6 ms,
  // the fresh output's page faults and the second thread's wake-up outweighing the draws).
  constexpr int64_t kBlock = 256;
  uint32_t words[2 * kBlock];
  const int64_t draws = (n + 1) / 2;
  for (int64_t d = 0; d < draws; d += kBlock) {
    const int64_t count = std::min(kBlock, draws - d);
    for (int64_t k = 0; k < count; ++k) {
      const uint64_t z = splitmix64(seed, static_cast<uint64_t>(d + k));
      words[2 * k] = static_cast<uint32_t>(z);
      words[2 * k + 1] = static_cast<uint32_t>(z >> 32);
    }
    const int64_t j0 = 2 * d, stores = std::min(2 * count, n - j0);
    for (int64_t k = 0; k < stores; ++k) out[j0 + k] = words[k] >= threshold ? kept : scalar_t(0);
  }
}

Tensor dropout_mask_cpu(const Tensor& input, double p, int64_t seed) {
  const auto dtype = input.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                    "dropout_mask: input must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK_VALUE(input.device().is_cpu(), "dropout_mask: input must be on the CPU, got ", input.device());
  TORCH_CHECK_VALUE(std::isfinite(p) && p >= 0.0 && p < 1.0, "dropout_mask: p must be in [0, 1), got ", p);
  Tensor mask = at::empty(input.sizes(), input.options().memory_format(at::MemoryFormat::Contiguous));
  // round(p * 2^32), halves up: an integer in [0, 2^32] (2^32: p within 2^-33 of 1, nothing kept)
  const uint64_t threshold = static_cast<uint64_t>(std::floor(p * 4294967296.0 + 0.5));
  const double scale = 1.0 / (1.0 - p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dropout_mask", [&] {
    // the value of a kept element: 1 / (1 - p) in float64 for float64 masks, else rounded to
    // float32 first and then to the mask's dtype (what torch does with a Python float factor)
    const scalar_t kept = std::is_same_v<scalar_t, double> ? static_cast<scalar_t>(scale)
                                                           : static_cast<scalar_t>(static_cast<float>(scale));
    fill_mask<scalar_t>(mask.data_ptr<scalar_t>(), mask.numel(), static_cast<uint64_t>(seed), threshold, kept);
  });
  return mask;
}

}  // namespace
}  // namespace fastner::cpu::dropout

TORCH_LIBRARY_IMPL(fastner, CPU, m) {
  m.impl("dropout_mask", &fastner::cpu::dropout::dropout_mask_cpu);
}
