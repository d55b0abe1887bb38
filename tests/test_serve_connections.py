"""What uvicorn does with fastner serve's connections, as `fastner serve` runs it (its protocol
and options, fastner.serve.server.uvicorn_options), in a thread on a free loopback port, over
raw sockets: a refused body is not read on, a request head that stops coming is cut, a request
cancelled at the end of the graceful shutdown is answered in the error format."""
import contextlib
import http.client
import json
import logging
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

import fastner  # noqa: E402
from fastner.serve.app import create_app  # noqa: E402
from fastner.serve.config import ServeConfig  # noqa: E402
from fastner.serve.process import HOST, free_port  # noqa: E402
from fastner.serve.server import GRACEFUL_SHUTDOWN_SECONDS, uvicorn_options  # noqa: E402
from tests.serve_testing import SENTENCE, tiny_model_dir  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
HANG = 30  # seconds: a socket read that waits this long is a hang, not a slow server


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    return fastner.Tagger.load(tiny_model_dir(tmp_path_factory), device="cpu")


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + HANG
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@contextlib.contextmanager
def served(app, config: ServeConfig, graceful_shutdown_s: float = GRACEFUL_SHUTDOWN_SECONDS):
    """uvicorn serving `app` in a thread: (port, server); stopped (as by SIGTERM) on leaving."""
    port = free_port()
    # log_config=None: uvicorn's records reach the root logger (caplog)
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_config=None, access_log=False,
                                           **uvicorn_options(config, graceful_shutdown_s)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), "uvicorn did not start")
        assert server.started
        yield port, server
    finally:
        server.should_exit = True
        thread.join(HANG)
        assert not thread.is_alive(), "uvicorn did not stop"


def connect(port: int) -> socket.socket:
    return socket.create_connection((HOST, port), timeout=HANG)


def read_until_closed(connection: socket.socket) -> bytes:
    answer = b""
    while True:
        try:
            chunk = connection.recv(65536)
        except ConnectionResetError:
            return answer
        if not chunk:
            return answer
        answer += chunk


def read_answer(connection: socket.socket):
    """One answer with a Content-Length: (status, lower-cased head, parsed body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    head = head.decode("latin-1").lower()
    length = int(head.split("content-length: ", 1)[1].split("\r\n", 1)[0])
    while len(body) < length:
        body += connection.recv(65536)
    return int(head.split()[1]), head, json.loads(body)


def post_head(length: int) -> bytes:
    return (b"POST /v1/entities HTTP/1.1\r\nHost: fastner\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % length)


def test_a_refused_body_is_not_read_and_keep_alive_stays_for_the_others(tagger):
    # It was: the 413 kept the connection open, and uvicorn read the body's unread rest to reach
    # the next request: a client sending a 1 GB body was read to its end
    config = ServeConfig(max_body_bytes=1000)
    with served(create_app(tagger, config), config) as (port, _):
        connection = connect(port)
        connection.sendall(post_head(1 << 30))
        status, head, body = read_answer(connection)
        assert status == 413 and "connection: close" in head and body["field"] == "body"
        sent = 0
        # the server has closed the connection: reset (a timeout would be a server that only paused reading)
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            while sent < 256 << 20:  # far more than the sockets' buffers hold
                connection.sendall(b" " * (1 << 20))
                sent += 1 << 20
        connection.close()

        client = http.client.HTTPConnection(HOST, port, timeout=HANG)  # keep-alive: two requests, one connection
        sockets = []
        for _ in range(2):
            client.request("POST", "/v1/entities", json.dumps({"documents": [SENTENCE]}),
                           {"Content-Type": "application/json"})
            response = client.getresponse()
            assert response.status == 200 and response.getheader("connection") is None, response.read()
            response.read()
            sockets.append(client.sock)  # http.client reconnects if the server closed
        assert sockets[0] is sockets[1]
        client.close()


def test_a_request_head_that_stops_coming_is_cut(tagger):
    # It was: uvicorn has no header timeout (its keep-alive timeout is armed only after an answer,
    # and cancelled by any byte): a connection that sent nothing, or half a request head, was held
    # as long as its client kept it open (slowloris)
    config = ServeConfig(header_timeout_s=0.2)
    with served(create_app(tagger, config), config) as (port, _):
        idle = connect(port)
        half = connect(port)
        half.sendall(b"POST /v1/entities HTTP/1.1\r\nHost: fastner\r\nContent-")
        after_answer = connect(port)  # an answer, then half of the next request's head
        after_answer.sendall(b"GET /healthz HTTP/1.1\r\nHost: fastner\r\n\r\n")
        assert read_answer(after_answer)[0] == 200
        after_answer.sendall(b"GET /heal")
        slow_body = connect(port)  # the head complete in time, the body later: the head timeout is over
        body = json.dumps({"documents": [SENTENCE]}).encode()
        slow_body.sendall(post_head(len(body)))
        for connection in (half, after_answer):
            answer = read_until_closed(connection)
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            problem = json.loads(answer.partition(b"\r\n\r\n")[2])
            assert problem["field"] == "headers" and "--header-timeout-s" in problem["error"], problem
            assert b"connection: close" in answer.lower()
        assert read_until_closed(idle) == b""  # nothing had come: closed without an answer
        slow_body.sendall(body)
        assert read_answer(slow_body)[0] == 200


def test_a_request_cancelled_at_shutdown_gets_503_in_the_error_format(tagger, caplog):
    # It was: past the graceful shutdown's period, uvicorn's cancellation of the requests still in
    # flight reached it as an exception: a traceback in the log and a plain-text 500
    config = ServeConfig(max_wait_ms=60_000)  # the request waits in the queue for others to join
    app = create_app(tagger, config)
    with caplog.at_level(logging.INFO):
        with served(app, config, graceful_shutdown_s=0.1) as (port, server):
            connection = connect(port)
            body = json.dumps({"documents": [SENTENCE]}).encode()
            connection.sendall(post_head(len(body)) + body)
            wait_until(lambda: app.state.batcher.queue_depth == 1, "the request never reached the queue")
            server.should_exit = True  # SIGTERM's doing
            answer = read_until_closed(connection)
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 "), answer
    assert b"retry-after: 1" in head.lower() and b"connection: close" in head.lower()
    problem = json.loads(payload)
    assert set(problem) == {"error", "field", "problems"} and problem["problems"][0]["type"] == "shutting_down"
    assert "timeout graceful shutdown exceeded" in caplog.text  # it was cancelled, not answered by the model
    assert not [record for record in caplog.records if record.exc_info], caplog.text
    assert "Exception in ASGI application" not in caplog.text
