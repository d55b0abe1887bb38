"""Exact posterior probabilities of decoded entity spans, and k-best analyses, from a CRF's
scores (a softmax head is the same computation with zero transitions: independent tokens).

The probability of a span (start, end, label) is the total probability of the tag paths whose
decoding (fastner.data.schemes.tags_to_spans) contains exactly that span: a constrained
partition function divided by Z. The paths decoding to it are a union of disjoint sets, each
fixing the tags on the span and, where the decoding depends on them, excluding tags just before
(a chunk that an I-/E- would continue) or just after (an I-/E- that would extend it):

    first tag   B-L or S-L: nothing before is excluded; I-L or E-L: the tag before is not B-L/I-L
    last tag    E-L or S-L: nothing after is excluded;  B-L or I-L: the tag after is not I-L/E-L
    inside      I-L

Tags missing from the tag set (S/E in IOB2) drop out; under a constrained CRF the forbidden
paths have probability 0 anyway. Each set is a window of allowed tags (its positions, the tag
before and the tag after), and its probability is the op crf_window_probabilities' (float64).
"""
from __future__ import annotations

import functools
import math
from typing import Dict, List, Sequence, Tuple

import numpy
import torch
from torch import Tensor

from fastner import ops

Alternative = Dict[int, List[int]]  # position -> allowed tag ids (unlisted positions: all)
SpanRequest = Tuple[int, int, int, str]  # (row, start, end exclusive, label)

# Alternatives per crf_window_probabilities call: bounds the reference's masked float64 copy
# [N, T, K] of the emissions (other devices than the CPU).
_ELEMENTS = 1 << 23  # 64 MB of float64


def span_alternatives(tag_ids: Dict[str, int], start: int, end: int, label: str, length: int) -> List[Alternative]:
    """The disjoint tag-constraint sets whose union is "the decoding contains (start, end, label)"."""
    _check_span(start, end, length)
    relative = _relative_alternatives(tuple(tag_ids.items()), label, end - start, start > 0, end < length)
    return [{start + offset: list(tags) for offset, tags in alternative} for alternative in relative]


def _check_span(start: int, end: int, length: int) -> None:
    if not 0 <= start < end <= length:
        raise ValueError(f"span ({start}, {end}) out of range for a sentence of length {length}")


def _relative_alternatives(tag_items: Tuple[Tuple[str, int], ...], label: str, size: int, before: bool,
                           after: bool) -> Tuple[Tuple[Tuple[int, Tuple[int, ...]], ...], ...]:
    tag_ids = dict(tag_items)
    start = 1 if before else 0
    end = start + size
    length = end + (1 if after else 0)

    def ids(*prefixes: str) -> List[int]:
        return [tag_ids[f"{p}-{label}"] for p in prefixes if f"{p}-{label}" in tag_ids]

    open_before = ids("B", "I")  # a tag the span's first I-/E- would continue
    all_ids = sorted(tag_ids.values())
    not_open_before = [t for t in all_ids if t not in open_before]
    not_continuing_after = [t for t in all_ids if t not in ids("I", "E")]
    alternatives: List[Alternative] = []
    for first in ("B", "I", "E", "S"):
        for last in ("B", "I", "E", "S"):
            if end - start == 1 and first != last:
                continue
            if end - start > 1 and (first not in ("B", "I") or last not in ("I", "E")):
                continue
            first_id, last_id = ids(first), ids(last)
            if not first_id or not last_id:
                continue
            constraint: Alternative = {position: ids("I") for position in range(start + 1, end - 1)}
            if any(not allowed for allowed in constraint.values()):
                continue  # no I- tag for a span longer than 2
            constraint[start] = first_id
            constraint[end - 1] = last_id if end - start > 1 else first_id
            if first in ("I", "E") and start > 0:
                constraint[start - 1] = not_open_before
            if last in ("B", "I") and end < length:
                constraint[end] = not_continuing_after
            alternatives.append(constraint)
    return tuple(tuple((position - start, tuple(tags)) for position, tags in alternative.items())
                 for alternative in alternatives)


@torch.no_grad()
def relative_to_path(emissions: Tensor, tags: Tensor, lengths: Tensor,
                     scores: Tuple[Tensor, Tensor, Tensor]) -> Tuple[Tensor, Tensor]:
    """(emissions shifted at each position so that the decoded path `tags` [B, T] scores 0, their
    log partitions [B]): what kbest should be given (span_log_probabilities works in float64 on
    the emissions as they are).

    The shift moves every path's score by the same amount, so no probability changes; but a news
    sentence's raw log partition is in the hundreds to thousands, where float32 is exact to ~1e-4,
    and a path's probability (a difference of two of them) came out up to 1e-4 off, different
    alone and in a batch, below the best path's. Relative to the decoded path the partitions are
    near 0 and the error ~1e-6 (4e-6 over 300 tokens), at float32 speed (float64 forward passes
    instead measured a third more CPU per document). The shift itself is computed in float64."""
    transitions, start, end = (s.double() for s in scores)
    e = emissions.double()
    B, T, K = e.shape
    device = e.device
    lengths = lengths.to(device)
    y = tags[:, :T].to(device, torch.long).clamp(0, K - 1)  # past a row's length: any tag, masked below
    step = e.gather(2, y.unsqueeze(2)).squeeze(2)
    step[:, 1:] += transitions[y[:, :-1], y[:, 1:]]
    step[:, 0] += start[y[:, 0]]
    rows = torch.arange(B, device=device)
    last = (lengths - 1).clamp(min=0)
    step[rows, last] += end[y[rows, last]]
    step = step.masked_fill(torch.arange(T, device=device)[None, :] >= lengths[:, None], 0.0)
    shifted = (e - step.unsqueeze(2)).to(emissions.dtype)
    log_z, _ = ops.crf_forward(shifted, None, lengths, *scores)
    return shifted, log_z


