"""The load test's own parts (detokenizer, answer check, HTTP client against a real server), and
a short whole run of it (slow-marked: it starts eight server processes)."""
import asyncio
import json

import pytest

pytest.importorskip("fastapi")

from fastner.serve import loadtest  # noqa: E402
from fastner.serve.process import ServerProcess  # noqa: E402
from tests.serve_testing import tiny_model_dir  # noqa: E402


def test_detokenize_conll_tokens_into_raw_text():
    tokens = ["Shares", "of", "Kestrel", "(", "KST", ")", "rose", "3", "%", "to", "$", "250.10", ",", "Kestrel",
              "'s", "chief", "said", "."]
    assert loadtest.detokenize(tokens) == "Shares of Kestrel (KST) rose 3% to $250.10, Kestrel's chief said."


def test_documents_come_from_conll_sentences(conll_dir):
    documents = loadtest.load_documents(str(conll_dir / "eng.testa"), limit=50)
    assert documents and all("-DOCSTART-" not in d and "  " not in d for d in documents)


def test_answers_are_compared_by_offsets_labels_and_scores():
    entity = {"start": 0, "end": 5, "label": "PER", "text": "Peter", "score": 0.9}
    assert loadtest.same_entities([entity], [dict(entity, score=0.9 + loadtest.SCORE_TOLERANCE / 2)])
    assert not loadtest.same_entities([entity], [dict(entity, score=0.8)])
    assert not loadtest.same_entities([entity], [dict(entity, label="ORG")])
    assert not loadtest.same_entities([entity], [])


def test_measured_runs_keep_the_collector_off_what_the_process_holds():
    # the client's own full collections (tens of ms with torch loaded) must not be timed as the
    # server's latency; the freeze is given back after the run, even when it fails
    import gc

    before = gc.get_freeze_count()
    with loadtest._frozen_collector():
        assert gc.get_freeze_count() > before
    assert gc.get_freeze_count() == before
    with pytest.raises(RuntimeError), loadtest._frozen_collector():
        raise RuntimeError("a failed run")
    assert gc.get_freeze_count() == before

    calls = []

    class Recording:
        def __enter__(self):
            calls.append("enter")

        def __exit__(self, *exc):
            calls.append("exit")

    original = loadtest._frozen_collector
    loadtest._frozen_collector = Recording
    try:  # a run of no requests: no server needed
        asyncio.run(loadtest.open_loop(None, 9, [0], rate=1000.0, seconds=0.0))
    finally:
        loadtest._frozen_collector = original
    assert calls == ["enter", "exit"]


@pytest.mark.slow
def test_clients_check_every_answer_and_overload_gets_503(tmp_path_factory):
    import fastner

    model = tiny_model_dir(tmp_path_factory)
    workload = loadtest.Workload(fastner.Tagger.load(model, device="cpu"), loadtest.load_documents(None, limit=200))
    with ServerProcess(model, ["--max-queue", "2"]) as server:
        outcome = asyncio.run(loadtest.closed_loop(workload, server.port, clients=16, seconds=3.0, max_requests=3000))
        # a wrong expectation is caught as a mismatch
        workload.expected[0] = [{"start": 0, "end": 1, "label": "X", "text": "?", "score": 1.0}]
        bad = loadtest.Outcome()

        async def one_request():
            connection = loadtest.Connection(server.port)
            try:
                return await workload.send(connection, 0, bad)
            finally:
                connection.close()

        assert asyncio.run(one_request()) == -1 and bad.mismatched == 1
    summary = outcome.summary()
    assert summary["mismatched"] == 0 and summary["timeouts"] == 0 and summary["connection_errors"] == 0
    assert set(summary["status"]) <= {"200", "503"} and summary["status"]["200"] > 0
    assert summary["status"].get("503", 0) > 0 and summary["missing_retry_after"] == 0


@pytest.mark.slow
def test_loadtest_main_runs_every_scenario(tmp_path_factory, tmp_path):
    out = tmp_path / "load.json"
    code = loadtest.main([tiny_model_dir(tmp_path_factory), "--seconds", "1", "--threads", "1", "--clients", "4",
                          "--overload-clients", "16", "--overload-queue", "2", "--max-wait-ms", "1", "--json", str(out)])
    assert code == 0
    document = json.loads(out.read_text())
    assert "--max-wait-ms 1" in document["command"]
    results = document["results"]
    scenarios = [r["scenario"] for r in results]
    assert scenarios[:2] == ["serve, batching on", "serve, batching off"]
    assert any(s.startswith("overload") for s in scenarios) and any("half capacity" in s for s in scenarios)
    assert results[-1]["status"].get("503", 0) > 0


def test_loadtest_serves_and_checks_at_the_precision_asked(tmp_path_factory, tmp_path, monkeypatch):
    started = []
    process = loadtest.ServerProcess

    def recording(model, args):
        started.append(list(args))
        return process(model, args)

    monkeypatch.setattr(loadtest, "ServerProcess", recording)
    out = tmp_path / "load.json"
    code = loadtest.main([tiny_model_dir(tmp_path_factory), "--seconds", "1", "--capacity-tokens", "400",
                          "--overload-clients", "8", "--overload-queue", "2", "--precision", "int8",
                          "--json", str(out)])
    assert code == 0  # every answer matched the int8 model's own
    assert json.loads(out.read_text())["precision"] == "int8"
    assert started and all(args[args.index("--precision") + 1] == "int8" for args in started)


def test_load_tagger_at_each_precision(tmp_path_factory):
    import torch

    from fastner.nn.quantize import Int8GRU, Int8LSTM, Int8RNN
    from fastner.serve.model import load_tagger

    model = tiny_model_dir(tmp_path_factory)
    assert next(load_tagger(model, "cpu", "float64").model.parameters()).dtype == torch.float64
    assert any(isinstance(m, (Int8LSTM, Int8GRU, Int8RNN)) for m in load_tagger(model, "cpu", "int8").model.modules())
    assert next(load_tagger(model, "cpu", "fp32").model.parameters()).dtype == torch.float32


def test_loadtest_refuses_a_negative_wait(capsys):
    with pytest.raises(SystemExit) as exit_info:
        loadtest.main(["model-dir", "--max-wait-ms", "-1"])
    assert exit_info.value.code == 2 and "--max-wait-ms must be >= 0" in capsys.readouterr().err
