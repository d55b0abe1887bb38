// The CRF ops on CPU (schemas and conventions: csrc/fastner.cpp): argument checks, the choice of
// strategy per call, and the registration. Strategies:
//   * lanes (csrc/cpu/crf_lanes.h, crf_lanes_host.h): float32 batches of >= 3 sequences, the
//     sequences side by side in vector lanes, in length order;
//   * per sequence (csrc/cpu/crf_sequence.h, crf_sequence_decode.h): float64, small batches,
//     and the sequences the lanes flag (their normaliser underflowed), in exact log space.
// Shared batch terms (gold path, NaN and +inf propagation): csrc/cpu/crf_gold_nan.h.
// Parallel over the batch (at::parallel_for); results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <optional>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/crf_gold_nan.h"
#include "cpu/crf_lanes_host.h"
#include "cpu/crf_sequence.h"
#include "cpu/crf_sequence_decode.h"

namespace fastner::cpu::crf {
namespace {

// ---- input checks -------------------------------------------------------------------------

at::ScalarType accumulate_type(at::ScalarType emissions) {
  return emissions == at::kDouble ? at::kDouble : at::kFloat;
}

// The shared metadata checks (csrc/checks.h), then every CPU-specific rule: the data on the CPU
// and 0 <= lengths[b] <= T. Returns the contiguous lengths the values were read from: callers
// read their `len` pointer from this tensor, which they hold for the whole call.
Tensor check_inputs(const char* op, const Tensor& emissions, const Tensor& lengths,
                    const Tensor& transitions, const Tensor& start, const Tensor& end) {
  checks::crf_inputs(op, emissions, lengths, transitions, start, end);
  TORCH_CHECK_VALUE(emissions.device().is_cpu(), op, ": emissions must be on the CPU, got ",
                    emissions.device());
  return checks::lengths_in_range(op, lengths, emissions.size(1));
}

// Tags [B, T] int64 in any layout: every tag inside a length must lie in [0, K).
void check_tags(const char* op, const Tensor& tags, const int64_t* len, int64_t B, int64_t T,
                int64_t K) {
  TORCH_CHECK_VALUE(tags.dim() == 2 && tags.size(0) == B && tags.size(1) == T, op,
                    ": tags must be [B, T] = [", B, ", ", T, "], got ", tags.sizes());
  TORCH_CHECK_VALUE(tags.scalar_type() == at::kLong, op, ": tags must be int64, got ",
                    tags.scalar_type());
  TORCH_CHECK_VALUE(tags.device().is_cpu(), op, ": tags must be on the CPU (the emissions' device), got ",
                    tags.device());
  const int64_t* y = tags.const_data_ptr<int64_t>();
  const int64_t sb = tags.stride(0), st = tags.stride(1);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < len[b]; ++t) {
      const int64_t tag = y[b * sb + t * st];
      TORCH_CHECK_VALUE(tag >= 0 && tag < K, op, ": tags[", b, ", ", t, "] = ", tag,
                        " is outside [0, K = ", K, ")");
    }
  }
}

// Work a chunk of sequences should hold before another thread is worth waking.
int64_t grain(int64_t T, int64_t K) {
  const int64_t per_sequence = std::max<int64_t>(1, T * K * padded(K));
  return std::max<int64_t>(1, 200000 / per_sequence);
}
// The per-sequence kernels' tables of one call; transitions [K, K], start, end [K] contiguous.
template <typename scalar_t>
Transitions<scalar_t> tables(const Tensor& transitions, const Tensor& start, const Tensor& end,
                             typename Transitions<scalar_t>::Terms terms = Transitions<scalar_t>::Terms::LogAndExp) {
  return Transitions<scalar_t>(transitions.const_data_ptr<scalar_t>(),
                               start.const_data_ptr<scalar_t>(), end.const_data_ptr<scalar_t>(),
                               transitions.size(0), terms);
}

