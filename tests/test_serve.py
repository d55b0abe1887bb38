"""fastner serve in-process (httpx ASGI transport): every endpoint, every error, and batching
that merges requests without losing or swapping results."""
import asyncio
import json
import threading

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

import fastner  # noqa: E402
from fastner.serve import app as app_module  # noqa: E402
from fastner.serve import model as model_adapter  # noqa: E402
from fastner.serve.app import create_app  # noqa: E402
from fastner.serve.batcher import Batcher, QueueFull, ShuttingDown  # noqa: E402
from fastner.serve.config import ServeConfig  # noqa: E402
from tests.serve_testing import SENTENCE, run_app, tiny_model_dir  # noqa: E402

DOCUMENTS = [
    SENTENCE,
    "Altamira Holdings agreed to buy Crescent Logistics for $3.2 billion, chief executive Omar Haddad said.",
    "The European Central Bank will decide on 12 June 2025 whether to lend 40 billion euros to Norway.",
    "",
    "Café owners in Zürich 😀 met Ingrid Lindqvist.",
]


# tiny models: see conftest.one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    return fastner.Tagger.load(tiny_model_dir(tmp_path_factory), device="cpu")


def post(client, body, **kwargs):
    return client.post("/v1/entities", json=body, **kwargs)


def post_bytes(client, body: bytes):
    """POST a raw JSON body as sent (for bodies json= cannot produce)."""
    return client.post("/v1/entities", content=body, headers={"content-type": "application/json"})


def batch_count(metrics_text: str, name: str = "fastner_batch_documents_count") -> float:
    for line in metrics_text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


# ---- the adapter -------------------------------------------------------------------------------

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


# ---- endpoints ---------------------------------------------------------------------------------

def test_entities_in_order_with_ids_and_offsets(tagger):
    app = create_app(tagger)
    body = {"documents": [DOCUMENTS[0], {"id": "b", "text": DOCUMENTS[1]}, {"id": 3, "text": DOCUMENTS[2]},
                          DOCUMENTS[3], {"text": DOCUMENTS[4]}]}

    async def interact(client):
        return await post(client, body)

    response = run_app(app, interact)
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


# ---- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, field", [
    ({}, "documents"),
    ({"docs": ["a"]}, "documents"),
    ({"documents": "one string"}, "documents"),
    ({"documents": []}, "documents"),
    ({"documents": [3]}, "documents.0"),
    ({"documents": ["a", None]}, "documents.1"),
    ({"documents": [{"id": 1}]}, "documents.0.text"),
    ({"documents": [{"text": 5}]}, "documents.0.text"),
    ({"documents": [{"text": "a", "lang": "en"}]}, "documents.0.lang"),
    ({"documents": ["a"], "nbest": 0}, "nbest"),
    ({"documents": ["a"], "nbest": "two"}, "nbest"),
    # no coercion: a number in a string, a boolean or a float is a client's mistake, not a count
    ({"documents": ["a"], "nbest": "2"}, "nbest"),
    ({"documents": ["a"], "nbest": True}, "nbest"),
    ({"documents": ["a"], "nbest": 2.0}, "nbest"),
    ({"documents": ["a"], "nbest": model_adapter.MAX_NBEST + 1}, "nbest"),
    ({"documents": ["a"], "extra": 1}, "extra"),
    # a client's own key named like a union member pydantic puts in `loc`
    ({"documents": ["a"], "int": 1}, "int"),
    ({"documents": ["a"], "str": 1}, "str"),
    ({"documents": [{"text": "a", "str": 1}]}, "documents.0.str"),
    ({"documents": [{"text": "a", "DocumentIn": 1}]}, "documents.0.DocumentIn"),
])
def test_wrong_fields_get_422_naming_the_field(tagger, body, field):
    app = create_app(tagger)

    async def interact(client):
        return await post(client, body)

    response = run_app(app, interact)
    assert response.status_code == 422, response.text
    error = response.json()
    assert error["field"] == field and error["error"].startswith(field + ": ")
    # one format for every 4xx (nbest over the server's limit once came without "problems")
    assert set(error) == {"error", "field", "problems"} and error["problems"][0]["field"] == field


