"""The raw-text tokenizer's word step (fastner.text.tokenizer._word_spans) against the one it
replaced (_reference_word_spans: every piece through nltk's span_tokenize whole), and whether
they agree.

    python -m benchmarks.word_spans [--conll ../shared/data/conll2003] [--rounds 7] [--check]

Workloads (working copies and sentence ranges made once, outside the timing; only the word
step is timed, with the thread's CPU clock, per document):
  - sentences: the load test's documents, eng.testa's first 1,500 sentences detokenized
    (fastner.serve.loadtest.load_documents, ~91 characters each);
  - articles: eng.testa's documents (between -DOCSTART- lines), sentences detokenized and joined
    with spaces: multi-sentence news text;
  - demo: fastner.demo.generate_articles(300, seed=0).
Each round times, one after the other so that all see the same load: the reference; the new
step with its caches emptied first (cold: every word new); the new step again (warm: the caches
the cold pass left); for the CoNLL workloads the new step with its caches emptied and then filled
by eng.train's sentences (primed: a server that has read other news, tested on unseen text).
Also tokenize() whole on the sentences, reference word step vs new (cold, warm). Medians over rounds.

--check: also compares the two on every sentence of eng.train and eng.testa and on the
workloads (the slow test in tests/test_text.py does the same and more).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Dict, List, Tuple

from fastner.text import tokenizer

Document = Tuple[str, List[Tuple[int, int]]]  # working copy, sentence ranges


def conll_sentences(path: str) -> List[List[str]]:
    from fastner.data.conll import read_conll

    return [s.tokens for s in read_conll(path, tag_column=None)]


def conll_articles(path: str) -> List[str]:
    """The file's documents (read_conll drops the -DOCSTART- lines that separate them), each
    its sentences detokenized and joined with spaces."""
    from fastner.serve.loadtest import detokenize

    articles: List[List[List[str]]] = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            columns = line.split()
            if not columns:
                if articles and articles[-1] and articles[-1][-1]:
                    articles[-1].append([])
            elif columns[0] == "-DOCSTART-":
                articles.append([[]])
            elif articles:
                articles[-1][-1].append(columns[0])
    return [" ".join(detokenize(tokens) for tokens in article if tokens) for article in articles if any(article)]


def prepared(texts: List[str]) -> List[Document]:
    out = []
    for text in texts:
        work = tokenizer.working_copy(text)
        out.append((work, list(tokenizer._sentence_ranges(work))))
    return out


def word_pass(documents: List[Document], word_spans: Callable) -> float:
    """Thread CPU microseconds per document of the word step over `documents`."""
    start = time.thread_time_ns()
    for work, ranges in documents:
        for a, b in ranges:
            word_spans(work, a, b)
    return (time.thread_time_ns() - start) / 1000 / len(documents)


def clear_caches() -> None:
    tokenizer._HEAD_SPANS.clear()
    tokenizer._TAIL_SPANS.clear()


def tokenize_pass(texts: List[str], reference: bool) -> float:
    saved = tokenizer._word_spans
    if reference:
        tokenizer._word_spans = tokenizer._reference_word_spans
    try:
        start = time.thread_time_ns()
        for text in texts:
            tokenizer.tokenize(text)
        return (time.thread_time_ns() - start) / 1000 / len(texts)
    finally:
        tokenizer._word_spans = saved


def count_differences(name: str, cases: List, fast: Callable, reference: Callable, unit: str,
                      show: Callable = str) -> int:
    """How many of `cases` the fast path answers differently from its reference (fast(case) !=
    reference(case)); prints the first five (show(case), cut to 200 characters) and the count."""
    differ = 0
    for case in cases:
        if fast(case) != reference(case):
            differ += 1
            if differ <= 5:
                print(f"  DIFFERENT in {name}: {show(case)[:200]!r}")
    print(f"check {name}: {len(cases)} {unit}, {differ} different")
    return differ


def check(name: str, documents: List[Document]) -> int:
    sentences = [(work, a, b) for work, ranges in documents for a, b in ranges]
    return count_differences(name, sentences, lambda s: tokenizer._word_spans(*s),
                             lambda s: tokenizer._reference_word_spans(*s), "sentences",
                             show=lambda s: s[0][s[1]:s[2]])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conll", default=os.path.join("..", "shared", "data", "conll2003"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prime", type=int, default=14000, help="eng.train sentences that prime the caches")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)

    from fastner.demo import generate_articles
    from fastner.serve.loadtest import load_documents

    testa = os.path.join(args.conll, "eng.testa")
    train = os.path.join(args.conll, "eng.train")
    texts: Dict[str, List[str]] = {
        "sentences": load_documents(testa, 1500),
        "articles": conll_articles(testa),
        "demo": [text for text, _ in generate_articles(300, seed=0)],
    }
    workloads = {name: prepared(batch) for name, batch in texts.items()}
    from fastner.serve.loadtest import detokenize

    primer = prepared([detokenize(tokens) for tokens in conll_sentences(train)[:args.prime]])
    tokenizer._words()  # nltk imported and its rules compiled before any timing
    for name, documents in workloads.items():
        characters = sum(len(work) for work, _ in documents) / len(documents)
        print(f"{name}: {len(documents)} documents, {characters:.0f} characters each")

    times: Dict[Tuple[str, str], List[float]] = {}
    for _ in range(args.rounds):
        for name, documents in workloads.items():
            times.setdefault((name, "reference"), []).append(word_pass(documents, tokenizer._reference_word_spans))
            clear_caches()
            times.setdefault((name, "new, cold"), []).append(word_pass(documents, tokenizer._word_spans))
            times.setdefault((name, "new, warm"), []).append(word_pass(documents, tokenizer._word_spans))
            if name != "demo":
                clear_caches()
                word_pass(primer, tokenizer._word_spans)
                times.setdefault((name, "new, primed"), []).append(word_pass(documents, tokenizer._word_spans))
        times.setdefault(("tokenize() sentences", "reference"), []).append(tokenize_pass(texts["sentences"], True))
        clear_caches()
        times.setdefault(("tokenize() sentences", "new, cold"), []).append(tokenize_pass(texts["sentences"], False))
        times.setdefault(("tokenize() sentences", "new, warm"), []).append(tokenize_pass(texts["sentences"], False))
    print(f"\nthread CPU us per document, median of {args.rounds} rounds (min-max); load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| workload | step | us / document | vs reference |")
    print("|---|---|---|---|")
    for (name, step), values in times.items():
        median = statistics.median(values)
        reference = statistics.median(times[(name, "reference")])
        print(f"| {name} | {step} | {median:.1f} ({min(values):.1f}-{max(values):.1f}) | {reference / median:.2f}x |")
    print(f"caches after the last pass: {len(tokenizer._HEAD_SPANS)} words, {len(tokenizer._TAIL_SPANS)} tails")

    if args.check:
        differ = 0
        for name, documents in workloads.items():
            clear_caches()
            differ += check(name, documents)
        for name in ("eng.train", "eng.testa"):
            sentences = conll_sentences(os.path.join(args.conll, name))
            differ += check(name, prepared([detokenize(tokens) for tokens in sentences]))
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
