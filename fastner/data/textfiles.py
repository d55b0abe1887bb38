"""Reading text files and stdin as UTF-8 lines, with errors that name the file and the line."""
from __future__ import annotations

import os
import stat
from typing import IO, Iterator, Tuple

BOM = "\ufeff"


class DataFormatError(ValueError):
    """A malformed data file; the message names the file and the line."""


def check_data_file(path: str, what: str = "data file") -> None:
    """Raise FileNotFoundError / DataFormatError unless `path` is a regular file, saying what it is."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except OSError as err:
        raise DataFormatError(f"{path}: cannot read the {what}: {err.strerror or err}") from None
    a_what = f"{'an' if what[:1] in 'aeiou' else 'a'} {what}"  # "an input file"
    if stat.S_ISDIR(mode):
        raise DataFormatError(f"{path} is a directory; expected {a_what}")
    if not stat.S_ISREG(mode):
        kind = ("a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
                else "a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")
        raise DataFormatError(f"{path} is {kind}, not a regular file; expected {a_what}")


def utf8_lines(source: IO, name: str, records: bool = True) -> Iterator[Tuple[int, str]]:
    """(line number, text) of each line of a binary or text stream; a leading byte-order mark is
    dropped (at every record's start: files are concatenated); bytes that are not UTF-8 raise DataFormatError('NAME:LINE: not UTF-8 ...').

    records: each line is a record (CoNLL, JSONL, tokens, vectors), so a carriage return inside
    one is a DataFormatError: a file with CR-only line ends is one line, whose CRs split() takes
    for spaces (a CoNLL file was read as its first token with its last tag, exit 0)."""
    for line_no, raw in enumerate(source, start=1):
        if isinstance(raw, bytes):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(
                    f"{name}:{line_no}: not UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1}); "
                    "save the text as UTF-8") from None
        else:
            line = raw
        # a record's line starting with a byte-order mark is the start of a file concatenated
        # onto another (cat a.conll b.conll): its '-DOCSTART-' read as a token otherwise
        if (line_no == 1 or records) and line.startswith(BOM):
            line = line[len(BOM):]
        if records and "\r" in line.rstrip("\r\n"):
            raise DataFormatError(f"{name}:{line_no}: a carriage return (\\r) inside the line: the file's lines "
                                  "end in \\r alone? save it with \\n or \\r\\n line ends")
        yield line_no, line
