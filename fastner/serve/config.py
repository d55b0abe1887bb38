"""The server's settings: one dataclass, its defaults, and the checks on them."""
from __future__ import annotations

import math
from dataclasses import dataclass

MAX_WAIT_MS = 60_000  # a minute: anything longer is a typo, not a batching policy
MAX_TIMEOUT_S = 600.0  # ten minutes without a byte: no live client is that silent


@dataclass
class ServeConfig:
    max_batch_tokens: int = 4096  # tokens per model call
    # Longest a queued request waits for others to join its batch. 0: a batch takes what queued
    # while the model ran the one before, and never holds the model back for more. With the model
    # in its own process, 32 closed-loop clients, int8, 1 thread (AMD EPYC Zen 3, 2026-12-07,
    # 8 s runs alternating): 0 ms beat 2 ms in 7 of 7 pairs, 1,710 vs 1,470 docs/s on average over
    # six, batches of ~16 either way; one sentence at half capacity p99 10.6 vs 10.8 ms; 5 ms
    # gathered all 32 into one batch and left the model idle while their answers went out
    # (1,000-1,150 docs/s). In one process, 2 ms had beaten 5 (Zen 4, 2026-12-06: README).
    max_wait_ms: float = 0.0
    max_queue: int = 256  # queued requests; one more is answered 503
    threads: int = 1  # torch intra-op threads of the model (its process's, or the worker thread's)
    batching: bool = True  # False: one request per model call (the baseline)
    max_body_bytes: int = 1 << 20  # 413 above
    # 408 once no part of a request's body has come for this long (fastner.serve.limits). Well
    # under the 30 s graceful shutdown (server.GRACEFUL_SHUTDOWN_SECONDS), so that a stalled upload
    # in flight at SIGTERM is answered before uvicorn gives up and cancels what is left.
    body_timeout_s: float = 10.0
    # a request's line and headers must have come within this long of its connection's opening or
    # of the previous answer on it, else 408 and the connection closed (fastner.serve.connection:
    # applied by `fastner serve`'s uvicorn protocol, not by the app). 10 s: as the body's.
    header_timeout_s: float = 10.0
    max_documents: int = 256  # documents per request
    max_document_tokens: int = 2048  # tokens per document; must fit one model call
    # tokens per request, all documents together: bounds one request's model work (256 documents
    # of 2048 tokens fit the byte limit and cost ~45 s and ~2 GB of model work). 64 news articles
    # of 800 words are ~58,500 tokens (1.14 per word over eng.train); this leaves twice that.
    max_request_tokens: int = 1 << 17
    precision: str = "fp32"  # one of PRECISIONS (or an alias of one)

    def __post_init__(self):
        for name in ("max_batch_tokens", "max_queue", "threads", "max_body_bytes", "max_documents",
                     "max_document_tokens", "max_request_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.max_wait_ms) and 0 <= self.max_wait_ms <= MAX_WAIT_MS):
            raise ValueError(f"max-wait-ms must be in [0, {MAX_WAIT_MS}], got {self.max_wait_ms}")
        for name in ("body_timeout_s", "header_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT_S):
                raise ValueError(f"{name.replace('_', '-')} must be in (0, {MAX_TIMEOUT_S:g}], got {value}")
        if self.max_document_tokens > self.max_batch_tokens:
            raise ValueError(f"max-document-tokens ({self.max_document_tokens}) must not exceed "
                             f"max-batch-tokens ({self.max_batch_tokens}): a document must fit one model call")
        if self.max_document_tokens > self.max_request_tokens:
            raise ValueError(f"max-document-tokens ({self.max_document_tokens}) must not exceed "
                             f"max-request-tokens ({self.max_request_tokens}): a document must fit one request")
        self.precision = precision_name(self.precision)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


# --precision: Tagger.load's names, as `fastner tag`, `evaluate` and `export` take them (fp32 as
# trained; int8, bf16: the recurrent encoder quantized, fastner.nn.quantize), and float64 (the
# whole model cast to double). "float32", this option's name for fp32 before it took
# Tagger.load's, is still read as fp32.
PRECISIONS = ("fp32", "bf16", "int8", "float64")
PRECISION_ALIASES = {"float32": "fp32"}


def precision_name(value: str) -> str:
    """--precision as given -> its name in PRECISIONS (an alias resolved)."""
    return PRECISION_ALIASES.get(value, value)
