"""fastner.nn.quantize: LSTM / GRU / RNN layers (fastner's or torch's) swapped, in place, for
inference-only int8 or bfloat16 ones with the same forward signature.

int8 (torch.qint8): the weights are quantized once per output channel (symmetric s8, kept as
buffers beside the float parameters, which stay as they were: state_dict() is unchanged and
loads into the float model, and a change to them, in place or by assignment, is quantized again
before the next forward); every product quantizes its rows on the fly (7-bit asymmetric)
and runs fastner::rnn_layer_int8_forward (csrc/cpu/rnn_int8.h: the kernel and why 7 bits;
fastner.reference.rnn_layer_int8: the exact arithmetic). bfloat16: fastner.nn.rnn_bf16.to_bf16.
NaN and +-inf in the input or hx / cx propagate as in the float32 layer with the dequantized
weights (same positions; other sequences and padding unaffected): a row holding one is not
quantized but gets its float product (fastner.reference.int8_product_nonfinite).

Quantized layers do not train: a forward where a gradient could flow (grad mode on and the
module in training mode, or an input that requires grad) raises RuntimeError, so there are no
silent zero or missing gradients. Train the float model, then quantize it.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor

from fastner import ops, reference
from fastner.nn.convert import swap_children, swap_rnn_class
from fastner.nn.rnn import GRU, LSTM, RNN, _FusedRNNMixin

__all__ = ["quantize", "Int8LSTM", "Int8GRU", "Int8RNN"]

_INFERENCE_ONLY = (
    "{name} is an inference-only quantized ({dtype}) layer: {why}. Run it under torch.no_grad() "
    "or torch.inference_mode() (or call .eval() and pass inputs that do not require grad); to "
    "train, train the float model and quantize it afterwards")


class _Int8Mixin:
    """What the int8 classes add to fastner's LSTM / GRU / RNN: the quantized weights (buffers
    int8_w_*, int8_scale_*, not saved in state_dict) and _run_layers on the int8 op."""

    def _quantize_weights(self, quantized=None) -> None:
        """Install the int8 copies of the float weights: `quantized` (_int8_weights of this
        layer, computed before its class was rebound) or computed now."""
        quantized = _int8_weights(self) if quantized is None else quantized
        for name in list(self._int8_names()):
            if hasattr(self, name):
                delattr(self, name)
        for wname, (w_q, scale) in quantized.items():
            self.register_buffer(f"int8_{wname}", w_q, persistent=False)
            self.register_buffer(f"int8_scale_{wname}", scale, persistent=False)
        self._int8_weight_names = list(quantized)
        self._int8_source = self._float_weight_keys()

    def _float_weight_keys(self):
        """What identifies the float W_ih / W_hh the int8 copies were made from: an in-place
        change bumps a tensor's version; `.data =`, a new Parameter or .to() give new storage."""
        weights = [getattr(self, name) for name in self._int8_weight_names]
        return [(w.data_ptr(), w._version) for w in weights]

    def _int8_names(self):
        for wname in getattr(self, "_int8_weight_names", ()):
            yield f"int8_{wname}"
            yield f"int8_scale_{wname}"

    def _load_from_state_dict(self, *args, **kwargs):
        # New float weights: quantize them again, or the int8 copy would silently be stale.
        super()._load_from_state_dict(*args, **kwargs)
        self._quantize_weights()

    def _fusable(self, input, hx) -> bool:
        data = input.data if isinstance(input, torch.nn.utils.rnn.PackedSequence) else input
        # The int8 op takes float32; other dtypes (and the configurations fastner's float
        # layers hand to torch) run the float weights in torch, which a layer must still accept.
        return isinstance(data, Tensor) and data.dtype == torch.float32 and super()._fusable(input, hx)

    def forward(self, input, hx=None, lengths=None):
        data = input.data if isinstance(input, torch.nn.utils.rnn.PackedSequence) else input
        if torch.is_grad_enabled():
            name = type(self).__name__
            if self.training:
                raise RuntimeError(_INFERENCE_ONLY.format(
                    name=name, dtype="int8", why="it was called in training mode with grad enabled"))
            if any(isinstance(t, Tensor) and t.requires_grad for t in [data, *_states(hx)]):
                raise RuntimeError(_INFERENCE_ONLY.format(
                    name=name, dtype="int8", why="an input or state requires grad"))
        with torch.no_grad():  # the float fallback too: no graph through frozen parameters
            return super().forward(input, hx, lengths)

    def _run_layers(self, x: Tensor, hx, lengths: Tensor, batch_first: bool) -> Tuple[Tensor, Tensor, Tensor]:
        if not torch.compiler.is_compiling() and self._float_weight_keys() != getattr(self, "_int8_source", None):
            # The float weights changed since they were quantized (in place, by assignment):
            # the next forward must see them, as the float layer's would, not a stale copy.
            # (Not while tracing: fake tensors have no data pointer; the trace takes the
            # int8 buffers as they are.)
            self._quantize_weights()
        D = 2 if self.bidirectional else 1
        names = self._flat_weights_names
        per_layer = len(names) // self.num_layers
        h0, c0 = (hx if self._is_lstm else (hx, None)) if hx is not None else (None, None)
        mode = self._cell_mode()
        h_last, c_last = [], []
        for layer in range(self.num_layers):
            weights, scales = [], []
            for wname in names[layer * per_layer:(layer + 1) * per_layer]:
                if wname.startswith(("weight_ih", "weight_hh")):
                    weights.append(getattr(self, f"int8_{wname}"))
                    scales.append(getattr(self, f"int8_scale_{wname}"))
                else:
                    weights.append(getattr(self, wname).detach())
            layer_h0 = h0[layer * D:(layer + 1) * D] if h0 is not None else None
            layer_c0 = c0[layer * D:(layer + 1) * D] if c0 is not None else None
            x, h_n, c_n = ops.rnn_layer_int8(x, lengths, weights, scales, layer_h0, layer_c0, mode,
                                             self.bidirectional, batch_first)
            h_last.append(h_n)
            c_last.append(c_n)
        h_n = torch.cat(h_last, 0) if len(h_last) > 1 else h_last[0]
        c_n = (torch.cat(c_last, 0) if len(c_last) > 1 else c_last[0]) if self._is_lstm else None
        return x, h_n, c_n


