"""How closely fastner.text reproduces CoNLL-2003's own tokenization.

Each sentence of a CoNLL file is detokenized into the text a news article would have printed
(detokenize(): no space before `,` `.` `'s` `%` and the like, none after `(` or `$`, quotes
glued to what they enclose), tokenized again, and compared token by token: a gold token agrees
when a token with exactly its character span comes back.

    python -m fastner.text.agreement ../shared/data/conll2003/eng.train ../shared/data/conll2003/eng.testa

`--tokenizer syntok|nltk` measures the two libraries alone (syntok's segmenter and word
tokenizer; nltk's NLTKWordTokenizer on the whole sentence) for the comparison in the README.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Dict, List, Sequence, Tuple

from fastner.text.detokenize import detokenize

Span = Tuple[int, int]

def _fastner_spans(text: str) -> List[Span]:
    from fastner.text import tokenize

    return [(a, b) for sentence in tokenize(text) for _, a, b in sentence]


def _syntok_spans(text: str) -> List[Span]:
    from syntok import segmenter

    return [(t.offset, t.offset + len(t.value)) for paragraph in segmenter.analyze(text)
            for sentence in paragraph for t in sentence]


def _nltk_spans(text: str) -> List[Span]:
    from nltk.tokenize import NLTKWordTokenizer

    return list(NLTKWordTokenizer().span_tokenize(text))


TOKENIZERS: Dict[str, Callable[[str], List[Span]]] = {
    "fastner": _fastner_spans, "syntok": _syntok_spans, "nltk": _nltk_spans,
}


def measure(sentences: Sequence[Sequence[str]], tokenizer: str = "fastner", examples: int = 0) -> dict:
    """{'gold_tokens', 'predicted_tokens', 'identical', 'agreement' (identical / gold, %),
    'sentences_identical' (%)} and up to `examples` differing sentences."""
    split = TOKENIZERS[tokenizer]
    gold_total = predicted_total = identical = whole = 0
    differing = []
    for tokens in sentences:
        text, gold = detokenize(tokens)
        predicted = split(text)
        hits = len(set(gold) & set(predicted))
        gold_total += len(gold)
        predicted_total += len(predicted)
        identical += hits
        if hits == len(gold) == len(predicted):
            whole += 1
        elif len(differing) < examples:
            differing.append({"text": text, "gold": list(tokens), "predicted": [text[a:b] for a, b in predicted]})
    return {
        "tokenizer": tokenizer,
        "sentences": len(sentences),
        "gold_tokens": gold_total,
        "predicted_tokens": predicted_total,
        "identical": identical,
        "agreement": round(100.0 * identical / max(1, gold_total), 2),
        "sentences_identical": round(100.0 * whole / max(1, len(sentences)), 2),
        "examples": differing,
    }


def main(argv=None) -> int:
    from fastner.data.conll import read_conll

    parser = argparse.ArgumentParser(prog="python -m fastner.text.agreement", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="CoNLL files (tokens in the first column)")
    parser.add_argument("--tokenizer", choices=sorted(TOKENIZERS), default="fastner")
    parser.add_argument("--examples", type=int, default=0, help="print up to N differing sentences")
    args = parser.parse_args(argv)
    sentences = [s.tokens for path in args.files for s in read_conll(path, tag_column=None)]
    result = measure(sentences, args.tokenizer, args.examples)
    for example in result.pop("examples"):
        print(f"{example['text']}\n  gold:      {' | '.join(example['gold'])}\n  predicted: {' | '.join(example['predicted'])}",
              file=sys.stderr)
    result["files"] = args.files
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
