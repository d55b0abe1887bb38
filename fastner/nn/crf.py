"""fastner.nn.CRF: a linear-chain CRF, drop-in for torchcrf.CRF (pytorch-crf 0.7.2).

Same constructor, parameters, initialisation, state_dict keys and numbers as torchcrf.CRF;
the scores are computed by the fused kernels (torch.ops.fastner.crf_*) where they serve the
device, else by fastner.reference.
"""
from __future__ import annotations

import operator
from typing import Iterable, List, Mapping, Optional, Sized, Tuple, Union

import torch
from torch import Tensor, nn

from fastner import ops, validation
from fastner.ops import crf as ops_crf
from fastner.nn.constraints import allowed_transitions

__all__ = ["CRF", "allowed_transitions"]

_REDUCTIONS = ("none", "sum", "mean", "token_mean")
_EMISSION_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_MASK_DTYPES = (torch.bool, torch.uint8)
_TAG_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_CONSTRAINT_BUFFERS = ("transition_constraints", "start_constraints", "end_constraints")


class CRF(nn.Module):
    """Linear-chain conditional random field.

    Args:
        num_tags: number of tags K.
        batch_first: whether emissions are [B, T, K] (else [T, B, K], like torchcrf).
        constraints: optional allowed transitions, applied in training and decoding alike:
            (from, to) index pairs as returned by fastner.nn.allowed_transitions (index K is the
            start of a sequence, K + 1 its end), or a bool tensor [K + 2, K + 2] of allowed
            transitions in the same indexing. Forbidden transitions score -inf.

    Parameters (as in torchcrf): transitions [K, K] (transitions[i, j] scores i -> j),
    start_transitions [K], end_transitions [K], initialised uniform(-0.1, 0.1).

    Masks are right-padded, bool or uint8, in the emissions' layout ([B, T] when batch_first,
    else [T, B]); sequences of length 0 are allowed (log-likelihood 0, decoded as []).

    A sequence with no allowed path (every path scores -inf: constraints or -inf scores that
    rule out its length) has log Z = -inf and log-likelihood NaN (-inf minus -inf); decode and
    viterbi give it some in-range path with score -inf, k-best rows of tags -1 and score -inf,
    marginals zeros. Fused and reference paths agree on this.

    A sequence with a NaN or +inf score in its length (a float16 overflow gives +inf; a
    transition score counts from length 2, since a length-1 sequence reads none) has log Z
    NaN, or +inf where it reads no NaN and its +inf meets no -inf score; its log-likelihood
    follows; its emission gradients and the (shared) transition gradients are NaN, so that
    checks for non-finite gradients (torch.amp.GradScaler) see it; viterbi scores it as log Z,
    k-best rows hold tags -1 and that score, marginals are NaN. Fused and reference paths agree
    on CPU and on CUDA (viterbi keeps a path there: which one is no contract).
    """

    def __init__(self, num_tags: int, batch_first: bool = False,
                 constraints: Optional[Union[Iterable[Tuple[int, int]], Tensor]] = None) -> None:
        num_tags = _int_arg("num_tags", num_tags)
        if num_tags <= 0:
            raise ValueError(f"invalid number of tags: num_tags must be positive, got {num_tags}")
        super().__init__()
        self.num_tags = num_tags
        self.batch_first = batch_first
        self.start_transitions = nn.Parameter(torch.empty(num_tags))
        self.end_transitions = nn.Parameter(torch.empty(num_tags))
        self.transitions = nn.Parameter(torch.empty(num_tags, num_tags))
        self._set_constraints(constraints)
        self.reset_parameters()

    def _set_constraints(self, constraints) -> None:
        """The constraint buffers (what a torchcrf.CRF lacks; fastner.nn.convert adds them)."""
        self.has_constraints = constraints is not None
        # The buffers are derived from this host-side matrix (a plain attribute, which moves and
        # casts leave alone) and rebuilt from it after each of them: see _apply.
        self._allowed_transitions = _allowed_matrix(self.num_tags, constraints)
        device = self._parameters["transitions"].device
        # Not persistent: a torchcrf state_dict (which has no such entries) must load as is.
        for name, mask in zip(_CONSTRAINT_BUFFERS, _additive_masks(self._allowed_transitions)):
            self.register_buffer(name, mask.to(device), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # to_empty() (deferred initialisation from the meta device) leaves every buffer
        # uninitialised, and load_state_dict does not restore non-persistent ones: the
        # constraint buffers are recomputed after every move or cast, in its device and dtype.
        allowed = self.__dict__.get("_allowed_transitions")  # absent from CRFs pickled before it
        if allowed is not None:
            for name, mask in zip(_CONSTRAINT_BUFFERS, _additive_masks(allowed)):
                moved = self._buffers[name]
                self._buffers[name] = mask.to(device=moved.device, dtype=moved.dtype)
        return self

    def reset_parameters(self) -> None:
        """Initialise the transition parameters from uniform(-0.1, 0.1), like torchcrf."""
        nn.init.uniform_(self.start_transitions, -0.1, 0.1)
        nn.init.uniform_(self.end_transitions, -0.1, 0.1)
        nn.init.uniform_(self.transitions, -0.1, 0.1)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(num_tags={self.num_tags})"

    # ---- public API ------------------------------------------------------------------------

    def forward(self, emissions: Tensor, tags: Tensor, mask: Optional[Tensor] = None,
                reduction: str = "sum") -> Tensor:
        """Log-likelihood of `tags` given `emissions`.

        emissions: [T, B, K] (or [B, T, K] when batch_first); tags: integer, same layout
        without K; mask: bool/uint8, same layout. Returns [B] for reduction='none', else a
        scalar: 'sum' over sequences, 'mean' over sequences, 'token_mean' over unmasked tokens.
        """
        if reduction not in _REDUCTIONS:
            raise ValueError(f"invalid reduction: {reduction!r} (expected one of {_REDUCTIONS})")
        lengths = self._lengths(emissions, mask)
        tags = self._check_tags(tags, emissions)
        emissions = self._promoted(emissions)
        # In the caller's layout: the op reads either, and no transpose node enters the graph.
        return ops_crf._log_likelihood_of_tensors(emissions, tags, lengths, *self._scores(emissions),
                                                  reduction, self.batch_first)

    def decode(self, emissions: Tensor, mask: Optional[Tensor] = None) -> List[List[int]]:
        """The best tag sequence of each sequence, as lists (torchcrf's decode)."""
        emissions_bf, lengths = self._prepare(emissions, mask)
        # Gradient mode off for the call, as torch.no_grad() does, without its Python context
        # manager (~4 us, a twentieth of a small batch's decode). decode returns lists: it is
        # never traced, so the private switch meets no compiler.
        # (Already off under torch.no_grad / inference_mode: then no switch at all.)
        grad_enabled = torch.is_grad_enabled()
        if grad_enabled:
            torch._C._set_grad_enabled(False)
        try:
            tags, _ = ops_crf._viterbi_of_tensors(emissions_bf, lengths, *self._scores(emissions_bf))
        finally:
            if grad_enabled:
                torch._C._set_grad_enabled(True)
        # crf_viterbi's tags [B, T] and lengths checked by _prepare: valid by construction.
        return ops_crf._tag_lists_of_valid(tags, lengths)

    def viterbi(self, emissions: Tensor, mask: Optional[Tensor] = None,
                k: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """Best paths as tensors, without a host round trip per token.

        k=None: (tags, scores); tags int64 in the emissions' layout ([B, T] when batch_first,
        else [T, B]), -1 past each sequence's length; scores [B].
        k given: the k best paths, best first: tags [B, k, T] and scores [B, k]; where fewer
        than k paths have a finite score the extra rows hold tags -1 and score -inf.
        """
        if k is not None:
            validation.crf_k("viterbi", k)
        emissions_bf, lengths = self._prepare(emissions, mask)
        with torch.no_grad():
            scores_in = self._scores(emissions_bf)
            if k is None:
                tags, scores = ops_crf._viterbi_of_tensors(emissions_bf, lengths, *scores_in)
                return (tags if self.batch_first else tags.t().contiguous()), scores
            return ops.crf_kbest(emissions_bf, lengths, *scores_in, k)

    def log_partition(self, emissions: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """log Z per sequence: [B] (0 for a sequence of length 0); differentiable."""
        emissions_bf, lengths = self._prepare(emissions, mask)
        log_z, _ = ops.crf_forward(emissions_bf, None, lengths, *self._scores(emissions_bf))
        return log_z

    def marginals(self, emissions: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Posterior marginals p(y_t = j | x) in the emissions' layout, zeros past each length
        (float32, or float64 for float64 emissions; no gradient)."""
        emissions_bf, lengths = self._prepare(emissions, mask)
        with torch.no_grad():
            result = ops.crf_marginals(emissions_bf, lengths, *self._scores(emissions_bf))
        return result if self.batch_first else result.transpose(0, 1)

    # ---- helpers ---------------------------------------------------------------------------
    # Kept lean on purpose: at the sizes NER uses, a CRF call costs tens of microseconds, about
    # as much as a handful of Python-level torch ops. Data checks (mask gaps, tag range) happen
    # inside the ops; here only metadata is checked.

    def _scores(self, emissions: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(transitions, start, end) in the accumulate dtype, constraints applied as -inf."""
        dtype = torch.float64 if emissions.dtype == torch.float64 else torch.float32
        # Straight from the parameter dict: Module.__getattr__ costs ~1.4 us a lookup here.
        parameters = self._parameters
        transitions = parameters["transitions"]
        start, end = parameters["start_transitions"], parameters["end_transitions"]
        if transitions.dtype != dtype:
            transitions, start, end = transitions.to(dtype), start.to(dtype), end.to(dtype)
        if self.has_constraints:
            transitions = transitions + self.transition_constraints.to(dtype)
            start = start + self.start_constraints.to(dtype)
            end = end + self.end_constraints.to(dtype)
        return transitions, start, end

    def _prepare(self, emissions: Tensor, mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """Validate; return emissions as a [B, T, K] view and lengths int64 [B]."""
        lengths = self._lengths(emissions, mask)
        emissions = self._promoted(emissions)
        return (emissions if self.batch_first else emissions.transpose(0, 1)), lengths

    def _promoted(self, emissions: Tensor) -> Tensor:
        """Emissions in float64 when the parameters are (crf.double() on float32 emissions):
        torchcrf's sums promote to float64, so its scores are float64 and computed in it."""
        if self._parameters["transitions"].dtype == torch.float64 and emissions.dtype != torch.float64:
            return emissions.to(torch.float64)
        return emissions

    def _lengths(self, emissions: Tensor, mask: Optional[Tensor]) -> Tensor:
        """Validate emissions and mask; return lengths int64 [B]."""
        validation.tensors("CRF", ("emissions",), (emissions,))
        if emissions.dim() != 3:
            raise ValueError(f"emissions must have dimension of 3, got {emissions.dim()}")
        if emissions.shape[2] != self.num_tags:
            raise ValueError(f"expected last dimension of emissions is {self.num_tags}, "
                             f"got {emissions.shape[2]}")
        if emissions.dtype not in _EMISSION_DTYPES:
            raise ValueError(f"emissions must be float32, float64, float16 or bfloat16, "
                             f"got {emissions.dtype}")
        if mask is None:
            B, T = emissions.shape[:2] if self.batch_first else emissions.shape[1::-1]
            return torch.full((B,), T, dtype=torch.long, device=emissions.device)
        _check_beside_emissions("mask", mask, emissions, _MASK_DTYPES, "bool or uint8")
        return ops_crf._lengths_of_tensor(mask, self.batch_first)

    def _check_tags(self, tags: Tensor, emissions: Tensor) -> Tensor:
        """Validate tags' metadata (the ops check their range); return them int64, in the
        emissions' layout."""
        _check_beside_emissions("tags", tags, emissions, _TAG_DTYPES, "an integer tensor")
        return tags if tags.dtype == torch.long else tags.long()


def _check_beside_emissions(name: str, value, emissions: Tensor, dtypes, expected: str) -> None:
    """`value` (mask or tags) must be a Tensor shaped like emissions' first two dimensions, of
    one of `dtypes` (`expected` says which in words), on the emissions' device."""
    validation.tensors("CRF", (name,), (value,))
    if value.shape != emissions.shape[:2]:
        raise ValueError(f"the first two dimensions of emissions and {name} must match, "
                         f"got {tuple(emissions.shape[:2])} and {tuple(value.shape)}")
    if value.dtype not in dtypes:
        raise ValueError(f"{name} must be {expected}, got {value.dtype}")
    if value.device != emissions.device:
        raise ValueError(f"{name} must be on the emissions' device {emissions.device}, "
                         f"got {value.device}")


def _allowed_matrix(num_tags: int, constraints) -> Tensor:
    """bool [K + 2, K + 2] on the CPU: the transitions `constraints` allows (all when None)."""
    size = num_tags + 2
    # device="cpu" throughout: under a `with torch.device("meta")` block this matrix must still
    # hold values (it is what the buffers are rebuilt from).
    if constraints is None:
        return torch.ones(size, size, dtype=torch.bool, device="cpu")
    if isinstance(constraints, Tensor):
        if constraints.shape != (size, size) or constraints.dtype != torch.bool:
            raise ValueError(f"constraints as a tensor must be bool [{size}, {size}] "
                             f"(num_tags + 2 for start and end), got {constraints.dtype} "
                             f"{tuple(constraints.shape)}")
        if constraints.device.type == "meta":
            raise ValueError("constraints as a tensor must hold values, got one on the meta device")
        return constraints.to("cpu", copy=True)
    if isinstance(constraints, (str, bytes, Mapping)) or not isinstance(constraints, Iterable):
        raise TypeError(f"constraints must be (from, to) tag index pairs or a bool tensor "
                        f"[{size}, {size}], got {type(constraints).__name__}")
    allowed = torch.zeros(size, size, dtype=torch.bool, device="cpu")
    for pair in constraints:
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sized) or len(pair) != 2:
            raise TypeError(f"each constraint must be a (from, to) pair of tag indices, got {pair!r}")
        i, j = (_int_arg(f"each index of constraint {pair!r}", index) for index in pair)
        if not (0 <= i < size and 0 <= j < size):
            raise ValueError(f"constraint {pair!r} out of range: indices must lie in "
                             f"[0, {size}) (num_tags is start, num_tags + 1 is end)")
        allowed[i, j] = True
    return allowed


def _int_arg(name: str, value) -> int:
    """`value` as a Python int: an int or an integer-like object (numpy, 0-d tensor); bool is
    refused (True is no tag count or index anyone means)."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")


def _additive_masks(allowed: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Additive masks (0 allowed, -inf forbidden) of an allowed matrix [K + 2, K + 2]:
    transitions [K, K], start [K], end [K]; float32 on the CPU."""
    num_tags = allowed.shape[0] - 2
    additive = torch.zeros(allowed.shape, device="cpu").masked_fill(~allowed, float("-inf"))
    return (additive[:num_tags, :num_tags].clone(), additive[num_tags, :num_tags].clone(),
            additive[:num_tags, num_tags + 1].clone())
