"""fastner.nn.quantize: LSTM / GRU / RNN layers (fastner's or torch's) swapped, in place, for
inference-only int8 or bfloat16 ones with the same forward signature.

int8 (torch.qint8): the weights are quantized once per output channel (symmetric s7) and
packed once for the kernels (fastner.ops.rnn_int8_pack: panels, column sums, scales; the op
used to pack on every call), kept as buffers beside the float parameters, which stay as they
were: state_dict() is unchanged and loads into the float model, and a change to them that torch
counts, in place (under no_grad, copy_, load_state_dict) or by assignment (`.data =`, a new
Parameter, .to()), is quantized and packed again before the next forward. A change through
`.data` in place (`p.data.add_(...)`) bumps no version and is not seen: call quantize(model,
torch.qint8) again after one); every product quantizes its rows on the fly (7-bit asymmetric)
and runs fastner::rnn_layer_int8_forward on the packed weights (csrc/cpu/rnn_int8.h: the kernel,
the packed layout and why 7 bits; fastner.reference.rnn_layer_int8: the exact arithmetic).
bfloat16: fastner.nn.rnn_bf16.to_bf16.
NaN and +-inf in the input or hx / cx propagate as in the float32 layer with the dequantized
weights (same positions; other sequences and padding unaffected): a row holding one is not
quantized but gets its float product (fastner.reference.int8_product_nonfinite). Unbatched
input [T, I] runs as a batch of one. What the int8 op does not take runs torch's float layer on
the float weights, as fastner's float layers hand it to torch: input of another dtype (float64,
float16, bfloat16: torch's dtype error, unless the model was converted with .double() / .half(),
which then runs in that dtype, not int8) and a forward under autocast (torch's layer in the
autocast dtype; int8 where oneDNN has no kernel for that dtype: fastner.nn.rnn says why).

Quantized layers do not train: a forward where a gradient could flow (grad mode on and the
module in training mode, or an input that requires grad) raises RuntimeError, so there are no
silent zero or missing gradients. Train the float model, then quantize it. (In training mode
under no_grad it runs, without the dropout between layers. The bf16 layers refuse training
mode whatever the grad mode: fastner.nn.rnn_bf16.)
"""
from __future__ import annotations

import threading
from typing import Dict, Tuple

import torch
from torch import Tensor

from fastner import ops, reference
from fastner.nn.convert import swap_children, swap_rnn_class, warn_left_alone
from fastner.nn.rnn import GRU, LSTM, RNN, _forward_unbatched

__all__ = ["quantize", "Int8LSTM", "Int8GRU", "Int8RNN"]

# Held while an int8 layer checks that its int8 weights are current (quantizing them again where
# not) and reads them: one lock for every layer, so that deepcopy and pickle need no special case.
_REQUANTIZE_LOCK = threading.Lock()

# The buffers of one quantized weight <name>: int8_<name>, int8_scale_<name>, int8_packed_<name>.
_INT8_KINDS = ("", "_scale", "_packed")

_INFERENCE_ONLY = (
    "{name} is an inference-only quantized ({dtype}) layer: {why}. Run it under torch.no_grad() "
    "or torch.inference_mode() (or call .eval() and pass inputs that do not require grad); to "
    "train, train the float model and quantize it afterwards")


