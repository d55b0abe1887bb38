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

Why one ~860-line module: its stages (working copy, paragraphs, sentence starts, word spans,
CoNLL fixes) share the working copy's same-length invariant and the fast paths that decide when
syntok and nltk need not be asked, each checked against those libraries' own answers by
tests/test_text.py; benchmarks/serve_profile.py times the stages by their names here.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import re
import unicodedata
from typing import Iterator, List, NamedTuple, Optional, Tuple

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


def own_form(text: str) -> bool:
    """Whether model_form leaves `text` as it is, and so each piece of it: printable ASCII
    without a backtick (a quote), most tokens and most news text."""
    return text.isascii() and text.isprintable() and "`" not in text


def model_form(token: str) -> str:
    """A token of raw text as the model reads it: quotes straight, as CoNLL-2003 prints them (a
    curly closing quote was read as the end of the name before it: "BNP\u00bb" tagged ORG), soft
    hyphens and other invisible format characters dropped ("Frank\u00adfurt" is Frankfurt),
    fullwidth forms as ASCII ("\uff21\uff23\uff2d\uff25" is ACME), accents composed (NFC: "Nestle\u0301",
    as macOS and some feeds write it, was no entity where "Nestl\u00e9" is an ORG). Training on
    raw text reads the same form."""
    if own_form(token):
        return token
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


# The longest bracketed group, brackets included, that _one_sentence_start reads itself: syntok
# skips a group whose closing bracket is within 50 tokens of its opening one and which spans
# fewer than 70 characters (State.max_bracket_skipping_length); a token is at least a character.
_GROUP_CHARS = 50


@functools.lru_cache(maxsize=None)  # built once, on first use: syntok is imported only then
def _syntok_breaks() -> Tuple[str, "re.Pattern", "re.Pattern"]:
    """(syntok's one-character sentence terminals, a pattern of those and its opening brackets,
    a pattern of one bracketed group it skips): the only tokens at which its segmenter may end a
    sentence are terminals and opening brackets (syntok/_segmentation_states.py)."""
    from syntok._segmentation_states import State

    terminals = "".join(sorted(t for t in State.terminals if len(t) == 1))  # "..." is made of "."
    opening, closing = ("".join(sorted(brackets)) for brackets in (State.opening_brackets, State.closing_brackets))
    breaks = re.compile("[" + re.escape(terminals + opening) + "]")
    # an opening bracket, up to _GROUP_CHARS - 2 characters with no bracket (terminals inside are
    # skipped with the group: "(Corp.)"), the first closing bracket (syntok's stack pops on any
    # closing bracket, whatever its kind), and no opening bracket as the next token
    group = re.compile(f"[{re.escape(opening)}][^{re.escape(opening + closing)}]"
                       f"{{0,{_GROUP_CHARS - 2}}}[{re.escape(closing)}](?![ \n]*[{re.escape(opening)}])")
    return terminals, breaks, group


def _closes_alone(text: str, at: int) -> bool:
    """The closing bracket text[at] is a token of its own for syntok's tokenizer: it splits
    every bracket off a whitespace-separated chunk that holds a letter or digit, but keeps a chunk
    of punctuation alone, ")." or ",)", as one token, which is no closing bracket to its segmenter."""
    start = max(text.rfind(" ", 0, at), text.rfind("\n", 0, at)) + 1
    ends = [end for end in (text.find(" ", at), text.find("\n", at)) if end >= 0]
    chunk = text[start:min(ends, default=len(text))]
    return len(chunk) == 1 or any(character.isalnum() for character in chunk)


