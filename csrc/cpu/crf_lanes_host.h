// The torch side of the float32 lane kernels (csrc/cpu/crf_lanes.h): the per-call model tables,
// the layout test, per-thread scratch, the batch in length order and the calls that run every
// group and hand the sequences the lanes flag back to the caller (csrc/cpu/crf.cpp) for the
// exact per-sequence kernels. Each lane_* function has a double overload that declines.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <optional>
#include <vector>

#include "cpu/crf_lanes.h"
#include "cpu/crf_math.h"
#include "cpu/crf_sequence.h"

namespace fastner::cpu::crf {

using at::Tensor;

// ---- the float32 lane path (csrc/cpu/crf_lanes.h) ------------------------------------------

// lanes::Model of one call, with the tables it points to.
struct LaneModel {
  lanes::Model model;
  std::vector<float> own_transitions, own_start, own_end;  // what model.transitions/start/end point to
  std::vector<float> exp_transitions, exp_start, exp_end;
  bool usable = true;  // false when a score is NaN or +inf: the exact path handles those

  // Largest finite entry (0 when none is); clears usable on NaN or +inf. Vectorised: these
  // tables are rebuilt on every call, and scalar loops over K^2 entries showed up as ~5 us.
  float largest_finite(const float* x, int64_t n) {
    using V = Simd<float>::V;
    using I = Simd<float>::I;
    const float inf = std::numeric_limits<float>::infinity();
    V best = splat<V>(-inf);
    I bad{};
    for (int64_t k = 0; k < n; k += 8) {
      V v = splat<V>(-inf);
      std::memcpy(&v, x + k, std::min<int64_t>(8, n - k) * sizeof(float));
      bad |= (v != v) | (v == inf);
      best = (v > best) & (v != inf) ? v : best;
    }
    for (int l = 0; l < 8; ++l) usable = usable && bad[l] == 0;
    const float top = hmax(best);
    return top == -inf ? 0.0f : top;
  }

  static void copy_of(const Tensor& t, std::vector<float>& out) {
    const Tensor dense = t.contiguous();
    out.assign(dense.const_data_ptr<float>(), dense.const_data_ptr<float>() + dense.numel());
  }

  // exp(x - shift), 0 where x is -inf (crf_math.h's vector exp, ~1 ulp).
  static void exp_shifted(const float* x, int64_t n, float shift, std::vector<float>& out) {
    using V = Simd<float>::V;
    out.resize(n);
    for (int64_t k = 0; k < n; k += 8) {
      const int64_t m = std::min<int64_t>(8, n - k);
      V v{};
      std::memcpy(&v, x + k, m * sizeof(float));
      const V y = exp_v(v - shift);
      std::memcpy(out.data() + k, &y, m * sizeof(float));
    }
  }

  // transitions [K, K], start, end [K]: float32, any layout. The model points into copies held
  // here (a LaneModel never points into a caller's tensor, temporary or not).
  LaneModel(const Tensor& transitions_in, const Tensor& start_in, const Tensor& end_in) {
    const int64_t K = transitions_in.size(0);
    copy_of(transitions_in, own_transitions);
    copy_of(start_in, own_start);
    copy_of(end_in, own_end);
    model.K = K;
    model.transitions = own_transitions.data();
    model.start = own_start.data();
    model.end = own_end.data();
    model.tmax = largest_finite(model.transitions, K * K);
    model.smax = largest_finite(model.start, K);
    model.emax = largest_finite(model.end, K);
    exp_shifted(model.transitions, K * K, model.tmax, exp_transitions);
    exp_shifted(model.start, K, model.smax, exp_start);
    exp_shifted(model.end, K, model.emax, exp_end);
    model.exp_transitions = exp_transitions.data();
    model.exp_start = exp_start.data();
    model.exp_end = exp_end.data();
  }
};

// Whether the lane kernels serve these float32 emissions: a batch large enough to fill some
// lanes, unit tag stride, and sequence offsets that fit 32-bit gather indices (a group may take
// any sequences of the batch: LaneBatch).
inline bool lane_layout(const Tensor& emissions) {
  // Below 3 sequences a group of mostly idle lanes costs more than the per-sequence kernel
  // (T=40, K=17, one thread: forward-backward 16.5 vs 25.6 us at B=1, 27.2 vs 25.9 at B=3).
  constexpr int64_t kMinBatch = 3;
  return emissions.scalar_type() == at::kFloat && emissions.size(0) >= kMinBatch &&
         emissions.stride(2) == 1 &&
         emissions.stride(0) >= 0 && emissions.stride(1) >= 0 &&
         emissions.stride(0) * emissions.size(0) < (int64_t(1) << 31);
}

// The batch as the lane kernels read it, its sequences in decreasing length (em.order points
// into `order`, held here: a LaneBatch is neither copied nor moved).
struct LaneBatch {
  std::vector<int64_t> order;
  lanes::Emissions em;

