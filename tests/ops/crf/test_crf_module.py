"""fastner.nn.CRF against pytorch-crf (torchcrf.CRF) and against fastner's own reference path.

Every parity test runs the fused path and the reference path (FASTNER_BACKEND=reference) in
the same test, on shapes drawn fresh per case, and compares both to pytorch-crf.
"""
from __future__ import annotations

import pytest
import torch
import torchcrf

import fastner
import fastner.nn
from fastner._extension import use_fused
from tests import testing

CPU = torch.device("cpu")
REDUCTIONS = ("none", "sum", "mean", "token_mean")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def random_shape(max_b=64, max_t=80, max_k=30):
    return testing.randint(1, max_b), testing.randint(1, max_t), testing.randint(2, max_k)


def make_pair(num_tags, batch_first, dtype, scale=0.5):
    """A fastner CRF and a pytorch-crf CRF holding the same (random, non-default) parameters."""
    ours = fastner.nn.CRF(num_tags, batch_first=batch_first)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, scale)
    ours = ours.to(dtype)
    theirs = torchcrf.CRF(num_tags, batch_first=batch_first).to(dtype)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def make_inputs(batch, steps, num_tags, batch_first, dtype, min_len=1, with_mask=True):
    """emissions, tags, mask in the requested layout, and lengths [B]."""
    lengths = testing.random_lengths(batch, steps, min_len=min_len) if with_mask else torch.full((batch,), steps)
    emissions = testing.to_layout(torch.randn(batch, steps, num_tags, dtype=dtype), batch_first)
    tags = testing.to_layout(torch.randint(0, num_tags, (batch, steps)), batch_first)
    mask = testing.mask_from_lengths(lengths, steps, batch_first) if with_mask else None
    return emissions, tags, mask, lengths


def llh_and_grads(crf, emissions, tags, mask, reduction, weights=None):
    """Log-likelihood and the gradients of (weights . llh) w.r.t. emissions and the 3 params."""
    crf.zero_grad(set_to_none=True)
    emissions = emissions.detach().clone().requires_grad_(True)
    llh = crf(emissions, tags, mask=mask, reduction=reduction)
    loss = (llh * weights).sum() if reduction == "none" else llh
    loss.backward()
    return [llh.detach(), emissions.grad, crf.transitions.grad, crf.start_transitions.grad, crf.end_transitions.grad]


def time_major(x, batch_first):
    return x.transpose(0, 1) if batch_first else x


def decode_to_tensor(paths, steps):
    out = torch.full((len(paths), steps), -1, dtype=torch.int64)
    for b, path in enumerate(paths):
        out[b, : len(path)] = torch.tensor(path, dtype=torch.int64)
    return out


def path_scores64(emissions_bf, tags_bf, crf):
    """Float64 scores [B] of tag paths [B, T] (-1 past each length) under emissions [B, T, K]."""
    em = emissions_bf.double()
    tr, st, en = (p.detach().double() for p in (crf.transitions, crf.start_transitions, crf.end_transitions))
    out = torch.zeros(tags_bf.shape[0], dtype=torch.float64)
    for b, row in enumerate(tags_bf):
        path = row[row >= 0]
        if len(path):
            out[b] = st[path[0]] + en[path[-1]] + em[b, torch.arange(len(path)), path].sum() + tr[path[:-1], path[1:]].sum()
    return out


def assert_best_paths(actual, expected, emissions_bf, crf, dtype, what):
    """actual, expected: [B, T] best paths (-1 past each length). float64: identical. float32:
    identical, or another path that scores the same within rounding (a near tie that two
    summation orders may break either way)."""
    assert torch.equal(actual >= 0, expected >= 0), what
    if dtype == torch.float64 or torch.equal(actual, expected):
        assert torch.equal(actual, expected), what
        return
    differ = (actual != expected).any(1)
    got, best = path_scores64(emissions_bf, actual, crf)[differ], path_scores64(emissions_bf, expected, crf)[differ]
    torch.testing.assert_close(got, best, rtol=1e-5, atol=1e-4, msg=lambda m: f"{what}: not a tie: {m}")


GRAD_NAMES = ("llh", "emissions.grad", "transitions.grad", "start_transitions.grad", "end_transitions.grad")


