"""torch.ops.fastner.crf_window_probabilities (csrc/cpu/crf_window.cpp: each sequence's forward and
backward variables once, then a walk over each window) against fastner.reference's definition (a
constrained log partition over the whole sequence, float64), against enumeration of every path,
and against crf_marginals (one-tag windows are marginals): shapes, layouts, dtypes, constraints,
wide score ranges, NaN and infinities, windows past the length, opcheck, bad input, fuzzing."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import strategies as st

import fastner.ops as ops
from fastner import reference
from tests import testing
from tests.ops.fuzzing import assert_same, fuzz, outcome

pytestmark = testing.requires_op("crf_window_probabilities")

op = torch.ops.fastner.crf_window_probabilities.default


def scores(K, dtype=torch.float32, scale=1.0, forbid=0.0):
    """transitions [K, K], start [K], end [K] in the accumulate dtype of `dtype` emissions, a
    share `forbid` of the transitions at -inf (constraints)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    transitions = torch.randn(K, K, dtype=torch.float64) * scale
    transitions[torch.rand(K, K) < forbid] = -math.inf
    return transitions.to(acc), (torch.randn(K) * scale).to(acc), (torch.randn(K) * scale).to(acc)


def windows(lengths, N, W, K, p=0.7):
    """N windows on the sequences with a length: rows, starts inside their length, allowed."""
    usable = [b for b, n in enumerate(lengths.tolist()) if n > 0]
    rows = torch.tensor([usable[i] for i in torch.randint(len(usable), (N,)).tolist()], dtype=torch.long)
    starts = (torch.rand(N) * lengths[rows]).long()
    return rows, starts, torch.rand(N, W, K) < p


def emissions_in(layout, B, T, K, dtype, scale=2.0):
    e = (torch.randn(B, T, K, dtype=torch.float64) * scale).to(dtype)
    if layout == "time_first":  # a [T, B, K] tensor seen batch-first
        return e.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "sliced":
        wide = torch.full((B, T, 2 * K), math.nan, dtype=dtype)
        wide[..., ::2] = e
        return wide[..., ::2]
    return e


# (B, T, K, N windows, W): one tag, one step, a batch with an empty sequence, long windows,
# windows longer than the sequences, the BIOES CoNLL tag count.
SHAPES = [(1, 1, 1, 2, 1), (2, 5, 3, 6, 2), (4, 9, 5, 12, 3), (3, 4, 2, 5, 7), (5, 30, 17, 40, 4),
          (3, 12, 9, 20, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "time_first", "sliced"])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_matches_reference(shape, layout, dtype):
    testing.reseed(SHAPES.index(shape))
    B, T, K, N, W = shape
    lengths = torch.randint(1, T + 1, (B,))
    if B > 2:
        lengths[1] = 0  # an empty sequence: no window may sit on it
    em = emissions_in(layout, B, T, K, dtype)
    tr, st_, en = scores(K, dtype, forbid=0.2 if K > 2 else 0.0)
    args = (em, lengths, tr, st_, en, *windows(lengths, N, W, K))
    got = op(*args)
    assert got.dtype == torch.float64 and got.shape == (N,)
    torch.testing.assert_close(got, reference.crf_window_probabilities(*args), rtol=1e-9, atol=1e-12,
                               equal_nan=True)
    assert ((got >= 0) & (got <= 1 + 1e-12) | got.isnan()).all()


@pytest.mark.parametrize("seed", range(4))
def test_matches_enumeration_of_every_path(seed):
    testing.reseed(100 + seed)
    B, T, K, W = 3, 4, 3, 2
    lengths = torch.tensor([4, 2, 3])
    em = torch.randn(B, T, K, dtype=torch.float64)
    tr, st_, en = scores(K, torch.float64, forbid=0.15)
    rows, starts, allowed = windows(lengths, 10, W, K, p=0.6)
    got = op(em, lengths, tr, st_, en, rows, starts, allowed)
    for n in range(10):
        b, first = int(rows[n]), int(starts[n])
        L = int(lengths[b])
        total = inside = 0.0
        for path in itertools.product(range(K), repeat=L):
            score = st_[path[0]] + en[path[-1]] + sum(em[b, t, path[t]] for t in range(L))
            score = float(score + sum(tr[path[t - 1], path[t]] for t in range(1, L)))
            weight = math.exp(score) if score > -math.inf else 0.0
            total += weight
            if all(allowed[n, t - first, path[t]] for t in range(first, min(first + W, L))):
                inside += weight
        want = inside / total if total > 0 else math.nan
        assert float(got[n]) == pytest.approx(want, rel=1e-10, abs=1e-14, nan_ok=True), n


