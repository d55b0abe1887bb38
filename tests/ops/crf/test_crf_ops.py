"""torch.ops.fastner.crf_* called directly: parity with the reference path, opcheck, gradcheck,
bad input. The ops take batch-first contiguous tensors and int64 lengths (csrc/fastner.cpp)."""
from __future__ import annotations

import pytest
import torch

import fastner
import fastner.nn
import fastner.ops  # noqa: F401  (registers the fake kernels and autograd formulas)
from fastner._extension import use_fused
from tests import testing
from tests.ops.crf.samples import LAYOUTS, crf_holding, crf_inputs, differentiable, sample_inputs
from tests.ops.crf.test_crf_module import assert_best_paths

CPU = torch.device("cpu")
CRF_OPS = ("crf_forward", "crf_backward", "crf_forward_backward", "crf_viterbi", "crf_kbest", "crf_marginals",
           "crf_lengths")

requires_crf_ops = pytest.mark.skipif(
    not all(testing.op_registered(op) for op in CRF_OPS), reason="fastner CRF ops not registered (extension not built)"
)


def op(name):
    return getattr(torch.ops.fastner, name)


def random_case(case):
    testing.reseed(case)
    return testing.randint(1, 40), testing.randint(1, 50), testing.randint(2, 20)


def test_every_crf_op_is_fused_on_cpu():
    # backend() probes crf_forward only; each CRF op must have its CPU kernel, or the parity
    # tests would quietly compare the reference with itself.
    assert fastner.backend()["cpu"] == "fused", fastner.backend()
    for name in CRF_OPS:
        assert testing.op_registered(name), name
        assert use_fused(name, CPU), name


# ---------------------------------------------------------------------------------------------
# parity with the reference path
# ---------------------------------------------------------------------------------------------


@requires_crf_ops
@pytest.mark.parametrize("case", range(3))
@testing.float_dtypes
def test_forward_op_matches_reference(case, dtype):
    batch, steps, num_tags = random_case(case)
    emissions, tags, lengths, transitions, start, end = crf_inputs(batch, steps, num_tags, dtype)
    mask = testing.mask_from_lengths(lengths, steps)
    crf = crf_holding(transitions, start, end)
    with testing.backend("reference"):
        expected_log_z = crf.log_partition(emissions, mask=mask)
        expected_gold = crf(emissions, tags, mask=mask, reduction="none").detach() + expected_log_z
    tol = testing.tolerances(dtype)
    log_z, gold = op("crf_forward")(emissions, tags, lengths, transitions, start, end)
    torch.testing.assert_close(log_z, expected_log_z, **tol)
    torch.testing.assert_close(gold, expected_gold, **tol)
    log_z_only, gold_none = op("crf_forward")(emissions, None, lengths, transitions, start, end)
    torch.testing.assert_close(log_z_only, log_z, rtol=0, atol=0)
    assert torch.equal(gold_none, torch.zeros_like(gold_none))


@requires_crf_ops
@pytest.mark.parametrize("case", range(3))
@testing.float_dtypes
def test_backward_op_matches_reference_autograd(case, dtype):
    batch, steps, num_tags = random_case(10 + case)
    inputs = crf_inputs(batch, steps, num_tags, dtype)
    emissions, tags, lengths, transitions, start, end = inputs
    grad_log_z = torch.randn(batch, dtype=dtype)
    grad_gold = torch.randn(batch, dtype=dtype)
    mask = testing.mask_from_lengths(lengths, steps)
    crf = crf_holding(transitions, start, end)
    em = emissions.clone().requires_grad_(True)
    with testing.backend("reference"):
        log_z = crf.log_partition(em, mask=mask)
        gold = crf(em, tags, mask=mask, reduction="none") + log_z
        ((grad_log_z * log_z).sum() + (grad_gold * gold).sum()).backward()
    expected = (em.grad, crf.transitions.grad, crf.start_transitions.grad, crf.end_transitions.grad)
    actual = op("crf_backward")(grad_log_z, grad_gold, emissions, tags, lengths, transitions, start, end)
    scale = float(lengths.sum())
    for name, a, e in zip(("emissions", "transitions", "start", "end"), actual, expected):
        assert a.shape == e.shape and a.dtype == dtype, name
        testing.assert_close(a, e, dtype=dtype, scale=scale, msg=name)


