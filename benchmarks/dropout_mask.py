"""Dropout masks: fastner's dropout_mask op (csrc/cpu/dropout.cpp) against what the tagger used
before (torch.rand + a comparison) and nn.Dropout's draw (Tensor.bernoulli_), at the tagger's
shapes; then, with --train/--dev, default-recipe training epochs with each mask source in one
process, interleaved (the same recipe, data and seeds, one epoch of each in turn).

    python -m benchmarks.dropout_mask [--threads 1] [--train ../shared/data/conll2003/eng.train \\
        --dev ../shared/data/conll2003/eng.testa --sentences 3000 --epochs 7]

--train and --dev go together; --epochs is at least 2. Prints microseconds a mask (median of 200
calls) and each variant's epoch wall times (the first, warm-up epoch dropped) with the median ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastner import ops
from fastner.bench.environment import cpu_model
from fastner.models import dropout as dropout_module

from benchmarks.interleaved_epochs import epochs_arg, interleaved_epochs, report


def torch_rand_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """The tagger's mask before the op (fastner.models.Dropout up to this change)."""
    return torch.rand(x.shape, device=x.device).ge_(p).to(x.dtype).mul_(1.0 / (1.0 - p))


def bernoulli_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """nn.Dropout's draw on the CPU."""
    return torch.empty_like(x).bernoulli_(1.0 - p).div_(1.0 - p)


MASKS = {"torch.rand": torch_rand_mask, "bernoulli_": bernoulli_mask, "dropout_mask op": ops.dropout_mask}


def mask_times(calls: int = 200) -> None:
    # a batch of 10 sentences of up to 31 tokens: the encoder's input [10, 31, 80] and output
    # [10, 31, 400]; the char CNN's embeddings of ~140 words of up to 15 characters [140, 15, 30]
    shapes = [(10, 31, 80), (10, 31, 400), (140, 15, 30)]
    for shape in shapes:
        x = torch.randn(shape)
        row = []
        for name, mask in MASKS.items():
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                mask(x, 0.5)
                times.append(time.perf_counter() - start)
            row.append(f"{name} {statistics.median(times) * 1e6:.1f} us")
        print(f"  {str(list(shape)):16s} ({x.numel():,} elements): " + ", ".join(row))


def epoch_times(train_path: str, dev_path: str, sentences: int, epochs: int) -> None:
    from fastner.data.conll import read_conll

    train = read_conll(train_path)[:sentences]
    dev = read_conll(dev_path)[:200]

    def rand_forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        return x * torch_rand_mask(x, self.p)

    variants = {"torch.rand": rand_forward, "dropout_mask op": dropout_module.Dropout.forward}
    print(f"  training epochs of {len(train)} sentences (default recipe, GloVe):")
    report(interleaved_epochs(train, dev, dropout_module.Dropout, variants, epochs), indent="    ")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train")
    parser.add_argument("--dev")
    parser.add_argument("--sentences", type=int, default=3000)
    parser.add_argument("--epochs", type=epochs_arg, default=7)
    args = parser.parse_args(argv)
    if bool(args.train) != bool(args.dev):  # one without the other would skip the epochs silently
        parser.error("--train and --dev go together")
    torch.set_num_threads(args.threads)
    print(f"{cpu_model()}, torch {torch.__version__}, {args.threads} thread(s)")
    mask_times()
    if args.train and args.dev:
        epoch_times(args.train, args.dev, args.sentences, args.epochs)


if __name__ == "__main__":
    main()
