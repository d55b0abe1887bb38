"""The server's settings: one dataclass, its defaults, and the checks on them."""
from __future__ import annotations

import math
from dataclasses import dataclass

MAX_WAIT_MS = 60_000  # a minute: anything longer is a typo, not a batching policy


@dataclass
class ServeConfig:
    max_batch_tokens: int = 4096  # tokens per model call
    max_wait_ms: float = 5.0  # longest a queued request waits for others to join its batch
    max_queue: int = 256  # queued requests; one more is answered 503
    threads: int = 1  # torch intra-op threads of the model worker
    batching: bool = True  # False: one request per model call (the baseline)
    max_body_bytes: int = 1 << 20  # 413 above
    max_documents: int = 256  # documents per request
    max_document_tokens: int = 2048  # tokens per document; must fit one model call
    # tokens per request, all documents together: bounds one request's model work (256 documents
    # of 2048 tokens fit the byte limit and cost ~45 s and ~2 GB of model work). 64 news articles
    # of 800 words are ~58,500 tokens (1.14 per word over eng.train); this leaves twice that.
    max_request_tokens: int = 1 << 17
    precision: str = "float32"

    def __post_init__(self):
        for name in ("max_batch_tokens", "max_queue", "threads", "max_body_bytes", "max_documents",
                     "max_document_tokens", "max_request_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.max_wait_ms) and 0 <= self.max_wait_ms <= MAX_WAIT_MS):
            raise ValueError(f"max-wait-ms must be in [0, {MAX_WAIT_MS}], got {self.max_wait_ms}")
        if self.max_document_tokens > self.max_batch_tokens:
            raise ValueError(f"max-document-tokens ({self.max_document_tokens}) must not exceed "
                             f"max-batch-tokens ({self.max_batch_tokens}): a document must fit one model call")
        if self.max_document_tokens > self.max_request_tokens:
            raise ValueError(f"max-document-tokens ({self.max_document_tokens}) must not exceed "
                             f"max-request-tokens ({self.max_request_tokens}): a document must fit one request")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")


# --precision: the name and how the model gets there: a torch dtype the whole model is cast to
# (float32, float64), or a Tagger.load precision (int8, bf16: the recurrent encoder quantized,
# fastner.nn.quantize).
PRECISIONS = {"float32": "float32", "float64": "float64", "int8": "int8", "bf16": "bf16"}
LOAD_PRECISIONS = ("int8", "bf16")
