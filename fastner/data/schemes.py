"""Tag schemes IOB1, IOB2 (BIO) and BIOES (BIOUL), and conversion between them through spans.

A span is (start, end, type) with `end` exclusive. Decoding is lenient, the way taggers read their
own output: a chunk starts at B-/S-, or at an I-/E- that does not continue a chunk of its type;
it ends at E-/S- or where the next token does not continue it.
"""
from __future__ import annotations

from typing import Iterable, List, Sequence, Tuple

Span = Tuple[int, int, str]

# Canonical names and their aliases (BIOUL spells S/E as U/L; BIO is IOB2).
SCHEMES = ("IOB1", "IOB2", "BIOES")
_ALIASES = {"IOB1": "IOB1", "IOB2": "IOB2", "BIO": "IOB2", "BIOES": "BIOES", "BIOUL": "BIOES", "IOBES": "BIOES"}
_UL_TO_ES = {"U": "S", "L": "E"}


def canonical_scheme(scheme: str) -> str:
    name = _ALIASES.get(str(scheme).upper())
    if name is None:
        raise ValueError(f"scheme must be one of IOB1, IOB2 (BIO), BIOES (BIOUL), got {scheme!r}")
    return name


def split_tag(tag: str) -> Tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', ''). U/L (BIOUL) read as S/E."""
    if tag == "O":
        return "O", ""
    prefix, sep, kind = tag.partition("-")
    if not sep or prefix.upper() not in ("B", "I", "E", "S", "U", "L") or not kind:
        raise ValueError(f"malformed tag {tag!r}: expected 'O' or a prefix B/I/E/S/U/L, '-', and a type")
    prefix = prefix.upper()
    return _UL_TO_ES.get(prefix, prefix), kind


def tags_to_spans(tags: Sequence[str]) -> List[Span]:
    """Chunks of a tag sequence in any of the schemes (lenient decoding, see the module doc)."""
    spans: List[Span] = []
    start, kind = None, ""
    prev_prefix, prev_kind = "O", ""
    for position, tag in enumerate(tags):
        if tag == "O" and start is None:  # most tokens: nothing to close or open
            prev_prefix, prev_kind = "O", ""
            continue
        prefix, tag_kind = split_tag(tag)
        continues = prefix in ("I", "E") and prev_prefix in ("B", "I") and prev_kind == tag_kind
        if start is not None and not continues:
            spans.append((start, position, kind))
            start = None
        if prefix != "O" and start is None:
            start, kind = position, tag_kind
        if prefix in ("E", "S") and start is not None:
            spans.append((start, position + 1, kind))
            start = None
            # a chunk closed by E/S cannot be continued by the next I-/E-
            prefix = "E"
        prev_prefix, prev_kind = prefix, tag_kind
    if start is not None:
        spans.append((start, len(tags), kind))
    return spans


def strict_spans(tags: Sequence[str], scheme: str) -> List[Span]:
    """Only the well-formed chunks of `scheme`: IOB2 `B I*`, BIOES `S | B I* E`, IOB1 `(B|I) I*`
    (B only after a chunk of the same type is required by IOB1, but B elsewhere is accepted)."""
    scheme = canonical_scheme(scheme)
    spans: List[Span] = []
    start, kind = None, ""
    for position, tag in enumerate(tags):
        prefix, tag_kind = split_tag(tag)
        if scheme == "BIOES":
            if prefix == "S":
                spans.append((position, position + 1, tag_kind))
                start = None
            elif prefix == "B":
                start, kind = position, tag_kind
            elif prefix == "I":
                if start is None or kind != tag_kind:
                    start = None
            elif prefix == "E":
                if start is not None and kind == tag_kind:
                    spans.append((start, position + 1, kind))
                start = None
            else:
                start = None
            continue
        if prefix in ("E", "S"):
            raise ValueError(f"tag {tag!r} does not belong to scheme {scheme}")
        if start is not None and (prefix != "I" or tag_kind != kind):
            spans.append((start, position, kind))
            start = None
        if prefix == "B" or (prefix == "I" and start is None and scheme == "IOB1"):
            start, kind = position, tag_kind
    if scheme != "BIOES" and start is not None:
        spans.append((start, len(tags), kind))
    return spans


def spans_to_tags(spans: Iterable[Span], length: int, scheme: str) -> List[str]:
    scheme = canonical_scheme(scheme)
    tags = ["O"] * length
    prev_end, prev_kind = -1, None
    for start, end, kind in sorted(spans):
        if not 0 <= start < end <= length:
            raise ValueError(f"span {(start, end, kind)} out of range for a sentence of length {length}")
        if scheme == "BIOES" and end - start == 1:
            tags[start] = f"S-{kind}"
        else:
            for position in range(start, end):
                tags[position] = f"I-{kind}"
            if scheme == "IOB2" or scheme == "BIOES":
                tags[start] = f"B-{kind}"
            elif prev_end == start and prev_kind == kind:
                # IOB1 marks B only where a chunk directly follows one of its own type
                tags[start] = f"B-{kind}"
            if scheme == "BIOES":
                tags[end - 1] = f"E-{kind}"
        prev_end, prev_kind = end, kind
    return tags


def convert_tags(tags: Sequence[str], to_scheme: str) -> List[str]:
    """Re-encode a tag sequence (any scheme) in `to_scheme`."""
    return spans_to_tags(tags_to_spans(tags), len(tags), to_scheme)


def detect_scheme(tag_sequences: Iterable[Sequence[str]]) -> str:
    """BIOES if any S-/E-/U-/L- tag; IOB1 if a chunk ever starts with I-; else IOB2."""
    saw_iob1 = False
    for tags in tag_sequences:
        prev_prefix, prev_kind = "O", ""
        for tag in tags:
            prefix, kind = split_tag(tag)
            if prefix in ("E", "S"):
                return "BIOES"
            if prefix == "I" and not (prev_prefix in ("B", "I") and prev_kind == kind):
                saw_iob1 = True
            prev_prefix, prev_kind = prefix, kind
    return "IOB1" if saw_iob1 else "IOB2"
