// Linear-chain CRF kernels on CPU: forward algorithm, fused forward-backward gradient, Viterbi,
// k-best Viterbi and posterior marginals (schemas and conventions: csrc/fastner.cpp).
//
// Parallel over the batch (at::parallel_for), vectorised over the tags: every per-step loop
// runs over K padded to a multiple of 8 (KP) under `#pragma omp simd`.
//
// The forward and backward recursions use a scaled form of log-sum-exp. With
//   tmax = max finite transition, E = exp(transitions - tmax)  ([K, KP], computed once a call),
// a forward step is
//   m = max_i alpha_i,  p_i = exp(alpha_i - m),  q_j = sum_i p_i E_ij,
//   alpha'_j = m + tmax + log(q_j) + emission_j,
// i.e. K exps, K logs and a K x K multiply-add, instead of K^2 exps. Every term of q_j is a
// product of numbers <= 1, so the sum is exact to rounding unless it underflows; where
// q_j < crf_tiny (wide transition ranges, large emissions, -inf constraints) that entry is
// recomputed by an exact log-sum-exp over log-space values. All -inf inputs give -inf (never
// NaN), and the gradients of forbidden paths are 0.
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

#include "cpu/crf_lanes.h"
#include "cpu/crf_math.h"
#include "checks.h"

namespace fastner::cpu::crf {
namespace {

using at::Tensor;

int64_t padded(int64_t K) { return (K + 7) / 8 * 8; }

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

// ---- per-call transition tables -------------------------------------------------------------

template <typename scalar_t>
struct Transitions {
  int64_t K = 0, KP = 0;
  scalar_t tmax = 0;              // largest finite transition (0 when none is finite)
  std::vector<scalar_t> log_row;  // [K, KP]: log_row[i * KP + j] = T_ij, -inf padded
  std::vector<scalar_t> log_col;  // [K, KP]: log_col[j * KP + i] = T_ij, -inf padded
  std::vector<scalar_t> exp_row;  // [K, KP]: exp(T_ij - tmax), 0 padded
  std::vector<scalar_t> exp_col;  // [K, KP]: transposed exp_row
  // Copies, not pointers into the caller's tensors: a Transitions never outlives what it reads.
  std::vector<scalar_t> start;  // [K]
  std::vector<scalar_t> end;    // [K]

  // transitions [K, K], start_t / end_t [K]: any layout (read through contiguous copies held here).
  Transitions(const Tensor& transitions_in, const Tensor& start_in, const Tensor& end_in) {
    const Tensor transitions = transitions_in.contiguous(), start_t = start_in.contiguous(),
                 end_t = end_in.contiguous();
    K = transitions.size(0);
    KP = padded(K);
    const scalar_t* tr = transitions.const_data_ptr<scalar_t>();
    start.assign(start_t.const_data_ptr<scalar_t>(), start_t.const_data_ptr<scalar_t>() + K);
    end.assign(end_t.const_data_ptr<scalar_t>(), end_t.const_data_ptr<scalar_t>() + K);
    bool any_finite = false;
    scalar_t best = neg_inf<scalar_t>();
    for (int64_t n = 0; n < K * K; ++n) {
      if (std::isfinite(tr[n])) {
        any_finite = true;
        best = std::max(best, tr[n]);
      }
    }
    tmax = any_finite ? best : scalar_t(0);
    log_row.assign(K * KP, neg_inf<scalar_t>());
    log_col.assign(K * KP, neg_inf<scalar_t>());
    exp_row.assign(K * KP, scalar_t(0));
    exp_col.assign(K * KP, scalar_t(0));
    for (int64_t i = 0; i < K; ++i) {
      for (int64_t j = 0; j < K; ++j) {
        const scalar_t value = tr[i * K + j];
        const scalar_t scaled = value == neg_inf<scalar_t>() ? scalar_t(0) : std::exp(value - tmax);
        log_row[i * KP + j] = value;
        log_col[j * KP + i] = value;
        exp_row[i * KP + j] = scaled;
        exp_col[j * KP + i] = scaled;
      }
    }
  }
};

template <typename scalar_t>
scalar_t max_of(const scalar_t* x, int64_t n) {
  scalar_t m = neg_inf<scalar_t>();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// log sum_i exp(a[i] + b[i]) over n entries, exactly (no scaling); -inf when all terms are -inf.
template <typename scalar_t>
scalar_t exact_logsumexp(const scalar_t* a, const scalar_t* b, int64_t n) {
  scalar_t m = neg_inf<scalar_t>();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, a[i] + b[i]);
  if (m == neg_inf<scalar_t>()) return m;
  scalar_t sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(a[i] + b[i] - m);
  return m + std::log(sum);
}

// ---- forward algorithm ----------------------------------------------------------------------

// One sequence's forward recursion, a step at a time so that several sequences can be
// interleaved (see run_interleaved). em: [L, K] emissions; alphas: [T, K] output (log forward
// variables, zeros past L); work: 5 * KP scratch.
//
// The recursion runs on alphas relative to a running offset kept in double: the log forward
// variables grow linearly with t (thousands after a few thousand steps), and adding each step's
// increment to a float of that size would accumulate one rounding per step.
template <typename scalar_t>
struct ForwardRun {
  using V = typename Simd<scalar_t>::V;
  static constexpr int64_t N = Simd<scalar_t>::N;
  const Transitions<scalar_t>* tr = nullptr;
  const scalar_t* em = nullptr;
  scalar_t* alphas = nullptr;
  int64_t L = 0;
  scalar_t *alpha, *next, *p, *q, *e;  // [KP] each; alpha is relative to offset, -inf padded
  double offset = 0;

  void begin(const Transitions<scalar_t>& transitions, const scalar_t* emissions, int64_t length,
             int64_t T, scalar_t* alphas_out, scalar_t* work) {
    tr = &transitions;
    em = emissions;
    L = length;
    alphas = alphas_out;
    offset = 0;
    const int64_t K = tr->K, KP = tr->KP;
    alpha = work;
    next = work + KP;
    p = work + 2 * KP;
    q = work + 3 * KP;
    e = work + 4 * KP;  // this step's emissions, -inf padded so padded lanes stay -inf
    std::fill(alphas + L * K, alphas + T * K, scalar_t(0));
    if (L == 0) return;
    std::fill(alpha + K, alpha + KP, neg_inf<scalar_t>());
    std::fill(e + K, e + KP, neg_inf<scalar_t>());
    for (int64_t j = 0; j < K; ++j) alpha[j] = tr->start[j] + em[j];
    std::copy(alpha, alpha + K, alphas);
  }

