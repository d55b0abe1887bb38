"""JSONL character-offset span data: reading both annotation-tool forms, alignment errors with
FILE:LINE, snapping, CoNLL <-> JSONL conversion, and train/evaluate on JSONL."""
import json

import pytest
import torch

from fastner.cli import main
from fastner.data.conll import DataFormatError, Sentence, read_conll, write_conll
from fastner.data.jsonl import is_jsonl, jsonl_records, read_data, read_jsonl

TEXT = "Tesla's CEO Elon Musk visited Berlin on Monday. Apple fell 3%."


def write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def test_both_annotation_forms(tmp_path):
    spans = [(0, 5, "ORG"), (12, 21, "PER"), (30, 36, "LOC"), (48, 53, "ORG")]
    a = write(tmp_path / "a.jsonl", [{"text": TEXT, "spans": [{"start": s, "end": e, "label": l} for s, e, l in spans]}])
    b = write(tmp_path / "b.jsonl", [{"text": TEXT, "label": [list(x) for x in spans]}])
    first, second = read_jsonl(a), read_jsonl(b)
    assert [s.tokens for s in first] == [s.tokens for s in second]
    assert [s.tags for s in first] == [s.tags for s in second]
    assert first[0].tokens[:4] == ["Tesla", "'s", "CEO", "Elon"]
    assert first[0].tags[:6] == ["B-ORG", "O", "O", "B-PER", "I-PER", "O"]
    assert first[1].tags == ["B-ORG", "O", "O", "O", "O"]


def test_raw_text_tokens_in_the_form_the_model_reads(tmp_path):
    """Training on raw text reads tokens as prediction does (fastner.text.model_form)."""
    text = "\u201cTesla\u2019s\u201d rose in Frank\u00adfurt."
    path = write(tmp_path / "a.jsonl", [{"text": text, "spans": [[1, 6, "ORG"], [18, 28, "LOC"]]}])
    sentence = read_jsonl(path)[0]
    assert sentence.tokens == ['"', "Tesla", "'s", '"', "rose", "in", "Frankfurt", "."]
    assert sentence.tags == ["O", "B-ORG", "O", "O", "O", "O", "B-LOC", "O"]


@pytest.mark.parametrize("span, message", [
    ((1, 5, "ORG"), "span [1, 5) 'ORG' 'esla' does not fall on token boundaries"),
    ((0, 200, "ORG"), "out of range"),
    ((40, 58, "X"), "crosses a sentence boundary"),
    ((21, 22, "X"), "covers no token"),
])
def test_misaligned_spans_are_reported(tmp_path, span, message):
    path = write(tmp_path / "d.jsonl", [{"text": "Oslo rose.", "spans": []}, {"text": TEXT, "label": [list(span)]}])
    with pytest.raises(DataFormatError, match=f"{path}:2: ") as info:
        read_jsonl(path)
    assert message in str(info.value)


def test_snap_widens_to_tokens(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"text": TEXT, "label": [[1, 5, "ORG"], [14, 19, "PER"]]}])
    sentence = read_jsonl(path, misaligned="snap")[0]
    assert sentence.tags[:5] == ["B-ORG", "O", "O", "B-PER", "I-PER"]
    overlapping = write(tmp_path / "o.jsonl", [{"text": TEXT, "label": [[12, 16, "PER"], [12, 21, "PER"]]}])
    with pytest.raises(DataFormatError, match="overlaps"):
        read_jsonl(overlapping)


@pytest.mark.parametrize("line, message", [
    ("[1, 2]", "expected a JSON object"),
    ("{\"text\": ", "not valid JSON"),
    ("{\"spans\": []}", "no \"text\" string"),
    ("{\"text\": \"a\", \"spans\": [[0, \"x\", \"L\"]]}", "start and end must be ints"),
])
def test_malformed_lines(tmp_path, line, message):
    path = write(tmp_path / "bad.jsonl", [{"text": "ok"}, line])
    with pytest.raises(DataFormatError, match=f"{path}:2: .*{message}"):
        read_jsonl(path)
    (tmp_path / "bytes.jsonl").write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(DataFormatError, match="bytes.jsonl:1: not UTF-8"):
        read_jsonl(tmp_path / "bytes.jsonl")


