"""RNN rows: fastner.nn.LSTM/GRU/RNN against torch.nn (same state_dict), inference and
training (forward + backward), bidirectional, on batches with CoNLL-like lengths.

Implementations in each row, all on the same padded input x: [B, T, I] and lengths [B]:
  torch.padded     torch.nn module on x (what a model that ignores lengths runs; oneDNN/cuDNN)
  torch.packed     pack_padded_sequence -> torch.nn module -> pad_packed_sequence (correct)
  fastner.padded   fastner module on x
  fastner.lengths  fastner module on x with lengths= (the same answer as packing)
  fastner.packed   pack -> fastner module -> unpack
  fastner.bf16.padded / fastner.bf16.lengths   (inference, CPU) the fastner module with bf16
                   w_ih / w_hh (fastner.nn.rnn_bf16.to_bf16), on x / with lengths=
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fastner.bench.gemm_rows import rnn_flops
from fastner.bench.rows import Context, GroupSkipped, Row, close, describe_error
from fastner.bench.timing import Settings
from fastner.bench.workloads import LENGTHS_NOTE, TAGGER_RNN, RnnShape, sweep_shapes

TITLE = "RNN: fastner.nn.LSTM/GRU/RNN vs torch.nn (same state_dict), bidirectional, 1 layer"
MODES = ("inference", "training")
BASELINES = ("torch.padded", "torch.packed")
ALL_IMPLS = ("torch.padded", "torch.packed", "fastner.padded", "fastner.lengths", "fastner.packed")
SWEEP_IMPLS = ("torch.padded", "torch.packed", "fastner.padded", "fastner.lengths")
BF16_IMPLS = ("fastner.bf16.padded", "fastner.bf16.lengths")  # inference on the CPU only
# bf16 weights cost ~0.2% relative error per layer (tests/test_rnn_bf16.py): checked against
# torch.packed at this relative Frobenius bound.
BF16_RELATIVE_ERROR = 5e-3
HEADLINE_BUDGET = 2  # the tagger-shape rows get this many times the usual time budget


def classes():
    """{cell: (torch.nn class, fastner.nn class)}; skips the group when fastner's are missing."""
    try:
        from fastner import nn as fnn
        found = {"lstm": (torch.nn.LSTM, fnn.LSTM), "gru": (torch.nn.GRU, fnn.GRU),
                 "rnn": (torch.nn.RNN, fnn.RNN)}
    except (ImportError, AttributeError) as err:
        raise GroupSkipped(f"fastner.nn.LSTM/GRU/RNN are not available ({describe_error(err)})") from None
    return found


def run(ctx: Context) -> None:
    cell_classes = classes()
    plan = ctx.plan
    if ctx.gemm_flops_per_s is None:
        ctx.notes.append("no GEMM rate measured in this run (group 'gemm' not selected): no floors")
    # The tagger shape gets every implementation and a longer budget: it is the headline row.
    headline = dataclasses.replace(ctx.settings, budget_s=HEADLINE_BUDGET * ctx.settings.budget_s)
    for cell in plan.rnn_cells:
        for mode in MODES:
            _row(ctx, cell_classes[cell], cell, mode, TAGGER_RNN, ["B", "H", "T"], ALL_IMPLS, headline)
    for shape, axes in sweep_shapes(plan):
        if shape == TAGGER_RNN:
            continue
        for cell in plan.sweep_cells:
            for mode in plan.sweep_modes:
                _row(ctx, cell_classes[cell], cell, mode, shape, axes, SWEEP_IMPLS, ctx.settings)


def _row(ctx: Context, pair, cell: str, mode: str, shape: RnnShape, axes: List[str],
         impls, settings: Settings) -> None:
    device = ctx.device
    training = mode == "training"
    lengths = shape.lengths()
    tokens = int(lengths.sum())
    row = Row(str(device), "rnn", f"{cell}_{mode}", {**shape.as_dict(), "tokens": tokens,
                                                     "lengths": LENGTHS_NOTE}, sweeps=list(axes))
    row.info["cell"] = cell
    row.info["mode"] = mode
    flops = rnn_flops(cell, shape.input_size, shape.hidden, tokens, directions=2, training=training)
    row.info["flops"] = flops
    floor = flops / ctx.gemm_flops_per_s if ctx.gemm_flops_per_s else None
    if floor is not None:
        row.info["floor_ms"] = floor * 1e3
    try:
        forwards, timed = implementations(pair, shape, lengths, device, training)
        row.check = check(forwards)
        calls = {name: timed(name) for name in impls}
        calls.update({name: timed(name) for name in BF16_IMPLS if name in forwards})
        ctx.compare(row, calls, baselines=[b for b in BASELINES if b in calls], settings=settings)
        if floor is not None:
            for result in row.results:
                result.extra["x_floor"] = result.stats.median / floor
        if device.type == "cpu":
            row.info["cpu_gemm_choices"] = cpu_gemm_choices()
    except Exception as err:  # a broken implementation is reported in its row, the run goes on
        row.error = describe_error(err)
    ctx.emit(row)