def assert_all_close(actual, expected, dtype, scale, what):
    for name, a, e in zip(GRAD_NAMES, actual, expected):
        testing.assert_close(a, e, dtype=dtype, scale=scale, msg=f"{what}: {name}")


# ---------------------------------------------------------------------------------------------
# log-likelihood and gradients
# ---------------------------------------------------------------------------------------------


def check_llh_and_grads(batch, steps, num_tags, batch_first, dtype, reductions, with_mask=True):
    ours, theirs = make_pair(num_tags, batch_first, dtype)
    emissions, tags, mask, lengths = make_inputs(batch, steps, num_tags, batch_first, dtype, with_mask=with_mask)
    weights = torch.rand(batch, dtype=dtype)
    scale = float(lengths.sum())  # gradients of transitions sum over every token
    what = f"B={batch} T={steps} K={num_tags} lengths={lengths.tolist()}"
    for reduction in reductions:
        expected = llh_and_grads(theirs, emissions, tags, mask, reduction, weights)
        with testing.backend("fused"):
            fused = llh_and_grads(ours, emissions, tags, mask, reduction, weights)
        with testing.backend("reference"):
            ref = llh_and_grads(ours, emissions, tags, mask, reduction, weights)
        assert_all_close(ref, expected, dtype, scale, f"reference vs pytorch-crf, {reduction}, {what}")
        assert_all_close(fused, ref, dtype, scale, f"fused vs reference, {reduction}, {what}")
        assert_all_close(fused, expected, dtype, scale, f"fused vs pytorch-crf, {reduction}, {what}")
        assert fused[0].dtype == dtype and fused[0].shape == expected[0].shape


# (reduction, batch_first) per random case: each reduction once, each layout twice. Every
# reduction in both layouts runs on a small batch below; pytorch-crf's backward at B=64, T=80,
# K=30 dominates the run time, hence one reduction per large case.
LARGE_CASES = [("none", True), ("sum", False), ("mean", False), ("token_mean", True)]


@pytest.mark.parametrize("case", range(len(LARGE_CASES)))
@testing.float_dtypes
def test_llh_and_grads_match_pytorch_crf_and_reference(case, dtype):
    # Fresh shapes per case (B 1..64, T 1..80, K 2..30); case 0 passes mask=None.
    testing.reseed(case)
    reduction, batch_first = LARGE_CASES[case]
    batch, steps, num_tags = random_shape()
    check_llh_and_grads(batch, steps, num_tags, batch_first, dtype, [reduction], with_mask=case != 0)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_first"])
@testing.float_dtypes
def test_every_reduction_on_a_small_batch(batch_first, dtype):
    check_llh_and_grads(7, 11, 5, batch_first, dtype, REDUCTIONS)


def test_fused_path_serves_the_module_on_cpu():
    # The parity tests above compare two implementations only if the fused one really runs.
    for op in ("crf_forward", "crf_backward", "crf_viterbi", "crf_kbest", "crf_marginals"):
        assert use_fused(op, CPU), f"{op} is not served by a fused CPU kernel: {fastner.backend()}"
    with testing.backend("reference"):
        assert not use_fused("crf_forward", CPU)


def test_uint8_mask_gives_what_bool_mask_gives():
    ours, _ = make_pair(5, True, torch.float32)
    emissions, tags, mask, _ = make_inputs(6, 9, 5, True, torch.float32)
    for name in ("fused", "reference"):
        with testing.backend(name):
            torch.testing.assert_close(
                ours(emissions, tags, mask=mask.to(torch.uint8), reduction="none"),
                ours(emissions, tags, mask=mask, reduction="none"),
            )
            assert ours.decode(emissions, mask=mask.to(torch.uint8)) == ours.decode(emissions, mask=mask)


def test_tags_past_each_length_are_ignored():
    ours, _ = make_pair(4, True, torch.float64)
    emissions, tags, mask, lengths = make_inputs(5, 7, 4, True, torch.float64)
    other = torch.where(mask, tags, (tags + 1) % 4)
    for name in ("fused", "reference"):
        with testing.backend(name):
            torch.testing.assert_close(
                ours(emissions, tags, mask=mask, reduction="none"),
                ours(emissions, other, mask=mask, reduction="none"),
            )