def _one_sentence_start(segmented: str, begin: int, finish: int) -> Optional[int]:
    """The start of the paragraph segmented[begin:finish] if syntok reads it as one sentence
    without asking it, else None (syntok must decide). Before its closing run of terminals the
    paragraph holds no terminal but abbreviation stops that syntok never ends a sentence at
    (_abbreviation_stop: "Acme Inc. said", "the U.S. Treasury"), and no opening bracket but those
    of short groups that syntok skips without a decision: "Shares of Acme Corp (ACME) rose on
    Monday." and every headline without a stop. Such a group is read as a decision point when
    its bracket is the first or second token of the paragraph (FirstToken looks at the token
    after the first) or directly follows another group (the token after a skipped group is
    looked at), so those go to syntok (where "Extras (lb-11 w-1 nb-8) 20" is two sentences).
    (A paragraph here may be a piece of one, _certain_pieces: syntok starts it in the same
    state.) 82% of the pieces of the load test's eng.testa documents, each ~80-200 us of
    syntok's Python saved (tests/test_text.py checks the answer against syntok's own on
    generated and real text)."""
    terminals, breaks, group = _syntok_breaks()
    text = segmented[begin:finish]
    body = text.rstrip(" \n").rstrip(terminals)  # the working copy's only whitespace is " " and "\n"
    if not body.strip(" \n"):
        return None
    found = breaks.search(body)
    if found is not None and len(body[:found.start()].split()) < 2:  # at least two tokens before it
        return None
    while found is not None:
        stop = _abbreviation_stop(body, found.start())
        if stop is not None:
            found = breaks.search(body, stop)
            continue
        skipped = group.match(body, found.start())  # None at a terminal, a long or an open group
        if skipped is None or not _closes_alone(text, skipped.end() - 1):
            return None
        found = breaks.search(body, skipped.end())
    return begin + len(text) - len(text.lstrip(" \n"))


# A full stop inside a sentence that syntok's segmenter never ends it at: after one of its
# abbreviations ("Inc." "Corp." "Mr."), a dotted capital abbreviation ("U.S.", one token "U.S" to
# its tokenizer) or a capital initial ("W."), then whitespace and a token that is none of its
# sentence starters. Its decision there (_move_and_maybe_extract_terminal) keeps the sentence
# going before a lower-case token; before any other token that is no starter it keeps it too,
# for each of these three words (its abbreviation rule, its rule for a word holding a period,
# its rule for single capitals), where the next token is no closing bracket or ".", which it is
# not here (a letter, a digit or a quote; after an opening bracket it would read the group token
# by token, so none). The word must not be the sentence's first token (its first-token state
# decides otherwise): _one_sentence_start asks for two tokens before the first stop.
_ABBREVIATION_STOP = re.compile(r"((?:[A-Z]\.)+[A-Z]|[A-Z][a-z]+|[a-z]+|[A-Z]+)\.[ \n]+(?=[A-Za-z0-9\"'])([A-Z]*[a-z]*)")


# And one before a number: syntok keeps the sentence going before a number of three or more
# digits whatever the word before the stop ("Mich. 1996"), and before any number after a month's
# abbreviation ("Sept. 24"), one of its abbreviations or "no" (its rules for those words come
# first, and a number is no lower-case token or starter). The word is letters and digits alone
# (no terminal inside), the number digits alone, then whitespace, the end, or one punctuation
# mark and whitespace or the end ("24," is 24 and a comma to its tokenizer; "24,5", a decimal
# in the segmented copy, is one token and no number to it).
_NUMBER_STOP = re.compile(r"([A-Za-z0-9]+)\.[ \n]+([0-9]+)(?=[ \n]|[,;:.!?]?(?:[ \n]|$))")


def _abbreviation_stop(body: str, at: int) -> Optional[int]:
    """Where the text after the _ABBREVIATION_STOP or _NUMBER_STOP whose word holds body[at]
    continues (just past its full stop), or None if body[at] is no such stop."""
    if body[at] != ".":
        return None
    start = max(body.rfind(" ", 0, at), body.rfind("\n", 0, at)) + 1  # the whitespace-separated word
    rules = _syntok_rules()
    match = _ABBREVIATION_STOP.match(body, start)
    if match is not None and at <= match.end(1):
        word = match.group(1)
        if ("." in word or (len(word) == 1 and word.isupper()) or word in rules.abbreviations) \
                and match.group(2) not in rules.starters:
            return match.end(1) + 1
    match = _NUMBER_STOP.match(body, start)
    if match is not None and at == match.end(1):
        word = match.group(1)
        if len(match.group(2)) > 2 or word in rules.months or word in rules.abbreviations or word in _NO:
            return at + 1
    return None


# "no" in syntok's segmenter: a rule of its own (as in "No. 3"), not one of its abbreviations.
_NO = frozenset(("no", "No", "NO"))


