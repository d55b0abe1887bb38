"""fastner's benchmark scripts and pytest-benchmark suites (run from the repository root).

Every workload (lengths, shapes, inputs) comes from fastner.bench.workloads and every timing
from fastner.bench.timing, the modules behind `fastner bench`:

    python -m pytest benchmarks/bench_crf.py --benchmark-only     # pytest-benchmark suites
    python -m benchmarks.crf_cuda_bench OUT.json                  # CUDA-only rows
    python -m benchmarks.rnn_cuda_bench OUT.json
"""