// log Z of a one-tag CRF (K = 1): the score of its only path, by gold_scores, so that a
// log-likelihood (gold - log Z) is exactly 0. The kernels' recursions sum the same scores in
// another order and precision (the lanes' per-step shifts and the per-sequence kernel's offset
// in double, gold_scores in scalar_t, one rounding per step), which gave float32
// log-likelihoods up to 4.8e-7 off at T = 10 with unit scores (7.6e-6 at T = 40, scores ~3).
// The gradients were exact already (every marginal exactly 1).
template <typename scalar_t>
void only_path_log_z(const Tensor& emissions, const int64_t* len, const Tensor& transitions,
                     const Tensor& start, const Tensor& end, scalar_t* out) {
  const Tensor tags = at::zeros({1, 1}, emissions.options().dtype(at::kLong))
                          .expand({emissions.size(0), emissions.size(1)});
  gold_scores<scalar_t>(emissions, tags, len, transitions.const_data_ptr<scalar_t>(),
                        start.const_data_ptr<scalar_t>(), end.const_data_ptr<scalar_t>(), out);
}

// A fresh zero-filled CPU tensor: at::zeros without its zero_() dispatch and TensorIterator
// (~0.6 us each, four per training step at NER sizes). All-zero bytes are +0.0.
Tensor zeroed(at::IntArrayRef sizes, const at::TensorOptions& options) {
  Tensor t = at::empty(sizes, options);
  // (An empty tensor's data pointer may be null, and memset of a null pointer is undefined
  // even for 0 bytes: UBSan's fuzz run stops there at B = 0.)
  if (t.nbytes() > 0) std::memset(t.data_ptr(), 0, t.nbytes());
  return t;
}

Tensor as_accumulate(const Tensor& emissions) {
  return emissions.to(accumulate_type(emissions.scalar_type())).contiguous();
}

// The CPU backward recomputes the forward pass it needs (for the lane kernels that is cheaper
// than writing and reading back [B, T, K] log values), so the forward saves nothing.
std::tuple<Tensor, Tensor> crf_forward_cpu(const Tensor& emissions_in,
                                                    const std::optional<Tensor>& tags_in,
                                                    const Tensor& lengths_in,
                                                    const Tensor& transitions_in,
                                                    const Tensor& start_in, const Tensor& end_in) {
  const Tensor lengths = check_inputs("crf_forward", emissions_in, lengths_in, transitions_in, start_in, end_in);
  const auto acc_type = accumulate_type(emissions_in.scalar_type());
  const Tensor emissions = emissions_in.to(acc_type);  // keeps the layout
  const int64_t B = emissions.size(0), T = emissions.size(1), K = emissions.size(2);
  const int64_t* len = lengths.data_ptr<int64_t>();
  if (tags_in.has_value()) check_tags("crf_forward", *tags_in, len, B, T, K);
  Tensor log_z = at::empty({B}, emissions.options());
  Tensor gold = zeroed({B}, emissions.options());
  std::vector<int64_t> exact;  // sequences for the exact kernel (all when the lanes decline)
  AT_DISPATCH_FLOATING_TYPES(acc_type, "crf_forward", [&] {
    const Tensor transitions = transitions_in.contiguous(), start = start_in.contiguous(),
                 end = end_in.contiguous();
    if (tags_in.has_value()) {
      gold_scores<scalar_t>(emissions, *tags_in, len, transitions.data_ptr<scalar_t>(),
                            start.data_ptr<scalar_t>(), end.data_ptr<scalar_t>(),
                            gold.data_ptr<scalar_t>());
    }
    scalar_t* log_z_out = log_z.data_ptr<scalar_t>();
    if (K == 1) return only_path_log_z<scalar_t>(emissions, len, transitions, start, end, log_z_out);
    if (lane_forward(emissions, len, transitions, start, end, log_z_out, exact) && exact.empty()) return;
    const Transitions<scalar_t> tr = tables<scalar_t>(transitions, start, end);
    const Tensor dense = emissions.contiguous();
    const scalar_t* em = dense.data_ptr<scalar_t>();
    at::parallel_for(0, static_cast<int64_t>(exact.size()), grain(T, K),
                     [&](int64_t begin, int64_t stop) {
      std::vector<int64_t> part(exact.begin() + begin, exact.begin() + stop);
      std::stable_sort(part.begin(), part.end(),
                       [len](int64_t x, int64_t y) { return len[x] > len[y]; });
      exact_log_z(tr, em, len, T, part, log_z_out);
    });
  });
  AT_DISPATCH_FLOATING_TYPES(acc_type, "crf_forward", [&] {
    propagate_poison(poisoned_sequences<scalar_t>(emissions, len, transitions_in, start_in, end_in, exact),
                     len, &log_z, nullptr, {});
  });
  return {log_z, gold};
}

