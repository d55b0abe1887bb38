"""Typed Python entry points to every fastner op.

For each op: the fused kernel (torch.ops.fastner.*) where the extension serves the device,
else the reference in fastner/reference.py. Fused ops get a fake kernel
(torch.library.register_fake, so torch.compile and torch.export trace through them) and, when
trainable, an autograd formula (torch.library.register_autograd) calling their backward op.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastner import reference
from fastner._extension import extension_loaded, use_fused

# =============================================================================================
# Linear-chain CRF
# =============================================================================================


# =============================================================================================
# Helpers shared by the sections (keep this block between them)
# =============================================================================================


# =============================================================================================
# Recurrent layers (LSTM / GRU / RNN)
# =============================================================================================

_RNN_WORKSPACE_WIDTH = {"lstm": 6, "gru": 5, "rnn_tanh": 1, "rnn_relu": 1}  # in units of H


@torch.compiler.assume_constant_result
def _rnn_fused(device_type: str) -> bool:
    # The dispatcher query behind use_fused() is opaque to Dynamo; under torch.compile the
    # backend choice is a constant of the compiled graph.
    return use_fused("rnn_layer_forward", torch.device(device_type))


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
    bias, b_ih, b_hh [G*H], direction 0 then 1); hx / cx: [D, B, H] or None (zeros);
    mode: 'lstm', 'gru', 'rnn_tanh' or 'rnn_relu'.
    Returns output (input's layout, D*H features, zeros past each length), h_n [D, B, H] and
    c_n ([D, B, H] for lstm, else an empty tensor).
    """
    if _rnn_fused(input.device.type):
        weights = list(weights)
        # Inference stores no activations: the workspace is only kept when a gradient can flow.
        training = torch.is_grad_enabled() and (
            input.requires_grad
            or any(w.requires_grad for w in weights)
            or (hx is not None and hx.requires_grad)
            or (cx is not None and cx.requires_grad)
        )
        if training and not torch.compiler.is_compiling():
            # Same op and formula as the registered autograd below, through an
            # autograd.Function: measured per call (tiny layer, CPU time) ~25 us against ~85 us
            # for the register_autograd path. torch.compile and opcheck use the registered one.
            return _RNNLayerFunction.apply(input, lengths, mode, bidirectional, batch_first, hx, cx, *weights)
        output, h_n, c_n, _ = torch.ops.fastner.rnn_layer_forward(
            input, lengths, weights, hx, cx, mode, bidirectional, batch_first, training
        )
        return output, h_n, c_n
    return reference.rnn_layer(input, lengths, list(weights), hx, cx, mode, bidirectional, batch_first)


if extension_loaded() and hasattr(torch.ops.fastner, "rnn_layer_forward"):

    @torch.library.register_fake("fastner::rnn_layer_forward")
    def _rnn_layer_forward_fake(input, lengths, weights, hx, cx, mode, bidirectional, batch_first, training):
        D = 2 if bidirectional else 1
        H = weights[1].shape[1]
        B, T = (input.shape[0], input.shape[1]) if batch_first else (input.shape[1], input.shape[0])
        out_shape = (B, T, D * H) if batch_first else (T, B, D * H)
        output = input.new_empty(out_shape)
        h_n = input.new_empty(D, B, H)
        c_n = input.new_empty(D, B, H) if mode == "lstm" else input.new_empty(0)
        if training:
            workspace = input.new_empty(D, B * T, _RNN_WORKSPACE_WIDTH.get(mode, 1) * H)
        else:
            workspace = input.new_empty(0)
        return output, h_n, c_n, workspace

    @torch.library.register_fake("fastner::rnn_layer_backward")
    def _rnn_layer_backward_fake(
        grad_output, grad_h_n, grad_c_n, input, lengths, weights, hx, cx, workspace, mode, bidirectional, batch_first
    ):
        D = 2 if bidirectional else 1
        H = weights[1].shape[1]
        B = input.shape[0] if batch_first else input.shape[1]
        grad_cx = input.new_empty(D, B, H) if mode == "lstm" else input.new_empty(0)
        return (
            torch.empty_like(input),
            input.new_empty(D, B, H),
            grad_cx,
            [torch.empty_like(w) for w in weights],
        )

    def _rnn_layer_setup_context(ctx, inputs, output):
        input, lengths, weights, hx, cx, mode, bidirectional, batch_first, training = inputs
        ctx.rnn_args = (mode, bidirectional, batch_first, len(weights), hx is not None, cx is not None)
        ctx.save_for_backward(input, lengths, output[3], hx, cx, *weights)

    def _rnn_layer_backward(ctx, grad_output, grad_h_n, grad_c_n, grad_workspace):
        mode, bidirectional, batch_first, n_weights, has_hx, has_cx = ctx.rnn_args
        input, lengths, workspace, hx, cx, *weights = ctx.saved_tensors
        if workspace.numel() == 0:
            raise RuntimeError(
                "fastner::rnn_layer_forward ran with training=False (no saved activations); "
                "call it with training=True to differentiate it"
            )
        grad_input, grad_hx, grad_cx, grad_weights = torch.ops.fastner.rnn_layer_backward(
            grad_output, grad_h_n, grad_c_n, input, lengths, weights, hx, cx, workspace, mode, bidirectional, batch_first
        )
        return (
            grad_input,
            None,
            list(grad_weights),
            grad_hx if has_hx else None,
            grad_cx if (has_cx and mode == "lstm") else None,
            None,
            None,
            None,
            None,
        )

    torch.library.register_autograd(
        "fastner::rnn_layer_forward", _rnn_layer_backward, setup_context=_rnn_layer_setup_context
    )


class _RNNLayerFunction(torch.autograd.Function):
    """Eager-mode autograd of rnn_layer_forward (see rnn_layer): the registered formula's twin."""

    @staticmethod
    def forward(ctx, input, lengths, mode, bidirectional, batch_first, hx, cx, *weights):
        output, h_n, c_n, workspace = torch.ops.fastner.rnn_layer_forward(
            input, lengths, list(weights), hx, cx, mode, bidirectional, batch_first, True
        )
        ctx.rnn_args = (mode, bidirectional, batch_first, hx is not None, cx is not None)
        ctx.save_for_backward(input, lengths, workspace, hx, cx, *weights)
        return output, h_n, c_n

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, grad_c_n):
        mode, bidirectional, batch_first, has_hx, has_cx = ctx.rnn_args
        input, lengths, workspace, hx, cx, *weights = ctx.saved_tensors
        grad_input, grad_hx, grad_cx, grad_weights = torch.ops.fastner.rnn_layer_backward(
            grad_output, grad_h_n, grad_c_n, input, lengths, weights, hx, cx, workspace, mode, bidirectional, batch_first
        )
        return (
            grad_input,
            None,
            None,
            None,
            None,
            grad_hx if has_hx else None,
            grad_cx if (has_cx and mode == "lstm") else None,
            *grad_weights,
        )
