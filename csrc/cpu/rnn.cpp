// CPU kernels of fastner::rnn_layer_forward / rnn_layer_backward: one LSTM / GRU / RNN layer,
// both directions, variable lengths without work on padding. Schemas: csrc/fastner.cpp.
//
// Files: the products are in rnn_gemm.h (+ rnn_gemm.cpp, rnn_gemm_avx2.h, rnn_gemm_avx512_bf16.h), the cell
// nonlinearities in rnn_math.h and the fused cell passes in rnn_cells.inc. This file is the
// layer loop: the plan of steps and slots, the forward and the backward. They stay in one
// translation unit because both walk the same Plan, weights, state reorders and cell-pass
// table, which live in an anonymous namespace (no symbols shared with the rest of the
// library, inlined where hot); splitting forward from backward would turn those ~250 lines
// into an internal header for two includers and gain no separation of roles.
//
// Layout. The batch is reordered once by decreasing length (slot j holds original sequence
// order[j]), so at every step the sequences still running are a prefix of the slots, in both
// directions: at step s the forward direction is at time s and the reverse direction at time
// len[j] - 1 - s, and both run exactly the slots with len[j] > s. Per-(sequence, step) data of
// a direction (its gathered input, projected input, workspace, gate gradients) lives in "step
// rows": row offset[s] + j holds slot j at step s (PackedSequence order for the forward
// direction), so each step reads and writes one contiguous block of rows. When every sequence
// has the same length (padded input without lengths=) the reverse direction's step s uses the
// block of time len - 1 - s instead, so both directions' step rows are time-major rows: the
// input's own rows when it is time-major, with no gather.
//
// Forward, per layer and direction: GEMMs project the valid input rows for all gates, a chunk
// of ~256 step rows (64 on AMX tiles: kTileChunkRows) at a time just before those steps run (so
// the projected rows stay in L2 until the gate pass reads them; the int8 op reads the input's
// rows where they lie, the float GEMMs a gathered copy in step order); then per step one GEMM [active, H] x [H, G*H] on the running prefix (accumulated straight
// into the step's block of projected rows where the cell allows it) and one fused pass for the
// gate nonlinearities and the state update, which writes h straight into the output.
// Backward: per step one fused pass computing the gate gradients and one GEMM carrying the
// gradient to the previous h; then dW_ih, dW_hh, the biases and the input gradient as single
// GEMMs over all packed rows (the weight gradients as one [I + H, G*H] product where the cell
// allows it, on the inputs and previous states the forward left in the workspace). The two directions run concurrently (one per core, each GEMM
// single-threaded): two independent sequential chains use 2 cores better than threading a
// GEMM of 32 rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <string>
#include <vector>

#include "cpu/rnn_gemm.h"
#include "cpu/rnn_int8.h"
#include "cpu/rnn_int8_amx.h"
#include "cpu/rnn_math.h"
#include "rnn_layout.h"
#include "checks.h"

namespace fastner::cpu::rnn {
namespace {

using at::Tensor;

enum class Cell { LSTM = rnn_layout::kLstm, GRU = rnn_layout::kGru, RNN_TANH = rnn_layout::kRnnTanh,
                  RNN_RELU = rnn_layout::kRnnRelu };

Cell parse_mode(const std::string& mode) {
  const int cell = rnn_layout::cell_of(mode.data(), mode.size());
  TORCH_CHECK_VALUE(cell >= 0, "rnn_layer: mode must be 'lstm', 'gru', 'rnn_tanh' or 'rnn_relu', got '", mode, "'");
  return static_cast<Cell>(cell);
}

int64_t gates_of(Cell cell) { return cell == Cell::LSTM ? 4 : cell == Cell::GRU ? 3 : 1; }

// Workspace row (training only; one per step row and direction): csrc/rnn_layout.h. The
// weight gradients [dW_ih | dW_hh]^T = [x | h_prev]^T @ (gate gradients) are one GEMM over all
// rows with no copy.
int64_t workspace_gate_width(Cell cell) { return rnn_layout::cpu_gate_columns(static_cast<int>(cell)); }
int64_t workspace_width(Cell cell, int64_t H, int64_t I) {
  return rnn_layout::cpu_workspace_width(static_cast<int>(cell), H, I);
}

// The batch reordered by decreasing length, and where each (slot, time) lives.
struct Plan : rnn_layout::Schedule {
  int64_t B = 0, T = 0;
  bool batch_first = true;
  bool uniform = false;             // every length equals steps (order is then the identity)

