"""Numerical stability: long sequences, large-magnitude emissions, -inf transitions.

Each case runs in float32 on both paths and is compared with the float64 reference path;
values and gradients must be finite (no NaN) where the answer is finite.
"""
from __future__ import annotations

import pytest
import torch

from tests import testing
from tests.ops.crf.samples import crf_holding

BACKENDS = ("fused", "reference")


def run(crf, emissions, tags, mask):
    """llh [B], the 4 gradients of llh.sum(), viterbi (tags, scores), log Z."""
    crf.zero_grad(set_to_none=True)
    em = emissions.clone().requires_grad_(True)
    llh = crf(em, tags, mask=mask, reduction="none")
    llh.sum().backward()
    grads = (em.grad, crf.transitions.grad, crf.start_transitions.grad, crf.end_transitions.grad)
    with torch.no_grad():
        vtags, vscores = crf.viterbi(emissions, mask=mask)
        log_z = crf.log_partition(emissions, mask=mask)
    return llh.detach(), grads, vtags, vscores, log_z


def gold_score(emissions, tags, lengths, transitions, start, end):
    """Float64 score of tag paths [B, T] (entries past each length ignored)."""
    out = []
    for b in range(emissions.shape[0]):
        n = int(lengths[b])
        path = tags[b, :n]
        s = start[path[0]] + end[path[-1]] + emissions[b, torch.arange(n), path].sum()
        s = s + transitions[path[:-1], path[1:]].sum()
        out.append(s)
    return torch.stack(out)


