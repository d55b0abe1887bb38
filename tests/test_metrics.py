"""conlleval counts: on crafted cases, each expected count derived by hand from the script's
chunk start/end rules (see fastner/metrics.py), token by token; and on random cases, against
the PyPI port `conlleval` 0.2 (the test extra), where it follows the script."""
import math
import random

import pytest
import torch

from fastner.metrics import conlleval, format_conlleval, strict_f1, token_accuracy


def counts(result):
    return result["gold"], result["found"], result["correct"]


def test_iob2_type_error_counts_one_wrong_chunk():
    r = conlleval([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "B-ORG"]])
    assert counts(r) == (2, 2, 1)
    assert r["accuracy"] == pytest.approx(75.0)
    assert (r["precision"], r["recall"], r["f1"]) == pytest.approx((50.0, 50.0, 50.0))
    assert r["per_type"]["PER"]["f1"] == 100.0
    assert r["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "gold": 1, "found": 0, "correct": 0}
    assert r["per_type"]["ORG"]["found"] == 1 and r["per_type"]["ORG"]["gold"] == 0


def test_iob1_b_splits_adjacent_chunks_of_one_type():
    # gold: I-PER I-PER | B-PER (two chunks); pred: one 3-token chunk. At token 2 the gold
    # chunk ends (I->B) but the guessed one does not, so the first chunk is not correct.
    r = conlleval([["I-PER", "I-PER", "B-PER", "O"]], [["I-PER", "I-PER", "I-PER", "O"]])
    assert counts(r) == (2, 1, 0)
    assert r["accuracy"] == pytest.approx(75.0)


def test_i_after_o_starts_a_chunk_and_type_change_splits():
    # O->I starts; I-PER -> I-LOC ends and starts on the type rule; I-LOC -> B-ORG likewise.
    r = conlleval([["O", "I-PER", "I-LOC", "B-ORG"]], [["O", "I-PER", "I-LOC", "B-ORG"]])
    assert counts(r) == (3, 3, 3)
    assert r["f1"] == 100.0


def test_type_change_inside_a_guessed_chunk():
    # pred B-PER I-ORG: two guessed chunks (type rule); the PER chunk does not end where gold's does
    r = conlleval([["B-PER", "I-PER"]], [["B-PER", "I-ORG"]])
    assert counts(r) == (1, 2, 0)
    assert r["accuracy"] == pytest.approx(50.0)


def test_e_then_b_of_same_type_does_not_split():
    # conlleval has no rule for E->B (nor B->E, S->S, E->S): BIOES B-X E-X B-X E-X is ONE chunk
    tags = [["B-X", "E-X", "B-X", "E-X"]]
    assert counts(conlleval(tags, tags)) == (1, 1, 1)
    assert counts(conlleval([["S-X", "S-X"]], [["S-X", "S-X"]])) == (1, 1, 1)
    # while B->B and E->E do split
    assert counts(conlleval([["B-X", "B-X"]], [["B-X", "B-X"]])) == (2, 2, 2)
    assert counts(conlleval([["E-X", "E-X"]], [["E-X", "E-X"]])) == (2, 2, 2)


def test_bioes_merged_guess_ends_early():
    # gold B-X E-X B-X E-X (one conlleval chunk, ends at the sentence boundary);
    # pred B-X E-X S-X O: S->O ends (prev type X differs from ''), so the guess ends at token 3.
    r = conlleval([["B-X", "E-X", "B-X", "E-X"]], [["B-X", "E-X", "S-X", "O"]])
    assert counts(r) == (1, 1, 0)


def test_sentence_boundary_closes_chunks():
    # B-PER | I-PER in two sentences: the blank line between them ends the first chunk and
    # O->I starts the second; joined in one sentence they are a single chunk.
    split = conlleval([["B-PER"], ["I-PER"]], [["B-PER"], ["I-PER"]])
    joined = conlleval([["B-PER", "I-PER"]], [["B-PER", "I-PER"]])
    assert counts(split) == (2, 2, 2)
    assert counts(joined) == (1, 1, 1)


def test_guess_longer_than_gold():
    # gold PER(0,1); pred PER(0,2): at token 1 gold ends (B->O) but the guess does not -> wrong
    r = conlleval([["B-PER", "O", "O"]], [["B-PER", "I-PER", "O"]])
    assert counts(r) == (1, 1, 0)
    assert r["f1"] == 0.0


def test_types_with_hyphens_split_at_first_hyphen():
    r = conlleval([["B-MISC-X", "I-MISC-X"]], [["B-MISC-X", "I-MISC-X"]])
    assert list(r["per_type"]) == ["MISC-X"] and counts(r) == (1, 1, 1)


def test_empty_and_no_chunks():
    r = conlleval([["O", "O"]], [["O", "O"]])
    assert counts(r) == (0, 0, 0) and r["f1"] == 0.0 and r["accuracy"] == 100.0
    assert conlleval([], [])["tokens"] == 0


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="sentence 0"):
        conlleval([["O", "O"]], [["O"]])
    with pytest.raises(ValueError, match="sentences"):
        conlleval([["O"]], [])


