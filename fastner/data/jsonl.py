"""Training and evaluation data as JSONL with character-offset entity spans, the way annotation
tools export it, and conversion to and from CoNLL columns.

One JSON object a line, either form:
    {"text": "...", "spans": [{"start": 0, "end": 5, "label": "ORG"}, ...]}    (Prodigy, spaCy)
    {"text": "...", "label": [[0, 5, "ORG"], ...]}                               (doccano)
(`entities` is read like `label`.) The text is split into sentences and tokens with
fastner.text, unless the record gives its tokens, as Prodigy does: "tokens": [{"text", "start",
"end"}, ...] (other keys ignored), each `text[start:end]`, in order; such a record is one
sentence of those tokens, read as given (whitespace-only ones skipped). Each span must start and end on token
boundaries. One that does not is an error naming FILE:LINE and the span, or, with
misaligned="snap", is widened to the tokens it touches. A span across a sentence boundary, or
overlapping another, is always an error.

jsonl_records writes CoNLL sentences this way (the text detokenized, the tokens given), so that
they read back as the same sentences: re-tokenized, 153 of eng.testa's 3,250 came back split or
cut differently and 3 could not be read ('ST. LOUIS' crossed a sentence end).
"""
from __future__ import annotations

import bisect
import json
import os
import re
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

from fastner.data.conll import DataFormatError, Sentence, read_conll
from fastner.data.schemes import spans_to_tags, tags_to_spans
from fastner.data.textfiles import BOM

MISALIGNED = ("reject", "snap")
JSONL_EXTENSIONS = (".jsonl", ".json", ".ndjson")


def _spans_of(record: dict, where: str) -> List[Tuple[int, int, str]]:
    raw = record.get("spans", record.get("label", record.get("entities", [])))
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise DataFormatError(f"{where}: \"spans\"/\"label\" must be a list, got {type(raw).__name__}")
    spans = []
    for item in raw:
        if isinstance(item, dict):
            start, end, label = item.get("start"), item.get("end"), item.get("label")
        elif isinstance(item, (list, tuple)) and len(item) == 3:
            start, end, label = item
        else:
            raise DataFormatError(f"{where}: a span must be {{\"start\", \"end\", \"label\"}} or [start, end, label], "
                                  f"got {item!r}")
        if (isinstance(start, bool) or isinstance(end, bool) or not isinstance(start, int)
                or not isinstance(end, int) or not isinstance(label, str) or not label):
            raise DataFormatError(f"{where}: span {item!r}: start and end must be ints and label a non-empty string")
        spans.append((start, end, label))
    return spans


def given_tokens(record: dict, where: str) -> Optional[List[Tuple[str, int, int]]]:
    """The record's own tokens as (text, start, end), whitespace-only ones left out; None when it
    has none. DataFormatError naming `where` and the token for a malformed one. record["text"]
    must be a str. The one check of given tokens: training reads them here (read_jsonl), tagging
    too (fastner.documents, `fastner tag --input jsonl`)."""
    raw = record.get("tokens")
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise DataFormatError(f"{where}: \"tokens\" must be a list of {{\"text\", \"start\", \"end\"}}, "
                              f"got {type(raw).__name__}")
    text, tokens, previous_end = record["text"], [], 0
    for number, item in enumerate(raw):
        shown = f"{where}: token {number}"
        if not isinstance(item, dict):
            raise DataFormatError(f"{shown}: expected {{\"text\", \"start\", \"end\"}}, got {item!r}")
        token, start, end = item.get("text"), item.get("start"), item.get("end")
        if (not isinstance(token, str) or isinstance(start, bool) or isinstance(end, bool)
                or not isinstance(start, int) or not isinstance(end, int)):
            raise DataFormatError(f"{shown}: \"text\" must be a string and \"start\", \"end\" ints, got {item!r}")
        if not previous_end <= start < end <= len(text):
            raise DataFormatError(f"{shown} [{start}, {end}) must lie in the text ({len(text)} characters), after "
                                  f"the previous token (which ends at {previous_end}), and not be empty")
        if text[start:end] != token:
            raise DataFormatError(f"{shown}: {token!r} is not the text at [{start}, {end}): {text[start:end]!r}")
        previous_end = end
        if token.strip():  # spaCy makes tokens of extra whitespace: they are no words
            tokens.append((token, start, end))
    return tokens