def test_tags_past_each_length_may_hold_any_padding_value():
    # -100 (the usual ignore index) or -1 past a sequence's end: only tags inside the mask count
    ours, _ = make_pair(4, False, torch.float64)
    emissions, tags, mask, lengths = make_inputs(5, 7, 4, False, torch.float64)
    for pad in (-1, -100, 4):
        padded = torch.where(mask, tags, torch.full_like(tags, pad))
        for name in ("fused", "reference"):
            with testing.backend(name):
                torch.testing.assert_close(
                    ours(emissions, padded, mask=mask, reduction="none"),
                    ours(emissions, tags, mask=mask, reduction="none"),
                    msg=f"{name}, pad {pad}",
                )


# ---------------------------------------------------------------------------------------------
# decoding: decode, viterbi, k-best, log_partition, marginals
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", range(3))
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_first"])
@testing.float_dtypes
def test_decode_viterbi_log_partition_match_pytorch_crf(case, batch_first, dtype):
    testing.reseed(100 + case)
    batch, steps, num_tags = random_shape()
    ours, theirs = make_pair(num_tags, batch_first, dtype)
    emissions, _, mask, lengths = make_inputs(batch, steps, num_tags, batch_first, dtype, with_mask=case != 0)
    expected_paths = theirs.decode(emissions, mask=mask)
    em_tm = time_major(emissions, batch_first)
    mask_tm = torch.ones(em_tm.shape[:2], dtype=torch.bool) if mask is None else time_major(mask, batch_first)
    expected_log_z = theirs._compute_normalizer(em_tm, mask_tm)
    expected_tags = decode_to_tensor(expected_paths, steps)  # [B, T]
    expected_score = theirs._compute_score(em_tm, expected_tags.clamp(min=0).t(), mask_tm)
    tol = testing.tolerances(dtype)
    for name in ("fused", "reference"):
        with testing.backend(name):
            what = f"{name}: B={batch} T={steps} K={num_tags}"
            decoded = decode_to_tensor(ours.decode(emissions, mask=mask), steps)
            em_bf = testing.to_batch_first(emissions, batch_first)
            assert_best_paths(decoded, expected_tags, em_bf, ours, dtype, f"decode, {what}")
            tags, scores = ours.viterbi(emissions, mask=mask)
            assert tags.dtype == torch.int64 and scores.shape == (batch,), what
            assert tags.shape == emissions.shape[:2], what  # the emissions' layout
            tags_bf = testing.to_batch_first(tags, batch_first)
            assert torch.equal(tags_bf, decoded), what  # decode and viterbi agree
            assert_best_paths(tags_bf, expected_tags, em_bf, ours, dtype, f"viterbi, {what}")
            torch.testing.assert_close(scores, expected_score, **tol, msg=what)
            log_z = ours.log_partition(emissions, mask=mask)
            torch.testing.assert_close(log_z, expected_log_z, **tol, msg=what)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_first"])
@testing.float_dtypes
def test_marginals_are_the_gradient_of_log_partition(batch_first, dtype):
    # d log Z / d emissions[b, t, j] = p(y_t = j | x): an oracle independent of both paths.
    batch, steps, num_tags = 9, 13, 7
    ours, theirs = make_pair(num_tags, batch_first, dtype)
    emissions, _, mask, lengths = make_inputs(batch, steps, num_tags, batch_first, dtype)
    em = emissions.clone().requires_grad_(True)
    theirs._compute_normalizer(time_major(em, batch_first), time_major(mask, batch_first)).sum().backward()
    expected = em.grad * mask.unsqueeze(-1)
    for name in ("fused", "reference"):
        with testing.backend(name):
            marginals = ours.marginals(emissions, mask=mask)
            assert marginals.shape == emissions.shape, name
            torch.testing.assert_close(marginals, expected, **testing.tolerances(dtype), msg=name)
            sums = marginals.sum(-1)
            torch.testing.assert_close(sums, mask.to(dtype), **testing.tolerances(dtype), msg=name)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_first"])
