// Batch-level terms of the CRF ops on CPU that every strategy shares: the gold path's score and
// its gradient counts, and NaN propagation (a NaN score makes the result NaN, as in the
// reference), on tensors in any layout.
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

// ---- NaN propagation -----------------------------------------------------------------------
// A NaN score makes the result NaN, as in the reference (and torch's autograd): a NaN emission
// inside a sequence's length makes its log Z NaN, its emission gradients NaN over that length,
// and the transition-score gradients NaN; a NaN transition score does so for every non-empty
// sequence. The kernels' max-shifted recursions compare scores, and a comparison with NaN fails
// silently (seen: log Z = -inf with finite gradients), so the sequences are found here in one
// read of the emissions of the `candidates`: the sequences the exact per-sequence kernels ran.
// (The lane kernels flag every sequence with a NaN or +inf score in its length, and decline a
// call whose transition scores hold one: the sequences they vouch for hold no NaN.)
template <typename scalar_t>
std::vector<int64_t> nan_sequences(const Tensor& emissions, const int64_t* len, const Tensor& transitions,
                                   const Tensor& start, const Tensor& end,
                                   const std::vector<int64_t>& candidates) {
  std::vector<int64_t> found;
  if (candidates.empty()) return found;
  const int64_t K = emissions.size(2);
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
  for (const int64_t b : candidates) {
    bool nan = scores_nan && len[b] > 0;
    if (!nan && ek == 1 && et == K) {
      // the sequence's rows are one run: a branch-free pass the compiler vectorises (decode
      // reads every sequence here, beside a kernel of a few microseconds)
      const scalar_t* x = e + b * eb;
      int any = 0;  // an int: gcc vectorises an int |= reduction, not a bool one
      for (int64_t n = 0; n < len[b] * K; ++n) any |= (x[n] != x[n]);
      nan = any != 0;
    }
    for (int64_t t = 0; t < len[b] && !nan && !(ek == 1 && et == K); ++t) {
      const scalar_t* row = e + b * eb + t * et;
      for (int64_t k = 0; k < K; ++k) nan = nan || std::isnan(row[k * ek]);
    }
    if (nan) found.push_back(b);
  }
  return found;
}

// Every sequence of the batch, as nan_sequences' candidates (the decoding ops check them all).
inline std::vector<int64_t> all_sequences(int64_t B) {
  std::vector<int64_t> all(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) all[static_cast<size_t>(b)] = b;
  return all;
}

// Decoding and marginals of a sequence with a NaN score are NaN, as in the reference: the
// kernels' max and max-shift comparisons fail silently on NaN, which gave a finite best path
// score, finite k-best paths and zero marginals (seen). So, for each of `sequences`: the best
// path's score NaN (its tags are kept, as the reference keeps its path); every k-best row tags
// -1 and score NaN; its marginals NaN over its length. Any pointer may be null.
inline void propagate_nan_decoded(const std::vector<int64_t>& sequences, const int64_t* len,
                                  Tensor* scores, Tensor* kbest_tags, Tensor* marginals) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (int64_t b : sequences) {
    if (scores) scores->select(0, b).fill_(nan);
    if (kbest_tags) kbest_tags->select(0, b).fill_(-1);
    if (marginals) marginals->select(0, b).narrow(0, 0, len[b]).fill_(nan);
  }
}

// Sets what the NaN sequences make NaN (see nan_sequences); any pointer may be null.
inline void propagate_nan(const std::vector<int64_t>& sequences, const int64_t* len, Tensor* log_z,
                   Tensor* grad_emissions, std::initializer_list<Tensor*> grad_scores) {
  if (sequences.empty()) return;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (int64_t b : sequences) {
    if (log_z) log_z->select(0, b).fill_(nan);
    if (grad_emissions) grad_emissions->select(0, b).narrow(0, 0, len[b]).fill_(nan);
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
