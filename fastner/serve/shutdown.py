"""ASGI middleware: a request that its server cancels as it stops is answered 503 in the server's
one error format, and ends without an error.

uvicorn cancels every request still in flight when its graceful shutdown's period runs out
(server.GRACEFUL_SHUTDOWN_SECONDS): the cancellation reached uvicorn, which logged it as
"Exception in ASGI application" with a traceback and answered a plain-text 500, as if the server
had failed. The request's client is told instead that the server is stopping (Retry-After: the
next instance, behind a load balancer, may take it). Its batcher job was cancelled with it (the
worker drops it).

Only a cancellation after the server began to stop is answered so: `fastner serve`'s protocol
marks the scope of the request in flight on each connection then (STOPPING, set in
fastner.serve.connection). Any other cancellation (a caller of the app in-process cancelling its
own task) propagates as usual."""
from __future__ import annotations

import asyncio

from fastner.serve.problems import StartTracking, problem_body, send_json

STOPPING = "fastner.stopping"  # a scope key: True once the server stops with this request in flight


class AnswerCancelled:
    def __init__(self, app, retry_after: int):
        self.app = app
        self.retry_after = retry_after

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracked = StartTracking(send)
        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            if not scope.get(STOPPING):
                raise
            # The request's task is the server's and ends here: nothing awaits the cancellation
            # (re-raised, the server only logs it). Consumed, so that the answer can be sent.
            task = asyncio.current_task()
            if task is not None and hasattr(task, "uncancel"):  # Python >= 3.11
                task.uncancel()
            if tracked.started:  # an answer already under way: the server closes its connection unfinished
                return
            await send_json(send, 503, problem_body(
                "request", "the server is stopping and cancelled this request before its answer", "shutting_down"),
                {"Retry-After": str(self.retry_after), "Connection": "close"})
