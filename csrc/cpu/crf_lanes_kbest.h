// The k-best Viterbi lane kernel (crf_lanes.h's kbest), compiled once per instruction set like
// crf_lanes_impl.h (same rules: internal linkage only, no standard-library templates); include
// it right after crf_lanes_impl.h, whose Group and vector math it uses.
#ifndef FASTNER_LANES
#error "define FASTNER_LANES (8 or 16) and include crf_lanes_impl.h before crf_lanes_kbest.h"
#endif

namespace fastner::cpu::crf {
namespace lanes {
namespace {

// ---- k-best Viterbi --------------------------------------------------------------------------

size_t kbest_scratch_floats(int64_t K, int64_t T, int64_t k) {
  // cur, next [K, k]; e [K]; top, arg, final scores and indices [k] each; from [T, K, k].
  return static_cast<size_t>((2 * K * k + K + 4 * k + T * K * k) * W + W);
}

// The k largest candidates per lane, kept sorted descending in top[0..k) with their indices in
// arg; a candidate equal to an entry goes below it (entries offered first stay ahead, as in the
// per-sequence kernel's TopK): once a lane has placed the candidate, every later position takes
// the entry displaced from the one above.
inline void offer(V* top, I* arg, int64_t k, V cand, I index) {
  I shifting{};
  for (int64_t p = 0; p < k; ++p) {
    const I take = shifting | (cand > top[p]);
    const V old = top[p];
    const I old_arg = arg[p];
    top[p] = select(take, cand, old);
    arg[p] = take ? index : old_arg;
    cand = select(take, old, cand);
    index = take ? old_arg : index;
    shifting = take;
  }
}

inline bool any_lane(I mask) {
  for (int l = 0; l < W; ++l) {
    if (mask[l]) return true;
  }
  return false;
}

// The k best paths of each sequence of the group, the per-sequence kernel's algorithm with the
// sequences in lanes: per (step, tag) the k best partial paths with the index (tag * k + rank)
// of their predecessor. tags [B, k, T] (-1 past each length and in the rows of paths that do
// not exist), scores [B, k] (-inf for those; a sequence of length 0 has one path of score 0).
void kbest(const Model& m, const Emissions& em, int64_t group, int64_t k, int64_t* tags,
           float* scores, float* scratch) {
  const Group g(em, group);
  const int64_t K = m.K, T = em.T, n_steps = g.longest;
  V* cur = aligned(scratch);              // [K, k]: the k best scores ending in (t, j)
  V* next = cur + K * k;                  // [K, k]
  V* e = next + K * k;                    // [K]
  V* top = e + K;                         // [k]
  I* arg = reinterpret_cast<I*>(top + k);   // [k]
  V* final_score = reinterpret_cast<V*>(arg + k);  // [k] per lane, set at its last step
  I* final_arg = reinterpret_cast<I*>(final_score + k);  // [k]
  I* from = final_arg + k;                // [longest, K, k]: predecessor index tag * k + rank
  const V ninf = splat(-kInf);
  for (int64_t r = 0; r < k; ++r) {
    final_score[r] = ninf;
    final_arg[r] = I{};
  }
  for (int64_t t = 0; t < n_steps; ++t) {
    g.emissions(t, K, e);
    if (t == 0) {
      for (int64_t j = 0; j < K; ++j) {
        cur[j * k] = m.start[j] + e[j];
        for (int64_t r = 1; r < k; ++r) cur[j * k + r] = ninf;
      }
    } else {
      for (int64_t j = 0; j < K; ++j) {
        for (int64_t r = 0; r < k; ++r) {
          top[r] = ninf;
          arg[r] = I{};
        }
        for (int64_t i = 0; i < K; ++i) {
          const float transition = m.transitions[i * K + j];
          if (transition == -kInf) continue;
          for (int64_t r = 0; r < k; ++r) {
            const V cand = cur[i * k + r] + transition;
            // cur[i] is sorted per lane: once no lane admits a rank, no later rank enters.
            if (!any_lane(cand > top[k - 1])) break;
            offer(top, arg, k, cand, I{} + static_cast<int32_t>(i * k + r));
          }
        }
        for (int64_t r = 0; r < k; ++r) {
          next[j * k + r] = top[r] + e[j];
          from[(t * K + j) * k + r] = arg[r];
        }
      }
      // Lanes past their length keep their state (they joined final_* at their last step).
      const I active = g.active(t);
      for (int64_t n = 0; n < K * k; ++n) cur[n] = select(active, next[n], cur[n]);
    }
    const I last = g.last(t);
    if (!any_lane(last)) continue;
    for (int64_t r = 0; r < k; ++r) {
      top[r] = ninf;
      arg[r] = I{};
    }
    for (int64_t j = 0; j < K; ++j) {
      for (int64_t r = 0; r < k; ++r) {
        const V cand = cur[j * k + r] + m.end[j];
        if (!any_lane(cand > top[k - 1])) break;
        offer(top, arg, k, cand, I{} + static_cast<int32_t>(j * k + r));
      }
    }
    for (int64_t r = 0; r < k; ++r) {
      final_score[r] = select(last, top[r], final_score[r]);
      final_arg[r] = last ? arg[r] : final_arg[r];
    }
  }
  // Backtrace, a lane (sequence) at a time.
  const float* fs = reinterpret_cast<const float*>(final_score);  // vector types alias their elements
  const int32_t* fa = reinterpret_cast<const int32_t*>(final_arg);
  const int32_t* fr = reinterpret_cast<const int32_t*>(from);
  for (int l = 0; l < g.n; ++l) {
    const int64_t b = g.seq[l], L = g.len[l];
    int64_t* rows = tags + b * k * T;
    float* out = scores + b * k;
    for (int64_t n = 0; n < k * T; ++n) rows[n] = -1;
    for (int64_t n = 0; n < k; ++n) out[n] = -kInf;
    if (L == 0) {
      out[0] = 0.0f;
      continue;
    }
    for (int64_t n = 0; n < k; ++n) {
      const float score = fs[n * W + l];
      if (score == -kInf) break;  // fewer than k paths with a finite score
      out[n] = score;
      int64_t index = fa[n * W + l];
      int64_t* row = rows + n * T;
      for (int64_t t = L - 1; t >= 1; --t) {
        row[t] = index / k;
        index = fr[((t * K + index / k) * k + index % k) * W + l];
      }
      row[0] = index / k;
    }
  }
}

}  // namespace
}  // namespace lanes
}  // namespace fastner::cpu::crf
