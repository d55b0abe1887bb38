"""fastner serve in-process: the limits on a request (body bytes, body timeout, documents,
tokens a document and a request) and their 413/408 answers."""
import asyncio
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastner.serve import model as model_adapter  # noqa: E402
from fastner.serve.app import create_app  # noqa: E402
from fastner.serve.config import ServeConfig  # noqa: E402
from tests.serve_testing import DOCUMENTS, post, run_app  # noqa: E402


# tiny models: see conftest.one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


def test_body_over_the_limit_gets_413(tagger):
    app = create_app(tagger, ServeConfig(max_body_bytes=200))

    async def chunks():
        yield b'{"documents": ["'
        for _ in range(20):
            yield b"x" * 20
        yield b'"]}'

    async def interact(client):
        declared = await post(client, {"documents": ["word " * 100]})
        chunked = await client.post("/v1/entities", content=chunks(), headers={"content-type": "application/json"})
        small = await post(client, {"documents": ["Peter visited Germany."]})
        return declared, chunked, small

    declared, chunked, small = run_app(app, interact)
    assert "content-length" not in chunked.request.headers  # really sent without a declared length
    for response in (declared, chunked):
        assert response.status_code == 413, response.text
        assert response.json()["field"] == "body" and "200 bytes" in response.json()["error"]
        # It was: the connection stayed open, and the server read the body's rest (a client's 1 GB)
        # to reach the next request; closing it stops the reading (test_serve_connections.py)
        assert response.headers["connection"] == "close"
    assert small.status_code == 200 and "connection" not in small.headers  # keep-alive as usual


async def _stalling(first: bytes):
    """A request body that sends `first`, then nothing more while the connection stays open."""
    yield first
    await asyncio.Event().wait()


def test_a_body_that_stops_arriving_gets_408_and_the_connection_closed(tagger):
    # It was: a body shorter than its Content-Length, or a chunked body that stalled, held its
    # connection and handler for as long as the client waited (uvicorn has no body timeout)
    app = create_app(tagger, ServeConfig(body_timeout_s=0.05))
    start = b'{"documents": ["Peter vis'

    async def interact(client):
        headers = {"content-type": "application/json"}
        short = await client.post("/v1/entities", content=_stalling(start), headers={**headers, "content-length": "100"})
        chunked = await client.post("/v1/entities", content=_stalling(start), headers=headers)
        after = await post(client, {"documents": ["Peter visited Germany."]})
        return short, chunked, after, (await client.get("/metrics")).text

    short, chunked, after, metrics = run_app(app, interact)
    assert "content-length" not in chunked.request.headers
    for response in (short, chunked):
        assert response.status_code == 408, response.text
        assert response.headers["connection"] == "close"
        assert response.json()["field"] == "body" and "--body-timeout-s" in response.json()["error"]
        assert f"{len(start)} bytes received" in response.json()["error"]
    assert after.status_code == 200
    assert 'fastner_requests_total{route="/v1/entities",status="408"} 2.0' in metrics


def test_a_slow_body_that_keeps_coming_is_not_cut(tagger):
    # the timeout bounds the gap between chunks, not the whole upload: a full-size body arriving
    # slowly (here over 16 times the timeout's length) is answered
    timeout = 0.5
    app = create_app(tagger, ServeConfig(body_timeout_s=timeout))
    body = json.dumps({"documents": ["Peter visited Germany."]}).encode()
    body += b" " * (ServeConfig().max_body_bytes - len(body))  # JSON whitespace up to the limit: 1 MiB
    chunk = len(body) // 16

    async def slowly():
        for offset in range(0, len(body), chunk):
            await asyncio.sleep(timeout / 10)
            yield body[offset:offset + chunk]

    async def interact(client):
        started = asyncio.get_running_loop().time()
        response = await client.post("/v1/entities", content=slowly(), headers={"content-type": "application/json"})
        return response, asyncio.get_running_loop().time() - started

    response, seconds = run_app(app, interact)
    assert seconds > timeout  # the upload outlasted the timeout
    assert response.status_code == 200, response.text
    assert response.json()["documents"][0]["entities"] is not None


def test_too_many_or_too_long_documents_get_413_naming_them(tagger):
    app = create_app(tagger, ServeConfig(max_documents=3, max_document_tokens=10, max_batch_tokens=64))

    async def interact(client):
        many = await post(client, {"documents": ["a"] * 4})
        long_string = await post(client, {"documents": ["a", "word " * 11]})
        long_object = await post(client, {"documents": [{"id": 1, "text": "word " * 11}]})
        fits = await post(client, {"documents": ["word " * 10] * 3})
        commas = await post(client, {"documents": ["a," * 6]})  # 12 tokens to the model, once counted as 1
        return many, long_string, long_object, fits, commas

    many, long_string, long_object, fits, commas = run_app(app, interact)
    assert commas.status_code == 413 and "12 tokens; at most 10" in commas.json()["error"]
    assert many.status_code == 413 and many.json()["field"] == "documents" and "at most 3" in many.json()["error"]
    assert long_string.status_code == 413 and long_string.json()["field"] == "documents.1"
    assert "11 tokens; at most 10" in long_string.json()["error"]
    assert long_object.status_code == 413 and long_object.json()["field"] == "documents.0.text"
    assert fits.status_code == 200


def test_a_request_over_its_token_budget_gets_413_with_its_count(tagger, monkeypatch):
    # 256 documents of 2048 tokens fit the byte limit: one request held the model ~45 s
    calls = []
    real = model_adapter.predict_documents
    monkeypatch.setattr(model_adapter, "predict_documents", lambda *args: calls.append(args[1]) or real(*args))
    app = create_app(tagger, ServeConfig(max_request_tokens=25, max_document_tokens=10, max_batch_tokens=64))

    async def interact(client):
        warmed = len(calls)
        over = await post(client, {"documents": ["word " * 10, {"id": 1, "text": "word " * 10}, "word " * 6]})
        refused_without_a_model_call = len(calls) == warmed
        fits = await post(client, {"documents": ["word " * 10, "word " * 10, "word " * 5]})
        return over, refused_without_a_model_call, fits

    over, refused_without_a_model_call, fits = run_app(app, interact)
    assert over.status_code == 413 and refused_without_a_model_call
    assert over.json()["field"] == "documents"
    assert over.json()["error"].startswith("documents: 26 tokens in 3 documents; at most 25 a request")
    assert "--max-request-tokens" in over.json()["error"]
    assert fits.status_code == 200, fits.text


def test_the_default_token_budget_lets_64_news_articles_through():
    # ~800 words each, in the style of financial news (numbers and punctuation count as tokens)
    words = " ".join(DOCUMENTS[:3]).split()
    article = " ".join(words[i % len(words)] for i in range(800))
    assert 64 * model_adapter.count_tokens(article) <= ServeConfig().max_request_tokens


def test_too_many_documents_are_counted_before_any_is_validated(tagger):
    # 20,000 wrong documents in a 60 kB body: validated one by one before the count, they cost
    # the event loop a second and answered a 2.5 MB list of 20,000 problems
    app = create_app(tagger, ServeConfig(max_documents=3))

    async def interact(client):
        return await post(client, {"documents": [1] * 20_000}), await post(client, {"documents": [{"id": 1.5}] * 4})

    wrong, objects = run_app(app, interact)
    for response, count in ((wrong, 20_000), (objects, 4)):
        assert response.status_code == 413 and len(response.content) < 200, response.text[:300]
        message = f"{count} documents; at most 3 a request"
        assert response.json() == {"error": f"documents: {message}", "field": "documents",
                                   "problems": [{"field": "documents", "message": message, "type": "limit"}]}
