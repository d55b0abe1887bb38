// CUDA kernels of fastner::rnn_layer_forward / rnn_layer_backward: one LSTM / GRU / RNN layer,
// both directions, variable lengths without work on padding. Schemas: csrc/fastner.cpp; device
// code and the layouts it uses (sorted slots, packed rows, workspace): csrc/cuda/kernels/rnn.cuh.
// This file is the thin binding: argument checks, the host-side plan, cuBLAS GEMMs and launches.
//
// Forward: one GEMM (cuBLAS, via at::addmm) projects every valid input row for all gates of both
// directions; then either
//   * the persistent kernel (small batches, see use_persistent_forward in rnn.cuh): one
//     cooperative launch runs every step of both directions with W_hh in shared memory, or
//   * the step-wise path: per step and direction one GEMM h[:nb] @ W_hh^T (float output) on the
//     running prefix and one fused cell kernel, the two directions on two streams.
// Backward: the persistent backward kernel (small batches; W_hh's columns on chip) or, step-wise,
// per step and direction one fused gate-gradient kernel and one GEMM carrying the gradient to
// h_prev; then dW_hh and dW_ih per direction, the biases and the input gradient (both
// directions summed inside one GEMM) as single GEMMs over all packed rows.
//
// Streams. Everything runs on the caller's current stream, except that with two directions the
// per-direction chains of direction 1 run on a second stream from torch's pool: it waits on an
// event recorded on the current stream once the shared inputs are queued (fork) and the current
// stream waits on an event recorded at its end (join, also on error: see DirectionStreams).
// Every tensor is allocated on the current stream before the fork, never while the side stream
// is current, so the caching allocator never hands a block that the side stream still uses to
// later work that is not ordered after the join.
//
// Host synchronisation. The per-step GEMM sizes come from the lengths, so the plan is built on
// the host: lengths on the GPU cost one device->host copy (a sync); lengths on the CPU (accepted
// as well; the dispatcher still picks this kernel from the CUDA input) cost none.
//
// One file (~690 lines): the binding's forward and backward share the host-side plan, the
// weight unpacking and the two-stream fork/join, and the CPU emulation
// (tests/ops/rnn/test_rnn_cuda_emulated.py) compiles this one source as it is. Sections:
// types, arguments, streams, forward, backward, registration.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cublas_v2.h>

#include "checks.h"
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/kernels/rnn.cuh"

namespace fastner::cuda::rnn {
namespace {

namespace k = kernels;
using at::Tensor;
using k::Cell;

// ---------------------------------------------------------------------------------------------
// Types
// ---------------------------------------------------------------------------------------------

template <typename scalar_t>
struct DeviceScalar {
  using type = scalar_t;
};
template <>
struct DeviceScalar<at::Half> {
  using type = __half;
};
template <>
struct DeviceScalar<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T>
T* ptr(const Tensor& t) {
  return t.defined() && t.numel() > 0 ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

template <typename T>
constexpr cudaDataType_t cuda_type() {
  if constexpr (std::is_same_v<T, double>) return CUDA_R_64F;
  if constexpr (std::is_same_v<T, __half>) return CUDA_R_16F;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return CUDA_R_16BF;
  return CUDA_R_32F;
}

template <typename E>
at::ScalarType acc_scalar_type() {
  return std::is_same_v<E, double> ? at::kDouble : at::kFloat;
}

#define FASTNER_CUDA_CHECK(expr)                                                   \
  do {                                                                             \
    const cudaError_t fastner_err = (expr);                                        \
    TORCH_CHECK(fastner_err == cudaSuccess, "rnn_layer (CUDA): ", #expr, " failed: ", \
                cudaGetErrorString(fastner_err));                                  \
  } while (0)

// Row-major C[M, N] = op(A)[M, K] @ op(B)[K, N] (+ C when accumulate) on the current stream.
// A, B of type E; C of type Out (E or acc_t<E>); accumulation in acc_t<E> (float for the
// 16-bit types; TF32 for float only where torch allows it for matmul). cuBLAS is column-major:
// a row-major X [r, c] with leading dimension ld is its transpose there, so the call computes
// C^T = op(B)^T op(A)^T with the operands swapped.
template <typename E, typename Out>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const E* a, int64_t lda, const E* b,
          int64_t ldb, bool accumulate, Out* c, int64_t ldc) {
  if (M == 0 || N == 0) return;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (K == 0) {  // an empty sum: C = 0 (or unchanged)
    if (!accumulate) {
      FASTNER_CUDA_CHECK(cudaMemset2DAsync(c, ldc * sizeof(Out), 0, N * sizeof(Out), M, stream));
    }
    return;
  }
  for (int64_t v : {M, N, K, lda, ldb, ldc})
    TORCH_CHECK(v <= INT_MAX, "rnn_layer (CUDA): a GEMM dimension exceeds cuBLAS's int range: ", v);
  using A = k::acc_t<E>;
  const A alpha = A(1), beta = accumulate ? A(1) : A(0);
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  if constexpr (std::is_same_v<E, double>) {
    compute = CUBLAS_COMPUTE_64F;
  } else if constexpr (std::is_same_v<E, float>) {
    if (at::globalContext().allowTF32CuBLAS()) compute = CUBLAS_COMPUTE_32F_FAST_TF32;
  }
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // bound to the current stream
  TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                                    static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), &alpha, b,
                                    cuda_type<E>(), static_cast<int>(ldb), a, cuda_type<E>(), static_cast<int>(lda),
                                    &beta, c, cuda_type<Out>(), static_cast<int>(ldc), compute, CUBLAS_GEMM_DEFAULT));
}

