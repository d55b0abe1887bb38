"""`fastner` end to end: train -> save -> load -> tag -> evaluate, demo, info, and user errors."""
import io
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from fastner.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# tiny models: see conftest.one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def conll_model(tmp_path_factory):
    data = pathlib.Path(ROOT).parent / "shared" / "data" / "conll2003"  # as conftest's conll_dir
    if not (data / "eng.train").exists():
        pytest.skip(f"CoNLL-2003 data not found at {data}")
    out = tmp_path_factory.mktemp("cli") / "model"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["train", "--train", str(data / "eng.train"), "--dev", str(data / "eng.testa"),
                     "--out", str(out), "--max-sentences", "200", "--epochs", "2", "--hidden", "16",
                     "--optimizer", "adam", "--lr", "0.01", "--seed", "1", "--word-dim", "20"])
    finally:
        torch.set_num_threads(previous)
    assert code == 0
    return out, data


def test_train_writes_a_loadable_tagger(conll_model, capsys):
    out, _ = conll_model
    assert {"config.json", "vocab.json", "weights.pt", "checkpoint.pt", "training.json"} <= set(os.listdir(out))
    history = json.loads((out / "training.json").read_text())["history"]
    assert [r["epoch"] for r in history] == [1, 2]


def test_evaluate_prints_a_conlleval_report(conll_model, capsys, tmp_path):
    out, data = conll_model
    sample = tmp_path / "dev.txt"
    with open(data / "eng.testa", encoding="utf-8") as source:
        sample.write_text("".join(source.readlines()[:400]), encoding="utf-8")
    predictions = tmp_path / "pred.txt"
    assert main(["evaluate", str(out), str(sample), "--output", str(predictions)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("processed ") and "phrases; found:" in lines[0]
    assert lines[1].startswith("accuracy:") and "FB1:" in lines[1]
    assert any(line.strip().startswith("PER: precision:") for line in lines[2:])
    first = predictions.read_text().splitlines()[0].split()
    assert len(first) == 3  # token gold predicted


def test_tag_conll_and_json_formats(conll_model, capsys, tmp_path, monkeypatch):
    out, _ = conll_model
    text = tmp_path / "in.txt"
    text.write_text("Peter Blackburn visited Germany .\nEU rejects German call\n", encoding="utf-8")
    assert main(["tag", str(out), str(text), "--input", "tokens"]) == 0
    blocks = capsys.readouterr().out.split("\n\n")
    first = [line.split() for line in blocks[0].splitlines()]
    assert [t for t, _ in first] == ["Peter", "Blackburn", "visited", "Germany", "."]
    assert all(tag == "O" or tag[:2] in ("I-", "B-") for _, tag in first)  # the training file's IOB1
    monkeypatch.setattr(sys, "stdin", io.StringIO("Peter Blackburn visited Germany .\n"))
    assert main(["tag", str(out), "--input", "tokens", "--output", "jsonl"]) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[0])
    assert record["tokens"][0] == "Peter" and len(record["tags"]) == 5
    assert all({"start", "end", "type", "text", "confidence"} <= set(span) for span in record["spans"])


def test_user_errors_exit_nonzero_with_one_line(conll_model, capsys, tmp_path):
    out, data = conll_model
    assert main(["evaluate", str(tmp_path / "nowhere"), str(data / "eng.testa")]) == 2
    assert capsys.readouterr().err.strip() == f"fastner: error: no tagger directory at '{tmp_path / 'nowhere'}'"
    bad = tmp_path / "bad.txt"
    bad.write_text("EU NNP I-NP I-ORG\nrejects VBZ O\n", encoding="utf-8")
    assert main(["evaluate", str(out), str(bad)]) == 2
    assert f"{bad}:2: expected 4 columns" in capsys.readouterr().err
    assert main(["tag", str(out), str(tmp_path / "missing.txt")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["train", "--train", str(bad), "--dev", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert main(["train", "--train", str(data / "eng.train"), "--dev", str(data / "eng.testa"),
                 "--out", str(tmp_path / "o"), "--max-sentences", "5", "--embeddings", str(tmp_path / "none.vec")]) == 2
    assert "embeddings file not found" in capsys.readouterr().err


def test_python_dash_m_runs_without_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-m", "fastner", "tag", str(tmp_path / "nope")],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "fastner: error:" in result.stderr


def test_info_reports_backend_versions_threads(capsys, monkeypatch):
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"backend", "torch", "threads", "fastner"} <= set(data) and "cpu" in data["backend"]
    # the threads the commands run on without --threads (it reported torch's default, 2 here,
    # beside commands that run on 1), and torch's own
    assert data["threads"] == 1 and data["torch_threads"] == torch.get_num_threads()


def test_demo_small_run(capsys):
    assert main(["demo", "--sentences", "200", "--epochs", "2", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert "held-out" in out and "FB1:" in out and "European Central Bank" in out


@pytest.mark.slow
def test_demo_default_is_deterministic_and_learns():
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")
    runs = [subprocess.run([sys.executable, "-m", "fastner", "demo"], capture_output=True, text=True,
                           cwd=ROOT, env=env, timeout=300) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    assert runs[0].stdout == runs[1].stdout
    overall = [line for line in runs[0].stdout.splitlines() if line.startswith("accuracy:")][0]
    assert float(overall.split("FB1:")[1]) > 80.0


def test_bench_subcommand_reaches_fastner_bench(capsys):
    from fastner.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", "--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_train_config_file_then_flags(capsys, tmp_path):
    """--print-config writes the recipe (TrainConfig's defaults), --config reads it back, and
    flags given on the command line override the file's values."""
    from fastner.train import TrainConfig

    assert main(["train", "--print-config", "--encoder", "gru", "--epochs", "7"]) == 0
    written = json.loads(capsys.readouterr().out)
    assert written == dict(TrainConfig(epochs=7, model={"encoder": "gru"}).to_json())
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(written))
    assert main(["train", "--config", str(path), "--print-config", "--hidden", "12", "--optimizer", "adam"]) == 0
    read = json.loads(capsys.readouterr().out)
    assert read["epochs"] == 7 and read["model"] == {"encoder": "gru", "hidden": 12}
    assert read["optimizer"] == "adam" and read["lr"] == 0.001  # the new optimizer's default lr
    # a training.json repeats its run's recipe
    (tmp_path / "training.json").write_text(json.dumps({"config": written, "history": []}))
    assert main(["train", "--config", str(tmp_path / "training.json"), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out) == written


@pytest.mark.parametrize("content, message", [
    ('{"epochs": 3, "bogus": 1}', "unknown training config keys ['bogus']"),
    ('{"model": {"hiden": 3}}', "unknown model options ['hiden']"),
    ('{"epochs": "3"}', "epochs must be an integer"),
    ('[1, 2]', "must be a JSON object"),
    ('{"epochs": ', "not a JSON training config"),
    ("[" * 100_000 + "]" * 100_000, "not a JSON training config"),  # was a RecursionError traceback
    # the model's options were checked only when the model was built, after the data was read,
    # and reported without the file's name
    ('{"model": {"layers": 0}}', "layers must be >= 1, got 0"),
    ('{"model": {"hidden": "200"}}', "hidden must be an integer, got '200'"),
    ('{"model": {"char_window": 4}}', "char_window must be odd"),
    ('{"word_dim": 0}', "word_dim must be >= 1, got 0"),
    # sizes past any real use built for minutes or exhausted memory (ModelConfig's MAX_SIZES)
    ('{"model": {"layers": 100000}}', "layers must be <= 64 (far above any real use), got 100000"),
    ('{"model": {"char_filters": 1000000}}', "char_filters must be <= 4096"),
    ('{"word_dim": 100000}', "word_dim must be <= 16384"),
])
def test_train_config_file_errors(capsys, tmp_path, content, message):
    path = tmp_path / "recipe.json"
    path.write_text(content)
    assert main(["train", "--config", str(path), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastner: error: {path}: ") and message in err and "Traceback" not in err
    assert main(["train", "--config", str(tmp_path / "missing.json"), "--print-config"]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_train_config_error_of_a_flag_does_not_blame_the_file(capsys, tmp_path):
    """A bad flag beside a good --config file was reported as the file's mistake."""
    path = tmp_path / "recipe.json"
    path.write_text('{"epochs": 2}')
    assert main(["train", "--config", str(path), "--print-config", "--scheme", "XX"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastner: error: scheme must be one of") and str(path) not in err


def test_train_model_config_error_comes_before_the_data_is_read(capsys, tmp_path):
    """A bad model option is refused before the training file is read (it named no file, and
    came after reading the data)."""
    path = tmp_path / "recipe.json"
    path.write_text('{"model": {"layers": 0}}')
    argv = ["train", "--config", str(path), "--train", str(tmp_path / "missing.txt"), "--dev",
            str(tmp_path / "missing.txt"), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(f"fastner: error: {path}: layers must be >= 1")
    assert not (tmp_path / "out").exists()


def _subcommand_options(names):
    import argparse

    from fastner.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in names:
        for action in subparsers.choices[name]._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                yield name, action


# serve's options are defined in fastner/serve/server.py; bench's by fastner.bench
CLI_SUBCOMMANDS = ("train", "evaluate", "tag", "convert", "export", "demo", "info")


def test_help_names_each_options_real_default():
    """A help text that states a default states the one argparse uses (export's --device said
    'cuda when available' while its default was cpu), and every option has a help text."""
    import re

    for name, action in _subcommand_options(CLI_SUBCOMMANDS):
        where = f"fastner {name} {action.option_strings[0]}"
        assert action.help, f"{where} has no help text"
        stated = re.search(r"\(default:? ([^);]+)\)", action.help) or re.fullmatch(r"default (\S+)", action.help)
        if stated and action.default is not None:
            assert stated.group(1).split(" ")[0] == str(action.default), f"{where}: help {action.help!r}, default {action.default!r}"


def test_demo_corpus_size_is_bounded(capsys):
    # `fastner demo --sentences 1000000000` generated a corpus for hours
    import pytest

    with pytest.raises(SystemExit) as exit:
        main(["demo", "--sentences", "1000000000"])
    assert exit.value.code == 2
    assert "argument --sentences: must be in [1, 100000]" in capsys.readouterr().err

