"""The raw-text tokenizer's sentence split (fastner.text.tokenizer._sentence_ranges) with its
fast paths against syntok on every paragraph whole (fast=False), and whether they agree.

    python -m benchmarks.sentence_split [--conll ../shared/data/conll2003] [--rounds 7] [--check]

The fast paths: _certain_pieces cuts a paragraph after the sentence ends syntok always splits
at; _one_sentence_start reads a piece with no sentence end in it (short bracketed groups and
abbreviation stops allowed) without syntok; the rest goes to syntok piece by piece.
Workloads (working copies made once, outside the timing; thread CPU per document):
  - sentences: the load test's documents, eng.testa's first 1,500 sentences detokenized;
  - runs: eng.testa's sentences run together with spaces, 2 to 8 at a time (seeded): news
    paragraphs of several sentences;
  - articles: eng.testa's documents, sentences joined with spaces (benchmarks.word_spans);
  - demo: fastner.demo.generate_articles(300, seed=0).
Each round times the fast split and the reference one after the other, alternating which goes
first. Prints medians over rounds, and how many paragraph pieces syntok still reads.

--check: also compares the two on every document of the workloads and every sentence of
eng.train and eng.testa, alone and in runs (tests/test_text.py does the same and more).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from typing import Dict, List

from fastner.text import tokenizer


def runs_of_sentences(sentences: List[str], seed: int = 1) -> List[str]:
    rng = random.Random(seed)
    out, begin = [], 0
    while begin < len(sentences):
        count = rng.randint(2, 8)
        out.append(" ".join(sentences[begin:begin + count]))
        begin += count
    return out


def split_pass(works: List[str], fast: bool) -> float:
    """Thread CPU microseconds per document of the sentence split over `works`."""
    start = time.thread_time_ns()
    for work in works:
        for _ in tokenizer._sentence_ranges(work, fast):
            pass
    return (time.thread_time_ns() - start) / 1000 / len(works)


def syntok_pieces(works: List[str]) -> str:
    """How many of the fast split's pieces go to syntok, of how many paragraphs."""
    paragraphs = pieces = to_syntok = 0
    for work in works:
        segmented = tokenizer._DECIMAL_POINT.sub(",", work)
        for begin, finish in tokenizer._paragraphs(work):
            paragraphs += 1
            for piece_begin, piece_end in tokenizer._certain_pieces(segmented, begin, finish):
                pieces += 1
                to_syntok += tokenizer._one_sentence_start(segmented, piece_begin, piece_end) is None
    return f"{paragraphs} paragraphs, {pieces} pieces, {to_syntok} to syntok ({to_syntok / max(1, pieces):.0%})"


def check(name: str, works: List[str]) -> int:
    from benchmarks.word_spans import count_differences

    return count_differences(name, works, lambda work: list(tokenizer._sentence_ranges(work)),
                             lambda work: list(tokenizer._sentence_ranges(work, fast=False)), "documents")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conll", default=os.path.join("..", "shared", "data", "conll2003"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)

    from benchmarks.word_spans import conll_articles, conll_sentences
    from fastner.demo import generate_articles
    from fastner.serve.loadtest import detokenize, load_documents

    testa = os.path.join(args.conll, "eng.testa")
    sentences = load_documents(testa, 1500)
    texts: Dict[str, List[str]] = {
        "sentences": sentences,
        "runs": runs_of_sentences(sentences),
        "articles": conll_articles(testa),
        "demo": [text for text, _ in generate_articles(300, seed=0)],
    }
    workloads = {name: [tokenizer.working_copy(text) for text in batch] for name, batch in texts.items()}
    for works in workloads.values():  # syntok imported, the patterns compiled before any timing
        split_pass(works, True)
        split_pass(works, False)
    for name, works in workloads.items():
        characters = sum(len(work) for work in works) / len(works)
        print(f"{name}: {len(works)} documents, {characters:.0f} characters each; {syntok_pieces(works)}")

    times: Dict[str, Dict[str, List[float]]] = {name: {"syntok whole": [], "fast paths": []} for name in workloads}
    for number in range(args.rounds):
        for name, works in workloads.items():
            for fast in (True, False) if number % 2 else (False, True):
                times[name]["fast paths" if fast else "syntok whole"].append(split_pass(works, fast))
    print(f"\nthread CPU us per document, median of {args.rounds} rounds (min-max); load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| workload | syntok whole | fast paths | speed-up |")
    print("|---|---|---|---|")
    for name, by_way in times.items():
        slow, fast = (statistics.median(by_way[way]) for way in ("syntok whole", "fast paths"))
        spans = {way: f"{min(values):.1f}-{max(values):.1f}" for way, values in by_way.items()}
        print(f"| {name} | {slow:.1f} ({spans['syntok whole']}) | {fast:.1f} ({spans['fast paths']}) | {slow / fast:.2f}x |")

    if args.check:
        differ = sum(check(name, works) for name, works in workloads.items())
        for name in ("eng.train", "eng.testa"):
            alone = [detokenize(tokens) for tokens in conll_sentences(os.path.join(args.conll, name))]
            differ += check(name, [tokenizer.working_copy(text) for text in alone])
            differ += check(f"{name} runs", [tokenizer.working_copy(text) for text in runs_of_sentences(alone)])
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
