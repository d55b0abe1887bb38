"""What the serve tests share: a tiny tagger trained once per test session (conftest's `tagger`
loads it), a runner for the app in-process (httpx's ASGI transport, with the app's startup and
shutdown), requests to it and checks of its answers."""
from __future__ import annotations

import asyncio

from fastner.demo import generate_corpus
from fastner.train import TrainConfig, train
from tests.testing import torch_threads

# a sentence in the style of the demo corpus: the tiny tagger finds entities in it
SENTENCE = "Shares of Kestrel Pharma jumped 4.2 percent in Frankfurt on Tuesday after Ingrid Lindqvist raised the outlook."

DOCUMENTS = [
    SENTENCE,
    "Altamira Holdings agreed to buy Crescent Logistics for $3.2 billion, chief executive Omar Haddad said.",
    "The European Central Bank will decide on 12 June 2025 whether to lend 40 billion euros to Norway.",
    "",
    "Café owners in Zürich 😀 met Ingrid Lindqvist.",
]


def tiny_model_dir(tmp_path_factory) -> str:
    """A small tagger trained on the generated corpus, once per session (a few seconds, 1 thread)."""
    path = tmp_path_factory.getbasetemp() / "serve-tiny-model"
    if not (path / "weights.pt").exists():
        train_data, held_out = generate_corpus(300, 40, seed=2)
        config = TrainConfig(epochs=4, batch_size=16, optimizer="adam", lr=0.01, seed=2, word_dim=16, patience=4,
                             model={"hidden": 16, "char_filters": 8, "char_dim": 8, "dropout": 0.2})
        with torch_threads(1):
            train(train_data, held_out, str(path), config, log=lambda _text: None)
    return str(path)


def process_gone(pid: int) -> bool:
    """No process `pid` runs: none by that number, or a zombie (dead, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def run_app(app, interact, lifespan: bool = True):
    """Run `await interact(client)` against the app in-process and return its result."""
    import httpx

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60.0) as client:
            if not lifespan:
                return await interact(client)
            async with app.router.lifespan_context(app):
                return await interact(client)

    return asyncio.run(main())


def post(client, body, **kwargs):
    return client.post("/v1/entities", json=body, **kwargs)


def post_bytes(client, body: bytes):
    """POST a raw JSON body as sent (for bodies json= cannot produce)."""
    return client.post("/v1/entities", content=body, headers={"content-type": "application/json"})


def post_once(app, body):
    """The app's answer to one POST /v1/entities of `body` (a dict sent as JSON, or bytes sent as
    they are), with the app's startup and shutdown around it."""
    async def interact(client):
        return await (post_bytes(client, body) if isinstance(body, bytes) else post(client, body))

    return run_app(app, interact)


def batch_count(metrics_text: str, name: str = "fastner_batch_documents_count") -> float:
    for line in metrics_text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def assert_problem_format(body: dict) -> None:
    """`body` is the server's one error format (fastner.serve.problems)."""
    assert set(body) == {"error", "field", "problems"}, body
    first = body["problems"][0]
    assert set(first) == {"field", "message", "type"} and body["field"] == first["field"]
    assert body["error"] == f"{first['field']}: {first['message']}"
