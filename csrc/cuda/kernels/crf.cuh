// Linear-chain CRF on the GPU: forward algorithm, fused backward (forward-backward), Viterbi,
// k-best Viterbi and posterior marginals. Torch-free device code (raw pointers, sizes,
// cudaStream_t) so that nvcc can compile-check it without a CUDA build of torch; the thin torch
// binding is csrc/cuda/crf.cu. Semantics are those of fastner/reference.py (CRF section) and
// csrc/cpu/crf.cpp; read csrc/fastner.cpp (CRF block) for the op contracts.
//
// Why one ~1,300-line file: every op's kernels below build on the group primitives, launch
// geometry and non-finite helpers of its first ~400 lines, and this device code has been
// compiled (nvcc in CI) but never run on a GPU; splitting it by op is a pure move best made
// together with its first GPU test run, which would catch what a compile check cannot.
//
// Shapes (all tensors contiguous, batch-first):
//   emissions [B, T, K] of type E (float, double, __half, __nv_bfloat16)
//   lengths   [B] int64, tags [B, T] int64
//   transitions [K, K] (i -> j), start / end [K], every score and output in A = acc_t<E>
//   (double for double emissions, else float).
//
// Work split. A *group* of threads handles one sequence at a time and owns one tag per thread
// (thread rank j <-> tag j; threads with j >= K idle through the steps but take part in every
// barrier):
//   * K <= 32:  a group is one warp, kWarpsPerBlock sequences per block, barriers __syncwarp();
//   * 32 < K <= 1024: a group is the whole block (blockDim.x = next power of two >= K),
//     barriers __syncthreads().
// The time loop runs inside the kernel: one launch per op call (two for crf_backward: the main
// pass and a deterministic reduction of the parameter gradients). Groups stride over the batch
// (b = group index, + group count, ...), so any B works with any grid.
//
// Barrier discipline (why there are no races): every group-wide barrier is reached by all
// threads of the group under group-uniform control flow (loop bounds depend only on the
// sequence, never on the thread). Per-step shared vectors are double-buffered by the parity of
// t: step t writes buffer t&1 and, after one barrier, reads it; the next write to the same
// buffer happens at step t+-2, after another barrier, when every read of step t is done. Each
// sequence ends with a barrier, so the next sequence may reuse all shared memory. Global memory
// written by one thread and read by another of the same group (backpointers) is also ordered by
// these barriers (__syncwarp / __syncthreads order global and shared memory accesses among the
// participating threads).
//
// Numerics. log-sum-exp is computed in two passes (max, then sum of exp(x - max)); when the max
// is -inf (every path forbidden by -inf transitions) the result is -inf, never NaN. Gradients and
// marginals of a sequence whose log Z is -inf are 0 (as in the reference, whose _logsumexp has a
// zero gradient there). Viterbi and k-best use only additions and comparisons; ties resolve to
// the lowest index (first maximum), as torch.max does.
// NaN and +inf scores follow the CPU contract (csrc/cpu/crf_gold_nan.h): the log-sum-exps give
// log Z the reference's NaN or +inf (see nonfinite_max), and crf_backward and crf_marginals read
// that log Z as the per-sequence flag (no extra pass): emission gradients and marginals NaN over
// the length, the shared gradients NaN. Viterbi and k-best flag a sequence while they read its
// emissions (plus one read of the transition, start and end scores per kernel), then give it the
// CPU's score (nonfinite_score); Viterbi keeps its tags, as on CPU (any path is a best one), and
// k-best rows tags -1. A length-1 sequence reads no transition score: a NaN or +inf one leaves it
// finite, as on CPU and in the reference.
// Invalid lengths (below) still give tags -1: there is no path to keep.
//
// Invalid values that the CPU kernels reject with an exception cannot be checked on the host
// without a device->host sync; the kernels check them per sequence and poison that sequence's
// results with NaN instead: a length outside [0, T] (all outputs of the sequence NaN, tags -1),
// a tag outside [0, K) inside the length (gold score NaN; in crf_backward the sequence's
// gradients and so the parameter gradients NaN).
//
// One file (~1320 lines): the CUDA side's unit is one torch-free header per op family, which
// .ci/check_cuda_kernels.sh compiles alone and tests/ops/crf/test_crf_cuda_emulated.py runs
// under the CPU emulation; the five ops share its groups, launch shapes and numeric helpers.
// Sections, in order: limits and helpers, groups, launch shapes, crf_forward, crf_backward,
// crf_viterbi, crf_marginals, crf_kbest, compile-check instantiations.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "accumulate.cuh"

#include <cstddef>
#include <cstdint>

namespace fastner::cuda::crf::kernels {

// The element-type helpers of accumulate.cuh, visible as crf::acc_t etc. to the bindings.
using cuda::acc_t;
using cuda::from_acc;
using cuda::to_acc;

// ---------------------------------------------------------------------------------------------
// Limits, types, numeric helpers
// ---------------------------------------------------------------------------------------------

constexpr int kMaxTags = 1024;        // one thread per tag, a block at most
constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;     // warp path: sequences (groups) per block
constexpr size_t kDefaultSmemBytes = 48 * 1024;  // dynamic shared memory without opt-in
constexpr unsigned kFullMask = 0xffffffffu;

// Most threads a block of a kernel may have: the register budget is sized for it (a block of
// 1024 threads must fit in 64 registers per thread, or the launch fails).
template <bool kWarp>
__host__ __device__ constexpr int max_threads() {
  return kWarp ? kWarpSize * kWarpsPerBlock : kMaxTags;
}


template <typename A>
struct Num;
template <>
struct Num<float> {
  __device__ static __forceinline__ float inf() { return __int_as_float(0x7f800000); }
  __device__ static __forceinline__ float nan() { return __int_as_float(0x7fc00000); }
  __device__ static __forceinline__ float exp(float x) { return expf(x); }
  __device__ static __forceinline__ float log(float x) { return logf(x); }
};
template <>
struct Num<double> {
  __device__ static __forceinline__ double inf() {
    return __longlong_as_double(0x7ff0000000000000LL);
  }
  __device__ static __forceinline__ double nan() {
    return __longlong_as_double(0x7ff8000000000000LL);
  }
  __device__ static __forceinline__ double exp(double x) { return ::exp(x); }
  __device__ static __forceinline__ double log(double x) { return ::log(x); }
};

// The block's dynamic shared memory, and the kernel launch. Both are macros/functions so that
// tests/ops/cuda_emulation can run these kernels on the CPU (threads and barriers emulated) on a
// machine without a GPU; FASTNER_CRF_EMULATION is never defined in a real build.
#ifndef FASTNER_CRF_EMULATION
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char fastner_crf_dynamic_smem[];
  return fastner_crf_dynamic_smem;
}
#define FASTNER_CRF_STRIP(...) __VA_ARGS__
// FASTNER_CRF_LAUNCH((kernel<T, U>), grid, block, smem, stream)(args...)
#define FASTNER_CRF_LAUNCH(kernel, grid, block, smem, stream) \
  FASTNER_CRF_STRIP kernel<<<grid, block, smem, stream>>>
#endif

