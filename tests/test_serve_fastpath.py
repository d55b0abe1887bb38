"""fastner serve's fast path for POST /v1/entities (fastner.serve.fastpath): it takes only bodies
the route's schema accepts as they are, with the same values; it answers them as the route
would; everything else reaches the route."""
import json
import random

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastner.serve import model as model_adapter  # noqa: E402
from fastner.serve.app import create_app, request_documents, request_model  # noqa: E402
from fastner.serve.config import ServeConfig  # noqa: E402
from fastner.serve.fastpath import ENTITIES_PATH, plain_request  # noqa: E402
from tests.serve_testing import DOCUMENTS, SENTENCE, run_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_DOCUMENTS = 4

# values of every JSON type (and Python's json's bool-is-int and big-int corners) for mutations
ODD_VALUES = [None, True, False, 0, 1, -1, 2, 10**30, 1.0, 2.5, "", "2", "a\ud800b", [], ["a"], {}, {"text": "a"}]
TEXTS = ["", "a", SENTENCE, "Café 😀 Zürich", "x\udfff", "\x00", " " * 3]
IDS = ["a1", "", 0, 7, -3, 10**40, None]


def random_document(rng: random.Random):
    """A document: mostly well-formed, sometimes one field wrong or extra."""
    roll = rng.random()
    if roll < 0.35:
        return rng.choice(TEXTS)
    if roll < 0.85:
        document = {"text": rng.choice(TEXTS)}
        if rng.random() < 0.6:
            document["id"] = rng.choice(IDS)
        return document
    if roll < 0.92:  # an object with a field wrong, missing or extra
        document = {"text": rng.choice(TEXTS), "id": rng.choice(IDS)}
        change = rng.choice(("text", "id", "missing", "extra"))
        if change == "missing":
            del document["text"]
        elif change == "extra":
            document[rng.choice(("lang", "str", "int", "DocumentIn", "Text"))] = rng.choice(ODD_VALUES)
        else:
            document[change] = rng.choice(ODD_VALUES)
        return document
    return rng.choice(ODD_VALUES)  # not a document at all (or, by chance, a string or an object)


def random_body(rng: random.Random):
    roll = rng.random()
    if roll < 0.05:
        return rng.choice(ODD_VALUES)  # not an object
    count = rng.choice((0, 1, 1, 2, 3, MAX_DOCUMENTS, MAX_DOCUMENTS + 1))
    body = {"documents": [random_document(rng) for _ in range(count)]}
    if rng.random() < 0.4:
        body["nbest"] = rng.choice((1, 2, 8, 9, 0, -1, 10**30, True, False, 2.0, "2", None))
    if rng.random() < 0.05:
        body[rng.choice(("extra", "Documents", "int"))] = rng.choice(ODD_VALUES)
    if rng.random() < 0.04:
        body["documents"] = rng.choice(ODD_VALUES)  # not a list (or, by chance, one)
    if rng.random() < 0.03:
        del body["documents"]
    return body


def schema_reading(model, body):
    """What the route gets from its schema: (ids, texts, objects, nbest), or None if refused."""
    from pydantic import ValidationError

    try:
        request = model.model_validate(body)
    except ValidationError:
        return None
    return (*request_documents(request), request.nbest)


def test_plain_request_takes_only_what_the_schema_accepts_with_the_same_values():
    model = request_model(MAX_DOCUMENTS)
    rng = random.Random(17)
    taken = refused = 0
    for _ in range(6000):
        body = random_body(rng)
        # through JSON and back, as a body arrives (tuples, non-string keys and the like cannot)
        body = json.loads(json.dumps(body))
        mine, schema = plain_request(body, MAX_DOCUMENTS), schema_reading(model, body)
        if mine is not None:
            taken += 1
            assert schema is not None, body  # never takes what the route would refuse
            assert mine == schema, body
            # the same types too (1 == True, but an id of true is not an id of 1)
            assert [type(v) for v in mine[0]] == [type(v) for v in schema[0]], body
        elif schema is None:
            refused += 1
    # the generator reaches both sides often (else this test could not fail)
    assert taken > 1500 and refused > 1500, (taken, refused)


