"""fastner serve in-process: a full queue (503), clients that leave before their answer (499, and
the deadlines that start watching them), a model call that fails (500)."""
import asyncio
import json
import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastner.serve import app as app_module  # noqa: E402
from fastner.serve import model as model_adapter  # noqa: E402
from fastner.serve.app import create_app  # noqa: E402
from fastner.serve.config import ServeConfig  # noqa: E402
from tests.serve_testing import SENTENCE, assert_problem_format, post, run_app  # noqa: E402


# tiny models: see conftest.one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


class Gate:
    """A model call that blocks until released, so tests can fill the queue without timing."""

    def __init__(self, monkeypatch):
        self.entered = threading.Event()
        self.release = threading.Event()
        real = model_adapter.predict_documents

        def gated(tagger, texts, nbest=1):
            if texts and texts[0].startswith("GATE"):
                self.entered.set()
                self.release.wait(60)
            return real(tagger, texts, nbest)

        monkeypatch.setattr(model_adapter, "predict_documents", gated)


def test_full_queue_gets_503_with_retry_after(tagger, monkeypatch):
    gate = Gate(monkeypatch)
    app = create_app(tagger, ServeConfig(max_queue=1, max_wait_ms=0))
    loop_wait = asyncio.to_thread if hasattr(asyncio, "to_thread") else None

    async def interact(client):
        running = asyncio.ensure_future(post(client, {"documents": ["GATE Peter visited Germany."]}))
        await loop_wait(gate.entered.wait, 60)  # the worker holds the first request
        queued = asyncio.ensure_future(post(client, {"documents": ["Omar Haddad said."]}))
        while app.state.batcher.queue_depth < 1:
            await asyncio.sleep(0.01)
        refused = await post(client, {"documents": ["Ingrid Lindqvist said."]})
        depth = (await client.get("/metrics")).text
        gate.release.set()
        return await running, await queued, refused, depth

    running, queued, refused, depth = run_app(app, interact)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "--max-queue 1" in refused.json()["error"]
    assert_problem_format(refused.json())  # it was {"error"} alone
    assert refused.json()["problems"][0]["type"] == "queue_full"
    assert "fastner_queue_depth 1.0" in depth
    assert running.status_code == 200 and queued.status_code == 200


def _leaving_client(app, body: dict, sent_fraction: float = 1.0):
    """Call the ASGI app as a server would for a client that sends `body` (the first
    `sent_fraction` of it), then stays until `left` is set and disconnects: (the app's task,
    `left`, the messages the app sent)."""
    payload = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/entities", "raw_path": b"/v1/entities", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}
    left, sent, body_sent = asyncio.Event(), [], []

    async def receive():
        if not body_sent:
            body_sent.append(True)
            return {"type": "http.request", "body": payload[:int(len(payload) * sent_fraction)],
                    "more_body": sent_fraction < 1}
        await left.wait()  # what a server's receive() does after the body
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    return asyncio.ensure_future(app(scope, receive, send)), left, sent


