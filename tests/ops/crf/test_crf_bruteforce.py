"""fastner.nn.CRF against brute-force enumeration of every tag path (small K and T).

The oracle here shares nothing with either implementation: it lists all K**L paths of each
sequence, scores each one, and reads log Z, the best path, the k best and the marginals off
that list. Sequences are shorter than T so padding is exercised.
"""
from __future__ import annotations

import pytest
import torch

import fastner.nn
from tests import testing

BACKENDS = ("fused", "reference")


# ---------------------------------------------------------------------------------------------
# the oracle
# ---------------------------------------------------------------------------------------------


def all_paths(num_tags: int, length: int) -> torch.Tensor:
    """Every tag path of `length` steps: [num_tags ** length, length] (one empty path if 0)."""
    if length == 0:
        return torch.zeros(1, 0, dtype=torch.int64)
    axes = torch.meshgrid(*[torch.arange(num_tags)] * length, indexing="ij")
    return torch.stack([a.reshape(-1) for a in axes], dim=1)


def path_scores(emissions, paths, transitions, start, end) -> torch.Tensor:
    """Unnormalised scores [P] of paths [P, L] under emissions [>=L, K]."""
    length = paths.shape[1]
    if length == 0:
        return torch.zeros(1, dtype=emissions.dtype)
    steps = torch.arange(length)
    score = start[paths[:, 0]] + end[paths[:, -1]] + emissions[steps, paths].sum(1)
    if length > 1:
        score = score + transitions[paths[:, :-1], paths[:, 1:]].sum(1)
    return score


class Enumerated:
    """Every path of one sequence with its score; `legal` filters the paths (constraints)."""

    def __init__(self, crf, emissions, length, legal=None):
        num_tags = emissions.shape[-1]
        paths = all_paths(num_tags, length)
        if legal is not None:
            keep = torch.tensor([legal(p.tolist()) for p in paths], dtype=torch.bool)
            paths = paths[keep]
        self.paths = paths
        with torch.no_grad():
            self.scores = path_scores(
                emissions[:length], paths, crf.transitions, crf.start_transitions, crf.end_transitions
            )
        self.length = length
        self.num_tags = num_tags

    def log_z(self):
        return torch.logsumexp(self.scores, 0)

    def best(self):
        i = int(self.scores.argmax())
        return self.paths[i].tolist(), self.scores[i]

    def top(self, k):
        scores, order = self.scores.sort(descending=True)
        return self.paths[order[:k]], scores[:k]

    def score_of(self, path):
        match = (self.paths == torch.tensor(path, dtype=torch.int64)).all(1)
        return self.scores[match][0] if match.any() else None

    def marginals(self, steps):
        out = torch.zeros(steps, self.num_tags, dtype=self.scores.dtype)
        if self.length == 0:
            return out
        probs = (self.scores - self.log_z()).exp()  # [P]
        for t in range(self.length):
            out[t].index_add_(0, self.paths[:, t], probs)
        return out


def random_crf(num_tags, dtype=torch.float64, batch_first=True):
    crf = fastner.nn.CRF(num_tags, batch_first=batch_first)
    with torch.no_grad():
        for p in crf.parameters():
            p.normal_(0.0, 1.0)
    return crf.to(dtype)


def draw_case(batch, steps, num_tags, dtype=torch.float64):
    """emissions [B, T, K] and lengths [B] with every length < T except one, and one length 1."""
    lengths = testing.random_lengths(batch, steps, min_len=1)
    lengths[lengths == steps] = steps - 1
    lengths[0] = steps  # one full row
    emissions = torch.randn(batch, steps, num_tags, dtype=dtype) * 1.5
    return emissions, lengths


SHAPES = [(5, 4, 3), (4, 5, 4), (3, 3, 5), (2, 6, 2)]  # (B, T, K): up to 1024 paths per row