// ---------------------------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------------------------

Cell parse_mode(c10::string_view mode) {
  const int cell = fastner::rnn_layout::cell_of(mode.data(), mode.size());
  TORCH_CHECK_VALUE(cell >= 0, "rnn_layer: mode must be 'lstm', 'gru', 'rnn_tanh' or 'rnn_relu', got '",
                    std::string(mode), "'");
  return static_cast<Cell>(cell);
}

void check_input(const Tensor& input) {
  TORCH_CHECK_VALUE(input.dim() == 3, "rnn_layer: input must be 3-D ([B, T, I] or [T, B, I]), got ", input.dim(), "-D");
  const auto st = input.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                    "rnn_layer: input must be float32, float64, float16 or bfloat16 on CUDA, got ", st);
}

// The batch sorted by decreasing length, on the host (for the GEMM sizes) and on the device
// (for the kernels, as k::PlanView).
struct Plan : rnn_layout::Schedule {
  int64_t B = 0, T = 0;
  bool batch_first = true;
  Tensor device;  // int64 [B + B + (steps + 1) + steps]: order | len | offset | batch_size
  k::PlanView view;

  // Time-major input with every length T (so the order is the identity): the input rows are
  // already the packed rows.
  bool io_is_packed() const { return !batch_first && rows == B * T; }
};

