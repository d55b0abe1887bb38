"""torch.ops.fastner.dropout_mask (csrc/cpu/dropout.cpp) against fastner.reference.dropout_mask
(bit for bit), its distribution, reproducibility across seeds and threads, opcheck, bad input,
and fastner.models.Dropout built on it."""
from __future__ import annotations

import math

import pytest
import torch

import fastner.ops as ops
from fastner import reference
from fastner.models.dropout import Dropout
from tests import testing

pytestmark = testing.requires_op("dropout_mask")

# empty, one element (half a draw), odd counts (a last block of 256 draws cut short), the
# tagger's shapes, and a large one
SHAPES = [(0,), (1,), (7,), (3, 5), (513,), (10, 31, 80), (10, 31, 400), (300_001,)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
PS = [0.0, 0.1, 0.5, 0.9, 1.0 - 2.0**-40]
SEEDS = [0, 1, -1, 2**63 - 1, -2**63, 123456789]


@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d).replace("torch.", "") for d in DTYPES])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_kernel_equals_reference_bit_for_bit(shape, dtype):
    x = torch.empty(shape, dtype=dtype)
    for p in PS:
        for seed in SEEDS:
            got = torch.ops.fastner.dropout_mask(x, p, seed)
            want = reference.dropout_mask(x, p, seed)
            assert got.dtype == dtype and got.shape == x.shape and got.is_contiguous()
            assert torch.equal(got, want), (p, seed)


def test_kept_value_and_the_p_limits():
    x = torch.empty(1000)
    mask = torch.ops.fastner.dropout_mask(x, 0.3, 5)
    assert set(mask.unique().tolist()) == {0.0, torch.tensor(1 / 0.7, dtype=torch.float32).item()}
    assert torch.equal(torch.ops.fastner.dropout_mask(x, 0.0, 5), torch.ones(1000))
    # p within 2^-33 of 1 rounds to 2^32 / 2^32: nothing kept (and no division by zero)
    assert torch.count_nonzero(torch.ops.fastner.dropout_mask(x, 1.0 - 2.0**-40, 5)) == 0


def test_strides_and_values_of_the_input_are_not_read():
    base = torch.randn(6, 8, 10)
    strided = base.transpose(0, 2)  # [10, 8, 6], not contiguous
    mask = torch.ops.fastner.dropout_mask(strided, 0.5, 9)
    assert mask.shape == strided.shape and mask.is_contiguous()
    assert torch.equal(mask, torch.ops.fastner.dropout_mask(torch.full((10, 8, 6), float("nan")), 0.5, 9))


def test_same_seed_same_mask_on_any_thread_count_other_seeds_differ():
    x = torch.empty(300_001)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.fastner.dropout_mask(x, 0.5, 77)
        torch.set_num_threads(2)
        two = torch.ops.fastner.dropout_mask(x, 0.5, 77)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert not torch.equal(one, torch.ops.fastner.dropout_mask(x, 0.5, 78))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_distribution_keep_rate_and_independence(p):
    """Over 2M elements of 4 seeds: the kept fraction (each half of the 64-bit draws too), and
    neighbours (within a draw and across draws) kept together as often as independence says,
    each within 5 standard deviations."""
    n = 2_000_000
    for seed in (0, 1, 2**40 + 3, -99):
        kept = torch.ops.fastner.dropout_mask(torch.empty(n), p, seed) > 0
        q = 1.0 - p
        for part in (kept, kept[0::2], kept[1::2]):
            sd = math.sqrt(q * p / part.numel())
            assert abs(part.double().mean().item() - q) < 5 * sd
        for a, b in ((kept[0::2], kept[1::2]), (kept[1:-1:2], kept[2::2])):
            both = (a & b).double().mean().item()
            sd = math.sqrt(q * q * (1 - q * q) / a.numel())
            assert abs(both - q * q) < 5 * sd
    # the mask's sum scaled back: its mean is 1 (what keeps the expected activation)
    mask = torch.ops.fastner.dropout_mask(torch.empty(n, dtype=torch.float64), p, 3)
    assert abs(mask.mean().item() - 1.0) < 5 * math.sqrt(p / (1 - p) / n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_opcheck(dtype):
    for shape in SHAPES[:6]:
        torch.library.opcheck(torch.ops.fastner.dropout_mask.default, (torch.randn(shape, dtype=dtype), 0.5, 11))


def test_seed_none_draws_from_torchs_generator():
    x = torch.empty(1000)
    torch.manual_seed(4)
    a = ops.dropout_mask(x, 0.5)
    b = ops.dropout_mask(x, 0.5)
    torch.manual_seed(4)
    assert torch.equal(ops.dropout_mask(x, 0.5), a)
    assert not torch.equal(a, b)


def test_module_eval_is_identity_and_the_gradient_is_the_mask():
    layer = Dropout(0.5)
    x = torch.randn(4, 9, 20, requires_grad=True)
    layer.eval()
    assert layer(x) is x
    layer.train()
    torch.manual_seed(8)
    out = layer(x)
    torch.manual_seed(8)
    mask = ops.dropout_mask(x, 0.5)
    assert torch.equal(out, x * mask)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad, mask)
    assert torch.equal(Dropout(0.0).train()(x), x)


def _bad_calls():
    x = torch.empty(3, 4)
    op = torch.ops.fastner.dropout_mask
    return {
        "p negative": (lambda f: f(x, -0.1, 0), "p"),
        "p one": (lambda f: f(x, 1.0, 0), "p"),
        "p nan": (lambda f: f(x, float("nan"), 0), "p"),
        "p inf": (lambda f: f(x, float("inf"), 0), "p"),
        "input int": (lambda f: f(x.long(), 0.5, 0), "input"),
        "input bool": (lambda f: f(x > 0, 0.5, 0), "input"),
        "input float8": (lambda f: f(x.to(torch.float8_e4m3fn), 0.5, 0), "input"),
        "input complex": (lambda f: f(x.to(torch.complex64), 0.5, 0), "input"),
    }, op


@pytest.mark.parametrize("case", sorted(_bad_calls()[0]))
@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_bad_input_is_a_value_error_naming_the_argument(case, path):
    calls, op = _bad_calls()
    call, name = calls[case]
    with pytest.raises(ValueError, match=f"dropout_mask: {name}"):
        call(op if path == "kernel" else reference.dropout_mask)
