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
# Batch-first throughout (emissions: [B, T, K], lengths: int64 [B]); fastner.nn.CRF does the
# layout, mask and constraint handling. transitions / start / end are in the accumulate dtype
# (reference.crf_accumulate_dtype of the emissions' dtype).


def crf_forward(emissions: Tensor, tags: Optional[Tensor], lengths: Tensor, transitions: Tensor,
                start_transitions: Tensor, end_transitions: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Forward algorithm: (log_z [B], gold_score [B], alphas [B, T, K]); differentiable in
    emissions and the three transition tensors (through log_z and gold_score)."""
    if use_fused("crf_forward", emissions.device):
        return torch.ops.fastner.crf_forward(emissions, tags, lengths, transitions,
                                             start_transitions, end_transitions)
    return reference.crf_forward(emissions, tags, lengths, transitions, start_transitions,
                                 end_transitions)


def crf_viterbi(emissions: Tensor, lengths: Tensor, transitions: Tensor,
                start_transitions: Tensor, end_transitions: Tensor) -> Tuple[Tensor, Tensor]:
    """Best path: tags int64 [B, T] (-1 past each length) and its score [B]."""
    if use_fused("crf_viterbi", emissions.device):
        return torch.ops.fastner.crf_viterbi(emissions, lengths, transitions, start_transitions,
                                             end_transitions)
    return reference.crf_viterbi(emissions, lengths, transitions, start_transitions,
                                 end_transitions)


def crf_kbest(emissions: Tensor, lengths: Tensor, transitions: Tensor, start_transitions: Tensor,
              end_transitions: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """The k best paths, best first: tags int64 [B, k, T] and scores [B, k]."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if use_fused("crf_kbest", emissions.device):
        return torch.ops.fastner.crf_kbest(emissions, lengths, transitions, start_transitions,
                                           end_transitions, k)
    return reference.crf_kbest(emissions, lengths, transitions, start_transitions,
                               end_transitions, k)


def crf_marginals(emissions: Tensor, lengths: Tensor, transitions: Tensor,
                  start_transitions: Tensor, end_transitions: Tensor) -> Tensor:
    """Posterior marginals p(y_t = j | x): [B, T, K], zeros past each length."""
    if use_fused("crf_marginals", emissions.device):
        return torch.ops.fastner.crf_marginals(emissions, lengths, transitions, start_transitions,
                                               end_transitions)
    return reference.crf_marginals(emissions, lengths, transitions, start_transitions,
                                   end_transitions)


def _crf_accumulate(emissions: Tensor) -> torch.dtype:
    return reference.crf_accumulate_dtype(emissions.dtype)


def _register_crf() -> None:
    """Fake kernels and the autograd formula of the CRF ops (needs the schemas from fastner._C)."""

    @torch.library.register_fake("fastner::crf_forward")
    def _(emissions, tags, lengths, transitions, start_transitions, end_transitions):
        B, T, K = emissions.shape
        dtype = _crf_accumulate(emissions)
        return (emissions.new_empty(B, dtype=dtype), emissions.new_empty(B, dtype=dtype),
                emissions.new_empty(B, T, K, dtype=dtype))

    @torch.library.register_fake("fastner::crf_backward")
    def _(grad_log_z, grad_gold_score, emissions, tags, lengths, transitions, start_transitions,
          end_transitions, log_z, alphas):
        return (torch.empty_like(emissions), torch.empty_like(transitions),
                torch.empty_like(start_transitions), torch.empty_like(end_transitions))

    @torch.library.register_fake("fastner::crf_viterbi")
    def _(emissions, lengths, transitions, start_transitions, end_transitions):
        B, T, _ = emissions.shape
        return (emissions.new_empty(B, T, dtype=torch.long),
                emissions.new_empty(B, dtype=_crf_accumulate(emissions)))

    @torch.library.register_fake("fastner::crf_kbest")
    def _(emissions, lengths, transitions, start_transitions, end_transitions, k):
        B, T, _ = emissions.shape
        return (emissions.new_empty(B, k, T, dtype=torch.long),
                emissions.new_empty(B, k, dtype=_crf_accumulate(emissions)))

    @torch.library.register_fake("fastner::crf_marginals")
    def _(emissions, lengths, transitions, start_transitions, end_transitions):
        return emissions.new_empty(emissions.shape, dtype=_crf_accumulate(emissions))

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
