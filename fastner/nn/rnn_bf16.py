"""fastner.nn.rnn_bf16: LSTM / GRU / RNN layers with bfloat16 weights, for CPU inference.

to_bf16(module) returns a copy of a fastner.nn (or torch.nn) LSTM, GRU or RNN whose w_ih and
w_hh are rounded to bfloat16 once (round to nearest even; the biases stay float32). Its forward
has fastner.nn's signature (Tensor in either layout or PackedSequence, `lengths=`, hx) and takes
and returns float32. Arithmetic: every product x @ W_ih^T and h @ W_hh^T multiplies bf16 by
bf16: x and h are rounded to bf16 just for the product (nearest even, as .to(torch.bfloat16);
float32 denormals count as zeros), the products are exact in float32 and summed in float32;
gate math and the states h / c stay float32. fastner.reference.rnn_layer with these weights
defines it. On a CPU with AVX512_BF16 the products are vdpbf16ps dot products
(csrc/cpu/rnn_gemm_avx512_bf16.h, ~2x the float32 kernel's rate); elsewhere the AVX2 kernel
rounds the rows the same way and widens the weights in registers (csrc/cpu/rnn_gemm_avx2.h),
so a model gives the same answers on every CPU up to float32 summation order (which, once it
moves an h across a bf16 rounding boundary, shows as ~1e-4 differences later on). Against the
float32 layer the output's relative error is ~0.25% per layer (tests/ops/rnn/test_rnn_bf16.py).
NaN and +-inf in the input or hx / cx propagate as in the float32 layer.

Inference only: forward raises in training mode and when a gradient could flow into the input
or the initial state; the weights are not trainable (requires_grad=False).
"""
from __future__ import annotations

import copy
from typing import Dict

import torch
from torch.nn.utils.rnn import PackedSequence

from fastner.nn.rnn import GRU, LSTM, RNN, _forward_unbatched, _tensors_in

__all__ = ["to_bf16"]

_FASTNER_CLASS = {torch.nn.LSTM: LSTM, torch.nn.GRU: GRU, torch.nn.RNN: RNN,
                  LSTM: LSTM, GRU: GRU, RNN: RNN}


class _BF16Mixin:
    """forward() of the bf16 classes: checks, then the fused path of fastner.nn's forward."""

    def _fusable(self, input, hx) -> bool:
        data = input.data if isinstance(input, PackedSequence) else input
        if not isinstance(data, torch.Tensor) or data.dtype != torch.float32 or data.device.type != "cpu":
            got = f"{data.dtype} on {data.device}" if isinstance(data, torch.Tensor) else type(data).__name__
            raise TypeError(f"{type(self).__name__}: input must be a float32 CPU tensor (bf16 weights, "
                            f"float32 activations), got {got}")
        for h in _tensors_in(hx):
            if not isinstance(h, torch.Tensor) or h.dtype != torch.float32 or h.device.type != "cpu":
                raise TypeError(f"{type(self).__name__}: hx must be float32 CPU tensors")
        if torch.is_grad_enabled() and any(t.requires_grad for t in [data, *_tensors_in(hx)]):
            raise RuntimeError(f"{type(self).__name__} has bfloat16 weights and is inference-only: it "
                               "computes no gradients (run it under torch.no_grad() or on inputs "
                               "that do not require grad; train the float32 module)")
        return True

    def check_input(self, input, batch_sizes) -> None:
        # torch's check, less its input-dtype == weight-dtype rule (float32 input, bf16 weights).
        expected = 2 if batch_sizes is not None else 3
        if input.dim() != expected:
            raise RuntimeError(f"input must have {expected} dimensions, got {input.dim()}")
        if input.size(-1) != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                               f"got {input.size(-1)}")

    def forward(self, input, hx=None, lengths=None):
        if self.training:
            raise RuntimeError(f"{type(self).__name__} has bfloat16 weights and is inference-only: "
                               "call .eval() (train the float32 module, then convert it)")
        if isinstance(input, torch.Tensor) and input.dim() == 2:  # unbatched [T, I]
            return _forward_unbatched(self, input, hx, lengths)
        return super().forward(input, hx, lengths)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", weights=bfloat16 (inference)"


class BF16LSTM(_BF16Mixin, LSTM):
    """fastner.nn.LSTM with bfloat16 w_ih / w_hh, inference only (see to_bf16)."""


class BF16GRU(_BF16Mixin, GRU):
    """fastner.nn.GRU with bfloat16 w_ih / w_hh, inference only (see to_bf16)."""


class BF16RNN(_BF16Mixin, RNN):
    """fastner.nn.RNN with bfloat16 w_ih / w_hh, inference only (see to_bf16)."""


_BF16_CLASS: Dict[type, type] = {LSTM: BF16LSTM, GRU: BF16GRU, RNN: BF16RNN}


def to_bf16(module: torch.nn.Module) -> torch.nn.Module:
    """An inference-only copy of `module` (a fastner.nn or torch.nn LSTM, GRU or RNN on the CPU)
    with w_ih / w_hh stored as bfloat16 (rounded once, to nearest even) and float32 biases.

    The copy is in eval mode; the original is left as it was.
    """
    target = _FASTNER_CLASS.get(type(module))
    if target is None:
        raise TypeError("to_bf16: expected a fastner.nn or torch.nn LSTM, GRU or RNN, got "
                        f"{type(module).__name__}")
    if getattr(module, "proj_size", 0) > 0:
        raise ValueError("to_bf16: LSTMs with proj_size > 0 are not supported")
    devices = {p.device.type for p in module.parameters()}
    if devices - {"cpu"}:
        raise ValueError(f"to_bf16: the module must be on the CPU (the bf16 kernels are CPU "
                         f"kernels), got parameters on {sorted(devices)}")
    converted = copy.deepcopy(module)
    for name in converted._flat_weights_names:
        value = getattr(converted, name).detach()
        dtype = torch.bfloat16 if name.startswith("weight_") else torch.float32
        setattr(converted, name, torch.nn.Parameter(value.to(dtype), requires_grad=False))
    converted._init_flat_weights()
    converted.__class__ = _BF16_CLASS[target]
    return converted.eval()