@requires_crf_ops
@pytest.mark.parametrize("case", range(3))
@testing.float_dtypes
def test_decoding_ops_match_reference(case, dtype):
    batch, steps, num_tags = random_case(20 + case)
    emissions, _, lengths, transitions, start, end = crf_inputs(batch, steps, num_tags, dtype)
    mask = testing.mask_from_lengths(lengths, steps)
    crf = crf_holding(transitions, start, end)
    k = testing.randint(1, 4)
    with testing.backend("reference"):
        expected_tags, expected_scores = crf.viterbi(emissions, mask=mask)
        expected_ktags, expected_kscores = crf.viterbi(emissions, mask=mask, k=k)
        expected_marginals = crf.marginals(emissions, mask=mask)
    tol = testing.tolerances(dtype)
    tags, scores = op("crf_viterbi")(emissions, lengths, transitions, start, end)
    assert_best_paths(tags, expected_tags, emissions, crf, dtype, "crf_viterbi")
    torch.testing.assert_close(scores, expected_scores, **tol)
    ktags, kscores = op("crf_kbest")(emissions, lengths, transitions, start, end, k)
    assert ktags.shape == (batch, k, steps) and kscores.shape == (batch, k)
    torch.testing.assert_close(kscores, expected_kscores, **tol)
    for r in range(k):  # rank r holds the r-th best path (or one tied with it)
        finite = torch.isfinite(expected_kscores[:, r])
        assert torch.equal(torch.isfinite(kscores[:, r]), finite)
        assert_best_paths(ktags[finite, r], expected_ktags[finite, r], emissions[finite], crf, dtype, f"crf_kbest rank {r}")
    marginals = op("crf_marginals")(emissions, lengths, transitions, start, end)
    torch.testing.assert_close(marginals, expected_marginals, **tol)


@requires_crf_ops
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_first"])
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8], ids=["bool", "uint8"])
def test_lengths_op_matches_reference(batch_first, dtype):
    from fastner import reference

    for case in range(3):
        testing.reseed(30 + case)
        batch, steps = testing.randint(1, 40), testing.randint(1, 50)
        lengths = testing.random_lengths(batch, steps, min_len=0)
        mask = testing.mask_from_lengths(lengths, steps, batch_first, dtype=dtype)
        got = torch.ops.fastner.crf_lengths(mask, batch_first)
        assert got.dtype == torch.int64 and torch.equal(got, lengths)
        assert torch.equal(reference.crf_lengths(mask, batch_first), lengths)
        gap = testing.to_batch_first(mask, batch_first).clone()
        if steps >= 3:
            gap[0, :] = 1
            gap[0, 1] = 0  # a valid step after an invalid one
            gap = testing.to_layout(gap, batch_first)
            with pytest.raises(ValueError, match="mask"):
                torch.ops.fastner.crf_lengths(gap, batch_first)
            with pytest.raises(ValueError, match="mask"):
                reference.crf_lengths(gap, batch_first)


# ---------------------------------------------------------------------------------------------
# opcheck and gradcheck
# ---------------------------------------------------------------------------------------------


@requires_crf_ops
@pytest.mark.parametrize("name", CRF_OPS)
def test_opcheck(name):
    # a padded batch (with a length-0 row) in float32 in every layout: grad_emissions takes a
    # time-first caller's layout and is contiguous where the tag stride is not 1, and the fake
    # kernel must say the same (inductor asserts the strides); a single step in float64
    for dtype, shape, layouts in ((torch.float32, (3, 5, 4), LAYOUTS), (torch.float64, (2, 1, 2), ("contiguous",))):
        for args in sample_inputs(name, CPU, dtype, shapes=[shape], layouts=layouts,
                                  requires_grad=name == "crf_forward"):
            torch.library.opcheck(getattr(torch.ops.fastner, name).default, args)


