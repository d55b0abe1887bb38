"""`fastner tag`: reading documents and sentences from files, directories and stdin, and
writing results as they come (conll, jsonl, json, spans), with a progress bar on stderr.

Inputs (--input):
  text    each FILE is one document; a DIR is every *.txt file under it (sorted), one document
          each, its id the path relative to DIR; `-` (or no FILE) reads stdin as one document
  tokens  one tokenised sentence a line, tokens separated by spaces or tabs (as CoNLL columns)
  conll   CoNLL columns (tokens in --word-column), a blank line between sentences
  jsonl   one JSON object a line: {"id": ..., "text": ...} (id optional, kept in the output);
          with "tokens": [{"text", "start", "end"}, ...] (what `fastner convert` and Prodigy
          write) exactly those tokens are tagged, as one sentence (fastner.documents), checked
          here so that a malformed token is an error naming FILE:LINE
Every input is decoded as UTF-8; a bad byte, a malformed JSON line or a line that is not an
object is a DataFormatError naming FILE:LINE.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import re
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import IO, Callable, Iterable, Iterator, List, Optional, Sequence, Union

from fastner.data.conll import DOCSTART, DataFormatError, split_columns
from fastner.data.jsonl import given_tokens, parse_text_record
from fastner.data.textfiles import BOM, check_data_file, utf8_lines

INPUTS = ("text", "tokens", "conll", "jsonl")
OUTPUTS = ("conll", "jsonl", "json", "spans")
STDIN = "-"


@dataclass
class Item:
    """One document (text, or a {"text", "tokens"} record) or one pre-tokenized sentence (tokens),
    with where it came from."""
    id: Optional[Union[str, int]]
    payload: Union[str, dict, List[str]]


def _decode(data: bytes, name: str) -> str:
    """A whole document; bad bytes are reported like utf8_lines reports them (NAME:LINE)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        for _ in utf8_lines(io.BytesIO(data), name, records=False):  # raises, naming the line and column
            pass
        raise
    return text[1:] if text.startswith(BOM) else text


def _open_input(path: str) -> IO[bytes]:
    """A file, or stdin (STDIN), as a binary stream the caller closes.

    stdin is read through a reader of its own, over a duplicate of its descriptor: the items
    are read on fastner tag's reader thread (arrived_groups), which waits inside the read while
    a live source is quiet, holding that reader's lock. Were it sys.stdin.buffer, an exit in
    that moment (Ctrl-C, an error in the model) aborted the interpreter ("Fatal Python error:
    could not acquire lock for <_io.BufferedReader name='<stdin>'> at interpreter shutdown");
    nothing at exit touches a private reader. A replaced sys.stdin without a descriptor (tests)
    is read whole into a copy (encoded back if it is text-only), so that closing it leaves
    sys.stdin open."""
    if path != STDIN:
        return open(path, "rb")
    try:
        descriptor = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        buffer = getattr(sys.stdin, "buffer", None)
        return io.BytesIO(buffer.read() if buffer is not None else sys.stdin.read().encode("utf-8"))
    return os.fdopen(os.dup(descriptor), "rb")


def _lines(path: str) -> Iterator[tuple]:
    """(line number, decoded line without its newline) of a file or stdin, read lazily."""
    with contextlib.closing(_open_input(path)) as handle:
        name = "<stdin>" if path == STDIN else path
        for number, line in utf8_lines(handle, name):
            yield number, line.rstrip("\r\n")


def _text_files(paths: Sequence[str]) -> Iterator[tuple]:
    """(id, path) of every document: files as given, directories expanded to their .txt files."""
    for path in paths:
        if path == STDIN:
            yield None, STDIN
        elif os.path.isdir(path):
            found = sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                           for name in names if name.endswith(".txt"))
            if not found:
                raise DataFormatError(f"{path}: a directory without .txt files")
            for file in found:
                yield os.path.relpath(file, path), file
        else:
            check_data_file(path, "input file")
            yield path, path


