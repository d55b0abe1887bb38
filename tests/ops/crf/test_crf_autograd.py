"""One autograd formula per trainable CRF op (fastner/ops/_autograd.py): registered at the op's
Autograd key, reached by eager calls, torch.ops calls, torch.compile and opcheck alike. The RNN
layer's: tests/ops/rnn/test_rnn_autograd.py."""
from __future__ import annotations

import pytest
import torch

import fastner.ops as ops
from fastner.ops import crf as crf_ops
from tests import testing
from tests.ops.crf.samples import crf_inputs

TRAINABLE = ("crf_forward", "crf_log_likelihood")
REDUCTIONS = crf_ops.REDUCTIONS

requires_ops = pytest.mark.skipif(not all(testing.op_registered(op) for op in TRAINABLE),
                                  reason="fastner CRF ops not registered (extension not built)")
pytestmark = requires_ops


@pytest.mark.parametrize("name", TRAINABLE)
def test_each_trainable_op_has_its_autograd_kernel(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastner::{name}", "Autograd")


def _crf_inputs(batch_first, dtype=torch.float64):
    """crf_log_likelihood's tensors (tests/ops/crf/samples.py), time-major when not batch_first."""
    emissions, tags, lengths, transitions, start, end = crf_inputs(3, 5, 4, dtype)  # lengths hold 5 and 0
    if not batch_first:
        emissions, tags = emissions.transpose(0, 1).contiguous(), tags.t().contiguous()
    return [emissions.requires_grad_(), tags, lengths, *(p.requires_grad_() for p in (transitions, start, end))]


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_first"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_crf_log_likelihood_op_check_gradcheck_and_parity(reduction, batch_first):
    args = _crf_inputs(batch_first)
    op = torch.ops.fastner.crf_log_likelihood.default
    torch.library.opcheck(op, (*args, reduction, batch_first))
    leaves = [args[0], *args[3:]]

    def llh(em, tr, st, en):
        return op(em, args[1], args[2], tr, st, en, reduction, batch_first)

    assert torch.autograd.gradcheck(llh, tuple(leaves))
    # the wrapper (eager) and the op give the same value, gradients and graph node
    got = ops.crf_log_likelihood(*args, reduction, batch_first)
    want = llh(*leaves)
    assert type(got.grad_fn) is type(want.grad_fn)
    torch.testing.assert_close(got, want)
    with testing.backend("reference"):
        expected = ops.crf_log_likelihood(*args, reduction, batch_first)
    torch.testing.assert_close(got, expected)
    for a, b in zip(torch.autograd.grad(got.sum(), leaves), torch.autograd.grad(expected.sum(), leaves)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_crf_log_likelihood_backward_runs_twice_with_retained_graph(reduction):
    # The fused formula keeps the gradients of its forward pass; a second backward through a
    # retained graph must find them unscaled by the first.
    args = _crf_inputs(True)
    leaves = [args[0], *args[3:]]
    out = -ops.crf_log_likelihood(*args, reduction, True).sum()
    first = torch.autograd.grad(out, leaves, retain_graph=True)
    second = torch.autograd.grad(out, leaves)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_crf_log_likelihood_gradient_of_the_transitions_alone(reduction):
    # Only some inputs need a gradient: the others get none, the needed ones match the reference.
    emissions, tags, lengths, transitions, start, end = _crf_inputs(True)
    emissions = emissions.detach()
    got = torch.autograd.grad(ops.crf_log_likelihood(emissions, tags, lengths, transitions, start,
                                                     end, reduction, True).sum(), [transitions, end])
    with testing.backend("reference"):
        want = torch.autograd.grad(ops.crf_log_likelihood(emissions, tags, lengths, transitions,
                                                          start, end, reduction, True).sum(),
                                   [transitions, end])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_crf_log_likelihood_rejects_an_unknown_reduction():
    args = _crf_inputs(True)
    with pytest.raises(ValueError, match="reduction"):
        with torch.no_grad():
            torch.ops.fastner.crf_log_likelihood(*args, "max", True)


def test_eager_and_op_calls_build_the_same_graph_node():
    args = _crf_inputs(True)
    eager = ops.crf_forward(*args)[0]
    direct = torch.ops.fastner.crf_forward(*args)[0]
    assert type(eager.grad_fn) is type(direct.grad_fn)
    assert type(eager.grad_fn).__name__.startswith("_CRFForward")


def test_no_graph_without_a_gradient():
    args = _crf_inputs(True)
    with torch.no_grad():
        assert ops.crf_log_likelihood(*args, "sum", True).grad_fn is None


def test_compile_traces_the_registered_formula():
    torch._dynamo.reset()
    args = _crf_inputs(False, torch.float32)

    def loss(em, tags, lengths, tr, st, en):
        return -ops.crf_log_likelihood(em, tags, lengths, tr, st, en, "token_mean", False)

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    leaves = [args[0], *args[3:]]
    got = torch.autograd.grad(compiled(*args), leaves)
    want = torch.autograd.grad(loss(*args), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_crf_forward_double_backward():
    # create_graph=True through crf_forward (CRF.log_partition): the fused crf_backward op has
    # no derivative, and autograd took it as zero (a warning, second-order terms silently 0).
    emissions, tags, lengths, transitions, start, end = crf_inputs(3, 4, 3, torch.float64)
    leaves = [t.requires_grad_() for t in (emissions, transitions, start, end)]

    def forward(emissions, transitions, start, end):
        return ops.crf_forward(emissions, tags, lengths, transitions, start, end)

    assert torch.autograd.gradgradcheck(forward, leaves, nondet_tol=1e-10)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_first"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_crf_log_likelihood_double_backward(reduction, batch_first):
    # create_graph=True through CRF.forward's op (gradient penalties): its fused gradients carry
    # no graph, so the second grad raised that they do not require grad (pytorch-crf has one).
    args = _crf_inputs(batch_first)
    op = torch.ops.fastner.crf_log_likelihood.default
    leaves = [args[0], *args[3:]]

    def llh(em, tr, st, en):
        return op(em, args[1], args[2], tr, st, en, reduction, batch_first)

    assert torch.autograd.gradgradcheck(llh, tuple(leaves))
    # the second derivative equals the reference path's, and only the asked-for leaves get one
    first = torch.autograd.grad(llh(*leaves).sum(), leaves, create_graph=True)
    penalty = sum((g ** 2).sum() for g in first)
    got = torch.autograd.grad(penalty, leaves)
    with testing.backend("reference"):
        first_ref = torch.autograd.grad(ops.crf_log_likelihood(*args, reduction, batch_first).sum(), leaves,
                                        create_graph=True)
        want = torch.autograd.grad(sum((g ** 2).sum() for g in first_ref), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    only_transitions = torch.autograd.grad(llh(*leaves).sum(), [args[3]], create_graph=True)[0]
    assert only_transitions.requires_grad and only_transitions.shape == args[3].shape


def test_crf_module_double_backward_matches_pytorch_crf():
    torchcrf = pytest.importorskip("torchcrf")
    import fastner.nn

    torch.manual_seed(5)
    ours, theirs = fastner.nn.CRF(4, batch_first=True).double(), torchcrf.CRF(4, batch_first=True).double()
    ours.load_state_dict(theirs.state_dict())
    emissions = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    tags = torch.randint(0, 4, (3, 5))
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] + [0] * 4], dtype=torch.bool)
    results = []
    for crf in (ours, theirs):
        (grad,) = torch.autograd.grad(crf(emissions, tags, mask), [emissions], create_graph=True)
        results.append(torch.autograd.grad((grad ** 2).sum(), [emissions, *crf.parameters()]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