def test_report_format_matches_the_script():
    text = format_conlleval(conlleval([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "B-ORG"]]))
    assert text.splitlines() == [
        "processed 4 tokens with 2 phrases; found: 2 phrases; correct: 1.",
        "accuracy:  75.00%; precision:  50.00%; recall:  50.00%; FB1:  50.00",
        "              LOC: precision:   0.00%; recall:   0.00%; FB1:   0.00  0",
        "              ORG: precision:   0.00%; recall:   0.00%; FB1:   0.00  1",
        "              PER: precision: 100.00%; recall: 100.00%; FB1: 100.00  1",
    ]


def test_strict_mode_counts_well_formed_spans():
    tags = [["B-X", "E-X", "B-X", "E-X"]]
    assert counts(strict_f1(tags, tags, "BIOES")) == (2, 2, 2)
    assert counts(strict_f1([["S-X", "S-X"]], [["S-X", "S-X"]], "BIOES")) == (2, 2, 2)
    # IOB2: a chunk opened by I- is ill-formed and dropped; conlleval counts it
    gold, pred = [["B-PER", "I-PER", "O"]], [["I-PER", "I-PER", "O"]]
    assert counts(strict_f1(gold, pred, "IOB2")) == (1, 0, 0)
    assert counts(conlleval(gold, pred)) == (1, 1, 1)
    # IOB1 accepts I- openings
    assert counts(strict_f1(pred, pred, "IOB1")) == (1, 1, 1)
    # BIOES: B without E is no chunk
    assert counts(strict_f1([["B-X", "I-X"]], [["B-X", "I-X"]], "BIOES")) == (0, 0, 0)


def test_conlleval_agrees_with_strict_on_well_formed_iob2(conll_dir):
    from fastner.data import convert_tags, read_conll

    sentences = read_conll(conll_dir / "eng.testa", max_sentences=300)
    gold = [convert_tags(s.tags, "IOB2") for s in sentences]
    # a shifted prediction: every chunk's type moved to the next sentence's tags where lengths allow
    pred = [list(g) for g in gold]
    for p in pred[::3]:
        p[:] = ["O"] * len(p)
    assert counts(conlleval(gold, pred)) == counts(strict_f1(gold, pred, "IOB2"))
    # and IOB1 gold gives the same chunks as its IOB2 conversion
    assert counts(conlleval([s.tags for s in sentences], [s.tags for s in sentences])) == counts(conlleval(gold, gold))