def read_items(paths: Sequence[str], kind: str, word_column: int = 0) -> Iterator[Item]:
    """Documents (text, jsonl) or sentences (tokens, conll) from every path, lazily."""
    paths = list(paths) or [STDIN]
    if kind == "text":
        for doc_id, path in _text_files(paths):
            with contextlib.closing(_open_input(path)) as handle:
                data = handle.read()
            yield Item(doc_id, _decode(data, "<stdin>" if path == STDIN else path))
        return
    for path in paths:
        if path != STDIN:
            check_data_file(path, "input file")
        name = "<stdin>" if path == STDIN else path
        if kind == "tokens":
            for number, line in _lines(path):
                yield Item(number, split_columns(line))
        elif kind == "conll":
            yield from _conll_sentences(path, name, word_column)
        elif kind == "jsonl":
            for number, line in _lines(path):
                if line.strip():
                    where = f"{name}:{number}"
                    record = parse_text_record(line, where)
                    # checked as read, to name the line; predict checks them again, the same way
                    tokens = given_tokens(record, where)
                    payload = record["text"] if tokens is None else {"text": record["text"], "tokens": record["tokens"]}
                    yield Item(record.get("id", number), payload)
        else:
            raise ValueError(f"--input must be one of {', '.join(INPUTS)}, got {kind!r}")


def _conll_sentences(path: str, name: str, word_column: int) -> Iterator[Item]:
    tokens: List[str] = []
    start = 1
    for number, line in _lines(path):
        columns = split_columns(line)
        if not columns or columns[0] == DOCSTART:
            if tokens:
                yield Item(start, tokens)
                tokens = []
            continue
        if not -len(columns) <= word_column < len(columns):
            raise DataFormatError(f"{name}:{number}: --word-column {word_column} but the line has {len(columns)} columns")
        if not tokens:
            start = number
        tokens.append(columns[word_column])
    if tokens:
        yield Item(start, tokens)


# ---- writing ----------------------------------------------------------------------------------

