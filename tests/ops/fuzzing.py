"""The property-based fuzzing harness shared by the op families' fuzz suites
(tests/ops/crf/test_crf_fuzz.py, tests/ops/rnn/test_rnn_fuzz.py; hypothesis): drawn memory layouts,
the example budget per marker, and the fused-versus-reference comparison.

For each drawn call: where the fused kernel and the reference both accept, their results agree;
where either refuses, both refuse, with ValueError or RuntimeError (never a crash, never garbage).
The default run draws a few hundred examples per op; `pytest -m slow` draws thousands (the
hypothesis settings of each test are picked by the marker of its `budget` parameter). The
sanitizer CI step runs the slow set against an ASan + UBSan build (README, Development).
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import testing

# FASTNER_FUZZ_SLOW_EXAMPLES sizes the slow run (the sanitizer CI step uses fewer: ASan is slower).
EXAMPLES = {"default": 300, "slow": int(os.environ.get("FASTNER_FUZZ_SLOW_EXAMPLES", "2000"))}
BUDGETS = [pytest.param("default"), pytest.param("slow", marks=pytest.mark.slow)]
REFUSALS = (ValueError, RuntimeError)


def fuzz(test):
    """Run `test(data)` under the example budget named by the `budget` parameter."""

    @pytest.mark.parametrize("budget", BUDGETS)
    def run(budget):
        settings(max_examples=EXAMPLES[budget], deadline=None, database=None, derandomize=budget == "default",
                 suppress_health_check=list(HealthCheck))(given(st.data())(test))()

    run.__name__ = test.__name__
    return run


# ---- drawing tensors ----------------------------------------------------------------------------

def layout(data, x: torch.Tensor) -> torch.Tensor:
    """x's values in a drawn memory layout: contiguous, transposed, sliced or expanded."""
    kind = data.draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded"]), label="layout")
    if kind == "transposed" and x.dim() >= 2:
        return x.transpose(0, -1).contiguous().transpose(0, -1)
    if kind == "sliced":
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1] + 1, dtype=x.dtype) if x.dim() else x
        if x.dim():
            wide[..., 1::2] = x
            return wide[..., 1::2]
    if kind == "expanded" and x.dim() and x.shape[0] > 0:
        # Equal rows, stride 0 on dim 0 (what autograd hands in as a gradient of .sum()).
        return x[:1].expand(x.shape)
    return x


def randn(data, shape, dtype) -> torch.Tensor:
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    g = torch.Generator().manual_seed(seed)
    return layout(data, torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype))


def lengths_for(data, B: int, T: int) -> torch.Tensor:
    values = data.draw(st.lists(st.integers(0, T), min_size=B, max_size=B), label="lengths")
    return layout(data, torch.tensor(values, dtype=torch.long))


def outcome(fn, *args):
    """("ok", result) or ("refused", exception); anything but ValueError/RuntimeError propagates."""
    try:
        return "ok", fn(*args)
    except REFUSALS as error:
        return "refused", error


def tolerance(dtype, out_dtype):
    if out_dtype in (torch.float16, torch.bfloat16):
        return testing.tolerances(out_dtype)  # a float32 result rounded to 8 or 11 bits
    if dtype in (torch.float16, torch.bfloat16):
        return dict(rtol=1e-3, atol=1e-3)  # both paths compute in float32 from the same values
    return testing.tolerances(dtype)


def assert_same(fused, ref, dtype, what):
    kind_f, out_f = fused
    kind_r, out_r = ref
    assert kind_f == kind_r, f"{what}: fused {kind_f} ({out_f!r:.300}) but reference {kind_r} ({out_r!r:.300})"
    if kind_f == "refused":
        return
    outs_f = out_f if isinstance(out_f, (tuple, list)) else (out_f,)
    outs_r = out_r if isinstance(out_r, (tuple, list)) else (out_r,)
    for a, b in zip(outs_f, outs_r):
        if isinstance(a, torch.Tensor):
            if a.dtype == torch.long:
                assert torch.equal(a, b), what
            else:
                torch.testing.assert_close(a, b.to(a.dtype), equal_nan=True, **tolerance(dtype, a.dtype))
        else:
            assert a == b, what

