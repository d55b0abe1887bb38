"""The real `fastner serve` process on a free loopback port: it answers, finishes an in-flight
request on SIGTERM and exits 0, and refuses bad startup options with `fastner: error:`."""
import json
import re
import signal
import threading
import time
import urllib.request

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from fastner.cli import main  # noqa: E402
from fastner.serve.process import ServerProcess, get_json  # noqa: E402
from tests.serve_testing import SENTENCE, tiny_model_dir  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


def post_json(url: str, body: dict, timeout: float = 60.0):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, json.loads(response.read())


def queue_depth(url: str) -> float:
    with urllib.request.urlopen(url + "metrics", timeout=10) as response:
        text = response.read().decode()
    return float(re.search(r"^fastner_queue_depth (\S+)$", text, re.M).group(1))


def test_serve_answers_and_finishes_in_flight_requests_on_sigterm(model_dir):
    # a long batching wait keeps the request in flight, queued, while SIGTERM arrives
    server = ServerProcess(model_dir, ["--max-wait-ms", "3000", "--threads", "1", "--precision", "float64"]).start()
    try:
        status, info = get_json(server.url + "v1/model")
        assert status == 200 and info["batching"]["max_wait_ms"] == 3000 and info["precision"] == "float64"
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


@pytest.mark.parametrize("argv, message", [
    (["serve", "{missing}"], "no tagger directory"),
    (["serve", "{model}", "--max-batch-tokens", "100", "--max-document-tokens", "200"], "must not exceed"),
    (["serve", "{model}", "--max-request-tokens", "100", "--max-document-tokens", "200"],
     "must not exceed max-request-tokens"),
    (["serve", "{model}", "--max-request-tokens", "0"], "argument --max-request-tokens"),
    (["serve", "{model}", "--port", "70000"], "argument --port: must be in [0, 65535]"),
    (["serve", "{model}", "--max-wait-ms", "nan"], "argument --max-wait-ms"),
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
