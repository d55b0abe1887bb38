// crf_window_probabilities on CPU (schema and conventions: csrc/fastner.cpp): the probability
// that a sequence's tag path keeps to allowed-tag sets on a window of positions, for many
// (sequence, window) pairs at once. What the exact posterior of a decoded entity span is made of
// (fastner/span_scores.py: a span is a union of disjoint such sets).
//
// Why its own op: the span scores were a constrained forward pass over the whole sentence per
// set (a masked [N, T, K] copy of the emissions, float32, relative to the decoded path so that
// the difference of two log partitions kept its digits), ~0.4 ms of Python and torch calls for a
// one-sentence request and ~12% of a batch's CPU in the server. Here each sequence's forward and
// backward variables are computed once, in float64, and a set costs a walk over its window only:
//   p(set) = sum_y alpha^set_q(y) beta_q(y) / sum_y alpha_q(y) beta_q(y)
// with alpha^set the forward variables restricted to the allowed tags from the window's first
// position p to its last q (alpha^set_p = alpha_p on the allowed tags), alpha the unrestricted
// ones, beta_q the backward variables at q. Both sums share beta_q's constant, so beta may be
// relative (each step's scale dropped) and no log partition is subtracted from another.
//
// alpha: the exact per-sequence forward kernel (csrc/cpu/crf_sequence.h, absolute log values);
// beta and the window steps: the same scaled log-sum-exp (backward, and forward restricted to
// the allowed tags), scalar (K exps and logs and a K x K multiply-add a step), with the exact
// log-sum-exp where the scaled sum underflows.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu/crf_sequence.h"

namespace fastner::cpu::crf {
namespace {

using at::Tensor;

constexpr const char* kOp = "crf_window_probabilities";

// The checks beyond the CRF's common ones (checks::crf_inputs): rows int64 [N] in [0, B), starts
// int64 [N] with 0 <= starts[n] < lengths[rows[n]], allowed bool [N, W, K] with W >= 1, all on
// the CPU. Returns the contiguous rows and starts the values were read from (held by the caller).
std::pair<Tensor, Tensor> check_windows(const Tensor& emissions, const int64_t* len, const Tensor& rows_in,
                                        const Tensor& starts_in, const Tensor& allowed) {
  const int64_t B = emissions.size(0), K = emissions.size(2);
  TORCH_CHECK_VALUE(rows_in.dim() == 1 && rows_in.scalar_type() == at::kLong, kOp,
                    ": rows must be int64 [N], got ", rows_in.scalar_type(), " ", rows_in.sizes());
  const int64_t N = rows_in.size(0);
  TORCH_CHECK_VALUE(starts_in.dim() == 1 && starts_in.size(0) == N && starts_in.scalar_type() == at::kLong, kOp,
                    ": starts must be int64 [N] = [", N, "], got ", starts_in.scalar_type(), " ", starts_in.sizes());
  TORCH_CHECK_VALUE(allowed.dim() == 3 && allowed.size(0) == N && allowed.size(1) >= 1 && allowed.size(2) == K,
                    kOp, ": allowed must be [N, W, K] = [", N, ", W >= 1, ", K, "], got ", allowed.sizes());
  TORCH_CHECK_VALUE(allowed.scalar_type() == at::kBool, kOp, ": allowed must be bool, got ", allowed.scalar_type());
  checks::on_device(kOp, "rows", rows_in, emissions.device());
  checks::on_device(kOp, "starts", starts_in, emissions.device());
  checks::on_device(kOp, "allowed", allowed, emissions.device());
  Tensor rows = rows_in.contiguous(), starts = starts_in.contiguous();
  const int64_t* row = rows.const_data_ptr<int64_t>();
  const int64_t* start = starts.const_data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK_VALUE(row[n] >= 0 && row[n] < B, kOp, ": rows[", n, "] = ", row[n], " is outside [0, B = ", B, ")");
    TORCH_CHECK_VALUE(start[n] >= 0 && start[n] < len[row[n]], kOp, ": starts[", n, "] = ", start[n],
                      " is outside [0, lengths[", row[n], "] = ", len[row[n]], ")");
  }
  return {rows, starts};
}

// Which of the call's shared scores hold a NaN or +inf (read once a call).
struct BadScores {
  bool transitions = false;  // read by sequences of length >= 2
  bool start_or_end = false;  // read by every sequence with a path
};

BadScores bad_scores(const Transitions<double>& tr) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  BadScores bad;
  for (int64_t i = 0; i < tr.K; ++i) {
    bad.start_or_end = bad.start_or_end || !(tr.start[i] < inf) || !(tr.end[i] < inf);
    for (int64_t j = 0; j < tr.K; ++j) bad.transitions = bad.transitions || !(tr.log_row[i * tr.KP + j] < inf);
  }
  return bad;
}

