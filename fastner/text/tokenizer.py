"""Sentence splitting and CoNLL-2003-style tokenization of raw English text, with character
offsets into the original string.

Built on two maintained libraries, each used for what it measured best at (see
fastner.text.agreement and the README for the comparison):
  - syntok splits sentences (offline, no model files, keeps offsets; nltk's Punkt needs the
    `punkt_tab` data download and untrained it splits after every "Mr." and "U.S.");
  - nltk's NLTKWordTokenizer (the Penn Treebank conventions CoNLL-2003 follows: `'s` and `n't`
    split off, `$ 250.10`, `3 %`, `U.S.` and `Inc.` kept whole) splits each sentence into tokens.
    syntok's own word tokenizer drops hyphens ("Port-au-Prince" -> Port, au, Prince) and splits
    `U.S.` into `U.S` + `.`.

Offsets come from running both on a same-length working copy of the text (line breaks turned
into "\n", other control characters, the zero-width space and unicode spaces into plain spaces,
curly quotes into straight ones, fullwidth forms into ASCII, invisible format characters inside a
word into soft hyphens), so every offset indexes the original string and every token is
`text[start:end]`. A blank line ends a paragraph, and so a sentence: headlines and datelines have
no full stop; so does a line break before a list item ("* ", "2. ").
URLs, e-mail addresses, exchange tickers (NYSE:IBM) and ampersand names (AT&T, S&P) are kept
whole; unicode dashes and ellipses stand alone.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Iterator, List, Tuple

Token = Tuple[str, int, int]  # (text[start:end], start, end)

# Same-length replacements for the working copy (one character for one character).
_QUOTES = {"\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u00ab": '"', "\u00bb": '"',
           "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'", "`": "'"}
# Invisible format characters (Unicode Cf: the soft hyphen, HTML &shy;, the word joiner, the
# zero-width (non-)joiner, a byte-order mark, bidi marks) are no word boundary (UAX #29 ignores them
# inside a word): inside a word the working copy writes each as a soft hyphen, which keeps the word
# whole ("Frank\u00adfurt" was Frank + furt, tagged PER; "Ac\ufeffme" Ac + me) and which
# model_form drops; anywhere else they separate like a space. The zero-width space is a word
# boundary (UAX #29; syntok splits there too): a space.
_SOFT_HYPHEN = "\u00ad"
_ZERO_WIDTH_SPACE = "\u200b"
_LOOSE_SOFT_HYPHEN = re.compile(r"(?<!\w)\u00ad|\u00ad(?!\w)")
# Fullwidth forms (CJK typography: "\uff08", "\uff0c", "\uff21") are ASCII characters printed wide, and
# the ideographic full stop and comma are "." and ",": read as ASCII, "Limited\uff08\u201cAlibaba\u201d\uff09said"
# splits as 'Limited("Alibaba")said' does (it was one ORG running through the bracket) and the
# model reads the ASCII word.
_FULLWIDTH = range(0xFF01, 0xFF5F)  # "\uff01" .. "\uff5e": ASCII "!" .. "~" at an offset
_IDEOGRAPHIC = {"\u3001": ",", "\u3002": ".", "\uff61": ".", "\uff64": ",", "\u3010": "[", "\u3011": "]"}
# Kept as "\n" (the rest of whitespace becomes " "): syntok starts a paragraph at a blank line.
_LINE_BREAKS = {"\n", "\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"}

# Pieces kept as one token (or, for dashes and ellipses, cut out as their own token) before the
# word tokenizer sees the text between them.
_ATOMS = re.compile(
    r"""
    (?:https?://|ftp://|www\.)[^\s<>"'()\[\]{}]+[^\s<>"'()\[\]{}.,;:!?]   # URL, trailing punctuation off
  | (?<![\w.+-])[\w.+-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63}){1,8}            # e-mail (bounded: linear time)
  | \b[A-Z]{2,8}:[A-Z][A-Z0-9.]{0,7}\b                                    # exchange ticker NYSE:IBM
  | \b[A-Za-z]{1,4}&[A-Za-z]{1,4}\b                                       # AT&T, S&P, M&A
  | \b[A-Z]{1,3}\$                                                        # C$, A$, US$, HK$
  | -{3,} | ={3,} | _{3,} | \*{3,}                                          # rules of dashes
  | [\u2012-\u2015\u2212]                                                  # figure/en/em dash, bar, minus
  | \u2026                                                                 # ellipsis
    """,
    re.VERBOSE,
)
# A dotted abbreviation the word tokenizer leaves without its final period before a closing
# bracket ("(U.S.)" -> U.S + . + )): CoNLL keeps "U.S." whole there; at the very end of a
# sentence CoNLL writes "U.S" + "." too, so that split stays.
_DOTTED = re.compile(r"(?:[A-Za-z]\.)+[A-Za-z]")
# A word with a period that is not an abbreviation, inside what the sentence splitter kept as one
# sentence ("a share. analyst said" when the next sentence starts in lower case): the period is
# its own token. Abbreviations (a closed list, single letters, dotted forms like U.S.) keep it.
_WORD_PERIOD = re.compile(r"[A-Za-z][a-z]+\.|\d[\d,]*(?:\.\d+)?[A-Za-z]*\.")  # an amount: "5bn."
_ABBREVIATIONS = frozenset("""
    mr mrs ms dr prof rev gen lt col capt cmdr sgt maj adm sen rep gov pres amb fr sr jr st mt no vs
    inc corp co ltd plc bros dept univ assn ave blvd rd est approx etc al cf fig vol op
    cos bhd pty pte sdn hldgs
    jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thur thurs fri sat sun
    ala ariz ark calif colo conn del fla ga ill ind kan ky la md mass mich minn miss mo mont neb
    nev okla ore pa tenn tex va vt wash wis wyo