class _SyntokRules(NamedTuple):
    """The word lists and brackets of syntok's segmenter that the fast paths read."""

    abbreviations: frozenset
    starters: frozenset  # its sentence starters
    months: frozenset  # its month abbreviations
    no_certain_end: frozenset  # words after whose terminal _CERTAIN_END is no certain end
    opening_brackets: frozenset
    bracket: "re.Pattern"  # one of its opening or closing brackets


@functools.lru_cache(maxsize=None)  # built once, on first use: syntok is imported only then
def _syntok_rules() -> _SyntokRules:
    from syntok._segmentation_states import State

    brackets = "".join(sorted(State.opening_brackets | State.closing_brackets))
    return _SyntokRules(State.abbreviations, State.starters, State.months,  # frozensets all
                        State.abbreviations | State.roman_numerals | _NO, State.opening_brackets,
                        re.compile("[" + re.escape(brackets) + "]"))


# A sentence end at which syntok's segmenter always splits, whatever comes before it in the
# paragraph: a word of two or more ASCII letters, lower case, capitalized or all capitals (one
# token to syntok's tokenizer, which splits "dividenD" at the change of case), or a number of
# two or more digits, or digits then lower-case letters ("65th", "1990s"), with whitespace (or
# the text's start) before it, or a letter or digit and a hyphen (its tokenizer splits
# "razzle-dazzle" there, not "6-22": then the number here is a part of the word, and the word
# is no number, which it splits after all the same); then one of ". ! ?", whitespace, and an
# upper-case ASCII letter, a straight quote (the working copy's only quotes) or a dash. Its
# decision there (syntok/_segmentation_states.py, _move_and_maybe_extract_terminal) reads the
# word before the terminal and the token after it: before such a token after whitespace it
# keeps the sentence going only after a word in _SyntokRules.no_certain_end (its abbreviations, roman
# numerals, "no"), a single character, a word holding a period, or a number before a month's
# abbreviation ("1996. Jan": _certain_pieces checks the token after a number). syntok starts the next sentence in the state it starts a paragraph in, so the text on
# either side is segmented as if it stood alone; only a bracketed group it may skip reaches
# across, so no end inside an open bracket is cut (_certain_pieces). Titles that
# _sentence_ranges joins back to the next sentence ("Lt." "Rev.") are joined back after a cut
# too: its check runs on every sentence start after a paragraph's first, wherever it came from.
_CERTAIN_END = re.compile(r"(?:(?<![^ \n])|(?<=[A-Za-z0-9]-))([A-Z][a-z]+|[a-z]{2,}|[A-Z]{2,}|[0-9]{2,}|[0-9]+[a-z]+)"
                          r"[.!?][ \n]+(?=[A-Z\"'-])([A-Z]*[a-z]*)")


# What every _CERTAIN_END match holds: a terminal, whitespace and the character it looks ahead
# at. A paragraph without it (most one-sentence documents) has no certain end, found by this one
# cheap scan: the full pattern's was 8 of a served document's 35 us of tokenizing (the load
# test's demo-corpus documents, Intel Emerald Rapids).
_CERTAIN_END_TRIGGER = re.compile(r"[.!?][ \n]+[A-Z\"'-]")


def _certain_pieces(segmented: str, begin: int, finish: int) -> Iterator[Tuple[int, int]]:
    """The paragraph segmented[begin:finish] cut after each of its _CERTAIN_END ends outside
    brackets: (begin, end) of each piece, the next one starting at the next sentence's first
    character. A news paragraph of several plain sentences becomes pieces that
    _one_sentence_start reads itself, instead of one syntok run over the whole paragraph.

    syntok skips a bracketed group from its opening bracket to the closing one that empties its
    stack of brackets (any kind closes any kind; each bracket is a token of its own), and the end
    of a group that is still open is past this end: so an end is cut only where every bracket
    opened before it in the paragraph has been closed (a closing bracket with none open is a
    plain token)."""
    if not _CERTAIN_END_TRIGGER.search(segmented, begin, finish):
        yield begin, finish
        return
    rules = _syntok_rules()
    exceptions, months, opening, bracket = rules.no_certain_end, rules.months, rules.opening_brackets, rules.bracket
    position = scanned = begin
    depth = 0  # brackets open at `scanned`
    for match in _CERTAIN_END.finditer(segmented, begin, finish):
        word = match.group(1)
        if word in exceptions or (word.isdigit() and match.group(2) in months):
            continue
        for found in bracket.finditer(segmented, scanned, match.start()):
            depth = depth + 1 if found.group() in opening else max(0, depth - 1)
        scanned = match.start()
        if depth:
            continue
        yield position, match.end(1) + 1
        position = match.start(2)  # the next sentence's first character
    yield position, finish


