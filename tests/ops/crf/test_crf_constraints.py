"""Tagging-scheme constraints: fastner.nn.allowed_transitions and CRF(..., constraints=...).

The legality rules below are written from the schemes' definitions, independently of
allowed_transitions, and every decode (Viterbi and k-best, fused and reference) is checked
against them: the start, each transition and the end.
"""
from __future__ import annotations

import random

import pytest
import torch

import fastner.nn
from tests import testing
from tests.ops.crf.test_crf_bruteforce import Enumerated

BACKENDS = ("fused", "reference")
ENTITY_TYPES = ("PER", "LOC")
SCHEMES = ("IOB1", "BIO", "IOB2", "BIOES", "BIOUL")


def scheme_labels(scheme):
    prefixes = {"IOB1": "BI", "BIO": "BI", "IOB2": "BI", "BIOES": "BIES", "BIOUL": "BILU"}[scheme]
    return ["O"] + [f"{p}-{e}" for e in ENTITY_TYPES for p in prefixes]


def shuffled_labels(scheme, seed):
    # a fixed label order would hide index mix-ups in the table
    labels = scheme_labels(scheme)
    random.Random(seed).shuffle(labels)
    return labels


def _split(label):
    if label == "O":
        return "O", None
    prefix, entity = label.split("-", 1)
    return {"U": "S", "L": "E"}.get(prefix, prefix), entity  # BIOUL is BIOES renamed


def legal(scheme, prev, nxt):
    """Whether label `prev` may be followed by `nxt`; prev None = sequence start, nxt None = end."""
    scheme = {"IOB2": "BIO", "BIOUL": "BIOES"}.get(scheme, scheme)
    p, pe = _split(prev) if prev is not None else ("START", None)
    n, ne = _split(nxt) if nxt is not None else ("END", None)
    if scheme == "IOB1":
        # B-x only separates two adjacent chunks of type x; everything else may follow anything
        if n == "B":
            return p in ("B", "I") and pe == ne
        return True
    if scheme == "BIO":
        if n == "I":
            return p in ("B", "I") and pe == ne
        return True
    assert scheme == "BIOES"
    inside = p in ("B", "I")  # a chunk is open and must go on (I-x) or close (E-x)
    if inside:
        return n in ("I", "E") and pe == ne
    return n in ("O", "B", "S", "END")


def path_is_legal(scheme, labels, path):
    named = [None] + [labels[t] for t in path] + [None]
    if len(path) == 0:
        return True
    return all(legal(scheme, a, b) for a, b in zip(named[:-1], named[1:]))


def random_legal_path(scheme, labels, length, rng):
    """A random legal tag path: a walk over allowed transitions that can always end legally."""
    path, prev = [], None
    for t in range(length):
        options = [i for i, lab in enumerate(labels) if legal(scheme, prev, lab)]
        if t == length - 1:
            options = [i for i in options if legal(scheme, labels[i], None)]
        choice = rng.choice(options)
        path.append(choice)
        prev = labels[choice]
    return path


def constrained_crf(scheme, labels, batch_first=True, dtype=torch.float64, scale=1.0):
    crf = fastner.nn.CRF(len(labels), batch_first=batch_first, constraints=fastner.nn.allowed_transitions(scheme, labels))
    with torch.no_grad():
        for p in crf.parameters():
            p.normal_(0.0, scale)
    return crf.to(dtype)


