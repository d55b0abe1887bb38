"""Dynamic batching: requests queue up, one worker thread merges them into model calls.

The event loop only enqueues a job and awaits its future; the worker thread alone calls the
model (`run_batch`: on this thread, sized with `threads` torch threads, or handing the batch to
the model process, fastner.serve.worker), so the loop keeps answering health checks and
rejecting overload while a batch runs. The worker takes the oldest
job, then keeps adding queued jobs in arrival order while the batch stays within
`max_batch_tokens`, waiting up to `max_wait_ms` from the oldest job's arrival for more to come.
A job bigger than the budget runs alone. With `batching=False` every model call takes one job:
the one-request-at-a-time baseline the load test compares against.

A model that offers `start_batch` (fastner.serve.worker.ModelProcess: the model in a process of
its own) gets the next ready batch before the worker posts the answers of the one that just came
back: still one batch at a time in the model, which no longer sits idle while this thread waits
for the event loop to let go of the GIL so that it can wake it.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Deque, List, Optional, Sequence

from fastner.serve.config import ServeConfig

log = logging.getLogger("fastner.serve")


class QueueFull(Exception):
    """The queue holds `max_queue` jobs: the caller answers 503 with Retry-After."""


class ShuttingDown(Exception):
    """The batcher is stopping and takes no new jobs."""


@dataclass
class _Job:
    texts: List[str]
    tokens: int
    nbest: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    wait: bool = True  # False: run as soon as the worker is free (warm-up)
    enqueued: float = field(default_factory=time.monotonic)


def _deliver(future: asyncio.Future, result=None, error: Optional[BaseException] = None) -> None:
    if future.done():  # the request was cancelled (client gone): nobody to answer
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _deliver_all(answers) -> None:
    for future, result, error in answers:
        _deliver(future, result, error)


def _post(jobs: List[_Job], results: Optional[List] = None, error: Optional[BaseException] = None) -> None:
    """Hand each job its result (or the error) on its event loop, from the worker thread: one
    callback per loop and batch, so a batch of N requests wakes the loop once, not N times."""
    by_loop: dict = {}
    for number, job in enumerate(jobs):
        by_loop.setdefault(job.loop, []).append((job.future, None if results is None else results[number], error))
    for loop, answers in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver_all, answers)
        except RuntimeError:  # that loop is closed: its requests are gone
            pass


# run_batch(texts, nbest) -> one result per text, in order
RunBatch = Callable[[List[str], int], List[dict]]
# start_batch(texts, nbest) -> a call that waits for run_batch's result: what a run_batch with a
# start_batch attribute offers (fastner.serve.worker.ModelProcess: the model in another process)
StartBatch = Callable[[List[str], int], Callable[[], List[dict]]]
# on_batch(documents, tokens, seconds) after each model call (metrics)
OnBatch = Callable[[int, int, float], None]


class Batcher:
    def __init__(self, run_batch: RunBatch, *, max_batch_tokens: int = ServeConfig.max_batch_tokens,
                 max_wait_ms: float = ServeConfig.max_wait_ms, max_queue: int = ServeConfig.max_queue,
                 threads: int = ServeConfig.threads, batching: bool = ServeConfig.batching,
                 on_batch: Optional[OnBatch] = None):
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.run_batch = run_batch
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.threads = threads
        self.batching = batching
        self.on_batch = on_batch
        self._queue: Deque[_Job] = collections.deque()
        self._queued_tokens = 0
        self._condition = threading.Condition()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None

    # ---- the event loop's side -----------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Queued jobs whose request still waits: a cancelled job (its client left) stays in the
        queue until the worker reaches it, and counted there /metrics showed a backlog of work
        that would never run. A count under the lock (the worker pops concurrently), at most
        max_queue entries: once per scrape."""
        with self._condition:
            return sum(1 for job in self._queue if not job.future.cancelled())

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the batcher is already running")
        self._thread = threading.Thread(target=self._work, name="fastner-model", daemon=True)
        self._thread.start()

    def submit(self, texts: Sequence[str], tokens: int, nbest: int = 1, wait: bool = True) -> asyncio.Future:
        """Queue one request's documents; the future resolves to their results, in order.
        Called on the event loop; raises QueueFull or ShuttingDown at once. `wait=False`: the
        batch this job starts does not wait for others to join it."""
        loop = asyncio.get_running_loop()
        job = _Job(list(texts), tokens, nbest, loop, loop.create_future(), wait)
        with self._condition:
            if self._stopping or self._thread is None:
                raise ShuttingDown("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                self._drop_gone()
                if len(self._queue) >= self.max_queue:
                    raise QueueFull(f"{len(self._queue)} requests are queued (--max-queue {self.max_queue})")
            self._queue.append(job)
            self._queued_tokens += tokens
            self._condition.notify()
        return job.future

    def _drop_gone(self) -> None:
        """Drop the queued jobs whose request is gone (the lock is held): the worker would skip
        them, but until it looks (after the batch it runs) they held places in a full queue, and
        live requests were refused 503 for them, under overload, when clients give up the most."""
        live = [job for job in self._queue if not job.future.cancelled()]
        if len(live) < len(self._queue):
            self._queue.clear()
            self._queue.extend(live)
            self._queued_tokens = sum(job.tokens for job in live)

    def stop(self, timeout: Optional[float] = None) -> None:
        """Take no new jobs, finish the queued ones, and join the worker."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the worker thread ----------------------------------------------------------------

    def _take(self, block: bool = True) -> List[_Job]:
        """Wait for work, then pop the next batch (the lock is held by the caller); [] once
        stopping with nothing queued. block=False: [] at once where it would wait (an empty
        queue, or a batch still waiting for more to join it)."""
        while True:
            while not self._queue:
                if self._stopping or not block:
                    return []
                self._condition.wait()
            if self.batching and self._queue[0].wait:
                deadline = self._queue[0].enqueued + self.max_wait
                while not self._stopping and self._queued_tokens < self.max_batch_tokens:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    if not block:
                        return []
                    self._condition.wait(remaining)
            jobs: List[_Job] = []
            tokens = 0
            # arrival order; a job asking for another nbest waits for a later batch
            while self._queue:
                job = self._queue[0]
                # its request is gone (the handler was cancelled: uvicorn does so to every request
                # still in flight when the graceful shutdown times out): nobody to answer, so no
                # model work. Those jobs ran before, holding the process's exit for as long as the
                # queue's work took. (A cancelled flag read across threads: one attribute read.)
                if job.future.cancelled():
                    self._queue.popleft()
                    self._queued_tokens -= job.tokens
                    continue
                if jobs and not (self.batching and job.nbest == jobs[0].nbest
                                 and tokens + job.tokens <= self.max_batch_tokens):
                    break
                self._queue.popleft()
                self._queued_tokens -= job.tokens
                tokens += job.tokens
                jobs.append(job)
            if jobs:
                return jobs

    def _work(self) -> None:
        import torch

        # the worker's own setting: intra-op threads are per calling thread under OpenMP
        torch.set_num_threads(self.threads)
        start = getattr(self.run_batch, "start_batch", None) or _started_later(self.run_batch)
        pending = None
        while True:
            if pending is None:
                with self._condition:
                    jobs = self._take()
                if not jobs:
                    return
                pending = _begin(start, jobs)
            jobs, texts, wait, started = pending
            pending = None
            try:
                results = wait()
                if len(results) != len(texts):
                    raise RuntimeError(f"the model returned {len(results)} results for {len(texts)} documents")
            except Exception as err:  # noqa: BLE001 - every waiting request must hear about it
                log.exception("model call failed for %d documents", len(texts))
                _post(jobs, error=err)
                continue
            # The next batch, where one is ready, goes to the model before this one's answers are
            # posted: with the model in its own process (start_batch) it then works while this
            # thread wakes the event loop, which first has to let go of the GIL, instead of
            # waiting for that. Still one batch at a time in the model.
            with self._condition:
                ready = self._take(block=False)
            if ready:
                pending = _begin(start, ready)
            if self.on_batch is not None:  # before the answers: a client that got one sees its batch counted
                self.on_batch(len(texts), sum(job.tokens for job in jobs), time.perf_counter() - started)
            parts, offset = [], 0
            for job in jobs:
                parts.append(results[offset : offset + len(job.texts)])
                offset += len(job.texts)
            _post(jobs, parts)


def _started_later(run_batch: RunBatch) -> StartBatch:
    """start_batch for a model called on this thread: the call runs when its results are asked for."""
    return lambda texts, nbest: lambda: run_batch(texts, nbest)


def _begin(start: StartBatch, jobs: List[_Job]):
    """(jobs, their texts, the call that waits for their results, when it started): the batch
    handed to `start`; an error in starting it is raised by that call, so that the batch's
    requests hear about it like any model error."""
    texts = [text for job in jobs for text in job.texts]
    started = time.perf_counter()
    try:
        wait = start(texts, jobs[0].nbest)
    except Exception as err:  # noqa: BLE001 - raised again by wait(), in the batch's error path
        def wait(err=err):
            raise err
    return jobs, texts, wait, started
