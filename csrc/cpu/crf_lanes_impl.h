// The lane kernels of crf_lanes.h, written once for a vector of FASTNER_LANES floats and
// compiled once per instruction set: crf_lanes_avx2.cpp (8 lanes) and crf_lanes_avx512.cpp
// (16 lanes, under `#pragma GCC target`). Include it from exactly one .cpp per instruction set,
// after every standard header that .cpp needs. (~600 lines: every lane kernel of the CRF's
// seven ops in one place, because each .cpp must include all of them under its target pragma.)
//
// Everything here has internal linkage (anonymous namespace) and uses no standard-library
// templates: an inline function compiled for AVX-512 in one object and for AVX2 in another
// would otherwise be merged by the linker, and the AVX-512 copy could run on a CPU without it.
//
// Notation (per lane, i.e. per sequence): x_t[j] = exp(em_t[j] - max_j em_t[j]);
// E = exp(transitions - tmax). Forward: p_0 = normalise(exp_start * x_0),
// p_t = normalise((p_{t-1} E) * x_t), where normalise divides by the maximum s_t and
// log Z = sum of (shifts + log s_t) + emax + log(sum_j p_{L-1}[j] exp_end[j]).
// Backward: r_{L-1} = exp_end, r_{t-1} = normalise(E (x_t * r_t)); marginal_t = p_t r_t / Z_t
// with Z_t = sum_j p_t[j] r_t[j]; pairwise marginal (i -> j at t) =
// p_{t-1}[i] E_ij x_t[j] r_t[j] / Z'_t with Z'_t = sum_i p_{t-1}[i] (E (x_t * r_t))[i].
// Every normaliser is local to its step, so no log-space subtraction of large numbers happens.

#ifndef FASTNER_LANES
#error "define FASTNER_LANES (8 or 16) before including crf_lanes_impl.h"
#endif

#include "cpu/crf_lanes_vec.h"  // W, V, I, D and the vector math

namespace fastner::cpu::crf {
namespace lanes {
namespace {


// ---- a group of W sequences ------------------------------------------------------------------

// Rows of K floats, one per lane at base + offset[l], as K vectors: out[j] lane l =
// base[offset[l] + j]. Whole blocks of W entries by row loads and a transpose, the remaining
// entries by gathers.
inline void lanes_of_rows(const float* base, I offset, int64_t K, V* out) {
  int64_t j = 0;
  for (; j + W <= K; j += W) {
    V rows[W];
    for (int l = 0; l < W; ++l) __builtin_memcpy(&rows[l], base + offset[l] + j, sizeof(V));
    transpose(rows, out + j);
  }
  for (; j < K; ++j) out[j] = gather(base + j, offset);
}

struct Group {
  int64_t n = 0;          // lanes 0 .. n - 1 hold sequences (n <= W; lanes >= n are idle)
  int64_t seq[W] = {};    // the sequence of each lane (idle lanes: the group's first)
  int64_t longest = 0;
  I len{};                // per lane, 0 for idle lanes
  I offset{};             // per lane, element offset of its sequence from em.data (idle lanes: 0)
  const float* base = nullptr;
  int64_t stride_t = 0;

  Group(const Emissions& em, int64_t group) {
    const int64_t first = group * W;
    n = em.B - first < W ? em.B - first : W;
    base = em.data;
    stride_t = em.stride_t;
    for (int l = 0; l < W; ++l) {
      const int64_t b = l < n ? em.order[first + l] : em.order[first];
      seq[l] = b;
      const int64_t L = l < n ? em.lengths[b] : 0;
      len[l] = static_cast<int32_t>(L);
      offset[l] = l < n ? static_cast<int32_t>(b * em.stride_b) : 0;
      longest = L > longest ? L : longest;
    }
  }

  I active(int64_t t) const { return len > static_cast<int32_t>(t); }
  // Lanes come in decreasing length: from this step on only the low H lanes are active (lane
  // H's length; 0 where the group holds at most H sequences).
  int64_t half_from() const { return n > H ? len[H] : 0; }
  I last(int64_t t) const { return len == static_cast<int32_t>(t + 1); }