  int64_t steps() const { return L > 0 ? L - 1 : 0; }

  void step(int64_t s) {
    const int64_t t = s + 1, K = tr->K, KP = tr->KP;
    const scalar_t ninf = neg_inf<scalar_t>();
    const scalar_t tiny = crf_tiny<scalar_t>();
    const scalar_t* E = tr->exp_row.data();
    const scalar_t* src = em + t * K;
    for (int64_t j = 0; j < K; ++j) e[j] = src[j];
    V mv = splat<V>(ninf);
    for (int64_t c = 0; c < KP; c += N) mv = vmax(mv, load<V>(alpha + c));
    const scalar_t m = hmax(mv);
    if (m == ninf) {  // every path is forbidden already
      std::fill(next, next + K, ninf);
    } else {
      for (int64_t c = 0; c < KP; c += N) store(p + c, exp_v(load<V>(alpha + c) - m));
      // q_j = sum_i p_i E_ij, a column block at a time, two accumulators to halve the chain.
      for (int64_t c = 0; c < KP; c += N) {
        V acc0{}, acc1{};
        int64_t i = 0;
        for (; i + 1 < K; i += 2) {
          acc0 += p[i] * load<V>(E + i * KP + c);
          acc1 += p[i + 1] * load<V>(E + (i + 1) * KP + c);
        }
        if (i < K) acc0 += p[i] * load<V>(E + i * KP + c);
        store(q + c, acc0 + acc1);
      }
      const V one = splat<V>(scalar_t(1));
      for (int64_t c = 0; c < KP; c += N) {
        const V qv = load<V>(q + c);
        store(next + c, log_v(qv >= tiny ? qv : one) + load<V>(e + c));
      }
      const scalar_t shift = m + tr->tmax;
      for (int64_t j = 0; j < K; ++j) {
        if (!(q[j] >= tiny)) {
          next[j] = exact_logsumexp(alpha, tr->log_col.data() + j * KP, K) - shift + e[j];
        }
      }
      offset += static_cast<double>(shift);
    }
    std::swap(alpha, next);
    // offset + alpha, rounded once: offset split into a high part and its remainder.
    const scalar_t high = static_cast<scalar_t>(offset);
    const scalar_t low = static_cast<scalar_t>(offset - static_cast<double>(high));
    scalar_t* out = alphas + t * K;
#pragma omp simd
    for (int64_t j = 0; j < K; ++j) out[j] = high + (alpha[j] + low);
  }