def test_token_accuracy_respects_the_mask():
    pred = torch.tensor([[1, 2, 3], [1, 0, 0]])
    gold = torch.tensor([[1, 2, 0], [1, 5, 5]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert token_accuracy(pred, gold, mask) == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="shape"):
        token_accuracy(pred, gold[:, :2], mask)


# ---- the script's own quirks, each read off conlleval.pl (2004-01-26) ---------------------------

def test_the_type_0_is_no_type_as_in_the_script():
    # the script keeps a type with `$type ? $type : ""`, and "0" is false in Perl: B-0 I-0 is a
    # chunk of type "" (O->B starts it), and S-0 after O is none (O->S keeps the type "", no rule)
    r = conlleval([["B-0", "I-0", "O", "S-0"]], [["B-0", "I-0", "O", "S-0"]])
    assert counts(r) == (1, 1, 1) and list(r["per_type"]) == [""]
    assert r["accuracy"] == 100.0


def test_report_prints_the_untyped_row_twice_like_the_script():
    # the script's loop that drops duplicate type names tests `not($lastType)`, true for "": the
    # untyped row comes once from the gold chunks and once more from the guessed ones
    text = format_conlleval(conlleval([["B", "I"]], [["B", "O"]]))
    assert text.splitlines() == [
        "processed 2 tokens with 1 phrases; found: 1 phrases; correct: 0.",
        "accuracy:  50.00%; precision:   0.00%; recall:   0.00%; FB1:   0.00",
        "                 : precision:   0.00%; recall:   0.00%; FB1:   0.00  1",
        "                 : precision:   0.00%; recall:   0.00%; FB1:   0.00  1",
    ]
    assert len(format_conlleval(conlleval([["B"]], [["O"]])).splitlines()) == 3  # gold only: once


def test_report_pads_type_names_to_17_bytes_like_the_script():
    # Perl's printf "%17s" counts the bytes of the UTF-8 it read, not characters
    text = format_conlleval(conlleval([["B-PERSÖN", "B-人名"]], [["B-PERSÖN", "O"]]))
    assert text.splitlines()[2:] == [
        " " * 10 + "PERSÖN: precision: 100.00%; recall: 100.00%; FB1: 100.00  1",
        " " * 11 + "人名: precision:   0.00%; recall:   0.00%; FB1:   0.00  0",
    ]


def test_f1_is_computed_from_percentages_like_the_script():
    # 1 chunk guessed, right, of 63: the script's 2*100*(100/63)/(100+100/63) is 3.1250000000000004
    # in doubles and prints 3.13; the same F1 from fractions is 3.125 exactly and prints 3.12
    r = conlleval([["B-X"]] * 63, [["B-X"]] + [["O"]] * 62)
    assert format_conlleval(r).splitlines()[1].endswith("FB1:   3.13")


# ---- differential: the PyPI port `conlleval` 0.2 (test extra) as an independent oracle -------------
#
# Read against conlleval.pl (2004-01-26), the port differs from the script in these places; the
# comparisons below leave out exactly these, each where marked:
#  1. it adds BIOES rules the script lacks: a chunk ends after every E and S and before an S, and
#     starts at every B and S and at E/I after S (the script: E->E, E->I, E->O end; E->E, E->I,
#     O->E start; `B-X E-X B-X E-X` is one chunk to it, two to the port);
#  2. precision where nothing was guessed: 100% (`prec = 1 if pred == 0`), the script's 0.00%;
#  3. untyped chunks ("B", "I-"): counted in its totals but left out of its per-type rows;
#  4. it has a row for every type it saw, the script only for the types of chunks found (not
#     for "O-PER" alone, nor for the type of a correct chunk's last tag where that opened none);
#  5. zero tokens: its report divides by the token count (ZeroDivisionError);
#  6. it computes P/R/F1 as fractions times 100, the script from percentages: the doubles can
#     differ in the last bit, which shows where the exact value is a rounding tie, the first at
#     64 gold + guessed chunks (test_f1_is_computed_from_percentages_like_the_script): each case
#     below stays under 32 tokens, so under 64 chunks;
#  7. it keeps the type "0" (the script: no type, "0" being false in Perl) and pads type names
#     to 17 characters (the script: bytes): the cases use neither (the crafted tests above do);
#  8. a blank first line: it takes its column count from that line and rejects the next; the
#     cases end each sentence with a `-X- O O` line instead, which both read as a blank line.

TYPES = ("PER", "LOC", "MISC-X")  # the script splits a tag at its first hyphen: B-MISC-X is MISC-X
PREFIXES = ("B", "I", "E", "S", "U", "L", "O", ".", "[", "]", "X")  # every rule the script has, and none


@pytest.fixture(scope="module")
def port():
    # the test extra's conlleval==0.2: imported, not skipped without it (a check that silently
    # skips where the install failed checks nothing)
    from conlleval import conlleval

    return conlleval


def _port_only_rule(prev, cur) -> bool:
    """Difference 1: the port's rule and the script's disagree between these two (prefix, type)s.
    Only between tags of one type: a type change ends and starts a chunk in both."""
    (prev_prefix, prev_type), (prefix, kind) = prev, cur
    return prev_type == kind and ("S" in (prev_prefix, prefix)
                                  or (prev_prefix == "E" and prefix not in ("E", "I", "O"))
                                  or (prefix == "B" and prev_prefix not in ("B", "I", "O")))


def _meets_a_port_only_rule(port, sentences) -> bool:
    prev = ("O", "")
    for tags in sentences:
        for cur in [*map(port.parse_tag, tags), ("O", "")]:  # ("O", ""): the sentence boundary
            if _port_only_rule(prev, cur):
                return True
            prev = cur
    return False


def _port_summary(port, gold, pred) -> dict:
    lines = []
    for gold_tags, pred_tags in zip(gold, pred):
        lines += [f"w {g} {p}" for g, p in zip(gold_tags, pred_tags)]
        lines.append("-X- O O")  # difference 8
    return _port_summary_of_lines(port, lines)


def _port_summary_of_lines(port, lines) -> dict:
    summary = port.evaluate(lines)
    slots = summary["slots"]["chunks"]
    # difference 3: the untyped chunks are what its totals hold beyond its rows
    totals = summary["overall"]["chunks"]["stats"]
    summary["untyped"] = tuple(totals[k] - sum(s["stats"][k] for s in slots.values())
                               for k in ("gold", "pred", "correct"))
    for kind in [k for k, v in slots.items() if v["stats"]["gold"] == v["stats"]["pred"] == 0]:
        del slots[kind]  # difference 4
    for block in [summary["overall"]["chunks"], *slots.values()]:
        if block["stats"]["pred"] == 0:
            block["evals"]["prec"] = 0  # difference 2
    return summary


def _port_counts(port, gold, pred) -> tuple:
    stats = _port_summary(port, gold, pred)["overall"]["chunks"]["stats"]
    return stats["gold"], stats["pred"], stats["correct"]


def _stats(row) -> tuple:
    return row["gold"], row["found"], row["correct"]


def _assert_agrees_with_port(port, gold, pred) -> None:
    ours = conlleval(gold, pred)
    summary = _port_summary(port, gold, pred)
    chunks, tags, slots = summary["overall"]["chunks"], summary["overall"]["tags"], summary["slots"]["chunks"]

    def theirs(block):
        return (block["stats"]["gold"], block["stats"]["pred"], block["stats"]["correct"])

    def same_percent(row, block):  # difference 6: the last bit may differ (pytest.approx: 3x slower)
        return all(math.isclose(row[a], 100 * block["evals"][b], rel_tol=1e-12, abs_tol=1e-12)
                   for a, b in (("precision", "prec"), ("recall", "rec"), ("f1", "f1")))

    assert _stats(ours) == theirs(chunks)
    assert same_percent(ours, chunks)
    assert ours["tokens"] == tags["stats"]["gold"]
    if ours["tokens"]:
        assert math.isclose(ours["accuracy"], 100 * tags["stats"]["correct"] / tags["stats"]["gold"], rel_tol=1e-12)
    typed = {kind: row for kind, row in ours["per_type"].items() if kind != ""}
    assert sorted(typed) == sorted(slots)
    for kind, row in typed.items():
        assert _stats(row) == theirs(slots[kind]) and same_percent(row, slots[kind]), kind
    if summary["untyped"][:2] == (0, 0):  # difference 4
        assert "" not in ours["per_type"]
    else:
        assert _stats(ours["per_type"][""]) == summary["untyped"]
    if ours["tokens"]:  # difference 5
        rows = [line for line in format_conlleval(ours).splitlines() if not line.startswith(" " * 17 + ":")]
        assert rows == port.report(summary).splitlines()


def _chunks(rng, n):
    """(start, end, type) chunks of 1-3 tokens over n tokens, with gaps."""
    spans, i = [], 0
    while i < n:
        if rng.random() < 0.35:
            i += 1
            continue
        end = min(n, i + rng.randint(1, 3))
        spans.append((i, end, rng.choice(TYPES)))
        i = end
    return spans


def _encode(spans, n, scheme):
    tags = ["O"] * n
    for start, end, kind in spans:
        inside = [f"I-{kind}"] * (end - start)
        if scheme == "BIOES":
            inside = [f"S-{kind}"] if end - start == 1 else [f"B-{kind}", *inside[2:], f"E-{kind}"]
        elif scheme == "IOB2" or any(e == start and k == kind for _, e, k in spans):
            inside[0] = f"B-{kind}"  # IOB1: B only where a chunk of the same type ends right before
        tags[start:end] = inside
    return tags


def _odd_tag(rng):
    """Any prefix, any type, untyped ("B", "I-"), O with a type: every rule of the script, and none."""
    if rng.random() < 0.3:
        return "O"
    prefix, kind = rng.choice(PREFIXES), rng.choice(TYPES + ("",))
    return f"{prefix}-{kind}" if kind or rng.random() < 0.5 else prefix


def _case(rng, scheme):
    gold, pred = [], []
    for _ in range(rng.randint(0, 4)):
        n = rng.randint(0, 7)  # at most 28 tokens: difference 6
        if scheme == "mixed":
            gold_tags = [_odd_tag(rng) for _ in range(n)]
            pred_tags = [_odd_tag(rng) if rng.random() < 0.4 else g for g in gold_tags]
        else:
            spans = _chunks(rng, n)
            gold_tags = _encode(spans, n, scheme)
            guessed = _chunks(rng, n) if rng.random() < 0.3 else [
                (s, e, rng.choice(TYPES) if rng.random() < 0.2 else k) for s, e, k in spans if rng.random() < 0.9]
            pred_tags = [_odd_tag(rng) if rng.random() < 0.05 else t for t in _encode(guessed, n, scheme)]
        gold.append(gold_tags)
        pred.append(pred_tags)
    return gold, pred


@pytest.mark.parametrize("scheme", ["IOB1", "IOB2", "BIOES", "mixed"])
def test_conlleval_agrees_with_the_port_on_random_sequences(port, scheme):
    rng = random.Random(f"conlleval-{scheme}")
    cases, compared, prefixes = 1500, 0, set()
    for _ in range(cases):
        gold, pred = _case(rng, scheme)
        if _meets_a_port_only_rule(port, gold) or _meets_a_port_only_rule(port, pred):
            continue  # difference 1
        _assert_agrees_with_port(port, gold, pred)
        compared += 1
        prefixes.update(tag.partition("-")[0] for tags in gold + pred for tag in tags)
    # the exclusion leaves more than half of the cases, BIOES ones too (E and S chunks apart or of other types)
    assert compared > cases / 2
    assert {"B", "I", "O"} | ({"E", "S"} if scheme in ("BIOES", "mixed") else set()) <= prefixes


def test_a_chunk_in_progress_is_wrong_once_the_types_part(port):
    # a path the random cases seldom take: no rule ends a chunk after a "." tag, so at I-X vs I-Y
    # neither chunk ends; only the type check stops the guess from counting as correct
    gold, pred = [["B-X", "I-X", "I-X"]], [["B-X", ".-X", "I-Y"]]
    assert counts(conlleval(gold, pred)) == (1, 2, 0)
    _assert_agrees_with_port(port, gold, pred)


def test_the_port_differs_from_the_scripts_rules_only_where_left_out(port):
    # fastner's rules are the script's (module doc, hand-derived cases above): over every pair of
    # prefixes, of one type and of two, the port's chunk rules differ exactly where _port_only_rule says
    from fastner.metrics import _end_of_chunk, _start_of_chunk

    for prev_prefix in PREFIXES:
        for prefix in PREFIXES:
            for prev_type, kind in (("X", "X"), ("X", "Y"), ("", ""), ("", "X")):
                pair = (prev_prefix, prefix, prev_type, kind)
                ours = (_end_of_chunk(*pair), _start_of_chunk(*pair))
                theirs = (port.end_of_chunk(*pair), port.start_of_chunk(*pair, "O"))
                assert (ours != theirs) == _port_only_rule((prev_prefix, prev_type), (prefix, kind)), pair


def test_the_port_and_the_script_part_where_left_out(port):
    # differences 1 and 2 on the smallest cases: the port's numbers against the script's (fastner's)
    one = [["B-X", "E-X", "B-X", "E-X"]]
    assert _port_counts(port, one, one) == (2, 2, 2) and counts(conlleval(one, one)) == (1, 1, 1)
    summary = port.evaluate(["w B-X O"])
    assert summary["overall"]["chunks"]["evals"]["prec"] == 1
    assert conlleval([["B-X"]], [["O"]])["precision"] == 0.0


def test_cli_evaluate_prints_the_ports_report_of_its_output_file(port, tmp_path, monkeypatch, capsys):
    # `fastner evaluate` with a stand-in tagger (the tags are the point, not the model): its report
    # is the port's on the `token gold predicted` file it writes, which is conlleval's input format
    from fastner import cli

    rng = random.Random("cli")
    gold, pred = [], []
    while len(gold) < 12:
        n = rng.randint(1, 5)
        gold.append(_encode(_chunks(rng, n), n, "IOB2"))
        pred.append(_encode(_chunks(rng, n), n, "IOB2") if rng.random() < 0.5 else list(gold[-1]))
    assert not _meets_a_port_only_rule(port, gold) and not _meets_a_port_only_rule(port, pred)
    data = tmp_path / "gold.txt"
    data.write_text("".join("".join(f"w{i} {t}\n" for i, t in enumerate(tags)) + "\n" for tags in gold),
                    encoding="utf-8")

    class Tagger:
        def tag_like_gold(self, sentences, batch_size):
            assert [s.tags for s in sentences] == gold
            return pred

    monkeypatch.setattr(cli, "_load_tagger", lambda args: Tagger())
    out = tmp_path / "pred.txt"
    assert cli.main(["evaluate", str(tmp_path / "model"), str(data), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    lines = out.read_text(encoding="utf-8").splitlines()
    assert printed == port.report(_port_summary_of_lines(port, lines))
    assert printed == format_conlleval(conlleval(gold, pred)) + "\n"


def test_cli_evaluate_output_keeps_three_columns_for_tokens_with_spaces(port, tmp_path, monkeypatch, capsys):
    # A JSONL record's own token may hold a space ("New York"): written as is it made a 4-column
    # line, which conlleval.pl and the port refuse; as in `fastner tag`'s CoNLL output, `_`.
    import json

    from fastner import cli

    text = "New York\tfell"
    record = {"text": text, "tokens": [{"text": "New York", "start": 0, "end": 8}, {"text": "fell", "start": 9, "end": 13}],
              "spans": [{"start": 0, "end": 8, "label": "LOC"}]}
    data = tmp_path / "gold.jsonl"
    data.write_text(json.dumps(record) + "\n", encoding="utf-8")

    class Tagger:
        def tag_like_gold(self, sentences, batch_size):
            return [["B-LOC", "O"]]

    monkeypatch.setattr(cli, "_load_tagger", lambda args: Tagger())
    out = tmp_path / "pred.txt"
    assert cli.main(["evaluate", str(tmp_path / "model"), str(data), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines == ["New_York B-LOC B-LOC", "fell O O", ""]
    assert printed == port.report(_port_summary_of_lines(port, lines))