// A sequence's scores hold a NaN or +inf it reads: its probabilities are NaN (as its log Z is,
// fastner.nn.CRF's contract). A transition counts from length 2, start and end from length 1.
bool poisoned(const double* em, int64_t L, int64_t K, const BadScores& bad) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  if (bad.start_or_end || (L >= 2 && bad.transitions)) return true;
  for (int64_t n = 0; n < L * K; ++n) {
    if (!(em[n] < inf)) return true;
  }
  return false;
}

// Relative log backward variables of one sequence: betas [L, K], betas[L - 1] = end, and
// betas[t - 1][i] = log sum_j exp(T_ij + em[t][j] + betas[t][j]) - c_t for a per-step constant
// c_t. work: 3 * KP.
void backward_sequence(const Transitions<double>& tr, const double* em, int64_t L, double* betas, double* work) {
  const int64_t K = tr.K, KP = tr.KP;
  const double ninf = neg_inf<double>();
  const double tiny = crf_tiny<double>();
  double* w = work;
  double* r = work + KP;
  double* q = work + 2 * KP;
  std::fill(w, w + KP, ninf);
  for (int64_t j = 0; j < K; ++j) betas[(L - 1) * K + j] = tr.end[j];
  for (int64_t t = L - 1; t >= 1; --t) {
    const double* beta = betas + t * K;
    double* prev = betas + (t - 1) * K;
    double m = ninf;
    for (int64_t j = 0; j < K; ++j) {
      w[j] = em[t * K + j] + beta[j];
      m = std::max(m, w[j]);
    }
    if (m == ninf) {  // no path continues from here: every prefix ending at t - 1 is dead
      std::fill(prev, prev + K, ninf);
      continue;
    }
    for (int64_t j = 0; j < K; ++j) r[j] = std::exp(w[j] - m);
    for (int64_t i = 0; i < K; ++i) {
      const double* E = tr.exp_row.data() + i * KP;
      double sum = 0;
      for (int64_t j = 0; j < K; ++j) sum += E[j] * r[j];
      q[i] = sum;
    }
    // q_i = sum_j exp(T_ij - tmax + w_j - m): log q_i is beta relative to m + tmax; where the
    // scaled sum underflows, the same quantity by an exact log-sum-exp.
    for (int64_t i = 0; i < K; ++i) {
      prev[i] = q[i] >= tiny ? std::log(q[i])
                             : exact_logsumexp(tr.log_row.data() + i * KP, w, K) - (m + tr.tmax);
    }
  }
}

// One forward step restricted to the allowed tags: next_j = log sum_i exp(a_i + T_ij) + e_j where
// allow[j], else -inf; in the scaled form of crf_sequence.h (K exps and logs and a K x K
// multiply-add), with the exact log-sum-exp where the scaled sum underflows. work: 2 * KP.
void window_step(const Transitions<double>& tr, const double* a, const double* e, const bool* allow, double* next,
                 double* work) {
  const int64_t K = tr.K, KP = tr.KP;
  const double ninf = neg_inf<double>();
  double m = ninf;
  for (int64_t i = 0; i < K; ++i) m = std::max(m, a[i]);
  if (m == ninf) {  // no path reaches this step inside the window
    std::fill(next, next + K, ninf);
    return;
  }
  double* pr = work;
  double* q = work + KP;
  std::fill(q, q + K, 0.0);
  for (int64_t i = 0; i < K; ++i) {
    pr[i] = std::exp(a[i] - m);
    const double* E = tr.exp_row.data() + i * KP;
    for (int64_t j = 0; j < K; ++j) q[j] += pr[i] * E[j];
  }
  for (int64_t j = 0; j < K; ++j) {
    if (!allow[j]) {
      next[j] = ninf;
    } else if (q[j] >= crf_tiny<double>()) {
      next[j] = std::log(q[j]) + m + tr.tmax + e[j];
    } else {
      next[j] = exact_logsumexp(a, tr.log_col.data() + j * KP, K) + e[j];
    }
  }
}