def test_kbest_first_path_is_viterbi_and_scores_are_sorted(batch_first):
    batch, steps, num_tags, k = 11, 17, 6, 5
    ours, theirs = make_pair(num_tags, batch_first, torch.float64)
    emissions, _, mask, lengths = make_inputs(batch, steps, num_tags, batch_first, torch.float64, min_len=3)
    em_tm, mask_tm = time_major(emissions, batch_first), time_major(mask, batch_first)
    results = {}
    for name in ("fused", "reference"):
        with testing.backend(name):
            best_tags, best_scores = ours.viterbi(emissions, mask=mask)
            tags, scores = ours.viterbi(emissions, mask=mask, k=k)
            assert tags.shape == (batch, k, steps) and scores.shape == (batch, k), name
            assert torch.equal(tags[:, 0], testing.to_batch_first(best_tags, batch_first)), name
            torch.testing.assert_close(scores[:, 0], best_scores)
            assert (scores[:, 1:] <= scores[:, :-1] + 1e-12).all(), name
            for r in range(k):
                path = tags[:, r]  # [B, T]
                assert torch.equal(path >= 0, testing.to_batch_first(mask, batch_first)), name
                recomputed = theirs._compute_score(em_tm, path.clamp(min=0).t(), mask_tm)
                torch.testing.assert_close(scores[:, r], recomputed, msg=f"{name} rank {r}")
            for b in range(batch):
                assert len({tuple(p.tolist()) for p in tags[b]}) == k, f"{name}: duplicate paths in row {b}"
            results[name] = (tags, scores)
    torch.testing.assert_close(results["fused"][1], results["reference"][1])


# ---------------------------------------------------------------------------------------------
# length-0 sequences, low precision
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_first"])
def test_length_zero_sequences(batch_first):
    batch, steps, num_tags = 5, 6, 4
    ours, _ = make_pair(num_tags, batch_first, torch.float64)
    lengths = torch.tensor([3, 0, 6, 0, 1])
    emissions = testing.to_layout(torch.randn(batch, steps, num_tags, dtype=torch.float64), batch_first)
    tags = testing.to_layout(torch.randint(0, num_tags, (batch, steps)), batch_first)
    mask = testing.mask_from_lengths(lengths, steps, batch_first)
    empty = lengths == 0
    for name in ("fused", "reference"):
        with testing.backend(name):
            em = emissions.clone().requires_grad_(True)
            llh = ours(em, tags, mask=mask, reduction="none")
            assert torch.equal(llh[empty], torch.zeros(2, dtype=torch.float64)), name
            assert torch.isfinite(llh).all() and (llh[~empty] < 0).all(), name
            llh.sum().backward()
            grad = testing.to_batch_first(em.grad, batch_first)
            assert torch.equal(grad[empty], torch.zeros_like(grad[empty])), name
            paths = ours.decode(em.detach(), mask=mask)
            assert [len(p) for p in paths] == lengths.tolist(), name
            assert paths[1] == [] and paths[3] == [], name
            vtags, vscores = ours.viterbi(emissions, mask=mask)
            vtags = testing.to_batch_first(vtags, batch_first)
            assert (vtags[empty] == -1).all() and torch.equal(vscores[empty], torch.zeros(2, dtype=torch.float64)), name
            ktags, kscores = ours.viterbi(emissions, mask=mask, k=2)
            assert (ktags[empty] == -1).all(), name
            log_z = ours.log_partition(emissions, mask=mask)
            assert torch.equal(log_z[empty], torch.zeros(2, dtype=torch.float64)), name
            marginals = testing.to_batch_first(ours.marginals(emissions, mask=mask), batch_first)
            assert torch.equal(marginals[empty], torch.zeros_like(marginals[empty])), name
            # sum over the empty rows' zeros is 0, token_mean counts the real tokens only
            total = ours(emissions, tags, mask=mask, reduction="sum")
            torch.testing.assert_close(ours(emissions, tags, mask=mask, reduction="token_mean"), total / lengths.sum())


def test_all_sequences_empty():
    ours, _ = make_pair(3, True, torch.float32)
    emissions = torch.randn(2, 4, 3)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    tags = torch.zeros(2, 4, dtype=torch.int64)
    for name in ("fused", "reference"):
        with testing.backend(name):
            assert torch.equal(ours(emissions, tags, mask=mask, reduction="none"), torch.zeros(2)), name
            assert ours.decode(emissions, mask=mask) == [[], []], name