def implementations(pair, shape: RnnShape, lengths: torch.Tensor, device: torch.device,
                    training: bool):
    """Forward callables per implementation (each returns the padded output [B, T, 2H]), and
    a function giving the call to time for an implementation (inference or a training step)."""
    torch_cls, fast_cls = pair
    torch.manual_seed(17)  # the same weights in every row of a cell
    base = torch_cls(shape.input_size, shape.hidden, batch_first=True, bidirectional=True).to(device)
    fast = fast_cls(shape.input_size, shape.hidden, batch_first=True, bidirectional=True).to(device)
    fast.load_state_dict(base.state_dict())
    base.train(training)
    fast.train(training)
    x = torch.randn(shape.batch, shape.seq_len, shape.input_size, device=device,
                    requires_grad=training)
    lengths_cpu = lengths  # pack_padded_sequence wants them on the CPU
    lengths_dev = lengths.to(device)  # what a model computing them from its mask would pass
    total = shape.seq_len

    def padded(module):
        return lambda: module(x)[0]

    def packed(module):
        def call():
            sequence = pack_padded_sequence(x, lengths_cpu, batch_first=True, enforce_sorted=False)
            output, _ = module(sequence)
            return pad_packed_sequence(output, batch_first=True, total_length=total)[0]
        return call

    def with_lengths(module):
        return lambda: module(x, lengths=lengths_dev)[0]

    forwards: Dict[str, Callable[[], torch.Tensor]] = {
        "torch.padded": padded(base), "torch.packed": packed(base),
        "fastner.padded": padded(fast), "fastner.lengths": with_lengths(fast),
        "fastner.packed": packed(fast),
    }
    if not training and device.type == "cpu":
        from fastner.nn.rnn_bf16 import to_bf16

        bf16 = to_bf16(fast)
        forwards["fastner.bf16.padded"] = padded(bf16)
        forwards["fastner.bf16.lengths"] = with_lengths(bf16)
    grad_output = torch.randn(shape.batch, shape.seq_len, 2 * shape.hidden, device=device)

    def timed(name: str) -> Callable[[], object]:
        forward = forwards[name]
        if not training:
            def infer():
                with torch.no_grad():
                    return forward()
            return infer
        # Gradients of the input and of every weight, as a training step needs them.
        wrt = [x, *(base if name.startswith("torch") else fast).parameters()]
        return lambda: torch.autograd.grad(forward(), wrt, grad_outputs=grad_output)

    return forwards, timed


def cpu_gemm_choices() -> List[str]:
    """The float32 GEMM kernel the CPU layers measured and chose per product shape so far
    (csrc/cpu/rnn_gemm.h), with both kernels' GFLOP/s."""
    try:
        from fastner import _C

        return list(_C.rnn_gemm_choices())
    except (ImportError, AttributeError):  # no extension, or one built before the report
        return []


def check(forwards) -> str:
    """fastner against torch on this input: padded vs padded, lengths=/packed vs packed."""
    with torch.no_grad():
        outputs = {name: fn() for name, fn in forwards.items()}
    pairs = (("fastner.padded", "torch.padded"), ("fastner.lengths", "torch.packed"),
             ("fastner.packed", "torch.packed"))
    problems = []
    for got, want in pairs:
        if not close(outputs[got], outputs[want]):
            diff = float((outputs[got] - outputs[want]).abs().max())
            problems.append(f"{got} vs {want}: max |diff| {diff:.3g}")
    for got, want in (("fastner.bf16.padded", "torch.padded"), ("fastner.bf16.lengths", "torch.packed")):
        if got in outputs:
            relative = float((outputs[got] - outputs[want]).norm() / outputs[want].norm().clamp_min(1e-30))
            if not relative <= BF16_RELATIVE_ERROR:
                problems.append(f"{got} vs {want}: relative error {relative:.3g} > {BF16_RELATIVE_ERROR}")
    return "ok" if not problems else "mismatch: " + "; ".join(problems)
