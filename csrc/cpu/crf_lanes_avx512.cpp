// The CRF lane kernels for AVX-512 (16 lanes). Compiled for AVX-512 by the pragma below whatever
// the build's -march, and called only where crf_lanes_avx2.cpp's kernels() found AVX-512 at run
// time. Standard headers come before the pragma so that nothing they define inline is compiled
// for AVX-512 (see crf_lanes_impl.h on linkage).
#include <immintrin.h>

#include <cstddef>
#include <cstdint>

#include "cpu/crf_lanes.h"

#pragma GCC push_options
#pragma GCC diagnostic push
// GCC 12 reports its own _mm512_undefined_* idiom inside the unpack / shuffle intrinsics of
// transpose (crf_lanes_vec.h) as maybe-uninitialized once the Viterbi kernel inlines it (as in
// rnn_gemm_avx512_bf16.cpp).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,fma")
#define FASTNER_LANES 16
#include "cpu/crf_lanes_impl.h"
#include "cpu/crf_lanes_kbest.h"
#pragma GCC diagnostic pop
#pragma GCC pop_options

namespace fastner::cpu::crf {
namespace lanes {

const Kernels& avx512_kernels() {
  static const Kernels table{"avx512", W, scratch_floats, forward, backward, viterbi,
                             kbest_scratch_floats, kbest};
  return table;
}

}  // namespace lanes
}  // namespace fastner::cpu::crf
