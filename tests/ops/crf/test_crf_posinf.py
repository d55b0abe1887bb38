"""+inf scores (an fp16 overflow under autocast gives one): the fused CPU ops give the reference's
results, and pytorch-crf's (torchcrf) where it has the op. The contract (csrc/cpu/crf_gold_nan.h):
a sequence with a +inf score in its length has log Z +inf, or NaN where that +inf meets a -inf
score (inf - inf); its log-likelihood follows (-inf, or NaN when the gold path holds the +inf);
its emission gradients (over its length) and the shared score gradients are NaN, so that "skip
the step on non-finite gradients" logic (GradScaler) sees the overflow. The reference follows
the same contract: whole batches are compared. Decoding: its best score
is its log Z's value, its k-best rows tags -1, its marginals NaN. -inf scores are legitimate
(forbidden tags) and unchanged: every other suite covers them.

It was: the fused log Z NaN where the reference has +inf (the max shift computed inf - inf), the
log-likelihood NaN where the reference has -inf, and finite gradients where the reference's are
NaN; finite zero marginals, k-best rows with tags, a +inf best score where the reference has NaN.
"""
import pytest
import torch
import torchcrf

import fastner.nn
from fastner import ops, reference
from tests import testing

K = 17
# B = 2 runs the exact per-sequence kernel; B = 9 (float32) the lane kernels, which flag the
# sequence to it.
SHAPES = pytest.mark.parametrize("B", [2, 9], ids=["exact", "lanes"])
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
LAYOUTS = pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_first"])
# Where sequence 0's +inf emission (tag 3, step 2) sits: off its gold path (log-likelihood
# -inf), on it (NaN), or before a forbidden transition out of tag 3 (log Z NaN).
CASES = pytest.mark.parametrize("case", ["off_gold", "on_gold", "meets_minus_inf"])


def batch(B, dtype, case, batch_first, seed):
    """(crf, emissions, tags, mask) in the layout asked: sequence 0 has a +inf emission inside
    its length, sequence 1 one past its length (which changes nothing)."""
    T = 6
    generator = torch.Generator().manual_seed(seed)
    crf = fastner.nn.CRF(K, batch_first=batch_first).to(dtype)
    emissions = torch.randn(B, T, K, dtype=dtype, generator=generator)
    tags = torch.randint(0, K, (B, T), generator=generator)
    lengths = torch.full((B,), T)
    lengths[1] = 3
    emissions[0, 2, 3] = float("inf")
    emissions[1, 4, 3] = float("inf")
    tags[0, 2] = 3 if case == "on_gold" else 4
    if case == "meets_minus_inf":
        with torch.no_grad():
            crf.transitions[3, 5] = float("-inf")
        tags[0, 3] = 6  # the gold path stays allowed
    mask = testing.mask_from_lengths(lengths, T, batch_first)
    return crf, testing.to_layout(emissions, batch_first), testing.to_layout(tags, batch_first), mask


def torchcrf_twin(crf):
    twin = torchcrf.CRF(crf.num_tags, batch_first=crf.batch_first).to(crf.transitions.dtype)
    with torch.no_grad():
        for name in ("transitions", "start_transitions", "end_transitions"):
            getattr(twin, name).copy_(getattr(crf, name))
    return twin


def run(module, emissions, tags, mask, reduction, backend=None):
    """(log-likelihood, emission gradients (batch-first), [transition, start, end gradients])."""
    x = emissions.clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    if backend is None:
        llh = module(x, tags, mask, reduction=reduction)
    else:
        with testing.backend(backend):
            llh = module(x, tags, mask=mask, reduction=reduction)
    llh.sum().backward()
    grad = x.grad if module.batch_first else x.grad.transpose(0, 1)
    params = (module.transitions, module.start_transitions, module.end_transitions)
    return llh.detach(), grad, [p.grad for p in params]


def finiteness(result):
    """Per sequence, whether its emission gradients are finite [B]; per score tensor, whether
    its gradient is."""
    llh, grad, params = result
    return grad.flatten(1).isfinite().all(1).tolist(), [p.isfinite().all().item() for p in params]


