"""torch.ops.fastner.char_conv_max (csrc/cpu/char_cnn.cpp) against fastner.reference.char_conv_max
and against what fastner.models.CharCNN computed before the op (nn.Conv1d + masked amax):
values, argmax, gradients, opcheck, gradcheck, ties and NaN, bad input."""
from __future__ import annotations

import pytest
import torch

import fastner.ops as ops
from fastner import reference
from tests import testing

pytestmark = testing.requires_op("char_conv_max")

# (N words, C characters, I dims, F filters, W window): the tagger's (30, 30, 3), a one-character
# window, more filters than one vector block, a single character, no words, no characters; the
# kernel evaluates up to 3 valid positions of a word together (csrc/cpu/char_cnn.cpp), and the
# random masks give runs of every length.
SHAPES = [(40, 12, 30, 30, 3), (9, 7, 5, 3, 1), (16, 13, 17, 37, 5), (6, 1, 4, 8, 3), (0, 5, 3, 2, 3),
          (4, 0, 3, 2, 3)]


def inputs(N, C, I, F, W, dtype=torch.float32, layout="contiguous", requires_grad=False):
    x = torch.randn(N, C, I, dtype=dtype)
    if layout == "transposed":  # same values, [I, C, N] storage
        x = x.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    elif layout == "sliced":
        x = torch.randn(N, C, 2 * I, dtype=dtype)[:, :, ::2]
    valid = torch.rand(N, C) < 0.7
    if N > 2:
        valid[1] = False  # a word without valid characters
    weight = torch.randn(F, I, W, dtype=dtype) * 0.3
    bias = torch.randn(F, dtype=dtype)
    if requires_grad:
        for t in (x, weight, bias):
            t.requires_grad_(True)
    return x, valid, weight, bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_matches_reference_forward_and_backward(shape, layout, dtype):
    testing.reseed(10 * SHAPES.index(shape) + ["contiguous", "transposed", "sliced"].index(layout))
    x, valid, weight, bias = inputs(*shape, dtype=dtype, layout=layout, requires_grad=True)
    out, argmax = torch.ops.fastner.char_conv_max(x, valid, weight, bias)
    want, want_argmax = reference.char_conv_max(x, valid, weight, bias)
    tol = testing.tolerances(dtype)
    torch.testing.assert_close(out, want, **tol)
    assert torch.equal(argmax, want_argmax)
    grad = torch.randn_like(out)
    leaves = [x, weight, bias]
    got = torch.autograd.grad((ops.char_conv_max(x, valid, weight, bias)[0] * grad).sum(), leaves)
    expected = torch.autograd.grad((want * grad).sum(), leaves)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **tol)


def test_the_module_computes_what_conv1d_and_a_masked_max_computed():
    # fastner.models.CharCNN before the op: conv1d over [N, I, C], -inf at padding chars, amax,
    # zeros for words without characters
    testing.reseed(7)
    x, valid, weight, bias = inputs(50, 11, 30, 30, 3, requires_grad=True)
    y = torch.nn.functional.conv1d(x.transpose(1, 2), weight, bias, padding=1)
    y = y.masked_fill(~valid[:, None, :], float("-inf")).amax(dim=2)
    before = torch.where(torch.isfinite(y), y, torch.zeros_like(y))
    out, _ = ops.char_conv_max(x, valid, weight, bias)
    torch.testing.assert_close(out, before)
    got = torch.autograd.grad(out.sum(), [x, weight, bias])
    want = torch.autograd.grad(before.sum(), [x, weight, bias])  # no ties in random data
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_ties_go_to_the_first_position_and_nan_wins():
    # identical characters give identical windows inside the word: the first one is the argmax
    x = torch.ones(2, 6, 4)
    valid = torch.ones(2, 6, dtype=torch.bool)
    weight, bias = torch.ones(3, 4, 3), torch.zeros(3)
    x[1, 4, 0] = float("nan")
    out, argmax = torch.ops.fastner.char_conv_max(x, valid, weight, bias)
    want, want_argmax = reference.char_conv_max(x, valid, weight, bias)
    assert torch.equal(argmax, want_argmax)
    assert argmax[0].tolist() == [1, 1, 1]  # positions 1-4 tie at 12; 0 and 5 see padding
    assert torch.isnan(out[1]).all() and torch.isnan(want[1]).all()
    assert argmax[1].tolist() == [3, 3, 3]  # the first window holding the NaN


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_an_infinite_weight_never_meets_the_padding(dtype):
    # The kernel may read zeros for taps outside a word only while every weight is finite
    # (0 * inf is NaN): here the left tap of filter 0 is +inf, which position 0's window puts on
    # the padding. Skipped there, position 0 stays finite and the maximum is +inf at position 1;
    # had the padding been multiplied, NaN at position 0 would win.
    x = torch.rand(3, 7, 4, dtype=dtype) + 0.5  # positive: inf * x is +inf inside the word
    valid = torch.ones(3, 7, dtype=torch.bool)
    valid[2, 5:] = False
    weight = torch.rand(2, 4, 3, dtype=dtype)
    weight[0, 0, 0] = float("inf")
    bias = torch.zeros(2, dtype=dtype)
    out, argmax = torch.ops.fastner.char_conv_max(x, valid, weight, bias)
    assert argmax[:, 0].tolist() == [1, 1, 1]
    assert torch.isposinf(out[:, 0]).all()
    # filter 1 is finite: it matches the reference, every position computed
    want, want_argmax = reference.char_conv_max(x, valid, weight[1:], bias[1:])
    torch.testing.assert_close(out[:, 1:], want)
    assert torch.equal(argmax[:, 1:], want_argmax)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_opcheck(dtype):
    testing.reseed(3)
    for shape in SHAPES[:4]:
        x, valid, weight, bias = inputs(*shape, dtype=dtype, requires_grad=True)
        torch.library.opcheck(torch.ops.fastner.char_conv_max.default, (x, valid, weight, bias))