def test_one_tag_windows_are_the_marginals_and_a_partition_sums_to_one():
    testing.reseed(7)
    B, T, K = 4, 11, 6
    lengths = torch.tensor([11, 5, 1, 8])
    em = torch.randn(B, T, K, dtype=torch.float64) * 3
    tr, st_, en = scores(K, torch.float64, forbid=0.1)
    cells = [(b, t, j) for b in range(B) for t in range(int(lengths[b])) for j in range(K)]
    rows = torch.tensor([b for b, _, _ in cells])
    starts = torch.tensor([t for _, t, _ in cells])
    allowed = torch.zeros(len(cells), 1, K, dtype=torch.bool)
    allowed[torch.arange(len(cells)), 0, torch.tensor([j for _, _, j in cells])] = True
    got = op(em, lengths, tr, st_, en, rows, starts, allowed)
    marginals = ops.crf_marginals(em, lengths, tr, st_, en)
    torch.testing.assert_close(got, marginals[rows, starts, [j for _, _, j in cells]], rtol=1e-9, atol=1e-12)
    every = torch.ones(3, 4, K, dtype=torch.bool)
    torch.testing.assert_close(op(em, lengths, tr, st_, en, torch.tensor([0, 1, 3]), torch.tensor([2, 1, 7]), every),
                               torch.ones(3, dtype=torch.float64))


def test_wide_score_ranges_take_the_exact_path():
    """Transitions hundreds apart and emissions in the hundreds: the scaled sums underflow (the
    kernel's exact log-sum-exp steps), float64 still holds the probabilities."""
    testing.reseed(8)
    B, T, K = 3, 7, 4
    lengths = torch.tensor([7, 4, 6])
    em = torch.randn(B, T, K, dtype=torch.float64) * 300
    tr, st_, en = scores(K, torch.float64, scale=400.0, forbid=0.2)
    args = (em, lengths, tr, st_, en, *windows(lengths, 16, 3, K, p=0.5))
    torch.testing.assert_close(op(*args), reference.crf_window_probabilities(*args), rtol=1e-7, atol=1e-12,
                               equal_nan=True)


def test_nan_and_infinities():
    testing.reseed(9)
    B, T, K = 4, 5, 3
    lengths = torch.tensor([5, 5, 2, 1])
    em = torch.randn(B, T, K, dtype=torch.float64)
    em[0, 3, 1] = math.nan  # inside row 0
    em[1, 1, 2] = math.inf  # inside row 1
    em[2, 4, 0] = math.nan  # past row 2's length: not read
    tr, st_, en = scores(K, torch.float64)
    rows = torch.tensor([0, 1, 2, 3, 2])
    starts = torch.tensor([0, 2, 1, 0, 0])
    allowed = torch.rand(5, 2, K) < 0.7
    allowed[4] = False  # no allowed tag at all: probability 0
    got = op(em, lengths, tr, st_, en, rows, starts, allowed)
    assert got[:2].isnan().all() and got[2:4].isfinite().all() and got[4] == 0
    torch.testing.assert_close(got, reference.crf_window_probabilities(em, lengths, tr, st_, en, rows, starts, allowed),
                               equal_nan=True)
    # a +inf transition poisons sequences of length >= 2 only; a sequence without a path is NaN
    tr_inf = tr.clone()
    tr_inf[0, 1] = math.inf
    got = op(em, lengths, tr_inf, st_, en, rows[2:4], starts[2:4], allowed[2:4])
    assert got[0].isnan() and got[1].isfinite()
    dead = torch.full_like(tr, -math.inf)  # no transition allowed: only length-1 sequences have paths
    got = op(em, lengths, dead, st_, en, rows[2:4], starts[2:4], allowed[2:4])
    assert got[0].isnan() and got[1].isfinite()
    torch.testing.assert_close(got, reference.crf_window_probabilities(em, lengths, dead, st_, en, rows[2:4],
                                                                       starts[2:4], allowed[2:4]), equal_nan=True)


def test_empty_calls():
    em = torch.randn(2, 3, 4)
    tr, st_, en = scores(4)
    none = torch.zeros(0, dtype=torch.long)
    for emissions, lengths in ((em, torch.tensor([3, 1])), (em[:0], none)):
        got = op(emissions, lengths, tr, st_, en, none, none, torch.zeros(0, 2, 4, dtype=torch.bool))
        assert got.shape == (0,) and got.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    testing.reseed(10)
    for B, T, K, N, W in SHAPES[:5]:
        lengths = torch.randint(1, T + 1, (B,))
        args = (torch.randn(B, T, K, dtype=dtype), lengths, *scores(K, dtype), *windows(lengths, N, W, K))
        torch.library.opcheck(op, args)


def test_no_gradient():
    em = torch.randn(2, 3, 4, requires_grad=True)
    lengths = torch.tensor([3, 2])
    args = (lengths, *scores(4), *windows(lengths, 3, 2, 4))
    with pytest.raises(ValueError, match="no gradient"):
        ops.crf_window_probabilities(em, *args)
    with torch.no_grad():
        torch.testing.assert_close(ops.crf_window_probabilities(em, *args), reference.crf_window_probabilities(em, *args))


