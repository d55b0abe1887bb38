"""The FastAPI app of `fastner serve`: routes, request schemas, errors, the batching worker's
lifetime and the web page.

Everything the app reads from disk (the model, the page) is read in create_app, once: no
request names a file or makes the server open one.
"""
from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
from contextlib import asynccontextmanager
from typing import List, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

import fastner
from fastner.serve import model as model_adapter
from fastner.serve.batcher import Batcher, QueueFull, ShuttingDown
from fastner.serve.config import ServeConfig
from fastner.serve.deadlines import Deadlines
from fastner.serve.fastpath import ENTITIES_PATH, EntitiesFastPath
from fastner.serve.jsonbody import DuplicateKeys, JSONRoute, duplicate_problems
from fastner.serve.problems import (CLIENT_CLOSED, FieldError, client_closed_body, field_response, problem_body,
                                    problems_body)
from fastner.serve.limits import BodyLimit
from fastner.serve.metrics import CONTENT_TYPE, RequestMetrics, ServerMetrics
from fastner.serve.shutdown import AnswerCancelled
from fastner.serve.worker import ModelProcess

log = logging.getLogger("fastner.serve")
PAGE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "index.html")
RETRY_AFTER_SECONDS = 1
# Warm-up: the first calls of each shape pay one-time allocation and dispatch costs.
WARMUP_TEXTS = ["Peter Blackburn of the European Commission visited Frankfurt on Monday .",
                "Altamira Holdings agreed to buy Crescent Logistics for $ 3.2 billion , chief executive Omar Haddad said ."]


# ---- schemas ---------------------------------------------------------------------------------

class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # strict: an id comes back exactly as sent, so none is coerced (true is not 1, 1.0 not 1)
    id: Optional[Union[StrictStr, StrictInt]] = Field(None, description="echoed back with the document's result")
    text: str


DOCUMENTS_DESCRIPTION = "raw texts, or {id, text} objects"


class EntitiesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"documents": ["Peter Blackburn visited Germany .", {"id": "a1", "text": "EU rejects German call ."}]}]})
    documents: List[Union[str, DocumentIn]] = Field(..., min_length=1, description=DOCUMENTS_DESCRIPTION)
    nbest: StrictInt = Field(1, ge=1, description="analyses per sentence; above 1 the answer adds them with their probabilities")


class Entity(BaseModel):
    start: int = Field(..., description="character offset of the first character")
    end: int = Field(..., description="character offset after the last character")
    label: str
    text: str = Field(..., description="document[start:end]")
    score: float


class Analysis(BaseModel):
    probability: float
    entities: List[dict] = Field(..., description="{start, end, label, text} of this analysis")


class SentenceAnalyses(BaseModel):
    start: int
    end: int
    analyses: List[Analysis] = Field(..., description="the k best analyses of the sentence, best first")


class DocumentOut(BaseModel):
    id: Optional[Union[str, int]] = None
    entities: List[Entity]
    nbest: Optional[List[SentenceAnalyses]] = Field(None, description="with nbest > 1: per sentence")


class EntitiesResponse(BaseModel):
    documents: List[DocumentOut]


def request_model(max_documents: int):
    """EntitiesRequest with this server's --max-documents as the list's max_length: pydantic counts
    the documents before it validates any, so a body of 100,000 wrong documents costs a
    millisecond instead of seconds of the event loop and a 12 MB list of problems."""
    return create_model("EntitiesRequest", __base__=EntitiesRequest, documents=(
        List[Union[str, DocumentIn]], Field(..., min_length=1, max_length=max_documents, description=DOCUMENTS_DESCRIPTION)))


def request_documents(request: EntitiesRequest):
    """A validated request's (ids, texts, objects): objects[n] is True where document n was an
    {"id", "text"} object (None its id when it was a string)."""
    objects = [not isinstance(document, str) for document in request.documents]
    ids = [document.id if is_object else None for document, is_object in zip(request.documents, objects)]
    texts = [document.text if is_object else document for document, is_object in zip(request.documents, objects)]
    return ids, texts, objects