def test_a_client_that_leaves_costs_no_model_work(tagger, monkeypatch):
    # It was: a client that disconnected while its request was queued was not noticed, and its
    # documents still ran on the model (under overload, clients time out and retry: work nobody reads)
    gate = Gate(monkeypatch)
    seen = []
    gated = model_adapter.predict_documents

    def recording(tagger, texts, nbest=1):
        seen.append(list(texts))
        return gated(tagger, texts, nbest)

    monkeypatch.setattr(model_adapter, "predict_documents", recording)
    # a short body timeout: it must not cut the wait for the disconnect that follows the body
    app = create_app(tagger, ServeConfig(max_wait_ms=0, body_timeout_s=0.01))

    async def interact(client):
        running, running_left, running_sent = _leaving_client(app, {"documents": ["GATE Peter visited Germany."]})
        await asyncio.to_thread(gate.entered.wait, 60)  # its batch runs on the worker, held
        queued, queued_left, queued_sent = _leaving_client(app, {"documents": ["QUEUED Omar Haddad said."]})
        while app.state.batcher.queue_depth < 1:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # longer than the body timeout: still waiting, not refused
        assert not queued.done() and not running.done()
        queued_left.set()
        running_left.set()
        # both handlers end now, the worker still held: not after their batches
        done, _ = await asyncio.wait({queued, running}, timeout=30)
        finished_while_held = len(done) == 2 and not gate.release.is_set()
        gate.release.set()
        await asyncio.gather(queued, running)
        after = await post(client, {"documents": ["AFTER Ingrid Lindqvist said."]})
        return finished_while_held, queued_sent, running_sent, after, (await client.get("/metrics")).text

    finished_while_held, queued_sent, running_sent, after, metrics = run_app(app, interact)
    assert finished_while_held
    assert after.status_code == 200 and after.json()["documents"][0]["entities"] is not None
    # the queued job was dropped; the running one finished with its batch (its result dropped)
    marks = [text.split()[0] for texts in seen for text in texts]
    assert [mark for mark in marks if mark in ("GATE", "QUEUED", "AFTER")] == ["GATE", "AFTER"]  # not the warm-up
    for sent in (queued_sent, running_sent):
        assert sent[0]["status"] == app_module.CLIENT_CLOSED == 499
    assert 'fastner_requests_total{route="/v1/entities",status="499"} 2.0' in metrics
    assert "fastner_queue_depth 0.0" in metrics


def test_a_client_that_leaves_mid_body_counts_as_client_closed(tagger):
    # It was: FastAPI answered the truncated body as "There was an error parsing the body", so
    # /metrics counted a client's leaving as a malformed request (400)
    app = create_app(tagger)

    async def interact(client):
        task, left, sent = _leaving_client(app, {"documents": [SENTENCE]}, sent_fraction=0.5)
        left.set()
        await task
        return sent, (await client.get("/metrics")).text

    sent, metrics = run_app(app, interact)
    assert sent[0]["status"] == 499
    assert 'fastner_requests_total{route="/v1/entities",status="499"} 1.0' in metrics and 'status="400"' not in metrics


def test_a_failing_model_call_answers_500_and_the_server_goes_on(tagger, monkeypatch):
    real = model_adapter.predict_documents

    def failing(tagger, texts, nbest=1):
        if any("FAIL" in text for text in texts):
            raise RuntimeError("boom")
        return real(tagger, texts, nbest)

    monkeypatch.setattr(model_adapter, "predict_documents", failing)
    app = create_app(tagger, ServeConfig(max_wait_ms=0))

    async def interact(client):
        return await post(client, {"documents": ["FAIL"]}), await post(client, {"documents": [SENTENCE]})

    failed, fine = run_app(app, interact)
    assert failed.status_code == 500 and failed.json()["error"] == "request: the model call failed: RuntimeError: boom"
    assert_problem_format(failed.json())  # it was {"error"} alone
    assert fine.status_code == 200 and fine.json()["documents"][0]["entities"]


def test_deadlines_run_what_is_due_and_forget_a_finished_loop():
    from fastner.serve.deadlines import Deadlines

    deadlines = Deadlines(0.001)
    fired = []

    async def main(keys):
        done = asyncio.Event()
        deadlines.add("gone", 0.0, fired.append)
        deadlines.discard("gone")  # discarded before it was due: never runs
        for key in keys:
            deadlines.add(key, 0.0, fired.append)
        deadlines.add("last", 0.002, lambda key: (fired.append(key), done.set()))
        await done.wait()

    asyncio.run(main(["a", "b"]))
    assert fired == ["a", "b", "last"]
    # an entry left pending on a loop that has ended is dropped, not run on the next loop
    asyncio.run(_add_and_leave(deadlines, fired))
    fired.clear()
    asyncio.run(main(["c"]))
    assert fired == ["c", "last"]


async def _add_and_leave(deadlines, fired):
    deadlines.add("stale", 0.0, fired.append)  # due, but the loop ends before its sweep