class _Int8Mixin:
    """What the int8 classes add to fastner's LSTM / GRU / RNN: the quantized weights (buffers
    int8_<name> int8 [N, K], int8_scale_<name> [N] and int8_packed_<name>, their packed form that
    the op reads; none saved in state_dict) and _run_layers on the int8 op."""

    def _quantize_weights(self, quantized=None) -> None:
        """Install the int8 copies of the float weights: `quantized` (_int8_weights of this
        layer, computed before its class was rebound) or computed now."""
        source = self._float_weight_sources()  # what the copies are made from, read first
        quantized = _int8_weights(self) if quantized is None else quantized
        names = {f"int8{kind}_{wname}" for wname in quantized for kind in _INT8_KINDS}
        for name in set(self._int8_names()) - names:
            delattr(self, name)
        # register_buffer replaces a buffer of the same name: there is no moment without one.
        # The op reads int8_packed_<name> alone, which holds a weight with its own scales: a
        # forward cannot pair a weight of one generation with the scales of another.
        for wname, (w_q, scale, packed) in quantized.items():
            self.register_buffer(f"int8_{wname}", w_q, persistent=False)
            self.register_buffer(f"int8_scale_{wname}", scale, persistent=False)
            self.register_buffer(f"int8_packed_{wname}", packed, persistent=False)
        self._int8_weight_names = list(quantized)
        self._int8_source = source

    def _float_weights(self):
        # From the parameter dict, as functional_call swaps them there: Module.__getattr__ costs
        # ~1.4 us a lookup, and every forward asks (_int8_is_current).
        parameters = self._parameters
        return [parameters[name] for name in self._flat_weights_names
                if name.startswith(("weight_ih", "weight_hh"))]

    def _float_weight_sources(self):
        """What identifies the float W_ih / W_hh the int8 copies are made from: an in-place
        change bumps a tensor's version; `.data =`, a new Parameter or .to() give new storage.
        Each entry also holds a detached alias of the weight (same storage) so that its storage
        stays alive: freed, its address can be handed to the next weight assigned (seen with
        `p.data = torch.randn(...)` twice between two forwards), which would then look like the
        one quantized."""
        return [(w.detach(), w.data_ptr(), w._version) for w in self._float_weights()]

    def _int8_is_current(self) -> bool:
        source = getattr(self, "_int8_source", None)
        weights = self._float_weights()
        return source is not None and len(source) == len(weights) and all(
            w.data_ptr() == data_ptr and w._version == version
            for w, (_, data_ptr, version) in zip(weights, source))

    def _int8_names(self):
        for wname in getattr(self, "_int8_weight_names", ()):
            for kind in _INT8_KINDS:
                yield f"int8{kind}_{wname}"

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
            if isinstance(input, Tensor) and input.dim() == 2:
                # Unbatched [T, I]: fastner's float layers hand it to torch, which would run
                # the float weights; run it as a batch of one on the int8 weights instead.
                return _forward_unbatched(self, input, hx, lengths)
            return super().forward(input, hx, lengths)

    def _int8_layer_args(self):
        """[weights] per layer, as ops.rnn_layer_int8 takes them (packed W_ih, W_hh; biases)."""
        names = self._flat_weights_names
        per_layer = len(names) // self.num_layers
        buffers, parameters = self._buffers, self._parameters  # (as in _float_weights)
        layer_args = []
        for layer in range(self.num_layers):
            weights = []
            for wname in names[layer * per_layer:(layer + 1) * per_layer]:
                if wname.startswith(("weight_ih", "weight_hh")):
                    weights.append(buffers[f"int8_packed_{wname}"])
                else:
                    weights.append(parameters[wname].detach())
            layer_args.append(weights)
        return layer_args

    def _run_layers(self, x: Tensor, hx, lengths: Tensor, batch_first: bool) -> Tuple[Tensor, Tensor, Tensor]:
        if torch.compiler.is_compiling():
            # Fake tensors have no data pointer: the trace takes the int8 buffers as they are.
            layer_args = self._int8_layer_args()
        else:
            with _REQUANTIZE_LOCK:
                # Two threads' forwards after a change to the weights: one quantizes them again,
                # and neither reads a weight of one generation with the scale of another.
                if not self._int8_is_current():
                    # The float weights changed since they were quantized (in place, by
                    # assignment): the next forward must see them, as the float layer's would,
                    # not a stale copy.
                    self._quantize_weights()
                layer_args = self._int8_layer_args()
        D = 2 if self.bidirectional else 1
        h0, c0 = (hx if self._is_lstm else (hx, None)) if hx is not None else (None, None)
        mode = self._cell_mode()
        h_last, c_last = [], []
        for layer, weights in enumerate(layer_args):
            layer_h0 = h0[layer * D:(layer + 1) * D] if h0 is not None else None
            layer_c0 = c0[layer * D:(layer + 1) * D] if c0 is not None else None
            x, h_n, c_n = ops.rnn_layer_int8(x, lengths, weights, self.hidden_size, layer_h0, layer_c0,
                                             mode, self.bidirectional, batch_first)
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


