"""Inputs the benchmarks run on: CoNLL-like sentence lengths and the shapes of each mode.

Sentence lengths follow CoNLL-2003 English (eng.train: 14041 sentences, mean 14.5, median 10,
standard deviation 11.6, longest 113): a gamma distribution with that mean and deviation,
rounded up. Everything is drawn from seeded generators so that runs compare like with like.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch

CONLL_MEAN = 14.5
CONLL_STD = 11.6
CONLL_MAX = 110
_GAMMA_SHAPE = (CONLL_MEAN / CONLL_STD) ** 2
_GAMMA_SCALE = CONLL_STD ** 2 / CONLL_MEAN

LENGTHS_NOTE = (f"CoNLL-like: ceil(gamma(k={_GAMMA_SHAPE:.2f}, theta={_GAMMA_SCALE:.2f})), "
                f"mean ~{CONLL_MEAN}, clipped to [1, T], longest sentence = T")


def _draw_length(rng: random.Random, cap: int) -> int:
    return min(cap, max(1, math.ceil(rng.gammavariate(_GAMMA_SHAPE, _GAMMA_SCALE))))


def conll_like_lengths(batch: int, max_len: int, seed: int) -> torch.Tensor:
    """Sentence lengths [batch] (int64), CoNLL-like, clipped to max_len, the longest = max_len.

    The longest sentence is set to max_len so that a padded batch is exactly max_len long,
    as it is when a batch is padded to its longest sentence.
    """
    if batch < 1 or max_len < 1:
        raise ValueError(f"conll_like_lengths: batch and max_len must be >= 1, got {batch}, {max_len}")
    rng = random.Random(seed)
    lengths = [_draw_length(rng, max_len) for _ in range(batch)]
    lengths[max(range(batch), key=lambda i: lengths[i])] = max_len
    return torch.tensor(lengths, dtype=torch.long)


def uniform_lengths(batch: int, max_len: int, seed: int) -> torch.Tensor:
    """Lengths [batch] uniform in [1, max_len], the first one = max_len."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (batch,), generator=generator)
    lengths[0] = max_len
    return lengths


def full_lengths(batch: int, max_len: int, seed: int = 0) -> torch.Tensor:
    """Lengths [batch], every sequence max_len long (a batch without padding)."""
    return torch.full((batch,), max_len, dtype=torch.long)


LENGTHS = {"uniform": uniform_lengths, "conll": conll_like_lengths, "full": full_lengths}
LENGTHS_NOTES = {"uniform": "uniform in [1, T], the first sequence = T", "conll": LENGTHS_NOTE,
                 "full": "every sequence T long"}


