"""fastner.nn.CRF at the edges of its input space: no time steps, the meta device, deferred
initialisation (meta, then to_empty), and malformed constructor arguments."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastner.nn
from fastner import ops
from tests import testing

BACKENDS = ("fused", "reference")
LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_first"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_time_steps_decode_to_empty_lists(batch_first, backend):
    # T = 0: every sequence has length 0, which the CRF allows (decoded as []). The empty tags
    # tensor has no data address; decode handed that to the list builder, which refused it.
    crf = fastner.nn.CRF(4, batch_first=batch_first)
    emissions = torch.randn(3, 0, 4) if batch_first else torch.randn(0, 3, 4)
    with testing.backend(backend):
        assert crf.decode(emissions) == [[], [], []]
        assert crf.decode(emissions, mask=torch.zeros(emissions.shape[:2], dtype=torch.bool)) == [[], [], []]
        assert ops.tag_lists(torch.zeros(3, 0, dtype=torch.long), torch.zeros(3, dtype=torch.long)) == [[], [], []]


def _meta_crf(**kwargs):
    with torch.device("meta"):
        return fastner.nn.CRF(len(LABELS), batch_first=True, **kwargs)


def test_to_empty_after_meta_init_rebuilds_the_constraints():
    # Deferred initialisation: build on meta, to_empty(), load the weights. load_state_dict does
    # not restore the (non-persistent) constraint buffers, and to_empty left them uninitialised:
    # decoding then crossed forbidden transitions.
    constraints = fastner.nn.allowed_transitions("BIO", LABELS)
    trained = fastner.nn.CRF(len(LABELS), batch_first=True, constraints=constraints)
    with torch.no_grad():
        for p in trained.parameters():
            p.normal_(0.0, 3.0)
    lazy = _meta_crf(constraints=constraints)
    lazy.to_empty(device="cpu")
    lazy.load_state_dict(trained.state_dict())
    for name in ("transition_constraints", "start_constraints", "end_constraints"):
        assert torch.equal(getattr(lazy, name), getattr(trained, name)), name
    emissions = torch.randn(8, 7, len(LABELS)) * 3
    assert lazy.decode(emissions) == trained.decode(emissions)
    torch.testing.assert_close(lazy.log_partition(emissions), trained.log_partition(emissions))


def test_constraints_follow_dtype_and_device_moves():
    constraints = fastner.nn.allowed_transitions("BIO", LABELS)
    crf = fastner.nn.CRF(len(LABELS), constraints=constraints)
    expected = crf.transition_constraints.clone()
    crf.double()
    assert crf.transition_constraints.dtype == torch.float64
    assert torch.equal(crf.transition_constraints, expected.double())
    crf.to("meta")
    assert crf.transition_constraints.device.type == "meta"
    crf.to_empty(device="cpu").float()
    assert torch.equal(crf.transition_constraints, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_emissions_give_shapes(backend):
    # A meta model (shape inference, deferred init) with a mask or k-best: the reference path
    # read the mask's and the lengths' values, which meta tensors do not have.
    crf = _meta_crf()
    B, T, K = 3, 6, len(LABELS)
    emissions = torch.empty(B, T, K, device="meta")
    tags = torch.zeros(B, T, dtype=torch.long, device="meta")
    mask = torch.ones(B, T, dtype=torch.bool, device="meta")
    with testing.backend(backend):
        assert crf(emissions, tags, mask=mask).shape == ()
        assert crf(emissions, tags, mask=mask, reduction="none").shape == (B,)
        assert crf.log_partition(emissions, mask=mask).shape == (B,)
        tags_v, scores_v = crf.viterbi(emissions, mask=mask)
        assert tags_v.shape == (B, T) and scores_v.shape == (B,)
        tags_k, scores_k = crf.viterbi(emissions, mask=mask, k=2)
        assert tags_k.shape == (B, 2, T) and scores_k.shape == (B, 2)
        assert crf.marginals(emissions, mask=mask).shape == (B, T, K)
        # decode returns Python lists, which need values: a clear refusal, not a copy error
        with pytest.raises(ValueError, match="meta"):
            crf.decode(emissions, mask=mask)


@pytest.mark.parametrize("num_tags", [2.5, "5", None, True])
def test_num_tags_must_be_an_int(num_tags):
    with pytest.raises(TypeError, match="num_tags"):
        fastner.nn.CRF(num_tags)


def test_num_tags_accepts_integer_like_values_as_int():
    for value in (np.int64(3), torch.tensor(3)):
        crf = fastner.nn.CRF(value)
        assert type(crf.num_tags) is int and crf.num_tags == 3
        assert crf.transitions.shape == (3, 3)


@pytest.mark.parametrize("constraints", [
    [(0, 1, 2)], [(0.5, 1)], [(True, 1)], "BIO", [None], {0: 1}, [(0,)],
    np.ones((5, 5), dtype=bool),
], ids=["triple", "float", "bool", "string", "none_pair", "dict", "single", "numpy_matrix"])
def test_malformed_constraints_are_refused_by_name(constraints):
    with pytest.raises((TypeError, ValueError), match="constraint"):
        fastner.nn.CRF(3, constraints=constraints)


def test_constraints_as_a_meta_tensor_are_refused_by_name():
    with pytest.raises(ValueError, match="constraints"):
        fastner.nn.CRF(3, constraints=torch.ones(5, 5, dtype=torch.bool, device="meta"))


def test_constraint_pairs_accept_integer_like_indices():
    pairs = [(np.int64(3), np.int64(0)), (torch.tensor(0), 4)]
    crf = fastner.nn.CRF(3, constraints=pairs)
    same = fastner.nn.CRF(3, constraints=[(3, 0), (0, 4)])
    for name in ("transition_constraints", "start_constraints", "end_constraints"):
        assert torch.equal(getattr(crf, name), getattr(same, name)), name


@pytest.mark.parametrize("k", [0, -1, True, 2.0, "2", None])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kbest_op_refuses_a_k_that_is_no_positive_int(k, backend):
    # Was: None / "2" a TypeError from '<', 2.0 a RuntimeError from the dispatcher, True taken as 1.
    crf = fastner.nn.CRF(3, batch_first=True)
    emissions, lengths = torch.randn(2, 4, 3), torch.tensor([4, 2])
    with testing.backend(backend), pytest.raises(ValueError, match="k must be a positive int"):
        ops.crf_kbest(emissions, lengths, crf.transitions, crf.start_transitions,
                      crf.end_transitions, k)
    if k is not None:
        with pytest.raises(ValueError, match="k must be a positive int"):
            crf.viterbi(emissions, k=k)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_first"])
def test_sequences_without_an_allowed_path_as_documented(batch_first):
    # CRF's docstring: log Z -inf, log-likelihood NaN, an in-range path scored -inf, k-best rows
    # -1 / -inf, zero marginals; the others in the batch untouched; fused == reference.
    K = 3
    # Start only in 0, end only in 1, no transition at all: no path of any length >= 1.
    crf = fastner.nn.CRF(K, batch_first=batch_first, constraints=[(K, 0), (1, K + 1)])
    lengths = torch.tensor([4, 1, 0])
    emissions = testing.to_layout(torch.randn(3, 4, K), batch_first)
    tags = testing.to_layout(torch.zeros(3, 4, dtype=torch.long), batch_first)
    mask = testing.mask_from_lengths(lengths, 4, batch_first)
    results = {}
    for backend in BACKENDS:
        with testing.backend(backend):
            llh = crf(emissions, tags, mask=mask, reduction="none")
            log_z = crf.log_partition(emissions, mask=mask)
            paths = crf.decode(emissions, mask=mask)
            best, score = crf.viterbi(emissions, mask=mask)
            k_tags, k_scores = crf.viterbi(emissions, mask=mask, k=2)
            marginals = testing.to_batch_first(crf.marginals(emissions, mask=mask), batch_first)
        assert torch.isnan(llh[:2]).all() and llh[2] == 0
        assert torch.isneginf(log_z[:2]).all() and log_z[2] == 0
        assert [len(p) for p in paths] == [4, 1, 0] and all(0 <= t < K for p in paths for t in p)
        assert torch.isneginf(score[:2]).all() and score[2] == 0
        assert (k_tags == -1).all() and torch.isneginf(k_scores[:2]).all()
        assert torch.equal(marginals, torch.zeros_like(marginals))
        results[backend] = (paths, best, k_scores)
    assert results["fused"][0] == results["reference"][0]
    assert torch.equal(results["fused"][1], results["reference"][1])
    assert torch.equal(results["fused"][2], results["reference"][2])


@pytest.mark.parametrize("reduction", ["sum", "mean", "token_mean"])
def test_empty_batch_reduces_to_zero_on_both_paths(reduction):
    # The fused op divides 'mean' by max(B, 1); the reference took llh.mean(), NaN for B = 0.
    crf = fastner.nn.CRF(3, batch_first=True)
    emissions = torch.randn(0, 4, 3, requires_grad=True)
    tags = torch.zeros(0, 4, dtype=torch.long)
    for backend in BACKENDS:
        with testing.backend(backend):
            crf.zero_grad(set_to_none=True)
            llh = crf(emissions, tags, reduction=reduction)
            assert llh.item() == 0, backend
            llh.backward()
            assert torch.equal(crf.transitions.grad, torch.zeros(3, 3)), backend


@pytest.mark.parametrize("where", ["emission", "transition"])
@pytest.mark.parametrize("shape", [(2, 4, 3), (33, 20, 17), (5, 7, 300), (9, 6, 5)],
                         ids=["small", "lanes", "wide", "strided"])
def test_nan_scores_decode_and_marginalise_as_nan_on_both_paths(where, shape):
    # It was: the CPU kernels' max comparisons skip NaN silently, so a sequence with a NaN
    # emission (or every sequence of two tokens or more, with a NaN transition score) got a
    # finite best-path score, finite k-best paths and all-zero marginals, where the reference
    # gives NaN.
    B, T, K = shape
    generator = torch.Generator().manual_seed(B * T + K)
    crf = fastner.nn.CRF(K, batch_first=True)
    emissions = torch.randn(B, T, K, generator=generator)
    if shape == (9, 6, 5):  # a time-first view: strided rows
        emissions = torch.randn(T, B, K, generator=generator).transpose(0, 1)
    lengths = torch.randint(1, T + 1, (B,), generator=generator)
    lengths[0] = T
    mask = torch.arange(T)[None] < lengths[:, None]
    with torch.no_grad():
        if where == "emission":
            emissions[0, T - 1, K - 1] = float("nan")
        else:
            crf.transitions[0, K - 1] = float("nan")
    results = {}
    for backend in BACKENDS:
        with testing.backend(backend), torch.no_grad():
            tags, scores = crf.viterbi(emissions, mask)
            k_tags, k_scores = crf.viterbi(emissions, mask, k=2)
            marginals = crf.marginals(emissions, mask)
        results[backend] = scores, k_tags, k_scores, marginals
    # a sequence of one token reads no transition score: its results stay finite
    expected_nan = torch.zeros(B, dtype=torch.bool)
    expected_nan[0 if where == "emission" else lengths > 1] = True
    fused, reference = results["fused"], results["reference"]
    for got, want in zip(fused, reference):  # the reference follows the same NaN contract
        torch.testing.assert_close(got, want, equal_nan=True)
    scores, k_tags, k_scores, marginals = fused
    assert torch.equal(scores.isnan(), expected_nan) and torch.equal(k_scores.isnan().all(1), expected_nan)
    assert (k_tags[expected_nan] == -1).all()
    assert torch.equal(marginals.isnan().all(2), expected_nan[:, None] & mask)
