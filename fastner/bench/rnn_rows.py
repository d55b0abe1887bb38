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

from fastner.bench.gemm_rows import int8_gemm, rnn_flops
from fastner.bench.rows import Context, GroupSkipped, Row, close, describe_error
from fastner.bench.timing import Settings
from fastner.bench.workloads import LENGTHS_NOTE, TAGGER_RNN, RnnShape, sweep_shapes

TITLE = "RNN: fastner.nn.LSTM/GRU/RNN vs torch.nn (same state_dict), bidirectional, 1 layer"
MODES = ("inference", "training")
BASELINES = ("torch.padded", "torch.packed")
ALL_IMPLS = ("torch.padded", "torch.packed", "fastner.padded", "fastner.lengths", "fastner.packed")
SWEEP_IMPLS = ("torch.padded", "torch.packed", "fastner.padded", "fastner.lengths")
BF16_IMPLS = ("fastner.bf16.padded", "fastner.bf16.lengths")  # inference on the CPU only
# bf16 weights and operands cost ~0.25% relative error per layer (tests/ops/rnn/test_rnn_bf16.py):
# checked against torch.packed at this relative Frobenius bound.
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


PRECISION_TITLE = ("RNN at int8 / bf16 (CPU inference, tagger shape): fastner.nn.quantize vs torch "
                   "quantize_dynamic and bf16 autocast")


def run_precision(ctx: Context) -> None:
    """The 'precision' group: reduced-precision inference at the tagger shape: fastner int8 (and
    bf16 where its kernels exist) against torch's own int8 (quantize_dynamic: nn.LSTM and
    nn.GRU) and bf16 (autocast) layers, padded and packed, with fp32 for scale."""
    if ctx.device.type != "cpu":
        raise GroupSkipped("the int8 / bf16 recurrent layers run on the CPU")
    cell_classes = classes()
    headline = dataclasses.replace(ctx.settings, budget_s=HEADLINE_BUDGET * ctx.settings.budget_s)
    for cell in ctx.plan.rnn_cells:
        _precision_row(ctx, cell_classes[cell], cell, TAGGER_RNN, headline)


PRECISION_BASELINES = ("torch.padded", "torch.packed", "torch.int8.padded", "torch.int8.packed", "torch.bf16.padded",
                       "torch.bf16.packed")
INT8_GEMM = "torch.int8.linear_dynamic"
INT8_FLOOR_NOTE = ("GEMM ops at the rate of torch's dynamic int8 Linear (fbgemm) at the gemm group's size, "
                   "timed in this row's rounds")
INT8_RTOL = 0.05  # relative error of int8 vs fp32 beyond which the row says "mismatch"


def _precision_row(ctx: Context, pair, cell: str, shape: RnnShape, settings: Settings) -> None:
    lengths = shape.lengths()
    tokens = int(lengths.sum())
    row = Row(str(ctx.device), "precision", f"{cell}_inference_quantized",
              {**shape.as_dict(), "tokens": tokens, "lengths": LENGTHS_NOTE}, sweeps=[])
    row.info.update(cell=cell, mode="inference")
    flops = rnn_flops(cell, shape.input_size, shape.hidden, tokens, directions=2, training=False)
    row.info["flops"] = flops
    try:
        forwards, skipped = precision_implementations(pair, cell, shape, lengths)
        row.info.update(skipped)
        row.check, row.info["relative_error_vs_fp32"] = precision_check(forwards)
        calls = {name: _no_grad(fn) for name, fn in forwards.items()}
        # The floor's GEMM is timed in this row's own rounds: measured minutes apart (the gemm
        # group runs first), host speed drift alone moved the LSTM's ratio 1.13x -> 1.56x between
        # two runs of the same code (AMD EPYC Zen 4, 2026-12-07: fbgemm 260 vs 381 GOP/s).
        alongside, gemm_ops = {}, 0.0
        try:
            alongside[INT8_GEMM], gemm_ops = int8_gemm(ctx.plan.gemm_size["cpu"])
        except Exception as err:  # a torch without an int8 engine: no floor, the row goes on
            row.info["int8_floor"] = f"none: {describe_error(err)}"
        ctx.compare(row, calls, baselines=[b for b in PRECISION_BASELINES if b in calls], settings=settings,
                    alongside=alongside)
        if INT8_GEMM in row.alongside:
            rate = gemm_ops / row.alongside[INT8_GEMM].median
            int8_floor = flops / rate
            row.info.update(int8_floor_ms=int8_floor * 1e3, int8_gemm_gops_per_s=rate / 1e9,
                            int8_floor=INT8_FLOOR_NOTE)
            for result in row.results:
                if ".int8." in f".{result.impl}.":
                    result.extra["x_int8_floor"] = result.stats.median / int8_floor
    except Exception as err:  # a broken implementation is reported in its row, the run goes on
        row.error = describe_error(err)
    ctx.emit(row)