// grad_emissions in the emissions' own layout where it has unit tag stride (so a time-first
// caller gets a time-first gradient), else contiguous [B, T, K].
Tensor gradient_like(const Tensor& emissions) {
  Tensor grad = at::empty_like(emissions);
  return grad.stride(2) == 1 ? grad : at::empty(emissions.sizes(), emissions.options());
}

// Gradients of sum_b (grad_log_z[b] log Z_b + grad_gold[b] gold_b): the lane kernels where they
// serve, the exact per-sequence kernel for float64 and for the sequences the lanes flag, then
// the gold path's terms. The forward pass is recomputed here (crf_forward saves nothing); when
// log_z is given it receives log Z from that pass.
// Per-sequence weights of a gradient: a [B] tensor (read with its stride: autograd often hands
// in expanded, stride-0 gradients) or one constant for every sequence.
struct Weights {
  const Tensor* tensor = nullptr;
  double constant = 0;
};

std::tuple<Tensor, Tensor, Tensor, Tensor> gradients(
    const char* op, const Weights& log_z_weights, const Weights& gold_weights,
    const Tensor& emissions_in, const std::optional<Tensor>& tags_in, const Tensor& lengths_in,
    const Tensor& transitions_in, const Tensor& start_in, const Tensor& end_in, Tensor* log_z,
    Tensor* gold) {
  const Tensor lengths = check_inputs(op, emissions_in, lengths_in, transitions_in, start_in, end_in);
  const auto acc_type = accumulate_type(emissions_in.scalar_type());
  const Tensor emissions = emissions_in.to(acc_type);  // keeps the layout
  const int64_t B = emissions.size(0), T = emissions.size(1), K = emissions.size(2);
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (const Weights* w : {&log_z_weights, &gold_weights}) {
    TORCH_CHECK_VALUE(!w->tensor || (w->tensor->dim() == 1 && w->tensor->size(0) == B), op,
                      ": grad_log_z and grad_gold_score must be [B] = [", B, "], got ",
                      w->tensor->sizes());
    TORCH_CHECK_VALUE(!w->tensor || w->tensor->is_floating_point(), op,
                      ": grad_log_z and grad_gold_score must be floating point, got ",
                      w->tensor->scalar_type());
    if (w->tensor) checks::on_device(op, "grad_log_z / grad_gold_score", *w->tensor, emissions_in.device());
  }
  if (tags_in.has_value()) check_tags(op, *tags_in, len, B, T, K);
  if (log_z) *log_z = at::empty({B}, emissions.options());
  if (gold) *gold = at::empty({B}, emissions.options());  // gold_scores writes every entry
  const Tensor grad_log_z = log_z_weights.tensor ? log_z_weights.tensor->to(acc_type) : Tensor();
  const Tensor grad_gold = gold_weights.tensor ? gold_weights.tensor->to(acc_type) : Tensor();
  const int64_t gz_stride = grad_log_z.defined() ? grad_log_z.stride(0) : 0;
  const int64_t gg_stride = grad_gold.defined() ? grad_gold.stride(0) : 0;
  Tensor grad_emissions = gradient_like(emissions);
  Tensor grad_transitions = zeroed({K, K}, emissions.options());
  Tensor grad_start = zeroed({K}, emissions.options());
  Tensor grad_end = zeroed({K}, emissions.options());
  std::vector<int64_t> exact;  // sequences for the exact kernel (all when the lanes decline)
  AT_DISPATCH_FLOATING_TYPES(acc_type, "crf_backward", [&] {
    const Tensor transitions = transitions_in.contiguous(), start = start_in.contiguous(),
                 end = end_in.contiguous();
    const scalar_t log_z_constant = static_cast<scalar_t>(log_z_weights.constant);
    const scalar_t gold_constant = static_cast<scalar_t>(gold_weights.constant);
    const scalar_t* gz = grad_log_z.defined() ? grad_log_z.data_ptr<scalar_t>() : &log_z_constant;
    const scalar_t* gg = grad_gold.defined() ? grad_gold.data_ptr<scalar_t>() : &gold_constant;
    scalar_t* ge = grad_emissions.data_ptr<scalar_t>();
    const int64_t ge_b = grad_emissions.stride(0), ge_t = grad_emissions.stride(1);
    if (gold) {
      gold_scores<scalar_t>(emissions, *tags_in, len, transitions.data_ptr<scalar_t>(),
                            start.data_ptr<scalar_t>(), end.data_ptr<scalar_t>(),
                            gold->data_ptr<scalar_t>());
    }
    scalar_t* gt = grad_transitions.data_ptr<scalar_t>();
    scalar_t* gs = grad_start.data_ptr<scalar_t>();
    scalar_t* gend = grad_end.data_ptr<scalar_t>();
    scalar_t* log_z_out = log_z ? log_z->data_ptr<scalar_t>() : nullptr;
    lane_backward(emissions, len, transitions, start, end, gz, gz_stride, ge, ge_b, ge_t, gt, gs,
                  gend, log_z_out, exact);
    const int64_t KP = padded(K);
    // Sums of the exact kernel, one set per chunk of sequences (added in chunk order). Its
    // tables cost ~K^2 exps, so they are built only when it runs.
    std::vector<Accumulators<scalar_t>> accs;
    std::optional<Transitions<scalar_t>> exact_tables;
    if (!exact.empty()) {
      const Transitions<scalar_t>& tr = exact_tables.emplace(
          transitions.const_data_ptr<scalar_t>(), start.const_data_ptr<scalar_t>(),
          end.const_data_ptr<scalar_t>(), K);
      const Tensor dense = emissions.contiguous();
      const scalar_t* em = dense.data_ptr<scalar_t>();
      // The exact kernel writes contiguous [T, K] rows: straight into grad when it is
      // contiguous, else into a buffer copied over afterwards.
      const bool direct = grad_emissions.is_contiguous();
      Tensor buffer = direct ? grad_emissions : at::empty({B, T, K}, emissions.options());
      scalar_t* out = buffer.data_ptr<scalar_t>();
      const int64_t chunk = grain(T, K);
      const int64_t num_chunks = (static_cast<int64_t>(exact.size()) + chunk - 1) / chunk;
      accs.assign(num_chunks, Accumulators<scalar_t>(K, KP));
      at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
        for (int64_t c = chunk_begin; c < chunk_end; ++c) {
          const int64_t stop = std::min<int64_t>(exact.size(), (c + 1) * chunk);
          std::vector<int64_t> part(exact.begin() + c * chunk, exact.begin() + stop);
          std::stable_sort(part.begin(), part.end(),
                           [len](int64_t x, int64_t y) { return len[x] > len[y]; });
          exact_backward(tr, em, len, T, part, gz, gz_stride, out, accs[c], log_z_out);
        }
      });
      if (!direct) {
        for (int64_t b : exact) {
          for (int64_t t = 0; t < T; ++t) {
            std::copy(out + (b * T + t) * K, out + (b * T + t + 1) * K, ge + b * ge_b + t * ge_t);
          }
        }
      }
    }
    for (int64_t i = 0; i < K && !accs.empty(); ++i) {
      for (int64_t j = 0; j < K; ++j) {
        scalar_t scaled = 0, exact_sum = 0;
        for (const auto& acc : accs) {
          scaled += acc.scaled[i * KP + j];
          exact_sum += acc.exact[i * KP + j];
        }
        // Forbidden transitions (E = 0) get exactly 0 from the scaled part, and so do those no
        // sequence stepped through (scaled = 0): E is NaN or +inf for a NaN or +inf transition
        // score that only length-1 sequences met, which read none.
        const scalar_t e = exact_tables ? exact_tables->exp_row[i * KP + j] : scalar_t(0);
        const bool none = e == scalar_t(0) || scaled == scalar_t(0);
        gt[i * K + j] += (none ? scalar_t(0) : scaled * e) + exact_sum;
      }
    }
    for (int64_t j = 0; j < K; ++j) {
      for (const auto& acc : accs) {
        gs[j] += acc.start[j];
        gend[j] += acc.end[j];
      }
    }
    if (tags_in.has_value()) {
      add_gold_terms(*tags_in, len, gg, gg_stride, ge, ge_b, ge_t, gt, gs, gend, K);
    }
    if (K == 1 && log_z_out) only_path_log_z<scalar_t>(emissions, len, transitions, start, end, log_z_out);
  });
  AT_DISPATCH_FLOATING_TYPES(acc_type, "crf_gradients", [&] {
    propagate_poison(poisoned_sequences<scalar_t>(emissions, len, transitions_in, start_in, end_in, exact),
                     len, log_z, &grad_emissions, {&grad_transitions, &grad_start, &grad_end});
  });
  if (emissions_in.scalar_type() != acc_type) grad_emissions = grad_emissions.to(emissions_in.scalar_type());
  return {grad_emissions, grad_transitions, grad_start, grad_end};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> crf_backward_cpu(
    const Tensor& grad_log_z, const Tensor& grad_gold, const Tensor& emissions,
    const std::optional<Tensor>& tags, const Tensor& lengths, const Tensor& transitions,
    const Tensor& start, const Tensor& end) {
  return gradients("crf_backward", Weights{&grad_log_z}, Weights{&grad_gold}, emissions, tags,
                   lengths, transitions, start, end, nullptr, nullptr);
}

