"""torch.ops.fastner.masked_linear (csrc/cpu/masked_linear.cpp: a Linear over a mask's rows, bias
elsewhere) against fastner.reference.masked_linear (its definition in torch ops) and against
torch.nn.functional.linear on the marked rows (the upstream layer): values, unmarked rows never
read, NaN and infinities, layouts, thread counts, opcheck, fuzzing (fused and reference agree or
both refuse), bad input, and the tagger's emission layer that runs it in inference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st

import fastner.ops as ops
from fastner import reference
from fastner.models import ModelConfig, SequenceTagger
from tests import testing
from tests.ops.fuzzing import assert_same, fuzz, layout, outcome, randn

pytestmark = testing.requires_op("masked_linear")

op = torch.ops.fastner.masked_linear.default

# (B, T, I, K): the tagger's (2H = 400 inputs, 17 BIOES tags), one column, exactly one and
# three vectors of 8 columns, a column past a block of 3 vectors (25), several blocks with a
# partial one (70), fewer rows than a 4-row block, no inputs (bias only), and empty shapes.
SHAPES = [(32, 13, 400, 17), (5, 7, 9, 1), (3, 6, 11, 8), (4, 5, 16, 24), (6, 3, 5, 25), (2, 9, 7, 70),
          (1, 3, 5, 17), (3, 4, 0, 5), (0, 4, 3, 2), (3, 0, 3, 2), (3, 4, 3, 0)]
LAYOUTS = ["contiguous", "transposed", "sliced", "expanded"]


def inputs(B, T, I, K, dtype=torch.float32, layout="contiguous"):
    """Sentences of random lengths (a mask of leading positions), one with a hole in its mask, an
    empty one; the unmarked rows hold NaN, which must not reach the output."""
    input = torch.randn(B, T, I, dtype=dtype)
    lengths = torch.randint(0, T + 1, (B,))
    mask = torch.arange(T) < lengths[:, None]
    if B > 1 and T > 2:
        mask[1] = True
        mask[1, T // 2] = False  # a hole: any mask, not only a prefix
    if B > 2:
        mask[2] = False
    input[~mask] = float("nan")
    weight = torch.randn(K, I, dtype=dtype) * 0.2
    bias = torch.randn(K, dtype=dtype)
    if layout == "transposed":  # the same values, feature-major storage
        input = input.permute(2, 0, 1).contiguous().permute(1, 2, 0)
        weight = weight.t().contiguous().t()
    elif layout == "sliced":  # every other feature of a wider tensor: stride 2 along I
        wide = torch.full((B, T, 2 * I), float("nan"), dtype=dtype)
        wide[..., ::2] = input
        input = wide[..., ::2]
    elif layout == "expanded" and B > 0:  # one sentence's rows seen B times (stride 0)
        input = input[:1].expand(B, T, I)
        mask = mask[:1].expand(B, T)
    return input, mask, weight, bias


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_matches_the_reference_and_linear_on_the_marked_rows(shape, layout, dtype, with_bias):
    testing.reseed(10 * SHAPES.index(shape) + LAYOUTS.index(layout))
    input, mask, weight, bias = inputs(*shape, dtype=dtype, layout=layout)
    bias = bias if with_bias else None
    got = op(input, mask, weight, bias)
    assert got.shape == (shape[0], shape[1], shape[3]) and got.is_contiguous() and got.dtype == dtype
    tol = testing.tolerances(dtype)
    torch.testing.assert_close(got, reference.masked_linear(input, mask, weight, bias), **tol)
    torch.testing.assert_close(got[mask], F.linear(input[mask], weight, bias), **tol)  # the upstream layer
    fill = bias if with_bias else torch.zeros(shape[3], dtype=dtype)
    assert torch.equal(got[~mask], fill.expand(int((~mask).sum()), shape[3]))  # unmarked: never read


def test_nan_and_infinities_in_marked_rows_give_what_linear_gives():
    testing.reseed(3)
    input, mask, weight, bias = inputs(6, 5, 12, 17)
    mask[:] = True
    input = torch.randn(6, 5, 12)
    input[0, 1, 3] = float("nan")
    input[1, 2, 0] = float("inf")
    input[2, 0, 5], input[2, 0, 6] = float("inf"), float("-inf")
    weight[4, 0] = 0.0  # inf * 0 = NaN in that column only
    got = op(input, mask, weight, bias)
    torch.testing.assert_close(got, F.linear(input, weight, bias), equal_nan=True, **testing.tolerances(torch.float32))
    assert torch.isnan(got[0, 1]).all() and torch.isnan(got[1, 2, 4]) and torch.isinf(got[1, 2, :4]).all()


def test_thread_counts_give_the_same_bits():
    # rows are split between threads whole: each output row is the same sum whatever the split
    testing.reseed(5)
    input, mask, weight, bias = inputs(64, 40, 400, 17)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(input, mask, weight, bias)
        torch.set_num_threads(2)
        two = op(input, mask, weight, bias)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_opcheck(dtype):
    testing.reseed(7)
    for shape in SHAPES[:8]:
        input, mask, weight, bias = inputs(*shape, dtype=dtype)
        torch.library.opcheck(op, (input, mask, weight, bias))
        torch.library.opcheck(op, (input, mask, weight, None))


def test_no_gradient_and_half_precision_takes_the_reference():
    input, mask, weight, bias = inputs(3, 4, 5, 6)
    with pytest.raises(ValueError, match="no gradient"):
        ops.masked_linear(input, mask, weight.requires_grad_(True), bias)
    with torch.no_grad():
        assert ops.masked_linear(input, mask, weight, bias).grad_fn is None
    half = [t.detach().to(torch.bfloat16) for t in (input, weight, bias)]
    got = ops.masked_linear(half[0], mask, half[1], half[2])
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, reference.masked_linear(half[0], mask, half[1], half[2]))


def _bad_calls():
    input, mask, weight, bias = inputs(3, 4, 5, 6)
    return {
        "input 2-D": (lambda: op(input[0], mask, weight, bias), "input"),
        "input int": (lambda: op(input.long(), mask, weight, bias), "input"),
        "mask shape": (lambda: op(input, mask[:, :3], weight, bias), "mask"),
        "mask dtype": (lambda: op(input, mask.long(), weight, bias), "mask"),
        "mask device": (lambda: op(input, mask.to("meta"), weight, bias), "mask"),
        "weight 1-D": (lambda: op(input, mask, weight[0], bias), "weight"),
        "weight inputs": (lambda: op(input, mask, weight[:, :4], bias), "weight"),
        "weight dtype": (lambda: op(input, mask, weight.double(), bias), "weight"),
        "weight device": (lambda: op(input, mask, weight.to("meta"), bias), "weight"),
        "bias shape": (lambda: op(input, mask, weight, bias[:5]), "bias"),
        "bias dtype": (lambda: op(input, mask, weight, bias.double()), "bias"),
        "bias 2-D": (lambda: op(input, mask, weight, bias[None]), "bias"),
    }


@pytest.mark.parametrize("case", sorted(_bad_calls()))
def test_bad_input_is_a_value_error_naming_the_argument(case):
    call, name = _bad_calls()[case]
    with pytest.raises(ValueError, match=name):
        call()


def test_the_wrapper_names_a_non_tensor_argument():
    input, mask, weight, bias = inputs(3, 4, 5, 6)
    with pytest.raises(ValueError, match="weight must be a Tensor"):
        ops.masked_linear(input, mask, weight.tolist(), bias)


CORRUPTIONS = ["none"] * 6 + ["mask_shape", "mask_int", "weight_inputs", "weight_dtype", "bias_shape", "input_2d"]


@fuzz
def test_fused_and_reference_agree_or_both_refuse(data):
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    B, T = data.draw(st.integers(0, 5), label="B"), data.draw(st.integers(0, 6), label="T")
    I, K = data.draw(st.integers(0, 20), label="I"), data.draw(st.integers(0, 30), label="K")
    marks = data.draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T), label="mask")
    mask = layout(data, torch.tensor(marks, dtype=torch.bool).reshape(B, T))
    input, weight = randn(data, (B, T, I), dtype), randn(data, (K, I), dtype)
    bias = randn(data, (K,), dtype) if data.draw(st.booleans(), label="bias") else None
    corruption = data.draw(st.sampled_from(CORRUPTIONS), label="corruption")
    if corruption == "mask_shape":
        mask = torch.ones(B, T + 1, dtype=torch.bool)
    elif corruption == "mask_int":
        mask = mask.long()
    elif corruption == "weight_inputs":
        weight = torch.zeros(K, I + 1, dtype=dtype)
    elif corruption == "weight_dtype":
        weight = weight.to(torch.float64 if dtype == torch.float32 else torch.float32)
    elif corruption == "bias_shape":
        bias = torch.zeros(K + 1, dtype=dtype)
    elif corruption == "input_2d":
        input = input.reshape(B * T, I)
    args = (input, mask, weight, bias)
    assert_same(outcome(op, *args), outcome(reference.masked_linear, *args), dtype, f"masked_linear {corruption}")


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_the_taggers_emission_layer_runs_it_in_inference_with_the_training_paths_values(grad):
    testing.reseed(11)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    model = SequenceTagger(ModelConfig(num_words=30, num_chars=20, tags=tags, hidden=8)).eval()
    x = torch.randn(4, 6, 16)
    mask = torch.arange(6) < torch.tensor([6, 3, 0, 5])[:, None]
    x[~mask] = 0  # the encoder's output past each length
    with torch.enable_grad():
        want = model.output(x)  # gradients on: the layer on all rows
    calls = []

    def counted(*args):
        calls.append(1)
        return ops.masked_linear(*args)

    model._masked_linear = counted
    with torch.set_grad_enabled(grad):
        got = model._project(x, mask)
    assert len(calls) == (0 if grad else 1)
    torch.testing.assert_close(got, want)


def test_a_quantized_output_layer_keeps_its_own_forward():
    # torch's quantize_dynamic swaps nn.Linear for a module whose weight is a method: the tagger
    # must call that module, not read .weight
    model = SequenceTagger(ModelConfig(num_words=30, num_chars=20, tags=["O", "B-X", "I-X"], hidden=8)).eval()
    model.output = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(model.output), {torch.nn.Linear},
                                                          dtype=torch.qint8)[0]
    x = torch.randn(2, 5, 16)
    mask = torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(model._project(x, mask), model.output(x))