def _syntok_starts(segmented: str, begin: int, finish: int) -> Iterator[int]:
    """Where syntok starts each sentence of segmented[begin:finish] (a paragraph, or a piece of
    one that starts a sentence)."""
    from syntok import segmenter

    # one paragraph at a time: syntok's analyze() pads each paragraph with as many spaces as
    # the text before it and scans them again, quadratic in the paragraphs of a document
    for paragraph in segmenter.analyze(segmented[begin:finish]):
        for sentence in paragraph:
            if sentence:
                yield begin + sentence[0].offset


def _sentence_ranges(work: str, fast: bool = True) -> Iterator[Tuple[int, int]]:
    """(start, end) of each sentence in the working copy, whitespace trimmed. fast=False: every
    paragraph through syntok whole, without _certain_pieces and _one_sentence_start (the
    reference tests/test_text.py and benchmarks/sentence_split.py compare them with)."""
    segmented = _DECIMAL_POINT.sub(",", work)  # same length: syntok's offsets index `work`
    starts: List[int] = []
    for begin, finish in _paragraphs(work):
        first = True  # a paragraph always starts a sentence
        for piece_begin, piece_end in _certain_pieces(segmented, begin, finish) if fast else [(begin, finish)]:
            single = _one_sentence_start(segmented, piece_begin, piece_end) if fast else None
            offsets = _syntok_starts(segmented, piece_begin, piece_end) if single is None else (single,)
            for offset in offsets:
                if starts and not first:
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


# Every atom holds one of these (a URL "://" or "www.", an e-mail "@", a ticker ":", "&", a
# currency's "$", a rule's "---" "===" "___" "***", a unicode dash or minus, the ellipsis), so a
# piece holding none has no atom and skips _ATOMS' scan (its alternatives tried at every
# character: 15 us of a 91-character sentence's 90; this search takes 1).
_ATOM_TRIGGER = re.compile(r"[@:&$=_*\u2012-\u2015\u2212\u2026]|www\.|---")


def _word_spans(work: str, start: int, end: int) -> List[Tuple[int, int]]:
    """Token spans of work[start:end] by the word tokenizer, atoms kept apart."""
    if not _ATOM_TRIGGER.search(work, start, end):
        return _treebank(work, start, end)
    spans: List[Tuple[int, int]] = []
    position = start
    for match in _ATOMS.finditer(work, start, end):
        spans.extend(_treebank(work, position, match.start()))
        spans.append(match.span())
        position = match.end()
    spans.extend(_treebank(work, position, end))
    return spans


def _treebank(work: str, start: int, end: int) -> List[Tuple[int, int]]:
    """nltk's spans of work[start:end] (offsets into `work`)."""
    if not work[start:end].strip():
        return []
    spans = _cached_spans(work, start, end) if _cache_applies() else None
    if spans is None:
        spans = [(start + a, start + b) for a, b in _nltk_spans(work[start:end]) if b > a]
    return spans


def _reference_word_spans(work: str, start: int, end: int) -> List[Tuple[int, int]]:
    """_word_spans as it was before the atom pre-check and the per-word cache: every piece
    between atoms through nltk's span_tokenize whole. The tests and
    benchmarks/word_spans.py compare the two."""
    spans: List[Tuple[int, int]] = []
    position = start
    for match in list(_ATOMS.finditer(work, start, end)) + [None]:
        piece_end = match.start() if match else end
        if work[position:piece_end].strip():
            spans.extend((position + a, position + b) for a, b in _nltk_spans(work[position:piece_end]) if b > a)
        if match:
            spans.append(match.span())
            position = match.end()
    return spans