  LaneBatch(const Tensor& emissions, const int64_t* len)
      : order(by_length(len, 0, emissions.size(0))) {
    em.B = emissions.size(0);
    em.T = emissions.size(1);
    em.data = emissions.const_data_ptr<float>();
    em.stride_b = emissions.stride(0);
    em.stride_t = emissions.stride(1);
    em.lengths = len;
    em.order = order.data();
  }
  LaneBatch(const LaneBatch&) = delete;
  LaneBatch& operator=(const LaneBatch&) = delete;
};

inline lanes::Rows lane_rows(float* data, int64_t stride_b, int64_t stride_t, int64_t B) {
  return lanes::Rows{data, stride_b, stride_t, stride_b * B < (int64_t(1) << 31)};
}

inline int64_t num_groups(int64_t B) {
  const int64_t width = lanes::kernels().width;
  return (B + width - 1) / width;
}

// Scratch of the calling thread, kept between calls up to 4 MB: a fresh zeroed ~100 KB vector
// per call costs more than a whole small-batch forward pass (malloc, memset, page faults).
// Larger requests (thousands of steps) get a buffer of their own, freed after the call.
constexpr size_t kKeptScratchFloats = size_t(1) << 20;

template <typename Fn>
void with_scratch(size_t floats, const Fn& fn) {
  if (floats > kKeptScratchFloats) {
    std::vector<float> buffer(floats);
    fn(buffer.data());
    return;
  }
  thread_local std::vector<float> kept;
  if (kept.size() < floats) kept.resize(floats);
  fn(kept.data());
}

// The groups each thread runs: groups come in decreasing length (LaneBatch) and cost about
// their longest sequence's steps, so at::parallel_for's contiguous chunks would hand the first
// thread the longest ones (B = 1024, T = 40, uniform lengths: ~3x the second thread's work).
// Longest first to the least loaded thread instead; ties to the lower thread, so the plan is a
// function of the lengths and the thread count only.
inline std::vector<std::vector<int64_t>> balanced_groups(const lanes::Emissions& em,
                                                         int64_t threads) {
  const int64_t width = lanes::kernels().width, groups = num_groups(em.B);
  std::vector<std::vector<int64_t>> plan(threads);
  std::vector<int64_t> load(threads, 0);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
    plan[t].push_back(g);
    load[t] += em.lengths[em.order[g * width]] + 1;  // + 1: a group's fixed cost
  }
  return plan;
}

// Runs fn(group, scratch) over every group of the batch, each thread its balanced share, with
// `floats` of scratch (the kernels' scratch_floats(K, T) unless given). Groups write disjoint
// outputs (per-group sums are added by the caller in group order), so results do not depend on
// the thread count.
template <typename Fn>
void for_each_group(const lanes::Emissions& em, int64_t K, const Fn& fn, size_t floats = 0) {
  const lanes::Kernels& k = lanes::kernels();
  if (floats == 0) floats = k.scratch_floats(K, em.T);
  const int64_t groups = num_groups(em.B);
  const int64_t threads = at::in_parallel_region() ? 1 : std::min<int64_t>(at::get_num_threads(), groups);
  if (threads <= 1) {
    with_scratch(floats, [&](float* scratch) {
      for (int64_t group = 0; group < groups; ++group) fn(group, scratch);
    });
    return;
  }
  const std::vector<std::vector<int64_t>> plan = balanced_groups(em, threads);
  // One index per thread: parallel_for splits [0, threads) into chunks of one.
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t stop) {
    with_scratch(floats, [&](float* scratch) {
      for (int64_t t = begin; t < stop; ++t) {
        for (int64_t group : plan[t]) fn(group, scratch);
      }
    });
  });
}

inline bool all_sequences(int64_t B, std::vector<int64_t>& exact) {
  exact.resize(B);
  std::iota(exact.begin(), exact.end(), int64_t(0));
  return false;
}

inline std::vector<int64_t> flagged(const std::vector<uint8_t>& trouble) {
  std::vector<int64_t> out;
  for (size_t b = 0; b < trouble.size(); ++b) {
    if (trouble[b]) out.push_back(static_cast<int64_t>(b));
  }
  return out;
}

