"""Vocabularies (word, char, tag) that map strings to ids and save/load as JSON."""
from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

PAD = "<pad>"
UNK = "<unk>"
_DIGIT = re.compile(r"\d")


def normalize_digits(word: str) -> str:
    """Every digit becomes 0, so that numbers share entries ('1996' and '2024' -> '0000')."""
    return _DIGIT.sub("0", word)


class Vocab:
    """A string <-> id table. Specials (padding, unknown) come first, in the order given."""

    def __init__(self, items: Iterable[str] = (), specials: Sequence[str] = (PAD, UNK)):
        self.specials: List[str] = list(specials)
        self.itos: List[str] = []
        self.stoi: Dict[str, int] = {}
        self._code_table: Optional[_CodeTable] = None  # id_codes' translate table, filled as characters come
        for item in list(self.specials) + list(items):
            self.add(item)

    @classmethod
    def from_counts(cls, counts: Counter, min_count: int = 1, specials: Sequence[str] = (PAD, UNK)) -> "Vocab":
        # most frequent first, ties by string: the same data always gives the same ids
        items = [item for item, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if count >= min_count]
        return cls(items, specials)

    def add(self, item: str) -> int:
        index = self.stoi.get(item)
        if index is None:
            index = len(self.itos)
            self.itos.append(item)
            self.stoi[item] = index
            self._code_table = None  # a character's lookup may have changed
        return index

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, item: str) -> bool:
        return item in self.stoi

    def __getitem__(self, item: str) -> int:
        return self.stoi[item]

    @property
    def pad_id(self) -> int:
        return self.stoi[PAD]

    @property
    def unk_id(self) -> Optional[int]:
        return self.stoi.get(UNK)

    def find(self, item: str) -> Optional[int]:
        """The id of `item`, else of its lowercase form, else None."""
        index = self.stoi.get(item)
        return self.stoi.get(item.lower()) if index is None else index

    def lookup(self, item: str) -> int:
        """The id of `item`, else of its lowercase form, else the unknown id."""
        index = self.find(item)
        if index is None:
            index = self.unk_id
            if index is None:
                raise KeyError(f"{item!r} is not in a vocabulary without an unknown entry")
        return index

    def id_codes(self, text: str) -> str:
        """`text` with each character replaced by the character whose code point is that
        character's lookup() id: a word's char ids by one str.translate over a table that
        remembers each character's id, ready to be encoded as int32 bytes (fastner.data.batching).
        ValueError for a character without an id (a vocabulary without an unknown entry) and for
        an id past the Unicode range (a vocabulary of over 1,114,112 entries)."""
        table = self._code_table
        if table is None:
            table = self._code_table = _CodeTable(self)
        return text.translate(table)

    def to_json(self) -> dict:
        return {"specials": self.specials, "itos": self.itos}

    @classmethod
    def from_json(cls, data: dict) -> "Vocab":
        if not isinstance(data, dict) or "itos" not in data or "specials" not in data:
            raise ValueError("vocabulary JSON must be an object with 'specials' and 'itos'")
        specials, itos = data["specials"], data["itos"]
        for name, items in (("specials", specials), ("itos", itos)):
            # a number never equals a token: such a vocabulary would map every word to unknown
            if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
                raise ValueError(f"vocabulary JSON: '{name}' must be a list of strings")
        if itos[: len(specials)] != specials:
            raise ValueError("vocabulary JSON: 'itos' must start with the specials")
        vocab = cls(itos[len(specials):], specials)
        if len(vocab) != len(itos):
            raise ValueError("vocabulary JSON: 'itos' holds duplicate entries")
        return vocab


class _CodeTable(dict):
    """ord(character) -> its id in `vocab`, for str.translate; a character not seen yet is
    looked up, and remembered while the table holds fewer than MAX_ENTRIES (text holding every
    Unicode character must not grow a server's memory by ~100 MB; past the cap a new character
    is looked up each time it comes). Errors are ValueErrors: str.translate leaves a character
    whose lookup raises a LookupError (KeyError included) as it is, which would pass its code
    point off as an id."""

    MAX_ENTRIES = 1 << 16

    def __init__(self, vocab: Vocab):
        super().__init__()
        self.vocab = vocab

    def __missing__(self, code: int) -> int:
        try:
            index = self.vocab.lookup(chr(code))
        except KeyError as err:
            raise ValueError(err.args[0]) from None
        if index >= 0x110000:
            raise ValueError(f"a vocabulary of {len(self.vocab)} entries has ids past the Unicode range; "
                             f"id_codes takes at most 1,114,112")
        if len(self) < self.MAX_ENTRIES:
            self[code] = index
        return index


def word_lookup(words: Vocab, pretrained: Optional[Mapping[str, int]] = None,
                digits_to_zero: bool = False) -> Callable[[str], int]:
    """token -> word id over the open vocabulary a model was trained with.

    Ids below len(words) are rows of the fine-tuned table (the training vocabulary): the exact
    form, then the lowercase form. Then `pretrained` (word -> row of the frozen pretrained table,
    exact form then lowercase form: GloVe is lowercased) gives id len(words) + row. Anything else
    is the unknown id. Digits become 0 first when the model was trained so.
    """
    offset, unk = len(words), words.unk_id

    def lookup(token: str) -> int:
        word = normalize_digits(token) if digits_to_zero else token
        index = words.find(word)
        if index is not None:
            return index
        if pretrained is not None:
            row = pretrained.get(word)
            if row is None:
                row = pretrained.get(word.lower())
            if row is not None:
                return offset + row
        if unk is None:
            raise KeyError(f"{token!r} is not in a vocabulary without an unknown entry")
        return unk

    return lookup