  // First step row of direction d's step s (see Layout above).
  int64_t block(int64_t d, int64_t s) const { return d == 1 && uniform ? offset[steps - 1 - s] : offset[s]; }
  int64_t step_row(int64_t d, int64_t j, int64_t s) const { return block(d, s) + j; }
  // Row of (slot j, time t) in the [B, T, *] or [T, B, *] input/output viewed as 2-D.
  int64_t io_row(int64_t j, int64_t t) const { return batch_first ? order[j] * T + t : t * B + order[j]; }
  // Element offset of that row in a 3-D tensor with strides s0, s1 (its first two dims).
  int64_t io_offset(int64_t j, int64_t t, int64_t s0, int64_t s1) const {
    return batch_first ? order[j] * s0 + t * s1 : t * s0 + order[j] * s1;
  }
  // Both directions' step rows are the input's own first rows (time-major, uniform lengths).
  bool io_is_step_order() const { return !batch_first && uniform; }
};

// lengths: int64 [B] on the CPU (the input's device), each in [0, T].
Plan make_plan(const Tensor& lengths, int64_t B, int64_t T, bool batch_first) {
  checks::lengths_shape("rnn_layer", lengths, B);
  checks::on_device("rnn_layer", "lengths", lengths, at::kCPU, "the input's");
  const Tensor lens = checks::lengths_in_range("rnn_layer", lengths, T);  // held: `l` points into it
  Plan plan;
  static_cast<rnn_layout::Schedule&>(plan) = rnn_layout::schedule_by_length(lens.const_data_ptr<int64_t>(), B);
  plan.B = B;
  plan.T = T;
  plan.batch_first = batch_first;
  plan.uniform = plan.rows == B * plan.steps;
  return plan;
}

// Time of slot j at step s of direction dir.
inline int64_t time_at(const Plan& plan, int64_t dir, int64_t j, int64_t s) {
  return dir == 0 ? s : plan.len[j] - 1 - s;
}

// Copies the input rows direction dir reads into its step rows: dst [rows, I] with leading
// dimension ldd. Called inside a direction's task: single-threaded.
template <typename T>
void gather_steps(const Plan& plan, const T* input2d, int64_t I, int64_t dir, T* dst, int64_t ldd) {
  for (int64_t s = 0; s < plan.steps; ++s)
    for (int64_t j = 0; j < plan.batch_size[s]; ++j)
      std::copy_n(input2d + plan.io_row(j, time_at(plan, dir, j, s)) * I, I, dst + plan.step_row(dir, j, s) * ldd);
}

// Zeros part `part` of `parts` of the rows past each sequence's length ([*, width] rows):
// consecutive runs of rows in memory order, about equal in count.
template <typename T>
void zero_padding_part(const Plan& plan, T* out, int64_t width, int64_t part, int64_t parts) {
  std::vector<int64_t> rows;  // io rows of the padding, ascending
  rows.reserve(plan.B * plan.T - plan.rows);
  for (int64_t j = 0; j < plan.B; ++j)
    for (int64_t t = plan.len[j]; t < plan.T; ++t) rows.push_back(plan.io_row(j, t));
  std::sort(rows.begin(), rows.end());
  const size_t n = rows.size(), begin = n * part / parts, end = n * (part + 1) / parts;
  for (size_t r = begin; r < end; ++r) std::fill_n(out + rows[r] * width, width, T(0));
}

// dst[c, r] = src[r, c]: a [rows, cols] matrix (leading dimension lds) into [cols, rows]
// (leading dimension ldd), in 16 x 16 tiles that stay in L1 (ATen's strided copy took ~5x as
// long for the weight gradients here).
template <typename T>
void transpose(const T* src, int64_t rows, int64_t cols, int64_t lds, T* dst, int64_t ldd) {
  constexpr int64_t kTile = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
    const int64_t r1 = std::min(rows, r0 + kTile);
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int64_t c1 = std::min(cols, c0 + kTile);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * ldd + r] = src[r * lds + c];
    }
  }
}

// Step rows projected per GEMM in the forward (see Forward above). A [256, 4H] chunk is 0.8 MB
// at H = 200, which with the packed W_hh leaves L2 (2 MB here) room; GEMMs of 256 rows run at
// the rate of the single whole-layer GEMM.
constexpr int64_t kChunkRows = 256;
// The same where the products run on AMX tiles (int8 and bf16 on Intel since Sapphire Rapids):
// there chunks of 64 rows made the int8 LSTM at the tagger shape (B=32, H=200, CoNLL lengths)
// 8% faster and the bf16 one 17% (Intel Emerald Rapids, 1 thread, paired in-process A/B); the
// tile kernels' dequantizing / converting stores into a 0.8 MB buffer stalled on its writes.
// Elsewhere (MKL fp32, AVX-512 BF16 and VNNI, AVX2 int8) 64 and 256 measured the same (+-2%)
// on that CPU, so the rows chosen for MKL on other CPUs stay.
constexpr int64_t kTileChunkRows = 64;

// A per-thread scratch buffer of at least n elements, kept across calls (reallocating it per
// call costs page faults on every layer call). Valid until the thread's next call.
template <typename T>
T* thread_buffer(int64_t n) {
  thread_local std::vector<T> buffer;
  if (buffer.size() < static_cast<size_t>(n)) buffer.resize(n);
  return buffer.data();
}

struct LayerWeights {
  int64_t D = 1, G = 1, H = 0, I = 0;
  bool has_bias = false;
  std::vector<Tensor> w_ih, w_hh, b_ih, b_hh;  // per direction, contiguous
};

// w_ih / w_hh must have weight_dtype (the input's for the float op, or bfloat16 for the bf16
// layers: see weight_dtype_of; int8 for the int8 op); the biases the input's dtype.
LayerWeights unpack_weights(at::TensorList weights, bool bidirectional, Cell cell, const Tensor& input,
                            at::ScalarType weight_dtype) {
  LayerWeights w;
  w.D = bidirectional ? 2 : 1;
  w.G = gates_of(cell);
  TORCH_CHECK_VALUE(weights.size() == static_cast<size_t>(2 * w.D) || weights.size() == static_cast<size_t>(4 * w.D),
                    "rnn_layer: weights must hold 2*D (no bias) or 4*D tensors for D = ", w.D, " directions, got ",
                    weights.size());
  w.has_bias = weights.size() == static_cast<size_t>(4 * w.D);
  const int64_t per_dir = w.has_bias ? 4 : 2;
  TORCH_CHECK_VALUE(weights[1].dim() == 2, "rnn_layer: w_hh must be 2-D [G*H, H], got ", weights[1].sizes());
  w.H = weights[1].size(1);
  w.I = input.size(2);
  const int64_t GH = w.G * w.H;
  for (int64_t d = 0; d < w.D; ++d) {
    auto check = [&](const Tensor& t, at::IntArrayRef shape, const char* name, at::ScalarType dtype) {
      TORCH_CHECK_VALUE(t.sizes() == shape, "rnn_layer: ", name, " of direction ", d, " must have shape ", shape,
                        ", got ", t.sizes());
      TORCH_CHECK_VALUE(t.scalar_type() == dtype, "rnn_layer: ", name, " must have dtype ", dtype, ", got ",
                        t.scalar_type());
      TORCH_CHECK_VALUE(t.device() == input.device(), "rnn_layer: ", name, " must be on the input's device ",
                        input.device(), ", got ", t.device());
      return t.contiguous();
    };
    w.w_ih.push_back(check(weights[d * per_dir + 0], {GH, w.I}, "w_ih", weight_dtype));
    w.w_hh.push_back(check(weights[d * per_dir + 1], {GH, w.H}, "w_hh", weight_dtype));
    if (w.has_bias) {
      w.b_ih.push_back(check(weights[d * per_dir + 2], {GH}, "b_ih", input.scalar_type()));
      w.b_hh.push_back(check(weights[d * per_dir + 3], {GH}, "b_hh", input.scalar_type()));
    }
  }
  return w;
}