  // log Z (0 when L == 0).
  scalar_t finish() const {
    if (L == 0) return 0;
    return static_cast<scalar_t>(offset + exact_logsumexp(alpha, tr->end.data(), tr->K));
  }
};

// Sequences a thread steps in lock-step: their recursions are independent, so the CPU overlaps
// one's dependency chain (max -> exp -> multiply-add -> log) with the others'.
constexpr int64_t kInterleave = 4;

template <typename Run>
void run_interleaved(Run* runs, int64_t count) {
  int64_t most = 0;
  for (int64_t g = 0; g < count; ++g) most = std::max(most, runs[g].steps());
  for (int64_t s = 0; s < most; ++s) {
    for (int64_t g = 0; g < count; ++g) {
      if (s < runs[g].steps()) runs[g].step(s);
    }
  }
}

// The sequences [begin, stop) in decreasing length, so that interleaved groups hold sequences
// of similar lengths.
std::vector<int64_t> by_length(const int64_t* len, int64_t begin, int64_t stop) {
  std::vector<int64_t> order(stop - begin);
  for (int64_t b = begin; b < stop; ++b) order[b - begin] = b;
  std::stable_sort(order.begin(), order.end(),
                   [len](int64_t x, int64_t y) { return len[x] > len[y]; });
  return order;
}

template <typename scalar_t>
scalar_t forward_sequence(const Transitions<scalar_t>& tr, const scalar_t* em, int64_t L,
                          int64_t T, scalar_t* alphas, scalar_t* work) {
  ForwardRun<scalar_t> run;
  run.begin(tr, em, L, T, alphas, work);
  run_interleaved(&run, 1);
  return run.finish();
}

// Gold path scores [B] from emissions and tags in any layout (tags already range-checked).
template <typename scalar_t>
void gold_scores(const Tensor& emissions, const Tensor& tags, const int64_t* len,
                 const scalar_t* transitions, const scalar_t* start, const scalar_t* end,
                 scalar_t* out) {
  const int64_t B = emissions.size(0), K = emissions.size(2);
  const scalar_t* em = emissions.data_ptr<scalar_t>();
  const int64_t eb = emissions.stride(0), et = emissions.stride(1), ek = emissions.stride(2);
  const int64_t* y = tags.data_ptr<int64_t>();
  const int64_t yb = tags.stride(0), yt = tags.stride(1);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = len[b];
    if (L == 0) {
      out[b] = 0;
      continue;
    }
    const scalar_t* e = em + b * eb;
    const int64_t* yy = y + b * yb;
    int64_t prev = yy[0];
    scalar_t score = start[prev] + e[prev * ek];
    for (int64_t t = 1; t < L; ++t) {
      const int64_t tag = yy[t * yt];
      score += transitions[prev * K + tag] + e[t * et + tag * ek];
      prev = tag;
    }
    out[b] = score + end[prev];
  }
}

Tensor as_accumulate(const Tensor& emissions) {
  return emissions.to(accumulate_type(emissions.scalar_type())).contiguous();
}

// ---- NaN propagation -----------------------------------------------------------------------
// A NaN score makes the result NaN, as in the reference (and torch's autograd): a NaN emission
// inside a sequence's length makes its log Z NaN, its emission gradients NaN over that length,
// and the transition-score gradients NaN; a NaN transition score does so for every non-empty
// sequence. The kernels' max-shifted recursions compare scores, and a comparison with NaN fails
// silently (seen: log Z = -inf with finite gradients), so the sequences are found here in one
// read of the emissions (a fraction of a kernel's own cost, which reads them K more times).
template <typename scalar_t>
std::vector<int64_t> nan_sequences(const Tensor& emissions, const int64_t* len, const Tensor& transitions,
                                   const Tensor& start, const Tensor& end) {
  const int64_t B = emissions.size(0), K = emissions.size(2);
  auto any_nan = [](const Tensor& scores) {
    const Tensor dense = scores.contiguous();  // held while read
    const scalar_t* x = dense.const_data_ptr<scalar_t>();
    bool nan = false;
    for (int64_t n = 0; n < dense.numel(); ++n) nan = nan || std::isnan(x[n]);
    return nan;
  };
  const bool scores_nan = any_nan(transitions) || any_nan(start) || any_nan(end);
  const scalar_t* e = emissions.const_data_ptr<scalar_t>();
  const int64_t eb = emissions.stride(0), et = emissions.stride(1), ek = emissions.stride(2);
  std::vector<int64_t> found;
  for (int64_t b = 0; b < B; ++b) {
    bool nan = scores_nan && len[b] > 0;
    for (int64_t t = 0; t < len[b] && !nan; ++t) {
      const scalar_t* row = e + b * eb + t * et;
      for (int64_t k = 0; k < K; ++k) nan = nan || std::isnan(row[k * ek]);
    }
    if (nan) found.push_back(b);
  }
  return found;
}

// Sets what the NaN sequences make NaN (see nan_sequences); any pointer may be null.
void propagate_nan(const std::vector<int64_t>& sequences, const int64_t* len, Tensor* log_z,
                   Tensor* grad_emissions, std::initializer_list<Tensor*> grad_scores) {
  if (sequences.empty()) return;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (int64_t b : sequences) {
    if (log_z) log_z->select(0, b).fill_(nan);
    if (grad_emissions) grad_emissions->select(0, b).narrow(0, 0, len[b]).fill_(nan);
  }
  for (Tensor* g : grad_scores) g->fill_(nan);
}

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
// lanes, unit tag stride, and sequence offsets of a group that fit 32-bit gather indices.
bool lane_layout(const Tensor& emissions) {
  const int64_t width = lanes::kernels().width;
  // Below 3 sequences a group of mostly idle lanes costs more than the per-sequence kernel
  // (T=40, K=17, one thread: forward-backward 16.5 vs 25.6 us at B=1, 27.2 vs 25.9 at B=3).
  constexpr int64_t kMinBatch = 3;
  return emissions.scalar_type() == at::kFloat && emissions.size(0) >= kMinBatch &&
         emissions.stride(2) == 1 &&
         emissions.stride(0) >= 0 && emissions.stride(1) >= 0 &&
         emissions.stride(0) * width < (int64_t(1) << 31);
}

lanes::Emissions lane_emissions(const Tensor& emissions, const int64_t* len) {
  lanes::Emissions em;
  em.B = emissions.size(0);
  em.T = emissions.size(1);
  em.data = emissions.data_ptr<float>();
  em.stride_b = emissions.stride(0);
  em.stride_t = emissions.stride(1);
  em.lengths = len;
  return em;
}

int64_t num_groups(int64_t B) {
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

// Runs fn(group, scratch) over every group of the batch, a group per task.
template <typename Fn>
void for_each_group(int64_t B, int64_t K, int64_t T, const Fn& fn) {
  const lanes::Kernels& k = lanes::kernels();
  at::parallel_for(0, num_groups(B), 1, [&](int64_t begin, int64_t stop) {
    with_scratch(k.scratch_floats(K, T), [&](float* scratch) {
      for (int64_t group = begin; group < stop; ++group) fn(group, scratch);
    });
  });
}

bool all_sequences(int64_t B, std::vector<int64_t>& exact) {
  exact.resize(B);
  std::iota(exact.begin(), exact.end(), int64_t(0));
  return false;
}

std::vector<int64_t> flagged(const std::vector<uint8_t>& trouble) {
  std::vector<int64_t> out;
  for (size_t b = 0; b < trouble.size(); ++b) {
    if (trouble[b]) out.push_back(static_cast<int64_t>(b));
  }
  return out;
}

// ---- crf_forward ----------------------------------------------------------------------------

// log Z of the sequences `order` by the exact per-sequence kernel. em: contiguous [B, T, K].
template <typename scalar_t>
void exact_log_z(const Transitions<scalar_t>& tr, const scalar_t* em, const int64_t* len,
                 int64_t T, const std::vector<int64_t>& order, scalar_t* log_z) {
  const int64_t K = tr.K;
  std::vector<scalar_t> work(kInterleave * 5 * tr.KP);
  std::vector<scalar_t> alphas(kInterleave * T * K);  // written by the runs, not kept
  ForwardRun<scalar_t> runs[kInterleave];
  for (size_t first = 0; first < order.size(); first += kInterleave) {
    const int64_t count = std::min<int64_t>(kInterleave, order.size() - first);
    for (int64_t g = 0; g < count; ++g) {
      const int64_t b = order[first + g];
      runs[g].begin(tr, em + b * T * K, len[b], T, alphas.data() + g * T * K,
                    work.data() + g * 5 * tr.KP);
    }
    run_interleaved(runs, count);
    for (int64_t g = 0; g < count; ++g) log_z[order[first + g]] = runs[g].finish();
  }
}

// The lane kernels' log Z where they serve (float32, readable layout, no NaN/+inf score):
// returns true and lists in `exact` the sequences they could not vouch for. Otherwise returns
// false and lists every sequence. The double overload always declines.
bool lane_forward(const Tensor& emissions, const int64_t* len, const Tensor& transitions,
                  const Tensor& start, const Tensor& end, float* log_z,
                  std::vector<int64_t>& exact) {
  const int64_t B = emissions.size(0), T = emissions.size(1), K = emissions.size(2);
  const LaneModel lane_model(transitions, start, end);
  if (!lane_model.usable || !lane_layout(emissions)) return all_sequences(B, exact);
  const lanes::Kernels& k = lanes::kernels();
  const lanes::Emissions em = lane_emissions(emissions, len);
  std::vector<uint8_t> trouble(B, 0);
  for_each_group(B, K, T, [&](int64_t group, float* scratch) {
    k.forward(lane_model.model, em, group, log_z, trouble.data(), scratch);
  });
  exact = flagged(trouble);
  return true;
}

bool lane_forward(const Tensor& emissions, const int64_t*, const Tensor&, const Tensor&,
                  const Tensor&, double*, std::vector<int64_t>& exact) {
  return all_sequences(emissions.size(0), exact);
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
  Tensor gold = at::zeros({B}, emissions.options());
  AT_DISPATCH_FLOATING_TYPES(acc_type, "crf_forward", [&] {
    const Tensor transitions = transitions_in.contiguous(), start = start_in.contiguous(),
                 end = end_in.contiguous();
    if (tags_in.has_value()) {
      gold_scores<scalar_t>(emissions, *tags_in, len, transitions.data_ptr<scalar_t>(),
                            start.data_ptr<scalar_t>(), end.data_ptr<scalar_t>(),
                            gold.data_ptr<scalar_t>());
    }
    scalar_t* log_z_out = log_z.data_ptr<scalar_t>();
    std::vector<int64_t> exact;  // sequences for the exact kernel (all when the lanes decline)
    if (lane_forward(emissions, len, transitions, start, end, log_z_out, exact) && exact.empty()) return;
    const Transitions<scalar_t> tr(transitions, start, end);
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
    propagate_nan(nan_sequences<scalar_t>(emissions, len, transitions_in, start_in, end_in), len, &log_z,
                  nullptr, {});
  });
  return {log_z, gold};
}

// ---- backward (forward-backward) ------------------------------------------------------------

// Gradient accumulators of one thread. scaled: [K, KP], pairwise marginals still to be
// multiplied by exp_row; exact: [K, KP], terms already in final form (gold counts, rows that
// needed the exact path).
template <typename scalar_t>
struct Accumulators {
  std::vector<scalar_t> scaled, exact, start, end;
  explicit Accumulators(int64_t K, int64_t KP)
      : scaled(K * KP, 0), exact(K * KP, 0), start(K, 0), end(K, 0) {}
};

// One sequence, by the backward recursion in the scaled form (see the file comment), with
// every quantity local to its step (no alpha + beta - log Z of large, nearly equal numbers):
//   w_j = emission_{t,j} + beta_t[j],  r_j = exp(w_j - max w),  q_i = sum_j E_ij r_j,
//   beta_{t-1}[i] = log q_i  (relative: each step's constant cancels in the normalisation),
//   p_i = exp(alpha_{t-1}[i] - max alpha_{t-1}),  Z = sum_i p_i q_i,
//   marginal_{t-1}[i] = p_i q_i / Z,  pairwise marginal (i -> j at t) = p_i E_ij r_j / Z.
// Rows with q_i < crf_tiny take the exact log-space path; so does a whole step whose Z is tiny.
// marginals: [T, K] output, g_log_z * marginals (zeros past L); the caller adds the gold term.
// acc: nullptr for marginals only. work: 8 * KP scratch. Stepped like ForwardRun.
template <typename scalar_t>
struct BackwardRun {
  using V = typename Simd<scalar_t>::V;
  static constexpr int64_t N = Simd<scalar_t>::N;
  const Transitions<scalar_t>* tr = nullptr;
  const scalar_t* em = nullptr;
  const scalar_t* alphas = nullptr;
  scalar_t* marginals = nullptr;
  Accumulators<scalar_t>* acc = nullptr;
  int64_t L = 0;
  bool active = false;
  scalar_t g_log_z = 0;
  scalar_t *beta, *beta_prev, *w, *r, *q, *p, *a, *mu;  // [KP] each
  scalar_t *S = nullptr, *R = nullptr;  // [L - 1, KP] each: per step g * p_i / Z and r_j

  void begin(const Transitions<scalar_t>& transitions, const scalar_t* emissions,
             const scalar_t* alphas_in, int64_t length, int64_t T, scalar_t log_z, scalar_t g,
             scalar_t* marginals_out, Accumulators<scalar_t>* accumulators, scalar_t* work,
             scalar_t* pairwise = nullptr) {
    tr = &transitions;
    em = emissions;
    alphas = alphas_in;
    L = length;
    g_log_z = g;
    marginals = marginals_out;
    acc = accumulators;
    const int64_t K = tr->K, KP = tr->KP;
    std::fill(marginals, marginals + T * K, scalar_t(0));
    active = L > 0 && g_log_z != scalar_t(0) && std::isfinite(log_z);
    if (!active) return;
    const scalar_t ninf = neg_inf<scalar_t>();
    beta = work;  // relative log backward variables, -inf padded
    beta_prev = work + KP;
    w = work + 2 * KP;
    r = work + 3 * KP;
    q = work + 4 * KP;
    p = work + 5 * KP;
    a = work + 6 * KP;   // alpha_{t-1}, -inf padded
    mu = work + 7 * KP;  // g_log_z * marginal_{t-1}
    if (acc) {
      S = pairwise;
      R = pairwise + std::max<int64_t>(L - 1, 0) * KP;
    }
    std::fill(beta + K, beta + KP, ninf);
    std::fill(beta_prev + K, beta_prev + KP, ninf);
    std::fill(w + K, w + KP, ninf);
    std::fill(a + K, a + KP, ninf);
    std::copy(tr->end.data(), tr->end.data() + K, beta);
    // the last step: marginal = softmax(alpha_{L-1} + end)
    const scalar_t* al = alphas + (L - 1) * K;
    scalar_t* out = marginals + (L - 1) * K;
    for (int64_t j = 0; j < K; ++j) w[j] = al[j] + beta[j];
    const scalar_t m = max_of(w, KP);
    scalar_t sum = 0;
    for (int64_t j = 0; j < K; ++j) {
      r[j] = fast_exp(w[j] - m);
      sum += r[j];
    }
    for (int64_t j = 0; j < K; ++j) out[j] = g_log_z * (r[j] / sum);
    if (acc) {
      for (int64_t j = 0; j < K; ++j) acc->end[j] += out[j];
    }
  }

  int64_t steps() const { return active ? L - 1 : 0; }

  void step(int64_t s) {
    const int64_t t = L - 1 - s, K = tr->K, KP = tr->KP;
    const scalar_t ninf = neg_inf<scalar_t>();
    const scalar_t tiny = crf_tiny<scalar_t>();
    const scalar_t safe = crf_safe<scalar_t>();
    const scalar_t* Ecol = tr->exp_col.data();
    const scalar_t* e = em + t * K;
    const scalar_t* al = alphas + (t - 1) * K;
    for (int64_t j = 0; j < K; ++j) a[j] = al[j];
    scalar_t* out = marginals + (t - 1) * K;
    for (int64_t j = 0; j < K; ++j) w[j] = e[j] + beta[j];
    V mwv = splat<V>(ninf), mav = splat<V>(ninf);
    for (int64_t c = 0; c < KP; c += N) {
      mwv = vmax(mwv, load<V>(w + c));
      mav = vmax(mav, load<V>(a + c));
    }
    const scalar_t mw = hmax(mwv), ma = hmax(mav);
    if (mw == ninf || ma == ninf) {  // cannot happen with a finite log Z; stay NaN-free anyway
      if (acc) std::fill(S + s * KP, S + (s + 1) * KP, scalar_t(0));
      std::fill(beta_prev, beta_prev + K, ninf);
      std::swap(beta, beta_prev);
      return;
    }
    for (int64_t c = 0; c < KP; c += N) {
      store(r + c, exp_v(load<V>(w + c) - mw));
      store(p + c, exp_v(load<V>(a + c) - ma));
    }
    // q_i = sum_j E_ij r_j, a row block at a time (columns of E are rows of exp_col).
    for (int64_t c = 0; c < KP; c += N) {
      V acc0{}, acc1{};
      int64_t j = 0;
      for (; j + 1 < K; j += 2) {
        acc0 += r[j] * load<V>(Ecol + j * KP + c);
        acc1 += r[j + 1] * load<V>(Ecol + (j + 1) * KP + c);
      }
      if (j < K) acc0 += r[j] * load<V>(Ecol + j * KP + c);
      store(q + c, acc0 + acc1);
    }
    const V one = splat<V>(scalar_t(1));
    V zv{};
    for (int64_t c = 0; c < KP; c += N) {
      const V qv = load<V>(q + c);
      const auto ok = qv >= tiny;
      store(beta_prev + c, log_v(ok ? qv : one));
      zv += ok ? load<V>(p + c) * qv : V{};
    }
    const scalar_t z = hsum(zv);
    bool all_ok = true;
    for (int64_t i = 0; i < K; ++i) all_ok = all_ok && q[i] >= tiny;
    std::fill(beta_prev + K, beta_prev + KP, ninf);
    const scalar_t shift = mw + tr->tmax;  // log-space offset of q relative to exp(T) e^w
    if (!all_ok) {
      for (int64_t i = 0; i < K; ++i) {
        if (!(q[i] >= tiny)) beta_prev[i] = exact_logsumexp(tr->log_row.data() + i * KP, w, K) - shift;
      }
    }
    if (all_ok && z >= safe) {  // the fast path: everything in the scaled form
      const scalar_t scale = g_log_z / z;
      for (int64_t c = 0; c < KP; c += N) {
        const V sv = load<V>(p + c) * scale;  // g_log_z * p_i / Z
        store(p + c, sv);
        store(mu + c, sv * load<V>(q + c));
      }
      for (int64_t i = 0; i < K; ++i) out[i] = mu[i];
      if (acc) {  // the pairwise terms s_i r_j, summed over steps in finish()
        scalar_t* srow = S + s * KP;
        scalar_t* rrow = R + s * KP;
        for (int64_t c = 0; c < KP; c += N) {
          store(srow + c, load<V>(p + c));
          store(rrow + c, load<V>(r + c));
        }
      }
    } else {
      if (acc) std::fill(S + s * KP, S + (s + 1) * KP, scalar_t(0));
      // Exact log-space step: log marginal_i = (alpha_i - ma) + beta_prev_i - log Z.
      scalar_t log_z_step;
      if (z >= safe) {
        log_z_step = std::log(z);  // rows on the exact path add < K * tiny / safe to Z
      } else {
        for (int64_t i = 0; i < K; ++i) q[i] = a[i] - ma;
        log_z_step = exact_logsumexp(q, beta_prev, K);
      }
      for (int64_t i = 0; i < K; ++i) {
        const scalar_t log_mu = a[i] - ma + beta_prev[i] - log_z_step;
        out[i] = log_mu == ninf ? scalar_t(0) : g_log_z * std::exp(log_mu);
        if (!acc || a[i] == ninf) continue;
        const scalar_t* row = tr->log_row.data() + i * KP;
        scalar_t* dst = acc->exact.data() + i * KP;
        const scalar_t base = a[i] - ma - shift - log_z_step;
        for (int64_t j = 0; j < K; ++j) {
          const scalar_t log_xi = base + row[j] + w[j];
          if (log_xi != ninf) dst[j] += g_log_z * std::exp(log_xi);
        }
      }
    }
    std::swap(beta, beta_prev);
  }

  // Adds the start marginals and sum_s S[s]^T R[s] (the scaled pairwise marginals) to acc:
  // blocks of 8 rows x one vector of columns stay in registers over all steps.
  void finish() {
    if (!active || !acc) return;
    const int64_t K = tr->K, KP = tr->KP, n = steps();
    for (int64_t j = 0; j < K; ++j) acc->start[j] += marginals[j];
    scalar_t* G = acc->scaled.data();
    for (int64_t i0 = 0; i0 < K; i0 += 8) {
      for (int64_t c = 0; c < KP; c += N) {
        V sum[8] = {};
        for (int64_t s = 0; s < n; ++s) {
          const V rv = load<V>(R + s * KP + c);
          const scalar_t* srow = S + s * KP + i0;
          for (int ii = 0; ii < 8; ++ii) sum[ii] += srow[ii] * rv;
        }
        for (int64_t ii = 0; ii < 8 && i0 + ii < K; ++ii) {
          scalar_t* dst = G + (i0 + ii) * KP + c;
          store(dst, load<V>(dst) + sum[ii]);
        }
      }
    }
  }
};

template <typename scalar_t>
void backward_sequence(const Transitions<scalar_t>& tr, const scalar_t* em, const scalar_t* alphas,
                       int64_t L, int64_t T, scalar_t log_z, scalar_t g_log_z, scalar_t* marginals,
                       Accumulators<scalar_t>* acc, scalar_t* work) {
  TORCH_INTERNAL_ASSERT(acc == nullptr, "backward_sequence: marginals only");
  BackwardRun<scalar_t> run;
  run.begin(tr, em, alphas, L, T, log_z, g_log_z, marginals, acc, work);
  run_interleaved(&run, 1);
  run.finish();
}

// The exact per-sequence forward-backward for the sequences `order`: writes g_log_z *
// marginals into grad + b * T * K ([T, K] rows), adds to acc and, when log_z_out is given,
// stores log Z there. em: contiguous [B, T, K].
template <typename scalar_t>
void exact_backward(const Transitions<scalar_t>& tr, const scalar_t* em, const int64_t* len,
                    int64_t T, const std::vector<int64_t>& order, const scalar_t* gz,
                    int64_t gz_stride, scalar_t* grad, Accumulators<scalar_t>& acc,
                    scalar_t* log_z_out) {
  const int64_t K = tr.K, KP = tr.KP;
  std::vector<scalar_t> work(kInterleave * 8 * KP);
  std::vector<scalar_t> alphas(kInterleave * T * K);
  std::vector<scalar_t> pairwise(kInterleave * 2 * T * KP);
  ForwardRun<scalar_t> forward_runs[kInterleave];
  BackwardRun<scalar_t> runs[kInterleave];
  for (size_t first = 0; first < order.size(); first += kInterleave) {
    const int64_t count = std::min<int64_t>(kInterleave, order.size() - first);
    for (int64_t n = 0; n < count; ++n) {
      const int64_t b = order[first + n];
      forward_runs[n].begin(tr, em + b * T * K, len[b], T, alphas.data() + n * T * K,
                            work.data() + n * 8 * KP);
    }
    run_interleaved(forward_runs, count);
    for (int64_t n = 0; n < count; ++n) {
      const int64_t b = order[first + n];
      const scalar_t log_z = forward_runs[n].finish();
      if (log_z_out) log_z_out[b] = log_z;
      runs[n].begin(tr, em + b * T * K, alphas.data() + n * T * K, len[b], T, log_z,
                    gz[b * gz_stride], grad + b * T * K, &acc, work.data() + n * 8 * KP,
                    pairwise.data() + n * 2 * T * KP);
    }
    run_interleaved(runs, count);
    for (int64_t n = 0; n < count; ++n) runs[n].finish();
  }
}

// The gold path's terms: grad_gold[b] at each gold (t, tag) of grad, and the gold transition,
// start and end counts added to grad_transitions [K, K], grad_start and grad_end [K].
template <typename scalar_t>
void add_gold_terms(const Tensor& tags, const int64_t* len, const scalar_t* gg, int64_t gg_stride,
                    scalar_t* grad, int64_t grad_b, int64_t grad_t, scalar_t* grad_transitions,
                    scalar_t* grad_start, scalar_t* grad_end, int64_t K) {
  const int64_t* y = tags.data_ptr<int64_t>();
  const int64_t yb = tags.stride(0), yt = tags.stride(1);
  for (int64_t b = 0; b < tags.size(0); ++b) {
    const int64_t L = len[b];
    const scalar_t w = gg[b * gg_stride];
    if (L == 0 || w == scalar_t(0)) continue;
    const int64_t* yy = y + b * yb;
    for (int64_t t = 0; t < L; ++t) grad[b * grad_b + t * grad_t + yy[t * yt]] += w;
    for (int64_t t = 1; t < L; ++t) grad_transitions[yy[(t - 1) * yt] * K + yy[t * yt]] += w;
    grad_start[yy[0]] += w;
    grad_end[yy[(L - 1) * yt]] += w;
  }
}

// grad_emissions in the emissions' own layout where it has unit tag stride (so a time-first
// caller gets a time-first gradient), else contiguous [B, T, K].
Tensor gradient_like(const Tensor& emissions) {
  Tensor grad = at::empty_like(emissions);
  return grad.stride(2) == 1 ? grad : at::empty(emissions.sizes(), emissions.options());
}

// The lane kernels' backward where they serve (as lane_forward): writes the gradient rows
// (grad: (b, t, j) at grad[b * grad_b + t * grad_t + j]) and
// adds the sums of the pairwise, first-step and last-step marginals (in final form) to
// transitions_sum [K, K], start_sum [K] and end_sum [K]; lists in `exact` the sequences left
// to the exact kernel (all of them when the lanes decline).
void lane_backward(const Tensor& emissions, const int64_t* len, const Tensor& transitions,
                   const Tensor& start, const Tensor& end, const float* gz, int64_t gz_stride,
                   float* grad, int64_t grad_b, int64_t grad_t, float* transitions_sum,
                   float* start_sum, float* end_sum, float* log_z, std::vector<int64_t>& exact) {
  const int64_t B = emissions.size(0), T = emissions.size(1), K = emissions.size(2);
  const LaneModel lane_model(transitions, start, end);
  if (!lane_model.usable || !lane_layout(emissions)) {
    all_sequences(B, exact);
    return;
  }
  const lanes::Kernels& k = lanes::kernels();
  const int64_t groups = num_groups(B);
  // Per group sums (each group writes its own), added in group order: the result does not
  // depend on the thread count.
  std::vector<float> sums(groups * (K * K + 2 * K));
  float* pairs = sums.data();
  float* starts = pairs + groups * K * K;
  float* ends = starts + groups * K;
  const lanes::Emissions em = lane_emissions(emissions, len);
  const lanes::Rows rows{grad, grad_b, grad_t};
  std::vector<uint8_t> trouble(B, 0);
  for_each_group(B, K, T, [&](int64_t g, float* scratch) {
    k.backward(lane_model.model, em, g, gz, gz_stride, rows, pairs + g * K * K, starts + g * K,
               ends + g * K, trouble.data(), log_z, scratch);
  });
  exact = flagged(trouble);
  const float* E = lane_model.model.exp_transitions;
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

void lane_backward(const Tensor& emissions, const int64_t*, const Tensor&, const Tensor&,
                   const Tensor&, const double*, int64_t, double*, int64_t, int64_t, double*, double*,
                   double*, double*, std::vector<int64_t>& exact) {
  all_sequences(emissions.size(0), exact);
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
  if (gold) *gold = at::zeros({B}, emissions.options());
  const Tensor grad_log_z = log_z_weights.tensor ? log_z_weights.tensor->to(acc_type) : Tensor();
  const Tensor grad_gold = gold_weights.tensor ? gold_weights.tensor->to(acc_type) : Tensor();
  const int64_t gz_stride = grad_log_z.defined() ? grad_log_z.stride(0) : 0;
  const int64_t gg_stride = grad_gold.defined() ? grad_gold.stride(0) : 0;
  Tensor grad_emissions = gradient_like(emissions);
  Tensor grad_transitions = at::zeros({K, K}, emissions.options());
  Tensor grad_start = at::zeros({K}, emissions.options());
  Tensor grad_end = at::zeros({K}, emissions.options());
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
    std::vector<int64_t> exact;
    lane_backward(emissions, len, transitions, start, end, gz, gz_stride, ge, ge_b, ge_t, gt, gs,
                  gend, log_z_out, exact);
    const int64_t KP = padded(K);
    // Sums of the exact kernel, one set per chunk of sequences (added in chunk order). Its
    // tables cost ~K^2 exps, so they are built only when it runs.
    std::vector<Accumulators<scalar_t>> accs;
    std::optional<Transitions<scalar_t>> exact_tables;
    if (!exact.empty()) {
      const Transitions<scalar_t>& tr = exact_tables.emplace(transitions, start, end);
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
        // Forbidden transitions (E = 0) get exactly 0 from the scaled part.
        const scalar_t e = exact_tables ? exact_tables->exp_row[i * KP + j] : scalar_t(0);
        gt[i * K + j] += (e == scalar_t(0) ? scalar_t(0) : scaled * e) + exact_sum;
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
  });
  AT_DISPATCH_FLOATING_TYPES(acc_type, "crf_gradients", [&] {
    propagate_nan(nan_sequences<scalar_t>(emissions, len, transitions_in, start_in, end_in), len, log_z,
                  &grad_emissions, {&grad_transitions, &grad_start, &grad_end});
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
    const Transitions<scalar_t> tr(transitions_in.contiguous(), start_in.contiguous(),
                                   end_in.contiguous());
    const scalar_t* em = emissions.data_ptr<scalar_t>();
    const int64_t* len = lengths.data_ptr<int64_t>();
    scalar_t* out = marginals.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain(T, K), [&](int64_t begin, int64_t stop) {
      std::vector<scalar_t> work(8 * tr.KP);
      std::vector<scalar_t> alphas(T * K);
      for (int64_t b = begin; b < stop; ++b) {
        const scalar_t* e = em + b * T * K;
        const scalar_t log_z = forward_sequence(tr, e, len[b], T, alphas.data(), work.data());
        backward_sequence<scalar_t>(tr, e, alphas.data(), len[b], T, log_z, scalar_t(1),
                                    out + b * T * K, nullptr, work.data());
      }
    });
  });
  return marginals;
}

// ---- Viterbi ----------------------------------------------------------------------------------

// One sequence's Viterbi recursion, stepped like ForwardRun. tags: [T] output (-1 past L);
// backpointers: [L, K] scratch; work: 3 * KP scratch; finish() returns the best score (0 when
// L == 0) and writes the tags.
template <typename scalar_t, typename index_t>
struct ViterbiRun {
  using V = typename Simd<scalar_t>::V;
  using I = typename Simd<scalar_t>::I;
  using lane_t = std::remove_reference_t<decltype(I{}[0])>;
  static constexpr int64_t N = Simd<scalar_t>::N;
  const Transitions<scalar_t>* tr = nullptr;
  const scalar_t* em = nullptr;
  int64_t L = 0;
  int64_t* tags = nullptr;
  index_t* backpointers = nullptr;
  scalar_t *score, *next;  // [KP]
  int32_t* argmax;         // [KP]

