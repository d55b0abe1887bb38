// The per-sequence Viterbi and k-best Viterbi kernels on CPU (the tables and the stepping
// scheme of csrc/cpu/crf_sequence.h). Torch-free.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/crf_sequence.h"

namespace fastner::cpu::crf {

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

}  // namespace fastner::cpu::crf
