"""pytest-benchmark suite: fastner.nn.LSTM / GRU / RNN next to torch.nn at the tagger shape.

    python -m pytest benchmarks/bench_rnn.py --benchmark-only
    python -m pytest benchmarks/bench_rnn.py --benchmark-only -k "lstm and inference"

The rows, inputs and implementations are `fastner bench`'s (fastner.bench.rnn_rows and
fastner.bench.workloads: bidirectional, CoNLL-like lengths, fp32); groups are cell x task, so
pytest-benchmark's table puts torch and fastner side by side. test_lstm_inference_sweep adds LSTM
inference on the grid B {1, 8, 32, 128} x H {100, 200, 512} at T 40 (`fastner bench` varies one
of B, H, T at a time). For ratios measured interleaved in
one process, with the GEMM floor, run `fastner bench --only gemm,rnn` instead.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import machine_summary
from fastner.bench import rnn_rows
from fastner.bench.workloads import TAGGER_RNN, RnnShape

CELLS = ("lstm", "gru", "rnn")
TASKS = ("inference", "training")
CPU = torch.device("cpu")


def _timed_call(cell, shape, task, impl):
    lengths = shape.lengths()
    forwards, timed = rnn_rows.implementations(rnn_rows.classes()[cell], shape, lengths, CPU,
                                               task == "training")
    check = rnn_rows.check(forwards)
    assert check == "ok", check  # never time garbage
    return timed(impl), int(lengths.sum())


@pytest.mark.parametrize("impl", rnn_rows.ALL_IMPLS)
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("cell", CELLS)
def test_tagger_shape(benchmark, cell, task, impl):
    step, tokens = _timed_call(cell, TAGGER_RNN, task, impl)
    shape = TAGGER_RNN
    benchmark.group = (f"{cell} {task} (bi, B={shape.batch}, T={shape.seq_len}, "
                       f"I={shape.input_size}, H={shape.hidden}, CoNLL-like lengths)")
    benchmark.extra_info.update(machine_summary())
    benchmark.extra_info.update(useful_tokens=tokens, padded_tokens=shape.batch * shape.seq_len)
    benchmark.pedantic(step, warmup_rounds=2, rounds=15, iterations=1)


@pytest.mark.parametrize("impl", rnn_rows.SWEEP_IMPLS)
@pytest.mark.parametrize("hidden", [100, 200, 512])
@pytest.mark.parametrize("batch", [1, 8, 32, 128])
def test_lstm_inference_sweep(benchmark, batch, hidden, impl):
    shape = RnnShape(batch, TAGGER_RNN.seq_len, TAGGER_RNN.input_size, hidden)
    step, _ = _timed_call("lstm", shape, "inference", impl)
    benchmark.group = f"lstm inference B={batch} H={hidden}"
    benchmark.extra_info.update(machine_summary())
    benchmark.pedantic(step, warmup_rounds=1, rounds=7, iterations=1)
