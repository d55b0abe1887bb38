"""The int8 targets of issue 14 as ratios, measured interleaved in one process on a busy machine:
fastner int8 `lengths=` vs torch quantize_dynamic nn.LSTM / nn.GRU packed, against the int8
GEMM floor, and the whole tagger at int8 vs the nn.LSTM + pytorch-crf model in fp32 and
quantized by torch. The implementations are `fastner bench`'s own (groups 'precision' and
'tagger'); only the clock differs: at --threads 1 the calling thread's CPU time
(timing.ThreadCpuClock: waiting for a core does not count), at more threads wall time.

    python benchmarks/int8_ratios.py --threads 1
"""
from __future__ import annotations

import argparse
import copy
import os
import warnings

import torch

from fastner.bench import rnn_rows, tagger_rows
from fastner.bench.environment import cpu_flags, cpu_model
from fastner.bench.gemm_rows import rnn_flops
from fastner.bench.timing import Settings, ThreadCpuClock, WallClock, measure_interleaved
from fastner.bench.workloads import TAGGER_RNN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per implementation and row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    clock = ThreadCpuClock() if args.threads == 1 else WallClock()
    settings = Settings(warmup=2, min_samples=7, max_samples=60, budget_s=args.budget)
    print(f"{cpu_model()} {cpu_flags()}; torch {torch.__version__}; {args.threads} thread(s); clock "
          f"{clock.name}; load average {os.getloadavg()[0]:.1f}")

    # The int8 GEMM floor: torch's int8 GEMM (fbgemm, dynamic quantization like ours) at
    # 1024^3, and the layer's GEMM operations at that rate.
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    n = 1024
    linear = DynamicLinear(n, n, bias_=False, dtype=torch.qint8)
    x = torch.randn(n, n)
    rate = 2.0 * n ** 3 / measure_interleaved({"gemm": lambda: linear(x)}, clock, settings)["gemm"].median
    print(f"int8 GEMM (fbgemm linear_dynamic, {n}^3): {rate / 1e9:.1f} Gop/s")

    lengths = TAGGER_RNN.lengths()
    tokens = int(lengths.sum())
    for cell, pair in rnn_rows.classes().items():
        forwards, skipped = rnn_rows.precision_implementations(pair, cell, TAGGER_RNN, lengths)
        wanted = [k for k in ("torch.packed", "torch.int8.packed", "fastner.lengths", "fastner.int8.lengths")
                  if k in forwards]
        calls = {k: _no_grad(forwards[k]) for k in wanted}
        stats = measure_interleaved(calls, clock, settings)
        floor = rnn_flops(cell, TAGGER_RNN.input_size, TAGGER_RNN.hidden, tokens, 2, False) / rate
        line = ", ".join(f"{k} {stats[k].median * 1e3:.2f} ms" for k in wanted)
        print(f"{cell} (B=32 T=40 I=130 H=200, {tokens} tokens): {line}; int8 floor {floor * 1e3:.2f} ms")
        int8 = stats["fastner.int8.lengths"].median
        ratios = [f"x_floor {int8 / floor:.2f}"]
        if "torch.int8.packed" in stats:
            ratios.append(f"vs torch int8 packed {stats['torch.int8.packed'].median / int8:.2f}x")
        print(f"    fastner int8 lengths=: {', '.join(ratios)}")

    model, batch_class = tagger_rows.fastner_tagger(torch.device("cpu"))
    from fastner.bench.baselines import torch_baseline
    from fastner.nn import quantize

    base, _ = torch_baseline(model)
    batches = tagger_rows.make_batches(batch_class, 4, 32, "random", seed=63, device=torch.device("cpu"))
    torch_int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(base), {torch.nn.LSTM, torch.nn.GRU},
                                                         dtype=torch.qint8)
    calls = {"torch+pytorch-crf": tagger_rows._inference(base, batches),
             "torch+pytorch-crf.int8": tagger_rows._inference(torch_int8, batches),
             "fastner": tagger_rows._inference(model, batches),
             "fastner.int8": tagger_rows._inference(quantize(copy.deepcopy(model), torch.qint8), batches)}
    stats = measure_interleaved(calls, clock, settings)
    sentences = sum(int(b.lengths.numel()) for b in batches)
    print("tagger inference (4 batches of 32): " + ", ".join(
        f"{k} {sentences / s.median:.0f} sent/s" for k, s in stats.items()))
    int8 = stats["fastner.int8"].median
    print(f"    fastner int8 vs fp32 torch+pytorch-crf {stats['torch+pytorch-crf'].median / int8:.2f}x, "
          f"vs torch-quantized {stats['torch+pytorch-crf.int8'].median / int8:.2f}x, "
          f"vs fastner fp32 {stats['fastner'].median / int8:.2f}x")
    print(f"load average {os.getloadavg()[0]:.1f}")


def _no_grad(fn):
    def call():
        with torch.no_grad():
            return fn()
    return call


if __name__ == "__main__":
    main()