@pytest.mark.parametrize("body", [
    {"documents": ["a"], "nbest": True},  # a boolean is not a count (json: True == 1)
    {"documents": [{"id": True, "text": "a"}]},
    {"documents": [{"id": 1.0, "text": "a"}]},
    {"documents": ["a"] * (MAX_DOCUMENTS + 1)},
    {"documents": []},
    {"documents": ["a"], "nbest": None},
    {"documents": [{"text": "a", "id": "x", "lang": "en"}]},
    {"documents": [{"id": "x"}]},
    ["a"],
])
def test_plain_request_leaves_the_corners_to_the_route(body):
    assert plain_request(body, MAX_DOCUMENTS) is None


def _counting_route(app):
    """Count the requests that reach the FastAPI route of POST /v1/entities."""
    (route,) = [r for r in app.routes if getattr(r, "path", None) == ENTITIES_PATH]
    calls = []
    inner = route.app

    async def counted(scope, receive, send):
        calls.append(scope["path"])
        await inner(scope, receive, send)

    route.app = counted
    return calls


def _send(client, body: bytes, content_type: str = "application/json"):
    return client.post(ENTITIES_PATH, content=body, headers={"content-type": content_type})


# bodies sent both ways; the route's way: a JSON media type the fast path leaves to FastAPI
BOTH_WAYS = [
    {"documents": DOCUMENTS[:MAX_DOCUMENTS]},
    {"documents": [{"id": "a1", "text": SENTENCE}, {"id": 7, "text": ""}, SENTENCE, {"text": "x", "id": None}]},
    {"documents": [SENTENCE], "nbest": 3},
    {"documents": ["a\ud800b"]},  # a lone surrogate: accepted, answered escaped
    {"documents": [SENTENCE], "nbest": model_adapter.MAX_NBEST + 1},  # 422 from the shared answer
    {"documents": ["word " * 40]},  # over --max-document-tokens: 413 naming documents.0
    {"documents": [{"text": "word " * 40}]},  # ... naming documents.0.text
    {"documents": ["word " * 25] * 3},  # over --max-request-tokens (each under --max-document-tokens)
]


def test_fast_path_answers_as_the_route_would(tagger):
    app = create_app(tagger, ServeConfig(max_documents=MAX_DOCUMENTS, max_document_tokens=30, max_request_tokens=60))
    calls = _counting_route(app)

    async def interact(client):
        pairs = []
        for body in BOTH_WAYS:
            raw = json.dumps(body).encode()
            fast = await _send(client, raw)
            reached = len(calls)
            routed = await _send(client, raw, "application/vnd.fastner+json")
            assert len(calls) == reached + 1  # that one went the route's way
            pairs.append((fast, routed))
        return pairs, (await client.get("/metrics")).text

    pairs, metrics = run_app(app, interact)
    assert len(calls) == len(BOTH_WAYS)  # none of the first of each pair reached the route
    statuses = []
    for body, (fast, routed) in zip(BOTH_WAYS, pairs):
        assert (fast.status_code, fast.content) == (routed.status_code, routed.content), body
        assert fast.headers["content-type"] == routed.headers["content-type"]
        statuses.append(fast.status_code)
    assert statuses == [200, 200, 200, 200, 422, 413, 413, 413]
    assert json.loads(pairs[5][0].content)["field"] == "documents.0"
    assert json.loads(pairs[6][0].content)["field"] == "documents.0.text"
    # counted under the route's path, as the route's own answers are
    assert f'fastner_requests_total{{route="{ENTITIES_PATH}",status="200"}} 8.0' in metrics


def test_what_the_fast_path_leaves_reaches_the_route_with_its_body(tagger):
    app = create_app(tagger, ServeConfig(max_documents=MAX_DOCUMENTS))
    calls = _counting_route(app)
    sent = [
        (b'{"documents": ["a"], "documents": ["b"]}', 422, "documents"),  # duplicated key
        (b'{"documents": [', 422, "body"),  # malformed
        (b"", 422, "body"),  # no body
        (json.dumps({"documents": ["a"], "nbest": True}).encode(), 422, "nbest"),
        (json.dumps({"documents": ["a"] * (MAX_DOCUMENTS + 1)}).encode(), 413, "documents"),
        (json.dumps({"documents": [{"text": "a", "lang": "en"}]}).encode(), 422, "documents.0.lang"),
    ]

    async def interact(client):
        return [await _send(client, body) for body, _, _ in sent]

    answers = run_app(app, interact)
    assert len(calls) == len(sent)
    for (body, status, field), answer in zip(sent, answers):
        assert answer.status_code == status, (body, answer.text)
        assert answer.json()["field"] == field, (body, answer.text)
