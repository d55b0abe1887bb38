// The CRF lane kernels for AVX2 (8 lanes), and the runtime choice between instruction sets.
#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

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

// Chosen once per process. FASTNER_CRF_LANES=avx2 forces the AVX2 kernels (so that tests can
// check both on an AVX-512 machine); AVX-512 is never used on a CPU without it.
const Kernels& kernels() {
  static const Kernels& chosen = []() -> const Kernels& {
    __builtin_cpu_init();
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    const char* forced = std::getenv("FASTNER_CRF_LANES");
    const bool want_avx2 = forced != nullptr && std::strcmp(forced, "avx2") == 0;
    return avx512 && !want_avx2 ? avx512_kernels() : avx2_kernels();
  }();
  return chosen;
}

const char* isa() { return kernels().isa; }

}  // namespace lanes
}  // namespace crf
}  // namespace fastner