# ---------------------------------------------------------------------------------------------
# decodes never violate the constraints
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_first"])
def test_decodes_never_violate_constraints(scheme, batch_first):
    labels = shuffled_labels(scheme, seed=SCHEMES.index(scheme))
    num_tags = len(labels)
    batch, steps = 48, 25
    crf = constrained_crf(scheme, labels, batch_first, dtype=torch.float32, scale=2.0)
    # large emissions pull towards illegal paths that only the constraints forbid
    emissions = testing.to_layout(torch.randn(batch, steps, num_tags) * 4.0, batch_first)
    lengths = testing.random_lengths(batch, steps, min_len=1)
    mask = testing.mask_from_lengths(lengths, steps, batch_first)
    for name in BACKENDS:
        with testing.backend(name):
            paths = crf.decode(emissions, mask=mask)
            assert [len(p) for p in paths] == lengths.tolist(), name
            for b, path in enumerate(paths):
                assert path_is_legal(scheme, labels, path), f"{name}: illegal decode {[labels[t] for t in path]}"
            ktags, kscores = crf.viterbi(emissions, mask=mask, k=4)
            for b in range(batch):
                n = int(lengths[b])
                for r in range(4):
                    if torch.isfinite(kscores[b, r]):
                        path = ktags[b, r, :n].tolist()
                        assert path_is_legal(scheme, labels, path), f"{name}: illegal k-best path {[labels[t] for t in path]}"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_constrained_nll_is_finite_and_illegal_gold_has_no_mass(scheme):
    labels = shuffled_labels(scheme, seed=7)
    num_tags = len(labels)
    batch, steps = 16, 12
    rng = random.Random(3)
    crf = constrained_crf(scheme, labels, dtype=torch.float32)
    lengths = testing.random_lengths(batch, steps, min_len=1)
    mask = testing.mask_from_lengths(lengths, steps)
    tags = torch.zeros(batch, steps, dtype=torch.int64)
    for b in range(batch):
        tags[b, : int(lengths[b])] = torch.tensor(random_legal_path(scheme, labels, int(lengths[b]), rng))
    emissions = torch.randn(batch, steps, num_tags) * 3.0
    # an illegal first tag: a continuation label at the start of the sequence
    continuation = next(i for i, lab in enumerate(labels) if lab.startswith(("I-" if scheme in ("BIO", "IOB2", "BIOES", "BIOUL") else "B-")))
    bad_tags = tags.clone()
    bad_tags[:, 0] = continuation
    for name in BACKENDS:
        with testing.backend(name):
            em = emissions.clone().requires_grad_(True)
            crf.zero_grad(set_to_none=True)
            llh = crf(em, tags, mask=mask, reduction="none")
            assert torch.isfinite(llh).all() and (llh <= 1e-5).all(), f"{name}: {llh}"
            llh.sum().backward()
            for g in (em.grad, crf.transitions.grad, crf.start_transitions.grad, crf.end_transitions.grad):
                assert torch.isfinite(g).all(), name
            # forbidden transitions carry no probability and no gold path: their gradient is 0
            forbidden = torch.tensor([[not legal(scheme, a, b) for b in labels] for a in labels])
            assert torch.equal(crf.transitions.grad[forbidden], torch.zeros(int(forbidden.sum()))), name
            bad_start = torch.tensor([not legal(scheme, None, a) for a in labels])
            assert torch.equal(crf.start_transitions.grad[bad_start], torch.zeros(int(bad_start.sum()))), name
            bad = crf(emissions, bad_tags, mask=mask, reduction="none")
            # an illegal gold path has probability 0 (log-likelihood -inf, or hugely negative
            # if the constraints are a large finite penalty)
            assert (bad < -1e3).all(), f"{name}: {bad}"
            marginals = crf.marginals(emissions, mask=mask)
            assert torch.all(marginals[:, 0, continuation] < 1e-6), name


@pytest.mark.parametrize("scheme", ["IOB1", "BIO", "BIOES"])
def test_constrained_crf_matches_enumeration_over_legal_paths(scheme):
    labels = shuffled_labels(scheme, seed=11)
    if scheme == "BIOES":  # 9 tags: keep paths short
        batch, steps = 4, 3
    else:
        batch, steps = 4, 4
    num_tags = len(labels)
    crf = constrained_crf(scheme, labels)
    emissions = torch.randn(batch, steps, num_tags, dtype=torch.float64) * 2.0
    lengths = torch.tensor([steps, 1, steps - 1, 2])
    mask = testing.mask_from_lengths(lengths, steps)
    is_legal = lambda path: path_is_legal(scheme, labels, path)  # noqa: E731
    enum = [Enumerated(crf, emissions[b], int(lengths[b]), legal=is_legal) for b in range(batch)]
    expected_log_z = torch.stack([e.log_z() for e in enum])
    expected_marginals = torch.stack([e.marginals(steps) for e in enum])
    k = 3
    for name in BACKENDS:
        with testing.backend(name):
            torch.testing.assert_close(crf.log_partition(emissions, mask=mask), expected_log_z, msg=name)
            torch.testing.assert_close(crf.marginals(emissions, mask=mask), expected_marginals, msg=name)
            paths = crf.decode(emissions, mask=mask)
            assert paths == [e.best()[0] for e in enum], name
            ktags, kscores = crf.viterbi(emissions, mask=mask, k=k)
            for b, e in enumerate(enum):
                top_paths, top_scores = e.top(k)
                n = len(top_scores)
                torch.testing.assert_close(kscores[b, :n], top_scores, msg=name)
                assert torch.equal(ktags[b, :n, : e.length], top_paths), name