def _int8_weights(module: torch.nn.Module) -> Dict[str, Tuple[Tensor, Tensor, Tensor]]:
    """{name: (w_q int8 [N, K], scale [N], packed: ops.rnn_int8_pack(w_q, scale))} of a
    recurrent layer's W_ih / W_hh; ValueError naming a weight that holds NaN or +-inf. Reads the
    layer, changes nothing."""
    quantized = {}
    for wname in module._flat_weights_names:
        if wname.startswith(("weight_ih", "weight_hh")):
            w_q, scale = reference.quantize_weight_int8(getattr(module, wname), name=wname)
            quantized[wname] = (w_q, scale, ops.rnn_int8_pack(w_q, scale))
    return quantized


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


def _bf16_classes() -> tuple:
    from fastner.nn.rnn_bf16 import _BF16_CLASS

    return tuple(_BF16_CLASS.values())


def quantize(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Swap every LSTM / GRU / RNN in `module` (torch's or fastner's; `module` itself when it is
    one) for an inference-only layer in `dtype` (torch.qint8 or torch.bfloat16), in place; the
    same forward signature (Tensor or PackedSequence, lengths=, hx). Returns `module` (or its
    replacement when `module` itself is a recurrent layer). Torch's classes are first made
    fastner's the way fastner.nn.convert does; other modules are left as they are.

    int8: each layer's class is rebound (the same object, its float parameters kept and
    frozen). A layer already int8 has its int8 weights computed again from its float weights:
    the way to requantize after a change torch does not count (`p.data.add_(...)`: see the
    module's docstring). A layer whose weights hold NaN or +-inf raises ValueError naming the
    weight and is left as it was (layers swapped before it stay swapped).
    bfloat16: each layer is replaced by a converted copy (fastner.nn.rnn_bf16.to_bf16, one copy
    for a layer that two parents share); the float layer objects are left as they were. A layer
    already bf16 is left as it is.
    A model holding layers already quantized to the other dtype raises ValueError (naming
    one), before anything is swapped: quantize the float model instead. A subclass of torch's or
    fastner's LSTM / GRU / RNN classes is left in float (it may override forward), named in a
    UserWarning."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"quantize: module must be a torch.nn.Module, got {type(module).__name__}")
    if dtype is torch.qint8:
        to_quantized, done, other = _to_int8, _QUANTIZED, _bf16_classes()
    elif dtype is torch.bfloat16:
        to_quantized, done, other = _to_bf16, _bf16_classes(), _QUANTIZED
    else:
        raise ValueError(f"quantize: dtype must be torch.qint8 or torch.bfloat16, got {dtype!r}")
    for name, child in module.named_modules():
        if isinstance(child, other):
            raise ValueError(
                f"quantize: {name or 'module'} is already a quantized {type(child).__name__}, not "
                f"float: quantize the float model to {dtype} (quantizing a quantized layer again "
                "would compound the rounding)")

    replacements: Dict[int, torch.nn.Module] = {}  # a layer shared by two parents: one replacement

    def swapped(child: torch.nn.Module) -> torch.nn.Module:
        if id(child) in replacements:
            return replacements[id(child)]
        if isinstance(child, done):
            if isinstance(child, _QUANTIZED):
                child._quantize_weights()  # already int8: from the float weights as they are now
            new = child
        else:
            new = swap_rnn_class(child)  # torch's class -> fastner's (or unchanged)
            if type(new) in _INT8_CLASSES:
                new = to_quantized(new)
        replacements[id(child)] = new
        return new

    quantized = swap_children(module, swapped)
    warn_left_alone(quantized, done, f"quantized to {dtype}", "fastner.nn.quantize")
    return quantized
