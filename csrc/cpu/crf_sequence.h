// The per-sequence CRF kernels on CPU: one sequence at a time, vectorised over the tags, in
// log space with a scaled form of log-sum-exp (below). The float64 path of every op, the path of
// batches too small to fill the lanes (csrc/cpu/crf.cpp chooses), and the exact fallback for the
// sequences the lane kernels flag. Torch-free: pointers and sizes only.
//
// Every per-step loop runs over K padded to a multiple of 8 (KP) under `#pragma omp simd`.
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
//
// Viterbi and k-best: csrc/cpu/crf_sequence_decode.h.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/crf_math.h"

namespace fastner::cpu::crf {

inline int64_t padded(int64_t K) { return (K + 7) / 8 * 8; }

// ---- per-call transition tables -------------------------------------------------------------

template <typename scalar_t>
struct Transitions {
  int64_t K = 0, KP = 0;
  scalar_t tmax = 0;              // largest finite transition (0 when none is finite)
  std::vector<scalar_t> log_row;  // [K, KP]: log_row[i * KP + j] = T_ij, -inf padded
  std::vector<scalar_t> log_col;  // [K, KP]: log_col[j * KP + i] = T_ij, -inf padded
  std::vector<scalar_t> exp_row;  // [K, KP]: exp(T_ij - tmax), 0 padded (empty: Terms::Log)
  std::vector<scalar_t> exp_col;  // [K, KP]: transposed exp_row (empty: Terms::Log)
  // Copies, not pointers into the caller's tensors: a Transitions never outlives what it reads.
  std::vector<scalar_t> start;  // [K]
  std::vector<scalar_t> end;    // [K]

  // Which tables to build: the sum-product recursions (forward, backward, marginals, windows)
  // read the exp tables; Viterbi and k-best (crf_sequence_decode.h) only the log ones, and
  // their K^2 exps were 10-16% of a one-sentence crf_viterbi call (K = 17, 40 tokens).
  enum class Terms { LogAndExp, Log };

  // transitions [K, K] (contiguous), start / end [K]: copied into the tables held here.
  Transitions(const scalar_t* tr, const scalar_t* start_in, const scalar_t* end_in, int64_t num_tags,
              Terms terms = Terms::LogAndExp) {
    K = num_tags;
    KP = padded(K);
    start.assign(start_in, start_in + K);
    end.assign(end_in, end_in + K);
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
    for (int64_t i = 0; i < K; ++i) {
      for (int64_t j = 0; j < K; ++j) {
        log_row[i * KP + j] = tr[i * K + j];
        log_col[j * KP + i] = tr[i * K + j];
      }
    }
    if (terms == Terms::Log) return;
    exp_row.assign(K * KP, scalar_t(0));
    exp_col.assign(K * KP, scalar_t(0));
    for (int64_t i = 0; i < K; ++i) {
      for (int64_t j = 0; j < K; ++j) {
        const scalar_t value = tr[i * K + j];
        const scalar_t scaled = value == neg_inf<scalar_t>() ? scalar_t(0) : std::exp(value - tmax);
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
inline std::vector<int64_t> by_length(const int64_t* len, int64_t begin, int64_t stop) {
  std::vector<int64_t> order(stop - begin);
  for (int64_t b = begin; b < stop; ++b) order[b - begin] = b;
  if (order.size() <= 64) {
    // Insertion sort, as stable (a sequence passes only shorter ones): std::stable_sort
    // allocates a buffer, ~1% of a B = 32 decode.
    for (size_t i = 1; i < order.size(); ++i) {
      const int64_t x = order[i];
      size_t j = i;
      for (; j > 0 && len[order[j - 1]] < len[x]; --j) order[j] = order[j - 1];
      order[j] = x;
    }
    return order;
  }
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

// One sequence's marginals (g_log_z * p(y_t = j)) into marginals [T, K], by ForwardRun then
// BackwardRun without gradient sums. alphas: [T, K] scratch; work: 8 * KP scratch.
template <typename scalar_t>
void marginals_sequence(const Transitions<scalar_t>& tr, const scalar_t* em, int64_t L, int64_t T,
                        scalar_t g_log_z, scalar_t* alphas, scalar_t* marginals, scalar_t* work) {
  const scalar_t log_z = forward_sequence(tr, em, L, T, alphas, work);
  BackwardRun<scalar_t> run;
  run.begin(tr, em, alphas, L, T, log_z, g_log_z, marginals, nullptr, work);
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

}  // namespace fastner::cpu::crf