# ---------------------------------------------------------------------------------------------
# allowed_transitions itself
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_allowed_transitions_agrees_with_the_scheme_rules(scheme):
    # Through the CRF: a transition is allowed iff some decode may use it; probe each (i, j),
    # the start and the end by making that choice hugely attractive.
    labels = shuffled_labels(scheme, seed=5)
    num_tags = len(labels)
    crf = fastner.nn.CRF(num_tags, batch_first=True, constraints=fastner.nn.allowed_transitions(scheme, labels)).double()
    with torch.no_grad():
        for p in crf.parameters():
            p.zero_()
    big = 1e3
    for i, a in enumerate(labels):
        for j, b in enumerate(labels):
            em = torch.zeros(1, 2, num_tags, dtype=torch.float64)
            em[0, 0, i] = em[0, 1, j] = big
            path = crf.decode(em)[0]
            # an allowed pair (with some legal start and end around it) is decoded as is
            expected = legal(scheme, a, b) and legal(scheme, None, a) and legal(scheme, b, None)
            if expected:
                assert path == [i, j], f"{a} -> {b} should be allowed, decoded {[labels[t] for t in path]}"
            elif not legal(scheme, a, b):
                assert path != [i, j], f"{a} -> {b} should be forbidden"
        em = torch.zeros(1, 1, num_tags, dtype=torch.float64)
        em[0, 0, i] = big
        path = crf.decode(em)[0]
        assert (path == [i]) == (legal(scheme, None, a) and legal(scheme, a, None)), f"start/end with {a}"


def test_allowed_transitions_bio_table_by_hand():
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    crf = fastner.nn.CRF(5, batch_first=True, constraints=fastner.nn.allowed_transitions("BIO", labels)).double()
    with torch.no_grad():
        for p in crf.parameters():
            p.zero_()
    # I-PER may not start a sequence, nor follow O, B-LOC or I-LOC; everything else is free
    for seq, ok in [
        (["O", "I-PER"], False),
        (["I-PER"], False),
        (["B-LOC", "I-PER"], False),
        (["I-LOC", "I-PER"], False),
        (["B-PER", "I-PER"], True),
        (["B-PER", "I-PER", "I-PER", "O", "B-LOC"], True),
        (["B-PER", "B-PER"], True),
        (["B-PER"], True),
        (["O", "B-LOC", "I-LOC"], True),
    ]:
        idx = [labels.index(s) for s in seq]
        em = torch.full((1, len(seq), 5), -50.0, dtype=torch.float64)
        em[0, torch.arange(len(seq)), idx] = 50.0
        assert (crf.decode(em)[0] == idx) == ok, seq


def test_allowed_transitions_iob1_and_bioes_tables_by_hand():
    iob1 = ["O", "I-PER", "B-PER", "I-LOC"]
    bioes = ["O", "B-PER", "I-PER", "E-PER", "S-PER", "S-LOC"]
    cases = {
        ("IOB1", tuple(iob1)): [
            (["I-PER"], True),
            (["B-PER"], False),  # B- only after a chunk of the same type
            (["O", "B-PER"], False),
            (["I-LOC", "B-PER"], False),
            (["I-PER", "B-PER"], True),
            (["I-PER", "I-LOC", "O", "I-PER"], True),
        ],
        ("BIOES", tuple(bioes)): [
            (["S-PER"], True),
            (["B-PER"], False),  # an open chunk may not end the sequence
            (["I-PER"], False),
            (["E-PER"], False),
            (["B-PER", "E-PER"], True),
            (["B-PER", "I-PER", "I-PER", "E-PER", "S-LOC"], True),
            (["B-PER", "O"], False),
            (["B-PER", "S-LOC"], False),
            (["E-PER", "B-PER"], False),
            (["O", "I-PER", "E-PER"], False),
            (["S-PER", "S-LOC", "O"], True),
        ],
    }
    for (scheme, labels), seqs in cases.items():
        labels = list(labels)
        crf = fastner.nn.CRF(len(labels), batch_first=True, constraints=fastner.nn.allowed_transitions(scheme, labels)).double()
        with torch.no_grad():
            for p in crf.parameters():
                p.zero_()
        for seq, ok in seqs:
            idx = [labels.index(s) for s in seq]
            em = torch.full((1, len(seq), len(labels)), -50.0, dtype=torch.float64)
            em[0, torch.arange(len(seq)), idx] = 50.0
            assert (crf.decode(em)[0] == idx) == ok, (scheme, seq)
            assert path_is_legal(scheme, labels, idx) == ok, (scheme, seq)  # the rules above agree


