// Every fastner op schema, in one place. Kernels register per dispatch key in
// csrc/cpu/<op>.cpp (CPU) and csrc/cuda/<op>.cu (CUDA); the Python side
// (fastner/ops.py) adds fake kernels and autograd formulas.
//
// Conventions shared by all ops:
//   * batch-first, contiguous tensors; the Python modules transpose where needed;
//   * lengths: int64 [B] on the same device as the data, 0 <= lengths[b] <= T;
//   * ops that training needs return what their backward reads; the backward is its own op.
#include <torch/library.h>

#ifndef FASTNER_NO_PYTHON
#include <Python.h>
// Importing fastner._C from Python runs the static TORCH_LIBRARY registrations below;
// the module itself exposes nothing. (The CMake build for C++ users defines FASTNER_NO_PYTHON.)
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
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
  // Forward algorithm: log_z [B], the gold path's score [B] (zeros when tags is None), and
  // alphas [B, T, K], the log forward variables that crf_backward reads.
  m.def("crf_forward(Tensor emissions, Tensor? tags, Tensor lengths, Tensor transitions, "
        "Tensor start_transitions, Tensor end_transitions) -> (Tensor log_z, Tensor gold_score, Tensor alphas)");
  // Fused backward of crf_forward by forward-backward: the gradients of
  // sum(grad_log_z * log_z + grad_gold_score * gold_score) w.r.t. emissions, transitions,
  // start_transitions and end_transitions, in one pass over time.
  m.def("crf_backward(Tensor grad_log_z, Tensor grad_gold_score, Tensor emissions, Tensor? tags, "
        "Tensor lengths, Tensor transitions, Tensor start_transitions, Tensor end_transitions, "
        "Tensor log_z, Tensor alphas) -> (Tensor grad_emissions, Tensor grad_transitions, "
        "Tensor grad_start_transitions, Tensor grad_end_transitions)");
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

  // ---- recurrent layers (LSTM / GRU / RNN) ------------------------------------
  // (schemas: see the RNN block)
}
