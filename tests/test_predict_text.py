"""Tagger.predict on raw documents: character offsets, exact span scores, k-best, batching
across documents, streaming."""
import itertools
import math

import pytest
import torch

from fastner.demo import generate_corpus
from fastner.tagger import Tagger
from fastner.train import TrainConfig, train


# tiny models: see conftest.one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


def _train(out, head="crf", scheme="BIOES"):
    train_data, held_out = generate_corpus(150, 15, seed=5)
    config = TrainConfig(epochs=3, batch_size=8, seed=3, optimizer="adam", lr=0.03, word_dim=8, scheme=scheme,
                         model={"hidden": 8, "char_filters": 6, "char_dim": 6, "head": head})
    train(train_data, held_out, str(out), config, log=lambda _: None)
    return Tagger.load(str(out), device="cpu")


@pytest.fixture(scope="module")
def tagger(demo_tagger_dir):
    return Tagger.load(str(demo_tagger_dir), device="cpu")


@pytest.fixture(scope="module")
def softmax_tagger(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("softmax"), head="softmax", scheme="IOB2")


ARTICLES = [
    "Shares of Kestrel Pharma jumped 4.2% in Frankfurt on Tuesday after Ingrid Lindqvist raised the outlook. "
    "Altamira Holdings agreed to buy Crescent Logistics for $3.2 billion, chief executive Omar Haddad said.",
    "",
    "The European Central Bank will decide on 12 June 2025 whether to lend 40 billion euros to Norway.\n\n"
    "Tesla's shares rose 3% to $250.10 on Monday, CEO Elon Musk said. Apple (AAPL) fell.",
    "\u00a0Bad\x00bytes\u200b and \u201cquotes\u201d in Oslo\u2014fine.",
]


def check_document(document, result):
    assert set(result) >= {"entities", "sentences"}
    for entity in result["entities"]:
        assert set(entity) == {"start", "end", "label", "text", "score"}
        assert document[entity["start"]:entity["end"]] == entity["text"]
        assert 0.0 <= entity["score"] <= 1.0
    for sentence in result["sentences"]:
        assert len(sentence["tokens"]) == len(sentence["offsets"]) == len(sentence["tags"])
        for token, (start, end) in zip(sentence["tokens"], sentence["offsets"]):
            assert document[start:end] == token


def test_raw_document(tagger):
    result = tagger.predict(ARTICLES[0])
    check_document(ARTICLES[0], result)
    assert len(result["sentences"]) == 2
    assert result["sentences"][0]["tokens"][5:7] == ["4.2", "%"]
    assert result["entities"], "the demo-trained model finds entities in demo-like text"


def test_list_of_documents_batched_like_one_at_a_time(tagger):
    together = tagger.predict(ARTICLES, batch_size=3)
    assert len(together) == len(ARTICLES)
    assert together[1] == {"entities": [], "sentences": []}
    for document, result in zip(ARTICLES, together):
        check_document(document, result)
        alone = tagger.predict(document, batch_size=64)
        assert [(e["start"], e["end"], e["label"]) for e in alone["entities"]] == \
               [(e["start"], e["end"], e["label"]) for e in result["entities"]]
        for a, b in zip(alone["entities"], result["entities"]):
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_entities_only_results_are_the_full_results_entities(tagger):
    """fastner.documents.predict(..., sentence_records=False) (what the server answers with nbest 1)
    leaves out the per-sentence records and nothing else: one document, a list, a stream."""
    from fastner.documents import predict

    analyser = tagger.analyser()
    full = predict(analyser, ARTICLES, tagger.output_scheme, 3)
    lean = predict(analyser, ARTICLES, tagger.output_scheme, 3, sentence_records=False)
    assert lean == [{"entities": result["entities"]} for result in full]
    assert any(result["entities"] for result in lean)
    assert predict(analyser, ARTICLES[0], tagger.output_scheme, sentence_records=False) == lean[0]
    # Batches of 2 instead of 3: the same spans; scores to float rounding only (a sentence's
    # batch sets the row counts of the encoder's products and which CRF kernel runs, B < 3 per
    # sequence: ~2e-7 apart, enough to move a score's 6-decimal rounding)
    streamed = list(predict(analyser, iter(ARTICLES), tagger.output_scheme, 2, sentence_records=False))
    spans = [[{k: v for k, v in e.items() if k != "score"} for e in r["entities"]] for r in streamed]
    assert spans == [[{k: v for k, v in e.items() if k != "score"} for e in r["entities"]] for r in lean]
    for got, want in zip(streamed, lean):
        assert [e["score"] for e in got["entities"]] == pytest.approx([e["score"] for e in want["entities"]],
                                                                      abs=2e-6)