def _bad_calls():
    em = torch.randn(3, 4, 5)
    lengths = torch.tensor([4, 2, 0])
    tr, st_, en = scores(5)
    rows, starts, allowed = torch.tensor([0, 1]), torch.tensor([3, 1]), torch.ones(2, 2, 5, dtype=torch.bool)

    def call(**change):
        given = dict(emissions=em, lengths=lengths, transitions=tr, start=st_, end=en, rows=rows, starts=starts,
                     allowed=allowed)
        given.update(change)
        return lambda fn: fn(*given.values())

    return {
        "rows outside B": (call(rows=torch.tensor([0, 3])), r"rows\[1\] = 3 is outside \[0, B = 3\)"),
        "rows negative": (call(rows=torch.tensor([-1, 0])), r"rows\[0\] = -1"),
        "rows int32": (call(rows=rows.int()), "rows"),
        "rows 2-D": (call(rows=rows[None]), "rows"),
        "start at the length": (call(starts=torch.tensor([4, 1])), r"starts\[0\] = 4 is outside \[0, lengths\[0\] = 4\)"),
        "start on an empty sequence": (call(rows=torch.tensor([0, 2]), starts=torch.tensor([0, 0])),
                                       r"starts\[1\] = 0 is outside \[0, lengths\[2\] = 0\)"),
        "start negative": (call(starts=torch.tensor([0, -2])), r"starts\[1\] = -2"),
        "starts shape": (call(starts=starts[:1]), "starts"),
        "allowed no window": (call(allowed=allowed[:, :0]), "allowed"),
        "allowed K": (call(allowed=allowed[:, :, :4]), "allowed"),
        "allowed N": (call(allowed=allowed[:1]), "allowed"),
        "allowed uint8": (call(allowed=allowed.byte()), "allowed"),
        "lengths past T": (call(lengths=torch.tensor([5, 2, 0])), "lengths"),
        "transitions dtype": (call(transitions=tr.double()), "transitions"),
        "emissions 2-D": (call(emissions=em[0]), "emissions"),
        "rows device": (call(rows=rows.to("meta")), "rows"),
    }


@pytest.mark.parametrize("path", ["fused", "reference"])
@pytest.mark.parametrize("case", sorted(_bad_calls()))
def test_bad_input_is_a_value_error_naming_the_argument(case, path):
    call, message = _bad_calls()[case]
    with pytest.raises(ValueError, match=message):
        call(op if path == "fused" else reference.crf_window_probabilities)


CORRUPTIONS = ["none"] * 8 + ["row_outside", "start_at_length", "length_past_t", "no_window", "allowed_k"]


@fuzz
def test_fused_and_reference_agree_or_both_refuse(data):
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    B, T = data.draw(st.integers(0, 4), label="B"), data.draw(st.integers(0, 6), label="T")
    K, W = data.draw(st.integers(1, 5), label="K"), data.draw(st.integers(1, 4), label="W")
    lengths = torch.tensor(data.draw(st.lists(st.integers(0, T), min_size=B, max_size=B), label="lengths"),
                           dtype=torch.long)
    usable = [b for b in range(B) if lengths[b] > 0]
    picks = data.draw(st.lists(st.tuples(st.integers(0, 99), st.floats(0, 0.999)), max_size=6 if usable else 0),
                      label="windows")
    rows = torch.tensor([usable[i % len(usable)] for i, _ in picks], dtype=torch.long)
    starts = torch.tensor([int(u * int(lengths[usable[i % len(usable)]])) for i, u in picks], dtype=torch.long)
    N = len(picks)
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    scale = data.draw(st.sampled_from([1.0, 50.0, 500.0]), label="scale")
    em = (torch.randn(B, T, K, generator=generator, dtype=torch.float64) * scale).to(dtype)
    special = data.draw(st.sampled_from(["none", "nan", "inf", "-inf"]), label="special")
    if special != "none" and em.numel():
        em.view(-1)[int(torch.randint(em.numel(), (1,), generator=generator))] = float(special)
    tr, st_, en = scores(K, dtype, scale=scale, forbid=data.draw(st.sampled_from([0.0, 0.3, 1.0]), label="forbid"))
    allowed = torch.rand(N, W, K, generator=generator) < 0.6
    corruption = data.draw(st.sampled_from(CORRUPTIONS), label="corruption")
    if corruption == "row_outside" and N:
        rows[0] = B
    elif corruption == "start_at_length" and N:
        starts[0] = lengths[rows[0]]
    elif corruption == "length_past_t" and B:
        lengths[0] = T + 1
    elif corruption == "no_window":
        allowed = allowed[:, :0]
    elif corruption == "allowed_k":
        allowed = allowed[:, :, :-1]
    args = (em, lengths, tr, st_, en, rows, starts, allowed)
    fused, ref = outcome(op, *args), outcome(reference.crf_window_probabilities, *args)
    if corruption != "none" and (N or corruption == "length_past_t" and B):
        assert fused[0] == ref[0] == "refused", corruption
    if fused[0] == ref[0] == "ok":
        # float64 both, summed in different orders: relative error grows with the score scale
        torch.testing.assert_close(fused[1], ref[1], rtol=1e-6, atol=1e-9, equal_nan=True)
    else:
        assert_same(fused, ref, torch.float64, "crf_window_probabilities")
