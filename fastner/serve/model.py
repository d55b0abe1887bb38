"""The one place the server calls the model: raw document texts -> entities with character offsets.

Interim adapter, until raw-text `Tagger.predict` (issue 16, branch `text`) lands on main: a
regex tokenizer that keeps character offsets, a naive sentence split after `.` `!` `?`, and
today's `Tagger.predict` on the pre-tokenized sentences; token spans are mapped back to
character offsets here. When raw-text prediction lands, `predict_documents` becomes
`tagger.predict(texts, nbest=nbest)` and `count_tokens` calls `fastner.text.tokenize`: nothing
else in fastner.serve knows how the model is called.

A document's result: {"entities": [{"start", "end", "label", "text", "score"}]} with
`text == document[start:end]` (end exclusive).
"""
from __future__ import annotations

import re
from typing import List, Sequence, Tuple

# A word with inner hyphens, apostrophes, dots or commas kept (`3.2`, `1,000`, `Lindqvist-Berg`),
# or any other single non-space character (punctuation and symbols stand alone, as in CoNLL).
_TOKEN = re.compile(r"\w+(?:[-'.,]\w+)*|[^\w\s]")
_SENTENCE_END = frozenset(".!?")

# k-best analyses need raw-text Tagger.predict(nbest=k) (issue 16); until then one analysis.
MAX_NBEST = 1


def _sentences(text: str) -> List[List[Tuple[str, int, int]]]:
    """text -> sentences of (token, start, end) with text[start:end] == token."""
    sentences: List[List[Tuple[str, int, int]]] = []
    current: List[Tuple[str, int, int]] = []
    for match in _TOKEN.finditer(text):
        current.append((match.group(), match.start(), match.end()))
        if match.group() in _SENTENCE_END:
            sentences.append(current)
            current = []
    if current:
        sentences.append(current)
    return sentences


def count_tokens(text: str) -> int:
    """Tokens the model will see for `text`: what batching and the length limit count."""
    return sum(1 for _ in _TOKEN.finditer(text))


def predict_documents(tagger, texts: Sequence[str], nbest: int = 1) -> List[dict]:
    """Per document, in order: {"entities": [{"start", "end", "label", "text", "score"}]}.

    The sentences of all documents go to the model together (one call, sorted by length
    inside Tagger.predict), and the results are put back per document.
    """
    if not 1 <= nbest <= MAX_NBEST:
        raise ValueError(f"nbest must be between 1 and {MAX_NBEST}, got {nbest}")
    per_document = [_sentences(text) for text in texts]
    flat = [[token for token, _, _ in sentence] for sentences in per_document for sentence in sentences]
    predictions = iter(tagger.predict(flat, batch_size=max(1, len(flat))) if flat else [])
    results = []
    for text, sentences in zip(texts, per_document):
        entities = []
        for sentence in sentences:
            for span in next(predictions)["spans"]:
                start, end = sentence[span["start"]][1], sentence[span["end"] - 1][2]
                entities.append({"start": start, "end": end, "label": span["type"], "text": text[start:end],
                                 "score": span["confidence"]})
        results.append({"entities": entities})
    return results
