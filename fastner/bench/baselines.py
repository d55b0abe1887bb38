"""What users run today, behind fastner's module interfaces, for the whole-model rows.

`torch_baseline(model)` is fastner.nn.convert in reverse: a copy of the model in which every
fastner LSTM/GRU/RNN becomes the torch.nn layer (lengths= served by packing, as taggers do
today), every fastner CRF becomes pytorch-crf's, the tagger's char CNN runs torch's conv1d
and a masked amax instead of fastner's char_conv_max op, and its dropouts are nn.Dropout
(masks from Tensor.bernoulli_) instead of fastner's dropout_mask op, weights kept. The model's
own code then runs unchanged on either. `quantized_torch_baseline(baseline)` is that copy as a
torch user quantizes it (quantize_dynamic, qint8), for the int8 rows.
"""
from __future__ import annotations

import copy
from typing import List, Optional, Tuple

import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as quantized_dynamic
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torchcrf import CRF as TorchCRF


class _PackingForward:
    """torch's own forward; lengths= is served by pack_padded_sequence / pad_packed_sequence."""

    _torch_class: type

    def forward(self, input, hx=None, lengths=None):
        torch_forward = self._torch_class.forward
        if lengths is None:
            return torch_forward(self, input, hx)
        time_len = input.shape[1] if self.batch_first else input.shape[0]
        packed = pack_padded_sequence(input, lengths.cpu(), batch_first=self.batch_first,
                                      enforce_sorted=False)
        output, state = torch_forward(self, packed, hx)
        output, _ = pad_packed_sequence(output, batch_first=self.batch_first, total_length=time_len)
        return output, state


class PackedLSTM(_PackingForward, nn.LSTM):
    _torch_class = nn.LSTM


class PackedGRU(_PackingForward, nn.GRU):
    _torch_class = nn.GRU


class PackedRNN(_PackingForward, nn.RNN):
    _torch_class = nn.RNN


class PackedQuantizedLSTM(_PackingForward, quantized_dynamic.LSTM):
    _torch_class = quantized_dynamic.LSTM


class PackedQuantizedGRU(_PackingForward, quantized_dynamic.GRU):
    _torch_class = quantized_dynamic.GRU


class PytorchCRF(TorchCRF):
    """pytorch-crf's CRF with fastner's viterbi() signature, built from its decode()."""

    def viterbi(self, emissions: torch.Tensor, mask: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, None]:
        paths: List[List[int]] = self.decode(emissions, mask)
        batch_dim, time_dim = (0, 1) if self.batch_first else (1, 0)
        tags = torch.full((emissions.shape[batch_dim], emissions.shape[time_dim]), -1,
                          dtype=torch.long)
        for index, path in enumerate(paths):
            tags[index, :len(path)] = torch.tensor(path, dtype=torch.long)
        if not self.batch_first:
            tags = tags.t()
        return tags.to(emissions.device), None


