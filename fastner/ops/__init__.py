"""Typed Python entry points to every fastner op, one module per op family.

Each entry point runs the fused kernel (torch.ops.fastner.*) where the extension serves the
device, else the pure-PyTorch reference (fastner/reference.py). Fused ops get a fake kernel
(torch.library.register_fake: torch.compile and torch.export trace through them) and, when
trainable, ONE autograd formula registered at the op's Autograd dispatch key
(fastner/ops/_autograd.py), which eager mode, torch.compile, torch.export and opcheck all use.

Where each op lives (schemas, with shapes and conventions: csrc/fastner.cpp):

| op | CPU kernel | CUDA kernel | reference | wrapper | tests |
|---|---|---|---|---|---|
| crf_forward | csrc/cpu/crf.cpp (lanes: crf_lanes_impl.h; per sequence: crf_sequence.h) | csrc/cuda/crf.cu + kernels/crf.cuh | reference.crf_forward | ops.crf.crf_forward | test_crf_ops, test_crf, test_crf_bruteforce, test_crf_stability |
| crf_backward | csrc/cpu/crf.cpp (lanes: crf_lanes_impl.h; per sequence: crf_sequence.h) | csrc/cuda/crf.cu + kernels/crf.cuh | reference.crf_backward | (autograd of crf_forward) | test_crf_ops |
| crf_forward_backward | csrc/cpu/crf.cpp (lanes: crf_lanes_impl.h; per sequence: crf_sequence.h) | - | reference.crf_forward + autograd | (autograd of crf_log_likelihood) | test_crf_ops, test_crf_lanes |
| crf_log_likelihood | value: csrc/cpu/crf_log_likelihood.cpp (any device) | (the same) | reference.crf_forward + ops.crf._reduce | ops.crf.crf_log_likelihood | test_crf, test_crf_ops, test_crf_compile |
| crf_viterbi | csrc/cpu/crf.cpp (lanes: crf_lanes_impl.h; per sequence: crf_sequence_decode.h) | csrc/cuda/crf.cu | reference.crf_viterbi | ops.crf.crf_viterbi | test_crf, test_crf_ops, test_crf_lanes |
| crf_kbest | csrc/cpu/crf.cpp (lanes: crf_lanes_impl.h; per sequence: crf_sequence_decode.h) | csrc/cuda/crf.cu | reference.crf_kbest | ops.crf.crf_kbest | test_crf, test_crf_ops, test_crf_bruteforce, test_crf_lanes_marginals_kbest |
| crf_marginals | csrc/cpu/crf.cpp (lanes: crf_lanes_impl.h; per sequence: crf_sequence.h) | csrc/cuda/crf.cu | reference.crf_marginals | ops.crf.crf_marginals | test_crf, test_crf_ops, test_crf_bruteforce, test_crf_lanes_marginals_kbest |
| crf_lengths | csrc/cpu/crf.cpp | - (reference) | reference.crf_lengths | ops.crf.crf_lengths | test_crf_ops, test_crf |
| rnn_layer_int8_forward | csrc/cpu/rnn.cpp (loop) + rnn_int8.cpp (7-bit products) | - (reference) | reference.rnn_layer_int8 | ops.rnn.rnn_layer_int8 | test_rnn_int8 |
| rnn_layer_forward / _backward | csrc/cpu/rnn.cpp (+ rnn_cells.inc, rnn_gemm.{h,cpp}, rnn_gemm_avx2.h, rnn_math.h) | csrc/cuda/rnn.cu + kernels/rnn.cuh | reference.rnn_layer | ops.rnn.rnn_layer | test_rnn_ops, test_rnn_parity, test_rnn_modules, test_rnn_bf16 (bf16 weights, the fp32 GEMM kernels) |

CPU CRF files by role: crf.cpp the binding (checks, the strategy per call, registration);
crf_lanes.h / crf_lanes_impl.h / crf_lanes_avx2.cpp / crf_lanes_avx512.cpp the lane kernels
(float32, B >= 3, sequences side by side in vector lanes) and crf_lanes_host.h their torch side;
crf_sequence.h / crf_sequence_decode.h the per-sequence log-space kernels (float64, B <= 2, and
the exact fallback for the sequences the lanes flag); crf_gold_nan.h the gold path and NaN terms.

CUDA: tests/ops/crf/test_crf_cuda.py, test_rnn_cuda.py (on a GPU), test_*_cuda_emulated.py (the kernels
on host threads). Benchmarks: `fastner bench` (fastner/bench/crf_rows.py, rnn_rows.py),
benchmarks/bench_crf.py, bench_rnn.py, crf_cuda_bench.py, rnn_cuda_bench.py.
"""
from fastner.ops.crf import (crf_forward, crf_kbest, crf_lengths, crf_log_likelihood,
                             crf_marginals, crf_viterbi, tag_lists)
from fastner.ops.rnn import rnn_layer, rnn_layer_int8

__all__ = ["crf_forward", "crf_kbest", "crf_lengths", "crf_log_likelihood", "crf_marginals",
           "crf_viterbi", "rnn_layer", "rnn_layer_int8", "tag_lists"]