// The dtype of w_ih / w_hh: the input's, or bfloat16 (the bf16 layers of fastner.nn.rnn_bf16:
// weights rounded to bf16 once, each product's x or h operand rounded to bf16 on the fly, float32
// sums, gates and states: rnn_gemm_avx512_bf16.h), which only the float32 inference forward takes.
at::ScalarType weight_dtype_of(at::TensorList weights, const Tensor& input, bool training) {
  if (weights.empty() || weights[0].scalar_type() != at::kBFloat16) return input.scalar_type();
  TORCH_CHECK_VALUE(input.scalar_type() == at::kFloat, "rnn_layer: bfloat16 weights need float32 input, got ",
                    input.scalar_type());
  TORCH_CHECK_VALUE(!training, "rnn_layer: bfloat16 weights are for inference only (training=False); "
                    "train in float32 and convert the weights afterwards");
  return at::kBFloat16;
}

// The initial state of every slot, [D, B, H] in slot order (zeros when not given).
template <typename T>
Tensor initial_state(const c10::optional<Tensor>& given, const Plan& plan, const LayerWeights& w, const Tensor& input,
                     const char* name) {
  Tensor out = at::zeros({w.D, plan.B, w.H}, input.options());
  if (!given.has_value() || !given->defined()) return out;
  const Tensor& h = *given;
  TORCH_CHECK_VALUE(h.sizes() == at::IntArrayRef({w.D, plan.B, w.H}), "rnn_layer: ", name, " must have shape [D, B, H] = [",
                    w.D, ", ", plan.B, ", ", w.H, "], got ", h.sizes());
  TORCH_CHECK_VALUE(h.scalar_type() == input.scalar_type() && h.device() == input.device(), "rnn_layer: ", name,
                    " must have the input's dtype and device");
  const Tensor hc = h.contiguous();
  const T* src = hc.const_data_ptr<T>();
  T* dst = out.data_ptr<T>();
  for (int64_t d = 0; d < w.D; ++d)
    for (int64_t j = 0; j < plan.B; ++j)
      std::copy_n(src + (d * plan.B + plan.order[j]) * w.H, w.H, dst + (d * plan.B + j) * w.H);
  return out;
}

// Slot-order [D, B, H] state back to batch order.
template <typename T>
Tensor unsort_state(const Tensor& slots, const Plan& plan) {
  const int64_t D = slots.size(0), H = slots.size(2);
  Tensor out = at::empty_like(slots);
  const T* src = slots.const_data_ptr<T>();
  T* dst = out.data_ptr<T>();
  for (int64_t d = 0; d < D; ++d)
    for (int64_t j = 0; j < plan.B; ++j)
      std::copy_n(src + (d * plan.B + j) * H, H, dst + (d * plan.B + plan.order[j]) * H);
  return out;
}

// Per direction [G*H] bias added to the projected input (b_ih, plus the b_hh entries that add
// to it unchanged: all of them for lstm/rnn, r and z for gru), and gru's b_hn [H].
template <typename T>
void fold_biases(const LayerWeights& w, Cell cell, int64_t d, std::vector<T>& bias_x, std::vector<T>& bias_hn) {
  const int64_t GH = w.G * w.H;
  bias_x.assign(GH, T(0));
  bias_hn.assign(w.H, T(0));
  if (!w.has_bias) return;
  const T* bi = w.b_ih[d].const_data_ptr<T>();
  const T* bh = w.b_hh[d].const_data_ptr<T>();
  const int64_t folded = cell == Cell::GRU ? 2 * w.H : GH;
  for (int64_t k = 0; k < GH; ++k) bias_x[k] = bi[k] + (k < folded ? bh[k] : T(0));
  if (cell == Cell::GRU)
    for (int64_t k = 0; k < w.H; ++k) bias_hn[k] = bh[2 * w.H + k];
}

// ---------------------------------------------------------------------------------------------
// Fused cell passes: forward ones update one slot's state for one step, backward ones compute
// its gate gradients (see rnn_cells.inc for the arguments). One set per instruction set.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct CellKernels {
  void (*lstm)(int64_t H, const T* xg, const T* bx, T* h, T* c, T* out, T* ws, T* h_next);
  void (*gru)(int64_t H, const T* xg, const T* bx, const T* hg, const T* bhn, T* h, T* out, T* ws, T* h_next);
  void (*rnn_tanh)(int64_t H, const T* xg, const T* bx, T* h, T* out, T* ws, T* h_next);
  void (*rnn_relu)(int64_t H, const T* xg, const T* bx, T* h, T* out, T* ws, T* h_next);
  void (*lstm_backward)(int64_t H, const T* ws, const T* c_prev, T* dh, T* dc, T* gx, T* db_x);
  void (*gru_backward)(int64_t H, const T* ws, const T* h_prev, T* dh, T* gx, T* gh, T* db_x, T* db_h);
  void (*rnn_tanh_backward)(int64_t H, const T* ws, T* dh, T* gx, T* db_x);
  void (*rnn_relu_backward)(int64_t H, const T* ws, T* dh, T* gx, T* db_x);
};

namespace cells_avx2 {
#define FASTNER_RNN_CELLS_WIDE16 0
#include "cpu/rnn_cells.inc"
#undef FASTNER_RNN_CELLS_WIDE16
}  // namespace cells_avx2

#ifdef FASTNER_RNN_AVX512
#pragma GCC push_options
#pragma GCC diagnostic push
// GCC 12 reports its own _mm512_undefined_ps() idiom as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f")
namespace cells_avx512 {
#define FASTNER_RNN_CELLS_WIDE16 1
#include "cpu/rnn_cells.inc"
#undef FASTNER_RNN_CELLS_WIDE16
}  // namespace cells_avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