def mask_from_lengths(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """Right-padded bool mask [B, max_len]."""
    return torch.arange(max_len, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


@dataclass(frozen=True)
class CrfBatch:
    """One CRF workload, batch-first: emissions [B, T, K] float32, tags int64 [B, T], lengths
    int64 [B] and the matching bool mask [B, T], all on one device."""

    emissions: torch.Tensor
    tags: torch.Tensor
    lengths: torch.Tensor
    mask: torch.Tensor
    lengths_note: str

    @property
    def shape(self) -> Dict[str, object]:
        B, T, K = self.emissions.shape
        return {"B": B, "T": T, "K": K, "lengths": self.lengths_note,
                "tokens": int(self.lengths.sum())}

    def time_first(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(emissions [T, B, K], tags [T, B], mask [T, B]), contiguous: torchcrf's default layout."""
        return (self.emissions.transpose(0, 1).contiguous(), self.tags.t().contiguous(),
                self.mask.t().contiguous())


def crf_batch(batch: int, seq_len: int, num_tags: int, seed: int, lengths: str = "uniform",
              device: torch.device = torch.device("cpu")) -> CrfBatch:
    """Seeded random CRF inputs; `lengths` is 'uniform', 'conll' or 'full' (see LENGTHS),
    drawn with seed + 1000 (`fastner bench` has drawn its CRF rows this way from the start)."""
    if lengths not in LENGTHS:
        raise ValueError(f"crf_batch: lengths must be one of {sorted(LENGTHS)}, got {lengths!r}")
    generator = torch.Generator().manual_seed(seed)
    emissions = torch.randn(batch, seq_len, num_tags, generator=generator)
    tags = torch.randint(0, num_tags, (batch, seq_len), generator=generator)
    sizes = LENGTHS[lengths](batch, seq_len, seed=seed + 1000)
    return CrfBatch(emissions.to(device), tags.to(device), sizes.to(device),
                    mask_from_lengths(sizes, seq_len).to(device), LENGTHS_NOTES[lengths])


@dataclass(frozen=True)
class RnnShape:
    batch: int
    seq_len: int
    input_size: int
    hidden: int

    def as_dict(self) -> Dict[str, int]:
        return {"B": self.batch, "T": self.seq_len, "input": self.input_size, "H": self.hidden,
                "bidirectional": True, "layers": 1}

    def lengths(self) -> torch.Tensor:
        """This shape's CoNLL-like lengths [B], seeded by the shape (the same in every run)."""
        seed = self.batch * 1_000_003 + self.seq_len * 1009 + self.hidden
        return conll_like_lengths(self.batch, self.seq_len, seed=seed)


# The tagger's encoder: word embedding 100 + char CNN 30 -> BiLSTM of 200, batches of 32.
TAGGER_RNN = RnnShape(batch=32, seq_len=40, input_size=130, hidden=200)


@dataclass(frozen=True)
class Plan:
    """What one run measures; `quick` trades coverage for a run of well under a minute."""

    quick: bool
    crf_shapes: Tuple[Tuple[int, int, int], ...]  # (B, T, K)
    rnn_cells: Tuple[str, ...]
    # (cell, mode) pairs that the sweeps cover; the tagger shape itself runs every cell and mode.
    sweep_cells: Tuple[str, ...]
    sweep_modes: Tuple[str, ...]
    sweep_batch: Tuple[int, ...]
    sweep_hidden: Tuple[int, ...]
    sweep_seq_len: Tuple[int, ...]
    gemm_size: Dict[str, int] = field(default_factory=dict)
    tagger_batches: int = 4
    tagger_train_batch: int = 10  # Ma & Hovy's recipe trains on batches of 10
    tagger_infer_batch: int = 32


def make_plan(quick: bool) -> Plan:
    if quick:
        return Plan(
            quick=True,
            # The CRF's three headline batch sizes (issue 13: 1, 32 and 256, T=40, K=17);
            # B=256 adds ~0.5 s (pytorch-crf's step is ~45 ms there).
            crf_shapes=((1, 40, 17), (32, 40, 17), (256, 40, 17)),
            rnn_cells=("lstm", "gru", "rnn"),
            sweep_cells=("lstm",),
            sweep_modes=("inference",),
            sweep_batch=(8, 32),
            sweep_hidden=(100, 200),
            sweep_seq_len=(20, 40),
            gemm_size={"cpu": 512, "cuda": 2048},
            tagger_batches=1,
        )
    return Plan(
        quick=False,
        crf_shapes=tuple((b, t, k) for b in (1, 32, 256) for t in (40, 128) for k in (9, 17)),
        rnn_cells=("lstm", "gru", "rnn"),
        sweep_cells=("lstm", "gru", "rnn"),
        sweep_modes=("inference", "training"),
        sweep_batch=(1, 8, 32, 128),
        sweep_hidden=(100, 200, 512),
        sweep_seq_len=(20, 40, 80),
        gemm_size={"cpu": 1024, "cuda": 4096},
        tagger_batches=4,
    )


def sweep_shapes(plan: Plan, base: RnnShape = TAGGER_RNN) -> List[Tuple[RnnShape, List[str]]]:
    """Shapes of the one-axis sweeps around `base`, each with the axes whose sweep it is on."""
    axes: Dict[RnnShape, List[str]] = {}

    def add(shape: RnnShape, axis: str) -> None:
        axes.setdefault(shape, []).append(axis)

    for b in plan.sweep_batch:
        add(RnnShape(b, base.seq_len, base.input_size, base.hidden), "B")
    for h in plan.sweep_hidden:
        add(RnnShape(base.batch, base.seq_len, base.input_size, h), "H")
    for t in plan.sweep_seq_len:
        add(RnnShape(base.batch, t, base.input_size, base.hidden), "T")
    return list(axes.items())


def sentence_batches(count: int, batch: int, seed: int, cap: int = CONLL_MAX) -> List[torch.Tensor]:
    """`count` batches of CoNLL-like lengths [batch], each to be padded to its own longest."""
    rng = random.Random(seed)
    return [torch.tensor([_draw_length(rng, cap) for _ in range(batch)], dtype=torch.long)
            for _ in range(count)]

