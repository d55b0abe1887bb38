"""Typed Python entry points to every fastner op.

For each op: the fused kernel (torch.ops.fastner.*) where the extension serves the device,
else the reference in fastner/reference.py. Fused ops get a fake kernel
(torch.library.register_fake, so torch.compile and torch.export trace through them) and, when
trainable, an autograd formula (torch.library.register_autograd) calling their backward op.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from fastner import reference, validation
from fastner._extension import extension_loaded, has_kernel, use_fused

# =============================================================================================
# Linear-chain CRF
# =============================================================================================
# Batch-first throughout (emissions: [B, T, K], lengths: int64 [B]); fastner.nn.CRF does the
# layout, mask and constraint handling. transitions / start / end are in the accumulate dtype
# (reference.crf_accumulate_dtype of the emissions' dtype). The fused kernels accept strided
# (e.g. transposed) emissions and tags and make them contiguous themselves.

class _CRFForward(torch.autograd.Function):
    """Eager autograd for fused crf_forward: the same formula as the register_autograd one below,
    without the per-call cost of torch.library's Python autograd wrapper (measured: about half of
    a whole small-batch NLL step). torch.compile traces the registered op instead."""

    @staticmethod
    def forward(ctx, emissions, transitions, start_transitions, end_transitions, tags, lengths):
        ctx.set_materialize_grads(False)
        with _below_autograd():
            log_z, gold, alphas = torch.ops.fastner.crf_forward.default(
                emissions, tags, lengths, transitions, start_transitions, end_transitions)
        ctx.save_for_backward(emissions, tags, lengths, transitions, start_transitions,
                              end_transitions, log_z, alphas)
        ctx.mark_non_differentiable(alphas)
        return log_z, gold, alphas

    @staticmethod
    def backward(ctx, grad_log_z, grad_gold_score, _grad_alphas):
        emissions, tags, lengths, transitions, start, end, log_z, alphas = ctx.saved_tensors
        if grad_log_z is None:
            grad_log_z = torch.zeros_like(log_z)
        if grad_gold_score is None:
            grad_gold_score = torch.zeros_like(log_z)
        grads = torch.ops.fastner.crf_backward.default(
            grad_log_z, grad_gold_score, emissions, tags, lengths, transitions, start, end,
            log_z, alphas)
        return grads[0], grads[1], grads[2], grads[3], None, None


class _CRFLogLikelihood(torch.autograd.Function):
    """Eager autograd of the reduced log-likelihood sum/mean/... of (gold_score - log_z): one
    graph node where a transpose + crf_forward + sub + reduction would make four, each costing
    a few microseconds forward and backward (a whole B=32 NLL step is ~100 us).

    Takes emissions and tags in the caller's layout (time-first when not batch_first) and
    returns the emissions' gradient in that layout, so no view node sits in front of it."""

    @staticmethod
    def forward(ctx, emissions, transitions, start_transitions, end_transitions, tags, lengths,
                reduction, batch_first):
        # (A custom Function's forward runs with grad mode off: the op calls record nothing.)
        ctx.set_materialize_grads(False)
        if not batch_first:
            emissions, tags = emissions.transpose(0, 1), tags.transpose(0, 1)
        emissions, tags = _dense_off_cpu(emissions, tags)
        # A reduced likelihood has the same weight for every sequence, so the gradients can be
        # computed right here in the same pass (crf_forward_backward) and backward only scales
        # them; 'none' and devices without that kernel run crf_backward in backward.
        fused = reduction != "none" and has_kernel("crf_forward_backward", emissions.device.type)
        if fused:
            total, grad_emissions, *grads = torch.ops.fastner.crf_forward_backward.default(
                emissions, tags, lengths, transitions, start_transitions, end_transitions)
            if not batch_first:
                grad_emissions = grad_emissions.transpose(0, 1)
        else:
            log_z, gold, alphas = torch.ops.fastner.crf_forward.default(
                emissions, tags, lengths, transitions, start_transitions, end_transitions)
            llh = gold - log_z
            total = None if reduction == "none" else llh.sum()
        if reduction == "none":
            out, scale = llh, None
        elif reduction == "sum":
            out, scale = total, None
        elif reduction == "mean":
            scale = 1.0 / max(emissions.shape[0], 1)
            out = total * scale
        else:  # token_mean; a tensor, so that CUDA needs no host sync
            tokens = lengths.sum().clamp(min=1).to(total.dtype)
            out, scale = total / tokens, 1.0 / tokens
        ctx.scale, ctx.fused, ctx.batch_first = scale, fused, batch_first
        if fused:
            ctx.save_for_backward(grad_emissions, *grads)
        else:
            ctx.save_for_backward(emissions, tags, lengths, transitions, start_transitions,
                                  end_transitions, log_z, alphas)
        return out

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None, None, None, None, None, None
        if ctx.fused:  # d out = scale * sum_b d(gold_b - log Z_b), computed in forward
            factor = grad if ctx.scale is None else grad * ctx.scale
            grads = torch._foreach_mul(list(ctx.saved_tensors), factor)
            return grads[0], grads[1], grads[2], grads[3], None, None, None, None
        emissions, tags, lengths, transitions, start, end, log_z, alphas = ctx.saved_tensors
        # Per-sequence weight of d llh_b: grad itself ([B] for 'none') or the scalar grad
        # spread over the batch (the kernels read stride-0 tensors as they are).
        if ctx.scale is None and grad.dim() == 0:  # 'sum'
            weight = grad.expand(log_z.shape[0])
        else:
            weight = grad if grad.dim() else (grad * ctx.scale).expand(log_z.shape[0])
        grads = torch.ops.fastner.crf_backward.default(
            -weight, weight, emissions, tags, lengths, transitions, start, end, log_z, alphas)
        grad_emissions = grads[0] if ctx.batch_first else grads[0].transpose(0, 1)
        return grad_emissions, grads[1], grads[2], grads[3], None, None, None, None


