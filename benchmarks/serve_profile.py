"""Where the server's model call spends its time: one document vs a batch of documents.

    python -m benchmarks.serve_profile MODEL --documents ../shared/data/conll2003/eng.testa [--batch 16,64]

Runs the server's model call (fastner.serve.model.predict_documents, then the JSON encoding of
its answer) on the same documents the load test sends (detokenized CoNLL sentences; --articles:
the file's articles, its sentences joined between -DOCSTART- lines), with the
functions that make up its stages wrapped where the served path looks them up (MODULE_STAGES,
MODEL_STAGES below): each stage is charged the calling thread's CPU time (time.thread_time_ns:
steadier than wall time on a shared machine) spent in it, exclusive of the stages nested in it;
what no stage claims is "other". The real code runs, not a copy of it, so the profile cannot
drift from what the server does (an earlier copy did, and its answers stopped matching); a stage
that no call reaches fails the run. Batch 1 and the batch sizes asked for are interleaved in
rounds, so all see the same contention. Prints per-document ms by stage; `--precision` as
`fastner serve`'s.

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
import contextlib
import functools
import importlib
import inspect
import json
import os
import random
import statistics
import sys
import time
from typing import Dict, List

import torch


# Where the stages are: (module, attribute, stage). Each function is wrapped where the served
# path looks it up, and the stage is charged its exclusive time (a wrapped call inside another
# is charged to its own stage, not its caller's). Every stage must be reached by a profiled
# call (stages_reached): a renamed or no longer used function fails the run instead of
# silently leaving its time in "other".
CRF = "CRF: Viterbi + log Z"
MODULE_STAGES = [
    ("fastner.text.tokenizer", "_sentence_ranges", "tokenize: sentence split (syntok)"),
    ("fastner.text.tokenizer", "_word_spans", "tokenize: words (nltk + CoNLL fixes)"),
    ("fastner.text.tokenizer", "_conll_fixes", "tokenize: words (nltk + CoNLL fixes)"),
    ("fastner.inference", "encode_with", "encode: word/char lookup"),
    ("fastner.inference", "make_batch", "encode: pad to tensors"),
    ("fastner.ops", "crf_viterbi", CRF),
    ("fastner.ops", "crf_forward", CRF),
    ("fastner.inference", "tags_to_spans", "spans: tags -> spans"),
    ("fastner.inference", "span_log_probabilities", "spans: posterior probabilities"),
    ("fastner.documents", "document_result", "records: document results"),
]
# The model's parts, wrapped on the served tagger's model instance: (attribute path, stage).
MODEL_STAGES = [
    ("embed_words", "model: word embedding (+ frozen GloVe rows)"),
    ("char_cnn.forward", "model: char CNN"),
    ("encoder.forward", "model: BiLSTM (fused op)"),
    ("_project", "model: output layer"),
]
OTHER = "other: Python between the stages"
# Stages whose functions other stages call too: charged to this stage only when no other stage
# is open (the model's own Viterbi and log Z), else to the stage calling them.
OWN_CALLS_ONLY = {CRF}


class StageClock:
    """Thread CPU time by stage, exclusive of nested stages: clock[stage] += ns."""

    def __init__(self) -> None:
        self.clock: Dict[str, int] = {}
        self.calls: Dict[str, int] = {}
        self._children: List[int] = []  # per open stage: ns spent in stages nested in it
        self._open: List[str] = []  # the open stages, innermost last

    def _run(self, stage: str, call):
        if stage in OWN_CALLS_ONLY and any(name != OTHER for name in self._open):
            return call()  # inside another stage: its time stays there
        self._open.append(stage)
        self._children.append(0)
        started = time.thread_time_ns()
        try:
            return call()
        finally:
            spent = time.thread_time_ns() - started
            nested = self._children.pop()
            self._open.pop()
            self.clock[stage] = self.clock.get(stage, 0) + spent - nested
            self.calls[stage] = self.calls.get(stage, 0) + 1
            if self._children:
                self._children[-1] += spent

    def wrap(self, fn, stage: str):
        if inspect.isgeneratorfunction(fn):
            def generator(*args, **kwargs):  # the generator's body runs in next(): time each
                inner = fn(*args, **kwargs)
                while True:
                    try:
                        yield self._run(stage, lambda: next(inner))
                    except StopIteration:
                        return
            return functools.wraps(fn)(generator)
        return functools.wraps(fn)(lambda *args, **kwargs: self._run(stage, lambda: fn(*args, **kwargs)))

    def measure(self, call):
        """call() with everything no stage claims charged to OTHER."""
        return self._run(OTHER, call)

    def measure_stage(self, stage: str, call):
        return self._run(stage, call)


@contextlib.contextmanager
def stages_of(tagger, stage_clock: StageClock):
    """Wraps the served path's stage functions (MODULE_STAGES, MODEL_STAGES) for the duration."""
    restore = []
    try:
        for module_name, name, stage in MODULE_STAGES:
            module = importlib.import_module(module_name)
            original = getattr(module, name)
            setattr(module, name, stage_clock.wrap(original, stage))
            restore.append((module, name, original, False))
        for path, stage in MODEL_STAGES:
            *parents, name = path.split(".")
            owner = functools.reduce(getattr, parents, tagger.model)
            original = getattr(owner, name)  # a bound method: the wrapper shadows it on the instance
            object.__setattr__(owner, name, stage_clock.wrap(original, stage))
            restore.append((owner, name, original, True))
        yield stage_clock
    finally:
        for owner, name, original, on_instance in reversed(restore):
            if on_instance:
                object.__delattr__(owner, name)
            else:
                setattr(owner, name, original)


