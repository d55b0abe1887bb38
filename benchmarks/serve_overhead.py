"""The server's own CPU per request, without the model: what `fastner serve` spends on a request
beyond the model call (ASGI middlewares, routing, body parsing, validation, the queue, the
hand-off to the model thread and back, the JSON answer).

    python -m benchmarks.serve_overhead MODEL --documents ../shared/data/conll2003/eng.testa [--clients 32]

The app is the real one (fastner.serve.app.create_app, its middlewares and batcher), driven in
this process through ASGI calls by C concurrent clients, each sending the load test's request
body (one document: `{"documents": [{"id", "text"}]}`) one after another. The model call is
replaced by a lookup of answers computed beforehand with the real call, so what is timed is the
server's own work: process CPU time per request (the event loop, the worker thread, and the
client side's few ASGI dict operations, which both variants share) and wall time. What this does
not include: the HTTP protocol (uvicorn's httptools parsing, the socket writes) and the client
being in another process; the load test (`python -m fastner.serve.loadtest`) measures those.

Rounds alternate so that both see the same machine; `--rounds` of each, medians printed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import List, Optional, Sequence


async def _lifespan(app, ready: asyncio.Event, stop: asyncio.Event) -> None:
    messages = [{"type": "lifespan.startup"}]
    sent: List[dict] = []

    async def receive():
        if messages:
            return messages.pop()
        await stop.wait()
        return {"type": "lifespan.shutdown"}

    async def send(message):
        sent.append(message)
        if message["type"] == "lifespan.startup.complete":
            ready.set()
        elif message["type"].endswith("failed"):
            raise RuntimeError(f"lifespan: {message}")

    await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)


def _scope(path: str, body: bytes) -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
            "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080), "state": {}}


async def _request(app, body: bytes) -> tuple:
    """One POST /v1/entities through the ASGI app: (status, answer body)."""
    delivered = False
    disconnected = asyncio.Event()
    status, chunks = None, []

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()  # a client that stays connected until its answer
        return {"type": "http.disconnect"}

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(_scope("/v1/entities", body), receive, send)
    disconnected.set()
    return status, b"".join(chunks)


async def _drive(app, bodies: Sequence[bytes], clients: int, requests: int) -> dict:
    ready, stop = asyncio.Event(), asyncio.Event()
    lifespan = asyncio.ensure_future(_lifespan(app, ready, stop))
    await asyncio.wait([lifespan, asyncio.ensure_future(ready.wait())], return_when=asyncio.FIRST_COMPLETED)
    if lifespan.done():
        lifespan.result()  # the startup failed: its error
    counter = iter(range(requests))
    statuses: dict = {}

    async def client(number: int) -> None:
        for index in counter:
            status, _ = await _request(app, bodies[(index * 7 + number) % len(bodies)])
            statuses[status] = statuses.get(status, 0) + 1

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client(number) for number in range(clients)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    stop.set()
    await lifespan
    return {"cpu_us": 1e6 * cpu / requests, "wall_us": 1e6 * wall / requests, "statuses": statuses}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--documents", help="CoNLL file (default: the demo corpus); never the held-out test file")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4000, help="requests a round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    if min(args.clients, args.requests, args.rounds) < 1:
        parser.error("--clients, --requests and --rounds must be >= 1")

    import torch

    import fastner
    from fastner.serve import model as model_adapter
    from fastner.serve.app import WARMUP_TEXTS, create_app
    from fastner.serve.config import ServeConfig
    from fastner.serve.loadtest import load_documents

    torch.set_num_threads(1)
    tagger = fastner.Tagger.load(args.model)
    texts = load_documents(args.documents, limit=500)
    answers = dict(zip(texts + WARMUP_TEXTS, model_adapter.predict_documents(tagger, texts + WARMUP_TEXTS)))
    real = model_adapter.predict_documents
    model_adapter.predict_documents = lambda _tagger, batch, nbest=1: [answers[text] for text in batch]
    try:
        bodies = [json.dumps({"documents": [{"id": number, "text": text}]}).encode() for number, text in enumerate(texts)]
        # a new app a round: an app's batcher starts once
        runs = [asyncio.run(_drive(create_app(tagger, ServeConfig()), bodies, args.clients, args.requests))
                for _ in range(args.rounds)]
    finally:
        model_adapter.predict_documents = real
    print(f"{args.rounds} rounds of {args.requests} requests, {args.clients} clients: server CPU "
          f"{statistics.median(r['cpu_us'] for r in runs):.1f} us a request (median; "
          f"{', '.join(format(r['cpu_us'], '.1f') for r in runs)}), wall {statistics.median(r['wall_us'] for r in runs):.1f} us; "
          f"statuses {runs[-1]['statuses']}")
    # a broken path answers fast: only a run of 200s measured the server's work
    wrong = [run["statuses"] for run in runs if set(run["statuses"]) != {200}]
    if wrong:
        print(f"serve_overhead: answers other than 200: {wrong}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