@CASES
@LAYOUTS
@DTYPES
@SHAPES
def test_log_likelihood_and_gradients_match_the_reference_and_torchcrf(B, dtype, batch_first, case):
    crf, emissions, tags, mask = batch(B, dtype, case, batch_first, seed=B)
    twin = torchcrf_twin(crf)
    padding_cleared = emissions.masked_fill(~mask.unsqueeze(2), 0.0)
    expected_llh0 = {"off_gold": float("-inf")}.get(case, float("nan"))
    for reduction in ("none", "sum", "mean", "token_mean"):  # 'none': crf_backward; else fused
        fused = run(crf, emissions, tags, mask, reduction, "fused")
        ref = run(crf, emissions, tags, mask, reduction, "reference")
        for got, want in zip((fused[0], fused[1], *fused[2]), (ref[0], ref[1], *ref[2])):
            torch.testing.assert_close(got, want, equal_nan=True, msg=reduction)
        # torchcrf reads padding (emissions times a 0 mask: inf * 0 is NaN), so it gets the
        # batch without sequence 1's +inf past its length, which changes nothing in fastner's.
        # Its gradients are NaN on part of sequence 0 only: their finiteness is compared.
        theirs = run(twin, padding_cleared, tags, mask, reduction)
        torch.testing.assert_close(fused[0], theirs[0], equal_nan=True)
        assert finiteness(fused) == finiteness(theirs), reduction
        if reduction == "none":
            torch.testing.assert_close(fused[0][0], torch.tensor(expected_llh0, dtype=dtype),
                                       equal_nan=True)
        assert fused[1][0, :6].isnan().all() and fused[1][1:].isfinite().all(), reduction
        assert all(g.isnan().all() for g in fused[2]), reduction
    with torch.no_grad():
        for backend in ("fused", "reference"):
            with testing.backend(backend):
                log_z = crf.log_partition(emissions, mask=mask)
            assert torch.isnan(log_z[0]) if case == "meets_minus_inf" else torch.isposinf(log_z[0])
            assert torch.isfinite(log_z[1:]).all(), backend


@CASES
@DTYPES
@SHAPES
def test_decoding_and_marginals_match_the_reference(B, dtype, case):
    crf, emissions, _, mask = batch(B, dtype, case, True, seed=B + 1)
    results = {}
    for backend in ("fused", "reference"):
        with testing.backend(backend), torch.no_grad():
            tags, score = crf.viterbi(emissions, mask=mask)
            k_tags, k_scores = crf.viterbi(emissions, mask=mask, k=2)
            marginals = crf.marginals(emissions, mask=mask)
        results[backend] = tags, score, k_tags, k_scores, marginals
    (tags, score, k_tags, k_scores, marginals), ref = results["fused"], results["reference"]
    # the best path of a NaN score is any path (the reference's max picks a NaN): only the
    # finite sequences' paths are compared
    assert torch.equal(tags[1:], ref[0][1:])
    torch.testing.assert_close(score, ref[1], equal_nan=True)
    assert torch.equal(k_tags, ref[2])
    torch.testing.assert_close(k_scores, ref[3], equal_nan=True)
    torch.testing.assert_close(marginals, ref[4], equal_nan=True)
    value = score[0].item()
    assert (value != value) if case == "meets_minus_inf" else value == float("inf")
    assert (k_tags[0] == -1).all()
    assert torch.isnan(marginals[0]).all() and torch.isfinite(marginals[1:]).all()


@pytest.mark.parametrize("name", ["start_transitions", "end_transitions", "transitions"])
@DTYPES
@SHAPES
def test_a_posinf_transition_score_gives_every_sequence_the_reference_log_z(B, dtype, name):
    # Every sequence reads it (lengths >= 2): log Z +inf for all of them, gradients non-finite.
    crf, emissions, tags, _ = batch(B, dtype, "off_gold", True, seed=B + 2)
    emissions = emissions.nan_to_num(posinf=0.0)
    with torch.no_grad():
        score = getattr(crf, name)
        score.view(-1)[4] = float("inf")
    mask = testing.mask_from_lengths(torch.full((B,), 3), emissions.shape[1])
    for backend in ("fused", "reference"):
        with testing.backend(backend):
            assert torch.isposinf(crf.log_partition(emissions, mask=mask)).all(), backend
            result = run(crf, emissions, tags, mask, "sum", backend)
        llh, (grads_finite, scores_finite) = result[0], finiteness(result)
        assert torch.isneginf(llh) or torch.isnan(llh), backend
        assert not any(grads_finite) and not any(scores_finite), backend


