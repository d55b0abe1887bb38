"""Sentence analysis shared by fastner.Tagger and the exported runtime (fastner.export): batch
encoded sentences, run the model's one inference computation (SequenceTagger.infer, or the
exported program that traces it), and turn its tags, log partitions and emissions into tags,
entity spans with their exact posterior probabilities and, when asked, k-best analyses.

Light on imports: no model or training code, so the exported runtime can use it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from fastner.data.batching import TokenEncoder, encode_with, make_batch
from fastner.data.conll import Sentence
from fastner.data.schemes import tags_to_spans
from fastner.predictions import check_batch_size
from fastner.span_scores import kbest, relative_to_path, span_log_probabilities

# (words [B, T], chars [B, T, C], lengths [B]) -> (tags [B, T], log_z [B], emissions [B, T, K])
# Sentences encoded and length-sorted together: batch_size * GROUP_BATCHES.
GROUP_BATCHES = 32

InferFn = Callable[[Tensor, Tensor, Tensor], Tuple[Tensor, Tensor, Tensor]]


@dataclass
class SentenceAnalysis:
    tags: List[str]  # the model's scheme
    spans: List[Tuple[int, int, str, float]]  # (start, end exclusive, label, probability)
    nbest: List[Tuple[float, List[str]]] = field(default_factory=list)  # (probability, tags), best first


# k-best search grows faster than linearly in k (measured on a 40-token sentence: k=1000 0.7 s,
# k=5000 12 s; k=100000 ran for minutes on 4 tokens, and k beyond int64 crashed in the kernel)
MAX_NBEST = 1000


def check_options(batch_size: int, nbest: Optional[int]) -> None:
    check_batch_size(batch_size)
    if nbest is not None and (isinstance(nbest, bool) or not isinstance(nbest, int) or not 1 <= nbest <= MAX_NBEST):
        raise ValueError(f"nbest must be None or an int in [1, {MAX_NBEST}], got {nbest!r}")


class Analyser:
    """Tags sentences (token lists) with an InferFn and the vocabularies it was trained with."""

    def __init__(self, infer: InferFn, words, chars, tags, digits_to_zero: bool,
                 transition_scores: Tuple[Tensor, Tensor, Tensor], device: torch.device,
                 fixed_length: Optional[int] = None, pretrained: Optional[Dict[str, int]] = None,
                 max_length: Optional[int] = None, max_batch: Optional[int] = None):
        """pretrained: word -> row of the model's frozen pretrained table (fastner.data.vocab.word_lookup).
        max_length, max_batch: the bounds of an exported program's dynamic shapes (its guards
        fail with a bare AssertionError past them): longer sentences are refused, larger
        batches split."""
        self.infer = infer
        self.words, self.chars, self.tags = words, chars, tags
        self.tag_ids: Dict[str, int] = {t: i for i, t in enumerate(tags.itos)}
        # the word / char lookups (digits_to_zero, pretrained), remembering tokens across calls
        self.encoder = TokenEncoder(words, chars, digits_to_zero, pretrained)
        self.scores = tuple(t.to(device) for t in transition_scores)
        self.device = device
        self.fixed_length = fixed_length  # an export on the reference path takes one padded length
        self.max_length = max_length
        self.max_batch = max_batch

    def analyse(self, sentences: Sequence[List[str]], batch_size: int = 64,
                nbest: Optional[int] = None, scores: bool = True) -> List[SentenceAnalysis]:
        """One SentenceAnalysis per sentence, in order; sentences are batched by length.
        scores=False: tags only (span probabilities 0, no forward passes for them)."""
        check_options(batch_size, nbest)
        if self.max_batch is not None:
            batch_size = min(batch_size, self.max_batch)
        limit = self.fixed_length if self.fixed_length is not None else self.max_length
        if limit is not None:
            for number, sentence in enumerate(sentences):
                if len(sentence) > limit:
                    fix = ("export again with a larger --max-length" if self.fixed_length is not None
                           else "split it into shorter sentences")
                    raise ValueError(f"sentence {number} has {len(sentence)} tokens; this export takes at most "
                                     f"{limit} ({fix})")
        results: List[SentenceAnalysis] = []
        # encoded in groups: a 10 MB document's 100k sentences never sit encoded all at once
        group = batch_size * GROUP_BATCHES
        for begin in range(0, len(sentences), group):
            results.extend(self._analyse_group(sentences[begin : begin + group], batch_size, nbest, scores))
        return results

    def _analyse_group(self, sentences: Sequence[List[str]], batch_size: int, nbest: Optional[int],
                       scores: bool) -> List[SentenceAnalysis]:
        results: List[SentenceAnalysis] = [SentenceAnalysis([], [], [(1.0, [])] if nbest else [])
                                           for _ in sentences]
        order = sorted((i for i, s in enumerate(sentences) if s), key=lambda i: len(sentences[i]))
        encoded = encode_with(self.encoder, [Sentence(list(s)) for s in sentences])
        itos = self.tags.itos
        for begin in range(0, len(order), batch_size):
            index = order[begin : begin + batch_size]
            batch = make_batch(encoded, index, self.words.pad_id, self.chars.pad_id)
            words, chars = batch.words, batch.chars
            if self.fixed_length is not None and words.shape[1] < self.fixed_length:
                pad = self.fixed_length - words.shape[1]
                words = torch.nn.functional.pad(words, (0, pad), value=self.words.pad_id)
                chars = torch.nn.functional.pad(chars, (0, 0, 0, pad), value=self.chars.pad_id)
            lengths = batch.lengths.to(self.device)
            with torch.no_grad():
                # (the program's log Z goes unused: the span and k-best scores need their own)
                tags, _, emissions = self.infer(words.to(self.device), chars.to(self.device), lengths)
            tag_rows = tags.cpu().tolist()
            decoded = []
            requests = []
            for row, sentence_index in enumerate(index):
                names = [itos[t] for t in tag_rows[row][: len(sentences[sentence_index])]]
                spans = tags_to_spans(names)
                decoded.append((names, spans))
                requests.extend((row, s, e, label) for s, e, label in spans)
            log_probs = iter(span_log_probabilities(emissions, lengths, self.scores, requests, self.tag_ids)
                             if scores else [float("-inf")] * len(requests))
            if nbest:
                shifted, shifted_log_z = relative_to_path(emissions, tags, lengths, self.scores)
                paths, probabilities = kbest(shifted, lengths, shifted_log_z, self.scores, nbest)
            for row, sentence_index in enumerate(index):
                names, spans = decoded[row]
                scored = [(s, e, label, round(math.exp(next(log_probs)), 6)) for s, e, label in spans]
                alternatives = ([(round(p, 6), [itos[t] for t in path]) for p, path in zip(probabilities[row], paths[row])]
                                if nbest else [])
                results[sentence_index] = SentenceAnalysis(names, scored, alternatives)
        return results
