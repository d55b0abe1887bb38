"""ASGI middleware: POST /v1/entities with a plainly well-formed body, answered without FastAPI's
request machinery.

Why: at 32 concurrent clients the server was bound by its own per-request Python, not the model
(the model worker and the event loop then shared one GIL: the process got one core of Python;
the model now runs in a process of its own, fastner.serve.worker, and the HTTP side's Python
still decides how fast answers go out). Of a
request's server CPU without the model (`python -m benchmarks.serve_overhead`), FastAPI's routing,
exception and exit-stack middlewares, dependency solving, pydantic validation and Request objects
took about two thirds; the endpoint's own work (limits, the queue, the JSON answer) the rest.

What it takes: exactly the bodies the route's schema accepts as they are, recognised by
`plain_request` with type checks that are a subset of the schema's (`type(x) is int`, so a
boolean is not a count; an id a string, an integer or null; no unknown key; 1 to
--max-documents documents), sent with Content-Type application/json (the form FastAPI parses as
JSON without question), to the path itself. Everything else, every error included, goes on to
the FastAPI route with the body replayed, so an error answer has one source: the route's
validation and exception handlers. A taken request is answered by the same function the route
calls (`answer` = create_app's answer_entities: the limits a schema cannot say, the queue, the
answer) and counted in /metrics under the route's path; the body is read through the receive
this middleware is given (inside BodyLimit: its size and time limits hold), parsed by the
route's own parser (fastner.serve.jsonbody.loads: duplicated keys refused).

tests/test_serve_fastpath.py checks `plain_request` against the route's pydantic model on
thousands of random and mutated bodies (taken => the model accepts it with the same values;
the model refuses => not taken), and that answers come from this path.
"""
from __future__ import annotations

from typing import Awaitable, Callable, List, Optional, Tuple

from fastner.serve.jsonbody import loads
from fastner.serve.problems import FieldError, field_response

ENTITIES_PATH = "/v1/entities"
# the header values taken (lower-cased): FastAPI parses these bodies as JSON (so do a few more,
# application/*+json with parameters: those go the route's way)
_JSON_TYPES = frozenset({b"application/json", b"application/json; charset=utf-8", b"application/json;charset=utf-8"})

# (ids, texts, objects, nbest): objects[n] is True where document n was an {"id", "text"} object
PlainRequest = Tuple[list, List[str], List[bool], int]
Answer = Callable[[list, List[str], List[bool], int, Callable], Awaitable]


def plain_request(body, max_documents: int) -> Optional[PlainRequest]:
    """A parsed body's documents and nbest, if the route's schema accepts the body as it is
    (fastner.serve.app.EntitiesRequest, its documents' length bounded by `max_documents`);
    None for anything else (the route then answers it, with its validation's errors)."""
    if type(body) is not dict:
        return None
    documents = body.get("documents")
    nbest = body.get("nbest", 1)
    if (type(documents) is not list or not 1 <= len(documents) <= max_documents
            or type(nbest) is not int or nbest < 1 or len(body) != 1 + ("nbest" in body)):
        return None
    ids: list = []
    texts: List[str] = []
    objects: List[bool] = []
    for document in documents:
        kind = type(document)
        if kind is str:
            ids.append(None)
            texts.append(document)
            objects.append(False)
            continue
        if kind is not dict:
            return None
        text = document.get("text")
        doc_id = document.get("id")
        if (type(text) is not str or len(document) != 1 + ("id" in document)
                or not (doc_id is None or type(doc_id) is str or type(doc_id) is int)):
            return None
        ids.append(doc_id)
        texts.append(text)
        objects.append(True)
    return ids, texts, objects, nbest


def _content_type(headers) -> Optional[bytes]:
    """The first Content-Type header's value, lower-cased (what Starlette's Headers.get reads)."""
    for name, value in headers:
        if name == b"content-type":
            return value.lower()
    return None


async def _read_body(receive) -> Optional[bytes]:
    """The whole body, or None if the receive gave something else first (a disconnect)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":  # BodyLimit raises at a disconnect; a bare server may not
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replaying(body: bytes, receive):
    """A receive that gives `body` once, whole, then what `receive` gives (the disconnect)."""
    given = False

    async def replay():
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class EntitiesFastPath:
    def __init__(self, app, route, max_documents: int, answer: Answer):
        self.app = app
        self.route = route  # the FastAPI route: its path labels /metrics, as for the requests it answers
        self.max_documents = max_documents
        self.answer = answer

    async def __call__(self, scope, receive, send):
        if (scope["type"] != "http" or scope["path"] != ENTITIES_PATH or scope["method"] != "POST"
                or scope.get("root_path") or _content_type(scope["headers"]) not in _JSON_TYPES):
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route  # before the body: a body refused on its way (408, 413) is the route's too
        body = await _read_body(receive)
        if body is None:  # the body never came whole: the route reads (and answers) what there is
            await self.app(scope, receive, send)
            return
        try:
            request = plain_request(loads(body), self.max_documents) if body else None
        except Exception:  # noqa: BLE001 - malformed, duplicated keys, too deep: the route says which
            request = None
        if request is None:
            await self.app(scope, _replaying(body, receive), send)
            return
        try:
            response = await self.answer(*request, receive)
        except FieldError as error:
            response = field_response(error)
        await response(scope, receive, send)
