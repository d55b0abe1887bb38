"""A generated financial-news corpus (PER, ORG, LOC, DATE, MONEY) for `fastner demo`.

Sentences come from templates whose slots are filled from fastner's own name lists
(fastner/demo/names.py); everything is drawn from one seeded random.Random, so a seed always
gives the same corpus. The held-out part draws names from the whole lists while the training
part sees only most of them, so the held-out F1 also measures names never seen in training.
"""
from __future__ import annotations

import random
from typing import Callable, Dict, List, Sequence, Tuple

from fastner.data.conll import Sentence
from fastner.data.schemes import spans_to_tags
from fastner.demo import names

ENTITY_TYPES = ("PER", "ORG", "LOC", "DATE", "MONEY")

# {SLOT} fills an entity of that type; other words are plain tokens (the templates are
# tokenised already: punctuation stands apart).
TEMPLATES = [
    "{ORG} said on {DATE} it would buy {ORG} for {MONEY} .",
    "Shares of {ORG} {UP} {PCT} percent in {LOC} after {ROLE} {PER} raised the outlook .",
    "{PER} , {ROLE} of {ORG} , told reporters in {LOC} that revenue reached {MONEY} .",
    "The {ORG} left interest rates unchanged on {DATE} , {PER} said .",
    "{ORG} shares {DOWN} {PCT} percent on {DATE} after the company cut its forecast .",
    "{ORG} agreed to pay {MONEY} to settle the case , the {ORG} said in {LOC} .",
    "Investors in {LOC} sold bonds on {DATE} as inflation in {LOC} climbed .",
    "{PER} will step down as {ROLE} of {ORG} on {DATE} .",
    "The deal values {ORG} at about {MONEY} , according to {PER} , {ROLE} at {ORG} .",
    "{ORG} opened a new plant in {LOC} worth {MONEY} .",
    "Analysts at {ORG} expect profit of {MONEY} for the quarter ending {DATE} .",
    "{PER} said demand in {LOC} remained weak .",
    "On {DATE} , {ORG} reported a net loss of {MONEY} .",
    "The {ORG} approved a loan of {MONEY} to {LOC} on {DATE} .",
    "{ORG} , based in {LOC} , hired {PER} as {ROLE} .",
    "Oil prices {UP} on {DATE} after talks between {LOC} and {LOC} .",
    "{PER} and {PER} met in {LOC} to discuss the merger of {ORG} and {ORG} .",
    "Trading in {LOC} was thin on {DATE} ahead of the holiday .",
    "{ORG} raised {MONEY} in its share sale , {PER} told the board .",
    "The stock {DOWN} {PCT} percent to close at {PRICE} in {LOC} .",
    "{ROLE} {PER} expects {ORG} to grow {PCT} percent next year .",
    "Profit at {ORG} {UP} to {MONEY} in the year to {DATE} .",
    "{LOC} fined {ORG} {MONEY} over the failed audit .",
    "Sales in {LOC} {DOWN} {PCT} percent , {ORG} said on {DATE} .",
    "{PER} bought {ORG} stock worth {MONEY} last week .",
    "The board of {ORG} meets in {LOC} on {DATE} .",
    "Markets were closed on {DATE} and will reopen on {DATE} .",
    "{ORG} cut {NUM} jobs in {LOC} , its {ROLE} {PER} said .",
    "A spokesman for {ORG} declined to comment .",
    "The company paid a dividend of {PRICE} a share .",
]


def _person(rng: random.Random, share: float) -> List[str]:
    first = _pick(rng, names.FIRST_NAMES, share)
    last = _pick(rng, names.LAST_NAMES, share)
    return [last] if rng.random() < 0.2 else [first, last]


def _org(rng: random.Random, share: float) -> List[str]:
    if rng.random() < 0.2:
        return _pick(rng, names.INSTITUTIONS, share).split()
    return [_pick(rng, names.ORG_STEMS, share), _pick(rng, names.ORG_SUFFIXES, 1.0)]


def _loc(rng: random.Random, share: float) -> List[str]:
    pool = names.CITIES if rng.random() < 0.6 else names.COUNTRIES
    return _pick(rng, pool, share).split()


def _date(rng: random.Random, share: float) -> List[str]:
    month = rng.choice(names.MONTHS)
    year = str(rng.randint(2015, 2027))
    day = str(rng.randint(1, 28))
    form = rng.randrange(4)
    if form == 0:
        return [rng.choice(names.WEEKDAYS)]
    if form == 1:
        return [month, day]
    if form == 2:
        return [day, month, year]
    return [month, year]