Tensor crf_window_probabilities_cpu(const Tensor& emissions_in, const Tensor& lengths_in,
                                    const Tensor& transitions_in, const Tensor& start_in, const Tensor& end_in,
                                    const Tensor& rows_in, const Tensor& starts_in, const Tensor& allowed_in) {
  checks::crf_inputs(kOp, emissions_in, lengths_in, transitions_in, start_in, end_in);
  TORCH_CHECK_VALUE(emissions_in.device().is_cpu(), kOp, ": emissions must be on the CPU, got ",
                    emissions_in.device());
  const int64_t B = emissions_in.size(0), T = emissions_in.size(1), K = emissions_in.size(2);
  const Tensor lengths = checks::lengths_in_range(kOp, lengths_in, T);
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  const auto [rows, starts] = check_windows(emissions_in, len, rows_in, starts_in, allowed_in);
  const int64_t N = rows.size(0), W = allowed_in.size(1);
  Tensor out = at::empty({N}, emissions_in.options().dtype(at::kDouble));
  if (N == 0) return out;
  // Everything in float64, contiguous: copies held for the whole call.
  const Tensor emissions = emissions_in.to(at::kDouble).contiguous();
  const Tensor transitions = transitions_in.to(at::kDouble).contiguous();
  const Tensor start_scores = start_in.to(at::kDouble).contiguous();
  const Tensor end_scores = end_in.to(at::kDouble).contiguous();
  const Tensor allowed = allowed_in.contiguous();
  const Transitions<double> tr(transitions.const_data_ptr<double>(), start_scores.const_data_ptr<double>(),
                               end_scores.const_data_ptr<double>(), K);
  const int64_t KP = tr.KP;
  const BadScores bad = bad_scores(tr);
  const double* em = emissions.const_data_ptr<double>();
  const int64_t* row = rows.const_data_ptr<int64_t>();
  const int64_t* first = starts.const_data_ptr<int64_t>();
  const bool* mask = allowed.const_data_ptr<bool>();
  double* result = out.data_ptr<double>();
  const double ninf = neg_inf<double>();
  const double nan = std::numeric_limits<double>::quiet_NaN();

  // Per referenced sequence: its alphas and betas [T, K] (computed on first use) and whether its
  // probabilities are NaN.
  std::vector<int64_t> slot(B, -1);
  std::vector<double> alphas, betas;
  std::vector<char> dead;  // NaN scores, or no path at all (log Z = -inf)
  std::vector<double> work(5 * KP);
  std::vector<double> a(KP, ninf), next(KP, ninf);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t b = row[n], L = len[b];
    const double* e = em + b * T * K;
    if (slot[b] < 0) {
      slot[b] = static_cast<int64_t>(dead.size());
      alphas.resize(alphas.size() + T * K);
      betas.resize(betas.size() + T * K);
      double* al = alphas.data() + slot[b] * T * K;
      double* be = betas.data() + slot[b] * T * K;
      bool is_dead = poisoned(e, L, K, bad);
      if (!is_dead) {
        const double log_z = forward_sequence(tr, e, L, T, al, work.data());
        is_dead = log_z == ninf;
        if (!is_dead) backward_sequence(tr, e, L, be, work.data());
      }
      dead.push_back(is_dead);
    }
    if (dead[slot[b]]) {
      result[n] = nan;
      continue;
    }
    const double* al = alphas.data() + slot[b] * T * K;
    const double* be = betas.data() + slot[b] * T * K;
    const bool* allow = mask + n * W * K;
    const int64_t p = first[n], q = std::min(p + W, L) - 1;
    for (int64_t j = 0; j < K; ++j) a[j] = allow[j] ? al[p * K + j] : ninf;
    for (int64_t t = p + 1; t <= q; ++t) {
      window_step(tr, a.data(), e + t * K, allow + (t - p) * K, next.data(), work.data());
      std::swap(a, next);
    }
    const double inside = exact_logsumexp(a.data(), be + q * K, K);
    const double all = exact_logsumexp(al + q * K, be + q * K, K);
    result[n] = inside == ninf ? 0.0 : std::exp(inside - all);
  }
  return out;
}

}  // namespace
}  // namespace fastner::cpu::crf

TORCH_LIBRARY_IMPL(fastner, CPU, m) {
  m.impl("crf_window_probabilities", &fastner::cpu::crf::crf_window_probabilities_cpu);
}
