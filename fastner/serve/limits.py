"""ASGI middleware: refuse a request body over `max_bytes` with 413, before it is parsed.

A declared Content-Length over the limit is refused before any of the body is read; a chunked
or understated body is counted as it arrives and cut off at the limit."""
from __future__ import annotations

import json

from starlette.exceptions import HTTPException

from fastner.serve.problems import problem_body


class BodyTooLarge(HTTPException):
    """Raised from inside receive(): an HTTPException, so the framework's body parsing passes
    it on (it turns other errors into 400) and the app's handler answers 413."""

    def __init__(self, detail: dict):
        super().__init__(413, detail)


async def _send_json(send, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _refusal(self) -> dict:
        return problem_body("body", f"request body over the limit of {self.max_bytes} bytes (--max-body-bytes)", "limit")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > self.max_bytes
            except ValueError:
                await _send_json(send, 400, problem_body("content-length", "not a number", "header"))
                return
            if too_large:
                await _send_json(send, 413, self._refusal())
                return
        received = 0
        started = False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self._refusal())
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:  # raised outside the app's exception handling
            if not started:
                await _send_json(send, 413, self._refusal())