def _nltk_spans(piece: str) -> List[Tuple[int, int]]:
    """nltk's span_tokenize on the whole piece: what _cached_spans reproduces, and what runs
    wherever it cannot show it does."""
    try:
        return list(_words().span_tokenize(piece))
    except ValueError:  # nltk could not align a rewritten token: fall back to whitespace
        return [m.span() for m in re.finditer(r"\S+", piece)]


# ---- nltk's rules word by word, cached ----------------------------------------------------------
# span_tokenize(piece) runs ~27 regex rewrites over the whole piece (27 us a call, plus 0.4 us a
# character, here) that leave most words as they are. Why a word's tokens can be computed once
# and reused, from nltk/tokenize/destructive.py (NLTKWordTokenizer.tokenize, span_tokenize):
# 1. The rewrites insert spaces, turn `"` and `''` into `` or '', and shorten whitespace runs
#    (ENDING_QUOTES' `\s+` -> " ", the final period's `\s*$` -> " "); none removes a character
#    or a whole run of whitespace, so every token lies inside one WORD of the piece (a maximal
#    run of non-whitespace; str.split(), `\s` and `\S` agree on what whitespace is).
# 2. What the rules do inside a word depends only on the word and the separator character on
#    each side of it, except at the two ends of the piece:
#    - the character before it is read by STARTING_QUOTES `([ \(\[{<])(\"|\'{2})` (a literal
#      space or not), `(?<!\w)'` and `\b` (all whitespace is non-word), PUNCTUATION `([^'])' `
#      (any character); after `\s+` -> " " each separator is one space, read by ENDING_QUOTES
#      `([^' ])(...) ` and CONTRACTIONS3 ` ('t)(is)\b`;
#    - the character after it by `([:,])([^\d])` (whitespace is no digit), `([^'])' ` (a literal
#      space or not), (?=\w), (?=\s), `\b` and the clitic rules' trailing space;
#    - `^\"` reads the start of the piece: a first word with no whitespace before it has ""
#      as the character before it (and nothing can look before it);
#    - `([:,])$` and the final period, `([^\.])(\.)([\]\)}>"\'»”’ ]*+)\s*$` and its twin without
#      the space, reach back from the end across words made only of closing brackets and
#      quotes: the TAIL, from the last word holding a character outside that class to the end
#      (the whole piece if no word does), is one unit. No rule turns a character outside the
#      class into one inside it (they insert spaces and turn quotes into backticks), so no
#      word before the tail ever holds the final period's match.
#    A match that consumes a separator character (the second group of `([:,])([^\d])`, the
#    space of `' ` and of the clitic rules, the group before a starting quote, CONTRACTIONS3's
#    space) writes the same character back. The one rule whose next match could have begun on
#    a character consumed so is `([^'])' `, and that match (whitespace, `'`, space) would only
#    put a space beside whitespace: the same tokens either way.
#    So a word's tokens are a function of (character before, word, character after) and the
#    tail's of (character before, tail): _HEAD_SPANS and _TAIL_SPANS cache them under that
#    text, a slice of the piece, or its shape (4.). _probe computes them with nltk itself: the
#    piece's unseen words in one call, each with its own separator characters.
# 3. align_tokens finds each token with str.index from the end of the token before. Where each
#    word's tokens (quotes restored) spell the word from its first character to its last
#    (checked for every cache entry: an entry that fails is False and sends its piece to nltk
#    whole), each token is found right after the whitespace before it, so the piece's spans
#    are its words' spans end to end. span_tokenize puts back a quote for each `"`/``/'' token
#    from one list of the piece's ``|''|" matches, in order; no match spans whitespace, so
#    that is done word by word when each word has as many such tokens as matches (checked).
#    Only a word holding `"` or `''` has such a token, or one holding backticks (False: nltk
#    restores those or not by the rest of the piece; the working copy has no backtick).
# 4. Shapes: the rules read ASCII letters and digits only through classes in which all letters
#    (all digits) are alike (`\w`, `\b`, `\d`, `[^\d]`, `[^\.]`, `[^']`, `[^' ]`), except the
#    clitic and contraction rules, which hold an apostrophe (`'s`, `n't`, `(?i)'(?!re|ve|...)`,
#    `'t is`, `d'ye`, `more'n`) or one of six (?i) letter sequences (can+not, gim+me, gon+na,
#    got+ta, lem+me, wan+na). So an ASCII word with no apostrophe and none of those sequences
#    (as substrings: wider than the rules' \b...\b) is split at the same offsets as its SHAPE,
#    letters written "x" and digits "0" ("Acme," and "Beta," are "xxxx,", "1996." is "0000."):
#    an unseen word whose shape was seen needs no probe. A key equal to a shape is its own
#    shape, so keys and shapes share the caches.
# tests/test_text.py compares with nltk on whole pieces: every sentence of the CoNLL training
# and development text, the demo corpus and thousands of generated adversarial strings.
_WORD_AFTER_SEPARATOR = re.compile(r"\s?(\S+)")  # a word and the character before it, if any
_FINAL_PERIOD_CLASS = "])}>\"'\u00bb\u201d\u2019"  # what may stand between the final period and the end
_SHAPES = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789", "x" * 52 + "0" * 10)
_NOT_BY_SHAPE = re.compile(r"'|(?i:cannot|gimme|gonna|gotta|lemme|wanna)")
_QUOTE_TOKENS = frozenset(('"', "``", "''"))
_NLTK_QUOTES = re.compile(r"``|'{2}|\"")  # span_tokenize's list of the quotes it puts back
# Stands between the probed words in one nltk call: a word of its own (whitespace around it)
# that no rule touches and, outside the class above, keeps every probed head word out of the
# probe's tail. A piece holding it goes to nltk whole.
_DELIMITER = "\x00"
_WHOLE = True  # the value for a word that is one token
# " word " ("word " first in a piece), or its shape -> _WHOLE, spans in the word (flat:
# start, end, start, end, ...: a tuple of small ints costs 8 bytes an offset), or False
_HEAD_SPANS: dict = {}
# " tail" ("tail" when it is the whole piece), or its shape -> spans from its first word (flat), or False
_TAIL_SPANS: dict = {}
# Bounds: 32,768 entries each (all of eng.train makes 29,099 words and 6,148 tails, 3.4 MB:
# ~100 bytes an entry) and keys of at most 40 characters (4 of CoNLL's 254,983 tokens are
# longer; such words are probed each time), so at most ~25 MB each whatever the text (measured
# with 38-character words of one-character tokens). A full cache starts again empty: a feed's
# vocabulary drifts, and the shapes it held come back within a few hundred sentences.
_CACHE_LIMIT = 1 << 15
_KEY_LIMIT = 40