# ---------------------------------------------------------------------------------------------
# unconstrained
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}K{}".format(*s))
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_first"])
def test_log_partition_llh_and_viterbi_by_enumeration(shape, batch_first):
    batch, steps, num_tags = shape
    crf = random_crf(num_tags, batch_first=batch_first)
    emissions, lengths = draw_case(batch, steps, num_tags)
    enum = [Enumerated(crf, emissions[b], int(lengths[b])) for b in range(batch)]
    tags = torch.randint(0, num_tags, (batch, steps))
    mask = testing.mask_from_lengths(lengths, steps, batch_first)
    em_in = testing.to_layout(emissions, batch_first)
    tags_in = testing.to_layout(tags, batch_first)
    expected_log_z = torch.stack([e.log_z() for e in enum])
    expected_llh = torch.stack([e.score_of(tags[b, : int(lengths[b])].tolist()) for b, e in enumerate(enum)]) - expected_log_z
    expected_best = [e.best() for e in enum]
    for name in BACKENDS:
        with testing.backend(name):
            torch.testing.assert_close(crf.log_partition(em_in, mask=mask), expected_log_z, msg=name)
            torch.testing.assert_close(crf(em_in, tags_in, mask=mask, reduction="none"), expected_llh, msg=name)
            assert crf.decode(em_in, mask=mask) == [p for p, _ in expected_best], name
            vtags, vscores = crf.viterbi(em_in, mask=mask)
            vtags = testing.to_batch_first(vtags, batch_first)
            for b, (path, score) in enumerate(expected_best):
                assert vtags[b, : len(path)].tolist() == path and (vtags[b, len(path):] == -1).all(), name
            torch.testing.assert_close(vscores, torch.stack([s for _, s in expected_best]), msg=name)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}K{}".format(*s))
def test_marginals_by_enumeration(shape):
    batch, steps, num_tags = shape
    crf = random_crf(num_tags)
    emissions, lengths = draw_case(batch, steps, num_tags)
    expected = torch.stack([Enumerated(crf, emissions[b], int(lengths[b])).marginals(steps) for b in range(batch)])
    for name in BACKENDS:
        with testing.backend(name):
            torch.testing.assert_close(crf.marginals(emissions, mask=testing.mask_from_lengths(lengths, steps)), expected, msg=name)


@pytest.mark.parametrize("k", [1, 3, 10, 40])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_first"])
def test_kbest_by_enumeration(k, batch_first):
    # lengths 1..3 with K=3: 3, 9 or 27 paths, so k=10 and k=40 exceed some rows' path count
    batch, steps, num_tags = 6, 3, 3
    crf = random_crf(num_tags, batch_first=batch_first)
    emissions = torch.randn(batch, steps, num_tags, dtype=torch.float64) * 1.5
    lengths = torch.tensor([3, 1, 2, 3, 2, 1])
    mask = testing.mask_from_lengths(lengths, steps, batch_first)
    enum = [Enumerated(crf, emissions[b], int(lengths[b])) for b in range(batch)]
    for name in BACKENDS:
        with testing.backend(name):
            tags, scores = crf.viterbi(testing.to_layout(emissions, batch_first), mask=mask, k=k)
            assert tags.shape == (batch, k, steps) and scores.shape == (batch, k), name
            for b, e in enumerate(enum):
                paths, best_scores = e.top(k)
                n = len(best_scores)  # paths that exist
                torch.testing.assert_close(scores[b, :n], best_scores, msg=f"{name} row {b}")
                assert torch.equal(tags[b, :n, : e.length], paths), f"{name} row {b}"
                assert (tags[b, :, e.length:] == -1).all(), f"{name} row {b}: tags past the length"
                # fewer than k paths: the extra rows hold tags -1 and score -inf
                assert (tags[b, n:] == -1).all() and torch.isneginf(scores[b, n:]).all(), f"{name} row {b}"


def test_kbest_with_ties_returns_distinct_paths_with_equal_scores():
    # Every path scores 0: any k distinct paths are a right answer, in any order.
    batch, steps, num_tags, k = 3, 4, 3, 7
    crf = fastner.nn.CRF(num_tags, batch_first=True).double()
    with torch.no_grad():
        for p in crf.parameters():
            p.zero_()
    emissions = torch.zeros(batch, steps, num_tags, dtype=torch.float64)
    lengths = torch.tensor([4, 2, 3])
    mask = testing.mask_from_lengths(lengths, steps)
    for name in BACKENDS:
        with testing.backend(name):
            tags, scores = crf.viterbi(emissions, mask=mask, k=k)
            assert torch.equal(scores, torch.zeros(batch, k, dtype=torch.float64)), name
            for b in range(batch):
                n = int(lengths[b])
                rows = {tuple(r[:n].tolist()) for r in tags[b]}
                assert len(rows) == k, f"{name}: row {b} repeats a path"
                assert all(0 <= t < num_tags for r in rows for t in r), name
                assert (tags[b, :, n:] == -1).all(), name
            # half the tie: a small bonus makes 3 of the 9 length-2 paths best
            em = emissions.clone()
            em[1, 0, 2] = 1.0
            tags2, scores2 = crf.viterbi(em, mask=mask, k=4)
            torch.testing.assert_close(scores2[1], torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64))
            assert {tuple(r[:2].tolist()) for r in tags2[1, :3]} == {(2, 0), (2, 1), (2, 2)}, name
