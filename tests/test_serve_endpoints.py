"""fastner serve in-process (httpx ASGI transport): every endpoint (entities, health, readiness,
model info, the page, docs, metrics) and what its answers hold."""
import json

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import fastner  # noqa: E402
from fastner.serve import model as model_adapter  # noqa: E402
from fastner.serve.app import create_app  # noqa: E402
from fastner.serve.config import ServeConfig  # noqa: E402
from tests.serve_testing import DOCUMENTS, SENTENCE, batch_count, post, post_once, run_app  # noqa: E402


# tiny models: see conftest.one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


def test_entities_in_order_with_ids_and_offsets(tagger):
    app = create_app(tagger)
    body = {"documents": [DOCUMENTS[0], {"id": "b", "text": DOCUMENTS[1]}, {"id": 3, "text": DOCUMENTS[2]},
                          DOCUMENTS[3], {"text": DOCUMENTS[4]}]}

    response = post_once(app, body)
    assert response.status_code == 200, response.text
    documents = response.json()["documents"]
    expected = model_adapter.predict_documents(tagger, DOCUMENTS)
    assert [d.get("id") for d in documents] == [None, "b", 3, None, None]
    for got, want in zip(documents, expected):
        assert [(e["start"], e["end"], e["label"], e["text"]) for e in got["entities"]] == \
               [(e["start"], e["end"], e["label"], e["text"]) for e in want["entities"]]


def test_health_ready_model_page_docs_metrics(tagger):
    app = create_app(tagger, ServeConfig(max_wait_ms=1))

    async def interact(client):
        await post(client, {"documents": [SENTENCE]})
        await client.get("/no/such/path")
        return {path: await client.get(path) for path in
                ("/healthz", "/readyz", "/v1/model", "/", "/docs", "/openapi.json", "/metrics")}

    got = run_app(app, interact)
    assert got["/healthz"].json() == {"status": "ok"}
    assert got["/readyz"].status_code == 200 and got["/readyz"].json() == {"status": "ready"}
    info = got["/v1/model"].json()
    assert info["labels"] == sorted(info["labels"]) and "PER" in info["labels"]
    assert info["encoder"] == "lstm" and info["precision"] == "fp32" and info["scheme"] == "BIOES"
    assert info["fastner"] == fastner.__version__ and info["torch"] == torch.__version__
    assert info["backend"]["cpu"] in ("fused", "reference")
    assert info["limits"]["max_request_tokens"] == ServeConfig().max_request_tokens
    page = got["/"]
    assert page.headers["content-type"].startswith("text/html")
    assert 'id="tag"' in page.text and "/v1/entities" in page.text
    assert "<script src" not in page.text and "<link" not in page.text  # no external assets
    assert got["/docs"].status_code == 200 and "swagger" in got["/docs"].text.lower()
    assert "/v1/entities" in got["/openapi.json"].json()["paths"]
    metrics = got["/metrics"].text
    assert got["/metrics"].headers["content-type"].startswith("text/plain")
    for name in ("fastner_requests_total", "fastner_request_seconds_bucket", "fastner_batch_documents_bucket",
                 "fastner_batch_tokens_bucket", "fastner_queue_depth"):
        assert name in metrics
    assert 'fastner_requests_total{route="/v1/entities",status="200"} 1.0' in metrics
    assert 'route="other",status="404"' in metrics  # unmatched paths share one label value
    assert batch_count(metrics) >= 3  # two warm-up calls and the request


def test_get_routes_answer_head(tagger):
    # HTTP requires GET routes to answer HEAD; health checkers and uptime monitors send it
    app = create_app(tagger)

    async def interact(client):
        return {path: await client.head(path) for path in ("/", "/healthz", "/readyz", "/v1/model", "/metrics")}

    for path, response in run_app(app, interact).items():
        assert response.status_code == 200, path
    before_startup = run_app(create_app(tagger), lambda client: client.head("/readyz"), lifespan=False)
    assert before_startup.status_code == 503


def test_ids_are_echoed_exactly_and_wrong_ids_are_named(tagger):
    app = create_app(tagger)
    ids = ["", "007", "a\ud800b", "Zürich 😀", 0, -1, 10 ** 30, -(10 ** 30)]
    body = {"documents": [{"id": doc_id, "text": "Peter visited Germany."} for doc_id in ids]
                         + [{"id": None, "text": "a"}, {"text": "a"}, "a"]}

    async def interact(client):
        answered = await client.post("/v1/entities", content=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        wrong = [await post(client, {"documents": ["a", {"id": doc_id, "text": "a"}]}) for doc_id in (True, 1.0, 1.5, [1], {})]
        return answered, wrong

    answered, wrong = run_app(app, interact)
    assert answered.status_code == 200, answered.text
    documents = json.loads(answered.content)["documents"]
    assert [document.get("id", "absent") for document in documents] == ids + ["absent"] * 3
    assert all(type(document["id"]) is type(doc_id) for document, doc_id in zip(documents, ids))
    for response, kind in zip(wrong, ("bool", "float", "float", "list", "dict")):
        assert response.status_code == 422, response.text
        error = response.json()
        assert error["field"] == "documents.1.id" and [p["field"] for p in error["problems"]] == ["documents.1.id"]
        assert error["error"] == f"documents.1.id: an id is a string or an integer, got {kind}"


def test_not_ready_before_startup(tagger):
    app = create_app(tagger)

    async def interact(client):
        return await client.get("/readyz"), await client.get("/healthz"), await post(client, {"documents": ["a"]})

    ready, health, entities = run_app(app, interact, lifespan=False)
    assert ready.status_code == 503 and ready.headers["retry-after"] == "1"
    assert health.status_code == 200
    assert entities.status_code == 503  # no worker running: refused, not hung


def test_response_is_plain_json_records(tagger):
    app = create_app(tagger)

    response = post_once(app, {"documents": [SENTENCE]})
    assert response.headers["content-type"] == "application/json"
    document = json.loads(response.content)["documents"][0]
    assert set(document) == {"entities"}  # no "id": null for a plain string


def test_odd_text_is_answered(tagger):
    app = create_app(tagger)
    texts = ["a\ud800b Peter", "\u0000\u0007 Omar Haddad\u00a0said", "\u202e Frankfurt \ufeff", " \n\t "]

    body = json.dumps({"documents": texts}).encode()  # escapes: the lone surrogate travels as \ud800
    response = post_once(app, body)
    assert response.status_code == 200, response.text
    for text, document in zip(texts, json.loads(response.content)["documents"]):
        assert all(text[e["start"]:e["end"]] == e["text"] for e in document["entities"])


def test_nbest_adds_the_k_best_analyses_per_sentence(tagger):
    app = create_app(tagger)
    text = "Peter Blackburn visited Germany. EU rejects German call."

    response = post_once(app, {"documents": [text], "nbest": 3})
    assert response.status_code == 200, response.text
    document = response.json()["documents"][0]
    assert len(document["nbest"]) == 2  # two sentences
    for sentence in document["nbest"]:
        probabilities = [a["probability"] for a in sentence["analyses"]]
        assert 1 <= len(probabilities) <= 3 and probabilities == sorted(probabilities, reverse=True)
        assert all(0.0 <= p <= 1.0 for p in probabilities)
        for analysis in sentence["analyses"]:
            assert all(text[e["start"]:e["end"]] == e["text"] for e in analysis["entities"])
