"""fastner serve: batching that merges concurrent requests without losing or swapping results,
and the Batcher's queue (order, token budget, nbest groups, max queue, jobs whose request is gone)."""
import asyncio
import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastner.serve import model as model_adapter  # noqa: E402
from fastner.serve.app import create_app  # noqa: E402
from fastner.serve.batcher import Batcher, QueueFull, ShuttingDown  # noqa: E402
from fastner.serve.config import ServeConfig  # noqa: E402
from tests.serve_testing import DOCUMENTS, batch_count, post, run_app  # noqa: E402


# tiny models: see conftest.one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


def _concurrent_requests(tagger, config, count):
    app = create_app(tagger, config)
    texts = [f"{DOCUMENTS[i % 3]} Item {i} from Ingrid Lindqvist{'.' * (i % 2)}" for i in range(count)]

    async def interact(client):
        before = batch_count((await client.get("/metrics")).text)
        responses = await asyncio.gather(*(post(client, {"documents": [{"id": i, "text": t}]}) for i, t in enumerate(texts)))
        after = batch_count((await client.get("/metrics")).text)
        return responses, after - before

    responses, calls = run_app(app, interact)
    expected = model_adapter.predict_documents(tagger, texts)
    for i, (response, want) in enumerate(zip(responses, expected)):
        assert response.status_code == 200
        got = response.json()["documents"][0]
        assert got["id"] == i  # its own document, not another request's
        assert [(e["start"], e["end"], e["label"]) for e in got["entities"]] == \
               [(e["start"], e["end"], e["label"]) for e in want["entities"]]
    return texts, calls


def test_concurrent_requests_share_model_calls_and_get_their_own_results(tagger):
    count = 24
    texts = [f"{DOCUMENTS[i % 3]} Item {i} from Ingrid Lindqvist{'.' * (i % 2)}" for i in range(count)]
    budget = sum(model_adapter.count_tokens(t) for t in texts)
    # the batch closes when the budget is reached, not on a clock: one call for all 24
    _, calls = _concurrent_requests(tagger, ServeConfig(max_batch_tokens=budget, max_document_tokens=64,
                                                        max_wait_ms=60_000), count)
    assert calls == 1


def test_without_batching_every_request_is_its_own_model_call(tagger):
    _, calls = _concurrent_requests(tagger, ServeConfig(batching=False), 12)
    assert calls == 12


def test_mixed_nbest_requests_and_gone_clients_each_get_their_own_result(tagger):
    # requests asking for different nbest share the queue (they need separate model calls), and
    # clients that give up mid-request (their handler cancelled) must not disturb the others' batches
    app = create_app(tagger, ServeConfig(max_wait_ms=20))
    requests = [([f"{DOCUMENTS[i % 3]} Item {i}."] * (1 + i % 2), (1, 2, 1, 3)[i % 4]) for i in range(16)]

    async def interact(client):
        tasks = [asyncio.ensure_future(post(client, {"documents": [{"id": i, "text": t} for t in texts], "nbest": k}))
                 for i, (texts, k) in enumerate(requests)]
        await asyncio.sleep(0.005)  # queued, waiting for their batch
        for task in tasks[1::5]:
            task.cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    answers = run_app(app, interact)
    for i, ((texts, k), answer) in enumerate(zip(requests, answers)):
        if i % 5 == 1:  # cancelled while its batch waited its 20 ms
            assert isinstance(answer, asyncio.CancelledError)
            continue
        assert answer.status_code == 200, answer.text
        want = model_adapter.predict_documents(tagger, texts, k)
        for got, expected in zip(answer.json()["documents"], want):
            assert got["id"] == i and ("nbest" in got) == (k > 1)
            assert [(e["start"], e["end"], e["label"]) for e in got["entities"]] == \
                   [(e["start"], e["end"], e["label"]) for e in expected["entities"]]
            if k > 1:
                assert [len(s["analyses"]) for s in got["nbest"]] == [len(s["analyses"]) for s in expected["nbest"]]