  void begin(const Transitions<scalar_t>& transitions, const scalar_t* emissions, int64_t length,
             int64_t T, int64_t* tags_out, index_t* bp, scalar_t* work, int32_t* arg) {
    tr = &transitions;
    em = emissions;
    L = length;
    tags = tags_out;
    backpointers = bp;
    argmax = arg;
    const int64_t K = tr->K, KP = tr->KP;
    std::fill(tags + L, tags + T, int64_t(-1));
    if (L == 0) return;
    score = work;
    next = work + KP;
    for (int64_t j = 0; j < K; ++j) score[j] = tr->start[j] + em[j];
    std::fill(score + K, score + KP, neg_inf<scalar_t>());
    std::fill(next + K, next + KP, neg_inf<scalar_t>());
  }

  int64_t steps() const { return L > 0 ? L - 1 : 0; }

  void step(int64_t s) {
    const int64_t t = s + 1, K = tr->K, KP = tr->KP;
    const scalar_t* Tr = tr->log_row.data();
    const scalar_t* e = em + t * K;
    index_t* bp = backpointers + t * K;
    for (int64_t c = 0; c < KP; c += N) {
      V best = splat<V>(neg_inf<scalar_t>());
      I arg{};
      for (int64_t i = 0; i < K; ++i) {
        const V candidate = score[i] + load<V>(Tr + i * KP + c);
        const auto better = candidate > best;  // strict: the first best predecessor wins
        best = better ? candidate : best;
        arg = better ? I{} + static_cast<lane_t>(i) : arg;
      }
      store(next + c, best);
      for (int64_t n = 0; n < N && c + n < K; ++n) argmax[c + n] = static_cast<int32_t>(arg[n]);
    }
    for (int64_t j = 0; j < K; ++j) {
      next[j] += e[j];
      bp[j] = static_cast<index_t>(argmax[j]);
    }
    std::swap(score, next);
  }

