"""Where the server's model call spends its time: one document vs a batch of documents.

    python -m benchmarks.serve_profile MODEL --documents ../shared/data/conll2003/eng.testa [--batch 16,64]

Runs the stages of fastner.serve.model.predict_documents one by one on the same documents the
load test sends (detokenized CoNLL sentences), each stage timed with the calling thread's CPU
clock (time.thread_time_ns: steadier than wall time on a shared machine), in rounds that
interleave batch 1 and the batch sizes asked for, so all see the same contention. Checks that the staged
pipeline returns exactly what predict_documents returns. Prints per-document ms by stage.

--lstm: the model's fused BiLSTM against torch.nn.LSTM of the same sizes on the same packed
batches (random inputs, CoNLL-like lengths), microseconds of thread CPU per token: whether the
BiLSTM's share at batch 16 is the kernel's fault or the work itself.

--overlap: whether tokenizing on another thread (the event loop's thread pool) would run beside
the model worker on the second core: the same batches' model work (pre-tokenized) on one thread
and their tokenization on another, wall time sequential vs concurrent. Both are Python holding
the GIL most of the time, so "concurrent" is only faster by the share of the model work that
runs in torch ops with the GIL released.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import sys
import time
from typing import Dict, List

import torch


def staged(tagger, texts: List[str], clock: Dict[str, float]) -> List[dict]:
    """predict_documents(tagger, texts), stage by stage, adding each stage's thread CPU ns to `clock`."""
    from fastner.data.batching import encode_sentences, make_batch
    from fastner.data.conll import Sentence
    from fastner.data.schemes import tags_to_spans
    from fastner.documents import _bounded, document_result
    from fastner.serve.model import SENTENCES_PER_CALL, _analyser
    from fastner.span_scores import span_log_probabilities
    from fastner.inference import SentenceAnalysis
    from fastner.text import tokenizer as tk
    from fastner import ops
    import math

    def tick(name, since):
        now = time.thread_time_ns()
        clock[name] = clock.get(name, 0) + now - since
        return now

    t = time.thread_time_ns()
    analyser = _analyser(tagger)
    t = tick("analyser (built once per tagger)", t)
    tokenized = []
    for text in texts:
        work = tk.working_copy(text)
        ranges = list(tk._sentence_ranges(work))
        t = tick("tokenize: sentence split (syntok)", t)
        sentences = []
        for start, end in ranges:
            spans = tk._conll_fixes(work, tk._word_spans(work, start, end))
            if spans:
                sentences.append([(text[a:b], a, b) for a, b in spans])
        tokenized.append(_bounded(sentences))
        t = tick("tokenize: words (nltk + fixes)", t)
    flat = [[token for token, _, _ in s] for ss in tokenized for s in ss]
    order = sorted((i for i, s in enumerate(flat) if s), key=lambda i: len(flat[i]))
    encoded = encode_sentences([Sentence(list(s)) for s in flat], analyser.words, analyser.chars,
                               digits_to_zero=analyser.digits_to_zero, pretrained=analyser.pretrained)
    t = tick("encode: word/char lookup", t)
    results = [None] * len(flat)
    model = tagger.model
    itos = analyser.tags.itos
    for begin in range(0, len(order), SENTENCES_PER_CALL):
        index = order[begin:begin + SENTENCES_PER_CALL]
        batch = make_batch(encoded, index, analyser.words.pad_id, analyser.chars.pad_id)
        words, chars, lengths = batch.words, batch.chars, batch.lengths
        t = tick("encode: pad to tensors", t)
        with torch.no_grad():
            mask = torch.arange(words.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
            x = model.embed_words(words)
            t = tick("model: word embedding", t)
            x = torch.cat([x, model.char_cnn(chars, mask)], dim=-1)
            t = tick("model: char CNN", t)
            x, _ = model.encoder(x, lengths=lengths)
            t = tick("model: BiLSTM", t)
            emissions = model.output(x).float() * mask.unsqueeze(-1)
            t = tick("model: output layer", t)
            scores = model.transition_scores(emissions.dtype)
            tags, _ = ops.crf_viterbi(emissions, lengths, *scores)
            log_z, _ = ops.crf_forward(emissions, None, lengths, *scores)
            t = tick("CRF: Viterbi + log Z", t)
        tag_rows = tags.tolist()
        decoded, requests = [], []
        for row, si in enumerate(index):
            names = [itos[v] for v in tag_rows[row][:len(flat[si])]]
            spans = tags_to_spans(names)
            decoded.append((names, spans))
            requests.extend((row, s, e, label) for s, e, label in spans)
        t = tick("spans: tags -> spans", t)
        log_probs = iter(span_log_probabilities(emissions, lengths, log_z, analyser.scores, requests, analyser.tag_ids))
        for row, si in enumerate(index):
            names, spans = decoded[row]
            results[si] = SentenceAnalysis(names, [(s, e, label, round(math.exp(next(log_probs)), 6))
                                                   for s, e, label in spans], [])
        t = tick("spans: posterior probabilities", t)
    analyses = iter(results)
    out = []
    for text, sentences in zip(texts, tokenized):
        result = document_result(text, sentences, list(itertools.islice(analyses, len(sentences))),
                                 tagger.output_scheme, None)
        out.append({"entities": result["entities"]})
    t = tick("records: document results", t)
    json.dumps({"documents": out}).encode("ascii")
    tick("JSON answer", t)
    return out


def overlap(tagger, documents: List[str], batch: int, batches: int = 60) -> dict:
    """Wall seconds: model work alone, tokenizing alone, both one after the other on one
    thread, and both at once on two threads (see the module doc)."""
    import threading

    from fastner.documents import _bounded
    from fastner.serve.model import SENTENCES_PER_CALL, _analyser
    from fastner.text import tokenize

    rng = random.Random(1)
    groups = [[documents[rng.randrange(len(documents))] for _ in range(batch)] for _ in range(batches)]
    tokenized = [[_bounded(tokenize(d)) for d in group] for group in groups]
    analyser = _analyser(tagger)

    def model_work():
        for group in tokenized:
            analyser.analyse([[w for w, _, _ in s] for ss in group for s in ss], SENTENCES_PER_CALL)

    def tokenizing():
        for group in groups:
            [tokenize(d) for d in group]

    def timed(work):
        started = time.perf_counter()
        work()
        return time.perf_counter() - started

    def both_at_once():
        other = threading.Thread(target=tokenizing)
        other.start()
        model_work()
        other.join()

    model_work(), tokenizing()  # warm-up
    out = {"model": [], "tokenize": [], "concurrent": []}
    for _ in range(3):  # interleaved rounds
        out["model"].append(timed(model_work))
        out["tokenize"].append(timed(tokenizing))
        out["concurrent"].append(timed(both_at_once))
    result = {name: round(statistics.median(values), 3) for name, values in out.items()}
    result["sequential"] = round(result["model"] + result["tokenize"], 3)
    result.update(batch=batch, documents=batch * batches)
    return result


def lstm_against_torch(tagger, sizes: List[int], batches: int = 20, rounds: int = 3) -> List[dict]:
    from torch.nn.utils.rnn import pack_padded_sequence

    encoder = tagger.model.encoder
    native = torch.nn.LSTM(encoder.input_size, encoder.hidden_size, bidirectional=True, batch_first=True)
    rng = random.Random(0)

    def fused(x, lengths):
        return encoder(x, lengths=lengths)

    def torch_lstm(x, lengths):
        return native(pack_padded_sequence(x, lengths, batch_first=True))

    out = []
    with torch.no_grad():
        for size in sizes:
            data = []
            for _ in range(batches):
                lengths = sorted((rng.choice([8, 12, 15, 17, 20, 25, 30, 40]) for _ in range(size)), reverse=True)
                data.append((torch.randn(size, lengths[0], encoder.input_size), torch.tensor(lengths)))
            tokens = sum(int(lengths.sum()) for _, lengths in data)
            samples = {"fused": [], "torch.nn.LSTM": []}
            for run in (fused, torch_lstm):  # warm-up
                [run(*d) for d in data[:3]]
            for _ in range(rounds):  # interleaved
                for name, run in (("fused", fused), ("torch.nn.LSTM", torch_lstm)):
                    started = time.thread_time_ns()
                    [run(*d) for d in data]
                    samples[name].append((time.thread_time_ns() - started) / tokens / 1e3)
            out.append({"batch": size, **{f"{name} us/token": round(statistics.median(v), 2) for name, v in samples.items()}})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--documents", required=True, help="CoNLL file (the dev file; never the test file)")
    parser.add_argument("--batch", default="16", help="batch sizes to compare with batch 1, comma-separated")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--overlap", action="store_true", help="only the two-thread overlap measurement (see above)")
    parser.add_argument("--lstm", action="store_true", help="only the BiLSTM against torch.nn.LSTM (see above)")
    args = parser.parse_args(argv)

    from fastner.serve.loadtest import _cpu_name, load_documents
    from fastner.serve.model import predict_documents
    from fastner.tagger import Tagger

    torch.set_num_threads(1)
    tagger = Tagger.load(args.model, device="cpu")
    if args.lstm:
        load = os.getloadavg()[0]
        for row in lstm_against_torch(tagger, [1] + [int(n) for n in args.batch.split(",")]):
            print(json.dumps({**row, "load_average": [load, os.getloadavg()[0]], "machine": _cpu_name(),
                              "clock": "thread CPU"}))
        return 0
    documents = load_documents(args.documents)
    if args.overlap:
        load = os.getloadavg()[0]
        for n in [1] + [int(n) for n in args.batch.split(",")]:
            print(json.dumps({**overlap(tagger, documents, n, max(4, 480 // n)), "load_average": [load, os.getloadavg()[0]],
                              "machine": _cpu_name(), "clock": "wall seconds"}))
        return 0
    rng = random.Random(0)
    sizes = [1] + [int(n) for n in args.batch.split(",")]
    clocks = {n: {} for n in sizes}
    counted = {n: 0 for n in sizes}
    for text in documents[:64]:  # warm-up and the equality check
        assert staged(tagger, [text], {}) == predict_documents(tagger, [text]), text
    for n in sizes:
        sample = [documents[rng.randrange(len(documents))] for _ in range(n)]
        assert staged(tagger, sample, {}) == predict_documents(tagger, sample)
    load = os.getloadavg()[0]
    for _ in range(args.rounds):
        for n in sizes:  # interleaved: every batch size in every round, the same documents count
            for _ in range(max(sizes) // n):
                texts = [documents[rng.randrange(len(documents))] for _ in range(n)]
                staged(tagger, texts, clocks[n])
                counted[n] += n
    names = list(clocks[1])
    print(f"{_cpu_name()}, torch {torch.__version__}, 1 thread, load average {load:.2f} -> {os.getloadavg()[0]:.2f}; "
          f"thread CPU time, ms per document, {counted[1]} documents per batch size", file=sys.stderr)
    print("| stage | " + " | ".join(f"batch {n}" for n in sizes) + " |\n|---|" + "---|" * len(sizes))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{clocks[n].get(name, 0) / counted[n] / 1e6:.3f}" for n in sizes) + " |")
    totals = [sum(clocks[n].values()) / counted[n] / 1e6 for n in sizes]
    print("| **total** | " + " | ".join(f"**{t:.3f}**" for t in totals) + " |")
    print("| batch 1 / batch n | " + " | ".join(f"{totals[0] / t:.2f}x" for t in totals) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
