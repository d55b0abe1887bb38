"""`fastner tag` on raw text, directories, JSONL, tokens and CoNLL; output formats; bad input."""
import io
import json
import os
import sys

import pytest

from fastner.cli import main

DOC = "Shares of Kestrel Pharma jumped 4.2% in Frankfurt on Tuesday. Omar Haddad said so."


# tiny models: see conftest.one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


def run(capsys, *argv):
    code = main(["tag", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_text_file_and_stdin(demo_tagger_dir, capsys, tmp_path, monkeypatch):
    path = tmp_path / "article.txt"
    path.write_text(DOC, encoding="utf-8")
    code, out, _ = run(capsys, demo_tagger_dir, path, "--output", "jsonl")
    assert code == 0
    record = json.loads(out)
    assert record["id"] == str(path)
    for entity in record["entities"]:
        assert DOC[entity["start"]:entity["end"]] == entity["text"]
    assert record["sentences"][0]["tokens"][5:7] == ["4.2", "%"]
    monkeypatch.setattr(sys, "stdin", io.StringIO(DOC))
    code, conll, _ = run(capsys, demo_tagger_dir)
    assert code == 0
    first = [line.split() for line in conll.split("\n\n")[0].splitlines()]
    assert [t for t, _ in first][:3] == ["Shares", "of", "Kestrel"]


def test_directory_of_articles_and_spans(demo_tagger_dir, capsys, tmp_path):
    corpus = tmp_path / "news"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text(DOC, encoding="utf-8")
    (corpus / "sub" / "b.txt").write_text("Oslo fell.", encoding="utf-8")
    (corpus / "skip.md").write_text("not an article", encoding="utf-8")
    code, out, _ = run(capsys, demo_tagger_dir, corpus, "--output", "json")
    assert code == 0
    records = json.loads(out)
    assert [r["id"] for r in records] == ["a.txt", os.path.join("sub", "b.txt")]
    code, spans, _ = run(capsys, demo_tagger_dir, corpus, "--output", "spans")
    for line in spans.splitlines():
        doc_id, start, end, label, score, text = line.split("\t")
        source = DOC if doc_id == "a.txt" else "Oslo fell."
        assert source[int(start):int(end)] == text and 0.0 <= float(score) <= 1.0


def test_jsonl_ids_kept_and_streamed_in_order(demo_tagger_dir, capsys, tmp_path):
    path = tmp_path / "in.jsonl"
    records = [{"id": f"doc-{i}", "text": DOC if i % 2 else "Oslo fell."} for i in range(30)] + [{"text": ""}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    out_file = tmp_path / "out.jsonl"
    code, out, _ = run(capsys, demo_tagger_dir, path, "--input", "jsonl", "--output", "jsonl", "--out", out_file,
                       "--batch-size", "4", "--nbest", "2", "--progress")
    assert code == 0 and out == ""
    results = [json.loads(line) for line in out_file.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in results] == [f"doc-{i}" for i in range(30)] + [31]  # no id: the line number
    assert all("nbest" in s for r in results for s in r["sentences"])
    assert results[-1]["entities"] == [] and results[-1]["sentences"] == []


# CoNLL sentences the tokenizer would cut differently: "ST." ends a sentence for the splitter,
# "U.S" + "." inside a sentence is merged into "U.S.", "3.5%" is cut into "3.5" + "%".
RESPLIT = [["ST.", "LOUIS", "1996-08-29"],
           ["Omar", "Haddad", "met", "officials", "of", "the", "U.S", ".", "on", "Monday", "."],
           ["Kestrel", "Pharma", "shares", "rose", "3.5%", "in", "Frankfurt", "."]]


def _tag_both_ways(capsys, model, conll, tmp_path):
    """(results of `fastner convert` of `conll` tagged with --input jsonl, of `conll` tagged with
    --input conll), each a list of JSON results."""
    jsonl = tmp_path / "converted.jsonl"
    assert main(["convert", str(conll), str(jsonl)]) == 0
    capsys.readouterr()
    results = []
    for path, kind in ((jsonl, "jsonl"), (conll, "conll")):
        code, out, _ = run(capsys, model, path, "--input", kind, "--output", "jsonl")
        assert code == 0
        results.append([json.loads(line) for line in out.splitlines()])
    return results


def _same_tagging(documents, sentences):
    """Each converted record tagged as its CoNLL sentence: one sentence, the same tokens, tags and
    spans (entities at the tokens' offsets; scores within float32 noise of another batching)."""
    assert len(documents) == len(sentences)
    for document, sentence in zip(documents, sentences):
        [tagged] = document["sentences"]
        assert (tagged["tokens"], tagged["tags"]) == (sentence["tokens"], sentence["tags"])
        offsets = tagged["offsets"]
        assert [(e["start"], e["end"], e["label"]) for e in document["entities"]] == \
               [(offsets[s["start"]][0], offsets[s["end"] - 1][1], s["type"]) for s in sentence["spans"]]
        assert [e["score"] for e in document["entities"]] == \
               pytest.approx([s["confidence"] for s in sentence["spans"]], abs=1e-5)


def test_jsonl_records_with_tokens_are_tagged_as_given(demo_tagger_dir, capsys, tmp_path):
    """`fastner convert` writes each CoNLL sentence as a record with its tokens; tagging it with
    --input jsonl re-tokenized the text instead, so other tokens (and sentences, and entities)
    came back than the ones given: now exactly those tokens, as the CoNLL file tags them."""
    from fastner.text import detokenize, tokenize

    for tokens in RESPLIT:  # the point of the test
        assert [[t for t, _, _ in s] for s in tokenize(detokenize(tokens)[0])] != [tokens]
    conll = tmp_path / "resplit.conll"
    conll.write_text("".join("".join(f"{t} O\n" for t in tokens) + "\n" for tokens in RESPLIT), encoding="utf-8")
    _same_tagging(*_tag_both_ways(capsys, demo_tagger_dir, conll, tmp_path))
    # as `token tag` lines too (--output conll), the record's tokens whitespace and all
    record = {"text": "Omar Haddad flew to New York\nCity", "tokens": [
        {"text": t, "start": s, "end": e} for t, s, e in
        (("Omar", 0, 4), ("Haddad", 5, 11), ("flew", 12, 16), ("to", 17, 19), ("New York\nCity", 20, 33))]}
    path = tmp_path / "spaced.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    code, out, _ = run(capsys, demo_tagger_dir, path, "--input", "jsonl", "--output", "conll")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines() if line] == ["Omar", "Haddad", "flew", "to", "New_York_City"]


def test_converted_dev_sentences_are_tagged_as_the_conll_file(demo_tagger_dir, capsys, tmp_path, conll_dir):
    """The first 200 sentences of eng.testa (the dev set), converted and tagged, against the
    CoNLL file tagged."""
    from fastner.data.conll import read_conll, write_conll

    conll = tmp_path / "dev200.conll"
    write_conll(str(conll), read_conll(str(conll_dir / "eng.testa"), max_sentences=200))
    documents, sentences = _tag_both_ways(capsys, demo_tagger_dir, conll, tmp_path)
    assert len(sentences) == 200
    _same_tagging(documents, sentences)


GOOD_TOKEN = {"text": "Oslo", "start": 0, "end": 4}


@pytest.mark.parametrize("tokens, message", [
    ("Oslo fell", '"tokens" must be a list of {"text", "start", "end"}, got str'),
    ([GOOD_TOKEN, ["fell", 5, 9]], "token 1: expected {\"text\", \"start\", \"end\"}, got ['fell', 5, 9]"),
    ([GOOD_TOKEN, {"text": "fell", "start": 5}], 'token 1: "text" must be a string and "start", "end" ints'),
    ([GOOD_TOKEN, {"text": "fell", "start": 5, "end": 8}], "token 1: 'fell' is not the text at [5, 8): 'fel'"),
    ([GOOD_TOKEN, {"text": "fell", "start": 5, "end": 19}], "token 1 [5, 19) must lie in the text (9 characters)"),
    ([GOOD_TOKEN, {"text": "lo", "start": 2, "end": 4}], "after the previous token (which ends at 4)"),
])
def test_malformed_record_tokens_name_file_and_line(demo_tagger_dir, capsys, tmp_path, tokens, message):
    path = tmp_path / "bad.jsonl"
    lines = [{"text": "Oslo fell"}, {"text": "Oslo fell", "tokens": tokens}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    code, out, err = run(capsys, demo_tagger_dir, path, "--input", "jsonl", "--output", "jsonl")
    assert code == 2
    assert len(out.splitlines()) <= 1  # the record before it may have been written
    assert err.strip().splitlines()[-1].startswith(f"fastner: error: {path}:2: ")
    assert message in err


def test_tokens_and_conll_inputs(demo_tagger_dir, capsys, tmp_path):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("Omar Haddad said .\n\nOslo fell\n", encoding="utf-8")
    code, out, _ = run(capsys, demo_tagger_dir, tokens, "--input", "tokens", "--output", "jsonl")
    assert [json.loads(line)["tokens"] for line in out.splitlines()] == [["Omar", "Haddad", "said", "."], [], ["Oslo", "fell"]]
    conll = tmp_path / "in.conll"
    conll.write_text("-DOCSTART- O\n\nOmar B-PER\nHaddad I-PER\n\nOslo B-LOC\n", encoding="utf-8")
    code, out, _ = run(capsys, demo_tagger_dir, conll, "--input", "conll")
    assert code == 0
    assert [[line.split()[0] for line in block.splitlines()] for block in out.strip().split("\n\n")] == [["Omar", "Haddad"], ["Oslo"]]


def test_tokens_and_conll_inputs_keep_unicode_spaces_inside_tokens(demo_tagger_dir, capsys, tmp_path):
    # tokens and columns are separated by spaces and tabs, as in CoNLL files: a no-break space
    # split "10\u00a0000" into two tokens (and a CoNLL line into one more column)
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("Oslo\tgained 10\u00a0000  jobs\n", encoding="utf-8")
    code, out, _ = run(capsys, demo_tagger_dir, tokens, "--input", "tokens", "--output", "jsonl")
    assert code == 0 and json.loads(out)["tokens"] == ["Oslo", "gained", "10\u00a0000", "jobs"]
    conll = tmp_path / "in.conll"
    conll.write_text("Oslo O\n10\u00a0000 O\n", encoding="utf-8")
    code, out, _ = run(capsys, demo_tagger_dir, conll, "--input", "conll", "--output", "jsonl")
    assert code == 0 and json.loads(out)["tokens"] == ["Oslo", "10\u00a0000"]


@pytest.mark.parametrize("kind", ["text", "jsonl", "tokens"])
def test_word_column_without_conll_input_is_refused(demo_tagger_dir, capsys, tmp_path, kind):
    # it was silently ignored: documents and tokens lines have no columns
    path = tmp_path / "in.txt"
    path.write_text('{"text": "Oslo fell"}\n' if kind == "jsonl" else "Oslo fell\n", encoding="utf-8")
    code, out, err = run(capsys, demo_tagger_dir, path, "--input", kind, "--word-column", "1")
    assert code == 2 and out == ""
    assert err == f"fastner: error: --word-column applies to --input conll only, got --input {kind}\n"


@pytest.mark.parametrize("content, kind, message", [
    (b"Oslo \xff fell", "text", ":1: not UTF-8 (byte 0xff"),
    (b'{"text": "ok"}\n{"text": "b\xc3"}\n', "jsonl", ":2: not UTF-8"),
    (b'{"text": "ok"}\n[1, 2]\n', "jsonl", ":2: expected a JSON object"),
    (b'{"text": "ok"}\n{"text": \n', "jsonl", ":2: not valid JSON"),
    (b'{"id": 1, "body": "x"}\n', "jsonl", ':1: the object has no "text" string'),
    (b"[" * 100_000 + b"]" * 100_000 + b"\n", "jsonl", ":1: not valid JSON: maximum recursion depth"),  # a traceback
])
def test_bad_input_names_file_and_line(demo_tagger_dir, capsys, tmp_path, content, kind, message):
    path = tmp_path / "bad.in"
    path.write_bytes(content)
    target = tmp_path / "out.txt"
    target.write_text("previous results\n")
    code, _, err = run(capsys, demo_tagger_dir, path, "--input", kind, "--out", target)
    assert code == 2
    assert err.strip().startswith(f"fastner: error: {path}") and message in err
    assert target.read_text() == "previous results\n"  # nothing half-written over it
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_control_characters_and_empty_files(demo_tagger_dir, capsys, tmp_path):
    path = tmp_path / "odd.txt"
    text = "\x00Oslo\x07 fell\x1b[0m\u200b today.\r\n"
    path.write_text(text, encoding="utf-8")
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    code, out, _ = run(capsys, demo_tagger_dir, path, empty, "--output", "jsonl")
    assert code == 0
    first, second = [json.loads(line) for line in out.splitlines()]
    for entity in first["entities"]:
        assert text[entity["start"]:entity["end"]] == entity["text"]
    assert second["entities"] == [] and second["sentences"] == []


def test_missing_input_and_directory_without_articles(demo_tagger_dir, capsys, tmp_path):
    code, _, err = run(capsys, demo_tagger_dir, tmp_path / "nope.txt")
    assert code == 2 and "input file not found" in err
    (tmp_path / "empty_dir").mkdir()
    code, _, err = run(capsys, demo_tagger_dir, tmp_path / "empty_dir")
    assert code == 2 and "without .txt files" in err


def test_a_long_tokenised_sentence_is_tagged_in_pieces(demo_tagger_dir, capsys, tmp_path, monkeypatch):
    """Span scores cost a pass over the sentence per span: one 32,000-token line of --input tokens
    ran for minutes (a 1 MB line would take an hour), while raw text is cut into pieces of
    MAX_SENTENCE_TOKENS. Pre-tokenized sentences are cut the same way and joined back."""
    from fastner import Tagger, documents
    from fastner.inference import Analyser

    monkeypatch.setattr(documents, "MAX_SENTENCE_TOKENS", 4)
    analysed = []
    analyse = Analyser.analyse
    monkeypatch.setattr(Analyser, "analyse", lambda self, sentences, *a, **k: (
        analysed.extend(len(s) for s in sentences), analyse(self, sentences, *a, **k))[1])
    tokens = "Omar Haddad of Kestrel Pharma flew to Frankfurt and Oslo".split()
    path = tmp_path / "in.txt"
    path.write_text(" ".join(tokens) + "\n\n", encoding="utf-8")
    code, out, _ = run(capsys, demo_tagger_dir, path, "--input", "tokens", "--output", "jsonl", "--nbest", "3")
    assert code == 0 and max(analysed) == 4
    whole, empty = [json.loads(line) for line in out.splitlines()]
    assert empty["tokens"] == [] and empty["tags"] == []
    tagger = Tagger.load(str(demo_tagger_dir), device="cpu")
    parts = tagger.predict([tokens[0:4], tokens[4:8], tokens[8:]], nbest=3)
    assert whole["tokens"] == tokens and whole["tags"] == [t for part in parts for t in part["tags"]]
    assert [(s["start"], s["end"], s["type"]) for s in whole["spans"]] == [
        (s["start"] + 4 * n, s["end"] + 4 * n, s["type"]) for n, part in enumerate(parts) for s in part["spans"]]
    best = whole["nbest"][0]
    assert best["tags"] == [t for part in parts for t in part["nbest"][0]["tags"]]
    expected = parts[0]["nbest"][0]["probability"] * parts[1]["nbest"][0]["probability"] * parts[2]["nbest"][0]["probability"]
    assert best["probability"] == pytest.approx(expected, abs=1e-6)
    assert len(whole["nbest"]) == 3


def test_stdin_given_twice_is_refused(demo_tagger_dir, capsys, monkeypatch):
    # the second `-` read an empty stdin: an extra empty document in the output, exit 0
    monkeypatch.setattr(sys, "stdin", io.StringIO(DOC))
    code, out, err = run(capsys, demo_tagger_dir, "-", "-", "--output", "jsonl")
    assert code == 2 and out == ""
    assert err.strip().splitlines()[-1] == "fastner: error: tag: stdin (-) given more than once"


@pytest.mark.parametrize("output", ["conll", "spans"])
def test_nbest_without_a_format_that_holds_it_is_refused(demo_tagger_dir, capsys, tmp_path, output):
    # conll and spans lines have no place for the alternatives: they were dropped, exit 0
    path = tmp_path / "in.txt"
    path.write_text(DOC, encoding="utf-8")
    code, out, err = run(capsys, demo_tagger_dir, path, "--nbest", "3", "--output", output)
    assert code == 2 and out == ""
    assert err.strip().splitlines()[-1] == f"fastner: error: --nbest needs --output json or jsonl, got --output {output}"


@pytest.mark.slow
def test_ten_megabyte_document(demo_tagger_dir, capsys, tmp_path):
    from fastner.demo import generate_articles

    articles = generate_articles(2000, seed=9)
    text = "\n\n".join(t for t, _ in articles)
    text = (text * (10_000_000 // len(text) + 1))[:10_000_000]
    path = tmp_path / "big.txt"
    path.write_text(text, encoding="utf-8")
    code, out, _ = run(capsys, demo_tagger_dir, path, "--output", "spans", "--batch-size", "256")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) > 10_000
    for line in lines[:: max(1, len(lines) // 2000)]:
        _, start, end, _, _, entity = line.split("\t")
        assert text[int(start):int(end)] == entity


# ---- reading a live source -------------------------------------------------------------------

def test_a_live_pipe_is_answered_document_by_document(demo_tagger_dir):
    # A feed piped into `fastner tag` (tail -f news.jsonl | fastner tag ...): each document's
    # result must come out while the input is still open, not when a group of 8 x batch_size
    # sentences has arrived or the input has ended.
    import subprocess

    process = subprocess.Popen([sys.executable, "-m", "fastner", "tag", str(demo_tagger_dir), "--input", "jsonl",
                                "--output", "jsonl", "--threads", "1"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for number in range(2):
            process.stdin.write((json.dumps({"id": f"live-{number}", "text": DOC}) + "\n").encode())
            process.stdin.flush()
            line = _read_line_within(process.stdout, seconds=120)
            assert line is not None, "no result while the input stayed open"
            assert json.loads(line)["id"] == f"live-{number}"
        process.stdin.close()
        assert process.wait(timeout=60) == 0
        assert process.stdout.read() == b""
    finally:
        process.kill()
        process.wait()


def test_ctrl_c_while_a_live_pipe_is_quiet_exits_cleanly(demo_tagger_dir):
    # The reader thread waits inside stdin's read; an exit then aborted the interpreter on the
    # lock of sys.stdin's reader ("Fatal Python error: ... at interpreter shutdown", exit -6).
    import signal
    import subprocess

    process = subprocess.Popen([sys.executable, "-m", "fastner", "tag", str(demo_tagger_dir), "--input", "jsonl",
                                "--output", "jsonl", "--threads", "1"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        process.stdin.write((json.dumps({"id": "one", "text": DOC}) + "\n").encode())
        process.stdin.flush()
        assert _read_line_within(process.stdout, seconds=120) is not None
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=60)
        err = process.stderr.read().decode()
        assert code == 130 and err.strip().endswith("fastner: interrupted"), (code, err)
    finally:
        process.kill()
        process.wait()


def _read_line_within(stream, seconds: float):
    import threading

    lines = []
    reader = threading.Thread(target=lambda: lines.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(seconds)
    return lines[0] if lines and lines[0] else None


def _items(count, weight=1):
    from fastner.tag_io import Item

    return [Item(i, "x" * (80 * weight - 1)) for i in range(count)]


def test_arrived_groups_take_what_has_arrived_and_keep_order():
    import threading

    from fastner.tag_io import arrived_groups

    more = threading.Event()
    items = _items(5)

    def feed():
        yield from items[:2]
        assert more.wait(60), "the consumer never asked for more"
        yield from items[2:]

    groups = arrived_groups(feed(), budget=100, weigh=lambda item: 1)
    first = next(groups)
    while len(first) < 2:  # the reader may not have read the second item yet
        first += next(groups)
    assert [item.id for item in first] == [0, 1]  # tagged before the source gave a third
    more.set()
    assert [item.id for group in groups for item in group] == [2, 3, 4]


def test_arrived_groups_stay_within_the_budget():
    from fastner.documents import sentence_estimate
    from fastner.tag_io import arrived_groups

    items = _items(60, weight=2) + _items(1, weight=50)  # the last alone outweighs the budget
    groups = list(arrived_groups(iter(items), budget=10, weigh=lambda item: sentence_estimate(item.payload)))
    assert [item.id for group in groups for item in group] == [item.id for item in items]
    assert all(sum(sentence_estimate(i.payload) for i in group) <= 10 for group in groups[:-1])
    assert len(groups[-1]) == 1


def test_arrived_groups_raise_a_read_error_after_the_items_before_it():
    from fastner.data.conll import DataFormatError
    from fastner.tag_io import arrived_groups

    def feed():
        yield from _items(3)
        raise DataFormatError("in.jsonl:4: not valid JSON")

    seen = []
    with pytest.raises(DataFormatError, match="in.jsonl:4"):
        for group in arrived_groups(feed(), budget=100, weigh=lambda item: 1):
            seen += [item.id for item in group]
    assert seen == [0, 1, 2]


def test_arrived_groups_stop_their_reader_when_closed():
    import threading
    import time

    from fastner.tag_io import arrived_groups

    def endless():
        number = 0
        while True:
            yield from _items(1)
            number += 1

    before = {t.ident for t in threading.enumerate()}
    groups = arrived_groups(endless(), budget=4, weigh=lambda item: 1)
    next(groups)
    groups.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(t.name == "fastner-tag-reader" and t.ident not in before
                                               for t in threading.enumerate()):
        time.sleep(0.05)
    assert not any(t.name == "fastner-tag-reader" and t.ident not in before for t in threading.enumerate())


def test_spans_lines_keep_one_record_a_line_whatever_the_text(demo_tagger_dir, capsys, tmp_path):
    # A tab or any line break str.splitlines() knows, in an id or a token, split a spans record.
    breaks = "\t\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(" ".join(f"Oslo{c}x" for c in breaks[1:] if not c.isspace() or c in "\x1c\x1d\x1e\x85") + "\n",
                      encoding="utf-8")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"id": "a\tb\nc\u2028d", "text": "Omar\u2028Haddad met\x85Ingrid Lindqvist in Oslo."}) + "\n",
                     encoding="utf-8")
    for path, kind in ((tokens, "tokens"), (jsonl, "jsonl")):
        code, out, _ = run(capsys, demo_tagger_dir, path, "--input", kind, "--output", "spans")
        assert code == 0 and out.strip(), kind  # some entity found, so that a record is checked
        for line in out.splitlines():
            assert len(line.split("\t")) == 6, repr(line)
        assert out.count("\n") == len(out.splitlines())