# The argument above was made, rule by rule, for the word tokenizer of nltk 3.10.4 (its rule
# lists and its tokenize / span_tokenize code): another nltk may read more context than it does,
# and then the cached spans could differ from nltk's. So the caches serve only the rules they
# were argued for, recognised by this fingerprint of them (_rules_fingerprint); under any other
# nltk every piece goes through nltk whole, as before the caches: the same spans, slower.
# tests/test_text.py fails while the fingerprints differ, so that an upgrade gets the argument
# and the equality tests re-checked (then this value updated), not silently the slow path.
_ARGUED_RULES = "c83b3b6c47cc639f"
_cache_state: list = []  # [whether the installed nltk's rules are the argued ones], once known


def _rules_fingerprint() -> str:
    """A digest of what nltk's word tokenizer does: its rule lists (patterns, flags, templates)
    and the source of NLTKWordTokenizer.tokenize and span_tokenize."""
    from nltk.tokenize import NLTKWordTokenizer

    def described(rule):
        if isinstance(rule, (list, tuple)):
            return [described(part) for part in rule]
        if hasattr(rule, "pattern") and hasattr(rule, "flags"):
            return ["pattern", rule.pattern, int(rule.flags)]
        return rule

    rules = [(name, described(getattr(NLTKWordTokenizer, name)))
             for name in ("STARTING_QUOTES", "PUNCTUATION", "PARENS_BRACKETS", "DOUBLE_DASHES",
                          "ENDING_QUOTES", "CONTRACTIONS2", "CONTRACTIONS3")]
    code = [inspect.getsource(NLTKWordTokenizer.tokenize), inspect.getsource(NLTKWordTokenizer.span_tokenize)]
    return hashlib.sha256(repr((rules, code)).encode()).hexdigest()[:16]


def _cache_applies() -> bool:
    if not _cache_state:
        _cache_state.append(_rules_fingerprint() == _ARGUED_RULES)
    return _cache_state[0]