def check_against_float64(emissions, tags, lengths, transitions, start, end, rtol, backends=BACKENDS):
    mask = testing.mask_from_lengths(lengths, emissions.shape[1])
    crf64 = crf_holding(transitions.double(), start.double(), end.double())
    with testing.backend("reference"):
        llh64, grads64, _, best64, log_z64 = run(crf64, emissions.double(), tags, mask)
    assert torch.isfinite(llh64).all()
    crf32 = crf_holding(transitions, start, end)
    for name in backends:
        with testing.backend(name):
            llh, grads, vtags, vscores, log_z = run(crf32, emissions, tags, mask)
        assert torch.isfinite(llh).all() and torch.isfinite(log_z).all() and torch.isfinite(vscores).all(), name
        for g in grads:
            assert not torch.isnan(g).any(), f"{name}: NaN in a gradient"
        scale = float(log_z64.abs().max()) + 1.0
        torch.testing.assert_close(log_z.double(), log_z64, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: log Z: {m}")
        torch.testing.assert_close(llh.double(), llh64, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: llh: {m}")
        torch.testing.assert_close(vscores.double(), best64, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: viterbi score: {m}")
        # the decoded path really scores what viterbi says (recomputed in float64); near-ties
        # over thousands of steps may pick another path of (nearly) the same score
        recomputed = gold_score(emissions.double(), vtags.clamp(min=0), lengths, transitions.double(), start.double(), end.double())
        torch.testing.assert_close(recomputed, best64, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: decoded path's score: {m}")
        for what, g, g64 in zip(("emissions", "transitions", "start", "end"), grads, grads64):
            finite = torch.isfinite(g64)
            assert torch.equal(torch.isfinite(g), finite), f"{name}: {what}.grad"
            # emission gradients are differences of probabilities; the parameters' sum over tokens
            atol = 5e-3 if what == "emissions" else 5e-3 * float(lengths.sum()) ** 0.5
            torch.testing.assert_close(
                g[finite].double(), g64[finite], rtol=1e-3, atol=atol, msg=lambda m: f"{name}: {what}.grad: {m}"
            )


def random_params(num_tags, scale=0.5):
    return (torch.randn(num_tags, num_tags) * scale, torch.randn(num_tags) * scale, torch.randn(num_tags) * scale)


def test_long_sequences():
    # float32 over a thousand steps against the float64 reference (whose autograd backward is
    # slow at this length: the reference path itself runs in the slow test below)
    batch, steps, num_tags = 2, 1000, 6
    emissions = torch.randn(batch, steps, num_tags)
    tags = torch.randint(0, num_tags, (batch, steps))
    lengths = torch.tensor([steps, 700])
    check_against_float64(emissions, tags, lengths, *random_params(num_tags), rtol=1e-4, backends=("fused",))


@pytest.mark.slow
def test_very_long_sequences():
    batch, steps, num_tags = 3, 3000, 17
    emissions = torch.randn(batch, steps, num_tags)
    tags = torch.randint(0, num_tags, (batch, steps))
    lengths = torch.tensor([steps, 2345, 2])
    check_against_float64(emissions, tags, lengths, *random_params(num_tags), rtol=1e-4)


@pytest.mark.parametrize("magnitude", [1e2, 1e4])
def test_large_magnitude_emissions(magnitude):
    batch, steps, num_tags = 6, 30, 7
    emissions = torch.randn(batch, steps, num_tags) * magnitude
    tags = torch.randint(0, num_tags, (batch, steps))
    lengths = testing.random_lengths(batch, steps)
    transitions, start, end = random_params(num_tags, scale=magnitude)
    check_against_float64(emissions, tags, lengths, transitions, start, end, rtol=1e-5)


def test_minus_infinity_transitions():
    batch, steps, num_tags = 8, 25, 6
    transitions, start, end = random_params(num_tags)
    forbidden = torch.rand(num_tags, num_tags) < 0.5
    forbidden.fill_diagonal_(False)  # staying in a tag is always allowed: every length feasible
    transitions[forbidden] = float("-inf")
    start[1:3] = float("-inf")
    end[3] = float("-inf")
    # gold paths: one tag held throughout, allowed at start and end
    tags = torch.zeros(batch, steps, dtype=torch.int64)
    tags[::2] = 4
    emissions = torch.randn(batch, steps, num_tags)
    lengths = testing.random_lengths(batch, steps)
    check_against_float64(emissions, tags, lengths, transitions, start, end, rtol=1e-4)
    # gradients of forbidden parameters are exactly 0: they carry no probability mass
    crf = crf_holding(transitions, start, end)
    for name in BACKENDS:
        with testing.backend(name):
            _, (g_em, g_tr, g_start, g_end), vtags, _, _ = run(crf, emissions, tags, testing.mask_from_lengths(lengths, steps))
        assert torch.equal(g_tr[forbidden], torch.zeros(int(forbidden.sum()))), name
        assert torch.equal(g_start[1:3], torch.zeros(2)) and g_end[3] == 0, name
        for b in range(batch):
            path = vtags[b, : int(lengths[b])]
            assert path[0] not in (1, 2) and path[-1] != 3, name
            assert not forbidden[path[:-1], path[1:]].any(), name
        marginals = crf.marginals(emissions, mask=testing.mask_from_lengths(lengths, steps))
        assert not torch.isnan(marginals).any(), name


def test_minus_infinity_emissions():
    # an emission of -inf rules a tag out at one step; everything else stays finite
    batch, steps, num_tags = 4, 10, 5
    emissions = torch.randn(batch, steps, num_tags)
    emissions[:, 3, 0] = float("-inf")
    emissions[:, 0, 2] = float("-inf")
    tags = torch.full((batch, steps), 1, dtype=torch.int64)
    lengths = torch.tensor([10, 4, 1, 7])
    check_against_float64(emissions, tags, lengths, *random_params(num_tags), rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("B", [2, 9], ids=["exact", "lanes"])
def test_one_tag_has_log_likelihood_exactly_zero(B, dtype):
    # K = 1: one path, of probability 1. It was up to 4.8e-7 off at T = 10 with unit scores
    # (7.6e-6 at T = 40, scores ~3) in float32: log Z and the gold score summed the same scores
    # in different orders and precisions.
    from fastner import ops, reference

    g = torch.Generator().manual_seed(B)
    T = 40
    e = torch.randn(B, T, 1, dtype=dtype, generator=g) * 3
    tr, s, n = (torch.randn(*shape, dtype=dtype, generator=g) for shape in ((1, 1), (1,), (1,)))
    L = torch.randint(0, T + 1, (B,), generator=g)
    L[0] = T
    tags = torch.zeros(B, T, dtype=torch.long)
    inputs = [x.clone().requires_grad_() for x in (e, tr, s, n)]
    llh = ops.crf_log_likelihood(inputs[0], tags, L, *inputs[1:], "none")
    assert torch.equal(llh, torch.zeros_like(llh))
    assert all(torch.equal(x, torch.zeros_like(x)) for x in torch.autograd.grad(llh.sum(), inputs))
    log_z, gold = ops.crf_forward(e, tags, L, tr, s, n)
    assert torch.equal(log_z, gold) and torch.equal(ops.crf_forward(e, None, L, tr, s, n)[0], gold)
    torch.testing.assert_close(log_z, reference.crf_forward(e, tags, L, tr, s, n)[0])
    torch.testing.assert_close(ops.crf_viterbi(e, L, tr, s, n)[1], gold)