  scalar_t finish() {
    if (L == 0) return 0;
    const int64_t K = tr->K;
    int64_t last = 0;
    scalar_t best_score = neg_inf<scalar_t>();
    for (int64_t j = 0; j < K; ++j) {
      const scalar_t value = score[j] + tr->end[j];
      if (value > best_score) {
        best_score = value;
        last = j;
      }
    }
    tags[L - 1] = last;
    for (int64_t t = L - 1; t >= 1; --t) {
      last = backpointers[t * K + last];
      tags[t - 1] = last;
    }
    return best_score;
  }
};

template <typename scalar_t, typename index_t>
void viterbi_range(const Transitions<scalar_t>& tr, const scalar_t* em, const int64_t* len,
                   int64_t T, int64_t begin, int64_t stop, int64_t* tags_out,
                   scalar_t* scores_out) {
  const int64_t K = tr.K, KP = tr.KP;
  std::vector<scalar_t> work(kInterleave * 2 * KP);
  std::vector<int32_t> argmax(kInterleave * KP);
  std::vector<index_t> backpointers(kInterleave * T * K);
  ViterbiRun<scalar_t, index_t> runs[kInterleave];
  const std::vector<int64_t> order = by_length(len, begin, stop);
  for (size_t first = 0; first < order.size(); first += kInterleave) {
    const int64_t count = std::min<int64_t>(kInterleave, order.size() - first);
    for (int64_t g = 0; g < count; ++g) {
      const int64_t b = order[first + g];
      runs[g].begin(tr, em + b * T * K, len[b], T, tags_out + b * T,
                    backpointers.data() + g * T * K, work.data() + g * 2 * KP,
                    argmax.data() + g * KP);
    }
    run_interleaved(runs, count);
    for (int64_t g = 0; g < count; ++g) scores_out[order[first + g]] = runs[g].finish();
  }
}

// Viterbi by the lane kernels where the layout allows (float32 only): max-plus is exact in any
// range, and NaN/inf scores meet the same comparisons as in the per-sequence kernel.
bool lane_viterbi(const Tensor& emissions, const int64_t* len, const Tensor& transitions,
                  const Tensor& start, const Tensor& end, int64_t* tags, float* scores) {
  if (!lane_layout(emissions)) return false;
  const int64_t B = emissions.size(0), T = emissions.size(1), K = emissions.size(2);
  const lanes::Kernels& k = lanes::kernels();
  lanes::Model model;
  model.K = K;
  model.transitions = transitions.data_ptr<float>();
  model.start = start.data_ptr<float>();
  model.end = end.data_ptr<float>();
  const lanes::Emissions em = lane_emissions(emissions, len);
  for_each_group(B, K, T, [&](int64_t group, float* scratch) {
    k.viterbi(model, em, group, tags, scores, scratch);
  });
  return true;
}

bool lane_viterbi(const Tensor&, const int64_t*, const Tensor&, const Tensor&, const Tensor&,
                  int64_t*, double*) {
  return false;
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
    if (lane_viterbi(emissions, len, transitions, start, end, tags_out, scores_out)) return;
    const Transitions<scalar_t> tr(transitions, start, end);
    const Tensor dense = emissions.contiguous();
    const scalar_t* em = dense.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain(T, K), [&](int64_t begin, int64_t stop) {
      if (K <= 256) {
        viterbi_range<scalar_t, uint8_t>(tr, em, len, T, begin, stop, tags_out, scores_out);
      } else {
        viterbi_range<scalar_t, int32_t>(tr, em, len, T, begin, stop, tags_out, scores_out);
      }
    });
  });
  return {tags, scores};
}

