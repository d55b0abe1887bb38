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
    # a traceback (RecursionError), and a message without the file (int digits limit)
    ("[" * 100_000 + "]" * 100_000, "not valid JSON: maximum recursion depth"),
    ('{"text": "a", "n": ' + "9" * 5000 + "}", "not valid JSON: Exceeds the limit"),
    # a lone surrogate escape: no character, and writing it failed later naming no file
    ('{"text": "Oslo \\ud800"}', r"\\ud800 is half of a surrogate pair"),
    ('{"text": "a", "spans": [[0, 1, "\\udc00"]]}', r"\\udc00 is half of a surrogate pair"),
])
def test_malformed_lines(tmp_path, line, message):
    path = write(tmp_path / "bad.jsonl", [{"text": "ok"}, line])
    with pytest.raises(DataFormatError, match=f"{path}:2: .*{message}"):
        read_jsonl(path)
    (tmp_path / "bytes.jsonl").write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(DataFormatError, match="bytes.jsonl:1: not UTF-8"):
        read_jsonl(tmp_path / "bytes.jsonl")
    # a surrogate pair is one character
    assert read_jsonl(write(tmp_path / "pair.jsonl", ['{"text": "Oslo \\ud83d\\ude00"}']))[0].tokens == ["Oslo", "\U0001f600"]


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
    assert list(jsonl_records([Sentence(["a"], [])])) == [{"text": "a", "spans": [], "tokens": [
        {"text": "a", "start": 0, "end": 1}]}]
    capsys.readouterr()
    bad = write(tmp_path / "bad.jsonl", [{"text": TEXT, "label": [[1, 5, "ORG"]]}])
    target = tmp_path / "target.conll"
    assert main(["convert", str(bad), str(target)]) == 2
    assert f"fastner: error: {bad}:1: span [1, 5)" in capsys.readouterr().err
    assert not target.exists()
    assert main(["convert", str(bad), str(target), "--misaligned", "snap"]) == 0


# CoNLL sentences that did not survive CoNLL -> JSONL -> CoNLL while the JSONL text was
# re-tokenized (eng.testa: 3 of 3,250 unreadable, 153 cut differently): a name across what the
# sentence splitter takes for a sentence end, a token the word tokenizer cuts otherwise, a line
# the splitter cuts at "(", a quote the model's form straightens
ROUND_TRIP = [
    Sentence(["ST.", "LOUIS", "AT", "COLORADO"], ["I-LOC", "I-LOC", "O", "I-ORG"]),
    Sentence(["said", "Schroder", "Wertheim", "&", "Co", "."], ["O", "I-ORG", "I-ORG", "I-ORG", "I-ORG", "O"]),
    Sentence(["May", "22", "First", "one-day", "international", "(", "at", "Headingley", ",", "Leeds", ")"],
             ["O", "O", "O", "O", "O", "O", "O", "I-LOC", "O", "I-LOC", "O"]),
    Sentence(["SILVA", "'S", "`LOST", "PASSPORT", "'", "EXCUSE"], ["I-PER", "O", "O", "O", "O", "O"]),
    Sentence(["10\u00a0000", "fans", "in", "U.S.", "Open"], ["O", "O", "O", "I-MISC", "I-MISC"]),
]


def _iob2(sentences):
    from fastner.data.schemes import convert_tags

    return [(s.tokens, convert_tags(s.tags, "IOB2")) for s in sentences]


def test_conversion_round_trip_keeps_the_tokens(tmp_path, capsys):
    """convert writes each sentence's tokens into its JSONL record, and the reader uses them: the
    record reads back as that sentence, not as the re-tokenized detokenized text."""
    conll = tmp_path / "in.conll"
    write_conll(str(conll), ROUND_TRIP)
    assert main(["convert", str(conll), str(tmp_path / "out.jsonl")]) == 0
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert records[0] == {"text": "ST. LOUIS AT COLORADO", "spans": [{"start": 0, "end": 9, "label": "LOC"},
                                                                      {"start": 13, "end": 21, "label": "ORG"}],
                          "tokens": [{"text": "ST.", "start": 0, "end": 3}, {"text": "LOUIS", "start": 4, "end": 9},
                                     {"text": "AT", "start": 10, "end": 12}, {"text": "COLORADO", "start": 13, "end": 21}]}
    assert _iob2(read_jsonl(tmp_path / "out.jsonl")) == _iob2(ROUND_TRIP)
    assert main(["convert", str(tmp_path / "out.jsonl"), str(tmp_path / "back.conll")]) == 0
    assert _iob2(read_conll(tmp_path / "back.conll")) == _iob2(ROUND_TRIP)
    # and JSONL -> CoNLL -> JSONL is byte for byte the same (IOB2 both times)
    assert main(["convert", str(tmp_path / "back.conll"), str(tmp_path / "again.jsonl")]) == 0
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "out.jsonl").read_bytes()


