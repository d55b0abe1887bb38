// Lane kernels of the float32 CRF on CPU: the sequences of a batch side by side, one per lane of
// a vector register (a "group" of width() sequences), so that every instruction of a step serves
// width() sequences. Used by csrc/cpu/crf.cpp for float32 (and float16/bfloat16) emissions; the
// per-sequence kernels (crf_sequence.h) stay the float64 path and the exact fallback.
//
// Why lanes over sequences rather than over tags: at NER sizes (K around 9-20) a row of K tags
// fills one or two vectors and leaves most lanes idle, while a batch offers 16-32 sequences that
// run the same recursion. With the sequences in lanes the transition tables become scalar
// broadcasts and a forward step is a plain [K] x [K, K] multiply-add per lane with no
// horizontal reductions.
//
// Forward and backward use the scaled recursion (probabilities normalised by their maximum every
// step, with the log of the normaliser carried in double), so a step costs K exps and K^2
// multiply-adds, no logs. A sequence for which some step's normaliser falls below kSafe (very
// wide score ranges, -inf constraints that leave little mass, non-finite emissions) is flagged
// in `trouble`: the caller recomputes it with the exact log-space kernel. Above kSafe, the mass
// lost to underflow (terms below ~1e-38 of the step's maximum) is at most ~1e-17 relative.
//
// This header is torch-free and holds only the interface; crf_lanes_impl.h holds the code,
// compiled once per instruction set (crf_lanes_avx2.cpp, crf_lanes_avx512.cpp).
#pragma once

#include <cstddef>
#include <cstdint>

namespace fastner::cpu::crf {
namespace lanes {

// The transition scores of one call, with the tables the scaled recursion uses. Every entry is
// finite or -inf (the caller takes the exact path otherwise).
struct Model {
  int64_t K = 0;
  const float* transitions = nullptr;    // [K, K] scores i -> j
  const float* start = nullptr;          // [K]
  const float* end = nullptr;            // [K]
  float tmax = 0, smax = 0, emax = 0;    // largest finite entry of each (0 when none is)
  const float* exp_transitions = nullptr;  // [K, K] exp(transitions - tmax), 0 where -inf
  const float* exp_start = nullptr;        // [K] exp(start - smax)
  const float* exp_end = nullptr;          // [K] exp(end - emax)
};

// Emissions (b, t, j) at data[b * stride_b + t * stride_t + j] (any layout with unit tag stride:
// [B, T, K] or a transposed [T, B, K]); lengths [B], each in [0, T]. order [B]: a permutation
// of the sequences, in decreasing length; group g runs the sequences order[g * width ..
// g * width + width), so that a group's lanes have similar lengths and few steps run idle
// (conll-like lengths at B = 32: ~40% fewer group steps than taking the batch in its order).
// Every b * stride_b must fit in int32 (gather indices).
struct Emissions {
  int64_t B = 0, T = 0;
  const float* data = nullptr;
  int64_t stride_b = 0, stride_t = 0;
  const int64_t* lengths = nullptr;
  const int64_t* order = nullptr;
};

// Where a kernel writes per-(b, t) rows of K floats: (b, t, j) at data[b * stride_b + t * stride_t + j].
struct Rows {
  float* data = nullptr;
  int64_t stride_b = 0, stride_t = 0;
  bool fits_int32 = false;  // every b * stride_b fits in int32 (lets AVX-512 scatter)
};

struct Kernels {
  const char* isa;  // "avx512" or "avx2"
  int width;        // sequences per group (Emissions::order says which)
  // Floats of scratch one group needs (any alignment; the kernels align it themselves).
  size_t (*scratch_floats)(int64_t K, int64_t T);

  // log Z of the group's sequences (0 for length 0). Sets trouble[b] = 1 for a sequence whose
  // log Z it cannot vouch for (and leaves trouble[b] untouched otherwise).
  void (*forward)(const Model& model, const Emissions& em, int64_t group, float* log_z,
                  uint8_t* trouble, float* scratch);

  // Gradient of sum_b weight[b] * log Z_b: writes weight[b] * marginals into grad for every
  // (b, t < T) of the group (zeros past each length), and the group's sums of the pairwise
  // marginals into pairs [K, K] (still to be multiplied by exp_transitions), of the first-step
  // marginals into start_sums [K] and of the last-step marginals into end_sums [K]. Troubled sequences (flagged as by forward)
  // add nothing to the sums; their grad rows are left for the caller to overwrite. When log_z
  // is given it also receives log Z, as from forward (the pass is computed here anyway).
  // pairs, start_sums and end_sums may all be null: the marginals only (weight 1), no sums.
  void (*backward)(const Model& model, const Emissions& em, int64_t group, const float* weight,
                   int64_t weight_stride, const Rows& grad, float* pairs, float* start_sums,
                   float* end_sums, uint8_t* trouble, float* log_z, float* scratch);

  // Best path of each sequence of the group: tags [B, T] (-1 past each length) and its score
  // [B] (0 for length 0). Max-plus needs no scaling, so there is no trouble case; ties go to
  // the lowest tag, as in the per-sequence kernel. Sets nonfinite[b] = 1 for a sequence with a
  // NaN or +inf emission inside its length (and leaves nonfinite[b] untouched otherwise): the
  // caller's NaN / +inf propagation (crf_gold_nan.h) need not read the emissions again.
  void (*viterbi)(const Model& model, const Emissions& em, int64_t group, int64_t* tags,
                  float* scores, uint8_t* nonfinite, float* scratch);

  // Floats of scratch one group of kbest needs.
  size_t (*kbest_scratch_floats)(int64_t K, int64_t T, int64_t k);
  // The k best paths of each sequence of the group, best first, as the per-sequence kernel
  // finds them (the same candidates in the same order, ties to the one offered first): tags
  // [B, k, T] (-1 past each length and in the rows of paths that do not exist), scores [B, k]
  // (-inf for those; one path of score 0 for a sequence of length 0).
  void (*kbest)(const Model& model, const Emissions& em, int64_t group, int64_t k, int64_t* tags,
                float* scores, float* scratch);
};

// The kernels for this CPU's instruction set (csrc/cpu/cpu_isa.h: AVX-512 where it has AVX-512
// F/DQ/BW/VL, else AVX2; FASTNER_CPU_ISA=avx2 forces AVX2).
const Kernels& kernels();

// Per instruction set (defined in crf_lanes_avx2.cpp / crf_lanes_avx512.cpp).
const Kernels& avx2_kernels();
const Kernels& avx512_kernels();

}  // namespace lanes
}  // namespace fastner::cpu::crf