def test_stream_is_lazy_and_in_order(tagger):
    consumed = []

    def documents():
        for number in itertools.count():
            consumed.append(number)
            yield ARTICLES[number % len(ARTICLES)]

    stream = tagger.predict(documents(), batch_size=2)
    first = [next(stream) for _ in range(10)]
    assert len(consumed) < 100  # read ahead a bounded amount, not the endless input
    for number, result in enumerate(first):
        assert result == tagger.predict(ARTICLES[number % len(ARTICLES)], batch_size=2) or \
            [e["text"] for e in result["entities"]] == [e["text"] for e in tagger.predict(ARTICLES[number % len(ARTICLES)])["entities"]]
    assert list(tagger.predict(iter([]))) == []
    tokens = list(tagger.predict(iter([["Oslo", "rose", "."], ["Tesla", "fell"]])))
    assert [r["tokens"] for r in tokens] == [["Oslo", "rose", "."], ["Tesla", "fell"]]


def test_score_is_the_exact_span_posterior(tagger):
    """The span's score against enumeration of all tag paths of a short sentence."""
    from fastner.data.schemes import tags_to_spans

    document = "Haddad left Oslo"  # 3 tokens: K**3 paths to enumerate
    result = tagger.predict(document)
    tokens = result["sentences"][0]["tokens"]
    model, itos = tagger.model, tagger.tags.itos
    analyser = tagger.analyser()
    from fastner.data.batching import encode_sentences, make_batch
    from fastner.data.conll import Sentence

    batch = make_batch(encode_sentences([Sentence(tokens)], tagger.words, tagger.chars), [0],
                       tagger.words.pad_id, tagger.chars.pad_id)
    with torch.no_grad():
        _, _, emissions = model.infer(batch.words, batch.chars, batch.lengths)
    transitions, start, end = (t.double() for t in model.transition_scores())
    e = emissions[0].double()
    weights = {}
    for path in itertools.product(range(len(itos)), repeat=len(tokens)):
        score = start[path[0]] + e[0, path[0]] + end[path[-1]]
        for t in range(1, len(path)):
            score = score + transitions[path[t - 1], path[t]] + e[t, path[t]]
        weights[path] = float(score)
    finite = [w for w in weights.values() if w > float("-inf")]
    top = max(finite)
    log_z = top + math.log(sum(math.exp(w - top) for w in finite))
    offsets = result["sentences"][0]["offsets"]
    for entity in result["entities"]:
        first = next(i for i, (s, _) in enumerate(offsets) if s == entity["start"])
        last = next(i for i, (_, f) in enumerate(offsets) if f == entity["end"]) + 1
        exact = sum(math.exp(w - log_z) for path, w in weights.items() if w > float("-inf")
                    and (first, last, entity["label"]) in tags_to_spans([itos[i] for i in path]))
        assert entity["score"] == pytest.approx(exact, abs=2e-5)
    # every possible span, through the same pieces predict() uses (infer, transition_scores)
    from fastner.span_scores import span_log_probabilities

    labels = sorted({t.split("-", 1)[1] for t in itos if t != "O"})
    requests = [(0, i, j, label) for i in range(len(tokens)) for j in range(i + 1, len(tokens) + 1) for label in labels]
    got = span_log_probabilities(emissions, batch.lengths, analyser.scores, requests, analyser.tag_ids)
    for (_, i, j, label), log_p in zip(requests, got):
        exact = sum(math.exp(w - log_z) for path, w in weights.items() if w > float("-inf")
                    and (i, j, label) in tags_to_spans([itos[k] for k in path]))
        assert math.exp(log_p) == pytest.approx(exact, abs=2e-5)


