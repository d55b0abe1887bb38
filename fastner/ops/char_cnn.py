"""Character-CNN op: a word's conv1d over its characters and the maximum over its valid ones.
The Python entry point, fake kernels and the autograd formula (schemas: csrc/fastner.cpp; CPU
kernels: csrc/cpu/char_cnn.cpp; reference: fastner.reference.char_conv_max)."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from fastner import reference, validation
from fastner._extension import extension_loaded, use_fused
from fastner.ops._autograd import below_autograd, call, needs_grad, register_autograd_kernel

_KERNEL_DTYPES = (torch.float32, torch.float64)


def char_conv_max(input: Tensor, valid: Tensor, weight: Tensor, bias: Tensor) -> Tuple[Tensor, Tensor]:
    """(output [N, F], argmax int64 [N, F]): for each word n and filter f, the maximum over the
    valid characters c of conv1d(input^T, weight, bias, padding=W // 2)[n, f, c] and its first
    position; 0 and -1 for a word without valid characters. Differentiable in input, weight and
    bias (the gradient reaches the argmax positions only).

    input: [N, C, I] (N words, C characters, I embedding dims); valid: bool [N, C];
    weight: [F, I, W] (a Conv1d's, W odd); bias: [F].
    """
    if input.dtype in _KERNEL_DTYPES and use_fused("char_conv_max", input.device):
        return call(torch.ops.fastner.char_conv_max.default, _char_conv_max_autograd, input, valid,
                    weight, bias)
    return reference.char_conv_max(input, valid, weight, bias)


def char_embed_conv_max(chars: Tensor, words: Tensor, embedding: Tensor, weight: Tensor, bias: Tensor,
                        pad_id: int) -> Tensor:
    """char_conv_max's output for embedded characters, for inference: output [..., F] = for each
    word n marked in words, char_conv_max(embedding[chars[n]], chars[n] != pad_id, weight,
    bias)[0] (0 for the others, whose chars are not read), computed through the table
    weight[:, :, k] @ embedding[v] (V*W*F*I multiply-adds a call, then W row additions a
    character instead of W*F*I multiply-adds): the floats differ from char_conv_max's in rounding.

    chars: int64 [..., C] (words of C characters), every character of a marked word in [0, V);
    words: bool [...];
    embedding: [V, I]; weight: [F, I, W] (a Conv1d's, W odd); bias: [F]; pad_id: the padding
    character (not a valid position; a neighbour still reads its row, as the convolution does).
    No gradient: ValueError when one could flow (train with char_conv_max).
    """
    if needs_grad(embedding, weight, bias):
        raise ValueError("char_embed_conv_max has no gradient (an inference op): call it under "
                         "torch.no_grad(), or embed and use char_conv_max to train")
    if embedding.dtype in _KERNEL_DTYPES and use_fused("char_embed_conv_max", chars.device):
        return torch.ops.fastner.char_embed_conv_max.default(chars, words, embedding, weight, bias, pad_id)
    return reference.char_embed_conv_max(chars, words, embedding, weight, bias, pad_id)


class _CharConvMax(torch.autograd.Function):
    """char_conv_max's autograd: backward is char_conv_max_backward, from the forward's argmax."""

    @staticmethod
    def forward(ctx, input, valid, weight, bias):
        ctx.set_materialize_grads(False)
        with below_autograd():
            output, argmax = torch.ops.fastner.char_conv_max.default(input, valid, weight, bias)
        ctx.save_for_backward(input, argmax, weight)
        ctx.mark_non_differentiable(argmax)
        return output, argmax

    @staticmethod
    def backward(ctx, grad_output, _grad_argmax):
        if grad_output is None:
            return None, None, None, None
        input, argmax, weight = ctx.saved_tensors
        grad_input, grad_weight, grad_bias = torch.ops.fastner.char_conv_max_backward.default(
            grad_output, input, argmax, weight)
        return grad_input, None, grad_weight, grad_bias


def _char_conv_max_autograd(input, valid, weight, bias):
    if needs_grad(input, weight, bias):
        return _CharConvMax.apply(input, valid, weight, bias)
    with below_autograd():
        return torch.ops.fastner.char_conv_max.default(input, valid, weight, bias)


def _register() -> None:
    """Fake kernels and the autograd formula (needs the schemas from fastner._C)."""

    @torch.library.register_fake("fastner::char_conv_max")
    def _(input, valid, weight, bias):
        validation.char_conv_args("char_conv_max", input, valid, weight, bias)
        N, F = input.shape[0], weight.shape[0]
        return input.new_empty(N, F), input.new_empty(N, F, dtype=torch.long)

    @torch.library.register_fake("fastner::char_conv_max_backward")
    def _(grad_output, input, argmax, weight):
        N, F = input.shape[0], weight.shape[0]
        for name, t in (("grad_output", grad_output), ("argmax", argmax)):
            validation.tensor_arg("char_conv_max_backward", name, t, shape=(N, F), device=input.device,
                                  owner="the input's")
        return (input.new_empty(input.shape), torch.empty_like(weight, memory_format=torch.contiguous_format),
                weight.new_empty(F))

    @torch.library.register_fake("fastner::char_embed_conv_max")
    def _(chars, words, embedding, weight, bias, pad_id):
        validation.char_embed_args("char_embed_conv_max", chars, words, embedding, weight, bias, pad_id,
                                   values=False)
        return embedding.new_empty(*chars.shape[:-1], weight.shape[0])

    register_autograd_kernel("char_conv_max", _char_conv_max_autograd)


if extension_loaded():
    _register()