def test_malformed_json_and_wrong_content_type_get_422(tagger):
    app = create_app(tagger)

    async def interact(client):
        broken = await client.post("/v1/entities", content=b'{"documents": [', headers={"content-type": "application/json"})
        form = await client.post("/v1/entities", content=b"documents=a", headers={"content-type": "application/x-www-form-urlencoded"})
        return broken, form

    broken, form = run_app(app, interact)
    assert broken.status_code == 422 and broken.json()["field"] == "body"
    assert broken.json()["error"].startswith("body: malformed JSON at character")
    assert form.status_code == 422 and "Content-Type: application/json" in form.json()["error"]


@pytest.mark.parametrize("body, reason", [
    (b'{"documents": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", "nested"),  # deeper than the recursion limit
    (b'{"documents": ["caf\xe9"]}', "UTF-8"),  # Latin-1, not UTF-8
    (b'{"documents": ["a"], "nbest": 1' + b"0" * 5000 + b"}", "digits"),  # over Python's int parsing limit
])
def test_json_that_python_cannot_parse_gets_422_not_400(tagger, body, reason):
    app = create_app(tagger)

    async def interact(client):
        return await post_bytes(client, body)

    response = run_app(app, interact)
    assert response.status_code == 422, response.text
    error = response.json()
    assert error["field"] == "body" and error["error"].startswith("body: malformed JSON") and reason in error["error"]
    assert [problem["field"] for problem in error["problems"]] == ["body"]


@pytest.mark.parametrize("body, fields", [
    (b'{"documents": ["a"], "documents": ["b", "c"]}', ["documents"]),
    (b'{"documents": ["a", {"id": 1, "text": "a", "text": "b"}]}', ["documents.1.text"]),
    # equal once the escapes are decoded: the same key to json.loads
    (b'{"documents": [{"te\\u0078t": "a", "text": "b"}]}', ["documents.0.text"]),
    (b'{"documents": [{"id": 1, "text": "a", "id": 2, "id": 3}], "nbest": 1, "nbest": 2}',
     ["nbest", "documents.0.id"]),
    (b'{"documents": [{"text": "a", "id": {"k": 1, "k": 2}}]}', ["documents.0.id.k"]),
])
def test_a_key_sent_twice_gets_422_naming_it(tagger, body, fields):
    # json.loads keeps the last of duplicated keys: the client's bug was answered for half its body
    app = create_app(tagger)

    async def interact(client):
        return await post_bytes(client, body)

    response = run_app(app, interact)
    assert response.status_code == 422, response.text
    error = response.json()
    assert [problem["field"] for problem in error["problems"]] == fields
    assert error["field"] == fields[0] and error["error"].startswith(f"{fields[0]}: key ")
    assert "times in one object" in error["error"] and error["problems"][0]["type"] == "duplicate_key"


@pytest.mark.parametrize("body, reason", [
    (b'{"documents": [{"text": "a", "text": "b"}, ' + b"[" * 10_000 + b"]" * 10_000 + b"]}", "nested"),
    (b'{"documents": [{"text": "a", "text": "b"}, "caf\xe9"]}', "UTF-8"),
    (b'{"documents": [{"text": "a", "text": "b"}, [}', "at character"),
])
def test_a_body_malformed_after_a_duplicate_key_is_malformed_json(tagger, body, reason):
    # the duplicate was found before the rest of the body was read; finding where it is read
    # the rest and failed with a 500 on what followed
    app = create_app(tagger)

    async def interact(client):
        return await post_bytes(client, body)

    response = run_app(app, interact)
    assert response.status_code == 422, response.text
    assert response.json()["error"].startswith("body: malformed JSON") and reason in response.json()["error"]


def test_text_that_looks_like_a_duplicate_key_is_answered(tagger):
    app = create_app(tagger)
    body = json.dumps({"documents": ['"text": "a", "text": "b"', {"id": "text", "text": '{"id": 1, "id": 2}'}]})

    async def interact(client):
        return await client.post("/v1/entities", content=body.encode(), headers={"content-type": "application/json"})

    assert run_app(app, interact).status_code == 200


def test_a_body_without_a_json_content_type_is_told_to_send_one(tagger):
    app = create_app(tagger)
    body = json.dumps({"documents": ["a"]}).encode()

    async def interact(client):
        missing = await client.post("/v1/entities", content=body)
        near_misses = [await client.post("/v1/entities", content=body, headers={"content-type": kind})
                       for kind in ("text/json", "application/x-json", "application/jsonx")]
        parsed = [await client.post("/v1/entities", content=body, headers={"content-type": kind})
                  for kind in ("Application/JSON; charset=utf-8", "application/vnd.api+json")]
        return missing, near_misses, parsed

    missing, near_misses, parsed = run_app(app, interact)
    assert "content-type" not in missing.request.headers
    for response in [missing] + near_misses:  # FastAPI parses none of these as JSON
        assert response.status_code == 422 and "Content-Type: application/json" in response.json()["error"], response.text
    assert [response.status_code for response in parsed] == [200, 200]


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


def test_the_problems_listed_are_bounded(tagger):
    # a 1 MiB body of 80,000 unknown fields answered a 7 MB list of 80,000 problems
    extra = {f"k{number}": 1 for number in range(1000)}
    app = create_app(tagger)

    async def interact(client):
        return await post(client, {"documents": ["a"], **extra}), await post(client, {"documents": [{"text": "a", **extra}]})

    for response, prefix in zip(run_app(app, interact), ("", "documents.0.")):
        assert response.status_code == 422
        error = response.json()
        assert error["field"] == prefix + "k0"
        assert [p["field"] for p in error["problems"]] == [f"{prefix}k{n}" for n in range(app_module.MAX_PROBLEMS)]
    twice = ", ".join(f'"k{number}": 1, "k{number}": 2' for number in range(1000))

    async def duplicates(client):
        return await client.post("/v1/entities", content=f'{{"documents": ["a"], {twice}}}'.encode(),
                                 headers={"content-type": "application/json"})

    error = run_app(create_app(tagger), duplicates).json()
    assert [p["field"] for p in error["problems"]] == [f"k{n}" for n in range(app_module.MAX_PROBLEMS)]


class Gate:
    """A model call that blocks until released, so tests can fill the queue without timing."""

    def __init__(self, monkeypatch):
        self.entered = threading.Event()
        self.release = threading.Event()
        real = model_adapter.predict_documents

        def gated(tagger, texts, nbest=1):
            if texts and texts[0].startswith("GATE"):
                self.entered.set()
                self.release.wait(60)
            return real(tagger, texts, nbest)

        monkeypatch.setattr(model_adapter, "predict_documents", gated)


def test_full_queue_gets_503_with_retry_after(tagger, monkeypatch):
    gate = Gate(monkeypatch)
    app = create_app(tagger, ServeConfig(max_queue=1, max_wait_ms=0))
    loop_wait = asyncio.to_thread if hasattr(asyncio, "to_thread") else None

    async def interact(client):
        running = asyncio.ensure_future(post(client, {"documents": ["GATE Peter visited Germany."]}))
        await loop_wait(gate.entered.wait, 60)  # the worker holds the first request
        queued = asyncio.ensure_future(post(client, {"documents": ["Omar Haddad said."]}))
        while app.state.batcher.queue_depth < 1:
            await asyncio.sleep(0.01)
        refused = await post(client, {"documents": ["Ingrid Lindqvist said."]})
        depth = (await client.get("/metrics")).text
        gate.release.set()
        return await running, await queued, refused, depth

    running, queued, refused, depth = run_app(app, interact)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "--max-queue 1" in refused.json()["error"]
    assert_problem_format(refused.json())  # it was {"error"} alone
    assert refused.json()["problems"][0]["type"] == "queue_full"
    assert "fastner_queue_depth 1.0" in depth
    assert running.status_code == 200 and queued.status_code == 200


def _leaving_client(app, body: dict, sent_fraction: float = 1.0):
    """Call the ASGI app as a server would for a client that sends `body` (the first
    `sent_fraction` of it), then stays until `left` is set and disconnects: (the app's task,
    `left`, the messages the app sent)."""
    payload = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/entities", "raw_path": b"/v1/entities", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}
    left, sent, body_sent = asyncio.Event(), [], []

    async def receive():
        if not body_sent:
            body_sent.append(True)
            return {"type": "http.request", "body": payload[:int(len(payload) * sent_fraction)],
                    "more_body": sent_fraction < 1}
        await left.wait()  # what a server's receive() does after the body
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    return asyncio.ensure_future(app(scope, receive, send)), left, sent


def test_a_client_that_leaves_costs_no_model_work(tagger, monkeypatch):
    # It was: a client that disconnected while its request was queued was not noticed, and its
    # documents still ran on the model (under overload, clients time out and retry: work nobody reads)
    gate = Gate(monkeypatch)
    seen = []
    gated = model_adapter.predict_documents

    def recording(tagger, texts, nbest=1):
        seen.append(list(texts))
        return gated(tagger, texts, nbest)

    monkeypatch.setattr(model_adapter, "predict_documents", recording)
    # a short body timeout: it must not cut the wait for the disconnect that follows the body
    app = create_app(tagger, ServeConfig(max_wait_ms=0, body_timeout_s=0.01))

    async def interact(client):
        running, running_left, running_sent = _leaving_client(app, {"documents": ["GATE Peter visited Germany."]})
        await asyncio.to_thread(gate.entered.wait, 60)  # its batch runs on the worker, held
        queued, queued_left, queued_sent = _leaving_client(app, {"documents": ["QUEUED Omar Haddad said."]})
        while app.state.batcher.queue_depth < 1:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # longer than the body timeout: still waiting, not refused
        assert not queued.done() and not running.done()
        queued_left.set()
        running_left.set()
        # both handlers end now, the worker still held: not after their batches
        done, _ = await asyncio.wait({queued, running}, timeout=30)
        finished_while_held = len(done) == 2 and not gate.release.is_set()
        gate.release.set()
        await asyncio.gather(queued, running)
        after = await post(client, {"documents": ["AFTER Ingrid Lindqvist said."]})
        return finished_while_held, queued_sent, running_sent, after, (await client.get("/metrics")).text

    finished_while_held, queued_sent, running_sent, after, metrics = run_app(app, interact)
    assert finished_while_held
    assert after.status_code == 200 and after.json()["documents"][0]["entities"] is not None
    # the queued job was dropped; the running one finished with its batch (its result dropped)
    marks = [text.split()[0] for texts in seen for text in texts]
    assert [mark for mark in marks if mark in ("GATE", "QUEUED", "AFTER")] == ["GATE", "AFTER"]  # not the warm-up
    for sent in (queued_sent, running_sent):
        assert sent[0]["status"] == app_module.CLIENT_CLOSED == 499
    assert 'fastner_requests_total{route="/v1/entities",status="499"} 2.0' in metrics
    assert "fastner_queue_depth 0.0" in metrics


def test_a_client_that_leaves_mid_body_counts_as_client_closed(tagger):
    # It was: FastAPI answered the truncated body as "There was an error parsing the body", so
    # /metrics counted a client's leaving as a malformed request (400)
    app = create_app(tagger)

    async def interact(client):
        task, left, sent = _leaving_client(app, {"documents": [SENTENCE]}, sent_fraction=0.5)
        left.set()
        await task
        return sent, (await client.get("/metrics")).text

    sent, metrics = run_app(app, interact)
    assert sent[0]["status"] == 499
    assert 'fastner_requests_total{route="/v1/entities",status="499"} 1.0' in metrics and 'status="400"' not in metrics


def test_a_failing_model_call_answers_500_and_the_server_goes_on(tagger, monkeypatch):
    real = model_adapter.predict_documents

    def failing(tagger, texts, nbest=1):
        if any("FAIL" in text for text in texts):
            raise RuntimeError("boom")
        return real(tagger, texts, nbest)

    monkeypatch.setattr(model_adapter, "predict_documents", failing)
    app = create_app(tagger, ServeConfig(max_wait_ms=0))

    async def interact(client):
        return await post(client, {"documents": ["FAIL"]}), await post(client, {"documents": [SENTENCE]})

    failed, fine = run_app(app, interact)
    assert failed.status_code == 500 and failed.json()["error"] == "request: the model call failed: RuntimeError: boom"
    assert_problem_format(failed.json())  # it was {"error"} alone
    assert fine.status_code == 200 and fine.json()["documents"][0]["entities"]


# ---- batching ------------------------------------------------------------------------------------

def _concurrent_requests(tagger, config, count):
    app = create_app(tagger, config)
    texts = [f"{DOCUMENTS[i % 3]} Item {i} from Ingrid Lindqvist{'.' * (i % 2)}" for i in range(count)]

    async def interact(client):
        before = batch_count((await client.get("/metrics")).text)
        responses = await asyncio.gather(*(post(client, {"documents": [{"id": i, "text": t}]}) for i, t in enumerate(texts)))
        after = batch_count((await client.get("/metrics")).text)
        return responses, after - before

    responses, calls = run_app(app, interact)
    expected = model_adapter.predict_documents(tagger, texts)
    for i, (response, want) in enumerate(zip(responses, expected)):
        assert response.status_code == 200
        got = response.json()["documents"][0]
        assert got["id"] == i  # its own document, not another request's
        assert [(e["start"], e["end"], e["label"]) for e in got["entities"]] == \
               [(e["start"], e["end"], e["label"]) for e in want["entities"]]
    return texts, calls


def test_concurrent_requests_share_model_calls_and_get_their_own_results(tagger):
    count = 24
    texts = [f"{DOCUMENTS[i % 3]} Item {i} from Ingrid Lindqvist{'.' * (i % 2)}" for i in range(count)]
    budget = sum(model_adapter.count_tokens(t) for t in texts)
    # the batch closes when the budget is reached, not on a clock: one call for all 24
    _, calls = _concurrent_requests(tagger, ServeConfig(max_batch_tokens=budget, max_document_tokens=64,
                                                        max_wait_ms=60_000), count)
    assert calls == 1


def test_without_batching_every_request_is_its_own_model_call(tagger):
    _, calls = _concurrent_requests(tagger, ServeConfig(batching=False), 12)
    assert calls == 12


def test_mixed_nbest_requests_and_gone_clients_each_get_their_own_result(tagger):
    # requests asking for different nbest share the queue (they need separate model calls), and
    # clients that give up mid-request (their handler cancelled) must not disturb the others' batches
    app = create_app(tagger, ServeConfig(max_wait_ms=20))
    requests = [([f"{DOCUMENTS[i % 3]} Item {i}."] * (1 + i % 2), (1, 2, 1, 3)[i % 4]) for i in range(16)]

    async def interact(client):
        tasks = [asyncio.ensure_future(post(client, {"documents": [{"id": i, "text": t} for t in texts], "nbest": k}))
                 for i, (texts, k) in enumerate(requests)]
        await asyncio.sleep(0.005)  # queued, waiting for their batch
        for task in tasks[1::5]:
            task.cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    answers = run_app(app, interact)
    for i, ((texts, k), answer) in enumerate(zip(requests, answers)):
        if i % 5 == 1:  # cancelled while its batch waited its 20 ms
            assert isinstance(answer, asyncio.CancelledError)
            continue
        assert answer.status_code == 200, answer.text
        want = model_adapter.predict_documents(tagger, texts, k)
        for got, expected in zip(answer.json()["documents"], want):
            assert got["id"] == i and ("nbest" in got) == (k > 1)
            assert [(e["start"], e["end"], e["label"]) for e in got["entities"]] == \
                   [(e["start"], e["end"], e["label"]) for e in expected["entities"]]
            if k > 1:
                assert [len(s["analyses"]) for s in got["nbest"]] == [len(s["analyses"]) for s in expected["nbest"]]


def _job_batches(jobs, **options):
    """Submit jobs (texts, tokens, nbest) at once to a Batcher whose model records its calls."""
    calls = []

    def run_batch(texts, nbest):
        calls.append((list(texts), nbest))
        return [{"text": t} for t in texts]

    async def main():
        batcher = Batcher(run_batch, **options)
        batcher.start()
        with batcher._condition:  # the worker waits for this lock: every job is queued before the first batch forms
            futures = [batcher.submit(texts, tokens, nbest) for texts, tokens, nbest in jobs]
        results = await asyncio.gather(*futures)
        batcher.stop()
        return results

    return asyncio.run(main()), calls


def test_batcher_keeps_arrival_order_budget_and_nbest_groups():
    jobs = [(["a", "b"], 4, 1), (["c"], 3, 1), (["d"], 10, 1), (["e"], 2, 1), (["f"], 1, 2), (["g"], 1, 1)]
    with pytest.raises(ShuttingDown):  # not started: refused at once
        asyncio.run(_submit_to(Batcher(lambda t, n: t)))
    results, calls = _job_batches(jobs, max_batch_tokens=8, max_wait_ms=0)
    assert [[r["text"] for r in result] for result in results] == [["a", "b"], ["c"], ["d"], ["e"], ["f"], ["g"]]
    # 4+3 fit in 8; "d" (10 tokens) is over the budget and runs alone; "f" asks for another nbest
    assert calls == [(["a", "b", "c"], 1), (["d"], 1), (["e"], 1), (["f"], 2), (["g"], 1)]
    _, unbatched = _job_batches(jobs[:3], max_batch_tokens=100, max_wait_ms=0, batching=False)
    assert [texts for texts, _ in unbatched] == [["a", "b"], ["c"], ["d"]]


async def _submit_to(batcher, texts=("a",)):
    return await batcher.submit(list(texts), 1)


def test_batcher_refuses_over_max_queue_and_after_stop():
    async def main():
        batcher = Batcher(lambda texts, nbest: [{} for _ in texts], max_queue=2)
        batcher._thread = threading.current_thread()  # accept jobs without a worker taking them
        batcher.submit(["a"], 1), batcher.submit(["b"], 1)
        with pytest.raises(QueueFull, match="--max-queue 2"):
            batcher.submit(["c"], 1)
        batcher._thread = None
        with pytest.raises(ShuttingDown):
            batcher.submit(["c"], 1)

    asyncio.run(main())


def test_a_full_queue_makes_room_for_jobs_whose_request_is_gone():
    # It was: cancelled jobs (their clients left) kept their places until the worker looked, after
    # the batch it was running, and a live request was refused 503 for them
    async def main():
        batcher = Batcher(lambda texts, nbest: [{} for _ in texts], max_queue=2)
        batcher._thread = threading.current_thread()  # accept jobs without a worker taking them
        gone = batcher.submit(["a"], 3)
        batcher.submit(["b"], 4)
        gone.cancel()
        batcher.submit(["c"], 5)
        assert [job.texts for job in batcher._queue] == [["b"], ["c"]] and batcher._queued_tokens == 9
        with pytest.raises(QueueFull):  # full of live jobs: refused as before
            batcher.submit(["d"], 1)
        batcher._thread = None

    asyncio.run(main())


def test_queue_depth_counts_live_jobs_only():
    # It was: a job whose request was cancelled (its client left) counted in the depth, and so in
    # /metrics' fastner_queue_depth, until the worker reached it
    async def main():
        batcher = Batcher(lambda texts, nbest: [{} for _ in texts], max_queue=4)
        batcher._thread = threading.current_thread()  # accept jobs without a worker taking them
        gone = batcher.submit(["a"], 1)
        batcher.submit(["b"], 1)
        gone.cancel()
        depth = batcher.queue_depth
        batcher._thread = None
        return depth, len(batcher._queue)

    assert asyncio.run(main()) == (1, 2)  # the gone job is still queued, not counted


def test_batcher_stop_finishes_queued_jobs():
    results, calls = _job_batches([(["a"], 1, 1), (["b"], 1, 1)], max_batch_tokens=1, max_wait_ms=0)
    assert [r[0]["text"] for r in results] == ["a", "b"] and len(calls) == 2


def test_batcher_skips_jobs_whose_request_is_gone():
    # uvicorn cancels the requests still in flight when its graceful shutdown times out: their
    # queued jobs ran anyway, holding the exit for the queue's whole model work
    calls = []

    def run_batch(texts, nbest):
        calls.append(list(texts))
        return [{"text": t} for t in texts]

    async def main():
        batcher = Batcher(run_batch, max_batch_tokens=100, max_wait_ms=0)
        batcher.start()
        with batcher._condition:  # every job queued, two of them cancelled, before the worker looks
            futures = [batcher.submit([text], 1) for text in "abcd"]
            for gone in (futures[1], futures[3]):
                gone.cancel()
        results = await asyncio.gather(futures[0], futures[2])
        with batcher._condition:  # all queued jobs gone: the worker waits on, it does not exit
            later = [batcher.submit(["e"], 1)]
            later[0].cancel()
        results += [await batcher.submit(["f"], 1)]
        batcher.stop()
        return results

    results = asyncio.run(main())
    assert [r[0]["text"] for r in results] == ["a", "c", "f"]
    assert calls == [["a", "c"], ["f"]]


def test_deadlines_run_what_is_due_and_forget_a_finished_loop():
    from fastner.serve.deadlines import Deadlines

    deadlines = Deadlines(0.001)
    fired = []

    async def main(keys):
        done = asyncio.Event()
        deadlines.add("gone", 0.0, fired.append)
        deadlines.discard("gone")  # discarded before it was due: never runs
        for key in keys:
            deadlines.add(key, 0.0, fired.append)
        deadlines.add("last", 0.002, lambda key: (fired.append(key), done.set()))
        await done.wait()

    asyncio.run(main(["a", "b"]))
    assert fired == ["a", "b", "last"]
    # an entry left pending on a loop that has ended is dropped, not run on the next loop
    asyncio.run(_add_and_leave(deadlines, fired))
    fired.clear()
    asyncio.run(main(["c"]))
    assert fired == ["c", "last"]


async def _add_and_leave(deadlines, fired):
    deadlines.add("stale", 0.0, fired.append)  # due, but the loop ends before its sweep


@pytest.mark.parametrize("options, message", [
    ({"max_batch_tokens": 0}, "max-batch-tokens"),
    ({"max_wait_ms": -1}, "max-wait-ms"),
    ({"max_wait_ms": float("nan")}, "max-wait-ms"),
    ({"max_wait_ms": 1e9}, "max-wait-ms"),
    ({"body_timeout_s": 0}, "body-timeout-s"),
    ({"body_timeout_s": float("inf")}, "body-timeout-s"),
    ({"header_timeout_s": 0}, "header-timeout-s"),
    ({"header_timeout_s": 601}, r"header-timeout-s must be in \(0, 600\]"),
    ({"max_queue": 0}, "max-queue"),
    ({"max_document_tokens": 5000}, "must not exceed"),
    ({"max_request_tokens": 0}, "max-request-tokens"),
    ({"max_document_tokens": 100, "max_request_tokens": 50}, "must not exceed max-request-tokens"),
    ({"precision": "int4"}, "precision"),
])
def test_config_checks(options, message):
    with pytest.raises(ValueError, match=message):
        ServeConfig(**options)


def test_serve_takes_the_precision_names_of_the_other_commands():
    # It was: serve took float32/float64/int8/bf16 while tag, evaluate and export take
    # fp32/int8/bf16, so `fastner serve MODEL --precision fp32` was refused.
    from fastner.cli import build_parser
    from fastner.tagger import PRECISIONS as TAGGER_PRECISIONS

    parser = build_parser()
    for name in TAGGER_PRECISIONS:
        assert parser.parse_args(["serve", "model", "--precision", name]).precision == name
        assert parser.parse_args(["tag", "model", "--precision", name]).precision == name
    assert parser.parse_args(["serve", "model"]).precision == "fp32" == ServeConfig().precision
    # the name this option had before, still read
    assert parser.parse_args(["serve", "model", "--precision", "float32"]).precision == "fp32"
    assert ServeConfig(precision="float32").precision == "fp32"
    assert parser.parse_args(["serve", "model", "--precision", "float64"]).precision == "float64"


def test_response_is_plain_json_records(tagger):
    app = create_app(tagger)

    async def interact(client):
        return await post(client, {"documents": [SENTENCE]})

    response = run_app(app, interact)
    assert response.headers["content-type"] == "application/json"
    document = json.loads(response.content)["documents"][0]
    assert set(document) == {"entities"}  # no "id": null for a plain string


def test_odd_text_is_answered(tagger):
    app = create_app(tagger)
    texts = ["a\ud800b Peter", "\u0000\u0007 Omar Haddad\u00a0said", "\u202e Frankfurt \ufeff", " \n\t "]

    async def interact(client):
        body = json.dumps({"documents": texts}).encode()  # escapes: the lone surrogate travels as \ud800
        return await post_bytes(client, body)

    response = run_app(app, interact)
    assert response.status_code == 200, response.text
    for text, document in zip(texts, json.loads(response.content)["documents"]):
        assert all(text[e["start"]:e["end"]] == e["text"] for e in document["entities"])


def test_nbest_adds_the_k_best_analyses_per_sentence(tagger):
    app = create_app(tagger)
    text = "Peter Blackburn visited Germany. EU rejects German call."

    async def interact(client):
        return await post(client, {"documents": [text], "nbest": 3})

    response = run_app(app, interact)
    assert response.status_code == 200, response.text
    document = response.json()["documents"][0]
    assert len(document["nbest"]) == 2  # two sentences
    for sentence in document["nbest"]:
        probabilities = [a["probability"] for a in sentence["analyses"]]
        assert 1 <= len(probabilities) <= 3 and probabilities == sorted(probabilities, reverse=True)
        assert all(0.0 <= p <= 1.0 for p in probabilities)
        for analysis in sentence["analyses"]:
            assert all(text[e["start"]:e["end"]] == e["text"] for e in analysis["entities"])


def test_every_4xx_answers_in_one_format(tagger):
    # It was: validation errors came with "problems", the limits' 413s, nbest over the server's
    # limit (422), a bad Content-Length (400) and unknown paths (404) without.
    app = create_app(tagger, ServeConfig(max_body_bytes=200, max_documents=3))

    async def interact(client):
        return [await post(client, {"documents": ["a"], "nbest": model_adapter.MAX_NBEST + 1}),
                await post(client, {"documents": ["a"] * 4}),
                await post(client, {"documents": ["a" * 300]}),
                await client.post("/v1/entities", content=b"{}", headers={"content-type": "application/json",
                                                                          "content-length": "x"}),
                await client.get("/v2/nothing"),
                await post(client, {"documents": []})]

    for response in run_app(app, interact):
        assert 400 <= response.status_code < 500, response.text
        assert_problem_format(response.json())


def assert_problem_format(body: dict) -> None:
    """`body` is the server's one error format (fastner.serve.problems)."""
    assert set(body) == {"error", "field", "problems"}, body
    first = body["problems"][0]
    assert set(first) == {"field", "message", "type"} and body["field"] == first["field"]
    assert body["error"] == f"{first['field']}: {first['message']}"

