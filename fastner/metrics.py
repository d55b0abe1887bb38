"""Chunk F1 exactly as the CoNLL `conlleval` script counts it, a strict variant, and token accuracy.

`conlleval` reads a chunk boundary from each pair of neighbouring tags (previous, current) with
fixed rules, whatever the scheme. This module applies the same rules to lists of tag sequences,
with a sentence boundary (tag O) after every sequence, so its counts equal the script's on the
same data. Its quirks are kept on purpose, because papers report them: `E-X B-X` and `S-X S-X`
do not split a chunk (the script knows no rule for them), while `B-X B-X` and `E-X E-X` do; and
the type "0" is no type (Perl's false string), so `S-0` after `O` opens no chunk.
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, Sequence, Tuple

import torch

from fastner.data.schemes import canonical_scheme, split_tag, strict_spans

__all__ = ["conlleval", "strict_f1", "token_accuracy", "format_conlleval", "chunk_counts"]


def _split_like_conlleval(tag: str) -> Tuple[str, str]:
    # the script splits at the first hyphen: "B-X-Y" -> ("B", "X-Y"); no hyphen -> (tag, "").
    # It then keeps a type with `$type ? $type : ""`, and "0" is false in Perl: the type "0" is none.
    prefix, sep, kind = tag.partition("-")
    return (prefix, "" if kind == "0" else kind) if sep else (tag, "")


def _end_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    end = (prev_tag, tag) in {
        ("B", "B"), ("B", "O"), ("I", "B"), ("I", "O"),
        ("E", "E"), ("E", "I"), ("E", "O"),
    }
    if prev_tag not in ("O", ".") and prev_type != type_:
        end = True
    if prev_tag in ("]", "["):
        end = True
    return end


def _start_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    start = (prev_tag, tag) in {
        ("B", "B"), ("I", "B"), ("O", "B"), ("O", "I"),
        ("E", "E"), ("E", "I"), ("O", "E"),
    }
    if tag not in ("O", ".") and prev_type != type_:
        start = True
    if tag in ("[", "]"):
        start = True
    return start


def chunk_counts(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict:
    """The script's raw counts: tokens, correct tags, and per type found/guessed/correct chunks."""
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} sentences but pred has {len(pred)}")
    found_correct: Counter = Counter()
    found_guessed: Counter = Counter()
    correct_chunks: Counter = Counter()
    tokens = correct_tags = 0
    last_c, last_ct, last_g, last_gt = "O", "", "O", ""
    in_correct = False

    def step(c: str, ct: str, g: str, gt: str) -> None:
        nonlocal in_correct, last_c, last_ct, last_g, last_gt
        end_c = _end_of_chunk(last_c, c, last_ct, ct)
        end_g = _end_of_chunk(last_g, g, last_gt, gt)
        if in_correct:
            if end_c and end_g and last_gt == last_ct:
                in_correct = False
                correct_chunks[last_ct] += 1
            elif end_c != end_g or gt != ct:
                in_correct = False
        start_c = _start_of_chunk(last_c, c, last_ct, ct)
        start_g = _start_of_chunk(last_g, g, last_gt, gt)
        if start_c and start_g and gt == ct:
            in_correct = True
        if start_c:
            found_correct[ct] += 1
        if start_g:
            found_guessed[gt] += 1
        last_c, last_ct, last_g, last_gt = c, ct, g, gt

    for number, (gold_tags, pred_tags) in enumerate(zip(gold, pred)):
        if len(gold_tags) != len(pred_tags):
            raise ValueError(
                f"sentence {number}: gold has {len(gold_tags)} tags but pred has {len(pred_tags)}"
            )
        for gold_tag, pred_tag in zip(gold_tags, pred_tags):
            c, ct = _split_like_conlleval(gold_tag)
            g, gt = _split_like_conlleval(pred_tag)
            step(c, ct, g, gt)
            tokens += 1
            if c == g and ct == gt:
                correct_tags += 1
        step("O", "", "O", "")  # the blank line after each sentence
    if in_correct:
        correct_chunks[last_ct] += 1
    return {
        "tokens": tokens,
        "correct_tags": correct_tags,
        "found_correct": found_correct,
        "found_guessed": found_guessed,
        "correct_chunks": correct_chunks,
    }


def _prf(correct: int, guessed: int, gold: int) -> Tuple[float, float, float]:
    precision = 100.0 * correct / guessed if guessed > 0 else 0.0
    recall = 100.0 * correct / gold if gold > 0 else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f1


