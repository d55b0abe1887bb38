"""What Tagger.predict accepts and returns: raw documents or pre-tokenized sentences, one, a
list, or a stream.

    predict("raw text")                -> one document result
    predict({"text": ..., "tokens": [{"text", "start", "end"}, ...]})
                                       -> one document result over exactly those tokens
    predict(["raw text", ...])         -> a list of document results (str and records may mix)
    predict([["tok", ...], ...])       -> a list of sentence results (pre-tokenized, as before)
    predict(iterable of either kind)   -> a generator, reading ahead a bounded number of sentences
                                          (groups of ~STREAM_BATCHES x batch_size: a result comes
                                          when its group is read; `fastner tag` on a live pipe
                                          tags what has arrived instead: tag_io.arrived_groups)

A document is a str, tokenized by fastner.text, or a record as fastner.data.jsonl reads it (what
`fastner convert` and Prodigy write): {"text": str, "tokens": [{"text", "start", "end"}, ...]}
(other keys ignored; without "tokens" the text is tokenized). Given tokens are checked as
training checks them (fastner.data.jsonl.given_tokens: each text[start:end], in order, not
overlapping; whitespace-only ones skipped) and tagged as one sentence (a record of `convert` is
one sentence; longer than MAX_SENTENCE_TOKENS it is tagged in pieces, as raw text is); offsets
are the tokens' own. Tokens cut from text are read in their model_form; given tokens as given,
as training reads the same record (and CoNLL columns and token lists), so that a model trained
on a corpus tags it as it learnt it.
A document result: {"entities": [{"start", "end", "label", "text", "score"}], "sentences":
[{"start", "end", "tokens", "offsets", "tags"}]} with character offsets into the document
(`text == document[start:end]`) and `score` the posterior probability of exactly that span;
with nbest=k every sentence also has "nbest": [{"probability", "tags", "entities"}], best first.
A sentence result: {"tokens", "tags", "spans": [{"start", "end" (token indices, exclusive),
"type", "text", "confidence" (the span's posterior probability)}]} (+ "nbest").
Sentences of many documents are batched together; results come back in input order.
"""
from __future__ import annotations

import itertools
from collections.abc import MappingView, Set
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from fastner.data.jsonl import given_tokens
from fastner.data.schemes import convert_tags, tags_to_spans
from fastner.inference import Analyser, SentenceAnalysis, check_options
from fastner.text import Token, model_form, own_form, tokenize

# A stream is read in groups of about this many sentences per batch_size: bounded memory, and
# enough sentences to fill length-sorted batches.
STREAM_BATCHES = 8
# Longer runs of text without a sentence end are tagged in pieces of this many tokens.
MAX_SENTENCE_TOKENS = 512


def check_ordered(x, argument: str) -> None:
    """A TypeError naming `argument` for a collection without an order (set, frozenset): results
    come back in iteration order, which for a set is arbitrary, so they could not be told apart.
    Lists, tuples, iterators and generators are ordered, and so are a dict's views (insertion
    order)."""
    if isinstance(x, Set) and not isinstance(x, MappingView):
        raise TypeError(f"{argument} is a {type(x).__name__}, which has no order: the results could not be matched "
                        "to the inputs; pass a list (e.g. sorted(...))")


def predict(analyser: Analyser, x, output_scheme: str, batch_size: int = 64, nbest: Optional[int] = None,
            sentence_records: bool = True):
    """sentence_records=False: a document's result holds its "entities" only, without the
    per-sentence records (tokens, offsets, tags): what the server answers with nbest 1, spared
    building them (token lists' results are sentence results either way)."""
    check_options(batch_size, nbest)
    check_ordered(x, "predict(x)")
    if isinstance(x, (str, dict)):
        return _documents(analyser, [x], output_scheme, batch_size, nbest, ["predict(x)"], sentence_records)[0]
    if isinstance(x, (bytes, bytearray)):
        raise TypeError("predict() takes text as str; decode bytes first (e.g. data.decode('utf-8'))")
    if isinstance(x, (list, tuple)):
        items = list(x)
        return _run(analyser, items, _kind(items, 0), output_scheme, batch_size, nbest, 0, sentence_records)
    if isinstance(x, Iterable):
        return _stream(analyser, iter(x), output_scheme, batch_size, nbest, sentence_records)
    raise TypeError(f"predict() takes a document (str, or a {{\"text\", \"tokens\"}} record), a list of documents or "
                    f"of token lists, or an iterable of them, got {type(x).__name__}")


