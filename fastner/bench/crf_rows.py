"""CRF rows: NLL forward+backward and Viterbi decode, fastner.nn.CRF against pytorch-crf
(torchcrf.CRF with the same state_dict) and against fastner's own reference path."""
from __future__ import annotations

from typing import Dict, List

import torch

from fastner.bench.rows import Context, GroupSkipped, Row, describe_error, forced_reference, on_reference
from fastner.bench.workloads import crf_batch

TITLE = "CRF: fastner.nn.CRF vs torchcrf.CRF (pytorch-crf, same state_dict) and FASTNER_BACKEND=reference"


def _classes():
    """(fastner.nn.CRF, torchcrf.CRF or None); skips the group when fastner's is missing."""
    try:
        from fastner.nn import CRF
    except ImportError as err:
        raise GroupSkipped(f"fastner.nn.CRF is not available ({describe_error(err)})") from None
    try:
        from torchcrf import CRF as TorchCRF
    except ImportError:
        TorchCRF = None
    return CRF, TorchCRF


def _oracle(fast, base, compute):
    """What fastner's answer is checked against: pytorch-crf, else fastner's reference path."""
    if base is not None:
        return compute(base)
    with forced_reference():
        return compute(fast)


def run(ctx: Context) -> None:
    device = ctx.device
    FastCRF, TorchCRF = _classes()
    if TorchCRF is None:
        ctx.notes.append("pytorch-crf (torchcrf) is not installed: rows compare against the reference only")
    for index, (batch, seq_len, num_tags) in enumerate(ctx.plan.crf_shapes):
        fast = FastCRF(num_tags, batch_first=True).to(device)
        base = None
        if TorchCRF is not None:
            base = TorchCRF(num_tags, batch_first=True).to(device)
            fast.load_state_dict(base.state_dict())
        inputs = crf_batch(batch, seq_len, num_tags, seed=1000 + index, device=device)
        _nll_row(ctx, fast, base, inputs.emissions, inputs.tags, inputs.mask, inputs.shape)
        _decode_row(ctx, fast, base, inputs.emissions, inputs.mask, inputs.shape)


def _nll_row(ctx: Context, fast, base, emissions, tags, mask, shape) -> None:
    row = Row(str(ctx.device), "crf", "nll_fwd_bwd", dict(shape))
    leaf = emissions.detach().clone().requires_grad_(True)

    def step(module):
        def call():
            llh = module(leaf, tags, mask, reduction="sum")
            return torch.autograd.grad(-llh, [leaf, *module.parameters()])
        return call

    calls: Dict[str, object] = {"fastner": step(fast), "reference": on_reference(step(fast))}
    if base is not None:
        calls["pytorch-crf"] = step(base)
    try:
        with torch.no_grad():
            got = fast(emissions, tags, mask, reduction="none")
            want = _oracle(fast, base, lambda m: m(emissions, tags, mask, reduction="none"))
        row.check = "ok" if torch.allclose(got, want, rtol=1e-4, atol=1e-3) else \
            f"mismatch: max |llh difference| {float((got - want).abs().max()):.3g}"
        ctx.compare(row, calls, baselines=[b for b in ("pytorch-crf", "reference") if b in calls])
    except Exception as err:  # a broken implementation is reported in its row, the run goes on
        row.error = describe_error(err)
    ctx.emit(row)


def _decode_row(ctx: Context, fast, base, emissions, mask, shape) -> None:
    row = Row(str(ctx.device), "crf", "decode", dict(shape))

    def decode(module):
        def call():
            with torch.no_grad():
                return module.decode(emissions, mask)
        return call

    def viterbi():
        with torch.no_grad():
            return fast.viterbi(emissions, mask)

    calls: Dict[str, object] = {"fastner": decode(fast)}
    if hasattr(fast, "viterbi"):
        # Tags and scores as tensors: what a caller that stays on the device gets.
        calls["fastner.viterbi"] = viterbi
    calls["reference"] = on_reference(decode(fast))
    if base is not None:
        calls["pytorch-crf"] = decode(base)
    try:
        got: List[List[int]] = decode(fast)()
        want = _oracle(fast, base, lambda m: decode(m)())
        row.check = "ok" if got == want else \
            f"mismatch: {sum(g != w for g, w in zip(got, want))} of {len(want)} paths differ"
        ctx.compare(row, calls, baselines=[b for b in ("pytorch-crf", "reference") if b in calls])
    except Exception as err:
        row.error = describe_error(err)
    ctx.emit(row)