def _report(found_correct: Counter, found_guessed: Counter, correct_chunks: Counter, tokens: int, correct_tags: int) -> dict:
    precision, recall, f1 = _prf(sum(correct_chunks.values()), sum(found_guessed.values()), sum(found_correct.values()))
    per_type: Dict[str, dict] = {}
    for kind in sorted(set(found_correct) | set(found_guessed)):
        p, r, f = _prf(correct_chunks[kind], found_guessed[kind], found_correct[kind])
        per_type[kind] = {
            "precision": p, "recall": r, "f1": f,
            "gold": found_correct[kind], "found": found_guessed[kind], "correct": correct_chunks[kind],
        }
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": 100.0 * correct_tags / tokens if tokens else 0.0,
        "tokens": tokens,
        "gold": sum(found_correct.values()),
        "found": sum(found_guessed.values()),
        "correct": sum(correct_chunks.values()),
        "per_type": per_type,
    }


def conlleval(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict:
    """Micro precision/recall/F1 in percent, token accuracy, and `per_type`, as conlleval counts.

    gold, pred: one tag sequence per sentence, in IOB1, IOB2 or BIOES (the script's rules, see
    the module doc). Returns {'precision', 'recall', 'f1', 'accuracy', 'tokens', 'gold', 'found',
    'correct', 'per_type': {type: {'precision', 'recall', 'f1', 'gold', 'found', 'correct'}}}.
    """
    counts = chunk_counts(gold, pred)
    return _report(counts["found_correct"], counts["found_guessed"], counts["correct_chunks"], counts["tokens"], counts["correct_tags"])


def strict_f1(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]], scheme: str) -> dict:
    """Exact-span F1 over the chunks that are well formed in `scheme` (ill-formed ones are dropped).

    Unlike conlleval, `B-X E-X B-X E-X` in BIOES is two chunks and `I-X` opening a chunk in IOB2
    is no chunk at all. Same return layout as conlleval().
    """
    scheme = canonical_scheme(scheme)
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} sentences but pred has {len(pred)}")
    found_correct: Counter = Counter()
    found_guessed: Counter = Counter()
    correct_chunks: Counter = Counter()
    tokens = correct_tags = 0
    for number, (gold_tags, pred_tags) in enumerate(zip(gold, pred)):
        if len(gold_tags) != len(pred_tags):
            raise ValueError(f"sentence {number}: gold has {len(gold_tags)} tags but pred has {len(pred_tags)}")
        gold_spans = set(strict_spans(gold_tags, scheme))
        pred_spans = set(strict_spans(pred_tags, scheme))
        found_correct.update(kind for _, _, kind in gold_spans)
        found_guessed.update(kind for _, _, kind in pred_spans)
        correct_chunks.update(kind for _, _, kind in gold_spans & pred_spans)
        tokens += len(gold_tags)
        correct_tags += sum(split_tag(a) == split_tag(b) for a, b in zip(gold_tags, pred_tags))
    return _report(found_correct, found_guessed, correct_chunks, tokens, correct_tags)


def token_accuracy(pred: torch.Tensor, gold: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of real tokens tagged right. pred, gold: [B, T] ids; mask: [B, T] bool (True = real)."""
    if pred.shape != gold.shape or mask.shape != gold.shape:
        raise ValueError(f"pred {tuple(pred.shape)}, gold {tuple(gold.shape)} and mask {tuple(mask.shape)} must have one shape")
    mask = mask.bool()
    total = int(mask.sum())
    if total == 0:
        return 0.0
    return float(((pred == gold) & mask).sum()) / total


def format_conlleval(result: dict) -> str:
    """The script's report: an overall block and one line per type (with its found count)."""
    lines = [
        f"processed {result['tokens']} tokens with {result['gold']} phrases; "
        f"found: {result['found']} phrases; correct: {result['correct']}."
    ]
    if result["tokens"] > 0:
        lines.append(
            f"accuracy: {result['accuracy']:6.2f}%; precision: {result['precision']:6.2f}%; "
            f"recall: {result['recall']:6.2f}%; FB1: {result['f1']:6.2f}"
        )
    for kind, row in result["per_type"].items():
        # the script's printf "%17s" pads the UTF-8 bytes it read, not characters (surrogatepass:
        # a lone surrogate, which only the Python API lets in, counts as UTF-8 would write it)
        pad = " " * (17 - len(kind.encode("utf-8", "surrogatepass")))
        line = (f"{pad}{kind}: precision: {row['precision']:6.2f}%; recall: {row['recall']:6.2f}%; "
                f"FB1: {row['f1']:6.2f}  {row['found']}")
        # the script's loop that drops repeated type names tests `not($lastType)`, true for "": it
        # prints the untyped row once for the gold chunks and once more for the guessed ones
        lines += [line] * (2 if kind == "" and row["gold"] and row["found"] else 1)
    return "\n".join(lines)
