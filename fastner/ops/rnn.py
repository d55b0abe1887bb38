"""Recurrent-layer ops (LSTM / GRU / RNN): the Python entry point, fake kernels and the autograd
formula of rnn_layer_forward (schemas and argument conventions: csrc/fastner.cpp)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastner import reference, validation
from fastner._extension import extension_loaded, use_fused
from fastner.ops._autograd import (below_autograd, call, needs_grad, reference_backward,
                                     register_autograd_kernel)


def rnn_layer(
    input: Tensor,
    lengths: Tensor,
    weights: list,
    hx: Optional[Tensor] = None,
    cx: Optional[Tensor] = None,
    mode: str = "lstm",
    bidirectional: bool = False,
    batch_first: bool = True,
) -> Tuple[Tensor, Tensor, Tensor]:
    """One LSTM / GRU / RNN layer, both directions, per-sequence lengths.

    input: [B, T, I] if batch_first else [T, B, I]; lengths: int64 [B] (0 <= lengths <= T);
    weights: the layer's flat weights in torch's order (w_ih [G*H, I], w_hh [G*H, H] and, with
    bias, b_ih, b_hh [G*H], direction 0 then 1; w_ih / w_hh may be bfloat16 for float32 input,
    inference only); hx / cx: [D, B, H] or None (zeros);
    mode: 'lstm', 'gru', 'rnn_tanh' or 'rnn_relu'.
    Returns output (input's layout, D*H features, zeros past each length), h_n [D, B, H] and
    c_n ([D, B, H] for lstm, else an empty tensor).
    """
    weights = list(weights)
    if use_fused("rnn_layer_forward", input.device):
        # Inference stores no activations: the workspace is only kept when a gradient can flow.
        training = needs_grad(input, hx, cx, *weights)
        output, h_n, c_n, _ = call(torch.ops.fastner.rnn_layer_forward.default,
                                   _rnn_layer_forward_autograd, input, lengths, weights, hx, cx,
                                   mode, bidirectional, batch_first, training)
        return output, h_n, c_n
    return reference.rnn_layer(input, lengths, weights, hx, cx, mode, bidirectional, batch_first)


def rnn_int8_pack(weight: Tensor, scale: Tensor) -> Tensor:
    """The packed form of one int8 weight, what rnn_layer_int8 takes: weight int8 [N, K] in
    [-63, 63] (fastner.reference.quantize_weight_int8; ValueError naming the first row outside),
    scale float32 [N] -> int8 [reference.int8_packed_bytes(N, K)] (layout: csrc/cpu/rnn_int8.h;
    reference.rnn_int8_unpack reads it back). Pack once, call the layer many times."""
    if use_fused("rnn_int8_pack", weight.device):
        return torch.ops.fastner.rnn_int8_pack.default(weight, scale)
    return reference.rnn_int8_pack(weight, scale)


def rnn_layer_int8(
    input: Tensor,
    lengths: Tensor,
    weights: list,
    hidden_size: int,
    hx: Optional[Tensor] = None,
    cx: Optional[Tensor] = None,
    mode: str = "lstm",
    bidirectional: bool = False,
    batch_first: bool = True,
) -> Tuple[Tensor, Tensor, Tensor]:
    """rnn_layer in int8, inference only: weights as rnn_layer's with w_ih, w_hh int8 and packed
    (rnn_int8_pack of fastner.reference.quantize_weight_int8's weight and scale) and float32
    biases; hidden_size H; input, hx, cx float32 (NaN / +-inf propagate as in float32:
    reference.int8_product). Raises RuntimeError where a gradient could flow (the int8 products
    have none: no silent zero gradients)."""
    weights = list(weights)
    if needs_grad(input, hx, cx, *weights):
        raise RuntimeError(
            "rnn_layer_int8 is inference-only (int8 weights have no gradient): run it under "
            "torch.no_grad() / torch.inference_mode() on inputs that do not require grad, or "
            "train the float module and quantize it afterwards")
    if use_fused("rnn_layer_int8_forward", input.device):
        return torch.ops.fastner.rnn_layer_int8_forward.default(
            input, lengths, weights, hidden_size, hx, cx, mode, bidirectional, batch_first)
    return reference.rnn_layer_int8(input, lengths, weights, hidden_size, hx, cx, mode, bidirectional,
                                    batch_first)


class _RNNLayer(torch.autograd.Function):
    """rnn_layer_forward's autograd: backward is the rnn_layer_backward op, reading the
    workspace the forward kept (training=True)."""

    @staticmethod
    def forward(ctx, input, lengths, mode, bidirectional, batch_first, training, hx, cx, *weights):
        # Unused outputs get no zero gradient from autograd (the workspace's would be ~MBs);
        # backward makes the zeros the backward op needs itself.
        ctx.set_materialize_grads(False)
        with below_autograd():
            output, h_n, c_n, workspace = torch.ops.fastner.rnn_layer_forward.default(
                input, lengths, list(weights), hx, cx, mode, bidirectional, batch_first, training)
        ctx.rnn_args = (mode, bidirectional, batch_first, hx is not None, cx is not None)
        ctx.training = training
        ctx.shapes = (output.shape, h_n.shape, c_n.shape)
        ctx.save_for_backward(input, lengths, workspace, hx, cx, *weights)
        ctx.mark_non_differentiable(workspace)
        return output, h_n, c_n, workspace

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_workspace):
        mode, bidirectional, batch_first, has_hx, has_cx = ctx.rnn_args
        input, lengths, workspace, hx, cx, *weights = ctx.saved_tensors
        if not ctx.training:  # (an empty batch has an empty workspace, and a gradient)
            raise RuntimeError(
                "fastner::rnn_layer_forward ran with training=False (no saved activations); "
                "call it with training=True to differentiate it")
        if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiable
            grads = reference_backward(
                lambda x, h, c, *w: reference.rnn_layer(x, lengths, list(w), h, c, mode, bidirectional,
                                                        batch_first),
                (input, hx, cx, *weights), (grad_output, grad_h_n, grad_c_n if mode == "lstm" else None))
            return (grads[0], None, None, None, None, None, grads[1] if has_hx else None,
                    grads[2] if (has_cx and mode == "lstm") else None, *grads[3:])
        grad_output, grad_h_n, grad_c_n = (
            input.new_zeros(shape) if grad is None else grad
            for grad, shape in zip((grad_output, grad_h_n, grad_c_n), ctx.shapes))
        grad_input, grad_hx, grad_cx, grad_weights = torch.ops.fastner.rnn_layer_backward.default(
            grad_output, grad_h_n, grad_c_n, input, lengths, weights, hx, cx, workspace, mode,
            bidirectional, batch_first)
        return (grad_input, None, None, None, None, None,
                grad_hx if has_hx else None,
                grad_cx if (has_cx and mode == "lstm") else None,
                *grad_weights)


def _rnn_layer_forward_autograd(input, lengths, weights, hx, cx, mode, bidirectional,
                                batch_first, training):
    if needs_grad(input, hx, cx, *weights):
        return _RNNLayer.apply(input, lengths, mode, bidirectional, batch_first, training, hx, cx,
                               *weights)
    with below_autograd():
        return torch.ops.fastner.rnn_layer_forward.default(
            input, lengths, weights, hx, cx, mode, bidirectional, batch_first, training)


def _register() -> None:
    """Fake kernels and the autograd formula of the RNN ops (needs the schemas from fastner._C)."""

    @torch.library.register_fake("fastner::rnn_layer_forward")
    def _(input, lengths, weights, hx, cx, mode, bidirectional, batch_first, training):
        validation.rnn_args("rnn_layer", input, lengths, weights, hx, cx, mode, bidirectional,
                            batch_first, values=False)
        if training and weights[0].dtype == torch.bfloat16:
            validation._fail("rnn_layer", "bfloat16 weights are for inference only (training=False); "
                                          "train in float32 and convert the weights afterwards")
        D = 2 if bidirectional else 1
        H = weights[1].shape[1]
        B, T = (input.shape[0], input.shape[1]) if batch_first else (input.shape[1], input.shape[0])
        output = input.new_empty((B, T, D * H) if batch_first else (T, B, D * H))
        h_n = input.new_empty(D, B, H)
        c_n = input.new_empty(D, B, H) if mode == "lstm" else input.new_empty(0)
        if training:
            from fastner import _C

            # The device's kernels decide the layout (csrc/rnn_layout.h); not mirrored here.
            width = _C.rnn_workspace_width(input.device.type, mode, input.shape[2], H)
            workspace = input.new_empty(D, B * T, width)
        else:
            workspace = input.new_empty(0)
        return output, h_n, c_n, workspace

    @torch.library.register_fake("fastner::rnn_layer_backward")
    def _(grad_output, grad_h_n, grad_c_n, input, lengths, weights, hx, cx, workspace, mode,
          bidirectional, batch_first):
        validation.rnn_args("rnn_layer_backward", input, lengths, weights, hx, cx, mode,
                            bidirectional, batch_first, values=False)
        for name, t in (("grad_output", grad_output), ("workspace", workspace)):
            validation.tensor_arg("rnn_layer_backward", name, t, device=input.device,
                                  owner="the input's")
        D = 2 if bidirectional else 1
        H = weights[1].shape[1]
        B = input.shape[0] if batch_first else input.shape[1]
        grad_cx = input.new_empty(D, B, H) if mode == "lstm" else input.new_empty(0)
        return (torch.empty_like(input), input.new_empty(D, B, H), grad_cx,
                [torch.empty_like(w) for w in weights])

    @torch.library.register_fake("fastner::rnn_layer_int8_forward")
    def _(input, lengths, weights, hidden_size, hx, cx, mode, bidirectional, batch_first):
        validation.rnn_int8_args("rnn_layer_int8", input, lengths, weights, hidden_size, hx, cx, mode,
                                 bidirectional, batch_first, values=False)
        D = 2 if bidirectional else 1
        H = hidden_size
        B, T = (input.shape[0], input.shape[1]) if batch_first else (input.shape[1], input.shape[0])
        output = input.new_empty((B, T, D * H) if batch_first else (T, B, D * H))
        c_n = input.new_empty(D, B, H) if mode == "lstm" else input.new_empty(0)
        return output, input.new_empty(D, B, H), c_n

    @torch.library.register_fake("fastner::rnn_int8_pack")
    def _(weight, scale):
        validation.rnn_int8_pack_args("rnn_int8_pack", weight, scale, values=False)
        return weight.new_empty(reference.int8_packed_bytes(weight.shape[0], weight.shape[1]))

    register_autograd_kernel("rnn_layer_forward", _rnn_layer_forward_autograd)


if extension_loaded():
    _register()