@requires_crf_ops
def test_gradcheck_forward_op_float64():
    # log Z and the gold score (log Z alone without tags), every sample shape and layout
    for args in sample_inputs("crf_forward", CPU, torch.float64, requires_grad=True):
        fn, leaves = differentiable("crf_forward", args, select=(0, 1) if args[1] is not None else (0,))
        assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_first"])
def test_gradcheck_module_float64(backend, batch_first):
    num_tags = 4
    crf = fastner.nn.CRF(num_tags, batch_first=batch_first).double()
    lengths = torch.tensor([5, 2, 1])
    emissions = testing.to_layout(torch.randn(3, 5, num_tags, dtype=torch.float64), batch_first).requires_grad_(True)
    tags = testing.to_layout(torch.randint(0, num_tags, (3, 5)), batch_first)
    mask = testing.mask_from_lengths(lengths, 5, batch_first)
    params = {n: (torch.randn_like(p) * 0.5).requires_grad_(True) for n, p in crf.named_parameters()}
    names = list(params)

    def llh(em, *values):
        return torch.func.functional_call(crf, dict(zip(names, values)), (em, tags), dict(mask=mask, reduction="none"))

    with testing.backend(backend):
        assert torch.autograd.gradcheck(llh, (emissions, *params.values()))


# ---------------------------------------------------------------------------------------------
# bad input at the op level
# ---------------------------------------------------------------------------------------------


def _bad_op_cases():
    torch.manual_seed(99)
    emissions, tags, lengths, transitions, start, end = crf_inputs(3, 5, 4, torch.float32)
    base = dict(emissions=emissions, tags=tags, lengths=lengths, transitions=transitions, start=start, end=end)
    return {
        "lengths_too_long": (dict(base, lengths=torch.tensor([5, 6, 1])), "lengths"),
        "lengths_negative": (dict(base, lengths=torch.tensor([5, -1, 1])), "lengths"),
        "lengths_int32": (dict(base, lengths=lengths.int()), "lengths"),
        "lengths_wrong_size": (dict(base, lengths=lengths[:2]), "lengths"),
        "transitions_wrong_shape": (dict(base, transitions=transitions[:, :3]), "transitions"),
        "start_wrong_shape": (dict(base, start=start[:3]), "start_transitions"),
        "end_wrong_shape": (dict(base, end=end[:3]), "end_transitions"),
        "emissions_2d": (dict(base, emissions=emissions[0]), "emissions"),
    }


BAD_OP = _bad_op_cases()


@requires_crf_ops
@pytest.mark.parametrize("case", sorted(BAD_OP))
def test_ops_reject_bad_input_with_value_error(case):
    a, argument = BAD_OP[case]
    calls = {
        "crf_forward": lambda: torch.ops.fastner.crf_forward(a["emissions"], a["tags"], a["lengths"], a["transitions"], a["start"], a["end"]),
        "crf_viterbi": lambda: torch.ops.fastner.crf_viterbi(a["emissions"], a["lengths"], a["transitions"], a["start"], a["end"]),
        "crf_kbest": lambda: torch.ops.fastner.crf_kbest(a["emissions"], a["lengths"], a["transitions"], a["start"], a["end"], 2),
        "crf_marginals": lambda: torch.ops.fastner.crf_marginals(a["emissions"], a["lengths"], a["transitions"], a["start"], a["end"]),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=argument):
            call()


@requires_crf_ops
def test_ops_reject_tags_out_of_range_and_bad_k():
    emissions, tags, lengths, transitions, start, end = crf_inputs(2, 4, 3, torch.float32)
    lengths = torch.tensor([4, 4])
    bad = tags.clone()
    bad[1, 2] = 3
    with pytest.raises(ValueError, match="tags"):
        torch.ops.fastner.crf_forward(emissions, bad, lengths, transitions, start, end)
    with pytest.raises(ValueError, match="k"):
        torch.ops.fastner.crf_kbest(emissions, lengths, transitions, start, end, 0)