def _job_batches(jobs, **options):
    """Submit jobs (texts, tokens, nbest) at once to a Batcher whose model records its calls."""
    calls = []

    def run_batch(texts, nbest):
        calls.append((list(texts), nbest))
        return [{"text": t} for t in texts]

    async def main():
        batcher = Batcher(run_batch, **options)
        batcher.start()
        with batcher._condition:  # the worker waits for this lock: every job is queued before the first batch forms
            futures = [batcher.submit(texts, tokens, nbest) for texts, tokens, nbest in jobs]
        results = await asyncio.gather(*futures)
        batcher.stop()
        return results

    return asyncio.run(main()), calls


def test_batcher_keeps_arrival_order_budget_and_nbest_groups():
    jobs = [(["a", "b"], 4, 1), (["c"], 3, 1), (["d"], 10, 1), (["e"], 2, 1), (["f"], 1, 2), (["g"], 1, 1)]
    with pytest.raises(ShuttingDown):  # not started: refused at once
        asyncio.run(_submit_to(Batcher(lambda t, n: t)))
    results, calls = _job_batches(jobs, max_batch_tokens=8, max_wait_ms=0)
    assert [[r["text"] for r in result] for result in results] == [["a", "b"], ["c"], ["d"], ["e"], ["f"], ["g"]]
    # 4+3 fit in 8; "d" (10 tokens) is over the budget and runs alone; "f" asks for another nbest
    assert calls == [(["a", "b", "c"], 1), (["d"], 1), (["e"], 1), (["f"], 2), (["g"], 1)]
    _, unbatched = _job_batches(jobs[:3], max_batch_tokens=100, max_wait_ms=0, batching=False)
    assert [texts for texts, _ in unbatched] == [["a", "b"], ["c"], ["d"]]


class _StartingModel:
    """A model with start_batch (as fastner.serve.worker.ModelProcess): records when each batch
    starts, when its results are waited for, and (on_batch) when its answers are posted."""

    def __init__(self, fail_start=(), fail_wait=()):
        self.events, self.fail_start, self.fail_wait = [], set(fail_start), set(fail_wait)

    def __call__(self, texts, nbest):  # run_batch: never called when start_batch exists
        raise AssertionError("the batcher must use start_batch")

    def start_batch(self, texts, nbest):
        self.events.append(("start", *texts))
        if self.fail_start & set(texts):
            raise RuntimeError("the model is gone")

        def wait():
            self.events.append(("wait", *texts))
            if self.fail_wait & set(texts):
                raise RuntimeError("the model failed")
            return [{"text": t} for t in texts]
        return wait

    def posted(self, documents, tokens, seconds):
        self.events.append(("posted", documents))


def _run_started(model, texts):
    async def main():
        batcher = Batcher(model, max_batch_tokens=1, max_wait_ms=0, on_batch=model.posted)
        batcher.start()
        with batcher._condition:  # every job queued before the first batch forms
            futures = [batcher.submit([text], 1) for text in texts]
        results = await asyncio.gather(*futures, return_exceptions=True)
        batcher.stop()
        return results

    return asyncio.run(main())


def test_batcher_starts_the_next_batch_before_posting_answers_one_batch_at_a_time():
    # With the model in its own process, posting a batch's answers (waking the event loop, which
    # must first let go of the GIL) left the model idle; now the next ready batch is sent first
    model = _StartingModel()
    results = _run_started(model, "abc")
    assert [r[0]["text"] for r in results] == ["a", "b", "c"]
    assert model.events == [("start", "a"), ("wait", "a"), ("start", "b"), ("posted", 1),
                            ("wait", "b"), ("start", "c"), ("posted", 1), ("wait", "c"), ("posted", 1)]


def test_batcher_reports_a_batch_that_failed_to_start_or_to_finish_and_goes_on():
    model = _StartingModel(fail_start={"b"}, fail_wait={"c"})
    results = _run_started(model, "abcd")
    assert results[0][0]["text"] == "a" and results[3][0]["text"] == "d"
    assert isinstance(results[1], RuntimeError) and "gone" in str(results[1])
    assert isinstance(results[2], RuntimeError) and "failed" in str(results[2])