def sentences_from_text(text: str, spans: Sequence[Tuple[int, int, str]], where: str,
                        misaligned: str = "reject",
                        tokens: Optional[Sequence[Tuple[str, int, int]]] = None) -> List[Sentence]:
    """Tag the sentences (IOB2) of `text` with the character spans: its sentences as fastner.text
    tokenizes them, or, given `tokens` ((text, start, end) each), one sentence of those."""
    from fastner.text import model_form, tokenize

    if misaligned not in MISALIGNED:
        raise ValueError(f"misaligned must be one of {MISALIGNED}, got {misaligned!r}")
    sentences = tokenize(text) if tokens is None else [list(tokens)] if tokens else []
    starts = [token[1] for sentence in sentences for token in sentence]
    ends = [token[2] for sentence in sentences for token in sentence]
    owner = [number for number, sentence in enumerate(sentences) for _ in sentence]
    first_token = [0]
    for sentence in sentences:
        first_token.append(first_token[-1] + len(sentence))
    token_spans: List[List[Tuple[int, int, str]]] = [[] for _ in sentences]
    taken: List[Tuple[int, int, int, int, str]] = []
    for start, end, label in spans:
        shown = f"span [{start}, {end}) {label!r}"
        if not 0 <= start < end <= len(text):
            raise DataFormatError(f"{where}: {shown} is out of range for a text of {len(text)} characters")
        shown += f" {text[start:end]!r}"
        first = bisect.bisect_right(ends, start)  # first token ending after start
        last = bisect.bisect_left(starts, end) - 1  # last token starting before end
        if first > last:
            raise DataFormatError(f"{where}: {shown} covers no token (only spaces or separators)")
        aligned = starts[first] == start and ends[last] == end
        if not aligned and misaligned == "reject":
            raise DataFormatError(
                f"{where}: {shown} does not fall on token boundaries (tokens {text[starts[first]:ends[last]]!r} "
                f"at [{starts[first]}, {ends[last]})); fix the span or pass --misaligned snap")
        if owner[first] != owner[last]:
            raise DataFormatError(f"{where}: {shown} crosses a sentence boundary")
        for other in taken:
            if first <= other[1] and other[0] <= last:
                raise DataFormatError(f"{where}: {shown} overlaps span [{other[2]}, {other[3]}) {other[4]!r}")
        taken.append((first, last, start, end, label))
        sentence = owner[first]
        token_spans[sentence].append((first - first_token[sentence], last + 1 - first_token[sentence], label))
    # tokens cut from raw text are read in the model's form, as prediction on raw text reads them;
    # given tokens as given, like CoNLL columns and token lists (model_form would turn CoNLL's
    # "`LOST" into "'LOST")
    form = model_form if tokens is None else (lambda token: token)
    return [Sentence([form(t) for t, _, _ in sentence], spans_to_tags(found, len(sentence), "IOB2"))
            for sentence, found in zip(sentences, token_spans)]


def iter_jsonl_records(path: str) -> Iterator[Tuple[int, dict]]:
    """(line number, object) of each non-blank line; DataFormatError on bytes, JSON or shape."""
    from fastner.data.textfiles import utf8_lines

    with open(path, "rb") as handle:
        for number, line in utf8_lines(handle, path):
            if line.strip():
                yield number, parse_text_record(line, f"{path}:{number}")


def parse_text_record(line: str, where: str) -> dict:
    """One JSONL line as an object with a "text" string; DataFormatError naming `where` otherwise."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{where}: not valid JSON: {err.msg}") from None
    # an integer of too many digits (ValueError), arrays nested too deep (RecursionError): they
    # were a message without the file, and a traceback
    except (ValueError, RecursionError) as err:
        raise DataFormatError(f"{where}: not valid JSON: {err}") from None
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: expected a JSON object with \"text\", got {type(record).__name__}")
    if not isinstance(record.get("text"), str):
        raise DataFormatError(f"{where}: the object has no \"text\" string")
    if "\\u" in line:  # only an escape can make a lone surrogate (the line itself is UTF-8)
        try:
            json.dumps(record, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as err:
            # no character: writing it (tokens, a converted file, vocab.json) failed later with
            # "'utf-8' codec can't encode", naming no file
            raise DataFormatError(f"{where}: \\u{ord(err.object[err.start]):04x} is half of a surrogate pair, "
                                  "not a character") from None
    return record


def read_jsonl(path: "str | os.PathLike", misaligned: str = "reject",
               max_sentences: Optional[int] = None) -> List[Sentence]:
    """Sentences (tokens and IOB2 tags) of a JSONL span file."""
    from fastner.data.textfiles import check_data_file

    path = os.fspath(path)
    check_data_file(path)
    sentences: List[Sentence] = []
    for number, record in iter_jsonl_records(path):
        where = f"{path}:{number}"
        sentences.extend(sentences_from_text(record["text"], _spans_of(record, where), where, misaligned,
                                             given_tokens(record, where)))
        if max_sentences is not None and len(sentences) >= max_sentences:
            return sentences[:max_sentences]
    return sentences


# what a JSON object starts with: `{` then a key or `}`; a CoNLL file may start with the token `{`
_JSON_OBJECT_START = re.compile(rb'\{\s*["}]')


def is_jsonl(path: str) -> bool:
    """By extension (.jsonl, .json, .ndjson), else by content: the file starts (after blanks) as a
    JSON object does, `{` then `"` or `}`."""
    if path.lower().endswith(JSONL_EXTENSIONS):
        return True
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return False
    # a byte-order mark (Windows editors write one) is not content: utf8_lines drops it too
    return _JSON_OBJECT_START.match(head.removeprefix(BOM.encode("utf-8")).lstrip()) is not None


def read_data(path: "str | os.PathLike", word_column: int = 0, tag_column: int = -1,
              max_sentences: Optional[int] = None, misaligned: str = "reject",
              entity_tags: bool = False) -> List[Sentence]:
    """A CoNLL or a JSONL span file, told apart by is_jsonl(); entity_tags as in read_conll."""
    path = os.fspath(path)
    if os.path.isfile(path) and is_jsonl(path):
        return read_jsonl(path, misaligned, max_sentences)
    return read_conll(path, word_column=word_column, tag_column=tag_column, max_sentences=max_sentences,
                      entity_tags=entity_tags)


def jsonl_records(sentences: Iterable[Sentence]) -> Iterator[dict]:
    """One {"text", "spans", "tokens"} record per sentence: the text detokenized (fastner.text),
    the tokens given, so that the record reads back as this sentence."""
    from fastner.text import detokenize

    for sentence in sentences:
        text, offsets = detokenize(sentence.tokens)
        spans = [{"start": offsets[s][0], "end": offsets[e - 1][1], "label": label}
                 for s, e, label in tags_to_spans(sentence.tags)] if sentence.tags else []
        tokens = [{"text": token, "start": start, "end": end} for token, (start, end) in zip(sentence.tokens, offsets)]
        yield {"text": text, "spans": spans, "tokens": tokens}