def crf_log_likelihood(emissions: Tensor, tags: Tensor, lengths: Tensor, transitions: Tensor,
                       start_transitions: Tensor, end_transitions: Tensor, reduction: str,
                       batch_first: bool = True) -> Tensor:
    """log-likelihood of the gold tags, reduced: [B] for 'none', else a scalar ('sum', 'mean'
    over sequences, 'token_mean' over tokens); differentiable like crf_forward.

    emissions: [B, T, K] ([T, B, K] when not batch_first); tags: the same layout without K."""
    if (use_fused("crf_forward", emissions.device)
            and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and (emissions.requires_grad or transitions.requires_grad
                 or start_transitions.requires_grad or end_transitions.requires_grad)):
        return _CRFLogLikelihood.apply(emissions, transitions, start_transitions,
                                       end_transitions, tags, lengths, reduction, batch_first)
    if not batch_first:
        emissions, tags = emissions.transpose(0, 1), tags.transpose(0, 1)
    log_z, gold, _ = crf_forward(emissions, tags, lengths, transitions, start_transitions,
                                 end_transitions)
    llh = gold - log_z
    if reduction == "sum":
        return llh.sum()
    if reduction == "none":
        return llh
    if reduction == "mean":
        return llh.mean()
    return llh.sum() / lengths.sum().clamp(min=1).to(llh.dtype)


def _dense_off_cpu(emissions: Tensor, tags: Optional[Tensor] = None):
    # The CPU kernels read strided (transposed) inputs; other devices' kernels get the
    # contiguous tensors csrc/fastner.cpp's conventions promise.
    if emissions.device.type == "cpu":
        return emissions, tags
    return emissions.contiguous(), None if tags is None else tags.contiguous()


