"""The float32 CPU CRF path: lane kernels (csrc/cpu/crf_lanes_*.cpp), their exact fallback for
sequences the scaled recursion cannot vouch for, crf_forward_backward, and both instruction sets."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import fastner
import fastner.nn
import fastner.ops  # noqa: F401  (fake kernels)
from fastner import reference
from tests import testing
from tests.ops.crf.samples import crf_inputs

pytestmark = pytest.mark.skipif(
    not testing.op_registered("crf_forward_backward"), reason="fastner CRF ops not registered"
)

fb = torch.ops.fastner.crf_forward_backward


def expected_forward_backward(emissions, tags, lengths, transitions, start, end):
    """sum_b (gold_b - log Z_b) and its gradients, by the reference."""
    log_z, gold = reference.crf_forward(emissions, tags, lengths, transitions, start, end)
    ones = torch.ones_like(log_z)
    grads = reference.crf_backward(-ones, ones, emissions, tags, lengths, transitions, start, end)
    return ((gold - log_z).sum(), *grads)


def assert_matches(actual, expected, dtype, scale):
    names = ("log-likelihood", "grad emissions", "grad transitions", "grad start", "grad end")
    for name, a, e in zip(names, actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        testing.assert_close(a, e, dtype, scale=scale, msg=name)


# Batches of 1, a partial group, exactly one AVX-512 group, several groups with a partial one;
# tag counts that are exactly one block of lanes (8, 16), a block and a tail (9, 17, 30), and
# more than 32 (two blocks, and the backtrace's gather path).
SHAPES = [(1, 7, 5), (5, 13, 17), (16, 40, 17), (37, 29, 9), (70, 11, 30), (9, 5, 8), (17, 6, 16),
          (20, 9, 40)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("time_first", [False, True], ids=["batch_first", "time_first"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_forward_backward_matches_reference(shape, time_first, dtype):
    testing.reseed(hash((shape, time_first, str(dtype))) % 1000)
    inputs = crf_inputs(*shape, dtype=dtype, layout="time_first" if time_first else "contiguous")
    actual = fb(*inputs)
    assert_matches(actual, expected_forward_backward(*inputs), dtype, scale=float(inputs[2].sum()) + 1)
    # The same numbers as the two separate ops.
    log_z, gold = torch.ops.fastner.crf_forward(*inputs)
    ones = torch.ones_like(log_z)
    separate = torch.ops.fastner.crf_backward(-ones, ones, *inputs)
    for a, e in zip(actual, ((gold - log_z).sum(), *separate)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-4)


def test_gradient_keeps_the_emissions_layout():
    emissions, tags, lengths, transitions, start, end = crf_inputs(8, 6, 4, layout="time_first")
    grad = fb(emissions, tags, lengths, transitions, start, end)[1]
    assert grad.stride() == emissions.stride()  # a time-first caller gets a time-first gradient


def test_half_precision_emissions():
    emissions, tags, lengths, transitions, start, end = crf_inputs(19, 12, 6)
    half = emissions.half()
    actual = fb(half, tags, lengths, transitions, start, end)
    expected = expected_forward_backward(half.float(), tags, lengths, transitions, start, end)
    assert actual[1].dtype == torch.float16
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.float(), e, rtol=2e-2, atol=2e-2)


def troubled_batch():
    """A batch in which some sequences defeat the scaled recursion (huge emissions that
    constraints make the forced path disagree with, or no allowed path at all) and the rest
    are ordinary: the lanes must hand exactly the former to the exact kernel."""
    testing.reseed(77)
    B, T, K = 21, 15, 6
    emissions, tags, lengths, transitions, start, end = crf_inputs(B, T, K, min_len=1)
    allowed = torch.rand(K, K) > 0.4
    allowed.fill_diagonal_(True)
    transitions = transitions.masked_fill(~allowed, float("-inf"))
    for b in (2, 9, 17):  # each step favours a tag by 200 nats, rarely the constrained successor
        emissions[b] = torch.randn(T, K) * 200
    emissions[20, :, :] = float("-inf")  # no allowed path at all: log Z = -inf, zero gradient
    emissions[20, :, 0] = 0.0
    transitions[0, 0] = float("-inf")
    lengths[20] = T
    tags[20] = 0
    return emissions, tags, lengths, transitions, start, end


def test_troubled_sequences_take_the_exact_path():
    inputs = troubled_batch()
    emissions, tags, lengths, transitions, start, end = inputs
    log_z, gold = torch.ops.fastner.crf_forward(*inputs)
    expected_log_z, expected_gold = reference.crf_forward(*inputs)
    assert torch.equal(torch.isinf(log_z), torch.isinf(expected_log_z))
    finite = torch.isfinite(expected_log_z)
    torch.testing.assert_close(log_z[finite], expected_log_z[finite], rtol=1e-5, atol=1e-3)
    # Gradients of sum(log Z) over the sequences with a finite log Z.
    weight = finite.float()
    grads = torch.ops.fastner.crf_backward(weight, torch.zeros_like(weight), *inputs)
    expected = reference.crf_backward(weight, torch.zeros_like(weight), *inputs)
    for name, a, e in zip(("emissions", "transitions", "start", "end"), grads, expected):
        assert not torch.isnan(a).any(), name
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=name)


def test_viterbi_matches_reference_on_every_group_shape():
    for case, shape in enumerate(SHAPES):
        testing.reseed(500 + case)
        emissions, _, lengths, transitions, start, end = crf_inputs(*shape, layout="time_first" if case % 2 == 1 else "contiguous")
        tags, scores = torch.ops.fastner.crf_viterbi(emissions, lengths, transitions, start, end)
        want_tags, want_scores = reference.crf_viterbi(emissions, lengths, transitions, start, end)
        assert torch.equal(tags, want_tags), shape
        torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-4)


def tied_viterbi_inputs(batch: int, steps: int, num_tags: int, seed: int):
    """Viterbi inputs of small integer scores (exact float sums, so many exact ties) with about a
    third of the transitions, one start and one end tag forbidden (-inf); the first sequence also
    meets a step whose every tag is forbidden (no allowed path: every candidate -inf). Lengths
    spread over [0, T], so that groups run some steps on half their lanes (crf_lanes_impl.h)."""
    generator = torch.Generator().manual_seed(seed)
    def ints(*shape):
        return torch.randint(-2, 3, shape, generator=generator).float()
    emissions, transitions, start, end = (ints(batch, steps, num_tags), ints(num_tags, num_tags),
                                          ints(num_tags), ints(num_tags))
    forbidden = torch.rand(num_tags, num_tags, generator=generator) < 0.33
    transitions = transitions.masked_fill(forbidden, float("-inf"))
    start[0] = end[num_tags - 1] = float("-inf")
    emissions[0, steps // 2] = float("-inf")
    lengths = torch.randint(0, steps + 1, (batch,), generator=generator)
    lengths[0], lengths[-1] = steps, 1
    return emissions, lengths, transitions, start, end


def viterbi_tie_cases():
    # B = 3..48 (groups of 8 and 16 lanes, partial ones), K = one block, a block and a tail,
    # past the one-pass tail (30) and past 32 (the backtrace's transposed columns)
    return [(batch, num_tags) for batch in (3, 8, 9, 16, 17, 33, 48) for num_tags in (5, 17, 30, 40)]


def assert_viterbi_ties_agree():
    """The lane Viterbi against the per-sequence kernel (float64: the same integer sums) and the
    reference: paths equal, ties to the lowest tag, all-forbidden candidates included."""
    for case, (batch, num_tags) in enumerate(viterbi_tie_cases()):
        emissions, lengths, transitions, start, end = tied_viterbi_inputs(batch, 12, num_tags, 700 + case)
        tags, scores = torch.ops.fastner.crf_viterbi(emissions, lengths, transitions, start, end)
        exact_tags, exact_scores = torch.ops.fastner.crf_viterbi(
            emissions.double(), lengths, transitions.double(), start.double(), end.double())
        want_tags, want_scores = reference.crf_viterbi(emissions, lengths, transitions, start, end)
        assert torch.equal(tags, exact_tags), (batch, num_tags)
        assert torch.equal(tags, want_tags), (batch, num_tags)
        assert torch.equal(scores.double(), exact_scores), (batch, num_tags)
        assert torch.equal(scores, want_scores), (batch, num_tags)


def test_viterbi_ties_follow_the_per_sequence_kernel():
    assert_viterbi_ties_agree()


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_results_do_not_depend_on_the_thread_count(threads):
    # 53 sequences = 7 groups of 8 lanes (4 of 16): each thread count gives another split of the
    # groups (csrc/cpu/crf_lanes_host.h, balanced_groups), more threads than groups included.
    emissions, tags, lengths, transitions, start, end = crf_inputs(53, 20, 11)
    def run():
        return (*fb(emissions, tags, lengths, transitions, start, end),
                *torch.ops.fastner.crf_viterbi(emissions, lengths, transitions, start, end))
    with testing.torch_threads(1):
        one = run()
    with testing.torch_threads(threads):
        many = run()
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def half_width_batch(lengths, steps: int, num_tags: int, seed: int):
    """Inputs of len(lengths) sequences with these lengths (crf_inputs' scores)."""
    testing.reseed(seed)
    emissions, tags, _, transitions, start, end = crf_inputs(len(lengths), steps, num_tags)
    return emissions, tags, torch.tensor(lengths, dtype=torch.long), transitions, start, end


def per_sequence_results(emissions, tags, lengths, transitions, start, end):
    """What each sequence gets on its own from the lane kernels: log Z (crf_forward), its rows of
    the training step's emission gradient (crf_forward_backward) and of the marginals."""
    log_z, _ = torch.ops.fastner.crf_forward(emissions, None, lengths, transitions, start, end)
    grad = fb(emissions, tags, lengths, transitions, start, end)[1]
    marginals = torch.ops.fastner.crf_marginals(emissions, lengths, transitions, start, end)
    return log_z, grad, marginals


def assert_half_width_steps_change_no_bits():
    """Once the upper half of a 16-lane group is past its lengths, the scaled passes run their
    vector products on half vectors (crf_lanes_impl.h, half_products_from): each lane computes
    what it did at full width, to the bit. A sequence's log Z, gradient rows and marginals are
    the same in a batch whose short sequences end early (its group runs half steps; with at most
    8 sequences, every step) as among 15 sequences of full length (its group never does)."""
    steps = 24
    cases = [
        # the upper 8 lanes end long before the lower 8 (steps 9.. run half), lengths 0 and 1
        [24, 23, 22, 21, 20, 19, 18, 17, 9, 7, 6, 5, 3, 2, 1, 0],
        [13, 24, 2, 20, 11, 9, 24, 5, 16, 1, 18, 7, 22],  # 13: not a multiple of 16, unsorted
        [24, 3, 17, 9, 12],  # at most 8 sequences: every step on half vectors
        [15] * 16,  # all equal: no half step (half_from = the group's length)
    ]
    for case, lengths in enumerate(cases):
        for num_tags in (5, 17, 30):
            inputs = half_width_batch(lengths, steps, num_tags, 900 + 10 * case + num_tags)
            emissions, tags, _, transitions, start, end = inputs
            together = per_sequence_results(*inputs)
            fillers = crf_inputs(15, steps, num_tags)
            for b, length in enumerate(lengths):
                # x first among 15 full-length sequences: sorted after them (or among them, at
                # full length), lane 8 has the full length, so no step of x runs half width
                alone = per_sequence_results(
                    torch.cat([fillers[0], emissions[b:b + 1]]), torch.cat([fillers[1], tags[b:b + 1]]),
                    torch.tensor([steps] * 15 + [length]), transitions, start, end)
                for name, a, e in zip(("log Z", "gradient", "marginals"), together, alone):
                    assert torch.equal(a[b], e[15]), (lengths, num_tags, b, name)


def test_half_width_steps_change_no_bits():
    assert_half_width_steps_change_no_bits()


@pytest.mark.parametrize("lengths", ["zero_batch", "no_steps", "all_empty", "all_equal", "ragged_17",
                                     "ragged_31", "ragged_33"])
def test_lane_ops_on_edge_batches(lengths):
    # Empty batches and time axes, every length 0, every length T (no half step), and batches
    # that leave a partial group of lanes; every float32 op against the reference.
    steps = 0 if lengths == "no_steps" else 9
    batch = {"zero_batch": 0, "no_steps": 20, "all_empty": 18, "all_equal": 32}.get(lengths)
    batch = batch if batch is not None else int(lengths.split("_")[1])
    testing.reseed(batch * 31 + steps)
    emissions, tags, lengths_t, transitions, start, end = crf_inputs(batch, steps, 17)
    if lengths == "all_empty":
        lengths_t.zero_()
    elif lengths == "all_equal":
        lengths_t.fill_(steps)
    inputs = (emissions, tags, lengths_t, transitions, start, end)
    assert_matches(fb(*inputs), expected_forward_backward(*inputs), torch.float32,
                   scale=float(lengths_t.sum()) + 1)
    log_z, gold = torch.ops.fastner.crf_forward(*inputs)
    want_log_z, want_gold = reference.crf_forward(*inputs)
    torch.testing.assert_close(log_z, want_log_z, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gold, want_gold, rtol=1e-5, atol=1e-4)
    scores_in = (emissions, lengths_t, transitions, start, end)
    tags_out, scores = torch.ops.fastner.crf_viterbi(*scores_in)
    want_tags, want_scores = reference.crf_viterbi(*scores_in)
    assert torch.equal(tags_out, want_tags)
    torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(torch.ops.fastner.crf_marginals(*scores_in),
                               reference.crf_marginals(*scores_in), rtol=1e-4, atol=1e-5)
    crf = fastner.nn.CRF(17, batch_first=True)
    mask = torch.arange(steps).expand(batch, steps) < lengths_t[:, None]
    with torch.no_grad():
        got = crf.decode(emissions, mask)
        with testing.backend("reference"):
            want = crf.decode(emissions, mask)
    assert got == want and len(got) == batch


_AVX2_SCRIPT = r"""
import json, torch, fastner
from fastner import reference
from tests.ops.crf.samples import crf_inputs
from tests.ops.crf.test_crf_lanes import (SHAPES, assert_half_width_steps_change_no_bits,
                                          assert_viterbi_ties_agree, expected_forward_backward,
                                          troubled_batch)
torch.manual_seed(3)
worst = 0.0
for shape in SHAPES:
    inputs = crf_inputs(*shape, layout="time_first" if shape[0] % 2 == 1 else "contiguous")
    got = torch.ops.fastner.crf_forward_backward(*inputs)
    want = expected_forward_backward(*inputs)
    worst = max(worst, max(float((a - e).abs().max()) if a.numel() else 0.0 for a, e in zip(got, want)))
    tags, _ = torch.ops.fastner.crf_viterbi(inputs[0], *inputs[2:])
    assert torch.equal(tags, reference.crf_viterbi(inputs[0], *inputs[2:])[0]), shape
assert_viterbi_ties_agree()
assert_half_width_steps_change_no_bits()
inputs = troubled_batch()
log_z = torch.ops.fastner.crf_forward(*inputs)[0]
want = reference.crf_forward(*inputs)[0]
finite = torch.isfinite(want)
assert torch.equal(torch.isinf(log_z), torch.isinf(want))
torch.testing.assert_close(log_z[finite], want[finite], rtol=1e-5, atol=1e-3)
print(json.dumps({"simd": fastner.backend()["cpu_simd"], "worst": worst}))
"""


def test_avx2_kernels_in_a_subprocess():
    # This machine may prefer AVX-512; FASTNER_CPU_ISA=avx2 makes the other kernels serve.
    env = dict(os.environ, FASTNER_CPU_ISA="avx2")
    root = str(testing.REPO_ROOT)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _AVX2_SCRIPT], env=env, cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["simd"] == "avx2"
    assert result["worst"] < 1e-3, result


def test_backend_reports_the_simd_kernels():
    assert fastner.backend()["cpu_simd"] in ("avx512", "avx2")


def test_long_sequences_on_the_lanes_match_float64():
    # A thousand steps with a batch large enough for the lane kernels (the float64 op is the
    # exact per-sequence kernel): the running log offset and the per-step normalisers hold.
    testing.reseed(91)
    emissions, tags, lengths, transitions, start, end = crf_inputs(5, 1000, 6, min_len=1)
    lengths[0] = 1000
    lanes = fb(emissions, tags, lengths, transitions, start, end)
    exact = fb(emissions.double(), tags, lengths, transitions.double(), start.double(), end.double())
    torch.testing.assert_close(lanes[0].double(), exact[0], rtol=1e-6, atol=1e-3)
    for a, e in zip(lanes[1:], exact[1:]):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-4)
