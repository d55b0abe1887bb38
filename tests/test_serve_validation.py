"""fastner serve in-process: a request's body checked field by field (JSON, keys, types, ids), and
the one error format every 4xx answers in."""
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastner.serve import app as app_module  # noqa: E402
from fastner.serve import model as model_adapter  # noqa: E402
from fastner.serve.app import create_app  # noqa: E402
from fastner.serve.config import ServeConfig  # noqa: E402
from tests.serve_testing import assert_problem_format, post, post_once, run_app  # noqa: E402


# tiny models: see conftest.one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


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

    response = post_once(app, body)
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

    response = post_once(app, body)
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

    response = post_once(app, body)
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

    response = post_once(app, body)
    assert response.status_code == 422, response.text
    assert response.json()["error"].startswith("body: malformed JSON") and reason in response.json()["error"]


def test_text_that_looks_like_a_duplicate_key_is_answered(tagger):
    app = create_app(tagger)
    body = json.dumps({"documents": ['"text": "a", "text": "b"', {"id": "text", "text": '{"id": 1, "id": 2}'}]})

    assert post_once(app, body.encode()).status_code == 200


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
    error = post_once(create_app(tagger), f'{{"documents": ["a"], {twice}}}'.encode()).json()
    assert [p["field"] for p in error["problems"]] == [f"k{n}" for n in range(app_module.MAX_PROBLEMS)]


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