# A tab, or anything str.splitlines() ends a line at (\r, \x85, \u2028, ...): inside a spans
# field it would split the line or the record for readers of the tab-separated lines.
_FIELD_BREAKS = re.compile("[\t\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


# Whitespace inside a token: raw text's tokens have none, but a JSONL record's own tokens may
# ("New York", "a\tb"); in a `token tag` line it would make more columns or lines.
_CONLL_BLANKS = re.compile(r"\s")


def conll_token(token: str) -> str:
    """`token` as one column of a CoNLL line (`token tag`, `token gold guess`): whitespace as _."""
    return _CONLL_BLANKS.sub("_", token)


def _one_field(text: str) -> str:
    """`text` as one tab-separated field on one line: its tabs and line breaks as spaces (the
    offsets beside it still point into the original)."""
    return _FIELD_BREAKS.sub(" ", text)


class Writer:
    """Writes results one by one in the chosen format."""

    def __init__(self, out: IO[str], fmt: str):
        if fmt not in OUTPUTS:
            raise ValueError(f"--output must be one of {', '.join(OUTPUTS)}, got {fmt!r}")
        self.out, self.fmt, self.count = out, fmt, 0

    def write(self, item: Item, result: dict) -> None:
        out, fmt = self.out, self.fmt
        is_document = "entities" in result
        if fmt == "conll":
            if is_document:
                if self.count:
                    out.write(f"{DOCSTART} O\n\n")
                for sentence in result["sentences"]:
                    for token, tag in zip(sentence["tokens"], sentence["tags"]):
                        out.write(f"{conll_token(token)} {tag}\n")
                    out.write("\n")
            else:
                for token, tag in zip(result["tokens"], result["tags"]):
                    out.write(f"{token} {tag}\n")
                out.write("\n")
        elif fmt in ("jsonl", "json"):
            record = {"id": item.id, **result} if item.id is not None else result
            line = json.dumps(record, ensure_ascii=False)
            if fmt == "json":
                out.write(("[\n" if self.count == 0 else ",\n") + line)
            else:
                out.write(line + "\n")
        else:  # spans: id, start, end, label, score, text; tab-separated
            doc_id = "" if item.id is None else _one_field(str(item.id))
            if is_document:
                for e in result["entities"]:
                    text = _one_field(e["text"])
                    out.write(f"{doc_id}\t{e['start']}\t{e['end']}\t{e['label']}\t{e['score']:.6f}\t{text}\n")
            else:
                for s in result["spans"]:
                    text = _one_field(s["text"])
                    out.write(f"{doc_id}\t{s['start']}\t{s['end']}\t{s['type']}\t{s['confidence']:.6f}\t{text}\n")
        self.count += 1

    def flush(self) -> None:
        self.out.flush()

    def close(self) -> None:
        if self.fmt == "json":
            self.out.write("[]\n" if self.count == 0 else "\n]\n")
        self.out.flush()


def tokens_in(result: dict) -> int:
    if "sentences" in result:
        return sum(len(s["tokens"]) for s in result["sentences"])
    return len(result["tokens"])


def tag_stream(tagger, items: Iterable[Item], writer: Writer, batch_size: int, nbest: Optional[int],
               progress: bool) -> int:
    """Tag items as they are read and write (and flush) each group's results as soon as the
    model has them; returns the count."""
    from fastner.documents import sentence_estimate, stream_budget

    bar = None
    if progress:
        from tqdm import tqdm

        # delay: short runs finish before a bar appears
        bar = tqdm(unit=" docs", file=sys.stderr, dynamic_ncols=True, mininterval=0.5, delay=1.0)
    tokens = 0
    try:
        weigh = lambda item: sentence_estimate(item.payload)  # noqa: E731
        for group in arrived_groups(items, stream_budget(batch_size), weigh):
            results = tagger.predict([item.payload for item in group], batch_size=batch_size, nbest=nbest)
            for item, result in zip(group, results):
                writer.write(item, result)
                if bar is not None:
                    tokens += tokens_in(result)
                    bar.update(1)
            writer.flush()  # a reader at the other end of a pipe sees this group now
            if bar is not None:
                elapsed = bar.format_dict["elapsed"] or 1e-9
                bar.set_postfix_str(f"{tokens / elapsed:,.0f} tokens/s", refresh=False)
    finally:
        if bar is not None:
            bar.close()
    writer.close()
    return writer.count


@dataclass
class _End:
    """The reader's last queue entry: the input ended, or reading it raised `error`."""
    error: Optional[BaseException] = None


def arrived_groups(items: Iterable[Item], budget: int, weigh: Callable[[Item], int]) -> Iterator[List[Item]]:
    """The items in groups of what has been read so far: wait for one item, then add those
    already read, while the group weighs less than `budget` (weigh(item) each).

    A thread reads `items` ahead into a bounded queue. From a file the queue fills while the
    model runs and groups reach the budget (full, length-sorted batches); from a live source (a
    pipe fed by a news feed, a terminal) a group is what has arrived, so that a document is
    tagged when it comes, not when a full group has come or the input has ended. An error
    raised while reading (FILE:LINE) is raised here after the items read before it."""
    read_ahead: "queue.Queue" = queue.Queue(maxsize=max(budget, 1))
    stop = threading.Event()  # the consumer is gone: the reader stops at its next item

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                read_ahead.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            put(_End(err))
            return
        put(_End())

    threading.Thread(target=read, name="fastner-tag-reader", daemon=True).start()
    try:
        end: Optional[_End] = None
        while end is None:
            entry = read_ahead.get()
            if isinstance(entry, _End):
                end = entry
                break
            group, weight = [entry], weigh(entry)
            while weight < budget:
                try:
                    entry = read_ahead.get_nowait()
                except queue.Empty:
                    break
                if isinstance(entry, _End):
                    end = entry
                    break
                group.append(entry)
                weight += weigh(entry)
            yield group
        if end.error is not None:
            raise end.error
    finally:
        stop.set()


def check_output(path: str, flag: str = "--out") -> Optional[str]:
    """The file an output path names (symbolic links followed), None for a stream (a device, a
    FIFO, /dev/stdout: os.stat follows its link to the pipe or terminal), or a user error naming
    `flag`: the path a directory, or its folder missing."""
    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        return None
    real = os.path.realpath(path)
    directory = os.path.dirname(real)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{flag} {path}: directory {directory} does not exist")
    if os.path.isdir(real):
        raise IsADirectoryError(f"{flag} {path} is a directory")
    return real


@contextlib.contextmanager
def output_file(path: Optional[str], flag: str = "--out"):
    """stdout, or a file that appears complete or not at all: written to a temp file beside it
    while tagging, renamed over `path` only when everything was written.

    A stream (check_output) is written straight into: replacing it put the output where no reader
    looks (as root, /dev/stdout became a regular file and nothing was printed). A link to a file
    replaces the file it names, not the link."""
    if path is None or path == STDIN:
        yield sys.stdout
        return
    real = check_output(path, flag)
    if real is None:
        with open(path, "w", encoding="utf-8") as handle:
            yield handle
        return
    directory = os.path.dirname(real)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    except OSError as err:  # a read-only folder or file system: name the user's path, not the temp file
        raise PermissionError(f"{flag} {path}: cannot write in {directory}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, real)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
