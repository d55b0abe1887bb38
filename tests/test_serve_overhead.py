"""benchmarks/serve_overhead.py runs the real app end to end and refuses a run that was not all 200s."""
import pytest

pytest.importorskip("fastapi")

from benchmarks import serve_overhead  # noqa: E402
from tests.serve_testing import tiny_model_dir  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_serve_overhead_measures_answered_requests(tmp_path_factory, capsys):
    model = tiny_model_dir(tmp_path_factory)
    assert serve_overhead.main([model, "--clients", "4", "--requests", "40", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 rounds of 40 requests, 4 clients: server CPU" in out and "statuses {200: 40}" in out


def test_serve_overhead_fails_a_run_with_errors(tmp_path_factory, monkeypatch, capsys):
    from fastner.serve import app as app_module
    from fastner.serve.config import ServeConfig

    model = tiny_model_dir(tmp_path_factory)
    real = app_module.create_app
    # every document over the token limit: 413s, fast, and not a measurement of the served path
    monkeypatch.setattr(app_module, "create_app", lambda tagger, _config: real(tagger, ServeConfig(max_document_tokens=1)))
    assert serve_overhead.main([model, "--clients", "2", "--requests", "10", "--rounds", "1"]) == 1
    assert "answers other than 200" in capsys.readouterr().err


def test_serve_overhead_argument_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        serve_overhead.main(["model", "--rounds", "0"])
    assert exit_info.value.code == 2