// sum_b (gold_b - log Z_b) and its gradients in one call: what a training step needs, without
// a second pass over the emissions or a second op call in backward.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> crf_forward_backward_cpu(
    const Tensor& emissions, const Tensor& tags, const Tensor& lengths, const Tensor& transitions,
    const Tensor& start, const Tensor& end) {
  Tensor log_z, gold;
  auto [grad_emissions, grad_transitions, grad_start, grad_end] =
      gradients("crf_forward_backward", Weights{nullptr, -1.0}, Weights{nullptr, 1.0}, emissions,
                tags, lengths, transitions, start, end, &log_z, &gold);
  Tensor log_likelihood = at::empty({}, log_z.options());
  AT_DISPATCH_FLOATING_TYPES(log_z.scalar_type(), "crf_forward_backward", [&] {
    const scalar_t* lz = log_z.data_ptr<scalar_t>();
    const scalar_t* g = gold.data_ptr<scalar_t>();
    double total = 0;  // in double: B terms of similar size
    for (int64_t b = 0; b < log_z.size(0); ++b) total += static_cast<double>(g[b]) - lz[b];
    *log_likelihood.data_ptr<scalar_t>() = static_cast<scalar_t>(total);
  });
  return {log_likelihood, grad_emissions, grad_transitions, grad_start, grad_end};
}

