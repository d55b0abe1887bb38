"""The lane kernels beyond forward-backward and Viterbi: posterior marginals (with the exact
per-sequence fallback for the sequences whose normaliser underflows) and k-best Viterbi (bit-equal
to the per-sequence kernel, ties included); groups formed in length order (a permutation of the
batch permutes every per-sequence result, bit for bit); NaN scores, which the lanes flag so that
only flagged sequences are scanned for NaN; thread-count determinism."""
from __future__ import annotations

import pytest
import torch

from fastner import reference
from tests import testing
from tests.ops.crf.samples import crf_inputs
from tests.ops.crf.test_crf_lanes import SHAPES, troubled_batch

pytestmark = pytest.mark.skipif(
    not testing.op_registered("crf_marginals"), reason="fastner CRF ops not registered"
)

ops = torch.ops.fastner

# Beyond test_crf_lanes.SHAPES: one tag, two tags, a batch of exactly 3 (the smallest the lanes
# take), and sequences of length 1.
MORE_SHAPES = [(3, 4, 1), (4, 1, 2), (3, 9, 17), (11, 1, 5), (33, 40, 17)]


@pytest.mark.parametrize("shape", SHAPES + MORE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("time_first", [False, True], ids=["batch_first", "time_first"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_marginals_match_reference(shape, time_first, dtype):
    testing.reseed(hash(("marginals", shape, time_first, str(dtype))) % 1000)
    emissions, _, lengths, transitions, start, end = crf_inputs(*shape, dtype, layout="time_first" if time_first else "contiguous")
    got = ops.crf_marginals(emissions, lengths, transitions, start, end)
    want = reference.crf_marginals(emissions, lengths, transitions, start, end)
    assert got.shape == want.shape and got.dtype == want.dtype
    testing.assert_close(got, want, dtype, msg=str(shape))
    # Zeros past each length, rows summing to 1 inside it.
    steps = torch.arange(shape[1])
    inside = steps[None, :] < lengths[:, None]
    assert torch.equal(got[~inside], torch.zeros_like(got[~inside]))
    sums = got.sum(-1)[inside]
    torch.testing.assert_close(sums, torch.ones_like(sums), rtol=1e-4, atol=1e-4)


def test_marginals_of_troubled_sequences_take_the_exact_path():
    # Huge emissions against constraints and a sequence without any allowed path: the lanes flag
    # them and the exact per-sequence kernel computes their marginals; the rest stay on lanes.
    emissions, _, lengths, transitions, start, end = troubled_batch()
    got = ops.crf_marginals(emissions, lengths, transitions, start, end)
    want = reference.crf_marginals(emissions.double(), lengths, transitions.double(), start.double(),
                                   end.double())
    possible = torch.isfinite(reference.crf_forward(emissions, None, lengths, transitions, start, end)[0])
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got[possible].double(), want[possible], rtol=1e-4, atol=1e-4)
    assert torch.equal(got[~possible], torch.zeros_like(got[~possible]))


def test_marginals_of_mixed_lengths_match_float64():
    # Many groups of mixed lengths (0 included): float32 on the lanes against the float64 kernel.
    testing.reseed(13)
    emissions, _, lengths, transitions, start, end = crf_inputs(45, 37, 9)
    lengths[::7] = 0
    got = ops.crf_marginals(emissions, lengths, transitions, start, end)
    want = ops.crf_marginals(emissions.double(), lengths, transitions.double(), start.double(),
                             end.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_per_sequence_results_follow_a_permutation_of_the_batch():
    # The lanes take the sequences in length order, whatever order the batch is in: each
    # sequence's results are the same numbers wherever it sits.
    testing.reseed(29)
    emissions, tags, lengths, transitions, start, end = crf_inputs(27, 18, 7)
    perm = torch.randperm(27)
    permuted = (emissions[perm], tags[perm], lengths[perm])
    log_z = ops.crf_forward(emissions, tags, lengths, transitions, start, end)[0]
    log_z_p = ops.crf_forward(*permuted, transitions, start, end)[0]
    assert torch.equal(log_z[perm], log_z_p)
    grad = ops.crf_forward_backward(emissions, tags, lengths, transitions, start, end)[1]
    grad_p = ops.crf_forward_backward(*permuted, transitions, start, end)[1]
    assert torch.equal(grad[perm], grad_p)
    marginals = ops.crf_marginals(emissions, lengths, transitions, start, end)
    marginals_p = ops.crf_marginals(permuted[0], permuted[2], transitions, start, end)
    assert torch.equal(marginals[perm], marginals_p)
    best, scores = ops.crf_viterbi(emissions, lengths, transitions, start, end)
    best_p, scores_p = ops.crf_viterbi(permuted[0], permuted[2], transitions, start, end)
    assert torch.equal(best[perm], best_p) and torch.equal(scores[perm], scores_p)


@pytest.mark.parametrize("where", ["first", "middle", "last", "past_length"])
def test_nan_emissions_on_the_lanes(where):
    # A NaN emission inside a length makes that sequence's log Z NaN (and only that one's);
    # past the length it changes nothing.
    testing.reseed(41)
    emissions, tags, lengths, transitions, start, end = crf_inputs(19, 12, 6, min_len=3)
    lengths[5] = 9
    step = {"first": 0, "middle": 4, "last": 8, "past_length": 10}[where]
    emissions[5, step, 3] = float("nan")
    log_z = ops.crf_forward(emissions, tags, lengths, transitions, start, end)[0]
    total, grad, *grads = ops.crf_forward_backward(emissions, tags, lengths, transitions, start, end)
    others = torch.arange(19) != 5
    assert not torch.isnan(log_z[others]).any()
    if where == "past_length":
        assert not torch.isnan(log_z).any() and not torch.isnan(total)
        assert not any(torch.isnan(g).any() for g in (grad, *grads))
    else:
        assert torch.isnan(log_z[5]) and torch.isnan(total)
        assert torch.isnan(grad[5, :9]).all() and not torch.isnan(grad[others]).any()
        assert all(torch.isnan(g).all() for g in grads)


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_marginals_do_not_depend_on_the_thread_count(threads):
    testing.reseed(7)
    emissions, _, lengths, transitions, start, end = crf_inputs(53, 20, 11)
    with testing.torch_threads(1):
        one = ops.crf_marginals(emissions, lengths, transitions, start, end)
    with testing.torch_threads(threads):
        many = ops.crf_marginals(emissions, lengths, transitions, start, end)
    assert torch.equal(one, many)


# ---- k-best Viterbi on the lanes ------------------------------------------------------------

def kbest_one_by_one(emissions, lengths, transitions, start, end, k):
    """crf_kbest a sequence at a time: batches of one take the per-sequence kernel."""
    rows = [ops.crf_kbest(emissions[b:b + 1], lengths[b:b + 1], transitions, start, end, k)
            for b in range(emissions.shape[0])]
    return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])


@pytest.mark.parametrize("shape", SHAPES + MORE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("k", [1, 3, 7])
def test_kbest_on_the_lanes_equals_the_per_sequence_kernel(shape, k):
    # The same candidates in the same order: bit-equal scores and the same paths, with mixed
    # lengths (0 included), -inf constraints, and a time-first layout for odd batches.
    testing.reseed(hash(("kbest", shape, k)) % 1000)
    layout = "time_first" if shape[0] % 2 else "contiguous"
    emissions, _, lengths, transitions, start, end = crf_inputs(*shape, constrained=True,
                                                                layout=layout)
    tags, scores = ops.crf_kbest(emissions, lengths, transitions, start, end, k)
    want_tags, want_scores = kbest_one_by_one(emissions, lengths, transitions, start, end, k)
    assert torch.equal(scores, want_scores) and torch.equal(tags, want_tags), shape
    ref_tags, ref_scores = reference.crf_kbest(emissions, lengths, transitions, start, end, k)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-4)


def test_kbest_ties_keep_the_per_sequence_order():
    # Integer scores make many paths tie: the lanes must rank tied paths as the per-sequence
    # kernel does (the candidate offered first stays ahead).
    testing.reseed(5)
    emissions = torch.randint(-2, 3, (19, 9, 4)).float()
    lengths = testing.random_lengths(19, 9, min_len=0)
    transitions = torch.randint(-1, 2, (4, 4)).float()
    start, end = torch.zeros(4), torch.randint(-1, 2, (4,)).float()
    for k in (2, 5, 12):
        tags, scores = ops.crf_kbest(emissions, lengths, transitions, start, end, k)
        want_tags, want_scores = kbest_one_by_one(emissions, lengths, transitions, start, end, k)
        assert torch.equal(scores, want_scores) and torch.equal(tags, want_tags), k


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_kbest_does_not_depend_on_the_thread_count(threads):
    testing.reseed(8)
    emissions, _, lengths, transitions, start, end = crf_inputs(53, 20, 11)
    with testing.torch_threads(1):
        one = ops.crf_kbest(emissions, lengths, transitions, start, end, 4)
    with testing.torch_threads(threads):
        many = ops.crf_kbest(emissions, lengths, transitions, start, end, 4)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])