def annotate(**annotations):
    """Set a function's parameter annotations (what FastAPI reads to parse a request) to objects
    made at run time: under `from __future__ import annotations` FastAPI would look a written
    name up in the module's globals."""
    def apply(function):
        function.__annotations__.update(annotations)
        return function
    return apply


_UNION_TAGS = ("str", "int", "DocumentIn")  # pydantic names the union member tried in `loc`


def is_json_content_type(value: str) -> bool:
    """FastAPI's rule for parsing a body as JSON: application/json or application/*+json (so not
    text/json, application/x-json, nor a missing header)."""
    maintype, _, subtype = value.split(";", 1)[0].strip().lower().partition("/")
    return maintype == "application" and (subtype == "json" or subtype.endswith("+json"))


def malformed_json(reason: str) -> dict:
    return {"field": "body", "message": f"malformed JSON{reason}".rstrip(": "), "type": "json_invalid"}


def unparsable_reason(error: BaseException) -> Optional[str]:
    """Why json.loads refused a body with something other than a JSONDecodeError (which FastAPI
    turns into a 422 itself; these it answers with a bare 400): None for any other error."""
    if isinstance(error, RecursionError):
        return ": nested too deeply"
    if isinstance(error, UnicodeDecodeError):
        return f": not UTF-8 ({error.reason} at byte {error.start})"
    if isinstance(error, ValueError):  # an integer longer than Python converts (4300 digits)
        return f": {str(error).split(';')[0]}"
    return None


# problems a 422 lists: a 1 MiB body of 80,000 unknown fields answered a 7 MB list of 80,000
MAX_PROBLEMS = 20


def validation_problems(errors) -> List[dict]:
    """pydantic errors -> [{"field": "documents.2.text", "message", "type"}], one per field, the
    first MAX_PROBLEMS fields.

    A document is a string or an object: pydantic reports a failure against each member of the
    union; keep the one that matches what was sent (an object's field error, else one line
    saying what a document may be)."""
    problems: dict = {}
    for item in errors:
        if len(problems) == MAX_PROBLEMS:
            break
        location = [part for part in item.get("loc", ()) if part != "body"]
        kind = item.get("type", "")
        if kind == "json_invalid":
            reason = (item.get("ctx") or {}).get("error", "")
            at = f" at character {location[0]}" if location else ""
            problems["body"] = malformed_json(f"{at}: {reason}")
            continue
        # pydantic puts the member's name after a document's index and after `id`; a client's own
        # key of that name ({"int": 1}) elsewhere is a field
        tags = {number for number, part in enumerate(location) if part in _UNION_TAGS and number
                and (isinstance(location[number - 1], int) or location[number - 1] == "id")}
        union_member = location[min(tags)] if tags else None
        location = [str(part) for number, part in enumerate(location) if number not in tags]
        field = ".".join(location) or "body"
        message = item.get("msg", "invalid")
        if union_member is not None:
            sent = item.get("input")
            if isinstance(sent, dict) and union_member == "str":
                continue  # an object was sent: its own field errors say more
            if not isinstance(sent, (dict, str)) and len(location) == 2:  # the document itself
                field = ".".join(location[:2])
                message = f'a document is a string or an object {{"id", "text"}}, got {type(sent).__name__}'
            elif location[-1:] == ["id"] and len(location) == 3:  # documents.N.id: one line for both members
                message = f"an id is a string or an integer, got {type(sent).__name__}"
        problems.setdefault(field, {"field": field, "message": message, "type": kind})
    return list(problems.values())


# Most answers come within a few milliseconds (--max-wait-ms and one model call): a request's
# watch for its client's disconnect (a task, ~20 us) starts only once it has waited this long,
# so those requests pay a dict entry (fastner.serve.deadlines). One that waits longer (a queue
# under overload: when clients give up and retry) is watched from then on, and a client already
# gone by then is seen at once (the server keeps the disconnect for the next receive()).
WATCH_AFTER_S = 0.05


