"""Linear-chain CRF ops: the Python entry points, fake kernels and autograd formulas.

Batch-first throughout (emissions: [B, T, K], lengths: int64 [B]); fastner.nn.CRF does the
layout, mask and constraint handling. transitions / start / end are in the accumulate dtype
(reference.crf_accumulate_dtype of the emissions' dtype). Each entry point runs the fused kernel
(torch.ops.fastner.crf_*) where the extension serves the device, else fastner.reference. The CPU
kernels read strided (e.g. transposed) emissions and tags; other devices' kernels get
contiguous tensors (csrc/fastner.cpp's conventions).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from fastner import reference, validation
from fastner._extension import extension_loaded, use_fused
from fastner.ops._autograd import (below_autograd, call, needs_grad, reference_backward,
                                     register_autograd_kernel)

REDUCTIONS = ("none", "sum", "mean", "token_mean")
# The tensor arguments' names, in the order the entry points pass them to validation.tensors.
_SCORES = ("emissions", "lengths", "transitions", "start_transitions", "end_transitions")
_WITH_TAGS = _SCORES + ("tags",)


# ---- entry points ----------------------------------------------------------------------------

def crf_forward(emissions: Tensor, tags: Optional[Tensor], lengths: Tensor, transitions: Tensor,
                start_transitions: Tensor, end_transitions: Tensor) -> Tuple[Tensor, Tensor]:
    """Forward algorithm: (log_z [B], gold_score [B]); differentiable in emissions and the three
    transition tensors."""
    scores = (emissions, lengths, transitions, start_transitions, end_transitions)
    if tags is None:
        validation.tensors("crf_forward", _SCORES, scores)
    else:
        validation.tensors("crf_forward", _WITH_TAGS, scores + (tags,))
    if use_fused("crf_forward", emissions.device):
        emissions, tags = _dense_off_cpu(emissions, tags)
        return call(torch.ops.fastner.crf_forward.default, _crf_forward_autograd, emissions, tags,
                    lengths, transitions, start_transitions, end_transitions)
    return reference.crf_forward(emissions, tags, lengths, transitions, start_transitions,
                                 end_transitions)


def crf_log_likelihood(emissions: Tensor, tags: Tensor, lengths: Tensor, transitions: Tensor,
                       start_transitions: Tensor, end_transitions: Tensor, reduction: str,
                       batch_first: bool = True) -> Tensor:
    """log-likelihood of the gold tags, reduced: [B] for 'none', else a scalar ('sum', 'mean'
    over sequences, 'token_mean' over tokens); differentiable like crf_forward.

    emissions: [B, T, K] ([T, B, K] when not batch_first); tags: the same layout without K."""
    validation.tensors("crf_log_likelihood", _WITH_TAGS,
                       (emissions, lengths, transitions, start_transitions, end_transitions, tags))
    return _log_likelihood_of_tensors(emissions, tags, lengths, transitions, start_transitions,
                                      end_transitions, reduction, batch_first)


def _log_likelihood_of_tensors(emissions: Tensor, tags: Tensor, lengths: Tensor,
                               transitions: Tensor, start_transitions: Tensor,
                               end_transitions: Tensor, reduction: str,
                               batch_first: bool = True) -> Tensor:
    """crf_log_likelihood for arguments known to be Tensors (CRF.forward, which checked them)."""
    # The op's value kernel is crf_forward's (any device): fused wherever crf_forward is. Its
    # autograd formula is C++ (csrc/cpu/crf_log_likelihood.cpp), reached through the dispatcher.
    if use_fused("crf_forward", emissions.device):
        op = _OPS.crf_log_likelihood if torch.compiler.is_compiling() else _OPS.eager_crf_log_likelihood
        return op(emissions, tags, lengths, transitions, start_transitions, end_transitions,
                  reduction, batch_first)
    if not batch_first:
        emissions, tags = emissions.transpose(0, 1), tags.transpose(0, 1)
    log_z, gold = reference.crf_forward(emissions, tags, lengths, transitions, start_transitions,
                                        end_transitions)
    return _reduce(gold - log_z, lengths, reduction)


def crf_viterbi(emissions: Tensor, lengths: Tensor, transitions: Tensor,
                start_transitions: Tensor, end_transitions: Tensor) -> Tuple[Tensor, Tensor]:
    """Best path: tags int64 [B, T] (-1 past each length) and its score [B]."""
    validation.tensors("crf_viterbi", _SCORES,
                       (emissions, lengths, transitions, start_transitions, end_transitions))
    return _viterbi_of_tensors(emissions, lengths, transitions, start_transitions, end_transitions)


def _viterbi_of_tensors(emissions: Tensor, lengths: Tensor, transitions: Tensor,
                        start_transitions: Tensor, end_transitions: Tensor) -> Tuple[Tensor, Tensor]:
    """crf_viterbi for arguments known to be Tensors (CRF.decode, which checked them): the
    rest of the checks are the kernel's or the reference's, as for crf_viterbi."""
    if use_fused("crf_viterbi", emissions.device):
        emissions, _ = _dense_off_cpu(emissions)
        op = _OPS.crf_viterbi if torch.compiler.is_compiling() else _OPS.eager_crf_viterbi
        return op(emissions, lengths, transitions, start_transitions, end_transitions)
    return reference.crf_viterbi(emissions, lengths, transitions, start_transitions,
                                 end_transitions)


def crf_kbest(emissions: Tensor, lengths: Tensor, transitions: Tensor, start_transitions: Tensor,
              end_transitions: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """The k best paths, best first: tags int64 [B, k, T] and scores [B, k]."""
    validation.tensors("crf_kbest", _SCORES,
                       (emissions, lengths, transitions, start_transitions, end_transitions))
    validation.crf_k("crf_kbest", k)
    if use_fused("crf_kbest", emissions.device):
        emissions, _ = _dense_off_cpu(emissions)
        return torch.ops.fastner.crf_kbest.default(emissions, lengths, transitions,
                                                   start_transitions, end_transitions, k)
    return reference.crf_kbest(emissions, lengths, transitions, start_transitions,
                               end_transitions, k)


def crf_marginals(emissions: Tensor, lengths: Tensor, transitions: Tensor,
                  start_transitions: Tensor, end_transitions: Tensor) -> Tensor:
    """Posterior marginals p(y_t = j | x): [B, T, K], zeros past each length."""
    validation.tensors("crf_marginals", _SCORES,
                       (emissions, lengths, transitions, start_transitions, end_transitions))
    if use_fused("crf_marginals", emissions.device):
        emissions, _ = _dense_off_cpu(emissions)
        return torch.ops.fastner.crf_marginals.default(emissions, lengths, transitions,
                                                       start_transitions, end_transitions)
    return reference.crf_marginals(emissions, lengths, transitions, start_transitions,
                                   end_transitions)


def crf_window_probabilities(emissions: Tensor, lengths: Tensor, transitions: Tensor,
                             start_transitions: Tensor, end_transitions: Tensor, rows: Tensor,
                             starts: Tensor, allowed: Tensor) -> Tensor:
    """For inference: float64 [N], for each n the probability that sequence rows[n]'s tag path
    keeps to the allowed tags allowed[n, w] at the positions starts[n] + w inside its length
    (positions past it are ignored); NaN for a sequence whose scores hold a NaN or +inf it reads,
    or that has no path. The parts of an entity span's posterior (fastner.span_scores).

    rows: int64 [N] in [0, B); starts: int64 [N], 0 <= starts[n] < lengths[rows[n]];
    allowed: bool [N, W, K], W >= 1. No gradient: ValueError when one could flow.
    """
    arguments = (emissions, lengths, transitions, start_transitions, end_transitions, rows, starts, allowed)
    validation.tensors("crf_window_probabilities", _SCORES + ("rows", "starts", "allowed"), arguments)
    if needs_grad(emissions, transitions, start_transitions, end_transitions):
        raise ValueError("crf_window_probabilities has no gradient (an inference op): call it under "
                         "torch.no_grad()")
    if use_fused("crf_window_probabilities", emissions.device):
        return torch.ops.fastner.crf_window_probabilities.default(*arguments)
    return reference.crf_window_probabilities(*arguments)


def crf_lengths(mask: Tensor, batch_first: bool) -> Tensor:
    """Lengths int64 [B] of a right-padded bool/uint8 mask ([B, T] when batch_first, else
    [T, B]); ValueError when the mask has a gap."""
    validation.tensors("crf_lengths", ("mask",), (mask,))
    return _lengths_of_tensor(mask, batch_first)


def _lengths_of_tensor(mask: Tensor, batch_first: bool) -> Tensor:
    """crf_lengths for a mask known to be a Tensor (the CRF module checked it)."""
    if use_fused("crf_lengths", mask.device):
        op = _OPS.crf_lengths if torch.compiler.is_compiling() else _OPS.eager_crf_lengths
        return op(mask, batch_first)
    return reference.crf_lengths(mask, batch_first)


def tag_lists(tags: Tensor, lengths: Tensor) -> List[List[int]]:
    """Rows of tags [B, T], each cut to its length, as Python lists (CRF.decode's output).

    tags: int64 [B, T]; lengths: int64 [B] in [0, T], on the tags' device (ValueError otherwise).
    """
    validation.tag_lists_args(tags, lengths)
    return _tag_lists_of_valid(tags, lengths)


def _tag_lists_of_valid(tags: Tensor, lengths: Tensor) -> List[List[int]]:
    """tag_lists without its argument checks, for callers whose tags and lengths are valid by
    construction (CRF.decode: crf_viterbi's tags, crf_lengths' or the CRF's own lengths). The
    checks read the lengths' values (min and max: two ops and two host reads), a quarter of a
    small batch's whole decode."""
    B, T = tags.shape
    if T == 0:  # every row is empty, and an empty tensor has no address
        return [[] for _ in range(B)]
    if tags.is_cpu and extension_loaded():
        # The raw helper reads B rows of up to T entries through the addresses: only with the
        # arguments checked above, from contiguous tensors held alive across the call.
        tags, lengths = tags.contiguous(), lengths.contiguous()
        return (_C or _extension_module())._tag_lists_unchecked(tags.data_ptr(), lengths.data_ptr(),
                                                                B, tags.stride(0))
    if tags.device.type == "meta":
        raise ValueError("decode returns Python lists, which need values: tensors on the meta "
                         "device hold none (CRF.viterbi gives the tags as a tensor)")
    return [row[:n] for row, n in zip(tags.tolist(), lengths.tolist())]


# ---- helpers ---------------------------------------------------------------------------------

def _reduce(llh: Tensor, lengths: Tensor, reduction: str) -> Tensor:
    """llh [B] reduced as crf_log_likelihood's `reduction` says (the reference path's)."""
    if reduction == "none":
        return llh
    if reduction == "sum":
        return llh.sum()
    if reduction == "mean":  # over max(B, 1), as the fused op: an empty batch gives 0, not NaN
        return llh.sum() / max(llh.shape[0], 1)
    if reduction == "token_mean":  # a tensor divisor, so that CUDA needs no host sync
        return llh.sum() / lengths.sum().clamp(min=1).to(llh.dtype)
    raise ValueError(f"invalid reduction: {reduction!r} (expected one of {REDUCTIONS})")


def _extension_module():
    """fastner._C (loaded: extension_loaded() said so), without an import statement per call."""
    global _C
    if _C is None:
        from fastner import _C as module

        _C = module
    return _C


_C = None


class _Ops:
    """The ops a training step or a decode calls, looked up once (torch.ops.fastner.<op>.default
    is four attribute lookups, ~0.2 us, per call); set by _register once the extension is loaded.
    <op>: the OpOverload, what torch.compile and torch.export must meet. eager_<op>: the C++
    callable that OpOverload.__call__ forwards to, through a Python frame and a kwargs dict
    (~0.3 us a call): the same dispatcher entry, for eager calls."""

    crf_log_likelihood = crf_viterbi = crf_lengths = None
    eager_crf_log_likelihood = eager_crf_viterbi = eager_crf_lengths = None

    def load(self) -> None:
        for name in ("crf_log_likelihood", "crf_viterbi", "crf_lengths"):
            overload = getattr(torch.ops.fastner, name).default
            setattr(self, name, overload)
            setattr(self, "eager_" + name, getattr(overload, "_op", overload))


_OPS = _Ops()


def _dense_off_cpu(emissions: Tensor, tags: Optional[Tensor] = None):
    # The CPU kernels read strided (transposed) inputs; other devices' kernels get the
    # contiguous tensors csrc/fastner.cpp's conventions promise.
    if emissions.is_cpu:
        return emissions, tags
    return emissions.contiguous(), None if tags is None else tags.contiguous()


def _accumulate(emissions: Tensor) -> torch.dtype:
    return reference.crf_accumulate_dtype(emissions.dtype)


def _gradient_like(emissions: Tensor) -> Tensor:
    # The CPU kernels' grad_emissions (csrc/cpu/crf.cpp, gradient_like): the emissions' own
    # layout where the tag stride is 1 (a time-first caller gets a time-first gradient), else
    # contiguous [B, T, K].
    if emissions.stride(2) == 1:
        return torch.empty_like(emissions)
    return emissions.new_empty(emissions.shape)


# ---- autograd formulas -----------------------------------------------------------------------

class _CRFForward(torch.autograd.Function):
    """crf_forward's autograd: backward is the crf_backward op, from the forward's own inputs
    (each device's kernel recomputes the forward pass it needs)."""

    @staticmethod
    def forward(ctx, emissions, tags, lengths, transitions, start_transitions, end_transitions):
        ctx.set_materialize_grads(False)
        with below_autograd():
            log_z, gold = torch.ops.fastner.crf_forward.default(
                emissions, tags, lengths, transitions, start_transitions, end_transitions)
        ctx.save_for_backward(emissions, tags, lengths, transitions, start_transitions,
                              end_transitions)
        return log_z, gold

    @staticmethod
    def backward(ctx, grad_log_z, grad_gold_score):
        emissions, tags, lengths, transitions, start, end = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiable
            grads = reference_backward(
                lambda e, tr, s, en: reference.crf_forward(e, tags, lengths, tr, s, en),
                (emissions, transitions, start, end), (grad_log_z, grad_gold_score))
            return grads[0], None, None, grads[1], grads[2], grads[3]
        if grad_log_z is None:
            grad_log_z = start.new_zeros(emissions.shape[0])
        if grad_gold_score is None:
            grad_gold_score = start.new_zeros(emissions.shape[0])
        grads = torch.ops.fastner.crf_backward.default(
            grad_log_z, grad_gold_score, emissions, tags, lengths, transitions, start, end)
        return grads[0], None, None, grads[1], grads[2], grads[3]


def _crf_forward_autograd(emissions, tags, lengths, transitions, start_transitions,
                          end_transitions):
    if needs_grad(emissions, transitions, start_transitions, end_transitions):
        return _CRFForward.apply(emissions, tags, lengths, transitions, start_transitions,
                                 end_transitions)
    with below_autograd():
        return torch.ops.fastner.crf_forward.default(emissions, tags, lengths, transitions,
                                                     start_transitions, end_transitions)


# ---- registration ----------------------------------------------------------------------------

def _register() -> None:
    """Fake kernels and autograd formulas of the CRF ops (needs the schemas from fastner._C)."""

    @torch.library.register_fake("fastner::crf_forward")
    def _(emissions, tags, lengths, transitions, start_transitions, end_transitions):
        validation.crf_args("crf_forward", emissions, lengths, transitions, start_transitions,
                            end_transitions, tags, values=False)
        B = emissions.shape[0]
        dtype = _accumulate(emissions)
        return emissions.new_empty(B, dtype=dtype), emissions.new_empty(B, dtype=dtype)

    @torch.library.register_fake("fastner::crf_backward")
    def _(grad_log_z, grad_gold_score, emissions, tags, lengths, transitions, start_transitions,
          end_transitions):
        validation.crf_args("crf_backward", emissions, lengths, transitions, start_transitions,
                            end_transitions, tags, values=False)
        for name, t in (("grad_log_z", grad_log_z), ("grad_gold_score", grad_gold_score)):
            validation.tensor_arg("crf_backward", name, t, shape=(emissions.shape[0],),
                                  device=emissions.device)
        return (_gradient_like(emissions), torch.empty_like(transitions),
                torch.empty_like(start_transitions), torch.empty_like(end_transitions))

    @torch.library.register_fake("fastner::crf_forward_backward")
    def _(emissions, tags, lengths, transitions, start_transitions, end_transitions):
        validation.crf_args("crf_forward_backward", emissions, lengths, transitions,
                            start_transitions, end_transitions, tags, values=False)
        return (emissions.new_empty((), dtype=_accumulate(emissions)),
                _gradient_like(emissions), torch.empty_like(transitions),
                torch.empty_like(start_transitions), torch.empty_like(end_transitions))

    @torch.library.register_fake("fastner::crf_viterbi")
    def _(emissions, lengths, transitions, start_transitions, end_transitions):
        validation.crf_args("crf_viterbi", emissions, lengths, transitions, start_transitions,
                            end_transitions, values=False)
        B, T, _ = emissions.shape
        return (emissions.new_empty(B, T, dtype=torch.long),
                emissions.new_empty(B, dtype=_accumulate(emissions)))

    @torch.library.register_fake("fastner::crf_kbest")
    def _(emissions, lengths, transitions, start_transitions, end_transitions, k):
        validation.crf_args("crf_kbest", emissions, lengths, transitions, start_transitions,
                            end_transitions, values=False)
        validation.crf_k("crf_kbest", k)
        B, T, _ = emissions.shape
        return (emissions.new_empty(B, k, T, dtype=torch.long),
                emissions.new_empty(B, k, dtype=_accumulate(emissions)))

    @torch.library.register_fake("fastner::crf_marginals")
    def _(emissions, lengths, transitions, start_transitions, end_transitions):
        validation.crf_args("crf_marginals", emissions, lengths, transitions, start_transitions,
                            end_transitions, values=False)
        return emissions.new_empty(emissions.shape, dtype=_accumulate(emissions))

    @torch.library.register_fake("fastner::crf_window_probabilities")
    def _(emissions, lengths, transitions, start_transitions, end_transitions, rows, starts, allowed):
        validation.crf_window_args("crf_window_probabilities", emissions, lengths, transitions,
                                   start_transitions, end_transitions, rows, starts, allowed, values=False)
        return emissions.new_empty(rows.shape[0], dtype=torch.float64)

    @torch.library.register_fake("fastner::crf_lengths")
    def _(mask, batch_first):
        validation.crf_mask("crf_lengths", mask)
        return mask.new_empty(mask.shape[0 if batch_first else 1], dtype=torch.long)

    register_autograd_kernel("crf_forward", _crf_forward_autograd)
    _OPS.load()


if extension_loaded():
    _register()
