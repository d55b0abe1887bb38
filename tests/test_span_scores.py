"""fastner.span_scores against brute-force enumeration of every tag path."""
import itertools
import math

import pytest
import torch

from fastner import nn as fnn
from fastner.data.schemes import tags_to_spans
from fastner.span_scores import kbest, span_alternatives, span_log_probabilities

TAG_SETS = {
    "BIOES": ["O", "B-X", "I-X", "E-X", "S-X", "S-Y"],
    "IOB2": ["O", "B-X", "I-X", "B-Y", "I-Y"],
    "IOB1": ["O", "I-X", "B-X", "I-Y"],
}


def brute_force(emissions, transitions, start, end, tags):
    """{span: probability} and [(probability, path)] by enumerating every path."""
    T, K = emissions.shape
    weights = {}
    for path in itertools.product(range(K), repeat=T):
        score = start[path[0]] + emissions[0, path[0]] + end[path[-1]]
        for t in range(1, T):
            score = score + transitions[path[t - 1], path[t]] + emissions[t, path[t]]
        weights[path] = float(score)
    finite = [w for w in weights.values() if w != float("-inf")]
    log_z = max(finite) + math.log(sum(math.exp(w - max(finite)) for w in finite))
    spans = {}
    for path, weight in weights.items():
        p = math.exp(weight - log_z) if weight != float("-inf") else 0.0
        for span in tags_to_spans([tags[i] for i in path]):
            spans[span] = spans.get(span, 0.0) + p
    paths = sorted(((math.exp(w - log_z), p) for p, w in weights.items() if w != float("-inf")), reverse=True)
    return spans, paths, log_z


@pytest.mark.parametrize("scheme", sorted(TAG_SETS))
@pytest.mark.parametrize("constrained", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_span_probabilities_match_enumeration(scheme, constrained, seed):
    tags = TAG_SETS[scheme]
    K, T = len(tags), 4
    generator = torch.Generator().manual_seed(seed)
    crf = fnn.CRF(K, batch_first=True,
                  constraints=fnn.allowed_transitions(scheme, tags) if constrained else None).double()
    with torch.no_grad():
        for p in crf.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64))
    emissions = torch.randn(1, T, K, generator=generator, dtype=torch.float64) * 1.5
    scores = tuple(t.detach() for t in crf._scores(emissions))
    expected, paths, log_z_brute = brute_force(emissions[0], *scores, tags)
    lengths = torch.tensor([T])
    log_z = crf.log_partition(emissions)
    assert log_z.item() == pytest.approx(log_z_brute, abs=1e-9)
    requests = [(0, s, e, label) for (s, e, label) in expected]
    got = span_log_probabilities(emissions, lengths, scores, requests, {t: i for i, t in enumerate(tags)})
    for (_, s, e, label), log_p in zip(requests, got):
        assert math.exp(log_p) == pytest.approx(expected[(s, e, label)], abs=1e-9), (s, e, label)
    # a span that no path decodes to has probability 0
    never = span_log_probabilities(emissions, lengths, scores, [(0, 0, 1, "Z")], {t: i for i, t in enumerate(tags)})
    assert never == [float("-inf")]
    k_paths, k_probs = kbest(emissions, lengths, log_z, scores, 5)
    assert k_probs[0] == pytest.approx([p for p, _ in paths[:5]], abs=1e-9)
    assert [tuple(p) for p in k_paths[0]] == [path for _, path in paths[:5]]


def test_span_probabilities_float32_padded_batch():
    tags = TAG_SETS["BIOES"]
    crf = fnn.CRF(len(tags), batch_first=True, constraints=fnn.allowed_transitions("BIOES", tags))
    emissions = torch.randn(3, 6, len(tags))
    lengths = torch.tensor([6, 2, 4])
    mask = torch.arange(6)[None] < lengths[:, None]
    best, _ = crf.viterbi(emissions, mask)
    ids = {t: i for i, t in enumerate(tags)}
    requests = []
    for row in range(3):
        for s, e, label in tags_to_spans([tags[i] for i in best[row, : lengths[row]].tolist()]):
            requests.append((row, s, e, label))
    for (row, s, e, label), log_p in zip(requests, span_log_probabilities(emissions, lengths, crf._scores(emissions), requests, ids)):
        n = int(lengths[row])
        exact = span_log_probabilities(emissions[row : row + 1, :n].double(), lengths[row : row + 1],
                                       crf.double()._scores(emissions.double()), [(0, s, e, label)], ids)[0]
        crf.float()
        assert log_p == pytest.approx(exact, abs=1e-9)  # both in float64, the same float32 inputs
        assert log_p <= 0.0


def test_span_alternatives_reject_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        span_alternatives({"O": 0}, 2, 5, "X", 4)
