"""pytest-benchmark suite: fastner.nn.LSTM / GRU / RNN next to torch.nn at the tagger shape.

    python -m pytest benchmarks/bench_rnn.py --benchmark-only
    python -m pytest benchmarks/bench_rnn.py --benchmark-only -k "LSTM and inference"

Groups are cell x task, so pytest-benchmark's table puts torch and fastner side by side.
For ratios measured interleaved in one process (and the GEMM floor), run
benchmarks/rnn_ratios.py instead.
"""
from __future__ import annotations

import pytest

from rnn_ratios import CELLS, TAGGER, VARIANTS, Workload, check_agreement, conll_like_lengths, variant_calls

TASKS = ("inference", "training")


def _workload(cell: str) -> Workload:
    p = TAGGER
    lengths = conll_like_lengths(p["batch"], p["time_len"])
    return Workload(cell, p["batch"], p["time_len"], p["input_size"], p["hidden"], p["bidirectional"], lengths)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("cell", CELLS)
def test_tagger_shape(benchmark, cell, task, variant):
    workload = _workload(cell)
    if variant.startswith("fastner"):
        check_agreement(workload)
    benchmark.group = f"{cell} {task} (bi, B=32, T=40, I=130, H=200, CoNLL-like lengths)"
    benchmark.extra_info.update(
        useful_tokens=workload.useful_tokens, padded_tokens=workload.batch * workload.time_len
    )
    step = variant_calls(workload, task == "training")[variant]
    benchmark.pedantic(step, warmup_rounds=2, rounds=15, iterations=1)


@pytest.mark.parametrize("variant", ["torch padded", "torch packed", "fastner lengths="])
@pytest.mark.parametrize("hidden", [100, 200, 512])
@pytest.mark.parametrize("batch", [1, 8, 32, 128])
def test_lstm_inference_sweep(benchmark, batch, hidden, variant):
    p = TAGGER
    lengths = conll_like_lengths(batch, p["time_len"], seed=batch)
    workload = Workload("LSTM", batch, p["time_len"], p["input_size"], hidden, True, lengths)
    benchmark.group = f"LSTM inference B={batch} H={hidden}"
    step = variant_calls(workload, training=False)[variant]
    benchmark.pedantic(step, warmup_rounds=1, rounds=7, iterations=1)
