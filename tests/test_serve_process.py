"""The real `fastner serve` process on a free loopback port: it answers, finishes an in-flight
request on SIGTERM and exits 0, refuses bad startup options with `fastner: error:`, and does no
work for a client that left nor waits on one that stopped sending."""
import json
import os
import re
import signal
import socket
import threading
import time
import urllib.request

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from fastner.cli import main  # noqa: E402
from fastner.serve.process import HOST, ServerProcess, get_json, resident_bytes  # noqa: E402
from fastner.serve.server import GRACEFUL_SHUTDOWN_SECONDS, OMP_WAIT_POLICY  # noqa: E402
from tests.serve_testing import SENTENCE, process_gone, tiny_model_dir  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


def post_json(url: str, body: dict, timeout: float = 60.0):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, json.loads(response.read())


def metric(url: str, name: str) -> float:
    """A sample of /metrics (`name` with its labels as written there); 0 if absent."""
    with urllib.request.urlopen(url + "metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def queue_depth(url: str) -> float:
    return metric(url, "fastner_queue_depth")


def wait_until(condition, what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def send_raw(port: int, body: bytes, declared: int) -> socket.socket:
    """A POST /v1/entities declaring `declared` bytes of body and sending `body`."""
    connection = socket.create_connection((HOST, port), timeout=60)
    connection.sendall(b"POST /v1/entities HTTP/1.1\r\nHost: fastner\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (declared, body))
    return connection


def read_until_closed(connection: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a socket.timeout if it never does)."""
    answer = b""
    while True:
        chunk = connection.recv(65536)
        if not chunk:
            return answer
        answer += chunk


@pytest.mark.parametrize("in_process", [False, True], ids=["model-process", "in-process"])
def test_serve_answers_and_finishes_in_flight_requests_on_sigterm(model_dir, in_process):
    # a long batching wait keeps the request in flight, queued, while SIGTERM arrives
    server = ServerProcess(model_dir, ["--max-wait-ms", "3000", "--threads", "1", "--precision", "float64",
                                       "--header-timeout-s", "0.5", *(["--in-process"] if in_process else [])]).start()
    try:
        status, info = get_json(server.url + "v1/model")
        assert status == 200 and info["batching"]["max_wait_ms"] == 3000 and info["precision"] == "float64"
        assert info["batching"]["model_process"] is not in_process
        children = server.pids()[1:]  # the model process (and multiprocessing's resource tracker)
        assert bool(children) is not in_process, children
        # the load test's memory and CPU figures count the model process too
        assert in_process or server.rss_bytes() > resident_bytes(server.process.pid) + 10 * 2**20
        assert info["limits"]["header_timeout_s"] == 0.5
        # the option reaches uvicorn's protocol (test_serve_connections.py tests what it does)
        half = socket.create_connection((HOST, server.port), timeout=60)
        half.sendall(b"GET /healthz HTTP/1.1\r\nHost: fastner\r\n")
        assert read_until_closed(half).startswith(b"HTTP/1.1 408 ")
        answer = {}

        def client():
            answer["response"] = post_json(server.url + "v1/entities", {"documents": [SENTENCE]})

        thread = threading.Thread(target=client)
        thread.start()
        deadline = time.monotonic() + 30
        while queue_depth(server.url) < 1:
            assert time.monotonic() < deadline, "the request never reached the queue"
            time.sleep(0.02)
        server.terminate()
        thread.join(60)
        code = server.stop()
    finally:
        server.stop()
    status, body = answer["response"]
    assert status == 200
    entities = body["documents"][0]["entities"]
    assert entities and all(SENTENCE[e["start"]:e["end"]] == e["text"] for e in entities)
    # uvicorn re-raises SIGTERM after its graceful shutdown: the status of a terminated process
    assert code == -signal.SIGTERM, server.final_log
    assert "stopped (in-flight requests answered, model worker joined)" in server.final_log
    wait_until(lambda: all(process_gone(pid) for pid in children), "a child of the server outlived it")


def environment_of(pid: int) -> dict:
    with open(f"/proc/{pid}/environ", "rb") as handle:
        entries = handle.read().split(b"\0")
    return dict(entry.decode(errors="replace").partition("=")[::2] for entry in entries if entry)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads the model process's environment from Linux /proc")
@pytest.mark.parametrize("given", [None, "ACTIVE"], ids=["unset", "set-by-the-user"])
def test_serve_model_process_openmp_threads_wait_passively_unless_told_otherwise(model_dir, given):
    # spinning OpenMP workers in the model process (--threads 2) took the HTTP side's cores
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    with ServerProcess(model_dir, ["--threads", "2", "--precision", "float64"], env=env) as server:
        status, body = post_json(server.url + "v1/entities", {"documents": [SENTENCE]})
        assert status == 200 and body["documents"][0]["entities"]
        children = server.pids()[1:]  # the model process (and multiprocessing's resource tracker)
        assert children
        policies = {environment_of(pid).get("OMP_WAIT_POLICY") for pid in children}
    assert policies == {given or OMP_WAIT_POLICY}, policies


@pytest.mark.parametrize("argv, message", [
    (["serve", "{missing}"], "no tagger directory"),
    (["serve", "{model}", "--max-batch-tokens", "100", "--max-document-tokens", "200"], "must not exceed"),
    (["serve", "{model}", "--max-request-tokens", "100", "--max-document-tokens", "200"],
     "must not exceed max-request-tokens"),
    (["serve", "{model}", "--max-request-tokens", "0"], "argument --max-request-tokens"),
    (["serve", "{model}", "--port", "70000"], "argument --port: must be in [0, 65535]"),
    (["serve", "{model}", "--max-wait-ms", "nan"], "argument --max-wait-ms"),
    (["serve", "{model}", "--body-timeout-s", "0"], "argument --body-timeout-s: must be a finite number in (0, 600]"),
    (["serve", "{model}", "--header-timeout-s", "inf"], "argument --header-timeout-s: must be a finite number in (0, 600]"),
    (["serve", "{model}", "--threads", "0"], "argument --threads: must be in [1, 1024], got 0"),
    # the other commands' bound: OpenMP hangs or crashes asked for tens of thousands of threads
    (["serve", "{model}", "--threads", "65536"], "argument --threads: must be in [1, 1024], got 65536"),
])
def test_serve_refuses_bad_startup_options(model_dir, tmp_path, capsys, argv, message):
    previous = torch.get_num_threads()
    argv = [a.format(missing=str(tmp_path / "nothing"), model=model_dir) for a in argv]
    try:
        try:
            code = main(argv)
        except SystemExit as exit:  # argparse's own refusals exit from the parser
            code = exit.code
        assert code == 2
    finally:
        torch.set_num_threads(previous)
    error = capsys.readouterr().err
    assert "fastner: error:" in error and message in error and "Traceback" not in error


@pytest.mark.slow
def test_serve_drops_the_work_of_clients_that_left_and_answers_stalled_bodies_408(model_dir):
    # It was: a client that closed its socket while its request was queued still had its documents
    # run on the model; a body shorter than its Content-Length held its connection with no answer
    # (as long as the client waited), and a SIGTERM then took the whole graceful shutdown and ended
    # with a CancelledError traceback and a plain-text 500
    server = ServerProcess(model_dir, ["--body-timeout-s", "1", "--max-wait-ms", "1000", "--threads", "1"]).start()
    try:
        documents = metric(server.url, "fastner_batch_documents_sum")  # the warm-up's
        request = json.dumps({"documents": [SENTENCE]}).encode()
        leaving = send_raw(server.port, request, len(request))
        wait_until(lambda: queue_depth(server.url) >= 1, "the request never reached the queue")
        leaving.close()  # while it waits its --max-wait-ms for others to join
        wait_until(lambda: metric(server.url, 'fastner_requests_total{route="/v1/entities",status="499"}') == 1,
                   "the client's leaving was not noticed")
        assert queue_depth(server.url) == 0  # the depth counts live jobs: not the cancelled one
        # a request after it is answered once the worker has reached the cancelled job, and dropped it
        assert post_json(server.url + "v1/entities", {"documents": [SENTENCE]})[0] == 200
        assert metric(server.url, "fastner_batch_documents_sum") == documents + 1

        stalled = send_raw(server.port, request[:10], len(request))
        answer = read_until_closed(stalled)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"connection: close" in answer.lower() and b"--body-timeout-s" in answer

        stalled = send_raw(server.port, request[:10], len(request))
        wait_until(lambda: metric(server.url, 'fastner_requests_total{route="/v1/entities",status="408"}') == 1,
                   "the first stalled body was not counted")
        started = time.monotonic()
        server.terminate()  # while the second body is stalled
        answer = read_until_closed(stalled)
        code = server.stop()
        seconds = time.monotonic() - started
    finally:
        server.stop()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert code == -signal.SIGTERM, server.final_log
    assert seconds < GRACEFUL_SHUTDOWN_SECONDS, seconds  # it was the whole graceful shutdown, then a cancellation
    assert "Traceback" not in server.final_log and "CancelledError" not in server.final_log, server.final_log