def test_take_without_blocking_leaves_a_batch_that_waits_for_company():
    async def main():
        waiting = _workerless(4)
        waiting.max_wait = 60.0  # the oldest job may wait a minute for more to join it
        waiting.submit(["a"], 1)
        with waiting._condition:
            assert waiting._take(block=False) == [] and len(waiting._queue) == 1
            waiting.max_wait = 0.0
            assert [job.texts for job in waiting._take(block=False)] == [["a"]]
            assert waiting._take(block=False) == []  # empty: no wait either
        waiting._thread = None

    asyncio.run(main())


async def _submit_to(batcher, texts=("a",)):
    return await batcher.submit(list(texts), 1)


def _workerless(max_queue: int) -> Batcher:
    """A Batcher that accepts jobs without a worker taking them, until its _thread is unset."""
    batcher = Batcher(lambda texts, nbest: [{} for _ in texts], max_queue=max_queue)
    batcher._thread = threading.current_thread()
    return batcher


def _with_a_gone_job(max_queue: int, tokens: tuple) -> Batcher:
    """A _workerless Batcher holding job "a", its request gone (cancelled), and a live job "b"
    after it, of `tokens` tokens each."""
    batcher = _workerless(max_queue)
    gone = batcher.submit(["a"], tokens[0])
    batcher.submit(["b"], tokens[1])
    gone.cancel()
    return batcher


def test_batcher_refuses_over_max_queue_and_after_stop():
    async def main():
        batcher = _workerless(2)
        batcher.submit(["a"], 1), batcher.submit(["b"], 1)
        with pytest.raises(QueueFull, match="--max-queue 2"):
            batcher.submit(["c"], 1)
        batcher._thread = None
        with pytest.raises(ShuttingDown):
            batcher.submit(["c"], 1)

    asyncio.run(main())


def test_a_full_queue_makes_room_for_jobs_whose_request_is_gone():
    # It was: cancelled jobs (their clients left) kept their places until the worker looked, after
    # the batch it was running, and a live request was refused 503 for them
    async def main():
        batcher = _with_a_gone_job(2, tokens=(3, 4))
        batcher.submit(["c"], 5)
        assert [job.texts for job in batcher._queue] == [["b"], ["c"]] and batcher._queued_tokens == 9
        with pytest.raises(QueueFull):  # full of live jobs: refused as before
            batcher.submit(["d"], 1)
        batcher._thread = None

    asyncio.run(main())


def test_queue_depth_counts_live_jobs_only():
    # It was: a job whose request was cancelled (its client left) counted in the depth, and so in
    # /metrics' fastner_queue_depth, until the worker reached it
    async def main():
        batcher = _with_a_gone_job(4, tokens=(1, 1))
        depth = batcher.queue_depth
        batcher._thread = None
        return depth, len(batcher._queue)

    assert asyncio.run(main()) == (1, 2)  # the gone job is still queued, not counted


def test_batcher_stop_finishes_queued_jobs():
    results, calls = _job_batches([(["a"], 1, 1), (["b"], 1, 1)], max_batch_tokens=1, max_wait_ms=0)
    assert [r[0]["text"] for r in results] == ["a", "b"] and len(calls) == 2


def test_batcher_skips_jobs_whose_request_is_gone():
    # uvicorn cancels the requests still in flight when its graceful shutdown times out: their
    # queued jobs ran anyway, holding the exit for the queue's whole model work
    calls = []

    def run_batch(texts, nbest):
        calls.append(list(texts))
        return [{"text": t} for t in texts]

    async def main():
        batcher = Batcher(run_batch, max_batch_tokens=100, max_wait_ms=0)
        batcher.start()
        with batcher._condition:  # every job queued, two of them cancelled, before the worker looks
            futures = [batcher.submit([text], 1) for text in "abcd"]
            for gone in (futures[1], futures[3]):
                gone.cancel()
        results = await asyncio.gather(futures[0], futures[2])
        with batcher._condition:  # all queued jobs gone: the worker waits on, it does not exit
            later = [batcher.submit(["e"], 1)]
            later[0].cancel()
        results += [await batcher.submit(["f"], 1)]
        batcher.stop()
        return results

    results = asyncio.run(main())
    assert [r[0]["text"] for r in results] == ["a", "c", "f"]
    assert calls == [["a", "c"], ["f"]]
