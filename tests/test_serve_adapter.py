"""fastner.serve.model, the adapter between the service and a Tagger: entity offsets into
the text, token counts that bound what the model sees, results independent of their batch."""
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import fastner  # noqa: E402
from fastner.serve import model as model_adapter  # noqa: E402
from tests.serve_testing import DOCUMENTS, tiny_model_dir  # noqa: E402


# tiny models: see conftest.one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


def test_adapter_offsets_point_into_the_text(tagger):
    results = model_adapter.predict_documents(tagger, DOCUMENTS)
    assert len(results) == len(DOCUMENTS)
    assert results[0]["entities"], "the tiny tagger finds entities in a demo-style sentence"
    for text, result in zip(DOCUMENTS, results):
        for entity in result["entities"]:
            assert set(entity) == {"start", "end", "label", "text", "score"}
            assert text[entity["start"]:entity["end"]] == entity["text"] and entity["text"].strip() == entity["text"]
            assert 0.0 <= entity["score"] <= 1.0
    assert results[3] == {"entities": []}
    # Shares rose 4.2 % to $ 250.10 , U . S . said . (fastner.text: U.S . as CoNLL writes it)
    assert model_adapter.count_tokens("Shares rose 4.2% to $250.10, U.S. said.") == 14


@pytest.mark.parametrize("unit", ["a,", "a.b-c,d'e", "U,An's", "Uwww.", "Awww.sn'tt,_gonna", "abwww.aS'12&", "x1n't ",
                                  "é's\n", "1,000.5,"])
def test_the_token_count_bounds_what_the_model_sees(unit):
    # the limits count with the regex: "a,b,c,..." and "Uwww.Uwww...." were 1 token to it and 2
    # per repeat to the model, so a document of 1 MiB passed --max-document-tokens as one token
    from fastner.text import tokenize

    text = unit * 50
    assert 2 * model_adapter.count_tokens(text) >= sum(len(sentence) for sentence in tokenize(text))


def test_adapter_documents_are_independent_of_their_batch(tagger):
    together = model_adapter.predict_documents(tagger, DOCUMENTS)
    for text, expected in zip(DOCUMENTS, together):
        alone = model_adapter.predict_documents(tagger, [text])[0]
        assert [(e["start"], e["end"], e["label"]) for e in alone["entities"]] == \
               [(e["start"], e["end"], e["label"]) for e in expected["entities"]]
        for a, b in zip(alone["entities"], expected["entities"]):
            assert a["score"] == pytest.approx(b["score"], abs=1e-4)


def test_adapter_reuses_its_analyser_and_follows_a_precision_switch(tmp_path_factory):
    # its own tagger: the module fixture stays float32
    own = fastner.Tagger.load(tiny_model_dir(tmp_path_factory), device="cpu")
    first = model_adapter.predict_documents(own, DOCUMENTS)
    built = model_adapter._analyser(own)
    assert model_adapter._analyser(own) is built  # one per tagger, not one per call
    own.model.double()  # what `--precision float64` does before serving
    doubled = model_adapter.predict_documents(own, DOCUMENTS)
    assert model_adapter._analyser(own) is not built
    for a, b in zip(first, doubled):
        assert [(e["start"], e["end"], e["label"]) for e in a["entities"]] == \
               [(e["start"], e["end"], e["label"]) for e in b["entities"]]


def test_adapter_refuses_nbest_it_cannot_serve(tagger):
    with pytest.raises(ValueError, match="nbest"):
        model_adapter.predict_documents(tagger, ["a"], nbest=model_adapter.MAX_NBEST + 1)