// ---- marginals ------------------------------------------------------------------------------

Tensor crf_marginals_cpu(const Tensor& emissions_in, const Tensor& lengths_in,
                         const Tensor& transitions_in, const Tensor& start_in,
                         const Tensor& end_in) {
  const Tensor lengths = check_inputs("crf_marginals", emissions_in, lengths_in, transitions_in, start_in, end_in);
  const Tensor emissions = as_accumulate(emissions_in);
  const int64_t B = emissions.size(0), T = emissions.size(1), K = emissions.size(2);
  Tensor marginals = at::empty({B, T, K}, emissions.options());
  AT_DISPATCH_FLOATING_TYPES(emissions.scalar_type(), "crf_marginals", [&] {
    const Tensor transitions = transitions_in.contiguous(), start = start_in.contiguous(),
                 end = end_in.contiguous();
    const int64_t* len = lengths.data_ptr<int64_t>();
    scalar_t* out = marginals.data_ptr<scalar_t>();
    std::vector<int64_t> exact;  // sequences for the exact kernel (all when the lanes decline)
    lane_marginals(emissions, len, transitions, start, end, out, exact);
    if (!exact.empty()) {
      const Transitions<scalar_t> tr = tables<scalar_t>(transitions, start, end);
      const scalar_t* em = emissions.const_data_ptr<scalar_t>();
      const int64_t count = static_cast<int64_t>(exact.size());
      at::parallel_for(0, count, grain(T, K), [&](int64_t begin, int64_t stop) {
        std::vector<scalar_t> work(8 * tr.KP);
        std::vector<scalar_t> alphas(T * K);
        for (int64_t n = begin; n < stop; ++n) {
          const int64_t b = exact[n];
          marginals_sequence(tr, em + b * T * K, len[b], T, scalar_t(1), alphas.data(),
                             out + b * T * K, work.data());
        }
      });
    }
    propagate_decoded(poisoned_sequences<scalar_t>(emissions, len, transitions, start, end, all_sequences(B)),
                      len, nullptr, nullptr, &marginals);
  });
  return marginals;
}


