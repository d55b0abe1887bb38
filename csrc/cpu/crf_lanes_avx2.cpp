// The CRF lane kernels for AVX2 (8 lanes), and the runtime choice between instruction sets.
#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cpu/cpu_isa.h"
#include "cpu/crf_lanes.h"

#define FASTNER_LANES 8
#include "cpu/crf_lanes_impl.h"
#include "cpu/crf_lanes_kbest.h"

namespace fastner::cpu::crf {
namespace lanes {

const Kernels& avx2_kernels() {
  static const Kernels table{"avx2", W, scratch_floats, forward, backward, viterbi,
                             kbest_scratch_floats, kbest};
  return table;
}

// The instruction set of every CPU kernel family (csrc/cpu/cpu_isa.h).
const Kernels& kernels() {
  return cpu::isa() == cpu::Isa::AVX512 ? avx512_kernels() : avx2_kernels();
}

}  // namespace lanes
}  // namespace fastner::cpu::crf
