// LSTM / GRU / RNN layers on the GPU: the device code of fastner::rnn_layer_forward /
// rnn_layer_backward. Torch-free (raw pointers, sizes, cudaStream_t) so that nvcc can
// compile-check it without a CUDA build of torch; the binding that runs the cuBLAS GEMMs and
// launches these kernels is csrc/cuda/rnn.cu. Semantics: csrc/fastner.cpp (RNN block) and
// fastner/reference.py (rnn_layer); the CPU kernel csrc/cpu/rnn.cpp uses the same layout.
//
// Why one ~870-line file: the forward and backward kernels share the step-row layout and the
// gate math helpers, and this device code has been compiled (nvcc in CI) but never run on a
// GPU; see crf.cuh on splitting it with its first GPU test run.
//
// Types. E is the storage type of every tensor (float, double, __half, __nv_bfloat16);
// A = acc_t<E> is the arithmetic type (double for double, else float). Recurrent state that
// never leaves the kernels (the LSTM cell c, the gradients dh and dc) is kept in A; h is kept in
// E because it is a GEMM operand and an output.
//
// Batch order. The host sorts the batch once by decreasing length (stable): slot j holds the
// original sequence order[j], len[j] is non-increasing. At step s both directions run exactly
// the slots j < batch_size[s] (those with len[j] > s), so the running sequences are always a
// prefix of the slots and every per-step GEMM is on a contiguous [nb, *] block. The forward
// direction is at time t = s, the reverse one at t = len[j] - 1 - s (each sequence's own last
// step first).
//
// Packed rows. Per-(slot, time) data (projected input, workspace, gate gradients) lives in
// PackedSequence order: row offset[t] + j holds slot j at time t, for t < len[j]; rows =
// offset[steps] = sum of lengths. Input and output stay in the caller's layout ("io rows"):
// row order[j] * T + t when batch_first, t * B + order[j] otherwise.
//
// Workspace (what backward reads), per direction d at ws + d * B*T * W, one row of W values per
// packed row (rows >= `rows` unused; shape [D, B*T, W], the same as the CPU kernel's):
//   lstm  W = 6H: [i f g o | c | h]   gate values after their nonlinearity, new c, new h
//   gru   W = 5H: [r z n | hn | h]    hn = W_hn h_prev + b_hn
//   rnn   W = 1H: [h]
//
// Work split of the step-wise kernels: one thread per (slot j < nb, unit k < H), flat int64
// index over nb * H, grid-stride. Each (j, k) element of every state buffer is read and written
// by exactly one thread per launch, so there are no races; successive launches (and the cuBLAS
// GEMMs between them) are ordered by running on one stream per direction.
//
// One file (~880 lines): the CUDA side's unit is one torch-free header per op family, which
// .ci/check_cuda_kernels.sh compiles alone and tests/ops/rnn/test_rnn_cuda_emulated.py rewrites
// mechanically (launch syntax, shared memory) for the CPU emulation. Sections, in order: types
// and the plan view, layout kernels, cell math, step-wise forward and backward, persistent
// forward and backward, host launchers, compile-check instantiations.
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "accumulate.cuh"
#include "rnn_layout.h"

#include <cstddef>
#include <cstdint>

