"""fastner bench: times every fused path against what users run today (pytorch-crf, torch.nn
padded and packed, fastner's own reference path), with a table, JSON and plots.

    python -m fastner.bench [--quick] [--json FILE] [--plot DIR] [--device cpu|cuda|all]
                            [--only crf,rnn,tagger,gemm] [--threads N]
"""
from fastner.bench.cli import main

__all__ = ["main"]