// Whether the float32 lane kernels serve this call: a readable layout (lane_layout) and no NaN
// or +inf score (LaneModel::usable). Builds their tables into `model` when they do; otherwise
// lists every sequence in `exact`, for the exact per-sequence kernels.
inline bool lanes_serve(const Tensor& emissions, const Tensor& transitions, const Tensor& start,
                        const Tensor& end, std::optional<LaneModel>& model,
                        std::vector<int64_t>& exact) {
  if (lane_layout(emissions)) {
    model.emplace(transitions, start, end);
    if (model->usable) return true;
  }
  all_sequences(emissions.size(0), exact);
  return false;
}

// The lane kernels' log Z where they serve (float32, readable layout, no NaN/+inf score):
// returns true and lists in `exact` the sequences they could not vouch for. Otherwise returns
// false and lists every sequence. The double overload always declines.
inline bool lane_forward(const Tensor& emissions, const int64_t* len, const Tensor& transitions,
                  const Tensor& start, const Tensor& end, float* log_z,
                  std::vector<int64_t>& exact) {
  std::optional<LaneModel> lane_model;
  if (!lanes_serve(emissions, transitions, start, end, lane_model, exact)) return false;
  const int64_t B = emissions.size(0), K = emissions.size(2);
  const lanes::Kernels& k = lanes::kernels();
  const LaneBatch batch(emissions, len);
  std::vector<uint8_t> trouble(B, 0);
  for_each_group(batch.em, K, [&](int64_t group, float* scratch) {
    k.forward(lane_model->model, batch.em, group, log_z, trouble.data(), scratch);
  });
  exact = flagged(trouble);
  return true;
}

inline bool lane_forward(const Tensor& emissions, const int64_t*, const Tensor&, const Tensor&,
                  const Tensor&, double*, std::vector<int64_t>& exact) {
  return all_sequences(emissions.size(0), exact);
}

// The lane kernels' backward where they serve (as lane_forward): writes the gradient rows
// (grad: (b, t, j) at grad[b * grad_b + t * grad_t + j]) and
// adds the sums of the pairwise, first-step and last-step marginals (in final form) to
// transitions_sum [K, K], start_sum [K] and end_sum [K]; lists in `exact` the sequences left
// to the exact kernel (all of them when the lanes decline).
inline void lane_backward(const Tensor& emissions, const int64_t* len, const Tensor& transitions,
                   const Tensor& start, const Tensor& end, const float* gz, int64_t gz_stride,
                   float* grad, int64_t grad_b, int64_t grad_t, float* transitions_sum,
                   float* start_sum, float* end_sum, float* log_z, std::vector<int64_t>& exact) {
  std::optional<LaneModel> lane_model;
  if (!lanes_serve(emissions, transitions, start, end, lane_model, exact)) return;
  const int64_t B = emissions.size(0), K = emissions.size(2);
  const lanes::Kernels& k = lanes::kernels();
  const int64_t groups = num_groups(B);
  // Per group sums (each group writes its own), added in group order: the result does not
  // depend on the thread count.
  std::vector<float> sums(groups * (K * K + 2 * K));
  float* pairs = sums.data();
  float* starts = pairs + groups * K * K;
  float* ends = starts + groups * K;
  const LaneBatch batch(emissions, len);
  const lanes::Rows rows = lane_rows(grad, grad_b, grad_t, B);
  std::vector<uint8_t> trouble(B, 0);
  for_each_group(batch.em, K, [&](int64_t g, float* scratch) {
    k.backward(lane_model->model, batch.em, g, gz, gz_stride, rows, pairs + g * K * K,
               starts + g * K, ends + g * K, trouble.data(), log_z, scratch);
  });
  exact = flagged(trouble);
  const float* E = lane_model->model.exp_transitions;
  for (int64_t n = 0; n < K * K; ++n) {
    float total = 0;
    for (int64_t g = 0; g < groups; ++g) total += pairs[g * K * K + n];
    // Forbidden transitions (E = 0) get exactly 0.
    if (E[n] != 0.0f) transitions_sum[n] += E[n] * total;
  }
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t j = 0; j < K; ++j) {
      start_sum[j] += starts[g * K + j];
      end_sum[j] += ends[g * K + j];
    }
  }
}

inline void lane_backward(const Tensor& emissions, const int64_t*, const Tensor&, const Tensor&,
                   const Tensor&, const double*, int64_t, double*, int64_t, int64_t, double*, double*,
                   double*, double*, std::vector<int64_t>& exact) {
  all_sequences(emissions.size(0), exact);
}