@testing.low_precision_dtypes
def test_low_precision_emissions_match_float32(dtype):
    batch, steps, num_tags = 8, 20, 9
    ours, _ = make_pair(num_tags, True, torch.float32)
    emissions, tags, mask, lengths = make_inputs(batch, steps, num_tags, True, torch.float32)
    low = emissions.to(dtype)
    upcast = low.float()  # the same values in float32: only accumulation may differ
    for name in ("fused", "reference"):
        with testing.backend(name):
            em = low.clone().requires_grad_(True)
            llh = ours(em, tags, mask=mask, reduction="none")
            assert torch.isfinite(llh).all(), name
            expected = ours(upcast, tags, mask=mask, reduction="none")
            torch.testing.assert_close(llh.float(), expected, rtol=1e-3, atol=1e-2, msg=name)
            llh.sum().backward()
            assert em.grad.dtype == dtype and torch.isfinite(em.grad.float()).all(), name
            up = upcast.clone().requires_grad_(True)
            ours(up, tags, mask=mask, reduction="none").sum().backward()
            torch.testing.assert_close(em.grad.float(), up.grad, rtol=2e-2, atol=1e-2, msg=name)
            assert ours.decode(low, mask=mask) == ours.decode(upcast, mask=mask), name
            _, scores = ours.viterbi(low, mask=mask)
            _, expected_scores = ours.viterbi(upcast, mask=mask)
            torch.testing.assert_close(scores.float(), expected_scores, rtol=1e-3, atol=1e-2, msg=name)
            torch.testing.assert_close(
                ours.marginals(low, mask=mask).float(), ours.marginals(upcast, mask=mask), rtol=1e-2, atol=1e-2, msg=name
            )


# ---------------------------------------------------------------------------------------------
# drop-in for torchcrf.CRF: parameters, init, state_dict both ways
# ---------------------------------------------------------------------------------------------


def test_parameters_and_init_match_pytorch_crf():
    ours, theirs = fastner.nn.CRF(7), torchcrf.CRF(7)
    assert ours.num_tags == 7 and ours.batch_first is False
    assert fastner.nn.CRF(7, batch_first=True).batch_first is True
    ours_params = dict(ours.named_parameters())
    assert {k: v.shape for k, v in ours_params.items()} == {k: v.shape for k, v in theirs.named_parameters()}
    for p in ours_params.values():
        assert p.dtype == torch.float32 and p.requires_grad
        assert (p.abs() <= 0.1).all()  # pytorch-crf's init: uniform(-0.1, 0.1)
    assert set(ours.state_dict()) == set(theirs.state_dict())


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_first"])
def test_float64_parameters_promote_float32_emissions_like_pytorch_crf(batch_first):
    # crf.double() fed float32 emissions: pytorch-crf's sums promote to float64, so its scores
    # are float64 and computed in float64; fastner computed (and returned) float32.
    ours, theirs = make_pair(5, batch_first, torch.float64)
    emissions, tags, mask, _ = make_inputs(3, 6, 5, batch_first, torch.float32)
    for reduction in REDUCTIONS:
        got = llh_and_grads(ours, emissions, tags, mask, reduction, torch.ones(3))
        expected = llh_and_grads(theirs, emissions, tags, mask, reduction, torch.ones(3))
        for g, e in zip(got, expected):
            assert g.dtype == e.dtype
            tol = 1e-12 if e.dtype == torch.float64 else 1e-6  # the emissions' gradient: float32
            torch.testing.assert_close(g, e, rtol=tol, atol=tol)
    assert ours.decode(emissions, mask) == theirs.decode(emissions, mask)
    assert ours.log_partition(emissions, mask).dtype == torch.float64


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_first"])
def test_state_dict_round_trip_with_pytorch_crf(batch_first):
    num_tags = 6
    emissions, tags, mask, _ = make_inputs(4, 8, num_tags, batch_first, torch.float32)
    # pytorch-crf -> fastner
    theirs = torchcrf.CRF(num_tags, batch_first=batch_first)
    ours = fastner.nn.CRF(num_tags, batch_first=batch_first)
    ours.load_state_dict(theirs.state_dict())  # strict
    torch.testing.assert_close(ours(emissions, tags, mask=mask), theirs(emissions, tags, mask=mask))
    assert ours.decode(emissions, mask=mask) == theirs.decode(emissions, mask=mask)
    # fastner -> pytorch-crf, after a training step changed fastner's parameters
    optim = torch.optim.SGD(ours.parameters(), lr=0.5)
    (-ours(emissions, tags, mask=mask)).backward()
    optim.step()
    back = torchcrf.CRF(num_tags, batch_first=batch_first)
    back.load_state_dict(ours.state_dict())  # strict
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    torch.testing.assert_close(back(emissions, tags, mask=mask), ours(emissions, tags, mask=mask))
    assert back.decode(emissions, mask=mask) == ours.decode(emissions, mask=mask)


