"""Linear over a mask's rows: the tagger's emission layer in inference. The Python entry point
and fake kernel (schema: csrc/fastner.cpp; CPU kernel: csrc/cpu/masked_linear.cpp; reference:
fastner.reference.masked_linear)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastner import reference, validation
from fastner._extension import extension_loaded, use_fused
from fastner.ops._autograd import needs_grad

_KERNEL_DTYPES = (torch.float32, torch.float64)


def masked_linear(input: Tensor, mask: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """output [B, T, K] = input[b, t] @ weight^T + bias where mask[b, t], bias (zeros without
    one) elsewhere, whose input rows are not read: torch.nn.functional.linear over the marked
    rows, for a padded batch whose padding rows would give the bias anyway (zeros in, as an
    encoder's output past each length).

    input: [B, T, I]; mask: bool [B, T]; weight: [K, I]; bias: [K] or None, in the input's dtype.
    No gradient: ValueError when one could flow (train with torch.nn.functional.linear).
    """
    validation.tensors("masked_linear", ("input", "mask", "weight"), (input, mask, weight))
    if needs_grad(input, weight, bias):
        raise ValueError("masked_linear has no gradient (an inference op): call it under torch.no_grad(), "
                         "or use torch.nn.functional.linear to train")
    if input.dtype in _KERNEL_DTYPES and use_fused("masked_linear", input.device):
        return torch.ops.fastner.masked_linear.default(input, mask, weight, bias)
    return reference.masked_linear(input, mask, weight, bias)


def _register() -> None:
    """The fake kernel (needs the schema from fastner._C)."""

    @torch.library.register_fake("fastner::masked_linear")
    def _(input, mask, weight, bias):
        validation.masked_linear_args("masked_linear", input, mask, weight, bias)
        return input.new_empty(input.shape[0], input.shape[1], weight.shape[0])


if extension_loaded():
    _register()