  // Emissions of step t for every tag, e[j] one lane per sequence.
  void emissions(int64_t t, int64_t K, V* e) const { lanes_of_rows(base + t * stride_t, offset, K, e); }

  // x_t (into x[K]) and the shift max_j em_t[j] it is relative to.
  V scaled_emissions(int64_t t, int64_t K, V* x) const {
    emissions(t, K, x);
    const V m = max_of(x, K);
    for (int64_t j = 0; j < K; ++j) x[j] = vexp_nonpositive(x[j] - m);
    return m;
  }
};

// out[j] = sum_i p[i] * E[i, j] for j < K, a block of columns in registers at a time. U: V, or VH
// for the low lanes only (the other lanes of out keep what they held).
template <typename U, int JB>
inline void vec_mat_block(const V* p, const float* E, int64_t K, int64_t j0, V* out) {
  U acc[JB];
  for (int jj = 0; jj < JB; ++jj) acc[jj] = U{};
  for (int64_t i = 0; i < K; ++i) {
    const U pi = low_lanes<U>(p[i]);
    const float* row = E + i * K + j0;
    for (int jj = 0; jj < JB; ++jj) acc[jj] += pi * row[jj];
  }
  for (int jj = 0; jj < JB; ++jj) store_low_lanes(out[j0 + jj], acc[jj]);
}

// Column blocks as wide as the registers allow (32 vector registers with AVX-512, 16 with
// AVX2): every block is one pass over p with independent accumulation chains.
constexpr int kBlock = W == 16 ? 16 : 8;

template <typename U>
inline void vec_mat(const V* p, const float* E, int64_t K, V* out) {
  int64_t j = 0;
  for (; j + kBlock <= K; j += kBlock) vec_mat_block<U, kBlock>(p, E, K, j, out);
  for (; j + 8 <= K; j += 8) vec_mat_block<U, 8>(p, E, K, j, out);
  for (; j + 4 <= K; j += 4) vec_mat_block<U, 4>(p, E, K, j, out);
  for (; j < K; ++j) vec_mat_block<U, 1>(p, E, K, j, out);
}

// out[i] = sum_j E[i, j] * u[j] for i < K, a block of rows in registers at a time (U as above).
template <typename U, int IB>
inline void mat_vec_block(const float* E, const V* u, int64_t K, int64_t i0, V* out) {
  U acc[IB];
  for (int ii = 0; ii < IB; ++ii) acc[ii] = U{};
  for (int64_t j = 0; j < K; ++j) {
    const U uj = low_lanes<U>(u[j]);
    for (int ii = 0; ii < IB; ++ii) acc[ii] += E[(i0 + ii) * K + j] * uj;
  }
  for (int ii = 0; ii < IB; ++ii) store_low_lanes(out[i0 + ii], acc[ii]);
}

template <typename U>
inline void mat_vec(const float* E, const V* u, int64_t K, V* out) {
  int64_t i = 0;
  for (; i + kBlock <= K; i += kBlock) mat_vec_block<U, kBlock>(E, u, K, i, out);
  for (; i + 8 <= K; i += 8) mat_vec_block<U, 8>(E, u, K, i, out);
  for (; i + 4 <= K; i += 4) mat_vec_block<U, 4>(E, u, K, i, out);
  for (; i < K; ++i) mat_vec_block<U, 1>(E, u, K, i, out);
}

// The first step whose vector products (vec_mat, mat_vec) the scaled passes run on half vectors:
// the group's half_from with AVX-512 (Zen 4 runs a 512-bit operation as two 256-bit halves, so
// a half vector costs half as much), never with AVX2 (a 128-bit operation costs as much as a
// 256-bit one: the AVX2 kernels measured 1-3% slower with them). Every other operation of those
// steps stays full width, its upper lanes selected away as inactive, so each lane computes
// exactly what it did at full width. (AVX-512, Zen 4, T = 40, K = 17, uniform lengths,
// standalone harness: forward-backward 2.8% faster at B = 32, 10% at B = 5, the same at B = 64
// and B = 256; the forward pass alone 5.5% at B = 32, 16% at B = 5, 0.6% at B = 256. Half-width
// pairwise sums gained 0.5% at B = 32 and lost 2-3% at B >= 64: not taken.)
// (The AVX2 build compiles the full-width products only.)
inline int64_t half_products_from(const Group& g) { return W == 16 ? g.half_from() : g.longest; }

// Divides v[0..K) by its maximum s (lanes where keep is 0 keep old instead) and returns s.
inline V normalise_into(const V* v, int64_t K, I keep, V* out) {
  const V s = vmax(max_of(v, K), V{});
  const V inv = 1.0f / s;
  for (int64_t j = 0; j < K; ++j) out[j] = select(keep, v[j] * inv, out[j]);
  return s;
}

inline I unsafe(V s) { return ~(s >= kSafe); }  // also true for NaN

// ---- forward ---------------------------------------------------------------------------------

// The scaled forward pass of a group. p: [K] running state; x, q: [K] scratch; when P and X are
// given, P[t] and X[t] ([longest, K] each) receive p_t and x_t, zero in lanes past their length.
// Returns the troubled lanes; log_z gets log Z per lane (meaningless in troubled lanes).
inline I forward_pass(const Model& m, const Group& g, V* p, V* x, V* q, V* P, V* X, D& log_z) {
  const int64_t K = m.K;
  I bad{};
  D shift{};
  if (g.longest == 0) {
    log_z = D{};
    return bad;
  }
  const int64_t half_from = half_products_from(g);
  for (int64_t t = 0; t < g.longest; ++t) {
    const I active = g.active(t);
    const V em_max = g.scaled_emissions(t, K, x);
    if (t == 0) {
      for (int64_t j = 0; j < K; ++j) q[j] = m.exp_start[j] * x[j];
    } else {
      if (W == 8 || t < half_from) {
        vec_mat<V>(p, m.exp_transitions, K, q);
      } else if constexpr (W == 16) {
        vec_mat<VH>(p, m.exp_transitions, K, q);
      }
      for (int64_t j = 0; j < K; ++j) q[j] *= x[j];
    }
    const V s = normalise_into(q, K, active, p);
    bad |= active & unsafe(s);
    const V step_shift = em_max + (t == 0 ? m.smax : m.tmax);
    shift += __builtin_convertvector(select(active, step_shift, V{}), D) +
             __builtin_convertvector(select(active, vlog(s), V{}), D);
    if (P) {
      for (int64_t j = 0; j < K; ++j) {
        P[t * K + j] = select(active, p[j], V{});
        X[t * K + j] = select(active, x[j], V{});
      }
    }
  }
  V total{};
  for (int64_t j = 0; j < K; ++j) total += p[j] * m.exp_end[j];  // once per pass: no need for chains
  const I nonempty = g.len > 0;
  bad |= nonempty & unsafe(total);
  const D end_term = __builtin_convertvector(select(nonempty, vlog(total) + m.emax, V{}), D);
  log_z = shift + end_term;
  return bad;
}

size_t scratch_floats(int64_t K, int64_t T) {
  // Viterbi: [T, K] states + a row + [T] tag vectors + the transposed transitions [K, K]; backward: P and X
  // [T, K] + 6 rows; plus alignment.
  return static_cast<size_t>((2 * T + 8) * K * W + K * K + W);
}

void forward(const Model& m, const Emissions& em, int64_t group, float* log_z, uint8_t* trouble,
             float* scratch) {
  const Group g(em, group);
  const int64_t K = m.K;
  V* p = aligned(scratch);
  V* x = p + K;
  V* q = x + K;
  D lz;
  const I bad = forward_pass(m, g, p, x, q, nullptr, nullptr, lz);
  for (int l = 0; l < g.n; ++l) {
    log_z[g.seq[l]] = static_cast<float>(lz[l]);
    if (bad[l]) trouble[g.seq[l]] = 1;
  }
}

// ---- backward --------------------------------------------------------------------------------

// Writes grad rows of step t from per-lane vectors rows[K] (lanes < n): a transpose read
// straight from memory (extracting lanes from registers would stall on every element).
// Whole blocks of W tags go through a transpose and one store per sequence; the remaining
// tags through a scatter (AVX-512) or a scalar transpose read straight from memory
// (extracting lanes from registers would stall on every element).
inline void write_rows(const Rows& out, const Group& g, int64_t t, int64_t K, const V* rows) {
  float* base = out.data + t * out.stride_t;
  int64_t j = 0;
  for (; j + W <= K; j += W) {
    V columns[W];
    transpose(rows + j, columns);
    for (int l = 0; l < g.n; ++l) {
      __builtin_memcpy(base + g.seq[l] * out.stride_b + j, &columns[l], sizeof(V));
    }
  }
  if (j == K) return;
#if FASTNER_LANES == 16
  if (g.n == W && out.fits_int32) {
    I offsets;
    for (int l = 0; l < W; ++l) offsets[l] = static_cast<int32_t>(g.seq[l] * out.stride_b);
    for (; j < K; ++j) _mm512_i32scatter_ps(base + j, (__m512i)offsets, (__m512)rows[j], 4);
    return;
  }
#endif
  const float* f = reinterpret_cast<const float*>(rows);  // vector types alias their elements
  for (int l = 0; l < g.n; ++l) {
    float* dst = base + g.seq[l] * out.stride_b;
    for (int64_t jj = j; jj < K; ++jj) dst[jj] = f[jj * W + l];
  }
}

void backward(const Model& m, const Emissions& em, int64_t group, const float* weight,
              int64_t weight_stride, const Rows& grad, float* pairs, float* start_sums,
              float* end_sums, uint8_t* trouble, float* log_z, float* scratch) {
  const Group g(em, group);
  const int64_t K = m.K, T = em.T, n_steps = g.longest;
  V* P = aligned(scratch);    // [longest, K] forward states p_t
  V* X = P + n_steps * K;     // [longest, K] x_t, then (from the backward sweep on) U_t
  V* r = X + n_steps * K;     // [K] backward state r_t
  V* u = r + K;               // [K]
  V* q = u + K;               // [K]
  V* mu = q + K;              // [K] weighted marginals of a step
  V* start_acc = mu + K;      // [K]
  V* end_acc = start_acc + K;  // [K]

  V w{};
  for (int l = 0; l < g.n; ++l) w[l] = weight[g.seq[l] * weight_stride];

  // Rows past the group's longest sequence are zero for every lane.
  for (int l = 0; l < g.n; ++l) {
    for (int64_t t = n_steps; t < T; ++t) {
      float* dst = grad.data + g.seq[l] * grad.stride_b + t * grad.stride_t;
      for (int64_t j = 0; j < K; ++j) dst[j] = 0.0f;
    }
  }
  if (n_steps == 0) {
    if (pairs) {
      for (int64_t k = 0; k < K * K; ++k) pairs[k] = 0.0f;
      for (int64_t k = 0; k < K; ++k) start_sums[k] = end_sums[k] = 0.0f;
    }
    if (log_z) {
      for (int l = 0; l < g.n; ++l) log_z[g.seq[l]] = 0.0f;
    }
    return;
  }

  D lz;
  I bad = forward_pass(m, g, r, u, q, P, X, lz);
  const int64_t half_from = half_products_from(g);
  if (log_z) {
    for (int l = 0; l < g.n; ++l) log_z[g.seq[l]] = static_cast<float>(lz[l]);
  }

  for (int64_t j = 0; j < K; ++j) {
    start_acc[j] = V{};
    end_acc[j] = V{};
    r[j] = select(g.last(n_steps - 1), splat(m.exp_end[j]), V{});
  }
  for (int64_t t = n_steps - 1; t >= 0; --t) {
    const I active = g.active(t);
    const I last = g.last(t);
    // Marginals of step t.
    const V z = dot(P + t * K, r, K);
    bad |= active & unsafe(z);
    const V scale = select(active, w / z, V{});
    for (int64_t j = 0; j < K; ++j) {
      mu[j] = select(active, P[t * K + j] * r[j] * scale, V{});
      end_acc[j] += select(last, mu[j], V{});
    }
    write_rows(grad, g, t, K, mu);
    if (t == 0) {
      for (int64_t j = 0; j < K; ++j) start_acc[j] += mu[j];
      break;
    }
    // Step back to t - 1: q = E (x_t * r_t), and U_t = x_t * r_t * w / Z'_t for the pairwise sums.
    V* U = X + t * K;
    for (int64_t j = 0; j < K; ++j) u[j] = U[j] * r[j];
    if (W == 8 || t < half_from) {
      mat_vec<V>(m.exp_transitions, u, K, q);
    } else if constexpr (W == 16) {
      mat_vec<VH>(m.exp_transitions, u, K, q);
    }
    const V z_pair = dot(P + (t - 1) * K, q, K);
    bad |= active & unsafe(z_pair);
    const V pair_scale = select(active, w / z_pair, V{});
    for (int64_t j = 0; j < K; ++j) U[j] = select(active, u[j] * pair_scale, V{});
    // r_{t-1}: the normalised q where the lane ran at t, exp_end where t - 1 is its last step.
    const V inv = 1.0f / max_of(q, K);
    const I starts = g.last(t - 1);
    for (int64_t i = 0; i < K; ++i) {
      r[i] = select(active, q[i] * inv, select(starts, splat(m.exp_end[i]), V{}));
    }
  }

  if (pairs == nullptr) {  // marginals only: no sums
    for (int l = 0; l < g.n; ++l) {
      if (bad[l]) trouble[g.seq[l]] = 1;
    }
    return;
  }
  // Troubled lanes add nothing: zero them (they may hold NaN) before summing.
  const I ok = ~bad;
  bool any_bad = false;
  for (int l = 0; l < W; ++l) any_bad = any_bad || bad[l];
  if (any_bad) {
    for (int64_t k = 0; k < n_steps * K; ++k) {
      P[k] = select(ok, P[k], V{});
      X[k] = select(ok, X[k], V{});
    }
  }
  for (int64_t j = 0; j < K; ++j) {
    V s = select(ok, start_acc[j], V{});
    V e = select(ok, end_acc[j], V{});
    start_sums[j] = lane_sum(s);
    end_sums[j] = lane_sum(e);
  }
  // pairs[i, j] += sum_t P[t - 1][i] * U[t][j]: a product over (t, lane), register-blocked.
  constexpr int IB = W == 16 ? 4 : 2, JB = 4;
  for (int64_t i0 = 0; i0 < K; i0 += IB) {
    const int ni = K - i0 < IB ? static_cast<int>(K - i0) : IB;
    for (int64_t j0 = 0; j0 < K; j0 += JB) {
      const int nj = K - j0 < JB ? static_cast<int>(K - j0) : JB;
      V acc[IB][JB] = {};
      if (ni == IB && nj == JB) {
        for (int64_t t = 1; t < n_steps; ++t) {
          const V* Pt = P + (t - 1) * K + i0;
          const V* Ut = X + t * K + j0;
          for (int ii = 0; ii < IB; ++ii)
            for (int jj = 0; jj < JB; ++jj) acc[ii][jj] += Pt[ii] * Ut[jj];
        }
      } else {
        for (int64_t t = 1; t < n_steps; ++t) {
          const V* Pt = P + (t - 1) * K + i0;
          const V* Ut = X + t * K + j0;
          for (int ii = 0; ii < ni; ++ii)
            for (int jj = 0; jj < nj; ++jj) acc[ii][jj] += Pt[ii] * Ut[jj];
        }
      }
      for (int ii = 0; ii < ni; ++ii) {
        for (int jj = 0; jj < nj; ++jj) {
          pairs[(i0 + ii) * K + j0 + jj] = lane_sum(acc[ii][jj]);
        }
      }
    }
  }
  for (int l = 0; l < g.n; ++l) {
    if (bad[l]) trouble[g.seq[l]] = 1;
  }
}

// ---- Viterbi ---------------------------------------------------------------------------------

// One max-plus step for a block of columns: out[j] = max_i (v[i] + tr[i, j]) + e[j], scanning i
// upwards (the candidates the backtrace below recomputes, with the same sums). Adding e[j] after
// the maximum gives the same float as adding it to every candidate (rounding is monotonic).
// U: V, or VH for the low lanes only (the others of out are left as they are).
template <typename U, int JB>
inline void max_plus_block(const V* v, const float* tr, const V* e, int64_t K, int64_t j0, V* out) {
  // Unrolled by hand: past 16 columns gcc otherwise keeps best[] in memory (stored every i).
  U best[JB];
#pragma GCC unroll 32
  for (int jj = 0; jj < JB; ++jj) best[jj] = U{} - kInf;
  const U one = ones<U>();
  for (int64_t i = 0; i < K; ++i) {
    const U vi = low_lanes<U>(v[i]);
    const float* row = tr + i * K + j0;
#pragma GCC unroll 32
    for (int jj = 0; jj < JB; ++jj) best[jj] = vmax(add_on_fma(vi, one, broadcast<U>(row[jj])), best[jj]);
  }
#pragma GCC unroll 32
  for (int jj = 0; jj < JB; ++jj) store_low_lanes(out[j0 + jj], best[jj] + low_lanes<U>(e[j0 + jj]));
}

// The last block of a step, of n <= N columns, in one pass over v: with K = 17 a block of 16 and
// one of 1 made two passes, the second a serial chain of K maxima.
template <typename U, int N>
inline void max_plus_last(int64_t n, const V* v, const float* tr, const V* e, int64_t K, int64_t j0,
                          V* out) {
  if constexpr (N > 1) {
    if (n < N) return max_plus_last<U, N - 1>(n, v, tr, e, K, j0, out);
  }
  max_plus_block<U, N>(v, tr, e, K, j0, out);
}

// out[j] = max_i (v[i] + tr[i, j]) + e[j] for every j < K: blocks of kBlock columns, the columns
// past the last whole block in one pass with it where the registers hold them (up to kBlock + 8
// accumulators: 24 of AVX-512's 32 registers, 16 of AVX2's 16 would spill, so AVX2 takes + 4).
constexpr int kMaxPlusLast = W == 16 ? kBlock + 8 : kBlock + 4;

template <typename U>
inline void max_plus_step(const V* v, const float* tr, const V* e, int64_t K, V* out) {
  int64_t j = 0;
  for (; K - j > kMaxPlusLast; j += kBlock) max_plus_block<U, kBlock>(v, tr, e, K, j, out);
  max_plus_last<U, kMaxPlusLast>(K - j, v, tr, e, K, j, out);
}

// The lowest index i < n whose c[i] is the lanes' maximum, 0 where every c[i] is -inf or NaN:
// what a scan from -inf that keeps strictly greater candidates finds (the forward's candidate
// order), in two independent passes instead of one chain of compares and selects through the
// running maximum (the backtrace's critical path). *top receives the maximum (-inf where none).
// U: V, or VH for the low lanes only.
template <typename U>
inline auto first_max(const V* c, int64_t n, U* top) {
  using IU = decltype(U{} < U{});
  const U ninf = U{} - kInf;
  U m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;  // four chains; vmax skips NaN
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    m0 = vmax(low_lanes<U>(c[i]), m0);
    m1 = vmax(low_lanes<U>(c[i + 1]), m1);
    m2 = vmax(low_lanes<U>(c[i + 2]), m2);
    m3 = vmax(low_lanes<U>(c[i + 3]), m3);
  }
  for (; i < n; ++i) m0 = vmax(low_lanes<U>(c[i]), m0);
  const U best = vmax(vmax(m0, m1), vmax(m2, m3));
  // Downwards, so that the lowest match stays; the index vector counts down beside i (a
  // broadcast of i from a general register per step made this loop a chain of ~5-cycle
  // transfers, the backtrace's slowest part).
  IU index{}, at = IU{} + static_cast<int32_t>(n - 1);
  const IU step = IU{} + 1;
  for (i = n - 1; i >= 0; --i) {
    index = low_lanes<U>(c[i]) == best ? at : index;
    at -= step;
  }
  *top = best;
  return best > ninf ? index : IU{};
}

// transitions[i, to[l]] in lane l for the backtrace. With AVX-512 and K <= 32 each row of
// transitions is kept in two registers' worth of memory (built once per group) and a two-source
// permute picks the entries; otherwise the backtrace transposes columns (viterbi below).
struct TransitionRows {
#if FASTNER_LANES == 16
  bool in_registers = false;
  V lo[32], hi[32];  // row i: entries 0-15 and 16-31 (zero padded)
  explicit TransitionRows(const Model& m) : in_registers(m.K <= 32) {
    if (!in_registers) return;
    // Masked loads: the entries past K read as 0 and are not touched in memory. (A zeroed
    // 32-float row per i and two copies out of it, as before, were ~4% of the lane Viterbi at
    // B = 32, T = 40, K = 17: one row set per group.)
    const int64_t K = m.K;
    const __mmask16 lo_mask = K >= 16 ? 0xffff : static_cast<__mmask16>((1u << K) - 1);
    const __mmask16 hi_mask = K <= 16 ? 0 : static_cast<__mmask16>((1u << (K - 16)) - 1);
    for (int64_t i = 0; i < K; ++i) {
      lo[i] = (V)_mm512_maskz_loadu_ps(lo_mask, m.transitions + i * K);
      hi[i] = (V)_mm512_maskz_loadu_ps(hi_mask, m.transitions + i * K + 16);
    }
  }
#else
  static constexpr bool in_registers = false;
  explicit TransitionRows(const Model&) {}
#endif
};

// transitions[i, to[l]] in lane l, from rows kept in registers (AVX-512, K <= 32 only).
inline V transition_to(const TransitionRows& rows, int64_t i, I to) {
#if FASTNER_LANES == 16
  return (V)_mm512_permutex2var_ps((__m512)rows.lo[i], (__m512i)to, (__m512)rows.hi[i]);
#else
  (void)rows;
  (void)i;
  return V{} + static_cast<float>(to[0]);  // never called: in_registers is false without AVX-512
#endif
}

void viterbi(const Model& m, const Emissions& em, int64_t group, int64_t* tags, float* scores,
             uint8_t* nonfinite, float* scratch) {
  const Group g(em, group);
  const int64_t K = m.K, T = em.T, n_steps = g.longest;
  V* S = aligned(scratch);  // [longest, K]: S[t] = best score of a path ending in (t, j)
  V* e = S + n_steps * K;   // [K] emissions of a step; in the backtrace, transitions into arg
  I* path = reinterpret_cast<I*>(e + K);  // [longest]: the tag of each lane at each step
  float* columns = reinterpret_cast<float*>(path + n_steps);  // [K, K]: columns[j * K + i] = tr[i, j]
  // Lanes come in decreasing length: from step half_from on (lane H's length, 0 where the group
  // has at most H sequences) only the low H lanes are active, and the steps run on half vectors
  // (VH). Their S rows then hold values in the low lanes only, all that the backtrace reads there.
  // (The lane Viterbi alone, AVX-512, Zen 4, T = 40, K = 17, uniform lengths: 10.6 -> 9.9 us at
  // B = 32, 6.7 -> 5.4 us at B = 5; the same at B = 256.)
  const int64_t half_from = g.half_from();
  I poisoned{};  // lanes that read a NaN or +inf emission: !(x < inf)
  const V inf = splat(kInf);
  for (int64_t t = 0; t < n_steps; ++t) {
    V* cur = S + t * K;
    g.emissions(t, K, e);
    I finite = e[0] < inf;
    for (int64_t j = 1; j < K; ++j) finite &= e[j] < inf;
    poisoned |= g.active(t) & ~finite;
    if (t == 0) {
      for (int64_t j = 0; j < K; ++j) cur[j] = m.start[j] + e[j];
      continue;
    }
    if (t < half_from) {
      max_plus_step<V>(S + (t - 1) * K, m.transitions, e, K, cur);
    } else {
      max_plus_step<VH>(S + (t - 1) * K, m.transitions, e, K, cur);
    }
  }
  // Backtrace, every lane at once from the group's last step down: a lane joins at its own last
  // step with its best final tag, then follows the best predecessor, recomputed from S with the
  // same sums as the forward scan (cheaper than storing a backpointer for every (step, tag)).
  // Ties go to the lowest tag, as in the per-sequence kernel (first_max).
  int32_t lengths[W];
  __builtin_memcpy(lengths, &g.len, sizeof lengths);
  const TransitionRows rows(m);
  // Column j of transitions as a row: the backtrace reads, per lane, the column of its current
  // tag, K contiguous floats: loads and a transpose instead of K gathers (AVX2, Zen 2: the
  // lane Viterbi ~5% faster at B = 256, T = 40, K = 17).
  if (!rows.in_registers) {
    for (int64_t i = 0; i < K; ++i) {
      for (int64_t j = 0; j < K; ++j) columns[j * K + i] = m.transitions[i * K + j];
    }
  }
  V* candidates = e;  // [K]: the final scores, then the predecessors' scores, of a step
  I arg{};  // current tag per lane (0 until the lane joins: always a valid gather index)
  V score = splat(-kInf);
  for (int64_t t = n_steps - 1; t >= 0; --t) {
    const V* cur = S + t * K;
    bool any_joins = false;  // lanes come in decreasing length: most steps end none
    for (int l = 0; l < g.n; ++l) any_joins = any_joins || lengths[l] == t + 1;
    if (any_joins) {
      const I joins = g.last(t);
      for (int64_t j = 0; j < K; ++j) candidates[j] = cur[j] + m.end[j];
      V top;
      const I top_arg = first_max<V>(candidates, K, &top);
      arg = joins ? top_arg : arg;
      score = select(joins, top, score);
    }
    path[t] = arg;
    if (t == 0) break;
    // The best predecessor of each lane's tag at t. (Half vectors past half_from gained nothing
    // here: this part is bound by its chain of dependent operations, not by throughput.)
    const V* prev = S + (t - 1) * K;
    if (rows.in_registers) {
      for (int64_t i = 0; i < K; ++i) candidates[i] = prev[i] + transition_to(rows, i, arg);
    } else {
      lanes_of_rows(columns, arg * static_cast<int32_t>(K), K, candidates);
      for (int64_t i = 0; i < K; ++i) candidates[i] = prev[i] + candidates[i];
    }
    V best;
    const I from = first_max<V>(candidates, K, &best);
    arg = g.active(t) ? from : arg;
  }
  // Each lane's path, one row of tags at a time: stored per step above, a write per (lane, step)
  // there became two int64 scatters per step (~6% of the kernel, AVX-512, Zen 4).
  const int32_t* steps = reinterpret_cast<const int32_t*>(path);
  for (int l = 0; l < g.n; ++l) {
    const int64_t b = g.seq[l], L = g.len[l];
    int64_t* row = tags + b * T;
    for (int64_t t = 0; t < L; ++t) row[t] = steps[t * W + l];
    for (int64_t t = L; t < T; ++t) row[t] = -1;
    scores[b] = L > 0 ? score[l] : 0.0f;
    if (poisoned[l]) nonfinite[b] = 1;
  }
}


}  // namespace
}  // namespace lanes
}  // namespace fastner::cpu::crf