def test_allowed_transitions_rejects_unknown_scheme_and_labels():
    with pytest.raises(ValueError, match="scheme"):
        fastner.nn.allowed_transitions("XYZ", ["O", "B-PER"])
    with pytest.raises(ValueError):
        fastner.nn.allowed_transitions("BIO", ["O", "Q-PER"])
    for keys in ({0: "O", "a": "B-PER"}, {0: "O", 1.0: "B-PER"}):  # was a TypeError from sorted()
        with pytest.raises(ValueError, match="keys"):
            fastner.nn.allowed_transitions("BIO", keys)


@pytest.mark.parametrize("labels", [
    {"O", "B-PER", "I-PER"}, frozenset({"O", "B-PER"}), "OBI", None, ["O", 1], {0: "O", 1: None},
], ids=["set", "frozenset", "string", "none", "int_label", "none_label"])
def test_allowed_transitions_refuses_labels_without_an_index_order_or_not_strings(labels):
    # A set has no order: its labels got whatever indices iteration gave them (constraints
    # silently against the wrong tags). A string was read as one-letter labels; an int label
    # failed with AttributeError.
    with pytest.raises(TypeError, match="label"):
        fastner.nn.allowed_transitions("BIO", labels)


def test_allowed_transitions_pairs_by_hand():
    # (from, to) index pairs; with K labels, K is the start and K + 1 the end
    bio = fastner.nn.allowed_transitions("BIO", ["O", "B-PER", "I-PER"])
    S, E = 3, 4
    assert set(bio) == {
        (S, 0), (S, 1),
        (0, 0), (0, 1), (0, E),
        (1, 0), (1, 1), (1, 2), (1, E),
        (2, 0), (2, 1), (2, 2), (2, E),
    }
    assert set(fastner.nn.allowed_transitions("IOB2", ["O", "B-PER", "I-PER"])) == set(bio)
    assert set(fastner.nn.allowed_transitions("bio", {0: "O", 1: "B-PER", 2: "I-PER"})) == set(bio)
    iob1 = fastner.nn.allowed_transitions("IOB1", ["O", "I-PER", "B-PER"])
    assert set(iob1) == {
        (S, 0), (S, 1),
        (0, 0), (0, 1), (0, E),
        (1, 0), (1, 1), (1, 2), (1, E),
        (2, 0), (2, 1), (2, 2), (2, E),
    }
    S, E = 5, 6
    expected_bioes = {
        (S, 0), (S, 1), (S, 4),
        (0, 0), (0, 1), (0, 4), (0, E),
        (1, 2), (1, 3),
        (2, 2), (2, 3),
        (3, 0), (3, 1), (3, 4), (3, E),
        (4, 0), (4, 1), (4, 4), (4, E),
    }
    assert set(fastner.nn.allowed_transitions("BIOES", ["O", "B-X", "I-X", "E-X", "S-X"])) == expected_bioes
    assert set(fastner.nn.allowed_transitions("BIOUL", ["O", "B-X", "I-X", "L-X", "U-X"])) == expected_bioes


def test_constraints_as_a_bool_tensor_match_pairs():
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    pairs = fastner.nn.allowed_transitions("BIO", labels)
    table = torch.zeros(len(labels) + 2, len(labels) + 2, dtype=torch.bool)
    for i, j in pairs:
        table[i, j] = True
    from_pairs = constrained_crf("BIO", labels)
    from_table = fastner.nn.CRF(len(labels), batch_first=True, constraints=table).double()
    from_table.load_state_dict(from_pairs.state_dict())
    emissions = torch.randn(4, 6, len(labels), dtype=torch.float64) * 3
    tags = torch.zeros(4, 6, dtype=torch.int64)  # all O: legal
    for name in BACKENDS:
        with testing.backend(name):
            assert from_table.decode(emissions) == from_pairs.decode(emissions), name
            torch.testing.assert_close(from_table(emissions, tags, reduction="none"), from_pairs(emissions, tags, reduction="none"))
