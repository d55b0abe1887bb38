"""fastner.nn.LSTM / GRU / RNN: drop-in subclasses of the torch.nn recurrent layers.

Placeholder until the fused layers land: same classes as torch's, plus the `lengths=` keyword
(served here by packing), so code written against the final API already runs.
"""
from __future__ import annotations

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

__all__ = ["LSTM", "GRU", "RNN"]


class _LengthsMixin:
    def forward(self, input, hx=None, lengths=None):
        if lengths is None:
            return super().forward(input, hx)
        time_len = input.shape[1] if self.batch_first else input.shape[0]
        packed = pack_padded_sequence(input, lengths.cpu(), batch_first=self.batch_first, enforce_sorted=False)
        output, state = super().forward(packed, hx)
        output, _ = pad_packed_sequence(output, batch_first=self.batch_first, total_length=time_len)
        return output, state


class LSTM(_LengthsMixin, torch.nn.LSTM):
    pass


class GRU(_LengthsMixin, torch.nn.GRU):
    pass


class RNN(_LengthsMixin, torch.nn.RNN):
    pass
