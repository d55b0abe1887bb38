"""The CRF ops' inputs, drawn in one place for every CRF suite: parity (test_crf_ops.py,
test_crf_lanes.py), gradcheck and opcheck (test_crf_ops.py, test_crf_autograd.py), CUDA
(test_crf_cuda.py) and the CUDA emulation (test_crf_cuda_emulated.py).

- `crf_inputs(B, T, K, dtype, ...)`: one op call's tensors, fresh from torch's global RNG (the
  conftest seed, or `testing.reseed(case)`), drawn on the CPU and then moved to `device`, so a CPU
  kernel, the reference and a CUDA kernel can be fed identical values.
- `sample_inputs(op, device, dtype, ...)`: a generator of fresh argument tuples for one op over
  several shapes (a length-0 row, a single step, one tag), memory layouts (contiguous, time-first
  storage, a tag stride other than 1) and, for crf_forward, with and without tags.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Tuple

import torch

from fastner.reference import crf_accumulate_dtype
from tests import testing

CRF_OPS = ("crf_forward", "crf_backward", "crf_forward_backward", "crf_viterbi", "crf_kbest", "crf_marginals",
           "crf_lengths", "crf_log_likelihood")
# The ops with a CUDA kernel (csrc/cuda/crf.cu).
CUDA_CRF_OPS = ("crf_forward", "crf_backward", "crf_viterbi", "crf_kbest", "crf_marginals")
INF = float("-inf")
LAYOUTS = ("contiguous", "time_first", "tag_strided")
# (B, T, K): a padded batch (random_lengths puts a length-min_len row in it), a single step, one tag.
SAMPLE_SHAPES = ((3, 5, 4), (2, 1, 2), (2, 3, 1))
KBEST_K = 3


def crf_inputs(batch: int, steps: int, num_tags: int, dtype: torch.dtype = torch.float32, *,
               device="cpu", min_len: int = 0, scale: float = 1.0, constrained: bool = False,
               layout: str = "contiguous", requires_grad: bool = False):
    """(emissions [B, T, K] dtype, tags [B, T] int64, lengths [B] int64, transitions [K, K],
    start [K], end [K]), the scores in the accumulate dtype (float64 for float64, else float32).

    lengths lie in [min_len, T], one of them T and, when B >= 2, another min_len. constrained:
    about a third of the transitions and one start and one end tag are -inf (tags stay random, so a
    gold path may be impossible: also a case the ops must handle). layout: the emissions' and
    tags' storage, "time_first" ([T, B] storage, transposed views) or "tag_strided" (emissions
    with a tag stride other than 1); the values are the same either way. requires_grad marks
    emissions and the three score tensors as leaves.
    """
    acc = crf_accumulate_dtype(dtype)
    emissions = (torch.randn(batch, steps, num_tags, dtype=torch.float64) * scale).to(dtype)
    tags = torch.randint(0, num_tags, (batch, steps))
    lengths = testing.random_lengths(batch, steps, min_len=min(min_len, steps))
    transitions = torch.randn(num_tags, num_tags, dtype=acc) * 0.5
    start = torch.randn(num_tags, dtype=acc) * 0.5
    end = torch.randn(num_tags, dtype=acc) * 0.5
    if constrained and num_tags >= 2:
        transitions = transitions.masked_fill(torch.rand(num_tags, num_tags) < 0.33, INF)
        start[torch.randint(0, num_tags, ())] = INF
        end[torch.randint(0, num_tags, ())] = INF
    emissions, tags, lengths, transitions, start, end = (
        x.to(device) for x in (emissions, tags, lengths, transitions, start, end))
    emissions, tags = with_layout(emissions, layout), with_layout(tags, layout)
    if requires_grad:
        for t in (emissions, transitions, start, end):
            t.requires_grad_(True)
    return emissions, tags, lengths, transitions, start, end


def crf_holding(transitions: torch.Tensor, start: torch.Tensor, end: torch.Tensor, batch_first: bool = True):
    """A fastner.nn.CRF holding these scores (its dtype theirs): the module-level view of an op
    call's inputs, e.g. run under testing.backend("reference") as the oracle."""
    import fastner.nn

    crf = fastner.nn.CRF(transitions.shape[0], batch_first=batch_first).to(transitions.dtype)
    with torch.no_grad():
        crf.transitions.copy_(transitions)
        crf.start_transitions.copy_(start)
        crf.end_transitions.copy_(end)
    return crf