""".split())
_ENUMERATION = re.compile(r"\d{1,3}\.")
# A full stop with the space after it missing, after a number, "%", a bracket or a quote ("rose
# 3%.Beta fell", "in 2026.The firm"): nltk kept ".Beta" and "2026.The" as tokens (syntok only
# splits after a lower-case letter); the period and the word come apart.
_GLUED_PERIOD = re.compile(r"(?<=[\d%)\]\"'])\.(?=[A-Z][a-z])")
_ENDS_WITH_TITLE = re.compile(
    r"\b(?:Mr|Mrs|Ms|Dr|Prof|Rev|Gen|Lt|Col|Capt|Cmdr|Sgt|Maj|Adm|Sen|Rep|Gov|Pres|Amb|Fr|Sr|St|Mt|No|vs"
    r"|Pty|Pte|Sdn)\.$")  # company forms never at the end: "Pty. Ltd.", "Pte. Ltd.", "Sdn. Bhd."
# syntok ends a sentence inside a dotted abbreviation of mixed case ("Eni S.p.A. rose": S.p | A.);
# the two letters around a boundary with no space at it
_INSIDE_DOTTED = re.compile(r"(?<![A-Za-z])[A-Za-z]\.[A-Za-z]\.")
# CoNLL splits a leading currency symbol off an amount ("$ 250.10") but nltk only knows "$":
# any currency symbol (Unicode category Sc) before a digit comes off, whatever follows the digits
# ("£1.2m" and "€3bn" stayed whole, where "$1.5bn" is $ + 1.5bn and "£2.4 billion" £ + 2.4).
_CURRENCY_PREFIX = re.compile(r"[^\w\s]\d")

_word_tokenizer = None

# Flag bits stdlib `re` shares with the `regex` module (same values in both); nltk also sets
# regex.VERSION0, which is regex's default behaviour and has no `re` counterpart.
_RE_FLAGS = re.IGNORECASE | re.LOCALE | re.MULTILINE | re.DOTALL | re.UNICODE | re.VERBOSE | re.ASCII


def _stdlib(pattern):
    """nltk's rule `pattern` (a ReDoS-guarded `regex` pattern or a plain `re` one) compiled by
    stdlib `re`: the same rule, matched by the faster engine and without the guard's per-call
    wrapper and replacement-template recompilation (a third of nltk's time, see the README)."""
    return re.compile(pattern.pattern, pattern.flags & _RE_FLAGS)


def _words():
    """nltk's NLTKWordTokenizer, its own rule lists recompiled with stdlib `re`; tokenize() and
    span_tokenize() are nltk's, unchanged. tests/test_text.py checks the spans equal stock
    nltk's on thousands of real and generated sentences."""
    global _word_tokenizer
    if _word_tokenizer is None:
        from nltk.tokenize import NLTKWordTokenizer

        words = NLTKWordTokenizer()
        for name in ("STARTING_QUOTES", "PUNCTUATION", "ENDING_QUOTES"):
            setattr(words, name, [(_stdlib(rule), template) for rule, template in getattr(words, name)])
        for name in ("PARENS_BRACKETS", "DOUBLE_DASHES"):
            rule, template = getattr(words, name)
            setattr(words, name, (_stdlib(rule), template))
        for name in ("CONTRACTIONS2", "CONTRACTIONS3"):
            setattr(words, name, [_stdlib(rule) for rule in getattr(words, name)])
        _word_tokenizer = words
    return _word_tokenizer


class _WorkingCopyTable(dict):
    """str.translate table built lazily: each distinct character is classified once (by
    _working_char) and cached, so working_copy runs in C after the first sight of a character."""

    limit = 1 << 16  # distinct characters cached; text using more of Unicode still works, uncached

    def __missing__(self, code: int) -> int:
        mapped = ord(_working_char(chr(code)))
        if len(self) < self.limit:
            self[code] = mapped
        return mapped


def _working_char(ch: str) -> str:
    if ord(ch) in _FULLWIDTH:
        ch = chr(ord(ch) - 0xFEE0)
    ch = _IDEOGRAPHIC.get(ch, ch)
    if ch in _QUOTES:
        return _QUOTES[ch]
    if ch in _LINE_BREAKS:
        return "\n"
    if ch != _ZERO_WIDTH_SPACE and unicodedata.category(ch) == "Cf":
        return _SOFT_HYPHEN  # working_copy decides by its neighbours
    if ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp"):
        return " "
    return ch


_WORKING_TABLE = _WorkingCopyTable()


def working_copy(text: str) -> str:
    """`text` with line breaks as "\n", every other character that should separate tokens as
    a plain space and curly quotes as straight ones; the same length, so offsets carry over."""
    # CRLF is one line break, not the blank line two breaks in a row would read as
    work = text.replace("\r\n", " \n").translate(_WORKING_TABLE)
    if _SOFT_HYPHEN in work:
        work = _LOOSE_SOFT_HYPHEN.sub(" ", work)
    return work


def model_form(token: str) -> str:
    """A token of raw text as the model reads it: quotes straight, as CoNLL-2003 prints them (a
    curly closing quote was read as the end of the name before it: "BNP\u00bb" tagged ORG), soft
    hyphens and other invisible format characters dropped ("Frank\u00adfurt" is Frankfurt),
    fullwidth forms as ASCII ("\uff21\uff23\uff2d\uff25" is ACME), accents composed (NFC: "Nestle\u0301",
    as macOS and some feeds write it, was no entity where "Nestl\u00e9" is an ORG). Training on
    raw text reads the same form."""
    return unicodedata.normalize("NFC", working_copy(token).replace(_SOFT_HYPHEN, ""))


# A blank line, as syntok's segmenter finds paragraphs (the working copy's only whitespace is
# " " and "\n"), or a line break before a list item: a bullet or a number ("* Q3 EPS $1.20",
# "\u2022 Acme Corp raised guidance", "2. Beta fell", "3) Acme flat") then a space. News summaries
# and briefs list points without full stops: the items ran together into one sentence, and a
# numbered item's number was the last token of the item before it.
_BULLETS = "*+\u2022\u2023\u2043\u25aa\u25a0\u25cf\u25e6\u25ba\u25b6\u00b7\u2013\u2014-"
_PARAGRAPH_BREAK = re.compile(r"\n(?: *\n)+|\n(?= *(?:[" + _BULLETS + r"]|\d{1,2}[.)]) )")


def _paragraphs(work: str) -> Iterator[Tuple[int, int]]:
    begin = 0
    for match in _PARAGRAPH_BREAK.finditer(work):
        yield begin, match.start()
        begin = match.end()
    yield begin, len(work)


# A decimal point. syntok never ends a sentence after a word with a period inside (its rule for
# "U.S."), so "It closed at 12.50. Volume was light." and "Sales hit $1.5bn. Shares rose." stayed
# one sentence, where "at 12. Volume" is two: syntok reads decimals with a comma, as it reads
# "1,234", a number it does split after.
_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")


def _sentence_ranges(work: str) -> Iterator[Tuple[int, int]]:
    """(start, end) of each sentence in the working copy, whitespace trimmed."""
    from syntok import segmenter

    segmented = _DECIMAL_POINT.sub(",", work)  # same length: syntok's offsets index `work`
    starts = []
    for begin, finish in _paragraphs(work):
        first = True
        # one paragraph at a time: syntok's analyze() pads each paragraph with as many spaces as
        # the text before it and scans them again, quadratic in the paragraphs of a document
        for paragraph in segmenter.analyze(segmented[begin:finish]):
            for sentence in paragraph:
                if not sentence:
                    continue
                offset = begin + sentence[0].offset
                if starts and not first:  # a paragraph always starts a sentence
                    end = offset
                    while end > starts[-1] and work[end - 1] in " \n":
                        end -= 1
                    # the end of the sentence so far, long enough for every title: the sentence
                    # as a whole, growing with each piece joined to it, was searched again for
                    # each (quadratic: "Lt. " * 20000, 80 kB, took 88 s)
                    previous = work[max(starts[-1], end - 16):end]
                    if (_ENUMERATION.fullmatch(previous) or _ENDS_WITH_TITLE.search(previous) or previous.endswith(";")
                            or (end == offset and _INSIDE_DOTTED.match(work, offset - 2))):
                        # "10." of a numbered list belongs to its line; "Lt." and "Rev." to the name after
                        # them; a semicolon joins clauses of one sentence (syntok ends one there, CoNLL never)
                        continue
                starts.append(offset)
                first = False
    for number, start in enumerate(starts):
        end = starts[number + 1] if number + 1 < len(starts) else len(work)
        while end > start and work[end - 1] in " \n":
            end -= 1
        if end > start:
            yield start, end


def _word_spans(work: str, start: int, end: int) -> List[Tuple[int, int]]:
    """Token spans of work[start:end] by the word tokenizer, atoms kept apart."""
    spans: List[Tuple[int, int]] = []
    position = start
    for match in _ATOMS.finditer(work, start, end):
        spans.extend(_treebank(work, position, match.start()))
        spans.append(match.span())
        position = match.end()
    spans.extend(_treebank(work, position, end))
    return spans


def _treebank(work: str, start: int, end: int) -> List[Tuple[int, int]]:
    piece = work[start:end]
    if not piece.strip():
        return []
    try:
        spans = list(_words().span_tokenize(piece))
    except ValueError:  # nltk could not align a rewritten token: fall back to whitespace
        spans = [m.span() for m in re.finditer(r"\S+", piece)]
    return [(start + a, start + b) for a, b in spans if b > a]


def _conll_fixes(work: str, spans: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    pieces: List[Tuple[int, int]] = []
    for a, b in spans:
        glued = _GLUED_PERIOD.search(work, a, b)
        if glued:
            pieces.extend(piece for piece in ((a, glued.start()), glued.span()) if piece[1] > piece[0])
            a = glued.end()
        pieces.append((a, b))
    spans = pieces
    fixed: List[Tuple[int, int]] = []
    for number, (a, b) in enumerate(spans):
        if _CURRENCY_PREFIX.match(work, a, b) and unicodedata.category(work[a]) == "Sc":
            fixed.append((a, a + 1))
            a += 1
        if (0 < number < len(spans) - 1 and _WORD_PERIOD.fullmatch(work, a, b)
              and work[a:b - 1].lower() not in _ABBREVIATIONS):
            fixed.extend([(a, b - 1), (b - 1, b)])
        else:
            fixed.append((a, b))
    merged: List[Tuple[int, int]] = []
    for number, (c, d) in enumerate(fixed):
        if merged and merged[-1][1] == c and number + 1 < len(fixed):
            a, b = merged[-1]
            # "U.S" + "." -> "U.S."; nltk's "can" + "not" -> "cannot" (one CoNLL token)
            if (work[c:d] == "." and _DOTTED.fullmatch(work, a, b)) or (
                    work[a:b].lower() == "can" and work[c:d].lower() == "not"):
                merged[-1] = (a, d)
                continue
        merged.append((c, d))
    return merged


def iter_sentences(text: str) -> Iterator[List[Token]]:
    """Sentence by sentence: [(token, start, end), ...] with text[start:end] == token."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    work = working_copy(text)
    for start, end in _sentence_ranges(work):
        spans = _conll_fixes(work, _word_spans(work, start, end))
        if spans:
            yield [(text[a:b], a, b) for a, b in spans]


def tokenize(text: str) -> List[List[Token]]:
    """Sentences of `text`, each a list of (token, start, end) with text[start:end] == token."""
    return list(iter_sentences(text))