Plan make_plan(const Tensor& lengths, int64_t B, int64_t T, bool batch_first, const Tensor& input) {
  checks::lengths_shape("rnn_layer", lengths, B);
  TORCH_CHECK_VALUE(lengths.is_cpu() || lengths.device() == input.device(),
                    "rnn_layer: lengths must be on the input's device ", input.device(), " (or the CPU), got ",
                    lengths.device());
  // A sync when lengths is on the GPU; `host` holds the lengths the schedule reads.
  const Tensor host = checks::lengths_in_range("rnn_layer", lengths.to(at::kCPU), T);
  Plan plan;
  static_cast<rnn_layout::Schedule&>(plan) = rnn_layout::schedule_by_length(host.const_data_ptr<int64_t>(), B);
  plan.B = B;
  plan.T = T;
  plan.batch_first = batch_first;

  // One pinned staging buffer, copied asynchronously on the current stream (the caching host
  // allocator keeps it alive until the copy is done).
  const int64_t n = 2 * B + 2 * plan.steps + 1;
  Tensor staging = at::empty({n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* st = staging.data_ptr<int64_t>();
  std::copy(plan.order.begin(), plan.order.end(), st);
  std::copy(plan.len.begin(), plan.len.end(), st + B);
  std::copy(plan.offset.begin(), plan.offset.end(), st + 2 * B);
  std::copy(plan.batch_size.begin(), plan.batch_size.end(), st + 2 * B + plan.steps + 1);
  plan.device = staging.to(input.device(), /*non_blocking=*/true);
  const int64_t* d = plan.device.const_data_ptr<int64_t>();
  plan.view.order = d;
  plan.view.len = d + B;
  plan.view.offset = d + 2 * B;
  plan.view.batch_size = d + 2 * B + plan.steps + 1;
  plan.view.B = B;
  plan.view.T = T;
  plan.view.steps = plan.steps;
  plan.view.rows = plan.rows;
  plan.view.batch_first = batch_first;
  return plan;
}

struct LayerWeights {
  int64_t D = 1, G = 1, H = 0, I = 0;
  bool has_bias = false;
  std::vector<Tensor> w_ih, w_hh, b_ih, b_hh;  // per direction, contiguous
};

LayerWeights unpack_weights(at::TensorList weights, bool bidirectional, Cell cell, const Tensor& input) {
  LayerWeights w;
  w.D = bidirectional ? 2 : 1;
  w.G = k::gates_of(cell);
  TORCH_CHECK_VALUE(weights.size() == static_cast<size_t>(2 * w.D) || weights.size() == static_cast<size_t>(4 * w.D),
                    "rnn_layer: weights must hold 2*D (no bias) or 4*D tensors for D = ", w.D, " directions, got ",
                    weights.size());
  w.has_bias = weights.size() == static_cast<size_t>(4 * w.D);
  const int64_t per_dir = w.has_bias ? 4 : 2;
  TORCH_CHECK_VALUE(weights[1].dim() == 2, "rnn_layer: w_hh must be 2-D [G*H, H], got ", weights[1].sizes());
  w.H = weights[1].size(1);
  TORCH_CHECK_VALUE(w.H > 0, "rnn_layer: the hidden size (w_hh.size(1)) must be positive");
  w.I = input.size(2);
  const int64_t GH = w.G * w.H;
  for (int64_t d = 0; d < w.D; ++d) {
    auto check = [&](const Tensor& t, at::IntArrayRef shape, const char* name) {
      TORCH_CHECK_VALUE(t.sizes() == shape, "rnn_layer: ", name, " of direction ", d, " must have shape ", shape,
                        ", got ", t.sizes());
      TORCH_CHECK_VALUE(t.scalar_type() == input.scalar_type(), "rnn_layer: ", name, " must have the input's dtype ",
                        input.scalar_type(), ", got ", t.scalar_type());
      TORCH_CHECK_VALUE(t.device() == input.device(), "rnn_layer: ", name, " must be on the input's device ",
                        input.device(), ", got ", t.device());
      return t.contiguous();
    };
    w.w_ih.push_back(check(weights[d * per_dir + 0], {GH, w.I}, "w_ih"));
    w.w_hh.push_back(check(weights[d * per_dir + 1], {GH, w.H}, "w_hh"));
    if (w.has_bias) {
      w.b_ih.push_back(check(weights[d * per_dir + 2], {GH}, "b_ih"));
      w.b_hh.push_back(check(weights[d * per_dir + 3], {GH}, "b_hh"));
    }
  }
  return w;
}

// A [D, B, H] state argument (hx, cx, grad_h_n, grad_c_n), contiguous in the input's dtype, or
// an undefined tensor when absent (None, or an empty tensor for the gradients).
Tensor state_arg(const c10::optional<Tensor>& given, const LayerWeights& w, int64_t B, const Tensor& input,
                 const char* name, bool convert) {
  if (!given.has_value() || !given->defined() || (convert && given->numel() == 0)) return Tensor();
  const Tensor& h = *given;
  TORCH_CHECK_VALUE(h.sizes() == at::IntArrayRef({w.D, B, w.H}), "rnn_layer: ", name, " must have shape [D, B, H] = [",
                    w.D, ", ", B, ", ", w.H, "], got ", h.sizes());
  TORCH_CHECK_VALUE(h.device() == input.device(), "rnn_layer: ", name, " must be on the input's device ",
                    input.device(), ", got ", h.device());
  if (convert) return h.to(input.scalar_type()).contiguous();
  TORCH_CHECK_VALUE(h.scalar_type() == input.scalar_type(), "rnn_layer: ", name, " must have the input's dtype ",
                    input.scalar_type(), ", got ", h.scalar_type());
  return h.contiguous();
}

// Input projection bias per direction: b_ih plus the b_hh entries that add to it unchanged (all
// for lstm / rnn; r and z for gru, whose n entries multiply by r and stay separate as b_hn).
// Returns bias_x [D*G*H] (undefined without biases) and b_hn [D, H] (gru with biases only).
std::pair<Tensor, Tensor> fold_biases(const LayerWeights& w, Cell cell) {
  if (!w.has_bias) return {Tensor(), Tensor()};
  std::vector<Tensor> bias_x, b_hn;
  for (int64_t d = 0; d < w.D; ++d) {
    if (cell == Cell::GRU) {
      Tensor folded = w.b_hh[d].clone();
      folded.narrow(0, 2 * w.H, w.H).zero_();
      bias_x.push_back(w.b_ih[d] + folded);
      b_hn.push_back(w.b_hh[d].narrow(0, 2 * w.H, w.H));
    } else {
      bias_x.push_back(w.b_ih[d] + w.b_hh[d]);
    }
  }
  return {at::cat(bias_x, 0), cell == Cell::GRU ? at::stack(b_hn, 0).contiguous() : Tensor()};
}

// The valid input rows in packed order, [rows, I] (a view of the input when already packed).
template <typename E>
Tensor packed_input_of(const Plan& plan, const Tensor& input, int64_t I) {
  const Tensor rows2d = input.view({plan.B * plan.T, I});
  if (plan.io_is_packed()) return rows2d;
  Tensor out = at::empty({plan.rows, I}, input.options());
  FASTNER_CUDA_CHECK((k::launch_copy_rows<E, true>(plan.view, I, ptr<const E>(rows2d), ptr<E>(out),
                                                   at::cuda::getCurrentCUDAStream())));
  return out;
}

// ---------------------------------------------------------------------------------------------
// The two directions' streams: direction 0 on the current stream, direction 1 on a pool stream
// that forks from it on construction and joins it on destruction.
// ---------------------------------------------------------------------------------------------

class DirectionStreams {
 public:
  explicit DirectionStreams(int64_t D) : main_(at::cuda::getCurrentCUDAStream()), streams_{main_} {
    if (D > 1) {
      streams_.push_back(at::cuda::getStreamFromPool(/*isHighPriority=*/false, main_.device_index()));
      at::cuda::CUDAEvent fork;
      fork.record(main_);
      fork.block(streams_[1]);
    }
  }
  ~DirectionStreams() {
    if (streams_.size() > 1) {
      try {
        at::cuda::CUDAEvent join;
        join.record(streams_[1]);
        join.block(main_);
      } catch (...) {
        // Only reachable after a CUDA error, which the failing call has already reported.
      }
    }
  }
  DirectionStreams(const DirectionStreams&) = delete;
  DirectionStreams& operator=(const DirectionStreams&) = delete;
  // Makes direction d's stream current for the guard's scope (launches only; no allocations).
  c10::cuda::CUDAStream stream(int64_t d) const { return streams_[d]; }

 private:
  c10::cuda::CUDAStream main_;
  std::vector<c10::cuda::CUDAStream> streams_;
};

// FASTNER_RNN_CUDA_PATH=persistent|stepwise forces the path of the forward and the backward
// (tests, benchmarks); unset or 'auto' applies use_persistent_forward / use_persistent_backward.
enum class PathChoice { Auto, Persistent, Stepwise };

PathChoice forced_path() {
  const char* value = std::getenv("FASTNER_RNN_CUDA_PATH");
  if (value == nullptr || value[0] == '\0' || std::strcmp(value, "auto") == 0) return PathChoice::Auto;
  if (std::strcmp(value, "persistent") == 0) return PathChoice::Persistent;
  if (std::strcmp(value, "stepwise") == 0) return PathChoice::Stepwise;
  TORCH_CHECK_VALUE(false, "FASTNER_RNN_CUDA_PATH must be 'auto', 'persistent' or 'stepwise', got '", value, "'");
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_impl(const Tensor& input_, const Tensor& lengths,
                                                        at::TensorList weights, const c10::optional<Tensor>& hx,
                                                        const c10::optional<Tensor>& cx, Cell cell, bool bidirectional,
                                                        bool batch_first, bool training) {
  using E = typename DeviceScalar<scalar_t>::type;
  using A = k::acc_t<E>;
  const Tensor input = input_.contiguous();
  const int64_t B = batch_first ? input.size(0) : input.size(1);
  const int64_t T = batch_first ? input.size(1) : input.size(0);
  const LayerWeights w = unpack_weights(weights, bidirectional, cell, input);
  const int64_t D = w.D, H = w.H, G = w.G, I = w.I, GH = G * H, DH = D * H;
  const bool lstm = cell == Cell::LSTM;
  const Tensor h0 = state_arg(hx, w, B, input, "hx", false);
  const Tensor c0 = lstm ? state_arg(cx, w, B, input, "cx", false) : Tensor();
  const Plan plan = make_plan(lengths, B, T, batch_first, input);
  const auto opts = input.options();
  const auto acc_opts = opts.dtype(acc_scalar_type<E>());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const auto out_shape = batch_first ? std::vector<int64_t>{B, T, DH} : std::vector<int64_t>{T, B, DH};
  Tensor output = plan.rows < B * T ? at::zeros(out_shape, opts) : at::empty(out_shape, opts);
  const int64_t W = k::workspace_width(cell) * H;
  Tensor workspace = training ? at::empty({D, B * T, W}, opts) : at::empty({0}, opts);
  // Final states, preset to the initial ones: a length-0 sequence keeps its initial state; every
  // other sequence's entries are overwritten at its last step.
  Tensor h_n = h0.defined() ? h0.clone() : at::zeros({D, B, H}, opts);
  Tensor c_n = lstm ? (c0.defined() ? c0.clone() : at::zeros({D, B, H}, opts)) : at::empty({0}, opts);
  if (plan.rows == 0) return {output, h_n, c_n, workspace};

  // Projected input of every valid (slot, time), all gates of both directions, biases folded:
  // xproj [rows, D*G*H], direction d in columns [d*G*H, (d+1)*G*H). One GEMM.
  const Tensor packed_input = packed_input_of<E>(plan, input, I);
  const Tensor w_ih_cat = D == 1 ? w.w_ih[0] : at::cat({w.w_ih[0], w.w_ih[1]}, 0);  // [D*G*H, I]
  const auto [bias_x, b_hn] = fold_biases(w, cell);
  const Tensor xproj = bias_x.defined() ? at::addmm(bias_x, packed_input, w_ih_cat.t())
                                        : at::mm(packed_input, w_ih_cat.t());

  // Recurrent state in slot order: h [D, 2, B, H] (parity 0 = h0; the persistent kernel
  // alternates parities, the step-wise path updates parity 0 in place); c [D, B, H] in A.
  Tensor h_state = at::empty({D, 2, B, H}, opts);
  for (int64_t d = 0; d < D; ++d) {
    FASTNER_CUDA_CHECK((k::launch_gather_state<E, E>(plan.view.order, 1, B, H,
                                                     h0.defined() ? ptr<const E>(h0) + d * B * H : nullptr,
                                                     ptr<E>(h_state) + d * 2 * B * H, stream)));
  }
  Tensor c_state = lstm ? at::empty({D, B, H}, acc_opts) : Tensor();
  if (lstm) {
    FASTNER_CUDA_CHECK((k::launch_gather_state<E, A>(plan.view.order, D, B, H, ptr<const E>(c0), ptr<A>(c_state),
                                                     stream)));
  }

  const PathChoice choice = forced_path();
  bool done = false;
  if (choice == PathChoice::Persistent ||
      (choice == PathChoice::Auto && k::use_persistent_forward(B, H, training))) {
    const Tensor w_hh_cat = D == 1 ? w.w_hh[0] : at::cat({w.w_hh[0], w.w_hh[1]}, 0);  // [D*G*H, H]
    k::PersistentArgs<E> args;
    args.plan = plan.view;
    args.D = D;
    args.H = H;
    args.xproj = ptr<const E>(xproj);
    args.w_hh = ptr<const E>(w_hh_cat);
    args.b_hn = ptr<const E>(b_hn);
    args.h_state = ptr<E>(h_state);
    args.c_state = ptr<A>(c_state);
    args.output = ptr<E>(output);
    args.h_n = ptr<E>(h_n);
    args.c_n = ptr<E>(c_n);
    args.ws = ptr<E>(workspace);
    FASTNER_CUDA_CHECK(k::launch_persistent_forward<E>(cell, args, input.get_device(), stream, &done));
    // w_hh_cat is freed on return: its block is reused only by later work on this stream.
  }
  if (!done) {
    Tensor hg = at::empty({D, B, GH}, acc_opts);  // per direction: h[:nb] @ W_hh^T of the step
    DirectionStreams streams(D);
    std::vector<k::ForwardStepArgs<E>> args(D);
    for (int64_t d = 0; d < D; ++d) {
      k::ForwardStepArgs<E>& a = args[d];
      a.plan = plan.view;
      a.dir = d;
      a.D = D;
      a.H = H;
      a.xproj = ptr<const E>(xproj) + d * GH;
      a.hg = ptr<const A>(hg) + d * B * GH;
      a.b_hn = b_hn.defined() ? ptr<const E>(b_hn) + d * H : nullptr;
      a.h = ptr<E>(h_state) + d * 2 * B * H;
      a.c = lstm ? ptr<A>(c_state) + d * B * H : nullptr;
      a.output = ptr<E>(output) + d * H;
      a.h_n = ptr<E>(h_n) + d * B * H;
      a.c_n = lstm ? ptr<E>(c_n) + d * B * H : nullptr;
      a.ws = training ? ptr<E>(workspace) + d * (B * T) * W : nullptr;
    }
    // Steps outermost so that the two streams receive their work interleaved and overlap.
    for (int64_t s = 0; s < plan.steps; ++s) {
      const int64_t nb = plan.batch_size[s];
      for (int64_t d = 0; d < D; ++d) {
        const c10::cuda::CUDAStreamGuard guard(streams.stream(d));
        gemm<E, A>(false, true, nb, GH, H, args[d].h, H, ptr<const E>(w.w_hh[d]), H, false,
                   ptr<A>(hg) + d * B * GH, GH);
        FASTNER_CUDA_CHECK(k::launch_forward_step<E>(cell, args[d], s, nb, streams.stream(d).stream()));
      }
    }
  }
  return {output, h_n, c_n, workspace};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> rnn_layer_forward(const Tensor& input, const Tensor& lengths,
                                                             at::TensorList weights, const c10::optional<Tensor>& hx,
                                                             const c10::optional<Tensor>& cx, c10::string_view mode,
                                                             bool bidirectional, bool batch_first, bool training) {
  check_input(input);
  const Cell cell = parse_mode(mode);
  const c10::cuda::CUDAGuard device_guard(input.device());
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "rnn_layer_forward", [&] {
    return forward_impl<scalar_t>(input, lengths, weights, hx, cx, cell, bidirectional, batch_first, training);
  });
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> backward_impl(
    const Tensor& grad_output_, const Tensor& grad_h_n_, const Tensor& grad_c_n_, const Tensor& input_,
    const Tensor& lengths, at::TensorList weights, const c10::optional<Tensor>& hx, const c10::optional<Tensor>& cx,
    const Tensor& workspace_, Cell cell, bool bidirectional, bool batch_first) {
  using E = typename DeviceScalar<scalar_t>::type;
  using A = k::acc_t<E>;
  const Tensor input = input_.contiguous();
  const int64_t B = batch_first ? input.size(0) : input.size(1);
  const int64_t T = batch_first ? input.size(1) : input.size(0);
  const LayerWeights w = unpack_weights(weights, bidirectional, cell, input);
  const int64_t D = w.D, H = w.H, G = w.G, I = w.I, GH = G * H, DH = D * H, DGH = D * GH;
  const bool lstm = cell == Cell::LSTM, gru = cell == Cell::GRU;
  const int64_t W = k::workspace_width(cell) * H;
  TORCH_CHECK_VALUE(workspace_.sizes() == at::IntArrayRef({D, B * T, W}) &&
                        workspace_.scalar_type() == input.scalar_type() && workspace_.device() == input.device(),
                    "rnn_layer_backward: workspace must come from rnn_layer_forward(training=True) of the same call "
                    "(expected [D, B*T, W] = [", D, ", ", B * T, ", ", W, "] of the input's dtype and device, got ",
                    workspace_.sizes(), ")");
  const auto out_shape = batch_first ? std::vector<int64_t>{B, T, DH} : std::vector<int64_t>{T, B, DH};
  TORCH_CHECK_VALUE(grad_output_.sizes() == at::IntArrayRef(out_shape) && grad_output_.device() == input.device(),
                    "rnn_layer_backward: grad_output must have the output's shape ", at::IntArrayRef(out_shape),
                    " on the input's device, got ", grad_output_.sizes());
  const Tensor workspace = workspace_.contiguous();
  const Tensor grad_output = grad_output_.to(input.scalar_type()).contiguous();
  const Tensor h0 = state_arg(hx, w, B, input, "hx", false);
  const Tensor c0 = lstm ? state_arg(cx, w, B, input, "cx", false) : Tensor();
  const Tensor grad_h_n = state_arg(grad_h_n_, w, B, input, "grad_h_n", true);
  const Tensor grad_c_n = lstm ? state_arg(grad_c_n_, w, B, input, "grad_c_n", true) : Tensor();
  const Plan plan = make_plan(lengths, B, T, batch_first, input);
  const auto opts = input.options();
  const auto acc_opts = opts.dtype(acc_scalar_type<E>());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t rows = plan.rows;

  // Slot-order state: dh, dc [D, B, H] in A (preset to grad_h_n / grad_c_n), h0 [D, B, H] in E,
  // c0 [D, B, H] in A (zeros where absent).
  Tensor dh = at::empty({D, B, H}, acc_opts);
  FASTNER_CUDA_CHECK((k::launch_gather_state<E, A>(plan.view.order, D, B, H, ptr<const E>(grad_h_n), ptr<A>(dh), stream)));
  Tensor dc = lstm ? at::empty({D, B, H}, acc_opts) : Tensor();
  Tensor h0_slots = at::empty({D, B, H}, opts);
  FASTNER_CUDA_CHECK((k::launch_gather_state<E, E>(plan.view.order, D, B, H, ptr<const E>(h0), ptr<E>(h0_slots), stream)));
  Tensor c0_slots = lstm ? at::empty({D, B, H}, acc_opts) : Tensor();
  if (lstm) {
    FASTNER_CUDA_CHECK((k::launch_gather_state<E, A>(plan.view.order, D, B, H, ptr<const E>(grad_c_n), ptr<A>(dc), stream)));
    FASTNER_CUDA_CHECK((k::launch_gather_state<E, A>(plan.view.order, D, B, H, ptr<const E>(c0), ptr<A>(c0_slots), stream)));
  }

  // Everything the per-direction chains write, allocated before the fork (see the file comment).
  const Tensor packed_input = packed_input_of<E>(plan, input, I);
  Tensor gx = at::empty({rows, DGH}, opts);                           // projected-input gradients
  Tensor gh_rows = gru ? at::empty({D, rows, GH}, opts) : Tensor();   // gru: W_hh-side gradients
  Tensor gh_step = at::empty({D, B, GH}, opts);                       // per step GEMM operand
  Tensor h_prev = at::empty({D, rows, H}, opts);                      // dW_hh's other operand
  const int64_t per_dir = w.has_bias ? 4 : 2;
  std::vector<Tensor> grad_weights(weights.size());
  for (int64_t d = 0; d < D; ++d) {
    grad_weights[d * per_dir + 0] = at::empty({GH, I}, opts);
    grad_weights[d * per_dir + 1] = at::empty({GH, H}, opts);
  }

  // The persistent kernel (small batches) runs every step of both directions on the current
  // stream before the fork; otherwise the step loop below does.
  const PathChoice choice = forced_path();
  bool persistent_done = false;
  if (choice == PathChoice::Persistent || (choice == PathChoice::Auto && k::use_persistent_backward(B, H))) {
    const Tensor w_hh_cat = D == 1 ? w.w_hh[0] : at::cat({w.w_hh[0], w.w_hh[1]}, 0);  // [D*G*H, H]
    Tensor gh_state = at::empty({D, 2, B, GH}, opts);
    k::PersistentBackwardArgs<E> args;
    args.plan = plan.view;
    args.D = D;
    args.H = H;
    args.w_hh = ptr<const E>(w_hh_cat);
    args.grad_output = ptr<const E>(grad_output);
    args.ws = ptr<const E>(workspace);
    args.h0 = ptr<const E>(h0_slots);
    args.c0 = ptr<const A>(c0_slots);
    args.dh = ptr<A>(dh);
    args.dc = ptr<A>(dc);
    args.gx = ptr<E>(gx);
    args.gh_rows = ptr<E>(gh_rows);
    args.gh_state = ptr<E>(gh_state);
    FASTNER_CUDA_CHECK(k::launch_persistent_backward<E>(cell, args, input.get_device(), stream, &persistent_done));
    // w_hh_cat and gh_state are freed on return: their blocks are reused only by later work on
    // this stream, which the side stream's fork below also follows.
  }

  {
    DirectionStreams streams(D);
    std::vector<k::BackwardStepArgs<E>> args(D);
    for (int64_t d = 0; d < D; ++d) {
      k::BackwardStepArgs<E>& a = args[d];
      a.plan = plan.view;
      a.dir = d;
      a.D = D;
      a.H = H;
      a.grad_output = ptr<const E>(grad_output) + d * H;
      a.ws = ptr<const E>(workspace) + d * (B * T) * W;
      a.h0 = ptr<const E>(h0_slots) + d * B * H;
      a.c0 = lstm ? ptr<const A>(c0_slots) + d * B * H : nullptr;
      a.dh = ptr<A>(dh) + d * B * H;
      a.dc = lstm ? ptr<A>(dc) + d * B * H : nullptr;
      a.gx = ptr<E>(gx) + d * GH;
      a.gh_rows = gru ? ptr<E>(gh_rows) + d * rows * GH : nullptr;
      a.gh_step = ptr<E>(gh_step) + d * B * GH;
    }
    for (int64_t s = persistent_done ? -1 : plan.steps - 1; s >= 0; --s) {
      const int64_t nb = plan.batch_size[s];
      for (int64_t d = 0; d < D; ++d) {
        const c10::cuda::CUDAStreamGuard guard(streams.stream(d));
        FASTNER_CUDA_CHECK(k::launch_backward_step<E>(cell, args[d], s, nb, streams.stream(d).stream()));
        // d h_prev[:nb] = gates' gradient @ W_hh (+ gru's z * dh, which the kernel left in dh).
        gemm<E, A>(false, false, nb, H, GH, args[d].gh_step, GH, ptr<const E>(w.w_hh[d]), H, gru, args[d].dh, H);
      }
    }
    for (int64_t d = 0; d < D; ++d) {
      const c10::cuda::CUDAStreamGuard guard(streams.stream(d));
      E* hp = ptr<E>(h_prev) + d * rows * H;
      FASTNER_CUDA_CHECK(k::launch_previous_h<E>(cell, plan.view, d, H, args[d].ws, args[d].h0, hp,
                                                 streams.stream(d).stream()));
      // dW_hh [G*H, H] = gh^T [G*H, rows] @ h_prev [rows, H]; dW_ih [G*H, I] = gx^T @ input.
      const E* gh = gru ? args[d].gh_rows : args[d].gx;
      gemm<E, E>(true, false, GH, H, rows, gh, gru ? GH : DGH, hp, H, false, ptr<E>(grad_weights[d * per_dir + 1]), H);
      gemm<E, E>(true, false, GH, I, rows, args[d].gx, DGH, ptr<const E>(packed_input), I, false,
                 ptr<E>(grad_weights[d * per_dir + 0]), I);
    }
  }  // join: the current stream now follows both directions

  if (w.has_bias) {
    for (int64_t d = 0; d < D; ++d) {
      Tensor db_ih = gx.narrow(1, d * GH, GH).sum(0);
      grad_weights[d * per_dir + 3] = gru ? gh_rows[d].sum(0) : db_ih.clone();
      grad_weights[d * per_dir + 2] = db_ih;
    }
  }
  // Input gradient: both directions summed by one GEMM over K = D*G*H, packed rows, then back to
  // the input's layout with zeros on padding.
  const Tensor w_ih_cat = D == 1 ? w.w_ih[0] : at::cat({w.w_ih[0], w.w_ih[1]}, 0);  // [D*G*H, I]
  Tensor grad_input;
  if (plan.io_is_packed()) {
    grad_input = at::empty(input.sizes(), opts);
    gemm<E, E>(false, false, rows, I, DGH, ptr<const E>(gx), DGH, ptr<const E>(w_ih_cat), I, false,
               ptr<E>(grad_input), I);
  } else {
    grad_input = at::zeros(input.sizes(), opts);
    Tensor grad_packed = at::empty({rows, I}, opts);
    gemm<E, E>(false, false, rows, I, DGH, ptr<const E>(gx), DGH, ptr<const E>(w_ih_cat), I, false,
               ptr<E>(grad_packed), I);
    FASTNER_CUDA_CHECK((k::launch_copy_rows<E, false>(plan.view, I, ptr<const E>(grad_packed), ptr<E>(grad_input),
                                                      stream)));
  }
  Tensor grad_hx = at::empty({D, B, H}, opts);
  FASTNER_CUDA_CHECK((k::launch_scatter_state<A, E>(plan.view.order, D, B, H, ptr<const A>(dh), ptr<E>(grad_hx), stream)));
  Tensor grad_cx = at::empty({0}, opts);
  if (lstm) {
    grad_cx = at::empty({D, B, H}, opts);
    FASTNER_CUDA_CHECK((k::launch_scatter_state<A, E>(plan.view.order, D, B, H, ptr<const A>(dc), ptr<E>(grad_cx), stream)));
  }
  return {grad_input, grad_hx, grad_cx, grad_weights};
}

std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> rnn_layer_backward(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& input, const Tensor& lengths,
    at::TensorList weights, const c10::optional<Tensor>& hx, const c10::optional<Tensor>& cx, const Tensor& workspace,
    c10::string_view mode, bool bidirectional, bool batch_first) {
  check_input(input);
  const Cell cell = parse_mode(mode);
  const c10::cuda::CUDAGuard device_guard(input.device());
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "rnn_layer_backward", [&] {
    return backward_impl<scalar_t>(grad_output, grad_h_n, grad_c_n, input, lengths, weights, hx, cx, workspace, cell,
                                   bidirectional, batch_first);
  });
}

// ---------------------------------------------------------------------------------------------
// Autocast: the layer runs in the autocast dtype (like cuDNN's RNN, which autocast lists as a
// lower-precision op). Float tensors are cast (weights through autocast's cache), float64 ones
// are left alone; then the call goes on below the autocast key (autograd, then CUDA). The
// backward op needs no autocast kernel: it receives the forward's saved low-precision tensors.
// ---------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor> rnn_layer_forward_autocast(
    const Tensor& input, const Tensor& lengths, at::TensorList weights, const c10::optional<Tensor>& hx,
    const c10::optional<Tensor>& cx, c10::string_view mode, bool bidirectional, bool batch_first, bool training) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(at::kCUDA);
  auto cast = [&](const Tensor& t) { return at::autocast::cached_cast(dtype, t, c10::DeviceType::CUDA); };
  auto cast_optional = [&](const c10::optional<Tensor>& t) -> c10::optional<Tensor> {
    if (!t.has_value() || !t->defined()) return t;
    return cast(*t);
  };
  std::vector<Tensor> cast_weights;
  cast_weights.reserve(weights.size());
  for (const Tensor& t : weights) cast_weights.push_back(cast(t));
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastner::rnn_layer_forward", "")
                       .typed<decltype(rnn_layer_forward)>();
  return op.call(cast(input), lengths, cast_weights, cast_optional(hx), cast_optional(cx), mode, bidirectional,
                 batch_first, training);
}

}  // namespace
}  // namespace fastner::cuda::rnn

TORCH_LIBRARY_IMPL(fastner, CUDA, m) {
  m.impl("rnn_layer_forward", &fastner::cuda::rnn::rnn_layer_forward);
  m.impl("rnn_layer_backward", &fastner::cuda::rnn::rnn_layer_backward);
}

TORCH_LIBRARY_IMPL(fastner, AutocastCUDA, m) {
  m.impl("rnn_layer_forward", &fastner::cuda::rnn::rnn_layer_forward_autocast);
}
