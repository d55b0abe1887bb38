"""conlleval counts on crafted cases. Every expected count below is derived by hand from the
script's chunk start/end rules (see fastner/metrics.py), token by token."""
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