def test_gradcheck_float64():
    testing.reseed(4)
    x, valid, weight, bias = inputs(6, 5, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: ops.char_conv_max(t[0], valid, *t[1:])[0], (x, weight, bias))


def test_no_graph_without_a_gradient_and_half_precision_takes_the_reference():
    x, valid, weight, bias = inputs(5, 4, 3, 2, 3)
    assert ops.char_conv_max(x, valid, weight, bias)[0].grad_fn is None
    half = [t.to(torch.bfloat16) for t in (x, weight, bias)]
    out, argmax = ops.char_conv_max(half[0], valid, *half[1:])
    want, want_argmax = reference.char_conv_max(half[0], valid, *half[1:])
    assert torch.equal(out, want) and torch.equal(argmax, want_argmax)


def _bad_calls():
    x, valid, weight, bias = inputs(4, 5, 3, 2, 3)
    op, backward = torch.ops.fastner.char_conv_max, torch.ops.fastner.char_conv_max_backward
    argmax = op(x, valid, weight, bias)[1]
    grad = torch.ones(4, 2)
    return {
        "input 2-D": (lambda: op(x[0], valid, weight, bias), "input"),
        "input int": (lambda: op(x.long(), valid, weight, bias), "input"),
        "input without dims": (lambda: op(x[:, :, :0], valid, weight[:, :0], bias), "input must have I > 0"),
        "valid shape": (lambda: op(x, valid[:, :4], weight, bias), "valid"),
        "valid dtype": (lambda: op(x, valid.float(), weight, bias), "valid"),
        "valid device": (lambda: op(x, valid.to("meta"), weight, bias), "valid"),
        "weight inputs": (lambda: op(x, valid, weight[:, :2], bias), "weight"),
        "weight even window": (lambda: op(x, valid, weight[:, :, :2], bias), "weight"),
        "weight dtype": (lambda: op(x, valid, weight.double(), bias), "weight"),
        "bias shape": (lambda: op(x, valid, weight, bias[:1]), "bias"),
        "argmax above C": (lambda: backward(grad, x, argmax.masked_fill(argmax == argmax, 5), weight), "argmax"),
        "argmax below -1": (lambda: backward(grad, x, argmax.masked_fill(argmax == argmax, -2), weight), "argmax"),
        "argmax shape": (lambda: backward(grad, x, argmax[:3], weight), "argmax"),
        "argmax dtype": (lambda: backward(grad, x, argmax.int(), weight), "argmax"),
        "grad_output shape": (lambda: backward(grad[:, :1], x, argmax, weight), "grad_output"),
        "grad_output dtype": (lambda: backward(grad.double(), x, argmax, weight), "grad_output"),
    }


@pytest.mark.parametrize("case", sorted(_bad_calls()))
def test_bad_input_is_a_value_error_naming_the_argument(case):
    call, name = _bad_calls()[case]
    with pytest.raises(ValueError, match=name):
        call()
