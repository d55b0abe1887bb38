"""Reading and writing CoNLL column files.

One token a line, columns separated by spaces or tabs, a blank line between sentences. Lines
whose first column is `-DOCSTART-` separate documents; they are not sentences and end the
current one.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence

from fastner.data.schemes import split_tag
from fastner.data.textfiles import DataFormatError, check_data_file, utf8_lines

DOCSTART = "-DOCSTART-"
__all__ = ["DOCSTART", "DataFormatError", "Sentence", "read_conll", "split_columns", "write_conll"]

# Columns are separated by ASCII spaces and tabs only, as conlleval splits them (on " "): str.split()
# also cut at no-break spaces (U+00A0), U+2000-U+200A, U+3000, U+001C-U+001F ..., which occur
# inside tokens ("10\u00a0000", names with a no-break space), and read them as extra columns.
_COLUMN_SEPARATOR = re.compile(r"[ \t]+")


def split_columns(line: str) -> List[str]:
    """The columns of a CoNLL line (or the tokens of a tokenised one): split at runs of spaces and
    tabs, ASCII whitespace at either end dropped; [] for a blank line."""
    line = line.strip(" \t\r\n\f\v")
    return _COLUMN_SEPARATOR.split(line) if line else []


@dataclass
class Sentence:
    tokens: List[str]
    tags: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)


def read_conll(
    path: "str | os.PathLike",
    word_column: int = 0,
    tag_column: Optional[int] = -1,
    max_sentences: Optional[int] = None,
    entity_tags: bool = False,
) -> List[Sentence]:
    """Read a CoNLL column file into sentences.

    word_column / tag_column index the columns (split_columns; negative counts from the
    end); tag_column=None reads tokens only. Every token line must have as many columns as the
    first one, so that a shifted column is caught instead of read as a wrong tag.
    entity_tags=True: every tag must be 'O' or PREFIX-TYPE (a malformed one names file and line).
    """
    path = os.fspath(path)
    check_data_file(path)
    sentences: List[Sentence] = []
    tokens: List[str] = []
    tags: List[str] = []
    n_columns: Optional[int] = None

    def flush() -> None:
        if tokens:
            sentences.append(Sentence(list(tokens), list(tags) if tag_column is not None else []))
            tokens.clear()
            tags.clear()

    with open(path, "rb") as handle:
        for line_no, raw in utf8_lines(handle, path):
            columns = split_columns(raw)
            if not columns:
                flush()
            elif columns[0] == DOCSTART:
                flush()
            else:
                if n_columns is None:
                    n_columns = len(columns)
                    for name, index in (("word_column", word_column), ("tag_column", tag_column)):
                        if index is not None and not -n_columns <= index < n_columns:
                            raise DataFormatError(
                                f"{path}:{line_no}: {name}={index} but the line has {n_columns} columns"
                            )
                    if tag_column is not None and n_columns < 2:
                        raise DataFormatError(
                            f"{path}:{line_no}: expected a token and a tag column, got 1 column: {raw.rstrip()!r}"
                        )
                elif len(columns) != n_columns:
                    raise DataFormatError(
                        f"{path}:{line_no}: expected {n_columns} columns like the first token line, "
                        f"got {len(columns)}: {raw.rstrip()!r}"
                    )
                tokens.append(columns[word_column])
                if tag_column is not None and entity_tags:
                    try:
                        split_tag(columns[tag_column])
                    except ValueError as err:
                        raise DataFormatError(f"{path}:{line_no}: {err}") from None
                if tag_column is not None:
                    tags.append(columns[tag_column])
            if max_sentences is not None and len(sentences) >= max_sentences:
                break
    flush()
    if max_sentences is not None:
        sentences = sentences[:max_sentences]
    return sentences


def write_conll(path_or_handle, sentences: Iterable[Sentence], extra: Optional[Sequence[Sequence[str]]] = None) -> None:
    """Write `token tag` lines (plus one extra column per sentence entry when given). A token
    that would not read back as one column (empty, or holding a space, tab or line break: a
    JSONL file's own tokens may) is a ValueError naming it."""

    def emit(handle) -> None:
        for index, sentence in enumerate(sentences):
            for position, token in enumerate(sentence.tokens):
                if split_columns(token) != [token] or "\n" in token or "\r" in token:
                    raise ValueError(f"sentence {index + 1}, token {position + 1} {token!r}: a CoNLL column cannot "
                                     "hold spaces, tabs or line breaks")
                fields = [token]
                if sentence.tags:
                    fields.append(sentence.tags[position])
                if extra is not None:
                    fields.append(extra[index][position])
                handle.write(" ".join(fields) + "\n")
            handle.write("\n")

    if hasattr(path_or_handle, "write"):
        emit(path_or_handle)
    else:
        with open(path_or_handle, "w", encoding="utf-8") as handle:
            emit(handle)