def staged(tagger, texts: List[str], stage_clock: StageClock) -> List[dict]:
    """predict_documents(tagger, texts) and the server's encoding of its answer, inside
    stages_of(tagger, stage_clock): their thread CPU ns added to stage_clock by stage."""
    from fastner.serve.model import predict_documents

    with stages_of(tagger, stage_clock):
        documents = stage_clock.measure(lambda: predict_documents(tagger, texts))
        # what fastner/serve/app.py does with the documents
        stage_clock.measure_stage("JSON answer", lambda: json.dumps({"documents": documents}).encode("ascii"))
    return documents


def stages_reached(stage_clock: StageClock) -> None:
    expected = {stage for _, _, stage in MODULE_STAGES} | {stage for _, stage in MODEL_STAGES}
    missing = sorted(expected - set(stage_clock.calls))
    if missing:
        raise SystemExit(f"serve_profile: no profiled call reached {missing}: the served path changed; "
                         "update MODULE_STAGES / MODEL_STAGES")


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
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "int8"],
                        help="as `fastner serve --precision`")
    parser.add_argument("--articles", action="store_true",
                        help="documents are the file's articles (its sentences between -DOCSTART- lines, joined with "
                             "spaces: news text of several sentences), not one sentence each")
    args = parser.parse_args(argv)
    try:
        asked = [int(n) for n in args.batch.split(",")]
    except ValueError:
        parser.error(f"--batch: comma-separated batch sizes expected, got {args.batch!r}")
    if any(n < 1 for n in asked):
        parser.error(f"--batch: batch sizes must be >= 1, got {args.batch!r}")
    # batch 1 is always measured (the baseline): "--batch 1,16" asks for it once, not twice
    sizes = [1] + sorted(set(asked) - {1})

    from fastner.serve.loadtest import _cpu_name, load_documents
    from fastner.serve.model import predict_documents
    from fastner.tagger import Tagger

    torch.set_num_threads(1)
    tagger = Tagger.load(args.model, device="cpu", precision=args.precision)
    if args.lstm:
        load = os.getloadavg()[0]
        for row in lstm_against_torch(tagger, sizes):
            print(json.dumps({**row, "load_average": [load, os.getloadavg()[0]], "machine": _cpu_name(),
                              "clock": "thread CPU"}))
        return 0
    if args.articles:
        from benchmarks.word_spans import conll_articles

        documents = conll_articles(args.documents)
    else:
        documents = load_documents(args.documents)
    if args.overlap:
        load = os.getloadavg()[0]
        for n in sizes:
            print(json.dumps({**overlap(tagger, documents, n, max(4, 480 // n)), "load_average": [load, os.getloadavg()[0]],
                              "machine": _cpu_name(), "clock": "wall seconds"}))
        return 0
    rng = random.Random(0)
    clocks = {n: StageClock() for n in sizes}
    counted = {n: 0 for n in sizes}
    for text in documents[:64]:  # warm-up, and the wrappers change nothing
        assert staged(tagger, [text], StageClock()) == predict_documents(tagger, [text]), text
    load = os.getloadavg()[0]
    for _ in range(args.rounds):
        for n in sizes:  # interleaved: every batch size in every round, the same documents count
            for _ in range(max(sizes) // n):
                texts = [documents[rng.randrange(len(documents))] for _ in range(n)]
                staged(tagger, texts, clocks[n])
                counted[n] += n
    for n in sizes:
        stages_reached(clocks[n])
    names = [stage for _, _, stage in MODULE_STAGES[:5]] + [stage for _, stage in MODEL_STAGES]
    names += [stage for _, _, stage in MODULE_STAGES[5:]] + ["JSON answer", OTHER]
    names = list(dict.fromkeys(names))  # in pipeline order, each once
    print(f"{_cpu_name()}, torch {torch.__version__}, 1 thread, precision {args.precision}, load average "
          f"{load:.2f} -> {os.getloadavg()[0]:.2f}; thread CPU time, ms per document, {counted[1]} documents "
          f"{'(articles) ' if args.articles else ''}per batch size", file=sys.stderr)
    print("| stage | " + " | ".join(f"batch {n}" for n in sizes) + " |\n|---|" + "---|" * len(sizes))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{clocks[n].clock.get(name, 0) / counted[n] / 1e6:.3f}" for n in sizes) + " |")
    totals = [sum(clocks[n].clock.values()) / counted[n] / 1e6 for n in sizes]
    print("| **total** | " + " | ".join(f"**{t:.3f}**" for t in totals) + " |")
    print("| batch 1 / batch n | " + " | ".join(f"{totals[0] / t:.2f}x" for t in totals) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
