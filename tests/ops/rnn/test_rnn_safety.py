"""Regression tests of issue 12's native/op defects in the RNN layer op and modules: bad lengths,
lengths on another device and malformed PackedSequences are refused with a ValueError naming them
(fused and reference paths alike). The property-based version is tests/ops/rnn/test_rnn_fuzz.py."""
import pytest
import torch
from torch.nn.utils.rnn import PackedSequence

import fastner.nn
from fastner import ops

from tests import testing

BACKENDS = pytest.mark.parametrize("backend", ["fused", "reference"])


@BACKENDS
def test_rnn_lengths_outside_zero_to_t_are_refused(backend):
    lstm = fastner.nn.LSTM(3, 4, batch_first=True)
    with testing.backend(backend):
        for bad in (6, -1):
            with pytest.raises(ValueError, match="lengths"):
                lstm(torch.randn(2, 5, 3), lengths=torch.tensor([5, bad]))


@BACKENDS
def test_rnn_lengths_on_another_device_are_refused(backend):
    x = torch.randn(2, 5, 3)
    w = [torch.randn(16, 3), torch.randn(16, 4)]
    with testing.backend(backend), pytest.raises(ValueError, match="lengths must be on cpu"):
        ops.rnn_layer(x, torch.tensor([5, 2], device="meta"), w)
    with pytest.raises(ValueError, match="lengths must be on cpu"):
        torch.ops.fastner.rnn_layer_forward(x, torch.tensor([5, 2], device="meta"), w, None, None,
                                            "lstm", False, True, False)


@pytest.mark.parametrize("module", [fastner.nn.LSTM, fastner.nn.GRU, fastner.nn.RNN])
@pytest.mark.parametrize("batch_sizes", [[3, 0, 2], [2, 3], [3, -1], [2, 2, 2]])
def test_malformed_packed_sequences_are_refused(module, batch_sizes):
    rows = 5 if batch_sizes != [2, 2, 2] else 5  # [2, 2, 2] sums to 6, not 5
    packed = PackedSequence(torch.randn(rows, 3), torch.tensor(batch_sizes))
    with pytest.raises(ValueError, match="batch_sizes"):
        module(3, 4)(packed)