def test_detection_and_conversion_round_trip(tmp_path, capsys):
    conll = tmp_path / "data.txt"
    sentences = [Sentence(["Tesla", "'s", "CEO", "Elon", "Musk", "visited", "Berlin", "."],
                          ["B-ORG", "O", "O", "B-PER", "I-PER", "O", "B-LOC", "O"]),
                 Sentence(["Shares", "rose", "3", "%", "to", "$", "250.10", "."], ["O"] * 8)]
    write_conll(str(conll), sentences)
    assert not is_jsonl(str(conll))
    out = tmp_path / "data.jsonl"
    assert main(["convert", str(conll), str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records[0]["text"] == "Tesla's CEO Elon Musk visited Berlin."
    assert records[1]["text"] == "Shares rose 3% to $250.10."
    for record in records:
        for span in record["spans"]:
            assert span["label"] in ("ORG", "PER", "LOC")
    assert is_jsonl(str(out)) and is_jsonl(str(write(tmp_path / "noext", [{"text": "x"}])))
    back = tmp_path / "back.conll"
    assert main(["convert", str(out), str(back)]) == 0
    again = read_conll(str(back))
    assert [s.tokens for s in again] == [s.tokens for s in sentences]
    assert [s.tags for s in again] == [s.tags for s in sentences]
    assert [s.tags for s in read_data(str(out))] == [s.tags for s in sentences]
    assert list(jsonl_records([Sentence(["a"], [])])) == [{"text": "a", "spans": []}]
    capsys.readouterr()
    bad = write(tmp_path / "bad.jsonl", [{"text": TEXT, "label": [[1, 5, "ORG"]]}])
    target = tmp_path / "target.conll"
    assert main(["convert", str(bad), str(target)]) == 2
    assert f"fastner: error: {bad}:1: span [1, 5)" in capsys.readouterr().err
    assert not target.exists()
    assert main(["convert", str(bad), str(target), "--misaligned", "snap"]) == 0


@pytest.mark.parametrize("command", ["convert", "evaluate", "train"])
def test_format_options_for_files_of_the_other_format_are_refused(tmp_path, capsys, command):
    """--word-column/--tag-column read CoNLL columns and --misaligned JSONL spans: given for files
    of the other format only, they were silently ignored (exit 0)."""
    jsonl = write(tmp_path / "data.jsonl", [{"text": TEXT, "spans": []}])
    conll = tmp_path / "data.conll"
    conll.write_text("EU B-ORG\n", encoding="utf-8")
    argv = {"convert": lambda data: ["convert", str(data), str(tmp_path / "out")],
            "evaluate": lambda data: ["evaluate", str(tmp_path / "no-model"), str(data)],
            "train": lambda data: ["train", "--train", str(data), "--dev", str(data), "--out", str(tmp_path / "run")]}[command]
    for data, option, kind, other in ((jsonl, ["--word-column", "1"], "CoNLL", "JSONL"),
                                      (jsonl, ["--tag-column", "2"], "CoNLL", "JSONL"),
                                      (conll, ["--misaligned", "snap"], "JSONL", "CoNLL")):
        assert main(argv(data) + option) == 2
        err = capsys.readouterr().err
        files = str(data) if command != "train" else f"{data}, {data}"
        verb = "is" if command != "train" else "are"
        assert err == f"fastner: error: {option[0]} applies to {kind} files only, and {files} {verb} {other}\n"
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_format_options_apply_when_one_file_has_their_format(tmp_path, capsys):
    # a CoNLL training file beside a JSONL dev file: --tag-column reads the CoNLL one
    jsonl = write(tmp_path / "dev.jsonl", [{"text": TEXT, "spans": [[0, 5, "ORG"]]}])
    conll = tmp_path / "train.conll"
    conll.write_text("B-ORG EU NNP\nO rejects VBZ\n", encoding="utf-8")
    assert main(["convert", str(conll), str(tmp_path / "out.jsonl"), "--word-column", "1", "--tag-column", "0"]) == 0
    record = json.loads((tmp_path / "out.jsonl").read_text())
    assert record["text"] == "EU rejects" and record["spans"] == [{"start": 0, "end": 2, "label": "ORG"}]
    from types import SimpleNamespace

    from fastner.cli import _check_format_options

    _check_format_options(SimpleNamespace(word_column=None, tag_column=0, misaligned="snap"), [str(conll), str(jsonl)])


def test_train_and_evaluate_on_jsonl(tmp_path, capsys):
    from fastner.demo import generate_articles

    torch.set_num_threads(1)
    path = tmp_path / "train.jsonl"
    write(path, [{"text": text, "spans": [{"start": s, "end": e, "label": l} for s, e, l in spans]}
                 for text, spans in generate_articles(30, seed=2)])
    out = tmp_path / "model"
    assert main(["train", "--train", str(path), "--dev", str(path), "--out", str(out), "--epochs", "1",
                 "--hidden", "8", "--word-dim", "8", "--optimizer", "adam", "--lr", "0.01"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), str(path)]) == 0
    assert "FB1:" in capsys.readouterr().out