def test_nbest(tagger):
    result = tagger.predict("Omar Haddad left Oslo on Monday.", nbest=3)
    sentence = result["sentences"][0]
    probabilities = [a["probability"] for a in sentence["nbest"]]
    assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
    assert 0.0 < sum(probabilities) <= 1.0 + 1e-6
    assert sentence["nbest"][0]["tags"] == sentence["tags"]
    best_entities = [(e["start"], e["end"], e["label"]) for e in sentence["nbest"][0]["entities"]]
    assert best_entities == [(e["start"], e["end"], e["label"]) for e in result["entities"]]
    tokens = tagger.predict([["Oslo", "rose"]], nbest=2)[0]
    assert len(tokens["nbest"]) == 2 and tokens["nbest"][0]["tags"] == tokens["tags"]


def test_softmax_head_scores(softmax_tagger):
    result = softmax_tagger.predict(ARTICLES[0], nbest=2)
    check_document(ARTICLES[0], result)
    for sentence in result["sentences"]:
        assert sentence["nbest"][0]["tags"] == sentence["tags"]


def test_model_reads_quotes_straight_and_soft_hyphens_dropped(tagger):
    """Curly quotes and soft hyphens are how the text was printed, not what it says: the model
    reads the tokens as CoNLL-2003 prints them (a curly closing quote was tagged as the end of
    the name before it, a soft hyphen cut "Frank\u00adfurt" in two); offsets stay the document's."""
    from fastner.text import model_form

    printed = "\u201cKestrel Pharma\u2019s\u201d shares jumped in Frank\u00adfurt, Omar Haddad said."
    plain = '"Kestrel Pharma\'s" shares jumped in Frankfurt, Omar Haddad said.'
    result = tagger.predict(printed)
    check_document(printed, result)
    assert "Frank\u00adfurt" in result["sentences"][0]["tokens"]
    expected = tagger.predict(plain)
    assert result["sentences"][0]["tags"] == expected["sentences"][0]["tags"]
    assert [(model_form(e["text"]), e["label"], e["score"]) for e in result["entities"]] == \
           [(e["text"], e["label"], e["score"]) for e in expected["entities"]]


def test_model_reads_accents_composed(tagger):
    """The same name with its accents decomposed (NFD: "e" + U+0301, as macOS and some feeds
    write it) is read as the composed one; offsets stay the document's."""
    import unicodedata

    composed = "Shares of Nestl\u00e9 and Soci\u00e9t\u00e9 G\u00e9n\u00e9rale rose in Z\u00fcrich, Ren\u00e9 Haddad said."
    decomposed = unicodedata.normalize("NFD", composed)
    result = tagger.predict(decomposed)
    check_document(decomposed, result)
    expected = tagger.predict(composed)
    assert result["sentences"][0]["tags"] == expected["sentences"][0]["tags"]
    assert [(unicodedata.normalize("NFC", e["text"]), e["label"], e["score"]) for e in result["entities"]] == \
           [(e["text"], e["label"], e["score"]) for e in expected["entities"]]


@pytest.mark.parametrize("bad, error, match", [
    (b"bytes", TypeError, "decode bytes"),
    (3, TypeError, "got int"),
    ([["ok"], 3], TypeError, "item 1"),
])
def test_bad_input(tagger, bad, error, match):
    with pytest.raises(error, match=match):
        result = tagger.predict(bad)
        list(result)


@pytest.mark.parametrize("unordered", [{"Oslo fell.", "Apple rose."}, frozenset({("Oslo", "fell")}), set()])
def test_unordered_collections_are_refused(tagger, unordered):
    # results came back in the set's arbitrary order, with nothing to match them to the inputs
    kind = type(unordered).__name__
    with pytest.raises(TypeError, match=rf"predict\(x\) is a {kind}, which has no order"):
        tagger.predict(unordered)
    with pytest.raises(TypeError, match=rf"tag\(sentences\) is a {kind}, which has no order"):
        tagger.tag(unordered)


def test_ordered_iterables_are_accepted(tagger):
    # a generator and a dict's views are ordered (iteration order, insertion order)
    documents = {"a": "Oslo fell.", "b": "Apple rose."}
    expected = tagger.predict(list(documents.values()))
    assert list(tagger.predict(documents.values())) == expected
    assert list(tagger.predict(text for text in documents.values())) == expected
    assert tagger.tag({("Oslo", "fell"): 1}.keys()) == tagger.tag([("Oslo", "fell")])


@pytest.mark.parametrize("option", [{"batch_size": 0}, {"nbest": 0}, {"batch_size": True}])
def test_bad_options(tagger, option):
    with pytest.raises(ValueError):
        tagger.predict("Oslo", **option)


