// Every fastner op schema, in one place. Kernels register per dispatch key in
// csrc/cpu/<op>.cpp (CPU) and csrc/cuda/<op>.cu (CUDA); the Python side (fastner/ops/, one
// module per op family) adds fake kernels and each trainable op's one autograd formula (a
// kernel at the Autograd key). Op -> files map: fastner/ops/__init__.py.
//
// Conventions shared by all ops:
//   * batch-first, contiguous tensors; the Python modules transpose where needed;
//   * lengths: int64 [B] on the same device as the data, 0 <= lengths[b] <= T;
//   * ops that training needs return what their backward reads; the backward is its own op.
#include <torch/library.h>

#ifndef FASTNER_NO_PYTHON
#include <Python.h>
#include "cpu/cpu_isa.h"
#include "cpu/rnn_int8_amx.h"
#include "cpu/rnn_int8_vnni.h"
#include "cpu/rnn_gemm.h"
#include "rnn_layout.h"

// Importing fastner._C from Python runs the static TORCH_LIBRARY registrations below; the
// module itself has two helpers: which vector kernels the CPU ops use (fastner.backend()
// reports it), and the (private, unchecked) list building behind fastner.ops.tag_lists.
// (The CMake build for C++ users defines FASTNER_NO_PYTHON.)
// A kernel choice's name for fastner.backend(); a bad FASTNER_CPU_ISA or FASTNER_RNN_INT8 (the
// choice raises c10::ValueError) is a Python ValueError, not a C++ abort.
template <typename Name>
static PyObject* kernel_name(Name&& name) {
  try {
    return PyUnicode_FromString(name());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

static PyObject* cpu_isa(PyObject*, PyObject*) {
  return kernel_name([] { return fastner::cpu::isa_name(); });
}

static PyObject* rnn_bf16_kernel(PyObject*, PyObject*) {
  return kernel_name([] { return fastner::cpu::rnn::bf16_kernel_name(fastner::cpu::rnn::bf16_kernel()); });
}

static PyObject* rnn_int8_kernel(PyObject*, PyObject*) {
  return kernel_name([] {
    namespace int8 = fastner::cpu::rnn::int8;
    return int8::amx_selected() ? "amx_int8" : int8::vnni_selected() ? "avx512_vnni" : "avx2";
  });
}

// rnn_gemm_choices() -> List[str]: the float32 kernel the recurrent layers measured and chose
// for each product shape so far in this process, and the kernel each bf16 weight shape ran on
// (csrc/cpu/rnn_gemm.h; empty before the first layer call).
static PyObject* rnn_gemm_choices(PyObject*, PyObject*) {
  const std::vector<std::string> lines = fastner::cpu::rnn::float_kernel_choices();
  PyObject* out = PyList_New(static_cast<Py_ssize_t>(lines.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < lines.size(); ++i) {
    PyObject* line = PyUnicode_FromString(lines[i].c_str());
    if (line == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyList_SetItem(out, static_cast<Py_ssize_t>(i), line);  // steals `line`
  }
  return out;
}

// rnn_workspace_width(device_type, mode, input_size, hidden) -> int: the width of one row of
// rnn_layer_forward's training workspace on that device type ('cpu' or 'cuda'), for the fake
// kernel (csrc/rnn_layout.h has the layouts).
static PyObject* rnn_workspace_width(PyObject*, PyObject* args) {
  const char* device = nullptr;
  const char* mode = nullptr;
  long long input_size = 0, hidden = 0;
  if (!PyArg_ParseTuple(args, "ssLL", &device, &mode, &input_size, &hidden)) return nullptr;
  const int cell = fastner::rnn_layout::cell_of(mode, std::strlen(mode));
  if (cell < 0) {
    PyErr_Format(PyExc_ValueError,
                 "rnn_layer: mode must be 'lstm', 'gru', 'rnn_tanh' or 'rnn_relu', got '%s'", mode);
    return nullptr;
  }
  if (std::strcmp(device, "cpu") == 0) {
    return PyLong_FromLongLong(fastner::rnn_layout::cpu_workspace_width(cell, hidden, input_size));
  }
  return PyLong_FromLongLong(fastner::rnn_layout::cuda_workspace_columns(cell) * hidden);
}

// _tag_lists_unchecked(tags_address, lengths_address, batch, row_stride) -> List[List[int]]: the
// first lengths[b] entries of each row of an int64 [B, T] CPU tensor, as Python lists. What
// CRF.decode returns; Tensor.tolist() plus slicing costs ~3x more (it boxes every padded entry
// through the generic scalar path).
//
// Raw addresses cannot be checked here: this helper is private (leading underscore, not in any
// public namespace), and its only caller, fastner.ops.tag_lists, checks dtypes, shapes, device
// and 0 <= lengths[b] <= T first and passes live, contiguous tensors. What can be checked
// (null addresses, negative counts) is.
static PyObject* tag_lists_unchecked(PyObject*, PyObject* args) {
  unsigned long long tags_address = 0, lengths_address = 0;
  long long batch = 0, row_stride = 0;
  if (!PyArg_ParseTuple(args, "KKLL", &tags_address, &lengths_address, &batch, &row_stride)) {
    return nullptr;
  }
  if (batch < 0 || row_stride < 0 || (batch > 0 && (tags_address == 0 || lengths_address == 0))) {
    PyErr_SetString(PyExc_ValueError,
                    "_tag_lists_unchecked: null address or negative size (call fastner.ops.tag_lists)");
    return nullptr;
  }
  const int64_t* tags = reinterpret_cast<const int64_t*>(tags_address);
  const int64_t* lengths = reinterpret_cast<const int64_t*>(lengths_address);
  // The int objects of the tags met so far, by value (decoded tags are small: [0, K)): one
  // reference taken per entry instead of a call per tag (~a third of this function's time).
  constexpr int64_t kTable = 256;
  PyObject* table[kTable] = {};
  auto release = [&table] {
    for (PyObject* obj : table) Py_XDECREF(obj);
  };
  PyObject* out = PyList_New(batch);
  if (out == nullptr) return nullptr;
  for (long long b = 0; b < batch; ++b) {
    PyObject* row = PyList_New(lengths[b]);
    if (row == nullptr) {
      release();
      Py_DECREF(out);
      return nullptr;
    }
    PyList_SetItem(out, b, row);  // steals the reference; row is filled in place below
    for (int64_t t = 0; t < lengths[b]; ++t) {
      const int64_t value = tags[b * row_stride + t];
      PyObject* tag = nullptr;
      if (value >= 0 && value < kTable) {
        if (table[value] == nullptr) table[value] = PyLong_FromLongLong(value);
        tag = table[value];
        Py_XINCREF(tag);
      } else {
        tag = PyLong_FromLongLong(value);
      }
      if (tag == nullptr) {
        release();
        Py_DECREF(out);
        return nullptr;
      }
      PyList_SetItem(row, t, tag);  // steals the reference
    }
  }
  release();
  return out;
}

extern "C" {
PyObject* PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"cpu_isa", cpu_isa, METH_NOARGS,
       "Instruction set of every CPU kernel family: 'avx512' or 'avx2' (csrc/cpu/cpu_isa.h)."},
      {"rnn_bf16_kernel", rnn_bf16_kernel, METH_NOARGS,
       "The bf16 recurrent layers' product kernel: 'amx_bf16', 'avx512_bf16' or 'avx2' (csrc/cpu/rnn_gemm.h)."},
      {"rnn_int8_kernel", rnn_int8_kernel, METH_NOARGS,
       "The int8 recurrent layers' product kernel: 'amx_int8', 'avx512_vnni' or 'avx2' (csrc/cpu/rnn_int8.h)."},
      {"rnn_gemm_choices", rnn_gemm_choices, METH_NOARGS,
       "The float32 GEMM kernel the CPU recurrent layers measured and chose per product shape, "
       "and the kernel of each bf16 weight shape run ('bf16 k=.. n=..: amx_bf16', ': avx512_bf16' or ': avx2')."},
      {"rnn_workspace_width", rnn_workspace_width, METH_VARARGS,
       "rnn_workspace_width(device_type, mode, input_size, hidden): the width of a training "
       "workspace row of rnn_layer_forward on that device type."},
      {"_tag_lists_unchecked", tag_lists_unchecked, METH_VARARGS,
       "Private: fastner.ops.tag_lists checks its arguments and calls this."},
      {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}
#endif

TORCH_LIBRARY(fastner, m) {
  // ---- linear-chain CRF ------------------------------------------------------
  // emissions: [B, T, K] float32/float64 (float16/bfloat16 accepted, accumulated in float32)
  // lengths: int64 [B]; tags: int64 [B, T] (entries past a length are ignored)
  // transitions: [K, K] (i -> j), start_transitions / end_transitions: [K], in the accumulate
  // dtype (float64 for float64 emissions, else float32); -inf entries forbid a transition.
  // Sequences of length 0 score 0 and decode to no tags.
  //
  // Forward algorithm: log_z [B] and the gold path's score [B] (zeros when tags is None). No
  // saved state: each device's crf_backward recomputes the forward pass it needs (on CPU
  // cheaper at NER sizes than writing and reading back [B, T, K]; on CUDA into a scratch
  // buffer of its own launch sequence).
  m.def("crf_forward(Tensor emissions, Tensor? tags, Tensor lengths, Tensor transitions, "
        "Tensor start_transitions, Tensor end_transitions) -> (Tensor log_z, Tensor gold_score)");
  // Fused backward of crf_forward by forward-backward: the gradients of
  // sum(grad_log_z * log_z + grad_gold_score * gold_score) w.r.t. emissions, transitions,
  // start_transitions and end_transitions, from crf_forward's own inputs.
  m.def("crf_backward(Tensor grad_log_z, Tensor grad_gold_score, Tensor emissions, Tensor? tags, "
        "Tensor lengths, Tensor transitions, Tensor start_transitions, Tensor end_transitions) "
        "-> (Tensor grad_emissions, Tensor grad_transitions, Tensor grad_start_transitions, "
        "Tensor grad_end_transitions)");
  // The summed log-likelihood sum_b (gold_score_b - log_z_b) (a 0-dim tensor) and its
  // gradients w.r.t. emissions, transitions, start and end in one call: what a training step
  // needs (one pass; backward only scales the result). No autograd of its own: the autograd
  // formula of crf_log_likelihood calls it. CPU only (other devices run crf_forward and
  // crf_backward).
  m.def("crf_forward_backward(Tensor emissions, Tensor tags, Tensor lengths, Tensor transitions, "
        "Tensor start_transitions, Tensor end_transitions) -> (Tensor log_likelihood, "
        "Tensor grad_emissions, Tensor grad_transitions, Tensor grad_start_transitions, "
        "Tensor grad_end_transitions)");
  // The reduced log-likelihood of the gold tags, reduce(gold_score - log_z) over the batch:
  // [B] for reduction 'none', else 0-dim ('sum', 'mean' over sequences, 'token_mean' over
  // tokens). emissions [B, T, K] and tags [B, T], or [T, B, K] and [T, B] when not batch_first
  // (read in place, and the emissions' gradient comes back in that layout). Value kernel and
  // autograd formula (C++): csrc/cpu/crf_log_likelihood.cpp (crf_forward, then the reduction;
  // in training crf_forward_backward in one pass where the device has it and the reduction
  // weighs sequences alike, else crf_forward + crf_backward).
  m.def("crf_log_likelihood(Tensor emissions, Tensor tags, Tensor lengths, Tensor transitions, "
        "Tensor start_transitions, Tensor end_transitions, str reduction, bool batch_first) "
        "-> Tensor");
  // Best path: tags int64 [B, T] (-1 past each length) and its score [B].
  m.def("crf_viterbi(Tensor emissions, Tensor lengths, Tensor transitions, "
        "Tensor start_transitions, Tensor end_transitions) -> (Tensor tags, Tensor scores)");
  // The k best paths, best first: tags int64 [B, k, T] and scores [B, k]; where fewer than k
  // paths exist the extra rows hold tags -1 and score -inf.
  m.def("crf_kbest(Tensor emissions, Tensor lengths, Tensor transitions, "
        "Tensor start_transitions, Tensor end_transitions, int k) -> (Tensor tags, Tensor scores)");
  // Posterior marginals p(y_t = j | x): [B, T, K], zeros past each length.
  m.def("crf_marginals(Tensor emissions, Tensor lengths, Tensor transitions, "
        "Tensor start_transitions, Tensor end_transitions) -> Tensor");
  // Lengths int64 [B] of a right-padded mask (bool or uint8, nonzero = valid step), [B, T] when
  // batch_first else [T, B]; a mask with a gap (a valid step after an invalid one) raises
  // ValueError. fastner.nn.CRF's mask check in one call; devices without a kernel use the
  // reference (fastner.reference.crf_lengths).
  m.def("crf_lengths(Tensor mask, bool batch_first) -> Tensor");
  // Inference only (no gradient): for each n, the probability (float64 [N]) that sequence
  // rows[n]'s tag path keeps to the allowed tags allowed[n, w] (bool [N, W, K], W >= 1) at the
  // positions starts[n] + w inside its length (positions past it are ignored): the paths' total
  // exp(score) over Z, computed in float64 (csrc/cpu/crf_window.cpp). rows int64 [N] in [0, B);
  // starts int64 [N], 0 <= starts[n] < lengths[rows[n]]. NaN for a sequence whose scores hold a
  // NaN or +inf it reads, or that has no path (log Z = -inf). The parts of an entity span's
  // posterior (fastner/span_scores.py). CPU kernel only: other devices run
  // fastner.reference.crf_window_probabilities.
  m.def("crf_window_probabilities(Tensor emissions, Tensor lengths, Tensor transitions, "
        "Tensor start_transitions, Tensor end_transitions, Tensor rows, Tensor starts, Tensor allowed) -> Tensor");

  // ---- character CNN -----------------------------------------------------------
  // A word's character features (Ma & Hovy): conv1d over its characters, then the maximum over
  // its valid ones. input [N, C, I] float32/float64 (N words, C characters, I > 0 embedding dims;
  // any strides), valid bool [N, C], weight [F, I, W] (torch's Conv1d: W odd, zero padding
  // W / 2 on each side), bias [F], all in the input's dtype and device. output [N, F]: the
  // maximum over the valid c of conv1d(input^T)[n, :, c] (0 for a word without valid
  // characters); argmax int64 [N, F]: its first position (-1 for such a word). CPU kernel
  // only: other devices and dtypes run fastner.reference.char_conv_max.
  m.def("char_conv_max(Tensor input, Tensor valid, Tensor weight, Tensor bias) -> "
        "(Tensor output, Tensor argmax)");
  // The gradients of sum(grad_output * output) w.r.t. input [N, C, I], weight and bias, from
  // the forward's argmax (every entry in [-1, C)): only the argmax positions receive gradient.
  m.def("char_conv_max_backward(Tensor grad_output, Tensor input, Tensor argmax, Tensor weight) -> "
        "(Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // Inference only (no gradient): char_conv_max's output for the embedded characters,
  // char_conv_max(embedding[chars], chars != pad_id, weight, bias)[0], computed through the
  // table weight[:, :, k] @ embedding[v] (csrc/cpu/char_cnn.cpp: why; the floats differ from
  // char_conv_max's in rounding only; the table holds V*W*F values, built with V*W*F*I
  // multiply-adds a call). chars int64 [..., C] (words of C characters); words bool [...]: the words computed
  // (the others get 0 and their chars are not read); embedding [V, I] float32/float64 (I > 0);
  // weight [F, I, W] (W odd), bias [F] in the embedding's dtype; every character of a marked word
  // in [0, V); pad_id any int (the padding character: not a valid position, but a neighbour
  // reads its row). output [..., F]. CPU kernel only: other devices and dtypes run
  // fastner.reference.char_embed_conv_max.
  m.def("char_embed_conv_max(Tensor chars, Tensor words, Tensor embedding, Tensor weight, Tensor bias, "
        "int pad_id) -> Tensor");

  // ---- linear over a mask's rows ---------------------------------------------
  // Inference only (no gradient): output [B, T, K] = input[b, t] @ weight^T + bias where
  // mask[b, t], bias (zeros without one) elsewhere, whose input rows are not read (padding:
  // what a zero row gives). The tagger's emission layer on the encoder's output, which is zero
  // past each length (csrc/cpu/masked_linear.cpp: why a kernel). input [B, T, I] float32/float64
  // (any strides), mask bool [B, T], weight [K, I], bias [K] or None, in the input's dtype and
  // device. output contiguous. CPU kernel only: other devices run fastner.reference.masked_linear.
  m.def("masked_linear(Tensor input, Tensor mask, Tensor weight, Tensor? bias) -> Tensor");

  // ---- dropout masks -----------------------------------------------------------
  // A dropout mask shaped and typed like input (any floating dtype; only its shape, dtype and
  // device are read), contiguous: each element 1 / (1 - p) (kept) or 0, decided by 32 bits of
  // splitmix64 drawn from `seed` (csrc/cpu/dropout.cpp: the exact rule), p in [0, 1). The same
  // seed gives the same mask. CPU kernel only: other devices run fastner.reference.dropout_mask.
  m.def("dropout_mask(Tensor input, float p, int seed) -> Tensor");

  // ---- recurrent layers (LSTM / GRU / RNN) ------------------------------------
  // One op call runs one layer, both directions of it when bidirectional. Stacking layers and
  // the dropout between them is Python's job (fastner/nn/rnn.py), so each op stays small.
  //
  // Shared arguments:
  //   mode: 'lstm' (gates i, f, g, o; G = 4), 'gru' (r, z, n; G = 3; n = tanh(W_in x + b_in +
  //         r * (W_hn h + b_hn))), 'rnn_tanh' or 'rnn_relu' (G = 1): torch.nn's formulas.
  //   D = 2 if bidirectional else 1; H = hidden size, read from w_hh.
  //   input: [B, T, I] if batch_first else [T, B, I]; float32 or float64.
  //   lengths: int64 [B] on the same device as input, 0 <= lengths[b] <= T (all T for plain
  //            padded input). Step t of sequence b exists iff t < lengths[b]; the reverse direction
  //            starts at each sequence's own last step. A length-0 sequence outputs zeros and
  //            keeps its initial state.
  //   weights: torch's flat weights of the layer, direction 0 then direction 1:
  //            w_ih [G*H, I], w_hh [G*H, H], then (only when the layer has biases) b_ih [G*H],
  //            b_hh [G*H]; so 2*D entries without bias, 4*D with.
  //   hx: [D, B, H] initial hidden state, None = zeros. cx: [D, B, H] initial cell (lstm only).
  //
  // Forward. output: like input with D*H features (direction d in columns [d*H, (d+1)*H)),
  // zeros past each length. h_n: [D, B, H], each sequence's state after its last step.
  // c_n: [D, B, H] for 'lstm', else an empty tensor [0]. workspace: when training, what the
  // backward reads, [D, B*T, W] on every device, in a layout private to the device's kernels
  // (W from csrc/rnn_layout.h, read by the fake kernel through fastner._C.rnn_workspace_width;
  // recomputing it in backward would repeat the whole forward pass); when not training an
  // empty tensor [0] (inference stores no activations).
  m.def("rnn_layer_forward(Tensor input, Tensor lengths, Tensor[] weights, Tensor? hx, Tensor? cx, "
        "str mode, bool bidirectional, bool batch_first, bool training) -> "
        "(Tensor output, Tensor h_n, Tensor c_n, Tensor workspace)");
  // Backward of rnn_layer_forward(training=True): given the gradients of output (like output),
  // h_n ([D, B, H]) and c_n ([D, B, H] for lstm, else ignored; zeros where unused), returns
  // grad_input (like input), grad_hx [D, B, H], grad_cx ([D, B, H] for lstm, else [0]) and
  // grad_weights (same list structure and shapes as weights).
  m.def("rnn_layer_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor input, "
        "Tensor lengths, Tensor[] weights, Tensor? hx, Tensor? cx, Tensor workspace, str mode, "
        "bool bidirectional, bool batch_first) -> "
        "(Tensor grad_input, Tensor grad_hx, Tensor grad_cx, Tensor[] grad_weights)");
  // Inference-only int8 layer (fastner.nn.quantize(module, torch.qint8)): rnn_layer_forward's
  // arguments and results (no workspace) with input, hx, cx and the biases float32 and w_ih,
  // w_hh quantized per output channel (w ~= w_q * scale[:, None], w_q int8 in [-63, 63]) and
  // packed by rnn_int8_pack: per direction packed w_ih, packed w_hh, then (with bias) b_ih,
  // b_hh. hidden_size: H (the packed tensors' shape does not show it; each packed tensor must
  // have been packed for [G*H, I] or [G*H, H], which its size and header are checked against).
  // Every product quantizes its left rows on the fly (7-bit asymmetric per row); the exact
  // arithmetic is fastner.reference.rnn_layer_int8's (csrc/cpu/rnn_int8.h says why 7 bits).
  // No autograd.
  m.def("rnn_layer_int8_forward(Tensor input, Tensor lengths, Tensor[] weights, int hidden_size, "
        "Tensor? hx, Tensor? cx, str mode, bool bidirectional, bool batch_first) -> "
        "(Tensor output, Tensor h_n, Tensor c_n)");
  // The packed form of one int8 weight, what rnn_layer_int8_forward takes: weight int8 [N, K]
  // with every entry in [-63, 63] (fastner.reference.quantize_weight_int8; ValueError naming
  // the first row outside), scale float32 [N] (w ~= weight * scale[:, None]) -> int8
  // [packed_bytes(N, K)]: a header, the weights in the kernels' panels, their column sums and
  // the scales (the layout: csrc/cpu/rnn_int8.h; fastner.reference.rnn_int8_pack writes the
  // same bytes, rnn_int8_unpack reads them back). Done once per weight, not per forward call.
  m.def("rnn_int8_pack(Tensor weight, Tensor scale) -> Tensor");
}