std::tuple<Tensor, Tensor> crf_viterbi_cpu(const Tensor& emissions_in, const Tensor& lengths_in,
                                           const Tensor& transitions_in, const Tensor& start_in,
                                           const Tensor& end_in) {
  const Tensor lengths = check_inputs("crf_viterbi", emissions_in, lengths_in, transitions_in, start_in, end_in);
  const auto acc_type = accumulate_type(emissions_in.scalar_type());
  const Tensor emissions = emissions_in.to(acc_type);  // keeps the layout
  const int64_t B = emissions.size(0), T = emissions.size(1), K = emissions.size(2);
  const int64_t* len = lengths.data_ptr<int64_t>();
  Tensor tags = at::empty({B, T}, lengths.options());
  Tensor scores = at::empty({B}, emissions.options());
  AT_DISPATCH_FLOATING_TYPES(acc_type, "crf_viterbi", [&] {
    const Tensor transitions = transitions_in.contiguous(), start = start_in.contiguous(),
                 end = end_in.contiguous();
    int64_t* tags_out = tags.data_ptr<int64_t>();
    scalar_t* scores_out = scores.data_ptr<scalar_t>();
    // The sequences that may meet a NaN or +inf score: those the lane kernel saw read a NaN or
    // +inf emission (one pass over the emissions fewer: ~5% of a B = 32 call), else all.
    std::vector<int64_t> candidates;
    if (lane_viterbi(emissions, len, transitions, start, end, tags_out, scores_out, candidates)) {
      if (scores_poisoned<scalar_t>(transitions, start, end)) candidates = all_sequences(B);
    } else {
      const Transitions<scalar_t> tr = tables<scalar_t>(transitions, start, end, Transitions<scalar_t>::Terms::Log);
      const Tensor dense = emissions.contiguous();
      const scalar_t* em = dense.data_ptr<scalar_t>();
      at::parallel_for(0, B, grain(T, K), [&](int64_t begin, int64_t stop) {
        if (K <= 256) {
          viterbi_range<scalar_t, uint8_t>(tr, em, len, T, begin, stop, tags_out, scores_out);
        } else {
          viterbi_range<scalar_t, int32_t>(tr, em, len, T, begin, stop, tags_out, scores_out);
        }
      });
      candidates = all_sequences(B);
    }
    propagate_decoded(poisoned_sequences<scalar_t>(emissions, len, transitions, start, end, candidates),
                      len, &scores, nullptr, nullptr);
  });
  return {tags, scores};
}