__host__ __device__ __forceinline__ size_t round_up16(size_t bytes) { return (bytes + 15) / 16 * 16; }

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Threads per group for the block path: the next power of two >= K (the tree reductions below
// need a power of two), at least 64.
__host__ __device__ __forceinline__ int block_threads_for(int K) {
  int n = 64;
  while (n < K) n *= 2;
  return n;
}

// ---------------------------------------------------------------------------------------------
// Groups: the threads that handle one sequence
// ---------------------------------------------------------------------------------------------

template <bool kWarp>
struct Group {
  int rank;       // this thread's index in the group = the tag it owns (idle when >= K)
  int size;       // threads in the group: 32, or blockDim.x (a power of two)
  int slot;       // the group's index inside its block (warp index; 0 on the block path)
  int64_t index;  // the group's index in the grid
  int64_t count;  // groups in the grid

  __device__ __forceinline__ void sync() const {
    if constexpr (kWarp) {
      __syncwarp(kFullMask);
    } else {
      __syncthreads();
    }
  }
};

template <bool kWarp>
__device__ __forceinline__ Group<kWarp> this_group() {
  Group<kWarp> g;
  if constexpr (kWarp) {
    const int per_block = static_cast<int>(blockDim.x) / kWarpSize;
    g.rank = static_cast<int>(threadIdx.x) % kWarpSize;
    g.size = kWarpSize;
    g.slot = static_cast<int>(threadIdx.x) / kWarpSize;
    g.index = static_cast<int64_t>(blockIdx.x) * per_block + g.slot;
    g.count = static_cast<int64_t>(gridDim.x) * per_block;
  } else {
    g.rank = static_cast<int>(threadIdx.x);
    g.size = static_cast<int>(blockDim.x);
    g.slot = 0;
    g.index = blockIdx.x;
    g.count = gridDim.x;
  }
  return g;
}

// Sum of one value per thread over the group, returned to every thread. Deterministic (fixed
// tree). red: [group size] scratch in shared memory. Ends with a barrier, so `red` is free again.
template <bool kWarp, typename A>
__device__ __forceinline__ A group_sum(const Group<kWarp>& g, A* red, A value) {
  red[g.rank] = value;
  g.sync();
  for (int half = g.size / 2; half > 0; half /= 2) {
    // Level `half`: ranks < half read red[rank + half] (not written at this level) and write
    // red[rank] (read only by its owner at this level).
    if (g.rank < half) red[g.rank] += red[g.rank + half];
    g.sync();
  }
  const A total = red[0];
  g.sync();
  return total;
}

// Whether any thread of the group has `flag`, to every thread. scratch: [K] A in shared memory,
// free on entry from the caller's side (the first barrier orders it after the last reads).
template <bool kWarp, typename A>
__device__ __forceinline__ bool group_any(const Group<kWarp>& g, A* scratch, int K, bool flag) {
  g.sync();
  if (g.rank < K) scratch[g.rank] = flag ? A(1) : A(0);
  g.sync();
  bool any = false;
  for (int i = 0; i < K; ++i) any = any || scratch[i] != A(0);
  g.sync();  // every read done: scratch free again
  return any;
}

// Transitions as read by the kernels: tr(i, j) = score of i -> j. Either the global [K, K]
// tensor (stride K) or a copy in shared memory with an odd row stride, so that both a warp
// walking a row (j varies) and a warp walking a column (i varies) hit 32 distinct banks.
template <typename A>
struct Trans {
  const A* data;
  int64_t stride;
  __device__ __forceinline__ A operator()(int i, int j) const { return data[i * stride + j]; }
};

__host__ __device__ __forceinline__ int64_t staged_trans_stride(int K) { return K | 1; }

template <typename A>
__host__ __device__ __forceinline__ size_t staged_trans_bytes(int K) {
  return round_up16(static_cast<size_t>(K) * staged_trans_stride(K) * sizeof(A));
}

// Every thread of the block calls this before any early exit (it has a block barrier when
// staging). `staged` is block-uniform (a kernel argument).
template <typename A>
__device__ __forceinline__ Trans<A> stage_transitions(const A* transitions /* [K, K] */, int K,
                                                      bool staged, A* smem) {
  if (!staged) return Trans<A>{transitions, K};
  const int64_t stride = staged_trans_stride(K);
  const int64_t total = static_cast<int64_t>(K) * K;
  for (int64_t e = threadIdx.x; e < total; e += blockDim.x) {
    smem[(e / K) * stride + e % K] = transitions[e];
  }
  __syncthreads();
  return Trans<A>{smem, stride};
}

// The three log-sum-exps below give the reference's (torch.logsumexp's) non-finite results: NaN
// if a term is NaN, else +inf if one is +inf, else -inf if every term is -inf. Their max skips
// NaN terms (a comparison with NaN is false), so when it is +-inf (no finite term: rare, or
// constrained tags) they re-read the terms through nonfinite_max; a finite max needs nothing
// (a NaN term makes the sum NaN). A +inf score meeting a -inf one gives a NaN term (inf - inf),
// so log Z takes exactly the class the CPU's nonfinite_log_z computes (csrc/cpu/crf_gold_nan.h).
// max(m, x) over m, x in {-inf, +inf, NaN}, NaN propagating.
template <typename A>
__device__ __forceinline__ A nonfinite_max(A m, A x) {
  return (x != x || x > m) ? x : m;
}

// log sum_i exp(prev[i] + tr(i, j)) over i < K; -inf when every term is -inf.
template <typename A>
__device__ __forceinline__ A logsumexp_into(const A* prev /* [K] */, const Trans<A>& tr, int j,
                                            int K) {
  A m = -Num<A>::inf();
  for (int i = 0; i < K; ++i) {
    const A v = prev[i] + tr(i, j);
    m = v > m ? v : m;
  }
  if (!(m > -Num<A>::inf() && m < Num<A>::inf())) {  // see nonfinite_max
    for (int i = 0; i < K; ++i) m = nonfinite_max(m, prev[i] + tr(i, j));
    return m;
  }
  A s = 0;
  for (int i = 0; i < K; ++i) s += Num<A>::exp(prev[i] + tr(i, j) - m);
  return m + Num<A>::log(s);
}

// log sum_k exp(tr(j, k) + next[k]) over k < K; -inf when every term is -inf.
template <typename A>
__device__ __forceinline__ A logsumexp_from(const A* next /* [K] */, const Trans<A>& tr, int j,
                                            int K) {
  A m = -Num<A>::inf();
  for (int k = 0; k < K; ++k) {
    const A v = tr(j, k) + next[k];
    m = v > m ? v : m;
  }
  if (!(m > -Num<A>::inf() && m < Num<A>::inf())) {  // see nonfinite_max
    for (int k = 0; k < K; ++k) m = nonfinite_max(m, tr(j, k) + next[k]);
    return m;
  }
  A s = 0;
  for (int k = 0; k < K; ++k) s += Num<A>::exp(tr(j, k) + next[k] - m);
  return m + Num<A>::log(s);
}

// log sum_j exp(v[j] + end[j]) over j < K, by one thread; -inf when every term is -inf.
template <typename A>
__device__ __forceinline__ A logsumexp_end(const A* v /* [K] */, const A* end /* [K] */, int K) {
  A m = -Num<A>::inf();
  for (int j = 0; j < K; ++j) {
    const A x = v[j] + end[j];
    m = x > m ? x : m;
  }
  if (!(m > -Num<A>::inf() && m < Num<A>::inf())) {  // see nonfinite_max
    for (int j = 0; j < K; ++j) m = nonfinite_max(m, v[j] + end[j]);
    return m;
  }
  A s = 0;
  for (int j = 0; j < K; ++j) s += Num<A>::exp(v[j] + end[j] - m);
  return m + Num<A>::log(s);
}

// The score a sequence that meets a NaN or +inf score decodes to, as on CPU (nonfinite_log_z,
// csrc/cpu/crf_gold_nan.h): the max-plus recursion, NaN propagating, over the scores with every
// finite one 0; +inf if that gives +inf, else NaN. Run by the whole group (group-uniform call),
// only for such sequences; buf: [2][K] A scratch, free on entry; returned to every thread.
template <typename A>
__device__ __forceinline__ A score_kind(A x) {
  return x > -Num<A>::inf() && x < Num<A>::inf() ? A(0) : x;
}

template <bool kWarp, typename E, typename A>
__device__ A nonfinite_score(const Group<kWarp>& g, const E* em /* [len, K] */, int64_t len, int K,
                             const Trans<A>& tr, const A* start, const A* end, A* buf) {
  const int j = g.rank;
  if (j < K) buf[j] = score_kind(start[j]) + score_kind(to_acc(em[j]));
  for (int64_t t = 1; t < len; ++t) {
    g.sync();
    if (j < K) {
      const A* prev = buf + ((t - 1) & 1) * K;
      A m = -Num<A>::inf();
      for (int i = 0; i < K; ++i) m = nonfinite_max(m, prev[i] + score_kind(tr(i, j)));
      buf[(t & 1) * K + j] = m + score_kind(to_acc(em[t * K + j]));
    }
  }
  g.sync();
  const A* last = buf + ((len - 1) & 1) * K;
  A z = -Num<A>::inf();
  for (int i = 0; i < K; ++i) z = nonfinite_max(z, last[i] + score_kind(end[i]));
  g.sync();  // every read of buf done
  return z == Num<A>::inf() ? z : Num<A>::nan();
}

__device__ __forceinline__ bool length_ok(int64_t len, int64_t T) { return len >= 0 && len <= T; }

// NaN or +inf (one comparison; -inf and finite scores pass).
template <typename A>
__device__ __forceinline__ bool poison(A x) {
  return !(x < Num<A>::inf());
}

// Does tag j's start or end score (ends), or its column of the transition scores (transitions),
// hold a NaN or +inf? Read once per kernel by thread j (the group's threads together read every
// score): decoding then flags a sequence with no extra pass over its scores (bad_for).
struct ScoresPoison {
  bool ends = false, transitions = false;
  // Whether a sequence of length len >= 1 meets one (length 1 reads no transition score).
  __device__ __forceinline__ bool bad_for(int64_t len) const { return ends || (len > 1 && transitions); }
};

template <typename A>
__device__ __forceinline__ ScoresPoison scores_poison(const Trans<A>& tr, const A* start, const A* end, int j,
                                                      int K) {
  ScoresPoison p;
  if (j >= K) return p;
  p.ends = poison(start[j]) || poison(end[j]);
  for (int i = 0; i < K; ++i) p.transitions = p.transitions || poison(tr(i, j));
  return p;
}

// ---------------------------------------------------------------------------------------------
// Launch shapes (host and device agree through these functions)
// ---------------------------------------------------------------------------------------------

struct DeviceLimits {
  int num_sms;              // multiprocessors (cudaDeviceProp::multiProcessorCount)
  size_t smem_optin_bytes;  // cudaDeviceProp::sharedMemPerBlockOptin
};

inline bool use_warp_path(int K) { return K <= kWarpSize; }

// Groups per block: kWarpsPerBlock warps on the warp path (fewer for a tiny batch, so that a
// single sentence launches one warp), one block-wide group on the block path.
inline int groups_per_block(int K, int64_t groups) {
  if (!use_warp_path(K)) return 1;
  return static_cast<int>(groups < kWarpsPerBlock ? (groups < 1 ? 1 : groups) : kWarpsPerBlock);
}

inline int threads_per_block(int K, int gpb) {
  return use_warp_path(K) ? gpb * kWarpSize : block_threads_for(K);
}

inline int group_threads(int K) { return use_warp_path(K) ? kWarpSize : block_threads_for(K); }

// Blocks for one group per sequence (capped; the kernels stride over the batch).
inline int64_t blocks_for(int64_t groups, int gpb) {
  const int64_t blocks = ceil_div(groups, gpb);
  const int64_t cap = int64_t{1} << 30;
  return blocks < cap ? blocks : cap;
}

// Stage transitions in shared memory when they fit next to the per-group buffers under the
// default 48 KiB (no opt-in needed).
template <typename A>
inline bool stage_trans_fits(int K, size_t other_bytes) {
  return other_bytes + staged_trans_bytes<A>(K) <= kDefaultSmemBytes;
}

// ---------------------------------------------------------------------------------------------
// crf_forward: log Z, gold score (and alphas, for crf_backward's recomputation)
// ---------------------------------------------------------------------------------------------
// Shared memory per group: buf [2][K] A (alpha of steps t-1 and t), red [group size] A.
// alphas [B, T, K] is written only where given: crf_forward passes nullptr (the op returns log Z
// and the gold score alone), launch_backward a scratch buffer it reads back.

template <typename A>
__host__ __device__ __forceinline__ size_t forward_group_bytes(int K, int gsize) {
  return round_up16((2 * static_cast<size_t>(K) + gsize) * sizeof(A));
}

// The score of the tag path y [len] (nullptr: every tag 0, the only path when K = 1), its steps
// split over the group's threads, then summed; NaN for a tag outside [0, K) (it cannot be
// reported without a host sync). Group-uniform call; red: [group size] scratch.
template <bool kWarp, typename E, typename A>
__device__ __forceinline__ A path_score(const Group<kWarp>& g, A* red, const E* em /* [len, K] */,
                                        const int64_t* y, int64_t len, int K, const Trans<A>& tr,
                                        const A* start, const A* end) {
  A part = 0;
  for (int64_t t = g.rank; t < len; t += g.size) {
    const int64_t cur = y != nullptr ? y[t] : 0;
    const int64_t prev = y != nullptr && t > 0 ? y[t - 1] : 0;
    if (cur < 0 || cur >= K || prev < 0 || prev >= K) {
      part += Num<A>::nan();
    } else {
      part += to_acc(em[t * K + cur]);
      part += t == 0 ? start[cur] : tr(static_cast<int>(prev), static_cast<int>(cur));
      if (t == len - 1) part += end[cur];
    }
  }
  return group_sum(g, red, part);
}

template <typename E, bool kWarp>
__global__ void __launch_bounds__(max_threads<kWarp>(), 1) forward_kernel(
    const E* __restrict__ emissions,  // [B, T, K]
    const int64_t* __restrict__ tags,  // [B, T] or nullptr
    const int64_t* __restrict__ lengths,  // [B]
    const acc_t<E>* __restrict__ transitions,  // [K, K]
    const acc_t<E>* __restrict__ start,  // [K]
    const acc_t<E>* __restrict__ end,  // [K]
    acc_t<E>* __restrict__ log_z,  // [B]
    acc_t<E>* __restrict__ gold_score,  // [B]
    acc_t<E>* __restrict__ alphas,  // [B, T, K] or nullptr
    int64_t B, int64_t T, int K, bool stage_trans) {
  using A = acc_t<E>;
  unsigned char* const smem = dynamic_smem();
  const Group<kWarp> g = this_group<kWarp>();
  const size_t trans_bytes = stage_trans ? staged_trans_bytes<A>(K) : 0;
  const Trans<A> tr =
      stage_transitions<A>(transitions, K, stage_trans, reinterpret_cast<A*>(smem));
  A* const buf = reinterpret_cast<A*>(smem + trans_bytes + g.slot * forward_group_bytes<A>(K, g.size));
  A* const red = buf + 2 * K;
  const int j = g.rank;
  const bool owns_tag = j < K;

  for (int64_t b = g.index; b < B; b += g.count) {
    const int64_t len = lengths[b];
    const E* em = emissions + b * T * K;  // [T, K]
    A* al = alphas != nullptr ? alphas + b * T * K : nullptr;  // [T, K]
    if (!length_ok(len, T)) {
      if (al != nullptr) {
        for (int64_t e = j; e < T * K; e += g.size) al[e] = Num<A>::nan();
      }
      if (j == 0) {
        log_z[b] = Num<A>::nan();
        gold_score[b] = Num<A>::nan();
      }
    } else {
      // Past the length alphas are 0 (as in the reference).
      if (al != nullptr) {
        for (int64_t e = len * K + j; e < T * K; e += g.size) al[e] = 0;
      }
      if (len > 0) {
        if (owns_tag) {
          const A a = start[j] + to_acc(em[j]);
          if (al != nullptr) al[j] = a;
          buf[j] = a;
        }
        for (int64_t t = 1; t < len; ++t) {
          g.sync();  // buf[(t-1)&1] complete; reads of buf[t&1] (step t-2) done
          if (owns_tag) {
            const A* prev = buf + ((t - 1) & 1) * K;
            const A a = logsumexp_into(prev, tr, j, K) + to_acc(em[t * K + j]);
            if (al != nullptr) al[t * K + j] = a;
            buf[(t & 1) * K + j] = a;
          }
        }
        g.sync();  // the last alpha vector complete
        if (j == 0) log_z[b] = logsumexp_end(buf + ((len - 1) & 1) * K, end, K);
      } else if (j == 0) {
        log_z[b] = 0;
      }
      if (tags != nullptr) {
        const A total = path_score(g, red, em, tags + b * T, len, K, tr, start, end);
        if (j == 0) gold_score[b] = total;
      } else if (j == 0) {
        gold_score[b] = 0;
      }
      // K = 1: log Z is the only path's score, summed as the gold score is, so that the
      // log-likelihood is exactly 0 (the recursion rounds in another order: up to 8.6e-6 off at
      // T = 40 in float32, seen under the emulation). Not in crf_backward's recomputation
      // (alphas given), whose marginals exp(alpha + beta - log Z) are exactly 1 with its own.
      if (K == 1 && al == nullptr) {
        const A only = path_score(g, red, em, static_cast<const int64_t*>(nullptr), len, K, tr, start, end);
        if (j == 0) log_z[b] = only;
      }
    }
    g.sync();  // end of sequence: shared buffers free for the next one
  }
}

template <typename E>
cudaError_t launch_forward(const E* emissions /* [B, T, K] */, const int64_t* tags /* [B, T] or nullptr */,
                           const int64_t* lengths /* [B] */, const acc_t<E>* transitions /* [K, K] */,
                           const acc_t<E>* start /* [K] */, const acc_t<E>* end /* [K] */,
                           acc_t<E>* log_z /* [B] */, acc_t<E>* gold_score /* [B] */,
                           acc_t<E>* alphas /* [B, T, K] or nullptr */, int64_t B, int64_t T, int K,
                           cudaStream_t stream) {
  using A = acc_t<E>;
  if (B == 0) return cudaSuccess;
  const int gpb = groups_per_block(K, B);
  const int threads = threads_per_block(K, gpb);
  const size_t group_bytes = gpb * forward_group_bytes<A>(K, group_threads(K));
  const bool stage = stage_trans_fits<A>(K, group_bytes);
  const size_t smem = group_bytes + (stage ? staged_trans_bytes<A>(K) : 0);
  const dim3 grid(static_cast<unsigned>(blocks_for(B, gpb)));
  if (use_warp_path(K)) {
    FASTNER_CRF_LAUNCH((forward_kernel<E, true>), grid, threads, smem, stream)(
        emissions, tags, lengths, transitions, start, end, log_z, gold_score, alphas, B, T, K, stage);
  } else {
    FASTNER_CRF_LAUNCH((forward_kernel<E, false>), grid, threads, smem, stream)(
        emissions, tags, lengths, transitions, start, end, log_z, gold_score, alphas, B, T, K, stage);
  }
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// crf_backward: gradients of sum(grad_log_z * log_z + grad_gold * gold) by forward-backward
// ---------------------------------------------------------------------------------------------
// d log Z / d emissions[t, j]   = p(y_t = j)                      (marginal)
// d log Z / d trans[i, j]       = sum_{t>=1} p(y_{t-1} = i, y_t = j)
// d log Z / d start[j]          = p(y_0 = j),  d log Z / d end[j] = p(y_{len-1} = j)
// with p(y_t = j) = exp(alpha[t, j] + beta[t, j] - log Z) and
//      p(y_{t-1} = i, y_t = j) = exp(alpha[t-1, i] + tr(i, j) + em[t, j] + beta[t, j] - log Z),
// beta[len-1, j] = end[j], beta[t-1, i] = logsumexp_j(tr(i, j) + em[t, j] + beta[t, j]).
// The gold score is linear: it adds grad_gold once per emission / transition / start / end it
// uses. A sequence with log Z = -inf (no allowed path) contributes no log Z gradient.
//
// Parameter gradients are reduced deterministically in two stages: every group accumulates its
// sequences into its own slice of `partials` [P, K*K + 2K] (thread j owns column j of the
// transitions block and entries j of start / end, so no two threads write the same address),
// then reduce_partials_kernel sums the P slices in a fixed order. Slice layout:
// [0, K*K): transitions (i*K + j), [K*K, K*K+K): start, [K*K+K, K*K+2K): end.
// On the warp path the column accumulates in registers (K <= 32 entries, fully unrolled); on the
// block path it accumulates in the slice itself (global memory, read-modify-write by its owner).
//
// Shared memory per group: ebuf [2][K] (em[t] + beta[t]), abuf [2][K] (alpha[t-1]),
// red [group size], all A.

template <typename A>
__host__ __device__ __forceinline__ size_t backward_group_bytes(int K, int gsize) {
  return round_up16((4 * static_cast<size_t>(K) + gsize) * sizeof(A));
}

__host__ __device__ __forceinline__ int64_t partial_width(int K) {
  return static_cast<int64_t>(K) * K + 2 * static_cast<int64_t>(K);
}

// crf_backward recomputes the forward pass into scratch of its own: alphas [B, T, K], then
// log Z [B] and a gold score [B] (unused), all A. The binding allocates this many entries.
__host__ __device__ __forceinline__ int64_t backward_forward_scratch(int64_t B, int64_t T, int K) {
  return B * T * K + 2 * B;
}

// Slices of partials (= groups launched) for crf_backward; the binding allocates
// partials [P, partial_width(K)] with this P. 0 when B == 0.
inline int64_t backward_partial_count(int64_t B, int K, const DeviceLimits& dev) {
  if (B == 0) return 0;
  if (use_warp_path(K)) {
    const int64_t cap = static_cast<int64_t>(dev.num_sms > 0 ? dev.num_sms : 1) * 32;
    const int64_t groups = B < cap ? B : cap;
    const int gpb = groups_per_block(K, groups);
    return blocks_for(groups, gpb) * gpb;
  }
  // Block path: the slices live in global memory; keep them under ~16M entries in all.
  const int64_t budget = (int64_t{1} << 24) / partial_width(K);
  int64_t groups = static_cast<int64_t>(dev.num_sms > 0 ? dev.num_sms : 1) * 4;
  if (groups > budget) groups = budget;
  if (groups > B) groups = B;
  return groups < 1 ? 1 : groups;
}

template <typename E, bool kWarp>
__global__ void __launch_bounds__(max_threads<kWarp>(), 1) backward_kernel(
    const acc_t<E>* __restrict__ grad_log_z,  // [B]
    const acc_t<E>* __restrict__ grad_gold,  // [B]
    const E* __restrict__ emissions,  // [B, T, K]
    const int64_t* __restrict__ tags,  // [B, T] or nullptr
    const int64_t* __restrict__ lengths,  // [B]
    const acc_t<E>* __restrict__ transitions,  // [K, K]
    const acc_t<E>* __restrict__ end,  // [K]
    const acc_t<E>* __restrict__ log_z,  // [B]
    const acc_t<E>* __restrict__ alphas,  // [B, T, K]
    E* __restrict__ grad_emissions,  // [B, T, K]
    acc_t<E>* __restrict__ partials,  // [P, K*K + 2K]
    int64_t B, int64_t T, int K, bool stage_trans) {
  using A = acc_t<E>;
  unsigned char* const smem = dynamic_smem();
  const Group<kWarp> g = this_group<kWarp>();
  const size_t trans_bytes = stage_trans ? staged_trans_bytes<A>(K) : 0;
  const Trans<A> tr =
      stage_transitions<A>(transitions, K, stage_trans, reinterpret_cast<A*>(smem));
  A* const ebuf = reinterpret_cast<A*>(smem + trans_bytes + g.slot * backward_group_bytes<A>(K, g.size));
  A* const abuf = ebuf + 2 * K;
  A* const red = abuf + 2 * K;
  const int j = g.rank;
  const bool owns_tag = j < K;
  const int64_t width = partial_width(K);
  A* const slice = partials + g.index * width;  // [K*K + 2K], this group's own

  // Column j of this group's transitions gradient: registers (warp path) or the slice (block).
  A acc[kWarp ? kWarpSize : 1];
#pragma unroll
  for (int i = 0; i < (kWarp ? kWarpSize : 1); ++i) acc[i] = 0;
  if constexpr (!kWarp) {
    if (owns_tag) {
      for (int i = 0; i < K; ++i) slice[static_cast<int64_t>(i) * K + j] = 0;
    }
  }
  A acc_start = 0, acc_end = 0;
  bool poisoned = false;  // thread-uniform within the group (set from group-wide facts)

  for (int64_t b = g.index; b < B; b += g.count) {
    const int64_t len = lengths[b];
    const E* em = emissions + b * T * K;  // [T, K]
    const A* al = alphas + b * T * K;     // [T, K]
    E* ge = grad_emissions + b * T * K;   // [T, K]
    const int64_t* y = tags != nullptr ? tags + b * T : nullptr;  // [T]
    bool bad = !length_ok(len, T);
    if (!bad && y != nullptr) {
      A count = 0;
      for (int64_t t = j; t < len; t += g.size) count += (y[t] < 0 || y[t] >= K) ? A(1) : A(0);
      bad = group_sum(g, red, count) > 0;  // same value in every thread
    }
    if (bad) {
      poisoned = true;
      for (int64_t e = j; e < T * K; e += g.size) ge[e] = from_acc<E>(Num<A>::nan());
    } else {
      for (int64_t e = len * K + j; e < T * K; e += g.size) ge[e] = from_acc<E>(A(0));
      const A lz = len > 0 ? log_z[b] : A(0);
      if (len > 0 && !(lz < Num<A>::inf())) {
        // log Z NaN or +inf: the sequence met a NaN or +inf score (the log-sum-exps above):
        // its emission gradients NaN over its length, the shared ones NaN (the CPU contract,
        // csrc/cpu/crf_gold_nan.h). lz is group-uniform, so is the branch.
        poisoned = true;
        for (int64_t e = j; e < len * K; e += g.size) ge[e] = from_acc<E>(Num<A>::nan());
      } else if (len > 0) {
        const bool live = !(lz == -Num<A>::inf());
        const A gl = live ? grad_log_z[b] : A(0);  // weight of the marginals
        const A gg = y != nullptr ? grad_gold[b] : A(0);
        A beta = owns_tag ? end[j] : A(0);  // beta[t, j], t = len - 1 first
        for (int64_t t = len - 1; t >= 0; --t) {
          A* eb = ebuf + (t & 1) * K;  // em[t] + beta[t]
          A* ap = abuf + (t & 1) * K;  // alpha[t - 1]
          A e_t = 0;
          if (owns_tag) {
            e_t = to_acc(em[t * K + j]);
            eb[j] = e_t + beta;
            if (t > 0) ap[j] = al[(t - 1) * K + j];
          }
          g.sync();  // eb, ap complete for step t
          if (owns_tag) {
            const int64_t yt = y != nullptr ? y[t] : -1;
            const A gold_here = yt == j ? gg : A(0);
            const A marginal = live ? Num<A>::exp(al[t * K + j] + beta - lz) : A(0);
            const A d = gl * marginal + gold_here;
            ge[t * K + j] = from_acc<E>(d);
            if (t == len - 1) acc_end += d;
            if (t == 0) acc_start += d;
            if (t > 0) {
              const int64_t yp = y != nullptr ? y[t - 1] : -1;
              const A ebj = eb[j];
              if constexpr (kWarp) {
#pragma unroll
                for (int i = 0; i < kWarpSize; ++i) {
                  if (i < K) {
                    const A w = live ? Num<A>::exp(ap[i] + tr(i, j) + ebj - lz) : A(0);
                    acc[i] += gl * w + ((yt == j && yp == i) ? gg : A(0));
                  }
                }
              } else {
                for (int i = 0; i < K; ++i) {
                  const A w = live ? Num<A>::exp(ap[i] + tr(i, j) + ebj - lz) : A(0);
                  slice[static_cast<int64_t>(i) * K + j] += gl * w + ((yt == j && yp == i) ? gg : A(0));
                }
              }
              beta = logsumexp_from(eb, tr, j, K);  // beta[t - 1, j]
            }
          }
        }
      }
    }
    g.sync();  // end of sequence: shared buffers free for the next one
  }

  if (owns_tag) {
    const A poison = Num<A>::nan();
    if constexpr (kWarp) {
#pragma unroll
      for (int i = 0; i < kWarpSize; ++i) {
        if (i < K) slice[static_cast<int64_t>(i) * K + j] = poisoned ? poison : acc[i];
      }
    } else {
      if (poisoned) {
        for (int i = 0; i < K; ++i) slice[static_cast<int64_t>(i) * K + j] = poison;
      }
    }
    slice[static_cast<int64_t>(K) * K + j] = poisoned ? poison : acc_start;
    slice[static_cast<int64_t>(K) * K + K + j] = poisoned ? poison : acc_end;
  }
}

// Sums partials [P, K*K + 2K] over P into grad_transitions [K, K], grad_start [K], grad_end [K].
// Block (32, 8): threadIdx.x picks the entry, warp threadIdx.y sums slices y, y + 8, ... in
// order; the 8 warp sums are then added in order: the result does not depend on scheduling.
constexpr int kReduceRows = 8;

template <typename A>
__global__ void __launch_bounds__(kWarpSize * kReduceRows) reduce_partials_kernel(
    const A* __restrict__ partials,  // [P, K*K + 2K]
    int64_t P, int K,
    A* __restrict__ grad_transitions,  // [K, K]
    A* __restrict__ grad_start,  // [K]
    A* __restrict__ grad_end) {  // [K]
  __shared__ A sums[kReduceRows][kWarpSize];
  const int64_t width = partial_width(K);
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kWarpSize + threadIdx.x;
  A s = 0;
  if (e < width) {
    for (int64_t p = threadIdx.y; p < P; p += kReduceRows) s += partials[p * width + e];
  }
  sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && e < width) {
    A total = 0;
    for (int r = 0; r < kReduceRows; ++r) total += sums[r][threadIdx.x];
    const int64_t kk = static_cast<int64_t>(K) * K;
    if (e < kk) {
      grad_transitions[e] = total;
    } else if (e < kk + K) {
      grad_start[e - kk] = total;
    } else {
      grad_end[e - kk - K] = total;
    }
  }
}

// Three launches on `stream`: the forward pass again (alphas and log Z into forward_scratch,
// [backward_forward_scratch(B, T, K)]), the backward pass into partials ([P, K*K + 2K] with
// P = backward_partial_count(B, K, dev)), and their fixed-order reduction.
template <typename E>
cudaError_t launch_backward(const acc_t<E>* grad_log_z /* [B] */, const acc_t<E>* grad_gold /* [B] */,
                            const E* emissions /* [B, T, K] */, const int64_t* tags /* [B, T] or nullptr */,
                            const int64_t* lengths /* [B] */, const acc_t<E>* transitions /* [K, K] */,
                            const acc_t<E>* start /* [K] */, const acc_t<E>* end /* [K] */,
                            E* grad_emissions /* [B, T, K] */, acc_t<E>* grad_transitions /* [K, K] */,
                            acc_t<E>* grad_start /* [K] */, acc_t<E>* grad_end /* [K] */,
                            acc_t<E>* forward_scratch /* [B*T*K + 2B] */, acc_t<E>* partials /* [P, K*K + 2K] */,
                            int64_t P, int64_t B, int64_t T, int K, cudaStream_t stream) {
  using A = acc_t<E>;
  A* const alphas = forward_scratch;        // [B, T, K]
  A* const log_z = alphas + B * T * K;      // [B]
  A* const unused_gold = log_z + B;         // [B]
  const cudaError_t forward_err = launch_forward<E>(emissions, nullptr, lengths, transitions, start, end, log_z,
                                                    unused_gold, alphas, B, T, K, stream);
  if (forward_err != cudaSuccess) return forward_err;
  if (P > 0) {
    // P was built as blocks * gpb by backward_partial_count: recover the same split.
    const int gpb = use_warp_path(K) ? groups_per_block(K, P) : 1;
    const int threads = threads_per_block(K, gpb);
    const size_t group_bytes = gpb * backward_group_bytes<A>(K, group_threads(K));
    const bool stage = stage_trans_fits<A>(K, group_bytes);
    const size_t smem = group_bytes + (stage ? staged_trans_bytes<A>(K) : 0);
    const dim3 grid(static_cast<unsigned>(P / gpb));
    if (use_warp_path(K)) {
      FASTNER_CRF_LAUNCH((backward_kernel<E, true>), grid, threads, smem, stream)(
          grad_log_z, grad_gold, emissions, tags, lengths, transitions, end, log_z, alphas, grad_emissions,
          partials, B, T, K, stage);
    } else {
      FASTNER_CRF_LAUNCH((backward_kernel<E, false>), grid, threads, smem, stream)(
          grad_log_z, grad_gold, emissions, tags, lengths, transitions, end, log_z, alphas, grad_emissions,
          partials, B, T, K, stage);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const dim3 block(kWarpSize, kReduceRows);
  const dim3 grid(static_cast<unsigned>(ceil_div(partial_width(K), kWarpSize)));
  FASTNER_CRF_LAUNCH((reduce_partials_kernel<A>), grid, block, 0, stream)(
      partials, P, K, grad_transitions, grad_start, grad_end);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// crf_viterbi: best path, backtrace on the device
// ---------------------------------------------------------------------------------------------
// bp[t, j] (t >= 1): the best previous tag before tag j at step t, first maximum on ties.
// Backpointers live in shared memory when [groups per block][T][K] fits, else in the global
// scratch [B, T, K] the binding allocates (viterbi_scratch_bytes). BP = uint8_t for K <= 256,
// else uint16_t. Shared memory per group: score buf [2][K] A, then bp [T][K] BP if staged.

template <typename A>
__host__ __device__ __forceinline__ size_t viterbi_buf_bytes(int K) {
  return round_up16(2 * static_cast<size_t>(K) * sizeof(A));
}

inline size_t backpointer_size(int K) { return K <= 256 ? 1 : 2; }

template <typename A>
inline bool viterbi_bp_in_smem(int64_t B, int64_t T, int K) {
  const int gpb = groups_per_block(K, B);
  const size_t per_group = viterbi_buf_bytes<A>(K) + round_up16(static_cast<size_t>(T) * K * backpointer_size(K));
  return static_cast<double>(per_group) * gpb <= 32.0 * 1024;
}

// Bytes of global scratch crf_viterbi needs (0 when the backpointers fit in shared memory).
template <typename A>
inline size_t viterbi_scratch_bytes(int64_t B, int64_t T, int K) {
  if (B == 0 || viterbi_bp_in_smem<A>(B, T, K)) return 0;
  return static_cast<size_t>(B) * static_cast<size_t>(T) * K * backpointer_size(K);
}

template <typename E, bool kWarp, typename BP>
__global__ void __launch_bounds__(max_threads<kWarp>(), 1) viterbi_kernel(
    const E* __restrict__ emissions,  // [B, T, K]
    const int64_t* __restrict__ lengths,  // [B]
    const acc_t<E>* __restrict__ transitions,  // [K, K]
    const acc_t<E>* __restrict__ start,  // [K]
    const acc_t<E>* __restrict__ end,  // [K]
    int64_t* __restrict__ tags_out,  // [B, T]
    acc_t<E>* __restrict__ scores,  // [B]
    BP* __restrict__ bp_global,  // [B, T, K] or nullptr
    int64_t B, int64_t T, int K, bool stage_trans, bool bp_in_smem) {
  using A = acc_t<E>;
  unsigned char* const smem = dynamic_smem();
  const Group<kWarp> g = this_group<kWarp>();
  const size_t trans_bytes = stage_trans ? staged_trans_bytes<A>(K) : 0;
  const Trans<A> tr =
      stage_transitions<A>(transitions, K, stage_trans, reinterpret_cast<A*>(smem));
  const size_t group_bytes =
      viterbi_buf_bytes<A>(K) + (bp_in_smem ? round_up16(static_cast<size_t>(T) * K * sizeof(BP)) : 0);
  unsigned char* const mine = smem + trans_bytes + g.slot * group_bytes;
  A* const buf = reinterpret_cast<A*>(mine);
  BP* const bp_smem = reinterpret_cast<BP*>(mine + viterbi_buf_bytes<A>(K));
  const int j = g.rank;
  const bool owns_tag = j < K;
  const ScoresPoison scores_bad = scores_poison(tr, start, end, j, K);

  for (int64_t b = g.index; b < B; b += g.count) {
    const int64_t len = lengths[b];
    const E* em = emissions + b * T * K;  // [T, K]
    int64_t* out = tags_out + b * T;      // [T]
    BP* bp = bp_in_smem ? bp_smem : bp_global + b * T * K;  // [T, K]
    if (!length_ok(len, T)) {
      for (int64_t t = j; t < T; t += g.size) out[t] = -1;
      if (j == 0) scores[b] = Num<A>::nan();
    } else {
      for (int64_t t = len + j; t < T; t += g.size) out[t] = -1;
      if (len > 0) {
        // this thread's scores of the sequence: a NaN or +inf among them (see decoded below)
        bool bad = scores_bad.bad_for(len);
        if (owns_tag) {
          const A e0 = to_acc(em[j]);
          bad = bad || poison(e0);
          buf[j] = start[j] + e0;
        }
        for (int64_t t = 1; t < len; ++t) {
          g.sync();  // buf[(t-1)&1] complete; reads of buf[t&1] (step t-2) done
          if (owns_tag) {
            const A* prev = buf + ((t - 1) & 1) * K;
            A best = prev[0] + tr(0, j);
            int arg = 0;
            for (int i = 1; i < K; ++i) {
              const A v = prev[i] + tr(i, j);
              if (v > best) {
                best = v;
                arg = i;
              }
            }
            const A e_tj = to_acc(em[t * K + j]);
            bad = bad || poison(e_tj);
            buf[(t & 1) * K + j] = best + e_tj;
            bp[t * K + j] = static_cast<BP>(arg);
          }
        }
        g.sync();  // last scores and every backpointer written
        if (j == 0) {
          const A* last = buf + ((len - 1) & 1) * K;
          A best = last[0] + end[0];
          int cur = 0;
          for (int i = 1; i < K; ++i) {
            const A v = last[i] + end[i];
            if (v > best) {
              best = v;
              cur = i;
            }
          }
          scores[b] = best;
          out[len - 1] = cur;
          for (int64_t t = len - 1; t >= 1; --t) {
            cur = bp[t * K + cur];
            out[t - 1] = cur;
          }
        }
        // A NaN or +inf score met (the comparisons above skip NaN, and +inf meeting -inf gives a
        // skipped NaN): the score the CPU gives, its tags kept (any path is one of the best).
        if (group_any(g, buf, K, bad)) {
          const A value = nonfinite_score(g, em, len, K, tr, start, end, buf);
          if (j == 0) scores[b] = value;
        }
      } else if (j == 0) {
        scores[b] = 0;
      }
    }
    g.sync();  // end of sequence: shared buffers (and smem backpointers) free for the next one
  }
}

// bp_scratch: viterbi_scratch_bytes<acc_t<E>>(B, T, K) bytes (nullptr when 0).
template <typename E>
cudaError_t launch_viterbi(const E* emissions /* [B, T, K] */, const int64_t* lengths /* [B] */,
                           const acc_t<E>* transitions /* [K, K] */, const acc_t<E>* start /* [K] */,
                           const acc_t<E>* end /* [K] */, int64_t* tags /* [B, T] */,
                           acc_t<E>* scores /* [B] */, void* bp_scratch /* [B, T, K] BP or nullptr */,
                           int64_t B, int64_t T, int K, cudaStream_t stream) {
  using A = acc_t<E>;
  if (B == 0) return cudaSuccess;
  const int gpb = groups_per_block(K, B);
  const int threads = threads_per_block(K, gpb);
  const bool bp_in_smem = viterbi_bp_in_smem<A>(B, T, K);
  const size_t bp_bytes = bp_in_smem ? round_up16(static_cast<size_t>(T) * K * backpointer_size(K)) : 0;
  const size_t group_bytes = gpb * (viterbi_buf_bytes<A>(K) + bp_bytes);
  const bool stage = stage_trans_fits<A>(K, group_bytes);
  const size_t smem = group_bytes + (stage ? staged_trans_bytes<A>(K) : 0);
  const dim3 grid(static_cast<unsigned>(blocks_for(B, gpb)));
  if (K <= 256) {
    auto* bp = static_cast<uint8_t*>(bp_scratch);
    if (use_warp_path(K)) {
      FASTNER_CRF_LAUNCH((viterbi_kernel<E, true, uint8_t>), grid, threads, smem, stream)(
          emissions, lengths, transitions, start, end, tags, scores, bp, B, T, K, stage, bp_in_smem);
    } else {
      FASTNER_CRF_LAUNCH((viterbi_kernel<E, false, uint8_t>), grid, threads, smem, stream)(
          emissions, lengths, transitions, start, end, tags, scores, bp, B, T, K, stage, bp_in_smem);
    }
  } else {
    auto* bp = static_cast<uint16_t*>(bp_scratch);
    FASTNER_CRF_LAUNCH((viterbi_kernel<E, false, uint16_t>), grid, threads, smem, stream)(
        emissions, lengths, transitions, start, end, tags, scores, bp, B, T, K, stage, bp_in_smem);
  }
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// crf_marginals: p(y_t = j | x) by forward-backward in one pass
// ---------------------------------------------------------------------------------------------
// The forward pass stores alpha[t, j] in out[t, j] (thread j only); the backward pass reads it
// back (same thread) and overwrites it with exp(alpha + beta - log Z). Shared memory per group:
// buf [2][K] A (alphas, then em[t] + beta[t]), lz [1] A, red unused.

template <typename A>
__host__ __device__ __forceinline__ size_t marginals_group_bytes(int K) {
  return round_up16((2 * static_cast<size_t>(K) + 1) * sizeof(A));
}

template <typename E, bool kWarp>
__global__ void __launch_bounds__(max_threads<kWarp>(), 1) marginals_kernel(
    const E* __restrict__ emissions,  // [B, T, K]
    const int64_t* __restrict__ lengths,  // [B]
    const acc_t<E>* __restrict__ transitions,  // [K, K]
    const acc_t<E>* __restrict__ start,  // [K]
    const acc_t<E>* __restrict__ end,  // [K]
    acc_t<E>* __restrict__ out,  // [B, T, K]
    int64_t B, int64_t T, int K, bool stage_trans) {
  using A = acc_t<E>;
  unsigned char* const smem = dynamic_smem();
  const Group<kWarp> g = this_group<kWarp>();
  const size_t trans_bytes = stage_trans ? staged_trans_bytes<A>(K) : 0;
  const Trans<A> tr =
      stage_transitions<A>(transitions, K, stage_trans, reinterpret_cast<A*>(smem));
  A* const buf = reinterpret_cast<A*>(smem + trans_bytes + g.slot * marginals_group_bytes<A>(K));
  A* const lz_shared = buf + 2 * K;
  const int j = g.rank;
  const bool owns_tag = j < K;

  for (int64_t b = g.index; b < B; b += g.count) {
    const int64_t len = lengths[b];
    const E* em = emissions + b * T * K;  // [T, K]
    A* m = out + b * T * K;               // [T, K]
    if (!length_ok(len, T)) {
      for (int64_t e = j; e < T * K; e += g.size) m[e] = Num<A>::nan();
    } else {
      for (int64_t e = len * K + j; e < T * K; e += g.size) m[e] = 0;
      if (len > 0) {
        // Forward: alphas into m (as in forward_kernel).
        if (owns_tag) {
          const A a = start[j] + to_acc(em[j]);
          m[j] = a;
          buf[j] = a;
        }
        for (int64_t t = 1; t < len; ++t) {
          g.sync();
          if (owns_tag) {
            const A a = logsumexp_into(buf + ((t - 1) & 1) * K, tr, j, K) + to_acc(em[t * K + j]);
            m[t * K + j] = a;
            buf[(t & 1) * K + j] = a;
          }
        }
        g.sync();  // last alpha vector complete
        if (j == 0) *lz_shared = logsumexp_end(buf + ((len - 1) & 1) * K, end, K);
        g.sync();  // log Z visible; thread 0 is done reading buf
        const A lz = *lz_shared;
        const bool live = !(lz == -Num<A>::inf());
        // log Z NaN or +inf (a NaN or +inf score met): marginals NaN over the length, as on CPU;
        // the loop below then runs no step (lz is group-uniform).
        const bool nonfinite = !(lz < Num<A>::inf());
        if (nonfinite) {
          for (int64_t e = j; e < len * K; e += g.size) m[e] = Num<A>::nan();
        }
        // Backward: beta recursion, turning alphas into marginals in place.
        A beta = owns_tag ? end[j] : A(0);
        for (int64_t t = nonfinite ? -1 : len - 1; t >= 0; --t) {
          A* eb = buf + (t & 1) * K;
          if (owns_tag) {
            const A a = m[t * K + j];
            m[t * K + j] = live ? Num<A>::exp(a + beta - lz) : A(0);
            eb[j] = to_acc(em[t * K + j]) + beta;
          }
          g.sync();  // eb complete for step t
          if (owns_tag && t > 0) beta = logsumexp_from(eb, tr, j, K);
        }
      }
    }
    g.sync();  // end of sequence
  }
}

template <typename E>
cudaError_t launch_marginals(const E* emissions /* [B, T, K] */, const int64_t* lengths /* [B] */,
                             const acc_t<E>* transitions /* [K, K] */, const acc_t<E>* start /* [K] */,
                             const acc_t<E>* end /* [K] */, acc_t<E>* out /* [B, T, K] */, int64_t B,
                             int64_t T, int K, cudaStream_t stream) {
  using A = acc_t<E>;
  if (B == 0) return cudaSuccess;
  const int gpb = groups_per_block(K, B);
  const int threads = threads_per_block(K, gpb);
  const size_t group_bytes = gpb * marginals_group_bytes<A>(K);
  const bool stage = stage_trans_fits<A>(K, group_bytes);
  const size_t smem = group_bytes + (stage ? staged_trans_bytes<A>(K) : 0);
  const dim3 grid(static_cast<unsigned>(blocks_for(B, gpb)));
  if (use_warp_path(K)) {
    FASTNER_CRF_LAUNCH((marginals_kernel<E, true>), grid, threads, smem, stream)(
        emissions, lengths, transitions, start, end, out, B, T, K, stage);
  } else {
    FASTNER_CRF_LAUNCH((marginals_kernel<E, false>), grid, threads, smem, stream)(
        emissions, lengths, transitions, start, end, out, B, T, K, stage);
  }
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// crf_kbest: the k best paths, best first
// ---------------------------------------------------------------------------------------------
// Per step t and tag j, the k best prefixes ending in j are chosen among the K*k candidates
// c = i*k + r (the r-th best prefix ending in i, then i -> j) in the order
//   higher score first, then lower candidate index c,
// i.e. a stable top-k (torch.topk does not specify its tie order; the CPU kernel uses this one).
// Selection q picks the first candidate strictly after selection q-1 in that order: O(k*K*k)
// per tag and step, no extra state. The final k come from the K*k values score[j][r] + end[j]
// (index j*k + r) in the same order. Backpointers: bp[b, t, j, q] = c (int32) in global scratch
// [B, T, K, k]; rows whose final score is not finite get tags -1 (as in the reference).
// Shared memory per group: score [2][K*k] A, final score [k] A, final index [k] int32.

template <typename A>
__host__ __device__ __forceinline__ size_t kbest_group_bytes(int K, int k) {
  return round_up16((2 * static_cast<size_t>(K) * k + k) * sizeof(A)) +
         round_up16(static_cast<size_t>(k) * sizeof(int32_t));
}

inline size_t kbest_scratch_bytes(int64_t B, int64_t T, int K, int64_t k) {
  return static_cast<size_t>(B) * static_cast<size_t>(T) * static_cast<size_t>(K) * static_cast<size_t>(k) *
         sizeof(int32_t);
}

// Groups per block and dynamic shared memory of crf_kbest; smem == 0 means it cannot run
// (k * K too large for the device's shared memory).
template <typename A>
inline void kbest_shape(int64_t B, int K, int64_t k, const DeviceLimits& dev, int* gpb, size_t* smem,
                        bool* stage) {
  const size_t per_group = kbest_group_bytes<A>(K, static_cast<int>(k));
  int n = groups_per_block(K, B);
  while (n > 1 && per_group * n > kDefaultSmemBytes) --n;
  *gpb = n;
  *stage = stage_trans_fits<A>(K, per_group * n);
  *smem = per_group * n + (*stage ? staged_trans_bytes<A>(K) : 0);
  const size_t limit = dev.smem_optin_bytes > kDefaultSmemBytes ? dev.smem_optin_bytes : kDefaultSmemBytes;
  if (*smem > limit) *smem = 0;
}

// Is candidate (v, c) strictly after (last_v, last_c) in the order "higher score first, then
// lower index"?
template <typename A>
__device__ __forceinline__ bool after(A v, int c, A last_v, int last_c) {
  return v < last_v || (v == last_v && c > last_c);
}

template <typename E, bool kWarp>
__global__ void __launch_bounds__(max_threads<kWarp>(), 1) kbest_kernel(
    const E* __restrict__ emissions,  // [B, T, K]
    const int64_t* __restrict__ lengths,  // [B]
    const acc_t<E>* __restrict__ transitions,  // [K, K]
    const acc_t<E>* __restrict__ start,  // [K]
    const acc_t<E>* __restrict__ end,  // [K]
    int64_t* __restrict__ tags_out,  // [B, k, T]
    acc_t<E>* __restrict__ scores,  // [B, k]
    int32_t* __restrict__ bp_global,  // [B, T, K, k]
    int64_t B, int64_t T, int K, int k, bool stage_trans) {
  using A = acc_t<E>;
  unsigned char* const smem = dynamic_smem();
  const Group<kWarp> g = this_group<kWarp>();
  const size_t trans_bytes = stage_trans ? staged_trans_bytes<A>(K) : 0;
  const Trans<A> tr =
      stage_transitions<A>(transitions, K, stage_trans, reinterpret_cast<A*>(smem));
  unsigned char* const mine = smem + trans_bytes + g.slot * kbest_group_bytes<A>(K, k);
  A* const sc = reinterpret_cast<A*>(mine);  // [2][K * k]
  A* const fin_score = sc + 2 * static_cast<int64_t>(K) * k;  // [k]
  int32_t* const fin_index =
      reinterpret_cast<int32_t*>(mine + round_up16((2 * static_cast<size_t>(K) * k + k) * sizeof(A)));  // [k]
  const int j = g.rank;
  const bool owns_tag = j < K;
  const int kk = K * k;  // candidates per selection (< 2^31: checked by the binding)
  const ScoresPoison scores_bad = scores_poison(tr, start, end, j, K);

  for (int64_t b = g.index; b < B; b += g.count) {
    const int64_t len = lengths[b];
    const E* em = emissions + b * T * K;  // [T, K]
    int64_t* out = tags_out + b * k * T;  // [k, T]
    A* sco = scores + b * k;              // [k]
    int32_t* bp = bp_global + b * T * K * k;  // [T, K, k]
    if (!length_ok(len, T)) {
      for (int64_t e = j; e < k * T; e += g.size) out[e] = -1;
      for (int q = j; q < k; q += g.size) sco[q] = Num<A>::nan();
    } else if (len == 0) {
      for (int64_t e = j; e < k * T; e += g.size) out[e] = -1;
      for (int q = j; q < k; q += g.size) sco[q] = q == 0 ? A(0) : -Num<A>::inf();
    } else {
      // Tags past the length: -1 (the backtrace below writes only t < len).
      for (int64_t e = j; e < k * (T - len); e += g.size) out[(e / (T - len)) * T + len + e % (T - len)] = -1;
      bool bad = scores_bad.bad_for(len);  // as in viterbi_kernel
      if (owns_tag) {
        A* first = sc + static_cast<int64_t>(j) * k;
        const A e0 = to_acc(em[j]);
        bad = bad || poison(e0);
        first[0] = start[j] + e0;
        for (int r = 1; r < k; ++r) first[r] = -Num<A>::inf();
      }
      for (int64_t t = 1; t < len; ++t) {
        g.sync();  // sc[(t-1)&1] complete; reads of sc[t&1] (step t-2) done
        if (owns_tag) {
          const A* prev = sc + ((t - 1) & 1) * static_cast<int64_t>(kk);  // [K, k]
          A* next = sc + (t & 1) * static_cast<int64_t>(kk) + static_cast<int64_t>(j) * k;  // [k]
          int32_t* bpj = bp + (t * K + j) * static_cast<int64_t>(k);  // [k]
          const A e_tj = to_acc(em[t * K + j]);
          bad = bad || poison(e_tj);
          A last_v = 0;
          int last_c = -1;
          for (int q = 0; q < k; ++q) {
            A best_v = -Num<A>::inf();
            int best_c = -1;
            for (int i = 0; i < K; ++i) {
              const A tij = tr(i, j);
              for (int r = 0; r < k; ++r) {
                const int c = i * k + r;
                const A v = prev[c] + tij;
                // Scanning c upwards, the first of equal scores is kept: lowest index wins.
                if ((q == 0 || after(v, c, last_v, last_c)) && (best_c < 0 || v > best_v)) {
                  best_v = v;
                  best_c = c;
                }
              }
            }
            if (best_c < 0) {  // only with NaN scores; keep the backpointer in range
              best_c = 0;
              best_v = Num<A>::nan();
            }
            next[q] = best_v + e_tj;
            bpj[q] = best_c;
            last_v = best_v;
            last_c = best_c;
          }
        }
      }
      g.sync();  // last score lists and every backpointer written
      if (j == 0) {
        const A* last = sc + ((len - 1) & 1) * static_cast<int64_t>(kk);  // [K, k]
        A last_v = 0;
        int last_c = -1;
        for (int q = 0; q < k; ++q) {
          A best_v = -Num<A>::inf();
          int best_c = -1;
          for (int c = 0; c < kk; ++c) {
            const A v = last[c] + end[c / k];
            if ((q == 0 || after(v, c, last_v, last_c)) && (best_c < 0 || v > best_v)) {
              best_v = v;
              best_c = c;
            }
          }
          if (best_c < 0) {
            best_c = 0;
            best_v = Num<A>::nan();
          }
          fin_score[q] = best_v;
          fin_index[q] = best_c;
          sco[q] = best_v;
          last_v = best_v;
          last_c = best_c;
        }
      }
      g.sync();  // final selection visible
      // Backtrace, one output row per thread.
      for (int q = j; q < k; q += g.size) {
        int64_t* row = out + static_cast<int64_t>(q) * T;  // [T]
        if (!(fin_score[q] > -Num<A>::inf() && fin_score[q] < Num<A>::inf())) {  // -inf, +inf or NaN
          for (int64_t t = 0; t < len; ++t) row[t] = -1;
        } else {
          int c = fin_index[q];
          int tag = c / k, rank = c % k;
          row[len - 1] = tag;
          for (int64_t t = len - 1; t >= 1; --t) {
            c = bp[(t * K + tag) * static_cast<int64_t>(k) + rank];
            tag = c / k;
            rank = c % k;
            row[t - 1] = tag;
          }
        }
      }
      // A NaN or +inf score met: every row tags -1 and the score the CPU gives (as in viterbi).
      if (group_any(g, sc, K, bad)) {
        const A value = nonfinite_score(g, em, len, K, tr, start, end, sc);
        for (int64_t e = j; e < k * T; e += g.size) {
          if (e % T < len) out[e] = -1;
        }
        for (int q = j; q < k; q += g.size) sco[q] = value;
      }
    }
    g.sync();  // end of sequence
  }
}

// bp_scratch: kbest_scratch_bytes(B, T, K, k) bytes, int32 [B, T, K, k]. Returns
// cudaErrorInvalidConfiguration when kbest_shape says the shared memory does not suffice (the
// binding checks that first and raises a clear error).
template <typename E>
cudaError_t launch_kbest(const E* emissions /* [B, T, K] */, const int64_t* lengths /* [B] */,
                         const acc_t<E>* transitions /* [K, K] */, const acc_t<E>* start /* [K] */,
                         const acc_t<E>* end /* [K] */, int64_t* tags /* [B, k, T] */,
                         acc_t<E>* scores /* [B, k] */, int32_t* bp_scratch /* [B, T, K, k] */, int64_t B,
                         int64_t T, int K, int k, const DeviceLimits& dev, cudaStream_t stream) {
  using A = acc_t<E>;
  if (B == 0) return cudaSuccess;
  int gpb = 1;
  size_t smem = 0;
  bool stage = false;
  kbest_shape<A>(B, K, k, dev, &gpb, &smem, &stage);
  if (smem == 0) return cudaErrorInvalidConfiguration;
  const int threads = threads_per_block(K, gpb);
  const dim3 grid(static_cast<unsigned>(blocks_for(B, gpb)));
  if (use_warp_path(K)) {
    if (smem > kDefaultSmemBytes) {
      const cudaError_t err = cudaFuncSetAttribute(reinterpret_cast<const void*>(&kbest_kernel<E, true>),
                                                   cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                   static_cast<int>(smem));
      if (err != cudaSuccess) return err;
    }
    FASTNER_CRF_LAUNCH((kbest_kernel<E, true>), grid, threads, smem, stream)(
        emissions, lengths, transitions, start, end, tags, scores, bp_scratch, B, T, K, k, stage);
  } else {
    if (smem > kDefaultSmemBytes) {
      const cudaError_t err = cudaFuncSetAttribute(reinterpret_cast<const void*>(&kbest_kernel<E, false>),
                                                   cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                   static_cast<int>(smem));
      if (err != cudaSuccess) return err;
    }
    FASTNER_CRF_LAUNCH((kbest_kernel<E, false>), grid, threads, smem, stream)(
        emissions, lengths, transitions, start, end, tags, scores, bp_scratch, B, T, K, k, stage);
  }
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// Compile check: instantiate every launcher for every emission type (.ci/check_cuda_kernels.sh)
// ---------------------------------------------------------------------------------------------
#ifdef FASTNER_KERNEL_CHECK
#define FASTNER_CRF_INSTANTIATE(E)                                                                                 \
  template cudaError_t launch_forward<E>(const E*, const int64_t*, const int64_t*, const acc_t<E>*,               \
                                         const acc_t<E>*, const acc_t<E>*, acc_t<E>*, acc_t<E>*, acc_t<E>*,       \
                                         int64_t, int64_t, int, cudaStream_t);                                    \
  template cudaError_t launch_backward<E>(const acc_t<E>*, const acc_t<E>*, const E*, const int64_t*,             \
                                          const int64_t*, const acc_t<E>*, const acc_t<E>*, const acc_t<E>*, E*,  \
                                          acc_t<E>*, acc_t<E>*, acc_t<E>*, acc_t<E>*, acc_t<E>*, int64_t,         \
                                          int64_t, int64_t, int, cudaStream_t);                                   \
  template cudaError_t launch_viterbi<E>(const E*, const int64_t*, const acc_t<E>*, const acc_t<E>*,              \
                                         const acc_t<E>*, int64_t*, acc_t<E>*, void*, int64_t, int64_t, int,      \
                                         cudaStream_t);                                                           \
  template cudaError_t launch_marginals<E>(const E*, const int64_t*, const acc_t<E>*, const acc_t<E>*,            \
                                           const acc_t<E>*, acc_t<E>*, int64_t, int64_t, int, cudaStream_t);      \
  template cudaError_t launch_kbest<E>(const E*, const int64_t*, const acc_t<E>*, const acc_t<E>*,                \
                                       const acc_t<E>*, int64_t*, acc_t<E>*, int32_t*, int64_t, int64_t, int, int, \
                                       const DeviceLimits&, cudaStream_t);
FASTNER_CRF_INSTANTIATE(float)
FASTNER_CRF_INSTANTIATE(double)
FASTNER_CRF_INSTANTIATE(__half)
FASTNER_CRF_INSTANTIATE(__nv_bfloat16)
#undef FASTNER_CRF_INSTANTIATE
#endif  // FASTNER_KERNEL_CHECK

}  // namespace fastner::cuda::crf::kernels
