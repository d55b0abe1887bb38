// The CRF lane kernels for AVX2 (8 lanes), and the runtime choice between instruction sets.
#include <immintrin.h>

#include <cstddef>
#include <cstdint>

#include "cpu/crf_lanes.h"

#define FASTNER_LANES 8
#include "cpu/crf_lanes_impl.h"

namespace fastner {
namespace crf {
namespace lanes {

const Kernels& avx2_kernels() {
  static const Kernels table{"avx2", W, scratch_floats, forward, backward, viterbi};
  return table;
}

const Kernels& kernels() {
  static const Kernels& chosen = [&]() -> const Kernels& {
    __builtin_cpu_init();
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    return avx512 ? avx512_kernels() : avx2_kernels();
  }();
  return chosen;
}

}  // namespace lanes
}  // namespace crf
}  // namespace fastner
