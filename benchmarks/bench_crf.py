"""CRF benchmarks: fastner (fused) vs pytorch-crf vs fastner's reference path.

    python -m pytest benchmarks/bench_crf.py --benchmark-only
    python -m pytest benchmarks/bench_crf.py --benchmark-only -k "B32 and T40 and K17"

Each group holds the three implementations of one task at one shape, so the table pytest-benchmark
prints per group reads as ratios. fp32, random lengths in [1, T] with one full-length sequence.
The machine is recorded in each benchmark's extra_info and in the saved machine_info.
"""
from __future__ import annotations

import os

import pytest
import torch
import torchcrf

import fastner.nn
from benchmarks.conftest import machine_summary

BATCHES = (1, 32, 256)
STEPS = (40, 128)
NUM_TAGS = (9, 17)
IMPLS = ("fastner", "pytorch-crf", "reference")


def make_inputs(batch, steps, num_tags, seed=0):
    gen = torch.Generator().manual_seed(seed + 1000 * batch + steps + num_tags)
    emissions = torch.randn(steps, batch, num_tags, generator=gen)  # time-first: both modules' default
    tags = torch.randint(0, num_tags, (steps, batch), generator=gen)
    lengths = torch.randint(1, steps + 1, (batch,), generator=gen)
    lengths[0] = steps
    mask = (torch.arange(steps).unsqueeze(1) < lengths.unsqueeze(0)).contiguous()  # [T, B]
    return emissions, tags, mask


def make_crf(impl, num_tags):
    torch.manual_seed(0)
    theirs = torchcrf.CRF(num_tags)
    if impl == "pytorch-crf":
        return theirs
    ours = fastner.nn.CRF(num_tags)
    ours.load_state_dict(theirs.state_dict())
    return ours


class _Backend:
    """FASTNER_BACKEND for the timed calls (fastner reads it at every call)."""

    def __init__(self, impl):
        self.value = "reference" if impl == "reference" else None

    def __enter__(self):
        self.old = os.environ.get("FASTNER_BACKEND")
        if self.value is not None:
            os.environ["FASTNER_BACKEND"] = self.value

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("FASTNER_BACKEND", None)
        else:
            os.environ["FASTNER_BACKEND"] = self.old


def _shape_id(b, t, k):
    return f"B{b}-T{t}-K{k}"


SHAPES = [(b, t, k) for b in BATCHES for t in STEPS for k in NUM_TAGS]


def _label(benchmark, task, impl, shape):
    b, t, k = shape
    benchmark.group = f"crf {task} {_shape_id(b, t, k)}"
    benchmark.extra_info.update(machine_summary())
    benchmark.extra_info.update(dict(task=task, impl=impl, B=b, T=t, K=k))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: _shape_id(*s))
def test_nll_forward_backward(benchmark, impl, shape):
    b, t, k = shape
    _label(benchmark, "nll fwd+bwd", impl, shape)
    crf = make_crf(impl, k)
    emissions, tags, mask = make_inputs(b, t, k)
    emissions.requires_grad_(True)

    def step():
        emissions.grad = None
        crf.zero_grad(set_to_none=True)
        (-crf(emissions, tags, mask=mask)).backward()

    with _Backend(impl):
        benchmark(step)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: _shape_id(*s))
def test_decode(benchmark, impl, shape):
    b, t, k = shape
    _label(benchmark, "decode", impl, shape)
    crf = make_crf(impl, k)
    emissions, _, mask = make_inputs(b, t, k)

    def step():
        with torch.no_grad():
            return crf.decode(emissions, mask=mask)

    with _Backend(impl):
        benchmark(step)