def test_text_without_sentence_ends_is_tagged_in_bounded_pieces(tagger):
    from fastner.documents import MAX_SENTENCE_TOKENS

    document = " ".join(["Oslo"] * (2 * MAX_SENTENCE_TOKENS + 10))
    result = tagger.predict(document)
    assert [len(s["tokens"]) for s in result["sentences"]] == [MAX_SENTENCE_TOKENS, MAX_SENTENCE_TOKENS, 10]
    check_document(document, result)


def test_scores_exact_with_news_sized_emissions(tagger):
    """A span's probability is a ratio of two partitions. A CoNLL model's log partitions run to
    the thousands, where float32 is exact to ~1e-4: scores computed in float32 came out up to
    1e-4 off (different alone and in a batch, below the best path's probability; 1.4e-4 here).
    Emissions of that size through the analyser, against the same computation on float64
    emissions: equal to the 6 decimals the analyser rounds to."""
    from fastner import ops
    from fastner.inference import Analyser
    from fastner.span_scores import span_log_probabilities

    scores = tagger.model.transition_scores()
    K = len(tagger.tags.itos)
    T = 300
    emissions = torch.randn(1, T, K, generator=torch.Generator().manual_seed(0)) * 3 + 40

    def infer(words, chars, lengths):
        tags, _ = ops.crf_viterbi(emissions, lengths, *scores)
        log_z, _ = ops.crf_forward(emissions, None, lengths, *scores)
        return tags, log_z, emissions

    analyser = Analyser(infer, tagger.words, tagger.chars, tagger.tags, False, scores, torch.device("cpu"))
    analysis = analyser.analyse([["Oslo"] * T], nbest=3)[0]
    assert analysis.spans
    scores64 = tuple(t.double() for t in scores)
    lengths = torch.tensor([T])
    exact = span_log_probabilities(emissions.double(), lengths, scores64,
                                   [(0, s, e, label) for s, e, label, _ in analysis.spans], analyser.tag_ids)
    for (_, _, _, p), log_p in zip(analysis.spans, exact):
        assert p == pytest.approx(math.exp(log_p), abs=6e-7)
    best = analysis.nbest[0][0]
    assert sum(p for p, _ in analysis.nbest) <= 1.0 + 1e-5
    assert all(p >= best - 1e-5 for _, _, _, p in analysis.spans)  # the best path is one of each span's paths


# ---- documents given with their own tokens ({"text", "tokens"} records) ----------------------

# CoNLL-2003 tokens the tokenizer splits differently: "ST." ends a sentence for the splitter,
# "U.S" + "." (a sentence-final abbreviation, as CoNLL writes it) is merged into "U.S."
GIVEN = ["ST.", "LOUIS", "Omar", "Haddad", "met", "Kestrel", "Pharma", "in", "Frankfurt", "and", "the", "U.S", ".",
         "later", "."]


def record_of(tokens):
    from fastner.text import detokenize

    text, offsets = detokenize(tokens)
    return {"id": "x", "text": text,
            "tokens": [{"text": t, "start": s, "end": e} for t, (s, e) in zip(tokens, offsets)]}


def test_record_tokens_are_tagged_as_given(tagger):
    """A record's own tokens are what is tagged, as one sentence: the same tags and span scores
    as the token list, entity offsets the tokens' own. The text was re-tokenized (and cut into
    sentences) instead, so the user's tokens and entities were not the ones tagged."""
    from fastner.text import tokenize

    record = record_of(GIVEN)
    assert [[t for t, _, _ in s] for s in tokenize(record["text"])] != [GIVEN]  # the point of the test
    result = tagger.predict(record)
    check_document(record["text"], result)
    [sentence] = result["sentences"]
    assert sentence["tokens"] == GIVEN
    assert sentence["offsets"] == [[t["start"], t["end"]] for t in record["tokens"]]
    expected = tagger.predict([GIVEN])[0]
    assert sentence["tags"] == expected["tags"]
    offsets = sentence["offsets"]
    assert [(e["start"], e["end"], e["label"], e["score"]) for e in result["entities"]] == \
           [(offsets[s["start"]][0], offsets[s["end"] - 1][1], s["type"], s["confidence"]) for s in expected["spans"]]
    split = {"text": "Omar Haddad flew to New-York.", "tokens": [
        {"text": t, "start": s, "end": e} for t, s, e in
        (("Omar", 0, 4), ("Haddad", 5, 11), ("flew", 12, 16), ("to", 17, 19), ("New", 20, 23), ("-", 23, 24),
         ("York", 24, 28), (".", 28, 29))]}
    assert tagger.predict(split)["sentences"][0]["tokens"] == ["Omar", "Haddad", "flew", "to", "New", "-", "York", "."]
    # with raw documents in one list, batched together; without "tokens", a record is its text
    mixed = tagger.predict([ARTICLES[0], record, {"text": ARTICLES[0]}], batch_size=4)
    assert mixed[1]["sentences"][0]["tags"] == sentence["tags"]
    alone = tagger.predict(ARTICLES[0])
    for result in (mixed[0], mixed[2]):  # scores within float32 noise of another batch's (see above)
        assert [s["tags"] for s in result["sentences"]] == [s["tags"] for s in alone["sentences"]]
        scores = [e["score"] for e in alone["entities"]]
        assert [e["score"] for e in result["entities"]] == pytest.approx(scores, abs=1e-5)


