"""Dropout masks: the Python entry point and the fake kernel (schema: csrc/fastner.cpp; CPU
kernel: csrc/cpu/dropout.cpp; reference: fastner.reference.dropout_mask). The mask is a
constant of the graph (x * mask differentiates as a product), so the op has no autograd formula."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastner import reference, validation
from fastner._extension import extension_loaded, use_fused


def dropout_mask(input: Tensor, p: float, seed: Optional[int] = None) -> Tensor:
    """[same shape as input] in input's dtype, contiguous: 1 / (1 - p) with probability 1 - p,
    else 0 (p rounded to a multiple of 2^-32); the same seed gives the same mask. seed=None draws
    one from torch's default CPU generator (so torch.manual_seed and a checkpoint's saved RNG
    state make the masks reproducible, as they did torch.rand's)."""
    if seed is None:
        seed = int(torch.randint(-2**63, 2**63 - 1, (), dtype=torch.int64))
    input = input.detach()  # only its shape, dtype and device are read
    if use_fused("dropout_mask", input.device):
        return torch.ops.fastner.dropout_mask.default(input, p, seed)
    return reference.dropout_mask(input, p, seed)


def _register() -> None:
    """The fake kernel (needs the schema from fastner._C)."""

    @torch.library.register_fake("fastner::dropout_mask")
    def _(input, p, seed):
        validation.dropout_args("dropout_mask", input, p, seed)
        return torch.empty_like(input, memory_format=torch.contiguous_format)


if extension_loaded():
    _register()