def _below_autograd():
    guard = getattr(torch._C, "_AutoDispatchBelowAutograd", None)
    return guard() if guard is not None else torch.no_grad()


def crf_forward(emissions: Tensor, tags: Optional[Tensor], lengths: Tensor, transitions: Tensor,
                start_transitions: Tensor, end_transitions: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Forward algorithm: (log_z [B], gold_score [B], alphas [B, T, K]); differentiable in
    emissions and the three transition tensors (through log_z and gold_score)."""
    if use_fused("crf_forward", emissions.device):
        emissions, tags = _dense_off_cpu(emissions, tags)
        if (torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and (emissions.requires_grad or transitions.requires_grad
                     or start_transitions.requires_grad or end_transitions.requires_grad)):
            return _CRFForward.apply(emissions, transitions, start_transitions, end_transitions,
                                     tags, lengths)
        return torch.ops.fastner.crf_forward.default(emissions, tags, lengths, transitions,
                                                     start_transitions, end_transitions)
    return reference.crf_forward(emissions, tags, lengths, transitions, start_transitions,
                                 end_transitions)


def crf_viterbi(emissions: Tensor, lengths: Tensor, transitions: Tensor,
                start_transitions: Tensor, end_transitions: Tensor) -> Tuple[Tensor, Tensor]:
    """Best path: tags int64 [B, T] (-1 past each length) and its score [B]."""
    if use_fused("crf_viterbi", emissions.device):
        emissions, _ = _dense_off_cpu(emissions)
        return torch.ops.fastner.crf_viterbi.default(emissions, lengths, transitions,
                                                     start_transitions, end_transitions)
    return reference.crf_viterbi(emissions, lengths, transitions, start_transitions,
                                 end_transitions)


def tag_lists(tags: Tensor, lengths: Tensor) -> List[List[int]]:
    """Rows of tags [B, T], each cut to its length, as Python lists (CRF.decode's output).

    tags: int64 [B, T]; lengths: int64 [B] in [0, T], on the tags' device (ValueError otherwise).
    """
    validation.tag_lists_args(tags, lengths)
    if tags.device.type == "cpu" and extension_loaded():
        from fastner import _C

        # The raw helper reads B rows of up to T entries through the addresses: only with the
        # arguments checked above, from contiguous tensors held alive across the call.
        tags, lengths = tags.contiguous(), lengths.contiguous()
        return _C._tag_lists_unchecked(tags.data_ptr(), lengths.data_ptr(), tags.shape[0],
                                       tags.stride(0))
    return [row[:n] for row, n in zip(tags.tolist(), lengths.tolist())]


def crf_kbest(emissions: Tensor, lengths: Tensor, transitions: Tensor, start_transitions: Tensor,
              end_transitions: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """The k best paths, best first: tags int64 [B, k, T] and scores [B, k]."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if use_fused("crf_kbest", emissions.device):
        emissions, _ = _dense_off_cpu(emissions)
        return torch.ops.fastner.crf_kbest.default(emissions, lengths, transitions,
                                                   start_transitions, end_transitions, k)
    return reference.crf_kbest(emissions, lengths, transitions, start_transitions,
                               end_transitions, k)


def crf_marginals(emissions: Tensor, lengths: Tensor, transitions: Tensor,
                  start_transitions: Tensor, end_transitions: Tensor) -> Tensor:
    """Posterior marginals p(y_t = j | x): [B, T, K], zeros past each length."""
    if use_fused("crf_marginals", emissions.device):
        emissions, _ = _dense_off_cpu(emissions)
        return torch.ops.fastner.crf_marginals.default(emissions, lengths, transitions,
                                                       start_transitions, end_transitions)
    return reference.crf_marginals(emissions, lengths, transitions, start_transitions,
                                   end_transitions)


def crf_lengths(mask: Tensor, batch_first: bool) -> Tensor:
    """Lengths int64 [B] of a right-padded bool/uint8 mask ([B, T] when batch_first, else
    [T, B]); ValueError when the mask has a gap."""
    if use_fused("crf_lengths", mask.device):
        return torch.ops.fastner.crf_lengths.default(mask, batch_first)
    return reference.crf_lengths(mask, batch_first)


def _crf_accumulate(emissions: Tensor) -> torch.dtype:
    return reference.crf_accumulate_dtype(emissions.dtype)


def _register_crf() -> None:
    """Fake kernels and the autograd formula of the CRF ops (needs the schemas from fastner._C)."""

    @torch.library.register_fake("fastner::crf_forward")
    def _(emissions, tags, lengths, transitions, start_transitions, end_transitions):
        validation.crf_args("crf_forward", emissions, lengths, transitions, start_transitions,
                            end_transitions, tags, values=False)
        B, T, K = emissions.shape
        dtype = _crf_accumulate(emissions)
        # alphas: what the device's crf_backward reads back: [B, T, K] log forward variables
        # on CUDA; on CPU nothing (its backward recomputes the pass, see csrc/cpu/crf.cpp).
        alphas_shape = (0,) if emissions.device.type == "cpu" else (B, T, K)
        return (emissions.new_empty(B, dtype=dtype), emissions.new_empty(B, dtype=dtype),
                emissions.new_empty(alphas_shape, dtype=dtype))

    @torch.library.register_fake("fastner::crf_backward")
    def _(grad_log_z, grad_gold_score, emissions, tags, lengths, transitions, start_transitions,
          end_transitions, log_z, alphas):
        validation.crf_args("crf_backward", emissions, lengths, transitions, start_transitions,
                            end_transitions, tags, values=False)
        for name, t in (("grad_log_z", grad_log_z), ("grad_gold_score", grad_gold_score),
                        ("log_z", log_z)):
            validation.tensor_arg("crf_backward", name, t, shape=(emissions.shape[0],),
                                  device=emissions.device)
        return (emissions.new_empty(emissions.shape), torch.empty_like(transitions),
                torch.empty_like(start_transitions), torch.empty_like(end_transitions))

    @torch.library.register_fake("fastner::crf_forward_backward")
    def _(emissions, tags, lengths, transitions, start_transitions, end_transitions):
        validation.crf_args("crf_forward_backward", emissions, lengths, transitions,
                            start_transitions, end_transitions, tags, values=False)
        return (emissions.new_empty((), dtype=_crf_accumulate(emissions)),
                torch.empty_like(emissions), torch.empty_like(transitions),
                torch.empty_like(start_transitions), torch.empty_like(end_transitions))

    @torch.library.register_fake("fastner::crf_viterbi")
    def _(emissions, lengths, transitions, start_transitions, end_transitions):
        validation.crf_args("crf_viterbi", emissions, lengths, transitions, start_transitions,
                            end_transitions, values=False)
        B, T, _ = emissions.shape
        return (emissions.new_empty(B, T, dtype=torch.long),
                emissions.new_empty(B, dtype=_crf_accumulate(emissions)))

    @torch.library.register_fake("fastner::crf_kbest")
    def _(emissions, lengths, transitions, start_transitions, end_transitions, k):
        validation.crf_args("crf_kbest", emissions, lengths, transitions, start_transitions,
                            end_transitions, values=False)
        if k < 1:
            raise ValueError(f"crf_kbest: k must be >= 1, got {k}")
        B, T, _ = emissions.shape
        return (emissions.new_empty(B, k, T, dtype=torch.long),
                emissions.new_empty(B, k, dtype=_crf_accumulate(emissions)))

    @torch.library.register_fake("fastner::crf_marginals")
    def _(emissions, lengths, transitions, start_transitions, end_transitions):
        validation.crf_args("crf_marginals", emissions, lengths, transitions, start_transitions,
                            end_transitions, values=False)
        return emissions.new_empty(emissions.shape, dtype=_crf_accumulate(emissions))

    @torch.library.register_fake("fastner::crf_lengths")
    def _(mask, batch_first):
        validation.crf_mask("crf_lengths", mask)
        return mask.new_empty(mask.shape[0 if batch_first else 1], dtype=torch.long)

    def setup_context(ctx, inputs, output):
        emissions, tags, lengths, transitions, start_transitions, end_transitions = inputs
        log_z, _, alphas = output
        ctx.save_for_backward(emissions, tags, lengths, transitions, start_transitions,
                              end_transitions, log_z, alphas)

    def backward(ctx, grad_log_z, grad_gold_score, _grad_alphas):
        # alphas are saved activations, not a differentiable result: their gradient is ignored.
        saved = ctx.saved_tensors
        log_z = saved[6]
        if grad_log_z is None:
            grad_log_z = torch.zeros_like(log_z)
        if grad_gold_score is None:
            grad_gold_score = torch.zeros_like(log_z)
        grads = torch.ops.fastner.crf_backward(grad_log_z, grad_gold_score, *saved)
        return grads[0], None, None, grads[1], grads[2], grads[3]

    torch.library.register_autograd("fastner::crf_forward", backward, setup_context=setup_context)


if extension_loaded():
    _register_crf()


# =============================================================================================
# Helpers shared by the sections (keep this block between them)
# =============================================================================================


# =============================================================================================
# Recurrent layers (LSTM / GRU / RNN)
# =============================================================================================

# Width of a workspace row, per device's kernels. CPU (csrc/cpu/rnn.cpp, workspace_width): the
# gate columns (units of H), then the step's input [I] and previous h [H]. CUDA
# (csrc/cuda/kernels/rnn.cuh, workspace_width): gate columns and h, in units of H.
_RNN_WORKSPACE_GATES_CPU = {"lstm": 5, "gru": 4, "rnn_tanh": 1, "rnn_relu": 1}
_RNN_WORKSPACE_WIDTH_CUDA = {"lstm": 6, "gru": 5, "rnn_tanh": 1, "rnn_relu": 1}


def _rnn_workspace_width(mode: str, device: torch.device, input_size: int, hidden: int) -> int:
    if device.type == "cpu":
        return _RNN_WORKSPACE_GATES_CPU.get(mode, 1) * hidden + input_size + hidden
    return _RNN_WORKSPACE_WIDTH_CUDA.get(mode, 1) * hidden


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
    if use_fused("rnn_layer_forward", input.device):
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
        validation.rnn_args("rnn_layer", input, lengths, weights, hx, cx, mode, bidirectional,
                            batch_first, values=False)
        D = 2 if bidirectional else 1
        H = weights[1].shape[1]
        B, T = (input.shape[0], input.shape[1]) if batch_first else (input.shape[1], input.shape[0])
        out_shape = (B, T, D * H) if batch_first else (T, B, D * H)
        output = input.new_empty(out_shape)
        h_n = input.new_empty(D, B, H)
        c_n = input.new_empty(D, B, H) if mode == "lstm" else input.new_empty(0)
        if training:
            width = _rnn_workspace_width(mode, input.device, input.shape[2], H)
            workspace = input.new_empty(D, B * T, width)
        else:
            workspace = input.new_empty(0)
        return output, h_n, c_n, workspace

    @torch.library.register_fake("fastner::rnn_layer_backward")
    def _rnn_layer_backward_fake(
        grad_output, grad_h_n, grad_c_n, input, lengths, weights, hx, cx, workspace, mode, bidirectional, batch_first
    ):
        validation.rnn_args("rnn_layer_backward", input, lengths, weights, hx, cx, mode,
                            bidirectional, batch_first, values=False)
        for name, t in (("grad_output", grad_output), ("workspace", workspace)):
            validation.tensor_arg("rnn_layer_backward", name, t, device=input.device,
                                  owner="the input's")
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
