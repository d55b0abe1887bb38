"""Default-recipe training epochs of variants of one module's forward, in one process,
interleaved: one Trainer per variant (the same recipe, data and seed), then for each epoch one
epoch of each variant in turn, the module's forward swapped in for it. Used by
benchmarks/char_cnn_step.py and benchmarks/dropout_mask.py."""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from typing import Callable, Dict, List, Sequence

import fastner.train as train_module
from fastner.data.conll import Sentence


def interleaved_epochs(train: Sequence[Sentence], dev: Sequence[Sentence], module_class: type,
                       variants: Dict[str, Callable], epochs: int, embeddings: str = "glove") -> Dict[str, List[float]]:
    """Seconds of each epoch of each variant (variant name -> module_class.forward to use);
    module_class.forward is restored afterwards. epochs >= 2: report() drops the first epoch."""
    if epochs < 2:  # checked before the minutes of training, not when report() finds no epochs
        raise ValueError(f"interleaved_epochs: epochs must be >= 2 (the first is warm-up), got {epochs}")
    with contextlib.ExitStack() as stack:  # the trainers' output folders, removed afterwards
        trainers = {name: train_module.Trainer(train, dev, stack.enter_context(tempfile.TemporaryDirectory()),
                                               train_module.TrainConfig(embeddings=embeddings, epochs=epochs),
                                               progress=train_module.Progress(io.StringIO()), log=lambda line: None)
                    for name in variants}
        return _time_epochs(trainers, module_class, variants, epochs)


def _time_epochs(trainers, module_class: type, variants: Dict[str, Callable], epochs: int) -> Dict[str, List[float]]:
    seconds: Dict[str, List[float]] = {name: [] for name in variants}
    original = module_class.forward
    try:
        for epoch in range(epochs):
            for name, forward in variants.items():
                module_class.forward = forward
                start = time.perf_counter()
                trainers[name].train_epoch(epoch)
                seconds[name].append(time.perf_counter() - start)
    finally:
        module_class.forward = original
    return seconds


def epochs_arg(text: str) -> int:
    """argparse type of --epochs: an integer >= 2 (the first epoch is warm-up, not reported)."""
    epochs = int(text)
    if epochs < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2 (the first epoch is warm-up), got {epochs}")
    return epochs


def report(seconds: Dict[str, List[float]], indent: str = "  ") -> None:
    """Each variant's epoch times without the first (warm-up) epoch, and the first variant's
    median over the second's."""
    for name, times in seconds.items():
        print(f"{indent}{name:24s} " + " ".join(f"{t:.2f}" for t in times[1:]) + " s")
    before, after = (statistics.median(times[1:]) for times in list(seconds.values())[:2])
    print(f"{indent}median epoch: {before:.2f} s -> {after:.2f} s ({before / after:.2f}x)")