def _window_masks(tag_items: Tuple[Tuple[str, int], ...], label: str, size: int, before: bool,
                  after: bool) -> Tuple[int, numpy.ndarray]:
    """A span shape's alternatives as allowed-tag windows: (lead, allowed bool [A, lead + size +
    after, K], read-only), the window starting `lead` positions before the span (1 where the tag
    before it is constrained by some alternative, else 0); positions an alternative leaves free
    allow every tag."""
    K = len(tag_items)
    lead = 1 if before else 0
    alternatives = _relative_alternatives(tag_items, label, size, before, after)
    allowed = numpy.ones((len(alternatives), lead + size + (1 if after else 0), K), dtype=bool)
    for n, alternative in enumerate(alternatives):
        for offset, tags in alternative:
            allowed[n, lead + offset] = False
            allowed[n, lead + offset, list(tags)] = True
    allowed.flags.writeable = False
    return lead, allowed


# The windows depend on a span only through its label, its size and whether a tag comes before
# and after it: built once per such shape (building the sets per span measured a third of a
# batch's scoring time). Spans longer than _CACHED_SIZE are rare and big: built each time, so
# the cache stays small.
_CACHED_SIZE = 16
_cached_window_masks = functools.lru_cache(maxsize=1024)(_window_masks)


@torch.no_grad()
def span_log_probabilities(emissions: Tensor, lengths: Tensor, scores: Tuple[Tensor, Tensor, Tensor],
                           requests: Sequence[SpanRequest], tag_ids: Dict[str, int]) -> List[float]:
    """log p(span) for each request (row, start, end, label), in float64.

    emissions: [B, T, K]; lengths: [B] int64; scores: (transitions [K, K], start [K], end [K]) as
    the CRF uses them (constraints as -inf), zeros for a softmax head. Each span's alternatives
    (disjoint sets of paths) are windows of allowed tags, scored by crf_window_probabilities
    (each sequence's forward and backward variables once, then a walk over each window) and
    summed.
    """
    if not requests:
        return []
    lengths_list = lengths.tolist()
    rows: List[int] = []
    starts: List[int] = []
    blocks: List[numpy.ndarray] = []  # per request: its alternatives' windows [A, W, K]
    owner: List[int] = []
    tag_items = tuple(tag_ids.items())
    for number, (row, start, end, label) in enumerate(requests):
        length = lengths_list[row]
        _check_span(start, end, length)
        size = end - start
        masks = _cached_window_masks if size <= _CACHED_SIZE else _window_masks
        lead, allowed = masks(tag_items, label, size, start > 0, end < length)
        count = allowed.shape[0]
        rows.extend([row] * count)
        starts.extend([start - lead] * count)
        owner.extend([number] * count)
        blocks.append(allowed)
    probabilities: List[numpy.ndarray] = []
    if rows:
        K = emissions.shape[2]
        width = max(block.shape[1] for block in blocks)
        allowed = numpy.ones((len(rows), width, K), dtype=bool)
        n = 0
        for block in blocks:
            allowed[n : n + block.shape[0], : block.shape[1]] = block
            n += block.shape[0]
        device = emissions.device
        lengths = lengths.to(device)
        windows = torch.from_numpy(numpy.array([rows, starts], dtype=numpy.int64)).to(device)  # [2, N]
        # alternatives per call: the fused kernel takes any number; the reference (other devices)
        # builds a masked float64 copy [N, T, K] of the emissions, bounded to _ELEMENTS
        per_call = max(1, _ELEMENTS // max(1, max(lengths_list) * K))
        for begin in range(0, len(rows), per_call):
            stop = begin + per_call
            probabilities.append(ops.crf_window_probabilities(
                emissions, lengths, *scores, windows[0, begin:stop], windows[1, begin:stop],
                torch.from_numpy(allowed[begin:stop]).to(device)).cpu().numpy())
    # the alternatives are disjoint: a span's probability is their sum (NaN stays NaN)
    totals = (numpy.bincount(owner, weights=numpy.concatenate(probabilities), minlength=len(requests)).tolist()
              if probabilities else [0.0] * len(requests))
    # log 0 = -inf: a span no path decodes to; the sum may pass 1 by a rounding
    return [min(math.log(p), 0.0) if p > 0 else (-math.inf if p == 0 else math.nan) for p in totals]


@torch.no_grad()
def kbest(emissions: Tensor, lengths: Tensor, log_z: Tensor, scores: Tuple[Tensor, Tensor, Tensor],
          k: int) -> Tuple[List[List[List[int]]], List[List[float]]]:
    """The k best tag paths of each row, best first, and their probabilities exp(score - log Z);
    a row with fewer than k possible paths (finite score) returns fewer."""
    tags, path_scores = ops.crf_kbest(emissions, lengths, *scores, k)  # [B, k, T], [B, k]
    log_probabilities = (path_scores.double() - log_z.double()[:, None]).cpu()
    finite = torch.isfinite(log_probabilities).tolist()
    probabilities = log_probabilities.exp().clamp(max=1.0).tolist()
    tags = tags.cpu().tolist()
    paths, probs = [], []
    for row, n in enumerate(lengths.tolist()):
        keep = [i for i in range(k) if finite[row][i]]
        paths.append([tags[row][i][:n] for i in keep])
        probs.append([probabilities[row][i] for i in keep])
    return paths, probs