@SHAPES
def test_a_sequence_with_nan_and_posinf_emissions_has_log_z_nan(B):
    crf, emissions, _, mask = batch(B, torch.float32, "off_gold", True, seed=B + 3)
    emissions[0, 4, 0] = float("nan")  # after the +inf at step 2: NaN wins
    for backend in ("fused", "reference"):
        with testing.backend(backend), torch.no_grad():
            log_z = crf.log_partition(emissions, mask=mask)
            score = crf.viterbi(emissions, mask=mask)[1]
        assert torch.isnan(log_z[0]) and torch.isnan(score[0]), backend
        assert torch.isfinite(log_z[1:]).all() and torch.isfinite(score[1:]).all(), backend


# ---- a NaN or +inf transition score and sequences of length 1 -----------------------------------
# A length-1 sequence reads no transition score: its results are the reference's, finite. It was
# NaN on every op (the contract poisoned every non-empty sequence). The reference's results do
# not depend on the batch's padding (tests/ops/crf/test_crf_reference_nonfinite.py): the whole
# batch is compared.

@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "posinf"])
@DTYPES
@SHAPES
def test_a_nonfinite_transition_leaves_length_1_sequences_the_reference_results(B, dtype, bad):
    g = torch.Generator().manual_seed(B)
    T, k = 4, 3
    e = torch.randn(B, T, K, dtype=dtype, generator=g)
    L = torch.tensor([1, 3, 1, 4, 1, 2, 1, 1, 4][:B])
    tr, s, n = (torch.randn(*shape, dtype=dtype, generator=g) for shape in ((K, K), (K,), (K,)))
    tr[2, 5] = bad
    tags = torch.randint(0, K, (B, T), generator=g)
    results = {}
    for backend in ("fused", "reference"):
        inputs = [x.clone().requires_grad_() for x in (e, tr, s, n)]
        with testing.backend(backend):
            llh = ops.crf_log_likelihood(inputs[0], tags, L, *inputs[1:], "none")
            grads = torch.autograd.grad(llh.sum(), inputs)
            results[backend] = (llh.detach(), *grads, *ops.crf_forward(e, tags, L, tr, s, n),
                                ops.crf_viterbi(e, L, tr, s, n)[1], *ops.crf_kbest(e, L, tr, s, n, k),
                                ops.crf_marginals(e, L, tr, s, n))
    fused, ref = results["fused"], results["reference"]
    for i, (got, want) in enumerate(zip(fused, ref)):
        torch.testing.assert_close(got, want, equal_nan=True, msg=f"result {i}")
    one = L == 1
    assert torch.equal(ops.crf_viterbi(e, L, tr, s, n)[0][one], reference.crf_viterbi(e, L, tr, s, n)[0][one])
    llh, grad_e, *grad_scores = fused[:5]
    k_tags, marginals = fused[8], fused[10]
    assert llh[one].isfinite().all() and not llh[~one].isfinite().any()  # the contract
    assert grad_e[one, 0].isfinite().all() and grad_e[~one, 0].isnan().all()
    assert marginals[~one, 0].isnan().all() and (k_tags[~one] == -1).all()
    assert all(grad.isnan().all() for grad in grad_scores)  # sequences >= 2 met the score


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "posinf"])
@DTYPES
@SHAPES
def test_a_nonfinite_transition_met_by_no_sequence_leaves_every_gradient_finite(B, dtype, bad):
    # Every sequence of length 1 (T = 3: padding): nothing reads the score. Its gradient is 0,
    # as the reference's; it was NaN (0 * exp(NaN) in the sums).
    g = torch.Generator().manual_seed(B + 1)
    e = torch.randn(B, 3, K, dtype=dtype, generator=g)
    L = torch.ones(B, dtype=torch.long)
    tr, s, n = (torch.randn(*shape, dtype=dtype, generator=g) for shape in ((K, K), (K,), (K,)))
    tr[2, 5] = bad
    tags = torch.randint(0, K, (B, 3), generator=g)
    inputs = [x.clone().requires_grad_() for x in (e, tr, s, n)]
    got = torch.autograd.grad(ops.crf_log_likelihood(inputs[0], tags, L, *inputs[1:], "sum"), inputs)
    log_z, gold = reference.crf_forward(inputs[0], tags, L, *inputs[1:])  # padded
    want = torch.autograd.grad((gold - log_z).sum(), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert (got[0][:, 1:] == 0).all() and (got[1] == 0).all()
    if dtype == torch.float64:  # the fused backward against finite differences
        assert torch.autograd.gradcheck(
            lambda x, s_, n_: ops.crf_log_likelihood(x, tags, L, tr, s_, n_, "none"),
            [x.clone().requires_grad_() for x in (e, s, n)])