// ---- k-best Viterbi ---------------------------------------------------------------------------

// The k largest (score, tag, rank) candidates, kept sorted descending; on ties the candidate
// offered first stays ahead.
template <typename scalar_t>
struct TopK {
  int64_t k;
  scalar_t* score;
  int32_t* tag;
  int32_t* rank;
  void clear() {
    std::fill(score, score + k, neg_inf<scalar_t>());
    std::fill(tag, tag + k, -1);
    std::fill(rank, rank + k, -1);
  }
  // Whether a candidate with this score would enter.
  bool admits(scalar_t value) const { return value > score[k - 1]; }
  void offer(scalar_t value, int32_t t, int32_t r) {
    int64_t at = k - 1;
    while (at > 0 && value > score[at - 1]) {
      score[at] = score[at - 1];
      tag[at] = tag[at - 1];
      rank[at] = rank[at - 1];
      --at;
    }
    score[at] = value;
    tag[at] = t;
    rank[at] = r;
  }
};

// One sequence. tags: [k, T] output; scores: [k] output. cur/next: [K, k] scratch;
// prev_tag/prev_rank: [L, K, k] scratch.
template <typename scalar_t>
void kbest_sequence(const Transitions<scalar_t>& tr, const scalar_t* em, int64_t L, int64_t T,
                    int64_t k, int64_t* tags, scalar_t* scores, scalar_t* cur, scalar_t* next,
                    int32_t* prev_tag, int32_t* prev_rank, scalar_t* final_score,
                    int32_t* final_tag, int32_t* final_rank) {
  const int64_t K = tr.K, KP = tr.KP;
  std::fill(tags, tags + k * T, int64_t(-1));
  std::fill(scores, scores + k, neg_inf<scalar_t>());
  if (L == 0) {
    scores[0] = 0;
    return;
  }
  std::fill(cur, cur + K * k, neg_inf<scalar_t>());
  for (int64_t j = 0; j < K; ++j) cur[j * k] = tr.start[j] + em[j];
  for (int64_t t = 1; t < L; ++t) {
    const scalar_t* e = em + t * K;
    for (int64_t j = 0; j < K; ++j) {
      TopK<scalar_t> top{k, next + j * k, prev_tag + (t * K + j) * k, prev_rank + (t * K + j) * k};
      top.clear();
      for (int64_t i = 0; i < K; ++i) {
        const scalar_t transition = tr.log_row[i * KP + j];
        if (transition == neg_inf<scalar_t>()) continue;
        for (int64_t r = 0; r < k; ++r) {
          const scalar_t value = cur[i * k + r] + transition;
          if (!top.admits(value)) break;  // cur[i] is sorted: later ranks cannot enter either
          top.offer(value, static_cast<int32_t>(i), static_cast<int32_t>(r));
        }
      }
      for (int64_t r = 0; r < k; ++r) next[j * k + r] += e[j];
    }
    std::swap(cur, next);
  }
  TopK<scalar_t> top{k, final_score, final_tag, final_rank};
  top.clear();
  for (int64_t j = 0; j < K; ++j) {
    for (int64_t r = 0; r < k; ++r) {
      const scalar_t value = cur[j * k + r] + tr.end[j];
      if (!top.admits(value)) break;
      top.offer(value, static_cast<int32_t>(j), static_cast<int32_t>(r));
    }
  }
  for (int64_t n = 0; n < k; ++n) {
    if (final_score[n] == neg_inf<scalar_t>()) break;  // fewer than k paths with a finite score
    scores[n] = final_score[n];
    int32_t tag = final_tag[n], rank = final_rank[n];
    int64_t* row = tags + n * T;
    for (int64_t t = L - 1; t >= 1; --t) {
      row[t] = tag;
      const int64_t at = (t * K + tag) * k + rank;
      tag = prev_tag[at];
      rank = prev_rank[at];
    }
    row[0] = tag;
  }
}

