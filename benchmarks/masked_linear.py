"""The tagger's emission layer in inference: fastner's masked_linear op (csrc/cpu/masked_linear.cpp)
against what the tagger ran before it (fastner.reference.masked_linear: nonzero, index_select,
addmm and index_copy_ over a bias-filled output) and against F.linear on every row, at the
tagger's shapes; then the whole int8 tagger's predict with each, in one process, interleaved.

    python -m benchmarks.masked_linear [--threads 1] [--rounds 30]

Part 1: microseconds a call (median of 200, thread CPU time at 1 thread, else wall time) for a
batch of 32 CoNLL-like sentences, a bucketed batch of 32, and one sentence. Part 2: the default
tagger (fastner.bench.tagger_rows, random weights) quantized to int8, `predict` over the four
random and four bucketed batches of `fastner bench`'s tagger rows, each variant in turn per round
(the same model; only SequenceTagger._masked_linear differs), with the median of the paired
old / new ratios: on a shared host whose speed drifts by tens of percent over minutes, only
ratios of neighbouring runs mean anything.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from fastner import ops, reference
from fastner.bench.environment import cpu_model
from fastner.bench.tagger_rows import fastner_tagger, make_batches
from fastner.nn import quantize

VARIANTS = {"torch ops (before)": reference.masked_linear, "masked_linear op": ops.masked_linear}


def _clock(threads: int):
    return time.thread_time if threads == 1 else time.perf_counter


def call_times(threads: int, calls: int = 200) -> None:
    clock = _clock(threads)
    weight, bias = torch.randn(17, 400), torch.randn(17)
    torch.manual_seed(0)
    cases = {
        "32 sentences, 1-46 tokens": torch.arange(46) < torch.randint(1, 47, (32, 1)),
        "32 sentences, 10-13 tokens": torch.arange(13) < torch.randint(10, 14, (32, 1)),
        "one sentence, 30 tokens": torch.ones(1, 30, dtype=torch.bool),
    }
    with torch.no_grad():
        for name, mask in cases.items():
            x = torch.randn(*mask.shape, 400) * mask[..., None]
            fns = dict(VARIANTS, **{"F.linear, every row": lambda x, m, w, b: F.linear(x, w, b)})
            row = []
            for label, fn in fns.items():
                for _ in range(20):
                    fn(x, mask, weight, bias)
                times = []
                for _ in range(calls):
                    start = clock()
                    fn(x, mask, weight, bias)
                    times.append(clock() - start)
                row.append(f"{label} {statistics.median(times) * 1e6:.1f} us")
            print(f"  {name} ({int(mask.sum())} tokens): " + ", ".join(row))


def tagger_ratios(threads: int, rounds: int) -> None:
    clock = _clock(threads)
    torch.manual_seed(23)
    model, batch_class = fastner_tagger(torch.device("cpu"))
    tagger = quantize(copy.deepcopy(model), torch.qint8).eval()
    for batching in ("random", "bucketed"):
        batches = make_batches(batch_class, 4, 32, batching, seed=63, device=torch.device("cpu"))

        def predict_all() -> None:
            with torch.no_grad():
                for batch in batches:
                    tagger.predict(batch)

        times = {name: [] for name in VARIANTS}
        for _ in range(rounds):
            for name, fn in VARIANTS.items():
                tagger._masked_linear = fn
                predict_all()  # warm: the first pass after the other variant
                start = clock()
                predict_all()
                predict_all()
                times[name].append((clock() - start) / 2)
        old, new = (times[name] for name in VARIANTS)
        ratios = sorted(o / n for o, n in zip(old, new))
        print(f"  {batching} batches: {statistics.median(old) * 1e3:.2f} ms -> {statistics.median(new) * 1e3:.2f} ms "
              f"a pass of 4 x 32 sentences; paired before / after: median {statistics.median(ratios):.3f} "
              f"(quartiles {ratios[len(ratios) // 4]:.3f}..{ratios[3 * len(ratios) // 4]:.3f})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{cpu_model()}, torch {torch.__version__}, {args.threads} thread(s)")
    print("emission layer, one call (input [B, T, 400] -> 17 tags):")
    call_times(args.threads)
    print("int8 tagger predict, the emission layer's two forms interleaved:")
    tagger_ratios(args.threads, args.rounds)


if __name__ == "__main__":
    main()
