"""CRF benchmarks: fastner (fused) vs pytorch-crf vs fastner's reference path.

    python -m pytest benchmarks/bench_crf.py --benchmark-only
    python -m pytest benchmarks/bench_crf.py --benchmark-only -k "B32 and T40 and K17"

Each group holds the three implementations of one task at one shape, so the table pytest-benchmark
prints per group reads as ratios. The inputs are `fastner bench`'s (fastner.bench.workloads.
crf_batch: fp32, lengths uniform in [1, T] with one full-length sequence), time-first (both
modules' default layout). The machine is recorded in each benchmark's extra_info and in the
saved machine_info.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torchcrf

import fastner.nn
from benchmarks.conftest import machine_summary
from fastner.bench.rows import forced_reference
from fastner.bench.workloads import crf_batch

BATCHES = (1, 32, 256)
STEPS = (40, 128)
NUM_TAGS = (9, 17)
IMPLS = ("fastner", "pytorch-crf", "reference")
SHAPES = [(b, t, k) for b in BATCHES for t in STEPS for k in NUM_TAGS]


def make_crf(impl, num_tags):
    torch.manual_seed(0)
    theirs = torchcrf.CRF(num_tags)
    if impl == "pytorch-crf":
        return theirs
    ours = fastner.nn.CRF(num_tags)
    ours.load_state_dict(theirs.state_dict())
    return ours


def backend(impl):
    """FASTNER_BACKEND=reference around the timed calls of the reference implementation."""
    return forced_reference() if impl == "reference" else contextlib.nullcontext()


def _shape_id(b, t, k):
    return f"B{b}-T{t}-K{k}"


def _inputs(shape):
    b, t, k = shape
    return crf_batch(b, t, k, seed=1000 * b + t + k).time_first()


def _label(benchmark, task, impl, shape):
    b, t, k = shape
    benchmark.group = f"crf {task} {_shape_id(b, t, k)}"
    benchmark.extra_info.update(machine_summary())
    benchmark.extra_info.update(dict(task=task, impl=impl, B=b, T=t, K=k))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: _shape_id(*s))
def test_nll_forward_backward(benchmark, impl, shape):
    _label(benchmark, "nll fwd+bwd", impl, shape)
    crf = make_crf(impl, shape[2])
    emissions, tags, mask = _inputs(shape)
    emissions.requires_grad_(True)

    def step():
        emissions.grad = None
        crf.zero_grad(set_to_none=True)
        (-crf(emissions, tags, mask=mask)).backward()

    with backend(impl):
        benchmark(step)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: _shape_id(*s))
def test_decode(benchmark, impl, shape):
    _label(benchmark, "decode", impl, shape)
    crf = make_crf(impl, shape[2])
    emissions, _, mask = _inputs(shape)

    def step():
        with torch.no_grad():
            return crf.decode(emissions, mask=mask)

    with backend(impl):
        benchmark(step)