def test_record_tokens_read_as_given_and_long_ones_in_pieces(tagger):
    from fastner.documents import MAX_SENTENCE_TOKENS

    # Given tokens are read as training reads the same record (and as token lists are): as given,
    # not in model_form (a curly quote or soft hyphen the corpus has is what the model learnt).
    tokens = ["Shares", "rose", "in", "Frank\u00adfurt", "\u201cBNP\u00bb", "."]
    given = tagger.predict(record_of(tokens))
    as_list = tagger.predict([tokens])[0]
    assert given["sentences"][0]["tokens"] == tokens  # the document's own characters
    assert given["sentences"][0]["tags"] == as_list["tags"]
    assert [e["score"] for e in given["entities"]] == pytest.approx([s["confidence"] for s in as_list["spans"]], abs=1e-6)
    best = [(n["tags"], n["probability"]) for n in tagger.predict(record_of(tokens), nbest=3)["sentences"][0]["nbest"]]
    assert best == [(n["tags"], n["probability"]) for n in tagger.predict([tokens], nbest=3)[0]["nbest"]]
    long = record_of(["Oslo"] * (MAX_SENTENCE_TOKENS + 3))
    assert [len(s["tokens"]) for s in tagger.predict(long)["sentences"]] == [MAX_SENTENCE_TOKENS, 3]
    spaced = {"text": "Oslo  fell", "tokens": [{"text": "Oslo", "start": 0, "end": 4},
                                               {"text": " ", "start": 4, "end": 5},
                                               {"text": "fell", "start": 6, "end": 10}]}
    assert tagger.predict(spaced)["sentences"][0]["tokens"] == ["Oslo", "fell"]  # spaCy's whitespace tokens: no words
    assert tagger.predict({"text": "Oslo", "tokens": []}) == {"entities": [], "sentences": []}


@pytest.mark.parametrize("bad, error, match", [
    ({"text": 3}, TypeError, r'predict\(x\): a document record needs a "text" string, got int'),
    ({"tokens": []}, TypeError, r'predict\(x\): a document record needs a "text" string, got none'),
    ({"text": "Oslo", "tokens": "Oslo"}, ValueError, r'predict\(x\): "tokens" must be a list'),
    ({"text": "Oslo", "tokens": [{"text": "Oslo", "start": 0}]}, ValueError, r"predict\(x\): token 0: .* ints"),
    ({"text": "Oslo", "tokens": [{"text": "Oslo", "start": 0, "end": 9}]}, ValueError, r"token 0 \[0, 9\) must lie in"),
    ({"text": "Oslo", "tokens": [{"text": "Osl", "start": 1, "end": 4}]}, ValueError, "token 0: 'Osl' is not the text"),
    ({"text": "Oslo fell", "tokens": [{"text": "fell", "start": 5, "end": 9}, {"text": "Oslo", "start": 0, "end": 4}]},
     ValueError, r"token 1 \[0, 4\) must lie .* after the previous token"),
    (["Oslo fell.", {"text": "Oslo", "tokens": [{"text": "O", "start": 0, "end": 2}]}], ValueError, "^item 1: token 0"),
    (iter(["Oslo fell.", {"text": "Oslo", "tokens": [3]}]), ValueError, "^item 1: token 0: expected"),
])
def test_bad_record_tokens(tagger, bad, error, match):
    with pytest.raises(error, match=match):
        list(tagger.predict(bad))
