"""Training epochs with fastner.models.CharCNN on the char_conv_max op (csrc/cpu/char_cnn.cpp)
against its previous forward (nn.Conv1d + masked amax + their autograd), in one process,
interleaved: the same recipe, data and seeds, one epoch of each in turn.

    python -m benchmarks.char_cnn_step --train ../shared/data/conll2003/eng.train \\
        --dev ../shared/data/conll2003/eng.testa [--sentences 3000] [--epochs 5] [--threads 2] \\
        [--embeddings glove]

--epochs is at least 2; --embeddings is TrainConfig's (glove, none or a vectors file). Prints
each variant's epoch wall times (the first, warm-up epoch dropped) and the median ratio.
"""
from __future__ import annotations

import argparse

import torch

from fastner.bench.environment import cpu_model
from fastner.bench.baselines import TorchCharCNN
from fastner.data.conll import read_conll
from fastner.models import char_cnn

from benchmarks.interleaved_epochs import epochs_arg, interleaved_epochs, report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True)
    parser.add_argument("--dev", required=True)
    parser.add_argument("--sentences", type=int, default=3000)
    parser.add_argument("--epochs", type=epochs_arg, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--embeddings", default="glove")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train = read_conll(args.train)[: args.sentences]
    dev = read_conll(args.dev)[:200]
    variants = {"conv1d + amax (before)": TorchCharCNN.forward, "char_conv_max": char_cnn.CharCNN.forward}
    seconds = interleaved_epochs(train, dev, char_cnn.CharCNN, variants, args.epochs, args.embeddings)
    print(f"{cpu_model()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"{len(train)} sentences an epoch")
    report(seconds)


if __name__ == "__main__":
    main()