class ClientClosed(Exception):
    """The client disconnected before its answer; its job was cancelled."""


async def cancel_when_client_leaves(receive, future: asyncio.Future) -> bool:
    """Wait for the client to disconnect, then cancel `future` (its batcher job): the worker
    drops a queued job whose future is cancelled, so a client that gave up costs no model work;
    a job already in a running batch finishes with it, its result dropped. True once it
    cancelled the future.

    A receive() after the body returns {"type": "http.disconnect"} when the client goes, and
    blocks until then (ASGI); any other message (a server that does not block) ends the watch
    rather than spin."""
    try:
        if (await receive())["type"] != "http.disconnect":
            return False
    except Exception:  # noqa: BLE001 - nothing to watch: the request is answered as usual
        return False
    return future.cancel()


class DisconnectWatch:
    """`await watch.result(future, receive)`: the job's results, or ClientClosed if the client
    disconnected first (watched once the request has waited WATCH_AFTER_S). A cancellation of
    the request itself (uvicorn's, at the end of the graceful shutdown) propagates, and cancels
    the job too."""

    def __init__(self):
        self._deadlines = Deadlines(WATCH_AFTER_S / 2)
        self._receives: dict = {}  # future -> its request's receive, while the request waits
        self._watches: dict = {}  # future -> its watch task, once started

    def _start(self, future: asyncio.Future) -> None:
        self._watches[future] = asyncio.ensure_future(cancel_when_client_leaves(self._receives[future], future))

    async def result(self, future: asyncio.Future, receive):
        self._receives[future] = receive
        self._deadlines.add(future, WATCH_AFTER_S, self._start)
        try:
            return await future
        except asyncio.CancelledError:
            watch = self._watches.get(future)
            if watch is not None and watch.done() and not watch.cancelled() and watch.result():
                raise ClientClosed() from None
            raise
        finally:
            self._deadlines.discard(future)
            del self._receives[future]
            watch = self._watches.pop(future, None)
            if watch is not None:
                watch.cancel()


# ---- the app -----------------------------------------------------------------------------------

def model_info(described: dict, config: ServeConfig, model_process: bool) -> dict:
    """GET /v1/model: fastner.serve.model.describe(tagger), and this server's settings."""
    return {
        **described,
        "batching": {"enabled": config.batching, "max_batch_tokens": config.max_batch_tokens,
                     "max_wait_ms": config.max_wait_ms, "max_queue": config.max_queue, "threads": config.threads,
                     "model_process": model_process},
        "limits": {"max_body_bytes": config.max_body_bytes, "body_timeout_s": config.body_timeout_s,
                   "header_timeout_s": config.header_timeout_s,
                   "max_documents": config.max_documents, "max_document_tokens": config.max_document_tokens,
                   "max_request_tokens": config.max_request_tokens},
    }