// The cell passes for this CPU: 16-float AVX-512 ones where it has AVX-512 (the gate pass is
// ~15-25% of a layer call at the tagger shape; twice the width halves it), else AVX2 ones.
template <typename T>
const CellKernels<T>& cell_kernels() {
#ifdef FASTNER_RNN_AVX512
  static const CellKernels<T> chosen = cpu_has_avx512() ? cells_avx512::kernels<T>() : cells_avx2::kernels<T>();
#else
  static const CellKernels<T> chosen = cells_avx2::kernels<T>();
#endif
  return chosen;
}
// Runs fn(d) for every direction: concurrently when there are two (one per thread).
template <typename Fn>
void for_each_direction(int64_t D, Fn&& fn) {
  if (D == 1) {
    fn(0);
  } else {
    at::parallel_for(0, D, 1, [&](int64_t d0, int64_t d1) {
      const SingleThreadedBlas one_thread;
      for (int64_t d = d0; d < d1; ++d) fn(d);
    });
  }
}

void check_input(const Tensor& input, const char* name) {
  TORCH_CHECK_VALUE(input.dim() == 3, "rnn_layer: ", name, " must be 3-D ([B, T, I] or [T, B, I]), got ", input.dim(), "-D");
  TORCH_CHECK_VALUE(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble, "rnn_layer: ", name,
                    " must be float32 or float64, got ", input.scalar_type());
  TORCH_CHECK_VALUE(input.device().is_cpu(), "rnn_layer: ", name, " must be on the CPU, got ", input.device());
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------
// The float op's products with W_ih^T and W_hh^T (float, or bf16 weights for float input):
// packed once per call for the kernel rnn_gemm.h chose on this machine.
template <typename T>
struct FloatProducts {
  static constexpr bool kReadsRowPointers = false;  // (see Int8Products)
  const LayerWeights& w;
  // Whether the products run on AMX tiles (bf16 weights on a CPU with AMX-BF16): see kTileChunkRows.
  bool on_tiles() const {
    return std::is_same_v<T, float> && w.w_ih[0].scalar_type() == at::kBFloat16 && bf16_kernel() == RightKernel::AmxBf16;
  }
  // x @ W_ih^T for up to max_m rows at a time, and h @ W_hh^T.
  PackedRight<T> input(int64_t d, int64_t max_m) const {
    return PackedRight<T>(w.w_ih[d], /*trans_b=*/true, w.I, w.G * w.H, max_m);
  }
  PackedRight<T> recurrent(int64_t d, int64_t max_m) const {
    return PackedRight<T>(w.w_hh[d], /*trans_b=*/true, w.H, w.G * w.H, max_m);
  }
};

// input is contiguous; w its layer's weights (unpack_weights). products.input(d, max_m) and
// products.recurrent(d, max_m) give direction d's right operands, objects with
// multiply(m, a, lda, beta, c, ldc): FloatProducts for the float op, Int8Products for the
// int8 one (which never trains).
template <typename T, typename Products>
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_impl(const Tensor& input, const Tensor& lengths, const LayerWeights& w,
                                                        const Products& products, const c10::optional<Tensor>& hx,
                                                        const c10::optional<Tensor>& cx, Cell cell, bool batch_first,
                                                        bool training) {
  const int64_t B = batch_first ? input.size(0) : input.size(1);
  const int64_t T_ = batch_first ? input.size(1) : input.size(0);
  const Plan plan = make_plan(lengths, B, T_, batch_first);
  const int64_t D = w.D, H = w.H, G = w.G, I = w.I, GH = G * H, DH = D * H;
  const bool lstm = cell == Cell::LSTM, gru = cell == Cell::GRU;
  const CellKernels<T>& kern = cell_kernels<T>();

  // output and workspace (2 and 14 MB at the tagger shape) are page-faulted in whenever the
  // allocator hands out freshly mapped memory, which happens interleaved with torch's layers
  // (measured: the LSTM training forward then takes ~9 instead of ~6.5 ms in some processes).
  // Reusing freed storages from a per-thread pool removed that, but did not lower fastner's
  // times in `fastner bench` (torch's rose instead, presumably faulting in what the pool kept),
  // so plain at::empty stays.
  Tensor output = at::empty(batch_first ? at::IntArrayRef{B, T_, DH} : at::IntArrayRef{T_, B, DH}, input.options());
  Tensor h_slots = initial_state<T>(hx, plan, w, input, "hx");
  Tensor c_slots = lstm ? initial_state<T>(cx, plan, w, input, "cx") : Tensor();
  const int64_t W = workspace_width(cell, H, I), x_col = workspace_gate_width(cell) * H, hp_col = x_col + I;
  Tensor workspace = training ? at::empty({D, B * T_, W}, input.options()) : at::empty({0}, input.options());
  if (training && plan.rows < B * T_) {
    // Rows past the packed ones are never read, but the op's output must be deterministic.
    workspace.narrow(1, plan.rows, B * T_ - plan.rows).zero_();
  }

  // The step rows' inputs for the projection GEMMs: the input itself when it is in step order,
  // else a gathered copy: the workspace's x columns in training (the backward needs them
  // there), a scratch buffer in inference. D x (pointer, leading dimension).
  const T* input2d = input.const_data_ptr<T>();
  std::vector<const T*> x_rows(D, input2d);
  std::vector<int64_t> x_ld(D, I);
  std::vector<Tensor> x_scratch(D);
  std::vector<std::vector<const T*>> x_pointers(D);  // Products::kReadsRowPointers: step row -> input row
  auto gather = [&](int64_t d) {
    if constexpr (Products::kReadsRowPointers) {  // (inference only)
      std::vector<const T*>& rows = x_pointers[d];
      rows.resize(plan.rows);
      for (int64_t s = 0; s < plan.steps; ++s)
        for (int64_t j = 0; j < plan.batch_size[s]; ++j)
          rows[plan.step_row(d, j, s)] = input2d + plan.io_row(j, time_at(plan, d, j, s)) * I;
    } else if (training) {
      T* ws_x = workspace.data_ptr<T>() + d * B * T_ * W + x_col;
      gather_steps<T>(plan, input2d, I, d, ws_x, W);
      if (!plan.io_is_step_order()) x_rows[d] = ws_x, x_ld[d] = W;
    } else if (!plan.io_is_step_order()) {
      x_scratch[d] = at::empty({plan.rows, I}, input.options());
      gather_steps<T>(plan, input2d, I, d, x_scratch[d].data_ptr<T>(), I);
      x_rows[d] = x_scratch[d].const_data_ptr<T>();
    }
  };

  T* out = output.data_ptr<T>();
  for_each_direction(D, [&](int64_t d) {
    // Half of the padding rows each (distinct pages: both zeroing the same fresh pages was
    // slower than one thread zeroing all).
    zero_padding_part<T>(plan, out, DH, d, D);
    gather(d);
    std::vector<T> bias_x, bias_hn;
    fold_biases<T>(w, cell, d, bias_x, bias_hn);
    // gru keeps W_hn h apart (r multiplies it); lstm and rnn add h @ W_hh^T straight into the
    // step's projected rows, which the cell pass then reads from cache.
    std::vector<T> hg(gru ? static_cast<size_t>(B * GH) : 0);
    T* h = h_slots.data_ptr<T>() + d * B * H;
    T* c = lstm ? c_slots.data_ptr<T>() + d * B * H : nullptr;
    const auto& whh_t = products.recurrent(d, B);  // h @ W_hh^T
    T* ws = training ? workspace.data_ptr<T>() + d * B * T_ * W : nullptr;
    if (ws != nullptr) {  // the first step's previous h: the initial state
      for (int64_t j = 0; j < (plan.steps > 0 ? plan.batch_size[0] : 0); ++j)
        std::copy_n(h + j * H, H, ws + plan.step_row(d, j, 0) * W + hp_col);
    }
    // Projected rows of the current chunk of steps [chunk, G*H]: a per-thread buffer, reused
    // across calls so that it stays mapped and cached. W_ih is packed once for all chunks.
    const int64_t chunk_rows = products.on_tiles() ? kTileChunkRows : kChunkRows;
    const int64_t max_chunk = std::min(plan.rows, chunk_rows + B);
    T* xp = thread_buffer<T>(max_chunk * GH);
    const auto& wih_t = products.input(d, max_chunk);  // x @ W_ih^T
    int64_t chunk_first = 0, chunk_end = 0;  // the chunk's first step row, its first step past it
    for (int64_t s = 0; s < plan.steps; ++s) {
      if (s == chunk_end) {
        // Whole steps, at least chunk_rows rows unless the layer ends first; their rows are
        // contiguous in either direction's order.
        int64_t n = 0;
        while (chunk_end < plan.steps && n < chunk_rows) n += plan.batch_size[chunk_end++];
        chunk_first = std::min(plan.block(d, s), plan.block(d, chunk_end - 1));
        if constexpr (Products::kReadsRowPointers) {
          wih_t.multiply_rows(n, x_pointers[d].data() + chunk_first, T(0), xp, GH);
        } else {
          wih_t.multiply(n, x_rows[d] + chunk_first * x_ld[d], x_ld[d], T(0), xp, GH);
        }
      }
      const int64_t nb = plan.batch_size[s];
      T* block = xp + (plan.block(d, s) - chunk_first) * GH;  // [nb, G*H]
      if (gru) {
        whh_t.multiply(nb, h, H, T(0), hg.data(), GH);
      } else {
        whh_t.multiply(nb, h, H, T(1), block, GH);
      }
      const int64_t next = s + 1 < plan.steps ? plan.batch_size[s + 1] : 0;  // slots j < next run on
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t t = time_at(plan, d, j, s);
        const T* xg = block + j * GH;
        T* o = out + plan.io_row(j, t) * DH + d * H;
        T* wr = ws != nullptr ? ws + plan.step_row(d, j, s) * W : nullptr;
        T* h_next = ws != nullptr && j < next ? ws + plan.step_row(d, j, s + 1) * W + hp_col : nullptr;
        switch (cell) {
          case Cell::LSTM: kern.lstm(H, xg, bias_x.data(), h + j * H, c + j * H, o, wr, h_next); break;
          case Cell::GRU:
            kern.gru(H, xg, bias_x.data(), hg.data() + j * GH, bias_hn.data(), h + j * H, o, wr, h_next);
            break;
          case Cell::RNN_TANH: kern.rnn_tanh(H, xg, bias_x.data(), h + j * H, o, wr, h_next); break;
          case Cell::RNN_RELU: kern.rnn_relu(H, xg, bias_x.data(), h + j * H, o, wr, h_next); break;
        }
      }
    }
  });
  Tensor h_n = unsort_state<T>(h_slots, plan);
  Tensor c_n = lstm ? unsort_state<T>(c_slots, plan) : at::empty({0}, input.options());
  return {output, h_n, c_n, workspace};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> rnn_layer_forward(const Tensor& input, const Tensor& lengths,
                                                             at::TensorList weights, const c10::optional<Tensor>& hx,
                                                             const c10::optional<Tensor>& cx, c10::string_view mode,
                                                             bool bidirectional, bool batch_first, bool training) {
  check_input(input, "input");
  const Cell cell = parse_mode(std::string(mode));
  const Tensor contiguous = input.contiguous();
  const LayerWeights w =
      unpack_weights(weights, bidirectional, cell, contiguous, weight_dtype_of(weights, contiguous, training));
  return AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rnn_layer_forward", [&] {
    return forward_impl<scalar_t>(contiguous, lengths, w, FloatProducts<scalar_t>{w}, hx, cx, cell, batch_first,
                                  training);
  });
}

