"""ASGI middleware: the request body's limits, enforced before the body is parsed.

Size: a declared Content-Length over `max_bytes` is refused (413) before any of the body is read;
a chunked or understated body is counted as it arrives and cut off at the limit. Either way the
answer closes the connection: kept open, the server read the rest of the body to find the next
request (a client sending 1 GB was read to its end, at the server's expense).

Time: a body that stops arriving (shorter than its Content-Length, or a chunked body that stalls)
is answered 408 once no part of it has come for `timeout_s`, and the connection is closed; without
it such a request held its connection and a handler for as long as the client kept the socket
open, and a SIGTERM then waited out the whole graceful shutdown (uvicorn has no body timeout).
The bound is on the gap between chunks, not on the whole body (as nginx's client_body_timeout and
other proxies' body timeouts are): a stalled client is caught as soon, while a slow but
progressing upload of a full `max_bytes` body is never cut, whatever its link's speed (a client
dripping a byte now and then is not caught either: bounding connections is the proxy's part).
Only the body is timed: a receive() after it (a handler watching for the client's disconnect)
waits on."""
from __future__ import annotations

import asyncio

from starlette.exceptions import HTTPException

from fastner.serve.deadlines import Deadlines
from fastner.serve.problems import CLIENT_CLOSED, StartTracking, client_closed_body, problem_body, send_json


class BodyRefused(HTTPException):
    """Raised from inside receive(): an HTTPException, so the framework's body parsing passes
    it on (it turns other errors into 400) and the app's handler answers with its status and
    problem body."""

    def __init__(self, status: int, detail: dict, headers: dict = None):
        super().__init__(status, detail, headers)


# A refused body's unread rest would be read (and discarded) to reach the next request on the
# connection: the answer closes it instead (uvicorn stops reading once it sends this header).
CLOSE = {"Connection": "close"}


class BodyTooLarge(BodyRefused):
    def __init__(self, detail: dict):
        super().__init__(413, detail, CLOSE)


class BodyAbandoned(BodyRefused):
    """The client disconnected before its body was complete: counted as CLIENT_CLOSED, like a
    client that leaves while its request is queued (FastAPI answered it as a malformed body, 400)."""

    def __init__(self):
        super().__init__(CLIENT_CLOSED, client_closed_body())


class BodyTimeout(BodyRefused):
    def __init__(self, detail: dict):
        # the rest of the body may still come: the connection cannot carry another request
        super().__init__(408, detail, CLOSE)


class BodyLimit:
    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        # a stalled body is refused between timeout_s and 1.25 timeout_s after its last chunk
        self._deadlines = Deadlines(timeout_s / 4)
        self._expired = set()  # tasks cancelled by a body deadline: the only ones whose cancellation is a 408

    def _expire(self, task: asyncio.Task) -> None:
        self._expired.add(task)
        task.cancel()  # the task waits in receive(): its deadline is discarded once that returns

    def _too_large(self) -> BodyTooLarge:
        return BodyTooLarge(problem_body("body", f"request body over the limit of {self.max_bytes} bytes (--max-body-bytes)",
                                         "limit"))

    def _timeout(self, received: int) -> BodyTimeout:
        return BodyTimeout(problem_body("body", f"no part of the request body came for {self.timeout_s:g} s "
                                                f"(--body-timeout-s; {received} bytes received)", "timeout"))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > self.max_bytes
            except ValueError:
                # where the body ends is unknown: no request can follow it
                await send_json(send, 400, problem_body("content-length", "not a number", "header"), CLOSE)
                return
            if too_large:
                refusal = self._too_large()
                await send_json(send, refusal.status_code, refusal.detail, refusal.headers)
                return
        received = 0
        body_complete = False
        task = asyncio.current_task()

        async def counting_receive():
            nonlocal received, body_complete
            if body_complete:  # what comes now is the disconnect, whenever it comes
                return await receive()
            self._deadlines.add(task, self.timeout_s, self._expire)
            try:
                message = await receive()
            except asyncio.CancelledError:
                if task not in self._expired:
                    raise
                self._expired.discard(task)
                if hasattr(task, "uncancel"):  # Python >= 3.11: this cancellation is consumed here
                    task.uncancel()
                raise self._timeout(received) from None
            finally:
                self._deadlines.discard(task)
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large()
                body_complete = not message.get("more_body", False)
            elif message["type"] == "http.disconnect":
                raise BodyAbandoned()
            return message

        tracked = StartTracking(send)
        try:
            await self.app(scope, counting_receive, tracked)
        except BodyRefused as refusal:  # raised outside the app's exception handling
            if not tracked.started:
                await send_json(send, refusal.status_code, refusal.detail, refusal.headers)