namespace fastner::cuda::rnn::kernels {

// The element-type helpers of accumulate.cuh, visible as rnn::acc_t etc. to the bindings.
using cuda::acc_t;
using cuda::from_acc;
using cuda::to_acc;

// ---------------------------------------------------------------------------------------------
// Cells, types, numeric helpers
// ---------------------------------------------------------------------------------------------

enum class Cell : int {
  LSTM = rnn_layout::kLstm, GRU = rnn_layout::kGru, RNN_TANH = rnn_layout::kRnnTanh,
  RNN_RELU = rnn_layout::kRnnRelu
};

__host__ __device__ constexpr int gates_of(Cell cell) {
  return cell == Cell::LSTM ? 4 : cell == Cell::GRU ? 3 : 1;
}
// Workspace row width in units of H (see the layout above; csrc/rnn_layout.h).
__host__ __device__ constexpr int workspace_width(Cell cell) {
  return rnn_layout::cuda_workspace_columns(static_cast<int>(cell));
}
// Column (in units of H) of h inside a workspace row: the last H values.
__host__ __device__ constexpr int workspace_h_column(Cell cell) { return workspace_width(cell) - 1; }


__device__ __forceinline__ float sigmoid_(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ double sigmoid_(double x) { return 1.0 / (1.0 + ::exp(-x)); }
__device__ __forceinline__ float tanh_(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_(double x) { return ::tanh(x); }

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ size_t round_up16(size_t bytes) { return (bytes + 15) / 16 * 16; }

constexpr int kThreads = 256;          // threads per block of the step-wise kernels
constexpr int64_t kMaxBlocks = 65535;  // grid-stride loops cover the rest

inline int blocks_for(int64_t n) {
  const int64_t blocks = ceil_div(n, kThreads);
  return static_cast<int>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

// ---------------------------------------------------------------------------------------------
// The sorted batch, as the kernels see it (device pointers; built by the host, see rnn.cu)
// ---------------------------------------------------------------------------------------------

struct PlanView {
  const int64_t* order;       // [B] original batch index of slot j
  const int64_t* len;         // [B] length of slot j, non-increasing
  const int64_t* offset;      // [steps + 1] first packed row of time t
  const int64_t* batch_size;  // [steps] slots running at step s (a prefix)
  int64_t B = 0, T = 0, steps = 0, rows = 0;
  bool batch_first = true;

  __device__ __forceinline__ int64_t packed_row(int64_t j, int64_t t) const { return offset[t] + j; }
  // Row of (slot j, time t) in the [B, T, *] or [T, B, *] input / output viewed as 2-D.
  __device__ __forceinline__ int64_t io_row(int64_t j, int64_t t) const {
    return batch_first ? order[j] * T + t : t * B + order[j];
  }
  // Time of slot j at step s of direction dir.
  __device__ __forceinline__ int64_t time_at(int64_t dir, int64_t j, int64_t s) const {
    return dir == 0 ? s : len[j] - 1 - s;
  }
  // Packed row of the step before (slot j, time t) in direction dir; -1 at its first step.
  __device__ __forceinline__ int64_t previous_row(int64_t dir, int64_t j, int64_t t) const {
    if (dir == 0) return t > 0 ? packed_row(j, t - 1) : -1;
    return t + 1 < len[j] ? packed_row(j, t + 1) : -1;
  }
};

// ---------------------------------------------------------------------------------------------
// Layout kernels: io rows <-> packed rows, batch order <-> slot order
// ---------------------------------------------------------------------------------------------

// ToPacked: packed[offset[t] + j, :] = io[io_row(j, t), :] for every valid (j, t).
// Else:     io[io_row(j, t), :] = packed[offset[t] + j, :]; padding rows of io are untouched (the
//           caller zero-fills io first).
// io: [B*T, width], packed: [rows, width]. One thread per (t, j, k) of the [steps, B, width] box.
template <typename E, bool ToPacked>
__global__ void copy_rows_kernel(PlanView plan, int64_t width, const E* __restrict__ src, E* __restrict__ dst) {
  const int64_t total = plan.steps * plan.B * width;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = idx % width;
    const int64_t j = (idx / width) % plan.B;
    const int64_t t = idx / (width * plan.B);
    if (t >= plan.len[j]) continue;
    const int64_t io = plan.io_row(j, t) * width + k;
    const int64_t packed = plan.packed_row(j, t) * width + k;
    if (ToPacked) {
      dst[packed] = src[io];
    } else {
      dst[io] = src[packed];
    }
  }
}

// Slot-order state from batch order: dst[d, j, :] = src[d, order[j], :] converted to S, or 0
// when src is null. src: [D, B, H] of E (batch order), dst: [D, B, H] of S (slot order), where
// S is E or acc_t<E>.
template <typename E, typename S>
__global__ void gather_state_kernel(const int64_t* __restrict__ order, int64_t D, int64_t B, int64_t H,
                                    const E* __restrict__ src, S* __restrict__ dst) {
  const int64_t total = D * B * H;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = idx % H;
    const int64_t j = (idx / H) % B;
    const int64_t d = idx / (H * B);
    dst[idx] = src == nullptr ? from_acc<S>(acc_t<S>(0)) : from_acc<S>(to_acc(src[(d * B + order[j]) * H + k]));
  }
}

// Batch-order state from slot order: dst[d, order[j], :] = src[d, j, :] converted to E.
// src: [D, B, H] of S (slot order), dst: [D, B, H] of E (batch order).
template <typename S, typename E>
__global__ void scatter_state_kernel(const int64_t* __restrict__ order, int64_t D, int64_t B, int64_t H,
                                     const S* __restrict__ src, E* __restrict__ dst) {
  const int64_t total = D * B * H;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = idx % H;
    const int64_t j = (idx / H) % B;
    const int64_t d = idx / (H * B);
    dst[(d * B + order[j]) * H + k] = from_acc<E>(to_acc(src[idx]));
  }
}

// ---------------------------------------------------------------------------------------------
// Cell math on one (slot, unit), shared by the step-wise and the persistent forward
// ---------------------------------------------------------------------------------------------

// Forward of one (slot, unit k). x: the slot's projected input row of this direction [G*H]
// (b_ih and the b_hh entries that add unchanged already folded in: all for lstm / rnn, r and z
// for gru); hg(g): gate g's (W_hh h_prev)[k] in A; b_hn: gru's b_hn[k]; h_prev: the slot's
// previous h[k]; c: lstm's cell state of (slot, k), updated in place. Writes the workspace row
// ws [W] when not null. Returns the new h[k].
template <typename E, Cell C, typename HG>
__device__ __forceinline__ acc_t<E> cell_forward(int64_t H, int64_t k, const E* x, HG hg, acc_t<E> b_hn,
                                                 acc_t<E> h_prev, acc_t<E>* c, E* ws) {
  using A = acc_t<E>;
  if constexpr (C == Cell::LSTM) {
    const A i = sigmoid_(to_acc(x[k]) + hg(0));
    const A f = sigmoid_(to_acc(x[H + k]) + hg(1));
    const A g = tanh_(to_acc(x[2 * H + k]) + hg(2));
    const A o = sigmoid_(to_acc(x[3 * H + k]) + hg(3));
    const A c_new = f * (*c) + i * g;
    const A h_new = o * tanh_(c_new);
    *c = c_new;
    if (ws != nullptr) {
      ws[k] = from_acc<E>(i);
      ws[H + k] = from_acc<E>(f);
      ws[2 * H + k] = from_acc<E>(g);
      ws[3 * H + k] = from_acc<E>(o);
      ws[4 * H + k] = from_acc<E>(c_new);
      ws[5 * H + k] = from_acc<E>(h_new);
    }
    return h_new;
  } else if constexpr (C == Cell::GRU) {
    const A r = sigmoid_(to_acc(x[k]) + hg(0));
    const A z = sigmoid_(to_acc(x[H + k]) + hg(1));
    const A hn = hg(2) + b_hn;
    const A n = tanh_(to_acc(x[2 * H + k]) + r * hn);
    const A h_new = (A(1) - z) * n + z * h_prev;
    if (ws != nullptr) {
      ws[k] = from_acc<E>(r);
      ws[H + k] = from_acc<E>(z);
      ws[2 * H + k] = from_acc<E>(n);
      ws[3 * H + k] = from_acc<E>(hn);
      ws[4 * H + k] = from_acc<E>(h_new);
    }
    return h_new;
  } else {
    const A pre = to_acc(x[k]) + hg(0);
    const A h_new = C == Cell::RNN_RELU ? (pre <= A(0) ? A(0) : pre) : tanh_(pre);  // NaN stays NaN
    if (ws != nullptr) ws[k] = from_acc<E>(h_new);
    return h_new;
  }
}

// ---------------------------------------------------------------------------------------------
// Step-wise forward: one launch per (direction, step), after the GEMM hg = h[:nb] @ W_hh^T
// ---------------------------------------------------------------------------------------------

// Arguments of one direction's forward steps (pointers already offset to the direction).
template <typename E>
struct ForwardStepArgs {
  PlanView plan;
  int64_t dir = 0, D = 1, H = 0;
  const E* xproj = nullptr;          // [rows, D*G*H] projected input (biases folded); + dir*G*H
  const acc_t<E>* hg = nullptr;      // [nb, G*H] h_prev @ W_hh^T of this step (no bias)
  const E* b_hn = nullptr;           // [H] gru's b_hn, or null (no bias / not gru)
  E* h = nullptr;                    // [B, H] slot order: h_prev in, h_new out (rows < nb)
  acc_t<E>* c = nullptr;             // [B, H] slot order lstm cell state, or null
  E* output = nullptr;               // [B*T, D*H] io rows; + dir*H
  E* h_n = nullptr;                  // [B, H] batch order, this direction's final h
  E* c_n = nullptr;                  // [B, H] batch order, this direction's final c, or null
  E* ws = nullptr;                   // [B*T, W] this direction's workspace, or null (inference)
};

template <typename E, Cell C>
__global__ void forward_step_kernel(ForwardStepArgs<E> a, int64_t s, int64_t nb) {
  using A = acc_t<E>;
  constexpr int G = gates_of(C);
  constexpr int Wn = workspace_width(C);
  const int64_t H = a.H, GH = G * H, DGH = a.D * GH, DH = a.D * H;
  const int64_t total = nb * H;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = idx % H;
    const int64_t j = idx / H;
    const int64_t t = a.plan.time_at(a.dir, j, s);
    const int64_t row = a.plan.packed_row(j, t);
    const A* hg = a.hg + j * GH + k;
    const A b_hn = a.b_hn != nullptr ? to_acc(a.b_hn[k]) : A(0);
    A* c = a.c != nullptr ? a.c + j * H + k : nullptr;
    const A h_new = cell_forward<E, C>(
        H, k, a.xproj + row * DGH, [&](int g) { return hg[g * H]; }, b_hn, to_acc(a.h[j * H + k]), c,
        a.ws != nullptr ? a.ws + row * (Wn * H) : nullptr);
    const E h_e = from_acc<E>(h_new);
    a.h[j * H + k] = h_e;
    a.output[a.plan.io_row(j, t) * DH + k] = h_e;
    if (s == a.plan.len[j] - 1) {  // the slot's last step: its final state
      a.h_n[a.plan.order[j] * H + k] = h_e;
      if (a.c_n != nullptr) a.c_n[a.plan.order[j] * H + k] = from_acc<E>(*c);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Step-wise backward: one launch per (direction, step), before the GEMM dh[:nb] (+)= gh @ W_hh
// ---------------------------------------------------------------------------------------------

template <typename E>
struct BackwardStepArgs {
  PlanView plan;
  int64_t dir = 0, D = 1, H = 0;
  const E* grad_output = nullptr;  // [B*T, D*H] io rows; + dir*H
  const E* ws = nullptr;           // [B*T, W] this direction's workspace
  const E* h0 = nullptr;           // [B, H] slot order initial h (gru's h_prev at the first step)
  const acc_t<E>* c0 = nullptr;    // [B, H] slot order initial c (lstm), else null
  acc_t<E>* dh = nullptr;          // [B, H] slot order: in: d loss / d h after the step (without
                                   // the output's gradient); out: the part of d h_prev that
                                   // bypasses W_hh (gru: z * dh; else 0)
  acc_t<E>* dc = nullptr;          // [B, H] slot order lstm cell gradient: after -> before the step
  E* gx = nullptr;                 // [rows, D*G*H] gradient of the projected input; + dir*G*H
  E* gh_rows = nullptr;            // [rows, G*H] gru only: gradient of W_hh h_prev (+ b_hh) per
                                   // packed row (differs from gx in the n gate); else null
  E* gh_step = nullptr;            // [nb, G*H] the same for this step's slots: the GEMM operand
};

// Backward of one (slot, unit k) at one step. w: the workspace row of (slot, t) [W]; w_prev:
// that of the step before, or null at the slot's first step (then h0 / c0 hold h_prev / c_prev);
// dh: d loss / d h after the step, output's gradient included; dc: lstm's cell gradient (in:
// after the step, out: before it). Writes the gradient of the projected input gx[g*H + k] and of
// W_hh h_prev + b_hh gs[g*H + k] (and gr[g*H + k] when gr is not null). Returns the part of
// d h_prev that bypasses W_hh (gru: z * dh; else 0).
template <typename E, Cell C>
__device__ __forceinline__ acc_t<E> cell_backward(int64_t H, int64_t k, const E* w, const E* w_prev, E h0,
                                                  acc_t<E> c0, acc_t<E> dh, acc_t<E>* dc, E* gx, E* gs, E* gr) {
  using A = acc_t<E>;
  if constexpr (C == Cell::LSTM) {
    const A i = to_acc(w[k]), f = to_acc(w[H + k]), g = to_acc(w[2 * H + k]), o = to_acc(w[3 * H + k]);
    const A tc = tanh_(to_acc(w[4 * H + k]));
    const A c_prev = w_prev != nullptr ? to_acc(w_prev[4 * H + k]) : c0;
    const A dct = dh * o * (A(1) - tc * tc) + *dc;
    const E di = from_acc<E>(dct * g * i * (A(1) - i));
    const E df = from_acc<E>(dct * c_prev * f * (A(1) - f));
    const E dg = from_acc<E>(dct * i * (A(1) - g * g));
    const E dov = from_acc<E>(dh * tc * o * (A(1) - o));
    *dc = dct * f;
    gx[k] = di;
    gx[H + k] = df;
    gx[2 * H + k] = dg;
    gx[3 * H + k] = dov;
    gs[k] = di;
    gs[H + k] = df;
    gs[2 * H + k] = dg;
    gs[3 * H + k] = dov;
    return A(0);
  } else if constexpr (C == Cell::GRU) {
    const A r = to_acc(w[k]), z = to_acc(w[H + k]), n = to_acc(w[2 * H + k]), hn = to_acc(w[3 * H + k]);
    const A h_prev = to_acc(w_prev != nullptr ? w_prev[4 * H + k] : h0);
    const A dn = dh * (A(1) - z) * (A(1) - n * n);
    const E dr = from_acc<E>(dn * hn * r * (A(1) - r));
    const E dz = from_acc<E>(dh * (h_prev - n) * z * (A(1) - z));
    const E dhn = from_acc<E>(dn * r);
    gx[k] = dr;
    gx[H + k] = dz;
    gx[2 * H + k] = from_acc<E>(dn);
    gs[k] = dr;
    gs[H + k] = dz;
    gs[2 * H + k] = dhn;
    if (gr != nullptr) {
      gr[k] = dr;
      gr[H + k] = dz;
      gr[2 * H + k] = dhn;
    }
    return dh * z;
  } else {
    const A h = to_acc(w[k]);
    const A dpre = C == Cell::RNN_RELU ? (h > A(0) ? dh : A(0)) : dh * (A(1) - h * h);
    gx[k] = from_acc<E>(dpre);
    gs[k] = from_acc<E>(dpre);
    return A(0);
  }
}

template <typename E, Cell C>
__global__ void backward_step_kernel(BackwardStepArgs<E> a, int64_t s, int64_t nb) {
  using A = acc_t<E>;
  constexpr int G = gates_of(C);
  const int64_t H = a.H, GH = G * H, DGH = a.D * GH, DH = a.D * H, W = workspace_width(C) * H;
  const int64_t total = nb * H;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = idx % H;
    const int64_t j = idx / H;
    const int64_t t = a.plan.time_at(a.dir, j, s);
    const int64_t row = a.plan.packed_row(j, t);
    const int64_t prev = a.plan.previous_row(a.dir, j, t);
    const A dh = a.dh[j * H + k] + to_acc(a.grad_output[a.plan.io_row(j, t) * DH + k]);
    a.dh[j * H + k] = cell_backward<E, C>(
        H, k, a.ws + row * W, prev >= 0 ? a.ws + prev * W : nullptr, a.h0[j * H + k],
        a.c0 != nullptr ? a.c0[j * H + k] : A(0), dh, a.dc != nullptr ? a.dc + j * H + k : nullptr,
        a.gx + row * DGH, a.gh_step + j * GH, a.gh_rows != nullptr ? a.gh_rows + row * GH : nullptr);
  }
}

// The h before every packed row of one direction, aligned with its gate gradients (the operand
// of the dW_hh GEMM): hp[offset[t] + j, :] = h of (j, previous step) or h0[j] at the first step.
// ws: [B*T, W] this direction's workspace; h0: [B, H] slot order; hp: [rows, H].
template <typename E, Cell C>
__global__ void previous_h_kernel(PlanView plan, int64_t dir, int64_t H, const E* __restrict__ ws,
                                  const E* __restrict__ h0, E* __restrict__ hp) {
  const int64_t W = workspace_width(C) * H, h_col = workspace_h_column(C) * H;
  const int64_t total = plan.steps * plan.B * H;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = idx % H;
    const int64_t j = (idx / H) % plan.B;
    const int64_t t = idx / (H * plan.B);
    if (t >= plan.len[j]) continue;
    const int64_t prev = plan.previous_row(dir, j, t);
    hp[plan.packed_row(j, t) * H + k] = prev >= 0 ? ws[prev * W + h_col + k] : h0[j * H + k];
  }
}

// ---------------------------------------------------------------------------------------------
// Persistent forward: every step of both directions in one cooperative launch, W_hh on chip
// ---------------------------------------------------------------------------------------------
//
// Block b serves direction dir = b / blocks_per_dir and the hidden units [u0, u0 + U) with
// u0 = (b % blocks_per_dir) * U (U = units_per_block; units >= H are idle padding). It keeps the
// R = G*U rows {g*H + u} of that direction's W_hh in shared memory for the whole sequence,
// transposed (wt[k*R + g*U + uu] = W_hh[g*H + u0 + uu, k]) so that a warp's threads, which take
// consecutive r, read consecutive words. Per step s (nb = batch_size[s] running slots):
//   1. copy h_prev [nb, H] (all units, written by every block of this direction at step s-1)
//      from the double-buffered global state into shared memory;
//   2. hg[j, r] = W_hh row r . h_prev[j] for j < nb, r < R (float accumulation) into shared,
//      the sum over k split between several threads when there are few outputs;
//   3. the cell for (j, own unit): new h into the other parity of the global state, the output,
//      the workspace, and h_n / c_n at the slot's last step; c stays in the global c state,
//      which only this block touches for these units;
//   4. grid.sync(): every block's h of step s is visible before anyone reads it at step s+1.
// Double buffering: step s reads h_state[s & 1] and writes h_state[(s + 1) & 1]. The next write
// into h_state[s & 1] happens at step s+1, after the grid barrier that ends step s, by which
// time every read of it (step 1 of step s) is done, so no block overwrites h another still
// reads. Global state is read with __ldcg (L2, never a possibly stale L1 line). Both directions
// share the grid and the barrier; they run the same slots at every step.
constexpr int kPersistentThreads = 256;
// Selection thresholds; placeholders until measured on an H100 (see use_persistent_forward / _backward).
constexpr int64_t kPersistentMaxBatchInference = 64;  // B at most this: persistent inference
constexpr int64_t kPersistentMaxBatchTraining = 32;   // B at most this: persistent training fwd
constexpr int64_t kPersistentMaxBatchBackward = 32;   // B at most this: persistent backward
constexpr int64_t kPersistentMaxHidden = 1024;        // larger H: W_hh slices get too thin

template <typename E>
struct PersistentArgs {
  PlanView plan;
  int64_t D = 1, H = 0;
  int units_per_block = 1, blocks_per_dir = 1;
  const E* xproj = nullptr;      // [rows, D*G*H] projected input, biases folded
  const E* w_hh = nullptr;       // [D*G*H, H]: direction d's W_hh at rows [d*G*H, (d+1)*G*H)
  const E* b_hn = nullptr;       // [D, H] gru's b_hn, or null
  E* h_state = nullptr;          // [D, 2, B, H] slot order, parity 0 preset to h0
  acc_t<E>* c_state = nullptr;   // [D, B, H] slot order lstm cell, preset to c0; else null
  E* output = nullptr;           // [B*T, D*H] io rows, zero-filled on padding by the caller
  E* h_n = nullptr;              // [D, B, H] batch order, preset to h0 (len-0 slots keep it)
  E* c_n = nullptr;              // [D, B, H] batch order, preset to c0, or null
  E* ws = nullptr;               // [D, B*T, W] or null (inference)
};

// Shared memory of one block: wt [H, R] E | h_prev [B, H] E | hg [B, R] A | partial sums
// [kPersistentThreads] A (each 16-byte aligned).
template <typename E>
__host__ __device__ inline size_t persistent_smem_bytes(int64_t B, int64_t H, int64_t R) {
  return round_up16(sizeof(E) * H * R) + round_up16(sizeof(E) * B * H) + round_up16(sizeof(acc_t<E>) * B * R) +
         round_up16(sizeof(acc_t<E>) * kPersistentThreads);
}

template <typename E, Cell C>
__global__ void __launch_bounds__(kPersistentThreads) persistent_forward_kernel(PersistentArgs<E> a) {
  using A = acc_t<E>;
  namespace cg = cooperative_groups;
  cg::grid_group grid = cg::this_grid();
  constexpr int G = gates_of(C);
  constexpr int64_t Wn = workspace_width(C);
  const int64_t H = a.H, B = a.plan.B, GH = G * H, DGH = a.D * GH, DH = a.D * H;
  const int64_t U = a.units_per_block, R = G * U;
  const int64_t dir = blockIdx.x / a.blocks_per_dir;
  const int64_t u0 = (blockIdx.x % a.blocks_per_dir) * U;

  extern __shared__ __align__(16) unsigned char smem[];
  E* wt = reinterpret_cast<E*>(smem);                                                  // [H, R]
  E* hs = reinterpret_cast<E*>(smem + round_up16(sizeof(E) * H * R));                 // [B, H]
  A* hg = reinterpret_cast<A*>(smem + round_up16(sizeof(E) * H * R) + round_up16(sizeof(E) * B * H));  // [B, R]
  A* part = reinterpret_cast<A*>(reinterpret_cast<unsigned char*>(hg) + round_up16(sizeof(A) * B * R));  // [threads]

  const E* w_dir = a.w_hh + dir * GH * H;
  for (int64_t idx = threadIdx.x; idx < H * R; idx += blockDim.x) {
    const int64_t r = idx % R, k = idx / R;
    const int64_t g = r / U, u = u0 + r % U;
    wt[idx] = u < H ? w_dir[(g * H + u) * H + k] : from_acc<E>(A(0));
  }
  // (the first __syncthreads below orders these writes before any read)

  E* h_dir = a.h_state + dir * 2 * B * H;
  A* c_dir = a.c_state != nullptr ? a.c_state + dir * B * H : nullptr;
  E* ws_dir = a.ws != nullptr ? a.ws + dir * (B * a.plan.T) * (Wn * H) : nullptr;
  const E* x_dir = a.xproj + dir * GH;

  for (int64_t s = 0; s < a.plan.steps; ++s) {
    const int64_t nb = a.plan.batch_size[s];
    const E* h_read = h_dir + (s & 1) * B * H;
    E* h_write = h_dir + ((s + 1) & 1) * B * H;
    for (int64_t idx = threadIdx.x; idx < nb * H; idx += blockDim.x) hs[idx] = __ldcg(h_read + idx);
    __syncthreads();
    // hg[j, r] for the nb * R outputs. With fewer outputs than threads (small batches) each
    // output's sum over k is split between `split` threads (a power of two dividing blockDim.x):
    // thread = lane * groups + group computes the k = lane, lane + split, ... part of output
    // base + group into part[thread]; after a barrier lane 0 adds the split parts. Consecutive
    // threads take consecutive outputs (consecutive r), so their wt reads are consecutive words.
    // Every thread runs the same number of passes (the bounds depend on nb only), so all reach
    // both barriers of every pass.
    const int64_t outputs = nb * R;
    int64_t split = 1;
    while (split < 32 && 2 * split * outputs <= blockDim.x && 2 * split <= H) split *= 2;
    const int64_t groups = blockDim.x / split;
    const int64_t group = threadIdx.x % groups, lane = threadIdx.x / groups;
    for (int64_t base = 0; base < outputs; base += groups) {
      const int64_t o = base + group;
      A acc = A(0);
      if (o < outputs) {
        const int64_t r = o % R, j = o / R;
        const E* hj = hs + j * H;
        for (int64_t k = lane; k < H; k += split) acc += to_acc(wt[k * R + r]) * to_acc(hj[k]);
      }
      if (split == 1) {
        if (o < outputs) hg[o] = acc;
        continue;  // (split is block-uniform: no thread waits at the barriers below)
      }
      part[threadIdx.x] = acc;
      __syncthreads();
      if (lane == 0 && o < outputs) {
        A sum = A(0);
        for (int64_t l = 0; l < split; ++l) sum += part[l * groups + group];
        hg[o] = sum;
      }
      __syncthreads();  // part is rewritten by the next pass
    }
    __syncthreads();
    for (int64_t idx = threadIdx.x; idx < nb * U; idx += blockDim.x) {
      const int64_t uu = idx % U, j = idx / U;
      const int64_t k = u0 + uu;
      if (k >= H) continue;
      const int64_t t = a.plan.time_at(dir, j, s);
      const int64_t row = a.plan.packed_row(j, t);
      const A* hgj = hg + j * R + uu;
      const A b_hn = a.b_hn != nullptr ? to_acc(a.b_hn[dir * H + k]) : A(0);
      A* c = c_dir != nullptr ? c_dir + j * H + k : nullptr;
      const A h_new = cell_forward<E, C>(
          H, k, x_dir + row * DGH, [&](int g) { return hgj[g * U]; }, b_hn, to_acc(hs[j * H + k]), c,
          ws_dir != nullptr ? ws_dir + row * (Wn * H) : nullptr);
      const E h_e = from_acc<E>(h_new);
      h_write[j * H + k] = h_e;
      a.output[a.plan.io_row(j, t) * DH + dir * H + k] = h_e;
      if (s == a.plan.len[j] - 1) {
        a.h_n[(dir * B + a.plan.order[j]) * H + k] = h_e;
        if (a.c_n != nullptr) a.c_n[(dir * B + a.plan.order[j]) * H + k] = from_acc<E>(*c);
      }
    }
    grid.sync();  // also a block barrier: hs / hg are free for the next step
  }
}

// ---------------------------------------------------------------------------------------------
// Persistent backward: every step of both directions in one cooperative launch
// ---------------------------------------------------------------------------------------------
//
// The same grid as the forward: block b serves direction b / blocks_per_dir and the hidden units
// [u0, u0 + U). It keeps the U columns of W_hh that feed its units, wc[r*U + uu] = W_hh[r, u0 +
// uu] for all r < G*H, in shared memory. Steps run from the last to the first; per step s
// (nb = batch_size[s] running slots):
//   A. for the slots that also ran step s+1 (j < batch_size[s+1]): dh[j, u] += sum over r of
//      gh_{s+1}[j, r] * W_hh[r, u], where gh_{s+1} (every unit's gate gradients of step s+1, all
//      blocks of the direction wrote them) is read from the double-buffered global gh_state;
//   B. the cell backward for (j < nb, own unit): dh (+ the output's gradient) -> the gate
//      gradients into gx, gh_rows (gru) and gh_state[s & 1], dc updated, dh = the bypass part;
//   then grid.sync(). After step 0 one more phase A (with batch_size[0] slots) leaves d h0 in dh.
// dh and dc [D, B, H] (slot order, in A) hold each (slot, unit) only for the block owning the unit;
// phases A and B of a step are separated by __syncthreads (which orders the block's global
// writes). Double buffering: step s writes gh_state[s & 1], step s-1 reads it in phase A (after
// the grid barrier) and writes the other parity; the next write of parity s & 1 is at step s-2,
// after the barrier that ends step s-1, so no block overwrites gradients another still reads.
template <typename E>
struct PersistentBackwardArgs {
  PlanView plan;
  int64_t D = 1, H = 0;
  int units_per_block = 1, blocks_per_dir = 1;
  const E* w_hh = nullptr;         // [D*G*H, H]: direction d's W_hh at rows [d*G*H, (d+1)*G*H)
  const E* grad_output = nullptr;  // [B*T, D*H] io rows
  const E* ws = nullptr;           // [D, B*T, W] the forward's workspace
  const E* h0 = nullptr;           // [D, B, H] slot order initial h
  const acc_t<E>* c0 = nullptr;    // [D, B, H] slot order initial c (lstm), else null
  acc_t<E>* dh = nullptr;          // [D, B, H] slot order: in grad_h_n, out d h0
  acc_t<E>* dc = nullptr;          // [D, B, H] slot order (lstm): in grad_c_n, out d c0; else null
  E* gx = nullptr;                 // [rows, D*G*H] gradient of the projected input
  E* gh_rows = nullptr;            // [D, rows, G*H] gru's W_hh-side gate gradients, else null
  E* gh_state = nullptr;           // [D, 2, B, G*H] scratch: gate gradients of the last two steps
};

// Shared memory of one block: wc [G*H, U] E | partial sums [kPersistentThreads] A.
template <typename E>
__host__ __device__ inline size_t persistent_backward_smem_bytes(int64_t GH, int64_t U) {
  return round_up16(sizeof(E) * GH * U) + round_up16(sizeof(acc_t<E>) * kPersistentThreads);
}

// Phase A of the persistent backward for the slots j < nb: dh[j, u0 + uu] += gh[j, :] . wc[:, uu].
// gh: [B, G*H] gate gradients of the later step (global, written by other blocks: read via L2).
template <typename E>
__device__ __forceinline__ void persistent_backward_carry(int64_t nb, int64_t H, int64_t GH, int64_t U, int64_t u0,
                                                          const E* wc, const E* gh, acc_t<E>* dh, acc_t<E>* part) {
  using A = acc_t<E>;
  const int64_t outputs = nb * U;
  int64_t split = 1;  // as in the forward's phase 2: threads per output when outputs are few
  while (split < 32 && 2 * split * outputs <= blockDim.x && 2 * split <= GH) split *= 2;
  const int64_t groups = blockDim.x / split;
  const int64_t group = threadIdx.x % groups, lane = threadIdx.x / groups;
  for (int64_t base = 0; base < outputs; base += groups) {
    const int64_t o = base + group;
    const int64_t uu = o % U, j = o / U;
    A acc = A(0);
    if (o < outputs) {
      const E* ghj = gh + j * GH;
      for (int64_t r = lane; r < GH; r += split) acc += to_acc(__ldcg(ghj + r)) * to_acc(wc[r * U + uu]);
    }
    if (split > 1) {
      part[threadIdx.x] = acc;
      __syncthreads();
      if (lane == 0) {
        for (int64_t l = 1; l < split; ++l) acc += part[l * groups + group];
      }
      __syncthreads();  // part is rewritten by the next pass
    }
    if (lane == 0 && o < outputs && u0 + uu < H) dh[j * H + u0 + uu] += acc;
  }
}

template <typename E, Cell C>
__global__ void __launch_bounds__(kPersistentThreads) persistent_backward_kernel(PersistentBackwardArgs<E> a) {
  using A = acc_t<E>;
  namespace cg = cooperative_groups;
  cg::grid_group grid = cg::this_grid();
  constexpr int G = gates_of(C);
  const int64_t H = a.H, B = a.plan.B, T = a.plan.T, GH = G * H, DGH = a.D * GH, DH = a.D * H;
  const int64_t W = workspace_width(C) * H, rows = a.plan.rows;
  const int64_t U = a.units_per_block;
  const int64_t dir = blockIdx.x / a.blocks_per_dir;
  const int64_t u0 = (blockIdx.x % a.blocks_per_dir) * U;

  extern __shared__ __align__(16) unsigned char smem[];
  E* wc = reinterpret_cast<E*>(smem);                                          // [G*H, U]
  A* part = reinterpret_cast<A*>(smem + round_up16(sizeof(E) * GH * U));      // [threads]

  const E* w_dir = a.w_hh + dir * GH * H;
  for (int64_t idx = threadIdx.x; idx < GH * U; idx += blockDim.x) {
    const int64_t r = idx / U, u = u0 + idx % U;
    wc[idx] = u < H ? w_dir[r * H + u] : from_acc<E>(A(0));
  }
  __syncthreads();

  const E* ws_dir = a.ws + dir * (B * T) * W;
  const E* h0_dir = a.h0 + dir * B * H;
  const A* c0_dir = a.c0 != nullptr ? a.c0 + dir * B * H : nullptr;
  A* dh_dir = a.dh + dir * B * H;
  A* dc_dir = a.dc != nullptr ? a.dc + dir * B * H : nullptr;
  E* gh_dir = a.gh_state + dir * 2 * B * GH;
  E* gr_dir = a.gh_rows != nullptr ? a.gh_rows + dir * rows * GH : nullptr;

  for (int64_t s = a.plan.steps - 1; s >= 0; --s) {
    const int64_t nb = a.plan.batch_size[s];
    if (s + 1 < a.plan.steps) {
      persistent_backward_carry<E>(a.plan.batch_size[s + 1], H, GH, U, u0, wc, gh_dir + ((s + 1) & 1) * B * GH, dh_dir,
                                   part);
    }
    __syncthreads();  // dh of this block's units is final for the step
    E* gh_write = gh_dir + (s & 1) * B * GH;
    for (int64_t idx = threadIdx.x; idx < nb * U; idx += blockDim.x) {
      const int64_t uu = idx % U, j = idx / U;
      const int64_t k = u0 + uu;
      if (k >= H) continue;
      const int64_t t = a.plan.time_at(dir, j, s);
      const int64_t row = a.plan.packed_row(j, t);
      const int64_t prev = a.plan.previous_row(dir, j, t);
      const A dh = dh_dir[j * H + k] + to_acc(a.grad_output[a.plan.io_row(j, t) * DH + dir * H + k]);
      dh_dir[j * H + k] = cell_backward<E, C>(
          H, k, ws_dir + row * W, prev >= 0 ? ws_dir + prev * W : nullptr, h0_dir[j * H + k],
          c0_dir != nullptr ? c0_dir[j * H + k] : A(0), dh, dc_dir != nullptr ? dc_dir + j * H + k : nullptr,
          a.gx + row * DGH + dir * GH, gh_write + j * GH, gr_dir != nullptr ? gr_dir + row * GH : nullptr);
    }
    grid.sync();  // every unit's gate gradients of step s are visible to phase A of step s-1
  }
  if (a.plan.steps > 0) {
    persistent_backward_carry<E>(a.plan.batch_size[0], H, GH, U, u0, wc, gh_dir, dh_dir, part);  // parity 0 & 1 = 0
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: launchers (all on the given stream; they return the launch's cudaError_t)
// ---------------------------------------------------------------------------------------------

template <typename E, bool ToPacked>
cudaError_t launch_copy_rows(const PlanView& plan, int64_t width, const E* src, E* dst, cudaStream_t stream) {
  const int64_t n = plan.steps * plan.B * width;
  if (n == 0) return cudaSuccess;
  copy_rows_kernel<E, ToPacked><<<blocks_for(n), kThreads, 0, stream>>>(plan, width, src, dst);
  return cudaGetLastError();
}

template <typename E, typename S>
cudaError_t launch_gather_state(const int64_t* order, int64_t D, int64_t B, int64_t H, const E* src, S* dst,
                                cudaStream_t stream) {
  const int64_t n = D * B * H;
  if (n == 0) return cudaSuccess;
  gather_state_kernel<E, S><<<blocks_for(n), kThreads, 0, stream>>>(order, D, B, H, src, dst);
  return cudaGetLastError();
}

template <typename S, typename E>
cudaError_t launch_scatter_state(const int64_t* order, int64_t D, int64_t B, int64_t H, const S* src, E* dst,
                                 cudaStream_t stream) {
  const int64_t n = D * B * H;
  if (n == 0) return cudaSuccess;
  scatter_state_kernel<S, E><<<blocks_for(n), kThreads, 0, stream>>>(order, D, B, H, src, dst);
  return cudaGetLastError();
}

template <typename E>
cudaError_t launch_forward_step(Cell cell, const ForwardStepArgs<E>& args, int64_t s, int64_t nb,
                                cudaStream_t stream) {
  const int64_t n = nb * args.H;
  if (n == 0) return cudaSuccess;
  const int blocks = blocks_for(n);
  switch (cell) {
    case Cell::LSTM: forward_step_kernel<E, Cell::LSTM><<<blocks, kThreads, 0, stream>>>(args, s, nb); break;
    case Cell::GRU: forward_step_kernel<E, Cell::GRU><<<blocks, kThreads, 0, stream>>>(args, s, nb); break;
    case Cell::RNN_TANH: forward_step_kernel<E, Cell::RNN_TANH><<<blocks, kThreads, 0, stream>>>(args, s, nb); break;
    case Cell::RNN_RELU: forward_step_kernel<E, Cell::RNN_RELU><<<blocks, kThreads, 0, stream>>>(args, s, nb); break;
  }
  return cudaGetLastError();
}

template <typename E>
cudaError_t launch_backward_step(Cell cell, const BackwardStepArgs<E>& args, int64_t s, int64_t nb,
                                 cudaStream_t stream) {
  const int64_t n = nb * args.H;
  if (n == 0) return cudaSuccess;
  const int blocks = blocks_for(n);
  switch (cell) {
    case Cell::LSTM: backward_step_kernel<E, Cell::LSTM><<<blocks, kThreads, 0, stream>>>(args, s, nb); break;
    case Cell::GRU: backward_step_kernel<E, Cell::GRU><<<blocks, kThreads, 0, stream>>>(args, s, nb); break;
    case Cell::RNN_TANH: backward_step_kernel<E, Cell::RNN_TANH><<<blocks, kThreads, 0, stream>>>(args, s, nb); break;
    case Cell::RNN_RELU: backward_step_kernel<E, Cell::RNN_RELU><<<blocks, kThreads, 0, stream>>>(args, s, nb); break;
  }
  return cudaGetLastError();
}

template <typename E>
cudaError_t launch_previous_h(Cell cell, const PlanView& plan, int64_t dir, int64_t H, const E* ws, const E* h0, E* hp,
                              cudaStream_t stream) {
  const int64_t n = plan.steps * plan.B * H;
  if (n == 0) return cudaSuccess;
  const int blocks = blocks_for(n);
  switch (cell) {
    case Cell::LSTM: previous_h_kernel<E, Cell::LSTM><<<blocks, kThreads, 0, stream>>>(plan, dir, H, ws, h0, hp); break;
    case Cell::GRU: previous_h_kernel<E, Cell::GRU><<<blocks, kThreads, 0, stream>>>(plan, dir, H, ws, h0, hp); break;
    case Cell::RNN_TANH: previous_h_kernel<E, Cell::RNN_TANH><<<blocks, kThreads, 0, stream>>>(plan, dir, H, ws, h0, hp); break;
    case Cell::RNN_RELU: previous_h_kernel<E, Cell::RNN_RELU><<<blocks, kThreads, 0, stream>>>(plan, dir, H, ws, h0, hp); break;
  }
  return cudaGetLastError();
}

// The selection rule between the persistent and the step-wise forward, on shape alone (the
// launcher below then checks that the chosen grid fits the device). Small batches leave the
// step-wise path launch-bound (2 launches per step and direction, each a few microseconds of
// GPU work); large ones fill the GPU with the cuBLAS GEMM and the persistent kernel's naive
// shared-memory dot products lose. The thresholds are named constants to be measured.
inline bool use_persistent_forward(int64_t B, int64_t H, bool training) {
  if (B <= 0 || H <= 0 || H > kPersistentMaxHidden) return false;
  return B <= (training ? kPersistentMaxBatchTraining : kPersistentMaxBatchInference);
}

// The same rule for the backward (whose step-wise path has the same two launches per step and
// direction).
inline bool use_persistent_backward(int64_t B, int64_t H) {
  return B > 0 && H > 0 && H <= kPersistentMaxHidden && B <= kPersistentMaxBatchBackward;
}

template <typename E, bool Backward>
const void* persistent_kernel_for(Cell cell) {
#define FASTNER_RNN_KERNEL(C)                                                                        \
  (Backward ? reinterpret_cast<const void*>(&persistent_backward_kernel<E, C>)                      \
            : reinterpret_cast<const void*>(&persistent_forward_kernel<E, C>))
  switch (cell) {
    case Cell::LSTM: return FASTNER_RNN_KERNEL(Cell::LSTM);
    case Cell::GRU: return FASTNER_RNN_KERNEL(Cell::GRU);
    case Cell::RNN_TANH: return FASTNER_RNN_KERNEL(Cell::RNN_TANH);
    case Cell::RNN_RELU: return FASTNER_RNN_KERNEL(Cell::RNN_RELU);
  }
#undef FASTNER_RNN_KERNEL
  return nullptr;
}

// Launches a persistent kernel (forward or backward, both with the grid of one block per U hidden
// units per direction) when its grid fits the device; *launched tells whether it did (when false,
// nothing was launched and the caller runs the step-wise path). Chooses U as the smallest that
// lets all D * ceil(H / U) blocks be co-resident (a cooperative launch requires it) within the
// shared memory the device allows per block.
template <typename E, bool Backward, typename Args>
cudaError_t launch_persistent(Cell cell, Args args, int device, cudaStream_t stream, bool* launched) {
  *launched = false;
  if (args.plan.steps == 0) {
    *launched = true;  // nothing to run: the caller presets every result for empty sequences
    return cudaSuccess;
  }
  int sms = 0, smem_optin = 0, cooperative = 0;
  cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device);
  if (err != cudaSuccess || !cooperative) return err;
  const void* kernel = persistent_kernel_for<E, Backward>(cell);
  const int64_t H = args.H, D = args.D, G = gates_of(cell), B = args.plan.B;
  for (int64_t U = ceil_div(D * H, sms); U <= H; U = U < 2 ? U + 1 : U + U / 2) {
    const int64_t blocks_per_dir = ceil_div(H, U);
    const size_t smem = Backward ? persistent_backward_smem_bytes<E>(G * H, U) : persistent_smem_bytes<E>(B, H, G * U);
    if (smem > static_cast<size_t>(smem_optin)) break;  // a larger U only needs more
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
    int per_sm = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kPersistentThreads, smem);
    if (err != cudaSuccess) return err;
    if (static_cast<int64_t>(per_sm) * sms < D * blocks_per_dir) continue;
    args.units_per_block = static_cast<int>(U);
    args.blocks_per_dir = static_cast<int>(blocks_per_dir);
    void* params[] = {&args};
    err = cudaLaunchCooperativeKernel(kernel, dim3(static_cast<unsigned>(D * blocks_per_dir)), dim3(kPersistentThreads),
                                      params, smem, stream);
    *launched = err == cudaSuccess;
    return err;
  }
  return cudaSuccess;
}

template <typename E>
cudaError_t launch_persistent_forward(Cell cell, const PersistentArgs<E>& args, int device, cudaStream_t stream,
                                      bool* launched) {
  return launch_persistent<E, false>(cell, args, device, stream, launched);
}

template <typename E>
cudaError_t launch_persistent_backward(Cell cell, const PersistentBackwardArgs<E>& args, int device,
                                       cudaStream_t stream, bool* launched) {
  return launch_persistent<E, true>(cell, args, device, stream, launched);
}

}  // namespace fastner::cuda::rnn::kernels

#ifdef FASTNER_KERNEL_CHECK
// Compile-check every kernel and launcher for every storage type (.ci/check_cuda_kernels.sh).
namespace fastner::cuda::rnn::kernels {
#define FASTNER_RNN_INSTANTIATE(E)                                                                          \
  template cudaError_t launch_copy_rows<E, true>(const PlanView&, int64_t, const E*, E*, cudaStream_t);     \
  template cudaError_t launch_copy_rows<E, false>(const PlanView&, int64_t, const E*, E*, cudaStream_t);    \
  template cudaError_t launch_gather_state<E, acc_t<E>>(const int64_t*, int64_t, int64_t, int64_t, const E*, \
                                                        acc_t<E>*, cudaStream_t);                           \
  template cudaError_t launch_scatter_state<acc_t<E>, E>(const int64_t*, int64_t, int64_t, int64_t,         \
                                                         const acc_t<E>*, E*, cudaStream_t);                \
  template cudaError_t launch_forward_step<E>(Cell, const ForwardStepArgs<E>&, int64_t, int64_t, cudaStream_t); \
  template cudaError_t launch_backward_step<E>(Cell, const BackwardStepArgs<E>&, int64_t, int64_t,          \
                                               cudaStream_t);                                               \
  template cudaError_t launch_previous_h<E>(Cell, const PlanView&, int64_t, int64_t, const E*, const E*, E*, \
                                            cudaStream_t);                                                  \
  template cudaError_t launch_persistent_forward<E>(Cell, const PersistentArgs<E>&, int, cudaStream_t, bool*); \
  template cudaError_t launch_persistent_backward<E>(Cell, const PersistentBackwardArgs<E>&, int, cudaStream_t, \
                                                     bool*);
// State kept in E itself (h); for float and double that is the acc_t<E> instantiation above.
#define FASTNER_RNN_INSTANTIATE_LOW_PRECISION(E)                                                             \
  template cudaError_t launch_gather_state<E, E>(const int64_t*, int64_t, int64_t, int64_t, const E*, E*,   \
                                                 cudaStream_t);                                             \
  template cudaError_t launch_scatter_state<E, E>(const int64_t*, int64_t, int64_t, int64_t, const E*, E*,  \
                                                  cudaStream_t);
FASTNER_RNN_INSTANTIATE(float)
FASTNER_RNN_INSTANTIATE(double)
FASTNER_RNN_INSTANTIATE(__half)
FASTNER_RNN_INSTANTIATE(__nv_bfloat16)
FASTNER_RNN_INSTANTIATE_LOW_PRECISION(__half)
FASTNER_RNN_INSTANTIATE_LOW_PRECISION(__nv_bfloat16)
#undef FASTNER_RNN_INSTANTIATE
#undef FASTNER_RNN_INSTANTIATE_LOW_PRECISION
}  // namespace fastner::cuda::rnn::kernels
#endif  // FASTNER_KERNEL_CHECK
