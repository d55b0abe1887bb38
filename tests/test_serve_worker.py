"""The model process of `fastner serve` (fastner.serve.worker.ModelProcess): its answers are the
in-process model call's, a child that dies fails only its batch and is started again, it ignores
the terminal's signals, it exits with its server, and a model that does not load says why as
Tagger.load does."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastner.serve.app import create_app  # noqa: E402
from fastner.serve.config import ServeConfig  # noqa: E402
from fastner.serve.model import describe, predict_documents  # noqa: E402
from fastner.serve.worker import ModelProcess, ModelProcessError  # noqa: E402
from tests.serve_testing import DOCUMENTS, SENTENCE, post, process_gone, run_app, tiny_model_dir  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def process(model_dir):
    worker = ModelProcess(model_dir, threads=1).start()
    yield worker
    worker.stop()


def gone(pid: int, timeout: float = 20.0) -> bool:
    """True once no process `pid` runs, within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not process_gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_answers_equal_the_in_process_model_call(process, tagger):
    documents = DOCUMENTS * 3
    assert process(documents, 1) == predict_documents(tagger, documents, 1)
    assert process(documents[:4], 3) == predict_documents(tagger, documents[:4], 3)
    assert process([], 1) == []
    assert process.info == describe(tagger)


def test_a_bad_batch_fails_alone(process):
    with pytest.raises(ModelProcessError, match="nbest must be between 1 and"):
        process([SENTENCE], 0)
    assert process([SENTENCE], 1)[0]["entities"]  # the same child, still serving
    assert process.starts == 1


def test_a_killed_child_is_started_again_before_the_next_batch(model_dir):
    worker = ModelProcess(model_dir, threads=1).start()
    try:
        first = worker.pid
        want = worker([SENTENCE], 1)
        os.kill(first, signal.SIGKILL)
        # reaped (its state in /proc says zombie while its other threads still exit: too early)
        deadline = time.monotonic() + 20
        while worker.alive():
            assert time.monotonic() < deadline, "the killed child was never reaped"
            time.sleep(0.05)
        assert worker([SENTENCE], 1) == want
        assert worker.starts == 2 and worker.pid != first and worker.alive()
    finally:
        worker.stop()
    assert not worker.alive() and gone(first)


def dies_on_request(connection, *_settings):
    """A stand-in child (spawned by name from this module): ready at once, answers each document
    with no entities, and exits with status 3 when a batch holds the text "die", as a child
    crashing under a batch would."""
    connection.send(("ready", {"stand-in": True}))
    while True:
        try:
            texts, _nbest = connection.recv()
        except EOFError:
            return
        if "die" in texts:
            os._exit(3)
        connection.send(("ok", [{"entities": []} for _ in texts]))


class DyingModelProcess(ModelProcess):
    child_main = staticmethod(dies_on_request)


def test_a_child_that_dies_under_a_batch_fails_that_batch_and_the_next_is_served():
    worker = DyingModelProcess("unused").start()
    try:
        first = worker.pid
        assert worker(["a", "b"], 1) == [{"entities": []}] * 2
        with pytest.raises(ModelProcessError, match=r"exited during this batch \(exit status 3\)"):
            worker(["a", "die"], 1)
        assert gone(first)
        assert worker(["a"], 1) == [{"entities": []}]
        assert worker.starts == 2 and worker.pid != first
    finally:
        worker.stop()


def test_start_batch_holds_the_pipe_until_its_results_are_read():
    # the batcher sends a batch, then posts the previous answers, then waits: meanwhile no other
    # batch may use the pipe, or answers would go to the wrong batch
    worker = DyingModelProcess("unused").start()
    try:
        wait = worker.start_batch(["a"], 1)
        second = []
        other = threading.Thread(target=lambda: second.append(worker(["b", "c"], 1)))
        other.start()
        other.join(0.3)
        assert other.is_alive() and not second  # held back while the first batch is out
        assert wait() == [{"entities": []}]
        other.join(20)
        assert second == [[{"entities": []}] * 2]
        with pytest.raises(ModelProcessError, match="exit status 3"):
            worker.start_batch(["die"], 1)()
        assert worker(["a"], 1) == [{"entities": []}]  # the lock was let go, a new child serves
    finally:
        worker.stop()


def test_the_child_ignores_the_terminals_signals_and_stops_when_asked(model_dir):
    worker = ModelProcess(model_dir, threads=1).start()
    pid = worker.pid
    try:
        # Ctrl-C in a terminal signals the whole process group: the server finishes what is in
        # flight first, so the model must still answer
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
        time.sleep(0.2)
        assert worker([SENTENCE], 1)[0]["entities"] and worker.starts == 1
    finally:
        worker.stop()
    assert gone(pid)
    worker.stop()  # a second stop does nothing


DIES_WITH_ITS_PARENT = """
import sys, time
from fastner.serve.worker import ModelProcess
worker = ModelProcess(sys.argv[1], threads=1).start()
print(worker.pid, flush=True)
time.sleep(600)
"""


def test_the_child_exits_when_its_server_is_killed(model_dir):
    parent = subprocess.Popen([sys.executable, "-c", DIES_WITH_ITS_PARENT, model_dir], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        parent.kill()  # no shutdown runs: the child sees its pipe close
        parent.wait()
        assert gone(child), "the model process outlived its server"
    finally:
        parent.kill()
        parent.stdout.close()


def test_a_model_that_does_not_load_raises_as_tagger_load_does(tmp_path):
    from fastner.tagger import Tagger

    missing = str(tmp_path / "nothing")
    with pytest.raises(Exception) as in_process:
        Tagger.load(missing)
    with pytest.raises(type(in_process.value)) as in_child:
        ModelProcess(missing).start()
    assert str(in_child.value) == str(in_process.value)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "weights.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception) as in_process:
        Tagger.load(str(tmp_path / "broken"))
    with pytest.raises(type(in_process.value)):
        ModelProcess(str(tmp_path / "broken")).start()


def test_the_app_answers_500_for_a_batch_the_child_died_under_and_serves_the_next():
    worker = DyingModelProcess("unused").start()
    app = create_app(worker, ServeConfig(max_wait_ms=0))

    async def interact(client):
        info = (await client.get("/v1/model")).json()
        return info, [await post(client, {"documents": [text]}) for text in ("a", "die", "a")]

    info, answers = run_app(app, interact)
    assert info["batching"]["model_process"] is True and info["stand-in"] is True
    assert [answer.status_code for answer in answers] == [200, 500, 200]
    assert answers[1].json()["problems"][0]["type"] == "model_failed"
    assert "exited during this batch" in answers[1].json()["problems"][0]["message"]
    assert answers[2].json() == {"documents": [{"entities": []}]}
    assert not worker.alive()  # the app's shutdown stopped it


def test_the_served_model_process_answers_as_the_tagger(model_dir, tagger):
    worker = ModelProcess(model_dir, threads=1).start()
    app = create_app(worker, ServeConfig(max_wait_ms=0))

    async def interact(client):
        return [await post(client, {"documents": DOCUMENTS, "nbest": nbest}) for nbest in (1, 2)]

    answers = run_app(app, interact)
    for nbest, answer in zip((1, 2), answers):
        assert answer.status_code == 200
        assert answer.json()["documents"] == predict_documents(tagger, DOCUMENTS, nbest)