def create_app(model, config: Optional[ServeConfig] = None):
    """The ASGI app serving `model`: a Tagger (already loaded, on its device, in its precision),
    run on the batcher's worker thread in this process, or a started
    fastner.serve.worker.ModelProcess (what `fastner serve` runs), which the app stops at its
    shutdown."""
    config = config or ServeConfig()
    with open(PAGE_FILE, encoding="utf-8") as handle:
        page = handle.read()
    state = {"ready": False}
    if isinstance(model, ModelProcess):
        run_batch, described = model, model.info
    else:
        tagger = model
        run_batch, described = (lambda texts, nbest: model_adapter.predict_documents(tagger, texts, nbest),
                                model_adapter.describe(tagger))
    batcher = Batcher(run_batch,
                      max_batch_tokens=config.max_batch_tokens, max_wait_ms=config.max_wait_ms,
                      max_queue=config.max_queue, threads=config.threads, batching=config.batching)
    metrics = ServerMetrics(lambda: batcher.queue_depth)
    watch = DisconnectWatch()
    batcher.on_batch = metrics.observe_batch
    info = model_info(described, config, isinstance(model, ModelProcess))

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        try:
            for text in WARMUP_TEXTS:  # through the worker: the event loop never runs the model
                await batcher.submit([text] * 8, 8 * model_adapter.count_tokens(text), wait=False)
            # What is loaded by now (torch, the model, the 400k-word pretrained vocabulary) lives as
            # long as the server: out of the cyclic garbage collector's reach. A full collection
            # over it took ~110 ms, a stall of whatever requests were in flight every few thousand
            # (p99 120-150 ms against a p95 of 16 ms for one sentence at half capacity).
            gc.collect()
            gc.freeze()
            state["ready"] = True
            yield
        finally:
            state["ready"] = False
            gc.unfreeze()
            # uvicorn has finished the in-flight requests by now; the queue is empty or being drained
            await asyncio.get_running_loop().run_in_executor(None, batcher.stop)
            if isinstance(model, ModelProcess):
                await asyncio.get_running_loop().run_in_executor(None, model.stop)
            log.warning("fastner serve: stopped (in-flight requests answered, model worker joined)")

    app = FastAPI(title="fastner", version=fastner.__version__, lifespan=lifespan,
                  description="Named entities with character offsets, from a fastner tagger, with dynamic batching.")
    app.router.route_class = JSONRoute  # bodies parsed refusing duplicated keys (before the routes below)
    app.state.batcher, app.state.metrics, app.state.config = batcher, metrics, config

    def get(path: str, **options):
        """A GET route that answers HEAD too (HTTP requires it; health checkers send it), the HEAD
        kept out of the OpenAPI schema."""
        def register(endpoint):
            app.head(path, include_in_schema=False, **{k: v for k, v in options.items() if k != "include_in_schema"})(endpoint)
            return app.get(path, **options)(endpoint)
        return register

    def problems_response(problems: List[dict]) -> JSONResponse:
        return JSONResponse(status_code=422, content=problems_body(problems))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        errors = error.errors()
        for item in errors:  # over --max-documents: counted before validation, 413 as the README says
            if item.get("type") == "too_long" and tuple(item.get("loc", ())) == ("body", "documents"):
                count = (item.get("ctx") or {}).get("actual_length")
                return field_response(FieldError("documents", f"{count} documents; at most {config.max_documents} a request",
                                                  status=413))
        problems = validation_problems(errors)
        if not is_json_content_type(request.headers.get("content-type", "")):  # FastAPI left the body unparsed
            problems = [{"field": "body", "type": "content_type",
                         "message": "send a JSON body with the header Content-Type: application/json"}]
        return problems_response(problems)

    @app.exception_handler(FieldError)
    async def field_error(_request, error: FieldError):
        return field_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, error: StarletteHTTPException):
        if error.status_code == 400 and isinstance(error.__cause__, DuplicateKeys):
            return problems_response(duplicate_problems(error.__cause__.parsed, MAX_PROBLEMS))
        reason = unparsable_reason(error.__cause__) if error.status_code == 400 else None
        if reason is not None:  # FastAPI's "There was an error parsing the body": malformed JSON all the same
            return problems_response([malformed_json(reason)])
        # a dict: BodyTooLarge's problem body; else starlette's own (404 Not Found, 405 ...)
        content = error.detail if isinstance(error.detail, dict) else problem_body("request", str(error.detail), "http")
        return JSONResponse(status_code=error.status_code, content=content, headers=getattr(error, "headers", None))

    @get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    @get("/healthz")
    async def healthz():
        """The process answers (liveness)."""
        return {"status": "ok"}

    @get("/readyz")
    async def readyz():
        """The model is loaded and warmed up, and the server takes requests (readiness)."""
        if not state["ready"]:
            return JSONResponse(status_code=503, content={"status": "starting or stopping"},
                                headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        return {"status": "ready"}

    @get("/v1/model")
    async def v1_model():
        """Labels, tag scheme, encoder, precision, backend and versions of the served model."""
        return info

    @get("/metrics", include_in_schema=False)
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def answer_entities(ids: list, texts: List[str], objects: List[bool], nbest: int, receive) -> Response:
        """POST /v1/entities once its body is validated, whichever way it came (the FastAPI
        route below, or fastner.serve.fastpath for the common well-formed body): the limits a
        schema cannot say (FieldError: 422 or 413 naming the field), the queue, the wait for the
        model worker (watching for the client's disconnect with `receive`), the answer.
        `objects[n]`: document n was an {"id", "text"} object (its field is documents.n.text)."""
        if nbest > model_adapter.MAX_NBEST:
            raise FieldError("nbest", f"this server gives at most {model_adapter.MAX_NBEST} analyses, got {nbest}")
        tokens = 0
        for number, text in enumerate(texts):
            count = model_adapter.count_tokens(text)
            if count > config.max_document_tokens:
                field = f"documents.{number}" + (".text" if objects[number] else "")
                raise FieldError(field, f"{count} tokens; at most {config.max_document_tokens} a document "
                                        "(split it, or start the server with a larger --max-document-tokens)", status=413)
            tokens += count
        if tokens > config.max_request_tokens:
            raise FieldError("documents", f"{tokens} tokens in {len(texts)} documents; at most {config.max_request_tokens} "
                                          "a request (split it, or start the server with a larger --max-request-tokens)",
                             status=413)
        try:
            future = batcher.submit(texts, tokens, nbest)
        except (QueueFull, ShuttingDown) as err:
            kind = "queue_full" if isinstance(err, QueueFull) else "shutting_down"
            return JSONResponse(status_code=503, content=problem_body("request", str(err), kind),
                                headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        try:
            results = await watch.result(future, receive)
        except ClientClosed:
            return JSONResponse(status_code=CLIENT_CLOSED, content=client_closed_body())
        except Exception as err:  # noqa: BLE001 - logged by the worker; the client gets JSON
            return JSONResponse(status_code=500, content=problem_body(
                "request", f"the model call failed: {type(err).__name__}: {err}", "model_failed"))
        # The answer is serialized directly (the records are built by fastner.serve.model, not
        # from user input): re-validating every entity through the response model measured a
        # large share of a small request's server time. EntitiesResponse still documents it in
        # /docs. ASCII with escapes: a lone surrogate sent as "\ud800" comes back escaped, not as
        # bytes UTF-8 cannot encode.
        documents = [result if doc_id is None else {"id": doc_id, **result} for doc_id, result in zip(ids, results)]
        return Response(json.dumps({"documents": documents}).encode("ascii"), media_type="application/json")

    @app.post(ENTITIES_PATH, response_class=Response,
              responses={200: {"model": EntitiesResponse, "description": "per document, in order: its entities"},
                         408: {"description": "the body stopped arriving (--body-timeout-s)"},
                         413: {"description": "body, documents, a document or the request's tokens over the limit"},
                         422: {"description": "malformed JSON or a wrong field (named in `field`)"},
                         503: {"description": "queue full or shutting down (Retry-After)"}})
    @annotate(request=request_model(config.max_documents))
    async def entities(request: EntitiesRequest, http: Request):
        """Entities with character offsets for each document, in the order given."""
        return await answer_entities(*request_documents(request), request.nbest, http.receive)

    # innermost of the app's own middlewares: inside the body limit, so it reads the body as the
    # route would, through BodyLimit's counting receive
    route = next(r for r in app.routes if getattr(r, "path", None) == ENTITIES_PATH and "POST" in r.methods)
    app.add_middleware(EntitiesFastPath, route=route, max_documents=config.max_documents, answer=answer_entities)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes, timeout_s=config.body_timeout_s)
    app.add_middleware(AnswerCancelled, retry_after=RETRY_AFTER_SECONDS)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: it sees the 413s and the 503s at shutdown too
    return app
