"""One autograd formula for the RNN layer op (fastner/ops/_autograd.py): registered at
rnn_layer_forward's Autograd key, reached by eager calls and torch.ops calls alike; the training
workspace only where a gradient is wanted. The CRF ops': tests/ops/crf/test_crf_autograd.py."""
from __future__ import annotations

import pytest
import torch

import fastner.ops as ops
from tests import testing

pytestmark = testing.requires_op("rnn_layer_forward")


def test_rnn_layer_forward_has_its_autograd_kernel():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastner::rnn_layer_forward", "Autograd")


def test_eager_and_op_calls_build_the_same_graph_node():
    x = torch.randn(2, 3, 4, requires_grad=True)
    weights = [torch.randn(9, 4, requires_grad=True), torch.randn(9, 3, requires_grad=True)]
    lengths = torch.tensor([3, 1])
    out = ops.rnn_layer(x, lengths, weights, None, None, "gru", False, True)[0]
    direct = torch.ops.fastner.rnn_layer_forward(x, lengths, weights, None, None, "gru", False, True, True)[0]
    assert type(out.grad_fn) is type(direct.grad_fn)


def test_no_graph_and_no_workspace_without_a_gradient():
    x = torch.randn(2, 3, 4)
    weights = [torch.randn(9, 4), torch.randn(9, 3)]
    out = torch.ops.fastner.rnn_layer_forward(x, torch.tensor([3, 1]), weights, None, None, "gru",
                                              False, True, False)
    assert out[0].grad_fn is None and out[3].numel() == 0


def test_rnn_backward_without_training_workspace_raises():
    x = torch.randn(2, 3, 4, requires_grad=True)
    weights = [torch.randn(9, 4), torch.randn(9, 3)]
    out = torch.ops.fastner.rnn_layer_forward(x, torch.tensor([3, 1]), weights, None, None, "gru",
                                              False, True, False)
    with pytest.raises(RuntimeError, match="training=False"):
        out[0].sum().backward()


def test_rnn_unused_outputs_need_no_gradient():
    # h_n alone: output's and c_n's gradients are zeros made in backward (not by autograd)
    x = torch.randn(2, 3, 4, requires_grad=True)
    weights = [torch.randn(16, 4, requires_grad=True), torch.randn(16, 4, requires_grad=True)]
    lengths = torch.tensor([3, 2])
    _, h_n, _ = ops.rnn_layer(x, lengths, weights, None, None, "lstm", False, True)
    got = torch.autograd.grad(h_n.sum(), [x, *weights])
    with testing.backend("reference"):
        _, h_ref, _ = ops.rnn_layer(x, lengths, weights, None, None, "lstm", False, True)
        want = torch.autograd.grad(h_ref.sum(), [x, *weights])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_rnn_layer_double_backward(mode):
    # create_graph=True (gradient penalties, Hessian-vector products): the fused backward op
    # has no derivative, and autograd took it as zero (a warning, second-order terms silently
    # 0); torch.nn's layers have one. gradgradcheck checks the second derivative numerically.
    gen = torch.Generator().manual_seed(5)
    G = {"lstm": 4, "gru": 3}.get(mode, 1)
    x = torch.randn(2, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = [(0.8 * torch.randn(shape, generator=gen, dtype=torch.float64)).requires_grad_()
               for _ in range(2) for shape in ((G * 2, 2), (G * 2, 2), (G * 2,), (G * 2,))]
    h0 = torch.randn(2, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([3, 2])

    def layer(x, h0, c0, *weights):
        output, h_n, c_n = ops.rnn_layer(x, lengths, list(weights), h0, c0 if mode == "lstm" else None,
                                         mode, True, True)
        return (output, h_n, c_n) if mode == "lstm" else (output, h_n)

    assert torch.autograd.gradgradcheck(layer, (x, h0, c0, *weights), nondet_tol=1e-10)
    # and the same second derivative as torch.nn's layer
    module = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}.get(mode, torch.nn.RNN)(
        2, 2, batch_first=True, bidirectional=True, dtype=torch.float64,
        **({"nonlinearity": mode[4:]} if mode.startswith("rnn") else {}))
    with torch.no_grad():
        for p, w in zip(module.parameters(), weights):
            p.copy_(w)
    full = torch.tensor([3, 3])
    got_out = ops.rnn_layer(x, full, weights, None, None, mode, True, True)[0]
    want_out = module(x)[0]
    got = torch.autograd.grad(torch.autograd.grad(got_out.square().sum(), x, create_graph=True)[0].square().sum(), x)
    want = torch.autograd.grad(torch.autograd.grad(want_out.square().sum(), x, create_graph=True)[0].square().sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
