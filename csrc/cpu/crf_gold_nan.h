// Batch-level terms of the CRF ops on CPU that every strategy shares: the gold path's score and
// its gradient counts, and NaN / +inf propagation (a NaN or +inf score gives the reference's
// non-finite results), on tensors in any layout.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <vector>

namespace fastner::cpu::crf {

using at::Tensor;

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

// ---- NaN and +inf propagation ----------------------------------------------------------------
// A sequence that meets a NaN or +inf score gets the reference's results (its autograd's, for
// the gradients), which the kernels' max-shifted recursions do not give: a comparison with NaN
// fails silently (seen: log Z = -inf with finite gradients) and a +inf score shifts by
// inf - inf (seen: log Z NaN where the reference has +inf, with finite gradients, which hid the
// overflow from GradScaler-style "skip the step on non-finite gradients" logic). The contract:
//   * log Z (and the best path's score) is the reference's: NaN if the sequence reads a NaN
//     score, or where a +inf score meets a -inf one (+inf + -inf: a constraint, an unreachable
//     tag); else +inf. That value does not depend on the finite scores (nonfinite_log_z).
//   * its emission gradients are NaN over its length, and the transition-score gradients (shared
//     by the batch) are NaN: the reference's autograd gives NaN there (0 * inf in log-sum-exp's
//     backward), and NaN everywhere keeps any-non-finite checks simple;
//   * decoding and marginals: propagate_decoded.
// A NaN or +inf start or end score poisons every non-empty sequence, a transition score every
// sequence of length >= 2: a sequence of length 1 reads no transition score, and its results are
// the reference's finite ones (it was NaN here; the reference's were finite).
// -inf scores are legitimate (forbidden tags and transitions) and change nothing here.

// The sequences that meet a NaN or +inf score, and the value their log Z and best path score take.
struct Poisoned {
  int64_t sequence;
  double value;  // NaN or +inf
};

// The scores as nonfinite_log_z reads them: each finite one 0, the others as they are.
template <typename scalar_t>
std::vector<double> score_kinds(const scalar_t* x, int64_t n) {
  std::vector<double> kinds(n);
  for (int64_t i = 0; i < n; ++i) kinds[i] = std::isfinite(x[i]) ? 0.0 : static_cast<double>(x[i]);
  return kinds;
}

// The reference's log Z of a sequence that holds a +inf score and reads no NaN one: +inf, or NaN
// where the +inf meets a -inf score (or where the result is finite: the sequence reads none of
// the batch's non-finite scores). The reference's log-sum-exp is NaN if a term is NaN, else +inf
// if one is, else finite or -inf: the max-plus recursion (NaN propagating) over the scores with
// every finite one 0 (score_kinds) gives the same class. O(L K^2) adds, run only for such
// sequences, in an order the compiler vectorises. e: the sequence's emissions (strides et, ek);
// transitions [K, K], start, end [K]: score_kinds of the call's scores.
template <typename scalar_t>
double nonfinite_log_z(const scalar_t* e, int64_t et, int64_t ek, int64_t L, int64_t K,
                       const std::vector<double>& transitions, const std::vector<double>& start,
                       const std::vector<double>& end) {
  auto kind = [](scalar_t x) { return std::isfinite(x) ? 0.0 : static_cast<double>(x); };
  auto max_nan = [](double best, double x) { return x != x || x > best ? x : best; };
  const double ninf = -std::numeric_limits<double>::infinity();
  std::vector<double> alpha(K), next(K);
  for (int64_t j = 0; j < K; ++j) alpha[j] = start[j] + kind(e[j * ek]);
  for (int64_t t = 1; t < L; ++t) {
    std::fill(next.begin(), next.end(), ninf);
    for (int64_t i = 0; i < K; ++i) {
      const double a = alpha[i];
      const double* row = transitions.data() + i * K;
      for (int64_t j = 0; j < K; ++j) next[j] = max_nan(next[j], a + row[j]);
    }
    for (int64_t j = 0; j < K; ++j) next[j] += kind(e[t * et + j * ek]);
    std::swap(alpha, next);
  }
  double log_z = ninf;
  for (int64_t j = 0; j < K; ++j) log_z = max_nan(log_z, alpha[j] + end[j]);
  return log_z == std::numeric_limits<double>::infinity() ? log_z : std::numeric_limits<double>::quiet_NaN();
}

// Whether some x[i] is NaN or +inf: !(x < inf), in one comparison (-inf and finite scores pass).
template <typename scalar_t>
bool any_poison(const scalar_t* x, int64_t n) {
  constexpr scalar_t inf = std::numeric_limits<scalar_t>::infinity();
  int any = 0;  // an int: gcc vectorises an int |= reduction, not a bool one
  for (int64_t i = 0; i < n; ++i) any |= !(x[i] < inf);
  return any != 0;
}

// Whether a transition, start or end score is NaN or +inf: then every sequence that reads one
// meets it, whatever its emissions.
template <typename scalar_t>
bool scores_poisoned(const Tensor& transitions_in, const Tensor& start_in, const Tensor& end_in) {
  const Tensor transitions = transitions_in.contiguous(), start = start_in.contiguous(),
               end = end_in.contiguous();  // held while read
  return any_poison(transitions.const_data_ptr<scalar_t>(), transitions.numel()) ||
         any_poison(start.const_data_ptr<scalar_t>(), start.numel()) ||
         any_poison(end.const_data_ptr<scalar_t>(), end.numel());
}

// The sequences among `candidates` that meet a NaN or +inf score inside their length, found in
// one read of their emissions, with the value of their log Z. Candidates: the sequences the exact
// per-sequence kernels ran, or a decoding op's every sequence, or those whose emissions its lane
// kernel flagged when no transition, start or end score is NaN or +inf (scores_poisoned). (The
// lane kernels flag every sequence with a NaN or +inf score in its length, and decline a call
// whose transition, start or end scores hold one: the sequences they vouch for hold none.) A
// sequence of length 1 meets no transition score.
template <typename scalar_t>
std::vector<Poisoned> poisoned_sequences(const Tensor& emissions, const int64_t* len,
                                         const Tensor& transitions_in, const Tensor& start_in,
                                         const Tensor& end_in, const std::vector<int64_t>& candidates) {
  std::vector<Poisoned> found;
  if (candidates.empty()) return found;
  const int64_t K = emissions.size(2);
  constexpr scalar_t inf = std::numeric_limits<scalar_t>::infinity();
  auto any_nan = [](const scalar_t* x, int64_t n, int64_t stride = 1) {
    bool nan = false;
    for (int64_t i = 0; i < n; ++i) nan = nan || std::isnan(x[i * stride]);
    return nan;
  };
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const Tensor transitions = transitions_in.contiguous(), start = start_in.contiguous(),
               end = end_in.contiguous();  // held while read
  const scalar_t* tr = transitions.const_data_ptr<scalar_t>();
  const scalar_t* st = start.const_data_ptr<scalar_t>();
  const scalar_t* en = end.const_data_ptr<scalar_t>();
  const bool ends_poisoned = any_poison<scalar_t>(st, K) || any_poison<scalar_t>(en, K);
  const bool transitions_poisoned = any_poison<scalar_t>(tr, K * K);
  const scalar_t* e = emissions.const_data_ptr<scalar_t>();
  const int64_t eb = emissions.stride(0), et = emissions.stride(1), ek = emissions.stride(2);
  const bool one_run = ek == 1 && et == K;
  for (const int64_t b : candidates) {
    bool poisoned = len[b] > 0 && (ends_poisoned || (len[b] > 1 && transitions_poisoned));
    // the sequence's rows are one run: a branch-free pass the compiler vectorises (decode reads
    // every sequence here, beside a kernel of a few microseconds)
    if (!poisoned && one_run) poisoned = any_poison<scalar_t>(e + b * eb, len[b] * K);
    for (int64_t t = 0; t < len[b] && !poisoned && !one_run; ++t) {
      const scalar_t* row = e + b * eb + t * et;
      for (int64_t k = 0; k < K; ++k) poisoned = poisoned || !(row[k * ek] < inf);
    }
    if (poisoned) found.push_back({b, nan});
  }
  // Their values: NaN where they read a NaN score (it reaches every later step and the end);
  // else nonfinite_log_z's, whose tables are built only here (a length-1 sequence reads none of
  // the transition kinds, which may then hold NaN).
  if (found.empty() || any_nan(st, K) || any_nan(en, K)) return found;
  const bool transitions_nan = any_nan(tr, K * K);
  const std::vector<double> tr_kinds = score_kinds(tr, K * K), st_kinds = score_kinds(st, K),
                            en_kinds = score_kinds(en, K);
  for (Poisoned& p : found) {
    const int64_t b = p.sequence;
    bool nan_read = transitions_nan && len[b] > 1;
    for (int64_t t = 0; t < len[b] && !nan_read; ++t) nan_read = any_nan(e + b * eb + t * et, K, ek);
    if (!nan_read) p.value = nonfinite_log_z(e + b * eb, et, ek, len[b], K, tr_kinds, st_kinds, en_kinds);
  }
  return found;
}

// Every sequence of the batch, as poisoned_sequences' candidates (the decoding ops check them all).
inline std::vector<int64_t> all_sequences(int64_t B) {
  std::vector<int64_t> all(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) all[static_cast<size_t>(b)] = b;
  return all;
}

// Decoding and marginals of a sequence that meets a NaN or +inf score, as the reference gives
// them: the kernels' max and max-shift comparisons fail silently on NaN and shift by inf - inf,
// which gave finite best path scores and k-best paths, and zero marginals (seen). So, for each
// poisoned sequence: the best path's score its log Z's value (Poisoned::value: NaN or +inf; its
// tags are kept, as the reference keeps its path); every k-best row tags -1 (the reference's
// rows of a non-finite score) and that score; its marginals, the gradient of log Z, NaN over
// its length. Any pointer may be null.
inline void propagate_decoded(const std::vector<Poisoned>& sequences, const int64_t* len,
                              Tensor* scores, Tensor* kbest_tags, Tensor* marginals) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (const Poisoned& p : sequences) {
    if (scores) scores->select(0, p.sequence).fill_(p.value);
    if (kbest_tags) kbest_tags->select(0, p.sequence).fill_(-1);
    if (marginals) marginals->select(0, p.sequence).narrow(0, 0, len[p.sequence]).fill_(nan);
  }
}

// Sets log Z (Poisoned::value) and the NaN gradients of the poisoned sequences (see above); any
// pointer may be null.
inline void propagate_poison(const std::vector<Poisoned>& sequences, const int64_t* len, Tensor* log_z,
                             Tensor* grad_emissions, std::initializer_list<Tensor*> grad_scores) {
  if (sequences.empty()) return;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (const Poisoned& p : sequences) {
    if (log_z) log_z->select(0, p.sequence).fill_(p.value);
    if (grad_emissions) grad_emissions->select(0, p.sequence).narrow(0, 0, len[p.sequence]).fill_(nan);
  }
  for (Tensor* g : grad_scores) g->fill_(nan);
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

}  // namespace fastner::cpu::crf