std::tuple<Tensor, Tensor> crf_kbest_cpu(const Tensor& emissions_in, const Tensor& lengths_in,
                                         const Tensor& transitions_in, const Tensor& start_in,
                                         const Tensor& end_in, int64_t k) {
  const Tensor lengths = check_inputs("crf_kbest", emissions_in, lengths_in, transitions_in, start_in, end_in);
  TORCH_CHECK_VALUE(k >= 1, "crf_kbest: k must be >= 1, got ", k);
  const Tensor emissions = as_accumulate(emissions_in);
  const int64_t B = emissions.size(0), T = emissions.size(1), K = emissions.size(2);
  Tensor tags = at::empty({B, k, T}, lengths.options());
  Tensor scores = at::empty({B, k}, emissions.options());
  AT_DISPATCH_FLOATING_TYPES(emissions.scalar_type(), "crf_kbest", [&] {
    const Transitions<scalar_t> tr(transitions_in.contiguous(), start_in.contiguous(),
                                   end_in.contiguous());
    const scalar_t* em = emissions.data_ptr<scalar_t>();
    const int64_t* len = lengths.data_ptr<int64_t>();
    int64_t* tags_out = tags.data_ptr<int64_t>();
    scalar_t* scores_out = scores.data_ptr<scalar_t>();
    at::parallel_for(0, B, std::max<int64_t>(1, grain(T, K) / k), [&](int64_t begin, int64_t stop) {
      std::vector<scalar_t> cur(K * k), next(K * k), final_score(k);
      std::vector<int32_t> prev_tag(T * K * k), prev_rank(T * K * k), final_tag(k), final_rank(k);
      for (int64_t b = begin; b < stop; ++b) {
        kbest_sequence(tr, em + b * T * K, len[b], T, k, tags_out + b * k * T, scores_out + b * k,
                       cur.data(), next.data(), prev_tag.data(), prev_rank.data(),
                       final_score.data(), final_tag.data(), final_rank.data());
      }
    });
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
    while (length < T && row[length * stride_t] != 0) ++length;
    for (int64_t t = length + 1; t < T; ++t) {
      TORCH_CHECK_VALUE(row[t * stride_t] == 0, "mask must be right-padded (no gap): sequence ", b,
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
