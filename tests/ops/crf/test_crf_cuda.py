"""The CRF ops on CUDA (csrc/cuda/crf.cu, csrc/cuda/kernels/crf.cuh) against the CPU kernels,
the reference path and pytorch-crf on CUDA. Skipped where torch has no CUDA device or the
extension has no CUDA kernels.

Each case draws its shapes and values fresh (seeded per case); inputs are drawn on the CPU and
copied, so the CPU kernel, the reference and the CUDA kernel see identical values.
"""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("CUDA is not available", allow_module_level=True)

import fastner  # noqa: E402
import fastner.nn  # noqa: E402
import fastner.ops  # noqa: E402,F401  (fake kernels and the autograd formula)
from fastner import reference  # noqa: E402
from fastner.reference import crf_accumulate_dtype  # noqa: E402
from fastner._extension import has_kernel  # noqa: E402
from tests import testing  # noqa: E402
from tests.ops.crf.samples import CUDA_CRF_OPS, crf_inputs, differentiable, sample_inputs  # noqa: E402

CUDA = torch.device("cuda")

pytestmark = pytest.mark.skipif(
    not all(has_kernel(name, "cuda") and has_kernel(name, "cpu") for name in CUDA_CRF_OPS),
    reason="fastner was built without the CUDA (or CPU) CRF kernels",
)

INF = float("-inf")
# (B, T, K) ranges per case: warp path (K <= 32) and block path (K > 32).
SHAPES = [(1, 1, 1), (3, 7, 2), (5, 40, 17), (8, 13, 32), (6, 9, 33), (4, 21, 64), (3, 5, 100), (2, 4, 300)]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def op(name):
    return getattr(torch.ops.fastner, name)


def reseed(case: int) -> None:
    torch.manual_seed(1000003 * case + 17)


def to_cuda(*tensors):
    return tuple(None if t is None else t.to(CUDA) for t in tensors)


def assert_close(actual, expected, dtype, scale=1.0, msg=""):
    tol = testing.tolerances(dtype)
    torch.testing.assert_close(
        actual.cpu().to(expected.dtype), expected, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, scale),
        equal_nan=False, msg=(lambda m: f"{msg}\n{m}") if msg else None,
    )


def assert_no_nan(*tensors):
    for t in tensors:
        assert not torch.isnan(t).any(), t


# ---------------------------------------------------------------------------------------------
# parity: CUDA vs CPU kernel vs reference, every op
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", range(len(SHAPES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("constrained", [False, True], ids=["free", "constrained"])
def test_forward_matches_cpu_and_reference(case, dtype, constrained):
    reseed(case)
    B, T, K = SHAPES[case]
    inputs = crf_inputs(B, T, K, dtype, constrained=constrained)
    emissions, tags, lengths, transitions, start, end = inputs
    expected = op("crf_forward")(*inputs)
    oracle = reference.crf_forward(*inputs)
    actual = op("crf_forward")(*to_cuda(*inputs))
    assert len(actual) == len(expected) == len(oracle) == 2  # log Z and the gold score on every device
    for name, a, e, r in zip(("log_z", "gold"), actual, expected, oracle):
        assert a.device.type == "cuda" and a.dtype == e.dtype and a.shape == e.shape, name
        assert_close(a, e, dtype, msg=f"{name} vs CPU")
        assert_close(a, r, dtype, msg=f"{name} vs reference")
    no_tags = op("crf_forward")(*to_cuda(emissions, None, lengths, transitions, start, end))
    assert torch.equal(no_tags[0], actual[0])
    assert torch.equal(no_tags[1], torch.zeros_like(no_tags[1]))