@pytest.mark.slow
def test_conversion_round_trip_of_eng_testa_is_exact(conll_dir, tmp_path, capsys):
    gold = read_conll(conll_dir / "eng.testa")
    assert main(["convert", str(conll_dir / "eng.testa"), str(tmp_path / "testa.jsonl")]) == 0
    assert main(["convert", str(tmp_path / "testa.jsonl"), str(tmp_path / "testa.conll")]) == 0
    back = read_conll(tmp_path / "testa.conll")
    assert len(back) == len(gold) == 3250
    assert _iob2(back) == _iob2(gold)


def test_given_tokens_prodigy_style(tmp_path):
    """A record's own tokens (Prodigy's {"text", "start", "end", "id", "ws"}) make one sentence,
    read as given (no model form); tokens of whitespace (spaCy makes them) are no words."""
    text = "\u201cAcme\u201d  hired\n Ann Lee."
    cuts = [(0, 1), (1, 5), (5, 6), (6, 8), (8, 13), (13, 15), (15, 18), (19, 22), (22, 23)]
    tokens = [{"text": text[a:b], "start": a, "end": b, "id": i, "ws": False} for i, (a, b) in enumerate(cuts)]
    path = write(tmp_path / "a.jsonl", [{"text": text, "tokens": tokens,
                                         "spans": [{"start": 1, "end": 5, "label": "ORG", "token_start": 1},
                                                   {"start": 15, "end": 22, "label": "PER"}]}])
    [sentence] = read_jsonl(path)
    assert sentence.tokens == ["\u201c", "Acme", "\u201d", "hired", "Ann", "Lee", "."]
    assert sentence.tags == ["O", "B-ORG", "O", "O", "B-PER", "I-PER", "O"]
    # without tokens the same text is tokenized (and read in the model's form)
    assert read_jsonl(write(tmp_path / "b.jsonl", [{"text": text}]))[0].tokens[:3] == ['"', "Acme", '"']
    # a span off the given tokens is refused, or snapped to them
    off = write(tmp_path / "c.jsonl", [{"text": text, "tokens": tokens, "spans": [[2, 5, "ORG"]]}])
    with pytest.raises(DataFormatError, match=r"c\.jsonl:1: span \[2, 5\) 'ORG' 'cme' does not fall on token boundaries"):
        read_jsonl(off)
    assert read_jsonl(off, misaligned="snap")[0].tags[1] == "B-ORG"


@pytest.mark.parametrize("tokens, message", [
    ("a b", '"tokens" must be a list'),
    (["a"], "token 0: expected {\"text\", \"start\", \"end\"}"),
    ([{"text": "a", "start": True, "end": 1}], "token 0: \"text\" must be a string"),
    ([{"text": "ab", "start": 0, "end": 1}], "token 0: 'ab' is not the text at [0, 1): 'a'"),
    ([{"text": "a b", "start": 0, "end": 3}, {"text": "a", "start": 0, "end": 1}], "token 1 [0, 1) must lie in the text"),
    ([{"text": "", "start": 1, "end": 1}], "token 0 [1, 1) must lie in the text"),
    ([{"text": "b", "start": 2, "end": 9}], "token 0 [2, 9) must lie in the text (3 characters)"),
])
def test_malformed_given_tokens_name_file_line_and_token(tmp_path, tokens, message):
    path = write(tmp_path / "bad.jsonl", [{"text": "ok"}, {"text": "a b", "tokens": tokens}])
    with pytest.raises(DataFormatError) as info:
        read_jsonl(path)
    assert str(info.value).startswith(f"{path}:2: ") and message in str(info.value)


def test_a_token_that_is_no_conll_column_is_refused_when_converting(tmp_path, capsys):
    # a JSONL file's own token "New York" was written as two columns, read back as a 3-column line
    path = write(tmp_path / "a.jsonl", [{"text": "New York fell", "spans": [[0, 8, "LOC"]], "tokens": [
        {"text": "New York", "start": 0, "end": 8}, {"text": "fell", "start": 9, "end": 13}]}])
    assert main(["convert", str(path), str(tmp_path / "out.conll")]) == 2
    assert capsys.readouterr().err == ("fastner: error: sentence 1, token 1 'New York': a CoNLL column cannot hold "
                                       "spaces, tabs or line breaks\n")
    assert not (tmp_path / "out.conll").exists()


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


def test_a_conll_file_starting_with_a_brace_token_is_conll(tmp_path):
    # its first byte `{` made it JSONL: "not valid JSON" for a well-formed CoNLL file
    path = tmp_path / "data"
    path.write_text("{ O\nfoo B-X\n}\tO\n", encoding="utf-8")
    assert not is_jsonl(str(path))
    assert read_data(str(path))[0].tokens == ["{", "foo", "}"]
    for text in ('{"text": "a"}\n', ' \n{ "text": "a"}\n', "{}\n", '\ufeff{"text": "a"}\n'):
        path.write_text(text, encoding="utf-8")
        assert is_jsonl(str(path)), text


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