// The int8 op's products (csrc/cpu/rnn_int8.h): views of the packed weights the op was given
// (fastner::rnn_int8_pack's tensors, packed once when a module quantizes its weights, not per
// call: packing here cost ~60 us a call at H=200, both directions, memset included, a large
// share of a short sentence's call). The tensors are held by the op's LayerWeights for the
// whole call; a view is only the checked header and three pointers.
struct Int8Products {
  // The input projection takes the step rows as pointers into the input (multiply_rows): each
  // row is quantized into a buffer of its own anyway, and the gathered float copy of the
  // input the float GEMMs need (a [rows, I] pass a direction) is not made.
  static constexpr bool kReadsRowPointers = true;
  std::vector<int8::PackedWeights> w_ih, w_hh;  // per direction
  bool on_tiles() const { return int8::amx_selected(); }  // see kTileChunkRows
  const int8::PackedWeights& input(int64_t d, int64_t) const { return w_ih[d]; }
  const int8::PackedWeights& recurrent(int64_t d, int64_t) const { return w_hh[d]; }
};

// A packed weight argument as the kernels read it: 1-D int8 on the CPU, contiguous and 4-byte
// aligned (the column sums and scales are read as int32 / float32). A view into other storage
// that is not (a slice at an odd offset) is copied: correct, only slower. The returned tensor
// holds the memory the kernels then read.
Tensor packed_arg(const Tensor& t, const std::string& what, const Tensor& input) {
  checks::on_device("rnn_layer_int8", what.c_str(), t, input.device(), "the input's");
  TORCH_CHECK_VALUE(t.dim() == 1 && t.scalar_type() == at::kChar, "rnn_layer_int8: ", what,
                    " must be a packed weight (1-D int8, from fastner.ops.rnn_int8_pack), got ", t.scalar_type(), " ",
                    t.sizes());
  Tensor held = t.contiguous();
  if (reinterpret_cast<uintptr_t>(held.const_data_ptr()) % alignof(int32_t) != 0) held = held.clone();
  return held;
}

