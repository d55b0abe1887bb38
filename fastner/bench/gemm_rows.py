"""GEMM rate: torch.mm in fp32 at one representative size, measured in the same run, so that
the RNN rows can state their floor (the time their useful GEMM FLOPs take at this rate)."""
from __future__ import annotations

from typing import Callable, Tuple

import torch

from fastner.bench.rows import Context, Row, describe_error

TITLE = "GEMM: torch.mm fp32 (the rate behind the RNN floors)"


def run(ctx: Context) -> None:
    n = ctx.plan.gemm_size[ctx.device.type]
    generator = torch.Generator().manual_seed(7)
    a = torch.randn(n, n, generator=generator).to(ctx.device)
    b = torch.randn(n, n, generator=generator).to(ctx.device)
    out = torch.empty(n, n, device=ctx.device)
    row = Row(str(ctx.device), "gemm", "mm_fp32", {"M": n, "N": n, "K": n})
    ctx.compare(row, {"torch.mm": lambda: torch.mm(a, b, out=out)}, baselines=["torch.mm"])
    flops = 2.0 * n ** 3
    rate = flops / row.results[0].stats.median
    row.info = {"flops": flops, "gflops_per_s": rate / 1e9,
                "float32_matmul_precision": torch.get_float32_matmul_precision()}
    ctx.gemm_flops_per_s = rate
    ctx.emit(row)
    if ctx.device.type == "cpu":
        _int8_rate(ctx, n)


def int8_gemm(n: int) -> Tuple[Callable[[], object], float]:
    """(call, its operations): torch's dynamically quantized int8 Linear (fbgemm: the AVX2 /
    AVX-512 / VNNI kernel this CPU has; activations quantized per call, like fastner's int8
    layers) at [n, n] x [n, n]. Its rate is the int8 RNN rows' floor (rnn_rows.py times it in
    each row's own rounds). Raises where torch has no int8 engine."""
    import warnings

    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    generator = torch.Generator().manual_seed(7)
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notices
        warnings.simplefilter("ignore")
        linear = DynamicLinear(n, n, bias_=False, dtype=torch.qint8)
    x = torch.randn(n, n, generator=generator)
    return (lambda: linear(x)), 2.0 * n ** 3


def _int8_rate(ctx: Context, n: int) -> None:
    """int8_gemm's rate on its own: the figure to set beside the fp32 one above."""
    row = Row(str(ctx.device), "gemm", "linear_dynamic_int8", {"M": n, "N": n, "K": n})
    try:
        call, ops = int8_gemm(n)
        ctx.compare(row, {"torch.int8.linear_dynamic": call}, baselines=["torch.int8.linear_dynamic"])
        rate = ops / row.results[0].stats.median
        row.info = {"ops": ops, "gops_per_s": rate / 1e9,
                    "quantized_engine": torch.backends.quantized.engine}
    except Exception as err:  # an int8-less torch build: the rows say so, the run goes on
        row.error = describe_error(err)
    ctx.emit(row)


def rnn_flops(cell: str, input_size: int, hidden: int, tokens: int, directions: int,
              training: bool) -> float:
    """GEMM FLOPs of a one-layer RNN over `tokens` real (unpadded) time steps.

    Per token and direction: the input projection 2*G*H*I and the recurrent product 2*G*H*H,
    G gates (LSTM 4, GRU 3, RNN 1). Training adds the backward's two products of the same
    size (gradients of the inputs/state and of the weights): three times the forward.
    """
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[cell]
    forward = 2.0 * gates * hidden * (input_size + hidden) * tokens * directions
    return 3.0 * forward if training else forward