def _torch_char_cnn():
    from fastner.models.char_cnn import CharCNN

    class TorchCharCNN(CharCNN):
        """fastner's CharCNN computed with torch's ops: conv1d over each word's characters, -inf
        at its padding characters, amax, zeros for a word without characters (what the module
        ran before the char_conv_max op; the same values)."""

        def forward(self, chars: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            batch, time_len, _ = chars.shape
            words = chars[mask]  # [N, C]
            char_mask = words != self.pad_id
            x = self.dropout(self.embedding(words)).transpose(1, 2)  # [N, char_dim, C]
            x = self.conv(x)  # [N, filters, C]
            x = x.masked_fill(~char_mask[:, None, :], float("-inf")).amax(dim=2)
            x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
            out = x.new_zeros(batch, time_len, self.filters)
            out[mask] = x
            return out

    return CharCNN, TorchCharCNN


CharCNN, TorchCharCNN = _torch_char_cnn()


def _rnn_baseline(layer: nn.RNNBase) -> nn.RNNBase:
    kinds = {"LSTM": PackedLSTM, "GRU": PackedGRU, "RNN_TANH": PackedRNN, "RNN_RELU": PackedRNN}
    cls = kinds[layer.mode]
    kwargs = dict(num_layers=layer.num_layers, bias=layer.bias, batch_first=layer.batch_first,
                  dropout=layer.dropout, bidirectional=layer.bidirectional)
    if cls is PackedRNN:
        kwargs["nonlinearity"] = "tanh" if layer.mode == "RNN_TANH" else "relu"
    if getattr(layer, "proj_size", 0):
        kwargs["proj_size"] = layer.proj_size
    baseline = cls(layer.input_size, layer.hidden_size, **kwargs)
    return baseline


def _crf_baseline(crf: nn.Module) -> nn.Module:
    return PytorchCRF(crf.num_tags, batch_first=crf.batch_first)


def _replacement(child: nn.Module) -> Optional[nn.Module]:
    from fastner import nn as fnn
    from fastner.models.dropout import Dropout

    fast_rnns = tuple(getattr(fnn, name) for name in ("LSTM", "GRU", "RNN") if hasattr(fnn, name))
    fast_crf = getattr(fnn, "CRF", None)
    if fast_rnns and isinstance(child, fast_rnns):
        return _rnn_baseline(child)
    if fast_crf is not None and isinstance(child, fast_crf):
        return _crf_baseline(child)
    if type(child) is CharCNN:
        baseline = copy.deepcopy(child)  # the same parameters; torch's forward and dropout
        baseline.__class__ = TorchCharCNN
        baseline.dropout = nn.Dropout(child.dropout.p)
        return baseline
    if isinstance(child, Dropout):
        return nn.Dropout(child.p)
    return None


def _loaded(replacement: nn.Module, child: nn.Module) -> nn.Module:
    """`replacement` on `child`'s device and dtype, with its weights and training mode."""
    parameter = next(child.parameters(), None)
    if parameter is not None:
        replacement = replacement.to(device=parameter.device, dtype=parameter.dtype)
    replacement.load_state_dict(child.state_dict())
    replacement.train(child.training)
    return replacement


def _swap_in_place(module: nn.Module) -> int:
    swapped = 0
    for name, child in module.named_children():
        replacement = _replacement(child)
        if replacement is None:
            swapped += _swap_in_place(child)
            continue
        setattr(module, name, _loaded(replacement, child))
        swapped += 1
    return swapped


def torch_baseline(model: nn.Module) -> Tuple[nn.Module, int]:
    """A copy of `model` on torch.nn recurrent layers and pytorch-crf, same weights (`model`
    may itself be one fastner layer or CRF).

    Returns the copy and how many modules were swapped.
    """
    replacement = _replacement(model)
    if replacement is not None:
        return _loaded(replacement, model), 1
    baseline = copy.deepcopy(model)
    swapped = _swap_in_place(baseline)
    if hasattr(baseline, "_masked_linear"):
        # The tagger's emission layer over the tokens' rows in torch's ops (what it ran before
        # fastner's masked_linear kernel), not fastner's kernel.
        from fastner import reference

        baseline._masked_linear = reference.masked_linear
    return baseline, swapped


def quantized_torch_baseline(baseline: nn.Module) -> Tuple[nn.Module, int]:
    """A copy of torch_baseline's model with its nn.LSTM / nn.GRU layers quantized as a user
    of torch does it: quantize_dynamic(..., dtype=torch.qint8), weights int8 per tensor,
    activations quantized at run time (fbgemm). Returns the copy and how many layers were
    quantized.

    quantize_dynamic swaps modules by exact type, so it passes over PackedLSTM / PackedGRU (its
    subclasses) without a word and the "quantized" model would run in fp32: each is quantized
    here as the plain torch layer it is, then given its packing forward back.
    """
    from fastner.bench.rnn_rows import torch_int8_layer

    quantized = copy.deepcopy(baseline)
    kinds = {PackedLSTM: (nn.LSTM, PackedQuantizedLSTM), PackedGRU: (nn.GRU, PackedQuantizedGRU)}
    count = 0
    for parent in list(quantized.modules()):
        for name, child in list(parent.named_children()):
            if type(child) not in kinds:
                continue
            plain_class, packed_class = kinds[type(child)]
            child.__class__ = plain_class  # the copy's own layer, replaced below
            layer = torch_int8_layer(child)
            layer.__class__ = packed_class
            setattr(parent, name, layer)
            count += 1
    return quantized, count
