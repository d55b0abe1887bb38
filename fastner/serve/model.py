"""The one place the server calls the model: raw document texts -> entities with character offsets.

`predict_documents` is raw-text `Tagger.predict` (the same fastner.documents.predict, with the
tagger's Analyser built once instead of per call; fastner.text tokenization in CoNLL-2003
conventions, the sentences of all documents batched together, `score` the posterior
probability of exactly that span, `nbest` the k best analyses of each sentence); nothing else
in fastner.serve knows how the model is called. `count_tokens` is the cheap count the event
loop uses for batching budgets and the per-document limit: a regex, so that no request runs
the full tokenizer on the event loop (+4.5% against fastner.text over eng.testa's texts, and
never far under it: see _TOKEN).

A document's result: {"entities": [{"start", "end", "label", "text", "score"}]} with
`text == document[start:end]` (end exclusive), and with nbest > 1 also "nbest": per sentence
{"start", "end", "analyses": [{"probability", "entities"}]}, best first.
"""
from __future__ import annotations

import re
import weakref
from typing import List, Sequence

# A number with inner dots and commas (`3.2`, `1,000.50`), a word with inner hyphens or
# apostrophes (`Lindqvist-Berg`, `O'Neil`), or any other single non-space character (punctuation
# and symbols stand alone, as in CoNLL). The limits rely on it not undercounting what the model
# sees: joining any word across dots and commas made "a,b,c,..." and "Uwww.Uwww...." (commas
# split by the word tokenizer, periods ending sentences) one token here and two per piece to the
# model, so a 1 MiB document passed --max-document-tokens as 1 token. Over random mixes of
# words, punctuation, clitics, URLs and odd characters, repeated, it is at least half of
# fastner.text's count (a clitic, "'s" / "n't", splits what it joins); on eng.testa's texts it
# counts 4.5% more than fastner.text (U.S. is 4 here), the old pattern 0.9% more.
_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|\w+(?:[-']\w+)*|[^\w\s]")

MAX_NBEST = 8  # k-best analyses a request may ask for (each costs a constrained forward pass)
# Sentences per model call (Tagger.predict's batch size): a server batch's sentences, sorted by
# length, go to the model 64 at a time. One call for the whole batch (512) padded every sentence
# to the batch's longest: 16 / 32 eng.testa articles a batch (~190 / ~380 sentences) took 7.7 /
# 9.4 ms of CPU an article, 64 a call 4.9 / 4.6; batches of 128 / 256 one-sentence documents
# 0.33 / 0.32 ms either way (int8, 1 thread, AMD EPYC Zen 3, old and new alternating in one
# process, 6 rounds; the answers the same).
SENTENCES_PER_CALL = 64

# tagger -> ((dtype, device) of its model, its Analyser); see _analyser
_ANALYSERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def load_tagger(model: str, device: str, precision: str):
    """The tagger in MODEL at `precision` (a name in fastner.serve.config.PRECISIONS): Tagger.load's
    precisions, or float64 (the whole model cast to double). What `fastner serve` serves, and what
    the load test checks its answers against."""
    import torch

    from fastner.tagger import Tagger

    if precision == "float64":
        tagger = Tagger.load(model, device=device)
        tagger.model.to(torch.float64)
        return tagger
    return Tagger.load(model, device=device, precision=precision)


def describe(tagger) -> dict:
    """What GET /v1/model says of the served tagger (the server's settings are added by the app)."""
    import platform

    import torch

    import fastner

    model_config = tagger.model.config
    return {
        "labels": sorted({tag.split("-", 1)[1] for tag in tagger.tags.itos if "-" in tag}),
        "tags": list(tagger.tags.itos),
        "scheme": model_config.scheme,
        "output_scheme": tagger.output_scheme,
        "encoder": model_config.encoder,
        "head": model_config.head,
        "hidden": model_config.hidden,
        "layers": model_config.layers,
        "precision": tagger.precision,  # what the tagger holds, whatever the config asked to load
        "device": str(tagger.device),
        "backend": fastner.backend(),
        "fastner": fastner.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "max_nbest": MAX_NBEST,
    }


def count_tokens(text: str) -> int:
    """About the tokens the model will see for `text`: what batching and the length limit count."""
    return _TOKEN.subn("", text)[1]  # counted in C: 25% faster than iterating match objects


def _analyser(tagger):
    """The tagger's Analyser, built once and reused: `Tagger.predict` (the same
    fastner.documents.predict) builds one per call, setting eval mode and copying the CRF's
    transition scores, 0.2 ms of CPU (4% of a one-sentence model call, measured with
    benchmarks/serve_profile.py). A served tagger's weights do not change; a changed dtype or
    device (a precision switch) builds a new one."""
    parameter = next(tagger.model.parameters())
    key = (parameter.dtype, parameter.device)
    cached = _ANALYSERS.get(tagger)
    if cached is None or cached[0] != key:
        cached = _ANALYSERS[tagger] = (key, tagger.analyser())
    return cached[1]


def predict_documents(tagger, texts: Sequence[str], nbest: int = 1) -> List[dict]:
    """Per document, in order: {"entities": [...]} (+ "nbest" when nbest > 1)."""
    if not 1 <= nbest <= MAX_NBEST:
        raise ValueError(f"nbest must be between 1 and {MAX_NBEST}, got {nbest}")
    from fastner.documents import predict

    results = predict(_analyser(tagger), list(texts), tagger.output_scheme, SENTENCES_PER_CALL,
                      nbest if nbest > 1 else None, sentence_records=nbest > 1)
    out = []
    for result in results:
        record = {"entities": result["entities"]}
        if nbest > 1:
            record["nbest"] = [{"start": sentence["start"], "end": sentence["end"],
                                "analyses": [{"probability": a["probability"], "entities": a["entities"]}
                                             for a in sentence["nbest"]]}
                               for sentence in result["sentences"]]
        out.append(record)
    return out
