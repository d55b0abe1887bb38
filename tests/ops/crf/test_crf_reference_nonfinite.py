"""The reference CRF (fastner.reference) on NaN and +inf scores: it follows the contract the fused
ops follow (csrc/cpu/crf_gold_nan.h), so that parity tests compare whole batches. A sequence's
results do not depend on the other sequences of its batch; a sequence that reads a NaN or +inf
score has log Z NaN or +inf, NaN emission gradients over its length (and the shared scores NaN
gradients), NaN marginals over its length, and k-best rows of its best score with tags -1.

It was: a length-1 sequence in a padded batch got NaN emission gradients from a NaN or +inf
transition score it never reads (the steps it skips passed 0 * NaN back through log-sum-exp);
marginals of 1.6 to 3.2 for a length-2 sequence with a NaN transition score (a NaN log-sum-exp
replaced by 0 left a step unnormalised); k-best scores NaN where the best path scores +inf (a
+inf transition score added to the -inf of a rank that holds no path yet).
"""
import math

import pytest
import torch

from fastner import reference
from tests import testing

K, T = 4, 5
CASES = pytest.mark.parametrize("seed", range(12))
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])


def nonfinite_batch(seed, dtype, B=7):
    """(emissions, tags, lengths, transitions, start, end): lengths 0, 1, 2 and random ones; NaN
    or +inf in one of the four score tensors (inside or past a length), sometimes -inf too."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(B, T, K, dtype=dtype, generator=g)
    tags = torch.randint(0, K, (B, T), generator=g)
    lengths = torch.cat([torch.tensor([0, 1, 2]), torch.randint(0, T + 1, (B - 3,), generator=g)])
    scores = [torch.randn(*shape, dtype=dtype, generator=g) for shape in ((K, K), (K,), (K,))]
    bad = (math.nan, math.inf)[seed % 2]
    target = [e, *scores][seed // 2 % 4]
    for _ in range(1 + seed % 3):
        target.view(-1)[torch.randint(0, target.numel(), (1,), generator=g)] = bad
    if seed % 3 == 0:  # forbidden transitions: a +inf may meet a -inf (NaN)
        scores[0][torch.rand(K, K, generator=g) < 0.3] = -math.inf
    return (e, tags, lengths, *scores)


def forward_and_grads(e, tags, lengths, tr, start, end):
    inputs = [x.clone().requires_grad_() for x in (e, tr, start, end)]
    log_z, gold = reference.crf_forward(inputs[0], tags, lengths, *inputs[1:])
    grads = torch.autograd.grad((gold - log_z).sum(), inputs, allow_unused=True)
    return log_z.detach(), gold.detach(), [torch.zeros_like(x) if g is None else g
                                             for x, g in zip(inputs, grads)]


def same(a, b, msg):
    torch.testing.assert_close(a, b, equal_nan=True, msg=msg, **testing.tolerances(b.dtype))


@CASES
@DTYPES
def test_a_sequence_gets_the_same_results_in_a_batch_as_alone(seed, dtype):
    e, tags, lengths, tr, start, end = batch = nonfinite_batch(seed, dtype)
    log_z, gold, grads = forward_and_grads(*batch)
    scores = (tr, start, end)
    marginals = reference.crf_marginals(e, lengths, *scores)
    v_tags, v_score = reference.crf_viterbi(e, lengths, *scores)
    k_tags, k_score = reference.crf_kbest(e, lengths, *scores, 3)
    for b, L in enumerate(lengths.tolist()):
        alone = (e[b:b + 1, :L], tags[b:b + 1, :L], lengths[b:b + 1])
        a_log_z, a_gold, a_grads = forward_and_grads(*alone, *scores)
        msg = f"sequence {b} (length {L})"
        same(log_z[b:b + 1], a_log_z, f"log Z of {msg}")
        same(gold[b:b + 1], a_gold, f"gold score of {msg}")
        same(grads[0][b:b + 1, :L], a_grads[0], f"emission gradients of {msg}")
        assert (grads[0][b, L:] == 0).all(), msg
        same(marginals[b:b + 1, :L], reference.crf_marginals(e[b:b + 1, :L], *alone[2:], *scores), msg)
        a_v_tags, a_v_score = reference.crf_viterbi(e[b:b + 1, :L], *alone[2:], *scores)
        same(v_score[b:b + 1], a_v_score, f"best score of {msg}")
        assert torch.equal(v_tags[b:b + 1, :L], a_v_tags), msg
        a_k_tags, a_k_score = reference.crf_kbest(e[b:b + 1, :L], *alone[2:], *scores, 3)
        same(k_score[b:b + 1], a_k_score, f"k-best scores of {msg}")
        assert torch.equal(k_tags[b:b + 1, :, :L], a_k_tags), msg


@CASES
@DTYPES
@pytest.mark.parametrize("B", [7, 12], ids=["exact", "lanes"])
def test_the_reference_follows_the_fused_contract_on_whole_batches(seed, dtype, B):
    e, tags, lengths, tr, start, end = batch = nonfinite_batch(seed, dtype, B)
    scores = (tr, start, end)
    ops = torch.ops.fastner
    ones = torch.ones(B, dtype=dtype)
    fused_forward = ops.crf_forward(e, tags, lengths, *scores)
    fused_grads = ops.crf_backward(-ones, ones, e, tags, lengths, *scores)
    log_z, gold, grads = forward_and_grads(*batch)
    same(fused_forward[0], log_z, "log Z")
    same(fused_forward[1], gold, "gold score")
    for name, got, want in zip(("emissions", "transitions", "start", "end"), fused_grads, grads):
        same(got, want, f"gradient of the {name}")
    same(ops.crf_marginals(e, lengths, *scores), reference.crf_marginals(e, lengths, *scores),
         "marginals")
    (f_tags, f_score), (r_tags, r_score) = (ops.crf_viterbi(e, lengths, *scores),
                                            reference.crf_viterbi(e, lengths, *scores))
    same(f_score, r_score, "best score")
    finite = r_score.isfinite() | r_score.isneginf()  # a NaN or +inf best path keeps any tags
    assert torch.equal(f_tags[finite], r_tags[finite])
    for k in (1, 3, 7):
        (f_tags, f_score), (r_tags, r_score) = (ops.crf_kbest(e, lengths, *scores, k),
                                                reference.crf_kbest(e, lengths, *scores, k))
        same(f_score, r_score, f"k-best scores, k = {k}")
        assert torch.equal(f_tags, r_tags), k


@CASES
def test_marginals_are_probabilities_or_nan(seed):
    e, _, lengths, tr, start, end = nonfinite_batch(seed, torch.float32, B=9)
    marginals = reference.crf_marginals(e, lengths, tr, start, end)
    assert (((marginals >= 0) & (marginals <= 1)) | marginals.isnan()).all(), marginals
    # a sequence is NaN over its whole length or nowhere
    valid = torch.arange(T) < lengths[:, None]
    nan_steps = marginals.isnan().all(2)
    assert torch.equal(nan_steps.any(1, keepdim=True) & valid, nan_steps), nan_steps


def test_a_length_2_sequence_with_a_nan_transition_score_has_nan_marginals():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(3, 4, 5, generator=g)
    tr, start, end = torch.randn(5, 5, generator=g), torch.randn(5, generator=g), torch.randn(5, generator=g)
    tr[0, 2] = math.nan
    marginals = reference.crf_marginals(e, torch.tensor([2, 4, 1]), tr, start, end)
    assert marginals[:2, :2].isnan().all() and (marginals[0, 2:] == 0).all()
    torch.testing.assert_close(marginals[2, 0].sum(), torch.tensor(1.0))  # length 1: no transition


@pytest.mark.parametrize("lengths", [[5, 3, 1, 0], [2, 2, 1, 1]], ids=["mixed", "short"])
@pytest.mark.parametrize("constrained", [False, True])
def test_gradcheck_of_the_finite_reference(lengths, constrained):
    g = torch.Generator().manual_seed(len(lengths) + constrained)
    e = torch.randn(4, T, K, dtype=torch.float64, generator=g)
    tags = torch.randint(0, K, (4, T), generator=g)
    L = torch.tensor(lengths)
    tr = torch.randn(K, K, dtype=torch.float64, generator=g)
    if constrained:  # forbidden transitions (fixed: finite differences need finite inputs)
        tr[0, 1:] = -math.inf
        tags[:, :] = 1
    inputs = [x.requires_grad_() for x in (e, torch.randn(K, dtype=torch.float64, generator=g),
                                           torch.randn(K, dtype=torch.float64, generator=g))]
    if not constrained:
        inputs.append(tr.requires_grad_())

    def llh(x, start, end, transitions=tr):
        log_z, gold = reference.crf_forward(x, tags, L, transitions, start, end)
        return gold - log_z

    assert torch.autograd.gradcheck(llh, inputs)
    assert torch.autograd.gradgradcheck(llh, inputs)