// weights: per direction packed w_ih, packed w_hh, then (with bias) b_ih, b_hh; H is hidden_size.
// Checks every one (a packed tensor's size and header: PackedWeights) in that order, as
// fastner.validation.rnn_int8_args does, and makes `products` the views of the packed tensors
// the returned LayerWeights holds.
LayerWeights unpack_int8_weights(at::TensorList weights, int64_t hidden_size, bool bidirectional, Cell cell,
                                 const Tensor& input, Int8Products& products) {
  LayerWeights w;
  w.D = bidirectional ? 2 : 1;
  w.G = gates_of(cell);
  TORCH_CHECK_VALUE(weights.size() == static_cast<size_t>(2 * w.D) || weights.size() == static_cast<size_t>(4 * w.D),
                    "rnn_layer_int8: weights must hold 2*D (no bias) or 4*D tensors for D = ", w.D,
                    " directions, got ", weights.size());
  // (At most 2^31 - 1: G * H must not wrap; Python's check says the same.)
  TORCH_CHECK_VALUE(hidden_size > 0 && hidden_size <= INT32_MAX,
                    "rnn_layer_int8: hidden_size must be a positive int below 2**31, got ", hidden_size);
  w.has_bias = weights.size() == static_cast<size_t>(4 * w.D);
  const int64_t per_dir = w.has_bias ? 4 : 2;
  w.H = hidden_size;
  w.I = input.size(2);
  const int64_t GH = w.G * w.H;
  for (int64_t d = 0; d < w.D; ++d) {
    const std::string dir = " of direction " + std::to_string(d);
    w.w_ih.push_back(packed_arg(weights[d * per_dir + 0], "w_ih" + dir, input));
    products.w_ih.emplace_back(w.w_ih[d].const_data_ptr<int8_t>(), w.w_ih[d].numel(), GH, w.I, ("w_ih" + dir).c_str());
    w.w_hh.push_back(packed_arg(weights[d * per_dir + 1], "w_hh" + dir, input));
    products.w_hh.emplace_back(w.w_hh[d].const_data_ptr<int8_t>(), w.w_hh[d].numel(), GH, w.H, ("w_hh" + dir).c_str());
    if (w.has_bias) {
      for (int64_t j = 2; j < 4; ++j) {
        const Tensor& b = weights[d * per_dir + j];
        const char* name = j == 2 ? "b_ih" : "b_hh";
        TORCH_CHECK_VALUE(b.sizes() == at::IntArrayRef({GH}), "rnn_layer_int8: ", name, dir, " must have shape [",
                          GH, "], got ", b.sizes());
        TORCH_CHECK_VALUE(b.scalar_type() == at::kFloat, "rnn_layer_int8: ", name, dir, " must be float32, got ",
                          b.scalar_type());
        TORCH_CHECK_VALUE(b.device() == input.device(), "rnn_layer_int8: ", name, dir,
                          " must be on the input's device ", input.device(), ", got ", b.device());
        (j == 2 ? w.b_ih : w.b_hh).push_back(b.contiguous());
      }
    }
  }
  return w;
}

std::tuple<Tensor, Tensor, Tensor> rnn_layer_int8_forward(const Tensor& input, const Tensor& lengths,
                                                          at::TensorList weights, int64_t hidden_size,
                                                          const c10::optional<Tensor>& hx,
                                                          const c10::optional<Tensor>& cx, c10::string_view mode,
                                                          bool bidirectional, bool batch_first) {
  check_input(input, "input");
  TORCH_CHECK_VALUE(input.scalar_type() == at::kFloat, "rnn_layer_int8: input must be float32, got ",
                    input.scalar_type());
  const Cell cell = parse_mode(std::string(mode));
  const Tensor contiguous = input.contiguous();
  Int8Products products;  // views into w's packed tensors: w outlives every use of them
  const LayerWeights w = unpack_int8_weights(weights, hidden_size, bidirectional, cell, contiguous, products);
  auto [output, h_n, c_n, workspace] =
      forward_impl<float>(contiguous, lengths, w, products, hx, cx, cell, batch_first, /*training=*/false);
  return {output, h_n, c_n};
}