# ---------------------------------------------------------------------------------------------
# bad input: ValueError naming the argument
# ---------------------------------------------------------------------------------------------


def _bad_input_cases():
    K, B, T = 4, 3, 5
    em = torch.randn(B, T, K)
    tags = torch.randint(0, K, (B, T))
    good = torch.ones(B, T, dtype=torch.bool)
    gap = good.clone()
    gap[1, 2] = False  # a hole, then tokens again
    left_padded = good.clone()
    left_padded[0, 0] = False
    tags_high = tags.clone()
    tags_high[0, 0] = K
    tags_negative = tags.clone()
    tags_negative[2, 4] = -1
    return {
        "mask_with_gap": (dict(emissions=em, tags=tags, mask=gap), "mask"),
        "mask_left_padded": (dict(emissions=em, tags=tags, mask=left_padded), "mask"),
        "mask_wrong_shape": (dict(emissions=em, tags=tags, mask=good[:, :-1]), "mask"),
        "mask_transposed": (dict(emissions=em, tags=tags, mask=good.t().contiguous()), "mask"),
        "mask_float": (dict(emissions=em, tags=tags, mask=good.float()), "mask"),
        "mask_int64": (dict(emissions=em, tags=tags, mask=good.long()), "mask"),
        "mask_other_device": (dict(emissions=em, tags=tags, mask=torch.ones(B, T, dtype=torch.bool, device="meta")), "mask"),
        "tags_too_high": (dict(emissions=em, tags=tags_high, mask=good), "tags"),
        "tags_negative": (dict(emissions=em, tags=tags_negative, mask=good), "tags"),
        "tags_wrong_shape": (dict(emissions=em, tags=tags[:, :-1], mask=good), "tags"),
        "tags_float": (dict(emissions=em, tags=tags.float(), mask=good), "tags"),
        "emissions_wrong_num_tags": (dict(emissions=torch.randn(B, T, K + 1), tags=tags, mask=good), "emissions"),
        "emissions_2d": (dict(emissions=em[0], tags=tags, mask=good), "emissions"),
        "emissions_integer": (dict(emissions=em.long(), tags=tags, mask=good), "emissions"),
    }


BAD_INPUT = _bad_input_cases()


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_raises_value_error_naming_the_argument(case, backend):
    args, argument = BAD_INPUT[case]
    crf = fastner.nn.CRF(4, batch_first=True)
    em, tags, mask = args["emissions"], args["tags"], args["mask"]
    with testing.backend(backend):
        with pytest.raises(ValueError, match=argument):
            crf(em, tags, mask=mask)
        if argument != "tags":
            with pytest.raises(ValueError, match=argument):
                crf.decode(em, mask=mask)
            with pytest.raises(ValueError, match=argument):
                crf.viterbi(em, mask=mask)
            with pytest.raises(ValueError, match=argument):
                crf.viterbi(em, mask=mask, k=2)
            with pytest.raises(ValueError, match=argument):
                crf.log_partition(em, mask=mask)
            with pytest.raises(ValueError, match=argument):
                crf.marginals(em, mask=mask)


def test_bad_reduction_and_k_raise_value_error():
    crf = fastner.nn.CRF(4, batch_first=True)
    em, tags = torch.randn(2, 3, 4), torch.randint(0, 4, (2, 3))
    with pytest.raises(ValueError, match="reduction"):
        crf(em, tags, reduction="avg")
    for k in (0, -1):
        with pytest.raises(ValueError, match="k"):
            crf.viterbi(em, k=k)
    with pytest.raises(ValueError, match="num_tags|number of tags"):
        fastner.nn.CRF(0)
