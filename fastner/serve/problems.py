"""The body of every error answer (4xx, and the server's 503s and 500): {"error": "FIELD: MESSAGE",
"field": FIELD, "problems": [{"field", "message", "type"}]}, the first problem in "error" and
"field", so that a client reads one format whichever check refused its request (the body limit,
the model's limits, validation) or whatever kept the server from answering it (a full queue, a
shutdown, a failed model call)."""
from __future__ import annotations

from typing import List

from starlette.responses import JSONResponse


def problems_body(problems: List[dict]) -> dict:
    """The answer's body for `problems` ({"field", "message", "type"} each, the first the main one)."""
    first = problems[0] if problems else {"field": "body", "message": "invalid request"}
    return {"error": f"{first['field']}: {first['message']}", "field": first["field"], "problems": problems}


def problem_body(field: str, message: str, kind: str) -> dict:
    """The answer's body for one problem."""
    return problems_body([{"field": field, "message": message, "type": kind}])


class FieldError(Exception):
    """A request that parses but asks for something the server does not serve: 422 naming it."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(message)
        self.field, self.message, self.status = field, message, status


def field_response(error: FieldError) -> JSONResponse:
    return JSONResponse(status_code=error.status, content=problem_body(error.field, error.message, "limit"))


# nginx's "client closed request": the status /metrics counts for a request whose client left
# before its answer (the answer itself reaches nobody)
CLIENT_CLOSED = 499


def client_closed_body() -> dict:
    return problem_body("request", "the client closed the connection before its answer", "client_closed")


async def send_json(send, status: int, body: dict, headers: dict = None) -> None:
    """Answer `body` from an ASGI middleware (outside the app's own responses), in the bytes the
    app's JSONResponse would send (a refused body reads the same whichever layer refused it)."""
    payload = JSONResponse(body).body
    extra = [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())] + extra})
    await send({"type": "http.response.body", "body": payload})


class StartTracking:
    """An ASGI `send` that records whether the answer has started: a middleware that must answer
    after the app raised can do so only before (else the server closes the connection unfinished)."""

    def __init__(self, send):
        self.send = send
        self.started = False

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self.send(message)
