"""uvicorn's HTTP protocol with a bound on the time a request's head takes to come (and a mark on
the requests in flight when the server stops: fastner.serve.shutdown).

uvicorn (0.55, httptools or h11) has no header timeout: its keep-alive timeout is armed only
after an answer, and any byte that arrives cancels it. A connection that sends nothing, or half a
request line or half its headers and then nothing, was held (a socket, a file descriptor, a
protocol object) for as long as the client kept it open; a few thousand such clients (slowloris)
use up the process's file descriptors.

Here the request line and headers must have come within `header_timeout_s` of the connection's
opening, or of the previous answer on it. The bound is on the whole head, not between its bytes:
a client dripping a byte now and then is cut as soon as a silent one. Past it, a connection on
which part of a request had come is answered 408 (the server's one error format) and closed; one
on which nothing had come is closed (a browser's spare connection, as the keep-alive timeout
closes one). The body has its own timeout (--body-timeout-s, fastner.serve.limits)."""
from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from fastner.serve.problems import problem_body
from fastner.serve.shutdown import STOPPING


class HeaderTimeoutProtocol(HttpToolsProtocol):
    header_timeout_s = 10.0  # set per server by protocol_class()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._head_timer = None  # armed while the server waits for a request's head
        self._head_started = False  # the next request's first byte has come (its head has not ended)

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._await_head()

    def on_message_begin(self) -> None:  # the parser's: a request's first byte
        self._head_started = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._head_started = False
        self._stop_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # no request left whose head has come (a pipelined one is started by now): wait for the next
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._await_head()

    def shutdown(self) -> None:  # the server's, as it begins to stop
        # the request in flight, if it outlasts the graceful shutdown, is cancelled by the server:
        # answered 503 then (fastner.serve.shutdown)
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.scope[STOPPING] = True
        super().shutdown()

    def connection_lost(self, exc) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def _await_head(self) -> None:
        self._stop_timer()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)

    def _stop_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_started:
            body = json.dumps(problem_body(
                "headers", f"the request line and headers did not come within {self.header_timeout_s:g} s "
                           "(--header-timeout-s)", "timeout")).encode()
            head = [STATUS_LINE[408]] + [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
            head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n"]
            self.transport.write(b"".join(head) + body)
        self.transport.close()


def protocol_class(header_timeout_s: float) -> type:
    """The protocol class to give uvicorn (its `http` setting) for this header timeout."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout_s": header_timeout_s})