std::tuple<Tensor, Tensor> crf_kbest_cpu(const Tensor& emissions_in, const Tensor& lengths_in,
                                         const Tensor& transitions_in, const Tensor& start_in,
                                         const Tensor& end_in, int64_t k) {
  const Tensor lengths = check_inputs("crf_kbest", emissions_in, lengths_in, transitions_in, start_in, end_in);
  TORCH_CHECK_VALUE(k >= 1, "crf_kbest: k must be >= 1, got ", k);
  const auto acc_type = accumulate_type(emissions_in.scalar_type());
  const Tensor emissions = emissions_in.to(acc_type);  // keeps the layout
  const int64_t B = emissions.size(0), T = emissions.size(1), K = emissions.size(2);
  Tensor tags = at::empty({B, k, T}, lengths.options());
  Tensor scores = at::empty({B, k}, emissions.options());
  AT_DISPATCH_FLOATING_TYPES(acc_type, "crf_kbest", [&] {
    const Tensor transitions = transitions_in.contiguous(), start = start_in.contiguous(),
                 end = end_in.contiguous();
    const int64_t* len = lengths.data_ptr<int64_t>();
    int64_t* tags_out = tags.data_ptr<int64_t>();
    scalar_t* scores_out = scores.data_ptr<scalar_t>();
    if (!lane_kbest(emissions, len, transitions, start, end, k, tags_out, scores_out)) {
      const Transitions<scalar_t> tr = tables<scalar_t>(transitions, start, end, Transitions<scalar_t>::Terms::Log);
      const Tensor dense = emissions.contiguous();
      const scalar_t* em = dense.const_data_ptr<scalar_t>();
      at::parallel_for(0, B, std::max<int64_t>(1, grain(T, K) / k), [&](int64_t begin, int64_t stop) {
        std::vector<scalar_t> cur(K * k), next(K * k), final_score(k);
        std::vector<int32_t> prev_tag(T * K * k), prev_rank(T * K * k), final_tag(k), final_rank(k);
        for (int64_t b = begin; b < stop; ++b) {
          kbest_sequence(tr, em + b * T * K, len[b], T, k, tags_out + b * k * T, scores_out + b * k,
                         cur.data(), next.data(), prev_tag.data(), prev_rank.data(),
                         final_score.data(), final_tag.data(), final_rank.data());
        }
      });
    }
    propagate_decoded(poisoned_sequences<scalar_t>(emissions, len, transitions, start, end, all_sequences(B)),
                      len, &scores, &tags, nullptr);
  });
  return {tags, scores};
}

// ---- mask -> lengths ----------------------------------------------------------------------

Tensor crf_lengths_cpu(const Tensor& mask, bool batch_first) {
  TORCH_CHECK_VALUE(mask.dim() == 2, "crf_lengths: mask must be 2-D, got ", mask.dim(),
                    " dimensions");
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte,
                    "crf_lengths: mask must be bool or uint8, got ", mask.scalar_type());
  TORCH_CHECK_VALUE(mask.device().is_cpu(), "crf_lengths: mask must be on the CPU, got ",
                    mask.device());
  const int64_t B = mask.size(batch_first ? 0 : 1), T = mask.size(batch_first ? 1 : 0);
  const int64_t stride_b = mask.stride(batch_first ? 0 : 1);
  const int64_t stride_t = mask.stride(batch_first ? 1 : 0);
  // bool and uint8 are both one byte, 0 or nonzero.
  const uint8_t* m = static_cast<const uint8_t*>(mask.data_ptr());
  Tensor lengths = at::empty({B}, mask.options().dtype(at::kLong));
  int64_t* out = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* row = m + b * stride_b;
    int64_t length = 0;
    bool gap = false;
    if (stride_t == 1 && T > 0) {  // contiguous rows: memchr (never of a null row: T > 0) and an OR the compiler vectorises
      const void* first_zero = std::memchr(row, 0, static_cast<size_t>(T));
      length = first_zero ? static_cast<const uint8_t*>(first_zero) - row : T;
      uint8_t after = 0;
      for (int64_t t = length + 1; t < T; ++t) after |= row[t];
      gap = after != 0;
    } else {
      while (length < T && row[length * stride_t] != 0) ++length;
      for (int64_t t = length + 1; t < T && !gap; ++t) gap = row[t * stride_t] != 0;
    }
    if (gap) {
      int64_t t = length + 1;
      while (row[t * stride_t] == 0) ++t;
      TORCH_CHECK_VALUE(false, "mask must be right-padded (no gap): sequence ", b,
                        " has a valid step at ", t, " after an invalid one at ", length);
    }
    out[b] = length;
  }
  return lengths;
}

}  // namespace
}  // namespace fastner::cpu::crf

TORCH_LIBRARY_IMPL(fastner, CPU, m) {
  m.impl("crf_forward", &fastner::cpu::crf::crf_forward_cpu);
  m.impl("crf_backward", &fastner::cpu::crf::crf_backward_cpu);
  m.impl("crf_forward_backward", &fastner::cpu::crf::crf_forward_backward_cpu);
  m.impl("crf_viterbi", &fastner::cpu::crf::crf_viterbi_cpu);
  m.impl("crf_kbest", &fastner::cpu::crf::crf_kbest_cpu);
  m.impl("crf_marginals", &fastner::cpu::crf::crf_marginals_cpu);
  m.impl("crf_lengths", &fastner::cpu::crf::crf_lengths_cpu);
}