def _no_grad(fn):
    def call():
        with torch.no_grad():
            return fn()
    return call


def precision_implementations(pair, cell: str, shape: RnnShape, lengths: torch.Tensor):
    """({implementation: forward returning the padded output}, {implementation: why skipped})."""
    from fastner.nn import quantize

    torch_cls, fast_cls = pair
    torch.manual_seed(17)
    base = torch_cls(shape.input_size, shape.hidden, batch_first=True, bidirectional=True).eval()
    fast = fast_cls(shape.input_size, shape.hidden, batch_first=True, bidirectional=True).eval()
    fast.load_state_dict(base.state_dict())
    x = torch.randn(shape.batch, shape.seq_len, shape.input_size)
    total = shape.seq_len

    def padded(module, autocast=False):
        def call():
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                return module(x)[0].float()
        return call

    def packed(module, autocast=False):
        def call():
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                sequence = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
                output, _ = module(sequence)
                return pad_packed_sequence(output, batch_first=True, total_length=total)[0].float()
        return call

    forwards = {"torch.padded": padded(base), "torch.packed": packed(base),
                "fastner.lengths": lambda: fast(x, lengths=lengths)[0]}
    skipped = {}
    if torch_cls in (torch.nn.LSTM, torch.nn.GRU):
        torch_int8 = torch_int8_layer(base)
        forwards["torch.int8.padded"] = padded(torch_int8)
        forwards["torch.int8.packed"] = packed(torch_int8)
    else:
        skipped["torch.int8"] = "skipped: quantize_dynamic has no int8 nn.RNN"
    forwards["torch.bf16.padded"] = padded(base, autocast=True)
    forwards["torch.bf16.packed"] = packed(base, autocast=True)
    import copy

    int8 = quantize(copy.deepcopy(fast), torch.qint8)
    forwards["fastner.int8.lengths"] = lambda: int8(x, lengths=lengths)[0]
    forwards["fastner.int8.packed"] = packed(int8)
    try:
        bf16 = quantize(copy.deepcopy(fast), torch.bfloat16)
        forwards["fastner.bf16.lengths"] = lambda: bf16(x, lengths=lengths)[0].float()
    except NotImplementedError as err:
        skipped["fastner.bf16"] = f"skipped: {err}"
    # A peer this CPU cannot run (oneDNN's bf16 LSTM needs bf16 or AVX-512 support) is named,
    # not fatal to the row.
    for name, forward in list(forwards.items()):
        try:
            with torch.no_grad():
                forward()
        except Exception as err:
            del forwards[name]
            skipped[name] = f"skipped: {describe_error(err)}"
    return forwards, skipped


def torch_int8_layer(layer: torch.nn.Module) -> torch.nn.Module:
    """A copy of `layer` (exactly an nn.LSTM or nn.GRU: quantize_dynamic passes over anything
    else, subclasses included) quantized as a torch user does: quantize_dynamic, qint8."""
    import copy
    import warnings

    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notices
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(copy.deepcopy(layer)),
                                                      {type(layer)}, dtype=torch.qint8)[0]


def precision_check(forwards):
    """Each reduced-precision output's relative (Frobenius) error against fp32 torch on the same
    input form (padded runs the reverse direction from the padding, so it differs from packed):
    ("ok" or "mismatch: ...", {implementation: relative error})."""
    with torch.no_grad():
        outputs = {name: fn() for name, fn in forwards.items()}
    errors = {}
    for name, out in outputs.items():
        if name in ("torch.padded", "torch.packed"):
            continue
        want = outputs["torch.padded" if name.endswith(".padded") else "torch.packed"]
        errors[name] = float((out - want).norm() / want.norm())
    bad = [f"{name} {err:.2%}" for name, err in errors.items() if name.startswith("fastner.int8") and err > INT8_RTOL]
    return ("mismatch: relative error vs fp32 " + ", ".join(bad)) if bad else "ok", errors


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
    (csrc/cpu/rnn_gemm.h), with both kernels' GFLOP/s, and the kernel of each bf16 weight shape
    run ("bf16 k=.. n=..: avx512_bf16" or "...: avx2")."""
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