// fastner::rnn_int8_pack: weight int8 [N, K] in [-63, 63], scale float32 [N], both on the CPU
// -> the packed tensor (int8 [packed_bytes(N, K)], layout in rnn_int8.h).
Tensor rnn_int8_pack(const Tensor& weight, const Tensor& scale) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.scalar_type() == at::kChar,
                    "rnn_int8_pack: weight must be 2-D int8 [N, K] (fastner.reference.quantize_weight_int8), got ",
                    weight.scalar_type(), " ", weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK_VALUE(scale.dim() == 1 && scale.size(0) == N && scale.scalar_type() == at::kFloat,
                    "rnn_int8_pack: scale must be float32 [N] = [", N, "], got ", scale.scalar_type(), " ",
                    scale.sizes());
  TORCH_CHECK_VALUE(weight.device().is_cpu() && scale.device().is_cpu(),
                    "rnn_int8_pack: weight and scale must be on the CPU, got ", weight.device(), " and ",
                    scale.device());
  const Tensor w = weight.contiguous(), s = scale.contiguous();  // held while packing reads them
  Tensor out = at::empty({int8::packed_bytes(N, K)}, weight.options());
  int8::pack(w.const_data_ptr<int8_t>(), s.const_data_ptr<float>(), N, K, out.data_ptr<int8_t>(), "weight");
  return out;
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------
template <typename T>
std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> backward_impl(
    const Tensor& grad_output_, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& input_,
    const Tensor& lengths, at::TensorList weights, const c10::optional<Tensor>& hx, const c10::optional<Tensor>& cx,
    const Tensor& workspace_, Cell cell, bool bidirectional, bool batch_first) {
  const Tensor input = input_.contiguous();
  const int64_t B = batch_first ? input.size(0) : input.size(1);
  const int64_t T_ = batch_first ? input.size(1) : input.size(0);
  const LayerWeights w = unpack_weights(weights, bidirectional, cell, input, input.scalar_type());
  const Plan plan = make_plan(lengths, B, T_, batch_first);
  const int64_t D = w.D, H = w.H, G = w.G, I = w.I, GH = G * H, DH = D * H;
  const bool lstm = cell == Cell::LSTM, gru = cell == Cell::GRU;
  const CellKernels<T>& kern = cell_kernels<T>();
  const int64_t W = workspace_width(cell, H, I), x_col = workspace_gate_width(cell) * H, hp_col = x_col + I;
  TORCH_CHECK_VALUE(workspace_.sizes() == at::IntArrayRef({D, B * T_, W}),
                    "rnn_layer_backward: workspace must come from rnn_layer_forward(training=True) of the same call");
  checks::like("rnn_layer_backward", "workspace", workspace_, {D, B * T_, W}, input.scalar_type(), input.device(),
               "the input's");
  TORCH_CHECK_VALUE(grad_output_.sizes() == (batch_first ? at::IntArrayRef{B, T_, DH} : at::IntArrayRef{T_, B, DH}),
                    "rnn_layer_backward: grad_output must have the output's shape, got ", grad_output_.sizes());
  TORCH_CHECK_VALUE(grad_output_.is_floating_point(), "rnn_layer_backward: grad_output must be floating point, got ",
                    grad_output_.scalar_type());
  checks::on_device("rnn_layer_backward", "grad_output", grad_output_, input.device(), "the input's");
  const Tensor workspace = workspace_.contiguous();
  // Read in place with its strides: a loss like out.sum() hands an expanded (stride 0) tensor,
  // which contiguous() would first write out in full.
  const Tensor grad_output = grad_output_.to(input.scalar_type());
  const int64_t go_s0 = grad_output.stride(0), go_s1 = grad_output.stride(1), go_s2 = grad_output.stride(2);

  auto state_grad = [&](const Tensor& g, const char* name) {
    if (!g.defined() || g.numel() == 0) return at::zeros({D, B, H}, input.options());
    TORCH_CHECK_VALUE(g.sizes() == at::IntArrayRef({D, B, H}), "rnn_layer_backward: ", name, " must have shape [D, B, H], got ",
                      g.sizes());
    return initial_state<T>(g.to(input.scalar_type()), plan, w, input, name);  // into slot order
  };
  Tensor dh_slots = state_grad(grad_h_n, "grad_h_n");
  Tensor dc_slots = lstm ? state_grad(grad_c_n, "grad_c_n") : Tensor();
  // The initial h is in the workspace (the first step rows' previous h); lstm's initial c is not.
  (void)hx;
  const Tensor c0 = lstm ? initial_state<T>(cx, plan, w, input, "cx") : Tensor();

  std::vector<Tensor> grad_x(D);  // per direction: input gradient in its step rows [rows, I]
  std::vector<Tensor> grad_weights(weights.size());
  const int64_t per_dir = w.has_bias ? 4 : 2;
  const T* go = grad_output.const_data_ptr<T>();

  for_each_direction(D, [&](int64_t d) {
    const T* ws = workspace.const_data_ptr<T>() + d * B * T_ * W;
    const PackedRight<T> whh(w.w_hh[d], /*trans_b=*/false, GH, H, B);  // g @ W_hh
    const T* c_init = lstm ? c0.const_data_ptr<T>() + d * B * H : nullptr;
    T* dh = dh_slots.data_ptr<T>() + d * B * H;
    T* dc = lstm ? dc_slots.data_ptr<T>() + d * B * H : nullptr;
    // Gradients of the projected input (gx) and of W_hh h (gh; differs only for gru), step rows.
    Tensor gx_all = at::empty({plan.rows, GH}, input.options());
    Tensor gh_all = gru ? at::empty({plan.rows, GH}, input.options()) : gx_all;
    T* gx = gx_all.data_ptr<T>();
    T* gh = gh_all.data_ptr<T>();
    std::vector<T> db_x(GH, T(0)), db_h(GH, T(0));  // bias gradients (db_h: gru's b_hn part only)
    for (int64_t s = plan.steps - 1; s >= 0; --s) {
      const int64_t nb = plan.batch_size[s];
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t t = time_at(plan, d, j, s);
        const int64_t row = plan.step_row(d, j, s);
        const int64_t prev = s > 0 ? plan.step_row(d, j, s - 1) : -1;
        T* dhj = dh + j * H;
        const T* gout = go + plan.io_offset(j, t, go_s0, go_s1) + d * H * go_s2;
        if (go_s2 == 1) {
          for (int64_t k = 0; k < H; ++k) dhj[k] += gout[k];
        } else {
          for (int64_t k = 0; k < H; ++k) dhj[k] += gout[k * go_s2];
        }
        const T* wr = ws + row * W;
        switch (cell) {
          case Cell::LSTM:
            kern.lstm_backward(H, wr, prev >= 0 ? ws + prev * W + 4 * H : c_init + j * H, dhj, dc + j * H, gx + row * GH,
                               db_x.data());
            break;
          case Cell::GRU:
            kern.gru_backward(H, wr, wr + hp_col, dhj, gx + row * GH, gh + row * GH, db_x.data(), db_h.data());
            break;
          case Cell::RNN_TANH: kern.rnn_tanh_backward(H, wr, dhj, gx + row * GH, db_x.data()); break;
          case Cell::RNN_RELU: kern.rnn_relu_backward(H, wr, dhj, gx + row * GH, db_x.data()); break;
        }
      }
      // d h_prev = (this step's gate gradients) @ W_hh (+ gru's direct z * dh, already in dh).
      whh.multiply(nb, gh + plan.block(d, s) * GH, GH, gru ? T(1) : T(0), dh, H);
    }
    // [dW_ih | dW_hh]^T = [x | h_prev]^T @ [gx | gh] over all step rows, [I + H, G*H], with
    // [x | h_prev] read in place from the workspace: one GEMM with a long inner dimension
    // where gx = gh (lstm, rnn); gru's two halves take their own gradient. Measured here
    // (single thread, interleaved, rows = 1280, I = 130, 4H = 800): this product plus the
    // transposes back took ~10% less than gx^T @ x and gx^T @ h_prev into [G*H, *] directly.
    // Tried and not kept (LSTM, tagger shape, 2 threads): running this product and the input
    // gradient per chunk of ~256 step rows inside the step loop, while the chunk's gate
    // gradients are still in L2, measured no faster (backward timed alone: 10.58 vs 10.72 ms,
    // medians of 3 runs of 150); [I + H] padded to a multiple of 16 rows, or oneDNN instead of
    // MKL, did not raise this product's ~160 GFLOP/s either.
    Tensor dw_t = at::empty({I + H, GH}, input.options());
    if (gru) {
      gemm<T>(true, false, I, GH, plan.rows, T(1), ws + x_col, W, gx, GH, T(0), dw_t.data_ptr<T>(), GH);
      gemm<T>(true, false, H, GH, plan.rows, T(1), ws + hp_col, W, gh, GH, T(0), dw_t.data_ptr<T>() + I * GH, GH);
    } else {
      gemm<T>(true, false, I + H, GH, plan.rows, T(1), ws + x_col, W, gx, GH, T(0), dw_t.data_ptr<T>(), GH);
    }
    Tensor& dw_ih = grad_weights[d * per_dir + 0] = at::empty({GH, I}, input.options());
    Tensor& dw_hh = grad_weights[d * per_dir + 1] = at::empty({GH, H}, input.options());
    transpose<T>(dw_t.const_data_ptr<T>(), I, GH, GH, dw_ih.data_ptr<T>(), I);
    transpose<T>(dw_t.const_data_ptr<T>() + I * GH, H, GH, GH, dw_hh.data_ptr<T>(), H);
    if (w.has_bias) {
      Tensor db_ih = at::empty({GH}, input.options());
      std::copy_n(db_x.data(), GH, db_ih.data_ptr<T>());
      Tensor db_hh = db_ih.clone();  // lstm, rnn: b_hh adds where b_ih does
      if (gru) std::copy_n(db_h.data() + 2 * H, H, db_hh.data_ptr<T>() + 2 * H);  // n: r * dn
      grad_weights[d * per_dir + 2] = db_ih;
      grad_weights[d * per_dir + 3] = db_hh;
    }
    grad_x[d] = at::empty({plan.rows, I}, input.options());
    gemm<T>(false, false, plan.rows, I, GH, T(1), gx, GH, w.w_ih[d].const_data_ptr<T>(), I, T(0),
            grad_x[d].data_ptr<T>(), I);
  });

  // Input gradient: the directions' step rows summed back into the input's layout, zeros on
  // padding.
  Tensor grad_input = at::empty(input.sizes(), input.options());
  T* gi = grad_input.data_ptr<T>();
  zero_padding_part<T>(plan, gi, I, 0, 1);
  const T* g0 = grad_x[0].const_data_ptr<T>();
  const T* g1 = D > 1 ? grad_x[1].const_data_ptr<T>() : nullptr;
  for (int64_t j = 0; j < B; ++j) {
    for (int64_t t = 0; t < plan.len[j]; ++t) {
      T* dst = gi + plan.io_row(j, t) * I;
      const T* a = g0 + plan.step_row(0, j, t) * I;
      if (g1 == nullptr) {
        std::copy_n(a, I, dst);
      } else {
        const T* b = g1 + plan.step_row(1, j, plan.len[j] - 1 - t) * I;
        for (int64_t k = 0; k < I; ++k) dst[k] = a[k] + b[k];
      }
    }
  }
  Tensor grad_hx = unsort_state<T>(dh_slots, plan);
  Tensor grad_cx = lstm ? unsort_state<T>(dc_slots, plan) : at::empty({0}, input.options());
  return {grad_input, grad_hx, grad_cx, grad_weights};
}

std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> rnn_layer_backward(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& input, const Tensor& lengths,
    at::TensorList weights, const c10::optional<Tensor>& hx, const c10::optional<Tensor>& cx, const Tensor& workspace,
    c10::string_view mode, bool bidirectional, bool batch_first) {
  check_input(input, "input");
  const Cell cell = parse_mode(std::string(mode));
  return AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rnn_layer_backward", [&] {
    return backward_impl<scalar_t>(grad_output, grad_h_n, grad_c_n, input, lengths, weights, hx, cx, workspace, cell,
                                   bidirectional, batch_first);
  });
}

}  // namespace
}  // namespace fastner::cpu::rnn

TORCH_LIBRARY_IMPL(fastner, CPU, m) {
  m.impl("rnn_layer_forward", &fastner::cpu::rnn::rnn_layer_forward);
  m.impl("rnn_layer_backward", &fastner::cpu::rnn::rnn_layer_backward);
  m.impl("rnn_layer_int8_forward", &fastner::cpu::rnn::rnn_layer_int8_forward);
  m.impl("rnn_int8_pack", &fastner::cpu::rnn::rnn_int8_pack);
}