def _kind(items: Sequence, offset: int) -> str:
    """'documents' or 'sentences' for a homogeneous list; a TypeError naming the first odd item."""
    kind = None
    for number, item in enumerate(items, start=offset):
        if isinstance(item, (str, dict)):  # a dict: a {"text", "tokens"} record, checked by document_sentences
            this = "documents"
        elif isinstance(item, (list, tuple)):
            odd = next((i for i, t in enumerate(item) if not isinstance(t, str)), None)
            if odd is not None:
                raise TypeError(f"item {number}: token {odd} is {type(item[odd]).__name__}, expected str")
            this = "sentences"
        else:
            raise TypeError(f"item {number}: expected a document (str or {{\"text\", \"tokens\"}} record) or a list "
                            f"of token strings, got {type(item).__name__}")
        if kind is not None and this != kind:
            raise TypeError(f"item {number}: a {'document' if this == 'documents' else 'token list'} among "
                            f"{kind}; pass raw documents and token lists in separate calls")
        kind = this
    return kind or "documents"


def token_lists(sentences) -> List[List[str]]:
    """What tag() takes, checked: a list (or iterable) of token lists. A TypeError naming the
    first odd item otherwise: a str would be tagged as one sentence per character, and a
    non-str token failed deep inside the vocabulary lookup."""
    if isinstance(sentences, (str, bytes, bytearray, dict)) or not isinstance(sentences, Iterable):
        raise TypeError(f"tag() takes a list of token lists (each a list of str), got {type(sentences).__name__}; "
                        "tag raw text with predict()")
    check_ordered(sentences, "tag(sentences)")
    items = list(sentences)
    if _kind(items, 0) == "documents" and items:
        raise TypeError("item 0: a document (str or record); tag() takes token lists (each a list of str), "
                        "tag documents with predict()")
    return [list(s) for s in items]


def _run(analyser, items, kind, output_scheme, batch_size, nbest, offset: int, sentence_records: bool = True) -> List[dict]:
    """Results of a homogeneous list; `offset`: the number of its first item, for messages."""
    if kind == "sentences":
        sentences = [list(s) for s in items]
        # long ones in pieces, as documents' (span scoring costs a pass over the sentence per span:
        # one 32,000-token line of `fastner tag --input tokens` ran for minutes, 1 MB for an hour)
        pieces = [_bounded([sentence]) or [sentence] for sentence in sentences]
        analyses = iter(analyser.analyse([piece for parts in pieces for piece in parts], batch_size, nbest))
        return [sentence_result(tokens, _joined([next(analyses) for _ in parts], nbest), output_scheme)
                for tokens, parts in zip(sentences, pieces)]
    return _documents(analyser, items, output_scheme, batch_size, nbest,
                      [f"item {number}" for number in range(offset, offset + len(items))], sentence_records)


def _joined(pieces: List[SentenceAnalysis], nbest: Optional[int]) -> SentenceAnalysis:
    """One sentence's analysis from those of its pieces: tags and spans joined; the pieces are
    tagged independently, so the k best of the whole are the k best products of theirs."""
    if len(pieces) == 1:
        return pieces[0]
    tags: List[str] = []
    spans = []
    best = [(1.0, [])]
    for piece in pieces:
        spans.extend((start + len(tags), end + len(tags), label, p) for start, end, label, p in piece.spans)
        tags.extend(piece.tags)
        if nbest:
            best = sorted(((p * q, path + other) for p, path in best for q, other in piece.nbest),
                          key=lambda pair: -pair[0])[:nbest]
    return SentenceAnalysis(tags, spans, [(round(p, 6), path) for p, path in best] if nbest else [])


def stream_budget(batch_size: int) -> int:
    """How many sentences a stream's group holds (sentence_estimate of its items)."""
    return STREAM_BATCHES * batch_size


def sentence_estimate(item) -> int:
    """Sentences in a stream's item, estimated before tokenizing: ~80 characters a sentence of a
    document, 1 for a pre-tokenized sentence, a record's pieces for a record with tokens."""
    if isinstance(item, dict):
        tokens, text = item.get("tokens"), item.get("text")
        if isinstance(tokens, list):
            return len(tokens) // MAX_SENTENCE_TOKENS + 1
        item = text if isinstance(text, str) else ""
    return len(item) // 80 + 1 if isinstance(item, str) else 1


def _stream(analyser, items: Iterator, output_scheme, batch_size, nbest, sentence_records: bool = True) -> Iterator[dict]:
    budget = stream_budget(batch_size)
    seen = 0
    while True:
        group, sentences = [], 0
        for item in items:
            group.append(item)
            sentences += sentence_estimate(item)
            if sentences >= budget:
                break
        if not group:
            return
        kind = _kind(group, seen)
        offset, seen = seen, seen + len(group)
        yield from _run(analyser, group, kind, output_scheme, batch_size, nbest, offset, sentence_records)


