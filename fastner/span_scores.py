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
paths have probability 0 anyway. Each set's partition is one forward pass over the sentence's
emissions with the excluded tags at -inf.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Sequence, Tuple

import numpy
import torch
from torch import Tensor

from fastner import ops

Alternative = Dict[int, List[int]]  # position -> allowed tag ids (unlisted positions: all)
SpanRequest = Tuple[int, int, int, str]  # (row, start, end exclusive, label)

# Spans scored per forward call: bounds the [N, T, K] masked-emission copy.
_CHUNK = 256
_ELEMENTS = 1 << 24  # 64 MB of float32


def span_alternatives(tag_ids: Dict[str, int], start: int, end: int, label: str, length: int) -> List[Alternative]:
    """The disjoint tag-constraint sets whose union is "the decoding contains (start, end, label)"."""
    _check_span(start, end, length)
    relative = _alternatives_of_shape(tuple(tag_ids.items()), label, end - start, start > 0, end < length)
    return [{start + offset: list(tags) for offset, tags in alternative} for alternative in relative]


def _check_span(start: int, end: int, length: int) -> None:
    if not 0 <= start < end <= length:
        raise ValueError(f"span ({start}, {end}) out of range for a sentence of length {length}")


def _alternatives_of_shape(tag_items: Tuple[Tuple[str, int], ...], label: str, size: int, before: bool,
                           after: bool) -> Tuple[Tuple[Tuple[int, Tuple[int, ...]], ...], ...]:
    """The sets depend on a span only through its label, its size and whether a tag comes before
    and after it: built once per such shape (building them per span measured a third of a
    batch's scoring time), with positions relative to the span's start. Spans longer than
    _CACHED_SIZE are rare and big: built each time, so the cache stays small."""
    if size <= _CACHED_SIZE:
        return _cached_alternatives(tag_items, label, size, before, after)
    return _relative_alternatives(tag_items, label, size, before, after)


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


_CACHED_SIZE = 16
_cached_alternatives = functools.lru_cache(maxsize=1024)(_relative_alternatives)


@torch.no_grad()
def relative_to_path(emissions: Tensor, tags: Tensor, lengths: Tensor,
                     scores: Tuple[Tensor, Tensor, Tensor]) -> Tuple[Tensor, Tensor]:
    """(emissions shifted at each position so that the decoded path `tags` [B, T] scores 0, their
    log partitions [B]): what span_log_probabilities and kbest should be given.

    The shift moves every path's score by the same amount, so no probability changes; but a news
    sentence's raw log partition is in the hundreds to thousands, where float32 is exact to ~1e-4,
    and a span's probability (a difference of two of them) came out up to 1e-4 off, different
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


@torch.no_grad()
def span_log_probabilities(emissions: Tensor, lengths: Tensor, log_z: Tensor,
                           scores: Tuple[Tensor, Tensor, Tensor], requests: Sequence[SpanRequest],
                           tag_ids: Dict[str, int]) -> List[float]:
    """log p(span) for each request (row, start, end, label).

    emissions: [B, T, K] float32/float64; lengths: [B] int64; log_z: [B] (the rows' log
    partitions under `scores`); scores: (transitions [K, K], start [K], end [K]) as the CRF uses
    them (constraints as -inf), zeros for a softmax head.
    """
    if not requests:
        return []
    lengths_list = lengths.tolist()
    rows: List[int] = []
    masks: List[Tuple[int, tuple]] = []  # (span start, its relative alternative)
    owner: List[int] = []
    tag_items = tuple(tag_ids.items())
    for number, (row, start, end, label) in enumerate(requests):
        _check_span(start, end, lengths_list[row])
        for alternative in _alternatives_of_shape(tag_items, label, end - start, start > 0, end < lengths_list[row]):
            rows.append(row)
            masks.append((start, alternative))
            owner.append(number)
    K = emissions.shape[2]
    per_alternative: List[Tensor] = [torch.empty(0, dtype=torch.float64)]
    # alternatives per forward call: at most _CHUNK, and at most _ELEMENTS masked emissions
    per_call = max(1, min(_CHUNK, _ELEMENTS // max(1, int(lengths.max()) * K)))
    for begin in range(0, len(rows), per_call):
        chunk_rows = rows[begin : begin + per_call]
        index = torch.tensor(chunk_rows, dtype=torch.long, device=emissions.device)
        chunk_lengths = lengths.index_select(0, index)
        # cut the time axis to the longest sentence of this chunk
        T = int(chunk_lengths.max())
        # every constrained (alternative, position) cleared, then its allowed tags set: two
        # indexed writes per chunk (a pair of writes per position measured most of a small
        # request's scoring time), in numpy: torch's indexing with Python lists took 99 us for
        # one sentence's three spans (12 alternatives, 170 allowed tags), numpy's 21 (1 thread,
        # AMD EPYC Zen 4)
        cleared_n: List[int] = []
        cleared_at: List[int] = []
        set_n: List[int] = []
        set_at: List[int] = []
        set_tag: List[int] = []
        for n, (start, alternative) in enumerate(masks[begin : begin + per_call]):
            for offset, tags in alternative:
                position = start + offset
                cleared_n.append(n)
                cleared_at.append(position)
                set_n.extend([n] * len(tags))
                set_at.extend([position] * len(tags))
                set_tag.extend(tags)
        allowed = numpy.ones((len(chunk_rows), T, K), dtype=bool)
        allowed[cleared_n, cleared_at] = False
        allowed[set_n, set_at, set_tag] = True
        forbidden = torch.from_numpy(~allowed).to(emissions.device)
        masked = emissions.index_select(0, index)[:, :T].masked_fill(forbidden, float("-inf"))
        constrained, _ = ops.crf_forward(masked.contiguous(), None, chunk_lengths, *scores)
        per_alternative.append(constrained.double().cpu())
    constrained = torch.cat(per_alternative)
    total = _logsumexp_by_owner(constrained, owner, len(requests))
    z = log_z.double().cpu()[torch.tensor([r for r, _, _, _ in requests])]
    return (total - z).clamp(max=0.0).tolist()


def _logsumexp_by_owner(values: Tensor, owner: List[int], count: int) -> Tensor:
    """[count]: logsumexp of values[i] over the i with owner[i] == n (-inf where none)."""
    slot: List[int] = []
    members = [0] * count
    for n in owner:
        slot.append(members[n])
        members[n] += 1
    grouped = numpy.full((count, max(members, default=0) or 1), float("-inf"), dtype=numpy.float64)
    grouped[owner, slot] = values.numpy()  # numpy: list indexing, as above
    return torch.logsumexp(torch.from_numpy(grouped), dim=1)


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