def _shape(key: str):
    """The key's shape (4. above), or None for a key that must be looked up as it is."""
    if key.isascii() and not _NOT_BY_SHAPE.search(key):
        return key.translate(_SHAPES)
    return None


def _by_shape(cache: dict, key: str):
    """cache's entry for key's shape (remembered under `key` too, so that the next lookup of
    `key` hits), or None where the shape has none or the key has no shape."""
    shape = _shape(key)
    value = cache.get(shape) if shape else None
    if value is not None:
        _remember(cache, key, value)
    return value


def _cached_spans(work: str, start: int, end: int):
    """work[start:end]'s spans as nltk's span_tokenize gives them (offsets into `work`), from
    the per-word caches; None where the piece must go to nltk whole."""
    words = list(_WORD_AFTER_SEPARATOR.finditer(work, start, end))
    tail = len(words) - 1
    while tail > 0 and not words[tail].group(1).strip(_FINAL_PERIOD_CLASS):
        tail -= 1  # (a piece of closing quotes and brackets only is all tail)
    tail_key = work[words[tail].start():end]
    tail_value = _TAIL_SPANS.get(tail_key)
    if tail_value is None:
        tail_value = _by_shape(_TAIL_SPANS, tail_key)
        if tail_value is None:
            return _probed_spans(work, end, words, tail)
    if tail_value is False:
        return None
    spans = []
    head_spans = _HEAD_SPANS
    for number in range(tail):
        word = words[number]
        first, last = word.span()
        key = work[first:last + 1]  # a head word has a separator after it
        value = head_spans.get(key)
        if value is None:  # (the hit stays inline: this loop runs for every word)
            value = _by_shape(head_spans, key)
            if value is None:
                return _probed_spans(work, end, words, tail)
        if value is _WHOLE:  # most words: inline, as _extend would append it
            spans.append(word.span(1))
        elif not _extend(spans, word, value):
            return None
    return spans if _extend(spans, words[tail], tail_value) else None


def _extend(spans: List[Tuple[int, int]], word, value) -> bool:
    """Appends to `spans` a word's (or the tail's) spans from its cache entry `value` (_WHOLE,
    or flat offsets from the word's first character); False for an entry that sends the piece to
    nltk whole."""
    if value is _WHOLE:
        spans.append(word.span(1))
    elif value:
        first = word.start(1)
        offsets = iter(value)
        spans += [(first + a, first + b) for a, b in zip(offsets, offsets)]
    else:
        return False
    return True


def _probed_spans(work: str, end: int, words, tail: int):
    """_cached_spans for a piece with words not in the caches: looks their shapes up, probes the
    rest and caches them all."""
    keys = [work[word.start():word.end() + 1] for word in words[:tail]]
    values = [_HEAD_SPANS.get(key) for key in keys]
    missing = {}  # key -> (word, shape), in order
    for number, key in enumerate(keys):
        if values[number] is None and key not in missing:
            shape = _shape(key)
            value = _HEAD_SPANS.get(shape) if shape else None
            if value is None:
                missing[key] = (words[number].group(1), shape)
            else:
                values[number] = value
                _remember(_HEAD_SPANS, key, value)
    tail_key = work[words[tail].start():end]
    tail_shape = _shape(tail_key)
    tail_value = _TAIL_SPANS.get(tail_key)
    if tail_value is None and tail_shape:
        tail_value = _TAIL_SPANS.get(tail_shape)
        if tail_value is not None:
            _remember(_TAIL_SPANS, tail_key, tail_value)
    if missing or tail_value is None:
        probed = _probe([(key, word) for key, (word, _) in missing.items()],
                        tail_key if tail_value is None else None, work[words[tail].start(1):end])
        if probed is None:
            return None
        computed = dict(zip(missing, probed))
        for key, value in computed.items():
            _remember(_HEAD_SPANS, key, value)
            if missing[key][1]:
                _remember(_HEAD_SPANS, missing[key][1], value)
        if tail_value is None:
            tail_value = probed[-1]
            _remember(_TAIL_SPANS, tail_key, tail_value)
            if tail_shape:
                _remember(_TAIL_SPANS, tail_shape, tail_value)
        values = [computed[key] if value is None else value for key, value in zip(keys, values)]
    spans: List[Tuple[int, int]] = []
    for word, value in zip(words, values):  # the head words (values holds theirs only)
        if not _extend(spans, word, value):
            return None
    return spans if _extend(spans, words[tail], tail_value) else None


