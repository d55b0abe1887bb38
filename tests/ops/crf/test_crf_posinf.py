"""+inf scores (an fp16 overflow under autocast gives one): the fused CPU ops give the reference's
results, and pytorch-crf's (torchcrf) where it has the op. The contract (csrc/cpu/crf_gold_nan.h):
a sequence with a +inf score in its length has log Z +inf, or NaN where that +inf meets a -inf
score (inf - inf); its log-likelihood follows (-inf, or NaN when the gold path holds the +inf);
its emission gradients and the shared transition-score gradients are non-finite, so that "skip
the step on non-finite gradients" logic (GradScaler) sees the overflow. Decoding: its best score
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
    """(log-likelihood, per-sequence finiteness of the emission gradients [B], finiteness of the
    transition, start and end gradients)."""
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
    return (llh.detach(), grad.flatten(1).isfinite().all(1).tolist(),
            [p.grad.isfinite().all().item() for p in params])


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
        # torchcrf reads padding (emissions times a 0 mask: inf * 0 is NaN), so it gets the
        # batch without sequence 1's +inf past its length, which changes nothing in fastner's
        theirs = run(twin, padding_cleared, tags, mask, reduction)
        for other in (ref, theirs):
            torch.testing.assert_close(fused[0], other[0], equal_nan=True)
            assert fused[1:] == other[1:], reduction
        if reduction == "none":
            torch.testing.assert_close(fused[0][0], torch.tensor(expected_llh0, dtype=dtype),
                                       equal_nan=True)
        assert fused[1] == [False] + [True] * (B - 1), reduction
        assert fused[2] == [False, False, False], reduction
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
    # the reference's path of a NaN score crosses the forbidden transition (its max picks NaN):
    # only the finite sequences' paths are compared
    assert torch.equal(tags[1:], ref[0][1:])
    torch.testing.assert_close(score, ref[1], equal_nan=True)
    assert torch.equal(k_tags, ref[2])
    torch.testing.assert_close(k_scores, ref[3], equal_nan=True)
    value = score[0].item()
    assert (value != value) if case == "meets_minus_inf" else value == float("inf")
    assert (k_tags[0] == -1).all()
    assert torch.isnan(marginals[0]).all() and torch.isfinite(marginals[1:]).all()
    assert torch.equal(marginals.isnan().flatten(1).any(1), ref[4].isnan().flatten(1).any(1))


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
            llh, grads_finite, scores_finite = run(crf, emissions, tags, mask, "sum", backend)
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
# NaN on every op (the contract poisoned every non-empty sequence). The reference is run on each
# sequence alone (trimmed to its length): in a padded batch its autograd multiplies the zero
# gradient of the steps a short sequence skips by NaN softmax weights, which a sequence's own
# gradient must not depend on.

def _alone(b, e, L):
    return e[b:b + 1, :int(L[b])], L[b:b + 1]


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
    inputs = [x.clone().requires_grad_() for x in (e, tr, s, n)]
    llh = ops.crf_log_likelihood(inputs[0], tags, L, *inputs[1:], "none")
    grads = torch.autograd.grad(llh.sum(), inputs)
    log_z, gold = ops.crf_forward(e, tags, L, tr, s, n)
    v_tags, v_score = ops.crf_viterbi(e, L, tr, s, n)
    k_tags, k_score = ops.crf_kbest(e, L, tr, s, n, k)
    marginals = ops.crf_marginals(e, L, tr, s, n)
    for b in range(B):
        e_b, L_b = _alone(b, e, L)
        ref_log_z, ref_gold = reference.crf_forward(e_b, tags[b:b + 1, :int(L[b])], L_b, tr, s, n)
        torch.testing.assert_close(log_z[b:b + 1], ref_log_z, equal_nan=True, msg=f"log Z {b}")
        if L[b] > 1:  # the contract: non-finite log Z, NaN gradients and marginals
            assert not torch.isfinite(llh[b]) and grads[0][b, :L[b]].isnan().all()
            assert marginals[b, :L[b]].isnan().all() and (k_tags[b] == -1).all()
            continue
        assert torch.isfinite(log_z[b]) and torch.isfinite(llh[b])
        torch.testing.assert_close(llh[b:b + 1], ref_gold - ref_log_z)
        x = e_b.clone().requires_grad_()
        ref_llh = torch.sub(*reversed(reference.crf_forward(x, tags[b:b + 1, :1], L_b, tr, s, n)))
        torch.testing.assert_close(grads[0][b, :1], torch.autograd.grad(ref_llh.sum(), x)[0][0])
        ref_v = reference.crf_viterbi(e_b, L_b, tr, s, n)
        torch.testing.assert_close(v_score[b:b + 1], ref_v[1])
        assert torch.equal(v_tags[b:b + 1, :1], ref_v[0])
        ref_k = reference.crf_kbest(e_b, L_b, tr, s, n, k)
        torch.testing.assert_close(k_score[b:b + 1], ref_k[1])
        assert torch.equal(k_tags[b:b + 1, :, :1], ref_k[0])
        torch.testing.assert_close(marginals[b:b + 1, :1], reference.crf_marginals(e_b, L_b, tr, s, n))
    assert all(grad.isnan().all() for grad in grads[1:])  # sequences >= 2 met the score


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
