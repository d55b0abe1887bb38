"""Typed Python entry points to every fastner op, one module per op family.

Each entry point runs the fused kernel (torch.ops.fastner.*) where the extension serves the
device, else the pure-PyTorch reference (fastner/reference.py). Fused ops get a fake kernel
(torch.library.register_fake: torch.compile and torch.export trace through them) and, when
trainable, ONE autograd formula registered at the op's Autograd dispatch key
(fastner/ops/_autograd.py), which eager mode, torch.compile, torch.export and opcheck all use.

The map: where each op lives. Every schema (with shapes and conventions) is in csrc/fastner.cpp;
csrc/README.md and csrc/cuda/README.md point here. Paths below csrc/ and tests/ are relative to
those folders; "crf*.cpp/h" is the CRF's CPU family (binding with the strategy choice, and the
kernels by strategy: exact per-sequence, lanes per ISA).

| op | CPU kernel (fastner::cpu::<family>) | CUDA (fastner::cuda::<family>) | reference | wrapper | tests | benchmark |
|---|---|---|---|---|---|---|
| crf_forward | csrc/cpu/crf*.cpp/h | cuda/crf.cu + kernels/crf.cuh | reference.crf_forward | ops.crf.crf_forward | ops/crf/test_crf_ops, _module, _bruteforce, _stability, _fuzz, _safety, _cuda, _cuda_emulated | fastner/bench/crf_rows.py, benchmarks/bench_crf.py, crf_cuda_bench.py |
| crf_backward | csrc/cpu/crf*.cpp/h | cuda/crf.cu + kernels/crf.cuh (recomputes the forward) | reference.crf_backward | (autograd of crf_forward: ops/crf.py _CRFForward) | ops/crf/test_crf_ops, _autograd, _fuzz, _cuda, _cuda_emulated | as crf_forward (NLL rows) |
| crf_forward_backward | csrc/cpu/crf*.cpp/h (lanes: crf_lanes*.cpp/h) | - | reference.crf_forward + crf_backward | (autograd of crf_log_likelihood) | ops/crf/test_crf_ops, _lanes, _fuzz | fastner/bench/crf_rows.py, benchmarks/crf_step_breakdown.py |
| crf_log_likelihood | value and autograd formula (C++): csrc/cpu/crf_log_likelihood.cpp (every device) | (the same) | reference.crf_forward + ops.crf._reduce | ops.crf.crf_log_likelihood | ops/crf/test_crf_autograd, _module, _compile | fastner/bench/crf_rows.py (NLL step) |
| crf_viterbi | csrc/cpu/crf*.cpp/h | cuda/crf.cu + kernels/crf.cuh | reference.crf_viterbi | ops.crf.crf_viterbi | ops/crf/test_crf_ops, _module, _lanes, _constraints, _fuzz, _cuda, _cuda_emulated | fastner/bench/crf_rows.py (decode), benchmarks/bench_crf.py, crf_cuda_bench.py |
| crf_kbest | csrc/cpu/crf*.cpp/h | cuda/crf.cu + kernels/crf.cuh | reference.crf_kbest | ops.crf.crf_kbest | ops/crf/test_crf_ops, _module, _bruteforce, _lanes_marginals_kbest, _fuzz, _cuda, _cuda_emulated | benchmarks/bench_crf.py |
| crf_marginals | csrc/cpu/crf*.cpp/h | cuda/crf.cu + kernels/crf.cuh | reference.crf_marginals | ops.crf.crf_marginals | ops/crf/test_crf_ops, _module, _bruteforce, _lanes_marginals_kbest, _fuzz, _cuda, _cuda_emulated | benchmarks/bench_crf.py |
| crf_window_probabilities (inference) | csrc/cpu/crf_window.cpp (+ crf_sequence.h's forward) | - (reference) | reference.crf_window_probabilities | ops.crf.crf_window_probabilities (span posteriors: fastner/span_scores.py) | ops/crf/test_crf_window_probabilities | benchmarks/serve_profile.py (spans: posterior probabilities) |
| crf_lengths | csrc/cpu/crf*.cpp/h | - (reference) | reference.crf_lengths | ops.crf.crf_lengths | ops/crf/test_crf_ops, _fuzz | - |
| char_conv_max / _backward | csrc/cpu/char_cnn.cpp | - (reference) | reference.char_conv_max | ops.char_cnn.char_conv_max (module: fastner/models/char_cnn.py) | ops/char_cnn/test_char_cnn_ops | benchmarks/char_cnn_step.py |
| char_embed_conv_max (inference) | csrc/cpu/char_cnn.cpp | - (reference) | reference.char_embed_conv_max | ops.char_cnn.char_embed_conv_max (module: fastner/models/char_cnn.py, eval without gradients) | ops/char_cnn/test_char_embed_conv_max | fastner/bench/tagger_rows.py (inference) |
| masked_linear (inference) | csrc/cpu/masked_linear.cpp | - (reference) | reference.masked_linear | ops.linear.masked_linear (the tagger's emission layer: fastner/models/tagger.py `_project`, eval without gradients) | ops/linear/test_masked_linear | benchmarks/masked_linear.py, fastner/bench/tagger_rows.py (inference) |
| dropout_mask | csrc/cpu/dropout.cpp | - (reference) | reference.dropout_mask | ops.dropout.dropout_mask (module: fastner/models/dropout.py) | ops/dropout/test_dropout_ops | benchmarks/dropout_mask.py |
| rnn_layer_int8_forward | csrc/cpu/rnn.cpp (loop) + rnn_int8.cpp/h (7-bit products, views of packed weights) + rnn_int8_vnni.cpp/h, rnn_int8_amx.cpp/h, rnn_int8_store.h | - (reference) | reference.rnn_layer_int8 | ops.rnn.rnn_layer_int8 (modules: fastner/nn/quantize.py) | ops/rnn/test_rnn_int8, _int8_pack | fastner/bench/precision_rows.py |
| rnn_int8_pack | csrc/cpu/rnn.cpp (binding) + rnn_int8.cpp/h (layout, pack) | - (reference) | reference.rnn_int8_pack (+ rnn_int8_unpack) | ops.rnn.rnn_int8_pack (modules: fastner/nn/quantize.py, once per quantization) | ops/rnn/test_rnn_int8_pack | - |
| rnn_layer_forward / _backward | csrc/cpu/rnn.cpp (+ rnn_cells.inc, rnn_gemm.{h,cpp}, rnn_gemm_avx2.h, rnn_gemm_avx512_bf16.{h,cpp}, rnn_gemm_amx_bf16.{h,cpp}, rnn_math.h), layout: csrc/rnn_layout.h | cuda/rnn.cu + kernels/rnn.cuh | reference.rnn_layer | ops.rnn.rnn_layer (modules: fastner/nn/rnn.py) | ops/rnn/test_rnn_ops, _autograd, _parity, _modules, _fuzz, _safety, _bf16 (bf16 weights, the fp32 GEMM kernels), _cuda, _cuda_emulated | fastner/bench/rnn_rows.py, benchmarks/bench_rnn.py, rnn_cuda_bench.py |

CPU CRF files by role: crf.cpp the binding (checks, the strategy per call, registration);
crf_lanes.h / crf_lanes_impl.h / crf_lanes_avx2.cpp / crf_lanes_avx512.cpp the lane kernels
(float32, B >= 3, sequences side by side in vector lanes) and crf_lanes_host.h their torch side;
crf_sequence.h / crf_sequence_decode.h the per-sequence log-space kernels (float64, B <= 2, and
the exact fallback for the sequences the lanes flag); crf_gold_nan.h the gold path and NaN terms.

Shared: argument checks csrc/checks.h (C++) and fastner/validation.py (fake kernels, reference);
the ISA probe csrc/cpu/cpu_isa.*; autograd plumbing ops/_autograd.py. Tests: one input builder
per family, tests/ops/<family>/samples.py (`sample_inputs(op, device, dtype)`), feeds the
parity, gradcheck, opcheck and CUDA suites; the CUDA emulation headers are
tests/ops/cuda_emulation/. Benchmarks: `python -m fastner bench` (fastner/bench/, workloads and
timing in workloads.py / timing.py); benchmarks/ holds the pytest-benchmark suites and the GPU
scripts.
"""
from fastner.ops.char_cnn import char_conv_max, char_embed_conv_max
from fastner.ops.dropout import dropout_mask
from fastner.ops.linear import masked_linear
from fastner.ops.crf import (crf_forward, crf_kbest, crf_lengths, crf_log_likelihood,
                             crf_marginals, crf_viterbi, crf_window_probabilities, tag_lists)
from fastner.ops.rnn import rnn_int8_pack, rnn_layer, rnn_layer_int8

__all__ = ["char_conv_max", "char_embed_conv_max", "crf_forward", "crf_kbest", "crf_lengths", "crf_log_likelihood",
           "crf_marginals", "crf_viterbi", "crf_window_probabilities", "dropout_mask", "masked_linear",
           "rnn_int8_pack", "rnn_layer", "rnn_layer_int8", "tag_lists"]
