"""Which tag transitions a tagging scheme allows, for CRF(..., constraints=...)."""
from __future__ import annotations

from typing import AbstractSet, Dict, Iterable, List, Mapping, Sequence, Tuple, Union

__all__ = ["allowed_transitions"]

# Canonical scheme names; BIOUL is BIOES with L (last) for E and U (unit) for S.
_SCHEMES = {"IOB1": "IOB1", "BIO": "BIO", "IOB2": "BIO", "BIOES": "BIOES", "BIOUL": "BIOES"}
_PREFIXES = {"IOB1": "BIO", "BIO": "BIO", "BIOES": "BIESLU"}
_START, _END = "START", "END"


def _split(label: str, scheme: str) -> Tuple[str, str]:
    """('B', 'PER') for 'B-PER', ('O', '') for 'O'; BIOUL's L and U read as E and S."""
    if label == "O":
        return "O", ""
    prefix, sep, entity = label.partition("-")
    if not sep or prefix not in _PREFIXES[scheme] or not entity:
        raise ValueError(f"label {label!r} is not a valid {scheme} label (expected 'O' or "
                         f"one of {sorted(set(_PREFIXES[scheme]))} + '-' + entity type)")
    return {"L": "E", "U": "S"}.get(prefix, prefix), entity


def _allowed(scheme: str, frm: Tuple[str, str], to: Tuple[str, str]) -> bool:
    (fp, fe), (tp, te) = frm, to
    if scheme == "IOB1":
        if fp == _START:
            return tp in ("O", "I")
        if tp == _END:
            return True
        # B-x only separates two adjacent entities of the same type x.
        return tp in ("O", "I") or (tp == "B" and fp in ("B", "I") and fe == te)
    if scheme == "BIO":
        if fp == _START:
            return tp in ("O", "B")
        if tp == _END:
            return True
        return tp in ("O", "B") or (tp == "I" and fp in ("B", "I") and fe == te)
    # BIOES: an entity is S-x alone, or B-x I-x* E-x.
    if fp == _START:
        return tp in ("O", "B", "S")
    if tp == _END:
        return fp in ("O", "E", "S")
    if fp in ("O", "E", "S"):
        return tp in ("O", "B", "S")
    return tp in ("I", "E") and fe == te  # from B-x or I-x


def allowed_transitions(scheme: str, labels: Union[Sequence[str], Mapping[int, str]]
                        ) -> List[Tuple[int, int]]:
    """The (from, to) tag-index pairs `scheme` allows, for CRF(num_tags, constraints=...).

    scheme: 'IOB1', 'BIO' (= 'IOB2'), 'BIOES' or 'BIOUL' (case-insensitive).
    labels: the label of each tag index, as a list or an {index: label} mapping, e.g.
        ['O', 'B-PER', 'I-PER'].
    With K labels, index K stands for the start of a sequence and K + 1 for its end, so
    (K, j) allows starting in tag j and (i, K + 1) allows ending in tag i.
    """
    canonical = _SCHEMES.get(str(scheme).upper())
    if canonical is None:
        raise ValueError(f"scheme must be one of {sorted(_SCHEMES)}, got {scheme!r}")
    if isinstance(labels, (str, bytes, AbstractSet)) or not isinstance(labels, Iterable):
        # A set has no order, and the index of each label is what the pairs are made of.
        raise TypeError(f"labels must be a sequence of labels (index order) or an {{index: "
                        f"label}} mapping, got {type(labels).__name__}")
    if isinstance(labels, Mapping):
        num_tags = len(labels)
        if (any(isinstance(i, bool) or not isinstance(i, int) for i in labels)
                or sorted(labels) != list(range(num_tags))):
            raise ValueError("labels as a mapping must have the keys 0 .. len(labels) - 1")
        names: Dict[int, str] = dict(labels)
    else:
        names = dict(enumerate(labels))
        num_tags = len(names)
    for i, name in names.items():
        if not isinstance(name, str):
            raise TypeError(f"each label must be a str, got {name!r} at index {i}")
    parts = {i: _split(name, canonical) for i, name in names.items()}
    parts[num_tags] = (_START, "")
    parts[num_tags + 1] = (_END, "")
    pairs = []
    for i, frm in parts.items():
        if frm[0] == _END:
            continue
        for j, to in parts.items():
            if to[0] == _START or (frm[0] == _START and to[0] == _END):
                continue
            if _allowed(canonical, frm, to):
                pairs.append((i, j))
    return pairs
