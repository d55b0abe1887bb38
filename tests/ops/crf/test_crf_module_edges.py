"""fastner.nn.CRF at the edges of its input space: no time steps, the meta device, deferred
initialisation (meta, then to_empty), and malformed constructor arguments."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastner.nn
from fastner import ops
from tests import testing

BACKENDS = ("fused", "reference")
LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_first"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_time_steps_decode_to_empty_lists(batch_first, backend):
    # T = 0: every sequence has length 0, which the CRF allows (decoded as []). The empty tags
    # tensor has no data address; decode handed that to the list builder, which refused it.
    crf = fastner.nn.CRF(4, batch_first=batch_first)
    emissions = torch.randn(3, 0, 4) if batch_first else torch.randn(0, 3, 4)
    with testing.backend(backend):
        assert crf.decode(emissions) == [[], [], []]
        assert crf.decode(emissions, mask=torch.zeros(emissions.shape[:2], dtype=torch.bool)) == [[], [], []]
        assert ops.tag_lists(torch.zeros(3, 0, dtype=torch.long), torch.zeros(3, dtype=torch.long)) == [[], [], []]