def with_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x [B, T, ...] with the same values in the storage `layout` names (a view, not a copy of
    the values' meaning): contiguous, time-first ([T, B, ...] storage) or, for [B, T, K], a
    tag stride other than 1."""
    if layout == "time_first":
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "tag_strided" and x.dim() == 3:
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout in ("contiguous", "tag_strided"):
        return x
    raise ValueError(f"unknown layout {layout!r}")


def sample_inputs(op: str, device="cpu", dtype: torch.dtype = torch.float32, *,
                  shapes: Sequence[Tuple[int, int, int]] = SAMPLE_SHAPES, layouts: Sequence[str] = LAYOUTS,
                  requires_grad: bool = False, constrained: bool = False) -> Iterator[tuple]:
    """Fresh argument tuples for torch.ops.fastner.<op> on `device`: every shape in every layout
    (the emissions' dtype is `dtype`, the scores' its accumulate dtype). crf_backward gets random
    incoming gradients; crf_lengths right-padded bool and uint8 masks, batch-first and
    time-first."""
    for B, T, K in shapes:
        for layout in layouts:
            if op == "crf_lengths":
                lengths = testing.random_lengths(B, T, min_len=0)
                for batch_first in (True, False):
                    for mask_dtype in (torch.bool, torch.uint8):
                        yield (testing.mask_from_lengths(lengths, T, batch_first, dtype=mask_dtype).to(device),
                               batch_first)
                break  # masks have no emissions layout
            e, tags, L, tr, s, n = crf_inputs(B, T, K, dtype, device=device, layout=layout,
                                              requires_grad=requires_grad, constrained=constrained)
            if op == "crf_forward":
                yield e, tags, L, tr, s, n
                yield e, None, L, tr, s, n
            elif op == "crf_backward":
                yield from _backward_samples(e, tags, L, tr, s, n)
            elif op == "crf_forward_backward":
                yield e, tags, L, tr, s, n
            elif op == "crf_log_likelihood":
                for reduction in ("none", "sum", "mean", "token_mean"):
                    yield e, tags, L, tr, s, n, reduction, True
                yield _time_major(e), _time_major(tags), L, tr, s, n, "sum", False
            elif op == "crf_kbest":
                yield e, L, tr, s, n, KBEST_K
            elif op in ("crf_viterbi", "crf_marginals"):
                yield e, L, tr, s, n
            else:
                raise ValueError(f"no samples for {op!r}")


def _time_major(x: torch.Tensor) -> torch.Tensor:
    """x [B, T, ...] as a time-major [T, B, ...] tensor (what a batch_first=False caller passes)."""
    y = x.detach().transpose(0, 1).contiguous()
    return y.requires_grad_() if x.requires_grad else y


def _backward_samples(e, tags, L, tr, s, n) -> Iterator[tuple]:
    """crf_backward's arguments, with and without tags (then no gold gradient)."""
    B = e.shape[0]
    g_log_z = torch.randn(B, dtype=tr.dtype).to(e.device)
    g_gold = torch.randn(B, dtype=tr.dtype).to(e.device)
    yield g_log_z, g_gold, e, tags, L, tr, s, n
    yield g_log_z, torch.zeros_like(g_gold), e, None, L, tr, s, n


def float_leaves(args: tuple) -> list:
    """The floating-point tensors of an op's arguments that require a gradient, in order."""
    return [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


def differentiable(op: str, args: tuple, select: Optional[Sequence[int]] = None):
    """(fn, leaves): fn(*leaves) calls torch.ops.fastner.<op> with `args`, the leaves replaced by
    fn's arguments, and returns its floating-point outputs (those at `select`, if given): the
    form torch.autograd.gradcheck takes."""
    leaves = float_leaves(args)
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    call = getattr(torch.ops.fastner, op)

    def fn(*values):
        full = list(args)
        for i, v in zip(positions, values):
            full[i] = v
        out = call(*full)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        picked = [outs[i] for i in select] if select is not None else outs
        return tuple(o for o in picked if o.is_floating_point() and o.numel() > 0)

    return fn, leaves
