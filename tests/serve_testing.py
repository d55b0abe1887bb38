"""What the serve tests share: a tiny tagger trained once per test session, and a runner for
the app in-process (httpx's ASGI transport, with the app's startup and shutdown)."""
from __future__ import annotations

import asyncio

from fastner.demo import generate_corpus
from fastner.train import TrainConfig, train
from tests.testing import torch_threads

# a sentence in the style of the demo corpus: the tiny tagger finds entities in it
SENTENCE = "Shares of Kestrel Pharma jumped 4.2 percent in Frankfurt on Tuesday after Ingrid Lindqvist raised the outlook."


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