@pytest.mark.parametrize("case", range(len(SHAPES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("constrained", [False, True], ids=["free", "constrained"])
def test_backward_matches_cpu_and_reference(case, dtype, constrained):
    reseed(100 + case)
    B, T, K = SHAPES[case]
    inputs = crf_inputs(B, T, K, dtype, constrained=constrained)
    emissions, tags, lengths, transitions, start, end = inputs
    acc = crf_accumulate_dtype(dtype)
    grad_log_z = torch.randn(B, dtype=acc)
    grad_gold = torch.randn(B, dtype=acc)
    expected = op("crf_backward")(grad_log_z, grad_gold, *inputs)
    oracle = reference.crf_backward(grad_log_z, grad_gold, *inputs)
    actual = op("crf_backward")(*to_cuda(grad_log_z, grad_gold), *to_cuda(*inputs))
    scale = float(lengths.sum())
    for name, a, e, r in zip(("emissions", "transitions", "start", "end"), actual, expected, oracle):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert_no_nan(a)
        assert_close(a, e, dtype, scale=scale, msg=f"grad {name} vs CPU")
        assert_close(a, r, dtype, scale=scale, msg=f"grad {name} vs reference")


@pytest.mark.parametrize("case", range(len(SHAPES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("constrained", [False, True], ids=["free", "constrained"])
def test_viterbi_matches_cpu(case, dtype, constrained):
    reseed(200 + case)
    B, T, K = SHAPES[case]
    emissions, _, lengths, transitions, start, end = crf_inputs(B, T, K, dtype, constrained=constrained)
    inputs = (emissions, lengths, transitions, start, end)
    tags_cpu, scores_cpu = op("crf_viterbi")(*inputs)
    tags_ref, scores_ref = reference.crf_viterbi(*inputs)
    tags, scores = op("crf_viterbi")(*to_cuda(*inputs))
    assert tags.dtype == torch.int64 and tags.shape == (B, T)
    # Viterbi adds and compares in the same order on both devices: identical paths.
    assert torch.equal(tags.cpu(), tags_cpu)
    assert torch.equal(tags.cpu(), tags_ref)
    assert_close(scores, scores_cpu, dtype)
    assert_close(scores, scores_ref, dtype)


@pytest.mark.parametrize("case", range(len(SHAPES)))
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("constrained", [False, True], ids=["free", "constrained"])
def test_kbest_matches_cpu(case, k, constrained):
    reseed(300 + case)
    B, T, K = SHAPES[case]
    if K > 100:
        pytest.skip("keeps the test fast")
    dtype = torch.float32
    emissions, _, lengths, transitions, start, end = crf_inputs(B, T, K, dtype, constrained=constrained)
    inputs = (emissions, lengths, transitions, start, end)
    tags_cpu, scores_cpu = op("crf_kbest")(*inputs, k)
    tags_ref, scores_ref = reference.crf_kbest(*inputs, k)
    tags, scores = op("crf_kbest")(*to_cuda(*inputs), k)
    assert tags.shape == (B, k, T) and scores.shape == (B, k)
    assert torch.equal(tags.cpu(), tags_cpu)
    torch.testing.assert_close(scores.cpu(), scores_cpu, rtol=0, atol=0)
    torch.testing.assert_close(scores.cpu(), scores_ref, **testing.tolerances(dtype))
    best, best_score = op("crf_viterbi")(*to_cuda(*inputs))
    finite = torch.isfinite(best_score.cpu())
    assert torch.equal(tags[:, 0].cpu()[finite], best.cpu()[finite])


def test_kbest_ties_follow_the_cpu_order():
    # Integer scores make many exact ties; the CPU order (higher score, then lower candidate
    # index i * k + r) must be reproduced exactly.
    reseed(400)
    B, T, K, k = 16, 6, 5, 10
    emissions = torch.randint(-2, 3, (B, T, K)).float()
    transitions = torch.randint(-1, 2, (K, K)).float()
    start = torch.zeros(K)
    end = torch.zeros(K)
    lengths = torch.randint(0, T + 1, (B,))
    inputs = (emissions, lengths, transitions, start, end)
    tags_cpu, scores_cpu = op("crf_kbest")(*inputs, k)
    tags, scores = op("crf_kbest")(*to_cuda(*inputs), k)
    assert torch.equal(scores.cpu(), scores_cpu)
    assert torch.equal(tags.cpu(), tags_cpu)


@pytest.mark.parametrize("case", range(len(SHAPES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("constrained", [False, True], ids=["free", "constrained"])
def test_marginals_match_cpu_and_reference(case, dtype, constrained):
    reseed(500 + case)
    B, T, K = SHAPES[case]
    emissions, _, lengths, transitions, start, end = crf_inputs(B, T, K, dtype, constrained=constrained)
    inputs = (emissions, lengths, transitions, start, end)
    expected = op("crf_marginals")(*inputs)
    oracle = reference.crf_marginals(*inputs)
    actual = op("crf_marginals")(*to_cuda(*inputs))
    assert actual.dtype == expected.dtype and actual.shape == (B, T, K)
    assert_no_nan(actual)
    assert_close(actual, expected, dtype, msg="vs CPU")
    assert_close(actual, oracle, dtype, msg="vs reference")


# ---------------------------------------------------------------------------------------------
# half / bfloat16 emissions (read and accumulated in float32)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("K", [17, 45])
def test_low_precision_emissions_match_cpu(dtype, K):
    reseed(600 + K)
    B, T = 9, 23
    inputs = crf_inputs(B, T, K, dtype)
    emissions, tags, lengths, transitions, start, end = inputs
    assert transitions.dtype == torch.float32
    cuda_inputs = to_cuda(*inputs)
    # The same low-precision values, converted to float32 once, on both devices (the alphas
    # crf_backward recomputes are checked through its gradients).
    cuda_out, cpu_out = op("crf_forward")(*cuda_inputs), op("crf_forward")(*inputs)
    assert len(cuda_out) == len(cpu_out) == 2
    for a, e in zip(cuda_out, cpu_out):
        assert a.dtype == torch.float32
        assert_close(a, e, torch.float32)
    g = torch.randn(B), torch.randn(B)
    actual = op("crf_backward")(*to_cuda(*g), *cuda_inputs)
    expected = op("crf_backward")(*g, *inputs)
    assert actual[0].dtype == dtype and expected[0].dtype == dtype
    torch.testing.assert_close(actual[0].cpu().float(), expected[0].float(), rtol=1e-2, atol=1e-2)
    for a, e in zip(actual[1:], expected[1:]):
        assert_close(a, e, torch.float32, scale=float(lengths.sum()))
    plain = (emissions, lengths, transitions, start, end)
    assert torch.equal(op("crf_viterbi")(*to_cuda(*plain))[0].cpu(), op("crf_viterbi")(*plain)[0])
    assert torch.equal(op("crf_kbest")(*to_cuda(*plain), 3)[0].cpu(), op("crf_kbest")(*plain, 3)[0])
    assert_close(op("crf_marginals")(*to_cuda(*plain)), op("crf_marginals")(*plain), torch.float32)


# ---------------------------------------------------------------------------------------------
# edge cases: length 0, T = 0, B = 0, dead sequences, K = 1, large batch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [3, 40])
def test_length_zero_and_empty_shapes(K):
    reseed(700 + K)
    for B, T in ((4, 5), (3, 0), (0, 6)):
        emissions, tags, _, transitions, start, end = crf_inputs(B, T, K, torch.float32)
        lengths = torch.zeros(B, dtype=torch.int64)
        inputs = to_cuda(emissions, tags, lengths, transitions, start, end)
        log_z, gold = op("crf_forward")(*inputs)
        assert torch.equal(log_z.cpu(), torch.zeros(B)) and torch.equal(gold.cpu(), torch.zeros(B))
        grads = op("crf_backward")(*to_cuda(torch.ones(B), torch.ones(B)), *inputs)
        assert torch.equal(grads[0].cpu(), torch.zeros(B, T, K))
        for g in grads[1:]:
            assert torch.equal(g.cpu(), torch.zeros_like(g.cpu()))
        plain = to_cuda(emissions, lengths, transitions, start, end)
        tags_v, scores_v = op("crf_viterbi")(*plain)
        assert torch.equal(tags_v.cpu(), torch.full((B, T), -1)) and torch.equal(scores_v.cpu(), torch.zeros(B))
        tags_k, scores_k = op("crf_kbest")(*plain, 3)
        assert torch.equal(tags_k.cpu(), torch.full((B, 3, T), -1))
        expected_scores = torch.full((B, 3), INF)
        expected_scores[:, 0] = 0
        assert torch.equal(scores_k.cpu(), expected_scores)
        assert torch.equal(op("crf_marginals")(*plain).cpu(), torch.zeros(B, T, K))


@pytest.mark.parametrize("K", [2, 40])
def test_dead_sequences_give_minus_inf_and_no_nan(K):
    # Every transition forbidden: sequences longer than 1 have no allowed path.
    reseed(800 + K)
    B, T = 5, 6
    emissions, tags, lengths, transitions, start, end = crf_inputs(B, T, K, torch.float32, min_len=1)
    transitions = torch.full((K, K), INF)
    inputs = (emissions, tags, lengths, transitions, start, end)
    log_z, gold = op("crf_forward")(*to_cuda(*inputs))
    expected = op("crf_forward")(*inputs)
    assert torch.equal(torch.isneginf(log_z.cpu()), lengths > 1)
    assert_close(log_z, expected[0], torch.float32)
    assert_close(gold, expected[1], torch.float32)
    g = torch.randn(B), torch.randn(B)
    grads = op("crf_backward")(*to_cuda(*g), *to_cuda(*inputs))
    expected_grads = op("crf_backward")(*g, *inputs)
    for a, e in zip(grads, expected_grads):
        assert_no_nan(a)
        assert_close(a, e, torch.float32, scale=float(lengths.sum()))
    marginals = op("crf_marginals")(*to_cuda(emissions, lengths, transitions, start, end))
    assert_no_nan(marginals)
    assert_close(marginals, op("crf_marginals")(emissions, lengths, transitions, start, end), torch.float32)
    tags_k, scores_k = op("crf_kbest")(*to_cuda(emissions, lengths, transitions, start, end), 4)
    dead = lengths > 1
    assert torch.isneginf(scores_k.cpu()[dead]).all()
    assert (tags_k.cpu()[dead] == -1).all()


def test_single_tag():
    reseed(900)
    inputs = crf_inputs(3, 5, 1, torch.float64)
    for a, e in zip(op("crf_forward")(*to_cuda(*inputs)), op("crf_forward")(*inputs)):
        assert_close(a, e, torch.float64)
    emissions, _, lengths, transitions, start, end = inputs
    tags, _ = op("crf_viterbi")(*to_cuda(emissions, lengths, transitions, start, end))
    assert torch.equal(tags.cpu(), op("crf_viterbi")(emissions, lengths, transitions, start, end)[0])


def test_large_batch_stress():
    reseed(1000)
    B, T, K = 4096, 40, 17
    inputs = crf_inputs(B, T, K, torch.float32)
    emissions, tags, lengths, transitions, start, end = inputs
    cuda_inputs = to_cuda(*inputs)
    actual = op("crf_forward")(*cuda_inputs)
    expected = op("crf_forward")(*inputs)
    for a, e in zip(actual, expected):
        assert_close(a, e, torch.float32)
    g = torch.randn(B), torch.randn(B)
    grads = op("crf_backward")(*to_cuda(*g), *cuda_inputs)
    expected_grads = op("crf_backward")(*g, *inputs)
    for a, e in zip(grads, expected_grads):
        # Sums over 4096 sequences: compare relative to their magnitude.
        torch.testing.assert_close(a.cpu(), e, rtol=1e-4, atol=1e-4 * max(1.0, float(e.abs().max())))
    plain = (emissions, lengths, transitions, start, end)
    assert torch.equal(op("crf_viterbi")(*to_cuda(*plain))[0].cpu(), op("crf_viterbi")(*plain)[0])
    assert torch.equal(op("crf_kbest")(*to_cuda(*plain), 2)[0].cpu(), op("crf_kbest")(*plain, 2)[0])
    assert_close(op("crf_marginals")(*to_cuda(*plain)), op("crf_marginals")(*plain), torch.float32)


def test_long_sequences_use_global_backpointers():
    # T * K too large for the shared-memory backpointers: the global scratch path.
    reseed(1100)
    for B, T, K in ((3, 3000, 17), (2, 400, 300)):
        emissions, _, lengths, transitions, start, end = crf_inputs(B, T, K, torch.float32)
        plain = (emissions, lengths, transitions, start, end)
        tags, scores = op("crf_viterbi")(*to_cuda(*plain))
        tags_cpu, scores_cpu = op("crf_viterbi")(*plain)
        assert torch.equal(tags.cpu(), tags_cpu)
        torch.testing.assert_close(scores.cpu(), scores_cpu, rtol=1e-5, atol=1e-3)


def test_backward_is_deterministic():
    reseed(1200)
    for K in (17, 50):
        inputs = to_cuda(*crf_inputs(600, 30, K, torch.float32))
        g = to_cuda(torch.randn(600), torch.randn(600))
        first = op("crf_backward")(*g, *inputs)
        second = op("crf_backward")(*g, *inputs)
        for a, b in zip(first, second):
            assert torch.equal(a, b)


def test_runs_on_the_current_stream():
    reseed(1300)
    inputs = to_cuda(*crf_inputs(64, 30, 17, torch.float32))
    expected = op("crf_forward")(*inputs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        actual = op("crf_forward")(*inputs)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)


# ---------------------------------------------------------------------------------------------
# invalid values: poisoned with NaN on CUDA (the CPU raises; see csrc/cuda/crf.cu)
# ---------------------------------------------------------------------------------------------


def test_bad_lengths_and_tags_poison_with_nan():
    reseed(1400)
    B, T, K = 4, 6, 5
    emissions, tags, lengths, transitions, start, end = crf_inputs(B, T, K, torch.float32, min_len=1)
    lengths[2] = T + 1
    tags[1, 0] = K  # out of range inside the length
    inputs = to_cuda(emissions, tags, lengths, transitions, start, end)
    log_z, gold = op("crf_forward")(*inputs)
    assert torch.isnan(log_z[2]) and torch.isnan(gold[2]) and torch.isnan(gold[1])
    assert not torch.isnan(log_z[[0, 1, 3]]).any() and not torch.isnan(gold[[0, 3]]).any()
    grads = op("crf_backward")(*to_cuda(torch.ones(B), torch.ones(B)), *inputs)
    assert torch.isnan(grads[0][1]).all() and torch.isnan(grads[0][2]).all()
    assert torch.isnan(grads[1]).all()
    plain = to_cuda(emissions, lengths, transitions, start, end)
    tags_v, scores_v = op("crf_viterbi")(*plain)
    assert torch.isnan(scores_v[2]) and (tags_v[2] == -1).all()
    assert torch.isnan(op("crf_marginals")(*plain)[2]).all()
    tags_k, scores_k = op("crf_kbest")(*plain, 2)
    assert torch.isnan(scores_k[2]).all() and (tags_k[2] == -1).all()


def test_bad_input_raises_like_cpu():
    emissions, tags, lengths, transitions, start, end = to_cuda(*crf_inputs(2, 3, 4, torch.float32))
    with pytest.raises(ValueError, match="lengths"):
        op("crf_forward")(emissions, tags, lengths.cpu(), transitions, start, end)
    with pytest.raises(ValueError, match="transition scores must be"):
        op("crf_viterbi")(emissions, lengths, transitions.double(), start, end)
    with pytest.raises(ValueError, match="tags must be"):
        op("crf_forward")(emissions, tags.int(), lengths, transitions, start, end)
    with pytest.raises(ValueError, match="k must be"):
        op("crf_kbest")(emissions, lengths, transitions, start, end, 0)
    big = torch.zeros(1, 2, 1025, device=CUDA)
    k_big = torch.zeros(1025, 1025, device=CUDA)
    with pytest.raises(ValueError, match="at most 1024 tags"):
        op("crf_viterbi")(big, torch.ones(1, dtype=torch.long, device=CUDA), k_big, k_big[0], k_big[0])


# ---------------------------------------------------------------------------------------------
# torch.library contracts, gradcheck, the module against pytorch-crf on CUDA
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [5, 40])
def test_opcheck(K):
    # K = 5 takes the warp path, K = 40 the block path; every layout of the samples
    reseed(1500 + K)
    for name in CUDA_CRF_OPS:
        for args in sample_inputs(name, CUDA, torch.float32, shapes=[(3, 6, K)]):
            torch.library.opcheck(op(name), args)


def test_gradcheck_float64():
    reseed(1600)
    for K in (4, 35):
        for args in sample_inputs("crf_forward", CUDA, torch.float64, shapes=[(3, 5, K)], requires_grad=True):
            fn, leaves = differentiable("crf_forward", args, select=(0, 1) if args[1] is not None else (0,))
            assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("K", [5, 40])
def test_module_matches_pytorch_crf_on_cuda(batch_first, K):
    pytest.importorskip("torchcrf")
    from fastner.bench.baselines import torch_baseline

    reseed(1700 + K)
    B, T = 12, 17
    ours = fastner.nn.CRF(K, batch_first=batch_first)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.5)
    ours = ours.to(CUDA)
    theirs = torch_baseline(ours)[0]
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T
    mask = torch.arange(T) < lengths.unsqueeze(1)  # [B, T]
    emissions = torch.randn(B, T, K)
    tags = torch.randint(0, K, (B, T))
    if not batch_first:
        mask, emissions, tags = mask.t().contiguous(), emissions.transpose(0, 1).contiguous(), tags.t().contiguous()
    mask, emissions, tags = to_cuda(mask, emissions, tags)

    def run(crf):
        crf.zero_grad(set_to_none=True)
        em = emissions.clone().requires_grad_(True)
        llh = crf(em, tags, mask=mask, reduction="sum")
        llh.backward()
        return [llh.detach(), em.grad, crf.transitions.grad, crf.start_transitions.grad, crf.end_transitions.grad]

    for name, a, e in zip(("llh", "emissions", "transitions", "start", "end"), run(ours), run(theirs)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * float(lengths.sum()), msg=name)
    assert ours.decode(emissions, mask=mask) == theirs.decode(emissions, mask=mask)