def _bounded(sentences: List[list]) -> List[list]:
    """Sentences cut into pieces of at most MAX_SENTENCE_TOKENS tokens: text without sentence
    ends (a table, a log) would otherwise reach the model as one sequence of any length."""
    out = []
    for sentence in sentences:
        for begin in range(0, len(sentence), MAX_SENTENCE_TOKENS):
            out.append(sentence[begin : begin + MAX_SENTENCE_TOKENS])
    return out


def _as_given(token: str) -> str:
    return token


def document_sentences(document: Union[str, dict], where: str) -> Tuple[str, List[List[Token]], Callable[[str], str]]:
    """(text, sentences of (token, start, end), the form the model reads each token in) of a
    document: a str tokenized by fastner.text, a record one sentence of its given tokens, read as
    given (or its text tokenized, without "tokens"). A TypeError or ValueError (DataFormatError)
    naming `where` for a malformed record."""
    if isinstance(document, str):
        return document, tokenize(document), model_form
    text = document.get("text")
    if not isinstance(text, str):
        found = "none" if text is None else type(text).__name__
        raise TypeError(f"{where}: a document record needs a \"text\" string, got {found}")
    tokens = given_tokens(document, where)
    if tokens is None:
        return text, tokenize(text), model_form
    # one sentence, as `fastner convert` writes and training reads a record with tokens: the
    # user's sentence boundaries, not the splitter's (which cut "ST. LOUIS" in two)
    return text, [tokens] if tokens else [], _as_given


def _documents(analyser, documents: List[Union[str, dict]], output_scheme, batch_size, nbest,
               names: List[str], sentence_records: bool = True) -> List[dict]:
    """Document results; names[i]: how a message calls documents[i]."""
    texts, tokenized, flat = [], [], []
    for document, name in zip(documents, names):
        text, sentences, form = document_sentences(document, name)
        texts.append(text)
        tokenized.append(_bounded(sentences))
        if form is model_form and own_form(text):  # every token its own form: no call per token
            flat.extend([token for token, _, _ in sentence] for sentence in tokenized[-1])
        else:
            flat.extend([form(token) for token, _, _ in sentence] for sentence in tokenized[-1])
    analyses = iter(analyser.analyse(flat, batch_size, nbest))
    results = []
    for text, sentences in zip(texts, tokenized):
        results.append(document_result(text, sentences, list(itertools.islice(analyses, len(sentences))),
                                       output_scheme, nbest, sentence_records))
    return results


def _entities(document: str, offsets, spans) -> List[dict]:
    out = []
    for span in spans:
        start, end, label = span[:3]
        begin, finish = offsets[start][0], offsets[end - 1][1]
        entity = {"start": begin, "end": finish, "label": label, "text": document[begin:finish]}
        if len(span) > 3:
            entity["score"] = span[3]
        out.append(entity)
    return out


def document_result(document: str, sentences, analyses: List[SentenceAnalysis], output_scheme: str,
                    nbest: Optional[int], sentence_records: bool = True) -> dict:
    entities, records = [], []
    for sentence, analysis in zip(sentences, analyses):
        offsets = [(start, end) for _, start, end in sentence]
        entities.extend(_entities(document, offsets, analysis.spans))
        if not sentence_records:
            continue
        record = {"start": offsets[0][0], "end": offsets[-1][1], "tokens": [t for t, _, _ in sentence],
                  "offsets": [list(o) for o in offsets], "tags": convert_tags(analysis.tags, output_scheme)}
        if nbest:
            record["nbest"] = [{"probability": p, "tags": convert_tags(tags, output_scheme),
                                "entities": _entities(document, offsets, tags_to_spans(tags))}
                               for p, tags in analysis.nbest]
        records.append(record)
    return {"entities": entities, "sentences": records} if sentence_records else {"entities": entities}


def sentence_result(tokens: List[str], analysis: SentenceAnalysis, output_scheme: str) -> dict:
    spans = [{"start": s, "end": e, "type": label, "text": " ".join(tokens[s:e]), "confidence": p}
             for s, e, label, p in analysis.spans]
    result = {"tokens": tokens, "tags": convert_tags(analysis.tags, output_scheme), "spans": spans}
    if analysis.nbest:
        result["nbest"] = [{"probability": p, "tags": convert_tags(tags, output_scheme)} for p, tags in analysis.nbest]
    return result