def _states(hx):
    if hx is None:
        return []
    return list(hx) if isinstance(hx, (tuple, list)) else [hx]


class Int8LSTM(_Int8Mixin, LSTM):
    """fastner.nn.LSTM running int8 products (inference only); made by quantize()."""


class Int8GRU(_Int8Mixin, GRU):
    """fastner.nn.GRU running int8 products (inference only); made by quantize()."""


class Int8RNN(_Int8Mixin, RNN):
    """fastner.nn.RNN running int8 products (inference only); made by quantize()."""


_INT8_CLASSES = {LSTM: Int8LSTM, GRU: Int8GRU, RNN: Int8RNN}
_QUANTIZED = tuple(_INT8_CLASSES.values())


def _int8_weights(module: torch.nn.Module) -> Dict[str, Tuple[Tensor, Tensor]]:
    """{name: (w_q int8 [N, K], scale [N])} of a recurrent layer's W_ih / W_hh; ValueError
    naming a weight that holds NaN or +-inf. Reads the layer, changes nothing."""
    return {wname: reference.quantize_weight_int8(getattr(module, wname), name=wname)
            for wname in module._flat_weights_names if wname.startswith(("weight_ih", "weight_hh"))}


def _to_int8(module: torch.nn.Module) -> torch.nn.Module:
    if getattr(module, "proj_size", 0) > 0:
        raise ValueError(f"quantize: {type(module).__name__} with proj_size={module.proj_size} has no "
                         "int8 kernel (proj_size=0 only)")
    quantized = _int8_weights(module)  # before any change: a layer that cannot be quantized stays as it was
    module = swap_rnn_class(module, _INT8_CLASSES[type(module)])
    for p in module.parameters(recurse=False):
        p.requires_grad_(False)
    module._quantize_weights(quantized)
    return module.eval()


def _to_bf16(module: torch.nn.Module) -> torch.nn.Module:
    from fastner.nn.rnn_bf16 import to_bf16  # imports fastner.nn.quantize's module: import here

    return to_bf16(module)


def quantize(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Swap every LSTM / GRU / RNN in `module` (torch's or fastner's; `module` itself when it is
    one) for an inference-only layer in `dtype` (torch.qint8 or torch.bfloat16), in place; the
    same forward signature (Tensor or PackedSequence, lengths=, hx). Returns `module` (or its
    replacement when `module` itself is a recurrent layer). Torch's classes are first made
    fastner's the way fastner.nn.convert does; other modules are left as they are. int8: a
    layer whose weights hold NaN or +-inf raises ValueError naming the weight and is left as it
    was (layers swapped before it stay swapped)."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"quantize: module must be a torch.nn.Module, got {type(module).__name__}")
    if dtype is torch.qint8:
        to_quantized = _to_int8
    elif dtype is torch.bfloat16:
        to_quantized = _to_bf16
    else:
        raise ValueError(f"quantize: dtype must be torch.qint8 or torch.bfloat16, got {dtype!r}")

    def swapped(child: torch.nn.Module) -> torch.nn.Module:
        if isinstance(child, _QUANTIZED):
            return child  # already quantized
        child = swap_rnn_class(child)  # torch's class -> fastner's (or unchanged)
        if type(child) in _INT8_CLASSES:
            return to_quantized(child)
        return child

    return swap_children(module, swapped)