def _remember(cache: dict, key: str, value) -> None:
    if len(key) > _KEY_LIMIT:
        return
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = value


def _probe(missing, tail_key, tail_text):
    """Cache entries for the `missing` [(key, word)] and, if `tail_key`, the tail (last): one
    nltk call on the keys (each a word with its separator characters, 2. above) one after the
    other, a _DELIMITER word between them (before each key that starts with its separator, and
    after the last head word, so that it is not the probe's tail). None if the tokens are not
    laid out as the keys are (a piece holding the delimiter)."""
    keys = [key for key, _ in missing] + ([tail_key] if tail_key is not None else [])
    if any(_DELIMITER in key for key in keys):
        return None
    parts = []
    for key in keys:
        if key[0].isspace():  # only the piece's first word has no separator before it
            parts.append(_DELIMITER)
        parts.append(key)
    if tail_key is None:
        parts.append(_DELIMITER)
    groups: List[List[str]] = [[]]
    for token in _words().tokenize("".join(parts)):
        if token == _DELIMITER:
            groups.append([])
        else:
            groups[-1].append(token)
    if keys[0][0].isspace():
        if groups[0]:
            return None
        del groups[0]
    if tail_key is None:
        if groups[-1]:
            return None
        del groups[-1]
    if len(groups) != len(keys):
        return None
    values = []
    for (_, word), tokens in zip(missing, groups):
        spans = _aligned(word, tokens)
        values.append(_WHOLE if spans == (0, len(word)) else spans or False)
    if tail_key is not None:
        values.append(_aligned(tail_text, groups[-1]) or False)
    return values


def _aligned(text: str, tokens: List[str]):
    """`tokens` (nltk's, of `text`) as spans in `text` (flat: start, end, start, ...), quotes
    put back as span_tokenize puts them back; None unless they spell `text` from its first
    character to its last non-whitespace one with only whitespace between them (3. above)."""
    if '"' in text or "''" in text:
        matched = _NLTK_QUOTES.findall(text)
        quotes = [number for number, token in enumerate(tokens) if token in _QUOTE_TOKENS]
        if len(quotes) != len(matched):
            return None
        tokens = list(tokens)
        for number, quote in zip(quotes, matched):
            tokens[number] = quote
    elif any(token in _QUOTE_TOKENS for token in tokens):
        return None  # backticks: whether nltk restores them depends on the rest of the piece
    spans = []
    position = 0
    for token in tokens:
        while position < len(text) and text[position].isspace():
            position += 1
        if not text.startswith(token, position):
            return None
        spans += (position, position + len(token))
        position += len(token)
    if not spans or text[position:].strip():
        return None
    return tuple(spans)


# Each fix in _fix_each_token needs one of these in the sentence: a period glued to the next word,
# a currency symbol before a digit (one is "$" or outside ASCII: the class is a superset of
# category Sc), "cannot" (nltk's can + not), or a token other than the last ending in a period
# (a word's period, a dotted abbreviation's). A sentence with none, most of them (no interior
# period), keeps its spans as they are, without three regex calls a token.
# (The period first, its lookbehind reading it again: a literal to scan for is 1.7x faster than
# a lookbehind tried at every character, the same matches.)
_FIX_TRIGGER = re.compile(r"\.(?<=[\d%)\]\"']\.)(?=[A-Z][a-z])|[^\w\s\x00-\x23\x25-\x7f]\d|(?i:cannot)")


def _conll_fixes(work: str, spans: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """The word tokenizer's spans of one sentence, cut and joined as CoNLL-2003 tokenizes."""
    if not spans or (not _FIX_TRIGGER.search(work, spans[0][0], spans[-1][1])
                     and (work.find(".", spans[0][0], spans[-1][0]) < 0  # no period before the last token
                          or not any(work[end - 1] == "." for _, end in spans[:-1]))):
        return spans
    return _fix_each_token(work, spans)


def _fix_each_token(work: str, spans: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
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