def _amount(rng: random.Random) -> str:
    return f"{rng.randint(1, 999)}" if rng.random() < 0.5 else f"{rng.randint(1, 99)}.{rng.randint(1, 9)}"


def _money(rng: random.Random, share: float) -> List[str]:
    scale = rng.choice(names.SCALES)
    if rng.random() < 0.5:
        return [rng.choice(names.CURRENCY_SYMBOLS), _amount(rng), scale]
    return [_amount(rng), scale, rng.choice(names.CURRENCY_WORDS)]


def _pick(rng: random.Random, pool: Sequence[str], share: float) -> str:
    # the first `share` of each list is what training sees; held-out draws from all of it
    return rng.choice(pool[: max(1, int(len(pool) * share))])


_ENTITIES: Dict[str, Callable[[random.Random, float], List[str]]] = {
    "PER": _person, "ORG": _org, "LOC": _loc, "DATE": _date, "MONEY": _money,
}
_WORDS: Dict[str, Callable[[random.Random], str]] = {
    "UP": lambda rng: rng.choice(names.VERBS_UP),
    "DOWN": lambda rng: rng.choice(names.VERBS_DOWN),
    "ROLE": lambda rng: rng.choice(names.ROLES),
    "PCT": lambda rng: f"{rng.randint(1, 15)}.{rng.randint(0, 9)}",
    "PRICE": lambda rng: f"{rng.randint(1, 300)}.{rng.randint(10, 99)}",
    "NUM": lambda rng: str(rng.randint(2, 90) * 100),
}


def generate_sentence(rng: random.Random, share: float = 1.0) -> Tuple[List[str], List[Tuple[int, int, str]]]:
    """One sentence: its tokens and entity spans (start, end exclusive, type)."""
    tokens: List[str] = []
    spans = []
    for piece in rng.choice(TEMPLATES).split():
        if piece.startswith("{") and piece.endswith("}"):
            slot = piece[1:-1]
            if slot in _ENTITIES:
                words = _ENTITIES[slot](rng, share)
                spans.append((len(tokens), len(tokens) + len(words), slot))
                tokens.extend(words)
            else:
                tokens.extend(_WORDS[slot](rng).split())
        else:
            tokens.append(piece)
    return tokens, spans


def generate_corpus(n_train: int = 1500, n_test: int = 400, seed: int = 0, scheme: str = "IOB2",
                    train_share: float = 0.8) -> Tuple[List[Sentence], List[Sentence]]:
    """(train, held-out) sentences with tags in `scheme`; the same seed gives the same corpus."""
    rng = random.Random(seed)

    def make(n: int, share: float) -> List[Sentence]:
        out = []
        for _ in range(n):
            tokens, spans = generate_sentence(rng, share)
            out.append(Sentence(tokens, spans_to_tags(spans, len(tokens), scheme)))
        return out

    train = make(n_train, train_share)
    return train, make(n_test, 1.0)


def generate_articles(n: int, seed: int = 0, share: float = 1.0, sentences: Tuple[int, int] = (2, 4),
                      rng: "random.Random | None" = None) -> List[Tuple[str, List[Tuple[int, int, str]]]]:
    """`n` raw-text articles of a few generated sentences each, printed as news copy
    (fastner.text.detokenize: "$3.2 billion", "Kestrel Pharma's"), with gold entity spans as
    character offsets (start, end exclusive, type) into the article."""
    from fastner.text import detokenize

    rng = rng or random.Random(seed)
    articles = []
    for _ in range(n):
        parts: List[str] = []
        spans: List[Tuple[int, int, str]] = []
        offset = 0
        for _ in range(rng.randint(*sentences)):
            tokens, token_spans = generate_sentence(rng, share)
            text, offsets = detokenize(tokens)
            spans.extend((offset + offsets[s][0], offset + offsets[e - 1][1], kind) for s, e, kind in token_spans)
            parts.append(text)
            offset += len(text) + 1
        articles.append((" ".join(parts), spans))
    return articles


def generate_article_corpus(n_train: int, n_test: int, seed: int = 0, train_share: float = 0.8):
    """(train, held-out) raw articles with character-offset spans; the same seed gives the same
    articles. The held-out part draws names from the whole lists (see generate_corpus)."""
    rng = random.Random(seed)
    return (generate_articles(n_train, share=train_share, rng=rng),
            generate_articles(n_test, share=1.0, rng=rng))
