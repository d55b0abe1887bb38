"""Prometheus metrics of one server: a registry per app, so apps in one process (tests) never
share counters."""
from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_DOCUMENT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BATCH_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class ServerMetrics:
    def __init__(self, queue_depth: Callable[[], int]):
        self.registry = CollectorRegistry()
        self.requests = Counter("fastner_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("fastner_request_seconds", "HTTP request latency, by route and status",
                                 ["route", "status"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_documents = Histogram("fastner_batch_documents", "documents per model call",
                                         buckets=BATCH_DOCUMENT_BUCKETS, registry=self.registry)
        self.batch_tokens = Histogram("fastner_batch_tokens", "tokens per model call",
                                      buckets=BATCH_TOKEN_BUCKETS, registry=self.registry)
        self.batch_seconds = Histogram("fastner_batch_seconds", "model call time",
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue = Gauge("fastner_queue_depth", "requests waiting for the model", registry=self.registry)
        self.queue.set_function(queue_depth)

    def observe_batch(self, documents: int, tokens: int, seconds: float) -> None:
        self.batch_documents.observe(documents)
        self.batch_tokens.observe(tokens)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """ASGI middleware: count and time every HTTP request by route template and status.

    The route is the matched path template (one label value per endpoint, not per URL, so a
    client cannot grow the label set); unmatched paths count as "other"."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def send_recording(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_recording)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or "other"
            code = str(status["code"])
            self.metrics.requests.labels(name, code).inc()
            self.metrics.latency.labels(name, code).observe(time.perf_counter() - started)