// Posterior marginals by the lane kernels where they serve (as lane_forward): writes the rows of
// the sequences they vouch for into marginals ([B, T, K] contiguous) and lists the others in
// `exact` (all of them when the lanes decline).
inline void lane_marginals(const Tensor& emissions, const int64_t* len, const Tensor& transitions,
                           const Tensor& start, const Tensor& end, float* marginals,
                           std::vector<int64_t>& exact) {
  std::optional<LaneModel> lane_model;
  if (!lanes_serve(emissions, transitions, start, end, lane_model, exact)) return;
  const int64_t B = emissions.size(0), T = emissions.size(1), K = emissions.size(2);
  const lanes::Kernels& k = lanes::kernels();
  const LaneBatch batch(emissions, len);
  const lanes::Rows rows = lane_rows(marginals, T * K, K, B);
  const float one = 1.0f;  // every sequence weighs 1: the gradient of log Z is the marginals
  std::vector<uint8_t> trouble(B, 0);
  for_each_group(batch.em, K, [&](int64_t g, float* scratch) {
    k.backward(lane_model->model, batch.em, g, &one, 0, rows, nullptr, nullptr, nullptr,
               trouble.data(), nullptr, scratch);
  });
  exact = flagged(trouble);
}

inline void lane_marginals(const Tensor& emissions, const int64_t*, const Tensor&, const Tensor&,
                           const Tensor&, double*, std::vector<int64_t>& exact) {
  all_sequences(emissions.size(0), exact);
}

// The model of the max-plus kernels (Viterbi, k-best): the scores as they are, no exp tables.
// transitions [K, K], start, end [K]: contiguous float32 tensors the caller holds for the call.
inline lanes::Model max_plus_model(const Tensor& transitions, const Tensor& start, const Tensor& end) {
  lanes::Model model;
  model.K = transitions.size(0);
  model.transitions = transitions.data_ptr<float>();
  model.start = start.data_ptr<float>();
  model.end = end.data_ptr<float>();
  return model;
}

// Viterbi by the lane kernels where the layout allows (float32 only): max-plus is exact in any
// range, and NaN/inf scores meet the same comparisons as in the per-sequence kernel. Lists in
// `nonfinite` the sequences with a NaN or +inf emission inside their length.
inline bool lane_viterbi(const Tensor& emissions, const int64_t* len, const Tensor& transitions,
                  const Tensor& start, const Tensor& end, int64_t* tags, float* scores,
                  std::vector<int64_t>& nonfinite) {
  if (!lane_layout(emissions)) return false;
  const int64_t B = emissions.size(0), K = emissions.size(2);
  const lanes::Kernels& k = lanes::kernels();
  const lanes::Model model = max_plus_model(transitions, start, end);
  const LaneBatch batch(emissions, len);
  std::vector<uint8_t> flags(B, 0);
  for_each_group(batch.em, K, [&](int64_t group, float* scratch) {
    k.viterbi(model, batch.em, group, tags, scores, flags.data(), scratch);
  });
  nonfinite = flagged(flags);
  return true;
}

inline bool lane_viterbi(const Tensor&, const int64_t*, const Tensor&, const Tensor&, const Tensor&,
                  int64_t*, double*, std::vector<int64_t>&) {
  return false;
}

// k-best Viterbi by the lane kernels where the layout allows (float32 only; max-plus needs no
// fallback): tags [B, k, T] and scores [B, k], contiguous.
inline bool lane_kbest(const Tensor& emissions, const int64_t* len, const Tensor& transitions,
                       const Tensor& start, const Tensor& end, int64_t k, int64_t* tags,
                       float* scores) {
  if (!lane_layout(emissions)) return false;
  const int64_t K = emissions.size(2);
  const lanes::Kernels& kernels = lanes::kernels();
  const lanes::Model model = max_plus_model(transitions, start, end);
  const LaneBatch batch(emissions, len);
  for_each_group(batch.em, K, [&](int64_t group, float* scratch) {
    kernels.kbest(model, batch.em, group, k, tags, scores, scratch);
  }, kernels.kbest_scratch_floats(K, batch.em.T, k));
  return true;
}

inline bool lane_kbest(const Tensor&, const int64_t*, const Tensor&, const Tensor&, const Tensor&,
                       int64_t, int64_t*, double*) {
  return false;
}

}  // namespace fastner::cpu::crf
